"""Shadow mode: the adapter's shadow pointer (a candidate version mirrored a share of the
stable's traffic, its output discarded).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

Self-contained on purpose (no import of registry.models), like 0003. Two nullable columns:
existing adapters start with no shadow and serve exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_ADAPTER_COLUMNS = ("shadow_version", "shadow_percent")


def upgrade() -> None:
    # In place, not batch mode, for the reason 0003 gives (foreign keys into `adapters`).
    op.add_column("adapters", sa.Column("shadow_version", sa.Integer(), nullable=True))
    op.add_column("adapters", sa.Column("shadow_percent", sa.Integer(), nullable=True))


def downgrade() -> None:
    for column in NEW_ADAPTER_COLUMNS:
        op.drop_column("adapters", column)
