"""The fleet's sites, as the ML team and admins manage them: add, list, register a node key,
issue an enrollment token, revoke.

The Flower boundary is injected: a :class:`NodeRegistrar` registers a site's SuperNode key
with the SuperLink (and unregisters it when the site is revoked); without one the route that
needs it answers 503. Mounted by :func:`coordinator.api.create_app`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Protocol

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from coordinator.api_errors import (
    RESPONSES_401,
    RESPONSES_403,
    RESPONSES_404,
    exception_reason,
    not_found,
)
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.dashboard_queries import certificate_expiry
from coordinator.db import SessionDep
from coordinator.enrollment import EnrollmentError, create_token, revoke_site
from coordinator.models import Site, utcnow
from coordinator.presence import last_seen
from coordinator.schemas import NodeKeyCreate, SiteCreate, SitePublic
from coordinator.settings import Settings
from fedward.certs import CAFiles
from fedward.roles import CERTIFICATE_ROLES, WRITE_ROLES

__all__ = ["NodeRegistrar", "router"]

router = APIRouter(prefix=API_PREFIX, tags=["sites"])


class NodeRegistrar(Protocol):
    """Registers a site's SuperNode public key with the Flower SuperLink."""

    def register(self, public_key: str, name: str) -> str:
        """Register ``public_key`` for site ``name``; return the Flower node id."""
        ...

    def unregister(self, node_id: str) -> None:
        """Unregister Flower node ``node_id`` (done when its site is revoked)."""
        ...


def _site(session: Session, name: str) -> Site:
    site = session.exec(select(Site).where(Site.name == name)).first()
    if site is None:
        not_found(f"site {name!r}")
    return site


@router.post("/sites", status_code=201, responses={**RESPONSES_401, **RESPONSES_403})
def add_site(body: SiteCreate, session: SessionDep, user: CurrentUser) -> SitePublic:
    """Add a site (status ``added``); it takes part in runs once its node key is registered."""
    require_role(user, WRITE_ROLES)
    if session.exec(select(Site).where(Site.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"site {body.name!r} already exists")
    site = Site(name=body.name)
    session.add(site)
    session.flush()
    append_event(session, actor=user.name, action="site.added", subject=f"site:{body.name}",
                 detail={})
    session.commit()
    return SitePublic.of(site)


@router.get("/sites", responses=RESPONSES_401)
def list_sites(session: SessionDep, _user: CurrentUser) -> list[SitePublic]:
    """All sites, by name."""
    seen = last_seen(session)
    expiry = certificate_expiry(session)
    return [SitePublic.of(s, last_seen_at=seen.get(s.name),
                          certificate_expires_at=expiry.get(s.id or 0))
            for s in session.exec(select(Site).order_by(col(Site.name))).all()]


@router.get("/sites/{name}", responses={**RESPONSES_401, **RESPONSES_404})
def get_site(name: str, session: SessionDep, _user: CurrentUser) -> SitePublic:
    """One site."""
    site = _site(session, name)
    return SitePublic.of(site, last_seen_at=last_seen(session).get(name),
                         certificate_expires_at=certificate_expiry(session).get(
                             site.id or 0))


@router.post(
    "/sites/{name}/node-key",
    responses={**RESPONSES_401, **RESPONSES_403, **RESPONSES_404,
               409: {"description": "Site revoked, or registered with another key"},
               503: {"description": "No registrar configured, or the SuperLink refused"}},
)
def register_node_key(
    name: str, body: NodeKeyCreate, request: Request, session: SessionDep, user: CurrentUser
) -> SitePublic:
    """Register the site's SuperNode public key with Flower; the site becomes ``registered``.

    Repeating it with the same key is a no-op. A different key for a registered site is
    refused (409): revoke the site first.
    """
    require_role(user, WRITE_ROLES)
    registrar: NodeRegistrar | None = request.app.state.registrar
    site = _site(session, name)
    if site.status == "revoked":
        raise HTTPException(status.HTTP_409_CONFLICT, f"site {name!r} is revoked")
    if site.status == "registered":
        if site.public_key == body.public_key:
            return SitePublic.of(site)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"site {name!r} is already registered with a different node key; revoke it first",
        )
    other = session.exec(
        select(Site).where(Site.public_key == body.public_key, Site.name != name)
    ).first()
    if other is not None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"this node key is already used by site {other.name!r}")
    if registrar is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "node registration is not configured on this coordinator")
    # End the read transaction before talking to the SuperLink, so the database is not held
    # (on SQLite, its write lock) for the length of a network call.
    session.commit()
    try:
        node_id = str(registrar.register(body.public_key, name))
    except Exception as exc:  # the Flower boundary can fail in many ways; report why
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"registering the node key failed: {exception_reason(exc)}") from exc
    session.refresh(site)
    if site.status != "added":  # changed by someone else while Flower was asked
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"site {name!r} changed meanwhile (now {site.status}); retry")
    taken = f"Flower node id {node_id} is already another site's"
    if session.exec(select(Site).where(Site.flower_node_id == node_id)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, taken)
    site.public_key = body.public_key
    site.flower_node_id = node_id
    site.status = "registered"
    site.registered_at = utcnow()
    session.add(site)
    try:
        session.flush()  # the unique node id is enforced here too, against a racing request
    except IntegrityError as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, taken) from exc
    append_event(session, actor=user.name, action="site.registered", subject=f"site:{name}",
                 detail={"flower_node_id": node_id, "public_key_sha256":
                         hashlib.sha256(body.public_key.encode()).hexdigest()})
    session.commit()
    return SitePublic.of(site)


class EnrollmentTokenPublic(BaseModel):
    """A one-time enrollment token: shown once, give it to the site's IT over a safe channel."""

    site: str
    token: str
    expires_at: datetime
    fleet_address: str


class RevokeRequest(BaseModel):
    """Why a site is revoked (kept in the audit log)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=500)


@router.post("/sites/{name}/enrollment-token", status_code=201,
             responses={**RESPONSES_401, **RESPONSES_403, **RESPONSES_404,
                        409: {"description": "Site revoked"}})
def issue_enrollment_token(name: str, request: Request, session: SessionDep,
                           user: CurrentUser) -> EnrollmentTokenPublic:
    """Issue a one-time, expiring (24 h) enrollment token for a site (admin only).

    The token mints a site certificate, so it is an admin's to give: whoever holds one can
    connect to the gateway as that site.
    """
    require_role(user, CERTIFICATE_ROLES)
    site = _site(session, name)
    settings: Settings = request.app.state.settings
    try:
        token, expires = create_token(session, site=site,
                                      pki=CAFiles.under(settings.home / "pki"), actor=user.name)
    except EnrollmentError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    session.commit()
    host = settings.fleet_hostnames.split(",")[0].strip()
    return EnrollmentTokenPublic(site=name, token=token, expires_at=expires,
                                 fleet_address=f"{host}:{settings.fleet_port}")


@router.post("/sites/{name}/revoke", responses={**RESPONSES_401, **RESPONSES_403, **RESPONSES_404})
def revoke(name: str, body: RevokeRequest, request: Request, session: SessionDep,
           user: CurrentUser) -> SitePublic:
    """Revoke a site: its certificates stop working at the gateway at once, and its node
    is unregistered from Flower.

    Revoking a revoked site again retries unregistering its node, if that failed before.
    """
    require_role(user, CERTIFICATE_ROLES)
    site = _site(session, name)
    if site.status != "revoked":
        revoke_site(session, site=site, actor=user.name, reason=body.reason)
    node_id = site.flower_node_id
    session.commit()
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        gateway.invalidate()
    if node_id is not None:
        _unregister_node(request, session, site=name, node_id=node_id, actor=user.name)
    return SitePublic.of(site)


def _unregister_node(request: Request, session: Session, *, site: str, node_id: str,
                     actor: str) -> None:
    """Unregister a revoked site's Flower node, so the SuperLink refuses its key too.

    The gateway already refuses the site; this closes the door behind it. A failure is
    audited (``site.unregister_failed``) and answered by revoking again later.
    """
    registrar: NodeRegistrar | None = request.app.state.registrar
    if registrar is None:
        return
    try:
        registrar.unregister(node_id)
    except Exception as exc:  # the Flower boundary; the revocation itself stands
        append_event(session, actor=actor, action="site.unregister_failed",
                     subject=f"site:{site}", detail={"flower_node_id": node_id,
                                                     "reason": exception_reason(exc)})
    else:
        append_event(session, actor=actor, action="site.unregistered",
                     subject=f"site:{site}", detail={"flower_node_id": node_id})
    session.commit()
