"""REST routes of hyperparameter tuning: start a search, list them, watch one
(``/api/v1/tunings``; the engine is :mod:`coordinator.tuning`).

Mounted by :func:`coordinator.api.create_app`, which passes its authentication dependency
and role check in (this module does not import ``coordinator.api``). Starting needs a role
that may launch runs; reading, any signed-in user.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel
from sqlmodel import Session, col, select

from coordinator.api_errors import RESPONSES_401, RESPONSES_403
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import Project, Tuning, TuningTrial
from coordinator.tuning import TuningCreate, TuningError, is_live, start_tuning
from fedward.roles import WRITE_ROLES

__all__ = ["TrialPublic", "TuningPublic", "make_router"]


class TrialPublic(BaseModel):
    """One trial: the settings tried, its run, and its score."""

    number: int
    run_id: int | None
    params: dict[str, Any]
    status: str
    score: float | None


class TuningPublic(BaseModel):
    """A search as the API shows it.

    ``cost`` is what each site charges for the whole search (once, before its first trial):
    the search's epsilon at its delta, accounted with RDP as the best of a random number
    of trials. ``best_run_id`` is the recorded run of the best trial (``launch --from`` it
    to train its settings again, as an ordinary run).
    """

    id: int
    project: str
    task: str
    status: str
    created_by: str
    created_at: datetime
    finished_at: datetime | None
    request: dict[str, Any]
    cost: dict[str, Any]
    trials_planned: int
    trials: list[TrialPublic]
    best_run_id: int | None
    best_score: float | None
    best_params: dict[str, Any] | None
    reason: str | None


def _view(session: Session, tuning: Tuning) -> TuningPublic:
    assert tuning.id is not None
    project = session.get(Project, tuning.project_id)
    request = json.loads(tuning.request_json)
    rows = session.exec(select(TuningTrial).where(TuningTrial.tuning_id == tuning.id)
                        .order_by(col(TuningTrial.number))).all()
    trials = [TrialPublic(number=r.number, run_id=r.run_id, params=json.loads(r.params_json),
                          status=r.status, score=r.score) for r in rows]
    best = next((t for t in trials if t.run_id is not None
                 and t.run_id == tuning.best_run_id), None)
    return TuningPublic(
        id=tuning.id, project=project.name if project else "?", task=tuning.task,
        status=tuning.status, created_by=tuning.created_by, created_at=tuning.created_at,
        finished_at=tuning.finished_at, request=request,
        cost={"epsilon": request["epsilon"], "delta": request["delta"], "accountant": "rdp",
              "mechanism": "tuning selection (random stopping)",
              "mean_trials": request["mean_trials"],
              "distribution": request["distribution"], "charged": "once per site"},
        trials_planned=tuning.trials_planned, trials=trials, best_run_id=tuning.best_run_id,
        best_score=tuning.best_score, best_params=best.params if best else None,
        reason=tuning.reason)


def _orphaned(session: Session, tuning: Tuning) -> None:
    """A search this process is not running (the coordinator restarted) cannot go on."""
    if tuning.status == "running" and tuning.id is not None and not is_live(tuning.id):
        from coordinator.models import utcnow

        tuning.status = "failed"
        tuning.reason = ("the coordinator restarted during the search; the trials that ran are "
                         "recorded and the sites' charge for the search stands; start a new "
                         "search (it is charged again)")
        tuning.finished_at = utcnow()
        session.add(tuning)
        session.commit()


def make_router() -> APIRouter:
    """The tuning routes, under the API's prefix; they authenticate through
    :mod:`coordinator.auth`, as every route of the API does."""
    router = APIRouter(prefix=API_PREFIX, tags=["tuning"])

    @router.post("/tunings", status_code=201, responses={
        **RESPONSES_401, **RESPONSES_403,
        422: {"description": "A bad request, an unknown project, task or site"},
        503: {"description": "Run launching is not configured"}})
    def create(body: TuningCreate, request: Request, session: SessionDep,
               user: CurrentUser) -> TuningPublic:
        """Start a search. Its trials run one after another in the background; a search a
        site cannot afford is refused at the first trial's admission, before any trial
        trains (``GET /tunings/{id}`` then says why, with each site's figures)."""
        require_role(user, WRITE_ROLES)
        launcher = request.app.state.launcher
        if launcher is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "run launching is not configured on this coordinator")
        session.commit()  # the search writes in its own transactions (SQLite: one writer)
        try:
            tuning_id = start_tuning(request.app.state.engine, body, actor=user.name,
                                     launch=launcher.launch,
                                     settings=request.app.state.settings)
        except TuningError as err:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
        tuning = session.get(Tuning, tuning_id, populate_existing=True)
        assert tuning is not None
        return _view(session, tuning)

    @router.get("/tunings", responses=RESPONSES_401)
    def list_tunings(session: SessionDep, _user: CurrentUser) -> list[TuningPublic]:
        """Every search, newest first."""
        rows = session.exec(select(Tuning).order_by(col(Tuning.id).desc()).limit(200)).all()
        for row in rows:
            _orphaned(session, row)
        return [_view(session, t) for t in rows]

    @router.get("/tunings/{tuning_id}", responses={
        **RESPONSES_401, 404: {"description": "No such search"}})
    def get_tuning(tuning_id: int, session: SessionDep,
                   _user: CurrentUser) -> TuningPublic:
        """One search: its cost, its trials so far, the best one."""
        tuning = session.get(Tuning, tuning_id)
        if tuning is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"tuning {tuning_id} not found")
        _orphaned(session, tuning)
        return _view(session, tuning)

    return router
