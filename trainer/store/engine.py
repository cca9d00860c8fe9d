"""Engines for the two supported databases, and the few dialect differences the store needs.

* ``sqlite:///path``: WAL journal (readers never block the writer), ``synchronous=NORMAL`` (durable
  across process crashes; an OS crash may lose the last commits but never corrupts), checkpoints
  every ~40 MB of WAL, a 30 s busy timeout, foreign keys on, and real transactions: pysqlite's
  implicit BEGIN is replaced by an explicit one, ``BEGIN IMMEDIATE`` for writes (see :func:`writer`),
  so concurrent writers queue instead of failing when a read transaction upgrades to a write;
  :class:`WriteLock` makes them queue in the kernel rather than in SQLite's sleep-and-retry handler.
* ``postgresql+psycopg://...``: psycopg 3, pre-ping (a connection killed by a server restart is
  replaced instead of failing the next batch) and a connect timeout, so an outage surfaces as an
  error the caller retries rather than a hang.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError

from trainer.errors import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own busy polling only
    fcntl = None  # type: ignore[assignment]

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_CHECKPOINT_PAGES = 10_000
"""WAL pages between automatic checkpoints (~40 MB). SQLite's default (1,000) checkpointed every ~1,000
telemetry windows; ten times fewer checkpoints cut ~25 us of CPU per 3.5 KB window (measured)."""
PG_CONNECT_TIMEOUT_S = 5


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``sqlite:///file`` or ``postgresql+psycopg://...`` with the settings above."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise StoreError(
            f"{url}: not a database URL (use sqlite:///FILE or postgresql+psycopg://...)"
        ) from None
    shown = u.render_as_string(hide_password=True)
    if u.get_backend_name() == "sqlite":
        _check_sqlite_url(shown, u)
        engine = _create(shown, u, **kwargs)
        _configure_sqlite(engine)
        return engine
    if u.get_backend_name() == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **kwargs.pop("connect_args", {})}
        return _create(shown, u, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    raise StoreError(f"{shown}: unsupported database (use sqlite:///FILE or postgresql+psycopg://...)")


def _check_sqlite_url(shown: str, u: URL) -> None:
    """An SQLite URL names a file after ``sqlite:///``; ``sqlite://fleet.db`` reads ``fleet.db`` as a host
    (SQLAlchemy then fails with a multi-line ArgumentError), and the file's directory must exist."""
    if u.host or u.port or u.username or u.password:
        path = "/".join(part for part in (u.host, u.database) if part)
        raise StoreError(
            f"{shown}: an SQLite URL has no host; for the file {path} write sqlite:///{path} "
            "(three slashes, four before an absolute path)"
        )
    folder = Path(u.database or ".").parent
    if u.database not in (None, "", ":memory:") and not folder.is_dir():
        raise StoreError(f"{shown}: directory {folder} does not exist")


def _create(shown: str, u: URL, **kwargs: Any) -> Engine:
    """``create_engine``, with a URL SQLAlchemy rejects (a bad query option, say) as one-line StoreError."""
    try:
        return create_engine(u, **kwargs)
    except ArgumentError as exc:
        reason = " ".join(str(exc).split())
        raise StoreError(f"{shown}: not a usable database URL: {reason}") from None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            "foreign_keys=ON",
            f"wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}",
            f"journal_size_limit={SQLITE_CHECKPOINT_PAGES * 4096}",
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions take SQLite's write lock at BEGIN."""
    return engine.execution_options(sqlite_begin="IMMEDIATE")


def insert(conn: Connection, table: Any) -> Any:
    """``INSERT`` for the connection's dialect, with ``on_conflict_do_nothing/update`` available.

    Typed ``Any``: the PostgreSQL and SQLite ``Insert`` classes share those methods but no base."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported dialect {name}")


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is an outage or contention worth retrying (not a bug in a statement)."""
    if isinstance(exc, OperationalError | InterfaceError):  # server gone, locked, connection closed
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def bulk_insert(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    conflict: Sequence[str],
    rows: Sequence[Sequence[Any]],
    update_set: str | None = None,
) -> int:
    """Insert many rows; on a ``conflict`` key do nothing, or ``DO UPDATE SET update_set``.

    Returns the driver's row count (rows inserted, plus rows updated with ``update_set``). This is
    ingest's hot path, so it bypasses SQLAlchemy's per-row parameter handling (in bench/ingest_bench.py
    its multi-VALUES INSERT .. RETURNING cost 3-10x more per row):

    * SQLite: the driver's ``executemany`` of one prepared statement (a C loop).
    * PostgreSQL: ``COPY`` into a temporary staging table, then one ``INSERT .. SELECT .. ON CONFLICT``;
      psycopg's COPY costs the client ~3 us per row against ~15-30 us for a pipelined executemany.
      The staging table lives with the connection and is emptied at commit.
    """
    if not rows:
        return 0
    q = conn.dialect.identifier_preparer.quote
    cols = ", ".join(q(c) for c in columns)
    on_conflict = f"ON CONFLICT ({', '.join(q(c) for c in conflict)}) " + (
        f"DO UPDATE SET {update_set}" if update_set else "DO NOTHING"
    )
    if conn.dialect.name == "postgresql":
        stage = q(f"_stage_{table}")
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
            f"SELECT {cols} FROM {q(table)} WITH NO DATA"
        )
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY {stage} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return int(
            conn.exec_driver_sql(
                f"INSERT INTO {q(table)} ({cols}) SELECT {cols} FROM {stage} {on_conflict}"
            ).rowcount
        )
    marks = ", ".join(["?" if conn.dialect.paramstyle == "qmark" else "%s"] * len(columns))
    sql = f"INSERT INTO {q(table)} ({cols}) VALUES ({marks}) {on_conflict}"
    return int(conn.exec_driver_sql(sql, list(rows)).rowcount)


class WriteLock:
    """Serialises write transactions on one SQLite file across threads and processes (a no-op else).

    SQLite allows one writer at a time; a writer that finds the database locked polls with growing
    sleeps (up to 100 ms each), so two ingest processes on one file mostly wait for nothing. An
    exclusive ``flock`` on ``FILE.writelock``, taken before ``BEGIN IMMEDIATE``, makes the waiter
    sleep in the kernel and wake the moment the other commits. Readers are not affected (WAL).
    """

    def __init__(self, url: str) -> None:
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        u = make_url(url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" and fcntl is not None:
            self._fd = os.open(f"{u.database}.writelock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self) -> WriteLock:
        self._thread_lock.acquire()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
