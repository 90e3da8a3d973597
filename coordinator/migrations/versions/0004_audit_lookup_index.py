"""An index for the audit lookups run views make (admission state, update rejections, data
fingerprints: one action for one subject).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Index audit events by (action, subject)."""
    op.create_index("ix_audit_events_action_subject", "audit_events", ["action", "subject"])


def downgrade() -> None:
    """Drop the index."""
    op.drop_index("ix_audit_events_action_subject", table_name="audit_events")
