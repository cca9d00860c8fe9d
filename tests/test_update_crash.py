"""Crash safety: the agent (a real process) is SIGKILLed again and again while it updates its model.

Releases keep coming (good ones, one whose confidence collapses in the field, one that outputs NaN); the
repository serves them slowly enough that kills land in every phase: download (resumed next start),
unpack, self-test, trial and commit. After every kill the persisted state must be consistent and its
committed slot must verify, and the next start must boot exactly that committed model and report it.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from edge_agent.package import load_package
from edge_agent.updater.state import UpdateStateData
from trainer.ops.broker import MosquittoBroker
from trainer.release.repository import ReleaseRecord, ReleaseRepository
from trainer.release.server import ReleaseServer
from trainer.sim.tiny import build_tiny_package

from .mqtt_helpers import Subscriber
from .update_helpers import AgentProcess, agent_yaml, mirror, wait_for

FLEET, DEVICE = "crash", "cam-crash"
CYCLES = int(os.environ.get("EDGEFLEET_CRASH_CYCLES", "24"))
PHASES = [None, "downloading", "staged", "verified", "trial", None, "active"]
"""Kill right after this event of the current session (plus a random delay), or at a random time (None)."""
BEHAVIOURS = ["ok", "collapse", "ok", "nan", "ok"]


def _check_state(path: Path, factory: Path) -> UpdateStateData:
    """The persisted state parses, holds its invariants, and its committed model verifies on disk."""
    st = UpdateStateData.model_validate(json.loads(path.read_text()))
    assert st.problems() == [], st.problems()
    assert st.committed is not None
    slot_dir = factory if st.committed.slot == "factory" else path.parent / "slots" / st.committed.slot
    pkg = load_package(slot_dir)  # every file's sha256
    assert st.committed.slot == "factory" or pkg.sha256 == st.committed.package_sha256
    return st


def test_sigkill_at_random_points_during_updates(broker: MosquittoBroker, tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGEFLEET_CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    repo = ReleaseRepository.init(tmp_path / "repo")
    served = tmp_path / "served"
    mirror(repo.path, served)
    server = ReleaseServer(served, rate_limit_bps=400_000).start()  # ~0.6 s per download: kills land in it
    (tmp_path / "root.json").write_bytes(repo.root_bytes())
    factory = build_tiny_package(tmp_path / "pkgs" / "factory", version="1.0.0").root
    state = tmp_path / "state"
    config = agent_yaml(
        tmp_path / "agent.yaml",
        device=DEVICE,
        fleet=FLEET,
        state=state,
        package=factory,
        broker_url=broker.url,
        repo_url=server.url,
        root=tmp_path / "root.json",
        window_frames=8,
        fps=40,
        update={"poll_seconds": 0.3, "poll_on_start": True, "health_windows": 2, "latency_budget_ms": 100},
    )
    sub = Subscriber(broker.url, f"ef/v1/{FLEET}/dev/{DEVICE}/update")
    agent = AgentProcess(config, tmp_path / "agent.log")
    published: list[ReleaseRecord] = []
    killed_in: dict[str, int] = {}
    state_file = state / "update" / "state.json"

    def events(session: int) -> list[dict]:
        return [e for e in (json.loads(p) for p in sub.payloads()) if e["session"] == session]

    def publish_next(behaviour: str | None = None) -> None:
        i = len(published)
        pkg = build_tiny_package(
            tmp_path / "pkgs" / f"v{i}",
            version=f"2.{i}.0",
            padding_bytes=200_000,
            behaviour=behaviour or BEHAVIOURS[i % len(BEHAVIOURS)],
        )  # type: ignore[arg-type]
        published.append(repo.publish(pkg.root, channel="canary", fleet=FLEET))
        mirror(repo.path, served)

    try:
        publish_next()
        expected_boot = load_package(factory).sha256
        for cycle in range(CYCLES):
            session = cycle + 1
            agent.start()
            booted = wait_for(
                lambda s=session: next((e for e in events(s) if e["state"] == "booted"), None), 30
            )
            assert booted is not None, f"seed {seed} cycle {cycle}: no boot report\n{agent.log_tail()}"
            assert booted["model"]["sha256"] == expected_boot, f"seed {seed} cycle {cycle}: booted {booted}"
            phase = PHASES[cycle % len(PHASES)]
            if phase is not None:
                wait_for(lambda s=session, p=phase: any(e["state"] == p for e in events(s)), 6)
                time.sleep(rng.uniform(0.0, 0.05 if phase in ("staged", "verified") else 0.3))
            else:
                time.sleep(rng.uniform(0.1, 2.0))
            last = events(session)[-1]["state"]
            agent.kill()
            killed_in[last] = killed_in.get(last, 0) + 1
            st = _check_state(state_file, factory)
            assert st.committed is not None
            expected_boot = st.committed.package_sha256
            newest = published[-1]
            if newest.sha256 in st.rejected or st.committed.release >= newest.release:
                publish_next()
        # Left alone, the device finishes the update that is pending and ends up consistent.
        publish_next("ok")
        final = published[-1]
        agent.start()
        session = CYCLES + 1
        done = wait_for(
            lambda: next(
                (e for e in events(session) if e["state"] == "active" and e["release"] == final.release), None
            ),
            40,
        )
        assert done is not None, (
            f"seed {seed}: {[(e['state'], e.get('reason'), e.get('release')) for e in events(session)]}\n{agent.log_tail()}"
        )
        assert agent.stop() == 0
        st = _check_state(state_file, factory)
        assert (
            st.committed is not None
            and st.committed.release == final.release
            and st.max_release == final.release
        )
    finally:
        agent.kill()
        sub.close()
        server.stop()
    every = [json.loads(p) for p in sub.payloads()]
    print(
        f"seed {seed}: {CYCLES} kills, last event before each kill: {killed_in}; "
        f"{sum(e['state'] == 'active' for e in every)} commits, {sum(e['state'] == 'rolled_back' for e in every)} "
        f"rollbacks, {sum(e['state'] == 'rejected' for e in every)} rejections, "
        f"{server.stats()['by_status'].get('206', 0)} resumed downloads"
    )
    assert {"downloading", "trial"} <= set(killed_in), killed_in
