"""Baseline: the schema of the last release before migrations (commit 3ff547b), fourteen tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-06

A database that release created (``create_all``, no ``alembic_version``) is recognised by its tables
and stamped 0001 by ``edgefleet db upgrade`` instead of running this. The types are spelled out here,
not imported from :mod:`trainer.store.schema`, so later changes to the models cannot rewrite history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""Auto-incremented keys: BIGINT (BIGSERIAL) on PostgreSQL, INTEGER PRIMARY KEY on SQLite."""
SHA = sa.String(length=64)
JSON = sa.JSON()
"""``json`` on PostgreSQL, JSON text on SQLite (the models' RawJSON binds the same columns)."""


def _id() -> sa.Column:
    return sa.Column("id", ID, autoincrement=True, nullable=False)


def _devices() -> None:
    op.create_table(
        "devices",
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("last_window_end", sa.Double(), nullable=True),
        sa.Column("session", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(), nullable=True),
        sa.Column("status_ts", sa.Double(), nullable=True),
        sa.Column("agent_version", sa.String(), nullable=True),
        sa.Column("model_name", sa.String(), nullable=True),
        sa.Column("model_version", sa.String(), nullable=True),
        sa.Column("model_sha256", SHA, nullable=True),
        sa.Column("first_model_sha256", SHA, nullable=True),
        sa.PrimaryKeyConstraint("device"),
    )
    op.create_index("ix_devices_fleet", "devices", ["fleet"])


def _status_history() -> None:
    op.create_table(
        "status_history",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=True),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device", "session", "state", "ts", name="uq_status_event"),
    )
    op.create_index("ix_status_history_device", "status_history", ["device"])


def _windows() -> None:
    op.create_table(
        "windows",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("end", sa.Double(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=False),
        sa.Column("artifact", sa.String(), nullable=True),
        sa.Column("frames_inferred", sa.BigInteger(), nullable=False),
        sa.Column("frames_failed", sa.BigInteger(), nullable=False),
        sa.Column("confidence_mean", sa.Double(), nullable=True),
        sa.Column("atc_above", sa.BigInteger(), nullable=True),
        sa.Column("model_known", sa.Boolean(), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device", "session", "seq", name="uq_window_key"),
    )
    op.create_index("ix_windows_device_model_start", "windows", ["device", "model_sha256", "start"])
    op.create_index("ix_windows_model_start", "windows", ["model_sha256", "start"])


def _samples_and_labels() -> None:
    op.create_table(
        "samples",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=True),
        sa.Column("consent_policy", sa.String(), nullable=False),
        sa.Column("sha256", SHA, nullable=False),
        sa.Column("content_type", sa.String(), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("provenance", JSON, nullable=True),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device", "sha256", name="uq_sample_device_sha"),
    )
    op.create_index("ix_samples_device", "samples", ["device"])
    op.create_table(
        "labels",
        _id(),
        sa.Column("sample_id", ID, nullable=False),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("labeller", sa.String(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_labels_sample_id", "labels", ["sample_id"])


def _update_events() -> None:
    op.create_table(
        "update_events",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("release", sa.BigInteger(), nullable=True),
        sa.Column("model_sha256", SHA, nullable=True),
        sa.Column("serving_sha256", SHA, nullable=True),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device", "session", "seq", name="uq_update_event_key"),
    )
    op.create_index("ix_update_events_device", "update_events", ["device"])
    op.create_index("ix_update_events_state_ts", "update_events", ["state", "ts"])


def _models_releases_rollouts() -> None:
    op.create_table(
        "models",
        sa.Column("sha256", SHA, nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("manifest", JSON, nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("registered_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
        sa.UniqueConstraint("name", "version", name="uq_model_name_version"),
    )
    op.create_table(
        "releases",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("channel", sa.String(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("details", JSON, nullable=True),
        sa.ForeignKeyConstraint(["model_sha256"], ["models.sha256"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_releases_fleet", "releases", ["fleet"])
    op.create_index("ix_releases_model_sha256", "releases", ["model_sha256"])
    op.create_table(
        "rollouts",
        _id(),
        sa.Column("release_id", ID, nullable=False),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=True),
        sa.Column("cohort", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("details", JSON, nullable=True),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollouts_device", "rollouts", ["device"])
    op.create_index("ix_rollouts_release_id", "rollouts", ["release_id"])


def _alerts() -> None:
    op.create_table(
        "alerts",
        _id(),
        sa.Column("fleet", sa.String(), nullable=True),
        sa.Column("device", sa.String(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("severity", sa.String(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("details", JSON, nullable=True),
        sa.Column("dedupe_key", sa.String(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("resolved_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dedupe_key"),
    )
    op.create_index("ix_alerts_created_at", "alerts", ["created_at"])
    op.create_index("ix_alerts_device", "alerts", ["device"])
    op.create_index("ix_alerts_kind", "alerts", ["kind"])


def _references() -> None:
    op.create_table(
        "reference_rebases",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=False),
        sa.Column("since", sa.Double(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fleet", "model_sha256", name="uq_reference_rebase"),
    )
    op.create_table(
        "device_references",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=False),
        sa.Column("since", sa.Double(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("reference", JSON, nullable=False),
        sa.Column("details", JSON, nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fleet", "device", "model_sha256", name="uq_device_reference"),
    )
    op.create_index("ix_device_references_device", "device_references", ["device"])


def _audit_and_dead_letters() -> None:
    op.create_table(
        "audit_log",
        _id(),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("details", JSON, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_table(
        "dead_letters",
        _id(),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_size", sa.BigInteger(), nullable=False),
        sa.Column("payload_sha256", SHA, nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("first_received_at", sa.Double(), nullable=False),
        sa.Column("last_received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("topic", "payload_sha256", name="uq_dead_letter"),
    )
    op.create_index("ix_dead_letters_reason", "dead_letters", ["reason"])


TABLES = (
    "devices",
    "status_history",
    "windows",
    "samples",
    "labels",
    "update_events",
    "models",
    "releases",
    "rollouts",
    "alerts",
    "reference_rebases",
    "device_references",
    "audit_log",
    "dead_letters",
)
"""The baseline's tables, in an order that creates a referenced table before its references."""


def upgrade() -> None:
    """Create the fourteen tables of release 3ff547b with their keys, constraints and indexes."""
    _devices()
    _status_history()
    _windows()
    _samples_and_labels()
    _update_events()
    _models_releases_rollouts()
    _alerts()
    _references()
    _audit_and_dead_letters()


def downgrade() -> None:
    """Drop every table (their indexes go with them), referencing tables first."""
    for table in reversed(TABLES):
        op.drop_table(table)
