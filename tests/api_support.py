"""Helpers for tests of the coordinator's REST API: fakes for the Flower boundary (the
launcher and the node registrar), the ``TestClient`` and the whole happy path of the API.

The API's fixtures (``engine``, ``token_for``, ``make_client``, ``client``) are in
``conftest.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator.auth import API_PREFIX
from coordinator.cli_client import ApiClient
from coordinator.models import Run, SiteMetric
from coordinator.repository import finish_run, mark_run_started
from coordinator.round_records import (
    finish_round,
    record_checkpoint,
    record_site_metrics,
    start_round,
)
from fedward.tasks import TASKS

from tests_support import wait_until

with warnings.catch_warnings():
    # Import-time deprecation notices of the pinned Starlette, harmless here: it prefers
    # httpx2 to httpx, and annotates with an anyio alias that anyio 4.16 deprecates.
    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient` is deprecated"
    )
    warnings.filterwarnings("ignore", message="The anyio.abc.BlockingPortal alias")
    from fastapi.testclient import TestClient as TestClient  # re-exported

# A Flower node id above 2**63 - 1: must survive as text.
BIG_NODE_ID = str(2**64 - 5)


def node_key() -> str:
    """A fresh OpenSSH public key of the kind Flower SuperNodes use (ECDSA P-384)."""
    key = ec.generate_private_key(ec.SECP384R1())
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


class FakeLauncher:
    """Stands in for the Flower launcher; checks the run is committed when it is called."""

    def __init__(self, engine: Engine, *, fail: Exception | None = None,
                 serverapp_first: bool = False) -> None:
        self.engine = engine
        self.fail = fail
        self.serverapp_first = serverapp_first
        self.launched: list[int] = []
        self.seen_status: list[str] = []

    def launch(self, run_id: int) -> str:
        # A separate session, as the ServerApp process would have: the row must be visible
        # (committed) and the API must not hold the database while launching.
        with Session(self.engine) as session:
            run = session.get(Run, run_id)
            assert run is not None, "launcher called before the run was committed"
            self.seen_status.append(run.status)
        self.launched.append(run_id)
        if self.fail is not None:
            raise self.fail
        if self.serverapp_first:
            mark_run_started(self.engine, run_id, "777")
        return "4242"


class FakeRegistrar:
    """Stands in for Flower's RegisterNode call."""

    def __init__(self, *, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, str]] = []
        self.unregistered: list[str] = []

    def register(self, public_key: str, name: str) -> str:
        self.calls.append((public_key, name))
        if self.fail is not None:
            raise self.fail
        return BIG_NODE_ID if not self.calls[:-1] else str(1000 + len(self.calls))

    def unregister(self, node_id: str) -> None:
        self.unregistered.append(node_id)
        if self.fail is not None:
            raise self.fail


def api(path: str) -> str:
    return f"{API_PREFIX}{path}"


def setup_registered_sites(
    client: TestClient, headers: dict[str, str], names: list[str]
) -> None:
    for name in names:
        assert client.post(api("/sites"), json={"name": name}, headers=headers).status_code == 201
        r = client.post(api(f"/sites/{name}/node-key"), json={"public_key": node_key()},
                        headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "registered"


def run_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"project": "oncology", "task": "breast_cancer_mlp", "rounds": 3,
                            "epsilon": 4.0, "min_sites": 2}
    body.update(overrides)
    return body


def exercise_api_flow(client: TestClient, engine: Engine, headers: dict[str, str],
                      launcher: FakeLauncher) -> None:
    """Project, sites, launch, rounds, metrics, checkpoints, audit: the whole happy path.

    Shared with the PostgreSQL tests, which run it against a real server.
    """
    r = client.post(api("/projects"), json={"name": "oncology", "description": "BC"},
                    headers=headers)
    assert r.status_code == 201, r.text
    assert [p["name"] for p in client.get(api("/projects"), headers=headers).json()] == [
        "oncology"]
    setup_registered_sites(client, headers, ["site-a", "site-b"])
    site_a = client.get(api("/sites/site-a"), headers=headers).json()
    assert site_a["flower_node_id"] == BIG_NODE_ID  # unsigned 64-bit survives as text

    r = client.post(api("/runs"), json=run_body(), headers=headers)
    assert r.status_code == 201, r.text
    run = r.json()
    run_id = run["id"]
    assert launcher.launched == [run_id]
    assert launcher.seen_status == ["pending"]
    assert run["flwr_run_id"] == "4242"
    assert run["config"]["sites"] == ["site-a", "site-b"]
    assert run["config"]["lr"] == TASKS["breast_cancer_mlp"].default_lr  # the task's default
    assert run["config"]["batch_size"] == 32

    # What the ServerApp records while the run executes, including a repeated round.
    mark_run_started(engine, run_id, "4242")
    start_round(engine, run_id, 1)
    start_round(engine, run_id, 1)
    record_site_metrics(engine, run_id, 1, "site-a", {"eval-loss": 0.9, "num-examples": 100})
    record_site_metrics(engine, run_id, 1, "site-a", {"eval-loss": 0.7})
    record_site_metrics(engine, run_id, 1, "site-b", {"eval-loss": 0.8})
    failure = {"site": "site-b", "phase": "train", "reason": "epsilon budget exhausted",
               "code": "refused-budget"}
    finish_round(engine, run_id, 1, status="completed", participating=["site-a"],
                 failed=[failure], late=[], seconds=1.5)
    finish_round(engine, run_id, 1, status="completed", participating=["site-a"],
                 failed=[failure], late=[], seconds=1.5)
    record_checkpoint(engine, run_id, 1, "runs/1/round-1.safetensors", "ab" * 32)
    record_checkpoint(engine, run_id, 1, "runs/1/round-1.safetensors", "ab" * 32)
    start_round(engine, run_id, 2)

    detail = client.get(api(f"/runs/{run_id}"), headers=headers).json()
    assert detail["status"] == "running"
    assert detail["rounds_completed"] == 1
    assert detail["current_round"] == 2
    assert [r["number"] for r in detail["rounds"]] == [1, 2]
    rounds = client.get(api(f"/runs/{run_id}/rounds"), headers=headers).json()
    assert len(rounds) == 2
    assert rounds[0]["failed_sites"] == [failure]
    assert rounds[0]["participating_sites"] == ["site-a"]
    assert rounds[0]["seconds"] == 1.5
    metrics = client.get(api(f"/runs/{run_id}/metrics"), headers=headers).json()
    assert metrics["rounds"] == [{"round": 1, "sites": {
        "site-a": {"eval-loss": 0.7, "num-examples": 100.0},
        "site-b": {"eval-loss": 0.8}}}]
    with Session(engine) as session:
        assert len(session.exec(select(SiteMetric)).all()) == 3
    checkpoints = client.get(api(f"/runs/{run_id}/checkpoints"), headers=headers).json()
    assert [(c["round_number"], c["sha256"]) for c in checkpoints] == [(1, "ab" * 32)]

    finish_run(engine, run_id, status="completed", reason=None)
    finish_run(engine, run_id, status="failed", reason="late duplicate")  # first outcome wins
    assert client.get(api(f"/runs/{run_id}"), headers=headers).json()["status"] == "completed"
    listed = client.get(api("/runs"), params={"project": "oncology"}, headers=headers).json()
    assert [r["id"] for r in listed] == [run_id]

    audit = client.get(api("/audit"), params={"limit": 500}, headers=headers).json()
    actions = [e["action"] for e in reversed(audit["items"])]
    # Exactly one of each: repeats above must not duplicate audit entries.
    assert actions.count("run.started") == 1
    assert actions.count("site.failed") == 1
    (site_failed,) = [e for e in audit["items"] if e["action"] == "site.failed"]
    assert site_failed["subject"] == "site:site-b"
    assert site_failed["detail"] == {"run_id": run_id, "round": 1, "phase": "train",
                                     "reason": "epsilon budget exhausted",
                                     "code": "refused-budget"}
    assert actions.count("checkpoint.saved") == 1
    assert actions.count("run.finished") == 1
    assert actions.index("run.created") < actions.index("run.started") < actions.index(
        "site.failed") < actions.index("run.finished")
    assert client.get(api("/audit/verify"), headers=headers).json()["ok"] is True


def cli_client(app_client: TestClient, headers: dict[str, str]) -> ApiClient:
    """An ApiClient whose HTTP goes to the in-process app (no server needed)."""
    cli = ApiClient.__new__(ApiClient)
    cli.base = "http://testserver"
    cli._http = TestClient(app_client.app, base_url="http://testserver/api/v1",
                           headers=headers)
    return cli


def tuning_when_ended(client: TestClient, headers: dict[str, str], tuning_id: int,
                      timeout: float = 20) -> Any:
    """The tuning search as the API shows it once it is no longer running."""
    def ended() -> Any:
        out = client.get(f"/api/v1/tunings/{tuning_id}", headers=headers).json()
        return out if out["status"] != "running" else None
    return wait_until(ended, timeout=timeout, what=f"tuning {tuning_id} to end", interval=0.1)
