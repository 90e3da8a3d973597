"""Users and authentication for the coordinator's API and portal.

Authentication is a bearer token (``Authorization: Bearer <token>``): a user's API token
(expires after ``Settings.token_ttl_days``), or a session token from ``POST /login`` (name
and password, expires after :data:`SESSION_TTL`). Either ends earlier when it is revoked
(``POST /logout``, a password change, an admin) or its user is disabled. Only SHA-256
digests of tokens are stored; passwords are stored as argon2id hashes. The routes that use
this live in :mod:`coordinator.api`, :mod:`coordinator.users_api`,
:mod:`coordinator.release_api`, :mod:`coordinator.mlflow_api` and the portal; keeping it
here lets them depend on it without depending on the application that mounts them.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta
from typing import Annotated, Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.db import SessionDep
from coordinator.login_limits import LoginLimiter
from coordinator.models import (
    LoginSession,
    User,
    UserCredential,
    utcnow,
)
from fedward.roles import (
    ROLES,
)

API_PREFIX: Final = "/api/v1"
SESSION_TTL: Final = timedelta(hours=12)
DEFAULT_TOKEN_TTL: Final = timedelta(days=90)   # Settings.token_ttl_days
MIN_PASSWORD_LENGTH: Final = 12
MAX_PASSWORD_LENGTH: Final = 1024
_USER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

def hash_token(token: str) -> str:
    """The stored form of an API token: its SHA-256 in hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# argon2id with the library's defaults (RFC 9106's second recommended option: 64 MiB,
# 3 passes), about 50 ms per hash here. One hasher: it is stateless and thread-safe.
_hasher: Final = PasswordHasher()
# Verified against when the user does not exist, so a login's timing does not tell
# whether a name is taken.
_DUMMY_HASH: Final = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """The stored form of a password: an argon2id hash with its own random salt.

    Args:
        password: The plaintext password.

    Returns:
        The encoded hash (``$argon2id$v=19$...``).

    Raises:
        ValueError: Shorter than :data:`MIN_PASSWORD_LENGTH` or longer than 1024 characters.
    """
    _check_password(password)
    return _hasher.hash(password)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password too long: at most {MAX_PASSWORD_LENGTH} characters")


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash`` (never raises on a mismatch).

    Args:
        password_hash: A hash from :func:`hash_password`.
        password: The password to check.

    Returns:
        True when it matches.
    """
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def set_password(session: Session, user: User, password: str | None = None, *, actor: str,
                 encoded: str | None = None, keep_token: str | None = None) -> None:
    """Set or replace a user's password, in the session's transaction (the caller commits).

    Every other credential of the user ends: its open login sessions and its API token,
    except the one token ``keep_token`` (the one the change was made with), so a changed
    password locks out whoever held the old one or anything obtained with it.

    Args:
        session: Open session.
        user: The user (flushed, ``id`` set).
        password: The new password (see :func:`hash_password` for the rules).
        actor: Who sets it, for the audit log.
        encoded: The new password already hashed with :func:`hash_password`, instead of
            ``password`` (so the slow hash can run outside a write transaction).
        keep_token: A token of this user that stays valid.

    Raises:
        ValueError: The password breaks the length rules.
    """
    assert user.id is not None
    if encoded is None:
        assert password is not None
        encoded = hash_password(password)
    row = session.exec(select(UserCredential).where(UserCredential.user_id == user.id)).first()
    if row is None:
        row = UserCredential(user_id=user.id, password_hash=encoded)
    else:
        row.password_hash, row.updated_at = encoded, utcnow()
    session.add(row)
    ended = revoke_credentials(session, user, keep_token=keep_token)
    session.flush()
    append_event(session, actor=actor, action="user.password_set", subject=f"user:{user.name}",
                 detail=ended)


def revoke_credentials(session: Session, user: User, *, keep_token: str | None = None
                       ) -> dict[str, Any]:
    """End a user's login sessions and revoke its API token, except ``keep_token``.

    In the session's transaction (the caller commits and audits).

    Returns:
        What ended: ``{"sessions_ended": n, "api_token_revoked": bool}``.
    """
    keep = hash_token(keep_token) if keep_token is not None else None
    now = utcnow()
    ended = 0
    for open_ in session.exec(select(LoginSession).where(
            LoginSession.user_id == user.id, col(LoginSession.ended_at).is_(None))).all():
        if open_.token_hash != keep:
            open_.ended_at = now
            session.add(open_)
            ended += 1
    revoked = user.token_hash != keep and user.token_revoked_at is None
    if revoked:
        user.token_revoked_at = now
        session.add(user)
    return {"sessions_ended": ended, "api_token_revoked": revoked}


def create_user(
    session: Session, *, name: str, role: str, actor: str = "system",
    password: str | None = None, token_ttl: timedelta = DEFAULT_TOKEN_TTL,
) -> tuple[User, str]:
    """Create a user and its API token, in the session's transaction (the caller commits).

    Args:
        session: Open session, for example from :func:`coordinator.db.session_scope`.
        name: Unique user name (letters, digits, ``_ . @ -``; up to 64).
        role: One of ``admin``, ``ml_engineer``, ``reviewer``, ``clinician``.
        actor: Who creates the user, for the audit log.
        password: A password for ``POST /login`` and the release portal; ``None`` for an
            account that uses its API token only.
        token_ttl: How long the API token works.

    Returns:
        The user (flushed, ``id`` set) and the plaintext token. The token is not stored and
        cannot be shown again.

    Raises:
        ValueError: Bad name, role or password, or the name is taken.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}")
    if not _USER_NAME.fullmatch(name):
        raise ValueError(f"bad user name {name!r}: use letters, digits, '_', '.', '@', '-'")
    if session.exec(select(User).where(User.name == name)).first() is not None:
        raise ValueError(f"user {name!r} already exists")
    if password is not None:
        _check_password(password)  # before anything is written
    token = secrets.token_urlsafe(32)
    user = User(name=name, role=role, token_hash=hash_token(token),
                token_expires_at=utcnow() + token_ttl)
    session.add(user)
    session.flush()
    append_event(session, actor=actor, action="user.created", subject=f"user:{name}",
                 detail={"role": role, "password": password is not None,
                         "token_expires_at": user.token_expires_at.isoformat()})
    if password is not None:
        set_password(session, user, password, actor=actor, keep_token=token)
    return user, token


def open_session(session: Session, *, name: str, password: str, address: str = "unknown"
                 ) -> tuple[User, str, datetime]:
    """Check a name and password and open a login session (the caller commits).

    The password is checked outside any transaction: the session's current transaction
    ends first, so a slow hash never holds the database (on SQLite, its one write lock).
    Success and failure are both audited (``user.login``, ``user.login_failed``); a failed
    login names the user only when the name is a user's: a password typed into the name
    field is never stored.

    Args:
        session: Open session.
        name: User name.
        password: The user's password.
        address: The client's address, for the audit log.

    Returns:
        The user, the session token (shown once; only its SHA-256 is stored) and when it
        expires.

    Raises:
        PermissionError: Unknown user, no password set, a wrong password (one message for
            all three, so the answer does not tell which names exist), or, once the
            password checked out, a disabled user.
    """
    known = session.exec(select(User).where(User.name == name)).first()
    credential = None if known is None else session.exec(
        select(UserCredential).where(UserCredential.user_id == known.id)).first()
    known_id = None if known is None else known.id
    stored = None if credential is None else credential.password_hash
    session.commit()
    if stored is None:
        verify_password(_DUMMY_HASH, password)  # same work as for a real user
        ok = False
    else:
        ok = verify_password(stored, password)
    if known_id is None or not ok:
        append_event(session, actor="anonymous", action="user.login_failed",
                     subject=f"user:{name}" if known_id is not None else "user:(unknown)",
                     detail={"address": address[:64]})
        raise PermissionError("wrong user name or password")
    user = session.get(User, known_id)
    if user is None:
        raise PermissionError("wrong user name or password")   # deleted meanwhile
    if user.disabled_at is not None:
        append_event(session, actor="anonymous", action="user.login_failed",
                     subject=f"user:{user.name}", detail={"address": address[:64],
                                                          "reason": "disabled"})
        raise PermissionError("this account is disabled; ask a coordinator admin")
    assert user.id is not None
    token = secrets.token_urlsafe(32)
    expires = utcnow() + SESSION_TTL
    session.add(LoginSession(user_id=user.id, token_hash=hash_token(token), expires_at=expires))
    append_event(session, actor=user.name, action="user.login", subject=f"user:{user.name}",
                 detail={"expires_at": expires.isoformat()})
    return user, token, expires


def token_problem(session: Session, token: str) -> tuple[User | None, str]:
    """The user a token belongs to, or why it is refused.

    Args:
        session: Open session.
        token: The presented token (an API token or a login session token).

    Returns:
        ``(user, "")`` for a valid token of an enabled user, else ``(None, why)`` where
        ``why`` says what happened and what to do; it never tells whether an unknown token
        was ever valid.
    """
    digest = hash_token(token)
    now = utcnow()
    user = session.exec(select(User).where(User.token_hash == digest)).first()
    if user is not None:
        if user.token_revoked_at is not None:
            return None, (f"this API token was revoked on "
                          f"{user.token_revoked_at:%Y-%m-%d %H:%M} UTC; log in again or ask "
                          "an admin for a new one (`fedward-coordinator new-token NAME`)")
        if user.token_expires_at <= now:
            return None, (f"this API token expired on {user.token_expires_at:%Y-%m-%d %H:%M} "
                          "UTC; ask an admin for a new one (`fedward-coordinator new-token "
                          "NAME`)")
    else:
        login = session.exec(select(LoginSession).where(LoginSession.token_hash == digest)
                             ).first()
        if login is None:
            return None, "unknown API token"
        if login.ended_at is not None:
            return None, "this login session was ended (logout or password change); log in again"
        if login.expires_at <= now:
            return None, "this login session expired; log in again"
        user = session.get(User, login.user_id)
        if user is None:
            return None, "unknown API token"
    if user.disabled_at is not None:
        return None, f"user {user.name!r} is disabled; ask a coordinator admin"
    return user, ""


def user_for_token(session: Session, token: str) -> User | None:
    """The user a valid token belongs to (see :func:`token_problem`).

    Args:
        session: Open session.
        token: The presented token.

    Returns:
        The user, or ``None`` when the token is unknown, expired, revoked or logged out, or
        its user is disabled.
    """
    return token_problem(session, token)[0]


def end_session(session: Session, token: str) -> bool:
    """Log a session token out (the caller commits). API tokens are not affected.

    Args:
        session: Open session.
        token: A login session token.

    Returns:
        True when an open session was ended.
    """
    login = session.exec(
        select(LoginSession).where(LoginSession.token_hash == hash_token(token))).first()
    if login is None or login.ended_at is not None:
        return False
    login.ended_at = utcnow()
    session.add(login)
    return True


bearer_scheme = HTTPBearer(auto_error=False, description="API token of a coordinator user.")


def get_current_user(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> User:
    """FastAPI dependency: the user whose token is in the ``Authorization`` header.

    The token is an API token or a login session token (see :func:`user_for_token`).

    Raises:
        HTTPException: 401 when the header is missing, malformed or the token is unknown,
            expired, revoked or logged out, or its user is disabled.
    """
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing API token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    user, why = token_problem(session, credentials.credentials)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=why,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require_role(user: User, roles: frozenset[str]) -> None:
    """Refuse the request (403, naming the roles that may) unless the user has one of them.

    Args:
        user: The authenticated user.
        roles: The roles allowed.

    Raises:
        HTTPException: 403.
    """
    if user.role not in roles:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"role {user.role!r} may not do this; needs one of {', '.join(sorted(roles))}",
        )




def client_address(request: Request) -> str:
    """The client's address as the server saw it (for rate limits and the audit log)."""
    return request.client.host if request.client is not None else "unknown"


def checked_login(request: Request, session: Session, *, name: str, password: str
                  ) -> tuple[User, str, datetime]:
    """:func:`open_session` within the login rate limits of the application.

    The caller commits (a failed attempt is audited as well).

    Raises:
        LoginThrottled: Too many failed logins for this name or from this address, or too
            many checks at once; nothing was checked.
        PermissionError: As :func:`open_session`.
    """
    limiter: LoginLimiter = request.app.state.login_limiter
    address = client_address(request)
    limiter.check(name=name, address=address)
    with limiter.slot():
        limiter.check(name=name, address=address)   # others may have failed meanwhile
        try:
            return open_session(session, name=name, password=password, address=address)
        except PermissionError:
            limiter.failed(name=name, address=address)
            raise
