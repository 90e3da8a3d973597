"""People and what they may do: users, their passwords and sessions, projects, the audit log.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Text
from sqlmodel import Field, SQLModel

from coordinator.models.base import UTCDateTime, created_field, id_field, utcnow

__all__ = [
    "AuditEvent",
    "LoginSession",
    "Project",
    "User",
    "UserCredential",
]


class User(SQLModel, table=True):
    """A person or service account of the coordinator.

    Only the SHA-256 of the API token is stored; the token is shown once when it is issued.
    It works until ``token_expires_at``, or until it is revoked (``token_revoked_at``: a
    logout with it, a password change, an admin). A disabled user (``disabled_at``) can
    neither log in nor use any token.
    """

    __tablename__ = "users"

    id: int | None = id_field()
    name: str = Field(max_length=64, unique=True, nullable=False)
    role: str = Field(max_length=32, nullable=False)
    token_hash: str = Field(max_length=64, unique=True, nullable=False)
    created_at: datetime = created_field()
    token_expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    token_revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Project(SQLModel, table=True):
    """A federated project: a question answered by runs over the same sites."""

    __tablename__ = "projects"

    id: int | None = id_field()
    name: str = Field(max_length=64, unique=True, nullable=False)
    description: str = Field(default="", sa_type=Text, nullable=False)
    created_at: datetime = created_field()


class AuditEvent(SQLModel, table=True):
    """One entry of the hash-chained audit log (see :mod:`coordinator.audit`).

    ``prev_hash`` is unique: two writers can never both extend the same entry, so even a
    locking mistake would fail loudly instead of forking the chain.
    """

    __tablename__ = "audit_events"
    # Run views look events up by action and subject (admission state, rejected updates).
    __table_args__ = (Index("ix_audit_events_action_subject", "action", "subject"),)

    id: int | None = id_field()
    at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    actor: str = Field(max_length=64, nullable=False)
    action: str = Field(max_length=64, nullable=False)
    subject: str = Field(sa_type=Text, nullable=False)
    detail_json: str = Field(sa_type=Text, nullable=False)
    prev_hash: str = Field(max_length=64, unique=True, nullable=False)
    hash: str = Field(max_length=64, unique=True, nullable=False)
    # The hash chain format the entry was written in (fedward.hashchain): 1 for entries from
    # before RFC 8785 canonical JSON (migration 0007), 2 since.
    hash_version: int = Field(default=2, nullable=False, sa_column_kwargs={"server_default": "1"})


class UserCredential(SQLModel, table=True):
    """A user's password, as an argon2id hash (the password itself is never stored).

    A user without a row here has no password: it can use its API token only.
    """

    __tablename__ = "user_credentials"

    id: int | None = id_field()
    user_id: int = Field(foreign_key="users.id", unique=True, nullable=False)
    password_hash: str = Field(sa_type=Text, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class LoginSession(SQLModel, table=True):
    """A session opened by a password login; only the SHA-256 of its token is stored."""

    __tablename__ = "login_sessions"

    id: int | None = id_field()
    user_id: int = Field(foreign_key="users.id", nullable=False, index=True)
    token_hash: str = Field(max_length=64, unique=True, nullable=False)
    created_at: datetime = created_field()
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
