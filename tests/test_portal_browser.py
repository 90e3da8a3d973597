"""The release portal in a real browser: Debian's headless Chromium driven by Playwright.

The real coordinator app is served by uvicorn on a free 127.0.0.1 port over a seeded
database (users with passwords, an approved release, a revoked release, a candidate still
awaiting review). A clinician logs in, sees only the approved release, opens it, downloads
the bundle, and the downloaded archive verifies against the public key the portal serves.
A screenshot of the release page is kept in the test's folder. A reviewer approves a
candidate on its page (gates and model card summary in view); a missing reason, a forged
form and the proposer's own approval are refused.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` package;
never ``playwright install`` (it downloads a browser).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from coordinator.api import create_app
from coordinator.auth import API_PREFIX
from coordinator.db import make_engine, run_migrations
from coordinator.settings import Settings
from export.bundle_keys import public_key_fingerprint
from export.bundle_verify import verify_bundle

from api_support import TestClient
from browser_support import CHROMIUM, CHROMIUM_ARGS
from release_support import (
    INTENDED_USE,
    KNOWN_WARNINGS,
    PASSWORD,
    FixedParity,
    good_figures,
    make_user,
    seed_run,
)
from tests_support import served_app

pytestmark = [
    *KNOWN_WARNINGS,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at "
                       "/usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.timeout(120),
]


@dataclass
class Portal:
    """A served, seeded coordinator."""

    base: str
    home: Path
    approved: str      # release id, approved and current
    revoked: str       # release id, revoked
    waiting: int       # candidate id, awaiting review


def _seed(engine: Engine, home: Path) -> tuple[str, str, int]:
    make_user(engine, "clinician", "dr-lee")
    eng = make_user(engine, "ml_engineer", "eng", password=None)
    rev = make_user(engine, "reviewer", "rev", password=None)
    admin = make_user(engine, "admin", "admin", password=None)
    app = create_app(settings=Settings(home=home), engine=engine,
                     site_parity=FixedParity(good_figures()))
    with TestClient(app) as client:
        run_id = seed_run(engine, home)

        def propose() -> int:
            r = client.post(f"{API_PREFIX}/candidates", headers=eng,
                            json={"run_id": run_id, "intended_use": INTENDED_USE})
            assert r.status_code == 201 and r.json()["status"] == "awaiting_review", r.text
            return int(r.json()["id"])

        def approve(cand: int) -> str:
            r = client.post(f"{API_PREFIX}/candidates/{cand}/approve", headers=rev,
                            json={"reason": "clinical safety review CS-12 done"})
            assert r.status_code == 201, r.text
            return str(r.json()["release_id"])

        revoked = approve(propose())
        r = client.post(f"{API_PREFIX}/releases/{revoked}/revoke", headers=admin,
                        json={"reason": "superseded: wrong intended use"})
        assert r.status_code == 200, r.text
        approved = approve(propose())
        waiting = propose()
    return approved, revoked, waiting


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    approved, revoked, waiting = _seed(engine, home)
    try:
        with served_app(create_app(settings=Settings(home=home), engine=engine),
                        name="portal-uvicorn") as port:
            yield Portal(base=f"http://127.0.0.1:{port}", home=home, approved=approved,
                         revoked=revoked, waiting=waiting)
    finally:
        engine.dispose()


def test_a_clinician_logs_in_sees_the_approved_release_and_downloads_it(
        portal: Portal, tmp_path: Path) -> None:
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.set_default_timeout(15_000)

            # Not logged in: the portal sends the browser to the login page.
            page.goto(f"{portal.base}/portal/releases")
            assert "/portal/login" in page.url
            page.fill("#name", "dr-lee")
            page.fill("#password", "not the password")
            page.click("button[type=submit]")
            assert page.locator("[role=alert]").inner_text() == "wrong user name or password"
            page.fill("#name", "dr-lee")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/portal/releases")

            # Only the approved, unrevoked release; nothing of the workflow.
            listed = page.locator("table[aria-label='Approved releases'] tbody tr")
            assert listed.count() == 1
            text = page.content()
            assert portal.approved in text
            assert portal.revoked not in text
            assert f"-c{portal.waiting}" not in text
            assert "Candidates" not in page.locator("header").inner_text()
            page.screenshot(path=str(tmp_path / "releases.png"), full_page=True)

            page.click(f"text={portal.approved}")
            page.wait_for_url(f"**/portal/releases/{portal.approved}")
            assert INTENDED_USE in page.locator(".intended").inner_text()
            fingerprint = page.locator("#fingerprint").inner_text().strip()
            pub = tmp_path / "release.pub.pem"
            pub.write_bytes((portal.home / "release-key" / "release.pub.pem").read_bytes())
            assert fingerprint == public_key_fingerprint(pub.read_bytes())
            # The check it shows fetches this portal's signed revocation list.
            assert (f"--public-key release.pub.pem --coordinator {portal.base}"
                    in page.locator("pre").first.inner_text())
            curve = page.locator("img.curve")
            assert curve.evaluate("img => img.complete && img.naturalWidth > 0")
            page.screenshot(path=str(tmp_path / "release.png"), full_page=True)

            with page.expect_download() as info:
                page.click("#download")
            archive = tmp_path / "download.tar.gz"
            info.value.save_as(archive)
            assert info.value.suggested_filename == f"{portal.approved}.tar.gz"

            # The revoked release and a staff page are refused to the clinician.
            page.goto(f"{portal.base}/portal/releases/{portal.revoked}")
            assert "was revoked" in page.locator("[role=alert]").inner_text()
            page.goto(f"{portal.base}/portal/candidates")
            assert "Only staff see release candidates" in page.content()

            page.goto(f"{portal.base}/portal/releases/{portal.approved}/lineage")
            assert "Sites in each round" in page.content()
            page.screenshot(path=str(tmp_path / "lineage.png"), full_page=True)
            page.click("button:has-text('Log out')")
            page.wait_for_url("**/portal/login")
        finally:
            browser.close()

    out = tmp_path / "unpacked"
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    verified = verify_bundle(bundle_dir=out / portal.approved, public_key=pub,
                             release_id=portal.approved)
    assert verified.model_card["intended_use"] == INTENDED_USE
    assert (tmp_path / "release.png").stat().st_size > 10_000


@dataclass
class Review:
    """A served coordinator with two candidates awaiting review."""

    base: str
    engine: Engine
    run_id: int
    by_engineer: int    # proposed by the ML engineer "eng"
    by_admin: int       # proposed by the admin "boss", who also reviews


@pytest.fixture
def review(tmp_path: Path) -> Iterator[Review]:
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    make_user(engine, "reviewer", "rev-ana")
    boss = make_user(engine, "admin", "boss")
    eng = make_user(engine, "ml_engineer", "eng", password=None)
    app = create_app(settings=Settings(home=home), engine=engine,
                     site_parity=FixedParity(good_figures()))
    try:
        with served_app(app, name="portal-review-uvicorn") as port:
            run_id = seed_run(engine, home)
            with TestClient(app) as client:
                ids = []
                for who in (eng, boss):
                    r = client.post(f"{API_PREFIX}/candidates", headers=who,
                                    json={"run_id": run_id, "intended_use": INTENDED_USE})
                    assert r.status_code == 201 and r.json()["status"] == "awaiting_review"
                    ids.append(int(r.json()["id"]))
            yield Review(base=f"http://127.0.0.1:{port}", engine=engine, run_id=run_id,
                         by_engineer=ids[0],
                         by_admin=ids[1])
    finally:
        engine.dispose()


def _log_in(page: Any, base: str, name: str, next_path: str) -> None:
    page.goto(f"{base}/portal/login?next={next_path}")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{next_path}")


def test_a_reviewer_approves_a_candidate_in_the_portal(review: Review, tmp_path: Path) -> None:
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from coordinator.portal import COOKIE_NAME, csrf_token

    cand = review.by_engineer
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(15_000)
            _log_in(page, review.base, "rev-ana", "/portal/candidates")
            page.click(f"#candidate-{cand}")
            page.wait_for_url(f"**/portal/candidates/{cand}")

            # What the reviewer decides on: every gate with its reason, and per site the
            # rounds it trained, its metrics and its epsilon.
            gates = page.locator("table[aria-label='Gates'] tbody tr")
            assert gates.count() == 5
            assert gates.first.inner_text().startswith("site participation\tpassed\t2 sites "
                                                       "contributed")
            sites = page.locator("table[aria-label='Sites'] tbody tr")
            assert [sites.nth(i).inner_text().split("\t")[:3] for i in range(2)] == [
                ["hospital-a", "3 of 3", "yes"], ["hospital-b", "3 of 3", "yes"]]
            assert sites.first.inner_text().split("\t")[-1] == "2.700"
            page.screenshot(path=str(tmp_path / "candidate.png"), full_page=True)

            # No reason: the browser will not send the form; blanks: the portal refuses them.
            page.click("#approve")
            assert page.locator("#approve-reason").evaluate("e => e.validity.valueMissing")
            assert page.url.endswith(f"/portal/candidates/{cand}")
            page.fill("#approve-reason", "    ")
            page.click("#approve")
            page.wait_for_selector("#refusal")
            assert page.locator("#refusal").inner_text().startswith(
                "Give a reason to approve (3 to 2000 characters)")
            assert page.locator("#status").inner_text() == "awaiting review"
            page.screenshot(path=str(tmp_path / "refused.png"), full_page=False)

            page.fill("#approve-reason", "gates pass; clinical safety review CS-12 done")
            page.click("#approve")
            release_id = f"cardio-run{review.run_id}-round3-c{cand}"
            page.wait_for_url(f"**/portal/releases/{release_id}")
            assert page.locator("h1").inner_text().startswith(release_id)
            assert "gates pass; clinical safety review CS-12 done" in page.content()
            contributing = page.locator("table[aria-label='Contributing sites'] tbody tr")
            assert contributing.count() == 2
            page.screenshot(path=str(tmp_path / "approved.png"), full_page=True)

            # A form from another session (or another site) is refused; nothing changes.
            r = page.request.post(f"{review.base}/portal/candidates/{review.by_admin}/approve",
                                  form={"reason": "forged", "csrf": "0" * 64},
                                  max_redirects=0)
            assert r.status == 403
            assert "did not come from your current portal session" in r.text()
            page.click("button:has-text('Log out')")
            page.wait_for_url("**/portal/login")

            # The admin who proposed a candidate sees no decision form on it, and a crafted
            # post from their own session is refused by the same rule as the API.
            _log_in(page, review.base, "boss", f"/portal/candidates/{review.by_admin}")
            assert page.locator("#why-not").inner_text().startswith(
                "You proposed this candidate: a second person")
            assert page.locator("#approve").count() == 0
            cookie = next(c["value"] for c in context.cookies() if c["name"] == COOKIE_NAME)
            r = page.request.post(f"{review.base}/portal/candidates/{review.by_admin}/approve",
                                  form={"reason": "my own work", "csrf": csrf_token(cookie)},
                                  max_redirects=0)
            assert r.status == 403
            assert (f"You proposed candidate {review.by_admin}; a second person must approve "
                    "it.") in r.text()
            page.reload()
            assert page.locator("#status").inner_text() == "awaiting review"
            page.screenshot(path=str(tmp_path / "own.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "candidate.png").stat().st_size > 10_000
