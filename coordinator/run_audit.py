"""What the audit log alone records of a run: its admission and the sites' data fingerprints.

The admission state (which sites accepted the run, which wait for a local approval, which
refused it) and the fingerprints live in the audit log only: it is the tamper-evident
record, and the REST view of a run reads its admission from there
(:func:`latest_admissions`), the lineage of a model version its fingerprints.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import (
    AuditEvent,
)
from coordinator.repository import SERVERAPP_ACTOR, get_run

__all__ = [
    "ADMISSION_ACTIONS",
    "admission_record",
    "data_fingerprints",
    "latest_admissions",
    "record_admission",
    "record_data_fingerprint",
]


# run.waiting: the set of sites waiting for a local approval changed; run.admitted: the
# admission ended and training starts; run.not_admitted: too few sites accepted the run.
ADMISSION_ACTIONS: Final = ("run.waiting", "run.admitted", "run.not_admitted")


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
        get_run(session, run_id)
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
