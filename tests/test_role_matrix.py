"""Every role against every action: allowed (the action's success status) or 403.

The matrix below is the design; docs/ml-team-guide.md shows the same table, and a test here
checks that the two agree. Each test acts on its own object (its own candidate, release,
site or user name) in one shared, seeded coordinator, so the order of tests never matters.
A last test walks every API route and checks that none answers without a token, except
the few that are public on purpose.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from sqlalchemy import Engine
from sqlmodel import select

from coordinator.api import create_app
from coordinator.auth import API_PREFIX
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import ReleaseCandidate, Site, Study
from coordinator.settings import Settings
from fedward.certs import ensure_ca

from api_support import FakeLauncher, TestClient
from release_support import (
    INTENDED_USE,
    KNOWN_WARNINGS,
    FixedParity,
    good_figures,
    make_user,
    seed_run,
)

pytestmark = KNOWN_WARNINGS

ROLES: Final = ("admin", "ml_engineer", "reviewer", "clinician")
# action -> the roles allowed to do it. Everything else answers 403.
MATRIX: Final[dict[str, frozenset[str]]] = {
    "list runs": frozenset(ROLES),
    "launch run": frozenset({"admin", "ml_engineer"}),
    "register study": frozenset({"admin", "ml_engineer"}),
    "list studies": frozenset(ROLES),
    "retire study": frozenset({"admin", "ml_engineer"}),
    "add site": frozenset({"admin", "ml_engineer"}),
    "propose candidate": frozenset({"admin", "ml_engineer"}),
    "approve candidate": frozenset({"admin", "reviewer"}),
    "reject candidate": frozenset({"admin", "reviewer"}),
    "set project gates": frozenset({"admin", "reviewer"}),
    "read project gates": frozenset({"admin", "ml_engineer", "reviewer"}),
    "approve candidate in the portal": frozenset({"admin", "reviewer"}),
    "reject candidate in the portal": frozenset({"admin", "reviewer"}),
    "see runs and sites in the portal": frozenset({"admin", "ml_engineer", "reviewer"}),
    "list candidates": frozenset({"admin", "ml_engineer", "reviewer"}),
    "read lineage": frozenset({"admin", "ml_engineer", "reviewer"}),
    "revoke release": frozenset({"admin"}),
    "read audit": frozenset({"admin", "ml_engineer", "reviewer"}),
    "list releases": frozenset(ROLES),
    "download bundle": frozenset(ROLES),
    "create user": frozenset({"admin"}),
    "issue enrollment token": frozenset({"admin"}),
    "revoke site": frozenset({"admin"}),
    "issue token for another user": frozenset({"admin"}),
    "revoke tokens of another user": frozenset({"admin"}),
    "disable user": frozenset({"admin"}),
    "delete user": frozenset({"admin"}),
}
PUBLIC_ROUTES: Final = frozenset({
    ("GET", "/health"), ("POST", "/login"), ("GET", "/revocations"), ("GET", "/release-key"),
    ("GET", "/release-key.pem"),
})


@dataclass
class World:
    """A seeded coordinator: one user per role, a run, candidates and releases to act on."""

    client: TestClient
    engine: Engine
    home: Path
    headers: dict[str, dict[str, str]]
    run_id: int
    candidates: dict[str, int] = field(default_factory=dict)   # "approve:admin" -> id
    releases: dict[str, str] = field(default_factory=dict)     # "revoke:admin" -> release id


def _clone_candidate(world: World, source_id: int) -> int:
    """A copy of an awaiting candidate with its own staged artefacts (no second export)."""
    with session_scope(world.engine) as session:
        src = session.get(ReleaseCandidate, source_id)
        assert src is not None and src.staging_path is not None
        data = src.model_dump(exclude={"id", "staging_path"})
        copy = ReleaseCandidate(**data)
        session.add(copy)
        session.flush()
        assert copy.id is not None
        rel = f"candidates/candidate-{copy.id}"
        shutil.copytree(world.home / src.staging_path, world.home / rel)
        copy.staging_path = rel
        session.add(copy)
        return copy.id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = tmp_path_factory.mktemp("matrix") / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    headers = {role: make_user(engine, role, role, password=None) for role in ROLES}
    proposer = make_user(engine, "ml_engineer", "proposer", password=None)
    approver = make_user(engine, "reviewer", "approver", password=None)
    for role in ROLES:   # each role acts on its own accounts and sites
        for kind in ("tok", "rvk", "dis", "del"):
            make_user(engine, "clinician", f"{kind}-{role.replace('_', '-')}", password=None)
    ensure_ca(home / "pki")   # an enrollment token pins the site CA
    with session_scope(engine) as session:
        session.add(Site(name="site-a", status="registered", flower_node_id="11",
                         public_key="ssh-ed25519 AAAA"))
        for role in ROLES:
            session.add(Site(name=f"rv-{role.replace('_', '-')}", status="added"))
            # A study version of its own to retire (the route reads no spec of it).
            session.add(Study(name=f"retire-{role.replace('_', '-')}", version=1,
                              content_hash="0" * 64, spec_json="{}",
                              registered_by="admin"))
    app = create_app(settings=Settings(home=home), engine=engine,
                     launcher=FakeLauncher(engine), site_parity=FixedParity(good_figures()))
    client = TestClient(app)
    client.__enter__()
    world = World(client=client, engine=engine, home=home, headers=headers,
                  run_id=seed_run(engine, home))
    r = client.post(f"{API_PREFIX}/candidates", headers=proposer,
                    json={"run_id": world.run_id, "intended_use": INTENDED_USE})
    assert r.status_code == 201 and r.json()["status"] == "awaiting_review", r.text
    first = int(r.json()["id"])
    for action in ("approve", "reject", "portal-approve", "portal-reject"):
        for role in ROLES:
            world.candidates[f"{action}:{role}"] = _clone_candidate(world, first)
    for key in [f"revoke:{role}" for role in ROLES] + ["download"]:
        r = client.post(f"{API_PREFIX}/candidates/{_clone_candidate(world, first)}/approve",
                        headers=approver, json={"reason": "for the matrix"})
        assert r.status_code == 201, r.text
        world.releases[key] = r.json()["release_id"]
    yield world
    client.__exit__(None, None, None)
    engine.dispose()


Request = tuple[str, str, dict[str, Any] | None, int]


def _request(world: World, action: str, role: str) -> Request:
    """(method, path, body, success status) of one action, on this role's own object."""
    run = world.run_id
    own = role.replace("_", "-")
    requests: dict[str, Callable[[], Request]] = {
        "list runs": lambda: ("GET", "/runs", None, 200),
        "launch run": lambda: ("POST", "/runs", {"project": "cardio",
                                                 "task": "breast_cancer_mlp", "rounds": 2,
                                                 "epsilon": 3.0}, 201),
        "add site": lambda: ("POST", "/sites", {"name": f"site-{role.replace('_', '-')}"}, 201),
        "register study": lambda: ("POST", "/studies", {"spec": {
            "spec_version": 1, "name": f"matrix-{own}",
            "features": [{"name": "age", "type": "numeric", "range": [0, 120]}],
            "label": {"name": "y", "kind": "binary", "classes": ["no", "yes"]},
            "model": {"family": "logistic_regression"},
            "training": {"lr": 0.1, "batch_size": 16}}}, 201),
        "list studies": lambda: ("GET", "/studies", None, 200),
        "retire study": lambda: ("POST", f"/studies/retire-{own}@1/retire",
                                 {"reason": "matrix retirement"}, 200),
        "propose candidate": lambda: ("POST", "/candidates",
                                      {"run_id": run, "intended_use": INTENDED_USE}, 201),
        "approve candidate": lambda: (
            "POST", f"/candidates/{world.candidates[f'approve:{role}']}/approve",
            {"reason": "matrix approval"}, 201),
        "reject candidate": lambda: (
            "POST", f"/candidates/{world.candidates[f'reject:{role}']}/reject",
            {"reason": "matrix rejection"}, 200),
        "set project gates": lambda: ("PUT", "/projects/cardio/gates",
                                      {"min_site_auc": 0.5}, 200),
        "read project gates": lambda: ("GET", "/projects/cardio/gates", None, 200),
        "list candidates": lambda: ("GET", "/candidates", None, 200),
        "read lineage": lambda: ("GET", f"/versions/{run}/3/lineage", None, 200),
        "revoke release": lambda: (
            "POST", f"/releases/{world.releases[f'revoke:{role}']}/revoke",
            {"reason": "matrix revocation"}, 200),
        "read audit": lambda: ("GET", "/audit", None, 200),
        "list releases": lambda: ("GET", "/releases", None, 200),
        "download bundle": lambda: ("GET", f"/releases/{world.releases['download']}/bundle",
                                    None, 200),
        "create user": lambda: ("POST", "/users", {"name": f"new-{role}",
                                                   "role": "clinician"}, 201),
        "issue enrollment token": lambda: ("POST", "/sites/site-a/enrollment-token", None,
                                           201),
        "revoke site": lambda: ("POST", f"/sites/rv-{own}/revoke", {"reason": "matrix"}, 200),
        "issue token for another user": lambda: ("POST", f"/users/tok-{own}/token", None, 201),
        "revoke tokens of another user": lambda: ("POST", f"/users/rvk-{own}/revoke-tokens",
                                                  None, 204),
        "disable user": lambda: ("POST", f"/users/dis-{own}/disable", {"reason": "matrix"},
                                 200),
        "delete user": lambda: ("DELETE", f"/users/del-{own}", None, 204),
    }
    return requests[action]()


PORTAL_ACTIONS: Final = {"approve candidate in the portal": "approve",
                         "reject candidate in the portal": "reject"}
PORTAL_PAGES: Final = "see runs and sites in the portal"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", [a for a in MATRIX
                                    if a not in PORTAL_ACTIONS and a != PORTAL_PAGES])
def test_role_against_action(world: World, action: str, role: str) -> None:
    method, path, body, success = _request(world, action, role)
    r = world.client.request(method, API_PREFIX + path, json=body, headers=world.headers[role])
    if role in MATRIX[action]:
        assert r.status_code == success, f"{role} {action}: {r.status_code} {r.text[:300]}"
    else:
        assert r.status_code == 403, f"{role} {action}: {r.status_code} {r.text[:300]}"
        assert r.json()["detail"].startswith(f"role {role!r} may not do this; needs one of ")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(PORTAL_ACTIONS))
def test_role_against_portal_decision(world: World, action: str, role: str) -> None:
    """The portal's approve and reject forms follow the API's roles (the session cookie
    holds the role's token, the form its CSRF token)."""
    from coordinator.portal import COOKIE_NAME, csrf_token

    verb = PORTAL_ACTIONS[action]
    cand = world.candidates[f"portal-{verb}:{role}"]
    token = world.headers[role]["Authorization"].split()[1]
    r = world.client.post(f"/portal/candidates/{cand}/{verb}", follow_redirects=False,
                          data={"reason": f"matrix {verb} in the portal",
                                "csrf": csrf_token(token)},
                          headers={"Cookie": f"{COOKIE_NAME}={token}"})
    with session_scope(world.engine) as session:
        row = session.get(ReleaseCandidate, cand)
        assert row is not None
        status = row.status
    if role in MATRIX[action]:
        assert r.status_code == 303, f"{role} {action}: {r.status_code} {r.text[:300]}"
        assert status == ("approved" if verb == "approve" else "rejected")
    elif role == "clinician":
        assert r.status_code == 403 and "Only staff see release candidates" in r.text
        assert status == "awaiting_review"
    else:
        assert r.status_code == 403, f"{role} {action}: {r.status_code} {r.text[:300]}"
        assert "Only reviewers and admins approve or reject candidates" in r.text
        assert status == "awaiting_review"


@pytest.mark.parametrize("role", ROLES)
def test_role_against_portal_dashboard(world: World, role: str) -> None:
    """The dashboard's pages (runs, a run, sites) are for staff; a clinician gets 403."""
    from coordinator.portal import COOKIE_NAME

    token = world.headers[role]["Authorization"].split()[1]
    for path in ("/portal/runs", "/portal/runs?state=completed", f"/portal/runs/{world.run_id}",
                 "/portal/sites"):
        r = world.client.get(path, follow_redirects=False,
                             headers={"Cookie": f"{COOKIE_NAME}={token}"})
        if role in MATRIX[PORTAL_PAGES]:
            assert r.status_code == 200, f"{role} {path}: {r.status_code} {r.text[:300]}"
        else:
            assert r.status_code == 403, f"{role} {path}: {r.status_code} {r.text[:300]}"
            assert "Only staff" in r.text


def test_a_forbidden_attempt_changes_nothing(world: World) -> None:
    cand = world.candidates["approve:clinician"]
    r = world.client.post(f"{API_PREFIX}/candidates/{cand}/approve",
                          json={"reason": "I am a clinician"}, headers=world.headers["clinician"])
    assert r.status_code == 403
    with session_scope(world.engine) as session:
        row = session.get(ReleaseCandidate, cand)
        assert row is not None and row.status == "awaiting_review"


def test_every_route_needs_a_token_except_the_public_ones(world: World) -> None:
    schema = world.client.app.openapi()  # type: ignore[attr-defined]
    routes = [(method.upper(), path.removeprefix(API_PREFIX))
              for path, ops in schema["paths"].items() for method in ops]
    assert len(routes) > 30
    assert set(routes) >= PUBLIC_ROUTES
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        r = world.client.request(method, API_PREFIX + concrete, json={})
        if (method, path) in PUBLIC_ROUTES:
            assert r.status_code != 401, (method, path)
        else:
            assert r.status_code == 401, (method, path, r.status_code)


def test_portal_pages_need_a_login(world: World) -> None:
    for path in ["/portal/releases", f"/portal/releases/{world.releases['download']}",
                 f"/portal/releases/{world.releases['download']}/download", "/portal/candidates",
                 f"/portal/candidates/{world.candidates['approve:admin']}",
                 "/portal/runs", f"/portal/runs/{world.run_id}", "/portal/sites"]:
        r = world.client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/portal/login?next=")


def test_the_guide_shows_this_matrix() -> None:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "ml-team-guide.md").read_text()
    rows = re.findall(r"^\| ([a-z ]+) \| (.+) \|$", guide, flags=re.MULTILINE)
    table = {}
    for action, cells in rows:
        marks = [c.strip() for c in cells.split("|")]
        if action in MATRIX and len(marks) == len(ROLES):
            table[action] = frozenset(r for r, m in zip(ROLES, marks, strict=True)
                                      if m.startswith("yes"))
    assert table == MATRIX, json.dumps({k: sorted(v) for k, v in table.items()})


def test_the_matrix_has_one_user_per_role(world: World) -> None:
    from coordinator.models import User

    with session_scope(world.engine) as session:
        names = {u.name: u.role for u in session.exec(select(User))}
    assert all(names[r] == r for r in ROLES)
