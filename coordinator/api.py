"""The coordinator's REST API (``/api/v1``), built by :func:`create_app`.

Authentication is a bearer token (``Authorization: Bearer <token>``): a user's API token
(expires after ``Settings.token_ttl_days``), or a session token from ``POST /login`` (name
and password, expires after :data:`SESSION_TTL`). Either ends earlier when it is revoked
(``POST /logout``, a password change, an admin) or its user is disabled. Logins are
rate-limited (:mod:`coordinator.login_limits`). Only SHA-256 digests of tokens are stored;
passwords are stored as argon2id hashes. Roles: ``admin`` and ``ml_engineer`` may change
things (projects, sites, runs); every authenticated user may read projects, sites and runs;
the audit log is open to everyone but ``clinician``; only ``admin`` creates, disables and
deletes users and issues site enrollment tokens (each mints a site certificate). The
release workflow's routes (:mod:`coordinator.release_api`), the account routes
(:mod:`coordinator.users_api`) and the release portal (:mod:`coordinator.portal`) are
mounted here too; docs/ml-team-guide.md has the whole role matrix.

The Flower boundary is injected: a :class:`RunLauncher` starts a run on the SuperLink, a
:class:`NodeRegistrar` registers a site's SuperNode key with it. Without them the routes
that need them answer 503.

Validation errors (422) keep FastAPI's ``detail`` list (without the submitted values: an
answer never echoes what was sent) and add ``message``, one ``"{field}: {why}"`` per
problem, for people and scripts that just print it. A request body over
:data:`MAX_BODY_BYTES` is refused with 413 before it is read further.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, NoReturn, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, func, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import evaluation, run_control
from coordinator.audit import append_event, verify_chain
from coordinator.auth import (
    API_PREFIX,
    DEFAULT_TOKEN_TTL,
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    SESSION_TTL,
    CurrentUser,
    bearer_scheme,
    checked_login,
    client_address,
    create_user,
    end_session,
    get_current_user,
    hash_password,
    hash_token,
    open_session,
    require_role,
    revoke_credentials,
    set_password,
    token_problem,
    user_for_token,
    verify_password,
)
from coordinator.dashboard_queries import certificate_expiry
from coordinator.db import SessionDep
from coordinator.enrollment import EnrollmentError, create_token, revoke_site
from coordinator.login_limits import LoginLimiter, LoginThrottled
from coordinator.metrics import ApiMetrics
from coordinator.models import (
    RUN_FINAL_STATUSES,
    AuditEvent,
    Checkpoint,
    Project,
    Round,
    Run,
    Site,
    SiteMetric,
    User,
    utcnow,
)
from coordinator.pki import CAFiles
from coordinator.presence import last_seen
from coordinator.releases import SiteParity
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
from coordinator.schemas import (
    AuditEventPublic,
    AuditPage,
    AuditVerifyResult,
    HealthPublic,
    NodeKeyCreate,
    ProjectCreate,
    ProjectPublic,
    SiteCreate,
    SitePublic,
    UserPublic,
)
from coordinator.settings import Settings
from fedward.roles import (
    AUDIT_ROLES,
    CERTIFICATE_ROLES,
    ROLES,
    USER_ADMIN_ROLES,
    WRITE_ROLES,
)
from fedward.run_config import RunConfig, RunSettings

__all__ = [
    "API_PREFIX",
    "DEFAULT_TOKEN_TTL",
    "MAX_BODY_BYTES",
    "MIN_PASSWORD_LENGTH",
    "SESSION_TTL",
    "BodySizeLimit",
    "CurrentUser",
    "NodeRegistrar",
    "RunLauncher",
    "checked_login",
    "client_address",
    "create_app",
    "create_user",
    "end_session",
    "hash_password",
    "hash_token",
    "open_session",
    "require_role",
    "revoke_credentials",
    "set_password",
    "token_problem",
    "user_for_token",
    "verify_password",
]

# Every request body of this API is a small JSON document (its largest fields, a node key
# or an intended use, are a few KiB) or the portal's login form; nothing is uploaded. 1 MiB
# leaves room to spare and keeps a single request from holding much memory.
MAX_BODY_BYTES: Final = 1024 * 1024
_LOC_PREFIXES: Final = frozenset({"body", "query", "path", "header", "cookie"})


class RunLauncher(Protocol):
    """Starts a committed, pending run on the Flower SuperLink."""

    def launch(self, run_id: int) -> str:
        """Start coordinator run ``run_id``; return Flower's run id. Raise if it cannot."""
        ...


class NodeRegistrar(Protocol):
    """Registers a site's SuperNode public key with the Flower SuperLink."""

    def register(self, public_key: str, name: str) -> str:
        """Register ``public_key`` for site ``name``; return the Flower node id."""
        ...

    def unregister(self, node_id: str) -> None:
        """Unregister Flower node ``node_id`` (done when its site is revoked)."""
        ...


# --- errors ------------------------------------------------------------------------------


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOC_PREFIXES:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _json_error(error: dict[str, Any], document: Any) -> dict[str, Any]:
    """FastAPI's "JSON decode error" (``loc`` ends in a character offset) said plainly."""
    loc = error.get("loc", ())
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
    doc = document if isinstance(document, str) else ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - (doc.rfind("\n", 0, pos) + 1) + 1
    why = (error.get("ctx") or {}).get("error", "")
    return {"type": "json_invalid", "loc": ["body"],
            "msg": f"the request body is not valid JSON (line {line}, column {column}): {why}"}


def _not_an_object(error: dict[str, Any], request: Request) -> dict[str, Any] | None:
    """The body as a whole is missing or not a JSON object: say so, and how to send one."""
    kind = error.get("type")
    if (tuple(error.get("loc", ())) != ("body",)
            or kind not in ("missing", "model_attributes_type", "dict_type")):
        return None
    if kind == "missing":
        why = "the request body is missing: send a JSON object"
    elif "json" in request.headers.get("content-type", "").lower():
        why = "the request body must be a JSON object ({...})"
    else:  # FastAPI hands a body not sent as JSON to the model as raw bytes
        why = "the request body must be a JSON object sent with 'Content-Type: application/json'"
    return {"type": kind, "loc": ["body"], "msg": why}


def _public_error(error: dict[str, Any]) -> dict[str, Any]:
    # Never echo ``input``: a 50 MB field would come back as a 50 MB answer, and a password
    # sent in the wrong field would be written back. ``ctx`` keeps only plain values (limits
    # like ``max_length``); the reason is in ``msg`` anyway.
    out: dict[str, Any] = {"type": error.get("type", ""), "loc": list(error.get("loc", ())),
                           "msg": error.get("msg", "")}
    ctx = {k: v for k, v in (error.get("ctx") or {}).items()
           if isinstance(v, (str, int, float, bool)) or v is None}
    if ctx:
        out["ctx"] = ctx
    return out


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            errors.append(_json_error(error, exc.body))
        else:
            errors.append(_not_an_object(error, request) or _public_error(error))
    message = "; ".join(f"{_field_name(e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": jsonable_encoder(errors), "message": message},
    )


_UNREADABLE_BODY: Final = "There was an error parsing the body"  # FastAPI's words


async def _http_error(request: Request, exc: Exception) -> Response:
    # FastAPI answers 400 with only _UNREADABLE_BODY when reading a JSON body fails other
    # than by a syntax error; the cause (chained) says what was wrong with it.
    assert isinstance(exc, StarletteHTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and exc.detail == _UNREADABLE_BODY and cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            why = "it is not UTF-8 text"
        elif isinstance(cause, ValueError) and "digits" in str(cause):
            why = "a number in it has more than 4300 digits"
        else:
            why = type(cause).__name__
        exc = StarletteHTTPException(400, f"the request body is not valid JSON: {why}",
                                     headers=exc.headers)
    return await http_exception_handler(request, exc)


def _field_error(field: str, message: str) -> NoReturn:
    """Reject a request body field after parsing, in the same shape as FastAPI's own 422."""
    raise RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


def _not_found(what: str) -> NoReturn:
    raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} not found")


# --- routes ------------------------------------------------------------------------------

router = APIRouter(prefix=API_PREFIX)
_Responses = dict[int | str, dict[str, Any]]
_401: _Responses = {401: {"description": "Missing or unknown API token"}}
_403: _Responses = {403: {"description": "The user's role may not do this"}}
_404: _Responses = {404: {"description": "No such object"}}


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


@router.get("/me", tags=["users"], responses=_401)
def me(user: CurrentUser) -> UserPublic:
    """The user the token belongs to."""
    return UserPublic.of(user)


class LoginRequest(BaseModel):
    """Body of ``POST /login``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class LoginPublic(BaseModel):
    """A login session: send ``token`` as ``Authorization: Bearer <token>`` until it expires."""

    token: str
    expires_at: datetime
    user: UserPublic


@router.post("/login", tags=["users"], responses={
    401: {"description": "Wrong name or password, or a disabled user"},
    429: {"description": "Too many failed logins (for this name or from this address) or "
                         "too many at once; the Retry-After header says when to try again"}})
def login(body: LoginRequest, request: Request, session: SessionDep) -> LoginPublic:
    """Exchange a name and password for a session token (valid 12 h). No token needed."""
    try:
        user, token, expires = checked_login(request, session, name=body.name,
                                             password=body.password)
    except LoginThrottled as err:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(err),
                            headers={"Retry-After": str(err.retry_after_s)}) from None
    except PermissionError as err:
        session.commit()  # keep the audit entry of the failed attempt
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(err)) from None
    session.commit()
    return LoginPublic(token=token, expires_at=expires, user=UserPublic.of(user))


@router.post("/logout", status_code=204, tags=["users"], responses=_401)
def logout(session: SessionDep, user: CurrentUser,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
           everywhere: Annotated[bool, Query(
               description="also end every other session and revoke the API token")] = False
           ) -> None:
    """Revoke the token sent: a login session ends, an API token stops working for good.

    With ``everywhere=true`` every other credential of the user ends as well.
    """
    assert credentials is not None  # CurrentUser has checked it
    token = credentials.credentials
    if everywhere:
        detail = revoke_credentials(session, user)
    elif end_session(session, token):
        detail = {"sessions_ended": 1, "api_token_revoked": False}
    else:   # the user's API token (CurrentUser has checked that it is one of the two)
        user.token_revoked_at = utcnow()
        session.add(user)
        detail = {"sessions_ended": 0, "api_token_revoked": True}
    append_event(session, actor=user.name, action="user.logout", subject=f"user:{user.name}",
                 detail=detail)
    session.commit()


class UserCreate(BaseModel):
    """Body of ``POST /users``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    role: str = Field(description="admin, ml_engineer, reviewer or clinician")
    password: str | None = Field(default=None, min_length=MIN_PASSWORD_LENGTH,
                                 max_length=MAX_PASSWORD_LENGTH,
                                 description="For the release portal and POST /login; "
                                             "omit for a token-only account.")


class UserCreated(BaseModel):
    """A new user and its API token, shown this once."""

    user: UserPublic
    token: str


def _token_ttl(request: Request) -> timedelta:
    settings: Settings = request.app.state.settings
    return timedelta(days=settings.token_ttl_days)


@router.post("/users", status_code=201, tags=["users"], responses={**_401, **_403})
def create_user_route(body: UserCreate, request: Request, session: SessionDep,
                      user: CurrentUser) -> UserCreated:
    """Create a user (admin only); the answer holds its API token, shown only this once."""
    require_role(user, USER_ADMIN_ROLES)
    if body.role not in ROLES:
        _field_error("role", f"unknown role; roles: {', '.join(sorted(ROLES))}")
    if session.exec(select(User).where(User.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"user {body.name!r} already exists")
    try:
        new, token = create_user(session, name=body.name, role=body.role, actor=user.name,
                                 password=body.password, token_ttl=_token_ttl(request))
    except ValueError as err:
        _field_error("name", str(err))
    session.commit()
    return UserCreated(user=UserPublic.of(new), token=token)


@router.get("/users", tags=["users"], responses={**_401, **_403})
def list_users(session: SessionDep, user: CurrentUser) -> list[UserPublic]:
    """All users, by name (admin only)."""
    require_role(user, USER_ADMIN_ROLES)
    return [UserPublic.of(u) for u in session.exec(select(User).order_by(col(User.name))).all()]


class PasswordChange(BaseModel):
    """Body of ``PUT /users/{name}/password``."""

    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)


@router.put("/users/{name}/password", status_code=204, tags=["users"],
            responses={**_401, **_403, **_404})
def change_password(name: str, body: PasswordChange, session: SessionDep,
                    user: CurrentUser,
                    credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(bearer_scheme)]) -> None:
    """Set a user's password: an admin for anyone, every user for themself.

    Every other credential of the user ends: its login sessions and its API token, all but
    the token this request was made with.
    """
    if user.name != name:
        require_role(user, USER_ADMIN_ROLES)
    target = session.exec(select(User).where(User.name == name)).first()
    if target is None:
        _not_found(f"user {name!r}")
    session.commit()   # the slow hash runs outside any transaction
    encoded = hash_password(body.password)
    target = session.exec(select(User).where(User.name == name)).first()
    if target is None:
        _not_found(f"user {name!r}")
    assert credentials is not None
    set_password(session, target, actor=user.name, encoded=encoded,
                 keep_token=credentials.credentials if target.id == user.id else None)
    session.commit()


# projects


@router.post("/projects", status_code=201, tags=["projects"], responses={**_401, **_403})
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


@router.get("/projects", tags=["projects"], responses=_401)
def list_projects(session: SessionDep, _user: CurrentUser) -> list[ProjectPublic]:
    """All projects, by name."""
    rows = session.exec(select(Project).order_by(col(Project.name))).all()
    return [ProjectPublic.of(p) for p in rows]


# sites


def _site(session: Session, name: str) -> Site:
    site = session.exec(select(Site).where(Site.name == name)).first()
    if site is None:
        _not_found(f"site {name!r}")
    return site


@router.post("/sites", status_code=201, tags=["sites"], responses={**_401, **_403})
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


@router.get("/sites", tags=["sites"], responses=_401)
def list_sites(session: SessionDep, _user: CurrentUser) -> list[SitePublic]:
    """All sites, by name."""
    seen = last_seen(session)
    expiry = certificate_expiry(session)
    return [SitePublic.of(s, last_seen_at=seen.get(s.name),
                          certificate_expires_at=expiry.get(s.id or 0))
            for s in session.exec(select(Site).order_by(col(Site.name))).all()]


@router.get("/sites/{name}", tags=["sites"], responses={**_401, **_404})
def get_site(name: str, session: SessionDep, _user: CurrentUser) -> SitePublic:
    """One site."""
    site = _site(session, name)
    return SitePublic.of(site, last_seen_at=last_seen(session).get(name),
                         certificate_expires_at=certificate_expiry(session).get(
                             site.id or 0))


@router.post(
    "/sites/{name}/node-key",
    tags=["sites"],
    responses={**_401, **_403, **_404,
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
                            f"registering the node key failed: {_reason(exc)}") from exc
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


def _reason(exc: BaseException) -> str:
    text_ = str(exc).strip()
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__


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


@router.post("/sites/{name}/enrollment-token", status_code=201, tags=["sites"],
             responses={**_401, **_403, **_404, 409: {"description": "Site revoked"}})
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


@router.post("/sites/{name}/revoke", tags=["sites"], responses={**_401, **_403, **_404})
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
                                                     "reason": _reason(exc)})
    else:
        append_event(session, actor=actor, action="site.unregistered",
                     subject=f"site:{site}", detail={"flower_node_id": node_id})
    session.commit()


# runs


def _run_with_project(session: Session, run_id: int) -> tuple[Run, str]:
    row = session.exec(
        select(Run, Project.name).join(Project, col(Project.id) == col(Run.project_id))
        .where(Run.id == run_id)
    ).first()
    if row is None:
        _not_found(f"run {run_id}")
    return row[0], row[1]


def _resolve_sites(session: Session, body: RunCreate) -> list[str]:
    if body.sites is None:
        return list(session.exec(
            select(Site.name).where(Site.status == "registered").order_by(col(Site.name))
        ).all())
    found = {s.name: s for s in session.exec(select(Site).where(col(Site.name).in_(body.sites)))}
    unknown = [n for n in body.sites if n not in found]
    if unknown:
        _field_error("sites", f"unknown site(s): {', '.join(unknown)}")
    unregistered = [f"{n} ({found[n].status})" for n in body.sites
                    if found[n].status != "registered"]
    if unregistered:
        _field_error("sites", f"site(s) not registered: {', '.join(unregistered)}")
    return list(body.sites)


@router.post(
    "/runs",
    status_code=201,
    tags=["runs"],
    responses={**_401, **_403, 429: {"description": "Too many runs at once (the limit and "
                                                     "the runs holding it are named)"},
               503: {"description": "The run could not be launched"}},
)
def launch_run(
    body: RunCreate, request: Request, session: SessionDep, user: CurrentUser
) -> RunPublic:
    """Create a run and launch it on Flower.

    The run is committed as ``pending`` before the launcher is called, so the ServerApp can
    find it. If launching fails, the run is marked ``failed`` with the reason and the answer
    is 503 with that reason.
    """
    require_role(user, WRITE_ROLES)
    launcher: RunLauncher | None = request.app.state.launcher
    if launcher is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "run launching is not configured on this coordinator")
    project = session.exec(select(Project).where(Project.name == body.project)).first()
    if project is None:
        _field_error("project", f"unknown project {body.project!r}")
    sites = _resolve_sites(session, body)
    if body.min_sites > len(sites):
        _field_error(
            "min_sites",
            f"{body.min_sites} site(s) required but only {len(sites)} registered site(s) "
            f"will take part ({', '.join(sites) or 'none'})",
        )
    if body.secure_aggregation and len(sites) < body.secagg_threshold_or_default():
        _field_error(
            "secagg_threshold",
            f"secure aggregation unmasks a sum of at least "
            f"{body.secagg_threshold_or_default()} sites, but only {len(sites)} will take "
            "part: add sites or lower secagg_threshold (at least 2)")
    from coordinator.study_registry import study_run_settings
    from fedward.tasks import TASKS

    settings = body.model_dump(include=set(RunSettings.model_fields))
    task_name, study_settings = study_run_settings(session, body, _field_error)
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
        reason = f"launch failed: {_reason(exc)}"
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


@router.get("/runs", tags=["runs"], responses=_401)
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


@router.get("/runs/{run_id}", tags=["runs"], responses={**_401, **_404})
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


@router.get("/runs/{run_id}/rounds", tags=["runs"], responses={**_401, **_404})
def list_rounds(run_id: int, session: SessionDep, _user: CurrentUser) -> list[RoundPublic]:
    """The run's rounds, in order."""
    _run_with_project(session, run_id)
    return _rounds(session, run_id)


@router.get("/runs/{run_id}/metrics", tags=["runs"], responses={**_401, **_404})
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


@router.get("/runs/{run_id}/checkpoints", tags=["runs"], responses={**_401, **_404})
def list_checkpoints(
    run_id: int, session: SessionDep, _user: CurrentUser
) -> list[CheckpointPublic]:
    """The run's saved global models, by round."""
    _run_with_project(session, run_id)
    rows = session.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)
                        .order_by(col(Checkpoint.round_number))).all()
    return [CheckpointPublic.of(c) for c in rows]


@router.get("/runs/{run_id}/statistics", tags=["runs"], responses={**_401, **_404})
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


# audit


@router.get("/audit", tags=["audit"], responses={**_401, **_403})
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


@router.get("/audit/verify", tags=["audit"], responses={**_401, **_403})
def verify_audit(session: SessionDep, user: CurrentUser) -> AuditVerifyResult:
    """Check the audit log's hash chain; name the first entry that does not check out."""
    require_role(user, AUDIT_ROLES)
    broken = verify_chain(session)
    events = session.exec(select(func.count()).select_from(AuditEvent)).one()
    return AuditVerifyResult(ok=broken is None, first_broken_id=broken, events=events)


# --- application -------------------------------------------------------------------------


async def _out_of_range(_request: Request, _exc: Exception) -> JSONResponse:
    # An id or number in the path or query beyond what the database stores (found by
    # fuzzing: 2**63 reached SQLite and answered 500).
    message = "a number in the request is out of range: ids and counts are below 2**63"
    return JSONResponse(status_code=422, content={
        "detail": [{"loc": ["path"], "msg": message, "type": "value_error.number"}],
        "message": message})


def _too_large_reason(limit: int) -> str:
    size = f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"
    return (f"request body too large: this API accepts at most {size} ({limit} bytes) per "
            "request. Its requests are small JSON documents; check what is being sent (a "
            "file or a data set does not belong in an API request)")


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit.

    An ``HTTPException`` so that FastAPI, which turns any other error while reading a body
    into "There was an error parsing the body", passes it on to its handler as a 413.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, _too_large_reason(limit),
                         headers={"Connection": "close"})


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 and a reason.

    A ``Content-Length`` over the limit is refused before any of the body is read; a body
    without one (chunked) is counted as it arrives and refused once it passes the limit, so
    at most the limit plus one chunk is ever held. The answer says ``Connection: close``: the
    server then stops reading the rest rather than receiving it only to discard it.

    Args:
        app: The application to protect.
        max_bytes: The largest body accepted.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"]
        if any(not v.strip().isdigit() for v in lengths):
            await _send_json(send, status.HTTP_400_BAD_REQUEST,
                             "the Content-Length header is not a whole number of bytes")
            return
        if any(int(v) > self.max_bytes for v in lengths):
            await _send_json(send, status.HTTP_413_CONTENT_TOO_LARGE,
                             _too_large_reason(self.max_bytes))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge as exc:  # read outside FastAPI's handlers (e.g. a mounted app)
            if started:
                raise
            await _send_json(send, exc.status_code, str(exc.detail))


async def _send_json(send: Send, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
    from coordinator.users_api import router as users_router

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
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(ApiMetrics)  # outermost: times every request (coordinator.metrics)
    app.include_router(router)
    app.include_router(run_control.make_router())
    app.include_router(users_router)
    app.include_router(release_router)
    app.include_router(portal_router)
    app.include_router(dashboard_router)
    app.include_router(portal_run_control_router)
    app.include_router(evaluation.make_router())
    app.include_router(mlflow_router)
    app.include_router(make_study_router(current_user=get_current_user, require_role=require_role))
    app.include_router(make_tuning_router())
    app.include_router(make_drift_router())
    app.include_router(drift_portal_router)
    return app
