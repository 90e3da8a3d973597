"""What the release workflow's routers share: the mapping of the workflow's refusals to
HTTP errors, the coordinator's data directory and database engine from the app, the
documented error answers, and the public views of candidates and releases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import HTTPException, Request
from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator import release_gates, release_store
from coordinator.api_errors import RESPONSES_401, RESPONSES_403, Responses
from coordinator.auth import API_PREFIX
from coordinator.models import Project, Release, ReleaseCandidate, Run
from coordinator.release_errors import ReleaseError
from coordinator.release_schemas import CandidatePublic, GateResult, ReleasePublic
from coordinator.settings import Settings

__all__ = [
    "AUTH",
    "R409",
    "candidate_public",
    "refusals",
    "release_public",
    "request_engine",
    "request_home",
]

AUTH: Responses = {**RESPONSES_401, **RESPONSES_403}
R409: Responses = {409: {"description": "The object's state does not allow this"}}


@contextmanager
def refusals() -> Iterator[None]:
    """Turn the workflow's refusals into HTTP errors that carry the reason."""
    try:
        yield
    except ReleaseError as err:
        raise HTTPException(err.status_code, str(err)) from None


def request_home(request: Request) -> Path:
    """The coordinator's data directory."""
    settings: Settings = request.app.state.settings
    return settings.home


def request_engine(request: Request) -> Engine:
    """The coordinator's database engine."""
    engine: Engine = request.app.state.engine
    return engine


def candidate_public(session: Session, cand: ReleaseCandidate) -> CandidatePublic:
    """A candidate as the API shows it: its project, gates, release and running gate."""
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


def release_public(session: Session, release: Release) -> ReleasePublic:
    """A release as the API shows it, with the address of its bundle."""
    view = release_store.release_view(session, release)
    return ReleasePublic(**view, bundle_url=f"{API_PREFIX}/releases/{release.release_id}/bundle")

