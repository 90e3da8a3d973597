"""What the Flower ServerApp and the coordinator write about a run as a whole.

Each function is one short transaction on its own (the ServerApp holds an ``Engine``, not a
session), and each can be repeated safely where a resumed run may repeat a step: a run
finished twice keeps its first outcome. Audit entries (actor :data:`SERVERAPP_ACTOR`)
record the run starting and finishing.

The rounds of a run (rounds, per-site metrics, checkpoints, update digests) are in
:mod:`coordinator.round_records`; its admission and the sites' data fingerprints, which
live in the audit log only, in :mod:`coordinator.run_audit`; the portal dashboard's reads
in :mod:`coordinator.dashboard_queries`.
"""

from __future__ import annotations

import json
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.mlflow_outbox import note_run_finished
from coordinator.models import (
    RUN_FINAL_STATUSES,
    Project,
    Run,
    Site,
    utcnow,
)

__all__ = [
    "SERVERAPP_ACTOR",
    "RunNotFoundError",
    "cancel_request",
    "finish_run",
    "get_run",
    "mark_run_started",
    "note_cancel_delivered",
    "note_run_resumed",
    "record_run_outcome",
    "run_config",
    "running_run_ids",
    "site_names_by_node_id",
]


SERVERAPP_ACTOR: Final = "serverapp"

_NOT_RESUMABLE: Final = frozenset({"completed", "stopped", "cancelled"})


class RunNotFoundError(LookupError):
    """Raised when a run id does not exist."""


def get_run(session: Session, run_id: int) -> Run:
    """The run ``run_id``; raises :class:`RunNotFoundError` if there is none."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(f"run {run_id} not found")
    return run


def run_config(engine: Engine, run_id: int) -> dict[str, Any]:
    """The run's resolved configuration plus its identity, for the ServerApp to start from.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.

    Returns:
        The stored configuration (see :class:`coordinator.schemas.RunConfig`) with ``run_id``,
        ``project`` and ``task`` added.

    Raises:
        RunNotFoundError: No such run.
    """
    with session_scope(engine) as session:
        run = get_run(session, run_id)
        project = session.get(Project, run.project_id)
        assert project is not None  # foreign key
        config: dict[str, Any] = json.loads(run.config_json)
        config.update(run_id=run_id, project=project.name, task=run.task)
        return config


def mark_run_started(engine: Engine, run_id: int, flwr_run_id: str) -> None:
    """Record that the Flower run ``flwr_run_id`` executes this run (again, if resumed).

    ``started_at`` keeps the first start. Repeating the call with the same Flower run id
    changes nothing and writes no second audit entry. A ``failed`` run may be resumed (as a
    new Flower run from its last checkpoint): it becomes ``running`` again and its failure
    reason is cleared (the audit log keeps it).

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        flwr_run_id: Flower's run id (text: it is an unsigned 64-bit integer).

    Raises:
        RunNotFoundError: No such run.
        ValueError: The run has completed or was stopped.
    """
    with session_scope(engine) as session:
        run = get_run(session, run_id)
        if run.status in _NOT_RESUMABLE:
            raise ValueError(f"run {run_id} has already finished ({run.status})")
        if run.status == "running" and run.flwr_run_id == flwr_run_id:
            return
        resumed = run.started_at is not None
        run.status = "running"
        run.flwr_run_id = flwr_run_id
        run.failure_reason = None
        run.finished_at = None
        if run.started_at is None:
            run.started_at = utcnow()
        session.add(run)
        append_event(
            session,
            actor=SERVERAPP_ACTOR,
            action="run.resumed" if resumed else "run.started",
            subject=f"run:{run_id}",
            detail={"flwr_run_id": flwr_run_id},
        )


def finish_run(engine: Engine, run_id: int, *, status: str, reason: str | None) -> None:
    """Record the run's outcome. A run that has already finished keeps its first outcome.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        status: ``"completed"``, ``"failed"``, ``"stopped"`` or ``"cancelled"``.
        reason: Why it failed, stopped or was cancelled (``None`` when completed).

    Raises:
        RunNotFoundError: No such run.
        ValueError: Bad status.
    """
    _check_final(status)
    with session_scope(engine) as session:
        run = get_run(session, run_id)
        if run.status in RUN_FINAL_STATUSES:
            return
        record_run_outcome(session, run, status=status, reason=reason, actor=SERVERAPP_ACTOR)
        note_run_finished(session, run)


def record_run_outcome(
    session: Session, run: Run, *, status: str, reason: str | None, actor: str
) -> None:
    """Set a run's final status in the session's transaction and audit it (caller commits).

    Args:
        session: Open session; the caller commits.
        run: The run row.
        status: ``"completed"``, ``"failed"``, ``"stopped"`` or ``"cancelled"``.
        reason: Why it failed, stopped or was cancelled.
        actor: Who ended it (a user name, or :data:`SERVERAPP_ACTOR`).

    Raises:
        ValueError: Bad status.
    """
    _check_final(status)
    run.status = status
    run.failure_reason = reason
    run.finished_at = utcnow()
    session.add(run)
    append_event(
        session,
        actor=actor,
        action="run.finished",
        subject=f"run:{run.id}",
        detail={"status": status, "reason": reason},
    )


def _check_final(status: str) -> None:
    if status not in RUN_FINAL_STATUSES:
        raise ValueError(f"run status must be one of {sorted(RUN_FINAL_STATUSES)}, got {status!r}")


def cancel_request(engine: Engine, run_id: int) -> tuple[str, str] | None:
    """Who asked to cancel the run and why, or None while nobody has.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.

    Raises:
        RunNotFoundError: No such run.
    """
    with session_scope(engine) as session:
        run = get_run(session, run_id)
        if run.cancel_requested_at is None:
            return None
        return run.cancelled_by or "?", run.cancel_reason or ""


def site_names_by_node_id(engine: Engine) -> dict[str, str]:
    """Map Flower node id to site name, for registered (not revoked) sites.

    A node id missing from the map is not a site the coordinator trusts.

    Args:
        engine: Coordinator database engine.

    Returns:
        ``{flower_node_id: site_name}``.
    """
    with session_scope(engine) as session:
        rows = session.exec(
            select(Site.flower_node_id, Site.name).where(
                Site.status == "registered", col(Site.flower_node_id).is_not(None)
            )
        ).all()
        return {node_id: name for node_id, name in rows if node_id is not None}


def running_run_ids(engine: Engine) -> list[int]:
    """Ids of the runs that are pending or running (not yet finished), to be kept going.

    A run someone asked to cancel is left out: it is never relaunched; the coordinator's
    cancellation check (:func:`coordinator.run_control.enforce_cancellations`) ends it.

    Args:
        engine: Coordinator database engine.

    Returns:
        Run ids, oldest first.
    """
    with session_scope(engine) as session:
        rows = session.exec(
            select(Run.id).where(col(Run.status).in_(("pending", "running")),
                                 col(Run.cancel_requested_at).is_(None)).order_by(col(Run.id))
        ).all()
        return [int(r) for r in rows if r is not None]


def note_cancel_delivered(engine: Engine, run_id: int, *, told: list[str],
                          not_told: dict[str, str]) -> None:
    """Audit which sites acknowledged a run's cancellation and which could not be told."""
    with session_scope(engine) as session:
        append_event(session, actor=SERVERAPP_ACTOR, action="run.cancel_delivered",
                     subject=f"run:{run_id}", detail={"told": told, "not_told": not_told})


def note_run_resumed(engine: Engine, run_id: int, *, why: str, flwr_run_id: str) -> None:
    """Audit that a run was relaunched as a new Flower run after an interruption."""
    with session_scope(engine) as session:
        append_event(session, actor="coordinator", action="run.relaunched",
                     subject=f"run:{run_id}", detail={"why": why, "flwr_run_id": flwr_run_id})
