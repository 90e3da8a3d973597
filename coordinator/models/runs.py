"""Training and what runs on a run: runs, rounds, per-site metrics, checkpoints, studies,
reference statistics, tuning searches and evaluations on demand.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Index, Text, UniqueConstraint, false
from sqlmodel import Field, SQLModel

from coordinator.models.base import UTCDateTime, created_field, id_field, utcnow

__all__ = [
    "CHECKPOINT_FORMATS",
    "ROUND_STATUSES",
    "RUN_FINAL_STATUSES",
    "RUN_STATUSES",
    "TUNING_STATUSES",
    "Checkpoint",
    "Round",
    "Run",
    "SiteMetric",
    "Study",
    "Tuning",
    "TuningTrial",
]


RUN_STATUSES: Final = frozenset(
    {"pending", "running", "completed", "failed", "stopped", "cancelled"})
RUN_FINAL_STATUSES: Final = frozenset({"completed", "failed", "stopped", "cancelled"})
ROUND_STATUSES: Final = frozenset({"running", "completed", "failed", "cancelled"})
CHECKPOINT_FORMATS: Final = frozenset({"safetensors"})


class Run(SQLModel, table=True):
    """One federated training run of a project's task over some sites.

    ``config_json`` holds the resolved run configuration (see
    :class:`coordinator.schemas.RunConfig`), including the names of the sites that take part.
    """

    __tablename__ = "runs"
    # The dashboard lists runs by state, newest first (migration 0011).
    __table_args__ = (Index("ix_runs_status_id", "status", "id"),)

    id: int | None = id_field()
    project_id: int = Field(foreign_key="projects.id", nullable=False, index=True)
    task: str = Field(max_length=64, nullable=False)
    status: str = Field(default="pending", max_length=16, nullable=False)
    config_json: str = Field(sa_type=Text, nullable=False)
    launched_by: str = Field(max_length=64, nullable=False)
    flwr_run_id: str | None = Field(default=None, max_length=32)
    failure_reason: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = created_field()
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

    id: int | None = id_field()
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

    id: int | None = id_field()
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

    id: int | None = id_field()
    run_id: int = Field(foreign_key="runs.id", nullable=False)
    round_number: int = Field(nullable=False)
    path: str = Field(sa_type=Text, nullable=False)
    sha256: str = Field(max_length=64, nullable=False)
    format: str = Field(default="safetensors", max_length=16, nullable=False)
    created_at: datetime = created_field()


class Study(SQLModel, table=True):
    """One version of a registered study spec (:mod:`fedward.study`).

    A name's versions count up from 1; each holds its spec's canonical JSON and that
    text's SHA-256, which runs pin and site policies approve. The spec of a row is never
    changed; a version may be retired (:mod:`coordinator.study_retirement`): it stays, with
    who retired it, when and why, and no new run may use it (revision 0016).
    """

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("name", "version"),
                      UniqueConstraint("name", "content_hash"))

    id: int | None = id_field()
    name: str = Field(max_length=64, nullable=False, index=True)
    version: int = Field(nullable=False)
    content_hash: str = Field(max_length=64, nullable=False, index=True)
    spec_json: str = Field(sa_type=Text, nullable=False)
    registered_by: str = Field(max_length=64, nullable=False)
    created_at: datetime = created_field()
    retired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    retired_by: str | None = Field(default=None, max_length=64)
    retire_reason: str | None = Field(default=None, sa_type=Text)


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

    id: int | None = id_field()
    run_id: int = Field(foreign_key="runs.id", nullable=False)
    epsilon: float = Field(nullable=False)
    delta: float = Field(nullable=False)
    reference_json: str = Field(sa_type=Text, nullable=False)
    sites_json: str = Field(sa_type=Text, nullable=False)
    failed_json: str = Field(default="{}", sa_type=Text, nullable=False)
    seconds: float = Field(nullable=False)
    created_at: datetime = created_field()


# --- Hyperparameter tuning (revision 0013) -----------------------------------------------

TUNING_STATUSES: Final = frozenset({"running", "completed", "refused", "failed"})


class Tuning(SQLModel, table=True):
    """One federated hyperparameter search (:mod:`coordinator.tuning`).

    ``request_json`` is the request as given; ``terms_json`` the search's terms every trial
    carries to the sites (:class:`privacy.tuning.SearchTerms`); ``trials_planned`` the
    random number of trials drawn before the first one (random stopping).
    """

    __tablename__ = "tunings"

    id: int | None = id_field()
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
    created_at: datetime = created_field()
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class TuningTrial(SQLModel, table=True):
    """One trial of a search: the settings Optuna proposed, its run, and its score (the
    mean of the sites' held-out AUC of the trial's final model)."""

    __tablename__ = "tuning_trials"
    __table_args__ = (UniqueConstraint("tuning_id", "number"),)

    id: int | None = id_field()
    tuning_id: int = Field(foreign_key="tunings.id", nullable=False, index=True)
    number: int = Field(nullable=False)
    run_id: int | None = Field(default=None, foreign_key="runs.id")
    params_json: str = Field(sa_type=Text, nullable=False)
    status: str = Field(default="running", max_length=16, nullable=False)
    score: float | None = Field(default=None)
    created_at: datetime = created_field()


# --- evaluations on demand (revision 0014) ---------------------------------------------------

EVALUATION_STATUSES: Final = frozenset({"pending", "running", "completed", "failed"})


class Evaluation(SQLModel, table=True):
    """A federated evaluation of one checkpoint on the sites' held-out data, on demand.

    ``results_json`` holds ``{site: {metric: value}}`` for the sites that answered and
    ``failed_json`` ``{site: reason}`` for those that did not (refused, offline, late).
    """

    __tablename__ = "evaluations"

    id: int | None = id_field()
    run_id: int = Field(foreign_key="runs.id", nullable=False, index=True)
    release_id: str | None = Field(default=None, max_length=128)
    round_number: int = Field(nullable=False)
    checkpoint_sha256: str = Field(max_length=64, nullable=False)
    requested_by: str = Field(max_length=64, nullable=False)
    status: str = Field(default="pending", max_length=16, nullable=False)
    flwr_run_id: str | None = Field(default=None, max_length=32)
    created_at: datetime = created_field()
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    failure_reason: str | None = Field(default=None, sa_type=Text)
    results_json: str = Field(default="{}", sa_type=Text, nullable=False)
    failed_json: str = Field(default="{}", sa_type=Text, nullable=False)
    # Each site is also asked for its local-only DP baseline (site_agent.local_baseline).
    local_only: bool = Field(default=False, nullable=False,
                             sa_column_kwargs={"server_default": false()})
