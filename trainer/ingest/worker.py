"""Ingest worker: MQTT shared subscription in, validated rows out, acknowledged only once committed.

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
* One network thread (paho) appends messages to a bounded buffer; one writer thread takes batches
  (every waiting message, up to ``batch_max``; see ``batch_linger_s``),
  validates them (:mod:`trainer.ingest.routing`), writes them in one transaction, then acknowledges them.
  Invalid messages go to the dead-letter table and are acknowledged too: they can never become valid.
* Database outage: the batch is retried with jittered exponential backoff while new messages wait
  unacknowledged in the buffer; the broker's in-flight window per client (mosquitto
  ``max_inflight_messages``) bounds how many arrive meanwhile, ``max_buffered`` is a hard cap (the
  network thread stops reading when it is reached). When the database is back, everything is committed
  and acknowledged in order.
* A batch the database refuses for a reason other than an outage (a value it cannot store) is split:
  each message is written alone, and the ones still refused are dead-lettered as ``db_rejected``.
* An acknowledgement is only sent on the connection the message arrived on (MQTT message ids are per
  connection); after a reconnect the broker redelivers, and the copy is counted as a duplicate.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy import Connection

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSettings
from edge_agent.mqtt_client import new_client
from trainer.ingest.routing import KINDS, Accepted, Kind, classify, subscription
from trainer.store import ModelCheck, Rejected, Store, WriteResult, is_transient
from trainer.store.ingest_writes import (
    Received,
    foreign_fleet_alert,
    write_dead_letters,
)

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
    batch_max: int = 200
    batch_linger_s: float = 0.0
    """How long a batch waits for more messages once none is waiting. 0 (group commit) commits what
    is there as soon as the previous commit is done: under load batches grow by themselves, and no
    time is spent waiting for messages the broker holds back until the current ones are acknowledged
    (its in-flight window)."""
    max_buffered: int = 10_000
    retry_min_s: float = 0.1
    retry_max_s: float = 5.0
    keepalive_s: int = 30
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0

    @property
    def effective_client_id(self) -> str:
        """The worker's stable client id: ``client_id``, else one derived from its identity and place."""
        prefix = self.client_prefix or self.mqtt.client_id or "trainer"
        return self.client_id or f"{prefix}-{self.group}-{self.fleet}-{self.index}"


@dataclass(slots=True)
class _Inbound:
    mid: int
    qos: int
    topic: str
    payload: bytes
    dup: bool
    gen: int
    received_at: float


class _Abandoned(Exception):
    """The worker is stopping while the database is unreachable; the batch stays unacknowledged."""


class _Buffer:
    """Bounded FIFO between the network thread (one producer) and the writer thread (one consumer).

    Appending is a plain deque append plus an event set only when the writer may be waiting: the
    network thread pays almost nothing per message.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._q: deque[_Inbound] = deque()
        self._ready = threading.Event()
        self._room = threading.Condition()
        self.high_water = 0

    def put(self, item: _Inbound, closed: threading.Event) -> bool:
        """Append, waiting while full (this stalls the network thread, so the broker holds the rest)."""
        q = self._q
        if len(q) >= self.limit:
            with self._room:
                while len(q) >= self.limit:
                    if closed.is_set():
                        return False
                    self._room.wait(0.1)
        q.append(item)
        if len(q) > self.high_water:
            self.high_water = len(q)
        if not self._ready.is_set():
            self._ready.set()
        return True

    def take(self, most: int, linger_s: float, idle_s: float) -> list[_Inbound]:
        """Up to ``most`` items: waits up to ``idle_s`` for the first, then up to ``linger_s`` for more."""
        q = self._q
        if not self._wait(idle_s):
            return []
        deadline = time.monotonic() + linger_s
        out: list[_Inbound] = []
        while True:
            while q and len(out) < most:
                out.append(q.popleft())
            left = deadline - time.monotonic()
            if len(out) >= most or left <= 0 or not self._wait(left):
                break
        with self._room:
            self._room.notify_all()
        return out

    def _wait(self, timeout: float) -> bool:
        if self._q:
            return True
        self._ready.clear()
        return bool(self._q) or (self._ready.wait(timeout) and bool(self._q))

    def __len__(self) -> int:
        return len(self._q)


class _NetCounters:
    """Counters written only by the network thread (read without locking for reports)."""

    __slots__ = ("first_cpu_s", "first_received_at", "received", "redelivered")

    def __init__(self) -> None:
        self.received = 0
        self.redelivered = 0
        self.first_received_at: float | None = None
        self.first_cpu_s: float | None = None


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


@dataclass
class IngestStats:
    """Counters of one worker (a snapshot is returned by :meth:`IngestWorker.stats`)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    dead_letters_dropped: int = 0
    """Dead letters only counted (over the caps), included in ``dead_lettered``."""
    by_kind: Counter[str] = field(default_factory=Counter)
    unknown_model: int = 0
    alerts: int = 0
    db_errors: int = 0
    batches: int = 0
    acked: int = 0
    stale_acks: int = 0
    """Messages stored after their connection was gone: not acknowledged, the broker redelivers them."""
    redelivered: int = 0
    """Messages that arrived with the DUP flag (a redelivery after a reconnect)."""
    connects: int = 0
    disconnects: int = 0
    buffered: int = 0
    buffer_high_water: int = 0
    first_received_at: float | None = None
    last_committed_at: float | None = None
    process_cpu_s_at_first_message: float | None = None
    """CPU time of the whole process when the first message arrived (to measure CPU per message)."""

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["dead_letter_reasons"] = dict(self.dead_letter_reasons)
        d["by_kind"] = dict(self.by_kind)
        return d


class IngestWorker:
    """One ingest worker: a paho client on the shared subscription and a batching writer thread."""

    def __init__(self, config: IngestConfig, store: Store | None = None) -> None:
        unknown = [k for k in config.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"no handler registered for kinds {unknown}; known: {sorted(KINDS)}")
        self.config = config
        self.kinds: dict[str, Kind] = {k: KINDS[k] for k in config.kinds}
        self.store = store or Store(config.db_url)
        self._own_store = store is None
        self.client_id = config.effective_client_id
        self.actor = f"ingest:{self.client_id}"
        self._check = ModelCheck()
        self._buffer = _Buffer(config.max_buffered)
        self._stats = IngestStats()
        self._net = _NetCounters()
        self.failed: BaseException | None = None
        """Set when the writer stopped on an unexpected error (a bug); the process should restart."""
        self._lock = threading.Lock()
        self._gen = 0
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._connected = threading.Event()
        self._writer: threading.Thread | None = None
        self._backoff = Backoff(config.retry_min_s, config.retry_max_s)
        self.client = self._make_client()

    # -- lifecycle -------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        c = self.config
        client = new_client(c.mqtt, self.client_id, clean_session=False, manual_ack=True)
        client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._host, self._port = c.mqtt.host, c.mqtt.port
        return client

    def start(self) -> IngestWorker:
        """Connect (retrying in the background) and start the writer thread."""
        self._writer = threading.Thread(
            target=self._write_loop, name=f"ingest-writer-{self.client_id}", daemon=True
        )
        self._writer.start()
        self.client.connect_async(self._host, self._port, keepalive=self.config.keepalive_s)
        self.client.loop_start()
        log.info(
            "ingest %s: %s -> %s (%s)",
            self.client_id,
            self.config.mqtt.url,
            self.store.dialect,
            ", ".join(
                subscription(self.config.group, self.config.fleet, k, self.config.shared) for k in self.kinds
            ),
        )
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Whether the worker is connected and its subscriptions acknowledged within ``timeout`` s."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop reading, commit and acknowledge what is buffered (up to ``timeout``), disconnect.

        Whatever could not be committed in time (database down) stays unacknowledged in the broker
        session and is redelivered on the next start. The subscription is kept (persistent session).
        """
        self._closing.set()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                self._abandon.set()
                self._writer.join(self.config.retry_max_s + 5)
        self.client.disconnect()
        self.client.loop_stop()
        if self._own_store:
            self.store.close()
        return self.stats()

    def __enter__(self) -> IngestWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters."""
        with self._lock:
            s = self._stats
            s.buffered = len(self._buffer)
            s.buffer_high_water = self._buffer.high_water
            s.received, s.redelivered = self._net.received, self._net.redelivered
            s.first_received_at = self._net.first_received_at
            s.process_cpu_s_at_first_message = self._net.first_cpu_s
            return s.as_dict()

    # -- network thread --------------------------------------------------------------------------
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
            self._stats.connects += 1
        # Subscribing again is harmless in a kept session and required when the broker lost it.
        client.subscribe(
            [
                (subscription(self.config.group, self.config.fleet, k, self.config.shared), 1)
                for k in self.kinds
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
            self._stats.disconnects += 1
        self._connected.clear()
        if not self._closing.is_set():
            log.warning("ingest %s: disconnected (%s); reconnecting", self.client_id, reason_code)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if self._closing.is_set():
            return  # not acknowledged: redelivered to this session on the next start
        now = time.time()
        net = self._net
        net.received += 1
        if msg.dup:
            net.redelivered += 1
        if net.first_received_at is None:
            net.first_received_at = now
            net.first_cpu_s = time.process_time()
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers should refuse these; dead-letter it rather than crash the loop
            topic = bytes(getattr(msg, "_topic", b"")).decode("utf-8", "replace")
        self._buffer.put(
            _Inbound(msg.mid, msg.qos, topic, bytes(msg.payload), msg.dup, self._gen, now), self._closing
        )

    # -- writer thread ---------------------------------------------------------------------------
    def _write_loop(self) -> None:
        cfg = self.config
        while True:
            batch = self._buffer.take(cfg.batch_max, cfg.batch_linger_s, idle_s=0.2)
            if not batch:
                if self._closing.is_set():
                    return
                continue
            try:
                self._process(batch)
            except _Abandoned:
                log.warning(
                    "ingest %s: stopping with %d messages uncommitted (database unreachable); "
                    "the broker redelivers them",
                    self.client_id,
                    len(batch) + len(self._buffer),
                )
                return
            except Exception as exc:  # a bug: stop writing; the unacknowledged messages are redelivered
                log.exception(
                    "ingest %s: unexpected error; worker stops, batch left unacknowledged", self.client_id
                )
                self.failed = exc
                return

    def _process(self, batch: list[_Inbound]) -> None:
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        for m in batch:
            try:
                r = classify(m.topic, m.payload, m.received_at, self.kinds)
            except Exception as exc:  # noqa: BLE001 - a message must never stop ingest
                r = Rejected(m.topic, m.payload, "invalid", f"{type(exc).__name__}: {exc}", m.received_at)
            (accepted if isinstance(r, Accepted) else rejected).append(r)  # type: ignore[arg-type]
        try:
            result = self._commit(lambda conn: self._write_all(conn, accepted, rejected))
        except _Refused:
            result, rejected = self._write_one_by_one(accepted, rejected)
        with self._lock:
            s = self._stats
            s.batches += 1
            s.stored += result.stored
            s.duplicates += result.duplicates
            s.unknown_model += result.unknown_model
            s.alerts += result.alerts
            s.dead_lettered += len(rejected) + sum(result.refused.values())
            s.dead_letter_reasons.update(r.reason for r in rejected)
            s.dead_letter_reasons.update(result.refused)
            s.dead_letters_dropped += result.dead_letters_dropped
            s.by_kind.update(a.kind for a in accepted)
            s.last_committed_at = time.time()
        self._ack(batch)

    def _write_all(
        self, conn: Connection, accepted: Sequence[Accepted], rejected: Sequence[Rejected]
    ) -> WriteResult:
        accepted, refused = self._store_checks(conn, accepted)
        rejected = [*rejected, *refused]
        by_kind: dict[str, list[Received[Any]]] = {}
        for a in accepted:
            by_kind.setdefault(a.kind, []).append(a.item)
        result = WriteResult(refused=Counter(r.reason for r in refused))
        for name, items in by_kind.items():
            result.add(self.kinds[name].write(conn, items, self._check, self.actor))
        result.dead_letters_dropped += write_dead_letters(conn, rejected, actor=self.actor)
        return result

    def _store_checks(
        self, conn: Connection, accepted: Sequence[Accepted]
    ) -> tuple[list[Accepted], list[Rejected]]:
        """Refuse what only the store can judge: a device writing under a fleet other than the one it is
        registered in (the ACL lets it write its topics in any fleet's tree), and windows whose histogram
        bins differ from their model's (drift could not compare them)."""
        fleets = self._check.fleets(conn, {a.item.message.device for a in accepted})
        ok: list[Accepted] = []
        refused: list[Rejected] = []
        for a in accepted:
            m, it = a.item.message, a.item
            registered = fleets.get(m.device, m.fleet)
            if registered != m.fleet:
                detail = f"device {m.device} is registered in fleet {registered}, not {m.fleet}"
                refused.append(Rejected(a.topic, it.raw.encode(), "fleet_mismatch", detail, it.received_at))
                foreign_fleet_alert(conn, m.device, registered, m.fleet, self.actor)
            elif a.kind == "tele" and (problem := self._check.edges_problem(conn, m)):
                refused.append(Rejected(a.topic, it.raw.encode(), "histogram_edges", problem, it.received_at))
            else:
                ok.append(a)
        return ok, refused

    def _commit(self, work: Callable[[Connection], WriteResult]) -> WriteResult:
        """Run ``work`` in one write transaction; retry outages with backoff; raise _Refused otherwise."""
        while True:
            try:
                with self.store.write() as conn:
                    result = work(conn)
                self._check.committed()
                self._backoff.reset()
                return result
            except Exception as exc:  # noqa: BLE001 - classified below
                self._check.rolled_back()
                with self._lock:
                    self._stats.db_errors += 1
                if not is_transient(exc):
                    raise _Refused(exc) from exc
                if self._abandon.is_set():
                    raise _Abandoned from exc
                delay = self._backoff.next()
                log.warning(
                    "ingest %s: database unavailable (%s); retrying in %.1f s with %d buffered",
                    self.client_id,
                    _short(exc),
                    delay,
                    len(self._buffer),
                )
                self._abandon.wait(delay)

    def _write_one_by_one(
        self, accepted: Sequence[Accepted], rejected: list[Rejected]
    ) -> tuple[WriteResult, list[Rejected]]:
        """Find the messages the database refuses: each alone; the refused ones become dead letters."""
        result = WriteResult()
        rejected = list(rejected)
        for a in accepted:
            try:
                result.add(self._commit(functools.partial(self._write_all, accepted=[a], rejected=[])))
            except _Refused as exc:
                log.warning(
                    "ingest %s: database refused a %s message: %s", self.client_id, a.kind, _short(exc.error)
                )
                it = a.item
                rejected.append(
                    Rejected(a.topic, it.raw.encode(), "db_rejected", _short(exc.error), it.received_at)
                )
        self._commit(lambda conn: self._write_all(conn, [], rejected))
        return result, rejected

    def _ack(self, batch: Sequence[_Inbound]) -> None:
        with self._lock:  # on_disconnect takes this lock too, so the generation cannot change under us
            gen = self._gen
            mids = [m.mid for m in batch if m.qos == 1 and m.gen == gen]
            send_pubacks(self.client, mids)
            self._stats.acked += len(mids)
            self._stats.stale_acks += sum(1 for m in batch if m.qos == 1 and m.gen != gen)


class _Refused(Exception):
    """The database rejected the statement for this data (not an outage)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {str(orig or exc).strip().splitlines()[0][:300]}"
