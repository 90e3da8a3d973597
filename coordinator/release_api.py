"""REST routes of the release workflow (mounted under ``/api/v1`` by ``create_app``).

Model versions and their lineage, project gates, release candidates and their review,
releases, their bundles and revocation, the release public key and the revocation list.
The workflow itself is :mod:`coordinator.releases`; these routes check roles, parse
bodies and map its refusals to HTTP statuses (403 not allowed for this object, 404, 409
wrong state, 410 revoked, 422 bad value, 500 a stored bundle that fails its checks).

Roles (the full matrix is in docs/ml-team-guide.md): ML engineers and admins propose;
reviewers and admins approve or reject, never their own proposal; reviewers and admins set
a project's gates; only admins revoke; clinicians see approved, unrevoked releases and
nothing else of the workflow. The public key and the revocation list need no token.

Long steps (exports and the sites' parity measurement on ``POST /candidates``, signing on
``approve``) run after the request's own transaction has been committed, so the database
is never held while they run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator import release_gates, releases
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import Checkpoint, Project, Release, ReleaseCandidate, Run
from coordinator.schemas import _Request
from coordinator.settings import Settings
from fedward.roles import (
    ALL_ROLES,
    GATE_ROLES,
    PROPOSE_ROLES,
    REVIEW_ROLES,
    REVOKE_ROLES,
    STAFF_ROLES,
    Permission,
    may,
)

__all__ = [
    "CandidateCreate",
    "CandidatePublic",
    "DecisionRequest",
    "GateResult",
    "GatesUpdate",
    "PublicKeyPublic",
    "ReleasePublic",
    "VersionPublic",
    "router",
]

log = logging.getLogger(__name__)
ARCHIVE_MEDIA_TYPE: Final = "application/gzip"

router = APIRouter(prefix=API_PREFIX)
_Responses = dict[int | str, dict[str, Any]]
_AUTH: _Responses = {401: {"description": "Missing or unknown token"},
                     403: {"description": "The user's role may not do this"}}
_404: _Responses = {404: {"description": "No such object"}}
_409: _Responses = {409: {"description": "The object's state does not allow this"}}


@contextmanager
def _refusals() -> Iterator[None]:
    """Turn the workflow's refusals into HTTP errors that carry the reason."""
    try:
        yield
    except releases.ReleaseError as err:
        raise HTTPException(err.status_code, str(err)) from None


def _home(request: Request) -> Path:
    settings: Settings = request.app.state.settings
    return settings.home


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


# --- bodies ------------------------------------------------------------------------------




class CandidateCreate(_Request):
    """Body of ``POST /candidates``: which version, for what."""

    run_id: int = Field(ge=1)
    round: int | None = Field(default=None, ge=1,
                              description="The checkpoint's round; default the run's last.")
    intended_use: str = Field(min_length=10, max_length=4000,
                              description="What the model is for and what not; shown to "
                                          "clinicians on the model card.")


class DecisionRequest(_Request):
    """Why a candidate is approved or rejected, or a release revoked (kept in the audit log)."""

    reason: str = Field(min_length=3, max_length=2000)


class GatesUpdate(_Request):
    """Body of ``PUT /projects/{name}/gates`` (omitted or null: not set, the default
    applies) and ``PATCH`` (omitted: unchanged; null: back to the default)."""

    min_site_auc: float | None = Field(default=None, ge=0, le=1)
    min_site_accuracy: float | None = Field(default=None, ge=0, le=1)
    min_sites: int | None = Field(default=None, ge=1, le=10_000, description=(
        "Sites that must have contributed; default 2, or every site of the run if fewer."))
    min_round_share: float | None = Field(default=None, gt=0, le=1, description=(
        "Share of the completed rounds a site must have trained in to count; default 0.5."))


class GatesPublic(BaseModel):
    """A project's gate thresholds: those set, and the defaults that apply to the rest."""

    project: str
    thresholds: dict[str, int | float] = Field(description="The thresholds set for the "
                                               "project (empty: none set).")
    defaults: dict[str, int | float] = Field(description=(
        "What applies where a participation threshold is not set (min_sites is capped at "
        "the run's number of sites); an unset metric minimum is not checked."))
    help: dict[str, str] = Field(description="What each threshold means.")


class GateResult(BaseModel):
    """One automated gate's outcome, with the figures it judged."""

    name: str
    passed: bool
    reason: str
    figures: Any


class CandidatePublic(BaseModel):
    """A release candidate and its recorded gates."""

    id: int
    run_id: int
    project: str
    task: str
    round: int
    checkpoint_sha256: str
    intended_use: str
    status: str
    proposed_by: str
    created_at: datetime
    gates: list[GateResult]
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str | None
    release_id: str | None
    running_gate: str | None = Field(description="While ``evaluating``: the gate being "
                                     "evaluated now (the finished ones are in ``gates``).")


class ReleasePublic(BaseModel):
    """A release; its model card is inside the signed bundle."""

    release_id: str
    project: str
    task: str
    run_id: int
    round: int
    candidate_id: int
    intended_use: str
    proposed_by: str
    approved_by: str | None
    approval_reason: str | None
    created_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None
    key_fingerprint: str
    bundle_url: str


class VersionPublic(BaseModel):
    """A model version: one checkpoint of a run, and what became of it."""

    run_id: int
    project: str
    task: str
    round: int
    checkpoint_sha256: str
    created_at: datetime
    candidate_ids: list[int]
    release_ids: list[str]
    lineage_url: str


class PublicKeyPublic(BaseModel):
    """The release public key: compare the fingerprint through a second channel."""

    public_key_pem: str
    fingerprint: str
    algorithm: str = "ECDSA P-256 (OpenSSF model-signing, key mode)"


# --- helpers -----------------------------------------------------------------------------


def _candidate_public(session: Session, cand: ReleaseCandidate) -> CandidatePublic:
    run = session.get(Run, cand.run_id)
    assert run is not None and cand.id is not None
    project = session.get(Project, run.project_id)
    assert project is not None
    release = session.exec(select(Release.release_id)
                           .where(Release.candidate_id == cand.id)).first()
    return CandidatePublic(
        id=cand.id, run_id=cand.run_id, project=project.name, task=run.task,
        round=cand.round_number, checkpoint_sha256=cand.checkpoint_sha256,
        intended_use=cand.intended_use, status=cand.status, proposed_by=cand.proposed_by,
        created_at=cand.created_at, gates=[GateResult(**g) for g in json.loads(cand.gates_json)],
        decided_by=cand.decided_by, decided_at=cand.decided_at,
        decision_reason=cand.decision_reason, release_id=release,
        running_gate=release_gates.running_gate(cand.status, json.loads(cand.gates_json)),
    )


def _release_public(session: Session, release: Release) -> ReleasePublic:
    view = releases.release_view(session, release)
    return ReleasePublic(**view, bundle_url=f"{API_PREFIX}/releases/{release.release_id}/bundle")


def _visible_release(session: Session, release_id: str, role: str) -> Release:
    release = releases.find_release(session, release_id)
    if not may(role, Permission.STAFF) and release.revoked_at is not None:
        raise releases.Gone(f"release {release_id} was revoked: {release.revoke_reason}")
    return release


# --- versions and lineage ----------------------------------------------------------------


@router.get("/versions", tags=["releases"], responses=_AUTH)
def list_versions(
    session: SessionDep, user: CurrentUser,
    run_id: Annotated[int | None, Query(description="Only this run's versions.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[VersionPublic]:
    """Model versions (run checkpoints), newest first, with their candidates and releases."""
    require_role(user, STAFF_ROLES)
    query = (select(Checkpoint, Run, Project)
             .join(Run, col(Run.id) == col(Checkpoint.run_id))
             .join(Project, col(Project.id) == col(Run.project_id)))
    if run_id is not None:
        query = query.where(Checkpoint.run_id == run_id)
    rows = session.exec(query.order_by(col(Checkpoint.run_id).desc(),
                                       col(Checkpoint.round_number).desc()).limit(limit)).all()
    out = []
    for ckpt, run, project in rows:
        cands = session.exec(select(ReleaseCandidate.id, Release.release_id)
                             .join(Release, col(Release.candidate_id) == col(ReleaseCandidate.id),
                                   isouter=True)
                             .where(ReleaseCandidate.run_id == ckpt.run_id,
                                    ReleaseCandidate.round_number == ckpt.round_number)
                             .order_by(col(ReleaseCandidate.id))).all()
        out.append(VersionPublic(
            run_id=ckpt.run_id, project=project.name, task=run.task, round=ckpt.round_number,
            checkpoint_sha256=ckpt.sha256, created_at=ckpt.created_at,
            candidate_ids=[c for c, _r in cands if c is not None],
            release_ids=[r for _c, r in cands if r is not None],
            lineage_url=f"{API_PREFIX}/versions/{ckpt.run_id}/{ckpt.round_number}/lineage"))
    return out


@router.get("/versions/{run_id}/{round_number}/lineage", tags=["releases"],
            responses={**_AUTH, **_404})
def version_lineage(run_id: int, round_number: int, request: Request, session: SessionDep,
                    user: CurrentUser) -> dict[str, Any]:
    """A version's lineage: run config and seed, software, sites per round, epsilon and delta
    per site, per-site evaluation, data fingerprints."""
    require_role(user, STAFF_ROLES)
    session.commit()  # build_lineage opens its own transactions
    with _refusals():
        return releases.build_lineage(_engine(request), home=_home(request), run_id=run_id,
                                      round_number=round_number)


# --- gates -------------------------------------------------------------------------------


def _gates_public(project: str, thresholds: dict[str, int | float]) -> GatesPublic:
    return GatesPublic(project=project, thresholds=thresholds,
                       defaults={"min_sites": release_gates.DEFAULT_MIN_SITES,
                                 "min_round_share": release_gates.DEFAULT_MIN_ROUND_SHARE},
                       help=dict(release_gates.THRESHOLD_HELP))


@router.get("/projects/{name}/gates", tags=["releases"], responses={**_AUTH, **_404})
def get_gates(name: str, session: SessionDep, user: CurrentUser) -> GatesPublic:
    """A project's release gate thresholds: those set and the defaults for the rest."""
    require_role(user, STAFF_ROLES)
    with _refusals():
        return _gates_public(name, releases.get_gates(session, name))


@router.put("/projects/{name}/gates", tags=["releases"], responses={**_AUTH, **_404})
def put_gates(name: str, body: GatesUpdate, session: SessionDep,
              user: CurrentUser) -> GatesPublic:
    """Replace all of a project's gate thresholds (reviewers and admins); an omitted one is
    unset (its default applies)."""
    require_role(user, GATE_ROLES)
    with _refusals():
        thresholds = releases.set_gates(session, project_name=name,
                                        thresholds=body.model_dump(), actor=user.name)
    session.commit()
    return _gates_public(name, thresholds)


@router.patch("/projects/{name}/gates", tags=["releases"], responses={**_AUTH, **_404})
def patch_gates(name: str, body: GatesUpdate, session: SessionDep,
                user: CurrentUser) -> GatesPublic:
    """Change only the thresholds named in the body (reviewers and admins); ``null`` unsets
    one (its default applies again), an omitted one stays as it is."""
    require_role(user, GATE_ROLES)
    with _refusals():
        thresholds = releases.set_gates(session, project_name=name, actor=user.name,
                                        thresholds=body.model_dump(include=body.model_fields_set),
                                        merge=True)
    session.commit()
    return _gates_public(name, thresholds)


# --- candidates --------------------------------------------------------------------------


def _evaluate_in_background(engine: Engine, home: Path, candidate_id: int,
                            site_parity: releases.SiteParity | None) -> None:
    try:
        releases.evaluate_candidate(engine, home=home, candidate_id=candidate_id,
                                    site_parity=site_parity)
    except Exception:  # nobody waits for this answer: log it, the candidate says the rest
        log.exception("evaluating candidate %s in the background failed", candidate_id)


@router.post("/candidates", status_code=201, tags=["releases"],
             responses={**_AUTH, **_404,
                        202: {"description": "Accepted (wait=false): the gates are running; "
                                             "poll GET /candidates/{id}"}})
def propose(body: CandidateCreate, request: Request, response: Response,
            background: BackgroundTasks, session: SessionDep, user: CurrentUser,
            wait: Annotated[bool, Query(description="Answer when the gates have run "
                                                    "(exports and the sites' parity can take "
                                                    "minutes); false: answer 202 at once.")]
            = True) -> CandidatePublic:
    """Propose a model version as a release candidate and run its gates.

    With ``wait`` (the default) the answer is 201 whether or not the gates pass: ``status``
    is ``awaiting_review`` or ``gates_failed``, and every gate says why with its figures.
    Without, the answer is 202 with ``status`` ``evaluating``; poll the candidate.
    """
    require_role(user, PROPOSE_ROLES)
    with _refusals():
        cand = releases.propose_candidate(session, run_id=body.run_id, round_number=body.round,
                                          intended_use=body.intended_use, actor=user.name)
    session.commit()
    assert cand.id is not None
    if not wait:
        background.add_task(_evaluate_in_background, _engine(request), _home(request), cand.id,
                            request.app.state.site_parity)
        response.status_code = 202
        public = _candidate_public(session, cand)
        # End this request's transaction now: on SQLite it holds the one write lock, and
        # the background task that records the gates must write.
        session.commit()
        return public
    with _refusals():
        releases.evaluate_candidate(_engine(request), home=_home(request), candidate_id=cand.id,
                                    site_parity=request.app.state.site_parity)
    fresh = session.get(ReleaseCandidate, cand.id, populate_existing=True)
    assert fresh is not None
    return _candidate_public(session, fresh)


@router.get("/candidates", tags=["releases"], responses=_AUTH)
def list_candidates(
    session: SessionDep, user: CurrentUser,
    candidate_status: Annotated[str | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[CandidatePublic]:
    """Release candidates, newest first."""
    require_role(user, STAFF_ROLES)
    query = select(ReleaseCandidate)
    if candidate_status is not None:
        query = query.where(ReleaseCandidate.status == candidate_status)
    rows = session.exec(query.order_by(col(ReleaseCandidate.id).desc()).limit(limit)).all()
    return [_candidate_public(session, c) for c in rows]


@router.get("/candidates/{candidate_id}", tags=["releases"], responses={**_AUTH, **_404})
def get_candidate(candidate_id: int, session: SessionDep, user: CurrentUser) -> CandidatePublic:
    """One candidate with its gates."""
    require_role(user, STAFF_ROLES)
    cand = session.get(ReleaseCandidate, candidate_id)
    if cand is None:
        raise HTTPException(404, f"candidate {candidate_id} not found")
    return _candidate_public(session, cand)


@router.post("/candidates/{candidate_id}/approve", status_code=201, tags=["releases"],
             responses={**_AUTH, **_404, **_409})
def approve(candidate_id: int, body: DecisionRequest, request: Request, session: SessionDep,
            user: CurrentUser) -> ReleasePublic:
    """Approve a candidate awaiting review: the signed bundle is written, the release made.

    403 for your own proposal; 409 when it is approved, rejected, failed its gates or is
    still being evaluated.
    """
    require_role(user, REVIEW_ROLES)
    session.commit()  # approving signs and writes files: no transaction held meanwhile
    with _refusals():
        release = releases.approve_candidate(_engine(request), home=_home(request),
                                             candidate_id=candidate_id, user=user,
                                             reason=body.reason)
    fresh = session.get(Release, release.id)
    assert fresh is not None
    return _release_public(session, fresh)


@router.post("/candidates/{candidate_id}/reject", tags=["releases"],
             responses={**_AUTH, **_404, **_409})
def reject(candidate_id: int, body: DecisionRequest, session: SessionDep,
           user: CurrentUser) -> CandidatePublic:
    """Reject a candidate with a reason (not your own proposal)."""
    require_role(user, REVIEW_ROLES)
    with _refusals():
        cand = releases.reject_candidate(session, candidate_id=candidate_id, user=user,
                                         reason=body.reason)
    session.commit()
    return _candidate_public(session, cand)


# --- releases ----------------------------------------------------------------------------


@router.get("/releases", tags=["releases"], responses=_AUTH)
def list_releases(
    session: SessionDep, user: CurrentUser,
    include_revoked: Annotated[bool, Query(description="Also revoked releases (not for "
                                                       "clinicians).")] = False,
) -> list[ReleasePublic]:
    """Approved releases, newest first; clinicians see only unrevoked ones."""
    require_role(user, ALL_ROLES)
    staff = may(user.role, Permission.STAFF)
    rows = releases.list_releases(session, include_revoked=include_revoked and staff)
    return [_release_public(session, r) for r in rows]


@router.get("/releases/{release_id}", tags=["releases"],
            responses={**_AUTH, **_404, 410: {"description": "Revoked (clinicians)"}})
def get_release(release_id: str, session: SessionDep, user: CurrentUser) -> ReleasePublic:
    """One release."""
    require_role(user, ALL_ROLES)
    with _refusals():
        return _release_public(session, _visible_release(session, release_id, user.role))


@router.get("/releases/{release_id}/bundle", tags=["releases"],
            response_class=Response,
            responses={**_AUTH, **_404, 410: {"description": "Revoked"},
                       200: {"content": {ARCHIVE_MEDIA_TYPE: {}},
                             "description": "The bundle folder as .tar.gz"}})
def download_bundle(release_id: str, request: Request, session: SessionDep,
                    user: CurrentUser) -> Response:
    """The signed bundle as a ``.tar.gz`` (verified on the coordinator before it is sent).

    Check it after unpacking: ``fedward-verify <folder> --public-key release.pub.pem
    --coordinator <portal address>``.
    """
    require_role(user, ALL_ROLES)
    with _refusals():
        release = releases.find_release(session, release_id)
        data = releases.bundle_archive(_home(request), release)
    append_event(session, actor=user.name, action="release.downloaded",
                 subject=f"release:{release_id}", detail={"via": "api"})
    session.commit()
    return Response(content=data, media_type=ARCHIVE_MEDIA_TYPE, headers={
        "Content-Disposition": f'attachment; filename="{release_id}.tar.gz"'})


@router.post("/releases/{release_id}/revoke", tags=["releases"],
             responses={**_AUTH, **_404, **_409})
def revoke(release_id: str, body: DecisionRequest, session: SessionDep,
           user: CurrentUser) -> ReleasePublic:
    """Revoke a release (admins): it leaves the portal, downloads answer 410, and the
    revocation list names it."""
    require_role(user, REVOKE_ROLES)
    with _refusals():
        release = releases.revoke_release(session, release_id=release_id, user=user,
                                          reason=body.reason)
    session.commit()
    return _release_public(session, release)


# --- public ------------------------------------------------------------------------------


@router.get("/revocations", tags=["releases"],
            responses={404: {"description": "No release has been signed yet"}})
def revocations(request: Request, session: SessionDep) -> dict[str, Any]:
    """The revocation list, signed with the release key (no token needed).

    ``fedward-verify --coordinator URL`` and ``fedward-serve --coordinator URL`` fetch it at
    every check; saved to a file it is what ``--revocations FILE`` reads (for at most 7 days:
    it says when it was issued). Its ``payload`` is base64 JSON naming each revoked release
    and why.
    """
    with _refusals():
        signed = releases.signed_revocation_list(session, _home(request))
    if signed is None:
        raise HTTPException(404, "no release has been signed yet, so there is no revocation "
                                 "list")
    return signed


@router.get("/release-key", tags=["releases"],
            responses={404: {"description": "No release has been signed yet"}})
def release_key(request: Request) -> PublicKeyPublic:
    """The release public key and its fingerprint (no token needed)."""
    key = releases.release_public_key(_home(request))
    if key is None:
        raise HTTPException(404, "no release has been signed yet, so there is no release key")
    return PublicKeyPublic(public_key_pem=key[0].decode("ascii"), fingerprint=key[1])


@router.get("/release-key.pem", tags=["releases"], response_class=PlainTextResponse,
            responses={404: {"description": "No release has been signed yet"}})
def release_key_pem(request: Request) -> PlainTextResponse:
    """The release public key as a PEM file, for ``fedward-verify --public-key``."""
    key = releases.release_public_key(_home(request))
    if key is None:
        raise HTTPException(404, "no release has been signed yet, so there is no release key")
    return PlainTextResponse(key[0].decode("ascii"), media_type="application/x-pem-file",
                             headers={"Content-Disposition":
                                      'attachment; filename="release.pub.pem"'})
