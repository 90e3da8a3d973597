"""What the Flower ServerApp writes while a run executes.

Each function is one short transaction on its own (the ServerApp holds an ``Engine``, not a
session), and each can be repeated safely where a resumed run may repeat a step: a round
started twice is one row, metrics and checkpoints recorded twice are updated in place, and a
run finished twice keeps its first outcome. Audit entries (actor :data:`SERVERAPP_ACTOR`)
record the run starting and finishing, every site that failed a round, every update
rejected before aggregation, the digests of the updates each round received, and the run's
admission (which sites accepted it, which wait for a local approval, which refused it).

The admission state and the update digests live in the audit log only: it is the
tamper-evident record, and the REST view of a run reads its admission from there
(:func:`latest_admissions`).

The last section holds the reads the portal's dashboard makes (a page of runs, each run's
newest round, what each site reported spent per project, certificate expiry).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Final

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.mlflow_outbox import note_run_finished
from coordinator.models import (
    RUN_FINAL_STATUSES,
    AuditEvent,
    Checkpoint,
    Project,
    Round,
    Run,
    Site,
    SiteCertificate,
    SiteMetric,
    utcnow,
)

__all__ = [
    "ADMISSION_ACTIONS",
    "EPSILON_METRIC",
    "SERVERAPP_ACTOR",
    "RunNotFoundError",
    "admission_record",
    "cancel_request",
    "certificate_expiry",
    "data_fingerprints",
    "finish_round",
    "finish_run",
    "last_checkpoint",
    "latest_admissions",
    "latest_rounds",
    "mark_run_started",
    "note_cancel_delivered",
    "note_run_resumed",
    "record_admission",
    "record_checkpoint",
    "record_data_fingerprint",
    "record_run_outcome",
    "record_site_metrics",
    "run_config",
    "run_page",
    "running_run_ids",
    "site_epsilon_by_project",
    "site_names_by_node_id",
    "start_round",
    "update_digests",
]

SERVERAPP_ACTOR: Final = "serverapp"
# run.waiting: the set of sites waiting for a local approval changed; run.admitted: the
# admission ended and training starts; run.not_admitted: too few sites accepted the run.
ADMISSION_ACTIONS: Final = ("run.waiting", "run.admitted", "run.not_admitted")
_UPDATES_ACTION: Final = "round.updates"
# The cumulative epsilon of a run at a site after a round, as the site reports it.
EPSILON_METRIC: Final = "epsilon-spent"
_FINISHED_ROUND_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
_NOT_RESUMABLE: Final = frozenset({"completed", "stopped", "cancelled"})

logger = logging.getLogger(__name__)


class RunNotFoundError(LookupError):
    """Raised when a run id does not exist."""


def _run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(f"run {run_id} not found")
    return run


def _round(session: Session, run_id: int, number: int) -> Round | None:
    return session.exec(
        select(Round).where(Round.run_id == run_id, Round.number == number)
    ).first()


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
        run = _run(session, run_id)
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
        run = _run(session, run_id)
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


def start_round(engine: Engine, run_id: int, number: int) -> None:
    """Record that round ``number`` has started.

    Starting a round that already has a row (a resumed run repeating it) resets that row to
    ``running`` instead of adding a second one.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        number: 1-based round number.

    Raises:
        RunNotFoundError: No such run.
        ValueError: ``number`` is below 1.
    """
    if number < 1:
        raise ValueError(f"round numbers start at 1, got {number}")
    with session_scope(engine) as session:
        _run(session, run_id)
        round_ = _round(session, run_id, number)
        if round_ is None:
            round_ = Round(run_id=run_id, number=number)
        else:
            round_.status = "running"
            round_.started_at = utcnow()
            round_.finished_at = None
            round_.seconds = None
            round_.participating_sites_json = "[]"
            round_.failed_sites_json = "[]"
            round_.late_sites_json = "[]"
        session.add(round_)


def _check_failed(failed: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for entry in failed:
        missing = {"site", "phase", "reason"} - set(entry)
        if missing:
            raise ValueError(f"failed site entry {entry!r} lacks {', '.join(sorted(missing))}")
        # Extra keys (such as an error ``code``) are kept, as text.
        out.append({str(k): str(v) for k, v in entry.items()})
    return out


def finish_round(
    engine: Engine,
    run_id: int,
    number: int,
    *,
    status: str,
    participating: list[str],
    failed: list[dict[str, Any]],
    late: list[str],
    seconds: float,
    update_digests: dict[str, str] | None = None,
) -> None:
    """Record how round ``number`` ended, and audit every site that failed in it.

    Finishing a round that was never started creates it. Finishing it again with nothing
    new in between (no :func:`start_round`) updates the row but writes no second set of
    audit entries. A failure in phase ``validate`` (an update rejected before aggregation)
    is audited as ``update.rejected``, any other as ``site.failed``.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        number: 1-based round number.
        status: ``"completed"``, ``"failed"`` or ``"cancelled"``.
        participating: Sites whose results were aggregated.
        failed: One ``{"site", "phase", "reason"}`` per site that failed; extra keys such
            as ``"code"`` are kept.
        late: Sites that missed the round's deadline.
        seconds: Wall time of the round.
        update_digests: SHA-256 of each update received in the round (site -> digest),
            audited as ``round.updates``; :func:`update_digests` reads them back so that a
            resumed run still recognises a replayed update.

    Raises:
        RunNotFoundError: No such run.
        ValueError: Bad status, round number or failed-site entry.
    """
    if status not in _FINISHED_ROUND_STATUSES:
        raise ValueError(f"round status must be completed, failed or cancelled, got {status!r}")
    if number < 1:
        raise ValueError(f"round numbers start at 1, got {number}")
    failures = _check_failed(failed)
    with session_scope(engine) as session:
        _run(session, run_id)
        round_ = _round(session, run_id, number)
        if round_ is None:
            round_ = Round(run_id=run_id, number=number)
        first_finish = round_.status == "running"
        round_.status = status
        round_.finished_at = utcnow()
        round_.seconds = float(seconds) if math.isfinite(seconds) else None
        round_.participating_sites_json = json.dumps(list(participating))
        round_.failed_sites_json = json.dumps(failures)
        round_.late_sites_json = json.dumps(list(late))
        session.add(round_)
        if not first_finish:
            return
        for failure in failures:
            append_event(
                session,
                actor=SERVERAPP_ACTOR,
                action="update.rejected" if failure["phase"] == "validate" else "site.failed",
                subject=f"site:{failure['site']}",
                detail={"run_id": run_id, "round": number,
                        **{k: v for k, v in failure.items() if k != "site"}},
            )
        for site in late:
            append_event(
                session,
                actor=SERVERAPP_ACTOR,
                action="site.late",
                subject=f"site:{site}",
                detail={"run_id": run_id, "round": number},
            )
        if update_digests:
            append_event(
                session,
                actor=SERVERAPP_ACTOR,
                action=_UPDATES_ACTION,
                subject=f"run:{run_id}",
                detail={"round": number, "sha256": dict(sorted(update_digests.items()))},
            )


def update_digests(engine: Engine, run_id: int) -> dict[int, dict[str, str]]:
    """The digests of the updates each round of a run received (see :func:`finish_round`).

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.

    Returns:
        ``{round: {site: sha256}}``; a round finished twice (a resumed run) merges both.
    """
    out: dict[int, dict[str, str]] = {}
    with session_scope(engine) as session:
        rows = session.exec(select(AuditEvent).where(
            AuditEvent.action == _UPDATES_ACTION,
            AuditEvent.subject == f"run:{run_id}").order_by(col(AuditEvent.id))).all()
        for event in rows:
            detail = json.loads(event.detail_json)
            out.setdefault(int(detail["round"]), {}).update(
                {str(k): str(v) for k, v in detail["sha256"].items()})
    return out


def record_admission(engine: Engine, run_id: int, *, action: str,
                     detail: dict[str, Any]) -> None:
    """Audit a change of a run's admission (one of :data:`ADMISSION_ACTIONS`).

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        action: ``run.waiting``, ``run.admitted`` or ``run.not_admitted``.
        detail: The admission state: ``state``, ``waiting`` (site -> since, reason),
            ``accepted``, ``refused`` and ``unanswered`` (site -> reason), ``offline``,
            ``started`` and ``deadline`` (ISO 8601, UTC).

    Raises:
        RunNotFoundError: No such run.
        ValueError: Unknown action.
    """
    if action not in ADMISSION_ACTIONS:
        raise ValueError(f"admission action must be one of {ADMISSION_ACTIONS}, got {action!r}")
    with session_scope(engine) as session:
        _run(session, run_id)
        append_event(session, actor=SERVERAPP_ACTOR, action=action, subject=f"run:{run_id}",
                     detail=detail)


def latest_admissions(session: Session, run_ids: list[int]
                      ) -> dict[int, tuple[str, datetime, dict[str, Any]]]:
    """The newest admission entry of each run: ``{run_id: (action, at, detail)}``.

    Runs without one (admission not reached yet, or runs older than it) are absent.

    Args:
        session: Open session.
        run_ids: The runs to look up.
    """
    if not run_ids:
        return {}
    subjects = [f"run:{i}" for i in run_ids]
    rows = session.exec(select(AuditEvent).where(
        col(AuditEvent.action).in_(ADMISSION_ACTIONS),
        col(AuditEvent.subject).in_(subjects)).order_by(col(AuditEvent.id))).all()
    out: dict[int, tuple[str, datetime, dict[str, Any]]] = {}
    for event in rows:
        try:
            detail = json.loads(event.detail_json)
        except ValueError:
            continue  # a tampered entry; /audit/verify names it
        if isinstance(detail, dict):
            out[int(event.subject.split(":", 1)[1])] = (event.action, event.at, detail)
    return out


def admission_record(engine: Engine, run_id: int) -> tuple[str, dict[str, Any]] | None:
    """The newest admission entry of a run as ``(action, detail)``, or None."""
    with session_scope(engine) as session:
        found = latest_admissions(session, [run_id]).get(run_id)
    return None if found is None else (found[0], found[2])


def record_site_metrics(
    engine: Engine, run_id: int, number: int, site_name: str, metrics: dict[str, float]
) -> None:
    """Store the scalar metrics one site reported for one round (re-recording updates).

    NaN and infinite values are not stored (SQLite cannot hold them and JSON cannot carry
    them); they are logged as a warning. A diverged site should be reported as failed.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        number: 1-based round number.
        site_name: The reporting site.
        metrics: Metric name to value.

    Raises:
        RunNotFoundError: No such run.
    """
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    if len(finite) != len(metrics):
        dropped = sorted(set(metrics) - set(finite))
        logger.warning("run %s round %s site %s: non-finite metrics not stored: %s",
                       run_id, number, site_name, ", ".join(dropped))
    with session_scope(engine) as session:
        _run(session, run_id)
        existing = {
            m.name: m
            for m in session.exec(
                select(SiteMetric).where(
                    SiteMetric.run_id == run_id,
                    SiteMetric.round_number == number,
                    SiteMetric.site_name == site_name,
                    col(SiteMetric.name).in_(list(finite)),
                )
            )
        }
        for name, value in finite.items():
            row = existing.get(name) or SiteMetric(
                run_id=run_id, round_number=number, site_name=site_name, name=name, value=0.0
            )
            row.value = value
            session.add(row)


def _relative(path: str) -> str:
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(path).is_absolute() or ".." in posix.parts:
        raise ValueError(f"checkpoint path must be relative to the home directory: {path!r}")
    return posix.as_posix()


def record_checkpoint(
    engine: Engine, run_id: int, number: int, path: str, sha256: str
) -> None:
    """Record the global model saved after round ``number`` (recording again replaces it).

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        number: 1-based round number.
        path: File path relative to the coordinator's home (no ``..``).
        sha256: Hex SHA-256 of the file.

    Raises:
        RunNotFoundError: No such run.
        ValueError: Absolute or escaping path, or a malformed digest.
    """
    rel = _relative(str(path))
    digest = sha256.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    with session_scope(engine) as session:
        _run(session, run_id)
        row = session.exec(
            select(Checkpoint).where(
                Checkpoint.run_id == run_id, Checkpoint.round_number == number
            )
        ).first()
        if row is not None and row.path == rel and row.sha256 == digest:
            return
        if row is None:
            row = Checkpoint(run_id=run_id, round_number=number, path=rel, sha256=digest)
        else:
            row.path, row.sha256, row.created_at = rel, digest, utcnow()
        session.add(row)
        append_event(
            session,
            actor=SERVERAPP_ACTOR,
            action="checkpoint.saved",
            subject=f"run:{run_id}",
            detail={"round": number, "path": rel, "sha256": digest},
        )


def last_checkpoint(engine: Engine, run_id: int) -> tuple[int, str, str] | None:
    """The newest checkpoint of a run, where a resumed run starts from.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.

    Returns:
        ``(round_number, path relative to home, sha256)`` of the highest round saved, or
        ``None`` when the run has no checkpoint yet.

    Raises:
        RunNotFoundError: No such run.
    """
    with session_scope(engine) as session:
        _run(session, run_id)
        row = session.exec(
            select(Checkpoint)
            .where(Checkpoint.run_id == run_id)
            .order_by(col(Checkpoint.round_number).desc())
            .limit(1)
        ).first()
        return None if row is None else (row.round_number, row.path, row.sha256)


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
        run = _run(session, run_id)
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
        run = _run(session, run_id)
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


def record_data_fingerprint(engine: Engine, run_id: int, number: int, site_name: str,
                            fingerprint: dict[str, str]) -> None:
    """Record a site's data fingerprint (hashes and counts) in the audit log, once per run.

    The audit log is the record: it is tamper-evident and the lineage of a model version
    reads the fingerprints of its run from it.

    Args:
        engine: Coordinator database engine.
        run_id: Coordinator run id.
        number: Round in which the site reported it.
        site_name: The site.
        fingerprint: ``schema-hash``, ``content-hmac`` (keyed by the site) and row counts.
    """
    with session_scope(engine) as session:
        existing = session.exec(select(AuditEvent).where(
            AuditEvent.action == "site.data_fingerprint",
            AuditEvent.subject == f"run:{run_id}/site:{site_name}")).all()
        for event in existing:
            if json.loads(event.detail_json).get("fingerprint") == fingerprint:
                return
        append_event(session, actor=f"site:{site_name}", action="site.data_fingerprint",
                     subject=f"run:{run_id}/site:{site_name}",
                     detail={"round": number, "fingerprint": fingerprint})


def data_fingerprints(engine: Engine, run_id: int) -> dict[str, list[dict[str, Any]]]:
    """Every data fingerprint the sites of a run reported: site -> [{round, fingerprint}]."""
    out: dict[str, list[dict[str, Any]]] = {}
    with session_scope(engine) as session:
        rows = session.exec(select(AuditEvent).where(
            AuditEvent.action == "site.data_fingerprint",
            col(AuditEvent.subject).startswith(f"run:{run_id}/site:")).order_by(
                col(AuditEvent.id))).all()
        for event in rows:
            site = event.subject.split("/site:", 1)[1]
            out.setdefault(site, []).append(json.loads(event.detail_json))
    return out


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


# --- reads for the portal's dashboard (coordinator.portal_dashboard) ----------------------


def run_page(session: Session, *, status: str | None, project_id: int | None, offset: int,
             limit: int) -> tuple[list[tuple[Run, str]], int]:
    """One page of runs, newest first, and how many runs match the filter in all.

    Args:
        session: Open session.
        status: Only runs in this state (None: any).
        project_id: Only this project's runs (None: any).
        offset: Rows to skip.
        limit: Rows to return at most.

    Returns:
        ``([(run, project name), ...], total)``.
    """
    where: list[Any] = []
    if status is not None:
        where.append(col(Run.status) == status)
    if project_id is not None:
        where.append(col(Run.project_id) == project_id)
    total = session.exec(select(func.count()).select_from(Run).where(*where)).one()
    rows = session.exec(
        select(Run, Project.name).join(Project, col(Project.id) == col(Run.project_id))
        .where(*where).order_by(col(Run.id).desc()).offset(offset).limit(limit)).all()
    return [(run, name) for run, name in rows], int(total)


def latest_rounds(session: Session, run_ids: list[int]) -> dict[int, Round]:
    """The highest-numbered round row of each run (runs without a round are absent).

    Args:
        session: Open session.
        run_ids: The runs to look up.
    """
    if not run_ids:
        return {}
    newest = (select(Round.run_id, func.max(Round.number).label("number"))
              .where(col(Round.run_id).in_(run_ids)).group_by(col(Round.run_id)).subquery())
    rows = session.exec(select(Round).join(
        newest, (col(Round.run_id) == newest.c.run_id) & (col(Round.number) == newest.c.number)
    )).all()
    return {r.run_id: r for r in rows}


def site_epsilon_by_project(session: Session) -> dict[str, dict[str, tuple[float, int]]]:
    """What each site reported spent, per project: the sum of its runs' final figures.

    Each run's ``epsilon-spent`` is cumulative, so a run's figure is its largest. Summing
    a project's runs is basic composition: an upper bound of what the site's own ledger
    states for the project (it composes tighter).

    Args:
        session: Open session.

    Returns:
        ``{site: {project: (epsilon, runs)}}``.
    """
    per_run = (select(SiteMetric.site_name, SiteMetric.run_id,
                      func.max(SiteMetric.value).label("spent"))
               .where(col(SiteMetric.name) == EPSILON_METRIC)
               .group_by(col(SiteMetric.site_name), col(SiteMetric.run_id)).subquery())
    rows = session.exec(
        select(per_run.c.site_name, Project.name, func.sum(per_run.c.spent), func.count())
        .join(Run, col(Run.id) == per_run.c.run_id)
        .join(Project, col(Project.id) == col(Run.project_id))
        .group_by(per_run.c.site_name, col(Project.name))).all()
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for site, project, spent, runs in rows:
        out.setdefault(str(site), {})[str(project)] = (float(spent), int(runs))
    return out


def certificate_expiry(session: Session) -> dict[int, datetime]:
    """The latest expiry among each site's unrevoked certificates: ``{site id: not_after}``.

    Args:
        session: Open session.
    """
    rows = session.exec(select(SiteCertificate.site_id, func.max(SiteCertificate.not_after))
                        .where(col(SiteCertificate.revoked_at).is_(None))
                        .group_by(col(SiteCertificate.site_id))).all()
    # func.max bypasses UTCDateTime's result processing: SQLite hands back text or naive.
    out: dict[int, datetime] = {}
    for site_id, not_after in rows:
        value = datetime.fromisoformat(not_after) if isinstance(not_after, str) else not_after
        out[int(site_id)] = value if value.tzinfo else value.replace(tzinfo=UTC)
    return out
