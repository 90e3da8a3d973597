"""The review of a release candidate: approve it (``POST /candidates/{id}/approve``, which
signs its bundle and makes the release) or reject it (``POST /candidates/{id}/reject``);
reviewers and admins, never on their own proposal."""

from __future__ import annotations

from fastapi import APIRouter, Request

from coordinator import releases
from coordinator.api_errors import RESPONSES_404
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import Release
from coordinator.release_api_common import (
    AUTH,
    R409,
    candidate_public,
    refusals,
    release_public,
    request_engine,
    request_home,
)
from coordinator.release_schemas import CandidatePublic, DecisionRequest, ReleasePublic
from fedward.roles import REVIEW_ROLES

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX)


@router.post("/candidates/{candidate_id}/approve", status_code=201, tags=["releases"],
             responses={**AUTH, **RESPONSES_404, **R409})
def approve(candidate_id: int, body: DecisionRequest, request: Request, session: SessionDep,
            user: CurrentUser) -> ReleasePublic:
    """Approve a candidate awaiting review: the signed bundle is written, the release made.

    403 for your own proposal; 409 when it is approved, rejected, failed its gates or is
    still being evaluated.
    """
    require_role(user, REVIEW_ROLES)
    session.commit()  # approving signs and writes files: no transaction held meanwhile
    with refusals():
        release = releases.approve_candidate(request_engine(request), home=request_home(request),
                                             candidate_id=candidate_id, user=user,
                                             reason=body.reason)
    fresh = session.get(Release, release.id)
    assert fresh is not None
    return release_public(session, fresh)


@router.post("/candidates/{candidate_id}/reject", tags=["releases"],
             responses={**AUTH, **RESPONSES_404, **R409})
def reject(candidate_id: int, body: DecisionRequest, session: SessionDep,
           user: CurrentUser) -> CandidatePublic:
    """Reject a candidate with a reason (not your own proposal)."""
    require_role(user, REVIEW_ROLES)
    with refusals():
        cand = releases.reject_candidate(session, candidate_id=candidate_id, user=user,
                                         reason=body.reason)
    session.commit()
    return candidate_public(session, cand)
