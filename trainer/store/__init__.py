"""The trainer's store: SQLAlchemy 2 tables and a :class:`Store` facade over SQLite or PostgreSQL.

``Store("sqlite:///fleet.db")`` (the default: one file, WAL) or
``Store("postgresql+psycopg://user@host/db")`` (a real server, several ingest workers). Tables:
devices, status_history, windows, samples, labels, update_events, models, releases, rollouts, alerts,
audit_log and dead_letters (:mod:`trainer.store.schema`). Ingest writes batches through
:mod:`trainer.store.ingest_writes` inside one transaction per batch; everything else goes through
the facade. The schema is created with ``metadata.create_all``; migrations come later.
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
