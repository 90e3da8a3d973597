"""Site enrollment: one-time tokens and the client certificates issued to sites.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the enrollment tables."""
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        _ts("expires_at", nullable=False),
        _ts("used_at", nullable=True),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"],
                                name="fk_enrollment_tokens_site_id_sites"),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_enrollment_tokens_token_hash"),
    )
    op.create_index("ix_enrollment_tokens_site_id", "enrollment_tokens", ["site_id"])
    op.create_table(
        "site_certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        _ts("issued_at", nullable=False),
        _ts("not_after", nullable=False),
        _ts("revoked_at", nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"],
                                name="fk_site_certificates_site_id_sites"),
        sa.PrimaryKeyConstraint("id", name="pk_site_certificates"),
        sa.UniqueConstraint("serial", name="uq_site_certificates_serial"),
    )
    op.create_index("ix_site_certificates_site_id", "site_certificates", ["site_id"])


def downgrade() -> None:
    """Drop the enrollment tables."""
    op.drop_index("ix_site_certificates_site_id", table_name="site_certificates")
    op.drop_table("site_certificates")
    op.drop_index("ix_enrollment_tokens_site_id", table_name="enrollment_tokens")
    op.drop_table("enrollment_tokens")
