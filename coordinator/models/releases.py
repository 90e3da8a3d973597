"""Releases: project gates, release candidates, releases, MLflow hand-offs, drift reports.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from coordinator.models.base import UTCDateTime, created_field, id_field, utcnow

__all__ = [
    "CANDIDATE_STATUSES",
    "MLFLOW_EXPORT_STATES",
    "DriftReport",
    "MlflowExport",
    "ProjectGates",
    "Release",
    "ReleaseCandidate",
]


# evaluating -> gates_failed | awaiting_review -> approved | rejected
CANDIDATE_STATUSES: Final = frozenset(
    {"evaluating", "gates_failed", "awaiting_review", "approved", "rejected"})
# pending (to do, or retried after a failure) -> done | failed (cannot succeed by retrying)
MLFLOW_EXPORT_STATES: Final = frozenset({"pending", "done", "failed"})


class ProjectGates(SQLModel, table=True):
    """A project's release gate thresholds (``thresholds_json``: name -> minimum)."""

    __tablename__ = "project_gates"

    id: int | None = id_field()
    project_id: int = Field(foreign_key="projects.id", unique=True, nullable=False)
    thresholds_json: str = Field(sa_type=Text, nullable=False)
    updated_by: str = Field(max_length=64, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class ReleaseCandidate(SQLModel, table=True):
    """A model version (run checkpoint) proposed for release, with its recorded gates.

    ``lineage_json`` and ``gates_json`` are frozen when the gates run, so what a reviewer
    approves is exactly what goes into the model card. ``staging_path`` (relative to the
    coordinator's home) holds the exported artefacts until a release copies them.
    """

    __tablename__ = "release_candidates"

    id: int | None = id_field()
    run_id: int = Field(foreign_key="runs.id", nullable=False, index=True)
    round_number: int = Field(nullable=False)
    checkpoint_sha256: str = Field(max_length=64, nullable=False)
    intended_use: str = Field(sa_type=Text, nullable=False)
    status: str = Field(default="evaluating", max_length=16, nullable=False)
    proposed_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = created_field()
    staging_path: str | None = Field(default=None, sa_type=Text)
    lineage_json: str = Field(default="{}", sa_type=Text, nullable=False)
    gates_json: str = Field(default="[]", sa_type=Text, nullable=False)
    decided_by: str | None = Field(default=None, max_length=64)
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    decision_reason: str | None = Field(default=None, sa_type=Text)


class Release(SQLModel, table=True):
    """An approved candidate's signed bundle under ``home/releases/<release_id>/``."""

    __tablename__ = "releases"

    id: int | None = id_field()
    release_id: str = Field(max_length=128, unique=True, nullable=False)
    candidate_id: int = Field(foreign_key="release_candidates.id", unique=True,
                              nullable=False)
    bundle_path: str = Field(sa_type=Text, nullable=False)
    key_fingerprint: str = Field(max_length=64, nullable=False)
    created_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = created_field()
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_by: str | None = Field(default=None, max_length=64)
    revoke_reason: str | None = Field(default=None, sa_type=Text)


class MlflowExport(SQLModel, table=True):
    """A hand-off of a run (``kind`` "run", ``subject`` its id) or of an approved release
    (``kind`` "release", ``subject`` its release id) to an MLflow tracking server.

    The row is written in the same transaction that completes the run or approves the
    release, so a hand-off is never lost; a background worker does it and retries it.
    ``tracking_uri`` is the server an explicit export named (``None``: the configured one).
    ``result_json`` says where it went (MLflow run id, model name and version).
    """

    __tablename__ = "mlflow_exports"
    __table_args__ = (UniqueConstraint("kind", "subject"),)

    id: int | None = id_field()
    kind: str = Field(max_length=16, nullable=False)
    subject: str = Field(max_length=128, nullable=False)
    tracking_uri: str | None = Field(default=None, sa_type=Text)
    state: str = Field(default="pending", max_length=16, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    last_error: str | None = Field(default=None, sa_type=Text)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    requested_by: str = Field(max_length=64, nullable=False)
    requested_at: datetime = created_field()
    exported_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    result_json: str = Field(default="{}", sa_type=Text, nullable=False)


class DriftReport(SQLModel, table=True):
    """One drift check of a release at a site, as the site reported it through the gateway.

    Only scores (``features_json``: feature -> PSI, chi-square, dof, p-value), accuracy,
    AUC, the row count's bucket and the privacy treatment, or for a failed check its kind
    (``failure``). ``alarm`` and ``alarm_features_json`` are the coordinator's reading of
    it under the alarm rule in force when it arrived (:mod:`coordinator.drift`).
    ``report_id`` (made by the site) makes a report sent twice one row.
    """

    __tablename__ = "drift_reports"
    __table_args__ = (Index("ix_drift_reports_site_release", "site_name", "release_id", "id"),)

    id: int | None = id_field()
    report_id: str = Field(max_length=32, unique=True, nullable=False)
    site_name: str = Field(max_length=64, nullable=False)
    release_id: str = Field(max_length=128, nullable=False, index=True)
    checked_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    received_at: datetime = created_field()
    status: str = Field(max_length=16, nullable=False)
    failure: str | None = Field(default=None, max_length=32)
    rows_bucket: str | None = Field(default=None, max_length=16)
    labelled: bool | None = None
    treatment: str | None = Field(default=None, max_length=16)
    epsilon: float | None = None
    accuracy: float | None = None
    auc: float | None = None
    max_psi: float | None = None
    min_p_value: float | None = None
    alarm: bool = Field(default=False, nullable=False)
    alarm_features_json: str = Field(default="[]", sa_type=Text, nullable=False)
    features_json: str = Field(default="{}", sa_type=Text, nullable=False)
