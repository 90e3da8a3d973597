"""Credentials that end: API token expiry and revocation, disabled users, and site
certificates retired by a renewal.

Existing API tokens get the default lifetime (90 days) from the upgrade on, so a token
issued before it stops working like any other, not never.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The default of Settings.token_ttl_days when this revision was written.
_EXISTING_TOKEN_DAYS = 90


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Add token expiry and revocation, disabled users and superseded certificates."""
    with op.batch_alter_table("users") as batch:
        batch.add_column(_ts("token_expires_at", nullable=True))
        batch.add_column(_ts("token_revoked_at", nullable=True))
        batch.add_column(_ts("disabled_at", nullable=True))
    expires = datetime.now(UTC) + timedelta(days=_EXISTING_TOKEN_DAYS)
    op.get_bind().execute(
        sa.text("UPDATE users SET token_expires_at = :expires WHERE token_expires_at IS NULL"
                ).bindparams(sa.bindparam("expires", type_=sa.DateTime(timezone=True))),
        {"expires": expires})
    with op.batch_alter_table("users") as batch:
        batch.alter_column("token_expires_at", existing_type=sa.DateTime(timezone=True),
                           nullable=False)
    with op.batch_alter_table("site_certificates") as batch:
        batch.add_column(sa.Column("superseded_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("site_certificates") as batch:
        batch.drop_column("superseded_by")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled_at")
        batch.drop_column("token_revoked_at")
        batch.drop_column("token_expires_at")
