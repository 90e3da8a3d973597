"""Drift reports of released models at the coordinator: store, alarm, list, propose.

A site's agent posts a report (:mod:`fedward.drift_wire`) to the gateway's
``POST /fedward/drift`` with its client certificate; the gateway hands the parsed JSON and
the site named in the certificate to :func:`store_report`, which checks it with the same
validator the site's egress guard used, reads it under the alarm rule and writes one row
of ``drift_reports`` (a report sent twice is one row).

**The alarm rule** (:class:`AlarmRule`, settings ``FEDWARD_DRIFT_PSI_ALARM`` and
``FEDWARD_DRIFT_ALPHA``): a feature is in alarm when its PSI is above 0.25, or its
two-sample test's p-value is below 0.01 divided by the number of features in the report
(Bonferroni: with 30 features tested at once, 0.01 / 30). A report is in alarm when one of
its features is. A check that failed is stored as ``drift-check-failed`` with its kind and
raises no drift alarm.

:func:`retraining_command` proposes the launch that retrains a drifting release: the
run the release came from, relaunched with its configuration (``launch --from RUN``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Engine, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from coordinator.db import session_scope
from coordinator.models import DriftReport, Release, ReleaseCandidate, Site
from fedward.drift_psi import PSI_ALARM
from fedward.drift_wire import report_problems

__all__ = ["FAILED", "AlarmRule", "DriftReportError", "alarm_features", "known_release",
           "known_site", "latest_reports", "list_reports", "report_public",
           "retraining_command", "store_report"]

FAILED: Final = "drift-check-failed"


class DriftReportError(ValueError):
    """A report the coordinator does not store; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class AlarmRule:
    """When a drift report's feature is in alarm.

    Attributes:
        psi: PSI above this is an alarm.
        alpha: Family-wise significance: p-values below ``alpha / features`` are an alarm.
    """

    psi: float = PSI_ALARM
    alpha: float = 0.01


def alarm_features(features: Mapping[str, Mapping[str, Any]], rule: AlarmRule) -> list[str]:
    """The features of a report in alarm under ``rule``, sorted."""
    if not features:
        return []
    cut = rule.alpha / len(features)
    return sorted(name for name, s in features.items()
                  if float(s["psi"]) > rule.psi or float(s["p_value"]) < cut)


def store_report(engine: Engine, *, site: str, doc: object, rule: AlarmRule
                 ) -> tuple[DriftReport, bool]:
    """Validate and store a site's report; return its row and whether it is new.

    Args:
        engine: The coordinator database.
        site: The site named in the client certificate the gateway verified.
        doc: The parsed JSON body.
        rule: The alarm rule in force.

    Raises:
        DriftReportError: 422 with every problem, or 404 for a release this coordinator
            never made (a check that ran names a release the site verified).
    """
    problems = report_problems(doc)
    if problems:
        raise DriftReportError(422, "drift report refused: " + "; ".join(problems))
    assert isinstance(doc, Mapping)
    ok = doc["status"] == "ok"
    features: dict[str, dict[str, Any]] = dict(doc["features"]) if ok else {}
    alarmed = alarm_features(features, rule)
    privacy = doc.get("privacy") or {}
    row = DriftReport(
        report_id=doc["report_id"], site_name=site, release_id=doc["release_id"],
        checked_at=datetime.strptime(doc["checked_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC),
        status="ok" if ok else FAILED, failure=None if ok else doc["failure"],
        rows_bucket=doc.get("rows"), labelled=doc.get("labelled"),
        treatment=privacy.get("treatment"), epsilon=privacy.get("epsilon"),
        accuracy=doc.get("accuracy"), auc=doc.get("auc"),
        max_psi=max((float(s["psi"]) for s in features.values()), default=None),
        min_p_value=min((float(s["p_value"]) for s in features.values()), default=None),
        alarm=bool(alarmed), alarm_features_json=json.dumps(alarmed),
        features_json=json.dumps(features, sort_keys=True, allow_nan=False))
    with Session(engine) as session:
        known = session.exec(select(DriftReport).where(
            DriftReport.report_id == row.report_id)).first()
        if known is not None:
            if known.site_name != site:
                raise DriftReportError(409, "drift report refused: this report id was "
                                            "sent by another site")
            return known, False
        if ok and session.exec(select(Release.id).where(
                Release.release_id == row.release_id)).first() is None:
            raise DriftReportError(404, f"drift report refused: release {row.release_id!r} "
                                        "is not a release of this coordinator")
    try:
        with session_scope(engine) as session:
            session.add(row)
    except IntegrityError:   # the same report, sent twice at once
        with Session(engine) as session:
            again = session.exec(select(DriftReport).where(
                DriftReport.report_id == row.report_id)).one()
        return again, False
    return row, True


def report_public(row: DriftReport) -> dict[str, Any]:
    """A stored report as the API and the CLI show it."""
    return {"id": row.id, "report_id": row.report_id, "site": row.site_name,
            "release": row.release_id, "checked_at": row.checked_at.isoformat(),
            "received_at": row.received_at.isoformat(), "status": row.status,
            "failure": row.failure, "rows": row.rows_bucket, "labelled": row.labelled,
            "treatment": row.treatment, "epsilon": row.epsilon, "accuracy": row.accuracy,
            "auc": row.auc, "max_psi": row.max_psi, "min_p_value": row.min_p_value,
            "alarm": row.alarm, "alarm_features": json.loads(row.alarm_features_json),
            "features": json.loads(row.features_json)}


def list_reports(session: Session, *, site: str | None, release: str | None, offset: int,
                 limit: int) -> tuple[Sequence[DriftReport], int]:
    """Reports newest first, filtered, a page at a time, and how many match."""
    query = select(DriftReport)
    count = select(func.count()).select_from(DriftReport)
    if site is not None:
        query = query.where(DriftReport.site_name == site)
        count = count.where(DriftReport.site_name == site)
    if release is not None:
        query = query.where(DriftReport.release_id == release)
        count = count.where(DriftReport.release_id == release)
    rows = session.exec(query.order_by(col(DriftReport.id).desc()).offset(offset)
                        .limit(limit)).all()
    return rows, int(session.exec(count).one())


def known_site(session: Session, name: str) -> bool:
    """Whether a site of this name exists."""
    return session.exec(select(Site.id).where(Site.name == name)).first() is not None


def known_release(session: Session, release_id: str) -> bool:
    """Whether a release (or a report about it) of this id exists."""
    return (session.exec(select(Release.id).where(Release.release_id == release_id)).first()
            is not None or session.exec(select(DriftReport.id).where(
                DriftReport.release_id == release_id)).first() is not None)


def latest_reports(session: Session, *, sites: Collection[str] | None = None,
                   releases: Collection[str] | None = None) -> list[DriftReport]:
    """The newest report of each (site, release) that ran: the one whose alarm stands (a
    check that failed after it says nothing about drift). For the metrics and the portal;
    ``sites`` and ``releases`` narrow it to those names."""
    ran = select(func.max(DriftReport.id)).where(DriftReport.status == "ok")
    if sites is not None:
        ran = ran.where(col(DriftReport.site_name).in_(sites))
    if releases is not None:
        ran = ran.where(col(DriftReport.release_id).in_(releases))
    newest = ran.group_by(col(DriftReport.site_name), col(DriftReport.release_id))
    return list(session.exec(select(DriftReport).where(col(DriftReport.id).in_(newest))
                             .order_by(col(DriftReport.site_name),
                                       col(DriftReport.release_id))).all())


def retraining_command(session: Session, release_id: str) -> str | None:
    """``fedward-coordinator launch --from RUN`` for the run the release came from."""
    run_id = session.exec(
        select(ReleaseCandidate.run_id)
        .join(Release, col(Release.candidate_id) == col(ReleaseCandidate.id))
        .where(Release.release_id == release_id)).first()
    return None if run_id is None else f"fedward-coordinator launch --from {run_id}"
