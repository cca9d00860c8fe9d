"""The Store facade: every query the fleet loop needs, on SQLite or PostgreSQL through one URL.

Read methods return detached ORM objects (plain attribute access, no lazy loading) or protocol
models; write methods run in one short transaction each and record an audit entry for every action
a person or the trainer takes (ingest itself is not an action: its rows are the data).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, Select, delete, func, select
from sqlalchemy import insert as sa_insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from edge_agent.package import ModelManifest, ModelPackage
from edge_agent.protocol import Status, TelemetryWindow, UpdateEvent
from edge_agent.reference import ReferenceStats
from edge_agent.telemetry.merge import WindowSummary, merge_windows
from trainer.errors import SchemaOutdated, StoreError
from trainer.store.engine import WriteLock, insert, make_engine, writer
from trainer.store.ingest_writes import (
    ModelCheck,
    Received,
    WriteResult,
    status_order_sql,
    write_statuses,
    write_update_events,
    write_windows,
)
from trainer.store.migrate import ensure_current, head, recorded_revision, state
from trainer.store.records import insert_alert, insert_audit
from trainer.store.schema import (
    Alert,
    AuditEntry,
    DeadLetter,
    Device,
    DeviceReferenceRecord,
    Label,
    ModelRecord,
    ReferenceRebase,
    Release,
    Rollout,
    Sample,
    SampleFlag,
    StatusEvent,
    UpdateEventRecord,
    Window,
)

LABEL_SOURCES = ("human", "oracle")


def _json(details: dict[str, Any] | None) -> str | None:
    return None if details is None else json.dumps(details, separators=(",", ":"), default=str)


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceActivity:
    """What a device's recent windows say about its pace (see :meth:`Store.recent_activity`)."""

    frames_per_second: float | None
    confidence_mean: float | None


def _insert_label(conn: Connection, sample_id: int, label: str, source: str, labeller: str | None) -> int:
    """One label row and its audit entry (who labelled what, from which source)."""
    lid = conn.execute(
        sa_insert(Label).returning(Label.id),
        {
            "sample_id": sample_id,
            "label": label,
            "source": source,
            "labeller": labeller,
            "created_at": time.time(),
        },
    ).scalar_one()
    insert_audit(
        conn, labeller or source, "label.add", f"sample/{sample_id}", {"label": label, "source": source}
    )
    return int(lid)


def _still_valid(payloads: Iterable[str]) -> Iterator[TelemetryWindow]:
    """Stored windows that still validate. A row stored before a check existed (a histogram with a
    count too few, NaN on SQLite) is left out with a warning: one bad window costs only itself."""
    for payload in payloads:
        try:
            yield TelemetryWindow.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            log.warning("a stored window no longer validates and is left out (%s: %s)", where, first["msg"])


_HISTORY = StatusEvent.__table__.c
_STATUS_ORDER = status_order_sql(_HISTORY.session, _HISTORY.connection, _HISTORY.state, _HISTORY.ts)
"""The status history's columns in :func:`edge_agent.protocol.status_order`."""


class Store:
    """The trainer's database: ``Store("sqlite:///fleet.db")`` or ``Store("postgresql+psycopg://...")``.

    With SQLite, writers from several processes take turns through ``fleet.db.writelock`` (see
    :class:`~trainer.store.engine.WriteLock`); readers never wait (WAL).

    ::

        store = Store("sqlite:///fleet.db")           # creates the tables if missing
        store.register_package(load_package("build/models/lite0"), actor="alice")
        ws = store.windows(device="cam1", model_sha256=sha, since=t0, until=t1)
        summary = store.window_summary(model_sha256=sha, since=t0)   # exact merge of histograms
        store.record_alert(kind="drift", message="cam1 drifted", device="cam1", fleet="shop")
    """

    def __init__(self, url: str, *, create: bool = True, check: bool = True, **engine_kwargs: Any) -> None:
        """``create``: make an empty database's schema (else it must exist); ``check=False`` opens an
        older schema without refusing it (``edgefleet db``, which migrates it)."""
        self.url = url
        self.engine: Engine = make_engine(url, **engine_kwargs)
        database = self.engine.url.database or ":memory:"
        if (
            not create
            and database != ":memory:"
            and self.dialect == "sqlite"
            and not Path(database).is_file()
        ):
            raise StoreError(
                f"{url}: no database file (the trainer service or `edgefleet ingest run` creates it)"
            )
        self.write_engine: Engine = writer(self.engine)
        self._write_lock = WriteLock(url)
        if create:
            self.create_schema()
        elif check:
            self.check_schema()

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def shown_url(self) -> str:
        """The URL as given, with any password masked (for messages)."""
        return make_url(self.url).render_as_string(hide_password=True)

    def create_schema(self) -> None:
        """Make sure the database is at this release's schema revision (see :mod:`trainer.store.migrate`).

        An empty database gets the tables (``create_all``, then head recorded in ``alembic_version``);
        one at head costs two small queries. An older one raises :class:`~trainer.errors.SchemaOutdated`:
        a deployed database is migrated by ``edgefleet db upgrade``, never silently here."""
        with self.engine.connect() as conn:
            if recorded_revision(conn) == head():
                return
        with self.write() as conn:
            outcome = ensure_current(conn, self.shown_url)
        if outcome != "current":
            log.info("store %s: %s the schema at revision %s", self.shown_url, outcome, head())

    def check_schema(self) -> None:
        """Read only: refuse a database older than this release (commands that open an existing store
        would otherwise fail later on a missing column with an SQL error). An empty one is left alone."""
        with self.engine.connect() as conn:
            if recorded_revision(conn) == head():
                return
            st = state(conn, self.shown_url)
        if st.revision is not None and not st.at_head:
            unrecorded = "" if st.recorded else " (not recorded: the database predates migrations)"
            raise SchemaOutdated(self.shown_url, f"{st.revision}{unrecorded}", st.head)

    def close(self) -> None:
        self.engine.dispose()
        self._write_lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE under :class:`WriteLock`), committed on success."""
        with self._write_lock, self.write_engine.begin() as conn:
            yield conn

    def read_session(self) -> Any:
        """An ORM session for reads (its objects stay usable after it closes)."""
        return self._session()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    def _all(self, stmt: Select[Any]) -> list[Any]:
        with self._session() as s:
            return list(s.scalars(stmt))

    # -- telemetry -------------------------------------------------------------------------------
    def add_windows(
        self, windows: Iterable[TelemetryWindow], *, received_at: float | None = None, actor: str = "trainer"
    ) -> WriteResult:
        """Store windows as ingest does (dedupe, device rows, model alerts); for tools and tests."""
        now = time.time() if received_at is None else received_at
        items = [Received(w, w.model_dump_json(exclude_none=True), now) for w in windows]
        with self.write() as conn:
            return write_windows(conn, items, ModelCheck(negative_ttl_s=0.0), actor)

    def add_statuses(
        self, statuses: Iterable[Status], *, received_at: float | None = None, actor: str = "trainer"
    ) -> WriteResult:
        """Store status messages as ingest does."""
        now = time.time() if received_at is None else received_at
        items = [Received(s, s.model_dump_json(exclude_none=True), now) for s in statuses]
        with self.write() as conn:
            return write_statuses(conn, items, ModelCheck(negative_ttl_s=0.0), actor)

    def _window_query(
        self,
        cols: Any,
        device: str | None,
        model_sha256: str | None,
        fleet: str | None,
        since: float | None,
        until: float | None,
        ended: bool = False,
    ) -> Select[Any]:
        q = select(cols).select_from(Window)
        t = Window.end if ended else Window.start
        if device is not None:
            q = q.where(Window.device == device)
        if model_sha256 is not None:
            q = q.where(Window.model_sha256 == model_sha256)
        if fleet is not None:
            q = q.where(Window.fleet == fleet)
        if since is not None:
            q = q.where(t >= since)
        if until is not None:
            q = q.where(t < until)
        return q

    def windows(
        self,
        *,
        device: str | None = None,
        model_sha256: str | None = None,
        fleet: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        ended: bool = False,
    ) -> list[TelemetryWindow]:
        """Windows whose ``start`` (``end`` with ``ended``) is in ``[since, until)``, oldest first, filtered by
        device/model/fleet."""
        q = self._window_query(Window.payload, device, model_sha256, fleet, since, until, ended)
        q = q.order_by(Window.start, Window.device, Window.session, Window.seq).limit(limit)
        with self.engine.connect() as conn:
            return list(_still_valid(conn.scalars(q)))

    def count_windows(
        self,
        *,
        device: str | None = None,
        model_sha256: str | None = None,
        fleet: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> int:
        """How many distinct windows match (see :meth:`windows`)."""
        q = self._window_query(func.count(), device, model_sha256, fleet, since, until)
        with self.engine.connect() as conn:
            return int(conn.scalar(q) or 0)

    def window_keys(self, *, device: str | None = None) -> list[tuple[str, int, int]]:
        """(device, session, seq) of the stored windows, sorted."""
        q = select(Window.device, Window.session, Window.seq).order_by(
            Window.device, Window.session, Window.seq
        )
        if device is not None:
            q = q.where(Window.device == device)
        with self.engine.connect() as conn:
            return [(d, int(s), int(n)) for d, s, n in conn.execute(q)]

    def window_summary(
        self,
        *,
        model_sha256: str,
        device: str | None = None,
        fleet: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> WindowSummary:
        """The exact merge of every matching window of one model (histograms share its edges)."""
        return merge_windows(
            self.windows(device=device, model_sha256=model_sha256, fleet=fleet, since=since, until=until)
        )

    def add_update_events(
        self, events: Iterable[UpdateEvent], *, received_at: float | None = None
    ) -> WriteResult:
        """Store updater state changes as ingest does (once per device, session, seq)."""
        now = time.time() if received_at is None else received_at
        items = [Received(e, e.model_dump_json(exclude_none=True), now) for e in events]
        with self.write() as conn:
            return write_update_events(conn, items, ModelCheck(negative_ttl_s=0.0))

    def update_events(
        self,
        *,
        since: float | None = None,
        state: str | None = None,
        device: str | None = None,
        fleet: str | None = None,
    ) -> list[UpdateEvent]:
        """Updater state changes, oldest first; ``since`` compares the event's device time (``ts``)."""
        q = select(UpdateEventRecord.payload).order_by(UpdateEventRecord.ts, UpdateEventRecord.id)
        if since is not None:
            q = q.where(UpdateEventRecord.ts >= since)
        if state is not None:
            q = q.where(UpdateEventRecord.state == state)
        if device is not None:
            q = q.where(UpdateEventRecord.device == device)
        if fleet is not None:
            q = q.where(UpdateEventRecord.fleet == fleet)
        with self.engine.connect() as conn:
            return [UpdateEvent.model_validate_json(p) for p in conn.scalars(q)]

    # -- devices ---------------------------------------------------------------------------------
    def recent_activity(self, fleet: str, since: float) -> dict[str, DeviceActivity]:
        """Per device of ``fleet``, over its windows that ended at or after ``since``: inferred frames per
        second across their span, and their frame-weighted mean confidence (metrics, Home Assistant)."""
        frames = func.sum(Window.frames_inferred)
        weighted = func.sum(Window.confidence_mean * Window.frames_inferred)
        q = (
            select(Window.device, frames, weighted, func.min(Window.start), func.max(Window.end))
            .where(Window.fleet == fleet, Window.end >= since)
            .group_by(Window.device)
        )
        with self.engine.connect() as conn:
            return {
                device: DeviceActivity(
                    frames_per_second=float(n or 0) / (end - start) if end > start else None,
                    confidence_mean=float(w) / float(n) if n and w is not None else None,
                )
                for device, n, w, start, end in conn.execute(q)
            }

    def devices(self, fleet: str | None = None) -> list[Device]:
        """Every device (optionally of one fleet) with its latest state and model."""
        q = select(Device).order_by(Device.device)
        return self._all(q if fleet is None else q.where(Device.fleet == fleet))

    def device(self, device: str) -> Device | None:
        with self._session() as s:
            return s.get(Device, device)

    def latest_status(self, fleet: str | None = None) -> dict[str, Status]:
        """The current status message of each device: the last by :func:`~edge_agent.protocol.status_order`
        (session, connection, ``offline`` after ``online`` of one connection, ts)."""
        order = [k.desc() for k in _STATUS_ORDER] + [StatusEvent.id.desc()]
        rank = func.row_number().over(partition_by=StatusEvent.device, order_by=order).label("rank")
        inner = select(StatusEvent.device, StatusEvent.payload, rank)
        if fleet is not None:
            inner = inner.where(StatusEvent.fleet == fleet)
        sub = inner.subquery()
        q = select(sub.c.device, sub.c.payload).where(sub.c.rank == 1)
        with self.engine.connect() as conn:
            return {d: Status.model_validate_json(p) for d, p in conn.execute(q)}

    def status_history(self, device: str) -> list[Status]:
        """Every status message of a device in the order they happened (the current one last)."""
        q = (
            select(StatusEvent.payload)
            .where(StatusEvent.device == device)
            .order_by(*_STATUS_ORDER, StatusEvent.id)
        )
        with self.engine.connect() as conn:
            return [Status.model_validate_json(p) for p in conn.scalars(q)]

    # -- models, releases, rollouts ---------------------------------------------------------------
    def register_model(
        self, manifest: ModelManifest, sha256: str, *, path: str | None = None, actor: str = "trainer"
    ) -> bool:
        """Record a model package (idempotent); True when it was new."""
        with self.write() as conn:
            stmt = (
                insert(conn, ModelRecord.__table__)
                .values(
                    sha256=sha256,
                    name=manifest.name,
                    version=manifest.version,
                    path=path,
                    manifest=manifest.model_dump_json(exclude_none=True),
                    registered_at=time.time(),
                )
                .on_conflict_do_nothing(index_elements=["sha256"])
            )
            new = conn.execute(stmt.returning(ModelRecord.sha256)).first() is not None
            if new:
                insert_audit(
                    conn,
                    actor,
                    "model.register",
                    sha256,
                    {"name": manifest.name, "version": manifest.version, "path": path},
                )
            return new

    def register_package(self, package: ModelPackage, *, actor: str = "trainer") -> bool:
        """Record a loaded, verified package."""
        return self.register_model(package.manifest, package.sha256, path=str(package.root), actor=actor)

    def model(self, sha256: str) -> ModelRecord | None:
        with self._session() as s:
            return s.get(ModelRecord, sha256)

    def models(self) -> list[ModelRecord]:
        return self._all(select(ModelRecord).order_by(ModelRecord.registered_at))

    def manifest(self, sha256: str) -> ModelManifest | None:
        """The parsed model.json of a registered model (reference statistics, edges, ATC threshold)."""
        rec = self.model(sha256)
        return None if rec is None else ModelManifest.model_validate_json(rec.manifest)

    def record_release(
        self,
        *,
        fleet: str,
        channel: str,
        model_sha256: str,
        actor: str,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Record a release of a registered model on a channel; returns its id."""
        with self.write() as conn:
            rid = conn.execute(
                sa_insert(Release).returning(Release.id),
                {
                    "fleet": fleet,
                    "channel": channel,
                    "model_sha256": model_sha256,
                    "created_at": time.time(),
                    "created_by": actor,
                    "details": _json(details),
                },
            ).scalar_one()
            insert_audit(
                conn,
                actor,
                "release.create",
                f"release/{rid}",
                {"fleet": fleet, "channel": channel, "model_sha256": model_sha256},
            )
            return int(rid)

    def record_rollout(
        self,
        *,
        release_id: int,
        fleet: str,
        actor: str,
        device: str | None = None,
        cohort: str | None = None,
        state: str = "active",
        details: dict[str, Any] | None = None,
    ) -> int:
        """Record that a release is being sent to one device, or to the whole fleet (``device`` None)."""
        now = time.time()
        with self.write() as conn:
            rid = conn.execute(
                sa_insert(Rollout).returning(Rollout.id),
                {
                    "release_id": release_id,
                    "fleet": fleet,
                    "device": device,
                    "cohort": cohort,
                    "state": state,
                    "started_at": now,
                    "updated_at": now,
                    "details": _json(details),
                },
            ).scalar_one()
            insert_audit(
                conn,
                actor,
                "rollout.start",
                f"rollout/{rid}",
                {"release_id": release_id, "device": device, "cohort": cohort, "state": state},
            )
            return int(rid)

    def rollouts(self, fleet: str | None = None) -> list[Rollout]:
        q = select(Rollout).order_by(Rollout.id)
        return self._all(q if fleet is None else q.where(Rollout.fleet == fleet))

    def models_sent_to(self, device: str) -> set[str]:
        """sha256 of every model a device was provisioned with or sent by a rollout."""
        with self.engine.connect() as conn:
            fleet, first = conn.execute(
                select(Device.fleet, Device.first_model_sha256).where(Device.device == device)
            ).first() or (None, None)
            q = (
                select(Release.model_sha256)
                .join(Rollout, Rollout.release_id == Release.id)
                .where((Rollout.device == device) | (Rollout.device.is_(None) & (Rollout.fleet == fleet)))
            )
            sent = set(conn.scalars(q))
        return sent | ({first} if first else set())

    # -- per-device drift references (trainer/drift/rebase.py) ---------------------------------------
    def start_rebase(
        self, *, fleet: str, model_sha256: str, since: float, windows: int, actor: str = "trainer"
    ) -> None:
        """Rebase every device of ``fleet`` on ``model_sha256`` from ``since`` (replaces an earlier rebase
        of that model and the device references it made)."""
        with self.write() as conn:
            for table in (ReferenceRebase, DeviceReferenceRecord):
                conn.execute(delete(table).where(table.fleet == fleet, table.model_sha256 == model_sha256))
            conn.execute(
                sa_insert(ReferenceRebase).values(
                    fleet=fleet,
                    model_sha256=model_sha256,
                    since=since,
                    windows=windows,
                    created_at=time.time(),
                )
            )
            insert_audit(
                conn,
                actor,
                "reference.rebase",
                model_sha256,
                {"fleet": fleet, "since": since, "windows": windows},
            )

    def rebases(self, fleet: str) -> list[ReferenceRebase]:
        return self._all(
            select(ReferenceRebase).where(ReferenceRebase.fleet == fleet).order_by(ReferenceRebase.id)
        )

    def add_device_reference(
        self,
        *,
        fleet: str,
        device: str,
        model_sha256: str,
        since: float,
        windows: int,
        reference: ReferenceStats,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Store one device's own reference for a model; False if it already had one (the first stays)."""
        with self.write() as conn:
            stmt = (
                insert(conn, DeviceReferenceRecord.__table__)
                .values(
                    fleet=fleet,
                    device=device,
                    model_sha256=model_sha256,
                    since=since,
                    windows=windows,
                    reference=reference.model_dump_json(exclude_none=True),
                    details=_json(details),
                    created_at=time.time(),
                )
                .on_conflict_do_nothing(index_elements=["fleet", "device", "model_sha256"])
            )
            return conn.execute(stmt.returning(DeviceReferenceRecord.id)).first() is not None

    def device_references(
        self, fleet: str, *, model_sha256: str | None = None
    ) -> list[tuple[DeviceReferenceRecord, ReferenceStats]]:
        """Stored device references with their statistics, oldest first."""
        q = select(DeviceReferenceRecord).where(DeviceReferenceRecord.fleet == fleet)
        if model_sha256 is not None:
            q = q.where(DeviceReferenceRecord.model_sha256 == model_sha256)
        rows = self._all(q.order_by(DeviceReferenceRecord.id))
        return [(r, ReferenceStats.model_validate_json(r.reference)) for r in rows]

    # -- alerts, audit, dead letters ---------------------------------------------------------------
    def record_alert(
        self,
        *,
        kind: str,
        message: str,
        severity: str = "warning",
        fleet: str | None = None,
        device: str | None = None,
        details: dict[str, Any] | None = None,
        dedupe_key: str | None = None,
        actor: str = "trainer",
    ) -> int | None:
        """Record an alert (audited); with ``dedupe_key`` only once. Returns its id or None if deduped."""
        with self.write() as conn:
            return insert_alert(
                conn,
                kind=kind,
                message=message,
                severity=severity,
                fleet=fleet,
                device=device,
                details=details,
                dedupe_key=dedupe_key,
                actor=actor,
            )

    def alerts(
        self, *, kind: str | None = None, device: str | None = None, since: float | None = None
    ) -> list[Alert]:
        q = select(Alert).order_by(Alert.id)
        if kind is not None:
            q = q.where(Alert.kind == kind)
        if device is not None:
            q = q.where(Alert.device == device)
        if since is not None:
            q = q.where(Alert.created_at >= since)
        return self._all(q)

    def audit(self, actor: str, action: str, subject: str, details: dict[str, Any] | None = None) -> None:
        """Append an audit entry for an action taken outside the methods above."""
        with self.write() as conn:
            insert_audit(conn, actor, action, subject, details)

    def audit_log(self, *, subject: str | None = None, action: str | None = None) -> list[AuditEntry]:
        q = select(AuditEntry).order_by(AuditEntry.id)
        if subject is not None:
            q = q.where(AuditEntry.subject == subject)
        if action is not None:
            q = q.where(AuditEntry.action == action)
        return self._all(q)

    def dead_letters(self, reason: str | None = None) -> list[DeadLetter]:
        q = select(DeadLetter).order_by(DeadLetter.id)
        return self._all(q if reason is None else q.where(DeadLetter.reason == reason))

    # -- samples and labels ------------------------------------------------------------------------
    def add_sample(
        self,
        *,
        fleet: str,
        device: str,
        ts: float,
        consent_policy: str,
        sha256: str,
        model_sha256: str | None = None,
        image: bytes | None = None,
        path: str | None = None,
        content_type: str = "image/jpeg",
        provenance: dict[str, Any] | None = None,
    ) -> int | None:
        """Store a sample frame once per (device, sha256); returns its id, or None if it was a duplicate."""
        if (image is None) == (path is None):
            raise ValueError("a sample needs exactly one of image bytes or a path")
        with self.write() as conn:
            stmt = (
                insert(conn, Sample.__table__)
                .values(
                    fleet=fleet,
                    device=device,
                    ts=ts,
                    consent_policy=consent_policy,
                    sha256=sha256,
                    model_sha256=model_sha256,
                    image=image,
                    path=path,
                    content_type=content_type,
                    provenance=_json(provenance),
                    received_at=time.time(),
                )
                .on_conflict_do_nothing(index_elements=["device", "sha256"])
            )
            row = conn.execute(stmt.returning(Sample.id)).first()
            return None if row is None else int(row[0])

    def add_label(self, sample_id: int, label: str, *, source: str, labeller: str | None = None) -> int:
        """Label a sample (human or oracle); the label and who gave it are audited."""
        if source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {LABEL_SOURCES}, not {source!r}")
        with self.write() as conn:
            return _insert_label(conn, sample_id, label, source, labeller)

    def sample_ids_present(self, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` are stored samples."""
        wanted = set(ids)
        with self.engine.connect() as conn:
            return set(conn.scalars(select(Sample.id).where(Sample.id.in_(wanted)))) if wanted else set()

    def add_labels(
        self, labels: Sequence[tuple[int, str]], *, source: str, labeller: str | None = None
    ) -> int:
        """Store ``(sample_id, label)`` pairs all or nothing, in one transaction: StoreError naming the
        sample ids that do not exist; a pair equal to the sample's newest label is not stored again (a
        re-imported file adds nothing). Returns how many were stored."""
        if source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {LABEL_SOURCES}, not {source!r}")
        ids = {sid for sid, _ in labels}
        with self.write() as conn:
            found = set(conn.scalars(select(Sample.id).where(Sample.id.in_(ids))))
            if missing := sorted(ids - found):
                raise StoreError(f"no sample with id {', '.join(map(str, missing[:10]))}")
            newest: dict[int, str] = {}
            for sid, lab in conn.execute(
                select(Label.sample_id, Label.label).where(Label.sample_id.in_(ids)).order_by(Label.id)
            ):
                newest[sid] = lab
            fresh = [(sid, lab) for sid, lab in labels if newest.get(sid) != lab]
            for sid, lab in fresh:
                _insert_label(conn, sid, lab, source, labeller)
            return len(fresh)

    def unlabelled_samples(self, limit: int | None = None) -> list[Sample]:
        """Samples without any label and not flagged unusable, oldest first: the labelling queue."""
        q = select(Sample).where(
            ~select(Label.id).where(Label.sample_id == Sample.id).exists(),
            ~select(SampleFlag.sample_id).where(SampleFlag.sample_id == Sample.id).exists(),
        )
        return self._all(q.order_by(Sample.ts, Sample.id).limit(limit))

    def samples(
        self, *, ids: Sequence[int] | None = None, device: str | None = None, since: float | None = None
    ) -> list[Sample]:
        """Samples (with their images), oldest first; ``since`` compares the sample's device time."""
        q = select(Sample).order_by(Sample.ts, Sample.id)
        if ids is not None:
            q = q.where(Sample.id.in_(list(ids)))
        if device is not None:
            q = q.where(Sample.device == device)
        if since is not None:
            q = q.where(Sample.ts >= since)
        return self._all(q)

    def count_labelled_samples(self, since: float | None = None, devices: Sequence[str] | None = None) -> int:
        """How many samples (taken at or after ``since``, by ``devices``) have at least one label and were
        not flagged unusable."""
        q = (
            select(func.count())
            .select_from(Sample)
            .where(select(Label.id).where(Label.sample_id == Sample.id).exists())
            .where(~select(SampleFlag.sample_id).where(SampleFlag.sample_id == Sample.id).exists())
        )
        if since is not None:
            q = q.where(Sample.ts >= since)
        if devices is not None:
            q = q.where(Sample.device.in_(list(devices)))
        with self.engine.connect() as conn:
            return int(conn.scalar(q) or 0)

    def labels(self, sample_ids: Sequence[int] | None = None) -> list[Label]:
        q = select(Label).order_by(Label.id)
        return self._all(q if sample_ids is None else q.where(Label.sample_id.in_(sample_ids)))
