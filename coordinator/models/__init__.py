"""Database tables of the coordinator (the system of record).

The tables are defined in this package, one module per part of the product (:mod:`.base`
for what they share, :mod:`.accounts`, :mod:`.fleet`, :mod:`.runs`, :mod:`.releases`), and
created only by the Alembic migrations in ``coordinator/migrations``; a test compares the
two so they cannot drift apart. Lists and dictionaries are stored as JSON text in
``*_json`` columns; timestamps are timezone-aware UTC datetimes on every backend
(:class:`UTCDateTime`).

Importing this package registers every table on ``SQLModel.metadata``.
"""

from __future__ import annotations

from coordinator.models.accounts import (
    AuditEvent,
    LoginSession,
    Project,
    User,
    UserCredential,
)
from coordinator.models.base import (
    NAMING_CONVENTION,
    UTCDateTime,
    utcnow,
)
from coordinator.models.fleet import (
    SITE_STATUSES,
    EnrollmentToken,
    Site,
    SiteCertificate,
    SitePresence,
)
from coordinator.models.releases import (
    CANDIDATE_STATUSES,
    MLFLOW_EXPORT_STATES,
    DriftReport,
    MlflowExport,
    ProjectGates,
    Release,
    ReleaseCandidate,
)
from coordinator.models.runs import (
    CHECKPOINT_FORMATS,
    EVALUATION_STATUSES,
    ROUND_STATUSES,
    RUN_FINAL_STATUSES,
    RUN_STATUSES,
    TUNING_STATUSES,
    Checkpoint,
    Evaluation,
    Round,
    Run,
    RunStatistics,
    SiteMetric,
    Study,
    Tuning,
    TuningTrial,
)

__all__ = [
    "CANDIDATE_STATUSES",
    "CHECKPOINT_FORMATS",
    "EVALUATION_STATUSES",
    "MLFLOW_EXPORT_STATES",
    "NAMING_CONVENTION",
    "ROUND_STATUSES",
    "RUN_FINAL_STATUSES",
    "RUN_STATUSES",
    "SITE_STATUSES",
    "TUNING_STATUSES",
    "AuditEvent",
    "Checkpoint",
    "DriftReport",
    "EnrollmentToken",
    "Evaluation",
    "LoginSession",
    "MlflowExport",
    "Project",
    "ProjectGates",
    "Release",
    "ReleaseCandidate",
    "Round",
    "Run",
    "RunStatistics",
    "Site",
    "SiteCertificate",
    "SiteMetric",
    "SitePresence",
    "Study",
    "Tuning",
    "TuningTrial",
    "UTCDateTime",
    "User",
    "UserCredential",
    "utcnow",
]
