"""Release gate thresholds, the site-participation gate and gate progress.

A project's thresholds live in one JSON object per project (``project_gates``): the
per-site minimum metrics (``min_site_auc``, ``min_site_accuracy``; unset: none) and the
participation thresholds (``min_sites``, ``min_round_share``; unset: the defaults below).

``site_participation``
    Counts, from the run's recorded rounds up to the candidate's round, how many completed
    rounds each site's update was aggregated in. A site *contributed* when it took part in
    at least ``min_round_share`` of them; the gate passes when at least ``min_sites`` sites
    contributed. By default that is 2 sites, or every site of the run if it has fewer, each
    in at least half of the rounds: a model one of three hospitals trained does not pass.

While a candidate is ``evaluating`` its finished gates are recorded one by one
(:func:`record_partial_gates`), so a client polling it sees which gate is running
(:func:`running_gate`) and each result as soon as it is known.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import Project, ProjectGates, ReleaseCandidate, utcnow
from coordinator.release_errors import InvalidRequest, NotFound

__all__ = [
    "DEFAULT_MIN_ROUND_SHARE",
    "DEFAULT_MIN_SITES",
    "GATE_ORDER",
    "METRIC_THRESHOLDS",
    "PARTICIPATION_GATE",
    "PARTICIPATION_THRESHOLDS",
    "THRESHOLD_HELP",
    "contributing_sites",
    "gate",
    "get_gates",
    "participation_gate",
    "record_partial_gates",
    "running_gate",
    "set_gates",
    "threshold_problems",
]

PARTICIPATION_GATE: Final = "site_participation"
# The order the gates run in (and are listed in); the participation gate costs nothing and
# says the most about whether a model is the federation's at all, so it comes first.
GATE_ORDER: Final = (PARTICIPATION_GATE, "export", "site_metrics", "export_parity",
                     "privacy_statement")
# Project gate threshold name -> the evaluation metric it bounds from below.
METRIC_THRESHOLDS: Final[Mapping[str, str]] = {
    "min_site_auc": "auc",
    "min_site_accuracy": "accuracy",
}
PARTICIPATION_THRESHOLDS: Final = ("min_sites", "min_round_share")
DEFAULT_MIN_SITES: Final = 2
DEFAULT_MIN_ROUND_SHARE: Final = 0.5
# An upper bound that only catches typos (a federation of more sites is not planned).
_MAX_MIN_SITES: Final = 10_000
# What each threshold means, for `release gates PROJECT` and the guide.
THRESHOLD_HELP: Final[Mapping[str, str]] = {
    "min_sites": f"sites that must have contributed (default {DEFAULT_MIN_SITES}, or every "
                 "site of the run if it has fewer)",
    "min_round_share": "share of the completed rounds a site must have trained in to count "
                       f"as contributing (default {DEFAULT_MIN_ROUND_SHARE:g})",
    "min_site_auc": "held-out AUC every site must reach (default: not checked)",
    "min_site_accuracy": "held-out accuracy every site must reach (default: not checked)",
}


def threshold_problems(thresholds: Mapping[str, Any]) -> list[str]:
    """Every problem with a set of thresholds (``None`` values mean "unset" and pass).

    Args:
        thresholds: Threshold name -> value.

    Returns:
        One readable problem per bad name or value; empty when all are usable.
    """
    known = (*PARTICIPATION_THRESHOLDS, *METRIC_THRESHOLDS)
    problems = [f"unknown threshold {k!r} (known: {', '.join(known)})"
                for k in thresholds if k not in known]
    for name, value in thresholds.items():
        if value is None or name not in known:
            continue
        if name == "min_sites":
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= _MAX_MIN_SITES:
                problems.append(f"min_sites must be a whole number from 1 to {_MAX_MIN_SITES}")
        elif isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            problems.append(f"{name} must be a number")
        elif name == "min_round_share" and not 0.0 < value <= 1.0:
            problems.append("min_round_share must be above 0 and at most 1")
        elif name in METRIC_THRESHOLDS and not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be a number between 0 and 1")
    return problems


def gate(name: str, passed: bool, reason: str, figures: Any) -> dict[str, Any]:
    """One gate's recorded result: its name, whether it passed, why, and its figures."""
    return {"name": name, "passed": passed, "reason": reason, "figures": figures}


def contributing_sites(lineage: Mapping[str, Any],
                       thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """Who trained the model: completed rounds per site, measured against the thresholds.

    Args:
        lineage: The version's lineage
            (:func:`coordinator.release_lineage.build_lineage`): its ``rounds`` up to the
            version and the run's configured ``sites``.
        thresholds: The project's thresholds (``min_sites``, ``min_round_share`` if set).

    Returns:
        ``rounds`` (completed rounds up to the version), ``per_site`` (site -> ``rounds``
        trained and their ``share``), ``contributing`` (sites at or above the share),
        ``min_sites`` and ``min_round_share`` in force, and ``defaults`` (which of the two
        are the defaults).
    """
    completed = [r for r in lineage.get("rounds", []) if r.get("status") == "completed"]
    config = lineage.get("run", {}).get("config", {})
    sites: set[str] = set(config.get("sites") or [])
    for r in lineage.get("rounds", []):
        sites.update(r.get("participating_sites", []))
        sites.update(r.get("late_sites", []))
        sites.update(f.get("site") for f in r.get("failed_sites", []) if f.get("site"))
    counts = {s: sum(1 for r in completed if s in r.get("participating_sites", []))
              for s in sorted(sites)}
    n = len(completed)
    set_sites, set_share = thresholds.get("min_sites"), thresholds.get("min_round_share")
    min_sites = int(set_sites) if set_sites is not None \
        else max(1, min(DEFAULT_MIN_SITES, len(counts)))
    share = float(set_share) if set_share is not None else DEFAULT_MIN_ROUND_SHARE
    per_site = {s: {"rounds": k, "share": (k / n) if n else 0.0} for s, k in counts.items()}
    # A tiny tolerance so that 1 of 3 rounds counts against a share written as 0.333.
    contributing = [s for s, v in per_site.items()
                    if n and v["rounds"] > 0 and v["share"] + 1e-9 >= share]
    return {"rounds": n, "per_site": per_site, "contributing": contributing,
            "min_sites": min_sites, "min_round_share": share,
            "defaults": [k for k, v in (("min_sites", set_sites),
                                        ("min_round_share", set_share)) if v is None]}


def participation_gate(lineage: Mapping[str, Any],
                       thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """The ``site_participation`` gate of a version (see the module docstring).

    Args:
        lineage: The version's lineage.
        thresholds: The project's thresholds.

    Returns:
        The gate: passed, a reason that names every site with its rounds, and the figures
        of :func:`contributing_sites`.
    """
    figures = contributing_sites(lineage, thresholds)
    n, need, share = figures["rounds"], figures["min_sites"], figures["min_round_share"]
    counted: Sequence[str] = figures["contributing"]
    tally = ", ".join(f"{s} {v['rounds']}/{n}" for s, v in figures["per_site"].items())
    rule = f"each in at least {share:.0%} of the {n} completed round{'s' * (n != 1)}"
    if n == 0:
        return gate(PARTICIPATION_GATE, False, "no completed round up to this version",
                    figures)
    if len(counted) < need:
        outside = [s for s in figures["per_site"] if s not in counted]
        return gate(PARTICIPATION_GATE, False,
                    f"{len(counted)} site{'s' * (len(counted) != 1)} contributed, "
                    f"{need} needed ({rule}); rounds trained: {tally}"
                    + (f"; not counted: {', '.join(outside)}" if outside else ""), figures)
    return gate(PARTICIPATION_GATE, True,
                f"{len(counted)} site{'s' * (len(counted) != 1)} contributed ({rule}; "
                f"{need} needed); rounds trained: {tally}", figures)


def record_partial_gates(engine: Engine, candidate_id: int,
                         gates: Sequence[Mapping[str, Any]]) -> None:
    """Store the gates finished so far on a candidate that is still ``evaluating``.

    Opens its own short transaction; a candidate that left ``evaluating`` meanwhile is not
    touched.

    Args:
        engine: Coordinator database engine.
        candidate_id: The candidate.
        gates: The finished gates, in :data:`GATE_ORDER`, with no NaN or infinity (strict
            JSON has neither).
    """
    with session_scope(engine) as session:
        cand = session.get(ReleaseCandidate, candidate_id)
        if cand is None or cand.status != "evaluating":
            return
        cand.gates_json = json.dumps(list(gates), allow_nan=False)
        session.add(cand)


def running_gate(status: str, gates: Sequence[Mapping[str, Any]]) -> str | None:
    """The gate being evaluated now: the first of :data:`GATE_ORDER` with no result yet.

    Args:
        status: The candidate's status.
        gates: Its recorded gates.

    Returns:
        The gate's name, or ``None`` when the candidate is not ``evaluating``.
    """
    if status != "evaluating":
        return None
    done = {g.get("name") for g in gates}
    return next((name for name in GATE_ORDER if name not in done), None)


# --- project thresholds ------------------------------------------------------------------


def get_gates(session: Session, project_name: str) -> dict[str, float | int]:
    """A project's gate thresholds as set (empty: none set, the defaults apply).

    Raises:
        NotFound: No such project.
    """
    project = session.exec(select(Project).where(Project.name == project_name)).first()
    if project is None:
        raise NotFound(f"project {project_name!r} not found")
    row = session.exec(select(ProjectGates).where(ProjectGates.project_id == project.id)).first()
    return {} if row is None else dict(json.loads(row.thresholds_json))


def set_gates(session: Session, *, project_name: str,
              thresholds: Mapping[str, float | int | None], actor: str,
              merge: bool = False) -> dict[str, float | int]:
    """Replace (or, with ``merge``, change) a project's gate thresholds and audit the change
    (the caller commits).

    Args:
        session: Open session.
        project_name: The project.
        thresholds: Names from :data:`METRIC_THRESHOLDS` -> minimum in [0, 1], ``min_sites``
            -> a whole number >= 1, ``min_round_share`` -> a share in (0, 1]; ``None`` drops
            the threshold (the default applies again).
        actor: Who sets them.
        merge: Keep the thresholds ``thresholds`` does not name (otherwise they are
            dropped).

    Returns:
        The thresholds now set.

    Raises:
        NotFound: No such project.
        InvalidRequest: An unknown name or a value out of range (every problem at once).
    """
    project = session.exec(select(Project).where(Project.name == project_name)).first()
    if project is None:
        raise NotFound(f"project {project_name!r} not found")
    problems = threshold_problems(thresholds)
    if problems:
        raise InvalidRequest("; ".join(problems))
    row = session.exec(select(ProjectGates).where(ProjectGates.project_id == project.id)).first()
    before = {} if row is None else json.loads(row.thresholds_json)
    wanted = {**before, **thresholds} if merge else dict(thresholds)
    clean: dict[str, float | int] = {k: (int(v) if k == "min_sites" else float(v))
                                     for k, v in wanted.items() if v is not None}
    assert project.id is not None
    if row is None:
        row = ProjectGates(project_id=project.id, thresholds_json="{}", updated_by=actor)
    row.thresholds_json = json.dumps(clean, sort_keys=True)
    row.updated_by, row.updated_at = actor, utcnow()
    session.add(row)
    append_event(session, actor=actor, action="project.gates_set",
                 subject=f"project:{project_name}", detail={"before": before, "after": clean})
    return clean
