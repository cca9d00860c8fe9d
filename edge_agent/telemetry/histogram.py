"""Fixed-edge, mergeable histograms and the default bin edges shipped in model.json.

Edges are fixed per model so that any set of windows (one device, the fleet, a day) combines exactly by
adding counts. The end bins are open: a value below the first edge or above the last is counted in the
first or last bin, so no sample is ever lost.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence

import numpy as np

from edge_agent.protocol import Histogram

OUTPUT_FEATURES = ("confidence", "entropy", "margin")
"""Features of the model's output distribution, one value per inferred frame."""
INPUT_FEATURES = ("brightness", "contrast", "log_laplacian_var", "saturation")
"""Features of the model-input-sized frame (see :mod:`edge_agent.telemetry.features`)."""
LATENCY_STAGES = ("capture", "preprocess", "inference")


def _linspace(lo: float, hi: float, bins: int) -> list[float]:
    return [round(float(x), 6) for x in np.linspace(lo, hi, bins + 1)]


def default_edges(num_classes: int, bins: int = 20) -> dict[str, list[float]]:
    """Bin edges for every telemetry feature of a classifier with ``num_classes`` outputs."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return {
        "confidence": _linspace(0.0, 1.0, bins),
        "entropy": _linspace(0.0, math.log(num_classes), bins),
        "margin": _linspace(0.0, 1.0, bins),
        "brightness": _linspace(0.0, 1.0, bins),
        "contrast": _linspace(0.0, 0.5, bins),
        "log_laplacian_var": _linspace(0.0, 5.0, bins),
        "saturation": _linspace(0.0, 1.0, bins),
    }


LATENCY_EDGES_MS: list[float] = [round(float(x), 4) for x in np.geomspace(0.05, 20000.0, 41)]
"""Log-spaced latency edges (0.05 ms .. 20 s) so latency histograms merge across windows too."""


class FixedHistogram:
    """A histogram with fixed edges that counts scalars cheaply on the per-frame path."""

    __slots__ = ("_edges", "_last", "counts")

    def __init__(self, edges: Sequence[float]) -> None:
        edges = [float(e) for e in edges]
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"histogram edges must be at least 2 strictly increasing values, got {edges}")
        self._edges = edges
        self._last = len(edges) - 2
        self.counts = [0] * (len(edges) - 1)

    @property
    def edges(self) -> list[float]:
        return list(self._edges)

    def bin_of(self, value: float) -> int:
        """Index of the bin that counts ``value`` (end bins are open; NaN goes to the first bin)."""
        if value != value:  # NaN
            return 0
        i = bisect_right(self._edges, value) - 1
        return 0 if i < 0 else (self._last if i > self._last else i)

    def add(self, value: float) -> None:
        self.counts[self.bin_of(value)] += 1

    def add_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.counts[self.bin_of(v)] += 1

    def total(self) -> int:
        return sum(self.counts)

    def to_model(self) -> Histogram:
        return Histogram(edges=list(self._edges), counts=list(self.counts))


def merge_histograms(a: Histogram, b: Histogram) -> Histogram:
    """Exact merge of two histograms with equal edges; raises if the edges differ."""
    if a.edges != b.edges:
        raise ValueError("cannot merge histograms with different edges")
    if len(a.counts) != len(b.counts):
        raise ValueError("cannot merge histograms with different bin counts")
    return Histogram(edges=list(a.edges), counts=[x + y for x, y in zip(a.counts, b.counts)])


def quantile_from_histogram(h: Histogram, q: float) -> float | None:
    """Approximate quantile by linear interpolation inside the bin (used on merged latency histograms)."""
    total = sum(h.counts)
    if total == 0:
        return None
    target = q * total
    seen = 0.0
    for i, c in enumerate(h.counts):
        if c and seen + c >= target:
            frac = (target - seen) / c
            return h.edges[i] + frac * (h.edges[i + 1] - h.edges[i])
        seen += c
    return h.edges[-1]
