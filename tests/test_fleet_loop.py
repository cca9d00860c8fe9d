"""The fleet loop: the labelling queue (CSV round trip), the service's failure paths, people overriding a
canary, and the whole loop end to end (the fast demo: real broker, real agents, real training)."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.config import MqttSettings
from edge_agent.package import ModelPackage, load_package
from trainer.data.screening import ScreenRules
from trainer.fleet.config import (
    ReleaseServerSettings,
    TrainerServiceConfig,
    TrainingSettings,
    load_service_config,
)
from trainer.fleet.labelling import LabelImportError, export_queue, field_dataset, import_labels, label_with
from trainer.fleet.rollout import RolloutManager
from trainer.fleet.rollout_policy import RolloutConfig
from trainer.fleet.service import Timeline, TrainerService
from trainer.ops.broker import MosquittoBroker
from trainer.release.repository import ReleaseRepository
from trainer.sim.tiny import build_tiny_package
from trainer.store import Store

LABELS = ["circle", "square", "triangle"]


def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return bytes(buf)


def _add_samples(store: Store, n: int, device: str = "cam-01") -> list[int]:
    ids = []
    for i in range(n):
        sid = store.add_sample(
            fleet="f",
            device=device,
            ts=100.0 + i,
            consent_policy="blur-faces",
            sha256=f"{i:064x}",
            image=_jpeg(i),
            provenance={"reason": "low_confidence", "top": [[i % 3, 0.4]]},
        )
        assert sid is not None
        ids.append(sid)
    return ids


def test_labels_csv_round_trip_becomes_field_training_data(db_url: str, tmp_path: Path) -> None:
    with Store(db_url) as store:
        ids = _add_samples(store, 4)
        out = tmp_path / "queue.csv"
        assert export_queue(store, out, LABELS) == 4
        rows = list(csv.DictReader(out.open()))
        assert [int(r["sample_id"]) for r in rows] == ids
        assert [r["predicted"] for r in rows] == ["circle", "square", "triangle", "circle"]
        for r in rows:  # the exported images are the stored bytes
            assert (tmp_path / r["image"]).read_bytes() == store.samples(ids=[int(r["sample_id"])])[0].image
        rows[0]["label"], rows[2]["label"] = "square", "triangle"  # a person labels two of them
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        assert import_labels(store, out, LABELS, "alice") == 2
        assert [s.id for s in store.unlabelled_samples()] == [ids[1], ids[3]]
        # without original data the field samples are the whole set: one device and one labeller are
        # 100% of it, so the share caps (tests/test_screening.py) are lifted for the round trip
        field = field_dataset(store, LABELS, rules=ScreenRules(max_device_share=1, max_labeller_share=1))
        assert field.devices == {"cam-01": 2}
        assert field_dataset(store, LABELS).devices == {}  # the default caps hold there too
        assert sorted(s.label for s in field.dataset.samples) == ["square", "triangle"]
        assert all(
            s.meta["origin"] == "field" and s.meta["device"] == "cam-01" for s in field.dataset.samples
        )
        assert field.dataset.samples[0].image.shape == (48, 64, 3)


def test_a_simulated_labelling_team_is_capped_per_labeller_not_as_one(db_url: str) -> None:
    """The demo's oracle labels under several names: under one name its labels would be capped at the
    original data's size (no labeller above half the training set); a team of three is not capped."""
    with Store(db_url) as store:
        ids = []
        for i in range(120):  # four devices, so the device cap (25%) holds as well
            sid = store.add_sample(
                fleet="f",
                device=f"cam-{i % 4}",
                ts=100.0 + i,
                consent_policy="blur-faces",
                sha256=f"{i:064x}",
                image=_jpeg(1000 + i),
                provenance={"reason": "low_confidence", "top": [[0, 0.4]]},
            )
            assert sid is not None
            ids.append(sid)
        assert label_with(store, lambda provenance: LABELS[1], ("oracle-1", "oracle-2", "oracle-3")) == 120
        assert {lab.labeller for lab in store.labels()} == {"oracle-1", "oracle-2", "oracle-3"}
        team = field_dataset(store, LABELS, base_size=60)
        assert sum(team.devices.values()) == 120, team.screen.summary()
        for sid in ids:  # the same labels under one name (the newest label of a sample wins)
            store.add_label(sid, LABELS[1], source="oracle", labeller="oracle")
        alone = field_dataset(store, LABELS, base_size=60)
        assert sum(alone.devices.values()) == 60, alone.screen.summary()


def test_labels_import_rejects_a_bad_file_whole(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        ids = _add_samples(store, 2)
        bad = tmp_path / "bad.csv"
        bad.write_text(f"sample_id,label\n{ids[0]},circle\n{ids[1]},hexagon\n")
        with pytest.raises(LabelImportError, match=r"bad\.csv:3: unknown label 'hexagon'"):
            import_labels(store, bad, LABELS, "bob")
        assert store.count_labelled_samples() == 0  # the valid first row was not stored either
        bad.write_text("id,label\n1,circle\n")
        with pytest.raises(LabelImportError, match="missing column"):
            import_labels(store, bad, LABELS, "bob")
        for text, problem in (
            (f"sample_id,label\n{ids[0]},circle\n999999,square\n", r"bad\.csv:3: no sample with id 999999"),
            (f"sample_id,label\n{ids[0]},circle\n{ids[1]}\n", r"bad\.csv:3: 2 cells expected"),
            (f"sample_id,label\n{ids[0]},circle,extra\n", r"bad\.csv:2: 2 cells expected"),
            (
                f"sample_id,label\n{ids[0]},circle\n{ids[0]},square\n",
                r"bad\.csv:3: sample \d+ is labelled 'circle'",
            ),
        ):
            bad.write_text(text)
            with pytest.raises(LabelImportError, match=problem):
                import_labels(store, bad, LABELS, "bob")
            assert store.count_labelled_samples() == 0, text  # nothing stored before the bad line either
        good = tmp_path / "good.csv"
        good.write_text(f"sample_id,label\n{ids[0]},circle\n{ids[1]},square\n")
        assert import_labels(store, good, LABELS, "bob") == 2
        assert import_labels(store, good, LABELS, "bob") == 0  # re-importing stacks nothing
        assert len(store.labels()) == 2
        assert {(lab.labeller, lab.source) for lab in store.labels()} == {("bob", "human")}


def _service_config(tmp_path: Path, broker_url: str, base_data: str) -> TrainerServiceConfig:
    return TrainerServiceConfig(
        fleet="loop",
        mqtt=MqttSettings(url=broker_url, client_id="trainer-test"),
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        release=ReleaseServerSettings(repo=tmp_path / "repo", port=0),
        training=TrainingSettings(base_data=base_data, model="tiny", work_dir=tmp_path / "work"),
        tick_s=0.2,
    )


def test_failed_retraining_raises_an_alert_and_the_champion_stays(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    champion = build_tiny_package(tmp_path / "v1", version="1.0.0", name="tiny")
    cfg = _service_config(tmp_path, broker.url, base_data=str(tmp_path / "no-such-dataset"))
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    try:
        service.release_initial(champion)
        service._start_job("test: retrain now", ["cam-01"], time.time())
        deadline = time.time() + 120
        while not service.store.alerts(kind="retrain_failed") and time.time() < deadline:
            time.sleep(0.5)
        [alert] = service.store.alerts(kind="retrain_failed")
        assert "no-such-dataset" in alert.message and "champion stays" in alert.message
        assert service.champion is not None and service.champion.sha256 == champion.sha256
        assert service.repo.current("stable", "loop", "tiny").package_sha256 == champion.sha256  # type: ignore[union-attr]
        assert service.rollout is not None and service.rollout.active is None
        assert service.errors == 0
    finally:
        service.stop()


def test_labels_held_for_review_are_alerted_with_their_samples_even_when_the_run_fails(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """The screen's held labels reach a person whatever the run's outcome: a relabelled copy and a sole
    labeller contradicting the champion's confident predictions are named in labels_held_for_review,
    here before the run fails (the champion's labels differ from the base data's)."""
    import json

    champion = build_tiny_package(tmp_path / "v1", version="1.0.0", name="tiny")
    base = _service_config(tmp_path, broker.url, base_data="builtin:shapes?n=4")
    cfg = base.model_copy(
        update={"fleet": "held", "mqtt": MqttSettings(url=broker.url, client_id="trainer-held")}
    )
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    try:
        service.release_initial(champion)
        now = time.time()

        def add(device: str, seed: int, label: str, labeller: str, top: list) -> int:
            sid = service.store.add_sample(
                fleet="held", device=device, ts=now + seed, consent_policy="c", sha256=f"{seed:064x}",
                image=_jpeg(seed), provenance={"reason": "drift", "top": top},
            )  # fmt: skip
            assert sid is not None
            service.store.add_label(sid, label, source="human", labeller=labeller)
            return sid

        for i in range(1, 5):  # unremarkable labels: kept
            add("cam-1", i, "circle", "bob", [[0, 0.5]])
        copy = [add("cam-1", 10, "square", "bob", [[3, 0.5]]), add("cam-2", 10, "star", "eve", [[3, 0.5]])]
        hostile = [add("cam-3", 20 + i, "star", "mallory", [[0, 0.97]]) for i in range(12)]  # says circle
        service._start_job("test: retrain now", ["cam-1", "cam-2", "cam-3"], time.time())
        deadline = time.time() + 120
        while not service.store.alerts(kind="retrain_failed") and time.time() < deadline:
            time.sleep(0.5)
        [failed] = service.store.alerts(kind="retrain_failed")
        assert "labels differ from champion" in failed.message
        [held] = service.store.alerts(kind="labels_held_for_review")
        assert held.message == (
            "14 field label(s) held for review (conflicting_duplicate 2, labeller_outlier 12); "
            "2.0.0 did not train on them"
        )
        assert json.loads(held.details or "{}")["samples"] == [str(i) for i in sorted(copy + hostile)]
    finally:
        service.stop()


def test_a_restarted_service_keeps_its_champion_and_never_reuses_a_version(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    v1 = build_tiny_package(tmp_path / "v1", version="1.0.0", name="tiny")
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    first = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    try:
        first.adopt_champion(v1)
        released = first.repo.current("stable", "loop", "tiny")
        assert released is not None and released.package_sha256 == v1.sha256
        (cfg.training.work_dir / "retrain-2.0.0").mkdir(parents=True)  # a candidate tried before the restart
    finally:
        first.stop()
    again = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    try:
        assert again.champion is not None and again.champion.sha256 == v1.sha256  # found without --champion
        again.adopt_champion(v1)
        assert again.repo.current("stable", "loop", "tiny").release == released.release  # type: ignore[union-attr]
        assert again._next_version() == "2.1.0"
    finally:
        again.stop()


def test_a_window_with_foreign_bins_is_skipped_and_the_slot_still_assessed(tmp_path: Path) -> None:
    from edge_agent.protocol import FrameCounts, Histogram, ModelRef, TelemetryWindow
    from trainer.fleet.drift_service import DriftService

    pkg = build_tiny_package(tmp_path / "m", version="1.0.0", name="tiny")
    ref = pkg.manifest.reference
    assert ref is not None
    model = ModelRef(name="tiny", version="1.0.0", sha256=pkg.sha256)

    def window(device: str, foreign: bool) -> TelemetryWindow:
        hists = {
            f: Histogram(edges=[e * 2 for e in h.edges] if foreign else h.edges, counts=h.counts)
            for f, h in ref.histograms.items()
        }
        return TelemetryWindow(
            fleet="f",
            device=device,
            session=1,
            seq=0,
            start=100.0,
            end=110.0,
            model=model,
            agent_version="t",
            frames=FrameCounts(captured=200, inferred=200),
            class_counts={0: 200},
            histograms=hists,
        )

    with Store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        store.register_package(pkg)
        store.add_windows([window("good-1", False), window("good-2", False), window("odd", True)])
        service = DriftService(store, "f", slot_s=10.0, grace_s=1.0, start=100.0)
        service.poll(125.0)
        assert service.next_slot == 110.0 + 10.0  # moved on past both slots
        assert set(service.tracks[pkg.sha256]) == {"good-1", "good-2"}  # the odd one skipped, not the slot


CanarySetup = tuple[Store, ReleaseRepository, ModelPackage, ModelPackage]


@pytest.fixture
def canary_setup(tmp_path: Path) -> Iterator[CanarySetup]:
    """A store, a release repository, a champion v1 and a candidate v2 (tiny real packages)."""
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    repo = ReleaseRepository.init(tmp_path / "repo")
    v1 = build_tiny_package(tmp_path / "v1", version="1.0.0", name="tiny")
    v2 = build_tiny_package(tmp_path / "v2", version="2.0.0", name="tiny")
    yield store, repo, v1, v2
    store.close()


def test_a_person_aborting_the_canary_is_seen_by_the_service(canary_setup: CanarySetup) -> None:
    """`edgefleet rollout abort` changes the store and the repository; the running service follows."""
    store, repo, v1, v2 = canary_setup
    service_side = RolloutManager(store, repo, None, fleet="f", model="tiny", cfg=RolloutConfig())
    service_side.release_stable(v1)
    service_side.start_canary(v2, v1.sha256)
    assert service_side.poll(time.time()) is None  # no evidence yet: waits
    person = RolloutManager(store, repo, None, fleet="f", model="tiny", cfg=RolloutConfig())
    person.active = service_side.active
    person.rollback("looks wrong on the loading dock", actor="alice")
    outcome = service_side.poll(time.time())
    assert outcome is not None and outcome.decision == "rollback" and "by hand" in outcome.reasons[0]
    assert service_side.active is None
    assert repo.current("canary", "f", "tiny").package_sha256 == v1.sha256  # type: ignore[union-attr]


def test_a_silent_canary_is_rolled_back(canary_setup: CanarySetup) -> None:
    store, repo, v1, v2 = canary_setup
    mgr = RolloutManager(store, repo, None, fleet="f", model="tiny", cfg=RolloutConfig(max_wait_s=60))
    mgr.release_stable(v1)
    started = mgr.start_canary(v2, v1.sha256).started
    assert mgr.poll(started + 30) is None
    outcome = mgr.poll(started + 61)
    assert outcome is not None and outcome.decision == "rollback" and "silent" in outcome.reasons[0]
    assert [r.state for r in store.rollouts("f")][-1] == "rolled_back"


def test_service_config_file_errors_name_the_field(tmp_path: Path) -> None:
    from edge_agent.errors import ConfigError

    p = tmp_path / "trainer.yaml"
    p.write_text(
        "fleet: f\nmqtt: {url: 'mqtt://127.0.0.1:1883'}\nrelease: {repo: r}\ntraining: {base_data: d}\n"
        "rollout: {canary_share: 2}\n"
    )
    with pytest.raises(ConfigError, match=r"rollout\.canary_share"):
        load_service_config(p)
    example = Path(__file__).resolve().parents[1] / "deploy" / "trainer.yaml"
    assert load_service_config(example).fleet  # the shipped example stays valid


def test_fleet_loop_end_to_end_fast_demo(tmp_path: Path, broker: MosquittoBroker) -> None:
    """drift on the shifted devices -> labels -> retrain -> canary -> promote, in that order; v2 is truly
    better than v1 on the shifted devices (simulator ground truth against the devices' predictions)."""
    from trainer.sim.demo import DemoSettings, run_demo

    summary = run_demo(DemoSettings.fast(), tmp_path / "demo")
    kinds = [e["kind"] for e in summary["timeline"]]
    order = [
        "release",
        "fleet_on_v1",
        "shift",
        "retrain_started",
        "retrain_done",
        "canary_started",
        "rollout_promoted",
        "fleet_on_v2",
    ]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    shifted = set(summary["shifted"])
    drift_on_shifted = [e for e in summary["timeline"] if e["kind"] == "drift" and e.get("device") in shifted]
    assert drift_on_shifted, "no drift alert for a shifted device"
    assert not [
        e for e in summary["timeline"] if e["kind"] == "drift" and e.get("device") not in shifted | {None}
    ]
    phases = {row["phase"]: row for row in summary["phases"]}
    v1_after = phases["v1 after shift"]["shifted"]["true"]
    v2 = next(row for name, row in phases.items() if name.endswith("everywhere"))["shifted"]["true"]
    assert v2 > v1_after + 0.03, (v1_after, v2)
    assert summary["service_errors"] == 0
    # the console served the demo's fleet: every device, with the service's drift state and estimate, and
    # the promoted canary
    console = summary["console"]
    assert set(console["devices"]) == set(summary["devices"]), console
    assert all(d["drift"] is not None and d["estimate"] is not None for d in console["devices"].values())
    assert any(
        cohort.startswith("canary") and state == "promoted" for _, cohort, state in console["rollouts"]
    )
    assert (
        load_package(next((tmp_path / "demo" / "trainer").glob("retrain-*/package"))).manifest.reference
        is not None
    )
    # what a monitoring service received validates against the published JSON Schemas (jsonschema)
    from .test_protocol_contract import validate_captured

    seen = validate_captured(tmp_path / "demo" / "messages.jsonl")
    assert set(seen) == {"status", "tele", "pred", "sample", "update", "cmd", "release", "alert"}, seen


def test_drift_service_assesses_every_window_whatever_its_phase_in_the_slot(tmp_path: Path) -> None:
    """Windows are slotted by their end: a device whose windows start late in a slot (still running when
    a start-based slot would be assessed) is assessed in every slot, and its shift is flagged at once."""
    from edge_agent.protocol import FrameCounts, Histogram, ModelRef, TelemetryWindow
    from trainer.fleet.drift_service import DriftService

    pkg = build_tiny_package(tmp_path / "m", version="1.0.0", name="tiny")
    ref = pkg.manifest.reference
    assert ref is not None
    rng = np.random.default_rng(0)
    model = ModelRef(name="tiny", version="1.0.0", sha256=pkg.sha256)

    def window(device: str, seq: int, start: float, dark: bool) -> TelemetryWindow:
        hists = {}
        for f, h in ref.histograms.items():
            p = np.asarray(h.counts, float) + 0.5
            if dark and f == "brightness":
                p = np.zeros_like(p)
                p[:2] = 1.0  # every frame in the darkest bins
            hists[f] = Histogram(edges=h.edges, counts=rng.multinomial(200, p / p.sum()).tolist())
        classes = rng.multinomial(200, np.asarray(ref.class_prior) / sum(ref.class_prior))
        return TelemetryWindow(
            fleet="f",
            device=device,
            session=1,
            seq=seq,
            start=start,
            end=start + 10,
            model=model,
            agent_version="t",
            frames=FrameCounts(captured=200, inferred=200),
            class_counts={i: int(c) for i, c in enumerate(classes) if c},
            histograms=hists,
        )

    with Store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        store.register_package(pkg)
        t0 = 1_000_000.0
        phases = {
            "early": 1.0,
            "late": 9.0,
        }  # seconds into each 10 s slot at which the device's windows start
        shift_seq = 6
        pending = sorted(
            (
                window(d, k, t0 + 10 * k + ph, dark=k >= shift_seq)
                for d, ph in phases.items()
                for k in range(10)
            ),
            key=lambda w: w.end,
        )
        service = DriftService(store, "f", slot_s=10.0, grace_s=2.0, start=t0)
        events = []
        for now in np.arange(
            t0, t0 + 125, 1.0
        ):  # windows arrive 1 s after they end; the service polls each second
            while pending and pending[0].end + 1 <= now:
                store.add_windows([pending.pop(0)])
            events += service.poll(float(now))
        assert service.assessed >= 2 * 9  # every window of both devices (plus the fleet merges)
        drift_at = {e.transition.key: e.slot_start for e in events if e.transition.new == "drift"}
        for device, phase in phases.items():
            first_dark_end = t0 + 10 * shift_seq + phase + 10
            assert device in drift_at, events
            assert drift_at[device] <= first_dark_end + 10, (
                device,
                drift_at[device] - first_dark_end,
            )  # 2 windows
        assert all(e.transition.key in phases or e.transition.key == "fleet" for e in events)


def test_a_canary_device_that_rolls_back_on_its_own_aborts_the_canary(canary_setup: CanarySetup) -> None:
    """A canary that crashes a device (or fails its health window) is reported as rolled_back by the
    device's updater; the service rolls the whole cohort forward onto the champion at once."""
    from edge_agent.protocol import UpdateEvent

    store, repo, v1, v2 = canary_setup
    mgr = RolloutManager(store, repo, None, fleet="f", model="tiny", cfg=RolloutConfig())
    mgr.release_stable(v1)
    canary = mgr.start_canary(v2, v1.sha256)
    other_release = UpdateEvent(
        fleet="f",
        device="cam-9",
        session=1,
        seq=0,
        ts=time.time(),
        state="rolled_back",
        reason="health",
        release=canary.release.release - 1,
    )
    store.add_update_events([other_release])
    assert mgr.poll(time.time()) is None  # a rollback of some other release is not this canary's
    crashed = UpdateEvent(
        fleet="f",
        device="cam-3",
        session=2,
        seq=1,
        ts=time.time(),
        state="rolled_back",
        reason="crashed during trial",
        release=canary.release.release,
    )
    store.add_update_events([crashed])
    outcome = mgr.poll(time.time())
    assert outcome is not None and outcome.decision == "rollback" and "cam-3" in outcome.reasons[0]
    head = repo.current("canary", "f", "tiny")
    assert head is not None and head.package_sha256 == v1.sha256 and head.release > canary.release.release


def test_service_config_reads_like_the_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.yaml takes ${ENV} defaults and resolves relative paths against itself, as agent.yaml does."""
    from edge_agent.errors import ConfigError

    (tmp_path / "etc").mkdir()
    p = tmp_path / "etc" / "trainer.yaml"
    p.write_text(
        "fleet: f\nmqtt: {url: 'mqtts://127.0.0.1:8883', username: '${EF_MQTT_USER:-svc}',\n"
        "       password: '${EF_MQTT_PASSWORD}', ca: pki/ca.crt}\n"
        "release: {repo: releases}\ntraining: {base_data: d, work_dir: /abs/work}\n"
    )
    monkeypatch.delenv("EF_MQTT_PASSWORD", raising=False)
    with pytest.raises(
        ConfigError, match=r"trainer\.yaml: line 3: environment variable \$\{EF_MQTT_PASSWORD\}"
    ):
        load_service_config(p)
    monkeypatch.setenv("EF_MQTT_PASSWORD", "s3cret")
    cfg = load_service_config(p)
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("svc", "s3cret")
    assert cfg.release.repo == tmp_path / "etc" / "releases"
    assert cfg.mqtt.ca == tmp_path / "etc" / "pki" / "ca.crt"
    assert cfg.training.work_dir == Path("/abs/work")


def test_ingest_workers_use_the_services_broker_credentials(tmp_path: Path, broker_factory) -> None:
    """A username and password in trainer.yaml reach every ingest worker, not only the publisher."""
    import shutil
    import subprocess

    from .conftest import require

    tool = shutil.which("mosquitto_passwd")
    require(tool is not None, "mosquitto_passwd")
    passwords = tmp_path / "passwd"
    subprocess.run(
        [str(tool), "-b", "-c", str(passwords), "trainer", "s3cret"], check=True, capture_output=True
    )
    b: MosquittoBroker = broker_factory(allow_anonymous=False, extra_conf=f"password_file {passwords}")
    cfg = _service_config(tmp_path, b.url, base_data="builtin:shapes")
    cfg.mqtt = MqttSettings(url=b.url, client_id="trainer-test", username="trainer", password="s3cret")
    cfg.ingest_workers = 2
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    try:
        assert len(service.workers) == 2
        assert all(w.wait_connected(10) for w in service.workers), [w.stats() for w in service.workers]
    finally:
        service.stop()
