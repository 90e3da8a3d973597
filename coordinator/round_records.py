"""What the Flower ServerApp writes about each round: the round, metrics, checkpoints.

Each function is one short transaction on its own, and each can be repeated safely where a
resumed run may repeat a step: a round started twice is one row, metrics and checkpoints
recorded twice are updated in place. Audit entries record every site that failed a round,
every update rejected before aggregation and the digests of the updates each round
received (:func:`update_digests` reads them back).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import (
    AuditEvent,
    Checkpoint,
    Round,
    SiteMetric,
    utcnow,
)
from coordinator.repository import SERVERAPP_ACTOR, get_run

__all__ = [
    "finish_round",
    "last_checkpoint",
    "record_checkpoint",
    "record_site_metrics",
    "start_round",
    "update_digests",
]


_UPDATES_ACTION: Final = "round.updates"

_FINISHED_ROUND_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})

logger = logging.getLogger(__name__)


def _round(session: Session, run_id: int, number: int) -> Round | None:
    return session.exec(
        select(Round).where(Round.run_id == run_id, Round.number == number)
    ).first()


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
        get_run(session, run_id)
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
        get_run(session, run_id)
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
        get_run(session, run_id)
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
        get_run(session, run_id)
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
        get_run(session, run_id)
        row = session.exec(
            select(Checkpoint)
            .where(Checkpoint.run_id == run_id)
            .order_by(col(Checkpoint.round_number).desc())
            .limit(1)
        ).first()
        return None if row is None else (row.round_number, row.path, row.sha256)
