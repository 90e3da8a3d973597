"""The release workflow through the REST API: lineage, candidates, gates, approval, signed
bundles, downloads, revocation, passwords and the release CLI.

Runs, rounds, metrics and checkpoints are recorded with the same repository functions the
ServerApp uses, around a real (tiny, quickly trained) breast-cancer model, so every export
and every signature is real. What the sites would measure (export parity on their held-out
data) is stood in for by :class:`LocalParityForTests`, which runs the very function a site
runs, on rows from scikit-learn's copy of the data set.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from alembic import command
from sklearn.datasets import load_breast_cancer
from sqlalchemy import Engine, inspect
from sqlmodel import select
from torch import nn
from typer.testing import CliRunner

from coordinator import release_cli
from coordinator.api import create_app
from coordinator.db import alembic_config, make_engine, run_migrations, session_scope
from coordinator.models import AuditEvent, LoginSession, Release, UserCredential
from coordinator.release_chart import HELD_OUT_NOT_DP, training_curve_svg
from coordinator.releases import SiteParity
from coordinator.run_audit import record_data_fingerprint
from coordinator.settings import Settings
from export.bundle_format import BundleVerificationError
from export.bundle_verify import verify_bundle
from export.revocations import RevocationSource, load_revocations
from export.serve import create_app as create_inference_app
from export.verify_cli import app as verify_app
from fedward.models import BUILTIN_FAMILIES, model_arrays
from fedward.tasks import BREAST_CANCER_COLUMNS, TASKS, TaskSpec

from api_support import TestClient, api, cli_client
from release_support import (
    INTENDED_USE,
    KNOWN_WARNINGS,
    SITES,
    FixedParity,
    Headers,
    LocalParityForTests,
    audit_actions,
    good_figures,
    make_user,
    propose,
    seed_run,
)
from tests_support import served_app

pytestmark = KNOWN_WARNINGS


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def users(engine: Engine) -> dict[str, Headers]:
    """One token-only user per role, plus a second admin; name -> Authorization header.

    (No passwords: an argon2id hash costs a noticeable fraction of a second by design.)
    """
    return {name: make_user(engine, role, name, password=None) for name, role in [
        ("admin", "admin"), ("admin2", "admin"), ("eng", "ml_engineer"),
        ("rev", "reviewer"), ("clin", "clinician")]}


@pytest.fixture
def make_client(home: Path, engine: Engine) -> Iterator[Callable[..., TestClient]]:
    """Factory: a TestClient on the coordinator app (``site_parity`` as given)."""
    clients: list[TestClient] = []

    def make(site_parity: SiteParity | None = None) -> TestClient:
        client = TestClient(create_app(settings=Settings(home=home), engine=engine,
                                       site_parity=site_parity))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient], engine: Engine, home: Path) -> TestClient:
    """A client whose parity comes from :class:`LocalParityForTests`."""
    return make_client(site_parity=LocalParityForTests(engine=engine, home=home))


def gates_of(candidate: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in candidate["gates"]}


def unpack(archive: bytes, out: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(out, filter="data")
    top = {n.split("/")[0] for n in names}
    assert len(top) == 1
    return out / top.pop()


# --- the whole flow ------------------------------------------------------------------------


def test_propose_gate_approve_download_verify_revoke(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers],
        tmp_path: Path) -> None:
    run_id = seed_run(engine, home)
    r = client.put(api("/projects/cardio/gates"), headers=users["rev"],
                   json={"min_site_auc": 0.8, "min_site_accuracy": 0.8})
    assert r.status_code == 200, r.text
    assert r.json()["thresholds"] == {"min_site_auc": 0.8, "min_site_accuracy": 0.8}

    cand = propose(client, users["eng"], run_id)
    assert cand["status"] == "awaiting_review", cand["gates"]
    assert cand["round"] == 3 and cand["proposed_by"] == "eng"
    gates = gates_of(cand)
    assert list(gates) == ["site_participation", "export", "site_metrics", "export_parity",
                           "privacy_statement"]
    assert all(g["passed"] for g in gates.values())
    assert set(gates["export"]["figures"]["files"]) == {
        "model.onnx", "model.int8.onnx", "model.xml", "model.bin"}
    parity = gates["export_parity"]["figures"]["per_site"]
    assert set(parity) == set(SITES)
    for site in SITES:
        assert parity[site]["onnx"]["max_abs_diff"] <= 1e-4
        assert parity[site]["openvino"]["agreement"] == 1.0
        assert parity[site]["onnx-int8"]["agreement"] >= 0.95
    assert gates["site_metrics"]["reason"].startswith("every site (hospital-a, hospital-b) meets")
    assert "DP-SGD, pld accountant" in gates["privacy_statement"]["reason"]
    assert gates["site_participation"]["reason"] == (
        "2 sites contributed (each in at least 50% of the 3 completed rounds; 2 needed); "
        "rounds trained: hospital-a 3/3, hospital-b 3/3")

    # Two-person rule: an ML engineer cannot approve at all; an admin not their own proposal.
    r = client.post(api(f"/candidates/{cand['id']}/approve"), json={"reason": "fine"},
                    headers=users["eng"])
    assert r.status_code == 403
    own = propose(client, users["admin"], run_id)
    r = client.post(api(f"/candidates/{own['id']}/approve"), json={"reason": "looks fine"},
                    headers=users["admin"])
    assert r.status_code == 403
    assert r.json()["detail"] == (f"you proposed candidate {own['id']}; a second person must "
                                  "approve it")

    r = client.post(api(f"/candidates/{cand['id']}/approve"),
                    json={"reason": "gates pass; clinical safety review CS-12 done"},
                    headers=users["rev"])
    assert r.status_code == 201, r.text
    release = r.json()
    rid = release["release_id"]
    assert rid == f"cardio-run{run_id}-round3-c{cand['id']}"
    assert release["approved_by"] == "rev" and release["proposed_by"] == "eng"

    r = client.post(api(f"/candidates/{cand['id']}/approve"), json={"reason": "again"},
                    headers=users["admin2"])
    assert r.status_code == 409
    assert r.json()["detail"] == f"candidate {cand['id']} cannot be approved: it is already " \
                                 "approved"

    # The public key is public; the bundle on disk verifies with it and with the standard tool.
    key = client.get(api("/release-key")).json()
    pub = tmp_path / "release.pub.pem"
    pub.write_text(client.get(api("/release-key.pem")).text)
    assert key["public_key_pem"] == pub.read_text()
    assert release["key_fingerprint"] == key["fingerprint"]
    bundle = home / "releases" / rid
    verified = verify_bundle(bundle_dir=bundle, public_key=pub, release_id=rid)
    assert set(verified.files) == {"model.onnx", "model.int8.onnx", "model.xml", "model.bin",
                                   "training_curve.svg", "model_card.json", "model_card.md"}
    tool = Path(sys.executable).parent / "model_signing"
    done = subprocess.run([str(tool), "verify", "key", str(bundle), "--signature",
                           str(bundle / "model.sig"), "--public_key", str(pub)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verification succeeded" in done.stdout
    assert (home / "release-key" / "release.pem").stat().st_mode & 0o077 == 0

    card = verified.model_card
    assert card["intended_use"] == INTENDED_USE
    assert card["task"] == "breast_cancer_mlp"
    assert card["input"]["columns"] == list(BREAST_CANCER_COLUMNS)
    privacy = card["privacy_statement"]
    assert privacy["mechanism"] == "DP-SGD" and privacy["accountant"] == "pld"
    # The card says what the guarantee does not cover: the held-out metrics it shows.
    assert "It does not cover the held-out metrics" in privacy["text"]
    assert "No training loss left any site" in privacy["text"]
    assert privacy["not_covered"][0].startswith("held-out evaluation metrics per site")
    assert privacy["per_site"] == {s: {"epsilon": pytest.approx(2.7), "delta": 1e-5}
                                   for s in SITES}
    assert set(card["metrics_per_site"]["per_site"]) == set(SITES)
    assert card["contributing_sites"] == {
        "completed_rounds": 3, "rounds_per_site": {"hospital-a": 3, "hospital-b": 3},
        "contributing": list(SITES), "min_sites": 2, "min_round_share": 0.5}
    card_md = (bundle / "model_card.md").read_text()
    assert "## Contributing sites" in card_md and "| hospital-b | 3 of 3 | yes |" in card_md
    assert card["metrics_per_site"]["source"].startswith("final evaluation")
    assert card["approval"] == {"proposed_by": "eng", "proposed_at": card["approval"][
        "proposed_at"], "approved_by": "rev", "approved_at": card["approval"]["approved_at"],
        "reason": "gates pass; clinical safety review CS-12 done"}
    assert [g["name"] for g in card["gates"]] == list(gates)
    assert card["lineage"]["version"]["checkpoint"]["sha256"] == cand["checkpoint_sha256"]
    svg = ET.fromstring(verified.read_verified("training_curve.svg"))  # noqa: S314 - ours
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2 * len(SITES)
    assert "## Intended use" in (bundle / "model_card.md").read_text()

    # A clinician sees it, downloads it, and the download verifies.
    listed = client.get(api("/releases"), headers=users["clin"]).json()
    assert [x["release_id"] for x in listed] == [rid]
    r = client.get(api(f"/releases/{rid}/bundle"), headers=users["clin"])
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/gzip"
    assert r.content == client.get(api(f"/releases/{rid}/bundle"),
                                   headers=users["clin"]).content  # reproducible archive
    folder = unpack(r.content, tmp_path / "clinic")
    assert verify_bundle(bundle_dir=folder, public_key=pub, release_id=rid).release_id == rid

    # Revocation is checked by default, online, against the coordinator's signed list.
    with served_app(create_app(settings=Settings(home=home), engine=engine),
                    name="coordinator-api") as port:
        runner = CliRunner(env={"FEDWARD_COORDINATOR": f"http://127.0.0.1:{port}"})
        before = runner.invoke(verify_app, [str(folder), "--public-key", str(pub)])
        assert before.exit_code == 0, before.output
        assert before.stdout.startswith(f"verified: release {rid}, 7 files, not revoked as of")
        online = RevocationSource(coordinator=f"http://127.0.0.1:{port}")
        serving = TestClient(create_inference_app(bundle_dir=folder, public_key=pub,
                                                  revocations=online))
        assert serving.get("/health").status_code == 200

        # Admins only, once.
        assert client.post(api(f"/releases/{rid}/revoke"), json={"reason": "label leak found"},
                           headers=users["rev"]).status_code == 403
        r = client.post(api(f"/releases/{rid}/revoke"), json={"reason": "label leak found"},
                        headers=users["admin"])
        assert r.status_code == 200, r.text
        assert r.json()["revoked_by"] == "admin"
        r = client.post(api(f"/releases/{rid}/revoke"), json={"reason": "again"},
                        headers=users["admin"])
        assert r.status_code == 409

        after = runner.invoke(verify_app, [str(folder), "--public-key", str(pub)])
        assert after.exit_code == 1
        assert f"verification failed: release {rid} is revoked" in after.stderr
        assert serving.post("/reload").json()["detail"] == (
            f"not serving: release {rid} is revoked")
    # The list is signed with the release key; saved, it serves offline for a week.
    rev_file = tmp_path / "revocations.json"
    rev_file.write_bytes(client.get(api("/revocations")).content)
    listed = load_revocations(rev_file, public_key=pub)
    assert dict(listed.reasons) == {rid: "label leak found"}
    with pytest.raises(BundleVerificationError, match=f"^release {rid} is revoked$"):
        verify_bundle(bundle_dir=folder, public_key=pub, revoked=listed.revoked)
    result = CliRunner().invoke(verify_app, [str(folder), "--public-key", str(pub),
                                             "--revocations", str(rev_file)])
    assert result.exit_code == 1
    assert f"verification failed: release {rid} is revoked" in result.output

    assert client.get(api("/releases"), headers=users["clin"]).json() == []
    r = client.get(api(f"/releases/{rid}/bundle"), headers=users["clin"])
    assert r.status_code == 410
    assert r.json()["detail"] == f"release {rid} was revoked: label leak found"
    assert client.get(api(f"/releases/{rid}"), headers=users["clin"]).status_code == 410
    everything = client.get(api("/releases?include_revoked=true"), headers=users["admin"]).json()
    assert [x["revoke_reason"] for x in everything] == ["label leak found"]
    assert client.get(api("/releases?include_revoked=true"),
                      headers=users["clin"]).json() == []

    actions = audit_actions(engine)
    for expected in ["project.gates_set", "candidate.proposed", "candidate.gates_evaluated",
                     "candidate.approve_refused", "candidate.approved", "release.created",
                     "release.downloaded", "release.revoked"]:
        assert expected in actions, expected
    assert actions.index("candidate.approved") < actions.index("release.revoked")
    assert client.get(api("/audit/verify"), headers=users["admin"]).json()["ok"] is True


# --- gates that fail -----------------------------------------------------------------------


def test_a_site_below_the_project_minimum_fails_the_metrics_gate(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home, final={"hospital-a": {"auc": 0.97, "accuracy": 0.93},
                                           "hospital-b": {"auc": 0.71, "accuracy": 0.93}})
    client.put(api("/projects/cardio/gates"), json={"min_site_auc": 0.8},
               headers=users["admin"])
    cand = propose(client, users["eng"], run_id)
    assert cand["status"] == "gates_failed"
    gate = gates_of(cand)["site_metrics"]
    assert gate["passed"] is False
    assert gate["reason"] == "hospital-b auc 0.7100 < 0.8000"
    assert gate["figures"]["per_site"]["hospital-b"]["auc"] == 0.71
    assert all(g["passed"] for n, g in gates_of(cand).items() if n != "site_metrics")
    r = client.post(api(f"/candidates/{cand['id']}/approve"), json={"reason": "ship it"},
                    headers=users["rev"])
    assert r.status_code == 409
    assert r.json()["detail"] == (f"candidate {cand['id']} cannot be approved: it failed its "
                                  "gates: site_metrics: hospital-b auc 0.7100 < 0.8000")
    assert not (home / "releases").exists() or not any((home / "releases").iterdir())


THREE = ("hospital-a", "hospital-b", "hospital-c")


def test_a_model_only_one_of_three_sites_trained_fails_the_participation_gate(
        make_client: Callable[..., TestClient], engine: Engine, home: Path,
        users: dict[str, Headers]) -> None:
    client = make_client(site_parity=FixedParity(good_figures(THREE)))
    run_id = seed_run(engine, home, sites=THREE, trained={n: ["hospital-a"] for n in (1, 2, 3)})
    cand = propose(client, users["eng"], run_id)
    assert cand["status"] == "gates_failed"
    gate = gates_of(cand)["site_participation"]
    assert gate["passed"] is False
    assert gate["reason"] == (
        "1 site contributed, 2 needed (each in at least 50% of the 3 completed rounds); "
        "rounds trained: hospital-a 3/3, hospital-b 0/3, hospital-c 0/3; not counted: "
        "hospital-b, hospital-c")
    assert gate["figures"]["per_site"]["hospital-b"] == {"rounds": 0, "share": 0.0}
    assert gate["figures"]["contributing"] == ["hospital-a"]
    # Every other gate passed: participation alone keeps this model from review.
    assert [n for n, g in gates_of(cand).items() if not g["passed"]] == ["site_participation"]
    r = client.post(api(f"/candidates/{cand['id']}/approve"), json={"reason": "ship it"},
                    headers=users["rev"])
    assert r.status_code == 409
    assert "site_participation: 1 site contributed, 2 needed" in r.json()["detail"]


def test_sites_that_trained_in_enough_rounds_pass_the_participation_gate(
        make_client: Callable[..., TestClient], engine: Engine, home: Path,
        users: dict[str, Headers]) -> None:
    client = make_client(site_parity=FixedParity(good_figures(THREE)))
    # b missed one round of three (2/3 counts), c trained only once (1/3 does not).
    run_id = seed_run(engine, home, sites=THREE, trained={
        1: THREE, 2: ["hospital-a", "hospital-b"], 3: ["hospital-a"]})
    cand = propose(client, users["eng"], run_id)
    gate = gates_of(cand)["site_participation"]
    assert cand["status"] == "awaiting_review", gate
    assert gate["reason"] == (
        "2 sites contributed (each in at least 50% of the 3 completed rounds; 2 needed); "
        "rounds trained: hospital-a 3/3, hospital-b 2/3, hospital-c 1/3")
    assert gate["figures"]["contributing"] == ["hospital-a", "hospital-b"]

    # The project asks for all three: the same run fails, and says why.
    r = client.patch(api("/projects/cardio/gates"), json={"min_sites": 3},
                     headers=users["rev"])
    assert r.status_code == 200, r.text
    cand = propose(client, users["eng"], run_id)
    gate = gates_of(cand)["site_participation"]
    assert (cand["status"], gate["reason"]) == ("gates_failed", (
        "2 sites contributed, 3 needed (each in at least 50% of the 3 completed rounds); "
        "rounds trained: hospital-a 3/3, hospital-b 2/3, hospital-c 1/3; not counted: "
        "hospital-c"))
    # A lower share lets c count again.
    client.patch(api("/projects/cardio/gates"), json={"min_round_share": 0.3},
                 headers=users["rev"])
    assert propose(client, users["eng"], run_id)["status"] == "awaiting_review"


def test_a_single_site_run_needs_only_its_one_site(
        make_client: Callable[..., TestClient], engine: Engine, home: Path,
        users: dict[str, Headers]) -> None:
    client = make_client(site_parity=FixedParity(good_figures(["solo"])))
    cand = propose(client, users["eng"], seed_run(engine, home, sites=["solo"]))
    gate = gates_of(cand)["site_participation"]
    assert (gate["passed"], gate["figures"]["min_sites"]) == (True, 1)


def test_without_thresholds_the_metrics_gate_passes_and_says_so(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home, final={"hospital-a": {"auc": 0.5, "accuracy": 0.5},
                                           "hospital-b": {"auc": 0.5, "accuracy": 0.5}})
    cand = propose(client, users["eng"], run_id)
    assert gates_of(cand)["site_metrics"]["reason"] == "no thresholds set"
    assert gates_of(cand)["site_metrics"]["passed"] is True


def test_propose_without_waiting_answers_202_and_the_gates_follow(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home)
    r = client.post(api("/candidates?wait=false"), headers=users["eng"],
                    json={"run_id": run_id, "intended_use": INTENDED_USE})
    assert r.status_code == 202, r.text
    assert (r.json()["status"], r.json()["gates"]) == ("evaluating", [])
    # The test client returns once the background task is done; a real client polls.
    cand = client.get(api(f"/candidates/{r.json()['id']}"), headers=users["eng"]).json()
    assert cand["status"] == "awaiting_review"
    assert [c["id"] for c in client.get(api("/candidates?status=awaiting_review"),
                                        headers=users["rev"]).json()] == [cand["id"]]


def test_without_a_site_parity_evaluator_the_parity_gate_fails(
        make_client: Callable[..., TestClient], engine: Engine, home: Path,
        users: dict[str, Headers]) -> None:
    client = make_client()
    run_id = seed_run(engine, home)
    cand = propose(client, users["eng"], run_id)
    assert cand["status"] == "gates_failed"
    gate = gates_of(cand)["export_parity"]
    assert (gate["passed"], gate["reason"]) == (False, "no site parity evaluator configured")
    assert gates_of(cand)["export"]["passed"] is True


@pytest.mark.parametrize(("result", "fail", "reason"), [
    ({**good_figures(), "hospital-a": {**good_figures()["hospital-a"],
                                       "onnx": {"max_abs_diff": 1e-3, "agreement": 1.0,
                                                "n": 100.0}}},
     None, "hospital-a onnx max_abs_diff 0.001 > 0.0001"),
    ({**good_figures(), "hospital-b": {**good_figures()["hospital-b"],
                                       "onnx-int8": {"max_abs_diff": 0.2, "agreement": 0.9,
                                                     "n": 100.0}}},
     None, "hospital-b onnx-int8 agreement 0.9000 < 0.95"),
    ({**good_figures(), "hospital-b": {**good_figures()["hospital-b"],
                                       "openvino": {"max_abs_diff": float("nan"),
                                                    "agreement": 1.0, "n": 100.0}}},
     None, "hospital-b openvino max_abs_diff nan > 0.0001"),
    (good_figures(["hospital-a"]), None, "no parity figures from hospital-b"),
    ({}, None, "no site reported parity figures"),
    (None, TimeoutError("the sites did not report parity within 300 s"),
     "the sites could not measure parity: TimeoutError: the sites did not report parity "
     "within 300 s"),
], ids=["onnx-diff", "int8-agreement", "nan", "missing-site", "none", "raises"])
def test_parity_out_of_tolerance_fails_the_gate(
        make_client: Callable[..., TestClient], engine: Engine, home: Path,
        users: dict[str, Headers], result: Any, fail: Exception | None, reason: str) -> None:
    client = make_client(site_parity=FixedParity(result, fail=fail))
    cand = propose(client, users["eng"], seed_run(engine, home))
    gate = gates_of(cand)["export_parity"]
    assert cand["status"] == "gates_failed"
    assert (gate["passed"], gate["reason"]) == (False, reason)


def test_privacy_gate_needs_every_site_within_budget(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home, budget=3.0, epsilon={"hospital-a": 3.4, "hospital-b": None})
    cand = propose(client, users["eng"], run_id)
    gate = gates_of(cand)["privacy_statement"]
    assert cand["status"] == "gates_failed"
    assert gate["reason"] == ("hospital-a spent epsilon 3.4 over the budget 3.0; "
                              "hospital-b reported no epsilon-spent")
    assert gate["figures"]["per_site"]["hospital-b"]["epsilon_spent"] is None


class _Eigen(nn.Module):
    """Uses an operator (linalg_eig) that has no ONNX translation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(30, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = self.lin(x).reshape(-1, 5, 6)[:, :, :5]
        out: torch.Tensor = torch.linalg.eigvals(square).real[:, :2]
        return out


def test_a_model_no_exporter_supports_is_refused_with_the_reason(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILTIN_FAMILIES, "eigen_demo", _Eigen)
    spec = TaskSpec(name="eigen_demo", description="test only", feature_columns=
                    BREAST_CANCER_COLUMNS, label_column="diagnosis", n_classes=2,
                    default_lr=0.1, default_batch_size=32, model="eigen_demo")
    monkeypatch.setitem(TASKS, "eigen_demo", spec)
    run_id = seed_run(engine, home, task="eigen_demo", arrays=model_arrays(_Eigen()))
    cand = propose(client, users["eng"], run_id)
    assert cand["status"] == "gates_failed"
    export_gate = gates_of(cand)["export"]
    assert export_gate["passed"] is False
    assert export_gate["reason"].startswith(
        "no exporter supports this model: the ONNX exporter rejected the model: DispatchError: "
        "No ONNX function found for <OpOverload(op='aten.linalg_eig'"), export_gate["reason"]
    assert gates_of(cand)["export_parity"]["reason"] == "not measured: the export failed"
    assert not (home / "candidates" / f"candidate-{cand['id']}").exists()
    r = client.post(api(f"/candidates/{cand['id']}/approve"), json={"reason": "looks okay"},
                    headers=users["rev"])
    assert r.status_code == 409
    assert "no exporter supports this model" in r.json()["detail"]


def test_unknown_task_and_missing_checkpoint(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home, rounds=2)
    r = client.post(api("/candidates"), json={"run_id": run_id, "round": 9,
                                              "intended_use": INTENDED_USE},
                    headers=users["eng"])
    assert r.status_code == 404
    assert r.json()["detail"] == f"run {run_id} has no checkpoint for round 9"
    r = client.post(api("/candidates"), json={"run_id": 999, "intended_use": INTENDED_USE},
                    headers=users["eng"])
    assert (r.status_code, r.json()["detail"]) == (404, "run 999 not found")
    r = client.post(api("/candidates"), json={"run_id": run_id, "intended_use": "short"},
                    headers=users["eng"])
    assert r.status_code == 422
    assert r.json()["message"].startswith("intended_use: ")


def test_reject_rules(client: TestClient, engine: Engine, home: Path,
                      users: dict[str, Headers]) -> None:
    cand = propose(client, users["admin"], seed_run(engine, home))
    url = api(f"/candidates/{cand['id']}")
    assert client.post(url + "/reject", json={"reason": "mine"},
                       headers=users["admin"]).status_code == 403
    r = client.post(url + "/reject", json={}, headers=users["rev"])
    assert r.status_code == 422 and r.json()["message"] == "reason: Field required"
    r = client.post(url + "/reject", json={"reason": "calibration drifts at site b"},
                    headers=users["rev"])
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    r = client.post(url + "/approve", json={"reason": "changed my mind"}, headers=users["admin2"])
    assert r.status_code == 409
    assert r.json()["detail"] == (f"candidate {cand['id']} cannot be approved: it was rejected "
                                  "by rev: calibration drifts at site b")
    assert client.get(url, headers=users["rev"]).json()["decided_by"] == "rev"
    assert client.get(url, headers=users["clin"]).status_code == 403


def test_an_earlier_round_is_evaluated_by_the_next_rounds_figures(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home)
    cand = propose(client, users["eng"], run_id, round=2)
    assert cand["round"] == 2
    evaluation = gates_of(cand)["site_metrics"]["figures"]
    assert evaluation["source"] == "evaluated at each site at the start of round 3"
    assert evaluation["per_site"]["hospital-a"]["auc"] == pytest.approx(0.9)
    privacy = gates_of(cand)["privacy_statement"]["figures"]["per_site"]
    assert privacy["hospital-a"] == {"epsilon_spent": pytest.approx(1.8),
                                     "reported_in_round": 2, "delta": 1e-5}


# --- bundle paths --------------------------------------------------------------------------


def _approved(client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> str:
    cand = propose(client, users["eng"], seed_run(engine, home))
    r = client.post(api(f"/candidates/{cand['id']}/approve"), json={"reason": "fine"},
                    headers=users["rev"])
    assert r.status_code == 201, r.text
    rid: str = r.json()["release_id"]
    return rid


def test_a_symlink_in_a_stored_bundle_is_never_served(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers],
        tmp_path: Path) -> None:
    rid = _approved(client, engine, home, users)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for clinicians")
    (home / "releases" / rid / "extra").symlink_to(secret)
    r = client.get(api(f"/releases/{rid}/bundle"), headers=users["clin"])
    assert r.status_code == 500
    assert r.json()["detail"] == (f"the bundle of release {rid} on the coordinator fails "
                                  f"verification: symlink in bundle: extra -> {secret}")


def test_a_stored_bundle_path_with_dotdot_is_refused(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    rid = _approved(client, engine, home, users)
    with session_scope(engine) as session:
        row = session.exec(select(Release).where(Release.release_id == rid)).one()
        row.bundle_path = f"releases/{rid}/../../.."
        session.add(row)
    r = client.get(api(f"/releases/{rid}/bundle"), headers=users["clin"])
    assert r.status_code == 500
    assert r.json()["detail"] == (f"release {rid}: stored bundle path 'releases/{rid}/../../..'"
                                  f" is not 'releases/{rid}'; refusing it")


def test_a_symlinked_releases_folder_or_an_existing_bundle_blocks_approval(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers],
        tmp_path: Path) -> None:
    run_id = seed_run(engine, home)
    cand = propose(client, users["eng"], run_id)
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "releases").symlink_to(outside)
    url = api(f"/candidates/{cand['id']}/approve")
    r = client.post(url, json={"reason": "fine"}, headers=users["rev"])
    assert r.status_code == 500
    assert r.json()["detail"] == (f"the releases folder {home / 'releases'} is a symlink; "
                                  "refusing to follow it")
    assert list(outside.iterdir()) == []
    (home / "releases").unlink()
    rid = f"cardio-run{run_id}-round3-c{cand['id']}"
    (home / "releases" / rid).mkdir(parents=True)
    r = client.post(url, json={"reason": "fine"}, headers=users["rev"])
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"a bundle already exists at {home / 'releases' / rid}")
    assert client.get(api(f"/candidates/{cand['id']}"),
                      headers=users["rev"]).json()["status"] == "awaiting_review"
    (home / "releases" / rid).rmdir()
    assert client.post(url, json={"reason": "fine"}, headers=users["rev"]).status_code == 201


# --- lineage -------------------------------------------------------------------------------


def test_lineage_of_a_version(client: TestClient, engine: Engine, home: Path,
                              users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home)
    r = client.get(api(f"/versions/{run_id}/3/lineage"), headers=users["rev"])
    assert r.status_code == 200, r.text
    lineage = r.json()
    assert lineage["run"]["seed"] == 7 and lineage["run"]["config"]["epsilon"] == 3.0
    assert lineage["version"]["checkpoint"]["status"] == "ok: matches its recorded SHA-256"
    assert lineage["version"]["n_parameters"] == 30 * 8 + 8 + 8 * 2 + 2
    software = lineage["software"]
    assert set(software["packages"]) >= {"fedward", "flwr", "torch", "opacus"}
    assert len(software["flower_app_bundle_sha256"]) == 64
    assert software["code_revision"] == "unknown" or len(
        software["code_revision"].removesuffix("+modified")) == 40
    assert [r_["participating_sites"] for r_ in lineage["rounds"]] == [list(SITES)] * 3
    assert lineage["privacy"]["per_site"]["hospital-b"]["epsilon_spent"] == pytest.approx(2.7)
    assert set(lineage["evaluation"]["per_site"]) == set(SITES)
    assert lineage["data_fingerprints"] is None
    assert lineage["data_fingerprints_note"] == ("not reported: no site sent a data "
                                                 "fingerprint for this run")
    assert client.get(api(f"/versions/{run_id}/3/lineage"),
                      headers=users["clin"]).status_code == 403
    r = client.get(api(f"/versions/{run_id}/7/lineage"), headers=users["rev"])
    assert (r.status_code, r.json()["detail"]) == (404, f"run {run_id} has no checkpoint for "
                                                        "round 7")
    versions = client.get(api(f"/versions?run_id={run_id}"), headers=users["eng"]).json()
    assert [v["round"] for v in versions] == [3, 2, 1]


def test_lineage_takes_the_fingerprints_the_sites_reported(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    run_id = seed_run(engine, home, extra_metrics={"fingerprint-n-rows": 284.0})
    lineage = client.get(api(f"/versions/{run_id}/3/lineage"), headers=users["rev"]).json()
    assert lineage["data_fingerprints"]["hospital-a"] == [
        {"round": 1, "fingerprint": {"n-rows": 284.0}}]
    fingerprint = {"schema-hash": "ab" * 32, "content-hmac": "cd" * 32, "n-rows": "284"}
    record_data_fingerprint(engine, run_id, 1, "hospital-b", fingerprint)
    lineage = client.get(api(f"/versions/{run_id}/3/lineage"), headers=users["rev"]).json()
    assert lineage["data_fingerprints"] == {"hospital-b": [{"round": 1,
                                                            "fingerprint": fingerprint}]}
    assert lineage["data_fingerprints_note"] is None
    assert lineage["data_fingerprint_method"].startswith(
        "content-hmac: HMAC-SHA256 of the site's data file under a key only that site holds")


def test_the_coordinator_keeps_only_the_keyed_fingerprint_of_a_site(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An older site agent still sends the plain SHA-256 of its file: it is not recorded."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.update_checks import reply_fingerprint as _fingerprint
    from fedward.wire import REPLY_FINGERPRINT

    # Messages read the identity of the task that makes them (as in a ServerApp process).
    for name, value in (("_task_id", 1), ("_run_id", 4242), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)

    sent = Message(RecordDict({}), dst_node_id=1, message_type=MessageType.TRAIN)
    reply = Message(RecordDict({REPLY_FINGERPRINT: ConfigRecord({
        "content-sha256": "ab" * 32, "content-hmac": "cd" * 32, "n-rows": "284"})}),
        reply_to=sent)
    assert _fingerprint(reply) == {"content-hmac": "cd" * 32, "n-rows": "284"}


# --- gates settings, passwords -------------------------------------------------------------


def test_gate_settings_are_validated(client: TestClient, engine: Engine, home: Path,
                                     users: dict[str, Headers]) -> None:
    seed_run(engine, home, rounds=1)
    url = api("/projects/cardio/gates")
    shown = client.get(url, headers=users["eng"]).json()
    assert (shown["project"], shown["thresholds"]) == ("cardio", {})
    assert shown["defaults"] == {"min_sites": 2, "min_round_share": 0.5}
    assert set(shown["help"]) == {"min_sites", "min_round_share", "min_site_auc",
                                  "min_site_accuracy"}
    for bad, message in [({"min_sites": 0}, "min_sites: "), ({"min_sites": 2.5}, "min_sites: "),
                         ({"min_round_share": 0}, "min_round_share: "),
                         ({"min_round_share": 1.2}, "min_round_share: ")]:
        r = client.patch(url, json=bad, headers=users["rev"])
        assert r.status_code == 422 and r.json()["message"].startswith(message), r.text
    r = client.put(url, json={"min_site_auc": 1.5}, headers=users["rev"])
    assert r.status_code == 422 and r.json()["message"].startswith("min_site_auc: ")
    r = client.put(url, json={"min_site_f1": 0.5}, headers=users["rev"])
    assert r.status_code == 422 and r.json()["message"].startswith("min_site_f1: Extra inputs")
    assert client.put(url, json={"min_site_auc": 0.5}, headers=users["eng"]).status_code == 403
    assert client.put(api("/projects/nope/gates"), json={},
                      headers=users["rev"]).status_code == 404


def test_patching_gates_changes_only_what_it_names(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers]) -> None:
    seed_run(engine, home, rounds=1)
    url = api("/projects/cardio/gates")
    r = client.put(url, json={"min_site_auc": 0.8, "min_sites": 3}, headers=users["rev"])
    assert r.json()["thresholds"] == {"min_site_auc": 0.8, "min_sites": 3}
    r = client.patch(url, json={"min_site_accuracy": 0.7}, headers=users["rev"])
    assert r.json()["thresholds"] == {"min_site_auc": 0.8, "min_site_accuracy": 0.7,
                                      "min_sites": 3}
    r = client.patch(url, json={"min_sites": None}, headers=users["admin"])
    assert r.json()["thresholds"] == {"min_site_auc": 0.8, "min_site_accuracy": 0.7}
    assert client.patch(url, json={"min_sites": 2}, headers=users["eng"]).status_code == 403
    assert client.get(url, headers=users["rev"]).json()["thresholds"] == r.json()["thresholds"]
    with session_scope(engine) as session:
        events = session.exec(select(AuditEvent).where(
            AuditEvent.action == "project.gates_set")).all()
    assert json.loads(events[-1].detail_json)["after"] == r.json()["thresholds"]


def test_password_login_sessions_and_logout(client: TestClient, engine: Engine,
                                            users: dict[str, Headers]) -> None:
    r = client.post(api("/users"), json={"name": "dr.ada", "role": "clinician",
                                         "password": "a long enough passphrase"},
                    headers=users["admin"])
    assert r.status_code == 201, r.text
    api_token = r.json()["token"]
    assert client.get(api("/me"), headers={"Authorization": f"Bearer {api_token}"}).json()[
        "role"] == "clinician"
    with session_scope(engine) as session:
        stored = session.exec(select(UserCredential)).all()
    assert all(c.password_hash.startswith("$argon2id$") for c in stored)
    assert not any("a long enough passphrase" in c.password_hash for c in stored)

    for name, password in [("dr.ada", "wrong password!!"), ("nobody", "whatever it is")]:
        r = client.post(api("/login"), json={"name": name, "password": password})
        assert (r.status_code, r.json()["detail"]) == (401, "wrong user name or password")
    r = client.post(api("/login"), json={"name": "dr.ada", "password": "a long enough passphrase"})
    assert r.status_code == 200, r.text
    session_headers = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.get(api("/me"), headers=session_headers).json()["name"] == "dr.ada"
    assert client.post(api("/logout"), headers=session_headers).status_code == 204
    assert client.get(api("/me"), headers=session_headers).status_code == 401

    # An expired session is refused; a password change ends open sessions.
    login = {"name": "dr.ada", "password": "a long enough passphrase"}
    token = client.post(api("/login"), json=login).json()["token"]
    with session_scope(engine) as session:
        for row in session.exec(select(LoginSession)).all():
            row.expires_at = row.expires_at - timedelta(hours=13)
            session.add(row)
    assert client.get(api("/me"), headers={"Authorization": f"Bearer {token}"}).status_code == 401
    token = client.post(api("/login"), json=login).json()["token"]
    me = {"Authorization": f"Bearer {token}"}
    assert client.put(api("/users/eng/password"), json={"password": "x" * 20},
                      headers=me).status_code == 403
    other = {"Authorization": f"Bearer {client.post(api('/login'), json=login).json()['token']}"}
    assert client.put(api("/users/dr.ada/password"), json={"password": "another passphrase"},
                      headers=me).status_code == 204
    # Every other credential ends (the other session, the API token); the one used stays.
    assert client.get(api("/me"), headers=other).status_code == 401
    assert client.get(api("/me"), headers={"Authorization": f"Bearer {api_token}"}
                      ).status_code == 401
    assert client.get(api("/me"), headers=me).status_code == 200

    r = client.post(api("/users"), json={"name": "short", "role": "reviewer", "password": "x"},
                    headers=users["admin"])
    assert r.status_code == 422 and r.json()["message"].startswith("password: ")
    r = client.post(api("/users"), json={"name": "dr.ada", "role": "reviewer"},
                    headers=users["admin"])
    assert r.status_code == 409
    actions = audit_actions(engine)
    assert actions.count("user.login_failed") == 2 and "user.password_set" in actions


# --- CLI -----------------------------------------------------------------------------------


def test_release_cli(client: TestClient, engine: Engine, home: Path, users: dict[str, Headers],
                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_id = seed_run(engine, home)
    runner = CliRunner()
    as_ = {name: cli_client(client, h) for name, h in users.items()}
    current = {"who": "eng"}
    monkeypatch.setattr(release_cli, "_client", lambda *_a: as_[current["who"]])

    result = runner.invoke(release_cli.release_app, ["propose", str(run_id), "--intended-use",
                                                     INTENDED_USE, "--json"])
    assert result.exit_code == 0, result.output
    cand = json.loads(result.stdout)   # progress goes to stderr
    assert cand["status"] == "awaiting_review"
    result = runner.invoke(release_cli.release_app, ["approve", str(cand["id"]), "--reason",
                                                     "reviewed"])
    assert result.exit_code == 1
    assert "403" in result.output
    current["who"] = "rev"
    result = runner.invoke(release_cli.release_app, ["approve", str(cand["id"]), "--reason",
                                                     "reviewed", "--json"])
    assert result.exit_code == 0, result.output
    rid = json.loads(result.output)["release_id"]

    current["who"] = "clin"
    out = tmp_path / "dl"
    result = runner.invoke(release_cli.release_app, ["download", rid, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"verified: release {rid}, 7 files" in result.output
    assert (out / rid / "model.sig").is_file() and (out / "release.pub.pem").is_file()

    current["who"] = "admin"
    result = runner.invoke(release_cli.release_app, ["revoke", rid, "--reason", "recalled"])
    assert result.exit_code == 0, result.output
    current["who"] = "clin"
    result = runner.invoke(release_cli.release_app, ["download", rid, "--out",
                                                     str(tmp_path / "again")])
    assert result.exit_code == 1
    assert f"410: release {rid} was revoked: recalled" in " ".join(result.output.split())


def test_create_user_command(client: TestClient, users: dict[str, Headers],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import cli

    monkeypatch.setattr(cli, "api_client", lambda *_a: cli_client(client, users["admin"]))
    runner = CliRunner()
    result = runner.invoke(cli.app, ["create-user", "dr-kim", "--role", "clinician"],
                           input="a long enough passphrase\na long enough passphrase\n")
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert client.get(api("/me"), headers={"Authorization": f"Bearer {token}"}).json()[
        "name"] == "dr-kim"
    r = client.post(api("/login"), json={"name": "dr-kim",
                                         "password": "a long enough passphrase"})
    assert r.status_code == 200
    result = runner.invoke(cli.app, ["create-user", "ci-bot", "--role", "ml_engineer",
                                     "--no-password"])
    assert result.exit_code == 0, result.output
    assert client.post(api("/login"), json={"name": "ci-bot", "password": "x" * 12}
                       ).status_code == 401
    monkeypatch.setattr(cli, "api_client", lambda *_a: cli_client(client, users["eng"]))
    result = runner.invoke(cli.app, ["create-user", "eve", "--role", "admin",
                                     "--no-password"])
    assert result.exit_code == 1 and "403" in result.output


# --- pieces --------------------------------------------------------------------------------


def test_training_curve_svg_edge_cases() -> None:
    empty = ET.fromstring(training_curve_svg(  # noqa: S314 - generated here
        metrics={}, up_to_round=1, final_round=1, title="t"))
    texts = [t.text for t in empty.iter("{http://www.w3.org/2000/svg}text")]
    assert texts.count("no figures reported") == 2
    svg = training_curve_svg(
        metrics={1: {"<b>site</b>": {"eval-auc": 0.5, "eval-loss": float("nan")}},
                 2: {"<b>site</b>": {"eval-auc": 0.7, "eval-loss": float("nan"),
                                     "train-loss": 0.4}}},
        up_to_round=1, final_round=3, title="a & b")
    root = ET.fromstring(svg)  # noqa: S314 - well-formed: names and titles are escaped
    assert "&lt;b&gt;site&lt;/b&gt;" in svg and "<script" not in svg
    # AUC: rounds 1 and 2 evaluate the models after rounds 0 and 1. The held-out loss is
    # NaN both times, and a training loss (an older site sent one) is never drawn: the loss
    # panel has nothing to draw.
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 1
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert texts.count("no figures reported") == 1
    assert "Held-out loss per site" in texts and "Training loss per site" not in texts
    assert HELD_OUT_NOT_DP in texts


def test_migration_0003_downgrades_and_upgrades(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    run_migrations(url)
    config = alembic_config()
    eng = make_engine(url)
    try:
        with eng.connect() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0002")
            assert "releases" not in inspect(connection).get_table_names()
            command.upgrade(config, "head")
            assert {"releases", "release_candidates", "project_gates", "login_sessions",
                    "user_credentials"} <= set(inspect(connection).get_table_names())
    finally:
        eng.dispose()


def test_a_revoked_release_stops_answering_without_a_reload(
        client: TestClient, engine: Engine, home: Path, users: dict[str, Headers],
        tmp_path: Path) -> None:
    rid = _approved(client, engine, home, users)
    folder = unpack(client.get(api(f"/releases/{rid}/bundle"), headers=users["clin"]).content,
                    tmp_path / "clinic")
    pub = tmp_path / "release.pub.pem"
    pub.write_text(client.get(api("/release-key.pem")).text)
    row = [[float(v) for v in load_breast_cancer().data[0]]]
    with served_app(create_app(settings=Settings(home=home), engine=engine),
                    name="coordinator-api") as port:
        online = RevocationSource(coordinator=f"http://127.0.0.1:{port}")
        with TestClient(create_inference_app(bundle_dir=folder, public_key=pub,
                                             revocations=online, recheck_s=0.3)) as serving:
            assert serving.post("/predict", json={"instances": row}).status_code == 200
            time.sleep(1.0)   # a few checks pass and change nothing
            assert serving.post("/predict", json={"instances": row}).status_code == 200
            r = client.post(api(f"/releases/{rid}/revoke"), json={"reason": "label leak"},
                            headers=users["admin"])
            assert r.status_code == 200, r.text
            revoked_at = time.monotonic()
            while serving.post("/predict", json={"instances": row}).status_code == 200:
                assert time.monotonic() - revoked_at < 10, "still answering 10 s after revoke"
                time.sleep(0.05)
            res = serving.post("/predict", json={"instances": row})
            assert res.status_code == 503
            assert res.json()["detail"] == f"not serving: release {rid} is revoked"
            metrics = serving.get("/metrics").text
            assert 'fedward_serve_revocation_checks_total{result="failed"}' in metrics
            assert "fedward_serve_serving 0.0" in metrics
