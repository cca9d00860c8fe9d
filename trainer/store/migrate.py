"""Schema revisions of the store (Alembic): which revision a database is at, bringing it to head, and
the check that keeps a release from running on an older schema.

A database records its revision in ``alembic_version``. One created before migrations existed has
tables but no such table: :func:`recognise` compares its tables, columns and indexes with what revision
0001 (the last release before migrations) and head create, and says which it matches, or that it
matches neither. Nothing here upgrades on its own: :func:`ensure_current` (what every
``Store(url)`` runs) creates the schema of an empty database, records head on an unrecorded database
that already has it, and otherwise raises :class:`~trainer.errors.SchemaOutdated`;
:func:`upgrade` (``edgefleet db upgrade``) is the one that migrates.

Alembic is imported inside the functions that run it: opening a database at head needs only one query.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, create_engine, inspect, text

from trainer.errors import SchemaOutdated, StoreError
from trainer.store.schema import Base

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"
"""The revision of the schema the last release before migrations created (commit 3ff547b)."""
VERSION_TABLE = "alembic_version"
PG_LOCK_KEY = 0x45_46_44_42  # "EFDB": one schema change at a time per PostgreSQL database

Shape = dict[str, tuple[frozenset[str], frozenset[str]]]
"""table -> (column names, names of its ``ix_`` indexes): what recognising a revision compares."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database is: ``revision`` None means it has none of the store's tables."""

    revision: str | None
    head: str
    recorded: bool
    """The revision is in ``alembic_version`` (False: recognised from the tables, or empty)."""

    @property
    def at_head(self) -> bool:
        """This release can use it as is (an unrecorded head is recorded when a store opens it)."""
        return self.revision == self.head


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration, built in code: the environment shipped in ``trainer/store/migrations``,
    and the connection to migrate (used inside its transaction) or a URL."""
    _load_alembic()
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def _quiet() -> Iterator[None]:
    """Alembic logs each plugin, context and revision at INFO, and the revision shapes below are built by
    migrating a scratch database, which read in a command's output as if the user's were migrated: its
    warnings stay, the outcome is reported by the caller."""
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.cache
def _load_alembic() -> None:
    """Import Alembic once, quietly: importing it logs a line per plugin at INFO."""
    with _quiet():
        import alembic.autogenerate
        import alembic.command
        import alembic.config
        import alembic.runtime.migration
        import alembic.script  # noqa: F401


@functools.cache
def script_directory() -> ScriptDirectory:
    """The revisions shipped with this release (read once per process)."""
    _load_alembic()
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision: the schema of :mod:`trainer.store.schema`."""
    rev = script_directory().get_current_head()
    assert rev is not None, f"no revisions in {MIGRATIONS / 'versions'}"
    return rev


def known(revision: str) -> bool:
    """Whether this release ships ``revision`` (a newer release's is unknown to it)."""
    _load_alembic()
    from alembic.util import CommandError

    try:
        return script_directory().get_revision(revision) is not None
    except CommandError:
        return False


def recorded_revision(conn: Connection) -> str | None:
    """The revision in ``alembic_version``, or None when the table is missing or empty."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise StoreError(f"{VERSION_TABLE} holds several revisions ({', '.join(rows)}): not ours")
    return rows[0] if rows else None


def state(conn: Connection, url: str) -> SchemaState:
    """Where the database at ``url`` is, without changing it (an unrecorded one is recognised by its
    tables)."""
    rev = recorded_revision(conn)
    if rev is not None:
        return SchemaState(rev, head(), recorded=True)
    return SchemaState(recognise(conn, url), head(), recorded=False)


def shape(conn: Connection, tables: set[str] | None = None) -> Shape:
    """The store's tables in a database as :data:`Shape` (``tables``: only these; default all but
    Alembic's)."""
    insp = inspect(conn)
    names = set(insp.get_table_names()) - {VERSION_TABLE}
    if tables is not None:
        names &= tables
    return {
        t: (
            frozenset(c["name"] for c in insp.get_columns(t)),
            frozenset(str(i["name"]) for i in insp.get_indexes(t) if str(i["name"]).startswith("ix_")),
        )
        for t in names
    }


@functools.cache
def revision_shape(revision: str) -> Shape:
    """What migrating an empty database to ``revision`` creates (run once on an in-memory SQLite)."""
    _load_alembic()
    from alembic import command

    engine = create_engine("sqlite://")
    try:
        with engine.begin() as conn, _quiet():
            command.upgrade(alembic_config(conn), revision)
            return shape(conn)
    finally:
        engine.dispose()


def recognise(conn: Connection, url: str) -> str | None:
    """The revision an unrecorded database's tables match: head, the baseline, or None when it has none
    of the store's tables. Tables that are not the store's are ignored. StoreError when it matches
    neither, naming the differences."""
    if not set(inspect(conn).get_table_names()) - {VERSION_TABLE}:
        return None  # an empty database (the common case: answered without building the shapes)
    expected = {rev: revision_shape(rev) for rev in (head(), BASELINE)}
    ours = set().union(*(set(s) for s in expected.values()))
    found = shape(conn, ours)
    if not found:
        return None
    for rev, want in expected.items():
        if found == want:
            return rev
    raise StoreError(
        f"{url}: the database has the store's tables but no recorded revision, and they match neither revision "
        f"{BASELINE} (the release before migrations) nor {head()} (this release): "
        f"against {head()}: {_differences(found, expected[head()])}; "
        f"against {BASELINE}: {_differences(found, expected[BASELINE])}. "
        "Restore it from a backup of a released version, or bring it to one of the two by hand"
    )


def _differences(found: Shape, want: Shape, limit: int = 6) -> str:
    """What ``found`` lacks or has beyond ``want``, shortest first, at most ``limit`` items."""
    items = [f"no table {t}" for t in sorted(set(want) - set(found))]
    items += [f"extra table {t}" for t in sorted(set(found) - set(want))]
    for t in sorted(set(found) & set(want)):
        (cols, ixs), (want_cols, want_ixs) = found[t], want[t]
        items += [f"no column {t}.{c}" for c in sorted(want_cols - cols)]
        items += [f"extra column {t}.{c}" for c in sorted(cols - want_cols)]
        items += [f"no index {i}" for i in sorted(want_ixs - ixs)]
        items += [f"extra index {i}" for i in sorted(ixs - want_ixs)]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _lock(conn: Connection) -> None:
    """Serialise schema changes: PostgreSQL's transaction-scoped advisory lock. (On SQLite the caller's
    write transaction already holds the file's write lock.)"""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})


def _stamp(conn: Connection, revision: str) -> None:
    """Record ``revision`` in ``alembic_version`` without running anything."""
    _load_alembic()
    from alembic.runtime.migration import MigrationContext

    with _quiet():
        MigrationContext.configure(conn).stamp(script_directory(), revision)


def _refuse_unknown(url: str, revision: str) -> None:
    if not known(revision):
        raise StoreError(
            f"{url}: the database schema is at revision {revision}, which this release does not know "
            f"(its newest is {head()}): a newer release upgraded it; run that release"
        )


def ensure_current(conn: Connection, url: str) -> str:
    """What opening a store does, inside its write transaction: ``created`` an empty database's schema
    (``create_all``, then head recorded), ``recorded`` head on an unrecorded database that has it,
    ``current`` when at head already. Anything older raises SchemaOutdated: no silent upgrade."""
    _lock(conn)
    st = state(conn, url)
    if st.recorded and st.revision is not None:
        _refuse_unknown(url, st.revision)
    if st.revision is None:
        Base.metadata.create_all(conn)
        _stamp(conn, st.head)
        return "created"
    if not st.at_head:
        unrecorded = "" if st.recorded else " (not recorded: the database predates migrations)"
        raise SchemaOutdated(url, f"{st.revision}{unrecorded}", st.head)
    if not st.recorded:
        _stamp(conn, st.head)
        log.info("%s: recognised revision %s (created before migrations) and recorded it", url, st.head)
        return "recorded"
    return "current"


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade` did: the state it found, and the revision the database is at now."""

    before: SchemaState
    after: str

    @property
    def changed(self) -> bool:
        return not (self.before.recorded and self.before.revision == self.after)


def upgrade(conn: Connection, url: str) -> Upgrade:
    """Bring the database to head inside the caller's transaction (all or nothing): an empty one gets
    every revision, an unrecorded one is recognised and stamped first, then the pending revisions run.
    Running it again is a no-op."""
    _load_alembic()
    from alembic import command

    _lock(conn)
    before = state(conn, url)
    if before.revision is not None:
        if before.recorded:
            _refuse_unknown(url, before.revision)
        else:
            _stamp(conn, before.revision)
    if before.revision != before.head:
        log.info("%s: migrating from revision %s to %s", url, before.revision or "(empty)", before.head)
        with _quiet():
            command.upgrade(alembic_config(conn), "head")
    after = recorded_revision(conn)
    assert after == before.head, f"{url}: upgrade ended at {after}, not {before.head}"
    return Upgrade(before, after)


def schema_diff(conn: Connection) -> list[Any]:
    """Alembic autogenerate's differences between the database and :mod:`trainer.store.schema`
    (empty when the migrations produce exactly the models' schema)."""
    _load_alembic()
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with _quiet():
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))
