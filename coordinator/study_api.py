"""REST routes of the study registry: register, list, show, retire (``/api/v1/studies``).

Mounted by :func:`coordinator.api.create_app`; the routes authenticate through
:mod:`coordinator.auth`, as every route of the API does. Registering and retiring need a
role that may launch runs; reading, any signed-in user. Every view of a version carries
``retired`` (who, when, why and the version to use instead; null while in use).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session

from coordinator.api_errors import RESPONSES_401, RESPONSES_403
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import Study
from coordinator.schemas import RequestBody
from coordinator.study_registry import (
    StudyNotFoundError,
    get_study,
    list_studies,
    register_study,
    retire_study,
    retired_view,
    study_public,
)
from coordinator.study_retirement import RETIRE_REASON_MAX, StudyAlreadyRetiredError
from fedward.roles import WRITE_ROLES
from fedward.study import StudyError, parse_spec, parse_study_ref, spec_from_text

__all__ = ["StudyRegister", "StudyRetire", "make_router"]

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


class StudyRetire(RequestBody):
    """Body of ``POST /studies/{NAME@VERSION}/retire``."""

    reason: str = Field(min_length=1, max_length=RETIRE_REASON_MAX,
                        description="Why no new run may use this version (shown to whoever "
                                    "launches it, and kept in the audit log).")

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give the reason for retiring the version (not only spaces)")
        return value.strip()


def _ref_error(msg: str) -> RequestValidationError:
    """A malformed study reference: FastAPI's own 422 shape, as the API's other refusals."""
    return RequestValidationError([{"type": "value_error", "loc": ("path", "ref"),
                                     "msg": msg}])


def _version(session: Session, ref: str, *, exact: bool = False) -> Study:
    """The version ``ref`` names (``NAME`` alone: the newest, unless ``exact``).

    Raises:
        RequestValidationError: a malformed reference, or ``NAME`` alone where ``exact``.
        HTTPException: 404, no such study or version (the message lists what there is).
    """
    try:
        name, version = parse_study_ref(ref)
        if exact and version is None:
            have = [s.version for s in list_studies(session) if s.name == name]
            listed = f" (versions of {name}: {', '.join(map(str, have))})" if have else ""
            raise ValueError(f"name the version, as NAME@VERSION (e.g. {name}@"
                             f"{have[-1] if have else 1}){listed}: a study name alone "
                             "never retires its newest version")
        return get_study(session, ref)
    except StudyNotFoundError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    except ValueError as err:
        raise _ref_error(str(err)) from None


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
        view = study_public(outcome.study, retired=retired_view(session, outcome.study))
        return JSONResponse(
            status_code=status.HTTP_201_CREATED if outcome.created else status.HTTP_200_OK,
            content={**view, "created": outcome.created})

    @router.get("/studies", responses=responses)
    def studies(session: SessionDep, _user: CurrentUser) -> list[dict[str, Any]]:
        """Every version of every registered study, retired ones included (marked)."""
        return [study_public(s, retired=retired_view(session, s))
                for s in list_studies(session)]

    @router.get("/studies/{ref}", responses={**responses, 404: {"description": "No such "
                                                                "study or version"}})
    def show(ref: str, session: SessionDep, _user: CurrentUser) -> dict[str, Any]:
        """One version with its spec: ``NAME@VERSION``, or ``NAME`` for the newest."""
        study = _version(session, ref)
        return study_public(study, with_spec=True, retired=retired_view(session, study))

    @router.post("/studies/{ref}/retire", responses={
        **responses, 404: {"description": "No such study or version"},
        409: {"description": "The version was retired already (by whom, when and why)"},
        422: {"description": "No version named (NAME alone), or no reason given"}})
    def retire(ref: str, body: StudyRetire, session: SessionDep, user: CurrentUser
               ) -> dict[str, Any]:
        """Retire one version, ``NAME@VERSION`` (never ``NAME`` alone): no new run may use
        it. It stays registered and listed, with who retired it, when and why; its runs,
        a run going on included, and their releases are untouched."""
        require_role(user, WRITE_ROLES)
        study = _version(session, ref, exact=True)
        try:
            study = retire_study(session, study, actor=user.name, reason=body.reason)
        except StudyAlreadyRetiredError as err:
            raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
        return study_public(study, retired=retired_view(session, study))

    return router
