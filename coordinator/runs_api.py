"""Runs, as the ML team launches and watches them: launch, list, one run with its rounds,
its metrics, checkpoints and federated statistics.

The Flower boundary is injected: a :class:`RunLauncher` starts a committed run on the
SuperLink; without one ``POST /runs`` answers 503. Cancelling a run is
:mod:`coordinator.run_control`'s. Mounted by :func:`coordinator.api.create_app`.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import APIRouter, HTTPException, Query, Request, status
from sqlmodel import Session, col, select

from coordinator import run_control
from coordinator.api_errors import (
    RESPONSES_401,
    RESPONSES_403,
    RESPONSES_404,
    exception_reason,
    field_error,
    not_found,
)
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import (
    RUN_FINAL_STATUSES,
    Checkpoint,
    Project,
    Round,
    Run,
    Site,
    SiteMetric,
)
from coordinator.repository import record_run_outcome
from coordinator.run_audit import latest_admissions
from coordinator.run_schemas import (
    CheckpointPublic,
    RoundMetrics,
    RoundPublic,
    RunCreate,
    RunDetail,
    RunMetrics,
    RunPublic,
)
from coordinator.study_retirement import StudyRetiredError
from fedward.roles import WRITE_ROLES
from fedward.run_config import RunConfig, RunSettings

__all__ = ["RunLauncher", "router"]

router = APIRouter(prefix=API_PREFIX, tags=["runs"])


class RunLauncher(Protocol):
    """Starts a committed, pending run on the Flower SuperLink."""

    def launch(self, run_id: int) -> str:
        """Start coordinator run ``run_id``; return Flower's run id. Raise if it cannot."""
        ...


def _run_with_project(session: Session, run_id: int) -> tuple[Run, str]:
    row = session.exec(
        select(Run, Project.name).join(Project, col(Project.id) == col(Run.project_id))
        .where(Run.id == run_id)
    ).first()
    if row is None:
        not_found(f"run {run_id}")
    return row[0], row[1]


def _resolve_sites(session: Session, body: RunCreate) -> list[str]:
    if body.sites is None:
        return list(session.exec(
            select(Site.name).where(Site.status == "registered").order_by(col(Site.name))
        ).all())
    found = {s.name: s for s in session.exec(select(Site).where(col(Site.name).in_(body.sites)))}
    unknown = [n for n in body.sites if n not in found]
    if unknown:
        field_error("sites", f"unknown site(s): {', '.join(unknown)}")
    unregistered = [f"{n} ({found[n].status})" for n in body.sites
                    if found[n].status != "registered"]
    if unregistered:
        field_error("sites", f"site(s) not registered: {', '.join(unregistered)}")
    return list(body.sites)


@router.post(
    "/runs",
    status_code=201,
    responses={**RESPONSES_401, **RESPONSES_403,
               409: {"description": "The study version named is retired (by whom, why, and "
                                    "the version to launch instead)"},
               429: {"description": "Too many runs at once (the limit and the runs holding "
                                    "it are named)"},
               503: {"description": "The run could not be launched"}},
)
def launch_run(
    body: RunCreate, request: Request, session: SessionDep, user: CurrentUser
) -> RunPublic:
    """Create a run and launch it on Flower.

    The run is committed as ``pending`` before the launcher is called, so the ServerApp can
    find it. If launching fails, the run is marked ``failed`` with the reason and the answer
    is 503 with that reason. A retired study version is refused (409) before anything is
    written.
    """
    require_role(user, WRITE_ROLES)
    launcher: RunLauncher | None = request.app.state.launcher
    if launcher is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "run launching is not configured on this coordinator")
    project = session.exec(select(Project).where(Project.name == body.project)).first()
    if project is None:
        field_error("project", f"unknown project {body.project!r}")
    sites = _resolve_sites(session, body)
    if body.min_sites > len(sites):
        field_error(
            "min_sites",
            f"{body.min_sites} site(s) required but only {len(sites)} registered site(s) "
            f"will take part ({', '.join(sites) or 'none'})",
        )
    if body.secure_aggregation and len(sites) < body.secagg_threshold_or_default():
        field_error(
            "secagg_threshold",
            f"secure aggregation unmasks a sum of at least "
            f"{body.secagg_threshold_or_default()} sites, but only {len(sites)} will take "
            "part: add sites or lower secagg_threshold (at least 2)")
    from coordinator.study_registry import study_run_settings
    from fedward.tasks import TASKS

    settings = body.model_dump(include=set(RunSettings.model_fields))
    try:
        task_name, study_settings = study_run_settings(session, body, field_error)
    except StudyRetiredError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    # A study of its own is not in the registry: its defaults came with study_settings.
    task = TASKS.get(task_name)
    settings.update(study_settings)
    for key, default in (("lr", "default_lr"), ("batch_size", "default_batch_size")):
        if settings[key] is None and task is not None:
            settings[key] = getattr(task, default)
    settings.update(sites=sites)
    config = RunConfig(**settings)
    assert project.id is not None
    with run_control.LAUNCH_LOCK:  # the limits hold for concurrent launches too
        run_control.check_run_limits(session, request.app.state.settings, project)
        run = Run(project_id=project.id, task=task_name, config_json=config.model_dump_json(),
                  launched_by=user.name)
        session.add(run)
        session.flush()
        assert run.id is not None
        run_id = run.id
        append_event(session, actor=user.name, action="run.created", subject=f"run:{run_id}",
                     detail={"project": project.name, "task": task_name,
                             "config": config.model_dump()})
        session.commit()
    # No transaction is open while the launcher runs: the ServerApp it starts may write.
    try:
        flwr_run_id = str(launcher.launch(run_id))
    except Exception as exc:  # the Flower boundary can fail in many ways; report why
        reason = f"launch failed: {exception_reason(exc)}"
        failed = session.get(Run, run_id, populate_existing=True)
        assert failed is not None
        if failed.status not in RUN_FINAL_STATUSES:
            record_run_outcome(session, failed, status="failed", reason=reason,
                               actor=user.name)
        session.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, reason) from exc
    launched = session.get(Run, run_id, populate_existing=True)
    assert launched is not None
    if launched.flwr_run_id is None:  # the ServerApp may already have recorded it
        launched.flwr_run_id = flwr_run_id
        session.add(launched)
    session.commit()
    return RunPublic.of(launched, project.name)


@router.get("/runs", responses=RESPONSES_401)
def list_runs(
    session: SessionDep,
    _user: CurrentUser,
    project: Annotated[str | None, Query(description="Only this project's runs.")] = None,
    run_status: Annotated[str | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[RunPublic]:
    """Runs, newest first."""
    query = select(Run, Project.name).join(Project, col(Project.id) == col(Run.project_id))
    if project is not None:
        query = query.where(Project.name == project)
    if run_status is not None:
        query = query.where(Run.status == run_status)
    rows = session.exec(query.order_by(col(Run.id).desc()).offset(offset).limit(limit)).all()
    admissions = latest_admissions(session, [run.id for run, _ in rows if run.id is not None])
    return [RunPublic.of(run, name, admissions.get(run.id or 0)) for run, name in rows]


def _rounds(session: Session, run_id: int) -> list[RoundPublic]:
    rows = session.exec(select(Round).where(Round.run_id == run_id)
                        .order_by(col(Round.number))).all()
    return [RoundPublic.of(r) for r in rows]


@router.get("/runs/{run_id}", responses={**RESPONSES_401, **RESPONSES_404})
def get_run(run_id: int, session: SessionDep, _user: CurrentUser) -> RunDetail:
    """One run, with its rounds."""
    run, project_name = _run_with_project(session, run_id)
    rounds = _rounds(session, run_id)
    running = [r.number for r in rounds if r.status == "running"]
    admission = latest_admissions(session, [run_id]).get(run_id)
    return RunDetail(
        **RunPublic.of(run, project_name, admission).model_dump(),
        rounds_completed=sum(r.status == "completed" for r in rounds),
        rounds_failed=sum(r.status == "failed" for r in rounds),
        current_round=max(running) if running else None,
        rounds=rounds,
    )


@router.get("/runs/{run_id}/rounds", responses={**RESPONSES_401, **RESPONSES_404})
def list_rounds(run_id: int, session: SessionDep, _user: CurrentUser) -> list[RoundPublic]:
    """The run's rounds, in order."""
    _run_with_project(session, run_id)
    return _rounds(session, run_id)


@router.get("/runs/{run_id}/metrics", responses={**RESPONSES_401, **RESPONSES_404})
def run_metrics(run_id: int, session: SessionDep, _user: CurrentUser) -> RunMetrics:
    """Every scalar metric the sites reported, per round, per site."""
    _run_with_project(session, run_id)
    rows = session.exec(
        select(SiteMetric).where(SiteMetric.run_id == run_id).order_by(
            col(SiteMetric.round_number), col(SiteMetric.site_name), col(SiteMetric.name))
    ).all()
    by_round: dict[int, dict[str, dict[str, float]]] = {}
    for m in rows:
        by_round.setdefault(m.round_number, {}).setdefault(m.site_name, {})[m.name] = m.value
    return RunMetrics(run_id=run_id,
                      rounds=[RoundMetrics(round=n, sites=s) for n, s in by_round.items()])


@router.get("/runs/{run_id}/checkpoints", responses={**RESPONSES_401, **RESPONSES_404})
def list_checkpoints(
    run_id: int, session: SessionDep, _user: CurrentUser
) -> list[CheckpointPublic]:
    """The run's saved global models, by round."""
    _run_with_project(session, run_id)
    rows = session.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)
                        .order_by(col(Checkpoint.round_number))).all()
    return [CheckpointPublic.of(c) for c in rows]


@router.get("/runs/{run_id}/statistics", responses={**RESPONSES_401, **RESPONSES_404})
def run_statistics_route(run_id: int, session: SessionDep, _user: CurrentUser
                         ) -> dict[str, Any]:
    """The run's federated DP statistics: the sum of its sites' noised releases, as the
    reference statistics document a release of the run ships (``reference``), with the
    sites summed and the sites left out and why."""
    from coordinator.run_statistics import read_statistics

    _run_with_project(session, run_id)
    out = read_statistics(session, run_id)
    if out is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"run {run_id} has no statistics: it was launched without statistics, "
                   "or its statistics phase has not finished (it runs before round 1)")
    return out
