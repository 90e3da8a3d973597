"""The release portal: server-rendered pages for clinicians and reviewers (``/portal``).

People log in with their name and password; the session token lives in an HttpOnly,
SameSite=Strict cookie scoped to ``/portal``. Every role sees the approved, unrevoked
releases with their signed model cards, a download link, the release public key and its
fingerprint, and each release's lineage. Staff (admin, ML engineer, reviewer) also see the
candidates with their gates and the lineage of any model version. Changing anything
(proposing, approving, revoking) goes through the API or the CLI, never through a page,
so the pages need no forms besides login and logout.

The model card shown is the one inside the bundle, read only after the bundle verified on
the coordinator; a bundle that fails verification is shown as such, without a download link.
Pages carry no script at all and a strict Content-Security-Policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator import releases
from coordinator.api import SESSION_TTL, checked_login, end_session, user_for_token
from coordinator.audit import append_event
from coordinator.db import SessionDep
from coordinator.login_limits import LoginThrottled
from coordinator.models import Release, ReleaseCandidate, User
from coordinator.settings import Settings
from export.bundle import BundleVerificationError

__all__ = ["COOKIE_NAME", "PORTAL_PREFIX", "router"]

PORTAL_PREFIX: Final = "/portal"
COOKIE_NAME: Final = "fedward_session"
_TEMPLATES: Final = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))
_SECURITY_HEADERS: Final = {
    # No script anywhere; styles inline in the page; images (the SVG curve) from here only.
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix=PORTAL_PREFIX, include_in_schema=False)


def _secure(response: Response) -> Response:
    response.headers.update(_SECURITY_HEADERS)
    return response


def _page(request: Request, name: str, *, user: User | None, status_code: int = 200,
          **context: Any) -> Response:
    response = _TEMPLATES.TemplateResponse(
        request, name, {"user": user, "prefix": PORTAL_PREFIX, **context},
        status_code=status_code)
    return _secure(response)


def _error(request: Request, user: User | None, status_code: int, message: str) -> Response:
    return _page(request, "error.html", user=user, status_code=status_code, message=message)


def _user(request: Request, session: Session) -> User:
    """The logged-in user, or a redirect (303) to the login page that comes back here."""
    token = request.cookies.get(COOKIE_NAME)
    user = user_for_token(session, token) if token else None
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "log in first", headers={
            "Location": f"{PORTAL_PREFIX}/login?next={quote(target, safe='')}"})
    return user


def _home(request: Request) -> Path:
    settings: Settings = request.app.state.settings
    return settings.home


def _safe_next(value: str | None) -> str:
    """Only a path inside the portal: an open redirect would help phishing."""
    if value and value.startswith(PORTAL_PREFIX + "/") and "//" not in value \
            and "\\" not in value:
        return value
    return f"{PORTAL_PREFIX}/releases"


# --- login -------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def index() -> Response:
    """The portal starts at the release list."""
    return _secure(RedirectResponse(f"{PORTAL_PREFIX}/releases", status_code=303))


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    """The login page."""
    return _page(request, "login.html", user=None, next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep,
          name: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=1024)],
          next: Annotated[str, Form()] = "") -> Response:
    """Check the name and password; on success set the session cookie and go on."""
    try:
        _, token, _ = checked_login(request, session, name=name, password=password)
    except LoginThrottled as err:
        response = _page(request, "login.html", user=None, status_code=429,
                         next=_safe_next(next), error=str(err))
        response.headers["Retry-After"] = str(err.retry_after_s)
        return response
    except PermissionError as err:
        session.commit()  # the failed attempt stays in the audit log
        return _page(request, "login.html", user=None, status_code=401,
                     next=_safe_next(next), error=str(err))
    session.commit()
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE_NAME, token, max_age=int(SESSION_TTL.total_seconds()),
                        path=PORTAL_PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return _secure(response)


@router.post("/logout", response_class=HTMLResponse)
def logout(request: Request, session: SessionDep) -> Response:
    """End the session and forget the cookie."""
    token = request.cookies.get(COOKIE_NAME)
    if token:
        end_session(session, token)
        session.commit()
    response = RedirectResponse(f"{PORTAL_PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path=PORTAL_PREFIX)
    return _secure(response)


# --- releases ----------------------------------------------------------------------------


def _visible(session: Session, user: User, release_id: str) -> Release:
    release = releases.find_release(session, release_id)
    if release.revoked_at is not None and user.role == "clinician":
        raise releases.Gone(f"release {release_id} was revoked on "
                            f"{release.revoked_at:%Y-%m-%d}: {release.revoke_reason}. "
                            "Stop using it and delete your copies.")
    return release


@router.get("/releases", response_class=HTMLResponse)
def releases_page(request: Request, session: SessionDep) -> Response:
    """Approved, unrevoked releases (staff also see the revoked ones, marked)."""
    user = _user(request, session)
    current = [releases.release_view(session, r)
               for r in releases.list_releases(session, include_revoked=False)]
    revoked = []
    if user.role in releases.STAFF_ROLES:
        revoked = [releases.release_view(session, r)
                   for r in releases.list_releases(session, include_revoked=True)
                   if r.revoked_at is not None]
    key = releases.release_public_key(_home(request))
    return _page(request, "releases.html", user=user, releases=current, revoked=revoked,
                 fingerprint=key[1] if key else None)


@router.get("/releases/{release_id}", response_class=HTMLResponse)
def release_page(release_id: str, request: Request, session: SessionDep) -> Response:
    """A release: its signed model card, download link, public key and lineage link."""
    user = _user(request, session)
    try:
        release = _visible(session, user, release_id)
    except releases.ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    view = releases.release_view(session, release)
    card: dict[str, Any] | None = None
    problem = None
    try:
        card = dict(releases.verified_bundle(_home(request), release).model_card)
    except releases.ReleaseError as err:
        problem = str(err)
    key = releases.release_public_key(_home(request))
    return _page(request, "release.html", user=user, release=view, card=card,
                 problem=problem, public_key=key[0].decode("ascii") if key else None,
                 fingerprint=key[1] if key else None,
                 lineage_json=json.dumps(card.get("lineage", {}), indent=2) if card else "")


@router.get("/releases/{release_id}/lineage", response_class=HTMLResponse)
def release_lineage(release_id: str, request: Request, session: SessionDep) -> Response:
    """The lineage recorded in a release's signed model card."""
    user = _user(request, session)
    try:
        release = _visible(session, user, release_id)
        card = releases.verified_bundle(_home(request), release).model_card
    except releases.ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    return _page(request, "lineage.html", user=user, title=f"Lineage of release {release_id}",
                 lineage=card.get("lineage", {}), back=f"{PORTAL_PREFIX}/releases/{release_id}",
                 raw=json.dumps(card.get("lineage", {}), indent=2, sort_keys=True))


@router.get("/releases/{release_id}/training_curve.svg")
def training_curve(release_id: str, request: Request, session: SessionDep) -> Response:
    """The training-curve plot from the verified bundle."""
    user = _user(request, session)
    try:
        release = _visible(session, user, release_id)
        verified = releases.verified_bundle(_home(request), release)
        data = verified.read_verified(releases.TRAINING_CURVE_FILE)
    except releases.ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    except BundleVerificationError as err:  # the file changed since it was verified
        return _error(request, user, 500, str(err))
    return _secure(Response(content=data, media_type="image/svg+xml"))


@router.get("/releases/{release_id}/download")
def download(release_id: str, request: Request, session: SessionDep) -> Response:
    """The signed bundle as ``<release-id>.tar.gz``; revoked releases answer 410."""
    user = _user(request, session)
    try:
        release = releases.find_release(session, release_id)
        data = releases.bundle_archive(_home(request), release)
    except releases.ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    append_event(session, actor=user.name, action="release.downloaded",
                 subject=f"release:{release_id}", detail={"via": "portal"})
    session.commit()
    return _secure(Response(content=data, media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="{release_id}.tar.gz"'}))


@router.get("/release-key.pem")
def public_key(request: Request) -> Response:
    """The release public key (PEM), the file ``fedward-verify --public-key`` takes."""
    key = releases.release_public_key(_home(request))
    if key is None:
        return _error(request, None, 404, "No release has been signed yet.")
    return _secure(PlainTextResponse(key[0].decode("ascii"), media_type="application/x-pem-file",
                                     headers={"Content-Disposition":
                                              'attachment; filename="release.pub.pem"'}))


# --- staff pages -------------------------------------------------------------------------


@router.get("/candidates", response_class=HTMLResponse)
def candidates_page(request: Request, session: SessionDep) -> Response:
    """Release candidates and their gates (staff only)."""
    user = _user(request, session)
    if user.role not in releases.STAFF_ROLES:
        return _error(request, user, 403, "Only staff see release candidates; approved "
                      "releases are listed under Releases.")
    rows = session.exec(select(ReleaseCandidate).order_by(col(ReleaseCandidate.id).desc())
                        .limit(200)).all()
    items = [{"c": c, "gates": json.loads(c.gates_json)} for c in rows]
    return _page(request, "candidates.html", user=user, candidates=items)


@router.get("/versions/{run_id}/{round_number}/lineage", response_class=HTMLResponse)
def version_lineage(run_id: int, round_number: int, request: Request,
                    session: SessionDep) -> Response:
    """The lineage of any model version, built now from the database (staff only)."""
    user = _user(request, session)
    if user.role not in releases.STAFF_ROLES:
        return _error(request, user, 403, "Only staff see the lineage of unreleased versions.")
    session.commit()  # build_lineage opens its own transactions
    engine: Engine = request.app.state.engine
    try:
        lineage = releases.build_lineage(engine, home=_home(request), run_id=run_id,
                                         round_number=round_number)
    except releases.ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    return _page(request, "lineage.html", user=user,
                 title=f"Lineage of run {run_id}, round {round_number}", lineage=lineage,
                 back=f"{PORTAL_PREFIX}/candidates",
                 raw=json.dumps(lineage, indent=2, sort_keys=True))
