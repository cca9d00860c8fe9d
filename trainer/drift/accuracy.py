"""One device's accuracy over a range of windows: label-free estimate, PPI++ correction, interval.

Puts :mod:`trainer.drift.labelfree` and :mod:`trainer.drift.ppi` together for the service: the windows
of one device and one model over a sliding range (e.g. its last 30 one-minute windows), the model's
reference, optionally a window regressor, and the labelled audit frames of that device and model taken
during those windows. With audit labels the answer is the PPI++ estimate and its 95% normal-approximation
interval; without, the best label-free estimate and no interval (a confidence-only estimate cannot
bound its own error under shift). Each frame's label-free score is its calibrated confidence, shifted so
that their mean over the range is the best label-free estimate (the regressor's, when there is one);
the shift cancels in the PPI++ point estimate (only how well scores track correctness matters), it
only keeps ``lambda * mean f`` readable as that estimate.

>>> from edge_agent.protocol import FrameCounts, Histogram, ModelRef, TelemetryWindow
>>> from edge_agent.reference import ReferenceStats
>>> edges = [0.0, 0.5, 1.0]
>>> ref = ReferenceStats(artifact="int8", images=100, class_prior=[0.5, 0.5], mean_confidence=0.8,
...     histograms={"confidence": Histogram(edges=edges, counts=[20, 80])}, accuracy=0.8,
...     confidence_bin_accuracy=[0.4, 0.9])
>>> w = TelemetryWindow(fleet="f", device="d", session=1, seq=0, start=0, end=60, agent_version="1",
...     model=ModelRef(name="m", version="1", sha256="0" * 64), frames=FrameCounts(inferred=300),
...     histograms={"confidence": Histogram(edges=edges, counts=[0, 300])}, confidence_mean=0.95)
>>> estimate_device_accuracy([w], ref).label_free.calibrated   # every frame in the 90% bin
0.9
>>> audit = [audit_label(ts=10, correct=i % 2 == 0, confidence=0.95, reference=ref) for i in range(40)]
>>> acc = estimate_device_accuracy([w], ref, audit)      # half of 40 random frames were right
>>> acc.method, round(acc.estimate, 2), acc.low < 0.5 < acc.high
('ppi++', 0.5, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.protocol import Histogram, TelemetryWindow
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.histogram import FixedHistogram
from trainer.drift.labelfree import AccuracyRegressor, LabelFreeEstimate, MergedWindows, label_free
from trainer.drift.ppi import AuditLabel, ppi_mean


def frame_score(confidence: float, reference: ReferenceStats | None) -> float:
    """Label-free probability that a frame with this max-softmax ``confidence`` is correct: its bin's
    reference accuracy, else the ATC indicator, else the confidence itself."""
    hist = reference.histograms.get("confidence") if reference is not None else None
    if reference is not None and reference.confidence_bin_accuracy and hist is not None:
        return float(reference.confidence_bin_accuracy[FixedHistogram(hist.edges).bin_of(confidence)])
    if reference is not None and reference.atc_threshold is not None:
        return float(confidence > reference.atc_threshold)
    return float(confidence)


def audit_label(
    *, ts: float, correct: bool, confidence: float, reference: ReferenceStats | None, inclusion: float = 1.0
) -> AuditLabel:
    """An :class:`AuditLabel` from a labelled audit sample (its top-1 confidence from ``Sample.top``)."""
    return AuditLabel(ts, correct, frame_score(confidence, reference), 1.0 / inclusion)


def _score_moments(
    hist: Histogram, reference: ReferenceStats | None, mean_conf: float
) -> tuple[float, float]:
    """Mean and variance over the window's frames of :func:`frame_score`, from its confidence histogram."""
    c = np.asarray(hist.counts, np.float64)
    e = np.asarray(hist.edges, np.float64)
    if reference is not None and reference.confidence_bin_accuracy:
        s = np.asarray(reference.confidence_bin_accuracy, np.float64)
    elif reference is not None and reference.atc_threshold is not None:
        s = (np.clip((e[1:] - reference.atc_threshold) / (e[1:] - e[:-1]), 0, 1)).astype(np.float64)
    else:
        s = (e[:-1] + e[1:]) / 2
        s = s + (mean_conf - float(c @ s / c.sum()))  # centre on the exact mean confidence
    m = float(c @ s / c.sum())
    if (
        reference is not None
        and not reference.confidence_bin_accuracy
        and reference.atc_threshold is not None
    ):
        return m, m * (1 - m)  # an indicator: Bernoulli variance
    return m, float(c @ (s - m) ** 2 / c.sum())


@dataclass(frozen=True)
class DeviceAccuracy:
    """Estimated accuracy of one device and model over a range of windows."""

    estimate: float | None
    low: float | None
    high: float | None
    method: str
    """``ppi++`` (labels used), or the label-free estimate it fell back to (``regressor``, ``calibrated``,
    ``atc``, ``average_confidence``)."""
    labels: int
    frames: int
    label_free: LabelFreeEstimate

    @property
    def interval(self) -> tuple[float, float] | None:
        return (self.low, self.high) if self.low is not None and self.high is not None else None


def estimate_device_accuracy(
    windows: Sequence[TelemetryWindow],
    reference: ReferenceStats | None,
    audit: Sequence[AuditLabel] = (),
    regressor: AccuracyRegressor | None = None,
    *,
    z: float = 1.96,
) -> DeviceAccuracy:
    """PPI++ over the best label-free estimate of ``windows`` (one device, one model) with the ``audit``
    labels taken during them; the label-free estimate alone when there are none."""
    merged = MergedWindows.of(windows)
    lf = label_free(merged, reference, regressor)
    name, value = lf.best
    hist = merged.histograms.get("confidence")
    if not audit or hist is None or merged.frames == 0:
        return DeviceAccuracy(value, None, None, name, 0, merged.frames, lf)
    f_mean, f_var = _score_moments(hist, reference, merged.confidence_sum / merged.frames)
    offset = value - f_mean if value is not None else 0.0  # centre the frame scores on the best estimate
    shifted = [AuditLabel(a.ts, a.correct, a.score + offset, a.weight) for a in audit]
    p = ppi_mean(f_mean + offset, f_var, merged.frames, shifted, z=z)
    assert p is not None
    return DeviceAccuracy(p.estimate, p.low, p.high, "ppi++", p.labels, merged.frames, lf)


def window_estimator(
    references: Mapping[str, ReferenceStats | None], regressor: AccuracyRegressor | None = None
) -> Callable[[TelemetryWindow], float | None]:
    """Per-window label-free estimate using each window's own model reference (by sha256), e.g. for the
    canary analysis where canary and control run different models."""

    def estimate(w: TelemetryWindow) -> float | None:
        return label_free([w], references.get(w.model.sha256), regressor).best[1]

    return estimate


def with_prior(est: DeviceAccuracy, prior: float | None, prior_sd: float, z: float = 1.96) -> DeviceAccuracy:
    """Experimental: combine a PPI++ estimate with a label-free ``prior`` (e.g. the window regressor)
    whose typical error on unseen shifts is ``prior_sd``, weighting each by its precision. Worth it only
    while the labels are few; its interval is only as honest as ``prior_sd`` (a shift the regressor
    never saw can be worse)."""
    if prior is None or est.low is None or est.high is None or est.estimate is None or prior_sd <= 0:
        return est
    se = (est.high - est.low) / (2 * z)
    if se <= 0:
        return est
    w_p, w_r = 1 / se**2, 1 / prior_sd**2
    m = (w_p * est.estimate + w_r * prior) / (w_p + w_r)
    s = (w_p + w_r) ** -0.5
    return DeviceAccuracy(
        m, max(0.0, m - z * s), min(1.0, m + z * s), "ppi+prior", est.labels, est.frames, est.label_free
    )
