"""Dataset n-gram filters: what each training dataset holds, for eval contamination checks.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Self-contained on purpose (no import of registry.models), like 0003. A new table only: a
gateway of revision 0005 never reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dataset_ngram_filters",
        sa.Column("dataset_sha256", sa.String(length=64), nullable=False),
        sa.Column("ngram_words", sa.Integer(), nullable=False),
        sa.Column("hash_count", sa.Integer(), nullable=False),
        sa.Column("bit_count", sa.BigInteger(), nullable=False),
        sa.Column("false_positive_rate", sa.Float(), nullable=False),
        sa.Column("ngrams", sa.BigInteger(), nullable=False),
        sa.Column("texts", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.BigInteger(), nullable=False),
        sa.Column("dataset_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bits", sa.LargeBinary(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("dataset_sha256", name=op.f("pk_dataset_ngram_filters")),
    )


def downgrade() -> None:
    op.drop_table("dataset_ngram_filters")
