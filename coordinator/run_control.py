"""Run control: cancelling a run, and the limit on runs at once.

Cancel (``POST /api/v1/runs/{id}/cancel``, roles that may launch): the request (who, why,
when) is written to the run's row and the audit log (``run.cancel_requested``). The run's
round loop (:mod:`coordinator.cancellation`) reads the row about once a second wherever it
waits: it ends the round in progress as ``cancelled``, sends every online site of the run a
cancel message (the site writes ``run-cancelled`` in its audit log and answers with an empty
reply), audits which sites acknowledged it (``run.cancel_delivered``) and ends the run as
``cancelled``. Its Flower run then ends with its ServerApp. Where no round loop does that
within the run's round deadline plus :data:`CANCEL_GRACE_S` (a ServerApp that hangs or died,
a run Flower never started), the coordinator's watchdog stops the Flower run through the
control API and ends the run itself (:func:`enforce_cancellations`).

Limits: at most ``Settings.max_concurrent_runs`` runs pending or running on the coordinator
and ``Settings.max_concurrent_runs_per_project`` per project. A launch beyond either is
refused with 429, naming the limit, its setting and the runs that hold it
(:func:`check_run_limits`); launches are checked and committed one at a time
(:data:`LAUNCH_LOCK`), so concurrent requests cannot slip past the limit together.

The routes (:func:`make_router`) authenticate through :mod:`coordinator.auth`
(``CurrentUser``, ``require_role``), as every route of the API does.
"""

import logging
import threading
from datetime import datetime
from typing import Final

import httpx
from fastapi import APIRouter, HTTPException, status
from pydantic import Field
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator import repository
from coordinator.api_errors import RESPONSES_401, RESPONSES_403, Responses
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep, session_scope
from coordinator.models import RUN_FINAL_STATUSES, Evaluation, Project, Run, utcnow
from coordinator.run_schemas import RunPublic
from coordinator.schemas import RequestBody
from coordinator.settings import Settings
from fedward.flower.control import FlowerControl
from fedward.roles import WRITE_ROLES
from fedward.run_config import RunConfig

__all__ = [
    "ACTIVE_STATUSES",
    "CANCEL_GRACE_S",
    "CANCEL_REASON_MAX",
    "LAUNCH_LOCK",
    "CancelRequest",
    "RunFinishedError",
    "active_evaluations",
    "active_runs",
    "check_cancellable",
    "check_run_limits",
    "enforce_cancellations",
    "make_router",
    "request_cancel",
]

log = logging.getLogger("fedward.coordinator.run_control")

ACTIVE_STATUSES: Final = ("pending", "running")
# The longest cancel reason (the API's body and the portal's form).
CANCEL_REASON_MAX: Final = 500
# What a cancel may take beyond the run's round deadline before the coordinator steps in.
CANCEL_GRACE_S: Final = 5.0
# Held while a launch checks the limits and commits its run (one API process serves them).
LAUNCH_LOCK: Final = threading.Lock()


class CancelRequest(RequestBody):
    """Body of ``POST /runs/{id}/cancel``."""

    reason: str = Field(min_length=1, max_length=CANCEL_REASON_MAX,
                        description="Why the run is cancelled (kept in the audit logs of "
                                    "the coordinator and of every site).")


def active_runs(session: Session, *, project_id: int | None = None
                ) -> list[tuple[int, str, str]]:
    """Runs pending or running (a run being cancelled still holds its place).

    Args:
        session: Open session.
        project_id: Only this project's runs.

    Returns:
        ``(run id, project name, status)``, oldest first; the status reads
        ``cancelling`` for a run whose cancel was asked for.
    """
    query = (select(Run, Project.name).join(Project, col(Project.id) == col(Run.project_id))
             .where(col(Run.status).in_(ACTIVE_STATUSES)))
    if project_id is not None:
        query = query.where(Run.project_id == project_id)
    rows = session.exec(query.order_by(col(Run.id))).all()
    return [(int(run.id or 0), name,
             "cancelling" if run.cancel_requested_at is not None else run.status)
            for run, name in rows]


def active_evaluations(session: Session, *, project_id: int | None = None
                       ) -> list[tuple[int, int, str, str]]:
    """Evaluations on demand pending or running: each is a Flower run with a ServerApp of
    its own, so it holds a place under the run limits like a run.

    Returns:
        ``(evaluation id, run id, project name, status)``, oldest first.
    """
    query = (select(Evaluation, Project.name)
             .join(Run, col(Run.id) == col(Evaluation.run_id))
             .join(Project, col(Project.id) == col(Run.project_id))
             .where(col(Evaluation.status).in_(ACTIVE_STATUSES)))
    if project_id is not None:
        query = query.where(Run.project_id == project_id)
    rows = session.exec(query.order_by(col(Evaluation.id))).all()
    return [(int(row.id or 0), row.run_id, name, row.status) for row, name in rows]


def _holders(session: Session, project: Project | None = None) -> list[tuple[str, str]]:
    """What holds a place under the limits: ``(label, project name)`` per live run or
    evaluation, everywhere or in ``project``."""
    project_id = None if project is None else project.id
    runs = [(f"run {i} ({name}, {state})", name)
            for i, name, state in active_runs(session, project_id=project_id)]
    evaluations = [(f"evaluation {e} of run {r} ({name}, {state})", name)
                   for e, r, name, state in active_evaluations(session, project_id=project_id)]
    return runs + evaluations


def _named(holders: list[tuple[str, str]]) -> str:
    return ", ".join(label for label, _ in holders)


def check_run_limits(session: Session, settings: Settings, project: Project) -> None:
    """Refuse a launch (429) when the coordinator's or the project's limit is reached.

    Live evaluations on demand count as runs: each starts a ServerApp as a run does.

    Call with :data:`LAUNCH_LOCK` held, and commit the new run before releasing it.

    Args:
        session: Open session.
        settings: The coordinator's settings (the limits).
        project: The project of the run about to be launched.

    Raises:
        HTTPException: 429 naming the limit, the setting that sets it and the runs holding it.
    """
    hint = ("wait for one of them to end, or cancel one (`fedward-coordinator cancel RUN "
            "--reason TEXT`)")
    everywhere = _holders(session)
    if len(everywhere) >= settings.max_concurrent_runs:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=(
            f"run limit reached: at most {settings.max_concurrent_runs} runs at once on this "
            f"coordinator (setting FEDWARD_MAX_CONCURRENT_RUNS); held by "
            f"{_named(everywhere)}; {hint}"))
    assert project.id is not None
    mine = [h for h in everywhere if h[1] == project.name]
    if len(mine) >= settings.max_concurrent_runs_per_project:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=(
            f"run limit reached: at most {settings.max_concurrent_runs_per_project} runs at "
            f"once in project {project.name!r} (setting "
            f"FEDWARD_MAX_CONCURRENT_RUNS_PER_PROJECT); held by {_named(mine)}; {hint}"))


class RunFinishedError(ValueError):
    """The run has already ended: there is nothing to cancel."""


def check_cancellable(run: Run) -> None:
    """Refuse a run that has ended (the API's 409 and the portal's say the same).

    Args:
        run: The run row.

    Raises:
        RunFinishedError: The run has ended.
    """
    if run.status in RUN_FINAL_STATUSES:
        ended = f" at {run.finished_at:%Y-%m-%d %H:%M:%S} UTC" if run.finished_at else ""
        raise RunFinishedError(f"run {run.id} has already ended ({run.status}{ended}); only "
                               "a pending or running run can be cancelled")


def request_cancel(session: Session, run: Run, *, actor: str, reason: str) -> bool:
    """Record a cancel request in the session's transaction (the caller commits).

    Args:
        session: Open session.
        run: The run row.
        actor: Who cancels it.
        reason: Why.

    Returns:
        True if recorded now, False if someone had asked already (their request stands).

    Raises:
        RunFinishedError: The run has ended.
    """
    check_cancellable(run)
    if run.cancel_requested_at is not None:
        return False
    run.cancel_requested_at = utcnow()
    run.cancelled_by = actor
    run.cancel_reason = reason
    session.add(run)
    append_event(session, actor=actor, action="run.cancel_requested", subject=f"run:{run.id}",
                 detail={"reason": reason, "status": run.status})
    return True


def enforce_cancellations(engine: Engine, control: FlowerControl, *,
                          grace_s: float = CANCEL_GRACE_S, now: datetime | None = None
                          ) -> list[int]:
    """End the cancelled runs that no round loop has ended in time.

    A run whose Flower run still executes past its round deadline plus ``grace_s`` since
    the request has that Flower run stopped (the SuperLink then refuses its ServerApp,
    which exits); a run without a Flower run executing it (never started, or its ServerApp
    died) is ended after ``grace_s``. Either is recorded ``cancelled`` with what happened.

    Args:
        engine: Coordinator database engine.
        control: The SuperLink's control client.
        grace_s: The grace period beyond the round deadline.
        now: The current time (tests).

    Returns:
        The ids of the runs ended here.
    """
    now = now or utcnow()
    with session_scope(engine) as session:
        rows = session.exec(select(Run).where(col(Run.status).in_(ACTIVE_STATUSES),
                                              col(Run.cancel_requested_at).is_not(None))).all()
        todo = [(int(r.id or 0), r.cancel_requested_at, r.cancelled_by or "?",
                 r.cancel_reason or "", RunConfig.model_validate_json(r.config_json)
                 .round_deadline_s) for r in rows if r.cancel_requested_at is not None]
    if not todo:
        return []
    flower = control.training_runs()
    ended = []
    for run_id, requested, by, reason, deadline_s in todo:
        assert requested is not None
        waited = (now - requested).total_seconds()
        state = flower.get(run_id)
        alive = state is not None and not state.finished
        if waited < grace_s + (deadline_s if alive else 0.0):
            continue
        if alive:
            assert state is not None
            try:
                control.stop_run(state.flwr_run_id)
            except httpx.HTTPError as err:  # it may have ended meanwhile
                log.warning("could not stop Flower run %s: %s", state.flwr_run_id, err)
            note = (f"its round loop had not ended it {waited:.0f} s after the request: the "
                    f"coordinator stopped Flower run {state.flwr_run_id}; sites not told")
        else:
            note = "no ServerApp was executing it: ended by the coordinator; sites not told"
        repository.finish_run(engine, run_id, status="cancelled",
                              reason=f"cancelled by {by}: {reason} ({note})")
        log.warning("run %s cancelled by the coordinator: %s", run_id, note)
        ended.append(run_id)
    return ended


def make_router() -> APIRouter:
    """The run control routes, under the API's prefix.

    Returns:
        A router to include in the application.
    """
    router = APIRouter(prefix=API_PREFIX)
    responses: Responses = {
        **RESPONSES_401, **RESPONSES_403,
        404: {"description": "No such run"},
        409: {"description": "The run has already ended"},
    }

    @router.post("/runs/{run_id}/cancel", status_code=202, tags=["runs"],
                 responses=responses)
    def cancel_run(run_id: int, body: CancelRequest, session: SessionDep,
                   user: CurrentUser) -> RunPublic:
        """Cancel a pending or running run (also one waiting for approval).

        Accepted at once; the run's round loop ends it within its round deadline plus
        5 s, tells the sites, and the run then shows ``cancelled`` with who and why. A
        second request while it ends changes nothing (the first one's who and why stand).
        """
        require_role(user, WRITE_ROLES)
        run = session.get(Run, run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
        try:
            request_cancel(session, run, actor=user.name, reason=body.reason)
        except RunFinishedError as err:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(err)) from None
        session.commit()
        session.refresh(run)
        project = session.get(Project, run.project_id)
        assert project is not None  # foreign key
        return RunPublic.of(run, project.name)

    return router
