"""The coordinator's REST API (``/api/v1``), built by :func:`create_app`.

Authentication is a bearer token (``Authorization: Bearer <token>``): a user's API token
(expires after ``Settings.token_ttl_days``), or a session token from ``POST /login`` (name
and password, expires after ``SESSION_TTL``); :mod:`coordinator.auth` checks both. Roles:
``admin`` and ``ml_engineer`` may change things (projects, sites, runs); every
authenticated user may read projects, sites and runs; the audit log is open to everyone but
``clinician``; only ``admin`` manages users and issues site enrollment tokens (each mints a
site certificate). docs/ml-team-guide.md has the whole role matrix.

This module holds the application and the few routes that belong to no resource of their
own (health, projects, the audit log). The others, one module per resource, are mounted
here: sessions (:mod:`coordinator.login_api`), users (:mod:`coordinator.users_api`), sites
(:mod:`coordinator.sites_api`), runs (:mod:`coordinator.runs_api`) and their control
(:mod:`coordinator.run_control`), releases (:mod:`coordinator.release_api`), evaluations,
studies, tunings, drift, MLflow, and the release portal (:mod:`coordinator.portal`). How
errors are answered is :mod:`coordinator.api_errors`'s; the cap on request bodies,
:mod:`coordinator.body_limit`'s.

The Flower boundary is injected: a :class:`~coordinator.runs_api.RunLauncher` starts a run
on the SuperLink, a :class:`~coordinator.sites_api.NodeRegistrar` registers a site's
SuperNode key with it. Without them the routes that need them answer 503.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, func, text
from sqlmodel import col, select

from coordinator import evaluation, run_control
from coordinator.api_errors import RESPONSES_401, RESPONSES_403, add_error_handlers
from coordinator.audit import append_event, verify_chain
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.body_limit import BodySizeLimit
from coordinator.db import SessionDep
from coordinator.login_api import router as login_router
from coordinator.login_limits import LoginLimiter
from coordinator.metrics import ApiMetrics
from coordinator.models import AuditEvent, Project
from coordinator.releases import SiteParity
from coordinator.runs_api import RunLauncher
from coordinator.runs_api import router as runs_router
from coordinator.schemas import (
    AuditEventPublic,
    AuditPage,
    AuditVerifyResult,
    HealthPublic,
    ProjectCreate,
    ProjectPublic,
)
from coordinator.settings import Settings
from coordinator.sites_api import NodeRegistrar
from coordinator.sites_api import router as sites_router
from coordinator.users_api import router as users_router
from fedward.roles import AUDIT_ROLES, WRITE_ROLES

__all__ = ["create_app", "router"]

router = APIRouter(prefix=API_PREFIX)


@router.get("/health", tags=["health"])
def health(request: Request) -> JSONResponse:
    """Liveness and database reachability. No authentication."""
    engine: Engine = request.app.state.engine
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "unreachable"; report, don't crash
        body = HealthPublic(status="degraded", database=f"unreachable: {type(exc).__name__}")
        return JSONResponse(status_code=503, content=body.model_dump())
    return JSONResponse(content=HealthPublic(status="ok", database="ok").model_dump())


@router.post("/projects", status_code=201, tags=["projects"],
             responses={**RESPONSES_401, **RESPONSES_403})
def create_project(body: ProjectCreate, session: SessionDep, user: CurrentUser) -> ProjectPublic:
    """Create a project."""
    require_role(user, WRITE_ROLES)
    if session.exec(select(Project).where(Project.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"project {body.name!r} already exists")
    project = Project(name=body.name, description=body.description)
    session.add(project)
    session.flush()
    append_event(session, actor=user.name, action="project.created",
                 subject=f"project:{body.name}", detail={"description": body.description})
    session.commit()
    return ProjectPublic.of(project)


@router.get("/projects", tags=["projects"], responses=RESPONSES_401)
def list_projects(session: SessionDep, _user: CurrentUser) -> list[ProjectPublic]:
    """All projects, by name."""
    rows = session.exec(select(Project).order_by(col(Project.name))).all()
    return [ProjectPublic.of(p) for p in rows]


@router.get("/audit", tags=["audit"], responses={**RESPONSES_401, **RESPONSES_403})
def list_audit(
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> AuditPage:
    """The audit log, newest first."""
    require_role(user, AUDIT_ROLES)
    total = session.exec(select(func.count()).select_from(AuditEvent)).one()
    rows = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc())
                        .offset(offset).limit(limit)).all()
    return AuditPage(items=[AuditEventPublic.of(e) for e in rows], total=total, limit=limit,
                     offset=offset)


@router.get("/audit/verify", tags=["audit"], responses={**RESPONSES_401, **RESPONSES_403})
def verify_audit(session: SessionDep, user: CurrentUser) -> AuditVerifyResult:
    """Check the audit log's hash chain; name the first entry that does not check out."""
    require_role(user, AUDIT_ROLES)
    broken = verify_chain(session)
    events = session.exec(select(func.count()).select_from(AuditEvent)).one()
    return AuditVerifyResult(ok=broken is None, first_broken_id=broken, events=events)


def create_app(
    *,
    settings: Settings,
    engine: Engine,
    launcher: RunLauncher | None = None,
    registrar: NodeRegistrar | None = None,
    site_parity: SiteParity | None = None,
) -> FastAPI:
    """Build the coordinator's FastAPI application.

    The database must already be migrated (:func:`coordinator.db.run_migrations`).

    Args:
        settings: Coordinator settings.
        engine: Database engine from :func:`coordinator.db.make_engine`.
        launcher: Starts runs on Flower; without it ``POST /runs`` answers 503.
        registrar: Registers node keys with Flower; without it ``POST
            /sites/{name}/node-key`` answers 503.
        site_parity: Measures a release candidate's export parity at the sites; without
            it every candidate fails its parity gate ("no site parity evaluator
            configured").

    Returns:
        The application; OpenAPI docs at ``/docs``, the release portal at ``/portal``.
    """
    from coordinator.drift_api import make_router as make_drift_router
    from coordinator.mlflow_api import router as mlflow_router
    from coordinator.portal import router as portal_router
    from coordinator.portal_dashboard import router as dashboard_router
    from coordinator.portal_drift import router as drift_portal_router
    from coordinator.portal_run_control import router as portal_run_control_router
    from coordinator.release_api import router as release_router
    from coordinator.study_api import make_router as make_study_router
    from coordinator.tuning_api import make_router as make_tuning_router

    app = FastAPI(
        title="Fedward coordinator",
        version="0.1.0",
        description="Projects, sites, federated runs, their rounds and metrics, the audit log, "
                    "release candidates and signed releases.",
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.launcher = launcher
    app.state.registrar = registrar
    app.state.site_parity = site_parity
    app.state.login_limiter = LoginLimiter()
    add_error_handlers(app)
    app.add_middleware(BodySizeLimit)
    app.add_middleware(ApiMetrics)  # outermost: times every request (coordinator.metrics)
    app.include_router(router)
    app.include_router(login_router)
    app.include_router(users_router)
    app.include_router(sites_router)
    app.include_router(runs_router)
    app.include_router(run_control.make_router())
    app.include_router(release_router)
    app.include_router(portal_router)
    app.include_router(dashboard_router)
    app.include_router(portal_run_control_router)
    app.include_router(evaluation.make_router())
    app.include_router(mlflow_router)
    app.include_router(make_study_router())
    app.include_router(make_tuning_router())
    app.include_router(make_drift_router())
    app.include_router(drift_portal_router)
    return app
