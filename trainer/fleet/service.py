"""The trainer service: ingest, drift, labelling, retraining, staged rollout and the release server.

Workflow of one control-loop tick (every ``tick_s``)::

    drift: assess closed time slots of stored windows -> alerts; a drifting device is asked to sample
    labels: the oracle (simulation) labels the queue; people use `edgefleet labels export/import`
    retrain: persistent drift or an ATC drop + enough labels + cooldown -> a retraining job (own process)
             finished job -> gate passed: canary release to a cohort | gate failed or crashed: alert
    rollout: canary vs control -> promote to stable | roll the cohort forward onto the champion

Everything it does is stored (alerts, releases, rollouts, audit log), published on the ``alert`` topic
and appended to a :class:`Timeline` that the demo prints.

    service = TrainerService(load_service_config("trainer.yaml")).start()
    service.release_initial(load_package("build/models/v1"))   # or: edgefleet release publish ...
    ...
    service.stop()
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.package import ModelManifest, ModelPackage, load_package
from edge_agent.protocol import Alert, ModelRef
from edge_agent.sd_notify import Notifier
from trainer.drift.accuracy import window_estimator
from trainer.drift.detector import Transition
from trainer.fleet.config import TrainerServiceConfig
from trainer.fleet.drift_service import FLEET_KEY, DriftService
from trainer.fleet.homeassistant import HomeAssistantBridge, views_of
from trainer.fleet.labelling import label_with
from trainer.fleet.messaging import FleetPublisher
from trainer.fleet.retrain_job import RetrainSpec, read_result, start_job
from trainer.fleet.retrain_policy import DeviceHealth, decide_retrain
from trainer.fleet.rollout import RolloutManager, RolloutOutcome
from trainer.fleet.webhooks import WebhookDispatcher
from trainer.ingest.nats_source import ensure_ingest_consumer
from trainer.ingest.worker import IngestConfig, IngestWorker
from trainer.release.repository import ReleaseRepository
from trainer.release.server import ReleaseServer
from trainer.store import Store
from trainer.store.console_queries import put_device_health
from trainer.store.fleet_state import removed_devices
from trainer.store.rollups import purge_windows, roll_up

log = logging.getLogger(__name__)

ROLLUP_HOURS_PER_TICK = 2
"""Hours rolled up per tick at most (~15 s each for 1,000 devices): a catch-up over weeks of windows
spreads over many ticks instead of stalling the loop."""

HEALTH_RATE_WINDOW_S = 120.0
"""Frames per second and mean confidence in the stored device health are over this span."""


@dataclass
class TimelineEvent:
    t: float
    kind: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class Timeline:
    """What happened, in order, with wall-clock times (printed live and kept for the summary)."""

    def __init__(self, t0: float | None = None, echo: bool = True) -> None:
        self.t0 = t0 or time.time()
        self.events: list[TimelineEvent] = []
        self.echo = echo
        self._lock = threading.Lock()

    def add(self, kind: str, message: str, **details: Any) -> TimelineEvent:
        ev = TimelineEvent(time.time(), kind, message, details)
        with self._lock:
            self.events.append(ev)
        if self.echo:
            print(f"[{ev.t - self.t0:7.1f} s] {kind:18s} {message}", flush=True)
        return ev

    def first(
        self, kind: str, pred: Callable[[TimelineEvent], bool] = lambda e: True
    ) -> TimelineEvent | None:
        with self._lock:
            return next((e for e in self.events if e.kind == kind and pred(e)), None)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"t": round(e.t - self.t0, 2), "kind": e.kind, "message": e.message, **e.details}
            for e in self.events
        ]


@dataclass
class _Job:
    proc: subprocess.Popen[bytes]
    spec: RetrainSpec
    started: float
    version: str
    reason: str


class TrainerService:
    """One fleet's trainer: start(), then it runs on its own threads until stop()."""

    def __init__(
        self,
        cfg: TrainerServiceConfig,
        *,
        labeller: Callable[[dict[str, Any]], str | None] | None = None,
        labeller_names: Sequence[str] = ("oracle",),
        timeline: Timeline | None = None,
    ) -> None:
        self.cfg = cfg
        self.labeller = labeller
        self.labeller_names = tuple(labeller_names)
        self.timeline = timeline or Timeline()
        self.store = Store(cfg.db_url)
        repo_dir = cfg.release.repo
        self.repo = (
            ReleaseRepository(repo_dir)
            if (repo_dir / "repository.json").exists()
            else ReleaseRepository.init(repo_dir)
        )
        self.server: ReleaseServer | None = None
        self.publisher: FleetPublisher | None = None
        self.workers: list[IngestWorker] = []
        self.drift = DriftService(
            self.store, cfg.fleet, cfg.drift, slot_s=cfg.slot_s, grace_s=cfg.grace_s, start=time.time()
        )
        self.rollout: RolloutManager | None = None
        self.champion: ModelPackage | None = None
        self._champion_since = 0.0
        self._job: _Job | None = None
        self._last_retrain: float | None = None
        self._labels_reported = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.last_health: dict[str, DeviceHealth] = {}
        """The latest per-device health of the champion (metrics and the console read it)."""
        self.job_outcomes: Counter[str] = Counter()
        self._metrics_server: Any = None
        self._metrics_registry: Any = None
        self.metrics_port: int | None = None
        """The port of its own /metrics is served on (None: the console's app serves them, or none)."""
        self.homeassistant: HomeAssistantBridge | None = None
        self.webhooks: WebhookDispatcher | None = None
        self._ha_due = 0.0
        self._rollup_due = 0.0
        self._health_due = 0.0

    @property
    def metrics_registry(self) -> Any:
        """The Prometheus registry of this service (its port and the console's /metrics serve it)."""
        if self._metrics_registry is None:
            from trainer.fleet.metrics import metrics_registry

            self._metrics_registry = metrics_registry(self)
        return self._metrics_registry

    @property
    def repo_url(self) -> str:
        assert self.server is not None
        return self.cfg.release.public_url or self.server.url

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, announce_ready: bool = True) -> TrainerService:
        """Start ingest, the release server and the control loop; ``announce_ready=False`` leaves systemd's
        READY=1 to the caller (:meth:`announce_ready`), which has more to start (the console)."""
        c = self.cfg
        self._notifier = Notifier()
        self._announce_ready = announce_ready
        if not c.shared_subscription and c.ingest_workers > 1 and c.nats is None:
            raise ValueError(
                "ingest_workers > 1 needs shared_subscription: true (a broker with shared subscriptions)"
            )
        self.server = ReleaseServer(
            self.repo.path, host=c.release.host, port=c.release.port, repository=self.repo
        ).start()
        self.publisher = FleetPublisher(c.mqtt, c.fleet)
        if c.nats is not None:  # before any worker: JetStream keeps messages only for a consumer
            info = ensure_ingest_consumer(c.nats, c.mqtt, c.fleet)
            self.timeline.add("service", f"NATS ingest consumer {info['consumer']} on {info['filter']}")
        for i in range(c.ingest_workers):
            ic = IngestConfig(
                mqtt=c.mqtt,
                db_url=c.db_url,
                fleet=c.fleet,
                index=i,
                shared=c.shared_subscription,
                kinds=("tele", "status", "sample", "update"),
                nats=c.nats,
            )
            self.workers.append(IngestWorker(ic).start())
        self.rollout = RolloutManager(
            self.store,
            self.repo,
            self.publisher,
            fleet=c.fleet,
            model=c.training.model,
            cfg=c.rollout,
            repo_url=self.repo_url,
            lookback_s=10 * c.slot_s,
        )
        current = self.repo.current("stable", c.fleet, c.training.model)
        if current is not None:
            rec = self.store.model(current.package_sha256)
            if rec is not None and rec.path:
                self.champion = load_package(rec.path)
                self._champion_since = float(current.published)  # labels before it trained the champion
        if self.champion is None:
            log.warning(
                "fleet %s has no champion %s model in this store yet: drift and retraining start once one "
                "is released (edgefleet trainer serve --champion PKG)",
                c.fleet,
                c.training.model,
            )
        self._start_monitoring()
        self._thread = threading.Thread(target=self._run, name="trainer-service", daemon=True)
        self._thread.start()
        self.timeline.add(
            "service",
            f"trainer for fleet {c.fleet}: releases at {self.repo_url}, {c.ingest_workers} ingest worker(s)",
        )
        return self

    def _start_monitoring(self) -> None:
        """Home Assistant, webhooks and the metrics port, those configured."""
        c = self.cfg
        if c.homeassistant is not None:
            self.homeassistant = HomeAssistantBridge(
                c.homeassistant, c.mqtt, c.fleet, client_id=f"{c.mqtt.client_id or 'trainer'}-{c.fleet}-ha"
            )
        if c.webhooks:
            self.webhooks = WebhookDispatcher(self.store, list(c.webhooks)).start()
        port = c.metrics.own_port(console=c.console is not None) if c.metrics is not None else None
        if c.metrics is not None and port is not None:  # else the console serves /metrics, or nothing does
            from trainer.fleet.metrics import serve_metrics

            self._metrics_server = serve_metrics(self.metrics_registry, c.metrics.host, port)
            self.metrics_port = port

    def stop(self) -> None:
        self._stop.set()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.homeassistant is not None:
            self.homeassistant.close()
        if self.webhooks is not None:
            self.webhooks.stop()
        if self._thread:
            self._thread.join(timeout=30)
        if self._job and self._job.proc.poll() is None:
            self._job.proc.terminate()
            try:
                self._job.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._job.proc.kill()
        for w in self.workers:
            w.stop()
        if self.publisher:
            self.publisher.close()
        if self.server:
            self.server.stop()
        self.store.close()

    def adopt_champion(self, package: ModelPackage) -> None:
        """Start from ``package``: already the fleet's stable release (a restart), or released now."""
        current = self.repo.current("stable", self.cfg.fleet, self.cfg.training.model)
        if current is not None and current.package_sha256 == package.sha256:
            self.store.register_package(package)
            self.champion = package
            self._champion_since = float(current.published)
        else:
            self.release_initial(package)

    def release_initial(self, package: ModelPackage) -> None:
        """Make ``package`` the fleet's champion and publish it to every device (stable)."""
        assert self.rollout is not None
        rec = self.rollout.release_stable(package)
        self.champion = package
        self._champion_since = time.time()
        self.timeline.add(
            "release",
            f"{package.manifest.name} {package.manifest.version} released to every device "
            f"(stable, release {rec.release})",
            version=package.manifest.version,
            release=rec.release,
        )

    # -- the control loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        # systemd (deploy/systemd/edgefleet-trainer.service): ready once this loop runs, and WATCHDOG=1
        # after each tick that returned, so a tick stuck on the database or the broker gets it restarted.
        notifier = self._notifier
        if self._announce_ready:
            self.announce_ready()
        while not self._stop.wait(self.cfg.tick_s):
            try:
                self.tick(time.time())
            except Exception:  # noqa: BLE001 - one failed tick must not stop the service
                self.errors += 1
                log.exception("trainer service tick failed")
            if notifier.watchdog_due():
                notifier.ping(self._status_line())
        notifier.stopping(f"fleet {self.cfg.fleet}: stopping")
        notifier.close()

    def announce_ready(self) -> None:
        """Tell systemd the service is up (READY=1); a no-op outside systemd."""
        self._notifier.ready(f"fleet {self.cfg.fleet}: serving releases at {self.repo_url}")

    def _status_line(self) -> str:
        """What ``systemctl status`` shows: the champion, a retraining job, failed steps."""
        m = self.champion.manifest if self.champion else None
        champion = f"{m.name} {m.version}" if m else "no champion yet"
        job = f", retraining {self._job.version}" if self._job else ""
        return f"fleet {self.cfg.fleet}: {champion}{job}, {self.errors} failed step(s) since start"

    def tick(self, now: float) -> None:
        """One pass of every stage; a stage that fails is logged and counted, the others still run."""
        for stage in (
            self._drift_step,
            self._health_step,
            self._label_step,
            self._retrain_step,
            self._rollout_step,
            self._homeassistant_step,
            self._rollup_step,
        ):
            try:
                stage(now)
            except Exception:  # noqa: BLE001 - one failed stage must not starve the others
                self.errors += 1
                log.exception("trainer service: %s failed", stage.__name__)

    def _drift_step(self, now: float) -> None:
        for ev in self.drift.poll(now):
            self._on_drift(ev.model_sha256, ev.transition, ev.slot_start)
        for own in self.drift.take_rebased():
            differs = ", ".join(f"{f} (JS {js:.2f})" for f, js in own.differs.items())
            self._alert(
                "reference_rebased",
                f"{own.device}: its own reference from {own.windows} windows under the new model"
                + (f"; its normal differs from the training reference in {differs}" if differs else ""),
                severity="info",
                device=own.device,
                reference=own.label,
                windows=own.windows,
                differs=list(own.differs),
            )

    def _health_step(self, now: float) -> None:
        """Each device's estimate and drift state on the champion, kept for the retraining policy and
        written to the store, where the console and metrics read them."""
        if self.champion is None or now < self._health_due:
            return
        self._health_due = now + min(self.cfg.slot_s / 2, 30.0)  # drift states change once per slot
        sha = self.champion.sha256
        activity = self.store.recent_activity(self.cfg.fleet, now - HEALTH_RATE_WINDOW_S)
        health, rows = self.drift.health_rows(sha, activity)
        present = put_device_health(self.store, self.cfg.fleet, rows, now)
        # a device removed from the fleet (forget-device) no longer counts towards retraining
        self.last_health = {d: h for d, h in health.items() if d in present}

    def _rollup_step(self, now: float) -> None:
        """Hour and day roll-ups of the telemetry (trainer/store/rollups.py), then the raw windows past
        ``retention.keep_raw_days``; every ``retention.rollup_every_s``, or on the next tick while a
        catch-up is under way (a few hours per tick, so the other stages keep running)."""
        if now < self._rollup_due:
            return
        retention = self.cfg.retention
        references = {
            m.sha256: ModelManifest.model_validate_json(m.manifest).reference for m in self.store.models()
        }
        made = roll_up(
            self.store,
            until=now - self.cfg.grace_s,
            estimate=window_estimator(references),
            max_hours=ROLLUP_HOURS_PER_TICK,
        )
        self._rollup_due = now if made["more"] else now + retention.rollup_every_s
        purged = purge_windows(self.store, keep_days=retention.keep_raw_days, now=now)
        if made["hour"] or made["day"] or made["late"] or purged:
            log.info(
                "roll-ups: %d hour, %d day, %d late window(s) merged; %d raw window(s) purged",
                made["hour"],
                made["day"],
                made["late"],
                purged,
            )

    def _homeassistant_step(self, now: float) -> None:
        """Discovery and states for Home Assistant, every ``state_interval_s`` or at once after its birth;
        devices removed from the fleet (forget-device) lose their entities."""
        ha = self.homeassistant
        if ha is None or (now < self._ha_due and not ha.rediscover_pending):
            return
        assert self.cfg.homeassistant is not None
        self._ha_due = now + self.cfg.homeassistant.state_interval_s
        ha.publish(views_of(self, now), now, removed=removed_devices(self.store, self.cfg.fleet))

    def _label_step(self, now: float) -> None:
        if self.labeller is not None:
            n = label_with(self.store, self.labeller, self.labeller_names)
            if n:
                log.info("oracle labelled %d samples", n)

    def _rollout_step(self, now: float) -> None:
        assert self.rollout is not None
        outcome = self.rollout.poll(now)
        if outcome is not None:
            self._on_rollout(outcome)

    def _alert(
        self,
        alert: str,
        message: str,
        *,
        severity: str = "warning",
        device: str | None = None,
        model: ModelRef | None = None,
        **details: Any,
    ) -> None:
        self.store.record_alert(
            kind=alert,
            message=message,
            severity=severity,
            fleet=self.cfg.fleet,
            device=device,
            details=details,
        )
        if self.publisher:
            self.publisher.alert(
                Alert(
                    fleet=self.cfg.fleet,
                    alert=alert,
                    severity=severity,  # type: ignore[arg-type]
                    message=message,
                    device=device,
                    model=model,
                    ts=time.time(),
                    details=details,
                )
            )
        self.timeline.add(alert, message, device=device, **details)

    def _on_drift(self, sha: str, t: Transition, slot_start: float) -> None:
        who = "the fleet" if t.key == FLEET_KEY else t.key
        device = None if t.key == FLEET_KEY else t.key
        feats = ", ".join(t.flagged_features) or "-"
        ref = "its own" if t.reference != "training" else "the"
        if t.new == "drift":
            self._alert(
                "drift",
                f"{who} drifted from {ref} reference (features: {feats})",
                device=device,
                features=t.flagged_features,
                score=round(t.score, 2),
                slot_start=slot_start,
                reference=t.reference,
            )
            if device and self.publisher:
                self.publisher.command(device, "sample", minutes=self.cfg.sample_minutes)
        elif t.new == "ok" and t.old == "drift":
            self._alert(
                "drift_cleared",
                f"{who} back within {ref} reference",
                severity="info",
                device=device,
                reference=t.reference,
            )
        elif t.new == "warning":
            self.timeline.add(
                "drift_warning",
                f"{who}: one window off {ref} reference (features: {feats})",
                device=device,
                reference=t.reference,
            )

    # -- retraining ------------------------------------------------------------------------------------
    def _retrain_step(self, now: float) -> None:
        if self._job is not None:
            if self._job.proc.poll() is None:
                return
            job, self._job = self._job, None  # finished, whatever happens next: never handled twice
            try:
                self._finish_job(job)
            except Exception as exc:  # noqa: BLE001 - reported, and the champion stays
                log.exception("trainer service: handling the result of %s failed", job.version)
                self._alert(
                    "retrain_failed",
                    f"{job.version} finished but could not be released; the champion "
                    f"stays: {type(exc).__name__}: {exc}",
                    severity="critical",
                    version=job.version,
                )
            return
        if self.champion is None or (self.rollout and self.rollout.active):
            return
        health = self.last_health
        ref = self.champion.manifest.reference
        # The drifted slice: labels from the devices that triggered (an empty trigger counts nothing).
        d = decide_retrain(
            health, ref.accuracy if ref else None, 0, now, self._last_retrain, self.cfg.retrain
        )
        if not d.triggered_by:
            return
        labels = self.store.count_labelled_samples(since=self._champion_since, devices=d.triggered_by)
        self._report_labels(labels)
        d = decide_retrain(
            health, ref.accuracy if ref else None, labels, now, self._last_retrain, self.cfg.retrain
        )
        if d.retrain:
            self._start_job(d.reason, list(d.triggered_by), now)

    def _report_labels(self, labels: int) -> None:
        """A timeline line each time another quarter of the labels needed has come in."""
        need = self.cfg.retrain.min_labels
        quarter = min(4, labels * 4 // need)
        if quarter > self._labels_reported:
            self._labels_reported = quarter
            self.timeline.add(
                "labels", f"{labels} labelled samples from the drifted devices ({need} needed)", labels=labels
            )

    def _next_version(self) -> str:
        """Candidates of one champion are N+1.0.0, N+1.1.0, ...: never reused, so a rejected one stays visible."""
        assert self.champion is not None
        head = self.champion.manifest.version.split(".")[0]
        major = int(head) if head.isdigit() else 1
        used = {r.version for r in self.repo.releases()}  # released, and tried (a job directory each)
        used |= {d.name.removeprefix("retrain-") for d in Path(self.cfg.training.work_dir).glob("retrain-*")}
        minor = 0
        while f"{major + 1}.{minor}.0" in used:
            minor += 1
        return f"{major + 1}.{minor}.0"

    def _start_job(self, reason: str, devices: list[str], now: float) -> None:
        assert self.champion is not None
        t = self.cfg.training
        version = self._next_version()
        work = Path(t.work_dir) / f"retrain-{version}"
        spec = RetrainSpec(
            base_data=t.base_data,
            db_url=self.cfg.db_url,
            field_since=self._champion_since,
            field_devices=devices,
            out=str(work / "package"),
            champion=str(self.champion.root),
            name=t.model,
            version=version,
            min_field_gain=t.min_field_gain,
            train=t.train,
            result=str(work / "result.json"),
        )
        self._job = _Job(start_job(spec, work), spec, now, version, reason)
        self._last_retrain = now
        self._labels_reported = 0
        labels = self.store.count_labelled_samples(since=self._champion_since, devices=devices)
        self._alert(
            "retrain_started",
            f"retraining {t.model} {version} on the original data + {labels} labelled "
            f"samples from {', '.join(devices)} ({reason})",
            severity="info",
            version=version,
            labels=labels,
        )

    def _finish_job(self, job: _Job) -> None:
        result = read_result(job.spec, job.proc.returncode)
        took = time.time() - job.started
        status = str(result.get("status"))
        self.job_outcomes[status if status in ("ok", "gate_failed") else "failed"] += 1
        held = result.get("held_for_review") or {}
        if held:  # poisoning defences: these labels were not trained on until a person looks at them
            reasons = Counter(why.split(":")[0] for why in held.values())
            self._alert(
                "labels_held_for_review",
                f"{len(held)} field label(s) held for review "
                f"({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))}); {job.version} did not train on them",
                version=job.version,
                samples=sorted(held, key=int)[:50],  # ids as strings (alert details on the wire)
            )
        if result.get("status") == "ok":
            pkg = load_package(result["package"])
            self.timeline.add(
                "retrain_done",
                f"{pkg.manifest.name} {pkg.manifest.version} trained, evaluated and "
                f"gated in {took:.0f} s ({result.get('field_samples')} field samples)",
                version=pkg.manifest.version,
                seconds=round(took, 1),
            )
            assert self.rollout is not None and self.champion is not None
            a = self.rollout.start_canary(
                pkg, self.champion.sha256, retrained_for=job.spec.field_devices or ()
            )
            self._alert(
                "canary_started",
                f"{pkg.manifest.version} on the canary channel for "
                f"{a.cohort.share_bp / 100:.0f}% of the fleet (release {a.release.release})",
                severity="info",
                version=pkg.manifest.version,
                release=a.release.release,
            )
        elif result.get("status") == "gate_failed":
            self._alert(
                "gate_failed",
                f"{job.version} failed the gate; the champion stays: "
                + "; ".join(result.get("failures", [])),
                version=job.version,
            )
        else:
            self._alert(
                "retrain_failed",
                f"retraining {job.version} failed; the champion stays: {result.get('error')}",
                severity="critical",
                version=job.version,
            )

    def _on_rollout(self, outcome: RolloutOutcome) -> None:
        v = outcome.verdict
        details: dict[str, Any] = {}
        if v is not None:
            details = {
                "canary_accuracy": v.canary_accuracy,
                "control_accuracy": v.control_accuracy,
                "canary_windows": v.canary_windows,
                "control_windows": v.control_windows,
            }
        if outcome.decision == "promote":
            sha = outcome.release.package_sha256
            rec = self.store.model(sha)
            assert rec is not None and rec.path
            self.champion = load_package(rec.path)
            self._champion_since = time.time()
            # Each device is judged against its own normal under the new model (trainer/drift/rebase.py).
            self.drift.rebase(sha, self._champion_since)
            self._alert(
                "rollout_promoted",
                f"{self.champion.manifest.version} promoted to every device (release "
                f"{outcome.release.release}): {outcome.reasons[0]}",
                severity="info",
                **details,
            )
        else:
            self._alert(
                "rollout_rolled_back",
                f"canary rolled back (release {outcome.release.release}): {outcome.reasons[0]}",
                severity="critical",
                **details,
            )
