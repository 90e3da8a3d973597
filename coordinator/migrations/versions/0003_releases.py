"""Releases: passwords and login sessions, project gates, release candidates, releases.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the tables of the release workflow."""
    op.create_table(
        "user_credentials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        _ts("updated_at", nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name="fk_user_credentials_user_id_users"),
        sa.PrimaryKeyConstraint("id", name="pk_user_credentials"),
        sa.UniqueConstraint("user_id", name="uq_user_credentials_user_id"),
    )
    op.create_table(
        "login_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        _ts("expires_at", nullable=False),
        _ts("ended_at", nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name="fk_login_sessions_user_id_users"),
        sa.PrimaryKeyConstraint("id", name="pk_login_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_login_sessions_token_hash"),
    )
    op.create_index("ix_login_sessions_user_id", "login_sessions", ["user_id"])
    op.create_table(
        "project_gates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("thresholds_json", sa.Text(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        _ts("updated_at", nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"],
                                name="fk_project_gates_project_id_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_project_gates"),
        sa.UniqueConstraint("project_id", name="uq_project_gates_project_id"),
    )
    op.create_table(
        "release_candidates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("intended_use", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("proposed_by", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        sa.Column("staging_path", sa.Text(), nullable=True),
        sa.Column("lineage_json", sa.Text(), nullable=False),
        sa.Column("gates_json", sa.Text(), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        _ts("decided_at", nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"],
                                name="fk_release_candidates_run_id_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_release_candidates"),
    )
    op.create_index("ix_release_candidates_run_id", "release_candidates", ["run_id"])
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.String(length=128), nullable=False),
        sa.Column("candidate_id", sa.Integer(), nullable=False),
        sa.Column("bundle_path", sa.Text(), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        _ts("created_at", nullable=False),
        _ts("revoked_at", nullable=True),
        sa.Column("revoked_by", sa.String(length=64), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["candidate_id"], ["release_candidates.id"],
                                name="fk_releases_candidate_id_release_candidates"),
        sa.PrimaryKeyConstraint("id", name="pk_releases"),
        sa.UniqueConstraint("release_id", name="uq_releases_release_id"),
        sa.UniqueConstraint("candidate_id", name="uq_releases_candidate_id"),
    )


def downgrade() -> None:
    """Drop the tables of the release workflow."""
    op.drop_table("releases")
    op.drop_index("ix_release_candidates_run_id", table_name="release_candidates")
    op.drop_table("release_candidates")
    op.drop_table("project_gates")
    op.drop_index("ix_login_sessions_user_id", table_name="login_sessions")
    op.drop_table("login_sessions")
    op.drop_table("user_credentials")
