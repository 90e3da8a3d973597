"""Site presence: the last contact the site gateway saw from each site.

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``site_presence`` (one row per site the gateway has seen)."""
    op.create_table(
        "site_presence",
        sa.Column("site_name", sa.String(length=40), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("site_name", name="pk_site_presence"),
    )


def downgrade() -> None:
    """Drop it again."""
    op.drop_table("site_presence")
