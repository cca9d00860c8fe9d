"""Prometheus metrics of the trainer service, computed when scraped (``metrics:`` in trainer.yaml).

Served at ``/metrics`` of the console when ``trainer serve`` runs one (a console API token as bearer
token, unless ``metrics.console_auth: none``), and on a port of their own when no console runs or
``metrics.port`` is set (docs/monitoring.md).

A custom collector reads the store and the service's state at scrape time, so nothing in the service
loop updates (or can fail on) a metric. A part that fails (the database away) is logged and left out,
the rest is served, and ``edgefleet_store_up`` says 0. Device, model and rollout series read what the
store holds (what the console shows); ingest, job and error counters are the service process's own.
Names follow Prometheus conventions (base units, ``_total`` counters, ``_info`` for versions).

Label cardinality is bounded: ``device`` by the fleet (one series per device and metric; a device
removed with ``forget-device`` goes); ``model`` and ``version`` by the model versions some device of
the fleet serves now (the champion, a canary, stragglers: at most one per device, a handful in practice);
``state``, ``outcome`` and ``webhook`` by fixed sets or the configuration.

    edgefleet_device_online{fleet,device}                    1 online, 0 offline (its current status)
    edgefleet_device_last_window_age_seconds{fleet,device}   since its newest window ended
    edgefleet_device_frames_per_second{fleet,device}         inferred frames over its last 2 minutes
    edgefleet_device_estimated_accuracy_ratio{fleet,device}  the service's latest estimate (champion)
    edgefleet_device_drift{fleet,device}                     1 in the drift state
    edgefleet_device_info{fleet,device,model,version,agent_version}
    edgefleet_model_devices{fleet,model,version}             devices serving each model version now
    edgefleet_model_estimated_accuracy_ratio{fleet,model,version}  their mean estimate on that model
    edgefleet_rollout_state{fleet,state}                     1 for the latest canary's state: none,
                                                             canary, promoted, rolled_back (0 others)
    edgefleet_rollout_active{fleet}                          1 while a canary runs
    edgefleet_rollout_canary_info{fleet,model,version}       the latest canary's candidate
    edgefleet_champion_info{fleet,model,version}
    edgefleet_ingest_messages_total{fleet,outcome}           received, stored, duplicate, dead_lettered
    edgefleet_ingest_buffered_messages{fleet}                received, not yet committed
    edgefleet_ingest_lag_seconds{fleet}                      since the last commit, while messages wait
    edgefleet_retrain_jobs_total{fleet,outcome}              ok, gate_failed, failed
    edgefleet_service_errors_total{fleet}
    edgefleet_webhook_deliveries{fleet,webhook,state}        pending, delivered, failed (in the store)
    edgefleet_store_up{fleet}                                1 when every store query of the scrape answered
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from trainer.store.fleet_state import ROLLOUT_STATES, device_rows, latest_canary, model_serving
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

    @property
    def fleet(self) -> str:
        return self.service.cfg.fleet

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        store_up = 1.0
        for part in (self._devices, self._models, self._rollout, self._webhooks):  # the store's
            families = _part(part, now)
            if families is None:
                store_up = 0.0
            yield from families or ()
        for part in (self._ingest, self._service):  # the service process's own
            yield from _part(part, now) or ()
        yield _gauge(
            "edgefleet_store_up", "1 when every store query of this scrape answered", self.fleet, store_up
        )

    def _devices(self, now: float) -> Iterator[Metric]:
        """Each device of the fleet as the store holds it: row, health, recent windows."""
        store, fleet = self.service.store, self.fleet
        docs = {
            "online": "1 while the device's current status is online",
            "last_window_age_seconds": "Seconds since the device's newest window ended",
            "frames_per_second": f"Inferred frames per second over the last {RATE_WINDOW_S:.0f} s",
            "estimated_accuracy_ratio": "Latest accuracy estimate on the champion",
            "drift": "1 while the device is in the drift state",
        }
        m = {
            k: GaugeMetricFamily(f"edgefleet_device_{k}", doc, labels=["fleet", "device"])
            for k, doc in docs.items()
        }
        info = InfoMetricFamily(
            "edgefleet_device", "Model and agent a device runs", labels=["fleet", "device"]
        )
        rows = device_rows(store, fleet)
        activity = store.recent_activity(fleet, now - RATE_WINDOW_S)
        for d, h in rows:
            key = [fleet, d.device]
            if d.state is not None:
                m["online"].add_metric(key, 1.0 if d.state == "online" else 0.0)
            if d.last_window_end is not None:
                m["last_window_age_seconds"].add_metric(key, max(0.0, now - d.last_window_end))
            fps = activity[d.device].frames_per_second if d.device in activity else None
            if fps is not None:
                m["frames_per_second"].add_metric(key, fps)
            if h is not None and h.estimated_accuracy is not None:
                m["estimated_accuracy_ratio"].add_metric(key, h.estimated_accuracy)
            if h is not None and h.drift_state is not None:
                m["drift"].add_metric(key, 1.0 if h.drift_state == "drift" else 0.0)
            labels = {"model": d.model_name, "version": d.model_version, "agent_version": d.agent_version}
            info.add_metric(key, {k: v or "" for k, v in labels.items()})
        yield from (*m.values(), info)

    def _models(self, now: float) -> Iterator[Metric]:
        """Per model version some device serves now: how many do, and their mean estimate on it."""
        labels = ["fleet", "model", "version"]
        devices = GaugeMetricFamily(
            "edgefleet_model_devices", "Devices serving each model version now", labels=labels
        )
        accuracy = GaugeMetricFamily(
            "edgefleet_model_estimated_accuracy_ratio",
            "Mean accuracy estimate of the devices serving each model version (estimates on that model)",
            labels=labels,
        )
        for m in model_serving(self.service.store, self.fleet):
            devices.add_metric([self.fleet, m.model, m.version], m.devices)
            if m.estimated_accuracy is not None:
                accuracy.add_metric([self.fleet, m.model, m.version], m.estimated_accuracy)
        yield from (devices, accuracy)

    def _rollout(self, now: float) -> Iterator[Metric]:
        """The fleet's latest canary rollout, as the store holds it (decisions by hand included)."""
        fleet = self.fleet
        canary = latest_canary(self.service.store, fleet)
        current = canary.state if canary is not None else "none"
        state = GaugeMetricFamily(
            "edgefleet_rollout_state",
            "1 for the state of the fleet's latest canary rollout (none before the first), 0 for the others",
            labels=["fleet", "state"],
        )
        for st in ROLLOUT_STATES:
            state.add_metric([fleet, st], 1.0 if st == current else 0.0)
        info = InfoMetricFamily(
            "edgefleet_rollout_canary", "The candidate of the fleet's latest canary rollout", labels=["fleet"]
        )
        if canary is not None:
            info.add_metric([fleet], {"model": canary.model, "version": canary.version})
        active = 1.0 if current == "canary" else 0.0
        yield from (state, _gauge("edgefleet_rollout_active", "1 while a canary runs", fleet, active), info)

    def _ingest(self, now: float) -> Iterator[Metric]:
        """The ingest workers' counters (this process's since it started)."""
        totals: dict[str, float] = {"received": 0, "stored": 0, "duplicate": 0, "dead_lettered": 0}
        buffered, last_commit = 0, None
        for w in self.service.workers:
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
            messages.add_metric([self.fleet, outcome], n)
        yield messages
        yield _gauge(
            "edgefleet_ingest_buffered_messages", "Received, not yet committed", self.fleet, buffered
        )
        lag = now - last_commit if buffered and last_commit else 0.0
        yield _gauge(
            "edgefleet_ingest_lag_seconds",
            "Seconds since the last commit while messages wait",
            self.fleet,
            lag,
        )

    def _service(self, now: float) -> Iterator[Metric]:
        """The champion the service runs with, its retraining jobs and its failed steps."""
        s, fleet = self.service, self.fleet
        champion = InfoMetricFamily(
            "edgefleet_champion", "The model the fleet's stable channel serves", labels=["fleet"]
        )
        if s.champion is not None:
            m = s.champion.manifest
            champion.add_metric([fleet], {"model": m.name, "version": m.version})
        yield champion
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

    def _webhooks(self, now: float) -> Iterator[Metric]:
        s, fleet = self.service, self.fleet
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


def _part(part: Callable[[float], Iterator[Metric]], now: float) -> list[Metric] | None:
    """All of a part's families, or None when it failed (logged): no half-filled families, and a scrape
    never takes anything down."""
    name = part.__name__.strip("_")
    try:
        return list(part(now))
    except DBAPIError as exc:  # the database is away: one line per scrape, not a traceback
        log.warning("metrics: %s could not be read: %s", name, str(exc.orig or exc).splitlines()[0][:200])
    except Exception:  # noqa: BLE001 - say what failed and serve the rest
        log.exception("metrics: %s could not be read", name)
    return None


def _gauge(name: str, doc: str, fleet: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["fleet"])
    g.add_metric([fleet], value)
    return g


def metrics_registry(service: TrainerService) -> CollectorRegistry:
    """A registry holding only ``service``'s collector (what its /metrics serves, wherever)."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type for an ``Accept`` header (OpenMetrics when asked for,
    else Prometheus text 0.0.4), as prometheus_client's own server answers."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Serve ``/metrics`` of ``registry`` on ``host:port`` in a daemon thread; returns the server."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
