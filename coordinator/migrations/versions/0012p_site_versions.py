"""Site versions: the Fedward and Flower versions each site agent last reported.

Revision ID: 0012p
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012p"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``sites.agent_version``, ``flower_version``, ``versions_at`` and ``versions_via``."""
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("flower_version", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("versions_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("versions_via", sa.String(length=16), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("versions_via")
        batch.drop_column("versions_at")
        batch.drop_column("flower_version")
        batch.drop_column("agent_version")
