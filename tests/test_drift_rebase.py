"""Per-device references after a promotion (issue 9): a camera that is always dark is judged against its
own normal under the new model, a later change of that camera is still detected, and the references
survive a restart of the service (SQLite and PostgreSQL).

Windows come from :class:`trainer.sim.telemetry.FramePool` (the drift benchmarks' window builder, the
agent's own histogram bins) over per-frame values drawn here, so no model has to run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.package import Artifact, FileEntry, ModelManifest, PreprocessSpec, TensorSpec
from edge_agent.protocol import ModelRef, TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.histogram import default_edges
from trainer.drift.detector import DriftConfig, DriftMonitor
from trainer.drift.rebase import device_label, reference_from_windows
from trainer.fleet.drift_service import REBASING, DriftEvent, DriftService
from trainer.sim.telemetry import Condition, FramePool
from trainer.store import Store

CLASSES = 5
EDGES = {k: list(v) for k, v in default_edges(CLASSES).items()}
SLOT = 60.0
FRAMES = 300


def _ref(version: str) -> ModelRef:
    return ModelRef(
        name="cam-model",
        version=version,
        sha256=hashlib.sha256(version.encode()).hexdigest(),
        artifact="tflite-int8",
    )


V1, V2 = _ref("1.0.0"), _ref("2.0.0")


def _pool(
    model: ModelRef, *, dark: bool = False, blurred: bool = False, n: int = 3000, seed: int = 0
) -> FramePool:
    """Frames of a camera: day-lit or dark (brightness and saturation low), optionally behind a dirty lens."""
    rng = np.random.default_rng([seed, dark, blurred])
    labels = rng.integers(0, CLASSES, n)
    correct = rng.random(n) < 0.85
    top1 = np.where(correct, labels, rng.integers(0, CLASSES, n))
    conf = rng.beta(6, 2, n)
    values = {
        "confidence": conf,
        "entropy": rng.uniform(0.0, 1.2, n) * (1.2 - conf),
        "margin": conf * rng.beta(4, 2, n),
        "brightness": rng.beta(2, 14, n) if dark else rng.beta(6, 5, n),
        "contrast": rng.beta(3, 8, n) * 0.5,
        "log_laplacian_var": rng.normal(1.6 if blurred else 3.0, 0.4, n).clip(0, 5),
        "saturation": rng.beta(2, 9, n) if dark else rng.beta(4, 4, n),
    }
    cond = Condition.shifted(lighting="night") if dark else Condition.clean()
    return FramePool(cond, model, EDGES, 0.5, CLASSES, labels, top1, values)


def _concat(model: ModelRef, *pools: FramePool) -> FramePool:
    return FramePool(
        Condition.clean(),
        model,
        EDGES,
        0.5,
        CLASSES,
        np.concatenate([p.labels for p in pools]),
        np.concatenate([p.top1 for p in pools]),
        {k: np.concatenate([p.values[k] for p in pools]) for k in pools[0].values},
    )


def _manifest(model: ModelRef, reference: ReferenceStats) -> ModelManifest:
    return ModelManifest(
        name=model.name,
        version=model.version,
        created="2025-01-01T00:00:00Z",
        labels=[f"c{i}" for i in range(CLASSES)],
        preprocess=PreprocessSpec(),
        artifacts={
            "tflite-int8": Artifact(
                file="model.tflite",
                runtime="litert",
                precision="int8",
                input=TensorSpec(),
                output=TensorSpec(layout="NC"),
            )
        },
        files={"model.tflite": FileEntry(sha256="0" * 64, size=1)},
        telemetry_edges=EDGES,
        reference=reference,
    )


class Fleet:
    """Three cameras (two day-lit, one always dark) publishing one window per slot into a store."""

    def __init__(self, store: Store, seed: int = 0) -> None:
        self.store = store
        self.rng = np.random.default_rng(seed)
        self.v1_ref = _pool(V1, seed=100).reference()  # v1 trained on day-lit frames
        # v2 retrained with the night camera's labelled frames: its held-out mix is a quarter dark.
        self.v2_ref = _concat(V2, _pool(V2, seed=101), _pool(V2, dark=True, n=1000, seed=101)).reference()
        store.register_model(_manifest(V1, self.v1_ref), V1.sha256)
        store.register_model(_manifest(V2, self.v2_ref), V2.sha256)
        self.pools: dict[tuple[str, str], FramePool] = {}
        self.seq = 0

    def pool(self, model: ModelRef, dark: bool, blurred: bool = False) -> FramePool:
        key = (model.version, f"{dark}{blurred}")
        if key not in self.pools:
            self.pools[key] = _pool(model, dark=dark, blurred=blurred, seed=7)
        return self.pools[key]

    def publish(self, model: ModelRef, cameras: dict[str, tuple[bool, bool]]) -> list[TelemetryWindow]:
        """One window per camera (dark, blurred) for the next slot; returns them."""
        out = []
        for device, (dark, blurred) in cameras.items():
            (w,) = self.pool(model, dark, blurred).windows(
                1, self.rng, size=FRAMES, device=device, first_seq=self.seq
            )
            out.append(w.window.model_copy(update={"fleet": "f"}))
        self.store.add_windows(out)
        self.seq += 1
        return out

    @property
    def now(self) -> float:
        """When every slot published so far has closed (and its grace passed)."""
        return SLOT * self.seq + SLOT + 1.0


def _states(events: list[DriftEvent], device: str) -> list[str]:
    return [e.transition.new for e in events if e.transition.key == device]


CAMERAS = {"day-1": (False, False), "day-2": (False, False), "night": (True, False)}


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    with Store(f"sqlite:///{tmp_path / 'fleet.db'}") as s:
        yield s


def test_rebased_references_clear_a_permanently_dark_device(sqlite_store: Store) -> None:
    fleet = Fleet(sqlite_store)
    service = DriftService(sqlite_store, "f", slot_s=SLOT, grace_s=1.0, start=SLOT)
    n = service.cfg.rebase_windows
    v1_events: list[DriftEvent] = []
    for _ in range(10):
        fleet.publish(V1, CAMERAS)
        v1_events += service.poll(fleet.now)
    assert service.state(V1.sha256, "night") == "drift"  # always dark: drift against v1's training mix
    assert [e.transition.reference for e in v1_events if e.transition.key == "night"] == ["training"] * 2
    assert service.state(V1.sha256, "day-1") == service.state(V1.sha256, "day-2") == "ok"

    # v2 promoted: every device is rebased on its own first n windows under v2
    promoted = SLOT * fleet.seq + SLOT
    service.rebase(V2.sha256, promoted)
    control = DriftMonitor()  # what the fleet had before: v2's training reference for everyone
    v2_windows: dict[str, list[TelemetryWindow]] = {d: [] for d in CAMERAS}
    events: list[DriftEvent] = []
    for k in range(n + 10):
        ws = fleet.publish(V2, CAMERAS)
        for w in ws:
            v2_windows[w.device].append(w)
        control.step({w.device: w for w in ws}, fleet.v2_ref)
        events += service.poll(fleet.now)
        if k < n - 1:
            assert service.state(V2.sha256, "night") == REBASING
            assert service.reference_of(V2.sha256, "night") == REBASING

    assert control.state("night") == "drift"  # against the training reference it would stay in drift
    label = device_label(promoted)
    for device in CAMERAS:  # against their own normal, nobody warns, and everyone is ok
        assert _states(events, device) == [], (device, events)
        assert service.state(V2.sha256, device) == "ok"
        assert service.reference_of(V2.sha256, device) == label
    assert {e.transition.reference for e in events if e.transition.key == "fleet"} <= {"training"}

    # the rebased reference is the exact merge of the device's first n windows, and says how it differs
    own = service.device_references(V2.sha256)["night"]
    first = v2_windows["night"][:n]
    assert own.windows == n and own.stats.images == n * FRAMES
    for f in own.stats.histograms:
        assert own.stats.histograms[f].counts == list(np.sum([w.histograms[f].counts for w in first], axis=0))
    assert "brightness" in own.differs and "log_laplacian_var" not in own.differs
    assert [r.device for r in service.take_rebased()] == sorted(CAMERAS, key=list(CAMERAS).index)
    # the retraining policy sees no drift on v2 for any device
    assert all(not any(h.recent_drift) for h in service.health(V2.sha256).values())

    # a later shift of the dark camera (a dirty lens) is still detected, against its own reference
    later: list[DriftEvent] = []
    for _ in range(2):
        fleet.publish(V2, {**CAMERAS, "night": (True, True)})
        later += service.poll(fleet.now)
    night = [e.transition for e in later if e.transition.key == "night"]
    assert [t.new for t in night] == ["warning", "drift"]
    assert all(t.reference == label for t in night)
    assert "log_laplacian_var" in night[-1].flagged_features
    assert _states(later, "day-1") == _states(later, "day-2") == []


def test_a_device_reference_needs_windows_with_the_reference_bins() -> None:
    ref = _pool(V1, seed=3).reference()
    w = _pool(V1, dark=True, seed=3).windows(2, np.random.default_rng(0))
    merged = reference_from_windows([s.window for s in w], ref)
    assert (
        merged.images == 2 * FRAMES and merged.atc_threshold == ref.atc_threshold and merged.accuracy is None
    )
    assert sum(merged.class_prior) == pytest.approx(1.0)
    odd = ref.model_copy(update={"histograms": {**ref.histograms, "brightness": ref.histograms["contrast"]}})
    with pytest.raises(ValueError, match="brightness"):
        reference_from_windows([s.window for s in w], odd)
    with pytest.raises(ValueError):
        reference_from_windows([], ref)


def test_rebased_references_survive_a_restart(db_url: str) -> None:
    with Store(db_url) as store:
        fleet = Fleet(store, seed=1)
        service = DriftService(store, "f", slot_s=SLOT, grace_s=1.0, start=SLOT)
        service.rebase(V2.sha256, SLOT)
        n = service.cfg.rebase_windows
        for _ in range(n):
            fleet.publish(V2, {"night": (True, False)})
            service.poll(fleet.now)
        before = service.device_references(V2.sha256)
        assert set(before) == {"night"}
        seq = fleet.seq

    with Store(db_url) as store:  # the service restarts
        service = DriftService(store, "f", slot_s=SLOT, grace_s=1.0, start=SLOT * seq + SLOT)
        after = service.device_references(V2.sha256)
        assert set(after) == {"night"}
        assert after["night"].stats == before["night"].stats
        assert after["night"].differs == before["night"].differs and "brightness" in after["night"].differs
        assert service.reference_of(V2.sha256, "night") == device_label(SLOT)
        assert service.reference_of(V2.sha256, "new-cam") == REBASING  # a device not seen yet still rebases
        fleet = Fleet(store, seed=2)  # registering the models again is a no-op
        fleet.seq = seq
        events: list[DriftEvent] = []
        for _ in range(8):  # dark windows: drift against v2's training mix, ok against its own normal
            fleet.publish(V2, {"night": (True, False)})
            events += service.poll(fleet.now)
        assert service.assessed >= 8 and _states(events, "night") == []
        assert service.state(V2.sha256, "night") == "ok"
        # a second promotion of the same model starts over: the old device references are dropped
        service.rebase(V2.sha256, SLOT * fleet.seq)
        assert store.device_references("f", model_sha256=V2.sha256) == []
        assert [(r.model_sha256, r.since) for r in store.rebases("f")] == [(V2.sha256, SLOT * fleet.seq)]


def test_transitions_say_which_reference_they_used() -> None:
    cfg = DriftConfig()
    assert cfg.rebase_windows >= 1
    ws = _pool(V1, dark=True, seed=4).windows(6, np.random.default_rng(1))
    monitor = DriftMonitor(cfg)
    transitions = []
    for s in ws:
        transitions += monitor.step({"cam": s.window}, _pool(V1, seed=4).reference())[1]
    assert transitions and {t.reference for t in transitions} == {"training"}
    held = DriftMonitor(cfg)
    for s in ws:
        a, t = held.step({"cam": s.window}, _pool(V1, seed=4).reference(), hold={"cam"})
        assert a == [] and t == []
    assert held.state("cam") == "ok"


def test_the_fleet_wide_merge_is_judged_when_every_camera_shifts(sqlite_store: Store) -> None:
    """The fleet-wide window is named ``fleet``, a name no device may take: it must still be built and
    judged (a reserved-name check once refused it, and fleet-wide drift went silent)."""
    fleet = Fleet(sqlite_store)
    service = DriftService(sqlite_store, "f", slot_s=SLOT, grace_s=1.0, start=SLOT)
    events: list[DriftEvent] = []
    for _ in range(6):
        fleet.publish(V1, {d: (False, False) for d in CAMERAS})
        events += service.poll(fleet.now)
    assert service.state(V1.sha256, "fleet") == "ok"
    for _ in range(3):
        fleet.publish(V1, {d: (True, False) for d in CAMERAS})  # night falls on every camera
        events += service.poll(fleet.now)
    assert _states(events, "fleet") == ["warning", "drift"]
    assert service.state(V1.sha256, "fleet") == "drift"
