"""Prometheus metrics of the trainer service, computed when scraped (``metrics:`` in trainer.yaml).

A custom collector reads the store and the service's state at scrape time, so nothing in the service
loop updates (or can fail on) a metric, and a failing scrape is logged and answered with what could be
read. Names follow Prometheus conventions (base units, ``_total`` counters, ``_info`` for versions).
Label cardinality is bounded by the fleet: ``device`` (one series per device and metric), ``outcome``
and ``state`` (fixed sets); model versions appear only in ``_info`` metrics.

    edgefleet_device_online{fleet,device}                    1 online, 0 offline (retained status)
    edgefleet_device_last_window_age_seconds{fleet,device}   since its newest window ended
    edgefleet_device_frames_per_second{fleet,device}         inferred frames over its last 2 minutes
    edgefleet_device_estimated_accuracy_ratio{fleet,device}  the service's latest estimate (champion)
    edgefleet_device_drift{fleet,device}                     1 in the drift state
    edgefleet_device_info{fleet,device,model,version,agent_version}
    edgefleet_ingest_messages_total{fleet,outcome}           received, stored, duplicate, dead_lettered
    edgefleet_ingest_buffered_messages{fleet}                received, not yet committed
    edgefleet_ingest_lag_seconds{fleet}                      since the last commit, while messages wait
    edgefleet_champion_info{fleet,model,version}
    edgefleet_rollout_active{fleet}                          1 while a canary runs
    edgefleet_retrain_jobs_total{fleet,outcome}              ok, gate_failed, failed
    edgefleet_service_errors_total{fleet}
    edgefleet_webhook_deliveries{fleet,webhook,state}        pending, delivered, failed (in the store)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from trainer.store.schema import WebhookDelivery

if TYPE_CHECKING:
    from trainer.fleet.service import TrainerService

log = logging.getLogger(__name__)

RATE_WINDOW_S = 120.0
"""Frames per second are averaged over the windows that ended in this span."""


class ServiceCollector(Collector):
    """Reads one trainer service at scrape time (see the module docstring for the series)."""

    def __init__(self, service: TrainerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        for part in (self._devices, self._health, self._service, self._webhooks):
            try:
                yield from list(part())  # all of a part or nothing: no half-filled families
            except Exception:  # noqa: BLE001 - a scrape must never take anything down; say what failed
                log.exception("metrics: %s could not be read", part.__name__.strip("_"))

    def _devices(self) -> Iterator[Metric]:
        s, fleet = self.service, self.service.cfg.fleet
        now = time.time()
        online = GaugeMetricFamily(
            "edgefleet_device_online",
            "1 while the device's retained status is online",
            labels=["fleet", "device"],
        )
        age = GaugeMetricFamily(
            "edgefleet_device_last_window_age_seconds",
            "Seconds since the device's newest window ended",
            labels=["fleet", "device"],
        )
        fps = GaugeMetricFamily(
            "edgefleet_device_frames_per_second",
            f"Inferred frames per second over the last {RATE_WINDOW_S:.0f} s",
            labels=["fleet", "device"],
        )
        info = InfoMetricFamily(
            "edgefleet_device", "Model and agent a device runs", labels=["fleet", "device"]
        )
        for device, status in s.store.latest_status(fleet).items():
            online.add_metric([fleet, device], 1.0 if status.state == "online" else 0.0)
        for d in s.store.devices(fleet):
            if d.last_window_end is not None:
                age.add_metric([fleet, d.device], max(0.0, now - d.last_window_end))
            info.add_metric(
                [fleet, d.device],
                {
                    "model": d.model_name or "",
                    "version": d.model_version or "",
                    "agent_version": d.agent_version or "",
                },
            )
        for device, activity in s.store.recent_activity(fleet, now - RATE_WINDOW_S).items():
            if activity.frames_per_second is not None:
                fps.add_metric([fleet, device], activity.frames_per_second)
        yield from (online, age, fps, info)

    def _health(self) -> Iterator[Metric]:
        """The service's latest estimate and drift state per device (on the champion)."""
        s, fleet = self.service, self.service.cfg.fleet
        accuracy = GaugeMetricFamily(
            "edgefleet_device_estimated_accuracy_ratio",
            "Latest accuracy estimate on the champion",
            labels=["fleet", "device"],
        )
        drift = GaugeMetricFamily(
            "edgefleet_device_drift", "1 while the device is in the drift state", labels=["fleet", "device"]
        )
        for device, h in dict(s.last_health).items():
            if h.estimated_accuracy is not None:
                accuracy.add_metric([fleet, device], h.estimated_accuracy)
            drift.add_metric([fleet, device], 1.0 if h.recent_drift and h.recent_drift[-1] else 0.0)
        yield from (accuracy, drift)

    def _service(self) -> Iterator[Metric]:
        s, fleet = self.service, self.service.cfg.fleet
        totals: dict[str, float] = {"received": 0, "stored": 0, "duplicate": 0, "dead_lettered": 0}
        buffered, last_commit = 0, None
        for w in s.workers:
            st: dict[str, Any] = w.stats()
            totals["received"] += st.get("received", 0)
            totals["stored"] += st.get("stored", 0)
            totals["duplicate"] += st.get("duplicates", 0)
            totals["dead_lettered"] += st.get("dead_lettered", 0)
            buffered += st.get("buffered", 0)
            if st.get("last_committed_at"):
                last_commit = max(last_commit or 0.0, st["last_committed_at"])
        messages = CounterMetricFamily(
            "edgefleet_ingest_messages",
            "Device messages by what ingest did with them",
            labels=["fleet", "outcome"],
        )
        for outcome, n in totals.items():
            messages.add_metric([fleet, outcome], n)
        yield messages
        yield _gauge("edgefleet_ingest_buffered_messages", "Received, not yet committed", fleet, buffered)
        lag = time.time() - last_commit if buffered and last_commit else 0.0
        yield _gauge(
            "edgefleet_ingest_lag_seconds", "Seconds since the last commit while messages wait", fleet, lag
        )
        champion = InfoMetricFamily(
            "edgefleet_champion", "The model the fleet's stable channel serves", labels=["fleet"]
        )
        if s.champion is not None:
            m = s.champion.manifest
            champion.add_metric([fleet], {"model": m.name, "version": m.version})
        yield champion
        yield _gauge(
            "edgefleet_rollout_active",
            "1 while a canary runs",
            fleet,
            1.0 if s.rollout and s.rollout.active else 0.0,
        )
        jobs = CounterMetricFamily(
            "edgefleet_retrain_jobs", "Finished retraining jobs by outcome", labels=["fleet", "outcome"]
        )
        for outcome in ("ok", "gate_failed", "failed"):
            jobs.add_metric([fleet, outcome], s.job_outcomes.get(outcome, 0))
        yield jobs
        errors = CounterMetricFamily(
            "edgefleet_service_errors", "Failed service steps (logged)", labels=["fleet"]
        )
        errors.add_metric([fleet], s.errors)
        yield errors

    def _webhooks(self) -> Iterator[Metric]:
        s, fleet = self.service, self.service.cfg.fleet
        fam = GaugeMetricFamily(
            "edgefleet_webhook_deliveries",
            "Alert deliveries by webhook and state",
            labels=["fleet", "webhook", "state"],
        )
        if s.cfg.webhooks:
            with s.store.engine.connect() as conn:
                q = select(WebhookDelivery.webhook, WebhookDelivery.state, func.count()).group_by(
                    WebhookDelivery.webhook, WebhookDelivery.state
                )
                for webhook, state, n in conn.execute(q):
                    fam.add_metric([fleet, webhook, state], n)
        yield fam


def _gauge(name: str, doc: str, fleet: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["fleet"])
    g.add_metric([fleet], value)
    return g


def serve_metrics(service: TrainerService, host: str, port: int) -> Any:
    """Serve ``/metrics`` for ``service`` on ``host:port`` in a daemon thread; returns the server."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
