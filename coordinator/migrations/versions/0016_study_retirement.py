"""Study retirement: who retired a study version, when and why.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``studies.retired_at``, ``studies.retired_by`` and ``studies.retire_reason``
    (empty for every version registered before: none was retired)."""
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retired_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("retire_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop them again (the audit log keeps each ``study.retired`` event)."""
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("retire_reason")
        batch.drop_column("retired_by")
        batch.drop_column("retired_at")
