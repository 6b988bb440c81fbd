"""Canary rollouts: rollout state on adapters and the append-only rollout_events history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

Self-contained on purpose (no import of registry.models): a migration is a frozen snapshot, and
the models will move on. Only added, nullable or defaulted columns: existing adapters keep
serving exactly as before (no rollout, no fallback, default thresholds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_ADAPTER_COLUMNS = (
    "canary_percent",
    "rollout_paused",
    "active_target",
    "rollout_thresholds",
    "rolled_back_version",
    "rolled_back_at",
    "rollout_updated_at",
)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ALTER TABLE … ADD COLUMN, not batch mode: SQLite can add these in place, whereas a
    # batch rebuild drops and renames `adapters`, which foreign keys from existing rows refuse.
    # A string server default stays an in-place add on SQLite ('0' is false on PostgreSQL too).
    op.add_column("adapters", sa.Column("canary_percent", sa.Integer(), nullable=True))
    op.add_column(
        "adapters",
        sa.Column("rollout_paused", sa.Boolean(), server_default="0", nullable=False),
    )
    op.add_column("adapters", sa.Column("active_target", sa.String(length=80), nullable=True))
    op.add_column("adapters", sa.Column("rollout_thresholds", _json(), nullable=True))
    op.add_column("adapters", sa.Column("rolled_back_version", sa.Integer(), nullable=True))
    op.add_column("adapters", sa.Column("rolled_back_at", _when(), nullable=True))
    op.add_column("adapters", sa.Column("rollout_updated_at", _when(), nullable=True))
    op.create_index(op.f("ix_adapters_rollout_updated_at"), "adapters", ["rollout_updated_at"])
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("at", _when(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("target", sa.String(length=80), nullable=True),
        sa.Column("percent", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("figures", _json(), nullable=True),
        sa.Column("automatic", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_rollout_events_adapter_id_adapters"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_events")),
    )
    op.create_index("ix_rollout_events_adapter_id_at", "rollout_events", ["adapter_id", "at"])


def downgrade() -> None:
    op.drop_table("rollout_events")
    op.drop_index(op.f("ix_adapters_rollout_updated_at"), table_name="adapters")
    # ALTER TABLE … DROP COLUMN in place (SQLite ≥ 3.35): none of these is in a constraint.
    for column in NEW_ADAPTER_COLUMNS:
        op.drop_column("adapters", column)
