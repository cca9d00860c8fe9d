"""Staged rollout on devices: signed canary cohorts by a stable hash of the device id, rollback, promotion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.backends import BackendOptions
from edge_agent.config import UpdateSettings
from edge_agent.pipeline import LoadedModel
from edge_agent.updater.boot import select_boot
from edge_agent.updater.cohort import Cohort, cohort_position, in_cohort
from edge_agent.updater.store import UpdateStore
from edge_agent.updater.updater import Identity, Updater
from trainer.errors import ReleaseError
from trainer.release.repository import ReleaseRepository
from trainer.release.server import ReleaseServer
from trainer.sim.tiny import build_tiny_package

FLEET = "shop"


def test_cohort_membership_is_stable_sized_and_nested() -> None:
    devices = [f"cam-{i:04d}" for i in range(4000)]
    small, large = Cohort.of_share(0.1, "shop"), Cohort.of_share(0.3, "shop")
    in_small = {d for d in devices if in_cohort(d, small)}
    in_large = {d for d in devices if in_cohort(d, large)}
    assert 0.08 < len(in_small) / len(devices) < 0.12 and 0.27 < len(in_large) / len(devices) < 0.33
    assert in_small <= in_large  # growing the share only adds devices
    assert {d for d in devices if in_cohort(d, small)} == in_small  # deterministic
    other = {d for d in devices if in_cohort(d, Cohort.of_share(0.1, "other-salt"))}
    assert len(other & in_small) < len(in_small) / 2  # another salt picks other devices
    assert not any(in_cohort(d, Cohort.of_share(0.0, "s")) for d in devices[:100])
    assert all(in_cohort(d, Cohort.of_share(1.0, "s")) for d in devices[:100])
    assert 0 <= cohort_position("x", "y") < 10_000
    with pytest.raises(ValueError):
        Cohort.of_share(1.5, "s")


class _Host:
    """What the agent's pipeline is to the updater: the model slot that is swapped at a frame boundary."""

    def __init__(self, model: LoadedModel) -> None:
        self.active = model

    def swap(self, model: LoadedModel) -> LoadedModel:
        old, self.active = self.active, model
        return old


def test_canary_cohort_rollback_and_promotion(tmp_path: Path) -> None:
    repo = ReleaseRepository.init(tmp_path / "repo")
    server = ReleaseServer(repo.path).start()
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes())
    pkgs = {v: build_tiny_package(tmp_path / "pkgs" / v, version=v) for v in ("1.0.0", "2.0.0", "3.0.0")}
    repo.publish(pkgs["1.0.0"].root, channel="stable", fleet=FLEET)
    devices = [f"cam-{i:02d}" for i in range(16)]
    cohort = Cohort.of_share(0.4, FLEET)
    canaries = {d for d in devices if in_cohort(d, cohort)}
    assert 0 < len(canaries) < len(devices)
    settings = UpdateSettings(
        repository=server.url,
        root=root,
        channel="auto",
        health_windows=0,
        poll_seconds=0,
        latency_budget_ms=500,
    )
    fleet: dict[str, tuple[Updater, _Host]] = {}
    for d in devices:
        store = UpdateStore(tmp_path / "dev" / d)
        boot = select_boot(store, pkgs["1.0.0"].root)
        events: list[Any] = []
        up = Updater(settings, Identity(FLEET, d, 1, "onnx-fp32"), store, boot, publish=events.append)
        fleet[d] = (up, _Host(LoadedModel.load(boot.package, "onnx-fp32", BackendOptions())))

    def check_all() -> dict[str, str]:
        for up, host in fleet.values():
            up.check_now(host)
        return {d: host.active.package.manifest.version for d, (_, host) in fleet.items()}

    try:
        assert set(check_all().values()) == {"1.0.0"}
        with pytest.raises(ReleaseError, match="cohort belongs to canary"):
            repo.publish(pkgs["2.0.0"].root, channel="stable", fleet=FLEET, cohort=cohort)
        repo.publish(pkgs["2.0.0"].root, channel="canary", fleet=FLEET, cohort=cohort)
        versions = check_all()
        assert {d for d, v in versions.items() if v == "2.0.0"} == canaries  # exactly the signed cohort
        repo.rollback(FLEET, "colour", "canary")  # roll-forward of the same cohort onto 1.0.0
        assert set(check_all().values()) == {"1.0.0"}
        assert all(fleet[d][0].state.max_release == 3 for d in canaries)
        repo.publish(pkgs["3.0.0"].root, channel="canary", fleet=FLEET, cohort=cohort)
        assert {d for d, v in check_all().items() if v == "3.0.0"} == canaries
        repo.promote(FLEET, "colour")  # canary -> stable: everyone, canaries already run it
        assert set(check_all().values()) == {"3.0.0"}
        assert all(fleet[d][0].state.max_release == 5 for d in devices)
    finally:
        server.stop()
