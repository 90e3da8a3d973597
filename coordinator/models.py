"""Database tables of the coordinator (the system of record).

The tables are defined here and created only by the Alembic migrations in
``coordinator/migrations``; a test compares the two so they cannot drift apart. Lists and
dictionaries are stored as JSON text in ``*_json`` columns; timestamps are timezone-aware
UTC datetimes on every backend (:class:`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import DateTime, Dialect, Index, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "CANDIDATE_STATUSES",
    "CHECKPOINT_FORMATS",
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
    "LoginSession",
    "MlflowExport",
    "Project",
    "ProjectGates",
    "Release",
    "ReleaseCandidate",
    "Round",
    "Run",
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

SITE_STATUSES: Final = frozenset({"added", "registered", "revoked"})
RUN_STATUSES: Final = frozenset(
    {"pending", "running", "completed", "failed", "stopped", "cancelled"})
RUN_FINAL_STATUSES: Final = frozenset({"completed", "failed", "stopped", "cancelled"})
ROUND_STATUSES: Final = frozenset({"running", "completed", "failed", "cancelled"})
CHECKPOINT_FORMATS: Final = frozenset({"safetensors"})
# evaluating -> gates_failed | awaiting_review -> approved | rejected
CANDIDATE_STATUSES: Final = frozenset(
    {"evaluating", "gates_failed", "awaiting_review", "approved", "rejected"})
# pending (to do, or retried after a failure) -> done | failed (cannot succeed by retrying)
MLFLOW_EXPORT_STATES: Final = frozenset({"pending", "done", "failed"})


# Every constraint gets a predictable name on every backend, so later migrations can drop or
# alter it by name (SQLite's batch mode needs names, PostgreSQL would otherwise invent them).
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that always hands back aware UTC datetimes.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are converted to
    UTC before they are written and tagged as UTC when read. Naive datetimes are refused:
    their meaning depends on the machine's clock settings.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC before writing; refuse naive values."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: use UTC-aware times")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _pk() -> Any:
    return Field(default=None, primary_key=True)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class User(SQLModel, table=True):
    """A person or service account of the coordinator.

    Only the SHA-256 of the API token is stored; the token is shown once when it is issued.
    It works until ``token_expires_at``, or until it is revoked (``token_revoked_at``: a
    logout with it, a password change, an admin). A disabled user (``disabled_at``) can
    neither log in nor use any token.
    """

    __tablename__ = "users"

    id: int | None = _pk()
    name: str = Field(max_length=64, unique=True, nullable=False)
    role: str = Field(max_length=32, nullable=False)
    token_hash: str = Field(max_length=64, unique=True, nullable=False)
    created_at: datetime = _created()
    token_expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    token_revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Project(SQLModel, table=True):
    """A federated project: a question answered by runs over the same sites."""

    __tablename__ = "projects"

    id: int | None = _pk()
    name: str = Field(max_length=64, unique=True, nullable=False)
    description: str = Field(default="", sa_type=Text, nullable=False)
    created_at: datetime = _created()


class Site(SQLModel, table=True):
    """A hospital site. Sites are global: any project's runs may use any registered site.

    ``flower_node_id`` is text because Flower node ids are unsigned 64-bit integers, which
    do not fit a signed BIGINT.
    """

    __tablename__ = "sites"

    id: int | None = _pk()
    name: str = Field(max_length=40, unique=True, nullable=False)
    flower_node_id: str | None = Field(default=None, max_length=32, unique=True)
    public_key: str | None = Field(default=None, sa_type=Text)
    status: str = Field(default="added", max_length=16, nullable=False)
    created_at: datetime = _created()
    registered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # What the site agent last reported (coordinator.site_versions): checked versions only.
    agent_version: str | None = Field(default=None, max_length=64)
    flower_version: str | None = Field(default=None, max_length=64)
    versions_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    versions_via: str | None = Field(default=None, max_length=16)


class Run(SQLModel, table=True):
    """One federated training run of a project's task over some sites.

    ``config_json`` holds the resolved run configuration (see
    :class:`coordinator.schemas.RunConfig`), including the names of the sites that take part.
    """

    __tablename__ = "runs"
    # The dashboard lists runs by state, newest first (migration 0011).
    __table_args__ = (Index("ix_runs_status_id", "status", "id"),)

    id: int | None = _pk()
    project_id: int = Field(foreign_key="projects.id", nullable=False, index=True)
    task: str = Field(max_length=64, nullable=False)
    status: str = Field(default="pending", max_length=16, nullable=False)
    config_json: str = Field(sa_type=Text, nullable=False)
    launched_by: str = Field(max_length=64, nullable=False)
    flwr_run_id: str | None = Field(default=None, max_length=32)
    failure_reason: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = _created()
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # A cancel request (coordinator.run_control): who, why, when. The run stays pending or
    # running until its round loop (or, past its grace, the coordinator) ends it.
    cancel_requested_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancelled_by: str | None = Field(default=None, max_length=64)
    cancel_reason: str | None = Field(default=None, sa_type=Text)


class Round(SQLModel, table=True):
    """One round of a run; repeated attempts of the same round update the same row.

    ``failed_sites_json`` is a list of ``{"site", "phase", "reason"}`` objects;
    ``participating_sites_json`` and ``late_sites_json`` are lists of site names.
    """

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: int | None = _pk()
    run_id: int = Field(foreign_key="runs.id", nullable=False)
    number: int = Field(nullable=False)
    status: str = Field(default="running", max_length=16, nullable=False)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    seconds: float | None = None
    participating_sites_json: str = Field(default="[]", sa_type=Text, nullable=False)
    failed_sites_json: str = Field(default="[]", sa_type=Text, nullable=False)
    late_sites_json: str = Field(default="[]", sa_type=Text, nullable=False)


class SiteMetric(SQLModel, table=True):
    """One scalar metric one site reported in one round.

    The unique constraint (run, round, site, name) makes re-recording a value an update and
    doubles as the index for "all metrics of run R, round N".
    """

    __tablename__ = "site_metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "round_number", "site_name", "name"),
        # What each site reported spent (the dashboard's sites page), from the index alone
        # (migration 0011).
        Index("ix_site_metrics_name_site_run", "name", "site_name", "run_id", "value"),
    )

    id: int | None = _pk()
    run_id: int = Field(foreign_key="runs.id", nullable=False)
    round_number: int = Field(nullable=False)
    site_name: str = Field(max_length=40, nullable=False)
    name: str = Field(max_length=64, nullable=False)
    value: float = Field(nullable=False)


class Checkpoint(SQLModel, table=True):
    """The global model after a round, saved as a file under the coordinator's home."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("run_id", "round_number"),
    )

    id: int | None = _pk()
    run_id: int = Field(foreign_key="runs.id", nullable=False)
    round_number: int = Field(nullable=False)
    path: str = Field(sa_type=Text, nullable=False)
    sha256: str = Field(max_length=64, nullable=False)
    format: str = Field(default="safetensors", max_length=16, nullable=False)
    created_at: datetime = _created()


class AuditEvent(SQLModel, table=True):
    """One entry of the hash-chained audit log (see :mod:`coordinator.audit`).

    ``prev_hash`` is unique: two writers can never both extend the same entry, so even a
    locking mistake would fail loudly instead of forking the chain.
    """

    __tablename__ = "audit_events"
    # Run views look events up by action and subject (admission state, rejected updates).
    __table_args__ = (Index("ix_audit_events_action_subject", "action", "subject"),)

    id: int | None = _pk()
    at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    actor: str = Field(max_length=64, nullable=False)
    action: str = Field(max_length=64, nullable=False)
    subject: str = Field(sa_type=Text, nullable=False)
    detail_json: str = Field(sa_type=Text, nullable=False)
    prev_hash: str = Field(max_length=64, unique=True, nullable=False)
    hash: str = Field(max_length=64, unique=True, nullable=False)
    # The hash chain format the entry was written in (fedward.hashchain): 1 for entries from
    # before RFC 8785 canonical JSON (migration 0007), 2 since.
    hash_version: int = Field(default=2, nullable=False, sa_column_kwargs={"server_default": "1"})


class EnrollmentToken(SQLModel, table=True):
    """A one-time, expiring token with which a site enrolls. Only its SHA-256 is stored."""

    __tablename__ = "enrollment_tokens"

    id: int | None = _pk()
    site_id: int = Field(foreign_key="sites.id", nullable=False, index=True)
    token_hash: str = Field(max_length=64, unique=True, nullable=False)
    created_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = _created()
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SiteCertificate(SQLModel, table=True):
    """A client certificate the site CA issued to a site (serial as hex).

    A certificate replaced by a renewal (or a new enrollment) is revoked, and
    ``superseded_by`` names the serial that replaced it.
    """

    __tablename__ = "site_certificates"

    id: int | None = _pk()
    site_id: int = Field(foreign_key="sites.id", nullable=False, index=True)
    serial: str = Field(max_length=64, unique=True, nullable=False)
    issued_at: datetime = _created()
    not_after: datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoke_reason: str | None = Field(default=None, sa_type=Text)
    superseded_by: str | None = Field(default=None, max_length=64)


class SitePresence(SQLModel, table=True):
    """The last contact the site gateway saw from a site (revision 0009).

    Written at most every few seconds per site by :mod:`coordinator.presence`; a row of its
    own, so these frequent writes never touch the ``sites`` row that the API updates.
    """

    __tablename__ = "site_presence"

    site_name: str = Field(max_length=40, primary_key=True)
    last_seen_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


# --- releases (revision 0003) ---------------------------------------------------------------


class UserCredential(SQLModel, table=True):
    """A user's password, as an argon2id hash (the password itself is never stored).

    A user without a row here has no password: it can use its API token only.
    """

    __tablename__ = "user_credentials"

    id: int | None = _pk()
    user_id: int = Field(foreign_key="users.id", unique=True, nullable=False)
    password_hash: str = Field(sa_type=Text, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class LoginSession(SQLModel, table=True):
    """A session opened by a password login; only the SHA-256 of its token is stored."""

    __tablename__ = "login_sessions"

    id: int | None = _pk()
    user_id: int = Field(foreign_key="users.id", nullable=False, index=True)
    token_hash: str = Field(max_length=64, unique=True, nullable=False)
    created_at: datetime = _created()
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ProjectGates(SQLModel, table=True):
    """A project's release gate thresholds (``thresholds_json``: name -> minimum)."""

    __tablename__ = "project_gates"

    id: int | None = _pk()
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

    id: int | None = _pk()
    run_id: int = Field(foreign_key="runs.id", nullable=False, index=True)
    round_number: int = Field(nullable=False)
    checkpoint_sha256: str = Field(max_length=64, nullable=False)
    intended_use: str = Field(sa_type=Text, nullable=False)
    status: str = Field(default="evaluating", max_length=16, nullable=False)
    proposed_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = _created()
    staging_path: str | None = Field(default=None, sa_type=Text)
    lineage_json: str = Field(default="{}", sa_type=Text, nullable=False)
    gates_json: str = Field(default="[]", sa_type=Text, nullable=False)
    decided_by: str | None = Field(default=None, max_length=64)
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    decision_reason: str | None = Field(default=None, sa_type=Text)


class Release(SQLModel, table=True):
    """An approved candidate's signed bundle under ``home/releases/<release_id>/``."""

    __tablename__ = "releases"

    id: int | None = _pk()
    release_id: str = Field(max_length=128, unique=True, nullable=False)
    candidate_id: int = Field(foreign_key="release_candidates.id", unique=True,
                              nullable=False)
    bundle_path: str = Field(sa_type=Text, nullable=False)
    key_fingerprint: str = Field(max_length=64, nullable=False)
    created_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = _created()
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_by: str | None = Field(default=None, max_length=64)
    revoke_reason: str | None = Field(default=None, sa_type=Text)


# --- MLflow hand-off (revision 0006) ---------------------------------------------------------


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

    id: int | None = _pk()
    kind: str = Field(max_length=16, nullable=False)
    subject: str = Field(max_length=128, nullable=False)
    tracking_uri: str | None = Field(default=None, sa_type=Text)
    state: str = Field(default="pending", max_length=16, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    last_error: str | None = Field(default=None, sa_type=Text)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    requested_by: str = Field(max_length=64, nullable=False)
    requested_at: datetime = _created()
    exported_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    result_json: str = Field(default="{}", sa_type=Text, nullable=False)


# --- Studies (revision 0010) -------------------------------------------------------------


class Study(SQLModel, table=True):
    """One version of a registered study spec (:mod:`fedward.study`).

    A name's versions count up from 1; each holds its spec's canonical JSON and that
    text's SHA-256, which runs pin and site policies approve. Rows are never changed.
    """

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("name", "version"),
                      UniqueConstraint("name", "content_hash"))

    id: int | None = _pk()
    name: str = Field(max_length=64, nullable=False, index=True)
    version: int = Field(nullable=False)
    content_hash: str = Field(max_length=64, nullable=False, index=True)
    spec_json: str = Field(sa_type=Text, nullable=False)
    registered_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = _created()


# --- Run statistics (revision 0012) -----------------------------------------------------


class RunStatistics(SQLModel, table=True):
    """A run's federated DP statistics: the sum of its sites' noised releases.

    ``reference_json`` is the reference statistics document (``fedward.statistics``,
    format version 1) a release of the run ships; ``sites_json`` the sites summed,
    ``failed_json`` the sites that did not contribute and why. One row per run, written
    once by the ServerApp before round 1.
    """

    __tablename__ = "run_statistics"
    __table_args__ = (UniqueConstraint("run_id"),)

    id: int | None = _pk()
    run_id: int = Field(foreign_key="runs.id", nullable=False)
    epsilon: float = Field(nullable=False)
    delta: float = Field(nullable=False)
    reference_json: str = Field(sa_type=Text, nullable=False)
    sites_json: str = Field(sa_type=Text, nullable=False)
    failed_json: str = Field(default="{}", sa_type=Text, nullable=False)
    seconds: float = Field(nullable=False)
    created_at: datetime = _created()


# --- Hyperparameter tuning (revision 0013) -----------------------------------------------

TUNING_STATUSES: Final = frozenset({"running", "completed", "refused", "failed"})


class Tuning(SQLModel, table=True):
    """One federated hyperparameter search (:mod:`coordinator.tuning`).

    ``request_json`` is the request as given; ``terms_json`` the search's terms every trial
    carries to the sites (:class:`privacy.tuning.SearchTerms`); ``trials_planned`` the
    random number of trials drawn before the first one (random stopping).
    """

    __tablename__ = "tunings"

    id: int | None = _pk()
    project_id: int = Field(foreign_key="projects.id", nullable=False, index=True)
    task: str = Field(max_length=64, nullable=False)
    status: str = Field(default="running", max_length=16, nullable=False)
    request_json: str = Field(sa_type=Text, nullable=False)
    terms_json: str = Field(default="{}", sa_type=Text, nullable=False)
    trials_planned: int = Field(default=0, nullable=False)
    best_run_id: int | None = Field(default=None, foreign_key="runs.id")
    best_score: float | None = Field(default=None)
    reason: str | None = Field(default=None, sa_type=Text)
    created_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = _created()
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class TuningTrial(SQLModel, table=True):
    """One trial of a search: the settings Optuna proposed, its run, and its score (the
    mean of the sites' held-out AUC of the trial's final model)."""

    __tablename__ = "tuning_trials"
    __table_args__ = (UniqueConstraint("tuning_id", "number"),)

    id: int | None = _pk()
    tuning_id: int = Field(foreign_key="tunings.id", nullable=False, index=True)
    number: int = Field(nullable=False)
    run_id: int | None = Field(default=None, foreign_key="runs.id")
    params_json: str = Field(sa_type=Text, nullable=False)
    status: str = Field(default="running", max_length=16, nullable=False)
    score: float | None = Field(default=None)
    created_at: datetime = _created()


# --- evaluations on demand (revision 0014) ---------------------------------------------------

EVALUATION_STATUSES: Final = frozenset({"pending", "running", "completed", "failed"})


class Evaluation(SQLModel, table=True):
    """A federated evaluation of one checkpoint on the sites' held-out data, on demand.

    ``results_json`` holds ``{site: {metric: value}}`` for the sites that answered and
    ``failed_json`` ``{site: reason}`` for those that did not (refused, offline, late).
    """

    __tablename__ = "evaluations"

    id: int | None = _pk()
    run_id: int = Field(foreign_key="runs.id", nullable=False, index=True)
    release_id: str | None = Field(default=None, max_length=128)
    round_number: int = Field(nullable=False)
    checkpoint_sha256: str = Field(max_length=64, nullable=False)
    requested_by: str = Field(max_length=64, nullable=False)
    status: str = Field(default="pending", max_length=16, nullable=False)
    flwr_run_id: str | None = Field(default=None, max_length=32)
    created_at: datetime = _created()
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    failure_reason: str | None = Field(default=None, sa_type=Text)
    results_json: str = Field(default="{}", sa_type=Text, nullable=False)
    failed_json: str = Field(default="{}", sa_type=Text, nullable=False)


# --- Drift reports of released models (revision 0015) ---------------------------------------


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

    id: int | None = _pk()
    report_id: str = Field(max_length=32, unique=True, nullable=False)
    site_name: str = Field(max_length=64, nullable=False)
    release_id: str = Field(max_length=128, nullable=False, index=True)
    checked_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    received_at: datetime = _created()
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
