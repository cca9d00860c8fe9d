"""Drift engine statistics on synthetic windows drawn from known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.protocol import FrameCounts, Histogram, ModelRef, TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.histogram import default_edges
from trainer.drift.detector import DriftConfig, DriftMonitor, assess_window
from trainer.drift.estimate import entropy_threshold, estimate_accuracy, share_below
from trainer.drift.stats import (
    benjamini_hochberg,
    chi2_homogeneity,
    js_divergence,
    null_js_threshold,
    reference_robust_pvalue,
)

EDGES = default_edges(5)
FEATURES = list(EDGES)
REF_MODEL = ModelRef(name="m", version="1", sha256="1" * 64)


def _shape(rng: np.random.Generator, bins: int = 20) -> np.ndarray:
    p = rng.gamma(2.0, 1.0, bins)
    return p / p.sum()


def _reference(
    rng: np.random.Generator, shapes: dict[str, np.ndarray], prior: np.ndarray, n: int = 3000
) -> ReferenceStats:
    hists = {f: Histogram(edges=EDGES[f], counts=rng.multinomial(n, shapes[f]).tolist()) for f in FEATURES}
    return ReferenceStats(
        artifact="x", images=n, histograms=hists, class_prior=prior.tolist(), mean_confidence=0.7
    )


def _window(
    rng: np.random.Generator,
    shapes: dict[str, np.ndarray],
    prior: np.ndarray,
    n: int,
    seq: int = 0,
    device: str = "d",
) -> TelemetryWindow:
    classes = rng.multinomial(n, prior)
    return TelemetryWindow(
        fleet="f",
        device=device,
        session=1,
        seq=seq,
        start=0,
        end=60,
        model=REF_MODEL,
        agent_version="t",
        frames=FrameCounts(captured=n, inferred=n),
        class_counts={i: int(c) for i, c in enumerate(classes) if c},
        histograms={
            f: Histogram(edges=EDGES[f], counts=rng.multinomial(n, shapes[f]).tolist()) for f in FEATURES
        },
    )


def test_chi2_false_positive_rate_matches_alpha() -> None:
    rng = np.random.default_rng(0)
    p = _shape(rng)
    ref = rng.multinomial(5000, p)
    pvals = [chi2_homogeneity(rng.multinomial(300, p), ref)[2] for _ in range(2000)]
    assert 0.03 <= np.mean(np.array(pvals) < 0.05) <= 0.07
    shifted = np.roll(p, 2)
    assert chi2_homogeneity(rng.multinomial(300, shifted), ref)[2] < 1e-6


def test_reference_robust_p_values_hold_for_an_unlucky_reference() -> None:
    """One reference serves every window: its sampling error is a fixed offset. Plain two-sample p-values
    false-alarm far above their level after an unlucky reference draw; the robust ones stay within it for
    any reference inside their coverage region, and never fall below the plain ones."""
    from scipy.stats import chi2

    rng = np.random.default_rng(10)
    p = rng.gamma(3.0, 1.0, 10)
    p /= p.sum()
    n_ref, n = 150, 300
    refs = rng.multinomial(n_ref, p, size=4000)
    offset = (((refs - n_ref * p) ** 2) / (n_ref * p)).sum(1)  # ~ chi2(9) over reference draws
    ref = refs[np.argmin(np.abs(offset - chi2.ppf(0.999, 9)))]  # at the edge of the 0.999 coverage region
    tests = [chi2_homogeneity(w, ref) for w in rng.multinomial(n, p, size=3000)]
    plain = np.array([t[2] for t in tests])
    robust = np.array([reference_robust_pvalue(s, df, n, n_ref, coverage=0.999) for s, df, _ in tests])
    assert np.mean(plain < 0.01) > 0.2
    assert np.mean(robust < 0.01) <= 0.012
    assert (robust >= plain).all()
    stat, df, p_plain = chi2_homogeneity(rng.multinomial(n, p), rng.multinomial(10**7, p))
    assert reference_robust_pvalue(stat, df, n, 10**7) == pytest.approx(p_plain, rel=0.05, abs=1e-3)


def test_js_and_null_threshold_shrink_with_window_size() -> None:
    rng = np.random.default_rng(1)
    ref = rng.multinomial(5000, _shape(rng))
    t = [null_js_threshold(ref.tolist(), n) for n in (50, 200, 800, 3200)]
    assert t == sorted(t, reverse=True) and t[0] > 2 * t[-1]
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert js_divergence(ref, ref) == pytest.approx(0.0)


def test_benjamini_hochberg_known_example() -> None:
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    # sorted: .005 (<=.01), .01 (<=.02), .03 (<=.03), .04 (>.04? .04 <= .04 yes), .2 (> .05)
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True, True, True, False]
    assert benjamini_hochberg([0.5, 0.6], 0.05).tolist() == [False, False]


def _setup(seed: int):
    rng = np.random.default_rng(seed)
    shapes = {f: _shape(rng) for f in FEATURES}
    prior = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    return rng, shapes, prior, _reference(rng, shapes, prior)


def test_clean_streams_raise_no_drift_over_many_windows() -> None:
    rng, shapes, prior, ref = _setup(2)
    monitor = DriftMonitor()
    drifts = 0
    for step in range(600):  # 10 devices x 600 windows (~4 device-days of 60 s windows)
        windows = {f"d{i}": _window(rng, shapes, prior, 400, step, f"d{i}") for i in range(10)}
        _, transitions = monitor.step(windows, ref)
        drifts += sum(t.new == "drift" for t in transitions)
    assert drifts == 0


def test_shift_is_detected_within_two_windows_and_clears_after_recovery() -> None:
    rng, shapes, prior, ref = _setup(3)
    monitor = DriftMonitor()
    for step in range(5):
        monitor.step({"cam": _window(rng, shapes, prior, 400, step)}, ref)
    assert monitor.state("cam") == "ok"
    dark = dict(shapes)
    dark["brightness"] = np.roll(shapes["brightness"], -4)  # every frame darker by ~4 bins
    _, t1 = monitor.step({"cam": _window(rng, dark, prior, 400, 5)}, ref)
    _, t2 = monitor.step({"cam": _window(rng, dark, prior, 400, 6)}, ref)
    assert [t.new for t in t1 + t2] == ["warning", "drift"]
    assert "brightness" in t2[0].flagged_features
    for step in range(7, 7 + DriftConfig().clear_after):
        monitor.step({"cam": _window(rng, shapes, prior, 400, step)}, ref)
    assert monitor.state("cam") == "ok"


def test_class_prior_shift_alone_is_detected() -> None:
    rng, shapes, prior, ref = _setup(4)
    skewed = np.array([0.05, 0.05, 0.1, 0.2, 0.6])
    a = assess_window("cam", _window(rng, shapes, skewed, 400), ref, DriftConfig())
    assert a is not None and a.features["class_prior"].p_value < 1e-10


def test_tiny_windows_are_not_assessed_and_bin_mismatch_is_an_error() -> None:
    rng, shapes, prior, ref = _setup(5)
    assert assess_window("cam", _window(rng, shapes, prior, 10), ref, DriftConfig()) is None
    bad = _window(rng, shapes, prior, 100)
    bad.histograms["confidence"] = Histogram(edges=[0, 0.5, 1], counts=[50, 50])
    with pytest.raises(ValueError, match="confidence has 2 bins"):
        assess_window("cam", bad, ref, DriftConfig())


def test_estimates_are_frame_weighted() -> None:
    rng, shapes, prior, _ = _setup(6)
    w1 = _window(rng, shapes, prior, 100).model_copy(update={"atc_above": 80, "confidence_mean": 0.9})
    w2 = _window(rng, shapes, prior, 300).model_copy(update={"atc_above": 150, "confidence_mean": 0.5})
    est = estimate_accuracy([w1, w2])
    assert est.frames == 400
    assert est.atc == pytest.approx(230 / 400)
    assert est.average_confidence == pytest.approx((90 + 150) / 400)


def test_negative_entropy_atc_reads_the_entropy_histograms() -> None:
    rng, shapes, prior, ref = _setup(7)
    ref = ref.model_copy(update={"accuracy": 0.8})
    t = entropy_threshold(ref)
    assert t is not None and share_below(ref.histograms["entropy"], t) == pytest.approx(0.8, abs=1e-6)
    same = [_window(rng, shapes, prior, 2000, k) for k in range(3)]
    assert estimate_accuracy(same, ref).atc_ne == pytest.approx(
        0.8, abs=0.03
    )  # same distribution as the reference
    unsure = dict(shapes)
    e = shapes["entropy"]
    unsure["entropy"] = np.r_[np.zeros(5), e[:-6], e[-6:].sum()]  # every frame 5 bins less sure
    assert estimate_accuracy([_window(rng, unsure, prior, 2000)], ref).atc_ne < 0.7  # type: ignore[operator]
    assert estimate_accuracy(same).atc_ne is None  # no reference, no ATC-NE
    h = Histogram(edges=[0.0, 1.0, 2.0], counts=[10, 30])
    assert share_below(h, 0.5) == pytest.approx(5 / 40) and share_below(h, 1.5) == pytest.approx(25 / 40)


def _repeated(window: TelemetryWindow, k: int) -> TelemetryWindow:
    """The window as a camera that sees every scene for k consecutive frames would report it."""
    return window.model_copy(
        update={
            "frames": FrameCounts(captured=k * window.frames.inferred, inferred=k * window.frames.inferred),
            "class_counts": {c: k * n for c, n in window.class_counts.items()},
            "histograms": {
                f: Histogram(edges=h.edges, counts=[k * c for c in h.counts])
                for f, h in window.histograms.items()
            },
        }
    )


def test_dispersion_of_correlated_frames_is_learnt_per_device() -> None:
    rng, shapes, prior, ref = _setup(8)
    learnt, independent = DriftMonitor(), DriftMonitor(DriftConfig(design_effect=1.0))
    flags = {"learnt": 0, "independent": 0}
    assessments: list = []
    for step in range(60):  # 5 devices, each scene seen for 5 frames: 80 scenes per 400-frame window
        windows = {f"d{i}": _repeated(_window(rng, shapes, prior, 80, step, f"d{i}"), 5) for i in range(5)}
        for name, monitor in (("learnt", learnt), ("independent", independent)):
            out, _ = monitor.step(windows, ref)
            assessments = out if name == "learnt" else assessments
            flags[name] += sum(bool(a.flagged_features) for a in out)
            if name == "learnt" and step < 3:
                assert all(a.learning for a in out)  # the first windows only learn the dispersion
    assert flags["learnt"] == 0 and set(learnt.states().values()) == {"ok"}
    assert flags["independent"] > 50 and "drift" in independent.states().values()
    assert 3.5 <= assessments[0].dispersion <= 6.5
    # a clear shift is still found after the dispersion is learnt (80 scenes per window carry less evidence)
    dark = dict(shapes)
    dark["brightness"] = np.r_[np.full(4, 0.25), np.zeros(16)]  # every frame in the 4 darkest bins
    for step in range(60, 62):
        learnt.step({"d0": _repeated(_window(rng, dark, prior, 80, step, "d0"), 5)}, ref)
    assert learnt.state("d0") == "drift"
