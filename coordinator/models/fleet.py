"""The sites: their registration, enrollment tokens, certificates and last contact.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Text
from sqlmodel import Field, SQLModel

from coordinator.models.base import UTCDateTime, created_field, id_field

__all__ = [
    "SITE_STATUSES",
    "EnrollmentToken",
    "Site",
    "SiteCertificate",
    "SitePresence",
]


SITE_STATUSES: Final = frozenset({"added", "registered", "revoked"})


class Site(SQLModel, table=True):
    """A hospital site. Sites are global: any project's runs may use any registered site.

    ``flower_node_id`` is text because Flower node ids are unsigned 64-bit integers, which
    do not fit a signed BIGINT.
    """

    __tablename__ = "sites"

    id: int | None = id_field()
    name: str = Field(max_length=40, unique=True, nullable=False)
    flower_node_id: str | None = Field(default=None, max_length=32, unique=True)
    public_key: str | None = Field(default=None, sa_type=Text)
    status: str = Field(default="added", max_length=16, nullable=False)
    created_at: datetime = created_field()
    registered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # What the site agent last reported (coordinator.site_versions): checked versions only.
    agent_version: str | None = Field(default=None, max_length=64)
    flower_version: str | None = Field(default=None, max_length=64)
    versions_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    versions_via: str | None = Field(default=None, max_length=16)


class EnrollmentToken(SQLModel, table=True):
    """A one-time, expiring token with which a site enrolls. Only its SHA-256 is stored."""

    __tablename__ = "enrollment_tokens"

    id: int | None = id_field()
    site_id: int = Field(foreign_key="sites.id", nullable=False, index=True)
    token_hash: str = Field(max_length=64, unique=True, nullable=False)
    created_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = created_field()
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SiteCertificate(SQLModel, table=True):
    """A client certificate the site CA issued to a site (serial as hex).

    A certificate replaced by a renewal (or a new enrollment) is revoked, and
    ``superseded_by`` names the serial that replaced it.
    """

    __tablename__ = "site_certificates"

    id: int | None = id_field()
    site_id: int = Field(foreign_key="sites.id", nullable=False, index=True)
    serial: str = Field(max_length=64, unique=True, nullable=False)
    issued_at: datetime = created_field()
    not_after: datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoke_reason: str | None = Field(default=None, sa_type=Text)
    superseded_by: str | None = Field(default=None, max_length=64)


class SitePresence(SQLModel, table=True):
    """The last contact the site gateway saw from a site (revision 0009).

    Written at most every few seconds per site by :mod:`coordinator.presence`; a row of its
    own, so these frequent writes never touch the ``sites`` row that the API updates.
    """

    __tablename__ = "site_presence"

    site_name: str = Field(max_length=40, primary_key=True)
    last_seen_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
