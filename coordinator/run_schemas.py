"""Request and response bodies of the REST API for runs: launch, admission, rounds, metrics,
checkpoints.

The launch body is :class:`RunCreate`, built on the one run configuration of
:mod:`fedward.run_config`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
)

from coordinator.models import Checkpoint, Round, Run
from fedward.run_config import RunConfig, RunRequest

__all__ = [
    "AdmissionPublic",
    "CheckpointPublic",
    "FailedSite",
    "RoundMetrics",
    "RoundPublic",
    "RunCreate",
    "RunDetail",
    "RunMetrics",
    "RunPublic",
    "SiteReason",
    "SiteWaiting",
]


# --- runs --------------------------------------------------------------------------------


class RunCreate(RunRequest):
    """Body of ``POST /runs``: what to train, how long, with which privacy budget and where.

    The fields, defaults and bounds are the one run configuration's
    (:class:`fedward.run_config.RunRequest`). ``lr`` and ``batch_size`` default to the
    task's own defaults; ``sites`` defaults to every registered site. ``min_sites`` is
    checked against the sites that will take part when the run is created. The aggregation
    and its options are checked against the coordinator's aggregation registry.
    """

    @field_validator("aggregation")
    @classmethod
    def _known_aggregation(cls, value: str) -> str:
        from coordinator.aggregation import aggregator_class

        aggregator_class(value)  # AggregationError (a ValueError) names the known ones
        return value

    @field_validator("aggregation_options")
    @classmethod
    def _aggregation_options(cls, value: dict[str, Any], info: ValidationInfo
                             ) -> dict[str, Any]:
        from coordinator.aggregation import validate_options

        name = info.data.get("aggregation")
        if name is None:  # the name itself was refused; that error says why
            return value
        return validate_options(name, value)


class SiteWaiting(BaseModel):
    """A site that waits for a local approval of the run."""

    site: str
    since: datetime | None = Field(description="When the site first answered "
                                   "pending-approval.")
    reason: str
    action: str = Field(description="What the site's IT does to let the run in.")


class SiteReason(BaseModel):
    """A site and why (refused, or no usable answer)."""

    site: str
    reason: str


class AdmissionPublic(BaseModel):
    """Which sites accepted the run before round 1, which wait for approval, which refused.

    ``state``: ``waiting`` (the admission is still asking), ``admitted`` (training
    started; ``waiting`` then lists the sites whose latest train task was still pending
    approval), ``not-admitted`` (too few sites accepted: the run failed).
    """

    state: str
    updated_at: datetime
    started_at: datetime | None
    deadline: datetime | None = Field(description="When the approval wait ends.")
    accepted: list[str]
    waiting: list[SiteWaiting]
    refused: list[SiteReason]
    unanswered: list[SiteReason]
    offline: list[str]

    @classmethod
    def of(cls, run_id: int, updated_at: datetime, detail: dict[str, Any]
           ) -> AdmissionPublic:
        """Build from the detail of the run's latest admission audit entry."""
        def when(raw: object) -> datetime | None:
            try:
                return datetime.fromisoformat(str(raw)) if raw else None
            except ValueError:
                return None

        def reasons(key: str) -> list[SiteReason]:
            return [SiteReason(site=str(s), reason=str(r))
                    for s, r in sorted(dict(detail.get(key) or {}).items())]

        waiting = [
            SiteWaiting(site=str(site), since=when(info.get("since")),
                        reason=str(info.get("reason", "")),
                        action=f"its IT runs `fedward-site approve {run_id}` (or `deny`)")
            for site, info in sorted(dict(detail.get("waiting") or {}).items())
            if isinstance(info, dict)
        ]
        return cls(state=str(detail.get("state", "")), updated_at=updated_at,
                   started_at=when(detail.get("started")),
                   deadline=when(detail.get("deadline")),
                   accepted=[str(s) for s in detail.get("accepted") or []],
                   waiting=waiting, refused=reasons("refused"),
                   unanswered=reasons("unanswered"),
                   offline=[str(s) for s in detail.get("offline") or []])


class RunPublic(BaseModel):
    """A run.

    ``waiting_for_approval`` names the sites the run waits for now (their policy wants a
    local approval and nobody has given it), ``waiting_since`` when the first of them
    started waiting; both are empty once the run has ended.
    """

    id: int
    project: str
    task: str
    status: str
    config: RunConfig
    launched_by: str
    flwr_run_id: str | None
    failure_reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    waiting_for_approval: list[str] = Field(default_factory=list)
    waiting_since: datetime | None = None
    admission: AdmissionPublic | None = None
    cancel_requested_at: datetime | None = Field(
        default=None, description="When someone asked to cancel the run (it ends within "
                                  "its round deadline plus 5 s).")
    cancelled_by: str | None = Field(default=None, description="Who asked to cancel it.")
    cancel_reason: str | None = Field(default=None, description="Why, as they said.")

    @classmethod
    def of(cls, run: Run, project_name: str,
           admission: tuple[str, datetime, dict[str, Any]] | None = None) -> RunPublic:
        """Build from the table row, its project's name and its latest admission entry."""
        assert run.id is not None
        adm = None if admission is None else AdmissionPublic.of(run.id, admission[1],
                                                                admission[2])
        live = adm is not None and run.status in ("pending", "running")
        waiting = adm.waiting if live and adm is not None else []
        since = [w.since for w in waiting if w.since is not None]
        return cls(
            id=run.id,
            project=project_name,
            task=run.task,
            status=run.status,
            config=RunConfig.model_validate_json(run.config_json),
            launched_by=run.launched_by,
            flwr_run_id=run.flwr_run_id,
            failure_reason=run.failure_reason,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            waiting_for_approval=[w.site for w in waiting],
            waiting_since=min(since) if since else None,
            admission=adm,
            cancel_requested_at=run.cancel_requested_at,
            cancelled_by=run.cancelled_by,
            cancel_reason=run.cancel_reason,
        )


class FailedSite(BaseModel):
    """A site that failed in a round: where (``phase``) and why."""

    site: str
    phase: str
    reason: str
    code: str | None = Field(default=None, description="Machine-readable failure label.")


class RoundPublic(BaseModel):
    """One round of a run."""

    number: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    seconds: float | None
    participating_sites: list[str]
    failed_sites: list[FailedSite]
    late_sites: list[str]

    @classmethod
    def of(cls, round_: Round) -> RoundPublic:
        """Build from the table row."""
        return cls(
            number=round_.number,
            status=round_.status,
            started_at=round_.started_at,
            finished_at=round_.finished_at,
            seconds=round_.seconds,
            participating_sites=json.loads(round_.participating_sites_json),
            failed_sites=json.loads(round_.failed_sites_json),
            late_sites=json.loads(round_.late_sites_json),
        )


class RunDetail(RunPublic):
    """A run with its rounds and a summary of them."""

    rounds_completed: int
    rounds_failed: int
    current_round: int | None = Field(description="Number of the round running now, if any.")
    rounds: list[RoundPublic]


class RoundMetrics(BaseModel):
    """The scalar metrics each site reported in one round: ``sites[site][metric]``."""

    round: int
    sites: dict[str, dict[str, float]]


class RunMetrics(BaseModel):
    """Metrics of a run, per round, per site."""

    run_id: int
    rounds: list[RoundMetrics]


class CheckpointPublic(BaseModel):
    """A saved global model."""

    run_id: int
    round_number: int
    path: str = Field(description="Relative to the coordinator's home directory.")
    sha256: str
    format: str
    created_at: datetime

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> CheckpointPublic:
        """Build from the table row."""
        return cls(
            run_id=checkpoint.run_id,
            round_number=checkpoint.round_number,
            path=checkpoint.path,
            sha256=checkpoint.sha256,
            format=checkpoint.format,
            created_at=checkpoint.created_at,
        )
