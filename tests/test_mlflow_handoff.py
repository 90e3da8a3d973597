"""The MLflow hand-off against a real MLflow tracking server, read back with the MLflow client.

Runs are recorded with the repository functions the ServerApp uses and releases are real
signed bundles (see test_releases); the server is a real ``mlflow server`` (SQLite backend)
from its own venv (see mlflow_server). One server serves the whole module; experiments and
models are told apart by project name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

import coordinator.mlflow_export  # noqa: F401 - switches MLflow's telemetry off first
from coordinator.api import create_app
from coordinator.db import session_scope
from coordinator.models import AuditEvent, MlflowExport, Run, SiteMetric
from coordinator.settings import Settings
from export.bundle_verify import verify_bundle

from api_support import TestClient, api
from mlflow_server import MlflowServer, free_port, mlflow_server
from release_support import KNOWN_WARNINGS, LocalParityForTests, make_user, propose, seed_run
from tests_support import served_app

pytestmark = [*KNOWN_WARNINGS, pytest.mark.timeout(600)]

SITES = ("hospital-a", "hospital-b")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv
    # Telemetry was off: the server wrote no installation id.
    assert not (srv.root / "xdg" / "mlflow").exists()


@pytest.fixture
def tokens(engine: Engine) -> dict[str, str]:
    roles = {"admin": "admin", "eng": "ml_engineer", "rev": "reviewer", "clin": "clinician"}
    return {name: make_user(engine, role, name, password=None)["Authorization"].split()[1]
            for name, role in roles.items()}


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def exports(engine: Engine) -> dict[tuple[str, str], MlflowExport]:
    with session_scope(engine) as session:
        return {(r.kind, r.subject): r for r in session.exec(select(MlflowExport)).all()}


def done(engine: Engine, kind: str, subject: str) -> MlflowExport | None:
    row = exports(engine).get((kind, subject))
    return row if row is not None and row.state == "done" else None


def ml_runs(client: Any, experiment: str, run_id: int) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.`fedward.run_id` = '{run_id}'"))


def cli_run(args: list[str], port: int, token: str) -> subprocess.CompletedProcess[str]:
    """``fedward-coordinator ARGS`` as a user runs it, against the API on ``port``."""
    return subprocess.run([str(Path(sys.executable).parent / "fedward-coordinator"), *args,
                           "--api", f"http://127.0.0.1:{port}", "--token", token],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "250"})  # rich wraps at 80


# --- settings ------------------------------------------------------------------------------


def test_bad_mlflow_settings_are_refused_with_what_to_do(tmp_path: Path) -> None:
    ok = Settings(home=tmp_path, mlflow_tracking_uri=" http://mlflow.lan:5000/ ")
    assert ok.mlflow_tracking_uri == "http://mlflow.lan:5000"
    assert Settings(home=tmp_path, mlflow_tracking_uri="").mlflow_tracking_uri is None
    bad = {"mlflow_tracking_uri": ["localhost:5000", "file:///var/mlruns", "sqlite:///x.db",
                                   "http://user:pw@host:5000", "http://host/?x=1"],
           "mlflow_alias": ["latest", "V3", "two words", ""],
           "mlflow_model_name": ["{team}-model", "a/{project}", "{project:"],
           "mlflow_experiment": ["{0}", "x:{project}"]}
    for field, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=field) as caught:
                Settings(home=tmp_path, **{field: value})
            assert any(w in str(caught.value) for w in (
                "tracking server", "credentials", "query", "alias", "placeholder",
                "without '/'")), str(caught.value)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["DO_NOT_TRACK"] == "true"


# --- runs ----------------------------------------------------------------------------------


def test_export_run_reads_back_and_a_repeat_updates_the_same_run(
        server: MlflowServer, engine: Engine, home: Path, tokens: dict[str, str]) -> None:
    run_id = seed_run(engine, home, project="exportrun", sites=SITES)
    app = create_app(settings=Settings(home=home), engine=engine)  # nothing configured
    with served_app(app, name="mlflow-export-api") as port:
        # The command line, with the server named explicitly.
        result = cli_run(["mlflow", "export", str(run_id), "--tracking-uri", server.uri],
                         port, tokens["eng"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "new metric points" in result.stdout
        base = f"http://127.0.0.1:{port}/api/v1"
        with httpx.Client(base_url=base, timeout=120) as http:
            def post(path: str, token: str, body: dict[str, Any] | None = None
                     ) -> httpx.Response:
                return http.post(path, json=body, headers={"Authorization": f"Bearer {token}"})

            assert post(f"/mlflow/runs/{run_id}/export", tokens["clin"],
                        {"tracking_uri": server.uri}).status_code == 403
            assert post(f"/mlflow/runs/{run_id}/export", tokens["rev"],
                        {"tracking_uri": server.uri}).status_code == 403
            assert post("/mlflow/runs/999/export", tokens["eng"],
                        {"tracking_uri": server.uri}).status_code == 404
            r = post(f"/mlflow/runs/{run_id}/export", tokens["eng"], {"tracking_uri": "x:1"})
            assert r.status_code == 422 and "not an http(s)://host:port URI" in r.text
            r = post(f"/mlflow/runs/{run_id}/export", tokens["eng"])
            assert r.status_code == 503
            assert "FEDWARD_MLFLOW_TRACKING_URI" in r.json()["detail"]
            # The repeat, over the REST API.
            r = post(f"/mlflow/runs/{run_id}/export", tokens["admin"],
                     {"tracking_uri": server.uri})
            assert r.status_code == 200, r.text
            again = r.json()
    assert again["state"] == "done" and again["result"]["points_logged"] == 0

    client = _client(server.uri)
    runs = ml_runs(client, "fedward-exportrun", run_id)
    assert len(runs) == 1  # found again by its tags, not duplicated
    ml_run = client.get_run(runs[0].info.run_id)
    assert ml_run.info.run_id == again["result"]["mlflow_run_id"]
    assert ml_run.info.status == "FINISHED" and ml_run.info.run_name == f"exportrun-run-{run_id}"
    assert ml_run.data.params == {
        "project": "exportrun", "task": "breast_cancer_mlp", "launched_by": "seed",
        "rounds": "3", "local_epochs": "3", "epsilon": "3.0", "delta": "1e-05",
        "min_sites": "2", "round_deadline_s": "60.0", "lr": "1.0", "batch_size": "32",
        "max_grad_norm": "1.0", "seed": "7", "sites": "hospital-a,hospital-b",
        "num_sites": "2", "aggregation": "fedavg", "aggregation_options": "{}",
        "approval_wait_s": "3600.0", "max_update_norm": "none", "offline_grace_s": "10.0",
        "statistics": "False", "statistics_epsilon": "none", "study": "none",
        "study_hash": "none", "model_plugin": "none", "model_plugin_version": "none",
        "model_plugin_sha256": "none", "tuning_search": "none", "secure_aggregation": "False",
        "secagg_threshold": "none", "secagg_clip": "1.0"}
    tags = ml_run.data.tags
    assert tags["fedward.run_id"] == str(run_id) and tags["fedward.project"] == "exportrun"
    assert tags["fedward.task"] == "breast_cancer_mlp" and tags["fedward.status"] == "completed"
    assert len(tags["fedward.coordinator_id"]) == 32
    assert tags["fedward.coordinator_id"] == (home / "coordinator.id").read_text().strip()
    assert tags["fedward.code_revision"] != ""

    # Every metric each site reported, per round, exactly once.
    with session_scope(engine) as session:
        stored = session.exec(select(SiteMetric).where(SiteMetric.run_id == run_id)).all()
    expected: dict[str, list[tuple[int, float]]] = {}
    for m in stored:
        expected.setdefault(f"site.{m.site_name}.{m.name}", []).append(
            (m.round_number, m.value))
    assert "site.hospital-b.epsilon-spent" in expected and len(expected) >= 2 * 7
    for key, points in expected.items():
        history = client.get_metric_history(ml_run.info.run_id, key)
        assert sorted((h.step, h.value) for h in history) == sorted(points), key
    eps = client.get_metric_history(ml_run.info.run_id, "site.hospital-a.epsilon-spent")
    assert [(h.step, round(h.value, 6)) for h in sorted(eps, key=lambda h: h.step)] == [
        (1, 0.9), (2, 1.8), (3, 2.7)]
    for key, value in {"round.participating_sites": 2.0, "round.failed_sites": 0.0,
                       "round.seconds": 1.0}.items():
        history = client.get_metric_history(ml_run.info.run_id, key)
        assert sorted((h.step, h.value) for h in history) == [(1, value), (2, value),
                                                               (3, value)]
    assert ml_run.data.metrics["site.hospital-a.final-eval-auc"] > 0.5
    run_json = client.download_artifacts(ml_run.info.run_id, "fedward/run.json",
                                         str(home / "dl"))
    summary = json.loads(Path(run_json).read_text())
    assert summary["fedward_run_id"] == run_id and len(summary["rounds"]) == 3
    assert summary["rounds"][0]["participating"] == list(SITES)

    with session_scope(engine) as session:
        audited = session.exec(select(AuditEvent.action).where(
            col(AuditEvent.action).startswith("mlflow."))).all()
    assert audited.count("mlflow.export_requested") == 2
    assert audited.count("mlflow.exported") == 2


# --- releases ------------------------------------------------------------------------------


def test_approved_releases_are_registered_automatically_and_the_alias_follows(
        server: MlflowServer, engine: Engine, home: Path, tokens: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Configured: completing a run and approving a release hand them off by themselves.
    monkeypatch.setenv("FEDWARD_MLFLOW_TRACKING_URI", server.uri)
    settings = Settings(home=home, mlflow_retry_s=0.5)
    run_id = seed_run(engine, home, project="registry", sites=SITES)
    assert exports(engine)[("run", str(run_id))].requested_by == "coordinator"
    headers = {name: {"Authorization": f"Bearer {t}"} for name, t in tokens.items()}
    app = create_app(settings=settings, engine=engine,
                     site_parity=LocalParityForTests(engine=engine, home=home))
    with TestClient(app) as http:
        wait_for("the run's export", lambda: done(engine, "run", str(run_id)))
        first = propose(http, headers["eng"], run_id)
        r = http.post(api(f"/candidates/{first['id']}/approve"), json={"reason": "gates pass"},
                      headers=headers["rev"])
        assert r.status_code == 201, r.text
        rid1 = r.json()["release_id"]
        row = wait_for("the release's registration", lambda: done(engine, "release", rid1))
        assert json.loads(row.result_json)["version"] == "1"

        client = _client(server.uri)
        mv = client.get_model_version_by_alias("fedward-registry", "approved")
        assert mv.version == "1" and mv.tags["fedward.release_id"] == rid1
        assert mv.tags["fedward.run_id"] == str(run_id) and mv.tags["fedward.round"] == "3"
        assert mv.tags["fedward.approved_by"] == "rev"
        # The version belongs to the run's one MLflow run.
        assert [r.info.run_id for r in ml_runs(client, "fedward-registry", run_id)] == [
            mv.run_id]

        # What an MLflow user fetches is the signed bundle itself, and it verifies.
        import mlflow.artifacts

        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # as an MLflow user sets it
        got = Path(mlflow.artifacts.download_artifacts(
            artifact_uri="models:/fedward-registry@approved", dst_path=str(home / "fetched")))
        bundle = home / "releases" / rid1
        assert (got / "bundle" / "model.onnx").read_bytes() == (bundle / "model.onnx"
                                                                 ).read_bytes()
        assert sorted(p.name for p in (got / "bundle").iterdir()) == sorted(
            p.name for p in bundle.iterdir())
        verified = verify_bundle(bundle_dir=got / "bundle",
                                 public_key=got / "release-key.pub.pem", release_id=rid1)
        assert json.loads((got / "lineage.json").read_text()) == verified.model_card["lineage"]
        assert mv.tags["fedward.key_fingerprint"] == verified.key_fingerprint

        # Registering it again adds no version.
        r = http.post(api(f"/mlflow/releases/{rid1}/export"), json={},
                      headers=headers["eng"])
        assert r.status_code == 200, r.text
        assert r.json()["result"]["version"] == "1"
        assert len(client.search_model_versions("name = 'fedward-registry'")) == 1

        # A newer approved release takes the alias; revoking it gives the alias back.
        second = propose(http, headers["eng"], run_id, round=2)
        r = http.post(api(f"/candidates/{second['id']}/approve"), json={"reason": "gates pass"},
                      headers=headers["rev"])
        assert r.status_code == 201, r.text
        rid2 = r.json()["release_id"]
        wait_for("the second registration", lambda: done(engine, "release", rid2))
        assert client.get_model_version_by_alias("fedward-registry", "approved").version == "2"
        r = http.post(api(f"/releases/{rid2}/revoke"), json={"reason": "label leak"},
                      headers=headers["admin"])
        assert r.status_code == 200, r.text
        wait_for("the alias to leave the revoked release",
                 lambda: client.get_model_version_by_alias("fedward-registry",
                                                           "approved").version == "1")
        assert client.get_model_version("fedward-registry", "2").tags["fedward.revoked"] == (
            "label leak")
        assert len(client.search_model_versions("name = 'fedward-registry'")) == 2
        status = http.get(api("/mlflow/exports"), headers=headers["eng"]).json()
        assert status["pending"] == [] and status["failed"] == []
        assert {(e["kind"], e["subject"]) for e in status["recent"]} == {
            ("run", str(run_id)), ("release", rid1), ("release", rid2)}


# --- the hooks never fail what they hook into ------------------------------------------------


def test_a_hand_off_that_cannot_be_recorded_never_fails_the_run(
        engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDWARD_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with engine.begin() as connection:  # the outbox is broken: its table is gone
        connection.exec_driver_sql("DROP TABLE mlflow_exports")
    run_id = seed_run(engine, home, project="broken", sites=SITES)  # ends with finish_run
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == "completed"
        finished = session.exec(select(AuditEvent).where(
            AuditEvent.action == "run.finished", AuditEvent.subject == f"run:{run_id}")).all()
    assert len(finished) == 1


# --- an unreachable server -----------------------------------------------------------------


def test_unreachable_server_clear_error_kept_pending_then_exported_when_back(
        server: MlflowServer, engine: Engine, home: Path, tokens: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server.stop()
    try:
        monkeypatch.setenv("FEDWARD_MLFLOW_TRACKING_URI", server.uri)
        settings = Settings(home=home, mlflow_retry_s=0.5)
        run_id = seed_run(engine, home, project="outage", sites=SITES)  # hand-off recorded
        app = create_app(settings=settings, engine=engine,
                         site_parity=LocalParityForTests(engine=engine, home=home))
        with served_app(app, name="mlflow-outage-api") as port:
            base = f"http://127.0.0.1:{port}"
            eng = {"Authorization": f"Bearer {tokens['eng']}"}
            with httpx.Client(base_url=base, timeout=300) as http:
                started = time.monotonic()
                r = http.post(api(f"/mlflow/runs/{run_id}/export"), json={}, headers=eng)
                assert time.monotonic() - started < 20
                assert r.status_code == 502
                detail = r.json()["detail"]
                assert f"the MLflow tracking server at {server.uri} is not reachable" in detail
                assert "start it or correct the URI" in detail and "retried" in detail
                # The approval is not slowed or failed by the outage; its hand-off waits.
                cand = propose(http, eng, run_id)  # type: ignore[arg-type]  # httpx: same calls
                started = time.monotonic()
                r = http.post(api(f"/candidates/{cand['id']}/approve"),
                              json={"reason": "gates pass"},
                              headers={"Authorization": f"Bearer {tokens['rev']}"})
                assert r.status_code == 201, r.text
                assert time.monotonic() - started < 15
                rid = r.json()["release_id"]
                status = http.get(api("/mlflow/exports"), headers=eng).json()
            pending = {(e["kind"], e["subject"]): e for e in status["pending"]}
            assert set(pending) == {("run", str(run_id)), ("release", rid)}
            assert "not reachable" in pending[("run", str(run_id))]["last_error"]
            result = cli_run(["mlflow", "status"], port, tokens["eng"])
            assert result.returncode == 0, result.stdout + result.stderr
            assert "pending: 2" in result.stdout and server.uri in result.stdout
            result = cli_run(["mlflow", "export", str(run_id)], port, tokens["eng"])
            assert result.returncode == 1
            said = " ".join(result.stderr.split())
            assert f"502: the MLflow tracking server at {server.uri} is not reachable" in said

            server.start()  # the server is back: the worker's next retry exports both
            wait_for("the retries", lambda: done(engine, "run", str(run_id))
                     and done(engine, "release", rid), timeout=150)
        client = _client(server.uri)
        assert len(ml_runs(client, "fedward-outage", run_id)) == 1
        mv = client.get_model_version_by_alias("fedward-outage", "approved")
        assert mv.tags["fedward.release_id"] == rid
        assert exports(engine)[("run", str(run_id))].attempts >= 2
    finally:
        if server.proc is None:
            server.start()


def test_hand_off_to_a_closed_port_is_refused_at_once(engine: Engine, home: Path,
                                                      tokens: dict[str, str]) -> None:
    run_id = seed_run(engine, home, project="closed", sites=SITES)
    uri = f"http://127.0.0.1:{free_port()}"
    app = create_app(settings=Settings(home=home), engine=engine)
    with TestClient(app) as http:
        r = http.post(api(f"/mlflow/runs/{run_id}/export"), json={"tracking_uri": uri},
                      headers={"Authorization": f"Bearer {tokens['eng']}"})
    assert r.status_code == 502 and uri in r.json()["detail"]
    row = exports(engine)[("run", str(run_id))]
    assert (row.state, row.tracking_uri, row.attempts) == ("pending", uri, 1)
    assert row.next_attempt_at is not None and "not reachable" in (row.last_error or "")


# --- a real federation ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(480)
def test_a_real_run_is_handed_to_mlflow_when_it_completes(server: MlflowServer) -> None:
    from federation import federation
    from tests_support import short_tmp

    # The ServerApp records the completion (and the hand-off) in its own process; the
    # coordinator's worker exports it.
    env = {"FEDWARD_MLFLOW_TRACKING_URI": server.uri, "FEDWARD_MLFLOW_RETRY_S": "1"}
    with short_tmp() as work, federation(work, n_sites=2, extra_env=env) as fed:
        sites = sorted(fed.join_all_sites())
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        assert fed.wait_run(run_id)["status"] == "completed"
        client = _client(server.uri)
        runs = wait_for("the run in MLflow", lambda: [
            r for r in ml_runs(client, "fedward-test", run_id)
            if r.info.status == "FINISHED"], timeout=60)
        assert len(runs) == 1
        ml_id = runs[0].info.run_id
        for site in sites:
            eps = client.get_metric_history(ml_id, f"site.{site}.epsilon-spent")
            assert sorted(h.step for h in eps) == [1, 2]
            assert 0 < max(h.value for h in eps) <= 3.0
            assert client.get_metric_history(ml_id, f"site.{site}.eval-auc")
        assert runs[0].data.params["sites"] == ",".join(sites)
        assert runs[0].data.params["rounds"] == "2"
        status = json.loads(fed.coord_cli("mlflow", "status", "--json").stdout)
        assert [(e["kind"], e["subject"], e["requested_by"]) for e in status["recent"]] == [
            ("run", str(run_id), "coordinator")]
        assert status["pending"] == [] and status["failed"] == []
