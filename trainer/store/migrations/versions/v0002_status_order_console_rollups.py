"""Everything the store gained after release 3ff547b: status ordering, removed devices, webhook delivery,
device health, roll-ups, sample flags, console access, rollout checks and the fleet/end window index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-20

The three new columns are nullable and left NULL on existing rows, as the store reads them: a device
whose ``status_session`` is NULL has its current status ordered by ``ts`` until its next status, and a
status without a ``connection`` number comes from an agent that does not number its connections.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SHA = sa.String(length=64)
JSON = sa.JSON()


def _id() -> sa.Column:
    return sa.Column("id", ID, autoincrement=True, nullable=False)


def _status_ordering() -> None:
    """Columns that order a device's statuses by (session, connection, state, ts)."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("status_session", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("status_connection", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("status_history") as batch:
        batch.add_column(sa.Column("connection", sa.BigInteger(), nullable=True))
    op.create_index("ix_windows_fleet_end", "windows", ["fleet", "end"])


def _devices_health() -> None:
    op.create_table(
        "removed_devices",
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("removed_at", sa.Double(), nullable=False),
        sa.Column("removed_by", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("device"),
    )
    op.create_index("ix_removed_devices_fleet", "removed_devices", ["fleet"])
    op.create_table(
        "device_health",
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=False),
        sa.Column("drift_state", sa.String(), nullable=True),
        sa.Column("reference", sa.String(), nullable=True),
        sa.Column("estimated_accuracy", sa.Double(), nullable=True),
        sa.Column("low", sa.Double(), nullable=True),
        sa.Column("high", sa.Double(), nullable=True),
        sa.Column("method", sa.String(), nullable=True),
        sa.Column("labels", sa.Integer(), nullable=False),
        sa.Column("frames_per_second", sa.Double(), nullable=True),
        sa.Column("confidence_mean", sa.Double(), nullable=True),
        sa.Column("artifact", sa.String(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("device"),
    )
    op.create_index("ix_device_health_fleet", "device_health", ["fleet"])


def _webhooks() -> None:
    op.create_table(
        "webhook_deliveries",
        _id(),
        sa.Column("webhook", sa.String(), nullable=False),
        sa.Column("alert_id", ID, nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("delivered_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("webhook", "alert_id", name="uq_webhook_delivery"),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_table(
        "webhook_cursors",
        sa.Column("webhook", sa.String(), nullable=False),
        sa.Column("last_alert_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("webhook"),
    )


def _rollups() -> None:
    op.create_table(
        "window_rollups",
        _id(),
        sa.Column("fleet", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("model_sha256", SHA, nullable=False),
        sa.Column("period", sa.String(), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("frames_inferred", sa.BigInteger(), nullable=False),
        sa.Column("frames_failed", sa.BigInteger(), nullable=False),
        sa.Column("span_s", sa.Double(), nullable=False),
        sa.Column("confidence_mean", sa.Double(), nullable=True),
        sa.Column("estimated_accuracy", sa.Double(), nullable=True),
        sa.Column("payload", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device", "model_sha256", "period", "start", name="uq_window_rollup"),
    )
    op.create_index("ix_window_rollups_device_period_start", "window_rollups", ["device", "period", "start"])
    op.create_table(
        "rollup_cursors",
        sa.Column("period", sa.String(), nullable=False),
        sa.Column("rolled_until", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("period"),
    )


def _sample_flags_and_rollout_checks() -> None:
    op.create_table(
        "sample_flags",
        sa.Column("sample_id", ID, nullable=False),
        sa.Column("flag", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sample_id"),
    )
    op.create_table(
        "rollout_checks",
        _id(),
        sa.Column("rollout_id", ID, nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("decision", sa.String(), nullable=False),
        sa.Column("canary_accuracy", sa.Double(), nullable=True),
        sa.Column("control_accuracy", sa.Double(), nullable=True),
        sa.Column("p_noninferior", sa.Double(), nullable=True),
        sa.Column("canary_windows", sa.Integer(), nullable=False),
        sa.Column("control_windows", sa.Integer(), nullable=False),
        sa.Column("reasons", JSON, nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollout_checks_rollout_id", "rollout_checks", ["rollout_id"])


def _console_access() -> None:
    op.create_table(
        "console_users",
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("password_hash", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("username"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_sha256", SHA, nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("csrf", sa.String(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["username"], ["console_users.username"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    op.create_index("ix_console_sessions_username", "console_sessions", ["username"])
    op.create_table(
        "api_tokens",
        _id(),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("token_sha256", SHA, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("last_used_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["username"], ["console_users.username"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_index("ix_api_tokens_username", "api_tokens", ["username"])


NEW_TABLES = (
    "removed_devices",
    "device_health",
    "webhook_deliveries",
    "webhook_cursors",
    "window_rollups",
    "rollup_cursors",
    "sample_flags",
    "rollout_checks",
    "console_users",
    "console_sessions",
    "api_tokens",
)
"""The tables this revision creates, in creation order."""


def upgrade() -> None:
    """Add the status-ordering columns and window index, and create the eleven new tables."""
    _status_ordering()
    _devices_health()
    _webhooks()
    _rollups()
    _sample_flags_and_rollout_checks()
    _console_access()


def downgrade() -> None:
    """Back to 0001: drop the new tables, the index and the columns (SQLite copies the two tables)."""
    for table in reversed(NEW_TABLES):
        op.drop_table(table)
    op.drop_index("ix_windows_fleet_end", table_name="windows")
    with op.batch_alter_table("status_history") as batch:
        batch.drop_column("connection")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("status_connection")
        batch.drop_column("status_session")
