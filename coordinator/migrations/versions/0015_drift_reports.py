"""Drift reports: one row per drift check a site reported for a release.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table of drift reports and its indexes."""
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.String(length=32), nullable=False),
        sa.Column("site_name", sa.String(length=64), nullable=False),
        sa.Column("release_id", sa.String(length=128), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("failure", sa.String(length=32), nullable=True),
        sa.Column("rows_bucket", sa.String(length=16), nullable=True),
        sa.Column("labelled", sa.Boolean(), nullable=True),
        sa.Column("treatment", sa.String(length=16), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("auc", sa.Float(), nullable=True),
        sa.Column("max_psi", sa.Float(), nullable=True),
        sa.Column("min_p_value", sa.Float(), nullable=True),
        sa.Column("alarm", sa.Boolean(), nullable=False),
        sa.Column("alarm_features_json", sa.Text(), nullable=False),
        sa.Column("features_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drift_reports"),
        sa.UniqueConstraint("report_id", name="uq_drift_reports_report_id"),
    )
    op.create_index("ix_drift_reports_release_id", "drift_reports", ["release_id"])
    op.create_index("ix_drift_reports_site_release", "drift_reports",
                    ["site_name", "release_id", "id"])


def downgrade() -> None:
    """Drop the table of drift reports."""
    op.drop_index("ix_drift_reports_site_release", table_name="drift_reports")
    op.drop_index("ix_drift_reports_release_id", table_name="drift_reports")
    op.drop_table("drift_reports")
