"""Telemetry window aggregator: frames in, one :class:`TelemetryWindow` per window out.

Pure logic with an injected clock value: no threads, no I/O. A window closes after ``window_seconds``
or ``window_frames`` (whichever comes first; either may be None). Counters such as dropped frames or
evicted spool entries are passed in as increments and reported in the window they happened in. Frames
still in flight when a window closes are its ``carried_out`` and the next window's ``carried_in``, so
every window's frame counters add up (:attr:`TelemetryAggregator.in_flight`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_agent.protocol import FrameCounts, LatencySummary, ModelRef, TelemetryWindow
from edge_agent.telemetry.features import InputStatistics, OutputFeatures
from edge_agent.telemetry.histogram import (
    INPUT_FEATURES,
    LATENCY_EDGES_MS,
    LATENCY_STAGES,
    OUTPUT_FEATURES,
    FixedHistogram,
)

_MAX_LATENCY_SAMPLES = 100_000


@dataclass(frozen=True, slots=True)
class FrameResult:
    """What the pipeline learned from one inferred frame."""

    output: OutputFeatures
    inputs: InputStatistics | None
    """None when input statistics were skipped for this frame (``stats_every`` > 1)."""
    latency_ms: Mapping[str, float]
    """Per stage: capture, preprocess, inference."""


class _Window:
    """Mutable state of the window being filled."""

    def __init__(self, start: float, edges: Mapping[str, list[float]], carried_in: int = 0) -> None:
        self.start = start
        self.carried_in = carried_in
        self.frames = 0
        self.counts: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.classes: Counter[int] = Counter()
        self.confidence_sum = 0.0
        self.atc_above = 0
        self.hists = {name: FixedHistogram(edges[name]) for name in (*OUTPUT_FEATURES, *INPUT_FEATURES)}
        self.latency: dict[str, list[float]] = {s: [] for s in LATENCY_STAGES}
        self.latency_hists = {s: FixedHistogram(LATENCY_EDGES_MS) for s in LATENCY_STAGES}


class TelemetryAggregator:
    """Accumulates frame results into fixed-edge histograms and emits numbered windows."""

    def __init__(
        self,
        *,
        fleet: str,
        device: str,
        session: int,
        model: ModelRef,
        agent_version: str,
        edges: Mapping[str, list[float]],
        now: float,
        window_seconds: float | None = 60.0,
        window_frames: int | None = None,
        stats_every: int = 1,
        first_seq: int = 0,
        atc_threshold: float | None = None,
    ) -> None:
        missing = [n for n in (*OUTPUT_FEATURES, *INPUT_FEATURES) if n not in edges]
        if missing:
            raise ValueError(f"histogram edges missing for {missing}")
        if window_seconds is None and window_frames is None:
            raise ValueError("a window needs window_seconds or window_frames")
        if stats_every < 1:
            raise ValueError("stats_every must be >= 1")
        self.fleet = fleet
        self.device = device
        self.session = session
        self.model = model
        self.agent_version = agent_version
        self.edges = {k: list(v) for k, v in edges.items()}
        self.window_seconds = window_seconds
        self.window_frames = window_frames
        self.stats_every = stats_every
        self.next_seq = first_seq
        self.atc_threshold = atc_threshold
        self._w = _Window(now, self.edges)

    # -- filling -------------------------------------------------------------------------------
    def add(self, r: FrameResult) -> None:
        """Count one inferred frame."""
        w = self._w
        w.frames += 1
        w.classes[r.output.top1] += 1
        w.confidence_sum += r.output.confidence
        if self.atc_threshold is not None and r.output.confidence > self.atc_threshold:
            w.atc_above += 1
        w.hists["confidence"].add(r.output.confidence)
        w.hists["entropy"].add(r.output.entropy)
        w.hists["margin"].add(r.output.margin)
        if r.inputs is not None:
            w.hists["brightness"].add(r.inputs.brightness)
            w.hists["contrast"].add(r.inputs.contrast)
            w.hists["log_laplacian_var"].add(r.inputs.log_laplacian_var)
            w.hists["saturation"].add(r.inputs.saturation)
        for stage, ms in r.latency_ms.items():
            lat = w.latency.get(stage)
            if lat is None:
                continue
            if len(lat) < _MAX_LATENCY_SAMPLES:
                lat.append(ms)
            w.latency_hists[stage].add(ms)

    def add_counts(self, *, captured: int = 0, dropped: int = 0, failed: int = 0) -> None:
        """Frame counters that do not pass through :meth:`add` (capture, drops, failures)."""
        c = self._w.counts
        c["captured"] += captured
        c["dropped"] += dropped
        c["failed"] += failed

    def add_events(self, events: Mapping[str, int]) -> None:
        """Incidents to report in this window (reconnects, evictions, bad inbound messages...)."""
        for k, n in events.items():
            if n:
                self._w.events[k] += n

    def wants_stats(self, frame_index: int) -> bool:
        """Whether input statistics should be computed for the frame with this running index."""
        return frame_index % self.stats_every == 0

    # -- closing -------------------------------------------------------------------------------
    @property
    def frames_in_window(self) -> int:
        return self._w.frames

    @property
    def window_start(self) -> float:
        return self._w.start

    @property
    def in_flight(self) -> int:
        """Frames captured but not yet inferred, dropped or failed, by this window's counters:
        ``carried_in + captured - inferred - dropped - failed``."""
        w = self._w
        c = w.counts
        return w.carried_in + c["captured"] - w.frames - c["dropped"] - c["failed"]

    def is_due(self, now: float) -> bool:
        if self.window_frames is not None and self._w.frames >= self.window_frames:
            return True
        return self.window_seconds is not None and now - self._w.start >= self.window_seconds

    def close(self, now: float) -> TelemetryWindow:
        """Emit the current window with the next sequence number and start a new one at ``now``; the
        frames still in flight (:attr:`in_flight`, never below 0) are its ``carried_out`` and the next
        window's ``carried_in``."""
        w = self._w
        carried_out = max(self.in_flight, 0)
        latency = {}
        for stage in LATENCY_STAGES:
            values = w.latency[stage]
            if values:
                p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
                latency[stage] = LatencySummary(
                    count=w.latency_hists[stage].total(),
                    p50=round(float(p50), 3),
                    p90=round(float(p90), 3),
                    p99=round(float(p99), 3),
                    max=round(float(max(values)), 3),
                    hist=w.latency_hists[stage].to_model(),
                )
        window = TelemetryWindow(
            fleet=self.fleet,
            device=self.device,
            session=self.session,
            seq=self.next_seq,
            start=w.start,
            end=now,
            model=self.model,
            agent_version=self.agent_version,
            frames=FrameCounts(
                captured=w.counts["captured"],
                inferred=w.frames,
                dropped=w.counts["dropped"],
                failed=w.counts["failed"],
                carried_in=w.carried_in,
                carried_out=carried_out,
            ),
            class_counts=dict(w.classes),
            histograms={name: h.to_model() for name, h in w.hists.items()},
            latency_ms=latency,
            stats_every=self.stats_every,
            events=dict(w.events),
            confidence_mean=round(w.confidence_sum / w.frames, 6) if w.frames else None,
            atc_above=w.atc_above if self.atc_threshold is not None else None,
        )
        self.next_seq += 1
        self._w = _Window(now, self.edges, carried_out)
        return window

    def switch_model(
        self,
        model: ModelRef,
        edges: Mapping[str, list[float]],
        now: float,
        atc_threshold: float | None = None,
    ) -> TelemetryWindow:
        """Close the window of the old model and continue with a new one (a window has one model)."""
        self.edges = {k: list(v) for k, v in edges.items()}  # the next window's; the closing one has its own
        window = self.close(now)
        self.model = model
        self.atc_threshold = atc_threshold
        return window
