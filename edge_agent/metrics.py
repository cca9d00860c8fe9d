"""Prometheus metrics of one agent (``metrics:`` in the agent config): a local ``/metrics`` port, a
node_exporter textfile-collector file, or both.

Counters add up the telemetry windows the agent publishes (so they agree with what the trainer stores,
window by window, and cost nothing on the per-frame path); gauges (spool depth, connection) are read
at scrape time. The inference latency histogram uses the windows' fixed log-spaced edges (exact bucket
counts; it has no ``_sum``: a window carries percentiles, not the sum, and ``histogram_quantile`` needs
only the buckets). Series:

    edgefleet_agent_frames_total{outcome}          captured, inferred, dropped, failed
    edgefleet_agent_events_total{event}            source_reconnects, mqtt_disconnects, spool_evicted, ...
    edgefleet_agent_windows_total                  telemetry windows published
    edgefleet_agent_inference_latency_milliseconds histogram (le = the window edges)
    edgefleet_agent_spool_messages, edgefleet_agent_spool_bytes
    edgefleet_agent_mqtt_connected                 1 while connected to the broker
    edgefleet_agent_model_info{model,version,artifact,sha256}
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge_agent.protocol import TelemetryWindow
from edge_agent.telemetry.histogram import LATENCY_EDGES_MS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gauges:
    """What is read at scrape time: spool depth and size, and whether the link is up."""

    spool_messages: Callable[[], int]
    spool_bytes: Callable[[], int]
    connected: Callable[[], bool]


class AgentMetrics(Collector):
    """Accumulates published windows; serves them (and the live gauges) to Prometheus."""

    def __init__(
        self,
        gauges: Gauges,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        textfile: Path | None = None,
    ) -> None:
        self.gauges = gauges
        self.textfile = textfile
        self._lock = threading.Lock()
        self._frames: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._windows = 0
        self._latency = [0] * (len(LATENCY_EDGES_MS) - 1)
        self._model: dict[str, str] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._server: Any = None
        if port is not None:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def window(self, window: TelemetryWindow) -> None:
        """Count one published window, then rewrite the textfile (atomically) if configured."""
        with self._lock:
            f = window.frames
            self._frames.update(captured=f.captured, inferred=f.inferred, dropped=f.dropped, failed=f.failed)
            self._events.update(window.events)
            self._windows += 1
            lat = window.latency_ms.get("inference")
            if lat is not None and lat.hist is not None and len(lat.hist.counts) == len(self._latency):
                self._latency = [a + b for a, b in zip(self._latency, lat.hist.counts, strict=True)]
            m = window.model
            self._model = {
                "model": m.name,
                "version": m.version,
                "artifact": m.artifact or "",
                "sha256": m.sha256,
            }
        if self.textfile is not None:
            try:
                write_to_textfile(str(self.textfile), self.registry)
            except OSError as exc:  # a full or read-only disk must not stop the agent
                log.warning("metrics: cannot write %s: %s", self.textfile, exc)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            frames, events, windows, latency, model = (
                dict(self._frames), dict(self._events), self._windows, list(self._latency), dict(self._model)
            )  # fmt: skip
        fam = CounterMetricFamily(
            "edgefleet_agent_frames", "Frames by what happened to them", labels=["outcome"]
        )
        for outcome in ("captured", "inferred", "dropped", "failed"):
            fam.add_metric([outcome], frames.get(outcome, 0))
        yield fam
        ev = CounterMetricFamily(
            "edgefleet_agent_events", "Incidents reported in the windows", labels=["event"]
        )
        for name, n in sorted(events.items()):
            ev.add_metric([name], n)
        yield ev
        yield CounterMetricFamily("edgefleet_agent_windows", "Telemetry windows published", value=windows)
        buckets, running = [], 0
        for edge, n in zip(LATENCY_EDGES_MS[1:-1], latency[:-1], strict=True):
            running += n
            buckets.append((repr(edge), running))
        buckets.append(("+Inf", running + latency[-1]))
        hist = HistogramMetricFamily(
            "edgefleet_agent_inference_latency_milliseconds", "Inference latency per frame"
        )
        hist.add_metric([], buckets, sum_value=None)
        yield hist
        yield from self._live(model)

    def _live(self, model: dict[str, str]) -> Iterator[Metric]:
        g = self.gauges
        yield GaugeMetricFamily(
            "edgefleet_agent_spool_messages", "Messages waiting in the spool", value=g.spool_messages()
        )
        yield GaugeMetricFamily(
            "edgefleet_agent_spool_bytes", "Bytes waiting in the spool", value=g.spool_bytes()
        )
        yield GaugeMetricFamily(
            "edgefleet_agent_mqtt_connected",
            "1 while connected to the broker",
            value=1.0 if g.connected() else 0.0,
        )
        info = InfoMetricFamily("edgefleet_agent_model", "The model and artifact served")
        if model:
            info.add_metric([], model)
        yield info

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
