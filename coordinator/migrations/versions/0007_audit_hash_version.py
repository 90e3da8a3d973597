"""Audit chain format version: RFC 8785 canonical JSON for new entries.

Every entry already in the table was hashed with the first format (Python's sorted-keys
JSON) and keeps verifying with it: the column's default marks them version 1. Entries
appended from now on are version 2 (``fedward.hashchain``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``audit_events.hash_version`` (1 for every existing entry)."""
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("hash_version", sa.Integer(), nullable=False,
                                   server_default="1"))


def downgrade() -> None:
    """Drop it again (entries of version 2 then no longer verify: keep a backup)."""
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("hash_version")
