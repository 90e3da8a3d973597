"""Cancelling a run in the portal, and a run's evaluations, in a real browser (Chromium).

The real coordinator app is served by uvicorn over a database holding a running run, a
pending run and a completed one. An ML engineer opens the running run's page, follows its
cancel button to the form, is refused without a reason, cancels with one, and the run's page
then shows who asked and why; once the round loop has ended the run (recorded here as the
ServerApp records it) the page shows ``cancelled`` and no button. A reviewer sees no button
and is refused the form. A finished run has no button, and a form posted for it anyway gets
the API's 409 sentence; a form without the session's CSRF token changes nothing. A finished
run's page lists its evaluations on demand with each site's figures or reason.

Needs ``/usr/bin/chromium`` and the ``playwright`` package; never ``playwright install``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select

from coordinator.api import create_app
from coordinator.auth import API_PREFIX
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import AuditEvent, Project, Run
from coordinator.repository import finish_run, mark_run_started
from coordinator.round_records import start_round
from coordinator.settings import Settings
from fedward.run_config import RunConfig

from browser_support import CHROMIUM, CHROMIUM_ARGS
from release_support import KNOWN_WARNINGS, PASSWORD, make_user
from tests_support import served_app

pytestmark = [
    *KNOWN_WARNINGS,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at "
                       "/usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.timeout(180),
]


def _run(engine: Engine) -> int:
    with session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == "cardio")).first()
        if project is None:
            project = Project(name="cardio")
            session.add(project)
            session.flush()
        assert project.id is not None
        config = RunConfig(rounds=3, local_epochs=1, epsilon=2.0, delta=1e-5, min_sites=2,
                           round_deadline_s=60.0, lr=0.1, batch_size=32, max_grad_norm=1.0,
                           seed=1, sites=["hospital-a", "hospital-b"])
        run = Run(project_id=project.id, task="breast_cancer_mlp", launched_by="eng",
                  config_json=config.model_dump_json())
        session.add(run)
        session.flush()
        assert run.id is not None
        return run.id


@dataclass
class Served:
    base: str
    engine: Engine
    eng_api: dict[str, str]
    running: int
    pending: int
    completed: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("cancel") / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    eng_api = make_user(engine, "ml_engineer", "eng")
    make_user(engine, "reviewer", "rev")
    running, pending, completed = _run(engine), _run(engine), _run(engine)
    mark_run_started(engine, running, "7001")
    start_round(engine, running, 1)
    mark_run_started(engine, completed, "7002")
    finish_run(engine, completed, status="completed", reason=None)
    try:
        with served_app(create_app(settings=Settings(home=home), engine=engine),
                        name="cancel-uvicorn") as port:
            yield Served(base=f"http://127.0.0.1:{port}", engine=engine, eng_api=eng_api,
                         running=running, pending=pending, completed=completed)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _login(browser: Any, base: str, name: str, target: str) -> Any:
    page = browser.new_context().new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{base}{target}")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{target}")
    return page


def _cancel_requests(engine: Engine, run_id: int) -> list[AuditEvent]:
    with session_scope(engine) as session:
        return list(session.exec(select(AuditEvent).where(
            AuditEvent.action == "run.cancel_requested",
            AuditEvent.subject == f"run:{run_id}")).all())


def test_an_ml_engineer_cancels_a_running_run_with_a_reason(
        served: Served, browser: Any, tmp_path: Path) -> None:
    page = _login(browser, served.base, "eng", f"/portal/runs/{served.running}")
    assert page.locator("#status").inner_text() == "running"
    page.click("#cancel-link button")
    page.wait_for_url(f"**/portal/runs/{served.running}/cancel*")
    # The page of the form does not reload itself (a reason half typed would be lost).
    assert page.locator("meta[http-equiv=refresh]").count() == 0
    assert page.locator("#cancel-reason").get_attribute("required") is not None

    # A reason of blanks passes the browser's `required` but not the coordinator.
    page.fill("#cancel-reason", "   ")
    with page.expect_navigation():
        page.click("#cancel")
    assert "Give a reason for cancelling (1 to 500 characters)" in page.locator(
        "#refusal").inner_text()
    assert _cancel_requests(served.engine, served.running) == []

    page.fill("#cancel-reason", "wrong cohort <b>selected</b>")
    with page.expect_navigation():
        page.click("#cancel")
    assert page.url.endswith(f"/portal/runs/{served.running}")
    notice = page.locator("#cancelled").inner_text()
    assert notice.startswith("Being cancelled by eng")
    assert "wrong cohort <b>selected</b>" in notice   # shown as text, escaped
    assert page.locator("#cancel-link").count() == 0
    (event,) = _cancel_requests(served.engine, served.running)
    assert event.actor == "eng"
    page.screenshot(path=str(tmp_path / "cancelling.png"), full_page=True)

    # The round loop ends it (as the ServerApp records it): cancelled, who and why.
    finish_run(served.engine, served.running, status="cancelled",
               reason="cancelled by eng: wrong cohort <b>selected</b>")
    page.reload()
    assert page.locator("#status").inner_text() == "cancelled"
    assert re.match(r"Cancelled by eng \(asked \d{4}-\d\d-\d\d [\d:]+ UTC\): wrong cohort "
                    r"<b>selected</b>", page.locator("#cancelled").inner_text())
    assert page.locator("#failure").count() == 0    # said once, not twice
    assert page.locator("#cancel-link").count() == 0
    assert page.locator("meta[http-equiv=refresh]").count() == 0


def test_who_may_cancel_and_what_a_finished_run_answers(
        served: Served, browser: Any) -> None:
    # A reviewer sees the pending run but no button, and is refused the form.
    reviewer = _login(browser, served.base, "rev", f"/portal/runs/{served.pending}")
    assert reviewer.locator("#status").inner_text() == "pending"
    assert reviewer.locator("#cancel-link").count() == 0
    response = reviewer.goto(f"{served.base}/portal/runs/{served.pending}/cancel")
    assert response.status == 403
    assert "Only admins and ML engineers cancel runs" in reviewer.locator(
        "[role=alert]").inner_text()

    eng = _login(browser, served.base, "eng", f"/portal/runs/{served.pending}")
    assert eng.locator("#cancel-link").count() == 1
    eng.goto(f"{served.base}/portal/runs/{served.pending}/cancel")
    csrf = eng.locator("#cancel-form input[name=csrf]").get_attribute("value")
    assert csrf

    # A form without this session's CSRF token (another site's page posting it) is refused.
    forged = eng.request.post(f"{served.base}/portal/runs/{served.pending}/cancel",
                              form={"reason": "forged", "csrf": "0" * 64})
    assert forged.status == 403
    assert "did not come from your current portal session" in forged.text()
    assert _cancel_requests(served.engine, served.pending) == []

    # A finished run: no button, the form page and a posted form both 409 as the API.
    eng.goto(f"{served.base}/portal/runs/{served.completed}")
    assert eng.locator("#status").inner_text() == "completed"
    assert eng.locator("#cancel-link").count() == 0
    api = httpx.post(f"{served.base}{API_PREFIX}/runs/{served.completed}/cancel",
                     json={"reason": "too late"}, headers=served.eng_api)
    assert api.status_code == 409
    said = api.json()["detail"]
    assert said.startswith(f"run {served.completed} has already ended (completed at ")
    response = eng.goto(f"{served.base}/portal/runs/{served.completed}/cancel")
    assert response.status == 409
    assert eng.locator("[role=alert]").inner_text() == said[:1].upper() + said[1:] + "."
    posted = eng.request.post(f"{served.base}/portal/runs/{served.completed}/cancel",
                              form={"reason": "too late", "csrf": csrf})
    assert posted.status == 409
    assert said[1:] in posted.text()
    assert _cancel_requests(served.engine, served.completed) == []

    # The pending run, cancelled with the session's token by a posted form.
    done = eng.request.post(f"{served.base}/portal/runs/{served.pending}/cancel",
                            form={"reason": "data not ready", "csrf": csrf},
                            max_redirects=0)
    assert done.status == 303
    with session_scope(served.engine) as session:
        run = session.get(Run, served.pending)
        assert run is not None
        assert (run.cancelled_by, run.cancel_reason) == ("eng", "data not ready")


def test_a_finished_runs_page_lists_its_evaluations_per_site(
        served: Served, browser: Any) -> None:
    import json

    from coordinator.models import Evaluation, utcnow

    with session_scope(served.engine) as session:
        session.add(Evaluation(
            run_id=served.completed, round_number=3, checkpoint_sha256="c" * 64,
            requested_by="eng", status="completed", finished_at=utcnow(),
            results_json=json.dumps({"hospital-a": {
                "eval-auc": 0.9123, "eval-accuracy": 0.875, "eval-loss": 0.31,
                "num-eval-examples": 57.0}}),
            failed_json=json.dumps({"hospital-b": "refused-policy: project cardio is not "
                                                  "in this site's policy"})))
    page = _login(browser, served.base, "rev", f"/portal/runs/{served.completed}")
    table = page.locator("table[aria-label^='Evaluation']")
    assert table.count() == 1
    a = table.locator("tr[id$='-hospital-a']").inner_text().split("\t")
    assert a[:5] == ["hospital-a", "0.912", "0.875", "0.310", "57"]
    b = table.locator("tr[id$='-hospital-b']").inner_text()
    assert "refused-policy: project cardio is not in this site's policy" in b
    assert "of the checkpoint of round 3" in page.locator("div[id^='evaluation-']").inner_text()
    assert page.locator("#status").inner_text() == "completed"
    assert page.locator("meta[http-equiv=refresh]").count() == 0
    # While an evaluation is under way the finished run's page reloads itself.
    with session_scope(served.engine) as session:
        session.add(Evaluation(run_id=served.completed, round_number=3,
                               checkpoint_sha256="c" * 64, requested_by="eng"))
    page.reload()
    assert page.locator("meta[http-equiv=refresh]").count() == 1
    assert "pending" in page.locator("div[id^='evaluation-']").first.inner_text()
    page.goto(f"{served.base}/portal/runs/{served.running}")
    assert page.locator("#no-evaluations").count() == 1
