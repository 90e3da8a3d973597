"""The release portal: server-rendered pages for clinicians and reviewers (``/portal``).

People log in with their name and password; the session token lives in an HttpOnly,
SameSite=Strict cookie scoped to ``/portal``. Every role sees the approved, unrevoked
releases with their signed model cards, a download link, the release public key and its
fingerprint, and each release's lineage. Staff (admin, ML engineer, reviewer) also see the
candidates with their gates, the lineage of any model version, and each candidate's page:
its gate results and a summary of its model card (contributing sites, per-site metrics,
epsilon per site), from which reviewers and admins approve or reject it with a reason, under
the same rules as the API (never their own proposal, only a candidate whose gates passed).
Proposing and revoking go through the API or the CLI.

Every form that changes something carries a per-session CSRF token: an HMAC of the session
token (which never leaves its HttpOnly cookie), so it needs no storage, changes at every
login and tells nothing about the session token. A form without the right token is refused,
on top of the cookie's SameSite=Strict.

The model card shown is the one inside the bundle, read only after the bundle verified on
the coordinator; a bundle that fails verification is shown as such, without a download link.
Pages carry no script at all and a strict Content-Security-Policy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator import release_gates, release_store, releases
from coordinator.audit import append_event
from coordinator.auth import SESSION_TTL, checked_login, end_session, user_for_token
from coordinator.db import SessionDep
from coordinator.login_limits import LoginThrottled
from coordinator.model_card import TRAINING_CURVE_FILE
from coordinator.models import Project, Release, ReleaseCandidate, Run, User
from coordinator.release_errors import Gone, ReleaseError
from coordinator.release_lineage import build_lineage
from coordinator.settings import Settings
from export.bundle_format import BundleVerificationError
from fedward.roles import REVIEW_ROLES, STAFF_ROLES, Permission, may

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

_CSRF_CONTEXT: Final = b"fedward-portal-csrf-v1"
_REASON_MIN, _REASON_MAX = 3, 2000   # as the API's DecisionRequest

router = APIRouter(prefix=PORTAL_PREFIX, include_in_schema=False)


def csrf_token(session_token: str) -> str:
    """The CSRF token of a portal session: HMAC-SHA256 of a fixed label under its token.

    Args:
        session_token: The session token from the portal's cookie.

    Returns:
        Hex digest to put in the session's forms.
    """
    return hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def _csrf_ok(request: Request, presented: str) -> bool:
    token = request.cookies.get(COOKIE_NAME)
    return bool(token) and hmac.compare_digest(csrf_token(str(token)), presented)


def _secure(response: Response) -> Response:
    response.headers.update(_SECURITY_HEADERS)
    return response


def _page(request: Request, name: str, *, user: User | None, status_code: int = 200,
          **context: Any) -> Response:
    token = request.cookies.get(COOKIE_NAME)
    csrf = csrf_token(token) if user is not None and token else ""
    response = _TEMPLATES.TemplateResponse(
        request, name, {"user": user, "prefix": PORTAL_PREFIX, "csrf": csrf, **context},
        status_code=status_code)
    return _secure(response)


def _error(request: Request, user: User | None, status_code: int, message: str) -> Response:
    return _page(request, "error.html", user=user, status_code=status_code, message=message)


def _user(request: Request, session: Session, *, back: str | None = None) -> User:
    """The logged-in user, or a redirect (303) to the login page that comes back here (or to
    ``back``: a form's page, not the address it posts to)."""
    token = request.cookies.get(COOKIE_NAME)
    user = user_for_token(session, token) if token else None
    if user is None:
        target = back or (request.url.path
                          + (f"?{request.url.query}" if request.url.query else ""))
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
    release = release_store.find_release(session, release_id)
    if release.revoked_at is not None and not may(user.role, Permission.STAFF):
        raise Gone(f"release {release_id} was revoked on "
                   f"{release.revoked_at:%Y-%m-%d}: {release.revoke_reason}. "
                   "Stop using it and delete your copies.")
    return release


@router.get("/releases", response_class=HTMLResponse)
def releases_page(request: Request, session: SessionDep) -> Response:
    """Approved, unrevoked releases (staff also see the revoked ones, marked)."""
    user = _user(request, session)
    current = [release_store.release_view(session, r)
               for r in release_store.list_releases(session, include_revoked=False)]
    revoked = []
    if user.role in STAFF_ROLES:
        revoked = [release_store.release_view(session, r)
                   for r in release_store.list_releases(session, include_revoked=True)
                   if r.revoked_at is not None]
    key = release_store.release_public_key(_home(request))
    return _page(request, "releases.html", user=user, releases=current, revoked=revoked,
                 fingerprint=key[1] if key else None)


@router.get("/releases/{release_id}", response_class=HTMLResponse)
def release_page(release_id: str, request: Request, session: SessionDep) -> Response:
    """A release: its signed model card, download link, public key and lineage link."""
    user = _user(request, session)
    try:
        release = _visible(session, user, release_id)
    except ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    view = release_store.release_view(session, release)
    card: dict[str, Any] | None = None
    problem = None
    try:
        card = dict(release_store.verified_bundle(_home(request), release).model_card)
    except ReleaseError as err:
        problem = str(err)
    key = release_store.release_public_key(_home(request))
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
        card = release_store.verified_bundle(_home(request), release).model_card
    except ReleaseError as err:
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
        verified = release_store.verified_bundle(_home(request), release)
        data = verified.read_verified(TRAINING_CURVE_FILE)
    except ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    except BundleVerificationError as err:  # the file changed since it was verified
        return _error(request, user, 500, str(err))
    return _secure(Response(content=data, media_type="image/svg+xml"))


@router.get("/releases/{release_id}/download")
def download(release_id: str, request: Request, session: SessionDep) -> Response:
    """The signed bundle as ``<release-id>.tar.gz``; revoked releases answer 410."""
    user = _user(request, session)
    try:
        release = release_store.find_release(session, release_id)
        data = release_store.bundle_archive(_home(request), release)
    except ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    append_event(session, actor=user.name, action="release.downloaded",
                 subject=f"release:{release_id}", detail={"via": "portal"})
    session.commit()
    return _secure(Response(content=data, media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="{release_id}.tar.gz"'}))


@router.get("/release-key.pem")
def public_key(request: Request) -> Response:
    """The release public key (PEM), the file ``fedward-verify --public-key`` takes."""
    key = release_store.release_public_key(_home(request))
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
    if user.role not in STAFF_ROLES:
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
    if user.role not in STAFF_ROLES:
        return _error(request, user, 403, "Only staff see the lineage of unreleased versions.")
    session.commit()  # build_lineage opens its own transactions
    engine: Engine = request.app.state.engine
    try:
        lineage = build_lineage(engine, home=_home(request), run_id=run_id,
                                round_number=round_number)
    except ReleaseError as err:
        return _error(request, user, err.status_code, str(err))
    return _page(request, "lineage.html", user=user,
                 title=f"Lineage of run {run_id}, round {round_number}", lineage=lineage,
                 back=f"{PORTAL_PREFIX}/candidates",
                 raw=json.dumps(lineage, indent=2, sort_keys=True))


# --- a candidate and its review ----------------------------------------------------------


def _candidate_view(session: Session, cand: ReleaseCandidate) -> dict[str, Any]:
    """What a reviewer decides on: the gates and a summary of the model card to be."""
    run = session.get(Run, cand.run_id)
    assert run is not None  # foreign key
    project = session.get(Project, run.project_id)
    assert project is not None  # foreign key
    gates: list[dict[str, Any]] = json.loads(cand.gates_json)
    lineage: dict[str, Any] = json.loads(cand.lineage_json)
    by_name = {g["name"]: g for g in gates}
    participation = by_name.get(release_gates.PARTICIPATION_GATE, {}).get("figures") or {}
    evaluation = lineage.get("evaluation") or {}
    privacy = lineage.get("privacy") or {}
    parity = (by_name.get("export_parity", {}).get("figures") or {}).get("per_site") or {}
    rounds = participation.get("per_site") or {}
    metrics = evaluation.get("per_site") or {}
    epsilon = privacy.get("per_site") or {}
    sites = sorted(set(rounds) | set(metrics) | set(epsilon))
    release = session.exec(select(Release).where(Release.candidate_id == cand.id)).first()
    return {
        "c": cand, "project": project.name, "task": run.task, "gates": gates,
        "running_gate": release_gates.running_gate(cand.status, gates),
        "release_id": release.release_id if release else None,
        "participation": participation,
        "sites": [{"name": s, "rounds": rounds.get(s), "metrics": metrics.get(s, {}),
                   "epsilon": epsilon.get(s, {}).get("epsilon_spent"),
                   "counted": s in participation.get("contributing", [])} for s in sites],
        "evaluation_source": evaluation.get("source"),
        "privacy": privacy,
        "parity": parity,
    }


def _not_a_reviewer(user: User) -> str:
    return (f"Only reviewers and admins approve or reject candidates; you are "
            f"{user.role.replace('_', ' ')}.")


def _review_state(user: User, cand: ReleaseCandidate) -> tuple[bool, bool, str | None]:
    """(may approve, may reject, why not) for this user and candidate, as the API rules."""
    if user.role not in REVIEW_ROLES:
        return False, False, _not_a_reviewer(user)
    if cand.proposed_by == user.name:
        return False, False, ("You proposed this candidate: a second person (a reviewer or "
                              "another admin) must approve or reject it.")
    approve = cand.status == "awaiting_review"
    reject = cand.status in {"awaiting_review", "gates_failed"}
    if cand.status == "gates_failed":
        return False, True, "It failed its gates, so it cannot be approved; you may reject it."
    return approve, reject, None


def _candidate_page(request: Request, session: Session, user: User, candidate_id: int, *,
                    status_code: int = 200, error: str | None = None,
                    reason: str = "") -> Response:
    cand = session.get(ReleaseCandidate, candidate_id, populate_existing=True)
    if cand is None:
        return _error(request, user, 404, f"Candidate {candidate_id} not found.")
    may_approve, may_reject, why_not = _review_state(user, cand)
    return _page(request, "candidate.html", user=user, status_code=status_code,
                 item=_candidate_view(session, cand), may_approve=may_approve,
                 may_reject=may_reject, why_not=why_not, error=error, reason=reason)


@router.get("/candidates/{candidate_id}", response_class=HTMLResponse)
def candidate_page(candidate_id: int, request: Request, session: SessionDep) -> Response:
    """A candidate: its gates, its model card summary and, for reviewers, the decision."""
    user = _user(request, session)
    if user.role not in STAFF_ROLES:
        return _error(request, user, 403, "Only staff see release candidates; approved "
                      "releases are listed under Releases.")
    return _candidate_page(request, session, user, candidate_id)


def _decide(request: Request, session: Session, candidate_id: int, verb: str, reason: str,
            csrf: str) -> Response:
    page = f"{PORTAL_PREFIX}/candidates/{candidate_id}"
    user = _user(request, session, back=page)
    if user.role not in STAFF_ROLES:
        return _error(request, user, 403, "Only staff see release candidates.")
    if not _csrf_ok(request, csrf):
        return _candidate_page(request, session, user, candidate_id, status_code=403, error=(
            "This form did not come from your current portal session (perhaps you logged in "
            "again since). Nothing was changed: check the candidate below and decide again."))
    if user.role not in REVIEW_ROLES:
        return _candidate_page(request, session, user, candidate_id, status_code=403,
                               error=_not_a_reviewer(user))
    reason = reason.strip()
    if not _REASON_MIN <= len(reason) <= _REASON_MAX:
        return _candidate_page(
            request, session, user, candidate_id, status_code=422, reason=reason,
            error=f"Give a reason to {verb} ({_REASON_MIN} to {_REASON_MAX} characters): it "
                  "goes into the audit log and, on approval, the model card.")
    try:
        if verb == "approve":
            session.commit()  # approving signs and writes files: no transaction held
            engine: Engine = request.app.state.engine
            release = releases.approve_candidate(engine, home=_home(request),
                                                 candidate_id=candidate_id, user=user,
                                                 reason=reason)
            target = f"{PORTAL_PREFIX}/releases/{quote(release.release_id, safe='')}"
        else:
            releases.reject_candidate(session, candidate_id=candidate_id, user=user,
                                      reason=reason)
            session.commit()
            target = page
    except ReleaseError as err:
        session.rollback()
        message = str(err)
        return _candidate_page(request, session, user, candidate_id,
                               status_code=err.status_code, reason=reason,
                               error=message[:1].upper() + message[1:] + ".")
    return _secure(RedirectResponse(target, status_code=303))


@router.post("/candidates/{candidate_id}/approve", response_class=HTMLResponse)
def approve(candidate_id: int, request: Request, session: SessionDep,
            reason: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = "") -> Response:
    """Approve a candidate (reviewers and admins, not their own): sign and publish it."""
    return _decide(request, session, candidate_id, "approve", reason, csrf)


@router.post("/candidates/{candidate_id}/reject", response_class=HTMLResponse)
def reject(candidate_id: int, request: Request, session: SessionDep,
           reason: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = "") -> Response:
    """Reject a candidate with a reason (reviewers and admins, not their own)."""
    return _decide(request, session, candidate_id, "reject", reason, csrf)
