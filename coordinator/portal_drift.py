"""The portal's drift pages: released models at the sites, over time (``/portal/drift``).

``/portal/drift`` lists each site and release that reported drift checks, with the newest
check's figures and the alarm of its newest check that ran, as the ``fedward_drift_alarm``
metric reads it (paginated, filtered by site and release); ``/portal/drift/{site}/
{release}`` draws that pair's checks over time as inline SVG (the PSI of the features that
drifted most, against the alarm line; accuracy and AUC where labels arrived), lists every
check with failed ones and their kind, and proposes the retraining command. Staff only,
rendered on the server with no script, like the rest of the dashboard
(:mod:`coordinator.portal_dashboard`, whose query checks it reuses: a bad page or filter is
an HTML 422).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from markupsafe import Markup, escape
from sqlalchemy import func
from sqlmodel import Session, col, select

from coordinator.db import SessionDep
from coordinator.drift import known_release, known_site, latest_reports, retraining_command
from coordinator.models import DriftReport, User
from coordinator.portal import PORTAL_PREFIX, _error, _page
from coordinator.portal_dashboard import BadQuery, _bad, _link, _page_number, _pages, _staff
from coordinator.release_chart import PALETTE, panel

__all__ = ["CHECKS_SHOWN", "PAIRS_PER_PAGE", "drift_svg", "router"]

PAIRS_PER_PAGE: Final = 50
CHECKS_SHOWN: Final = 200
_CURVES: Final = 6
_MAX_VALUE: Final = 128
_X_LABEL: Final = "check (oldest first)"

router = APIRouter(prefix=PORTAL_PREFIX, include_in_schema=False)


def _filter(session: Session, raw: str | None, what: str) -> str | None:
    if raw is None or raw == "":
        return None
    value = raw[:_MAX_VALUE]
    found = known_site(session, value) if what == "site" else known_release(session, value)
    if not found:
        raise BadQuery(f"no {what} {value!r} has drift reports or exists here")
    return value


def _newest_ran(session: Session, newest: Sequence[DriftReport]
                ) -> dict[tuple[str, str], DriftReport]:
    """Per (site, release) of ``newest``, its newest check that ran: its alarm is the one
    ``fedward_drift_alarm`` shows (:func:`coordinator.drift.latest_reports`)."""
    if not newest:
        return {}
    return {(r.site_name, r.release_id): r for r in latest_reports(
        session, sites={r.site_name for r in newest}, releases={r.release_id for r in newest})}


def _alarm(row: DriftReport | None) -> list[str]:
    return [] if row is None else list(json.loads(row.alarm_features_json))


@router.get("/drift", response_class=HTMLResponse)
def drift_page(request: Request, session: SessionDep, page: str | None = None,
               site: str | None = None, release: str | None = None) -> Response:
    """Each site and release with drift checks, the newest check first (staff only)."""
    user = _staff(request, session)
    if not isinstance(user, User):
        return user
    try:
        wanted_site = _filter(session, site, "site")
        wanted_release = _filter(session, release, "release")
        number = _page_number(page)
        newest = select(func.max(DriftReport.id).label("id"), func.count().label("n"))
        if wanted_site is not None:
            newest = newest.where(DriftReport.site_name == wanted_site)
        if wanted_release is not None:
            newest = newest.where(DriftReport.release_id == wanted_release)
        grouped = newest.group_by(col(DriftReport.site_name),
                                  col(DriftReport.release_id)).subquery()
        total = int(session.exec(select(func.count()).select_from(grouped)).one())
        pages = _pages(number, total, PAIRS_PER_PAGE)
    except BadQuery as err:
        return _bad(request, user, err, f"{PORTAL_PREFIX}/drift")
    rows = session.exec(select(DriftReport, grouped.c.n)
                        .join(grouped, col(DriftReport.id) == grouped.c.id)
                        .order_by(col(DriftReport.id).desc())
                        .offset((number - 1) * PAIRS_PER_PAGE).limit(PAIRS_PER_PAGE)).all()
    ran = _newest_ran(session, [r for r, _ in rows])
    pairs = [{"r": r, "checks": n, "ran": ran.get((r.site_name, r.release_id)),
              "alarm": _alarm(ran.get((r.site_name, r.release_id))),
              "href": f"{PORTAL_PREFIX}/drift/{r.site_name}/{r.release_id}"} for r, n in rows]
    filters = {"site": wanted_site, "release": wanted_release}
    return _page(request, "drift.html", user=user, pairs=pairs, total=total, page=number,
                 pages=pages, site=wanted_site or "", release=wanted_release or "",
                 previous=_link("/drift", page=number - 1, **filters) if number > 1 else None,
                 next=_link("/drift", page=number + 1, **filters) if number < pages else None)


def drift_svg(*, checks: Sequence[DriftReport], psi_alarm: float, title: str) -> str:
    """Drift over time as SVG: PSI of the features that drifted most, with the alarm line,
    and accuracy and AUC, by check (oldest first).

    Args:
        checks: The pair's checks that ran, oldest first.
        psi_alarm: The alarm rule's PSI threshold (drawn as a grey line).
        title: The picture's title; escaped.

    Returns:
        SVG text (no script, no external reference).
    """
    series_psi: dict[str, list[tuple[float, float]]] = {}
    peak: dict[str, float] = {}
    for i, row in enumerate(checks, start=1):
        for name, figures in json.loads(row.features_json).items():
            series_psi.setdefault(name, []).append((float(i), float(figures["psi"])))
            peak[name] = max(peak.get(name, 0.0), float(figures["psi"]))
    shown = sorted(peak, key=lambda n: (-peak[n], n))[:_CURVES]
    psi: dict[str, list[tuple[float, float]]] = {n: series_psi[n] for n in shown}
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(shown)}
    alarm_key = f"alarm ({psi_alarm:g})"
    psi[alarm_key] = [(1.0, psi_alarm), (float(max(len(checks), 1)), psi_alarm)]
    colours[alarm_key] = "#999999"
    model: dict[str, list[tuple[float, float]]] = {}
    for key in ("accuracy", "auc"):
        points = [(float(i), float(v)) for i, row in enumerate(checks, start=1)
                  if (v := getattr(row, key)) is not None]
        if points:
            model[key] = points
    # Colours the feature curves never take: each legend entry names one curve.
    colours.update({"accuracy": PALETTE[_CURVES], "auc": PALETTE[_CURVES + 1]})
    top = max([psi_alarm * 1.5, *(v for pts in psi.values() for _, v in pts)])
    names = [*shown, alarm_key, *model]
    height = 285 + 18 * ((len(names) + 3) // 4)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="700" height="{height}" '
             f'viewBox="0 0 700 {height}" font-family="sans-serif" role="img">',
             f"<title>{escape(title)}</title>",
             '<rect width="100%" height="100%" fill="white"/>']
    parts += panel(10, "PSI by check (most drifted features)", psi, colours,
                    fixed_y=(0.0, top * 1.05), x_label=_X_LABEL)
    parts += panel(360, "Accuracy and AUC by check", model, colours, fixed_y=(0.0, 1.0),
                    x_label=_X_LABEL)
    for i, name in enumerate(names):
        x, y = 20 + (i % 4) * 170, 292 + 18 * (i // 4)
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" '
                     f'fill="{colours[name]}"/>')
        parts.append(f'<text x="{x + 17}" y="{y + 1}" font-size="12">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _rows(checks: Sequence[DriftReport]) -> list[Mapping[str, Any]]:
    return [{"r": r, "alarm": json.loads(r.alarm_features_json)} for r in reversed(checks)]


@router.get("/drift/{site}/{release}", response_class=HTMLResponse)
def drift_pair_page(site: str, release: str, request: Request,
                    session: SessionDep) -> Response:
    """One site's drift checks of one release over time, and the retraining proposal."""
    user = _staff(request, session)
    if not isinstance(user, User):
        return user
    checks = session.exec(
        select(DriftReport).where(DriftReport.site_name == site[:_MAX_VALUE],
                                  DriftReport.release_id == release[:_MAX_VALUE])
        .order_by(col(DriftReport.id).desc()).limit(CHECKS_SHOWN)).all()[::-1]
    if not checks:
        return _error(request, user, 404, f"No drift check of release {release[:_MAX_VALUE]!r}"
                      f" at site {site[:_MAX_VALUE]!r}; the sites and releases with checks "
                      f"are under {PORTAL_PREFIX}/drift.")
    ran = [c for c in checks if c.status == "ok"]
    psi_alarm = float(request.app.state.settings.drift_psi_alarm)
    picture = Markup(drift_svg(  # noqa: S704 - built here, every name escaped
        checks=ran, psi_alarm=psi_alarm,
        title=f"Drift of {release} at {site}")) if ran else None
    latest = checks[-1]
    return _page(request, "drift_pair.html", user=user, site=site, release=release,
                 rows=_rows(checks), picture=picture, latest=latest,
                 latest_ran=ran[-1] if ran else None,
                 latest_alarm=_alarm(ran[-1] if ran else None),
                 # Proposed while the alarm stands (the newest check that ran is in alarm),
                 # not for a drift that has since subsided.
                 retrain=retraining_command(session, release) if ran and ran[-1].alarm
                 else None, failed=sum(c.status != "ok" for c in checks))
