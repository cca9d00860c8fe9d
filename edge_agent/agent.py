"""The edge agent: wires config, model, source, pipeline, telemetry and the MQTT link together.

Workflow of :meth:`Agent.run`::

    load + verify package -> choose artifact (forced, cached, or timed in a child process)
    -> start source, pipeline, MQTT link (birth on connect, last will offline)
    -> loop: results -> features -> aggregator; window due -> spool -> broker (QoS 1)
    -> on SIGTERM or end of a finite source: close the last window, flush the spool, status offline

Nothing that happens at the edges (a dead broker, a lost camera, a corrupt frame, a malformed
command) stops the loop; it is counted and reported in the next telemetry window.

Example::

    edgefleet agent run --package out/lite0 --source dir:photos --broker mqtt://127.0.0.1:1883 \\
        --device-id cam-01 --fleet demo
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge_agent import __version__
from edge_agent.backends.select import choose_artifact
from edge_agent.config import AgentConfig, UpdateSettings, load_config, validate_config
from edge_agent.errors import ConfigError
from edge_agent.events import EventCounter
from edge_agent.liveness import AgentLiveness
from edge_agent.mqtt_link import MqttLink
from edge_agent.package import ModelPackage, load_package
from edge_agent.pipeline import Inferred, LoadedModel, Pipeline
from edge_agent.postprocess import top_k
from edge_agent.privacy import privacy_filter
from edge_agent.protocol import (
    BackendChoice,
    Command,
    MessageError,
    Prediction,
    Sample,
    Status,
    TelemetryWindow,
    UpdateEvent,
    cmd_topic,
    parse_message,
    pred_topic,
    release_topic,
    sample_topic,
    status_topic,
    tele_topic,
    update_topic,
)
from edge_agent.sampling import SampleSelector
from edge_agent.sd_notify import Notifier
from edge_agent.sources import EndOfStream, open_source
from edge_agent.sources.base import FrameSource, SourceStats, redact_credentials
from edge_agent.spool import Spool
from edge_agent.state import AgentState
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import output_features

if TYPE_CHECKING:  # the updater (python-tuf) and metrics are imported only when configured
    from edge_agent.metrics import AgentMetrics
    from edge_agent.updater.boot import Boot
    from edge_agent.updater.store import UpdateStore
    from edge_agent.updater.updater import Updater

log = logging.getLogger("edge_agent")


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc; falls back to now)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class AgentObserver(Protocol):
    """Hears what the agent publishes, as it publishes it (``edgefleet agent run --print`` is one)."""

    def window(self, window: TelemetryWindow, labels: Sequence[str]) -> None: ...

    def prediction(self, message: Prediction) -> None: ...

    def update(self, event: UpdateEvent) -> None: ...


class Agent:
    """One agent process serving one frame source.

    The constructor builds every running part (the verified model, the source, the spool, the MQTT link,
    the aggregator, the pipeline and, when updates are on, the updater) and fails fast, naming the path
    or field, if one cannot be built; :meth:`run` starts them and serves until :meth:`stop`.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        observer: AgentObserver | None = None,
        source_factory: Callable[[int], FrameSource] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """``source_factory(session)`` replaces the config's source URI (simulators, embedding);
        ``notifier`` tells systemd this agent's state (the process ``edgefleet agent run`` only)."""
        cfg = self.config = config
        self.observer = observer
        self.events = EventCounter()
        self.state = AgentState(config.state_dir)
        self._stop = threading.Event()
        self._flush_requested = threading.Event()
        self._started = process_start_time()
        self.first_inference_s: float | None = None
        self.windows_published = 0
        self.metrics: AgentMetrics | None = None
        self._last_source = SourceStats()
        self.sampler: SampleSelector[Inferred] = SampleSelector(config.sampling, now=time.time())
        # the committed update slot, verified, when updates are on; else the config's package
        booted = self._boot(cfg.update) if cfg.update else None
        package = (
            booted[1].package if booted else load_package(cfg.model.package)
        )  # fails fast, naming the check
        self.session = self.state.next_session()
        self.choice: BackendChoice = choose_artifact(
            package, cfg.model.artifact, cfg.model.backend, self.state
        )
        self._serving: LoadedModel = LoadedModel.load(package, self.choice.artifact, cfg.model.backend)
        self.source: FrameSource = self._open_source(source_factory)
        self.spool = Spool(
            self.state.spool_path, cfg.spool.max_messages, cfg.spool.max_bytes, events=self.events
        )
        self.link: MqttLink = self._make_link()
        self.updater: Updater | None = (
            self._make_updater(cfg.update, *booted) if cfg.update and booted else None
        )
        self.aggregator: TelemetryAggregator = self._make_aggregator(package)
        self.pipeline = Pipeline(
            self.source,
            self._serving,
            batch=cfg.model.backend.batch,
            stats_every=cfg.telemetry.stats_every,
            on_first_inference=self._first_inference,
            keep_frames=cfg.sampling.enabled,
        )
        self.liveness = AgentLiveness(
            notifier or Notifier({}),
            self.source,
            lambda: self.pipeline.active,
            reconnect_max_s=cfg.source.reconnect_max_s,
        )

    def _open_source(self, source_factory: Callable[[int], FrameSource] | None) -> FrameSource:
        if source_factory:
            return source_factory(self.session)
        s = self.config.source
        return open_source(
            s.uri,
            loop=s.loop,
            realtime=s.realtime,
            width=s.width,
            height=s.height,
            fps=s.fps,
            reconnect_min_s=s.reconnect_min_s,
            reconnect_max_s=s.reconnect_max_s,
        )

    def _make_link(self) -> MqttLink:
        cfg = self.config
        return MqttLink(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or f"{cfg.fleet}-{cfg.device_id}",
            status_topic=status_topic(cfg.fleet, cfg.device_id),
            birth=lambda connection: self._status("online", connection).to_bytes(),
            will=lambda connection: self._status("offline", connection).to_bytes(),
            spool=self.spool,
            events=self.events,
            # commands at QoS 1; release hints at QoS 0: they are retained, idempotent and backed by the
            # updater's polling, and a QoS 1 subscription costs a JetStream consumer on the NATS tier
            subscriptions=[(cmd_topic(cfg.fleet, cfg.device_id), 1)] + [(t, 0) for t in self._hint_topics()],
            on_message=self._on_message,
        )

    def _make_aggregator(self, package: ModelPackage) -> TelemetryAggregator:
        cfg, t = self.config, self.config.telemetry
        return TelemetryAggregator(
            fleet=cfg.fleet,
            device=cfg.device_id,
            session=self.session,
            model=self._serving.ref,
            agent_version=__version__,
            edges=package.manifest.telemetry_edges,
            now=time.time(),
            window_seconds=t.window_seconds,
            window_frames=t.window_frames,
            stats_every=t.stats_every,
            atc_threshold=_atc_threshold(package),
        )

    # -- lifecycle -----------------------------------------------------------------------------
    def _make_metrics(self) -> AgentMetrics | None:
        m = self.config.metrics
        if m is None:
            return None
        from edge_agent.metrics import AgentMetrics, Gauges

        gauges = Gauges(lambda: len(self.spool), self.spool.size_bytes, lambda: self.link.connected)
        return AgentMetrics(gauges, port=m.port, host=m.host, textfile=m.textfile)

    def stop(self) -> None:
        """Ask the run loop to finish (signal handlers call this)."""
        self._stop.set()

    def run(self) -> int:
        """Start the source, the link and the pipeline; serve until :meth:`stop` or the source ends."""
        cfg, package = self.config, self._serving.package
        log.info(
            "device %s/%s session %d: %s %s via %s (%s)",
            cfg.fleet,
            cfg.device_id,
            self.session,
            package.manifest.name,
            package.manifest.version,
            self.choice.artifact,
            "forced" if self.choice.forced else "fastest measured",
        )
        self.metrics = self._make_metrics()
        self.source.start()
        self.link.start()
        self.pipeline.start()
        if self.updater:
            self.updater.start(self.pipeline)
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _first_inference(self) -> None:
        self.first_inference_s = time.time() - self._started
        log.info("first inference %.3f s after process start", self.first_inference_s)

    def _loop(self) -> None:
        agg = self.aggregator
        pred = self.config.telemetry.publish_predictions
        self.liveness.ready(time.monotonic())
        while not self._stop.is_set():
            try:
                results = self.pipeline.results(timeout=0.2)
            except EndOfStream:
                log.info("source %s ended", redact_credentials(self.config.source.uri))
                break
            for r in results:
                self._consume(r)
                if pred:
                    self._publish_prediction(r)
            self.liveness.tick(len(results), time.monotonic())  # systemd's watchdog: from this loop only
            now = time.time()
            if agg.is_due(now) or self._flush_requested.is_set():
                self._flush_requested.clear()
                self._close_window(now)

    def _consume(self, r: Inferred) -> None:
        """Count one inferred frame in the window of its model: a swapped-in model's frames start a new
        window (the old model's, with its counters and the frames still in flight, is published)."""
        if r.model is not self._serving:
            self._serving = r.model
            m = r.model.package
            self._account()
            edges, atc = m.manifest.telemetry_edges, _atc_threshold(m)
            self._publish_window(self.aggregator.switch_model(r.model.ref, edges, time.time(), atc))
        self._add(r)

    def _add(self, r: Inferred) -> None:
        (features,) = output_features(r.probs)
        self.aggregator.add(FrameResult(output=features, inputs=r.inputs, latency_ms=r.latency_ms))
        if r.image is not None:
            self.sampler.offer(features.confidence, r, time.time())

    def _shutdown(self) -> None:
        """Close the last window, stop threads, deliver the spool (bounded wait), mark offline."""
        self.liveness.stopping()
        if self.updater:
            self.updater.stop()
        self.pipeline.stop()
        try:  # frames already inferred still count
            for r in self.pipeline.results(timeout=0):
                self._consume(r)
        except EndOfStream:
            pass
        self.source.close()  # before the last window, so its counters are final
        self._close_window(time.time(), final=True)  # frames, counters and incidents since the last one
        if not self.link.stop(self.config.spool.flush_timeout_s):
            log.warning("%d message(s) stay in the spool for the next start", len(self.spool))
        self.spool.close()
        if self.metrics is not None:
            self.metrics.close()

    # -- telemetry -----------------------------------------------------------------------------
    def _close_window(self, now: float, final: bool = False) -> None:
        """Publish the window with its counters and incidents, then its samples (``final``: the last)."""
        self._account(final)
        self._publish_window(self.aggregator.close(now))
        self._publish_samples(now)

    def _account(self, final: bool = False) -> None:
        """Add the frame counters and incidents since the last window closed to the window (the frames
        still in flight follow from them). ``final``: the pipeline and the source are stopped, so frames
        still in flight will never be inferred: they are dropped."""
        # Failures first, the source's counters last: every frame counted downstream was captured by
        # then, so the frames in flight are never negative.
        failed, reasons = self.pipeline.take_failures()
        stats = self.source.stats()
        d = stats.minus(self._last_source)
        self._last_source = stats
        agg = self.aggregator
        agg.add_counts(captured=d.captured, dropped=d.dropped, failed=d.corrupt + failed)
        in_flight = agg.in_flight
        if in_flight < 0:  # a counting bug: report it (the window carries 0, never a negative count)
            log.error("frame counters: %d more frames settled than captured", -in_flight)
        elif final and in_flight:
            log.info("%d frame(s) captured but not inferred when the agent stopped: dropped", in_flight)
            agg.add_counts(dropped=in_flight)
        agg.add_events(
            {
                "source_reconnects": d.reconnects,
                "source_open_failures": d.open_failures,
                "corrupt_frames": d.corrupt,
                "spool_evicted": self.spool.take_evictions(),
            }
            | reasons
            | self.events.take()
        )

    def _publish_window(self, window: TelemetryWindow) -> None:
        self.link.publish_spooled(
            tele_topic(window.fleet, window.device),
            window.to_bytes(),
            carries=window.events.get("spool_evicted", 0),  # evicted in turn, it is reported again
        )
        self.windows_published += 1
        if self.updater:
            self.updater.on_window(window)  # the health window of a model on trial
        if self.observer:
            self.observer.window(window, self._serving.package.manifest.labels)
        if self.metrics is not None:
            self.metrics.window(window)

    def _publish_samples(self, now: float) -> None:
        """The window's chosen frames, privacy-filtered on the device, to the ``sample`` topic (QoS 1)."""
        chosen = self.sampler.choose(now)
        if not chosen:
            return
        cfg, s = self.config, self.config.sampling
        for c in chosen:
            r = c.item
            assert r.image is not None and s.consent
            img = privacy_filter(r.image, max_side=s.max_side, quality=s.jpeg_quality)
            msg = Sample(
                fleet=cfg.fleet,
                device=cfg.device_id,
                session=self.session,
                frame=r.index,
                ts=r.ts,
                model=r.model.ref,
                reason=c.reason,  # type: ignore[arg-type]
                inclusion=c.inclusion,
                top=top_k(r.probs, cfg.telemetry.top_k),
                consent=s.consent,
                faces_blurred=img.faces,
                width=img.width,
                height=img.height,
                sha256=img.sha256,
                jpeg_b64=base64.b64encode(img.jpeg).decode(),
            )
            self.link.publish_spooled(sample_topic(cfg.fleet, cfg.device_id), msg.to_bytes())
        self.events.add("samples_sent", len(chosen))

    def _publish_prediction(self, r: Inferred) -> None:
        cfg = self.config
        top = top_k(r.probs, cfg.telemetry.top_k)
        labels = r.model.package.manifest.labels
        msg = Prediction(
            device=cfg.device_id,
            session=self.session,
            frame=r.index,
            ts=r.ts,
            top=top,
            labels=[labels[c] for c, _ in top],
            model_version=r.model.package.manifest.version,
        )
        self.link.publish_now(pred_topic(cfg.fleet, cfg.device_id), msg.to_bytes())
        if self.observer:
            self.observer.prediction(msg)

    # -- over-the-air updates (edge_agent/updater, docs/updates.md) ------------------------------
    def _hint_topics(self) -> list[str]:
        """Release-hint topics of the channels this device follows (both under ``auto``)."""
        from edge_agent.updater.cohort import followed_channels

        u = self.config.update
        return [release_topic(self.config.fleet, ch) for ch in followed_channels(u.channel)] if u else []

    def _boot(self, update: UpdateSettings) -> tuple[UpdateStore, Boot]:
        """Pick and verify the model to start with: committed slot, else previous, else factory."""
        from edge_agent.updater.boot import select_boot
        from edge_agent.updater.store import UpdateStore

        store = UpdateStore(self.config.state_dir / "update")
        return store, select_boot(store, self.config.model.package, max_attempts=update.max_trial_attempts)

    def _make_updater(self, update: UpdateSettings, store: UpdateStore, boot: Boot) -> Updater:
        from edge_agent.updater.updater import Identity, Updater

        cfg = self.config
        ident = Identity(cfg.fleet, cfg.device_id, self.session, cfg.model.artifact, cfg.model.backend)
        return Updater(
            update,
            ident,
            store,
            boot,
            publish=self._publish_update,
            agent_state=self.state,
            events=self.events,
        )

    def _publish_update(self, event: UpdateEvent) -> None:
        self.link.publish_spooled(update_topic(event.fleet, event.device), event.to_bytes())
        if self.observer:
            self.observer.update(event)

    # -- status and commands ---------------------------------------------------------------------
    def _status(self, state: str, connection: int) -> Status:
        """This device's status on link connection ``connection`` (birth, last will, clean shutdown)."""
        cfg = self.config
        model = self._serving.ref
        return Status(
            fleet=cfg.fleet,
            device=cfg.device_id,
            state=state,  # type: ignore[arg-type]
            session=self.session,
            ts=time.time(),
            connection=connection,
            agent_version=__version__,
            model=model,
            backend=self.choice,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Commands: ``flush`` closes the telemetry window now; ``sample`` (args.minutes) samples
        frames uniformly while the trainer sees drift. Anything malformed raises (counted)."""
        if self.updater is not None and topic in self.updater.hint_topics:
            self.updater.on_hint(topic, payload)
            return
        try:
            cmd = parse_message(topic, payload, Command)
        except MessageError:
            raise
        assert isinstance(cmd, Command)
        if cmd.name != topic.rsplit("/", 1)[-1]:
            raise MessageError(f"{topic}: command name {cmd.name!r} does not match the topic")
        if cmd.name == "flush":
            self._flush_requested.set()
        elif cmd.name == "sample":  # the trainer saw drift here: sample uniformly for a while
            minutes = cmd.args.get("minutes", 30)
            if (
                not isinstance(minutes, (int, float))
                or isinstance(minutes, bool)
                or not 0 < minutes <= 24 * 60
            ):
                raise MessageError(f"{topic}: args.minutes must be a number of minutes in (0, 1440]")
            self.sampler.drift_until = time.time() + float(minutes) * 60
        else:
            raise MessageError(f"{topic}: unknown command {cmd.name!r}")


def _atc_threshold(package: ModelPackage) -> float | None:
    ref = package.manifest.reference
    return ref.atc_threshold if ref is not None else None


def _default_state_dir(fleet: str, device: str) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "edgefleet" / fleet / device


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """A config from a file (``--config``), with flags overriding it; or from flags alone."""
    if args.config:
        cfg = load_config(args.config)
        data = cfg.model_dump()
        origin = f"{args.config} (with command-line overrides)"
    else:
        missing = [f for f in ("package", "source", "device_id") if not getattr(args, f)]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ConfigError(f"without --config the agent needs {flags}")
        data = {
            "device_id": args.device_id,
            "source": {"uri": args.source},
            "model": {"package": args.package},
        }
        origin = "command line"
    if args.device_id:
        data["device_id"] = args.device_id
    if args.fleet:
        data["fleet"] = args.fleet
    if args.package:
        data.setdefault("model", {})["package"] = args.package
    if args.source:
        data.setdefault("source", {})["uri"] = args.source
    if args.broker:
        data.setdefault("mqtt", {})["url"] = args.broker
    if args.artifact:
        data["model"]["artifact"] = args.artifact
    tel = data.setdefault("telemetry", {})
    if args.window_seconds:
        tel["window_seconds"] = args.window_seconds
    if args.window_frames:
        tel["window_frames"] = args.window_frames
        if not args.window_seconds and not args.config:
            tel["window_seconds"] = None
    if args.publish_predictions:
        tel["publish_predictions"] = True
    if args.state_dir:
        data["state_dir"] = args.state_dir
    elif not args.config:
        data["state_dir"] = str(_default_state_dir(data.get("fleet", "default"), data["device_id"]))
    return validate_config(data, origin)


def run_agent_from_args(args: argparse.Namespace, observer: AgentObserver | None = None) -> int:
    cfg = config_from_args(args)
    logging.getLogger().setLevel(cfg.log_level if not args.verbose else "DEBUG")
    agent = Agent(cfg, observer=observer, notifier=Notifier())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run()
