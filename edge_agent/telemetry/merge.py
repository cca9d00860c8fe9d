"""Exact merging of telemetry windows: any set of windows (device, fleet, day) combines by adding counts.

Merging is associative and commutative, so a fleet summary can be built incrementally in any order.
:func:`merge_to_window` turns several windows of one model into one ``TelemetryWindow`` (the drift
service's per-slot merge, the store's hour and day roll-ups).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from edge_agent.protocol import FrameCounts, Histogram, LatencySummary, TelemetryWindow
from edge_agent.telemetry.histogram import merge_histograms, quantile_from_histogram


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
    """Sum any number of windows into one :class:`WindowSummary` (the same as folding
    :meth:`WindowSummary.merge`, but counts are added in place: no copy per window)."""
    n = 0
    start: float | None = None
    end: float | None = None
    frames = dict.fromkeys(FrameCounts.model_fields, 0)
    classes: dict[int, int] = {}
    events: dict[str, int] = {}
    hists: dict[str, tuple[list[float], list[int]]] = {}
    latency: dict[str, tuple[list[float], list[int]]] = {}
    for w in windows:
        n += 1
        start = _opt(min, start, w.start)
        end = _opt(max, end, w.end)
        for f in frames:
            frames[f] += getattr(w.frames, f)
        _add_into(classes, w.class_counts)
        _add_into(events, w.events)
        _add_hists(hists, w.histograms.items())
        _add_hists(latency, ((k, s.hist) for k, s in w.latency_ms.items() if s.hist))
    return WindowSummary(
        windows=n,
        start=start,
        end=end,
        frames=FrameCounts(**frames),
        class_counts=classes,
        histograms={k: Histogram(edges=list(e), counts=c) for k, (e, c) in hists.items()},
        latency_hists={k: Histogram(edges=list(e), counts=c) for k, (e, c) in latency.items()},
        events=events,
    )


def _add_into(total: dict[Any, int], counts: Mapping[Any, int]) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


def _add_hists(
    total: dict[str, tuple[list[float], list[int]]], hists: Iterable[tuple[str, Histogram]]
) -> None:
    """Add histograms into ``total`` (name -> edges, counts), as :func:`merge_histograms` would."""
    for name, h in hists:
        have = total.get(name)
        if have is None:
            total[name] = (h.edges, list(h.counts))
        elif have[0] != h.edges or len(have[1]) != len(h.counts):
            raise ValueError("cannot merge histograms with different edges")
        else:
            counts = have[1]
            for i, c in enumerate(h.counts):
                counts[i] += c


def merge_latency(summaries: Sequence[LatencySummary]) -> LatencySummary:
    """One pipeline stage's latency over several windows: counts summed, the largest maximum, histograms
    merged exactly and p50/p90/p99 read from the merged histogram. When a window has no histogram for
    the stage, or its edges differ, the merged summary has neither histogram nor percentiles."""
    parts = [s for s in summaries if s.count or s.hist is not None]
    if len(parts) == 1:
        return parts[0]
    maxima = [s.max for s in parts if s.max is not None]
    hists = [s.hist for s in parts if s.hist is not None]
    hist: Histogram | None = None
    if hists and len(hists) == len(parts) and all(h.edges == hists[0].edges for h in hists):
        hist = Histogram(edges=list(hists[0].edges), counts=[sum(c) for c in zip(*(h.counts for h in hists))])

    def quantile(q: float) -> float | None:
        v = quantile_from_histogram(hist, q) if hist is not None else None
        return None if v is None else round(v, 3)

    return LatencySummary(
        count=sum(s.count for s in parts),
        p50=quantile(0.5),
        p90=quantile(0.9),
        p99=quantile(0.99),
        max=max(maxima) if maxima else None,
        hist=hist,
    )


def merge_to_window(windows: Sequence[TelemetryWindow], device: str | None = None) -> TelemetryWindow:
    """Several windows of one model as one (exact sums), named after ``device`` (default: the first's).

    Counts, class counts, histograms and events add up; the start is the earliest, the end the latest;
    ``confidence_mean`` is the frame-weighted mean; ``atc_above`` the sum (None if a window lacks it);
    latency per stage as :func:`merge_latency`. Session, seq and the model are the first window's;
    ``stats_every`` is theirs when they agree, else 1. A single window is returned as is. ValueError when
    feature histograms' edges differ (or there is nothing to merge)."""
    if not windows:
        raise ValueError("no windows to merge")
    if len(windows) == 1:
        return windows[0]
    s = merge_windows(w.model_copy(update={"latency_ms": {}}) for w in windows)
    first = windows[0]
    inferred = s.frames.inferred
    conf = sum((w.confidence_mean or 0.0) * w.frames.inferred for w in windows)
    atc = None if any(w.atc_above is None for w in windows) else sum(w.atc_above or 0 for w in windows)
    stages = dict.fromkeys(k for w in windows for k in w.latency_ms)
    every = {w.stats_every for w in windows}
    merged = TelemetryWindow(
        fleet=first.fleet,
        device=first.device,
        session=first.session,
        seq=first.seq,
        start=first.start if s.start is None else s.start,
        end=first.end if s.end is None else s.end,
        model=first.model,
        agent_version=first.agent_version,
        frames=FrameCounts(**s.frames.model_dump()),
        class_counts=dict(s.class_counts),
        histograms={k: Histogram(edges=h.edges, counts=h.counts) for k, h in s.histograms.items()},
        latency_ms={
            k: merge_latency([w.latency_ms[k] for w in windows if k in w.latency_ms]) for k in stages
        },
        stats_every=every.pop() if len(every) == 1 else 1,
        events=dict(s.events),
        confidence_mean=conf / inferred if inferred else None,
        atc_above=atc,
    )
    # renamed without validation: the drift service names the fleet-wide merge ``fleet``, a key that
    # no device may take (RESERVED_DEVICE_IDS), so validating it would refuse the fleet-wide window
    return merged if device is None else merged.model_copy(update={"device": device})


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
