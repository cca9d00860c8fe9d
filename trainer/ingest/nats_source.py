"""Ingest's source on the NATS broker tier (deploy/nats): a durable JetStream pull consumer.

Devices publish over MQTT to any node of the cluster. For a QoS 1 PUBLISH, nats-server 2.9 stores the
message in the JetStream stream ``$MQTT_msgs`` (subject ``$MQTT.msgs.<topic as subject>``, replicated
on ``mqtt.stream_replicas`` nodes) and only then sends the PUBACK (server/mqtt.go, ``mqttProcessPub``);
a store that fails (no stream leader during a node's crash) closes the device's connection without a
PUBACK, and the device sends the message again. So every window a device saw acknowledged is in that
stream. A stream of our own capturing ``ef.v1.*.dev.*.*`` is not: the server forwards to it without
waiting, and when its leader node was killed it missed 516 of 1,900 acknowledged messages (tried on
nats-server 2.9.10; docs/scale-out.md).

``$MQTT_msgs`` keeps a message while a consumer has not acknowledged it (interest retention), so the
durable consumer ``ingest`` (filter ``$MQTT.msgs.ef.v1.{fleet}.dev.*.*``, explicit acks, replicated
like the stream) must exist before devices publish: :func:`ensure_ingest_consumer` creates it (the
trainer service does at startup, each worker again when it binds), and a message stored while no
consumer existed is not kept. Workers of any number, threads or processes, pull from the same consumer:
JetStream hands each message to one of them, and redelivers what is not acknowledged within
``ack_wait_s`` (a worker killed mid-batch) to another. Acknowledgements are sent only after the batch
is committed (:class:`~trainer.ingest.batching.BatchWriter`); a redelivered copy is a duplicate the
store counts and drops.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSettings
from edge_agent.config_files import StrictModel
from edge_agent.protocol import TOPIC_ROOT
from trainer.ingest.batching import Inbound

if TYPE_CHECKING:
    from trainer.ingest.batching import BatchWriter

log = logging.getLogger(__name__)

STREAM = "$MQTT_msgs"
"""Where nats-server stores QoS 1 MQTT messages before acknowledging them (server/README-MQTT.md)."""
SUBJECT_PREFIX = "$MQTT.msgs."


class NatsSettings(StrictModel):
    """The NATS broker tier in trainer.yaml (``nats:``): its nodes and the ingest consumer."""

    servers: list[str] = Field(min_length=1)
    """Every node's NATS client listener, e.g. ``tls://nats-1.example.net:4222``."""
    ca: Path | None = None
    """TLS files of the trainer's identity; unset, the ``mqtt:`` section's (the same certificate)."""
    cert: Path | None = None
    key: Path | None = None
    consumer: str = Field(default="ingest", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """The durable consumer's name (deploy/nats/authorization.conf allows the trainer ``ingest``)."""
    ack_wait_s: float = Field(default=30.0, gt=0)
    """How long a delivered, unacknowledged message waits before JetStream delivers it again."""
    max_ack_pending: int = Field(default=20_000, ge=1)
    """Messages delivered and not yet acknowledged, over all workers."""

    @field_validator("servers")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("nats://", "tls://")) or url[-3:] == "://":
                raise ValueError(f"must look like tls://host:port or nats://host:port (got {url!r})")
        return v


def consumer_filter(fleet: str) -> str:
    """The consumer's filter: every device topic ``ef/v1/{fleet}/dev/{device}/{kind}`` stored at QoS 1."""
    return f"{SUBJECT_PREFIX}{TOPIC_ROOT.replace('/', '.')}.{fleet}.dev.*.*"


def subject_topic(subject: str) -> str:
    """The MQTT topic of a ``$MQTT.msgs.`` subject (nats-server's natsSubjectToMQTTTopic: ``.`` is a
    level; ``./`` and ``/.`` stand for the empty levels of ``a//b`` and ``/a``)."""
    s = subject[len(SUBJECT_PREFIX) :] if subject.startswith(SUBJECT_PREFIX) else subject
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "/":
            if not (i == 0 and i + 1 < len(s) and s[i + 1] == "."):
                out.append("/")
        elif ch == ".":
            out.append("/")
            if i + 1 < len(s) and s[i + 1] == "/":
                i += 1
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def tls_context(settings: NatsSettings, mqtt: MqttSettings) -> ssl.SSLContext | None:
    """Mutual TLS with the trainer's certificate (``nats:`` files, else ``mqtt:``'s); None without a CA."""
    ca, cert, key = settings.ca or mqtt.ca, settings.cert or mqtt.cert, settings.key or mqtt.key
    if ca is None and not any(u.startswith("tls://") for u in settings.servers):
        return None
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _connect(settings: NatsSettings, mqtt: MqttSettings, name: str, **callbacks: Any) -> Any:
    import nats

    return await nats.connect(
        settings.servers,
        tls=tls_context(settings, mqtt),
        name=name,
        connect_timeout=5,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        **callbacks,
    )


async def ensure_consumer(js: Any, settings: NatsSettings, fleet: str) -> Any:
    """Create the durable ``ingest`` consumer on ``$MQTT_msgs`` if missing; return its info. An existing
    one with another filter is an error naming both (it would ingest another fleet, or nothing)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    want = consumer_filter(fleet)
    try:
        info = await js.consumer_info(STREAM, settings.consumer)
    except NotFoundError:
        config = ConsumerConfig(
            durable_name=settings.consumer,
            filter_subject=want,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=settings.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=settings.max_ack_pending,
        )
        return await js.add_consumer(STREAM, config)
    if info.config.filter_subject != want:
        raise ValueError(
            f"JetStream consumer {settings.consumer!r} on {STREAM} filters {info.config.filter_subject!r}, "
            f"not {want!r} (fleet {fleet}): give this fleet's ingest another consumer name"
        )
    return info


def ensure_ingest_consumer(
    settings: NatsSettings, mqtt: MqttSettings, fleet: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Connect, wait for ``$MQTT_msgs`` (the server creates it when the first MQTT client connects),
    create the ingest consumer if missing; its name, filter and replicas. Errors name what is wrong."""

    async def run() -> dict[str, Any]:
        nc = await _connect(settings, mqtt, "edgefleet-ensure-consumer")
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    info = await ensure_consumer(js, settings, fleet)
                    break
                except ValueError:
                    raise
                except Exception as exc:  # noqa: BLE001 - no stream yet, no leader yet: retry, then say so
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"cannot create the ingest consumer on {STREAM} at {settings.servers[0]} within "
                            f"{timeout:g} s: {type(exc).__name__}: {exc} ({STREAM} appears when the first "
                            "MQTT client connects; is JetStream up on a majority of the nodes?)"
                        ) from exc
                    await asyncio.sleep(0.5)
            replicas = getattr(info.cluster, "replicas", None) or []
            return {
                "consumer": info.name,
                "filter": info.config.filter_subject,
                "replicas": 1 + len(replicas),
            }
        finally:
            await nc.close()

    return asyncio.run(run())


class NatsSource:
    """Pulls batches from the ingest consumer on an asyncio thread of its own, hands each message to the
    writer, and acknowledges what the writer committed."""

    def __init__(
        self,
        settings: NatsSettings,
        mqtt: MqttSettings,
        fleet: str,
        client_id: str,
        kinds: Sequence[str],
        writer: BatchWriter,
    ) -> None:
        self.settings, self.mqtt, self.fleet, self.client_id = settings, mqtt, fleet, client_id
        self.kinds = frozenset(kinds)
        self.writer = writer
        self.connects = self.disconnects = 0
        self.failed: BaseException | None = None
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._nc: Any = None

    def describe(self) -> str:
        """Where the messages come from, for the log."""
        return f"{','.join(self.settings.servers)} (consumer {self.settings.consumer} on {STREAM})"

    def counters(self) -> dict[str, int]:
        return {"connects": self.connects, "disconnects": self.disconnects}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"ingest-nats-{self.client_id}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # a bug: the worker reports failed, its supervisor restarts it
            log.exception("ingest %s: NATS source stopped", self.client_id)
            self.failed = exc

    async def _main(self) -> None:
        self._done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._closed.is_set():  # close() came before the loop existed
            self._done.set()
        sub = await self._bind()
        if sub is not None:
            self._connected.set()
            await self._pull(sub)
        await self._done.wait()  # the writer acknowledges its last batches through this loop
        if self._nc is not None:
            await self._nc.close()

    async def _bind(self) -> Any:
        """Connect and bind to the consumer (creating it if missing), retrying until it works or stops."""
        backoff = Backoff(0.5, 5.0)
        closing = self.writer.closing
        while not closing.is_set():
            try:
                if self._nc is None:
                    self._nc = await _connect(
                        self.settings,
                        self.mqtt,
                        self.client_id,
                        disconnected_cb=self._disconnected,
                        reconnected_cb=self._reconnected,
                        error_cb=self._error,
                    )
                    self.connects += 1
                js = self._nc.jetstream()
                await ensure_consumer(js, self.settings, self.fleet)
                return await js.pull_subscribe_bind(durable=self.settings.consumer, stream=STREAM)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - cluster not up, no consumer leader yet: retry
                delay = backoff.next()
                log.warning(
                    "ingest %s: NATS not ready (%s: %s); retrying in %.1f s",
                    self.client_id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        return None

    async def _pull(self, sub: Any) -> None:
        """Fetch what the buffer has room for, until the worker stops."""
        from nats.errors import TimeoutError as NatsTimeout

        w = self.writer
        while not w.closing.is_set():
            room = min(w.limits.batch_max, w.buffer.limit - len(w.buffer))
            if room <= 0:
                await asyncio.sleep(0.05)
                continue
            try:
                msgs = await sub.fetch(room, timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - reconnecting, leader moving: fetch again shortly
                log.info("ingest %s: fetch failed (%s: %s)", self.client_id, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                continue
            for m in msgs:
                if not await self._hand_over(m):
                    return

    async def _hand_over(self, m: Any) -> bool:
        """One fetched message to the writer (a kind this worker does not ingest is acknowledged); False
        once the worker stops (what was fetched and not handed over is delivered again later)."""
        if self.writer.closing.is_set():
            return False
        topic = subject_topic(m.subject)
        if topic.rsplit("/", 1)[-1] not in self.kinds:
            await m.ack()
            return True
        dup = m.metadata.num_delivered > 1
        return self.writer.receive(Inbound(topic, bytes(m.data), time.time(), m, 0, dup))

    def ack(self, batch: Sequence[Inbound]) -> tuple[int, int]:
        """Acknowledge committed messages (any connection may: JetStream acks are not per connection);
        (acked, not acked). Those not acked are delivered again after ``ack_wait_s``: duplicates."""
        msgs = [m.ref for m in batch if m.ref is not None]
        if not msgs or self._loop is None:
            return 0, len(msgs)
        future = asyncio.run_coroutine_threadsafe(self._ack_all(msgs), self._loop)
        try:
            future.result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - the copies come back as duplicates
            log.warning("ingest %s: acknowledging %d messages failed: %s", self.client_id, len(msgs), exc)
            return 0, len(msgs)
        return len(msgs), 0

    async def _ack_all(self, msgs: list[Any]) -> None:
        for m in msgs:
            await m.ack()

    def close(self) -> None:
        """Stop the loop (after the writer's last acknowledgements) and close the connection."""
        self._closed.set()
        loop, done = self._loop, self._done
        if loop is not None and done is not None:
            loop.call_soon_threadsafe(done.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _disconnected(self) -> None:
        self.disconnects += 1
        if not self.writer.closing.is_set():
            log.warning("ingest %s: disconnected from NATS; reconnecting", self.client_id)

    async def _reconnected(self) -> None:
        self.connects += 1
        log.info("ingest %s: reconnected to %s", self.client_id, self._nc.connected_url if self._nc else "?")

    async def _error(self, exc: Exception) -> None:
        log.info("ingest %s: NATS: %s: %s", self.client_id, type(exc).__name__, exc)
