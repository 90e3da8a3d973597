"""Request and response bodies of the REST API (one ``XCreate`` / ``XPublic`` per entity).

Request models forbid unknown fields, so a typo such as ``"round": 3`` is a 422 naming the
field instead of a silently ignored option. Floats must be finite. This module holds the
users, projects, sites, audit and health bodies; a run's are in
:mod:`coordinator.run_schemas`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from coordinator.models import AuditEvent, Project, Site, User
from coordinator.presence import is_online
from fedward.run_config import SiteName

__all__ = [
    "PROJECT_NAME_PATTERN",
    "AuditEventPublic",
    "AuditPage",
    "AuditVerifyResult",
    "HealthPublic",
    "NodeKeyCreate",
    "ProjectCreate",
    "ProjectPublic",
    "RequestBody",
    "SiteCreate",
    "SitePublic",
    "UserPublic",
]


PROJECT_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"

ProjectName = Annotated[str, StringConstraints(pattern=PROJECT_NAME_PATTERN)]


class RequestBody(BaseModel):
    """A request body: unknown fields, NaN/Inf and wrong JSON types (``true`` or ``"5"``
    for a number) are refused with a 422 that names the field, not coerced."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# --- users -------------------------------------------------------------------------------


class UserPublic(BaseModel):
    """A user, without any secret."""

    id: int
    name: str
    role: str
    created_at: datetime
    token_expires_at: datetime = Field(description="When the user's API token stops working")
    token_revoked: bool = Field(description="The API token was revoked (logout, password "
                                            "change, an admin)")
    disabled_at: datetime | None = Field(
        default=None, description="Set while the user is disabled: no login, no token")

    @classmethod
    def of(cls, user: User) -> UserPublic:
        """Build from the table row."""
        assert user.id is not None
        return cls(id=user.id, name=user.name, role=user.role, created_at=user.created_at,
                   token_expires_at=user.token_expires_at,
                   token_revoked=user.token_revoked_at is not None,
                   disabled_at=user.disabled_at)


# --- projects ----------------------------------------------------------------------------


class ProjectCreate(RequestBody):
    """Body of ``POST /projects``."""

    name: ProjectName = Field(description="Lowercase letters, digits, '-' and '_'; 1-64.")
    description: str = Field(default="", max_length=2000)


class ProjectPublic(BaseModel):
    """A project."""

    id: int
    name: str
    description: str
    created_at: datetime

    @classmethod
    def of(cls, project: Project) -> ProjectPublic:
        """Build from the table row."""
        assert project.id is not None
        return cls(
            id=project.id,
            name=project.name,
            description=project.description,
            created_at=project.created_at,
        )


# --- sites -------------------------------------------------------------------------------


class SiteCreate(RequestBody):
    """Body of ``POST /sites``."""

    name: SiteName = Field(description="Lowercase letters, digits and '-'; 3-40 characters.")


class NodeKeyCreate(RequestBody):
    """Body of ``POST /sites/{name}/node-key``: the site's SuperNode public key."""

    public_key: str = Field(
        min_length=1,
        max_length=4096,
        description="OpenSSH public key of the site's Flower SuperNode (one line).",
    )

    @field_validator("public_key")
    @classmethod
    def _openssh(cls, value: str) -> str:
        # Parse it now: a key Flower would reject later should be a 422 here, at the source.
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key

        value = value.strip()
        try:
            load_ssh_public_key(value.encode("ascii"))
        except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not an OpenSSH public key ({exc})") from None
        return value


class SitePublic(BaseModel):
    """A site and its registration state."""

    id: int
    name: str
    status: str
    flower_node_id: str | None
    public_key: str | None
    created_at: datetime
    registered_at: datetime | None
    last_seen_at: datetime | None = Field(
        default=None, description="The last request the site gateway saw from the site "
        "(recorded every few seconds at most); null: never seen.")
    online: bool = Field(
        default=False, description="Whether the site's last contact is recent (within "
        "coordinator.presence.ONLINE_WITHIN_S seconds).")
    agent_version: str | None = Field(
        default=None, description="The Fedward version the site agent last reported (at "
        "enrollment, renewal or an accepted admission); null: none reported.")
    flower_version: str | None = Field(
        default=None, description="The Flower version the site agent last reported.")
    versions_at: datetime | None = Field(
        default=None, description="When the site last reported its versions.")
    versions_via: str | None = Field(
        default=None, description="How: enrollment, renewal or admission.")
    certificate_expires_at: datetime | None = Field(
        default=None, description="When the site's current certificate expires; null: it "
        "holds no valid certificate.")

    @classmethod
    def of(cls, site: Site, *, last_seen_at: datetime | None = None,
           certificate_expires_at: datetime | None = None) -> SitePublic:
        """Build from the table row and, where known, the site's last contact and the
        expiry of its current certificate."""
        assert site.id is not None
        return cls(
            id=site.id,
            name=site.name,
            status=site.status,
            flower_node_id=site.flower_node_id,
            public_key=site.public_key,
            created_at=site.created_at,
            registered_at=site.registered_at,
            last_seen_at=last_seen_at,
            online=is_online(last_seen_at),
            agent_version=site.agent_version,
            flower_version=site.flower_version,
            versions_at=site.versions_at,
            versions_via=site.versions_via,
            certificate_expires_at=certificate_expires_at,
        )



# --- audit -------------------------------------------------------------------------------


class AuditEventPublic(BaseModel):
    """One entry of the audit log."""

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventPublic:
        """Build from the table row (a tampered, unparseable detail shows as ``_raw``)."""
        assert event.id is not None
        try:
            detail = json.loads(event.detail_json)
        except ValueError:
            detail = {"_raw": event.detail_json}
        if not isinstance(detail, dict):
            detail = {"_raw": event.detail_json}
        return cls(
            id=event.id,
            at=event.at,
            actor=event.actor,
            action=event.action,
            subject=event.subject,
            detail=detail,
            prev_hash=event.prev_hash,
            hash=event.hash,
        )


class AuditPage(BaseModel):
    """A page of the audit log, newest first."""

    items: list[AuditEventPublic]
    total: int
    limit: int
    offset: int


class AuditVerifyResult(BaseModel):
    """Outcome of checking the audit log's hash chain."""

    ok: bool
    first_broken_id: int | None
    events: int


class HealthPublic(BaseModel):
    """Liveness and database reachability."""

    status: str
    database: str
