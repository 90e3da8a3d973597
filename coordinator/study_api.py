"""REST routes of the study registry: register, list, show (``/api/v1/studies``).

Mounted by :func:`coordinator.api.create_app`; the routes authenticate through
:mod:`coordinator.auth`, as every route of the API does. Registering needs a role that may
launch runs; reading, any signed-in user.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from coordinator.api_errors import RESPONSES_401, RESPONSES_403
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.study_registry import (
    StudyNotFoundError,
    get_study,
    list_studies,
    register_study,
    study_public,
)
from fedward.roles import WRITE_ROLES
from fedward.study import StudyError, parse_spec, spec_from_text

__all__ = ["StudyRegister", "make_router"]

# A spec of 4,096 features with long descriptions stays well under this.
MAX_SPEC_TEXT: int = 2_000_000


class StudyRegister(BaseModel):
    """Body of ``POST /studies``: the spec as a JSON object, or its YAML/JSON text."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | None = Field(default=None, description="The spec as an object.")
    text: str | None = Field(default=None, max_length=MAX_SPEC_TEXT,
                             description="The spec file's text (YAML or JSON).")
    source: str = Field(default="study spec", max_length=200,
                        description="The file name, quoted in error messages.")


def _problems_error(err: StudyError) -> RequestValidationError:
    """Every problem of a spec as one 422, each under ``spec.<path>``."""
    errors = []
    for problem in err.problems:
        path, _, msg = problem.partition(": ")
        loc = ["body", "spec", *[p for p in path.split(".") if p and not p.startswith("(")]]
        errors.append({"type": "value_error", "loc": tuple(loc), "msg": msg or problem})
    return RequestValidationError(errors)


def make_router() -> APIRouter:
    """The study routes, under the API's prefix."""
    router = APIRouter(prefix=API_PREFIX, tags=["studies"])
    responses = {**RESPONSES_401, **RESPONSES_403}

    @router.post("/studies", status_code=201, responses={
        **responses, 200: {"description": "Identical content was registered already"},
        422: {"description": "Every problem of the spec, each with its path"}})
    def register(body: StudyRegister, session: SessionDep, user: CurrentUser) -> JSONResponse:
        """Validate a study spec and register it (201), or return the version that already
        holds identical content (200). A changed spec gets its name's next version."""
        require_role(user, WRITE_ROLES)
        if (body.spec is None) == (body.text is None):
            raise RequestValidationError([{
                "type": "value_error", "loc": ("body", "spec"),
                "msg": "send the spec as an object (spec) or as its file's text (text)"}])
        try:
            spec = (parse_spec(body.spec, source=body.source) if body.spec is not None
                    else spec_from_text(body.text or "", source=body.source))
        except StudyError as err:
            raise _problems_error(err) from None
        outcome = register_study(session, spec, actor=user.name)
        return JSONResponse(
            status_code=status.HTTP_201_CREATED if outcome.created else status.HTTP_200_OK,
            content={**study_public(outcome.study), "created": outcome.created})

    @router.get("/studies", responses=responses)
    def studies(session: SessionDep, _user: CurrentUser) -> list[dict[str, Any]]:
        """Every version of every registered study."""
        return [study_public(s) for s in list_studies(session)]

    @router.get("/studies/{ref}", responses={**responses, 404: {"description": "No such "
                                                                "study or version"}})
    def show(ref: str, session: SessionDep, _user: CurrentUser) -> dict[str, Any]:
        """One version with its spec: ``NAME@VERSION``, or ``NAME`` for the newest."""
        try:
            return study_public(get_study(session, ref), with_spec=True)
        except ValueError as err:  # FastAPI's own 422 shape, as the API's other refusals
            raise RequestValidationError([{"type": "value_error", "loc": ("path", "ref"),
                                           "msg": str(err)}]) from None
        except StudyNotFoundError as err:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None

    return router
