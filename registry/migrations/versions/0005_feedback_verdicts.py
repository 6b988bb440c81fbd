"""Feedback verdicts: the first verdict recorded for each response, shared by every replica.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

Self-contained on purpose (no import of registry.models), like 0003. A new table only: a
gateway of revision 0004 never reads it, and verdicts it remembered in memory are not carried
over (the feedback window starts again for them, as after a restart).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feedback_verdicts",
        sa.Column("response_sha256", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_by", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("response_sha256", name=op.f("pk_feedback_verdicts")),
    )
    op.create_index(op.f("ix_feedback_verdicts_recorded_at"), "feedback_verdicts", ["recorded_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_verdicts_recorded_at"), table_name="feedback_verdicts")
    op.drop_table("feedback_verdicts")
