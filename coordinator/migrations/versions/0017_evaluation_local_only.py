"""Evaluations on demand that also ask each site for its local-only DP baseline.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``evaluations.local_only`` (false for every evaluation asked for before: none
    asked for a baseline)."""
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("local_only", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    """Drop it again (the sites' ledgers and audit logs keep each baseline they trained)."""
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("local_only")
