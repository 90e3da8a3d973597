"""REST routes of the MLflow hand-off (mounted under ``/api/v1`` by ``create_app``).

Admins and ML engineers export a run or register an approved release now (optionally to
another tracking server than the configured one) and see what is pending and why. Including
this router also runs the background :class:`~coordinator.mlflow_outbox.ExportWorker` for
the application's lifetime (start-up: the exports left pending are retried).

Statuses: 404 no such run or release; 409 an export that cannot be done (the reason); 422 a
bad tracking URI; 502 the tracking server is unreachable or failed the call (the export
stays pending and is retried); 503 no tracking server configured and none given.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final

from fastapi import APIRouter, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator import mlflow_outbox
from coordinator.api_errors import RESPONSES_401, RESPONSES_403, Responses
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep, session_scope
from coordinator.mlflow_names import check_tracking_uri
from coordinator.models import MlflowExport, Release, Run
from coordinator.schemas import RequestBody
from coordinator.settings import Settings
from fedward.roles import WRITE_ROLES

__all__ = ["ExportPublic", "ExportRequest", "HandoffStatus", "router"]

RECENT_DONE: Final = 20


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    worker = mlflow_outbox.ExportWorker(engine=app.state.engine, settings=app.state.settings)
    worker.start()
    app.state.mlflow_worker = worker
    try:
        yield
    finally:
        worker.stop()


router = APIRouter(prefix=API_PREFIX, lifespan=_lifespan)
_ERRORS: Responses = {
    **RESPONSES_401, **RESPONSES_403,
    404: {"description": "No such run or release"},
    409: {"description": "The export cannot be done (the reason says why)"},
    502: {"description": "The tracking server is unreachable or failed; the export is kept "
                         "pending and retried"},
    503: {"description": "No tracking server configured and none given"}}


class ExportRequest(RequestBody):
    """Body of an export: the tracking server (default: the configured one)."""

    tracking_uri: str | None = Field(default=None, max_length=2000,
                                     description="http(s)://host:port of an MLflow tracking "
                                                 "server; omitted: FEDWARD_MLFLOW_TRACKING_URI.")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else check_tracking_uri(value)


class ExportPublic(BaseModel):
    """One hand-off: what, where to, its state, and where it went."""

    id: int
    kind: str
    subject: str
    state: str
    tracking_uri: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    requested_by: str
    requested_at: datetime
    exported_at: datetime | None
    result: dict[str, Any]

    @classmethod
    def of(cls, row: MlflowExport, settings: Settings) -> ExportPublic:
        """Build from a row (``tracking_uri``: where it goes, explicit or configured)."""
        assert row.id is not None
        return cls(id=row.id, kind=row.kind, subject=row.subject, state=row.state,
                   tracking_uri=mlflow_outbox.target_uri(row, settings),
                   attempts=row.attempts, last_error=row.last_error,
                   next_attempt_at=row.next_attempt_at, requested_by=row.requested_by,
                   requested_at=row.requested_at, exported_at=row.exported_at,
                   result=json.loads(row.result_json))


class HandoffStatus(BaseModel):
    """The hand-off's settings, what is pending (and why), what failed, what was done."""

    tracking_uri: str | None
    experiment: str
    model_name: str
    alias: str
    retry_s: float
    pending: list[ExportPublic]
    failed: list[ExportPublic]
    recent: list[ExportPublic] = Field(description=f"The {RECENT_DONE} latest done.")


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _export_now(request: Request, user_name: str, *, kind: str, subject: str,
                audit_subject: str, body: ExportRequest) -> ExportPublic:
    from coordinator.mlflow_export import HandoffError, HandoffRefused

    settings = _settings(request)
    engine: Engine = request.app.state.engine
    if body.tracking_uri is None and settings.mlflow_tracking_uri is None:
        raise HTTPException(503, "no MLflow tracking server is configured: give "
                                 "tracking_uri (--tracking-uri), or set "
                                 "FEDWARD_MLFLOW_TRACKING_URI and restart the coordinator")
    with session_scope(engine) as session:
        row = mlflow_outbox.request_export(session, kind=kind, subject=subject,
                                           requested_by=user_name,
                                           tracking_uri=body.tracking_uri, wake=False)
        append_event(session, actor=user_name, action="mlflow.export_requested",
                     subject=audit_subject,
                     detail={"tracking_uri": mlflow_outbox.target_uri(row, settings)})
        export_id = row.id
    assert export_id is not None
    try:
        mlflow_outbox.attempt_export(engine, settings, export_id)
    except HandoffRefused as err:
        raise HTTPException(409, str(err)) from None
    except HandoffError as err:
        raise HTTPException(502, str(err)) from None
    with session_scope(engine) as session:
        done = session.get(MlflowExport, export_id)
        assert done is not None
        return ExportPublic.of(done, settings)


@router.post("/mlflow/runs/{run_id}/export", response_model=ExportPublic,
             responses=_ERRORS, tags=["mlflow"])
def export_run(run_id: int, request: Request, session: SessionDep, user: CurrentUser,
               body: ExportRequest | None = None) -> ExportPublic:
    """Log a run to MLflow now (parameters, per-site metrics per round, epsilon, tags);
    a repeated export updates the same MLflow run. Admins and ML engineers."""
    require_role(user, WRITE_ROLES)
    if session.get(Run, run_id) is None:
        raise HTTPException(404, f"run {run_id} not found")
    user_name = user.name
    session.commit()  # hold no transaction (on SQLite: the write lock) while it runs
    return _export_now(request, user_name, kind=mlflow_outbox.KIND_RUN, subject=str(run_id),
                       audit_subject=f"run:{run_id}", body=body or ExportRequest())


@router.post("/mlflow/releases/{release_id}/export", response_model=ExportPublic,
             responses=_ERRORS, tags=["mlflow"])
def export_release(release_id: str, request: Request, session: SessionDep,
                   user: CurrentUser, body: ExportRequest | None = None) -> ExportPublic:
    """Register an approved release in the MLflow model registry now and point the alias at
    the newest approved release; a repeated export adds no second version. Admins and ML
    engineers."""
    require_role(user, WRITE_ROLES)
    found = session.exec(select(Release.id).where(Release.release_id == release_id)).first()
    if found is None:
        raise HTTPException(404, f"release {release_id!r} not found")
    user_name = user.name
    session.commit()
    return _export_now(request, user_name, kind=mlflow_outbox.KIND_RELEASE, subject=release_id,
                       audit_subject=f"release:{release_id}",
                       body=body or ExportRequest())


@router.get("/mlflow/exports", response_model=HandoffStatus, responses=_ERRORS,
            tags=["mlflow"])
def handoff_status(request: Request, session: SessionDep, user: CurrentUser) -> HandoffStatus:
    """The hand-off's settings, the exports pending (with their last error) or failed, and
    the latest done. Admins and ML engineers."""
    require_role(user, WRITE_ROLES)
    settings = _settings(request)
    open_rows = session.exec(select(MlflowExport).where(col(MlflowExport.state) != "done")
                             .order_by(col(MlflowExport.id))).all()
    done = session.exec(select(MlflowExport).where(MlflowExport.state == "done")
                        .order_by(col(MlflowExport.exported_at).desc()).limit(RECENT_DONE)
                        ).all()
    return HandoffStatus(
        tracking_uri=settings.mlflow_tracking_uri, experiment=settings.mlflow_experiment,
        model_name=settings.mlflow_model_name, alias=settings.mlflow_alias,
        retry_s=settings.mlflow_retry_s,
        pending=[ExportPublic.of(r, settings) for r in open_rows if r.state == "pending"],
        failed=[ExportPublic.of(r, settings) for r in open_rows if r.state == "failed"],
        recent=[ExportPublic.of(r, settings) for r in done])
