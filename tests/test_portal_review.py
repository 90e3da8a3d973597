"""Reviewing candidates in the release portal, without a browser: CSRF tokens, gate-failed
candidates, rejection and logins (the browser flow is in test_portal_browser.py).

The real coordinator app over a real SQLite database; candidates go through their real
gates (exports included), with parity figures from :class:`FixedParity`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine

from coordinator.api import create_app
from coordinator.auth import API_PREFIX
from coordinator.portal import COOKIE_NAME, csrf_token
from coordinator.settings import Settings

from api_support import TestClient
from release_support import (
    INTENDED_USE,
    KNOWN_WARNINGS,
    PASSWORD,
    FixedParity,
    audit_actions,
    good_figures,
    make_user,
    seed_run,
)

pytestmark = KNOWN_WARNINGS

THREE = ("hospital-a", "hospital-b", "hospital-c")


def _client(engine: Engine, home: Path) -> TestClient:
    return TestClient(create_app(settings=Settings(home=home), engine=engine,
                                 site_parity=FixedParity(good_figures(THREE))))


def _propose(client: TestClient, engine: Engine, home: Path,
             trained: Mapping[int, Sequence[str]] | None = None) -> int:
    eng = make_user(engine, "ml_engineer", "eng", password=None)
    r = client.post(f"{API_PREFIX}/candidates", headers=eng,
                    json={"run_id": seed_run(engine, home, sites=THREE, trained=trained),
                          "intended_use": INTENDED_USE})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _login(client: TestClient, name: str) -> str:
    """Log in through the portal's form; the session token from its cookie."""
    r = client.post("/portal/login", data={"name": name, "password": PASSWORD},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    match = re.search(rf"{COOKIE_NAME}=([^;]+)", r.headers["set-cookie"])
    assert match is not None
    client.cookies.clear()   # each request below names its session explicitly
    return match.group(1)


def test_a_form_without_this_sessions_csrf_token_is_refused(engine: Engine, home: Path) -> None:
    make_user(engine, "reviewer", "rev")
    with _client(engine, home) as client:
        cand = _propose(client, engine, home)
        first, second = _login(client, "rev"), _login(client, "rev")
        assert csrf_token(first) != csrf_token(second) and first not in csrf_token(first)
        page = client.get(f"/portal/candidates/{cand}", headers={"Cookie":
                                                                  f"{COOKIE_NAME}={second}"})
        assert f'name="csrf" value="{csrf_token(second)}"' in page.text

        url = f"/portal/candidates/{cand}/approve"
        for csrf in ["", "0" * 64, csrf_token(first)]:   # none, made up, another session's
            r = client.post(url, data={"reason": "looks right", "csrf": csrf},
                            headers={"Cookie": f"{COOKIE_NAME}={second}"},
                            follow_redirects=False)
            assert r.status_code == 403, csrf
            assert "did not come from your current portal session" in r.text
        assert "candidate.approved" not in audit_actions(engine)

        r = client.post(url, data={"reason": "looks right", "csrf": csrf_token(second)},
                        headers={"Cookie": f"{COOKIE_NAME}={second}"}, follow_redirects=False)
        assert r.status_code == 303, r.text
        assert r.headers["location"] == f"/portal/releases/cardio-run1-round3-c{cand}"


def test_a_candidate_that_failed_its_gates_is_rejected_not_approved(
        engine: Engine, home: Path) -> None:
    make_user(engine, "reviewer", "rev")
    with _client(engine, home) as client:
        cand = _propose(client, engine, home, trained={n: ["hospital-a"] for n in (1, 2, 3)})
        session = _login(client, "rev")
        cookie = {"Cookie": f"{COOKIE_NAME}={session}"}
        page = client.get(f"/portal/candidates/{cand}", headers=cookie).text
        assert "1 site contributed, 2 needed" in page
        assert 'id="approve-form"' not in page and 'id="reject-form"' in page
        assert "It failed its gates, so it cannot be approved; you may reject it." in page

        form = {"reason": "only one hospital trained it", "csrf": csrf_token(session)}
        r = client.post(f"/portal/candidates/{cand}/approve", data=form, headers=cookie)
        assert r.status_code == 409
        assert (f"Candidate {cand} cannot be approved: it failed its gates: "
                "site_participation: 1 site contributed, 2 needed") in r.text

        r = client.post(f"/portal/candidates/{cand}/reject", data=form, headers=cookie,
                        follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, f"/portal/candidates/{cand}")
        page = client.get(f"/portal/candidates/{cand}", headers=cookie).text
        assert "Rejected by rev" in page and "only one hospital trained it" in page
        assert 'id="reject-form"' not in page
        assert "candidate.rejected" in audit_actions(engine)


@pytest.mark.parametrize("verb", ["approve", "reject"])
def test_a_decision_without_login_goes_to_the_login_page_then_back_to_the_candidate(
        engine: Engine, home: Path, verb: str) -> None:
    with _client(engine, home) as client:
        r = client.post(f"/portal/candidates/7/{verb}", data={"reason": "x" * 10},
                        follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "/portal/login?next=%2Fportal%2Fcandidates%2F7"
