"""Cancelling a run from the portal (``/portal/runs/{id}/cancel``).

A pending or running run's page offers admins and ML engineers (the roles the API lets
cancel, :data:`fedward.roles.WRITE_ROLES`) a button that opens the cancel page: the run, a
required reason and the form's per-session CSRF token. The form lives on a page of its own
because the run's page reloads itself while the run is live, which would wipe a reason half
typed. Posting the form records the request exactly as ``POST /api/v1/runs/{id}/cancel``
does (:func:`coordinator.run_control.request_cancel`: the same audit entry, the same
refusals) and goes back to the run's page, which then shows who cancelled it and why while
the round loop ends it. A finished run has no button; a form posted for one anyway is
answered 409 with the API's sentence, and nothing changes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import Session

from coordinator.db import SessionDep
from coordinator.models import Project, Run, User

# The portal's own page helpers: these pages share its session, layout and error page.
from coordinator.portal import PORTAL_PREFIX, _csrf_ok, _error, _page, _secure, _user
from coordinator.portal_dashboard import BadQuery, _bad, _run_id
from coordinator.run_control import (
    CANCEL_REASON_MAX,
    RunFinishedError,
    check_cancellable,
    request_cancel,
)
from fedward.roles import Permission, may

__all__ = ["router"]

router = APIRouter(prefix=PORTAL_PREFIX, include_in_schema=False)

_NOT_ALLOWED = ("Only admins and ML engineers cancel runs (as through the API); you are "
                "{role}. Ask one of them, or the run's launcher ({launcher}).")


def _cancel_page(request: Request, session: Session, user: User, run: Run, *,
                 status_code: int = 200, error: str | None = None,
                 reason: str = "") -> Response:
    project = session.get(Project, run.project_id)
    assert project is not None  # foreign key
    return _page(request, "cancel.html", user=user, status_code=status_code, run=run,
                 project=project.name, error=error, reason=reason,
                 reason_max=CANCEL_REASON_MAX)


def _checked(request: Request, session: Session, raw: str, *,
             back: str | None = None) -> tuple[User, Run] | Response:
    """The user and the run, or the page that says why this user cannot cancel it."""
    user = _user(request, session, back=back)
    if not may(user.role, Permission.STAFF):
        return _error(request, user, 403, "Only staff (admins, ML engineers, reviewers) see "
                      "runs; approved releases are listed under Releases.")
    try:
        number = _run_id(raw)
    except BadQuery as err:
        return _bad(request, user, err, f"{PORTAL_PREFIX}/runs")
    run = session.get(Run, number, populate_existing=True)
    if run is None:
        return _error(request, user, 404, f"Run {number} not found; the list of runs is "
                      f"under {PORTAL_PREFIX}/runs.")
    if not may(user.role, Permission.WRITE):
        return _error(request, user, 403, _NOT_ALLOWED.format(
            role=user.role.replace("_", " "), launcher=run.launched_by))
    return user, run


def _finished(request: Request, user: User, run: Run) -> Response | None:
    """The 409 page for a run that has ended (the API's sentence), else None."""
    try:
        check_cancellable(run)
    except RunFinishedError as err:
        message = str(err)
        return _error(request, user, 409, f"{message[:1].upper()}{message[1:]}.")
    return None


@router.get("/runs/{run_id}/cancel", response_class=HTMLResponse)
def cancel_form(run_id: str, request: Request, session: SessionDep) -> Response:
    """The cancel form of a pending or running run (admins and ML engineers)."""
    checked = _checked(request, session, run_id)
    if isinstance(checked, Response):
        return checked
    user, run = checked
    return _finished(request, user, run) or _cancel_page(request, session, user, run)


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
def cancel(run_id: str, request: Request, session: SessionDep,
           reason: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = "") -> Response:
    """Ask for a run to be cancelled, with a reason; back to the run's page."""
    page = f"{PORTAL_PREFIX}/runs/{run_id}"
    checked = _checked(request, session, run_id, back=page)
    if isinstance(checked, Response):
        return checked
    user, run = checked
    if not _csrf_ok(request, csrf):
        return _cancel_page(request, session, user, run, status_code=403, reason=reason, error=(
            "This form did not come from your current portal session (perhaps you logged in "
            "again since). Nothing was changed: check the run and cancel it again."))
    finished = _finished(request, user, run)
    if finished is not None:
        return finished
    reason = reason.strip()
    if not 1 <= len(reason) <= CANCEL_REASON_MAX:
        return _cancel_page(
            request, session, user, run, status_code=422, reason=reason[:CANCEL_REASON_MAX],
            error=f"Give a reason for cancelling (1 to {CANCEL_REASON_MAX} characters): it "
                  "goes into the audit logs of the coordinator and of every site.")
    request_cancel(session, run, actor=user.name, reason=reason)  # checked just above
    session.commit()
    return _secure(RedirectResponse(page, status_code=303))
