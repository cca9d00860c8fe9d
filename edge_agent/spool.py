"""A bounded, durable FIFO of outbound MQTT messages in SQLite, so telemetry survives broker outages,
agent restarts and full disks.

The agent thread ``put``s; the MQTT link thread ``peek``s and ``ack``s a message once the broker has
acknowledged it. When the spool exceeds its bounds the oldest messages are evicted first and counted
(``take_evictions``). When SQLite cannot write (full disk, I/O error) messages wait in a bounded in-memory
overflow, are still returned by ``peek`` (with negative ids), and move to disk as soon as writes succeed
again (``spool_disk_errors``). A file that is not a SQLite database is renamed aside and replaced by an
empty spool (``spool_corrupt``)::

    spool = Spool(Path("/var/lib/edgefleet/spool.sqlite"), max_messages=10_000, max_bytes=64 << 20)
    spool.put("ef/v1/shop/dev/cam1/tele", b'{"kind": "tele", ...}')
    for item in spool.peek(20):
        ...  # publish it; when the broker acknowledges it:
        spool.ack(item.id)

Ids of overflow entries change when they move to disk; an entry acked after its move is simply
delivered again (at least once; receivers dedupe). Commits are synchronous (``PRAGMA synchronous=FULL`` in WAL mode): a put survives a power cut once it
returns. ``size_bytes`` counts payload bytes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from edge_agent.events import EventCounter

log = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL,
    carries INTEGER NOT NULL DEFAULT 0
)"""
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
_ADD_UNREPORTED = (
    "INSERT INTO meta (key, value) VALUES ('unreported_evicted', ?) "
    "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value"
)
_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_RETRY_INTERVAL_S = 1.0
"""``peek`` retries moving the in-memory overflow to disk at most this often (``put`` always retries)."""
_ACK_CHUNK = 500


@dataclass(frozen=True)
class SpoolItem:
    """One spooled message; ``id`` > 0 is a disk row, ``id`` < 0 an entry of the in-memory overflow."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float = 0.0
    carries: int = 0
    """Evictions this message reports (a telemetry window's ``spool_evicted``): if it is evicted in turn,
    they are reported again by the next one, so the reports always add up to what was evicted."""


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """True when SQLite says the file is not a database or is malformed (as opposed to I/O trouble)."""
    return getattr(exc, "sqlite_errorname", "") in _CORRUPT_CODES


class Spool:
    """Bounded durable FIFO (SQLite, WAL); one connection shared by the agent and link threads under a lock."""

    def __init__(
        self,
        path: str | Path,
        max_messages: int,
        max_bytes: int,
        events: EventCounter | None = None,
        *,
        overflow_messages: int = 1000,
        overflow_bytes: int = 4 * 1024 * 1024,
        max_pages: int | None = None,
    ) -> None:
        """``overflow_*`` bound the in-memory fallback; ``max_pages`` caps the SQLite file (tests fill it)."""
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(
                f"spool bounds must be positive (max_messages={max_messages}, max_bytes={max_bytes})"
            )
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.events = events or EventCounter()
        self.evicted = 0
        """Messages evicted since this object was created (bounds or overflow)."""
        self._unreported_memory = 0
        self._overflow_max = max(1, min(overflow_messages, max_messages))
        self._overflow_max_bytes = max(1, min(overflow_bytes, max_bytes))
        self._max_pages = max_pages
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._count = 0
        self._bytes = 0
        self._overflow: OrderedDict[int, SpoolItem] = OrderedDict()
        self._overflow_bytes = 0
        self._next_overflow_id = -1
        self._last_retry = 0.0
        self._failing = False
        with self._lock:
            self._open()
            if self._conn is None:
                self.events.add("spool_disk_errors")

    # ----- public API -------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, carries: int = 0) -> None:
        """Append a message; evict the oldest beyond the bounds; never raise on disk trouble. ``carries``:
        how many evictions (from :meth:`take_evictions`) the message reports."""
        item = SpoolItem(0, topic, bytes(payload), int(qos), bool(retain), time.time(), int(carries))
        with self._lock:
            for _attempt in range(2):
                if self._overflow or self._conn is None:
                    self._flush_overflow()
                if self._overflow or self._conn is None:
                    break
                try:
                    self._insert([item])
                    self._failing = False
                    return
                except sqlite3.Error as exc:
                    if not self._recover("write", exc):
                        break
            self.events.add("spool_disk_errors")
            self._to_overflow(item)

    def peek(self, limit: int, after_id: int = 0) -> list[SpoolItem]:
        """Up to ``limit`` messages, oldest first: disk rows with id > ``after_id``, then the overflow.

        Overflow entries (negative ids) are newer than every disk row and are returned whatever
        ``after_id`` is, so they are delivered even while the disk is full.
        """
        if limit <= 0:
            return []
        with self._lock:
            if self._overflow and time.monotonic() - self._last_retry >= _RETRY_INTERVAL_S:
                self._flush_overflow()
            items: list[SpoolItem] = []
            if self._conn is not None:
                try:
                    rows = self._conn.execute(
                        "SELECT id, topic, payload, qos, retain, created FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                        (max(after_id, 0), limit),
                    ).fetchall()
                    items = [SpoolItem(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]
                except sqlite3.Error as exc:
                    self.events.add("spool_disk_errors")
                    self._recover("read", exc)
            items.extend(islice(self._overflow.values(), limit - len(items)))
            return items

    def ack(self, item_id: int) -> None:
        """Delete one delivered message (unknown ids are ignored: it may have been evicted meanwhile)."""
        self.ack_many((item_id,))

    def ack_many(self, ids: Iterable[int]) -> None:
        """Delete delivered messages in one transaction (the link acks a batch per network iteration)."""
        disk = []
        with self._lock:
            for i in ids:
                if i < 0:
                    old = self._overflow.pop(i, None)
                    if old is not None:
                        self._overflow_bytes -= len(old.payload)
                elif i > 0:
                    disk.append(i)
            if not disk or self._conn is None:
                return
            try:
                with self._transaction() as conn:
                    gone = removed = 0
                    for k in range(0, len(disk), _ACK_CHUNK):
                        chunk = disk[k : k + _ACK_CHUNK]
                        marks = ",".join("?" * len(chunk))
                        n, size = conn.execute(
                            f"SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM spool WHERE id IN ({marks})",
                            chunk,
                        ).fetchone()
                        conn.execute(f"DELETE FROM spool WHERE id IN ({marks})", chunk)
                        gone += n
                        removed += size
                self._count -= gone
                self._bytes -= removed
            except sqlite3.Error as exc:
                self.events.add("spool_disk_errors")
                self._recover("delete", exc)

    def __len__(self) -> int:
        """Messages waiting (disk and in-memory overflow), including ones in flight but not yet acked."""
        with self._lock:
            return self._count + len(self._overflow)

    def size_bytes(self) -> int:
        """Payload bytes waiting (disk and in-memory overflow)."""
        with self._lock:
            return self._bytes + self._overflow_bytes

    def close(self) -> None:
        """Write any in-memory overflow to disk if possible, then close the database."""
        with self._lock:
            if self._overflow:
                self._flush_overflow()
            if self._overflow:
                lost = len(self._overflow)
                log.error(
                    "spool %s: %d messages held in memory could not be written and are lost", self.path, lost
                )
                self._count_evicted(lost, "closing with the disk still failing", on_disk=False)
                self._overflow.clear()
                self._overflow_bytes = 0
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

    def take_evictions(self) -> int:
        """Evictions not yet reported (kept on disk across restarts); resets the count.

        The agent reports them as ``events.spool_evicted`` in its next telemetry window.
        """
        with self._lock:
            n, self._unreported_memory = self._unreported_memory, 0
            if self._conn is None:
                return n
            try:
                with self._transaction() as conn:
                    row = conn.execute("SELECT value FROM meta WHERE key = 'unreported_evicted'").fetchone()
                    conn.execute("DELETE FROM meta WHERE key = 'unreported_evicted'")
                return n + (int(row[0]) if row else 0)
            except sqlite3.Error as exc:
                self._log_failure("take_evictions", exc)
                return n

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- internals (called with the lock held) --------------------------------------------------

    def _connect(self) -> None:
        """Open (or create) the database and load the counters."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=FULL")
            if self._max_pages:
                conn.execute(f"PRAGMA max_page_count={int(self._max_pages)}").fetchone()
            conn.execute(_SCHEMA)
            if "carries" not in {r[1] for r in conn.execute("PRAGMA table_info(spool)")}:  # an older spool
                conn.execute("ALTER TABLE spool ADD COLUMN carries INTEGER NOT NULL DEFAULT 0")
            conn.execute(_META)
            self._count, self._bytes = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM spool"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _open(self) -> None:
        """Connect; a corrupt file is moved aside and replaced; other failures leave us memory-only."""
        try:
            try:
                self._connect()
            except sqlite3.DatabaseError as exc:
                if not _is_corrupt(exc):
                    raise
                self._move_aside(exc)
                self._connect()
            if self._count:
                log.info("spool %s: %d undelivered messages from a previous run", self.path, self._count)
        except (sqlite3.Error, OSError) as exc:
            self._conn = None
            self._log_failure("open", exc)

    def _move_aside(self, exc: sqlite3.Error) -> None:
        """Rename a corrupt spool (and its WAL files) to ``<path>.corrupt-<timestamp>``."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{target}{suffix}"))
        self._count = self._bytes = 0
        self.events.add("spool_corrupt")
        log.error(
            "spool %s is corrupt (%s); moved it aside to %s and started an empty spool",
            self.path,
            exc,
            target,
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        conn = self._conn
        if conn is None:
            raise sqlite3.OperationalError(f"spool {self.path} is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _over(self, count: int, size: int) -> bool:
        return count > self.max_messages or size > self.max_bytes

    def _insert(self, items: list[SpoolItem]) -> None:
        """Insert ``items`` in order, first deleting the oldest rows (or items) that would break the bounds."""
        count = self._count + len(items)
        size = self._bytes + sum(len(i.payload) for i in items)
        evict_upto = 0
        evicted = carried = 0
        with self._transaction() as conn:
            if self._over(count, size):
                cur = conn.execute("SELECT id, length(payload), carries FROM spool ORDER BY id")
                for row_id, n, c in cur:
                    if not self._over(count, size):
                        break
                    count, size, evict_upto, evicted = count - 1, size - n, row_id, evicted + 1
                    carried += c
                cur.close()
                if evict_upto:
                    conn.execute("DELETE FROM spool WHERE id <= ?", (evict_upto,))
            skip = 0
            while self._over(count, size) and skip < len(items):
                count, size = count - 1, size - len(items[skip].payload)
                carried += items[skip].carries
                skip += 1
            conn.executemany(
                "INSERT INTO spool (topic, payload, qos, retain, created, carries) VALUES (?, ?, ?, ?, ?, ?)",
                [(i.topic, i.payload, i.qos, int(i.retain), i.created, i.carries) for i in items[skip:]],
            )
            if evicted + skip + carried:  # remembered on disk until reported: a restart cannot lose it
                conn.execute(_ADD_UNREPORTED, (evicted + skip + carried,))
        self._count, self._bytes = count, size
        if evicted + skip:
            self._count_evicted(
                evicted + skip, f"over its bounds ({self.max_messages} messages, {self.max_bytes} bytes)"
            )

    def _to_overflow(self, item: SpoolItem) -> None:
        """Keep a message in memory (negative id) while the disk refuses it; drop the oldest beyond bounds."""
        item = SpoolItem(
            self._next_overflow_id,
            item.topic,
            item.payload,
            item.qos,
            item.retain,
            item.created,
            item.carries,
        )
        self._next_overflow_id -= 1
        self._overflow[item.id] = item
        self._overflow_bytes += len(item.payload)
        dropped = 0
        while len(self._overflow) > self._overflow_max or self._overflow_bytes > self._overflow_max_bytes:
            _, old = self._overflow.popitem(last=False)
            self._overflow_bytes -= len(old.payload)
            self._unreported_memory += old.carries  # what it reported is reported again
            dropped += 1
        if dropped:
            self._count_evicted(
                dropped, "its in-memory overflow is full while the disk refuses writes", on_disk=False
            )

    def _flush_overflow(self) -> None:
        """Move overflow entries to disk, oldest first, in the largest batches the disk accepts."""
        self._last_retry = time.monotonic()
        if self._conn is None:
            self._open()
            if self._conn is None:
                return
        n = len(self._overflow)
        recovered = False
        while self._overflow and n:
            batch = list(islice(self._overflow.values(), n))
            try:
                self._insert(batch)
            except sqlite3.Error as exc:
                if not recovered and self._recover("write", exc):
                    recovered = True  # a fresh database replaced a corrupt one: retry the same batch
                else:
                    n //= 2
                continue
            for item in batch:
                del self._overflow[item.id]
                self._overflow_bytes -= len(item.payload)
            log.info("spool %s: moved %d messages from memory to disk", self.path, len(batch))
            n = len(self._overflow)
        if not self._overflow and self._failing:
            self._failing = False
            log.warning("spool %s: the disk accepts writes again; nothing is held in memory", self.path)

    def _recover(self, op: str, exc: sqlite3.Error) -> bool:
        """Replace a corrupt database by an empty one (True: retry), else log the failure (False)."""
        if _is_corrupt(exc):
            try:
                self._move_aside(exc)
                self._connect()
                return True
            except (sqlite3.Error, OSError) as again:
                self._conn = None
                self._log_failure(op, again)
                return False
        self._log_failure(op, exc)
        return False

    def _log_failure(self, op: str, exc: BaseException) -> None:
        """Log a failed disk operation once per failing episode (then at debug level)."""
        if not self._failing:
            self._failing = True
            log.error(
                "spool %s: %s failed (%s); keeping new messages in memory (up to %d) until the disk accepts writes",
                self.path,
                op,
                exc,
                self._overflow_max,
            )
        else:
            log.debug("spool %s: %s failed again (%s)", self.path, op, exc)

    def _count_evicted(self, n: int, why: str, on_disk: bool = True) -> None:
        self.evicted += n
        if not on_disk:
            self._unreported_memory += n
        log.warning("spool %s: evicted the %d oldest message(s): %s", self.path, n, why)
