"""Alert and audit rows written inside a caller's transaction (by the Store facade and by ingest)."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy
from sqlalchemy import Connection

from trainer.store.engine import insert
from trainer.store.schema import Alert, AuditEntry


def _json(details: dict[str, Any] | None) -> str | None:
    return None if details is None else json.dumps(details, separators=(",", ":"), default=str)


def insert_audit(
    conn: Connection,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
    ts: float | None = None,
) -> None:
    """Append one audit entry: who (actor) did what (action) to which subject."""
    conn.execute(
        sqlalchemy.insert(AuditEntry),
        {
            "ts": time.time() if ts is None else ts,
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": _json(details),
        },
    )


def insert_alert(
    conn: Connection,
    *,
    kind: str,
    message: str,
    severity: str = "warning",
    fleet: str | None = None,
    device: str | None = None,
    details: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
    actor: str = "trainer",
    ts: float | None = None,
) -> int | None:
    """Record an alert (and its audit entry); with ``dedupe_key``, only the first one is kept.

    Returns the new alert's id, or None when an alert with the same ``dedupe_key`` already exists.
    """
    now = time.time() if ts is None else ts
    stmt = insert(conn, Alert.__table__).values(
        fleet=fleet,
        device=device,
        kind=kind,
        severity=severity,
        message=message,
        details=_json(details),
        dedupe_key=dedupe_key,
        created_at=now,
    )
    if dedupe_key is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=["dedupe_key"])
    row = conn.execute(stmt.returning(Alert.__table__.c.id)).first()
    if row is None:
        return None
    insert_audit(
        conn,
        actor,
        "alert.raise",
        device or fleet or "-",
        {"alert_id": row[0], "kind": kind, "message": message},
        ts=now,
    )
    return int(row[0])
