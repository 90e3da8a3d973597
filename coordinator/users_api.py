"""Users: create and list them (admin only), set a password, and end or renew a user's
credentials: new API token, revoke, disable, delete.

Mounted by :func:`coordinator.api.create_app` under ``/api/v1``. An admin may act on any
user; every user may set their own password and renew or revoke their own tokens. No admin
can disable or delete themself, nor the last enabled admin: the coordinator always keeps
one way in.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Annotated, NoReturn

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, func, select

from coordinator.api_errors import (
    RESPONSES_401,
    RESPONSES_403,
    RESPONSES_404,
    Responses,
    field_error,
    not_found,
)
from coordinator.audit import append_event
from coordinator.auth import (
    API_PREFIX,
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    CurrentUser,
    bearer_scheme,
    create_user,
    hash_password,
    hash_token,
    require_role,
    revoke_credentials,
    set_password,
)
from coordinator.db import SessionDep
from coordinator.models import LoginSession, User, UserCredential, utcnow
from coordinator.schemas import UserPublic
from coordinator.settings import Settings
from fedward.roles import ADMIN, ROLES, USER_ADMIN_ROLES

__all__ = ["issue_api_token", "router"]

router = APIRouter(prefix=API_PREFIX, tags=["users"])
_RESPONSES: Responses = {**RESPONSES_401, **RESPONSES_403, 404: {"description": "No such user"}}


class NewToken(BaseModel):
    """A user's new API token, shown this once; the previous one no longer works."""

    user: UserPublic
    token: str
    expires_at: datetime


class DisableRequest(BaseModel):
    """Why a user is disabled (kept in the audit log)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=500)


def issue_api_token(session: Session, user: User, *, actor: str, ttl: timedelta) -> str:
    """Give ``user`` a new API token that works for ``ttl``; the old one stops working.

    In the session's transaction (the caller commits).

    Returns:
        The token (only its SHA-256 is stored).
    """
    token = secrets.token_urlsafe(32)
    user.token_hash = hash_token(token)
    user.token_expires_at = utcnow() + ttl
    user.token_revoked_at = None
    session.add(user)
    append_event(session, actor=actor, action="user.token_issued", subject=f"user:{user.name}",
                 detail={"expires_at": user.token_expires_at.isoformat()})
    return token


def _target(session: Session, name: str) -> User:
    user = session.exec(select(User).where(User.name == name)).first()
    if user is None:
        not_found(f"user {name!r}")
    return user


def _self_or_admin(user: User, name: str) -> None:
    if user.name != name:
        require_role(user, USER_ADMIN_ROLES)


def _refuse(message: str) -> NoReturn:
    raise HTTPException(status.HTTP_409_CONFLICT, message)


def _keep_an_admin(session: Session, user: User, target: User, what: str) -> None:
    """Refuse to leave the coordinator without an enabled admin, or an admin without
    their own account."""
    if target.id == user.id:
        _refuse(f"you cannot {what} your own account; another admin can")
    if target.role == ADMIN and target.disabled_at is None:
        admins = session.exec(select(func.count()).select_from(User).where(
            User.role == ADMIN, col(User.disabled_at).is_(None))).one()
        if admins <= 1:
            _refuse(f"{target.name!r} is the last enabled admin; create another admin first")


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


@router.post("/users", status_code=201, responses={**RESPONSES_401, **RESPONSES_403})
def create_user_route(body: UserCreate, request: Request, session: SessionDep,
                      user: CurrentUser) -> UserCreated:
    """Create a user (admin only); the answer holds its API token, shown only this once."""
    require_role(user, USER_ADMIN_ROLES)
    if body.role not in ROLES:
        field_error("role", f"unknown role; roles: {', '.join(sorted(ROLES))}")
    if session.exec(select(User).where(User.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"user {body.name!r} already exists")
    try:
        new, token = create_user(session, name=body.name, role=body.role, actor=user.name,
                                 password=body.password, token_ttl=_token_ttl(request))
    except ValueError as err:
        field_error("name", str(err))
    session.commit()
    return UserCreated(user=UserPublic.of(new), token=token)


@router.get("/users", responses={**RESPONSES_401, **RESPONSES_403})
def list_users(session: SessionDep, user: CurrentUser) -> list[UserPublic]:
    """All users, by name (admin only)."""
    require_role(user, USER_ADMIN_ROLES)
    return [UserPublic.of(u) for u in session.exec(select(User).order_by(col(User.name))).all()]


class PasswordChange(BaseModel):
    """Body of ``PUT /users/{name}/password``."""

    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)


@router.put("/users/{name}/password", status_code=204,
            responses={**RESPONSES_401, **RESPONSES_403, **RESPONSES_404})
def change_password(name: str, body: PasswordChange, session: SessionDep,
                    user: CurrentUser,
                    credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(bearer_scheme)]) -> None:
    """Set a user's password: an admin for anyone, every user for themself.

    Every other credential of the user ends: its login sessions and its API token, all but
    the token this request was made with.
    """
    _self_or_admin(user, name)
    _target(session, name)
    session.commit()   # the slow hash runs outside any transaction
    encoded = hash_password(body.password)
    target = _target(session, name)   # read again: it may have changed meanwhile
    assert credentials is not None
    set_password(session, target, actor=user.name, encoded=encoded,
                 keep_token=credentials.credentials if target.id == user.id else None)
    session.commit()


@router.post("/users/{name}/token", status_code=201, responses=_RESPONSES)
def new_token(name: str, request: Request, session: SessionDep, user: CurrentUser) -> NewToken:
    """Issue a new API token (an admin for anyone, every user for themself).

    The previous API token stops working at once; login sessions are not affected.
    """
    _self_or_admin(user, name)
    target = _target(session, name)
    if target.disabled_at is not None:
        _refuse(f"user {name!r} is disabled; enable it first")
    token = issue_api_token(session, target, actor=user.name, ttl=_token_ttl(request))
    session.commit()
    return NewToken(user=UserPublic.of(target), token=token,
                    expires_at=target.token_expires_at)


@router.post("/users/{name}/revoke-tokens", status_code=204, responses=_RESPONSES)
def revoke_tokens(name: str, session: SessionDep, user: CurrentUser) -> None:
    """Revoke every credential of a user: its API token and all its login sessions
    (an admin for anyone, every user for themself). Its password stays."""
    _self_or_admin(user, name)
    target = _target(session, name)
    detail = revoke_credentials(session, target)
    append_event(session, actor=user.name, action="user.tokens_revoked",
                 subject=f"user:{target.name}", detail=detail)
    session.commit()


@router.post("/users/{name}/disable", responses=_RESPONSES)
def disable_user(name: str, body: DisableRequest, session: SessionDep,
                 user: CurrentUser) -> UserPublic:
    """Disable a user (admin only): no login, no token of theirs works, until enabled."""
    require_role(user, USER_ADMIN_ROLES)
    target = _target(session, name)
    if target.disabled_at is None:
        _keep_an_admin(session, user, target, "disable")
        target.disabled_at = utcnow()
        session.add(target)
        detail = revoke_credentials(session, target)
        append_event(session, actor=user.name, action="user.disabled",
                     subject=f"user:{target.name}", detail={"reason": body.reason, **detail})
        session.commit()
    return UserPublic.of(target)


@router.post("/users/{name}/enable", responses=_RESPONSES)
def enable_user(name: str, session: SessionDep, user: CurrentUser) -> UserPublic:
    """Enable a disabled user again (admin only). Its old tokens stay revoked: it logs in
    with its password, or an admin issues it a new API token."""
    require_role(user, USER_ADMIN_ROLES)
    target = _target(session, name)
    if target.disabled_at is not None:
        target.disabled_at = None
        session.add(target)
        append_event(session, actor=user.name, action="user.enabled",
                     subject=f"user:{target.name}", detail={})
        session.commit()
    return UserPublic.of(target)


@router.delete("/users/{name}", status_code=204, responses=_RESPONSES)
def delete_user(name: str, session: SessionDep, user: CurrentUser) -> None:
    """Delete a user (admin only): its account, password and sessions. What it did stays
    in the audit log and in the runs and releases that name it."""
    require_role(user, USER_ADMIN_ROLES)
    target = _target(session, name)
    _keep_an_admin(session, user, target, "delete")
    for row in session.exec(select(LoginSession).where(LoginSession.user_id == target.id)):
        session.delete(row)
    for cred in session.exec(select(UserCredential).where(
            UserCredential.user_id == target.id)):
        session.delete(cred)
    session.flush()
    session.delete(target)
    append_event(session, actor=user.name, action="user.deleted",
                 subject=f"user:{target.name}", detail={"role": target.role})
    session.commit()
