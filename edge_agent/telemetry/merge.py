"""Exact merging of telemetry windows: any set of windows (device, fleet, day) combines by adding counts.

Merging is associative and commutative, so a fleet summary can be built incrementally in any order.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field

from edge_agent.protocol import FrameCounts, Histogram, TelemetryWindow
from edge_agent.telemetry.histogram import merge_histograms


class WindowSummary(BaseModel):
    """The sum of several telemetry windows of one model."""

    windows: int = 0
    start: float | None = None
    end: float | None = None
    frames: FrameCounts = Field(default_factory=FrameCounts)
    class_counts: dict[int, int] = Field(default_factory=dict)
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    latency_hists: dict[str, Histogram] = Field(default_factory=dict)
    events: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def of(cls, window: TelemetryWindow) -> WindowSummary:
        """The summary of a single window."""
        return cls(
            windows=1,
            start=window.start,
            end=window.end,
            frames=window.frames.model_copy(),
            class_counts=dict(window.class_counts),
            histograms={k: h.model_copy(deep=True) for k, h in window.histograms.items()},
            latency_hists={k: s.hist.model_copy(deep=True) for k, s in window.latency_ms.items() if s.hist},
            events=dict(window.events),
        )

    def merge(self, other: WindowSummary) -> WindowSummary:
        """A new summary holding both; histograms must share edges."""
        return WindowSummary(
            windows=self.windows + other.windows,
            start=_opt(min, self.start, other.start),
            end=_opt(max, self.end, other.end),
            frames=FrameCounts(
                **{f: getattr(self.frames, f) + getattr(other.frames, f) for f in FrameCounts.model_fields}
            ),
            class_counts=_add_counts(self.class_counts, other.class_counts),
            histograms=_merge_hist_maps(self.histograms, other.histograms),
            latency_hists=_merge_hist_maps(self.latency_hists, other.latency_hists),
            events=_add_counts(self.events, other.events),
        )


def merge_windows(windows: Iterable[TelemetryWindow]) -> WindowSummary:
    """Sum any number of windows into one :class:`WindowSummary`."""
    total = WindowSummary()
    for w in windows:
        total = total.merge(WindowSummary.of(w))
    return total


def _opt(fn, a, b):  # noqa: ANN001 - min/max over optional floats
    if a is None:
        return b
    if b is None:
        return a
    return fn(a, b)


def _add_counts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _merge_hist_maps(a: dict[str, Histogram], b: dict[str, Histogram]) -> dict[str, Histogram]:
    out = {k: h.model_copy(deep=True) for k, h in a.items()}
    for k, h in b.items():
        out[k] = merge_histograms(out[k], h) if k in out else h.model_copy(deep=True)
    return out
