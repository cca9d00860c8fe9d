"""Ingest worker: device messages in, validated rows out, acknowledged only once committed.

Workflow of one :class:`IngestWorker`::

    mqtt = MqttSettings(url="mqtt://127.0.0.1:1883", username="ingest", password="...")
    worker = IngestWorker(IngestConfig(mqtt=mqtt, db_url="sqlite:///fleet.db", fleet="shop")).start()
    ...                       # several workers (processes, hosts) with the same group share the load
    print(worker.stats())     # received, stored, duplicates, dead_lettered, db_errors, ...
    worker.stop()

* It subscribes to ``$share/{group}/ef/v1/{fleet}/dev/+/{kind}`` for each kind it handles (QoS 1), so
  the broker hands every message to one worker of the group.
* Persistent session (``clean_session=False``) under a stable client id
  (``{client_prefix}-{group}-{fleet}-{index}``, e.g. ``trainer-ingest-shop-0``)
  and MANUAL acknowledgements: a message is acknowledged (PUBACK) only after the transaction that
  stores it has committed. A crashed worker, or one whose database is down, loses nothing: the broker
  keeps the unacknowledged messages in the worker's session and sends them again when it reconnects;
  the stored copy, if any, dedupes them. With mosquitto, a stopped worker's share of new messages
  also waits in its session (mosquitto keeps routing to disconnected persistent members), so a dead
  worker must be restarted under the same index, as a supervisor (systemd, the CLI) does.
* A worker is a source and a writer. The source is :class:`MqttSource` (this module: the shared
  subscription above) or, with ``IngestConfig.nats`` set, :class:`~trainer.ingest.nats_source.NatsSource`
  (the JetStream pull consumer of the NATS broker tier, deploy/nats). The writer
  (:class:`~trainer.ingest.batching.BatchWriter`) is the same for both: a bounded buffer and one thread
  that validates batches (:mod:`trainer.ingest.routing`), writes each in one transaction, then has the
  source acknowledge it; invalid messages are dead-lettered and acknowledged too; a database outage is
  retried with backoff while new messages wait unacknowledged (the broker's in-flight window per client,
  mosquitto ``max_inflight_messages``, bounds how many arrive meanwhile; ``limits.max_buffered`` is a hard
  cap).
* An acknowledgement is only sent on the connection the message arrived on (MQTT message ids are per
  connection); after a reconnect the broker redelivers, and the copy is counted as a duplicate.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.config import MqttSettings
from edge_agent.mqtt_client import new_client
from trainer.ingest.batching import BatchWriter, Inbound, WriterLimits
from trainer.ingest.nats_source import NatsSettings, NatsSource
from trainer.ingest.routing import KINDS, Kind, subscription
from trainer.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """Every setting and limit of one ingest worker."""

    mqtt: MqttSettings
    """Broker URL, credentials and TLS: the trainer service passes its own (its ``client_id`` is only the
    start of each worker's id, ``{client_prefix}-{group}-{fleet}-{index}``)."""
    db_url: str
    fleet: str
    group: str = "ingest"
    """Shared-subscription group; workers with the same group share the messages."""
    shared: bool = True
    """False for brokers without shared subscriptions (amqtt): a plain subscription, one worker."""
    index: int = 0
    """Worker number within the group; part of the stable client id."""
    client_prefix: str | None = None
    """Start of the default client id: the service identity the worker connects as (its certificate's
    name) or a client id of that identity; None takes ``mqtt.client_id`` (the trainer service's own),
    else ``trainer``. deploy/mosquitto's guard accepts a service's client id only as ``NAME`` or
    ``NAME-...``, so no other identity can take the worker's session over."""
    client_id: str | None = None
    """Overrides ``{client_prefix}-{group}-{fleet}-{index}``. Must be stable across restarts (persistent
    session)."""
    kinds: tuple[str, ...] = ("tele", "status", "sample", "update")
    limits: WriterLimits = field(default_factory=WriterLimits)
    """Batching, buffering and database retries of the writer (one source of their defaults)."""
    keepalive_s: int = 30
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    nats: NatsSettings | None = None
    """The NATS broker tier (deploy/nats): read the JetStream consumer instead of the MQTT shared
    subscription; TLS files not given there are ``mqtt``'s (the same service identity)."""

    @property
    def effective_client_id(self) -> str:
        """The worker's stable client id: ``client_id``, else one derived from its identity and place."""
        prefix = self.client_prefix or self.mqtt.client_id or "trainer"
        return self.client_id or f"{prefix}-{self.group}-{self.fleet}-{self.index}"


_PUBACK = struct.Struct("!BBH")


def send_pubacks(client: mqtt.Client, mids: Sequence[int]) -> None:
    """Acknowledge QoS 1 messages with one socket write for the whole batch.

    ``client.ack`` queues one packet, wakes the network thread and costs one ``send`` per message
    (about a third of the network thread's time in bench/ingest_bench.py). The PUBACKs of a batch are
    concatenated into one queued buffer instead, in order; MQTT allows any number of packets per
    write. Relies on paho 2.x's ``_packet_queue``; falls back to ``client.ack`` without it.
    """
    if not mids:
        return
    queue = getattr(client, "_packet_queue", None)
    if queue is None:  # pragma: no cover - another paho major version
        for mid in mids:
            client.ack(mid, 1)
        return
    queue(mqtt.PUBACK, b"".join(_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids), 0, 1)


class MqttSource:
    """The MQTT side of a worker: a paho client on the shared subscription (persistent session, manual
    acknowledgements), handing each message to ``sink`` and acknowledging committed batches."""

    def __init__(
        self, config: IngestConfig, client_id: str, sink: Callable[[Inbound], bool], closing: threading.Event
    ) -> None:
        self.config, self.client_id, self._sink, self._closing = config, client_id, sink, closing
        self._lock = threading.Lock()
        self._gen = 0
        self.connects = self.disconnects = 0
        self._connected = threading.Event()
        c = config
        client = new_client(c.mqtt, client_id, clean_session=False, manual_ack=True)
        client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def describe(self) -> str:
        """Where the messages come from, for the log."""
        c = self.config
        subs = ", ".join(subscription(c.group, c.fleet, k, c.shared) for k in c.kinds)
        return f"{c.mqtt.url} ({subs})"

    def start(self) -> None:
        """Connect in the background (paho retries) and run the network thread."""
        self.client.connect_async(
            self.config.mqtt.host, self.config.mqtt.port, keepalive=self.config.keepalive_s
        )
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def counters(self) -> dict[str, int]:
        """The connection counters the worker's stats report."""
        return {"connects": self.connects, "disconnects": self.disconnects}

    def close(self) -> None:
        """Disconnect (the persistent session keeps the subscription and what is unacknowledged)."""
        self.client.disconnect()
        self.client.loop_stop()

    def ack(self, batch: Sequence[Inbound]) -> tuple[int, int]:
        """PUBACK the committed QoS 1 messages that arrived on the current connection; (acked, stale)."""
        with self._lock:  # on_disconnect takes this lock too, so the generation cannot change under us
            gen = self._gen
            mids = [m.ref for m in batch if m.ref is not None and m.gen == gen]
            send_pubacks(self.client, mids)
            return len(mids), sum(1 for m in batch if m.ref is not None and m.gen != gen)

    def _on_connect(self, client: mqtt.Client, _u: object, flags: Any, reason_code: Any, _p: Any) -> None:
        if reason_code.is_failure:
            log.warning(
                "ingest %s: connection refused: %s (behind deploy/mosquitto's guard a client id must be the "
                "certificate's name or start with it and '-')",
                self.client_id,
                reason_code,
            )
            return
        with self._lock:
            self._gen += 1
            self.connects += 1
        # Subscribing again is harmless in a kept session and required when the broker lost it.
        client.subscribe(
            [
                (subscription(self.config.group, self.config.fleet, k, self.config.shared), 1)
                for k in self.config.kinds
            ]
        )
        log.info("ingest %s: connected (session present: %s)", self.client_id, flags.session_present)

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, reason_codes: Any, _p: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("ingest %s: subscription refused: %s", self.client_id, reason_codes)
            return
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: Any, reason_code: Any, _p: Any) -> None:
        with self._lock:
            self._gen += 1  # message ids of the old connection must never be acknowledged on a new one
            self.disconnects += 1
        self._connected.clear()
        if not self._closing.is_set():
            log.warning("ingest %s: disconnected (%s); reconnecting", self.client_id, reason_code)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if self._closing.is_set():
            return  # not acknowledged: redelivered to this session on the next start
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers should refuse these; dead-letter it rather than crash the loop
            topic = bytes(getattr(msg, "_topic", b"")).decode("utf-8", "replace")
        ref = msg.mid if msg.qos == 1 else None
        self._sink(Inbound(topic, bytes(msg.payload), time.time(), ref, self._gen, msg.dup))


class IngestWorker:
    """One ingest worker: a source (MQTT shared subscription or JetStream consumer) and a batching writer."""

    def __init__(self, config: IngestConfig, store: Store | None = None) -> None:
        unknown = [k for k in config.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"no handler registered for kinds {unknown}; known: {sorted(KINDS)}")
        self.config = config
        self.kinds: dict[str, Kind] = {k: KINDS[k] for k in config.kinds}
        self.store = store or Store(config.db_url)
        self._own_store = store is None
        self.client_id = config.effective_client_id
        self.source: MqttSource | NatsSource
        self.writer = BatchWriter(
            self.store, self.kinds, name=self.client_id, limits=config.limits, ack=self._ack
        )
        if config.nats is not None:
            self.source = NatsSource(
                config.nats, config.mqtt, config.fleet, self.client_id, config.kinds, self.writer
            )
        else:
            self.source = MqttSource(config, self.client_id, self.writer.receive, self.writer.closing)
        self.actor = self.writer.actor

    def _ack(self, batch: Sequence[Inbound]) -> tuple[int, int]:
        return self.source.ack(batch)

    @property
    def client(self) -> mqtt.Client | None:
        """The paho client of an MQTT source (None on the NATS tier)."""
        return self.source.client if isinstance(self.source, MqttSource) else None

    @property
    def _writer(self) -> threading.Thread | None:
        return self.writer.thread

    @property
    def failed(self) -> BaseException | None:
        """Set when the writer stopped on an unexpected error (a bug); the process should restart."""
        return self.writer.failed or getattr(self.source, "failed", None)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> IngestWorker:
        """Connect (retrying in the background) and start the writer thread."""
        self.writer.start()
        self.source.start()
        log.info("ingest %s: %s -> %s", self.client_id, self.source.describe(), self.store.dialect)
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Whether the worker is connected and subscribed (or bound to its consumer) within ``timeout`` s."""
        return self.source.wait_connected(timeout)

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop reading, commit and acknowledge what is buffered (up to ``timeout``), disconnect.

        Whatever could not be committed in time (database down) stays unacknowledged in the broker
        (the MQTT session, the JetStream consumer) and is delivered again. The subscription is kept.
        """
        self.writer.stop(timeout)
        self.source.close()
        if self._own_store:
            self.store.close()
        return self.stats()

    def __enter__(self) -> IngestWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters."""
        return self.writer.snapshot(**self.source.counters())
