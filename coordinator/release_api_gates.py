"""A project's release gate thresholds: ``GET``, ``PUT`` and ``PATCH
/projects/{name}/gates`` (staff read them; reviewers and admins set them)."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator import release_gates
from coordinator.api_errors import RESPONSES_404
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.release_api_common import AUTH, refusals
from coordinator.release_schemas import GatesPublic, GatesUpdate
from fedward.roles import GATE_ROLES, STAFF_ROLES

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX)


def _gates_public(project: str, thresholds: dict[str, int | float]) -> GatesPublic:
    return GatesPublic(project=project, thresholds=thresholds,
                       defaults={"min_sites": release_gates.DEFAULT_MIN_SITES,
                                 "min_round_share": release_gates.DEFAULT_MIN_ROUND_SHARE},
                       help=dict(release_gates.THRESHOLD_HELP))


@router.get("/projects/{name}/gates", tags=["releases"], responses={**AUTH, **RESPONSES_404})
def get_gates(name: str, session: SessionDep, user: CurrentUser) -> GatesPublic:
    """A project's release gate thresholds: those set and the defaults for the rest."""
    require_role(user, STAFF_ROLES)
    with refusals():
        return _gates_public(name, release_gates.get_gates(session, name))


@router.put("/projects/{name}/gates", tags=["releases"], responses={**AUTH, **RESPONSES_404})
def put_gates(name: str, body: GatesUpdate, session: SessionDep,
              user: CurrentUser) -> GatesPublic:
    """Replace all of a project's gate thresholds (reviewers and admins); an omitted one is
    unset (its default applies)."""
    require_role(user, GATE_ROLES)
    with refusals():
        thresholds = release_gates.set_gates(session, project_name=name,
                                             thresholds=body.model_dump(), actor=user.name)
    session.commit()
    return _gates_public(name, thresholds)


@router.patch("/projects/{name}/gates", tags=["releases"], responses={**AUTH, **RESPONSES_404})
def patch_gates(name: str, body: GatesUpdate, session: SessionDep,
                user: CurrentUser) -> GatesPublic:
    """Change only the thresholds named in the body (reviewers and admins); ``null`` unsets
    one (its default applies again), an omitted one stays as it is."""
    require_role(user, GATE_ROLES)
    with refusals():
        thresholds = release_gates.set_gates(
            session, project_name=name, actor=user.name,
            thresholds=body.model_dump(include=body.model_fields_set), merge=True)
    session.commit()
    return _gates_public(name, thresholds)
