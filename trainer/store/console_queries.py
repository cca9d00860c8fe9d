"""The store's queries for the fleet manager console and the service state it reads.

Pages of lists are filtered, sorted and counted in SQL (a fleet of thousands of devices is one indexed
query, not a loop); the service writes each device's latest health here so the console, run as a
process of its own, shows the same estimate and drift state the service acts on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select, case, func, or_, select, update

from trainer.store.engine import insert
from trainer.store.records import insert_audit
from trainer.store.schema import (
    Alert,
    AuditEntry,
    Device,
    DeviceHealthRecord,
    Label,
    Release,
    Rollout,
    RolloutCheck,
    Sample,
    SampleFlag,
    Window,
)
from trainer.store.store import Store

DEVICE_SORTS = {
    "device": Device.device,
    "last_seen": func.coalesce(Device.last_window_end, Device.status_ts, Device.last_seen),
    "state": Device.state,
    "model_version": Device.model_version,
    "drift_state": DeviceHealthRecord.drift_state,
    "estimated_accuracy": DeviceHealthRecord.estimated_accuracy,
    "frames_per_second": DeviceHealthRecord.frames_per_second,
}
"""Columns the device list may be sorted by."""


@dataclass(frozen=True)
class HealthRow:
    """What the service knows about one device now (written each drift step)."""

    model_sha256: str
    drift_state: str | None
    reference: str | None
    estimated_accuracy: float | None
    low: float | None
    high: float | None
    method: str | None
    labels: int
    frames_per_second: float | None
    confidence_mean: float | None
    artifact: str | None = None


@dataclass(frozen=True)
class Page:
    """One page of a list and the total it was cut from."""

    items: list[Any]
    total: int
    limit: int
    offset: int


def put_device_health(store: Store, fleet: str, rows: Mapping[str, HealthRow], now: float) -> set[str]:
    """Upsert the latest health of each device in ``rows`` that is a device of ``fleet`` (one removed
    with ``forget-device`` gets none); returns the devices written."""
    if not rows:
        return set()
    with store.write() as conn:
        present = set(
            conn.scalars(select(Device.device).where(Device.fleet == fleet, Device.device.in_(list(rows))))
        )
        values = [
            {"device": d, "fleet": fleet, "updated_at": now, **vars(h)}
            for d, h in rows.items()
            if d in present
        ]
        if values:
            stmt = insert(conn, DeviceHealthRecord.__table__)
            cols = {c: getattr(stmt.excluded, c) for c in values[0] if c != "device"}
            conn.execute(stmt.on_conflict_do_update(index_elements=["device"], set_=cols), values)
    return present


def device_health(store: Store, device: str) -> DeviceHealthRecord | None:
    with store.read_session() as s:
        return s.get(DeviceHealthRecord, device)


def device_query(
    fleet: str | None, state: str | None, drift: str | None, search: str | None, model: str | None = None
) -> Select[Any]:
    q: Select[Any] = select(Device, DeviceHealthRecord).outerjoin(  # type: ignore[assignment]
        DeviceHealthRecord, DeviceHealthRecord.device == Device.device
    )
    if fleet:
        q = q.where(Device.fleet == fleet)
    if model:
        q = q.where(Device.model_sha256 == model)
    if state == "unknown":
        q = q.where(Device.state.is_(None))
    elif state:
        q = q.where(Device.state == state)
    if drift == "unknown":
        q = q.where(DeviceHealthRecord.drift_state.is_(None))
    elif drift:
        q = q.where(DeviceHealthRecord.drift_state == drift)
    if search:
        like = f"%{search.lower()}%"
        q = q.where(
            or_(
                func.lower(Device.device).like(like),
                func.lower(func.coalesce(Device.model_version, "")).like(like),
            )
        )
    return q


def device_page(
    store: Store,
    *,
    fleet: str | None = None,
    state: str | None = None,
    drift: str | None = None,
    search: str | None = None,
    model: str | None = None,
    sort: str = "device",
    order: Literal["asc", "desc"] = "asc",
    limit: int = 100,
    offset: int = 0,
) -> Page:
    """Devices with their health, filtered (``model``: the sha256 a device serves now), sorted (NULLs
    last) and paginated; items are ``(Device, DeviceHealthRecord | None)`` pairs."""
    q = device_query(fleet, state, drift, search, model)
    col = DEVICE_SORTS[sort]
    key = col.desc() if order == "desc" else col.asc()
    with store.read_session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = s.execute(q.order_by(col.is_(None), key, Device.device).limit(limit).offset(offset)).all()
    return Page([(d, h) for d, h in rows], int(total), limit, offset)


def state_counts(store: Store, fleet: str | None = None) -> dict[str, dict[str, int]]:
    """Devices per connection state and per drift state (``unknown`` where none is known yet)."""
    q = select(Device.state, DeviceHealthRecord.drift_state, func.count()).outerjoin(
        DeviceHealthRecord, DeviceHealthRecord.device == Device.device
    )
    if fleet:
        q = q.where(Device.fleet == fleet)
    out: dict[str, dict[str, int]] = {"state": {}, "drift": {}}
    with store.engine.connect() as conn:
        for st, dr, n in conn.execute(q.group_by(Device.state, DeviceHealthRecord.drift_state)):
            out["state"][st or "unknown"] = out["state"].get(st or "unknown", 0) + n
            out["drift"][dr or "unknown"] = out["drift"].get(dr or "unknown", 0) + n
    return out


def fleets(store: Store) -> list[tuple[str, int, int]]:
    """Each fleet with its device count and online count."""
    online = func.sum(case((Device.state == "online", 1), else_=0))
    q = select(Device.fleet, func.count(), online).group_by(Device.fleet).order_by(Device.fleet)
    with store.engine.connect() as conn:
        return [(f, int(n), int(o or 0)) for f, n, o in conn.execute(q)]


SampleStatus = Literal["unlabelled", "labelled", "flagged", "all"]


def _sample_query(status: SampleStatus, device: str | None, devices: Sequence[str] | None) -> Select[Any]:
    labelled = select(Label.id).where(Label.sample_id == Sample.id).exists()
    flagged = select(SampleFlag.sample_id).where(SampleFlag.sample_id == Sample.id).exists()
    q = select(Sample)
    if status == "unlabelled":
        q = q.where(~labelled, ~flagged)
    elif status == "labelled":
        q = q.where(labelled)
    elif status == "flagged":
        q = q.where(flagged)
    if device:
        q = q.where(Sample.device == device)
    if devices is not None:
        q = q.where(Sample.device.in_(list(devices)))
    return q


def sample_page(
    store: Store,
    *,
    status: SampleStatus = "unlabelled",
    device: str | None = None,
    devices: Sequence[str] | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page:
    """Samples (without their image bytes loaded for the list's sake: the ORM defers nothing, so only
    metadata columns are selected) oldest first, with their newest label and flag."""
    q = _sample_query(status, device, devices)
    with store.read_session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        ids = list(
            s.scalars(
                q.with_only_columns(Sample.id).order_by(Sample.ts, Sample.id).limit(limit).offset(offset)
            )
        )
    return Page(ids, int(total), limit, offset)


def sample_meta(store: Store, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Metadata of samples (no image bytes), each with its labels (oldest first) and flag."""
    cols = (
        Sample.id,
        Sample.fleet,
        Sample.device,
        Sample.ts,
        Sample.model_sha256,
        Sample.consent_policy,
        Sample.sha256,
        Sample.content_type,
        Sample.provenance,
        Sample.received_at,
    )
    with store.engine.connect() as conn:
        rows = {r[0]: r for r in conn.execute(select(*cols).where(Sample.id.in_(list(ids))))}
        labels: dict[int, list[dict[str, Any]]] = {}
        for sid, lab, src, who, at in conn.execute(
            select(Label.sample_id, Label.label, Label.source, Label.labeller, Label.created_at)
            .where(Label.sample_id.in_(list(ids)))
            .order_by(Label.id)
        ):
            labels.setdefault(sid, []).append({"label": lab, "source": src, "labeller": who, "at": at})
        flags = {
            sid: {"flag": f, "actor": a, "at": at}
            for sid, f, a, at in conn.execute(
                select(SampleFlag.sample_id, SampleFlag.flag, SampleFlag.actor, SampleFlag.created_at).where(
                    SampleFlag.sample_id.in_(list(ids))
                )
            )
        }
    out = []
    for sid in ids:
        if (r := rows.get(sid)) is None:
            continue
        keys = ("id", "fleet", "device", "ts", "model_sha256", "consent_policy", "sha256", "content_type")
        item: dict[str, Any] = dict(zip(keys, r[:8], strict=True))
        item["provenance"] = json.loads(r[8]) if r[8] else {}
        item.update(received_at=r[9], labels=labels.get(sid, []), flag=flags.get(sid))
        out.append(item)
    return out


def sample_image(store: Store, sample_id: int) -> tuple[bytes | None, str | None, str] | None:
    """(inline bytes, path, content type) of one sample, or None if there is no such sample."""
    with store.engine.connect() as conn:
        row = conn.execute(
            select(Sample.image, Sample.path, Sample.content_type).where(Sample.id == sample_id)
        ).first()
    return None if row is None else (row[0], row[1], row[2])


def flag_sample(store: Store, sample_id: int, flag: str, *, actor: str) -> bool:
    """Mark a sample (``unusable``); audited. False if there is no such sample."""
    with store.write() as conn:
        if conn.scalar(select(Sample.id).where(Sample.id == sample_id)) is None:
            return False
        stmt = insert(conn, SampleFlag.__table__).values(
            sample_id=sample_id, flag=flag, actor=actor, created_at=time.time()
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["sample_id"], set_={"flag": flag, "actor": actor, "created_at": time.time()}
            )
        )
        insert_audit(conn, actor, "sample.flag", f"sample/{sample_id}", {"flag": flag})
        return True


def flagged_sample_ids(store: Store) -> set[int]:
    """Samples a person marked unusable: never used for training or as audit labels."""
    with store.engine.connect() as conn:
        return set(conn.scalars(select(SampleFlag.sample_id)))


def labelling_progress(
    store: Store, devices: Sequence[str], since: float | None
) -> dict[str, dict[str, int]]:
    """Per device: samples taken (since ``since``), labelled, flagged: the progress of a drifted slice."""
    labelled = select(Label.id).where(Label.sample_id == Sample.id).exists()
    flagged = select(SampleFlag.sample_id).where(SampleFlag.sample_id == Sample.id).exists()
    q = select(
        Sample.device,
        func.count(),
        func.sum(case((labelled, 1), else_=0)),
        func.sum(case((flagged, 1), else_=0)),
    ).where(Sample.device.in_(list(devices)))
    if since is not None:
        q = q.where(Sample.ts >= since)
    with store.engine.connect() as conn:
        rows = conn.execute(q.group_by(Sample.device)).all()
    out = {d: {"samples": 0, "labelled": 0, "flagged": 0} for d in devices}
    for d, n, lab, fl in rows:
        out[d] = {"samples": int(n), "labelled": int(lab or 0), "flagged": int(fl or 0)}
    return out


def alert_page(
    store: Store,
    *,
    fleet: str | None = None,
    kind: str | None = None,
    severity: str | None = None,
    device: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page:
    """Alerts, newest first."""
    q = select(Alert)
    for col, value in (
        (Alert.fleet, fleet),
        (Alert.kind, kind),
        (Alert.severity, severity),
        (Alert.device, device),
    ):
        if value:
            q = q.where(col == value)
    if since is not None:
        q = q.where(Alert.created_at >= since)
    if until is not None:
        q = q.where(Alert.created_at < until)
    with store.read_session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        items = list(s.scalars(q.order_by(Alert.id.desc()).limit(limit).offset(offset)))
    return Page(items, int(total), limit, offset)


def audit_page(
    store: Store,
    *,
    actor: str | None = None,
    action: str | None = None,
    subject: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page:
    """Audit entries, newest first; ``action`` and ``subject`` match as prefixes (``rollout.``)."""
    q = select(AuditEntry)
    if actor:
        q = q.where(AuditEntry.actor == actor)
    if action:
        q = q.where(AuditEntry.action.startswith(action, autoescape=True))
    if subject:
        q = q.where(AuditEntry.subject.startswith(subject, autoescape=True))
    if since is not None:
        q = q.where(AuditEntry.ts >= since)
    if until is not None:
        q = q.where(AuditEntry.ts < until)
    with store.read_session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        items = list(s.scalars(q.order_by(AuditEntry.id.desc()).limit(limit).offset(offset)))
    return Page(items, int(total), limit, offset)


def record_rollout_check(store: Store, rollout_id: int, ts: float, fields: Mapping[str, Any]) -> bool:
    """Keep one look of the canary analysis unless it says the same as the previous one (same window
    counts and decision); True when stored."""
    with store.write() as conn:
        last = conn.execute(
            select(RolloutCheck.canary_windows, RolloutCheck.control_windows, RolloutCheck.decision)
            .where(RolloutCheck.rollout_id == rollout_id)
            .order_by(RolloutCheck.id.desc())
            .limit(1)
        ).first()
        if last is not None and tuple(last) == (
            fields["canary_windows"],
            fields["control_windows"],
            fields["decision"],
        ):
            return False
        row = dict(
            fields, rollout_id=rollout_id, ts=ts, reasons=json.dumps(list(fields.get("reasons") or []))
        )
        conn.execute(insert(conn, RolloutCheck.__table__), row)
        return True


def rollout_checks(store: Store, rollout_id: int) -> list[RolloutCheck]:
    with store.read_session() as s:
        return list(
            s.scalars(
                select(RolloutCheck).where(RolloutCheck.rollout_id == rollout_id).order_by(RolloutCheck.id)
            )
        )


def claim_rollout(store: Store, rollout_id: int, state: str, *, actor: str, reason: str | None) -> bool:
    """Move an active rollout to ``state`` if it is still active, audited: of two concurrent decisions
    (a person's abort and the service's promotion, two people) exactly one wins."""
    with store.write() as conn:
        moved = conn.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id, Rollout.state == "active")
            .values(state=state, updated_at=time.time())
        ).rowcount
        if moved:
            insert_audit(conn, actor, f"rollout.{state}", f"rollout/{rollout_id}", {"reason": reason})
        return bool(moved)


def reopen_rollout(store: Store, rollout_id: int, *, actor: str, why: str) -> None:
    """Undo a claim whose action then failed (the repository refused), audited."""
    with store.write() as conn:
        conn.execute(
            update(Rollout).where(Rollout.id == rollout_id).values(state="active", updated_at=time.time())
        )
        insert_audit(conn, actor, "rollout.reopened", f"rollout/{rollout_id}", {"why": why})


def window_page(store: Store, *, device: str, since: float, until: float, limit: int, offset: int) -> Page:
    """A device's raw windows that ended in ``[since, until)``, newest first (columns only)."""
    cond = (Window.device == device, Window.end >= since, Window.end < until)
    cols = (
        Window.session,
        Window.seq,
        Window.start,
        Window.end,
        Window.model_version,
        Window.artifact,
        Window.frames_inferred,
        Window.frames_failed,
        Window.confidence_mean,
        Window.atc_above,
    )
    with store.engine.connect() as conn:
        total = conn.scalar(select(func.count()).select_from(Window).where(*cond)) or 0
        rows = conn.execute(
            select(*cols)
            .where(*cond)
            .order_by(Window.end.desc(), Window.seq.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return Page([r._asdict() for r in rows], int(total), limit, offset)


def releases(store: Store, fleet: str | None = None) -> list[Release]:
    """Recorded releases (optionally of one fleet), newest first."""
    stmt = select(Release).order_by(Release.id.desc())
    with store.read_session() as s:
        return list(s.scalars(stmt if fleet is None else stmt.where(Release.fleet == fleet)))


def serving_counts(store: Store) -> dict[str, int]:
    """How many devices serve each model now (model sha256 -> devices)."""
    q = select(Device.model_sha256, func.count()).where(Device.model_sha256.is_not(None))
    with store.engine.connect() as conn:
        return {str(sha): int(n) for sha, n in conn.execute(q.group_by(Device.model_sha256))}


def drift_states(store: Store, fleet: str | None, states: Sequence[str]) -> dict[str, str]:
    """Devices (of ``fleet``) whose drift state is one of ``states`` -> that state."""
    q = select(DeviceHealthRecord.device, DeviceHealthRecord.drift_state).where(
        DeviceHealthRecord.drift_state.in_(list(states))
    )
    if fleet:
        q = q.where(DeviceHealthRecord.fleet == fleet)
    with store.engine.connect() as conn:
        return {d: str(st) for d, st in conn.execute(q)}
