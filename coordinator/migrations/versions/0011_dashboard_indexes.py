"""Indexes for the portal's dashboard: what each site reported spent, and runs by state.

The sites page adds up every run's ``epsilon-spent`` per site: without an index on the
metric's name that read scans the whole ``site_metrics`` table (150,000 rows for 1,000
runs); (name, site, run, value) answers it from the index alone. The runs list filtered by
state, newest first, reads (status, id).

Revision ID: 0011
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Index site metrics by (name, site, run, value) and runs by (status, id)."""
    op.create_index("ix_site_metrics_name_site_run", "site_metrics",
                    ["name", "site_name", "run_id", "value"])
    op.create_index("ix_runs_status_id", "runs", ["status", "id"])


def downgrade() -> None:
    """Drop both indexes."""
    op.drop_index("ix_runs_status_id", table_name="runs")
    op.drop_index("ix_site_metrics_name_site_run", table_name="site_metrics")
