"""The webhook delivery queue in the store: alerts become deliveries, kept until delivered or given up.

A cursor per webhook remembers the newest alert it has considered, so alerts raised by any process
(ingest workers, the service) while the dispatcher was down are delivered when it runs again. A new
webhook starts at the newest alert: it receives what happens from then on, not the history.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select, update

from trainer.store.engine import insert
from trainer.store.schema import Alert, WebhookCursor, WebhookDelivery
from trainer.store.store import Store


@dataclass(frozen=True)
class Due:
    """A delivery to attempt now, with its alert."""

    delivery_id: int
    attempts: int
    alert: Alert


def enqueue(store: Store, webhook: str, kinds: Iterable[str] | None, now: float) -> int:
    """Queue the alerts raised since the webhook's cursor (of ``kinds``, or all); returns how many."""
    wanted = set(kinds) if kinds is not None else None
    with store.write() as conn:
        cursor = conn.scalar(select(WebhookCursor.last_alert_id).where(WebhookCursor.webhook == webhook))
        newest = conn.scalar(select(func.max(Alert.id))) or 0
        if cursor is None:
            conn.execute(insert(conn, WebhookCursor.__table__), {"webhook": webhook, "last_alert_id": newest})
            return 0
        q = select(Alert.id, Alert.kind).where(Alert.id > cursor, Alert.id <= newest).order_by(Alert.id)
        rows = [
            {
                "webhook": webhook,
                "alert_id": aid,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for aid, kind in conn.execute(q)
            if wanted is None or kind in wanted
        ]
        if rows:
            stmt = insert(conn, WebhookDelivery.__table__).on_conflict_do_nothing(
                index_elements=["webhook", "alert_id"]
            )
            conn.execute(stmt, rows)
        if newest > cursor:
            conn.execute(
                update(WebhookCursor).where(WebhookCursor.webhook == webhook).values(last_alert_id=newest)
            )
        return len(rows)


def due(store: Store, webhook: str, now: float, limit: int = 20) -> list[Due]:
    """Pending deliveries whose next attempt is due, oldest first."""
    q = (
        select(WebhookDelivery.id, WebhookDelivery.attempts, Alert)
        .join(Alert, Alert.id == WebhookDelivery.alert_id)
        .where(
            WebhookDelivery.webhook == webhook,
            WebhookDelivery.state == "pending",
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.id)
        .limit(limit)
    )
    with store.read_session() as s:
        return [Due(did, attempts, alert) for did, attempts, alert in s.execute(q)]


def delivered(store: Store, delivery_id: int, now: float) -> None:
    with store.write() as conn:
        conn.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(
                state="delivered", attempts=WebhookDelivery.attempts + 1, delivered_at=now, last_error=None
            )
        )


def attempt_failed(store: Store, delivery_id: int, error: str, retry_at: float | None) -> None:
    """Record a failed attempt: retried at ``retry_at``, or given up (``failed``) when it is None."""
    values = {"attempts": WebhookDelivery.attempts + 1, "last_error": error[:2000]}
    if retry_at is None:
        values["state"] = "failed"
    else:
        values["next_attempt_at"] = retry_at
    with store.write() as conn:
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))


def deliveries(store: Store, state: str | None = None) -> list[WebhookDelivery]:
    """Every delivery (or those in ``state``), oldest first: what was sent, is pending, or failed."""
    q = select(WebhookDelivery).order_by(WebhookDelivery.id)
    if state is not None:
        q = q.where(WebhookDelivery.state == state)
    with store.read_session() as s:
        return list(s.scalars(q))
