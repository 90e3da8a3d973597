"""Request and response bodies of the release workflow's REST routes
(:mod:`coordinator.release_api`): candidates and their review, project gates, releases,
model versions and the release public key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from coordinator.schemas import RequestBody

__all__ = [
    "CandidateCreate",
    "CandidatePublic",
    "DecisionRequest",
    "GateResult",
    "GatesPublic",
    "GatesUpdate",
    "PublicKeyPublic",
    "ReleasePublic",
    "VersionPublic",
]


class CandidateCreate(RequestBody):
    """Body of ``POST /candidates``: which version, for what."""

    run_id: int = Field(ge=1)
    round: int | None = Field(default=None, ge=1,
                              description="The checkpoint's round; default the run's last.")
    intended_use: str = Field(min_length=10, max_length=4000,
                              description="What the model is for and what not; shown to "
                                          "clinicians on the model card.")


class DecisionRequest(RequestBody):
    """Why a candidate is approved or rejected, or a release revoked (kept in the audit log)."""

    reason: str = Field(min_length=3, max_length=2000)


class GatesUpdate(RequestBody):
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
