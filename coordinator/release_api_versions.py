"""Model versions (``GET /versions``) and a version's lineage
(``GET /versions/{run_id}/{round_number}/lineage``); staff only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlmodel import col, select

from coordinator.api_errors import RESPONSES_404
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import Checkpoint, Project, Release, ReleaseCandidate, Run
from coordinator.release_api_common import (
    AUTH,
    refusals,
    request_engine,
    request_home,
)
from coordinator.release_lineage import build_lineage
from coordinator.release_schemas import VersionPublic
from fedward.roles import STAFF_ROLES

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX)


@router.get("/versions", tags=["releases"], responses=AUTH)
def list_versions(
    session: SessionDep, user: CurrentUser,
    run_id: Annotated[int | None, Query(description="Only this run's versions.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[VersionPublic]:
    """Model versions (run checkpoints), newest first, with their candidates and releases."""
    require_role(user, STAFF_ROLES)
    query = (select(Checkpoint, Run, Project)
             .join(Run, col(Run.id) == col(Checkpoint.run_id))
             .join(Project, col(Project.id) == col(Run.project_id)))
    if run_id is not None:
        query = query.where(Checkpoint.run_id == run_id)
    rows = session.exec(query.order_by(col(Checkpoint.run_id).desc(),
                                       col(Checkpoint.round_number).desc()).limit(limit)).all()
    out = []
    for ckpt, run, project in rows:
        cands = session.exec(select(ReleaseCandidate.id, Release.release_id)
                             .join(Release, col(Release.candidate_id) == col(ReleaseCandidate.id),
                                   isouter=True)
                             .where(ReleaseCandidate.run_id == ckpt.run_id,
                                    ReleaseCandidate.round_number == ckpt.round_number)
                             .order_by(col(ReleaseCandidate.id))).all()
        out.append(VersionPublic(
            run_id=ckpt.run_id, project=project.name, task=run.task, round=ckpt.round_number,
            checkpoint_sha256=ckpt.sha256, created_at=ckpt.created_at,
            candidate_ids=[c for c, _r in cands if c is not None],
            release_ids=[r for _c, r in cands if r is not None],
            lineage_url=f"{API_PREFIX}/versions/{ckpt.run_id}/{ckpt.round_number}/lineage"))
    return out


@router.get("/versions/{run_id}/{round_number}/lineage", tags=["releases"],
            responses={**AUTH, **RESPONSES_404})
def version_lineage(run_id: int, round_number: int, request: Request, session: SessionDep,
                    user: CurrentUser) -> dict[str, Any]:
    """A version's lineage: run config and seed, software, sites per round, epsilon and delta
    per site, per-site evaluation, data fingerprints."""
    require_role(user, STAFF_ROLES)
    session.commit()  # build_lineage opens its own transactions
    with refusals():
        return build_lineage(request_engine(request), home=request_home(request), run_id=run_id,
                             round_number=round_number)
