"""The trainer's store: SQLAlchemy 2 tables and a :class:`Store` facade over SQLite or PostgreSQL.

``Store("sqlite:///fleet.db")`` (the default: one file, WAL) or
``Store("postgresql+psycopg://user@host/db")`` (a real server, several ingest workers). Tables:
devices, status_history, windows, samples, labels, update_events, models, releases, rollouts, alerts,
audit_log, dead_letters, and those of device health, roll-ups, webhooks and console access
(:mod:`trainer.store.schema`). Ingest writes batches through
:mod:`trainer.store.ingest_writes` inside one transaction per batch; everything else goes through
the facade. The schema is versioned with Alembic (:mod:`trainer.store.migrate`, revisions in
``trainer/store/migrations/``): a new database is created at head, a deployed one is migrated by
``edgefleet db upgrade``, and a store refuses to open a database whose schema is older than the release's.
"""

from trainer.store.engine import is_transient, make_engine
from trainer.store.ingest_writes import ModelCheck, Received, Rejected, WriteResult
from trainer.store.schema import (
    Alert,
    AuditEntry,
    Base,
    DeadLetter,
    Device,
    DeviceReferenceRecord,
    Label,
    ModelRecord,
    ReferenceRebase,
    Release,
    Rollout,
    Sample,
    StatusEvent,
    UpdateEventRecord,
    Window,
)
from trainer.store.store import Store

__all__ = [
    "Alert",
    "AuditEntry",
    "Base",
    "DeadLetter",
    "Device",
    "DeviceReferenceRecord",
    "Label",
    "ModelCheck",
    "ModelRecord",
    "Received",
    "ReferenceRebase",
    "Rejected",
    "Release",
    "Rollout",
    "Sample",
    "StatusEvent",
    "Store",
    "UpdateEventRecord",
    "Window",
    "WriteResult",
    "is_transient",
    "make_engine",
]
