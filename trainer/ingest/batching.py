"""The writing half of an ingest worker: a bounded buffer, and a writer thread that validates batches,
stores each in one transaction and only then has them acknowledged by the source they came from.

A source (:class:`~trainer.ingest.worker.MqttSource`: a paho shared subscription; or
:class:`~trainer.ingest.nats_source.NatsSource`: a JetStream pull consumer) hands each message to
:meth:`BatchWriter.receive` and acknowledges what :meth:`BatchWriter` passes back to its ``ack``
callback after the commit. What the source does not get back (a crash, the database down while
stopping) it never acknowledges, so the broker delivers it again; the store deduplicates it.

* One writer thread takes batches (every waiting message, up to ``batch_max``; see ``batch_linger_s``),
  validates them (:mod:`trainer.ingest.routing`), writes them in one transaction, then acknowledges them.
  Invalid messages go to the dead-letter table and are acknowledged too: they can never become valid.
* Database outage: the batch is retried with jittered exponential backoff while new messages wait
  unacknowledged in the buffer; ``max_buffered`` is a hard cap (the source stops reading when it is
  reached). When the database is back, everything is committed and acknowledged in order.
* A batch the database refuses for a reason other than an outage (a value it cannot store) is split:
  each message is written alone, and the ones still refused are dead-lettered as ``db_rejected``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from edge_agent.backoff import Backoff
from trainer.ingest.routing import Accepted, Kind, classify
from trainer.store import ModelCheck, Rejected, Store, WriteResult, is_transient
from trainer.store.ingest_writes import (
    Received,
    foreign_fleet_alert,
    write_dead_letters,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Inbound:
    """One message from a source: its MQTT topic and payload, and what the source needs to ack it."""

    topic: str
    payload: bytes
    received_at: float
    ref: Any
    """The source's handle to acknowledge it (an MQTT message id, a JetStream message); None: no ack."""
    gen: int = 0
    """The source's connection generation when it arrived (MQTT acks only on that connection)."""
    dup: bool = False


class _Abandoned(Exception):
    """The worker is stopping while the database is unreachable; the batch stays unacknowledged."""


class Buffer:
    """Bounded FIFO between the network thread (one producer) and the writer thread (one consumer).

    Appending is a plain deque append plus an event set only when the writer may be waiting: the
    network thread pays almost nothing per message.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._q: deque[Inbound] = deque()
        self._ready = threading.Event()
        self._room = threading.Condition()
        self.high_water = 0

    def put(self, item: Inbound, closed: threading.Event) -> bool:
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

    def take(self, most: int, linger_s: float, idle_s: float) -> list[Inbound]:
        """Up to ``most`` items: waits up to ``idle_s`` for the first, then up to ``linger_s`` for more."""
        q = self._q
        if not self._wait(idle_s):
            return []
        deadline = time.monotonic() + linger_s
        out: list[Inbound] = []
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


class _Intake:
    """Counters written only by the source's thread (read without locking for reports)."""

    __slots__ = ("first_cpu_s", "first_received_at", "received", "redelivered")

    def __init__(self) -> None:
        self.received = 0
        self.redelivered = 0
        self.first_received_at: float | None = None
        self.first_cpu_s: float | None = None


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


@dataclass(frozen=True)
class WriterLimits:
    """How the writer batches, buffers and retries: ``IngestConfig.limits``, the one source of these
    defaults (the CLI's options take theirs from here too)."""

    batch_max: int = 200
    """Most messages per transaction."""
    batch_linger_s: float = 0.0
    """How long a batch waits for more messages once none is waiting. 0 (group commit) commits what
    is there as soon as the previous commit is done: under load batches grow by themselves, and no
    time is spent waiting for messages the broker holds back until the current ones are acknowledged
    (its in-flight window)."""
    max_buffered: int = 10_000
    """Hard cap of the buffer: the source stops reading when it is full."""
    retry_min_s: float = 0.1
    """First delay before retrying a batch while the database is unreachable (then doubling, jittered)."""
    retry_max_s: float = 5.0
    """Longest delay between retries."""


class BatchWriter:
    """The buffer and the writer thread of one ingest worker; ``ack`` is its source's acknowledgement,
    called with each committed batch and answering (acknowledged, stale) counts."""

    def __init__(
        self,
        store: Store,
        kinds: Mapping[str, Kind],
        *,
        name: str,
        limits: WriterLimits,
        ack: Callable[[Sequence[Inbound]], tuple[int, int]],
    ) -> None:
        self.store, self.kinds, self.name, self.limits = store, dict(kinds), name, limits
        self.actor = f"ingest:{name}"
        self._ack_source = ack
        self._check = ModelCheck()
        self.buffer = Buffer(limits.max_buffered)
        self._stats = IngestStats()
        self._intake = _Intake()
        self.failed: BaseException | None = None
        """Set when the writer stopped on an unexpected error (a bug); the process should restart."""
        self.lock = threading.Lock()
        self.closing = threading.Event()
        """Set when the worker stops: sources stop handing messages over (they stay unacknowledged)."""
        self._abandon = threading.Event()
        self.thread: threading.Thread | None = None
        self._backoff = Backoff(limits.retry_min_s, limits.retry_max_s)

    # -- the source's side -----------------------------------------------------------------------
    def receive(self, item: Inbound) -> bool:
        """Count and buffer one message (waits while the buffer is full); False once stopping."""
        intake = self._intake
        intake.received += 1
        if item.dup:
            intake.redelivered += 1
        if intake.first_received_at is None:
            intake.first_received_at = item.received_at
            intake.first_cpu_s = time.process_time()
        return self.buffer.put(item, self.closing)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread."""
        self.thread = threading.Thread(
            target=self._write_loop, name=f"ingest-writer-{self.name}", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Commit and acknowledge what is buffered (up to ``timeout``); abandon the rest if the database
        is down (it stays unacknowledged, the broker delivers it again)."""
        self.closing.set()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                self._abandon.set()
                self.thread.join(self.limits.retry_max_s + 5)

    def snapshot(self, **source: int) -> dict[str, Any]:
        """The counters, with the source's own (connects, disconnects, ...) merged in."""
        with self.lock:
            s = self._stats
            s.buffered = len(self.buffer)
            s.buffer_high_water = self.buffer.high_water
            s.received, s.redelivered = self._intake.received, self._intake.redelivered
            s.first_received_at = self._intake.first_received_at
            s.process_cpu_s_at_first_message = self._intake.first_cpu_s
            for k, v in source.items():
                setattr(s, k, v)
            return s.as_dict()

    # -- writer thread ---------------------------------------------------------------------------
    def _write_loop(self) -> None:
        cfg = self.limits
        while True:
            batch = self.buffer.take(cfg.batch_max, cfg.batch_linger_s, idle_s=0.2)
            if not batch:
                if self.closing.is_set():
                    return
                continue
            try:
                self._process(batch)
            except _Abandoned:
                log.warning(
                    "ingest %s: stopping with %d messages uncommitted (database unreachable); "
                    "the broker redelivers them",
                    self.name,
                    len(batch) + len(self.buffer),
                )
                return
            except Exception as exc:  # a bug: stop writing; the unacknowledged messages are redelivered
                log.exception(
                    "ingest %s: unexpected error; worker stops, batch left unacknowledged", self.name
                )
                self.failed = exc
                return

    def _process(self, batch: list[Inbound]) -> None:
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
        with self.lock:  # the counters show a batch stored and acknowledged at once, never half
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
            acked, stale = self._ack_source(batch)
            s.acked += acked
            s.stale_acks += stale

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
                with self.lock:
                    self._stats.db_errors += 1
                if not is_transient(exc):
                    raise _Refused(exc) from exc
                if self._abandon.is_set():
                    raise _Abandoned from exc
                delay = self._backoff.next()
                log.warning(
                    "ingest %s: database unavailable (%s); retrying in %.1f s with %d buffered",
                    self.name,
                    _short(exc),
                    delay,
                    len(self.buffer),
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
                    "ingest %s: database refused a %s message: %s", self.name, a.kind, _short(exc.error)
                )
                it = a.item
                rejected.append(
                    Rejected(a.topic, it.raw.encode(), "db_rejected", _short(exc.error), it.received_at)
                )
        self._commit(lambda conn: self._write_all(conn, [], rejected))
        return result, rejected


class _Refused(Exception):
    """The database rejected the statement for this data (not an outage)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {str(orig or exc).strip().splitlines()[0][:300]}"
