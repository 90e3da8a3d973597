"""REST API of the coordinator over a real, migrated SQLite database.

The Flower boundary (launching runs, registering node keys) is replaced by small fake
classes here; the real implementations are exercised with real processes in the
integration tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from coordinator.api import create_app
from coordinator.auth import API_PREFIX, create_user
from coordinator.db import make_engine, session_scope
from coordinator.models import AuditEvent, Run
from coordinator.repository import finish_run, mark_run_started
from coordinator.run_audit import record_admission
from coordinator.settings import Settings

from api_support import (
    BIG_NODE_ID,
    FakeLauncher,
    FakeRegistrar,
    TestClient,
    api,
    cli_client,
    exercise_api_flow,
    node_key,
    run_body,
    setup_registered_sites,
)


def test_health_needs_no_token(make_client: Callable[..., TestClient]) -> None:
    r = make_client().get(api("/health"))
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok"}


def test_openapi_docs_are_served(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert f"{API_PREFIX}/runs" in paths
    assert f"{API_PREFIX}/sites/{{name}}/node-key" in paths


def test_full_flow_on_sqlite(engine: Engine, make_client: Callable[..., TestClient],
                             token_for: Callable[..., dict[str, str]]) -> None:
    launcher = FakeLauncher(engine)
    client = make_client(launcher=launcher, registrar=FakeRegistrar())
    exercise_api_flow(client, engine, token_for("ml_engineer"), launcher)


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/projects"), ("post", "/projects"), ("get", "/sites"), ("post", "/runs"),
     ("get", "/runs/1"), ("get", "/audit"), ("get", "/audit/verify"), ("get", "/me")],
)
def test_missing_or_unknown_token_is_401(
    make_client: Callable[..., TestClient], method: str, path: str
) -> None:
    client = make_client()
    r = client.request(method, api(path), json={})
    assert r.status_code == 401
    assert "Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.request(method, api(path), json={},
                       headers={"Authorization": "Bearer not-a-real-token"})
    assert r.status_code == 401
    assert r.json()["detail"] == "unknown API token"


def test_token_identifies_user(make_client: Callable[..., TestClient],
                               token_for: Callable[..., dict[str, str]]) -> None:
    me = make_client().get(api("/me"), headers=token_for("reviewer")).json()
    assert me["role"] == "reviewer"
    assert me["name"].startswith("reviewer-")


def test_roles_are_enforced(make_client: Callable[..., TestClient],
                            token_for: Callable[..., dict[str, str]]) -> None:
    client = make_client()
    clinician = token_for("clinician")
    r = client.post(api("/projects"), json={"name": "x1"}, headers=clinician)
    assert r.status_code == 403
    assert "clinician" in r.json()["detail"]
    assert client.get(api("/audit"), headers=clinician).status_code == 403
    assert client.get(api("/projects"), headers=clinician).status_code == 200
    assert client.get(api("/audit"), headers=token_for("reviewer")).status_code == 200


def test_create_user_rejects_bad_role_and_duplicates(engine: Engine) -> None:
    with session_scope(engine) as session:
        user, token = create_user(session, name="alice", role="admin")
        assert len(token) >= 40
        assert token not in user.token_hash
    with session_scope(engine) as session, pytest.raises(ValueError, match="unknown role"):
        create_user(session, name="bob", role="root")
    with session_scope(engine) as session, pytest.raises(ValueError, match="already exists"):
        create_user(session, name="alice", role="reviewer")


@pytest.fixture
def launch_ready(engine: Engine, make_client: Callable[..., TestClient],
                 token_for: Callable[..., dict[str, str]]
                 ) -> tuple[TestClient, dict[str, str], FakeLauncher]:
    """A client with a project and two registered sites, ready to launch runs."""
    launcher = FakeLauncher(engine)
    client = make_client(launcher=launcher, registrar=FakeRegistrar())
    headers = token_for("admin")
    client.post(api("/projects"), json={"name": "oncology"}, headers=headers)
    setup_registered_sites(client, headers, ["site-a", "site-b"])
    return client, headers, launcher


@pytest.mark.parametrize(
    ("overrides", "field", "why"),
    [
        ({"rounds": 0}, "rounds", "greater than or equal to 1"),
        ({"rounds": 101}, "rounds", "less than or equal to 100"),
        ({"task": "resnet9000"}, "task", "unknown task 'resnet9000' (known tasks: "
                                         "breast_cancer_mlp, digits_cnn)"),
        ({"epsilon": 0}, "epsilon", "greater than 0"),
        ({"epsilon": -1.5}, "epsilon", "greater than 0"),
        ({"delta": 1}, "delta", "less than 1"),
        ({"local_epochs": 51}, "local_epochs", "less than or equal to 50"),
        ({"round_deadline_s": 1}, "round_deadline_s", "greater than or equal to 5"),
        ({"approval_wait_s": -1}, "approval_wait_s", "greater than or equal to 0"),
        ({"approval_wait_s": 86401}, "approval_wait_s", "less than or equal to 86400"),
        ({"max_update_norm": 0}, "max_update_norm", "greater than 0"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"round": 3}, "round", "Extra inputs are not permitted"),
        ({"sites": ["site-a", "site-a"]}, "sites", "more than once: site-a"),
        ({"sites": ["Site_A"]}, "sites.0", "should match pattern"),
        ({"aggregation": "krum"}, "aggregation", "unknown aggregation 'krum': use fedavg, "
                                                 "median, trimmed-mean, fedavgm, fedadam or "
                                                 "fedyogi"),
        ({"aggregation": "fedadam", "aggregation_options": {"beta1": 1.5, "eta": 0.1}},
         "aggregation_options", "aggregation 'fedadam' (takes server_lr, beta1, beta2, tau, "
                                "bias_correction): beta1: Input should be less than 1; eta: "
                                "unknown option"),
        ({"aggregation_options": {"server_lr": 0.5}}, "aggregation_options",
         "aggregation 'fedavg' (takes no options): server_lr: unknown option"),
        ({"aggregation": "fedavgm", "aggregation_options": {"momentum": [0.9]}},
         "aggregation_options", "(takes server_lr, momentum): momentum: Input should be a "
                                "valid number"),
    ],
)
def test_bad_run_fields_are_422_naming_the_field(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
    overrides: dict[str, Any], field: str, why: str,
) -> None:
    client, headers, launcher = launch_ready
    r = client.post(api("/runs"), json=run_body(**overrides), headers=headers)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["message"].startswith(f"{field}: ")
    assert why in body["message"]
    assert body["detail"][0]["loc"][0] == "body"  # FastAPI's own structure is kept
    assert launcher.launched == []


def test_run_options_reach_the_stored_config(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
) -> None:
    client, headers, _ = launch_ready
    default = client.post(api("/runs"), json=run_body(), headers=headers).json()["config"]
    assert (default["aggregation"], default["approval_wait_s"], default["max_update_norm"]) \
        == ("fedavg", 3600.0, None)
    chosen = client.post(api("/runs"), json=run_body(
        aggregation="median", approval_wait_s=0, max_update_norm=25.0),
        headers=headers).json()["config"]
    assert (chosen["aggregation"], chosen["approval_wait_s"], chosen["max_update_norm"]) \
        == ("median", 0.0, 25.0)


def test_aggregation_options_are_stored_complete_with_their_defaults(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
) -> None:
    client, headers, _ = launch_ready
    default = client.post(api("/runs"), json=run_body(), headers=headers).json()["config"]
    assert default["aggregation_options"] == {}
    chosen = client.post(api("/runs"), json=run_body(
        aggregation="fedadam", aggregation_options={"server_lr": 0.05, "tau": 0.01}),
        headers=headers).json()["config"]
    assert (chosen["aggregation"], chosen["aggregation_options"]) == (
        "fedadam", {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 0.01,
                    "bias_correction": False})


def test_launch_passes_aggregation_options_and_shows_why_bad_ones_are_refused(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from coordinator import cli

    client, headers, launcher = launch_ready

    monkeypatch.setattr(cli, "api_client", lambda *_a: cli_client(client, headers))
    runner = CliRunner()
    base = ["launch", "--project", "oncology", "--task", "breast_cancer_mlp",
            "--epsilon", "3", "--aggregation", "fedadam"]

    ok = runner.invoke(cli.app, [*base, "--aggregation-option", "server_lr=0.05",
                                 "--aggregation-option", "bias_correction=true", "--json"])
    assert ok.exit_code == 0, ok.output
    config = json.loads(ok.output)["config"]
    assert config["aggregation_options"] == {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99,
                                             "tau": 0.001, "bias_correction": True}
    bad = runner.invoke(cli.app, [*base, "--aggregation-option", "beta1=2"])
    assert bad.exit_code == 1
    assert " ".join(bad.output.split()) == (
        "error: POST /runs -> 422: aggregation_options: Value error, aggregation 'fedadam' "
        "(takes server_lr, beta1, beta2, tau, bias_correction): beta1: Input should be less "
        "than 1")
    typo = runner.invoke(cli.app, [*base, "--aggregation-option", "server_lr"])
    assert typo.exit_code == 1
    assert "--aggregation-option 'server_lr': write KEY=VALUE" in " ".join(typo.output.split())
    assert len(launcher.launched) == 1


def test_run_view_names_the_sites_it_waits_for_and_what_their_it_does(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher], engine: Engine,
) -> None:
    from coordinator.run_control_cli import waiting_note

    client, headers, _ = launch_ready
    run_id = client.post(api("/runs"), json=run_body(), headers=headers).json()["id"]
    mark_run_started(engine, run_id, "4242")
    assert client.get(api(f"/runs/{run_id}"), headers=headers).json()[
        "waiting_for_approval"] == []
    since = "2026-01-31T09:12:03+00:00"
    reason = (f"pending-approval: run {run_id} waits for approval at site site-b "
              f"(fedward-site approve {run_id})")
    record_admission(engine, run_id, action="run.waiting", detail={
        "state": "waiting", "started": since, "deadline": "2026-01-31T10:12:03+00:00",
        "accepted": ["site-a"], "waiting": {"site-b": {"since": since, "reason": reason}},
        "refused": {}, "unanswered": {}, "offline": []})

    run = client.get(api(f"/runs/{run_id}"), headers=headers).json()
    assert run["status"] == "running"
    assert run["waiting_for_approval"] == ["site-b"]
    assert run["waiting_since"] == "2026-01-31T09:12:03Z"
    assert run["admission"]["state"] == "waiting"
    assert run["admission"]["accepted"] == ["site-a"]
    assert run["admission"]["waiting"] == [{
        "site": "site-b", "since": "2026-01-31T09:12:03Z", "reason": reason,
        "action": f"its IT runs `fedward-site approve {run_id}` (or `deny`)"}]
    listed = {r["id"]: r for r in client.get(api("/runs"), headers=headers).json()}
    assert listed[run_id]["waiting_for_approval"] == ["site-b"]
    assert waiting_note(run) == (f"waiting for approval at site-b since 09:12:03 UTC: its IT "
                                 f"runs `fedward-site approve {run_id}`")

    record_admission(engine, run_id, action="run.admitted", detail={
        "state": "admitted", "accepted": ["site-a", "site-b"], "waiting": {}})
    run = client.get(api(f"/runs/{run_id}"), headers=headers).json()
    assert run["waiting_for_approval"] == [] and run["admission"]["state"] == "admitted"
    assert waiting_note(run) == ""
    # A run that has ended waits for nobody, whatever its last admission entry says.
    record_admission(engine, run_id, action="run.waiting", detail={
        "state": "admitted", "waiting": {"site-b": {"since": since, "reason": reason}}})
    assert client.get(api(f"/runs/{run_id}"), headers=headers).json()[
        "waiting_for_approval"] == ["site-b"]
    finish_run(engine, run_id, status="completed", reason=None)
    assert client.get(api(f"/runs/{run_id}"), headers=headers).json()[
        "waiting_for_approval"] == []


def test_missing_required_field_is_named(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
) -> None:
    client, headers, _ = launch_ready
    body = run_body()
    del body["epsilon"]
    r = client.post(api("/runs"), json=body, headers=headers)
    assert r.status_code == 422
    assert r.json()["message"] == "epsilon: Field required"


def test_min_sites_above_taking_part_is_422_with_counts(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher], engine: Engine,
) -> None:
    client, headers, launcher = launch_ready
    r = client.post(api("/runs"), json=run_body(min_sites=3), headers=headers)
    assert r.status_code == 422
    assert r.json()["message"] == (
        "min_sites: 3 site(s) required but only 2 registered site(s) will take part "
        "(site-a, site-b)")
    assert r.json()["detail"][0]["loc"] == ["body", "min_sites"]
    r = client.post(api("/runs"), json=run_body(min_sites=2, sites=["site-b"]), headers=headers)
    assert r.status_code == 422
    assert r.json()["message"].startswith("min_sites: 2 site(s) required but only 1 ")
    assert launcher.launched == []
    with Session(engine) as session:
        assert session.exec(select(Run)).all() == []


def test_unknown_or_unregistered_sites_are_422(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
) -> None:
    client, headers, _ = launch_ready
    r = client.post(api("/runs"), json=run_body(min_sites=1, sites=["site-z"]), headers=headers)
    assert r.status_code == 422
    assert r.json()["message"] == "sites: unknown site(s): site-z"
    client.post(api("/sites"), json={"name": "site-c"}, headers=headers)
    r = client.post(api("/runs"), json=run_body(min_sites=1, sites=["site-c"]), headers=headers)
    assert r.json()["message"] == "sites: site(s) not registered: site-c (added)"


def test_unknown_project_is_422(
    launch_ready: tuple[TestClient, dict[str, str], FakeLauncher],
) -> None:
    client, headers, _ = launch_ready
    r = client.post(api("/runs"), json=run_body(project="cardio"), headers=headers)
    assert r.status_code == 422
    assert r.json()["message"] == "project: unknown project 'cardio'"


def test_launch_failure_marks_run_failed_and_is_503(
    engine: Engine, make_client: Callable[..., TestClient],
    token_for: Callable[..., dict[str, str]],
) -> None:
    launcher = FakeLauncher(engine, fail=ConnectionRefusedError("SuperLink not reachable"))
    client = make_client(launcher=launcher, registrar=FakeRegistrar())
    headers = token_for("admin")
    client.post(api("/projects"), json={"name": "oncology"}, headers=headers)
    setup_registered_sites(client, headers, ["site-a", "site-b"])
    r = client.post(api("/runs"), json=run_body(), headers=headers)
    assert r.status_code == 503
    reason = "launch failed: ConnectionRefusedError: SuperLink not reachable"
    assert r.json()["detail"] == reason
    (run,) = client.get(api("/runs"), headers=headers).json()
    assert run["status"] == "failed"
    assert run["failure_reason"] == reason
    assert run["finished_at"] is not None


def test_launcher_racing_serverapp_keeps_its_run_id(
    engine: Engine, make_client: Callable[..., TestClient],
    token_for: Callable[..., dict[str, str]],
) -> None:
    launcher = FakeLauncher(engine, serverapp_first=True)
    client = make_client(launcher=launcher, registrar=FakeRegistrar())
    headers = token_for("admin")
    client.post(api("/projects"), json={"name": "oncology"}, headers=headers)
    setup_registered_sites(client, headers, ["site-a"])
    r = client.post(api("/runs"), json=run_body(min_sites=1), headers=headers)
    assert r.status_code == 201
    assert r.json()["status"] == "running"
    assert r.json()["flwr_run_id"] == "777"


def test_without_launcher_or_registrar_is_503(
    make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]],
) -> None:
    client = make_client()
    headers = token_for("admin")
    client.post(api("/projects"), json={"name": "oncology"}, headers=headers)
    client.post(api("/sites"), json={"name": "site-a"}, headers=headers)
    r = client.post(api("/sites/site-a/node-key"), json={"public_key": node_key()},
                    headers=headers)
    assert r.status_code == 503
    assert "not configured" in r.json()["detail"]
    r = client.post(api("/runs"), json=run_body(min_sites=1), headers=headers)
    assert r.status_code == 503
    assert "not configured" in r.json()["detail"]


@pytest.mark.parametrize(
    "path",
    ["/runs/999", "/runs/999/rounds", "/runs/999/metrics", "/runs/999/checkpoints",
     "/sites/nowhere"],
)
def test_unknown_ids_are_404(make_client: Callable[..., TestClient],
                             token_for: Callable[..., dict[str, str]], path: str) -> None:
    r = make_client().get(api(path), headers=token_for("reviewer"))
    assert r.status_code == 404
    assert r.json()["detail"] in ("run 999 not found", "site 'nowhere' not found")


def test_duplicates_are_409(make_client: Callable[..., TestClient],
                            token_for: Callable[..., dict[str, str]]) -> None:
    client, headers = make_client(), token_for("admin")
    assert client.post(api("/projects"), json={"name": "p1"}, headers=headers).status_code == 201
    r = client.post(api("/projects"), json={"name": "p1"}, headers=headers)
    assert r.status_code == 409
    assert r.json()["detail"] == "project 'p1' already exists"
    assert client.post(api("/sites"), json={"name": "abc"}, headers=headers).status_code == 201
    assert client.post(api("/sites"), json={"name": "abc"}, headers=headers).status_code == 409


@pytest.mark.parametrize("name", ["ab", "Site-A", "site_a", "x" * 41, "site a"])
def test_bad_site_names_are_422(make_client: Callable[..., TestClient],
                                token_for: Callable[..., dict[str, str]], name: str) -> None:
    r = make_client().post(api("/sites"), json={"name": name}, headers=token_for("admin"))
    assert r.status_code == 422
    assert r.json()["message"].startswith("name: String should match pattern")


def test_node_key_registration(engine: Engine, make_client: Callable[..., TestClient],
                               token_for: Callable[..., dict[str, str]]) -> None:
    registrar = FakeRegistrar()
    client, headers = make_client(registrar=registrar), token_for("admin")
    client.post(api("/sites"), json={"name": "site-a"}, headers=headers)
    client.post(api("/sites"), json={"name": "site-b"}, headers=headers)

    r = client.post(api("/sites/site-a/node-key"), json={"public_key": "ssh-rsa nonsense"},
                    headers=headers)
    assert r.status_code == 422
    assert r.json()["message"].startswith("public_key: Value error, not an OpenSSH public key")
    assert registrar.calls == []

    key = node_key()
    r = client.post(api("/sites/site-a/node-key"), json={"public_key": key}, headers=headers)
    assert r.status_code == 200
    assert r.json()["flower_node_id"] == BIG_NODE_ID
    assert r.json()["registered_at"] is not None
    assert registrar.calls == [(key, "site-a")]
    # Same key again: nothing to do. Another key: refused. Key of another site: refused.
    r = client.post(api("/sites/site-a/node-key"), json={"public_key": key}, headers=headers)
    assert r.status_code == 200
    assert len(registrar.calls) == 1
    r = client.post(api("/sites/site-a/node-key"), json={"public_key": node_key()},
                    headers=headers)
    assert r.status_code == 409
    r = client.post(api("/sites/site-b/node-key"), json={"public_key": key}, headers=headers)
    assert r.status_code == 409
    assert "site 'site-a'" in r.json()["detail"]
    r = client.post(api("/sites/site-x/node-key"), json={"public_key": key}, headers=headers)
    assert r.status_code == 404


def test_registrar_failure_is_503_and_changes_nothing(
    make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]],
) -> None:
    client = make_client(registrar=FakeRegistrar(fail=RuntimeError("SuperLink said no")))
    headers = token_for("admin")
    client.post(api("/sites"), json={"name": "site-a"}, headers=headers)
    r = client.post(api("/sites/site-a/node-key"), json={"public_key": node_key()},
                    headers=headers)
    assert r.status_code == 503
    assert r.json()["detail"] == "registering the node key failed: RuntimeError: SuperLink said no"
    site = client.get(api("/sites/site-a"), headers=headers).json()
    assert (site["status"], site["public_key"], site["flower_node_id"]) == ("added", None, None)


def test_tampered_audit_row_is_reported_by_id(
    engine: Engine, make_client: Callable[..., TestClient],
    token_for: Callable[..., dict[str, str]],
) -> None:
    client, headers = make_client(), token_for("admin")
    for name in ("p1", "p2", "p3"):
        client.post(api("/projects"), json={"name": name, "description": name},
                    headers=headers)
    ok = client.get(api("/audit/verify"), headers=headers).json()
    assert ok == {"ok": True, "first_broken_id": None, "events": 4}  # user + 3 projects
    with Session(engine) as session:
        target = session.exec(
            select(AuditEvent).where(AuditEvent.subject == "project:p2")).one()
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE audit_events SET detail_json = :d WHERE id = :i"),
            {"d": '{"description":"p2 (edited)"}', "i": target.id},
        )
    bad = client.get(api("/audit/verify"), headers=headers).json()
    assert bad == {"ok": False, "first_broken_id": target.id, "events": 4}
    page = client.get(api("/audit"), params={"limit": 2, "offset": 1}, headers=headers).json()
    assert page["total"] == 4
    assert [e["subject"] for e in page["items"]] == ["project:p2", "project:p1"]
    assert page["items"][0]["detail"] == {"description": "p2 (edited)"}


def test_node_id_already_taken_is_409(make_client: Callable[..., TestClient],
                                      token_for: Callable[..., dict[str, str]]) -> None:
    class SameIdRegistrar:
        def register(self, public_key: str, name: str) -> str:
            return "5"

    client, headers = make_client(registrar=SameIdRegistrar()), token_for("admin")
    for name in ("site-a", "site-b"):
        client.post(api("/sites"), json={"name": name}, headers=headers)
    r = client.post(api("/sites/site-a/node-key"), json={"public_key": node_key()},
                    headers=headers)
    assert r.status_code == 200
    r = client.post(api("/sites/site-b/node-key"), json={"public_key": node_key()},
                    headers=headers)
    assert r.status_code == 409
    assert r.json()["detail"] == "Flower node id 5 is already another site's"
    assert client.get(api("/sites/site-b"), headers=headers).json()["status"] == "added"


# --- credentials that end ------------------------------------------------------------------


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _user(client: TestClient, admin: dict[str, str], name: str, role: str = "ml_engineer",
          password: str | None = "a long enough passphrase") -> str:  # noqa: S107
    body: dict[str, Any] = {"name": name, "role": role}
    if password is not None:
        body["password"] = password
    r = client.post(api("/users"), json=body, headers=admin)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def _audit(engine: Engine) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all())


def test_api_tokens_expire_after_the_configured_lifetime(
        engine: Engine, tmp_path: Path, token_for: Callable[..., dict[str, str]]) -> None:
    from datetime import UTC, datetime, timedelta

    from coordinator.models import User

    settings = Settings(home=tmp_path / "home", token_ttl_days=7)
    with TestClient(create_app(settings=settings, engine=engine)) as client:
        token = _user(client, token_for("admin"), "short-lived", password=None)
        me = client.get(api("/me"), headers=_bearer(token)).json()
        expires = datetime.fromisoformat(me["token_expires_at"])
        assert abs(expires - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=1)
        with session_scope(engine) as session:
            user = session.exec(select(User).where(User.name == "short-lived")).one()
            user.token_expires_at = datetime.now(UTC) - timedelta(seconds=1)
            session.add(user)
        r = client.get(api("/me"), headers=_bearer(token))
        assert r.status_code == 401
        assert r.json()["detail"].startswith("this API token expired on ")
        assert "fedward-coordinator new-token" in r.json()["detail"]


def test_logout_revokes_the_token_it_is_sent_with(
        make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]]
) -> None:
    client, admin = make_client(), token_for("admin")
    token = _user(client, admin, "leaver")
    assert client.post(api("/logout"), headers=_bearer(token)).status_code == 204
    r = client.get(api("/me"), headers=_bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # Everywhere: every session and the API token at once.
    token = client.post(api("/users/leaver/token"), headers=admin).json()["token"]
    login = {"name": "leaver", "password": "a long enough passphrase"}
    sessions = [client.post(api("/login"), json=login).json()["token"] for _ in range(2)]
    assert client.post(api("/logout?everywhere=true"),
                       headers=_bearer(sessions[0])).status_code == 204
    for t in [token, *sessions]:
        assert client.get(api("/me"), headers=_bearer(t)).status_code == 401


def test_new_token_and_revoke_tokens_for_oneself_or_by_an_admin(
        make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]]
) -> None:
    client, admin = make_client(), token_for("admin")
    old = _user(client, admin, "rotor")
    r = client.post(api("/users/rotor/token"), headers=_bearer(old))
    assert r.status_code == 201, r.text
    new = r.json()["token"]
    assert client.get(api("/me"), headers=_bearer(old)).status_code == 401
    assert client.get(api("/me"), headers=_bearer(new)).json()["name"] == "rotor"
    other = _user(client, admin, "someone-else")
    assert client.post(api("/users/rotor/token"), headers=_bearer(other)).status_code == 403
    assert client.post(api("/users/rotor/revoke-tokens"),
                       headers=_bearer(other)).status_code == 403
    assert client.post(api("/users/rotor/revoke-tokens"), headers=admin).status_code == 204
    assert client.get(api("/me"), headers=_bearer(new)).status_code == 401
    listed = {u["name"]: u for u in client.get(api("/users"), headers=admin).json()}
    assert listed["rotor"]["token_revoked"] is True
    assert listed["someone-else"]["token_revoked"] is False


def test_admins_disable_enable_and_delete_users(
        engine: Engine, make_client: Callable[..., TestClient],
        token_for: Callable[..., dict[str, str]]) -> None:
    client, admin = make_client(), token_for("admin")
    token = _user(client, admin, "departed")
    login = {"name": "departed", "password": "a long enough passphrase"}
    session_token = client.post(api("/login"), json=login).json()["token"]
    engineer = _user(client, admin, "engineer", password=None)
    assert client.post(api("/users/departed/disable"), json={"reason": "left the team"},
                       headers=_bearer(engineer)).status_code == 403
    r = client.post(api("/users/departed/disable"), json={"reason": "left the team"},
                    headers=admin)
    assert r.status_code == 200 and r.json()["disabled_at"] is not None
    for t in (token, session_token):
        r = client.get(api("/me"), headers=_bearer(t))
        assert r.status_code == 401
    r = client.post(api("/login"), json=login)
    assert (r.status_code, r.json()["detail"]) == (
        401, "this account is disabled; ask a coordinator admin")
    assert client.post(api("/users/departed/enable"), headers=admin).status_code == 200
    assert client.get(api("/me"), headers=_bearer(token)).status_code == 401  # stays revoked
    assert client.post(api("/login"), json=login).status_code == 200
    assert client.delete(api("/users/departed"), headers=_bearer(engineer)).status_code == 403
    assert client.delete(api("/users/departed"), headers=admin).status_code == 204
    assert client.post(api("/login"), json=login).status_code == 401
    names = [u["name"] for u in client.get(api("/users"), headers=admin).json()]
    assert "departed" not in names
    actions = [e.action for e in _audit(engine)]
    assert {"user.disabled", "user.enabled", "user.deleted"} <= set(actions)
    # No admin can lock themself out, nor leave the coordinator without an enabled admin.
    me = client.get(api("/me"), headers=admin).json()["name"]
    r = client.post(api(f"/users/{me}/disable"), json={"reason": "oops"}, headers=admin)
    assert r.status_code == 409 and "your own account" in r.json()["detail"]
    second = _user(client, admin, "second-admin", role="admin", password=None)
    assert client.post(api(f"/users/{me}/disable"), json={"reason": "rotation"},
                       headers=_bearer(second)).status_code == 200
    r = client.delete(api("/users/second-admin"), headers=_bearer(second))
    assert r.status_code == 409


def test_enrollment_tokens_are_an_admins(
        make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]]
) -> None:
    from fedward.certs import ensure_ca

    client, admin = make_client(), token_for("admin")
    ensure_ca(Path(client.app.state.settings.home) / "pki")  # type: ignore[attr-defined]
    client.post(api("/sites"), json={"name": "site-e"}, headers=admin)
    r = client.post(api("/sites/site-e/enrollment-token"), headers=token_for("ml_engineer"))
    assert r.status_code == 403 and "needs one of admin" in r.json()["detail"]
    assert client.post(api("/sites/site-e/enrollment-token"),
                       headers=admin).status_code == 201


def test_revoking_a_site_unregisters_its_flower_node(
        engine: Engine, make_client: Callable[..., TestClient],
        token_for: Callable[..., dict[str, str]]) -> None:
    registrar = FakeRegistrar()
    client, admin = make_client(registrar=registrar), token_for("admin")
    setup_registered_sites(client, admin, ["site-r"])
    node_id = client.get(api("/sites/site-r"), headers=admin).json()["flower_node_id"]
    r = client.post(api("/sites/site-r/revoke"), json={"reason": "decommissioned"},
                    headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert registrar.unregistered == [node_id]
    assert [e.action for e in _audit(engine)][-1] == "site.unregistered"
    # Flower could not be reached: the revocation stands, the failure is audited, and a
    # second revoke tries again.
    setup_registered_sites(client, admin, ["site-s"])
    registrar.fail = RuntimeError("SuperLink restarting")
    r = client.post(api("/sites/site-s/revoke"), json={"reason": "stolen"}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert [e.action for e in _audit(engine)][-1] == "site.unregister_failed"
    registrar.fail = None
    client.post(api("/sites/site-s/revoke"), json={"reason": "stolen"}, headers=admin)
    assert [e.action for e in _audit(engine)][-1] == "site.unregistered"


# --- logins --------------------------------------------------------------------------------


def test_a_password_typed_as_the_name_is_not_kept(
        engine: Engine, make_client: Callable[..., TestClient],
        token_for: Callable[..., dict[str, str]]) -> None:
    client = make_client()
    _user(client, token_for("admin"), "dr.ada")
    secret = "Tr0ub4dor&3-correct-horse"
    for name in (secret, "dr.ada"):
        r = client.post(api("/login"), json={"name": name, "password": "wrong password!"})
        assert r.status_code == 401
    failed = [e for e in _audit(engine) if e.action == "user.login_failed"]
    assert [e.subject for e in failed] == ["user:(unknown)", "user:dr.ada"]
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM audit_events")).all()
    assert secret not in repr(rows)


def test_logins_are_rate_limited_per_user_and_per_address(
        make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]]
) -> None:
    client = make_client()
    _user(client, token_for("admin"), "target")
    wrong = {"name": "target", "password": "not the password"}
    for _ in range(5):
        assert client.post(api("/login"), json=wrong).status_code == 401
    r = client.post(api("/login"), json={"name": "target",
                                         "password": "a long enough passphrase"})
    assert r.status_code == 429   # even the right password: nothing is checked now
    assert int(r.headers["retry-after"]) > 200
    assert r.json()["detail"].startswith("too many failed logins from this user name (5 in "
                                         "the last 5 min); try again in ")
    # Other names from the same address go on failing until the address has 20 failures.
    for i in range(15):
        r = client.post(api("/login"), json={"name": f"guess-{i}", "password": "x"})
        assert r.status_code == 401, (i, r.text)
    r = client.post(api("/login"), json={"name": "guess-x", "password": "x"})
    assert r.status_code == 429
    assert "from this address" in r.json()["detail"] and "retry-after" in r.headers


def test_a_password_check_never_holds_the_database(
        engine: Engine, tmp_path: Path, make_client: Callable[..., TestClient],
        token_for: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """While a login's argon2 hash runs, another process can still write (SQLite's one
    write lock is free): parallel logins cannot lock the gateway or the round loop out."""
    import sqlite3

    from coordinator import auth as auth_module

    client = make_client()
    _user(client, token_for("admin"), "hasher")
    real = auth_module.verify_password
    probes: list[str] = []

    def probing(password_hash: str, password: str) -> bool:
        other = sqlite3.connect(tmp_path / "home" / "coordinator.db", timeout=0.2)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            probes.append("free")
        except sqlite3.OperationalError as err:
            probes.append(str(err))
        finally:
            other.close()
        return real(password_hash, password)

    monkeypatch.setattr(auth_module, "verify_password", probing)
    for name, password in [("hasher", "a long enough passphrase"), ("hasher", "wrong one!"),
                           ("nobody", "whatever")]:
        client.post(api("/login"), json={"name": name, "password": password})
    assert probes == ["free", "free", "free"]


# --- the CLI -------------------------------------------------------------------------------


def test_user_commands_of_the_cli(make_client: Callable[..., TestClient],
                                  token_for: Callable[..., dict[str, str]],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from coordinator import cli

    client, admin = make_client(), token_for("admin")
    token = _user(client, admin, "carol", password=None)

    monkeypatch.setattr(cli, "api_client", lambda *_a: cli_client(client, admin))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli.app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    fresh = run("new-token", "carol").strip().splitlines()[-1]
    assert client.get(api("/me"), headers=_bearer(token)).status_code == 401
    assert client.get(api("/me"), headers=_bearer(fresh)).status_code == 200
    run("revoke-tokens", "carol")
    assert client.get(api("/me"), headers=_bearer(fresh)).status_code == 401
    run("disable-user", "carol", "--reason", "on leave")
    listed = run("users")
    assert "carol" in listed and "disabled since" in listed
    run("enable-user", "carol")
    assert "enabled" in run("users")
    run("delete-user", "carol", "--yes")
    assert "carol" not in {u["name"] for u in json.loads(run("users", "--json"))}


def test_admin_token_command_renews_the_admins_token_from_the_data_directory(
        tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    from coordinator import cli
    from coordinator.auth import user_for_token
    from coordinator.models import User

    home = tmp_path / "coord"
    runner = CliRunner()
    assert runner.invoke(cli.app, ["init", "--home", str(home)]).exit_code == 0
    old = (home / "admin.token").read_text().strip()
    url = f"sqlite:///{home / 'coordinator.db'}"
    eng = make_engine(url)
    try:
        with session_scope(eng) as session:
            admin = session.exec(select(User).where(User.name == "admin")).one()
            admin.token_expires_at = datetime.now(UTC)
            session.add(admin)
        result = runner.invoke(cli.app, ["admin-token", "--home", str(home)])
        assert result.exit_code == 0, result.output
        assert "the previous one no longer works" in " ".join(result.output.split())
        new = (home / "admin.token").read_text().strip()
        assert (home / "admin.token").stat().st_mode & 0o777 == 0o600
        with Session(eng) as session:
            assert user_for_token(session, old) is None
            user = user_for_token(session, new)
            assert user is not None and user.name == "admin"
        result = runner.invoke(cli.app, ["admin-token", "--home", str(tmp_path / "nothing")])
        assert result.exit_code == 1
        assert "not a coordinator data directory" in " ".join(result.output.split())
    finally:
        eng.dispose()


def test_the_portal_login_shares_the_rate_limits(
        make_client: Callable[..., TestClient], token_for: Callable[..., dict[str, str]]
) -> None:
    client = make_client()
    _user(client, token_for("admin"), "dr.lee", role="clinician")
    form = {"name": "dr.lee", "password": "not the password", "next": ""}
    for _ in range(3):
        assert client.post("/portal/login", data=form).status_code == 401
    for _ in range(2):   # the API's failures count for the same name
        assert client.post(api("/login"), json={"name": "dr.lee", "password": "nope"}
                           ).status_code == 401
    r = client.post("/portal/login", data={**form, "password": "a long enough passphrase"})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert "too many failed logins from this user name" in r.text
