"""Sessions: who am I, log in with a name and password, log out.

A login session's token is sent like an API token (``Authorization: Bearer <token>``) and
expires after :data:`coordinator.auth.SESSION_TTL`; logins are rate-limited
(:mod:`coordinator.login_limits`). Mounted by :func:`coordinator.api.create_app`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from coordinator.api_errors import RESPONSES_401
from coordinator.audit import append_event
from coordinator.auth import (
    API_PREFIX,
    MAX_PASSWORD_LENGTH,
    CurrentUser,
    bearer_scheme,
    checked_login,
    end_session,
    revoke_credentials,
)
from coordinator.db import SessionDep
from coordinator.login_limits import LoginThrottled
from coordinator.models import utcnow
from coordinator.schemas import UserPublic

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["users"])


@router.get("/me", responses=RESPONSES_401)
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


@router.post("/login", responses={
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


@router.post("/logout", status_code=204, responses=RESPONSES_401)
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
