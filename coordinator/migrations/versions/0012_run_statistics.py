"""Run statistics: each run's federated DP statistics, summed over its sites' releases.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table of run statistics."""
    op.create_table(
        "run_statistics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("reference_json", sa.Text(), nullable=False),
        sa.Column("sites_json", sa.Text(), nullable=False),
        sa.Column("failed_json", sa.Text(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_run_statistics_run_id_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_run_statistics"),
        sa.UniqueConstraint("run_id", name="uq_run_statistics_run_id"),
    )


def downgrade() -> None:
    """Drop it again (the sites' ledgers keep what each release cost)."""
    op.drop_table("run_statistics")
