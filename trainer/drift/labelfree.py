"""Label-free accuracy estimates read as accuracy: calibrated confidence and a small window regressor.

Both work on telemetry windows as they arrive (merged over a range of windows by adding histograms),
so telemetry keeps its size: nothing new is sent by devices.

* **Calibrated confidence**: each confidence bin of the window's histogram counts as the accuracy the
  model had in that bin on its labelled held-out set (``ReferenceStats.confidence_bin_accuracy``, a
  reliability diagram measured on the int8 artifact). On clean data it is the accuracy; under shift it
  inherits every confidence-based estimate's blind spot (a confidently wrong model).
* **Window regressor** (:class:`AccuracyRegressor`): ridge least squares on window features that see
  more than confidence (:func:`window_features`: ATC, DoC, margin and entropy quantiles, the shift of
  the predicted-class mix from the reference prior, the dispersion of the predicted classes), fitted on
  synthetic corrupted windows with known accuracy. It predicts the correction to calibrated confidence,
  so with little evidence it shrinks back to it.

Where the regressor's weights come from (decided): they are fitted from the model's own held-out frames
run through ImageNet-C-style corruptions (:mod:`trainer.sim.telemetry`, :mod:`trainer.data.corruptions`), by
:func:`fit_regressor`; ``bench/accuracy_bench.py`` fits them the same way with whole corruption families
held out, and the weights are plain numbers (:meth:`AccuracyRegressor.as_dict`) that can travel in a
package. Fitting at bench/build time from seeded corruptions keeps them reproducible; fitting on the
fleet's own data would need labels the estimate is meant to save.

>>> from edge_agent.protocol import Histogram
>>> ref_hist = Histogram(edges=[0.0, 0.5, 1.0], counts=[10, 90])
>>> calibrated_confidence(ref_hist, [0.4, 0.9])  # 10 frames at 40%, 90 at 90%
0.85
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.protocol import Histogram, TelemetryWindow
from edge_agent.reference import ReferenceStats
from trainer.drift.estimate import entropy_threshold, share_below

FEATURES: tuple[str, ...] = (
    "calibrated",
    "atc",
    "doc",
    "margin_q10",
    "margin_q50",
    "entropy_q50",
    "entropy_q90",
    "class_shift",
    "class_dispersion",
)
"""Window features the regressor uses, in order (all are computed from existing telemetry fields)."""


@dataclass(frozen=True)
class MergedWindows:
    """Sums over a range of windows of one model: what the estimates read."""

    frames: int
    histograms: dict[str, Histogram]
    class_counts: dict[int, int]
    confidence_sum: float
    atc_above: int | None

    @classmethod
    def of(cls, windows: Iterable[TelemetryWindow]) -> MergedWindows:
        """Add up windows (histograms with equal edges merge exactly)."""
        frames, conf, atc, has_atc = 0, 0.0, 0, True
        hists: dict[str, tuple[list[float], np.ndarray]] = {}
        classes: dict[int, int] = {}
        for w in windows:
            n = w.frames.inferred
            if n == 0:
                continue
            frames += n
            conf += (w.confidence_mean or 0.0) * n
            if w.atc_above is None:
                has_atc = False
            else:
                atc += w.atc_above
            for c, k in w.class_counts.items():
                classes[c] = classes.get(c, 0) + k
            for name, h in w.histograms.items():
                counts = np.asarray(h.counts, np.int64)
                if name in hists and hists[name][0] == h.edges:
                    hists[name] = (h.edges, hists[name][1] + counts)
                elif name not in hists:
                    hists[name] = (h.edges, counts)
        return cls(
            frames,
            {k: Histogram(edges=e, counts=c.tolist()) for k, (e, c) in hists.items()},
            classes,
            conf,
            atc if has_atc else None,
        )


def calibrated_confidence(hist: Histogram, bin_accuracy: Sequence[float]) -> float | None:
    """Mean over a confidence histogram's frames of their bin's reference accuracy."""
    c = np.asarray(hist.counts, np.float64)
    if c.sum() == 0 or len(bin_accuracy) != len(c):
        return None
    return round(float((c * np.asarray(bin_accuracy, np.float64)).sum() / c.sum()), 12)


def _quantile(hist: Histogram | None, q: float) -> float:
    """Quantile of a histogram (uniform inside bins); 0 for a missing or empty one."""
    if hist is None or sum(hist.counts) == 0:
        return 0.0
    c = np.cumsum(np.asarray(hist.counts, np.float64))
    target = q * c[-1]
    i = int(np.searchsorted(c, target))
    prev = c[i - 1] if i else 0.0
    lo, hi = hist.edges[i], hist.edges[i + 1]
    frac = (target - prev) / (c[i] - prev) if c[i] > prev else 0.0
    return float(lo + frac * (hi - lo))


def window_features(merged: MergedWindows, reference: ReferenceStats) -> dict[str, float] | None:
    """The :data:`FEATURES` of merged windows against the model's reference (None without frames or a
    confidence histogram)."""
    n = merged.frames
    conf = merged.histograms.get("confidence")
    if n == 0 or conf is None:
        return None
    bins = reference.confidence_bin_accuracy
    calibrated = calibrated_confidence(conf, bins) if bins else None
    mean_conf = merged.confidence_sum / n
    atc = merged.atc_above / n if merged.atc_above is not None else mean_conf
    k = len(reference.class_prior)
    mix = np.zeros(k)
    for c, cnt in merged.class_counts.items():
        if 0 <= c < k:
            mix[c] += cnt
    mix = mix / mix.sum() if mix.sum() else mix
    nz = mix[mix > 0]
    dispersion = float(-(nz * np.log(nz)).sum() / np.log(k)) if k > 1 and len(nz) else 0.0
    return {
        "calibrated": calibrated if calibrated is not None else mean_conf,
        "atc": atc,
        "doc": reference.mean_confidence - mean_conf,
        "margin_q10": _quantile(merged.histograms.get("margin"), 0.1),
        "margin_q50": _quantile(merged.histograms.get("margin"), 0.5),
        "entropy_q50": _quantile(merged.histograms.get("entropy"), 0.5),
        "entropy_q90": _quantile(merged.histograms.get("entropy"), 0.9),
        "class_shift": 0.5 * float(np.abs(mix - np.asarray(reference.class_prior)).sum()),
        "class_dispersion": dispersion,
    }


@dataclass(frozen=True)
class AccuracyRegressor:
    """Ridge regression of (true accuracy - calibrated confidence) on standardised window features.

    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, len(FEATURES))); X[:, 0] = 0.9
    >>> y = 0.9 - 0.1 * X[:, 7] + rng.normal(0, 0.01, 200)    # accuracy falls with the class shift
    >>> reg = fit_regressor(X, y)
    >>> round(reg.predict_row(dict(zip(FEATURES, [0.9] + [0.0] * 6 + [1.0, 0.0]))), 2)
    0.8
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    residual_sd: float
    """Root mean square error on its training windows, or leave-one-family-out (for a rough interval)."""

    def predict_row(self, features: dict[str, float]) -> float:
        """Estimated accuracy of one set of window features, clipped to [0, 1]."""
        x = np.array([features[f] for f in self.features])
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(np.clip(features["calibrated"] + self.intercept + z @ np.asarray(self.coef), 0, 1))

    def as_dict(self) -> dict[str, object]:
        """Plain numbers, e.g. to store beside a package or a benchmark result."""
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "residual_sd": self.residual_sd,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AccuracyRegressor:
        return cls(
            tuple(d["features"]),  # type: ignore[arg-type]
            tuple(d["mean"]),  # type: ignore[arg-type]
            tuple(d["scale"]),  # type: ignore[arg-type]
            tuple(d["coef"]),  # type: ignore[arg-type]
            float(d["intercept"]),  # type: ignore[arg-type]
            float(d["residual_sd"]),  # type: ignore[arg-type]
        )


def fit_regressor(
    X: np.ndarray,
    accuracy: np.ndarray,
    ridge: float = 1.0,
    features: Sequence[str] = FEATURES,
    groups: Sequence[str] | None = None,
) -> AccuracyRegressor:
    """Fit on rows of :data:`FEATURES` (column 0 is calibrated confidence) and their true accuracy.
    ``ridge`` is the L2 penalty on the standardised coefficients (in units of training rows). With
    ``groups`` (e.g. the corruption family of each row) ``residual_sd`` is the leave-one-group-out
    error, which is what a shift never seen in training meets; else the training residual."""
    fitted = _fit(X, accuracy, ridge, features)
    if groups is None or len(set(groups)) < 2:
        return fitted
    g = np.asarray(groups)
    X, y = np.asarray(X, np.float64), np.asarray(accuracy, np.float64)
    errs = []
    for held in sorted(set(groups)):
        m = _fit(X[g != held], y[g != held], ridge, features)
        errs += [m.predict_row(dict(zip(features, row))) - t for row, t in zip(X[g == held], y[g == held])]
    return dataclasses.replace(fitted, residual_sd=float(np.sqrt(np.mean(np.square(errs)))))


def _fit(X: np.ndarray, accuracy: np.ndarray, ridge: float, features: Sequence[str]) -> AccuracyRegressor:
    X = np.asarray(X, np.float64)
    y = np.asarray(accuracy, np.float64) - X[:, 0]
    mean, scale = X.mean(0), X.std(0)
    scale[scale < 1e-9] = 1.0
    Z = (X - mean) / scale
    A = np.hstack([np.ones((len(Z), 1)), Z])
    P = ridge * np.eye(A.shape[1])
    P[0, 0] = 0.0  # the intercept is not shrunk
    beta = np.linalg.solve(A.T @ A + P, A.T @ y)
    resid = y - A @ beta
    return AccuracyRegressor(
        tuple(features),
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(beta[1:].tolist()),
        float(beta[0]),
        float(np.sqrt(np.mean(resid**2))),
    )


@dataclass(frozen=True)
class LabelFreeEstimate:
    """Label-free estimates over a range of windows (None where the reference lacks what one needs)."""

    frames: int
    average_confidence: float | None
    atc: float | None
    calibrated: float | None
    regressor: float | None
    atc_ne: float | None = None

    @property
    def best(self) -> tuple[str, float | None]:
        """The estimate with the smallest error on corrupted streams (``bench/accuracy_bench.py``):
        regressor (3.0 points MAE), ATC-NE (7.6), ATC (9.3), calibrated confidence (11.3), mean
        confidence (12.1); the first one available."""
        for name in ("regressor", "atc_ne", "atc", "calibrated", "average_confidence"):
            if (v := getattr(self, name)) is not None:
                return name, v
        return "none", None


def label_free(
    windows: Iterable[TelemetryWindow] | MergedWindows,
    reference: ReferenceStats | None,
    regressor: AccuracyRegressor | None = None,
) -> LabelFreeEstimate:
    """All label-free estimates of a range of windows of one model."""
    m = windows if isinstance(windows, MergedWindows) else MergedWindows.of(windows)
    if m.frames == 0:
        return LabelFreeEstimate(0, None, None, None, None)
    mean_conf = m.confidence_sum / m.frames
    atc = m.atc_above / m.frames if m.atc_above is not None else None
    if reference is None:
        return LabelFreeEstimate(m.frames, mean_conf, atc, None, None)
    f = window_features(m, reference)
    cal = f["calibrated"] if f is not None and reference.confidence_bin_accuracy else None
    reg = regressor.predict_row(f) if regressor is not None and f is not None and cal is not None else None
    t = entropy_threshold(reference)
    entropy = m.histograms.get("entropy")
    atc_ne = share_below(entropy, t) if t is not None and entropy is not None else None
    return LabelFreeEstimate(m.frames, mean_conf, atc, cal, reg, atc_ne)
