"""MLflow hand-off: the exports of runs and releases still to do, done, or failed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the table of MLflow exports."""
    op.create_table(
        "mlflow_exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("tracking_uri", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("next_attempt_at", nullable=True),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        _ts("requested_at", nullable=False),
        _ts("exported_at", nullable=True),
        sa.Column("result_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mlflow_exports"),
        sa.UniqueConstraint("kind", "subject", name="uq_mlflow_exports_kind_subject"),
    )


def downgrade() -> None:
    """Drop it again."""
    op.drop_table("mlflow_exports")
