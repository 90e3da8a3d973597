"""Releases: list them, read one, download its signed bundle, revoke it (``/releases``).

Clinicians see approved, unrevoked releases only (a revoked one answers 410); only admins
revoke.
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Query, Request, Response
from sqlmodel import Session

from coordinator import release_store
from coordinator.api_errors import RESPONSES_404
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import Release
from coordinator.release_api_common import (
    AUTH,
    R409,
    refusals,
    release_public,
    request_home,
)
from coordinator.release_errors import Gone
from coordinator.release_schemas import DecisionRequest, ReleasePublic
from fedward.roles import ALL_ROLES, REVOKE_ROLES, Permission, may

__all__ = ["router"]

ARCHIVE_MEDIA_TYPE: Final = "application/gzip"

router = APIRouter(prefix=API_PREFIX)


def _visible_release(session: Session, release_id: str, role: str) -> Release:
    release = release_store.find_release(session, release_id)
    if not may(role, Permission.STAFF) and release.revoked_at is not None:
        raise Gone(f"release {release_id} was revoked: {release.revoke_reason}")
    return release


@router.get("/releases", tags=["releases"], responses=AUTH)
def list_releases(
    session: SessionDep, user: CurrentUser,
    include_revoked: Annotated[bool, Query(description="Also revoked releases (not for "
                                                       "clinicians).")] = False,
) -> list[ReleasePublic]:
    """Approved releases, newest first; clinicians see only unrevoked ones."""
    require_role(user, ALL_ROLES)
    staff = may(user.role, Permission.STAFF)
    rows = release_store.list_releases(session, include_revoked=include_revoked and staff)
    return [release_public(session, r) for r in rows]


@router.get("/releases/{release_id}", tags=["releases"],
            responses={**AUTH, **RESPONSES_404, 410: {"description": "Revoked (clinicians)"}})
def get_release(release_id: str, session: SessionDep, user: CurrentUser) -> ReleasePublic:
    """One release."""
    require_role(user, ALL_ROLES)
    with refusals():
        return release_public(session, _visible_release(session, release_id, user.role))


@router.get("/releases/{release_id}/bundle", tags=["releases"],
            response_class=Response,
            responses={**AUTH, **RESPONSES_404, 410: {"description": "Revoked"},
                       200: {"content": {ARCHIVE_MEDIA_TYPE: {}},
                             "description": "The bundle folder as .tar.gz"}})
def download_bundle(release_id: str, request: Request, session: SessionDep,
                    user: CurrentUser) -> Response:
    """The signed bundle as a ``.tar.gz`` (verified on the coordinator before it is sent).

    Check it after unpacking: ``fedward-verify <folder> --public-key release.pub.pem
    --coordinator <portal address>``.
    """
    require_role(user, ALL_ROLES)
    with refusals():
        release = release_store.find_release(session, release_id)
        data = release_store.bundle_archive(request_home(request), release)
    append_event(session, actor=user.name, action="release.downloaded",
                 subject=f"release:{release_id}", detail={"via": "api"})
    session.commit()
    return Response(content=data, media_type=ARCHIVE_MEDIA_TYPE, headers={
        "Content-Disposition": f'attachment; filename="{release_id}.tar.gz"'})


@router.post("/releases/{release_id}/revoke", tags=["releases"],
             responses={**AUTH, **RESPONSES_404, **R409})
def revoke(release_id: str, body: DecisionRequest, session: SessionDep,
           user: CurrentUser) -> ReleasePublic:
    """Revoke a release (admins): it leaves the portal, downloads answer 410, and the
    revocation list names it."""
    require_role(user, REVOKE_ROLES)
    with refusals():
        release = release_store.revoke_release(session, release_id=release_id, user=user,
                                               reason=body.reason)
    session.commit()
    return release_public(session, release)
