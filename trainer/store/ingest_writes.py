"""Batch writes of validated device messages, inside the caller's transaction (one per ingest batch).

Windows, samples (once per device + image sha256) and updater events (once per device, session,
seq) are inserted with ``ON CONFLICT DO NOTHING``; status messages go to the status history once each.

Windows are inserted with ``INSERT .. ON CONFLICT (device, session, seq) DO NOTHING`` (see
:func:`~trainer.store.engine.bulk_insert`), so a redelivered or duplicated window is stored once and
counted as a duplicate, on SQLite and PostgreSQL alike, even when two workers race. Late
(out-of-order) windows are stored like any other; the device row only moves forward (newest window
end; the current status by :func:`edge_agent.protocol.status_order`, see :func:`status_order_sql`).

Model integrity, kept simple on purpose:

* unknown model: the window's ``model.sha256`` is not in ``models``. The window is stored with
  ``model_known = False`` and one ``unknown_model`` alert is raised per (device, sha256).
* model never sent: the model is registered, but the device was never sent it, i.e. it is neither the
  first model the device ever reported (its provisioning image) nor the model of a release in a
  rollout that named the device or covered its whole fleet (``device`` NULL; a canary cohort is not
  resolved to its devices). One ``model_not_sent`` alert per (device, sha256).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import ColumnElement, Connection, and_, case, func, literal, or_, select, tuple_

from edge_agent.image_header import check_image_size
from edge_agent.protocol import ModelRef, Status, TelemetryWindow, UpdateEvent, status_order
from edge_agent.protocol import Sample as SampleMessage
from trainer.store.engine import bulk_insert, insert
from trainer.store.records import insert_alert
from trainer.store.schema import (
    DEAD_LETTER_KEEP_BYTES,
    DeadLetter,
    Device,
    ModelRecord,
    Release,
    RemovedDevice,
    Rollout,
    StatusEvent,
    Window,
)

M = TypeVar("M")

WINDOWS = Window.__table__
DEVICES = Device.__table__
STATUS = StatusEvent.__table__
DEAD = DeadLetter.__table__
REMOVED = RemovedDevice.__table__


@dataclass(frozen=True, slots=True)
class Received(Generic[M]):
    """A validated message with the JSON text it came as and when it arrived."""

    message: M
    raw: str
    received_at: float


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that can never become valid: it goes to the dead-letter table."""

    topic: str
    payload: bytes
    reason: str
    detail: str
    received_at: float


@dataclass(slots=True)
class WriteResult:
    """What one batch write did."""

    stored: int = 0
    duplicates: int = 0
    unknown_model: int = 0
    """Stored windows/statuses whose model is not registered."""
    alerts: int = 0
    """New alerts raised (unknown model, model never sent)."""
    refused: Counter[str] = field(default_factory=Counter)
    """Valid messages refused for what the store knows (another fleet, other histogram bins), by reason;
    they are dead-lettered."""
    dead_letters_dropped: int = 0
    """Rejected messages only counted, not kept, because the dead-letter caps were reached."""

    def add(self, other: WriteResult) -> WriteResult:
        self.dead_letters_dropped += other.dead_letters_dropped
        self.refused.update(other.refused)
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.unknown_model += other.unknown_model
        self.alerts += other.alerts
        return self


class ModelCheck:
    """Which model sha256s are registered and which (device, model) pairs were sent, cached per worker.

    Positive answers never change (a registered model stays registered, a sent model stays sent), so
    they are cached for good; negative ones are re-checked after ``negative_ttl_s`` so a model
    registered, or a rollout recorded, after its first windows arrived is recognised. Alert keys
    already in the table are remembered once the transaction that saw them commits
    (:meth:`committed`), so a device stuck on an unknown model costs no query per batch.
    """

    def __init__(self, negative_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.negative_ttl_s = negative_ttl_s
        self._clock = clock
        self._known: set[str] = set()
        self._unknown_until: dict[str, float] = {}
        self._sent: set[tuple[str, str]] = set()
        self._not_sent_until: dict[tuple[str, str], float] = {}
        self._sent_pending: set[tuple[str, str]] = set()
        self._alerted: set[str] = set()
        self._alerting: set[str] = set()
        self._edges: dict[str, dict[str, list[float]]] = {}
        self._fleets: dict[str, str] = {}

    def alerted(self, key: str) -> bool:
        """Whether an alert with this dedupe key is known to be stored."""
        return key in self._alerted

    def alerting(self, key: str) -> None:
        """An alert with this key is stored (or was found) by the current transaction."""
        self._alerting.add(key)

    def committed(self) -> None:
        """The current transaction committed: what it wrote (alerts, first models) is there for good."""
        self._alerted |= self._alerting
        self._alerting.clear()
        self._sent |= self._sent_pending
        self._sent_pending.clear()

    def rolled_back(self) -> None:
        self._alerting.clear()
        self._sent_pending.clear()

    def fleets(self, conn: Connection, devices: Iterable[str]) -> dict[str, str]:
        """The fleet each of ``devices`` is registered in (absent: never heard from). Cached for good:
        ingest refuses messages that would move a device to another fleet."""
        ask = {d for d in devices if d not in self._fleets}
        if ask:
            self._fleets.update(registered_fleets(conn, ask))
        return self._fleets

    def edges(self, conn: Connection, sha: str) -> dict[str, list[float]] | None:
        """The histogram edges of a registered model (its ``telemetry_edges``); None if not registered.
        Cached for good: a registered model's package never changes."""
        if sha in self._edges:
            return self._edges[sha]
        text = conn.scalar(select(ModelRecord.manifest).where(ModelRecord.sha256 == sha))
        if text is None:
            return None
        edges = json.loads(text).get("telemetry_edges") or {}
        self._edges[sha] = edges
        return edges

    def edges_problem(self, conn: Connection, window: TelemetryWindow) -> str | None:
        """Why a window's histograms cannot be compared with its model's reference (other bins), or None.
        Such a window would be skipped by drift detection; refused at ingest it costs only itself."""
        edges = self.edges(conn, window.model.sha256)
        if not edges:
            return None
        bad = sorted(n for n, h in window.histograms.items() if n in edges and h.edges != edges[n])
        if not bad:
            return None
        return f"histogram bins of {', '.join(bad)} differ from those of model {window.model.name} {window.model.version}"

    def known(self, conn: Connection, shas: Iterable[str]) -> set[str]:
        """The subset of ``shas`` registered in ``models``."""
        now = self._clock()
        ask = {s for s in shas if s not in self._known and self._unknown_until.get(s, 0.0) <= now}
        if ask:
            found = set(conn.scalars(select(ModelRecord.sha256).where(ModelRecord.sha256.in_(ask))))
            self._known |= found
            for s in ask - found:
                self._unknown_until[s] = now + self.negative_ttl_s
        return {s for s in shas if s in self._known}

    def not_sent(self, conn: Connection, pairs: Mapping[tuple[str, str], str]) -> set[tuple[str, str]]:
        """Of ``{(device, sha256): fleet}``, the pairs whose device was never sent that model.

        A device was sent a model when it is the first model it ever reported (its provisioning
        image) or the model of a release in a rollout that named the device or covered its fleet.
        Two queries for all the pairs of a batch not answered by the caches.
        """
        now = self._clock()
        known = self._sent | self._sent_pending
        out = {k for k in pairs if k not in known and self._not_sent_until.get(k, 0.0) > now}
        ask = {k: f for k, f in pairs.items() if k not in known and k not in out}
        if not ask:
            return out
        first = dict(
            conn.execute(
                select(Device.device, Device.first_model_sha256).where(Device.device.in_({d for d, _ in ask}))
            ).all()
        )
        covered = conn.execute(
            select(Rollout.device, Rollout.fleet, Release.model_sha256)
            .join(Release, Release.id == Rollout.release_id)
            .where(Release.model_sha256.in_({sha for _, sha in ask}))
        ).all()
        to_device = {(d, sha) for d, _, sha in covered if d is not None}
        to_fleet = {(f, sha) for d, f, sha in covered if d is None}
        for (device, sha), fleet in ask.items():
            if first.get(device) == sha or (device, sha) in to_device or (fleet, sha) in to_fleet:
                self._sent_pending.add((device, sha))  # the first model may come from this transaction
            else:
                self._not_sent_until[(device, sha)] = now + self.negative_ttl_s
                out.add((device, sha))
        return out


def _model_alerts(
    conn: Connection,
    seen: dict[tuple[str, str], tuple[str, ModelRef]],
    known: set[str],
    check: ModelCheck,
    actor: str,
) -> int:
    """Raise unknown_model / model_not_sent alerts (once each) for the (device, sha) pairs just stored."""
    raised = 0
    not_sent = check.not_sent(conn, {k: fleet for k, (fleet, _) in seen.items() if k[1] in known})
    for (device, sha), (fleet, ref) in seen.items():
        what = f"{ref.name} {ref.version} ({sha[:12]})"
        if sha not in known:
            kind, msg = "unknown_model", f"device {device} reports model {what}, which is not registered"
        elif (device, sha) in not_sent:
            kind, msg = "model_not_sent", f"device {device} reports model {what} it was never sent"
        else:
            continue
        key = f"{kind}:{device}:{sha}"
        if check.alerted(key):
            continue
        new = insert_alert(
            conn,
            kind=kind,
            message=msg,
            fleet=fleet,
            device=device,
            actor=actor,
            details={"model": ref.model_dump(exclude_none=True)},
            dedupe_key=key,
        )
        check.alerting(key)
        raised += new is not None
    return raised


WINDOW_COLUMNS = (
    "fleet",
    "device",
    "session",
    "seq",
    "start",
    "end",
    "model_name",
    "model_version",
    "model_sha256",
    "artifact",
    "frames_inferred",
    "frames_failed",
    "confidence_mean",
    "atc_above",
    "model_known",
    "payload",
    "received_at",
)


def write_windows(
    conn: Connection, items: Sequence[Received[TelemetryWindow]], check: ModelCheck, actor: str = "ingest"
) -> WriteResult:
    """Store windows once per (device, session, seq), update their devices, raise model alerts.

    ``unknown_model`` counts the distinct windows of the batch whose model is not registered.
    """
    if not items:
        return WriteResult()
    unique: dict[tuple[str, int, int], Received[TelemetryWindow]] = {}
    for it in items:
        w = it.message
        unique.setdefault((w.device, w.session, w.seq), it)
    known = check.known(conn, {it.message.model.sha256 for it in unique.values()})
    rows = []
    # Rows in key order: concurrent batches (two workers, a redelivery) then lock index entries in the
    # same order and wait for each other instead of deadlocking.
    for _, it in sorted(unique.items()):
        w = it.message
        m = w.model
        rows.append(
            (
                w.fleet,
                w.device,
                w.session,
                w.seq,
                w.start,
                w.end,
                m.name,
                m.version,
                m.sha256,
                m.artifact,
                w.frames.inferred,
                w.frames.failed,
                w.confidence_mean,
                w.atc_above,
                m.sha256 in known,
                it.raw,
                it.received_at,
            )
        )
    stored = bulk_insert(conn, "windows", WINDOW_COLUMNS, ("device", "session", "seq"), rows)
    result = WriteResult(stored=stored, duplicates=len(items) - stored)
    if not stored:  # all seen before: their devices and alerts were handled then
        return result
    # Which of the batch were new is not reported by executemany; updating devices and checking
    # models for the duplicates too is harmless (same data, alerts raised once).
    fresh = [it for _, it in sorted(unique.items())]
    _upsert_devices_from_windows(conn, since_removal(conn, fresh, lambda w: (w.device, w.end)))
    seen: dict[tuple[str, str], tuple[str, ModelRef]] = {}
    for it in fresh:
        w = it.message
        seen.setdefault((w.device, w.model.sha256), (w.fleet, w.model))
        result.unknown_model += w.model.sha256 not in known
    result.alerts = _model_alerts(conn, seen, known, check, actor)
    return result


_DEVICE_COLUMNS = (
    "device",
    "fleet",
    "first_seen",
    "last_seen",
    "last_window_end",
    "session",
    "agent_version",
    "model_name",
    "model_version",
    "model_sha256",
    "first_model_sha256",
)
_FOLLOW_NEWEST = (
    "last_window_end",
    "session",
    "agent_version",
    "model_name",
    "model_version",
    "model_sha256",
)


_NEWER = "devices.last_window_end IS NULL OR excluded.last_window_end >= devices.last_window_end"
_DEVICE_UPDATE = ", ".join(
    [
        "fleet = excluded.fleet",
        "last_seen = CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen ELSE devices.last_seen END",
        "first_model_sha256 = COALESCE(devices.first_model_sha256, excluded.first_model_sha256)",
        *(f"{c} = CASE WHEN {_NEWER} THEN excluded.{c} ELSE devices.{c} END" for c in _FOLLOW_NEWEST),
    ]
)
"""The devices upsert of a window batch, in plain SQL (the same text on SQLite and PostgreSQL)."""


def since_removal(
    conn: Connection, items: Sequence[Received[M]], key: Callable[[M], tuple[str, float]]
) -> list[Received[M]]:
    """The items that may create or move their device's row: a device removed from its fleet
    (``removed_devices``) comes back only with a message newer, by its own time (``key``: device and
    time), than its removal; a late window or a last will from before it is stored but revives nothing."""
    devices = {key(it.message)[0] for it in items}
    q = select(REMOVED.c.device, REMOVED.c.removed_at).where(REMOVED.c.device.in_(devices))
    removed = {d: float(at) for d, at in conn.execute(q)}
    if not removed:
        return list(items)
    return [it for it in items if key(it.message)[1] >= removed.get(key(it.message)[0], float("-inf"))]


def _upsert_devices_from_windows(conn: Connection, stored: Sequence[Received[TelemetryWindow]]) -> None:
    """Create or move forward each device's row: newest window, current model, first model ever."""
    newest: dict[str, Received[TelemetryWindow]] = {}
    first: dict[str, Received[TelemetryWindow]] = {}
    last_seen: dict[str, float] = {}
    for it in stored:
        w = it.message
        dev = w.device
        cur = newest.get(dev)
        if cur is None or w.end >= cur.message.end:
            newest[dev] = it
        f = first.get(dev)
        if f is None or (w.session, w.seq) < (f.message.session, f.message.seq):
            first[dev] = it
        if it.received_at > last_seen.get(dev, 0.0):
            last_seen[dev] = it.received_at
    rows = []
    for dev, it in sorted(newest.items()):
        w, m = it.message, it.message.model
        rows.append(
            (
                dev,
                w.fleet,
                last_seen[dev],
                last_seen[dev],
                w.end,
                w.session,
                w.agent_version,
                m.name,
                m.version,
                m.sha256,
                first[dev].message.model.sha256,
            )
        )
    bulk_insert(conn, "devices", _DEVICE_COLUMNS, ("device",), rows, _DEVICE_UPDATE)


def write_statuses(
    conn: Connection, items: Sequence[Received[Status]], check: ModelCheck, actor: str = "ingest"
) -> WriteResult:
    """Append status messages to the history once each and move each device's state forward."""
    if not items:
        return WriteResult()
    rows = [
        {
            "fleet": s.fleet,
            "device": s.device,
            "session": s.session,
            "state": s.state,
            "ts": s.ts,
            "connection": s.connection,
            "model_sha256": s.model.sha256 if s.model else None,
            "payload": it.raw,
            "received_at": it.received_at,
        }
        for it in items
        for s in (it.message,)
    ]
    stmt = insert(conn, STATUS).on_conflict_do_nothing(index_elements=["device", "session", "state", "ts"])
    c = STATUS.c
    inserted = {tuple(r) for r in conn.execute(stmt.returning(c.device, c.session, c.state, c.ts), rows)}
    stored = [
        it
        for it in items
        if (it.message.device, it.message.session, it.message.state, it.message.ts) in inserted
    ]
    # the same status twice in one batch: both keys are in ``inserted``; count it once
    stored = list(
        {(i.message.device, i.message.session, i.message.state, i.message.ts): i for i in stored}.values()
    )
    result = WriteResult(stored=len(stored), duplicates=len(items) - len(stored))
    if not stored:
        return result
    _advance_devices(conn, since_removal(conn, stored, lambda s: (s.device, s.ts)))
    seen = {
        (it.message.device, it.message.model.sha256): (it.message.fleet, it.message.model)
        for it in stored
        if it.message.model is not None
    }
    if seen:
        known = check.known(conn, {sha for _, sha in seen})
        result.unknown_model = sum(
            1 for it in stored if it.message.model and it.message.model.sha256 not in known
        )
        result.alerts = _model_alerts(conn, seen, known, check, actor)
    return result


def status_order_sql(
    session: ColumnElement, connection: ColumnElement, state: ColumnElement, ts: ColumnElement
) -> tuple[ColumnElement, ...]:
    """:func:`edge_agent.protocol.status_order` in SQL, over status columns (of the history or a device
    row), so the store picks the current status exactly as the wire contract says."""
    numbered = connection.is_not(None)
    return (
        session,
        func.coalesce(connection, literal(0)),
        case((and_(numbered, state == "offline"), 1), else_=0),
        ts,
    )


def _advance_devices(conn: Connection, stored: Sequence[Received[Status]]) -> None:
    """Move each device's row forward to its newest status (older statuses never overwrite newer)."""
    # Per device: the newest status, preceded by the newest one that names a model (a last will names
    # none), so a batch holding "online (model)" then "offline" still records the model.
    newest: dict[str, Received[Status]] = {}
    newest_model: dict[str, Received[Status]] = {}
    for it in sorted(stored, key=lambda i: status_order(i.message)):
        newest[it.message.device] = it
        if it.message.model is not None:
            newest_model[it.message.device] = it
    passes = [[it for dev, it in newest_model.items() if newest[dev] is not it], list(newest.values())]
    up = insert(conn, DEVICES)
    ex, d = up.excluded, DEVICES.c
    # The status ordered last wins (a last will's ts predates the birth it follows; a reconnect keeps
    # the session). Rows from before status_session existed take the next status.
    newer = or_(
        d.status_ts.is_(None),
        d.status_session.is_(None),
        tuple_(*status_order_sql(ex.status_session, ex.status_connection, ex.state, ex.status_ts))
        >= tuple_(*status_order_sql(d.status_session, d.status_connection, d.state, d.status_ts)),
    )
    follow = ("state", "status_session", "status_connection", "status_ts")
    set_ = {k: case((newer, ex[k]), else_=d[k]) for k in follow}
    # ``session`` also follows windows: it only moves forward
    set_["session"] = case((or_(d.session.is_(None), ex.session > d.session), ex.session), else_=d.session)
    for k in ("agent_version", "model_name", "model_version", "model_sha256"):
        set_[k] = case((and_(newer, ex[k].is_not(None)), ex[k]), else_=d[k])
    set_["first_model_sha256"] = case(
        (d.first_model_sha256.is_(None), ex.first_model_sha256), else_=d.first_model_sha256
    )
    set_["last_seen"] = case((ex.last_seen > d.last_seen, ex.last_seen), else_=d.last_seen)
    for rows_ in passes:
        if rows_:
            conn.execute(
                up.on_conflict_do_update(index_elements=["device"], set_=set_),
                [_device_row(i) for i in rows_],
            )


def _device_row(it: Received[Status]) -> dict:
    s, m = it.message, it.message.model
    return {
        "device": s.device,
        "fleet": s.fleet,
        "first_seen": it.received_at,
        "last_seen": it.received_at,
        "session": s.session,
        "state": s.state,
        "status_session": s.session,
        "status_connection": s.connection,
        "status_ts": s.ts,
        "agent_version": s.agent_version,
        "model_name": m.name if m else None,
        "model_version": m.version if m else None,
        "model_sha256": m.sha256 if m else None,
        "first_model_sha256": m.sha256 if m else None,
    }


DEAD_LETTERS_PER_DEVICE = 50
"""Distinct rejected payloads kept per device, all its topics together (a device has four ingest kinds
and may claim any fleet segment): a device flooding junk fills only this."""
DEAD_LETTERS_TOTAL = 5000
"""Distinct rejected payloads kept in all (about 20 MB at most with the kept prefix)."""
OVERFLOW_SHA256 = "0" * 64
"""payload_sha256 of an overflow row: its ``count`` is how many messages the caps dropped."""


@dataclass(frozen=True)
class DeadLetterCaps:
    """How many distinct rejected payloads are kept, per device (all its topics) and in all."""

    per_device: int = DEAD_LETTERS_PER_DEVICE
    total: int = DEAD_LETTERS_TOTAL


def dead_letter_source(topic: str) -> str:
    """What a dead letter counts against: ``ef/v1/+/dev/{device}/#`` for every topic of a device (under
    any fleet segment), else the topic itself; the overflow row of the caps is filed under it."""
    _, device = _fleet_and_device(topic)
    return f"ef/v1/+/dev/{device}/#" if device is not None else topic


def _dead_letter_rows(items: Sequence[Rejected]) -> dict[tuple[str, str], dict]:
    """One row per (topic, payload sha256): identical rejected payloads on a topic count up."""
    rows: dict[tuple[str, str], dict] = {}
    for r in items:
        sha = hashlib.sha256(r.payload).hexdigest()
        row = rows.get((r.topic, sha))
        if row is None:
            rows[(r.topic, sha)] = {
                "topic": r.topic,
                "payload": r.payload[:DEAD_LETTER_KEEP_BYTES],
                "payload_size": len(r.payload),
                "payload_sha256": sha,
                "reason": r.reason,
                "detail": r.detail[:2000],
                "count": 1,
                "first_received_at": r.received_at,
                "last_received_at": r.received_at,
            }
        else:
            row["count"] += 1
            row["last_received_at"] = max(row["last_received_at"], r.received_at)
    return rows


def _kept_per_source(conn: Connection) -> Counter[str]:
    """Distinct payloads kept so far per :func:`dead_letter_source` (overflow rows are counts, not kept);
    at most ``total`` rows are ever kept, so this reads a bounded table."""
    per_topic = conn.execute(
        select(DEAD.c.topic, func.count())
        .where(DEAD.c.payload_sha256 != OVERFLOW_SHA256)
        .group_by(DEAD.c.topic)
    ).all()
    kept: Counter[str] = Counter()
    for topic, n in per_topic:
        kept[dead_letter_source(topic)] += n
    return kept


def _overflow_row(source: str, row: dict, caps: DeadLetterCaps) -> dict:
    """The row counting what the caps dropped from ``source`` (filed under the source, not a topic)."""
    return {
        **row,
        "topic": source,
        "payload": b"",
        "payload_size": 0,
        "payload_sha256": OVERFLOW_SHA256,
        "reason": "over_cap",
        "detail": f"dropped over the caps ({caps.per_device} per device, {caps.total} in all)",
        "count": 0,
    }


def _within_caps(
    conn: Connection, rows: dict[tuple[str, str], dict], caps: DeadLetterCaps
) -> tuple[list[dict], dict[str, dict]]:
    """Split new rows into those kept and, per source (a device's topics), an overflow row counting
    the ones dropped."""
    have = set(
        conn.execute(
            select(DEAD.c.topic, DEAD.c.payload_sha256).where(
                DEAD.c.topic.in_({t for t, _ in rows}), DEAD.c.payload_sha256.in_({s for _, s in rows})
            )
        ).all()
    )
    kept = _kept_per_source(conn)
    total = sum(kept.values())
    keep: list[dict] = []
    overflow: dict[str, dict] = {}
    for key, row in sorted(rows.items(), key=lambda kv: kv[1]["first_received_at"]):
        source = dead_letter_source(key[0])
        if key in have:  # a known payload only counts up
            keep.append(row)
        elif kept[source] < caps.per_device and total < caps.total:
            keep.append(row)
            kept[source] += 1
            total += 1
        else:
            over = overflow.setdefault(source, _overflow_row(source, row, caps))
            over["count"] += row["count"]
            over["first_received_at"] = min(over["first_received_at"], row["first_received_at"])
            over["last_received_at"] = max(over["last_received_at"], row["last_received_at"])
    return keep, overflow


def write_dead_letters(
    conn: Connection, items: Sequence[Rejected], caps: DeadLetterCaps | None = None, actor: str = "ingest"
) -> int:
    """Keep rejected messages (truncated) with their reason, within ``caps`` (per device, all its topics
    together, and in all); identical ones on a topic count up. Returns how many were dropped over the
    caps: they are counted in the device's ``over_cap`` row (topic ``ef/v1/+/dev/{device}/#``), and the
    first drop of a device raises a ``dead_letters_capped`` alert."""
    if not items:
        return 0
    caps = caps or DeadLetterCaps()
    keep, overflow = _within_caps(conn, _dead_letter_rows(items), caps)
    stmt = insert(conn, DEAD)
    stmt = stmt.on_conflict_do_update(
        index_elements=["topic", "payload_sha256"],
        set_={
            "count": DEAD.c["count"] + stmt.excluded["count"],
            "last_received_at": stmt.excluded.last_received_at,
        },
    )
    conn.execute(stmt, keep + list(overflow.values()))
    topic_of = {dead_letter_source(r.topic): r.topic for r in items}  # the fleet a device last claimed
    for source in overflow:
        fleet, device = _fleet_and_device(topic_of[source])
        insert_alert(
            conn,
            kind="dead_letters_capped",
            message=f"rejected messages from {source} exceed the dead-letter caps; further ones are only counted",
            fleet=fleet,
            device=device,
            details={"per_device": caps.per_device, "total": caps.total},
            dedupe_key=f"dead_letters_capped:{source}",
            actor=actor,
        )
    return sum(row["count"] for row in overflow.values())


def registered_fleets(conn: Connection, devices: Iterable[str]) -> dict[str, str]:
    """The fleet each of ``devices`` is registered in (devices never heard from are absent)."""
    wanted = set(devices)
    if not wanted:
        return {}
    return dict(conn.execute(select(Device.device, Device.fleet).where(Device.device.in_(wanted))).all())


def foreign_fleet_alert(
    conn: Connection, device: str, registered: str, claimed: str, actor: str
) -> int | None:
    """Alert once per (device, claimed fleet) that a device sent messages under a fleet not its own."""
    return insert_alert(
        conn,
        kind="fleet_mismatch",
        severity="critical",
        message=f"device {device} of fleet {registered} sent messages under fleet {claimed}: refused",
        fleet=registered,
        device=device,
        details={"claimed_fleet": claimed},
        dedupe_key=f"fleet_mismatch:{device}:{claimed}",
        actor=actor,
    )


def _fleet_and_device(topic: str) -> tuple[str | None, str | None]:
    """Fleet and device of a device topic ``ef/v1/{fleet}/dev/{device}/...`` (None for other topics)."""
    parts = topic.split("/")
    if len(parts) >= 5 and parts[3] == "dev":
        return parts[2], parts[4]
    return None, None


SAMPLE_MAX_SIDE = 1920
"""Largest side of a sample image (the agent's ``sampling.max_side`` is at most this)."""


def sample_image(sample: SampleMessage) -> bytes:
    """The JPEG bytes of a sample message; raises ValueError if they are not base64, not its sha256, or
    a JPEG whose header declares other dimensions than the message (or a side over SAMPLE_MAX_SIDE)."""
    try:
        image = base64.b64decode(sample.jpeg_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"jpeg_b64 is not base64 ({exc})") from None
    digest = hashlib.sha256(image).hexdigest()
    if digest != sample.sha256:
        raise ValueError(
            f"image sha256 {digest[:12]}... does not match the message's {sample.sha256[:12]}..."
        )
    size = check_image_size(
        image, max_pixels=SAMPLE_MAX_SIDE * SAMPLE_MAX_SIDE
    )  # ImageHeaderError is a ValueError
    if size is None:
        raise ValueError("the image is not a JPEG")
    if size != (sample.width, sample.height):
        raise ValueError(
            f"the JPEG header declares {size[0]}x{size[1]}, the message {sample.width}x{sample.height}"
        )
    return image


_SAMPLE_COLUMNS = (
    "fleet",
    "device",
    "ts",
    "model_sha256",
    "consent_policy",
    "sha256",
    "content_type",
    "image",
    "provenance",
    "received_at",
)


def write_samples(
    conn: Connection, items: Sequence[Received[SampleMessage]], check: ModelCheck, actor: str = "ingest"
) -> WriteResult:
    """Store sample frames once per (device, image sha256) with their provenance, for the labelling queue.

    The image is kept inline (it is small: downscaled, at most the 256 KiB message limit); the message
    minus the image becomes the provenance (session, frame, why it was picked, the model's top-k,
    faces blurred, size, consent policy). Ingest checked the image against its sha256 already.
    """
    rows = []
    for it in sorted(items, key=lambda i: (i.message.device, i.message.sha256)):
        s = it.message
        provenance = s.model_dump(mode="json", exclude={"jpeg_b64", "v", "kind", "fleet", "device", "sha256"})
        rows.append(
            (
                s.fleet,
                s.device,
                s.ts,
                s.model.sha256,
                s.consent,
                s.sha256,
                "image/jpeg",
                sample_image(s),
                json.dumps(provenance, separators=(",", ":")),
                it.received_at,
            )
        )
    stored = bulk_insert(conn, "samples", _SAMPLE_COLUMNS, ("device", "sha256"), rows)
    return WriteResult(stored=stored, duplicates=len(items) - stored)


_UPDATE_COLUMNS = (
    "fleet",
    "device",
    "session",
    "seq",
    "ts",
    "state",
    "reason",
    "release",
    "model_sha256",
    "serving_sha256",
    "payload",
    "received_at",
)


def write_update_events(
    conn: Connection, items: Sequence[Received[UpdateEvent]], check: ModelCheck, actor: str = "ingest"
) -> WriteResult:
    """Store updater state changes once per (device, session, seq)."""
    unique = {(i.message.device, i.message.session, i.message.seq): i for i in items}
    rows = []
    for _, it in sorted(unique.items()):
        e = it.message
        rows.append(
            (
                e.fleet,
                e.device,
                e.session,
                e.seq,
                e.ts,
                e.state,
                e.reason,
                e.release,
                e.model.sha256 if e.model else None,
                e.serving.sha256 if e.serving else None,
                it.raw,
                it.received_at,
            )
        )
    stored = bulk_insert(conn, "update_events", _UPDATE_COLUMNS, ("device", "session", "seq"), rows)
    return WriteResult(stored=stored, duplicates=len(items) - stored)
