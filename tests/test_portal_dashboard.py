"""The portal's dashboard (runs, one run, sites) in a real browser: Debian's Chromium.

Two coordinators serve the pages. The first is the real app under uvicorn over a database
filled through the repository layer, as the ServerApp fills it: 60 runs over two projects in
every state, one of them live (round 4 running, a site waiting for its local approval, a
site that failed round 2), three sites with certificates. The second is a real federation:
`fedward-coordinator serve` and two site agents that train a small run over Flower; the
browser reads that run's page as the coordinator shows it.

Needs ``/usr/bin/chromium`` and the ``playwright`` package; never ``playwright install``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import select

from coordinator.api import create_app
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import Project, Run, Site, SiteCertificate, utcnow
from coordinator.portal_dashboard import RUNS_PER_PAGE, duration
from coordinator.repository import finish_run, mark_run_started
from coordinator.round_records import finish_round, record_site_metrics, start_round
from coordinator.run_audit import record_admission
from coordinator.settings import Settings
from fedward import __version__
from fedward.run_config import RunConfig

from browser_support import CHROMIUM, CHROMIUM_ARGS
from federation import federation
from release_support import KNOWN_WARNINGS, PASSWORD, make_user
from tests_support import served_app, short_tmp

pytestmark = [
    *KNOWN_WARNINGS,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at "
                       "/usr/bin/chromium (apt-get install chromium)"),
]

SITES = ("hospital-a", "hospital-b", "hospital-c")
BUDGET = 4.0


def _new_run(engine: Engine, project: str, *, sites: tuple[str, ...] = SITES,
             rounds: int = 5) -> int:
    with session_scope(engine) as session:
        row = session.exec(select(Project).where(Project.name == project)).first()
        if row is None:
            row = Project(name=project)
            session.add(row)
            session.flush()
        assert row.id is not None
        config = RunConfig(rounds=rounds, local_epochs=1, epsilon=BUDGET, delta=1e-5,
                           min_sites=2, round_deadline_s=120.0, lr=0.1, batch_size=32,
                           max_grad_norm=1.0, seed=1, sites=list(sites))
        run = Run(project_id=row.id, task="breast_cancer_mlp", launched_by="eng",
                  config_json=config.model_dump_json())
        session.add(run)
        session.flush()
        assert run.id is not None
        return run.id


def _play_round(engine: Engine, run_id: int, n: int, *, sites: tuple[str, ...] = SITES,
                failed: dict[str, str] | None = None) -> None:
    start_round(engine, run_id, n)
    failed = failed or {}
    for i, site in enumerate(sites):
        if site in failed:
            continue
        record_site_metrics(engine, run_id, n, site, {
            "eval-auc": 0.55 + 0.08 * n + 0.02 * i, "eval-loss": 0.9 - 0.1 * n,
            "eval-accuracy": 0.5 + 0.07 * n, "epsilon-spent": 0.7 * n + 0.1 * i})
    finish_round(engine, run_id, n, status="completed",
                 participating=[s for s in sites if s not in failed],
                 failed=[{"site": s, "phase": "train", "reason": why}
                         for s, why in failed.items()], late=[], seconds=12.5)


@dataclass
class Seeded:
    """A served coordinator over a seeded database."""

    base: str
    engine: Engine
    live: int           # the running run
    failed: int         # a failed run
    cardio: int         # runs of project cardio


def _seed(engine: Engine) -> tuple[int, int, int]:
    """60 runs (cardio: 45, onco: 15) in every state, one live and detailed; 3 sites."""
    cardio = 0
    for i in range(58):
        project = "cardio" if i % 4 else "onco"
        cardio += project == "cardio"
        run_id = _new_run(engine, project, rounds=2)
        if i % 5 == 4:
            continue  # pending
        mark_run_started(engine, run_id, str(5000 + i))
        _play_round(engine, run_id, 1)
        if i % 5 == 3:
            continue  # running
        if i % 5 == 2:
            finish_run(engine, run_id, status="stopped", reason="stopped by eng: wrong data")
        else:
            _play_round(engine, run_id, 2)
            finish_run(engine, run_id, status="completed", reason=None)
    failed = _new_run(engine, "onco", rounds=3)
    mark_run_started(engine, failed, "6001")
    _play_round(engine, failed, 1)
    finish_round(engine, failed, 2, status="failed", participating=["hospital-a"],
                 failed=[{"site": "hospital-b", "phase": "validate",
                          "reason": "update norm 83.1 exceeds the bound 10.0"},
                         {"site": "hospital-c", "phase": "connect", "reason": "site offline"}],
                 late=[], seconds=120.0)
    finish_run(engine, failed, status="failed",
               reason="round 2: 1 usable updates, the run needs at least 2")
    with session_scope(engine) as session:  # it ran 1 h 23 min 20 s before it failed
        row = session.get(Run, failed)
        assert row is not None and row.finished_at is not None
        row.started_at = row.finished_at - timedelta(hours=1, minutes=23, seconds=20)

    live = _new_run(engine, "cardio", rounds=6)
    cardio += 1
    mark_run_started(engine, live, "7001")
    since = (utcnow() - timedelta(minutes=7)).replace(microsecond=0)
    with session_scope(engine) as session:  # it started when its admission did
        row = session.get(Run, live)
        assert row is not None
        row.started_at = since
    record_admission(engine, live, action="run.admitted", detail={
        "state": "admitted", "accepted": ["hospital-a", "hospital-b"],
        "waiting": {"hospital-c": {"since": since.isoformat(),
                                   "reason": "the site's policy wants a local approval"}},
        "refused": {}, "unanswered": {}, "offline": [], "started": since.isoformat()})
    _play_round(engine, live, 1, failed={"hospital-c": "pending-approval"})
    _play_round(engine, live, 2, failed={"hospital-c": "pending-approval"})
    _play_round(engine, live, 3)
    start_round(engine, live, 4)

    with session_scope(engine) as session:
        for i, name in enumerate(SITES):
            site = Site(name=name, status="registered", flower_node_id=str(900 + i),
                        registered_at=utcnow() - timedelta(days=30))
            session.add(site)
            session.flush()
            assert site.id is not None
            session.add(SiteCertificate(site_id=site.id, serial=f"{i:x}a1",
                                        not_after=utcnow() + timedelta(days=5 if i else 200)))
        session.add(Site(name="hospital-d", status="added"))
    return live, failed, cardio


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """Seeded once for the module: the tests only read."""
    home = tmp_path_factory.mktemp("dashboard") / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    for name, role in [("eng", "ml_engineer"), ("rev", "reviewer"), ("dr-lee", "clinician")]:
        make_user(engine, role, name)
    live, failed, cardio = _seed(engine)
    try:
        with served_app(create_app(settings=Settings(home=home), engine=engine),
                        name="dashboard-uvicorn") as port:
            yield Seeded(base=f"http://127.0.0.1:{port}", engine=engine, live=live,
                         failed=failed, cardio=cardio)
    finally:
        engine.dispose()


def _login(page: Any, base: str, name: str, target: str) -> None:
    page.goto(f"{base}{target}")
    assert "/portal/login" in page.url
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{target}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _rows(page: Any, label: str) -> int:
    return int(page.locator(f"table[aria-label='{label}'] tbody tr").count())


@pytest.mark.timeout(180)
def test_runs_list_paginates_filters_and_refuses_bad_queries(
        seeded: Seeded, browser: Any, tmp_path: Path) -> None:
    page = browser.new_page()
    page.set_default_timeout(15_000)
    _login(page, seeded.base, "eng", "/portal/runs")

    # Page 1: the newest 25 of 60 runs, the live one on top with its round.
    assert page.locator("#page-of").inner_text() == "Page 1 of 3"
    assert _rows(page, "Runs") == RUNS_PER_PAGE
    live = page.locator(f"#run-{seeded.live}")
    assert "4 of 6 (running)" in live.inner_text()
    assert "hospital-c" in live.inner_text()  # it waits for hospital-c's approval
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
    page.click("#next")
    page.click("#next")
    assert page.locator("#page-of").inner_text() == "Page 3 of 3"
    assert _rows(page, "Runs") == 60 - 2 * RUNS_PER_PAGE
    assert page.locator("#next").count() == 0

    # Filters, through the form; the pager keeps them.
    page.goto(f"{seeded.base}/portal/runs")
    page.select_option("#project", "cardio")
    page.select_option("#state", "running")
    page.click("#apply")
    page.wait_for_url("**state=running**")
    listed = page.locator("table[aria-label='Runs'] tbody tr")
    texts = [listed.nth(i).inner_text() for i in range(listed.count())]
    assert texts and all("cardio" in t and "running" in t for t in texts), texts
    page.goto(f"{seeded.base}/portal/runs?project=cardio")
    assert f"{seeded.cardio} in all" in page.content()
    page.click("#next")
    assert "project=cardio" in page.url and "page=2" in page.url
    page.goto(f"{seeded.base}/portal/runs?state=failed")
    assert page.locator(f"#run-{seeded.failed}").count() == 1

    # Bad pages and filters: 422 with what exists, never a 500.
    for query, said in [("page=0", "Page must be a whole number from 1"),
                        ("page=abc", "Page must be a whole number from 1"),
                        ("page=-2", "Page must be a whole number from 1"),
                        ("page=99999999999999999999", "Page must be a whole number from 1"),
                        ("page=4", "Page 4 does not exist: there are 3 pages"),
                        ("state=finished", "Unknown run state 'finished': choose one of "
                                           "cancelled, completed, failed, pending, running, "
                                           "stopped"),
                        ("project=nope", "No project named 'nope'; projects: cardio, onco"),
                        ("project=cardio&state=running&page=2",
                         "Page 2 does not exist: there is 1 page")]:
        response = page.goto(f"{seeded.base}/portal/runs?{query}")
        assert response.status == 422, query
        assert said in page.locator("[role=alert]").inner_text(), query
    for path in ("/portal/runs/abc", "/portal/runs/1e3", "/portal/sites?page=2",
                 "/portal/sites?page=x"):
        response = page.goto(f"{seeded.base}{path}")
        assert response.status == 422, path
    response = page.goto(f"{seeded.base}/portal/runs/999999")
    assert response.status == 404
    assert "Run 999999 not found" in page.locator("[role=alert]").inner_text()


@pytest.mark.timeout(180)
def test_a_live_run_shows_progress_waiting_sites_curves_epsilon_and_failures(
        seeded: Seeded, browser: Any, tmp_path: Path) -> None:
    page = browser.new_page()
    page.set_default_timeout(15_000)
    before = utcnow()
    _login(page, seeded.base, "rev", f"/portal/runs/{seeded.live}")
    after = utcnow()

    assert page.locator("#status").inner_text() == "running"
    # Elapsed: now minus the recorded start (7 minutes before the seed, and more since).
    with session_scope(seeded.engine) as session:
        live, failed = session.get(Run, seeded.live), session.get(Run, seeded.failed)
        assert live is not None and live.started_at is not None
        assert failed is not None and failed.started_at and failed.finished_at
    low, high = ((t - live.started_at).total_seconds() for t in (before, after))
    assert low >= 7 * 60
    assert page.locator("#elapsed").inner_text() in {
        duration(s) for s in range(int(low), math.ceil(high) + 1)}
    assert "Round 4 of 6" in page.locator("#progress").inner_text()
    assert "(3 completed)" in page.locator("#progress").inner_text()
    # It reloads itself while it runs (no script: a meta refresh).
    assert page.locator("meta[http-equiv=refresh]").count() == 1
    waiting = page.locator("#waiting").inner_text()
    assert "hospital-c: a local approval, since" in waiting
    assert "fedward-site approve" in waiting
    assert "Round 4 running since" in waiting
    # Per-site figures: hospital-c trained only round 3.
    assert page.locator("#site-hospital-c td").nth(1).inner_text() == "1"
    assert page.locator("#site-hospital-a td").nth(1).inner_text() == "3"
    # Epsilon against the budget of 4: hospital-b reported 0.7 * 3 + 0.1 = 2.2 (55%).
    assert "2.200 (55%)" in page.locator("#site-hospital-b .epsilon").inner_text()
    # Curves: inline SVG, one line per site in each panel, and epsilon with its budget.
    curves = page.locator("#training-curves svg")
    assert curves.count() == 1 and curves.locator("polyline").count() == 6
    eps = page.locator("#epsilon-curve svg")
    assert eps.locator("polyline").count() == 4  # three sites and the budget
    assert "budget (4 per site)" in eps.text_content()
    assert eps.evaluate("svg => svg.getBoundingClientRect().width") > 200
    # Failures with their phase and reason.
    failures = page.locator("table[aria-label='Failures'] tbody tr")
    assert failures.count() == 2
    assert failures.nth(0).inner_text().split("\t")[:4] == [
        "1", "hospital-c", "train", "pending-approval"]
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    page.goto(f"{seeded.base}/portal/runs/{seeded.failed}")
    assert "round 2: 1 usable updates" in page.locator("#failure").inner_text()
    # An ended run: its end minus its start, however long ago it ended.
    assert page.locator("#elapsed").inner_text() == "1 h 23 min" == duration(
        (failed.finished_at - failed.started_at).total_seconds())
    failures = page.locator("table[aria-label='Failures'] tbody tr")
    assert "validate" in failures.nth(0).inner_text()
    assert "update norm 83.1 exceeds the bound 10.0" in failures.nth(0).inner_text()
    assert page.locator("meta[http-equiv=refresh]").count() == 0


@pytest.mark.timeout(180)
def test_sites_page_and_who_sees_what(seeded: Seeded, browser: Any, tmp_path: Path) -> None:
    from coordinator.presence import Presence, last_seen

    # hospital-a was heard from just now (as the gateway records it), hospital-b an hour ago.
    now = utcnow().replace(microsecond=0)
    seen = {"hospital-a": now, "hospital-b": now - timedelta(hours=1)}
    for name, at in seen.items():
        presence = Presence(seeded.engine, clock=lambda at=at: at)
        presence.seen(name)
        presence.flush(force=True)
    # Versions as hospital-a's agent reported them; hospital-b's row holds markup written
    # straight into the table (the format check stops it on every channel): shown as text.
    from coordinator.site_versions import note_versions

    with session_scope(seeded.engine) as session:
        assert note_versions(session, "hospital-a", {"fedward": "1.4.0",
                                                     "flower": "1.42.0"}, via="admission")
        b = session.exec(select(Site).where(Site.name == "hospital-b")).one()
        b.agent_version, b.flower_version = "<img src=x id=injected>", "1.42.0"
        b.versions_at, b.versions_via = utcnow(), "renewal"
        session.add(b)
    page = browser.new_page()
    page.set_default_timeout(15_000)
    _login(page, seeded.base, "eng", "/portal/sites")
    assert _rows(page, "Sites") == 4
    versions = page.locator("#site-hospital-a .versions").inner_text()
    assert versions.startswith("Fedward 1.4.0\nFlower 1.42.0\nreported at admission, ")
    assert page.locator("#injected").count() == 0
    assert "Fedward <img src=x id=injected>" in page.locator(
        "#site-hospital-b .versions").inner_text()
    assert "not reported" in page.locator("#site-hospital-d .versions").inner_text()
    a = page.locator("#site-hospital-a")
    assert "online" in a.locator(".presence").inner_text()
    assert "offline" in page.locator("#site-hospital-b .presence").inner_text()
    assert "never" in page.locator("#site-hospital-d .presence").inner_text()
    # The last contact the table holds, to the second, online or not.
    with session_scope(seeded.engine) as session:
        assert {s: last_seen(session)[s] for s in seen} == seen
    for name, at in seen.items():
        assert f"last seen {at:%Y-%m-%d %H:%M:%S} UTC" in page.locator(
            f"#site-{name} .presence").inner_text()
    assert "last seen never" in page.locator("#site-hospital-d .presence").inner_text()
    assert "registered" in a.inner_text()
    assert "(199 days)" in a.locator(".expiry").inner_text()
    assert "4 days left" in page.locator("#site-hospital-b .expiry").inner_text()
    assert "no valid certificate" in page.locator("#site-hospital-d .expiry").inner_text()
    # Epsilon per project: the sum of each run's last figure. hospital-a reports 0.7 per
    # round: 1.4 in finished two-round runs, 0.7 where one round ran, 2.1 in the live run.
    per_run = [(("cardio" if i % 4 else "onco"), {0: 1.4, 1: 1.4, 2: 0.7, 3: 0.7}[i % 5])
               for i in range(58) if i % 5 != 4] + [("onco", 0.7), ("cardio", 2.1)]
    text = page.locator("#site-hospital-a .epsilon").inner_text()
    for project in ("cardio", "onco"):
        spent = [e for p, e in per_run if p == project]
        assert f"{project}: {sum(spent):.3g} ({len(spent)} runs)" in text, text
    assert "none reported" in page.locator("#site-hospital-d .epsilon").inner_text()
    page.screenshot(path=str(tmp_path / "sites.png"), full_page=True)
    assert page.locator("header nav a", has_text="Runs").count() == 1

    # A clinician sees releases only: no dashboard link, and 403 on its pages.
    clinician = browser.new_page()
    clinician.set_default_timeout(15_000)
    _login(clinician, seeded.base, "dr-lee", "/portal/releases")
    assert clinician.locator("header nav a", has_text="Runs").count() == 0
    for path in ("/portal/runs", f"/portal/runs/{seeded.live}", "/portal/sites",
                 "/portal/runs?page=0"):
        response = clinician.goto(f"{seeded.base}{path}")
        assert response.status == 403, path
        assert "Only staff" in clinician.locator("[role=alert]").inner_text()

    # Not logged in: the login page, which comes back to the page asked for.
    anonymous = browser.new_page()
    anonymous.goto(f"{seeded.base}/portal/runs?state=running")
    assert "/portal/login" in anonymous.url and "state%3Drunning" in anonymous.url


@pytest.mark.timeout(720)
def test_the_run_page_of_a_real_federated_run(browser: Any, tmp_path: Path) -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        # Under load the API answers before the SuperLink has written its address.
        deadline = time.monotonic() + 120
        while not (fed.home / "superlink.address").exists():
            assert time.monotonic() < deadline, "the coordinator's SuperLink did not start"
            time.sleep(0.5)
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
        sites = sorted(fed.sites)
        # Three minutes, not the harness's one: on a loaded 2-core machine an agent takes
        # over a minute to start its trainer and SuperNode.
        fed.wait_online(len(sites), timeout=180)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        assert fed.wait_run(run_id, timeout=420)["status"] == "completed"
        r = fed.api("POST", "/users", {"name": "eng", "role": "ml_engineer",
                                       "password": PASSWORD})
        assert r.status_code == 201, r.text
        metrics = fed.api("GET", f"/runs/{run_id}/metrics").json()["rounds"]
        spent = {s: max(m["sites"][s]["epsilon-spent"] for m in metrics
                        if s in m["sites"] and "epsilon-spent" in m["sites"][s])
                 for s in sites}

        page = browser.new_page()
        page.set_default_timeout(15_000)
        base = f"http://127.0.0.1:{fed.api_port}"
        _login(page, base, "eng", "/portal/runs")
        page.click(f"#run-{run_id} a")
        page.wait_for_url(f"**/portal/runs/{run_id}")
        assert page.locator("#status").inner_text() == "completed"
        assert "Round 2 of 2" in page.locator("#progress").inner_text()
        assert page.locator("meta[http-equiv=refresh]").count() == 0
        for site in sites:
            row = page.locator(f"#site-{site} td")
            assert row.nth(1).inner_text() == "2"
            assert 0.0 <= float(row.nth(2).inner_text()) <= 1.0  # the AUC it reported
            assert f"{spent[site]:.3f}" in page.locator(f"#site-{site} .epsilon").inner_text()
        assert page.locator("#training-curves svg polyline").count() == 2 * len(sites)
        assert page.locator("#epsilon-curve svg polyline").count() == len(sites) + 1
        page.screenshot(path=str(tmp_path / "real-run.png"), full_page=True)
        page.goto(f"{base}/portal/sites")
        for site in sites:
            assert "test:" in page.locator(f"#site-{site} .epsilon").inner_text()
            # Registered without enrollment: the versions came with the admission answer.
            assert page.locator(f"#site-{site} .versions").inner_text().startswith(
                f"Fedward {__version__}\nFlower {version('flwr')}\nreported at admission")
