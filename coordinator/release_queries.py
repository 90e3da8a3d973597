"""The release workflow's small queries: a run with its project, a version's checkpoint,
the sites' metrics by round (each raising :class:`~coordinator.release_errors.NotFound`)."""

from __future__ import annotations

from sqlmodel import Session, col, select

from coordinator.models import Checkpoint, Project, Run, SiteMetric
from coordinator.release_errors import NotFound

__all__ = ["checkpoint_row", "metrics_by_round", "run_and_project"]


def run_and_project(session: Session, run_id: int) -> tuple[Run, Project]:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    project = session.get(Project, run.project_id)
    assert project is not None  # foreign key
    return run, project


def checkpoint_row(session: Session, run_id: int, round_number: int | None) -> Checkpoint:
    query = select(Checkpoint).where(Checkpoint.run_id == run_id)
    if round_number is None:
        query = query.order_by(col(Checkpoint.round_number).desc()).limit(1)
    else:
        query = query.where(Checkpoint.round_number == round_number)
    row = session.exec(query).first()
    if row is None:
        which = "any round" if round_number is None else f"round {round_number}"
        raise NotFound(f"run {run_id} has no checkpoint for {which}")
    return row


def metrics_by_round(session: Session, run_id: int) -> dict[int, dict[str, dict[str, float]]]:
    rows = session.exec(select(SiteMetric).where(SiteMetric.run_id == run_id)).all()
    out: dict[int, dict[str, dict[str, float]]] = {}
    for m in rows:
        out.setdefault(m.round_number, {}).setdefault(m.site_name, {})[m.name] = m.value
    return out
