"""Over-the-air updates end to end, and every attack on them: one real agent process (mutual TLS through the
shipped broker config and ACL), a real TUF repository with real keys, served over real HTTP from a mirror
that each test tampers with the way an attacker between repository and device would.

Each attack must be rejected, reported on the device's ``update`` topic, and leave the current model
serving (checked on telemetry windows closed after the rejection) with the device's state unchanged.
The tests run in file order and share the device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Targets

from edge_agent.protocol import ReleaseHint, release_topic
from edge_agent.updater.release_info import target_path
from trainer.release.repository import Expiry, ReleaseRecord, ReleaseRepository
from trainer.release.server import ReleaseServer
from trainer.sim.tiny import build_tiny_package

from .update_helpers import AgentProcess, DeployedBroker, TlsClient, agent_yaml, mirror, wait_for

FLEET = "shop"
DEVICE = "dev-a"
CHANNEL = "canary"
TARGET = target_path(CHANNEL, FLEET, "colour")


@dataclass
class Rig:
    tmp: Path
    repo: ReleaseRepository
    served: Path
    server: ReleaseServer
    trainer: TlsClient
    agent: AgentProcess
    state_path: Path
    tuf_dir: Path
    trainer_pki: Path
    broker_url: str
    packages: dict[str, Path] = field(default_factory=dict)
    installed: dict[str, ReleaseRecord] = field(default_factory=dict)
    old_copy: Path | None = None
    counter: int = 0

    # -- the repository side ------------------------------------------------------------------------
    def package(self, behaviour: str = "ok") -> Path:
        self.counter += 1
        version = f"2.{self.counter}.0"
        return build_tiny_package(self.tmp / "pkgs" / version, version=version, behaviour=behaviour).root  # type: ignore[arg-type]

    def publish(self, package: Path, **kw: Any) -> ReleaseRecord:
        rec = self.repo.publish(
            package, channel=kw.pop("channel", CHANNEL), fleet=kw.pop("fleet", FLEET), **kw
        )
        mirror(self.repo.path, self.served)
        return rec

    def hint(self, hint: ReleaseHint | ReleaseRecord) -> None:
        h = hint.hint(self.server.url) if isinstance(hint, ReleaseRecord) else hint
        self.trainer.publish(release_topic(FLEET, CHANNEL), h.to_bytes(), retain=True)

    def served_role(self, role: str) -> Path:
        versions = [int(p.name.split(".")[0]) for p in (self.served / "metadata").glob(f"*.{role}.json")]
        return self.served / "metadata" / f"{max(versions)}.{role}.json"

    # -- the device side ----------------------------------------------------------------------------
    def events(self) -> list[dict]:
        return self.trainer.json_messages("/update")

    def windows(self) -> list[dict]:
        return self.trainer.json_messages("/tele")

    def wait_event(self, pred: Callable[[dict], bool], after: int, timeout: float = 30) -> dict:
        ev = wait_for(lambda: next((e for e in self.events()[after:] if pred(e)), None), timeout)
        assert ev is not None, (
            f"no such update event; got {[(e['state'], e.get('reason')) for e in self.events()[after:]]}\n{self.agent.log_tail()}"
        )
        return ev

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def serving(self, since: float, timeout: float = 15) -> dict:
        """The model of a telemetry window that started after ``since`` (and inferred frames)."""
        w = wait_for(
            lambda: next(
                (w for w in self.windows() if w["start"] > since and w["frames"]["inferred"] > 0), None
            ),
            timeout,
        )
        assert w is not None, f"no telemetry after {since}\n{self.agent.log_tail()}"
        return w["model"]

    def trusted_root(self) -> int:
        return int(json.loads((self.tuf_dir / "root.json").read_text())["signed"]["version"])

    def expect_rejected(self, hint: ReleaseHint | ReleaseRecord, reason: str) -> dict:
        """Send ``hint``; the device must refuse with ``reason``, report it, and keep serving what it served."""
        n = len(self.events())
        before = self.state()
        serving = self.serving(time.time() - 0.5)["sha256"]  # what runs now
        self.hint(hint)
        ev = self.wait_event(lambda e: e["state"] in ("rejected", "trial", "active"), n)
        assert (ev["state"], ev.get("reason")) == ("rejected", reason), ev
        assert ev["serving"]["sha256"] == serving
        assert self.serving(ev["ts"])["sha256"] == serving, "the current model must keep running"
        after = self.state()
        assert (after["committed"], after["max_release"]) == (before["committed"], before["max_release"])
        assert not any(e["state"] in ("trial", "active") for e in self.events()[n:])
        return ev


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: str, pki: Path) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("ota")
    broker = DeployedBroker(tmp / "broker", pki, mosquitto_binary).start()
    repo = ReleaseRepository.init(tmp / "repo")
    served = tmp / "served"
    mirror(repo.path, served)
    server = ReleaseServer(served).start()
    (tmp / "root.json").write_bytes(repo.root_bytes())  # pinned at provisioning
    factory = build_tiny_package(tmp / "pkgs" / "1.0.0", version="1.0.0")
    trainer = TlsClient(
        broker.service_port, pki, "trainer", "service", subscribe=f"ef/v1/{FLEET}/dev/{DEVICE}/#"
    )
    state = tmp / "state"
    config = agent_yaml(
        tmp / "agent.yaml",
        device=DEVICE,
        fleet=FLEET,
        state=state,
        package=factory.root,
        broker_url=broker.url,
        repo_url=server.url,
        root=tmp / "root.json",
        tls=(pki / "ca.crt", pki / "device" / f"{DEVICE}.crt", pki / "device" / f"{DEVICE}.key"),
        update={"selftest_timeout_s": 8},
    )
    agent = AgentProcess(config, tmp / "agent.log").start()
    r = Rig(
        tmp,
        repo,
        served,
        server,
        trainer,
        agent,
        state / "update" / "state.json",
        state / "update" / "tuf",
        pki,
        broker.url,
    )
    r.packages["1.0.0"] = factory.root
    try:
        r.wait_event(lambda e: e["state"] == "booted", 0)
        yield r
    finally:
        code = agent.stop()
        trainer.close()
        server.stop()
        broker.stop()
        assert code == 0, agent.log_tail()


def test_a_release_goes_through_verify_selftest_swap_health_and_commit(rig: Rig) -> None:
    booted = rig.events()[0]
    assert (
        booted["state"] == "booted" and booted["slot"] == "factory" and booted["model"]["version"] == "1.0.0"
    )
    n = len(rig.events())
    pki = rig.trainer_pki
    rig.server.root = rig.repo.path  # serve the repository itself while the CLI publishes and hints
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "release",
            "publish",
            str(rig.package()),
            "--repo",
            str(rig.repo.path),
            "--channel",
            CHANNEL,
            "--fleet",
            FLEET,
            "--broker",
            rig.broker_url,
            "--ca",
            str(pki / "ca.crt"),
            "--cert",
            str(pki / "service" / "trainer.crt"),
            "--key",
            str(pki / "service" / "trainer.key"),
            "--url",
            rig.server.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and "hint sent" in cli.stdout, cli.stderr
    rec = rig.repo.releases()[-1]
    active = rig.wait_event(lambda e: e["state"] in ("active", "rejected", "rolled_back"), n)
    mirror(rig.repo.path, rig.served)
    rig.server.root = rig.served
    assert active["state"] == "active" and active["release"] == rec.release and active["windows"] == 2
    states = [e["state"] for e in rig.events()[n:]]
    assert states == ["downloading", "staged", "verified", "trial", "active"], states
    assert rig.serving(active["ts"])["sha256"] == rec.package_sha256
    st = rig.state()
    assert st["committed"]["slot"] == "a" and st["committed"]["release"] == rec.release == st["max_release"]
    assert st["previous"]["slot"] == "factory"
    rig.installed["first"] = rec
    rig.old_copy = rig.tmp / "old-served"
    shutil.copytree(rig.served, rig.old_copy)  # the repository as it was: replayed later


def test_a_model_that_fails_its_health_window_is_rolled_back(rig: Rig) -> None:
    before = rig.state()["committed"]
    n = len(rig.events())
    rec = rig.publish(rig.package("collapse"))  # passes the self-test, collapses on real frames
    rig.hint(rec)
    ev = rig.wait_event(lambda e: e["state"] in ("active", "rejected", "rolled_back"), n)
    assert (ev["state"], ev["reason"]) == ("rolled_back", "health_confidence"), ev
    states = [e["state"] for e in rig.events()[n:]]
    assert states == ["downloading", "staged", "verified", "trial", "rolled_back"], states
    trial = next(e for e in rig.events()[n:] if e["state"] == "trial")
    served_trial = [
        w for w in rig.windows() if trial["ts"] <= w["start"] <= ev["ts"] and w["frames"]["inferred"]
    ]
    assert (
        served_trial and served_trial[0]["model"]["sha256"] == rec.package_sha256
    )  # it really was swapped in
    assert served_trial[0]["confidence_mean"] < 0.5
    assert rig.serving(ev["ts"])["sha256"] == before["package_sha256"]  # and swapped back out
    st = rig.state()
    assert st["committed"] == before and st["rejected"][rec.sha256]["reason"] == "health_confidence"
    assert st["max_release"] == rec.release  # a release that was swapped in is a floor even if rolled back
    rig.installed["collapse"] = rec


def test_tampered_artifact_bytes(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    blob = rig.served / "targets" / CHANNEL / FLEET / f"{rec.sha256}.colour.tar"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, one flipped byte
    blob.write_bytes(bytes(data))
    rig.expect_rejected(rec, "artifact_mismatch")
    assert rec.sha256 not in rig.state()["rejected"], (
        "tampering in transit is not the release's fault: it may be fetched again"
    )


def test_artifact_larger_than_its_metadata_says(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    blob = rig.served / "targets" / CHANNEL / FLEET / f"{rec.sha256}.colour.tar"
    blob.write_bytes(blob.read_bytes() + b"\0" * 5_000_000)  # endless data
    ev = rig.expect_rejected(rec, "endless_data")
    assert "more than" in ev["detail"]
    assert not list((rig.state_path.parent / "downloads").glob("*")), "the oversized partial file is deleted"


def test_tampered_metadata(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    path = rig.served_role(CHANNEL)
    md = json.loads(path.read_text())
    md["signed"]["targets"][TARGET]["custom"]["edgefleet"]["release"] += 1000  # signature no longer matches
    path.write_text(json.dumps(md))
    ev = rig.expect_rejected(rec, "bad_signature")
    assert CHANNEL in ev["detail"]


def test_metadata_signed_by_an_unknown_key(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    evil = rig.package("ok")
    evil_rec = ReleaseRepository.init(rig.tmp / "evil-repo").publish(evil, channel=CHANNEL, fleet=FLEET)
    path = rig.served_role(CHANNEL)
    md = Metadata.from_bytes(path.read_bytes())
    assert isinstance(md.signed, Targets)
    tf = md.signed.targets[TARGET]
    tf.hashes, tf.length = {"sha256": evil_rec.sha256}, evil_rec.length
    md.sign(CryptoSigner.generate_ed25519())  # replaces the real signature with the attacker's
    path.write_bytes(md.to_bytes())
    shutil.copy(
        rig.tmp / "evil-repo" / "targets" / CHANNEL / FLEET / f"{evil_rec.sha256}.colour.tar",
        rig.served / "targets" / CHANNEL / FLEET,
    )
    rig.expect_rejected(rec, "bad_signature")


def test_snapshot_and_targets_from_different_versions(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    newest = rig.served_role(CHANNEL)
    version = int(newest.name.split(".")[0])
    older = rig.served / "metadata" / f"{version - 1}.{CHANNEL}.json"
    newest.write_bytes(older.read_bytes())  # mix and match: the new snapshot with older channel metadata
    ev = rig.expect_rejected(rec, "metadata_version")
    assert f"v{version}" in ev["detail"]


def test_expired_timestamp_freeze_attack(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    # The attacker keeps serving a timestamp after it expired (here: one that lives for one second).
    ReleaseRepository(rig.repo.path, expiry=Expiry(timestamp=timedelta(seconds=1))).refresh(force=True)
    mirror(rig.repo.path, rig.served)
    time.sleep(1.5)
    ev = rig.expect_rejected(rec, "expired_metadata")
    assert "timestamp" in ev["detail"]
    rig.repo.refresh(force=True)  # the real repository re-signs (the server does this on a schedule)
    mirror(rig.repo.path, rig.served)


def test_replayed_older_metadata(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    assert rig.old_copy is not None
    for sub in ("metadata", "targets"):  # the attacker serves the repository as it was minutes ago
        shutil.rmtree(rig.served / sub)
        shutil.copytree(rig.old_copy / sub, rig.served / sub)
    ev = rig.expect_rejected(rec, "metadata_version")
    assert "timestamp" in ev["detail"]
    mirror(rig.repo.path, rig.served)


def test_replayed_older_release_is_refused_by_the_device_counter(rig: Rig) -> None:
    # Freshly signed metadata (a compromised online signing key, or a mistake) offering the factory model
    # under a counter the device is already past. TUF accepts the metadata; the device's counter does not.
    floor = rig.state()["max_release"]
    rec = rig.publish(rig.packages["1.0.0"], release=floor)
    forged = rec.hint(rig.server.url).model_copy(update={"release": floor + 100})  # hints are not trusted
    ev = rig.expect_rejected(forged, "release_rollback")
    assert f"not above {floor}" in ev["detail"]


def test_a_target_for_another_fleet(rig: Rig) -> None:
    rec = rig.publish(rig.package(), fleet="warehouse")
    assert rec.target == target_path(CHANNEL, "warehouse", "colour")
    forged = rec.hint(rig.server.url).model_copy(update={"fleet": FLEET})  # pointed at this device
    ev = rig.expect_rejected(forged, "not_followed")
    assert "warehouse" in ev["detail"]


def test_a_hint_naming_a_channel_the_device_does_not_follow(rig: Rig) -> None:
    """A canary device hinted at a stable target (or a stable one at a 0% canary) takes nothing: the
    target path must be one it follows, and the signed channel and cohort must include it."""
    rec = rig.publish(rig.package(), channel="stable")
    forged = rec.hint(rig.server.url).model_copy(update={"channel": CHANNEL})
    ev = rig.expect_rejected(forged, "not_followed")
    assert rec.target in ev["detail"]


def test_a_release_refused_for_its_metadata_is_taken_once_corrected(rig: Rig) -> None:
    """Refusals are remembered by what was wrong: the metadata here, not the archive, so the same
    archive re-signed with fitting metadata installs."""
    pkg = rig.package()
    bad = rig.publish(pkg, min_agent_version="99.0")
    rig.expect_rejected(bad, "agent_too_old")
    good = rig.publish(pkg)
    assert good.sha256 == bad.sha256 and good.release > bad.release  # the same archive bytes
    n = len(rig.events())
    rig.hint(good)
    ev = rig.wait_event(lambda e: e["state"] in ("active", "rejected", "rolled_back"), n, timeout=60)
    assert (ev["state"], ev["release"]) == ("active", good.release), ev


@pytest.mark.parametrize(
    ("behaviour", "detail"),
    [("wrong_golden", "expected"), ("nan", "output is not finite"), ("slow", "exceeds budget 50.0 ms")],
)
def test_models_that_fail_their_self_test(rig: Rig, behaviour: str, detail: str) -> None:
    rec = rig.publish(rig.package(behaviour))
    ev = rig.expect_rejected(rec, "selftest_failed")
    assert detail in ev["detail"], ev["detail"]
    assert rig.state()["rejected"][rec.sha256]["reason"] == "selftest_failed"  # never tried again
    rig.installed[behaviour] = rec


def test_a_model_whose_inference_never_returns_is_refused_and_the_updater_goes_on(rig: Rig) -> None:
    """It hung the updater for good (no newer release installed, SIGTERM ended in SIGABRT): the
    self-test now runs in a child process with a deadline."""
    rec = rig.publish(rig.package("hang"))
    ev = rig.expect_rejected(rec, "selftest_failed")
    assert "does not return" in ev["detail"], ev["detail"]
    good = rig.publish(rig.package())
    n = len(rig.events())
    rig.hint(good)
    done = rig.wait_event(lambda e: e["state"] in ("active", "rejected", "rolled_back"), n, timeout=60)
    assert (done["state"], done["release"]) == ("active", good.release), done


def test_a_rejected_release_is_never_retried(rig: Rig) -> None:
    rec = rig.installed["nan"]
    requests = rig.server.stats()["requests"]
    n = len(rig.events())
    rig.hint(rec)
    time.sleep(1.5)
    assert rig.events()[n:] == [] and rig.server.stats()["requests"] == requests


def test_root_rotation_signed_by_the_new_keys_alone_is_refused(rig: Rig) -> None:
    rec = rig.publish(rig.package())
    trusted = rig.trusted_root()
    md = Metadata.from_bytes(rig.repo.root_bytes())
    assert isinstance(md.signed, Root)
    md.signed.version += 1
    new_signers = [CryptoSigner.generate_ed25519() for _ in range(3)]
    for kid in list(md.signed.roles["root"].keyids):
        md.signed.revoke_key(kid, "root")
    for s in new_signers:
        md.signed.add_key(s.public_key, "root")
    md.signatures.clear()
    for s in new_signers:  # the new threshold is met, the trusted (old) one is not
        md.sign(s, append=True)
    (rig.served / "metadata" / f"{md.signed.version}.root.json").write_bytes(md.to_bytes())
    ev = rig.expect_rejected(rec, "bad_signature")
    assert "root" in ev["detail"]
    assert rig.trusted_root() == trusted
    mirror(rig.repo.path, rig.served)


def test_root_rotation_signed_by_old_and_new_keys_is_accepted(rig: Rig) -> None:
    trusted = rig.trusted_root()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "release",
            "rotate-key",
            "root",
            "--repo",
            str(rig.repo.path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    n = len(rig.events())
    rec = rig.publish(rig.package())
    rig.hint(rec)
    ev = rig.wait_event(lambda e: e["state"] in ("active", "rejected", "rolled_back"), n)
    assert ev["state"] == "active" and ev["release"] == rec.release
    assert rig.trusted_root() == trusted + 1
    rig.installed["after-rotation"] = rec


def test_fleet_rollback_is_a_roll_forward_onto_old_artifacts(rig: Rig) -> None:
    first = rig.installed["first"]
    n = len(rig.events())
    rb = rig.repo.rollback(FLEET, "colour", CHANNEL, to_release=first.release)
    mirror(rig.repo.path, rig.served)
    assert rb.release > rig.state()["max_release"] and rb.sha256 == first.sha256
    rig.hint(rb)
    ev = rig.wait_event(lambda e: e["state"] in ("active", "rejected", "rolled_back"), n)
    assert (
        ev["state"] == "active"
        and ev["release"] == rb.release
        and ev["model"]["sha256"] == first.package_sha256
    )
    assert rig.serving(ev["ts"])["sha256"] == first.package_sha256
    # A second roll-forward onto what already runs is adopted without a download or a swap.
    n = len(rig.events())
    again = rig.repo.rollback(FLEET, "colour", CHANNEL, to_release=first.release)
    mirror(rig.repo.path, rig.served)
    rig.hint(again)
    ev = rig.wait_event(lambda e: e["state"] in ("active", "rejected"), n)
    assert (ev["state"], ev["reason"], ev["release"]) == ("active", "already_running", again.release)
    assert rig.state()["max_release"] == again.release
