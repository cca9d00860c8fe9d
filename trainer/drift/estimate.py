"""Label-free accuracy estimates from telemetry windows.

ATC (Average Thresholded Confidence, Garg et al., ICLR 2022): the share of frames whose calibrated
max-softmax confidence exceeds the threshold t fitted on labelled held-out data (where that share
equals accuracy). Devices count the frames above t exactly (``atc_above``). The plain average
confidence (``confidence_mean``) is reported beside it as the baseline it improves on.

ATC-NE is the paper's negative-entropy variant: the share of frames whose prediction entropy is below
a threshold fitted the same way. Devices do not count it; it is read from the entropy histograms
(window and reference, assuming frames spread evenly inside the bin that holds the threshold), which
costs little accuracy because the threshold is fitted on the reference histogram with the same
interpolation. On the benchmark's corrupted streams it is 1-2 points closer than max-softmax ATC
(``python -m bench.drift_bench``), so it is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edge_agent.protocol import Histogram, TelemetryWindow
from edge_agent.reference import ReferenceStats


@dataclass(frozen=True)
class AccuracyEstimate:
    frames: int
    atc: float | None
    average_confidence: float | None
    atc_ne: float | None = None
    """Negative-entropy ATC from the entropy histograms (None without a labelled reference)."""


def share_below(hist: Histogram | tuple[list[float], list[int]], t: float) -> float | None:
    """Share of a histogram's mass below ``t`` (uniform inside the bin that holds ``t``)."""
    edges, counts = (hist.edges, hist.counts) if isinstance(hist, Histogram) else hist
    c = np.asarray(counts, np.float64)
    total = c.sum()
    if total == 0:
        return None
    e = np.asarray(edges, np.float64)
    lo, hi = e[:-1], e[1:]
    frac = np.clip((t - lo) / (hi - lo), 0.0, 1.0)
    return float((c * frac).sum() / total)


def entropy_threshold(reference: ReferenceStats) -> float | None:
    """The entropy t whose interpolated share below t on the reference histogram equals its accuracy."""
    hist = reference.histograms.get("entropy")
    if reference.accuracy is None or hist is None or sum(hist.counts) == 0:
        return None
    return _fit_below(tuple(hist.edges), tuple(hist.counts), reference.accuracy)


@lru_cache(maxsize=256)
def _fit_below(edges: tuple[float, ...], counts: tuple[int, ...], target: float) -> float:
    lo, hi = edges[0], edges[-1]
    for _ in range(60):  # bisection: the share below t grows with t
        mid = (lo + hi) / 2
        share = share_below((list(edges), list(counts)), mid)
        assert share is not None
        lo, hi = (mid, hi) if share < target else (lo, mid)
    return (lo + hi) / 2


def estimate_accuracy(
    windows: Iterable[TelemetryWindow], reference: ReferenceStats | None = None
) -> AccuracyEstimate:
    """Frame-weighted ATC and average-confidence estimates over one or more windows of one model
    (and ATC-NE when the model's ``reference`` is given)."""
    frames = above = 0
    conf_sum = 0.0
    has_atc = True
    entropy: np.ndarray | None = None
    edges: list[float] | None = None
    for w in windows:
        n = w.frames.inferred
        if n == 0:
            continue
        frames += n
        if w.confidence_mean is not None:
            conf_sum += w.confidence_mean * n
        if w.atc_above is None:
            has_atc = False
        else:
            above += w.atc_above
        h = w.histograms.get("entropy")
        if h is not None:
            entropy = (
                np.asarray(h.counts, np.int64)
                if entropy is None
                else entropy + np.asarray(h.counts, np.int64)
            )
            edges = h.edges
    if frames == 0:
        return AccuracyEstimate(0, None, None)
    atc_ne = None
    t = entropy_threshold(reference) if reference is not None else None
    if t is not None and entropy is not None and edges is not None:
        atc_ne = share_below((edges, entropy.tolist()), t)
    return AccuracyEstimate(frames, above / frames if has_atc else None, conf_sum / frames, atc_ne)
