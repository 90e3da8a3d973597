"""Studies: registered study specs, one row per version, with their content hash.

Revision ID: 0010
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table of studies."""
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("registered_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("name", "version", name="uq_studies_name_version"),
        sa.UniqueConstraint("name", "content_hash", name="uq_studies_name_content_hash"),
    )
    op.create_index("ix_studies_name", "studies", ["name"])
    op.create_index("ix_studies_content_hash", "studies", ["content_hash"])


def downgrade() -> None:
    """Drop it again (runs keep the study's name, version and hash in their config)."""
    op.drop_index("ix_studies_content_hash", table_name="studies")
    op.drop_index("ix_studies_name", table_name="studies")
    op.drop_table("studies")
