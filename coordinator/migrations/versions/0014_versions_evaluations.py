"""Site versions and evaluations on demand.

``sites`` gains the Fedward and Flower versions each site agent last reported; the new
``evaluations`` table holds the federated evaluations of a checkpoint on the sites'
held-out data (per-site results and refusals as JSON).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``sites`` version columns and the ``evaluations`` table."""
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("flower_version", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("versions_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("versions_via", sa.String(length=16), nullable=True))
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("release_id", sa.String(length=128), nullable=True),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("flwr_run_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("results_json", sa.Text(), nullable=False),
        sa.Column("failed_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_evaluations_run_id", "evaluations", ["run_id"])


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_evaluations_run_id", table_name="evaluations")
    op.drop_table("evaluations")
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("versions_via")
        batch.drop_column("versions_at")
        batch.drop_column("flower_version")
        batch.drop_column("agent_version")
