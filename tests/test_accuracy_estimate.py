"""The accuracy estimate a person can read as accuracy: PPI++ over a label-free estimate, audit sampling.

Streams are simulated frame by frame with a known correctness, so the true accuracy of every range of
windows is known; audit frames are picked by the device's own :class:`SampleSelector`.
"""

from __future__ import annotations

import random

import numpy as np
from scipy import stats

from edge_agent.protocol import FrameCounts, Histogram, ModelRef, TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.sampling import SampleSelector, SamplingSettings
from trainer.drift.accuracy import audit_label, estimate_device_accuracy
from trainer.drift.labelfree import MergedWindows, calibrated_confidence
from trainer.fleet.retrain_policy import DeviceHealth, RetrainPolicyConfig, decide_retrain

EDGES = [i / 20 for i in range(21)]
MID = [(a + b) / 2 for a, b in zip(EDGES[:-1], EDGES[1:])]
REF = ReferenceStats(
    artifact="int8",
    images=600,
    histograms={"confidence": Histogram(edges=EDGES, counts=[30] * 20)},
    class_prior=[0.5, 0.5],
    mean_confidence=0.8,
    accuracy=0.9,
    atc_threshold=0.6,
    confidence_bin_accuracy=MID,  # perfectly calibrated on the reference
)
MODEL = ModelRef(name="m", version="1", sha256="0" * 64)


def _window(conf: np.ndarray, seq: int) -> TelemetryWindow:
    counts = np.bincount(np.clip((conf * 20).astype(int), 0, 19), minlength=20)
    return TelemetryWindow(
        fleet="f",
        device="d",
        session=1,
        seq=seq,
        start=60.0 * seq,
        end=60.0 * (seq + 1),
        model=MODEL,
        agent_version="t",
        frames=FrameCounts(captured=len(conf), inferred=len(conf)),
        class_counts={0: len(conf)},
        histograms={"confidence": Histogram(edges=EDGES, counts=counts.tolist())},
        confidence_mean=float(conf.mean()),
        atc_above=int((conf > REF.atc_threshold).sum()),  # type: ignore[operator]
    )


def _stream(rng: np.random.Generator, windows: int, wrong: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Windows of varying size (so audit frames have different inclusion probabilities); a frame of
    confidence c is right with probability c - ``wrong`` (0: calibrated; 0.3: confidently wrong)."""
    out = []
    for _ in range(windows):
        n = int(rng.integers(100, 500))
        conf = np.clip(rng.beta(8, 2, n), 0.0, 0.999)
        correct = rng.random(n) < np.clip(conf - wrong, 0, 1)
        out.append((conf, correct))
    return out


def _audit(stream, per_window: int, seed: int, reason: str = "audit"):  # type: ignore[no-untyped-def]
    """Audit labels as the device picks them (``reason="low_confidence"``: the biased choice instead)."""
    s = SamplingSettings(
        enabled=True,
        consent="t",
        per_window=per_window,
        audit_per_window=per_window if reason == "audit" else 0,
        max_per_hour=3600,
        low_confidence=1.0,
    )
    sel: SampleSelector[tuple[float, bool]] = SampleSelector(s, now=0, rng=random.Random(seed))
    labels = []
    for k, (conf, correct) in enumerate(stream):
        for c, y in zip(conf.tolist(), correct.tolist()):
            sel.offer(c, (c, y), now=60.0 * k + 1)
        for ch in sel.choose(now=60.0 * (k + 1)):
            if ch.reason == reason:
                c, y = ch.item
                labels.append(
                    audit_label(
                        ts=60.0 * k + 30, correct=y, confidence=c, reference=REF, inclusion=ch.inclusion or 1
                    )
                )
    return labels


def _coverage(trials: int, reason: str) -> tuple[float, float, float]:
    """Share of seeded trials whose 95% interval holds the true accuracy of the range, mean width, and
    the mean absolute error of the point estimate."""
    hits, widths, errors = 0, [], []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        stream = _stream(rng, windows=6, wrong=0.25)
        truth = float(np.concatenate([c for _, c in stream]).mean())
        ws = [_window(conf, k) for k, (conf, _) in enumerate(stream)]
        est = estimate_device_accuracy(ws, REF, _audit(stream, 5, seed, reason))
        assert est.method == "ppi++" and est.low is not None and est.high is not None
        hits += est.low <= truth <= est.high
        widths.append(est.high - est.low)
        errors.append(abs(est.estimate - truth))  # type: ignore[operator]
    return hits / trials, float(np.mean(widths)), float(np.mean(errors))


def test_ppi_interval_covers_the_true_accuracy_with_audit_samples() -> None:
    coverage, width, _ = _coverage(200, "audit")
    assert coverage >= 0.85, coverage  # nominal 95%
    assert width < 0.45, width  # an interval, not [0, 1]


def test_ppi_interval_fails_with_low_confidence_samples() -> None:
    """The same test can fail: labels chosen for low confidence are not a random draw, and the
    interval built from them misses the truth most of the time."""
    coverage, _, _ = _coverage(60, "low_confidence")
    assert coverage < 0.5, coverage


def test_audit_sampler_is_uniform_over_frame_positions() -> None:
    frames, k, windows = 50, 2, 3000
    s = SamplingSettings(enabled=True, consent="t", audit_per_window=k, max_per_hour=3600)
    sel: SampleSelector[int] = SampleSelector(s, now=0, rng=random.Random(1))
    hits = np.zeros(frames)
    for w in range(windows):
        for i in range(frames):
            sel.offer(i / frames, i, now=w * 60 + 1)  # confidence rises with the position
        chosen = [c for c in sel.choose(now=w * 60 + 60) if c.reason == "audit"]
        assert len(chosen) == k and all(c.inclusion == k / frames for c in chosen)
        hits[[c.item for c in chosen]] += 1
    p = stats.chisquare(hits).pvalue
    assert p > 0.001, p


def test_audit_frames_come_first_under_the_hourly_cap() -> None:
    s = SamplingSettings(
        enabled=True, consent="t", per_window=5, audit_per_window=2, max_per_hour=3, low_confidence=0.9
    )
    sel: SampleSelector[int] = SampleSelector(s, now=0, rng=random.Random(2))
    for i in range(100):
        sel.offer(0.1, i, now=1)
    chosen = sel.choose(now=60)
    assert [c.reason for c in chosen] == ["audit", "audit", "low_confidence"]
    assert chosen[0].inclusion == 2 / 100 and chosen[2].inclusion is None
    assert len({c.item for c in chosen}) == 3  # a frame is never sent twice


def test_ppi_beats_atc_on_a_confidently_wrong_stream() -> None:
    rng = np.random.default_rng(7)
    stream = _stream(rng, windows=10, wrong=0.3)
    truth = float(np.concatenate([c for _, c in stream]).mean())
    ws = [_window(conf, k) for k, (conf, _) in enumerate(stream)]
    est = estimate_device_accuracy(ws, REF, _audit(stream, 5, 7))
    atc = est.label_free.atc
    assert atc is not None and est.estimate is not None
    assert abs(atc - truth) > 0.2  # ATC believes the confident model
    assert abs(est.estimate - truth) < 0.06 and abs(est.estimate - truth) < abs(atc - truth) / 4


def test_label_free_fallbacks_and_old_references() -> None:
    conf = np.full(300, 0.95)
    ws = [_window(conf, 0)]
    assert estimate_device_accuracy(ws, REF).method == "atc"  # ATC errs less than calibrated confidence
    assert estimate_device_accuracy(ws, REF).label_free.calibrated == 0.975
    old = REF.model_copy(update={"confidence_bin_accuracy": None})
    assert ReferenceStats.model_validate(old.model_dump(exclude={"confidence_bin_accuracy"})) == old
    assert estimate_device_accuracy(ws, old).method == "atc"
    assert estimate_device_accuracy(ws, old, _audit([(conf, conf > 0.5)], 5, 0)).method == "ppi++"
    assert estimate_device_accuracy(ws, None).estimate == 1.0  # ATC from the window itself
    m = MergedWindows.of(ws * 2)
    assert m.frames == 600 and calibrated_confidence(m.histograms["confidence"], MID) == 0.975


def test_retraining_waits_for_a_drop_the_labels_support() -> None:
    cfg = RetrainPolicyConfig(min_labels=1)
    sure = {"a": DeviceHealth((False,) * 3, 0.70, (0.62, 0.78), "ppi++")}
    unsure = {"a": DeviceHealth((False,) * 3, 0.80, (0.65, 0.95), "ppi++")}
    assert decide_retrain(sure, 0.9, 10, 0, None, cfg).retrain
    assert not decide_retrain(unsure, 0.9, 10, 0, None, cfg).triggered_by


def test_only_labelled_audit_samples_feed_the_estimate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.protocol import Sample
    from trainer.fleet.labelling import audit_labels
    from trainer.store import Store

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        ids = []
        for i, (reason, inclusion, top) in enumerate(
            [("audit", 0.01, (1, 0.97)), ("audit", 0.02, (0, 0.55)), ("low_confidence", None, (1, 0.2))]
        ):
            msg = Sample(
                fleet="f",
                device="cam",
                session=1,
                frame=i,
                ts=100.0 + i,
                model=MODEL,
                reason=reason,  # type: ignore[arg-type]
                inclusion=inclusion,
                top=[top],
                consent="t",
                faces_blurred=0,
                width=8,
                height=8,
                sha256=f"{i:064x}",
                jpeg_b64="",
            )
            prov = msg.model_dump(mode="json", exclude={"jpeg_b64", "v", "kind", "fleet", "device", "sha256"})
            sid = store.add_sample(
                fleet="f",
                device="cam",
                ts=msg.ts,
                consent_policy="t",
                sha256=msg.sha256,
                model_sha256=MODEL.sha256,
                image=b"x",
                provenance=prov,
            )
            assert sid is not None
            ids.append(sid)
        store.add_label(ids[0], "b", source="human")  # predicted 1 = "b": right
        store.add_label(ids[1], "b", source="human")  # predicted 0 = "a": wrong
        store.add_label(ids[2], "a", source="human")  # not an audit frame: never used
        got = audit_labels(store, model_sha256=MODEL.sha256, labels=["a", "b"], reference=REF, until=200)
        assert [(a.correct, round(a.weight), a.score) for a in got["cam"]] == [
            (True, 100, 0.975),
            (False, 50, 0.575),
        ]
        assert audit_labels(store, model_sha256="1" * 64, labels=["a", "b"], reference=REF) == {}
    finally:
        store.close()
