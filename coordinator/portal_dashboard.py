"""The portal's dashboard: runs, one run's live state, and the sites (``/portal``).

Staff (admin, ML engineer, reviewer) see these pages; clinicians see releases only, as
everywhere in the portal. Pages are rendered on the server with no script: a run that is
still pending or running reloads itself every :data:`REFRESH_S` seconds (a ``<meta
http-equiv="refresh">``, which the portal's Content-Security-Policy allows), and its
pictures are inline SVG drawn here with the release model card's chart code
(:mod:`coordinator.release_chart`).

Every list is paginated. The query string is checked by hand rather than by FastAPI, so a
bad page number or filter gets the portal's HTML error page with status 422 and a sentence
that says which values exist, never a 500 or a JSON body.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from sqlalchemy import func
from sqlmodel import Session, col, select

from coordinator import dashboard_queries, presence, run_audit, run_statistics
from coordinator.db import SessionDep
from coordinator.evaluation import EvaluationPublic, evaluations_of
from coordinator.models import (
    RUN_STATUSES,
    Project,
    ReleaseCandidate,
    Round,
    Run,
    Site,
    SiteMetric,
    User,
    utcnow,
)

# The portal's own page helpers: these pages share its session, layout and error page.
from coordinator.portal import PORTAL_PREFIX, _error, _page, _user
from coordinator.release_chart import PALETTE, panel, training_curve_svg
from coordinator.run_schemas import RunPublic
from fedward.roles import Permission, may

__all__ = ["REFRESH_S", "RUNS_PER_PAGE", "SITES_PER_PAGE", "router"]

RUNS_PER_PAGE: Final = 25
SITES_PER_PAGE: Final = 50
REFRESH_S: Final = 10
_LIVE: Final = frozenset({"pending", "running"})
_MAX_QUERY_VALUE: Final = 200
_STAFF_ONLY: Final = ("Only staff (admins, ML engineers, reviewers) see runs and sites; "
                      "approved releases are listed under Releases.")

router = APIRouter(prefix=PORTAL_PREFIX, include_in_schema=False)


class BadQuery(ValueError):
    """A page number or filter that names nothing; the message says what exists."""


# --- query checks ------------------------------------------------------------------------


def _page_number(raw: str | None) -> int:
    """The 1-based page asked for (1 when none is): a whole number from 1."""
    if raw is None or raw == "":
        return 1
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) < 1:
        raise BadQuery(f"page must be a whole number from 1, not {raw[:_MAX_QUERY_VALUE]!r}")
    return int(raw)


def _pages(page: int, total: int, per_page: int) -> int:
    """How many pages ``total`` rows fill; refuses a page past the last."""
    pages = max(1, math.ceil(total / per_page))
    if page > pages:
        raise BadQuery(f"page {page} does not exist: there "
                       f"{'is 1 page' if pages == 1 else f'are {pages} pages'}")
    return pages


def _state(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if raw not in RUN_STATUSES:
        raise BadQuery(f"unknown run state {raw[:_MAX_QUERY_VALUE]!r}: choose one of "
                       f"{', '.join(sorted(RUN_STATUSES))}")
    return raw


def _project(session: Session, raw: str | None) -> Project | None:
    if raw is None or raw == "":
        return None
    found = session.exec(select(Project).where(Project.name == raw[:_MAX_QUERY_VALUE])).first()
    if found is None:
        names = session.exec(select(Project.name).order_by(col(Project.name)).limit(21)).all()
        listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise BadQuery(f"no project named {raw[:_MAX_QUERY_VALUE]!r}; projects: "
                       f"{listed or 'none yet'}")
    return found


def _staff(request: Request, session: Session) -> User | Response:
    user = _user(request, session)
    if not may(user.role, Permission.STAFF):
        return _error(request, user, 403, _STAFF_ONLY)
    return user


def _bad(request: Request, user: User, err: BadQuery, back: str) -> Response:
    message = str(err)
    return _error(request, user, 422, f"{message[:1].upper()}{message[1:]}. "
                  f"Start again from {back}.")


# --- formatting --------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A duration as people read it: ``42 s``, ``3 min 05 s``, ``2 h 07 min``.

    Args:
        seconds: The duration (None or negative: unknown).
    """
    if seconds is None or seconds < 0 or not math.isfinite(seconds):
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _elapsed(run: Run, now: datetime) -> float | None:
    start = run.started_at or run.created_at
    end = run.finished_at or (now if run.status in _LIVE else None)
    return None if end is None else (end - start).total_seconds()


# --- the runs list -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunRow:
    """One line of the runs list."""

    run: RunPublic
    round_text: str
    elapsed: str


def _run_rows(session: Session, rows: Sequence[tuple[Run, str]]) -> list[RunRow]:
    ids = [run.id for run, _ in rows if run.id is not None]
    admissions = run_audit.latest_admissions(session, ids)
    newest = dashboard_queries.latest_rounds(session, ids)
    now = utcnow()
    out = []
    for run, project in rows:
        assert run.id is not None
        view = RunPublic.of(run, project, admissions.get(run.id))
        last = newest.get(run.id)
        text = "–" if last is None else f"{last.number} of {view.config.rounds} ({last.status})"
        out.append(RunRow(run=view, round_text=text, elapsed=duration(_elapsed(run, now))))
    return out


def _link(path: str, **query: str | int | None) -> str:
    kept = {k: v for k, v in query.items() if v not in (None, "")}
    return f"{PORTAL_PREFIX}{path}" + (f"?{urlencode(kept)}" if kept else "")


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep, page: str | None = None,
              state: str | None = None, project: str | None = None) -> Response:
    """Runs, newest first, a page at a time; filter by state and by project (staff only)."""
    user = _staff(request, session)
    if not isinstance(user, User):
        return user
    try:
        wanted_state = _state(state)
        wanted_project = _project(session, project)
        number = _page_number(page)
        found, total = dashboard_queries.run_page(
                   session, status=wanted_state,
                   project_id=wanted_project.id if wanted_project else None,
                   offset=(number - 1) * RUNS_PER_PAGE, limit=RUNS_PER_PAGE)
        pages = _pages(number, total, RUNS_PER_PAGE)
    except BadQuery as err:
        return _bad(request, user, err, f"{PORTAL_PREFIX}/runs")
    filters = {"state": wanted_state, "project": wanted_project.name if wanted_project else None}
    return _page(
        request, "runs.html", user=user, rows=_run_rows(session, found), total=total,
        page=number, pages=pages, state=wanted_state or "",
        project=wanted_project.name if wanted_project else "",
        states=sorted(RUN_STATUSES),
        projects=session.exec(select(Project.name).order_by(col(Project.name))).all(),
        previous=_link("/runs", page=number - 1, **filters) if number > 1 else None,
        next=_link("/runs", page=number + 1, **filters) if number < pages else None)


# --- one run -----------------------------------------------------------------------------


def _metrics(session: Session, run_id: int) -> dict[int, dict[str, dict[str, float]]]:
    rows = session.exec(select(SiteMetric).where(SiteMetric.run_id == run_id)).all()
    out: dict[int, dict[str, dict[str, float]]] = {}
    for m in rows:
        out.setdefault(m.round_number, {}).setdefault(m.site_name, {})[m.name] = m.value
    return out


def epsilon_svg(*, spent: Mapping[str, Sequence[tuple[int, float]]], budget: float,
                title: str) -> str:
    """Each site's cumulative epsilon after each round against the run's budget, as SVG.

    Args:
        spent: Site -> (round, epsilon spent after it) points.
        budget: The run's epsilon budget per site (drawn as a grey line).
        title: Shown as the picture's title; escaped.

    Returns:
        SVG text (no script, no external reference).
    """
    sites = sorted(spent)
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sites)}
    rounds = [r for pts in spent.values() for r, _ in pts] or [1]
    budget_key = "budget"
    series: dict[str, list[tuple[float, float]]] = {
        s: [(float(r), e) for r, e in spent[s]] for s in sites}
    series[budget_key] = [(float(min(rounds)), budget), (float(max(rounds)), budget)]
    colours[budget_key] = "#999999"
    top = max([budget, *(e for pts in spent.values() for _, e in pts)])
    legend_h = 18 * ((len(sites) + 1 + 1) // 2)
    height = 285 + legend_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="350" height="{height}" '
             f'viewBox="0 0 350 {height}" font-family="sans-serif" role="img">',
             f"<title>{Markup.escape(title)}</title>",
             '<rect width="100%" height="100%" fill="white"/>']
    parts += panel(10, "Epsilon spent per site", series, colours, fixed_y=(0.0, top * 1.05))
    for i, name in enumerate([*sites, budget_key]):
        x, y = 20 + (i % 2) * 165, 292 + 18 * (i // 2)
        label = f"budget ({budget:g} per site)" if name == budget_key else name
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" '
                     f'fill="{colours[name]}"/>')
        parts.append(f'<text x="{x + 17}" y="{y + 1}" font-size="12">'
                     f"{Markup.escape(label)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class SiteLine:
    """A site's figures in one run."""

    name: str
    rounds: int
    auc: float | None
    accuracy: float | None
    loss: float | None
    epsilon: float | None
    share: float | None   # epsilon / budget, 0..1+ (None: nothing reported)


def _site_lines(config_sites: Sequence[str], rounds: Sequence[Round],
                metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
                budget: float) -> list[SiteLine]:
    trained: dict[str, int] = {}
    for r in rounds:
        for site in json.loads(r.participating_sites_json):
            trained[site] = trained.get(site, 0) + 1
    latest: dict[str, dict[str, float]] = {}
    for number in sorted(metrics):
        for site, values in metrics[number].items():
            latest.setdefault(site, {}).update(values)
    out = []
    for site in sorted(set(config_sites) | set(latest)):
        values = latest.get(site, {})

        def pick(*names: str, _v: Mapping[str, float] = values) -> float | None:
            return next((_v[n] for n in names if n in _v), None)

        eps = values.get(dashboard_queries.EPSILON_METRIC)
        out.append(SiteLine(
            name=site, rounds=trained.get(site, 0),
            auc=pick("final-eval-auc", "eval-auc"),
            accuracy=pick("final-eval-accuracy", "eval-accuracy"),
            loss=pick("final-eval-loss", "eval-loss"), epsilon=eps,
            share=None if eps is None or budget <= 0 else eps / budget))
    return out


def _failures(rounds: Sequence[Round]) -> list[dict[str, Any]]:
    out = []
    for r in rounds:
        for f in json.loads(r.failed_sites_json):
            out.append({"round": r.number, "site": f.get("site", "?"),
                        "phase": f.get("phase", "?"), "reason": f.get("reason", ""),
                        "code": f.get("code")})
    return out


def _run_id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise BadQuery(f"a run id is a whole number, not {raw[:_MAX_QUERY_VALUE]!r}")
    return int(raw)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, session: SessionDep) -> Response:
    """A run's live state: progress, who it waits for, figures and curves per site,
    epsilon against the budget, failures, and its release candidates (staff only)."""
    user = _staff(request, session)
    if not isinstance(user, User):
        return user
    try:
        number = _run_id(run_id)
    except BadQuery as err:
        return _bad(request, user, err, f"{PORTAL_PREFIX}/runs")
    run = session.get(Run, number)
    project = session.get(Project, run.project_id) if run is not None else None
    if run is None or project is None:
        return _error(request, user, 404, f"Run {number} not found; the list of runs is "
                      f"under {PORTAL_PREFIX}/runs.")
    view = RunPublic.of(run, project.name,
                        run_audit.latest_admissions(session, [number]).get(number))
    rounds = session.exec(select(Round).where(Round.run_id == number)
                          .order_by(col(Round.number))).all()
    metrics = _metrics(session, number)
    budget = view.config.epsilon
    lines = _site_lines(view.config.sites, rounds, metrics, budget)
    spent = {s: [(n, metrics[n][s][dashboard_queries.EPSILON_METRIC]) for n in sorted(metrics)
                        if dashboard_queries.EPSILON_METRIC in metrics[n].get(s, {})]
             for s in {s for n in metrics for s in metrics[n]}}
    spent = {s: pts for s, pts in spent.items() if pts}
    last_round = max((r.number for r in rounds), default=0)
    curves = Markup(training_curve_svg(  # noqa: S704 - built here, every name escaped
        metrics=metrics, up_to_round=last_round, final_round=view.config.rounds,
        title=f"Run {number}: held-out figures per site"))
    eps_svg = Markup(epsilon_svg(  # noqa: S704 - built here, every name escaped
        spent=spent, budget=budget, title=f"Run {number}: epsilon per site")) if spent else None
    running = next((r for r in reversed(rounds) if r.status == "running"), None)
    candidates = session.exec(select(ReleaseCandidate).where(ReleaseCandidate.run_id == number)
                              .order_by(col(ReleaseCandidate.id))).all()
    live = run.status in _LIVE
    evaluations = [EvaluationPublic.of(e) for e in evaluations_of(session, number)]
    session.commit()   # an evaluation past its time is failed when read
    return _page(
        request, "run.html", user=user, run=view, live=live, refresh_s=REFRESH_S,
        may_cancel=may(user.role, Permission.WRITE), evaluations=evaluations,
        evaluating=any(e.status in ("pending", "running") for e in evaluations),
        elapsed=duration(_elapsed(run, utcnow())), rounds=rounds, lines=lines,
        round_rows=[{"r": r, "sites": json.loads(r.participating_sites_json),
                     "late": json.loads(r.late_sites_json)} for r in rounds],
        failures=_failures(rounds), curves=curves, epsilon_svg=eps_svg, budget=budget,
        running=running if live else None,
        running_deadline=(running.started_at.timestamp() + view.config.round_deadline_s)
        if running is not None and live else None,
        completed=sum(r.status == "completed" for r in rounds), candidates=candidates,
        duration=duration, datetime=datetime,
        statistics=run_statistics.read_statistics(session, number))


# --- sites -------------------------------------------------------------------------------


@router.get("/sites", response_class=HTMLResponse)
def sites_page(request: Request, session: SessionDep, page: str | None = None) -> Response:
    """The sites: enrolment state, certificate expiry and the epsilon each reported spent
    per project (staff only)."""
    user = _staff(request, session)
    if not isinstance(user, User):
        return user
    total = session.exec(select(func.count()).select_from(Site)).one()
    try:
        number = _page_number(page)
        pages = _pages(number, total, SITES_PER_PAGE)
    except BadQuery as err:
        return _bad(request, user, err, f"{PORTAL_PREFIX}/sites")
    sites = session.exec(select(Site).order_by(col(Site.name))
                         .offset((number - 1) * SITES_PER_PAGE).limit(SITES_PER_PAGE)).all()
    expiry = dashboard_queries.certificate_expiry(session)
    epsilon = dashboard_queries.site_epsilon_by_project(session)
    seen = presence.last_seen(session)
    now = utcnow()
    rows = []
    for site in sites:
        assert site.id is not None
        ends = expiry.get(site.id)
        rows.append({"site": site, "expires": ends, "last_seen": seen.get(site.name),
                     "online": presence.is_online(seen.get(site.name), now=now),
                     "days_left": None if ends is None else (ends - now).days,
                     "epsilon": sorted(epsilon.get(site.name, {}).items())})
    return _page(request, "sites.html", user=user, rows=rows, total=total, page=number,
                 pages=pages,
                 previous=_link("/sites", page=number - 1) if number > 1 else None,
                 next=_link("/sites", page=number + 1) if number < pages else None)
