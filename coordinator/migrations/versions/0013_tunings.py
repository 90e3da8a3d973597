"""Hyperparameter tuning: one row per search, one per trial (each trial is a run).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the tables of searches and their trials."""
    op.create_table(
        "tunings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request_json", sa.Text(), nullable=False),
        sa.Column("terms_json", sa.Text(), nullable=False),
        sa.Column("trials_planned", sa.Integer(), nullable=False),
        sa.Column("best_run_id", sa.Integer(), nullable=True),
        sa.Column("best_score", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"],
                                name="fk_tunings_project_id_projects"),
        sa.ForeignKeyConstraint(["best_run_id"], ["runs.id"],
                                name="fk_tunings_best_run_id_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_tunings"),
    )
    op.create_index("ix_tunings_project_id", "tunings", ["project_id"])
    op.create_table(
        "tuning_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tuning_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("params_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tuning_id"], ["tunings.id"],
                                name="fk_tuning_trials_tuning_id_tunings"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_tuning_trials_run_id_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_tuning_trials"),
        sa.UniqueConstraint("tuning_id", "number", name="uq_tuning_trials_tuning_id_number"),
    )
    op.create_index("ix_tuning_trials_tuning_id", "tuning_trials", ["tuning_id"])


def downgrade() -> None:
    """Drop both tables (the trials' runs stay, as ordinary runs)."""
    op.drop_index("ix_tuning_trials_tuning_id", table_name="tuning_trials")
    op.drop_table("tuning_trials")
    op.drop_index("ix_tunings_project_id", table_name="tunings")
    op.drop_table("tunings")
