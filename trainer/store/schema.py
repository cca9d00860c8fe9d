"""The trainer's tables as SQLAlchemy 2 declarative models (one schema for SQLite and PostgreSQL).

Times are unix seconds (``float``), as on the wire, so both dialects compare them the same way and no
time zone is ever guessed. JSON documents are :class:`~trainer.store.types.RawJSON` (``json`` on
PostgreSQL). These models are the head revision: a new database gets them with ``create_all`` (then head
is recorded), and every change to them needs a migration in ``trainer/store/migrations/versions/``
that brings a deployed database to the same schema (tests/test_migrations.py checks they agree).

Device ids are unique across fleets: a device id is also its MQTT client id and certificate name,
which a broker keeps unique, and telemetry is deduplicated on (device, session, seq) as the protocol
says.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from trainer.store.types import RawJSON

# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere. Strings have no length limit
# (VARCHAR on PostgreSQL), so a long but valid value can never fail a whole batch.
Id = BigInteger().with_variant(Integer(), "sqlite")
SHA = String(64)
NAME = String()


class Base(DeclarativeBase):
    """Declarative base of every EdgeFleet table."""


class Device(Base):
    """One device: its latest status and model, and when it was first and last heard from."""

    __tablename__ = "devices"
    device: Mapped[str] = mapped_column(NAME, primary_key=True)
    fleet: Mapped[str] = mapped_column(NAME, index=True)
    first_seen: Mapped[float] = mapped_column(Double)
    last_seen: Mapped[float] = mapped_column(Double)
    """Receive time of the newest message from the device (any kind)."""
    last_window_end: Mapped[float | None] = mapped_column(Double)
    """``end`` of the newest window by window time (late, out-of-order windows do not move it back)."""
    session: Mapped[int | None] = mapped_column(BigInteger)
    """The newest session heard of (a status or a window)."""
    state: Mapped[str | None] = mapped_column(String())
    """online / offline, from the device's current status: the largest by
    :func:`edge_agent.protocol.status_order` (session, connection, offline after online, ts)."""
    status_session: Mapped[int | None] = mapped_column(BigInteger)
    """The session of that status (``session`` also follows windows, so it cannot order statuses)."""
    status_connection: Mapped[int | None] = mapped_column(BigInteger)
    """The connection of that status (None from agents that do not number their connections)."""
    status_ts: Mapped[float | None] = mapped_column(Double)
    agent_version: Mapped[str | None] = mapped_column(String())
    model_name: Mapped[str | None] = mapped_column(NAME)
    model_version: Mapped[str | None] = mapped_column(String())
    model_sha256: Mapped[str | None] = mapped_column(SHA)
    """The model the device serves now (newest window or status)."""
    first_model_sha256: Mapped[str | None] = mapped_column(SHA)
    """The first model ever reported: the provisioning image, which no rollout sent."""


class RemovedDevice(Base):
    """A device a person removed from its fleet (``edgefleet trainer forget-device``): its ``devices`` and
    ``device_health`` rows are deleted, its history kept. Messages it sent before ``removed_at`` (by their
    own time: a late window, its last will) do not bring it back; a newer one does. The service clears
    its Home Assistant entities while it is absent from ``devices``."""

    __tablename__ = "removed_devices"
    device: Mapped[str] = mapped_column(NAME, primary_key=True)
    fleet: Mapped[str] = mapped_column(NAME, index=True)
    removed_at: Mapped[float] = mapped_column(Double)
    removed_by: Mapped[str] = mapped_column(String())
    reason: Mapped[str | None] = mapped_column(Text)


class StatusEvent(Base):
    """Every status message (birth, last will, clean shutdown) as received."""

    __tablename__ = "status_history"
    __table_args__ = (UniqueConstraint("device", "session", "state", "ts", name="uq_status_event"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str] = mapped_column(NAME, index=True)
    session: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String())
    ts: Mapped[float] = mapped_column(Double)
    connection: Mapped[int | None] = mapped_column(BigInteger)
    """The agent's connection number within the session (orders a will before the next birth)."""
    model_sha256: Mapped[str | None] = mapped_column(SHA)
    payload: Mapped[str] = mapped_column(RawJSON)
    received_at: Mapped[float] = mapped_column(Double)


class Window(Base):
    """One telemetry window, stored once per (device, session, seq) with its validated payload."""

    __tablename__ = "windows"
    __table_args__ = (
        UniqueConstraint("device", "session", "seq", name="uq_window_key"),
        Index("ix_windows_device_model_start", "device", "model_sha256", "start"),
        Index("ix_windows_model_start", "model_sha256", "start"),
        Index("ix_windows_fleet_end", "fleet", "end"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str] = mapped_column(NAME)
    session: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    start: Mapped[float] = mapped_column(Double)
    end: Mapped[float] = mapped_column(Double)
    model_name: Mapped[str] = mapped_column(NAME)
    model_version: Mapped[str] = mapped_column(String())
    model_sha256: Mapped[str] = mapped_column(SHA)
    artifact: Mapped[str | None] = mapped_column(String())
    frames_inferred: Mapped[int] = mapped_column(BigInteger)
    frames_failed: Mapped[int] = mapped_column(BigInteger)
    confidence_mean: Mapped[float | None] = mapped_column(Double)
    atc_above: Mapped[int | None] = mapped_column(BigInteger)
    model_known: Mapped[bool] = mapped_column(Boolean)
    """False when the model's sha256 was not in ``models`` at ingest (an unknown model version)."""
    payload: Mapped[str] = mapped_column(RawJSON)
    received_at: Mapped[float] = mapped_column(Double)


class Sample(Base):
    """An opt-in, privacy-filtered frame sent by a device for labelling, with its provenance."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("device", "sha256", name="uq_sample_device_sha"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str] = mapped_column(NAME, index=True)
    ts: Mapped[float] = mapped_column(Double)
    model_sha256: Mapped[str | None] = mapped_column(SHA)
    consent_policy: Mapped[str] = mapped_column(String())
    sha256: Mapped[str] = mapped_column(SHA)
    """sha256 of the image bytes as received."""
    content_type: Mapped[str] = mapped_column(String(), default="image/jpeg")
    image: Mapped[bytes | None] = mapped_column(LargeBinary)
    path: Mapped[str | None] = mapped_column(Text)
    """Where the image is kept when it is not stored inline."""
    provenance: Mapped[str | None] = mapped_column(RawJSON)
    """Why it was picked (low confidence, drift), window session/seq, privacy filters applied..."""
    received_at: Mapped[float] = mapped_column(Double)


class Label(Base):
    """A label for a sample, from a person or from the fleet simulator's oracle."""

    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String())
    source: Mapped[str] = mapped_column(String())
    """human or oracle."""
    labeller: Mapped[str | None] = mapped_column(String())
    created_at: Mapped[float] = mapped_column(Double)


class UpdateEventRecord(Base):
    """One state change of a device's updater (staged, verified, active, rolled_back, rejected...)."""

    __tablename__ = "update_events"
    __table_args__ = (
        UniqueConstraint("device", "session", "seq", name="uq_update_event_key"),
        Index("ix_update_events_state_ts", "state", "ts"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str] = mapped_column(NAME, index=True)
    session: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Double)
    state: Mapped[str] = mapped_column(String())
    reason: Mapped[str | None] = mapped_column(String())
    release: Mapped[int | None] = mapped_column(BigInteger)
    model_sha256: Mapped[str | None] = mapped_column(SHA)
    """The release's package (candidate or newly active)."""
    serving_sha256: Mapped[str | None] = mapped_column(SHA)
    """What the device serves after this change."""
    payload: Mapped[str] = mapped_column(RawJSON)
    received_at: Mapped[float] = mapped_column(Double)


class ModelRecord(Base):
    """A model package the trainer knows, identified by the sha256 of its model.json."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_name_version"),)
    sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    name: Mapped[str] = mapped_column(NAME)
    version: Mapped[str] = mapped_column(String())
    manifest: Mapped[str] = mapped_column(RawJSON)
    path: Mapped[str | None] = mapped_column(Text)
    registered_at: Mapped[float] = mapped_column(Double)


class Release(Base):
    """A model published on a channel (canary, stable) of a fleet."""

    __tablename__ = "releases"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME, index=True)
    channel: Mapped[str] = mapped_column(NAME)
    model_sha256: Mapped[str] = mapped_column(ForeignKey("models.sha256"), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    created_by: Mapped[str] = mapped_column(String())
    details: Mapped[str | None] = mapped_column(RawJSON)
    """TUF target name, repository URL, notes."""


class Rollout(Base):
    """A release sent to devices: one named device, or every device of the fleet (``device`` NULL)."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str | None] = mapped_column(NAME, index=True)
    cohort: Mapped[str | None] = mapped_column(NAME)
    state: Mapped[str] = mapped_column(String())
    """active, promoted, aborted, rolled_back, done."""
    started_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    details: Mapped[str | None] = mapped_column(RawJSON)


class Alert(Base):
    """A drift, health or integrity alert; ``dedupe_key`` makes "raise once" hold across workers."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str | None] = mapped_column(NAME)
    device: Mapped[str | None] = mapped_column(NAME, index=True)
    kind: Mapped[str] = mapped_column(String(), index=True)
    severity: Mapped[str] = mapped_column(String())
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[str | None] = mapped_column(RawJSON)
    dedupe_key: Mapped[str | None] = mapped_column(String(), unique=True)
    created_at: Mapped[float] = mapped_column(Double, index=True)
    resolved_at: Mapped[float | None] = mapped_column(Double)


class WebhookDelivery(Base):
    """One alert to deliver to one webhook: kept until delivered or given up (then ``failed``)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook", "alert_id", name="uq_webhook_delivery"),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    webhook: Mapped[str] = mapped_column(NAME)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String())
    """pending, delivered or failed."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Double)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Double)
    delivered_at: Mapped[float | None] = mapped_column(Double)


class WebhookCursor(Base):
    """The newest alert id each webhook has considered (alerts raised while the service was down are
    delivered when it starts)."""

    __tablename__ = "webhook_cursors"
    webhook: Mapped[str] = mapped_column(NAME, primary_key=True)
    last_alert_id: Mapped[int] = mapped_column(BigInteger)


class ReferenceRebase(Base):
    """A model promoted on a fleet: from ``since`` each device's first ``windows`` windows under it become
    that device's own drift reference (``trainer/drift/rebase.py``)."""

    __tablename__ = "reference_rebases"
    __table_args__ = (UniqueConstraint("fleet", "model_sha256", name="uq_reference_rebase"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    model_sha256: Mapped[str] = mapped_column(SHA)
    since: Mapped[float] = mapped_column(Double)
    windows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)


class DeviceReferenceRecord(Base):
    """One device's own drift reference for one model (the exact merge of its first windows after a
    promotion), so a restarted service judges the device against the same normal."""

    __tablename__ = "device_references"
    __table_args__ = (UniqueConstraint("fleet", "device", "model_sha256", name="uq_device_reference"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str] = mapped_column(NAME, index=True)
    model_sha256: Mapped[str] = mapped_column(SHA)
    since: Mapped[float] = mapped_column(Double)
    windows: Mapped[int] = mapped_column(Integer)
    reference: Mapped[str] = mapped_column(RawJSON)
    """The ``ReferenceStats`` document (same shape as model.json's ``reference``)."""
    details: Mapped[str | None] = mapped_column(RawJSON)
    """``differs``: feature -> JS divergence from the training reference."""
    created_at: Mapped[float] = mapped_column(Double)


class AuditEntry(Base):
    """Who did what to which subject, and when: every state-changing action of the trainer."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Double, index=True)
    actor: Mapped[str] = mapped_column(String())
    action: Mapped[str] = mapped_column(String())
    subject: Mapped[str] = mapped_column(String())
    details: Mapped[str | None] = mapped_column(RawJSON)


class DeadLetter(Base):
    """An inbound message that can never become valid, kept (truncated) with the reason.

    Identical payloads on one topic share a row and count up, so a device stuck sending the same bad
    message does not fill the table.
    """

    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("topic", "payload_sha256", name="uq_dead_letter"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    """The first ``DEAD_LETTER_KEEP_BYTES`` bytes of the payload."""
    payload_size: Mapped[int] = mapped_column(BigInteger)
    payload_sha256: Mapped[str] = mapped_column(SHA)
    reason: Mapped[str] = mapped_column(String(), index=True)
    """oversized, not_json, invalid, topic_mismatch, unknown_topic."""
    detail: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(BigInteger, default=1)
    first_received_at: Mapped[float] = mapped_column(Double)
    last_received_at: Mapped[float] = mapped_column(Double)


DEAD_LETTER_KEEP_BYTES = 4096
"""How much of a dead-lettered payload is kept (the full size is recorded beside it)."""


class DeviceHealthRecord(Base):
    """The service's latest judgement of a device on its model: drift state (and the reference it was
    judged against) and the accuracy estimate with its interval. The console and metrics read it."""

    __tablename__ = "device_health"
    device: Mapped[str] = mapped_column(NAME, primary_key=True)
    fleet: Mapped[str] = mapped_column(NAME, index=True)
    model_sha256: Mapped[str] = mapped_column(SHA)
    drift_state: Mapped[str | None] = mapped_column(String())
    """ok, warning, drift, rebasing (None before the first assessed window)."""
    reference: Mapped[str | None] = mapped_column(String())
    estimated_accuracy: Mapped[float | None] = mapped_column(Double)
    low: Mapped[float | None] = mapped_column(Double)
    high: Mapped[float | None] = mapped_column(Double)
    method: Mapped[str | None] = mapped_column(String())
    labels: Mapped[int] = mapped_column(Integer, default=0)
    """Audit labels the estimate used (PPI++); 0 for a label-free estimate."""
    frames_per_second: Mapped[float | None] = mapped_column(Double)
    confidence_mean: Mapped[float | None] = mapped_column(Double)
    artifact: Mapped[str | None] = mapped_column(String())
    """The artifact the device's newest assessed window ran on (onnx-int8, tflite-fp32, ...)."""
    updated_at: Mapped[float] = mapped_column(Double)


class WindowRollup(Base):
    """An hour or a day of one device's windows on one model, merged exactly (histograms add up), so a
    30-day chart reads 720 rows, not 43,200 windows. ``payload`` is the merged ``TelemetryWindow``."""

    __tablename__ = "window_rollups"
    __table_args__ = (
        UniqueConstraint("device", "model_sha256", "period", "start", name="uq_window_rollup"),
        Index("ix_window_rollups_device_period_start", "device", "period", "start"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(NAME)
    device: Mapped[str] = mapped_column(NAME)
    model_sha256: Mapped[str] = mapped_column(SHA)
    period: Mapped[str] = mapped_column(String())
    """hour or day."""
    start: Mapped[float] = mapped_column(Double)
    """Start of the hour or day (UTC), by window end time."""
    windows: Mapped[int] = mapped_column(Integer)
    frames_inferred: Mapped[int] = mapped_column(BigInteger)
    frames_failed: Mapped[int] = mapped_column(BigInteger)
    span_s: Mapped[float] = mapped_column(Double)
    """Seconds covered by the windows (sum of end - start): frames/s = frames_inferred / span_s."""
    confidence_mean: Mapped[float | None] = mapped_column(Double)
    estimated_accuracy: Mapped[float | None] = mapped_column(Double)
    """The label-free estimate of the merged windows against the model's reference, at roll-up time."""
    payload: Mapped[str] = mapped_column(RawJSON)


class RollupCursor(Base):
    """How far roll-ups have been made: windows that ended before ``rolled_until`` are in them."""

    __tablename__ = "rollup_cursors"
    period: Mapped[str] = mapped_column(String(), primary_key=True)
    rolled_until: Mapped[float] = mapped_column(Double)


class SampleFlag(Base):
    """A sample a person marked unusable for training (blurred, privacy filter missed, no class fits)."""

    __tablename__ = "sample_flags"
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True)
    flag: Mapped[str] = mapped_column(String())
    actor: Mapped[str] = mapped_column(String())
    created_at: Mapped[float] = mapped_column(Double)


class ConsoleUser(Base):
    """A person who may log in to the console, with one role (viewer < labeller < operator < admin)."""

    __tablename__ = "console_users"
    username: Mapped[str] = mapped_column(NAME, primary_key=True)
    password_hash: Mapped[str] = mapped_column(String())
    """argon2id, with its parameters (argon2-cffi's encoded form)."""
    role: Mapped[str] = mapped_column(String())
    created_at: Mapped[float] = mapped_column(Double)


class ConsoleSession(Base):
    """A logged-in browser: the sha256 of its cookie, its CSRF token and when it expires."""

    __tablename__ = "console_sessions"
    token_sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    username: Mapped[str] = mapped_column(
        ForeignKey("console_users.username", ondelete="CASCADE"), index=True
    )
    csrf: Mapped[str] = mapped_column(String())
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)


class ApiToken(Base):
    """A bearer token for automation, acting as its user (only its sha256 is kept)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(NAME)
    username: Mapped[str] = mapped_column(
        ForeignKey("console_users.username", ondelete="CASCADE"), index=True
    )
    token_sha256: Mapped[str] = mapped_column(SHA, unique=True)
    created_at: Mapped[float] = mapped_column(Double)
    last_used_at: Mapped[float | None] = mapped_column(Double)


class RolloutCheck(Base):
    """One look of the canary analysis: canary against control at that moment, the test and its p-value,
    and what it decided. The console draws a rollout's history from these."""

    __tablename__ = "rollout_checks"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    ts: Mapped[float] = mapped_column(Double)
    decision: Mapped[str] = mapped_column(String())
    canary_accuracy: Mapped[float | None] = mapped_column(Double)
    control_accuracy: Mapped[float | None] = mapped_column(Double)
    p_noninferior: Mapped[float | None] = mapped_column(Double)
    canary_windows: Mapped[int] = mapped_column(Integer)
    control_windows: Mapped[int] = mapped_column(Integer)
    reasons: Mapped[str | None] = mapped_column(RawJSON)
