"""Release candidates: propose one (``POST /candidates``, which runs its gates), list them
and read one (``GET /candidates``, ``GET /candidates/{id}``).

Exports and the sites' parity measurement run after the request's own transaction has been
committed, so the database is never held while they run; with ``wait=false`` they run in
the background and the answer is 202.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Request, Response
from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator import releases
from coordinator.api_errors import RESPONSES_404
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import ReleaseCandidate
from coordinator.release_api_common import (
    AUTH,
    candidate_public,
    refusals,
    request_engine,
    request_home,
)
from coordinator.release_schemas import CandidateCreate, CandidatePublic
from fedward.roles import PROPOSE_ROLES, STAFF_ROLES

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix=API_PREFIX)


def _evaluate_in_background(engine: Engine, home: Path, candidate_id: int,
                            site_parity: releases.SiteParity | None) -> None:
    try:
        releases.evaluate_candidate(engine, home=home, candidate_id=candidate_id,
                                    site_parity=site_parity)
    except Exception:  # nobody waits for this answer: log it, the candidate says the rest
        log.exception("evaluating candidate %s in the background failed", candidate_id)


@router.post("/candidates", status_code=201, tags=["releases"],
             responses={**AUTH, **RESPONSES_404,
                        202: {"description": "Accepted (wait=false): the gates are running; "
                                             "poll GET /candidates/{id}"}})
def propose(body: CandidateCreate, request: Request, response: Response,
            background: BackgroundTasks, session: SessionDep, user: CurrentUser,
            wait: Annotated[bool, Query(description="Answer when the gates have run "
                                                    "(exports and the sites' parity can take "
                                                    "minutes); false: answer 202 at once.")]
            = True) -> CandidatePublic:
    """Propose a model version as a release candidate and run its gates.

    With ``wait`` (the default) the answer is 201 whether or not the gates pass: ``status``
    is ``awaiting_review`` or ``gates_failed``, and every gate says why with its figures.
    Without, the answer is 202 with ``status`` ``evaluating``; poll the candidate.
    """
    require_role(user, PROPOSE_ROLES)
    with refusals():
        cand = releases.propose_candidate(session, run_id=body.run_id, round_number=body.round,
                                          intended_use=body.intended_use, actor=user.name)
    session.commit()
    assert cand.id is not None
    if not wait:
        background.add_task(_evaluate_in_background, request_engine(request),
                            request_home(request), cand.id, request.app.state.site_parity)
        response.status_code = 202
        public = candidate_public(session, cand)
        # End this request's transaction now: on SQLite it holds the one write lock, and
        # the background task that records the gates must write.
        session.commit()
        return public
    with refusals():
        releases.evaluate_candidate(request_engine(request), home=request_home(request),
                                    candidate_id=cand.id,
                                    site_parity=request.app.state.site_parity)
    fresh = session.get(ReleaseCandidate, cand.id, populate_existing=True)
    assert fresh is not None
    return candidate_public(session, fresh)


@router.get("/candidates", tags=["releases"], responses=AUTH)
def list_candidates(
    session: SessionDep, user: CurrentUser,
    candidate_status: Annotated[str | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[CandidatePublic]:
    """Release candidates, newest first."""
    require_role(user, STAFF_ROLES)
    query = select(ReleaseCandidate)
    if candidate_status is not None:
        query = query.where(ReleaseCandidate.status == candidate_status)
    rows = session.exec(query.order_by(col(ReleaseCandidate.id).desc()).limit(limit)).all()
    return [candidate_public(session, c) for c in rows]


@router.get("/candidates/{candidate_id}", tags=["releases"], responses={**AUTH, **RESPONSES_404})
def get_candidate(candidate_id: int, session: SessionDep, user: CurrentUser) -> CandidatePublic:
    """One candidate with its gates."""
    require_role(user, STAFF_ROLES)
    cand = session.get(ReleaseCandidate, candidate_id)
    if cand is None:
        raise HTTPException(404, f"candidate {candidate_id} not found")
    return candidate_public(session, cand)
