"""The webhook delivery queue in the store: alerts become deliveries, kept until delivered or given up.

Alerts raised by any process (ingest workers, the service) while the dispatcher was down are delivered
when it runs again. A new webhook starts at the newest alert: it receives what happens from then on,
not the history.

Which alerts still need a delivery is decided per alert, not by the newest id seen: on PostgreSQL ids
come from a sequence, so alert 10 may commit after alert 11 (two ingest workers, or the service and a
worker), and a cursor moved to 11 would skip 10 for ever. Each pass queues every alert of the wanted
kinds above the webhook's cursor that has no delivery row yet (the unique (webhook, alert) pair makes a
second pass a no-op). The cursor only moves up to an id the caller saw as the newest a while ago
(``settled``, see :class:`trainer.fleet.webhooks.Settled`), so an alert still being written below it
would have had to stay uncommitted that long to be missed; the cursor bounds how many alerts a pass
looks at.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select, update

from trainer.store.console_queries import Page
from trainer.store.engine import insert
from trainer.store.schema import Alert, WebhookCursor, WebhookDelivery
from trainer.store.store import Store

STATES = ("pending", "delivered", "failed")
"""A delivery's states: pending (to attempt, now or at ``next_attempt_at``), delivered, failed."""


@dataclass(frozen=True)
class Due:
    """A delivery to attempt now, with its alert."""

    delivery_id: int
    attempts: int
    alert: Alert


@dataclass(frozen=True)
class Enqueued:
    """What one pass queued, and the newest alert id it could see (the caller's next ``settled``)."""

    queued: int
    newest: int


@dataclass(frozen=True)
class DeliveryRow:
    """One delivery as the console and the CLI list it: its webhook, its alert, where it stands."""

    id: int
    webhook: str
    alert_id: int
    kind: str
    severity: str
    fleet: str | None
    device: str | None
    state: str
    attempts: int
    next_attempt_at: float | None
    """When the next attempt is due (pending only)."""
    last_error: str | None
    created_at: float
    delivered_at: float | None


def enqueue(
    store: Store, webhook: str, kinds: Iterable[str] | None, now: float, settled: int | None = None
) -> Enqueued:
    """Queue every alert (of ``kinds``, or all) above the webhook's cursor that has no delivery yet,
    then move the cursor up to ``settled`` (an id seen as the newest long enough ago)."""
    with store.write() as conn:
        cursor = conn.scalar(select(WebhookCursor.last_alert_id).where(WebhookCursor.webhook == webhook))
        newest = int(conn.scalar(select(func.max(Alert.id))) or 0)
        if cursor is None:  # a new webhook: what is there now is history
            conn.execute(insert(conn, WebhookCursor.__table__), {"webhook": webhook, "last_alert_id": newest})
            return Enqueued(0, newest)
        q = select(Alert.id).where(
            Alert.id > cursor,
            ~exists().where(WebhookDelivery.webhook == webhook, WebhookDelivery.alert_id == Alert.id),
        )
        if kinds is not None:
            q = q.where(Alert.kind.in_(list(kinds)))
        rows = [
            {
                "webhook": webhook,
                "alert_id": aid,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for aid in conn.scalars(q.order_by(Alert.id))
        ]
        if rows:
            stmt = insert(conn, WebhookDelivery.__table__).on_conflict_do_nothing(
                index_elements=["webhook", "alert_id"]
            )
            conn.execute(stmt, rows)
        if settled is not None and settled > cursor:
            conn.execute(
                update(WebhookCursor)
                .where(WebhookCursor.webhook == webhook)
                .values(last_alert_id=min(settled, newest))
            )
        return Enqueued(len(rows), newest)


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
    """Record the attempt that delivered it."""
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
    values: dict[str, Any] = {"attempts": WebhookDelivery.attempts + 1, "last_error": error[:2000]}
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


def delivery_page(
    store: Store,
    *,
    states: Collection[str] | None = None,
    webhook: str | None = None,
    fleet: str | None = None,
    alert_id: int | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page:
    """Deliveries (of ``states``, one webhook, one fleet's alerts or one alert), newest first, as
    :class:`DeliveryRow`; filtered, counted and cut in SQL."""
    conds: list[ColumnElement[bool]] = []
    if states is not None:
        conds.append(WebhookDelivery.state.in_(list(states)))
    for col, value in ((WebhookDelivery.webhook, webhook), (Alert.fleet, fleet)):
        if value:
            conds.append(col == value)
    if alert_id is not None:
        conds.append(WebhookDelivery.alert_id == alert_id)
    q = (
        select(WebhookDelivery, Alert.kind, Alert.severity, Alert.fleet, Alert.device)
        .join(Alert, Alert.id == WebhookDelivery.alert_id)
        .where(and_(True, *conds))
    )
    with store.read_session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        got = s.execute(q.order_by(WebhookDelivery.id.desc()).limit(limit).offset(offset)).all()
    return Page([_row(d, *rest) for d, *rest in got], int(total), limit, offset)


def _row(d: WebhookDelivery, kind: str, severity: str, fleet: str | None, device: str | None) -> DeliveryRow:
    """A delivery and its alert's fields as one row."""
    return DeliveryRow(
        id=d.id,
        webhook=d.webhook,
        alert_id=d.alert_id,
        kind=kind,
        severity=severity,
        fleet=fleet,
        device=device,
        state=d.state,
        attempts=d.attempts,
        next_attempt_at=d.next_attempt_at if d.state == "pending" else None,
        last_error=d.last_error,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
    )
