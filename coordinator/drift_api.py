"""``GET /api/v1/drift``: the drift reports sites sent, newest first (staff only).

Filters by site and release, a page at a time (``limit``, ``offset``). A filter that names
no site or release this coordinator knows is a 422 that says so (never an empty page that
looks like "no drift"). Each report in alarm carries the proposed retraining command
(:func:`coordinator.drift.retraining_command`). Mounted by :func:`coordinator.api.create_app`,
which passes its authentication dependency and role check in.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from coordinator.api_errors import RESPONSES_401
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.drift import (
    known_release,
    known_site,
    list_reports,
    report_public,
    retraining_command,
)
from fedward.roles import STAFF_ROLES

__all__ = ["make_router"]

_FILTER_MAX = 128


def make_router() -> APIRouter:
    """The drift route, under the API's prefix; it authenticates through
    :mod:`coordinator.auth`, as every route of the API does."""
    router = APIRouter(prefix=API_PREFIX, tags=["drift"])

    @router.get("/drift", responses={
        **RESPONSES_401, 403: {"description": "Only staff read drift reports"},
        422: {"description": "A bad page, or a filter that names no site or release"}})
    def list_drift(
        session: SessionDep,
        user: CurrentUser,
        site: Annotated[str | None, Query(max_length=_FILTER_MAX)] = None,
        release: Annotated[str | None, Query(max_length=_FILTER_MAX)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    ) -> dict[str, Any]:
        """Drift reports, newest first: per site and release, the scores of each check
        (PSI and two-sample test per feature, accuracy, AUC), failed checks
        (``drift-check-failed`` with the kind), the alarm and a retraining proposal."""
        require_role(user, STAFF_ROLES)
        errors = []
        if site is not None and not known_site(session, site):
            errors.append({"type": "value_error", "loc": ("query", "site"),
                           "msg": f"no site named {site!r}; `fedward-coordinator sites` "
                                  "lists them"})
        if release is not None and not known_release(session, release):
            errors.append({"type": "value_error", "loc": ("query", "release"),
                           "msg": f"no release {release!r}; `fedward-coordinator release "
                                  "list` lists them"})
        if errors:
            raise RequestValidationError(errors)
        rows, total = list_reports(session, site=site, release=release, offset=offset,
                                   limit=limit)
        commands: dict[str, str | None] = {}
        items = []
        for row in rows:
            item = report_public(row)
            if row.alarm:
                if row.release_id not in commands:
                    commands[row.release_id] = retraining_command(session, row.release_id)
                item["retrain"] = commands[row.release_id]
            items.append(item)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    return router
