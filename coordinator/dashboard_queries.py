"""The reads the portal's dashboard makes (:mod:`coordinator.portal_dashboard`).

A page of runs, each run's newest round, what each site reported spent per project,
certificate expiry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import func
from sqlmodel import Session, col, select

from coordinator.models import (
    Project,
    Round,
    Run,
    SiteCertificate,
    SiteMetric,
)

__all__ = [
    "EPSILON_METRIC",
    "certificate_expiry",
    "latest_rounds",
    "run_page",
    "site_epsilon_by_project",
]


# The cumulative epsilon of a run at a site after a round, as the site reports it.
EPSILON_METRIC: Final = "epsilon-spent"


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
