"""Staged rollout on devices: signed canary cohorts by a stable hash of the device id, rollback, promotion."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.backends import BackendOptions
from edge_agent.config import UpdateSettings
from edge_agent.pipeline import LoadedModel
from edge_agent.protocol import ReleaseHint, UpdateEvent, release_topic
from edge_agent.updater.boot import select_boot
from edge_agent.updater.cohort import Cohort, cohort_position, in_cohort
from edge_agent.updater.release_info import target_path
from edge_agent.updater.store import UpdateStore
from edge_agent.updater.updater import Identity, Updater
from trainer.errors import ReleaseError
from trainer.release.repository import ReleaseRecord, ReleaseRepository
from trainer.release.server import ReleaseServer
from trainer.sim.tiny import build_tiny_package

from .update_helpers import wait_for

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


@dataclass
class _Channels:
    """A real signed repository served over HTTP with stable 1.0.0 (release 1) and a canary 2.0.0 for a
    0% cohort (release 2): no device may take the canary."""

    tmp: Path
    repo: ReleaseRepository
    server: ReleaseServer
    root: Path
    factory: Path
    canary: ReleaseRecord


@pytest.fixture
def channels(tmp_path: Path) -> Iterator[_Channels]:
    repo = ReleaseRepository.init(tmp_path / "repo")
    server = ReleaseServer(repo.path).start()
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes())
    factory = build_tiny_package(tmp_path / "pkgs" / "1.0.0", version="1.0.0").root
    canary_pkg = build_tiny_package(tmp_path / "pkgs" / "2.0.0", version="2.0.0").root
    assert factory is not None and canary_pkg is not None
    repo.publish(factory, channel="stable", fleet=FLEET)
    canary = repo.publish(canary_pkg, channel="canary", fleet=FLEET, cohort=Cohort.of_share(0.0, FLEET))
    try:
        yield _Channels(tmp_path, repo, server, root, factory, canary)
    finally:
        server.stop()


def _hinted_device(
    ch: _Channels, channel: str | None, topic_channel: str, hint: ReleaseHint
) -> list[UpdateEvent]:
    """A device (``channel`` None: the default settings) running its updater thread receives ``hint`` on
    ``release/{topic_channel}``; returns its update events once the hint was handled. It must still serve
    the factory model and have recorded no release above it."""
    settings = UpdateSettings(
        repository=ch.server.url,
        root=ch.root,
        health_windows=0,
        poll_seconds=0,
        poll_on_start=False,
        latency_budget_ms=500,
        **({"channel": channel} if channel else {}),
    )
    store = UpdateStore(ch.tmp / "dev" / (channel or "default"))
    boot = select_boot(store, ch.factory)
    events: list[UpdateEvent] = []
    up = Updater(settings, Identity(FLEET, "cam-07", 1, "onnx-fp32"), store, boot, publish=events.append)
    host = _Host(LoadedModel.load(boot.package, "onnx-fp32", BackendOptions()))
    up.start(host)
    try:
        up.on_hint(release_topic(FLEET, topic_channel), hint.to_bytes())
        assert wait_for(lambda: any(e.state == "rejected" for e in events), 30), [
            (e.state, e.reason) for e in events
        ]
    finally:
        up.stop()  # after the step that handled the hint: everything it did is in ``events``
    assert host.active.package.manifest.version == "1.0.0", "the canary must not be installed"
    assert not any(e.state in ("downloading", "staged", "trial") for e in events)
    assert up.state.max_release <= 1
    return events


def _rejection(events: list[UpdateEvent]) -> UpdateEvent:
    """The one rejection among ``events``."""
    rejected = [e for e in events if e.state == "rejected"]
    assert len(rejected) == 1, [(e.state, e.reason, e.detail) for e in events]
    return rejected[0]


@pytest.mark.parametrize(("channel", "reason"), [(None, "not_followed"), ("auto", "not_in_cohort")])
def test_a_stable_hint_naming_a_zero_percent_canary_installs_nothing(
    channels: _Channels, channel: str | None, reason: str
) -> None:
    """The hardening issue's case: on ``release/stable``, a hint naming the canary target of a 0% cohort.
    A device on stable (the default settings) does not follow that target; one on ``auto`` follows it
    but is not in the signed cohort. Neither installs it, and the rejection says why."""
    forged = channels.canary.hint(channels.server.url).model_copy(update={"channel": "stable"})
    ev = _rejection(_hinted_device(channels, channel, "stable", forged))
    assert (ev.reason, ev.target) == (reason, channels.canary.target), ev
    assert ev.detail is not None and channels.canary.target in ev.detail
    if reason == "not_in_cohort":
        assert "cam-07" in ev.detail and "0% of the fleet" in ev.detail


@pytest.mark.parametrize(("channel", "forged_as"), [("auto", "stable"), ("stable", "canary")])
def test_a_release_signed_for_another_channel_than_its_path_is_refused(
    channels: _Channels, channel: str, forged_as: str
) -> None:
    """The signed channel must be the channel of the target's path: a canary key labelling its 0%-cohort
    release ``stable`` would otherwise reach every ``auto`` device (the cohort applies to canary releases
    only), and a stable release labelled ``canary`` is not one a stable device follows."""
    path_channel = "canary" if forged_as == "stable" else "stable"
    path = target_path(path_channel, FLEET, "colour")
    with channels.repo.edit_targets(path_channel) as targets:  # signed with the channel's real key
        custom = targets.targets[path].unrecognized_fields["custom"]["edgefleet"]
        custom["channel"] = forged_as
        if forged_as == "canary":
            custom["cohort"] = Cohort.of_share(0.0, FLEET).model_dump()
        custom["release"] = 3  # above what the device runs, so only the channel check can refuse it
    channels.repo.do_snapshot()
    channels.repo.do_timestamp()
    hint = channels.canary.hint(channels.server.url).model_copy(
        update={"channel": path_channel, "target": path, "release": 3}
    )
    ev = _rejection(_hinted_device(channels, channel, path_channel, hint))
    assert (ev.reason, ev.target) == ("wrong_channel", path), ev
    assert ev.detail is not None and repr(forged_as) in ev.detail


def test_tampered_canary_metadata_is_reported_on_an_auto_device(channels: _Channels) -> None:
    """Under ``auto`` the updater reads every channel before it picks one: a TUF failure there (the
    canary role altered after signing) is a ``rejected`` event like on a one-channel device, not an
    exception logged by the update thread."""
    versions = [int(p.name.split(".")[0]) for p in (channels.repo.path / "metadata").glob("*.canary.json")]
    role = channels.repo.path / "metadata" / f"{max(versions)}.canary.json"
    md = json.loads(role.read_text())
    md["signed"]["targets"][channels.canary.target]["custom"]["edgefleet"]["cohort"]["share_bp"] = 10_000
    role.write_text(json.dumps(md))  # everyone in the cohort, but the signature no longer matches
    ev = _rejection(_hinted_device(channels, "auto", "canary", channels.canary.hint(channels.server.url)))
    assert (ev.reason, ev.target) == ("bad_signature", channels.canary.target), ev
