"""Run control without Flower: the cancel route, run limits, the coordinator's cancellation
backstop, and what the CLI computes (wait's exit codes, launch --from, compare).

The whole path with Flower, site agents and processes is in
``tests/test_run_control_integration.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from coordinator import cli as coordinator_cli
from coordinator import run_cli
from coordinator.api import create_app
from coordinator.models import Run
from coordinator.repository import cancel_request, finish_run, mark_run_started
from coordinator.run_control import enforce_cancellations
from coordinator.settings import Settings, SettingsError, load_settings
from fedward.flower.control import FlowerRunState

from api_support import FakeLauncher, TestClient, api, run_body, setup_registered_sites

if TYPE_CHECKING:   # imported where used: the site agent's stack is slow to load
    from site_agent.admission import SiteGate
    from site_agent.audit import AuditLog
    from site_agent.trainer import WarmTrainer


@pytest.fixture
def client_with(tmp_path: Path, engine: Engine
                ) -> Iterator[Callable[..., tuple[TestClient, FakeLauncher]]]:
    """Factory: a TestClient whose settings take ``overrides``, with a launcher that
    marks each run started as its ServerApp would."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> tuple[TestClient, FakeLauncher]:
        launcher = FakeLauncher(engine, serverapp_first=True)
        settings = Settings(home=tmp_path / "home", **overrides)
        client = TestClient(create_app(settings=settings, engine=engine, launcher=launcher,
                                       registrar=_Registrar()))
        client.__enter__()
        clients.append(client)
        return client, launcher

    yield make
    for client in clients:
        client.__exit__(None, None, None)


class _Registrar:
    def __init__(self) -> None:
        self.n = 0

    def register(self, public_key: str, name: str) -> str:
        self.n += 1
        return str(100 + self.n)

    def unregister(self, node_id: str) -> None:
        return None


def _ready(client: TestClient, headers: dict[str, str], *projects: str) -> None:
    for project in projects:
        assert client.post(api("/projects"), json={"name": project},
                           headers=headers).status_code == 201
    setup_registered_sites(client, headers, ["site-a", "site-b"])


def test_cancel_records_who_and_why_and_refuses_an_ended_run(
        client_with: Callable[..., tuple[TestClient, FakeLauncher]], engine: Engine,
        token_for: Callable[..., dict[str, str]]) -> None:
    client, _ = client_with()
    alice, bob, reviewer = token_for("ml_engineer"), token_for("admin"), token_for("reviewer")
    _ready(client, alice, "oncology")
    run_id = client.post(api("/runs"), json=run_body(), headers=alice).json()["id"]

    r = client.post(api(f"/runs/{run_id}/cancel"), json={"reason": "x"}, headers=reviewer)
    assert r.status_code == 403 and "ml_engineer" in r.json()["detail"]
    r = client.post(api(f"/runs/{run_id}/cancel"), json={"reason": ""}, headers=alice)
    assert r.status_code == 422 and r.json()["message"].startswith("reason:")
    assert client.post(api("/runs/999/cancel"), json={"reason": "x"},
                       headers=alice).status_code == 404
    assert cancel_request(engine, run_id) is None

    r = client.post(api(f"/runs/{run_id}/cancel"), json={"reason": "wrong cohort"},
                    headers=alice)
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["status"] == "running"   # the round loop ends it
    assert (run["cancelled_by"], run["cancel_reason"]) == ("ml_engineer-0", "wrong cohort")
    assert run["cancel_requested_at"]
    # A second request while it ends: accepted, the first who and why stand.
    again = client.post(api(f"/runs/{run_id}/cancel"), json={"reason": "other"}, headers=bob)
    assert again.status_code == 202 and again.json()["cancel_reason"] == "wrong cohort"
    assert cancel_request(engine, run_id) == ("ml_engineer-0", "wrong cohort")

    finish_run(engine, run_id, status="cancelled", reason="cancelled by ml_engineer-0: "
                                                           "wrong cohort")
    shown = client.get(api(f"/runs/{run_id}"), headers=alice).json()
    assert (shown["status"], shown["cancelled_by"]) == ("cancelled", "ml_engineer-0")
    r = client.post(api(f"/runs/{run_id}/cancel"), json={"reason": "x"}, headers=alice)
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"run {run_id} has already ended (cancelled at ")
    assert "only a pending or running run can be cancelled" in r.json()["detail"]
    # A completed run: 409 too.
    done_id = client.post(api("/runs"), json=run_body(), headers=alice).json()["id"]
    finish_run(engine, done_id, status="completed", reason=None)
    r = client.post(api(f"/runs/{done_id}/cancel"), json={"reason": "x"}, headers=alice)
    assert r.status_code == 409 and "(completed at " in r.json()["detail"]
    audit = client.get(api("/audit"), params={"limit": 500}, headers=bob).json()["items"]
    requested = [e for e in audit if e["action"] == "run.cancel_requested"]
    assert [(e["actor"], e["subject"], e["detail"]["reason"]) for e in requested] == [
        ("ml_engineer-0", f"run:{run_id}", "wrong cohort")]
    # A cancelled run is never resumed.
    with pytest.raises(ValueError, match="already finished"):
        mark_run_started(engine, run_id, "999")


def test_run_limits_refuse_with_the_limit_and_the_runs_holding_it(
        client_with: Callable[..., tuple[TestClient, FakeLauncher]], engine: Engine,
        token_for: Callable[..., dict[str, str]]) -> None:
    client, launcher = client_with(max_concurrent_runs=3, max_concurrent_runs_per_project=2)
    headers = token_for("ml_engineer")
    _ready(client, headers, "oncology", "cardio")
    first, second = (client.post(api("/runs"), json=run_body(), headers=headers).json()["id"]
                     for _ in range(2))
    r = client.post(api("/runs"), json=run_body(), headers=headers)
    assert r.status_code == 429, r.text
    assert r.json()["detail"] == (
        "run limit reached: at most 2 runs at once in project 'oncology' (setting "
        f"FEDWARD_MAX_CONCURRENT_RUNS_PER_PROJECT); held by run {first} (oncology, running), "
        f"run {second} (oncology, running); wait for one of them to end, or cancel one "
        "(`fedward-coordinator cancel RUN --reason TEXT`)")
    third = client.post(api("/runs"), json=run_body(project="cardio"), headers=headers)
    assert third.status_code == 201
    # A run being cancelled still holds its place; the coordinator-wide limit names all.
    client.post(api(f"/runs/{first}/cancel"), json={"reason": "make room"}, headers=headers)
    r = client.post(api("/runs"), json=run_body(project="cardio"), headers=headers)
    assert r.status_code == 429
    assert r.json()["detail"].startswith(
        f"run limit reached: at most 3 runs at once on this coordinator (setting "
        f"FEDWARD_MAX_CONCURRENT_RUNS); held by run {first} (oncology, cancelling), run "
        f"{second} (oncology, running), run {third.json()['id']} (cardio, running);")
    # Nothing was written for the refused launches.
    with Session(engine) as session:
        assert session.get(Run, third.json()["id"] + 1) is None
    assert len(launcher.launched) == 3
    finish_run(engine, first, status="cancelled", reason="cancelled")
    assert client.post(api("/runs"), json=run_body(), headers=headers).status_code == 201


def test_run_limits_default_to_4_and_2_and_the_documented_variables_set_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, per_project = "FEDWARD_MAX_CONCURRENT_RUNS", "FEDWARD_MAX_CONCURRENT_RUNS_PER_PROJECT"
    guide = " ".join((Path(__file__).parents[1] / "docs" / "ml-team-guide.md").read_text()
                     .split())
    assert f"`{runs}` (default 4)" in guide and f"`{per_project}` (default 2)" in guide
    for var in (runs, per_project):
        monkeypatch.delenv(var, raising=False)
    limits = load_settings(tmp_path)
    assert (limits.max_concurrent_runs, limits.max_concurrent_runs_per_project) == (4, 2)
    monkeypatch.setenv(runs, "9")
    monkeypatch.setenv(per_project, "3")
    limits = load_settings(tmp_path)
    assert (limits.max_concurrent_runs, limits.max_concurrent_runs_per_project) == (9, 3)

    # A bad value: refused, naming the variable and what it must be.
    for var, value, must in [(runs, "0", "Input should be greater than or equal to 1"),
                             (runs, "1001", "Input should be less than or equal to 1000"),
                             (per_project, "two", "Input should be a valid integer, unable "
                                                  "to parse string as an integer")]:
        monkeypatch.setenv(runs, "4")
        monkeypatch.setenv(per_project, "2")
        monkeypatch.setenv(var, value)
        with pytest.raises(SettingsError) as refused:
            load_settings(tmp_path)
        assert str(refused.value) == (
            f"bad coordinator setting: {var}: {must}. Correct or unset it in the environment "
            "(for the coordinator service: its systemd unit or container) and start again")
    # The command line says it in one line, exit status 2, and creates nothing.
    home = tmp_path / "home"
    out = CliRunner(env={"COLUMNS": "250", runs: "0", per_project: "2"}).invoke(
        coordinator_cli.app, ["init", "--home", str(home)])
    assert out.exit_code == 2, out.output
    assert out.output.startswith(f"error: bad coordinator setting: {runs}: Input should be "
                                 "greater than or equal to 1. Correct or unset it")
    assert len(out.output.splitlines()) == 1 and not home.exists()


class _Control:
    """The two control calls the cancellation backstop makes, recorded (the Flower side of
    this path runs for real in the integration test)."""

    def __init__(self, runs: dict[int, FlowerRunState]) -> None:
        self.runs = runs
        self.stopped: list[int] = []

    def training_runs(self) -> dict[int, FlowerRunState]:
        return self.runs

    def stop_run(self, flwr_run_id: int) -> None:
        self.stopped.append(flwr_run_id)


def test_backstop_stops_a_flower_run_past_its_deadline_and_ends_runs_without_one(
        client_with: Callable[..., tuple[TestClient, FakeLauncher]], engine: Engine,
        token_for: Callable[..., dict[str, str]]) -> None:
    client, _ = client_with()
    headers = token_for("ml_engineer")
    _ready(client, headers, "oncology")
    hung, orphan = (client.post(api("/runs"), json=run_body(round_deadline_s=30),
                                headers=headers).json()["id"] for _ in range(2))
    for run_id in (hung, orphan):
        client.post(api(f"/runs/{run_id}/cancel"), json={"reason": "stop"}, headers=headers)
    with Session(engine) as session:
        row = session.get(Run, hung)
        assert row is not None and row.cancel_requested_at is not None
        asked = row.cancel_requested_at
    control = _Control({hung: FlowerRunState(flwr_run_id=4242, status="running",
                                             sub_status="", details="")})
    # Within the grace (and, for a live Flower run, the round deadline): the round loop's turn.
    assert enforce_cancellations(engine, control, now=asked + timedelta(seconds=4)) == []  # type: ignore[arg-type]
    assert enforce_cancellations(engine, control, now=asked + timedelta(seconds=6)) == [orphan]  # type: ignore[arg-type]
    assert enforce_cancellations(engine, control, now=asked + timedelta(seconds=34)) == []  # type: ignore[arg-type]
    assert control.stopped == []
    assert enforce_cancellations(engine, control, now=asked + timedelta(seconds=36)) == [hung]  # type: ignore[arg-type]
    assert control.stopped == [4242]
    runs = {r["id"]: r for r in client.get(api("/runs"), headers=headers).json()}
    assert runs[orphan]["status"] == runs[hung]["status"] == "cancelled"
    assert runs[orphan]["failure_reason"] == (
        "cancelled by ml_engineer-0: stop (no ServerApp was executing it: ended by the "
        "coordinator; sites not told)")
    assert "the coordinator stopped Flower run 4242" in runs[hung]["failure_reason"]


# --- the CLI's computations -------------------------------------------------------------


class _Api:
    """Answers GET /runs/{id} from a list of states, one per call."""

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.calls = 0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        state = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        return {"id": 7, "status": state}


@pytest.mark.parametrize(("final", "code"), [("completed", 0), ("failed", 3),
                                             ("cancelled", 4), ("stopped", 5)])
def test_wait_exit_codes_are_distinct_per_outcome(final: str, code: int) -> None:
    now = [0.0]
    got, run = run_cli.wait_for_run(_Api(["pending", "running", final]), 7, timeout=60,
                                    clock=lambda: now[0],
                                    sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert (got, run["status"]) == (code, final)
    assert set(run_cli.WAIT_EXIT_HELP) == {0, 1, 2, 3, 4, 5, 6}   # each has its help text


def test_wait_times_out_with_its_own_code() -> None:
    now = [0.0]
    api_ = _Api(["running"])
    got, _ = run_cli.wait_for_run(api_, 7, timeout=10, interval=3, clock=lambda: now[0],
                                  sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert got == run_cli.WAIT_TIMED_OUT == 6
    assert api_.calls == 5   # 0, 3, 6, 9, 10 s


def _run(run_id: int, **config: Any) -> dict[str, Any]:
    base = {"rounds": 3, "epsilon": 3.0, "lr": 0.05, "sites": ["a", "b"], "seed": 0}
    return {"id": run_id, "project": "onc", "task": "breast_cancer_mlp", "status": "completed",
            "failure_reason": None, "config": {**base, **config}}


def test_relaunch_body_keeps_the_recorded_config_and_applies_overrides() -> None:
    body = run_cli.relaunch_body(_run(3), {"rounds": 8, "sites": ["a"]})
    assert body == {"project": "onc", "task": "breast_cancer_mlp", "rounds": 8, "epsilon": 3.0,
                    "lr": 0.05, "sites": ["a"], "seed": 0}
    # A run of a study: the same study version again (the hash is pinned anew), no task.
    study_run = {**_run(4), "config": {**_run(4)["config"], "study": "bc@2",
                                       "study_hash": "ab" * 32}}
    again = run_cli.relaunch_body(study_run, {"rounds": 2})
    assert again["study"] == "bc@2" and "task" not in again and "study_hash" not in again
    assert run_cli.relaunch_body(study_run, {"task": "breast_cancer_mlp"})["task"] == (
        "breast_cancer_mlp")


def test_compare_shows_config_differences_and_metrics_in_80_columns() -> None:
    def metrics(acc: list[float]) -> dict[str, Any]:
        rounds: list[dict[str, Any]] = [
            {"round": i + 1, "sites": {"a": {"eval-accuracy": v, "epsilon-spent": 1.0 + i},
                                       "b": {"eval-accuracy": v + 0.1}}}
            for i, v in enumerate(acc)]
        rounds[-1]["sites"]["a"]["final-eval-accuracy"] = acc[-1] + 0.2
        return {"rounds": rounds}

    data = run_cli.compare_runs(_run(1), metrics([0.5, 0.6]),
                                _run(2, rounds=3, lr=0.1, sites=["a", "b", "c" * 90]),
                                metrics([0.7, 0.8, 0.9]))
    assert data["config"] == {"lr": {"a": 0.05, "b": 0.1},
                              "sites": {"a": ["a", "b"], "b": ["a", "b", "c" * 90]}}
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    assert data["rounds"][0]["a"]["eval-accuracy"] == pytest.approx(0.55)
    assert data["rounds"][2]["a"]["eval-accuracy"] is None   # A had two rounds
    assert data["final"]["final-eval-accuracy"] == {"a": pytest.approx(0.8),
                                                    "b": pytest.approx(1.1)}
    text = run_cli.render_comparison(data, width=80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "lr" in text and "0.05" in text and "0.1" in text
    assert "  final-eval-accuracy" in text and "0.300" in text   # B - A


def test_version_line_names_the_build() -> None:
    import fedward

    line = run_cli.version_line("fedward-coordinator")
    assert line == (f"fedward-coordinator {fedward.__version__} "
                    f"(commit {fedward.code_revision()})")


# --- the site's side of a cancel ---------------------------------------------------------


def _site_trainer(root: Path, *, require_approval: bool | None = None
                  ) -> tuple[WarmTrainer, AuditLog, SiteGate | None]:
    """A site's warm trainer with no data loaded (a cancel touches none), its audit log and,
    when ``require_approval`` is given, a site gate on a policy that says so.

    Returns:
        (the trainer, its audit log, its gate or None).
    """
    from privacy import PrivacyLedger
    from site_agent.admission import SiteGate
    from site_agent.approvals import ApprovalBook
    from site_agent.audit import AuditLog
    from site_agent.config import SitePaths
    from site_agent.trainer import WarmTrainer

    from site_policy_support import write_policy

    paths = SitePaths(root)
    log = AuditLog(paths.audit_log)
    gate = None
    if require_approval is not None:
        gate = SiteGate(site_name="hospital-a",
                        policy_path=write_policy(root, require_approval=require_approval),
                        approvals=ApprovalBook(paths.approvals), audit=log)
    # The site's data check does not stop a cancel: it touches no data.
    trainer = WarmTrainer(site_name="hospital-a", task="breast_cancer_mlp", data=None,
                          ledger=PrivacyLedger(paths.ledger),
                          replies_dir=root / "replies", audit=log,
                          data_failure={"problems": []}, gate=gate)
    return trainer, log, gate


def _cancel(run: str = "7") -> dict[str, Any]:
    """The header of the coordinator's cancel message for ``run`` (alice, wrong cohort)."""
    from fedward.wire import CANCEL_BY, CANCEL_REASON, CFG

    return {"kind": "cancel", "config": {
        CFG.RUN_ID: run, CFG.PROJECT: "oncology", CFG.TASK: "breast_cancer_mlp",
        CFG.TOTAL_ROUNDS: 3, CANCEL_BY: "alice", CANCEL_REASON: "wrong cohort"}}


def _site_runs(root: Path) -> dict[str, dict[str, Any]]:
    """``fedward-site runs --dir ROOT --json``, by run id."""
    from typer.testing import CliRunner

    from site_agent.cli import app as site_app

    out = CliRunner().invoke(site_app, ["runs", "--dir", str(root), "--json"])
    assert out.exit_code == 0, out.output
    return {r["run"]: r for r in json.loads(out.output)}


def _cancel_entries(root: Path) -> list[dict[str, Any]]:
    from site_agent.audit import read_entries

    entries, verdict = read_entries(root / "audit.log")
    assert verdict.intact
    return [dict(e.detail) for e in entries if e.action == "run-cancelled"]


def test_site_audits_a_cancel_once_and_answers_with_nothing(tmp_path: Path) -> None:
    from site_agent.audit import read_entries

    trainer, log, _gate = _site_trainer(tmp_path)
    for _ in range(2):   # the message may arrive twice: one entry
        reply, out = trainer.handle(_cancel(), {})
        assert (reply, out) == ({}, {})   # passed the egress guard: nothing leaves
    entries, verdict = read_entries(log.path)
    assert verdict.intact
    assert [(e.action, e.detail) for e in entries] == [
        ("run-cancelled", {"run": "7", "project": "oncology", "by": "alice",
                           "reason": "wrong cohort"})]


def test_a_cancel_closes_a_pending_approval_and_approve_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from site_agent.admission import PendingApproval, PolicyRefusal
    from site_agent.cli import app as site_app

    trainer, _log, gate = _site_trainer(tmp_path, require_approval=True)
    assert gate is not None
    with pytest.raises(PendingApproval):
        gate.admit(run_id="7", project="oncology", task="breast_cancer_mlp", total_rounds=3)
    assert _site_runs(tmp_path)["7"]["status"] == "pending"

    assert trainer.handle(_cancel(), {}) == ({}, {})
    row = _site_runs(tmp_path)["7"]
    assert (row["status"], row["cancelled_by"], row["cancel_reason"]) == (
        "cancelled", "alice", "wrong cohort")
    assert row["cancelled_at"] and row["last_refusal"] is None and row["decision"] is None
    text = CliRunner().invoke(site_app, ["runs", "--dir", str(tmp_path)]).output
    said = " ".join(text.split())
    assert "run 7 was cancelled by alice: wrong cohort" in said, text
    assert "│ cancelled │" in text, text   # the status is never cut

    # IT cannot approve the dead run; nothing changes and nothing is audited as approved.
    before = gate.approvals.path.read_bytes()
    out = CliRunner().invoke(site_app, ["approve", "7", "--dir", str(tmp_path), "--by", "it"])
    assert out.exit_code == 1, out.output
    said = " ".join(out.output.split())
    assert "run 7 was cancelled by alice: wrong cohort" in said, said
    assert "cannot be approved" in said, said
    assert gate.approvals.path.read_bytes() == before
    assert _site_runs(tmp_path)["7"]["status"] == "cancelled"
    # A later task of the run (an evaluation of its checkpoint) does not wait for ever.
    with pytest.raises(PolicyRefusal, match=r"cancelled by alice.*cannot be approved") as err:
        gate.admit(run_id="7", project="oncology", task="breast_cancer_mlp", total_rounds=3)
    assert not isinstance(err.value, PendingApproval)
    assert _site_runs(tmp_path)["7"]["status"] == "cancelled"


def test_a_cancel_mid_training_shows_cancelled_and_keeps_the_ledger(tmp_path: Path) -> None:
    trainer, _log, gate = _site_trainer(tmp_path, require_approval=False)
    assert gate is not None
    gate.admit(run_id="7", project="oncology", task="breast_cancer_mlp", total_rounds=3)
    ledger = trainer.ledger
    ledger.open_run(run_id="7", project="oncology", epsilon_budget=3.0, delta=1e-5,
                    noise_multiplier=1.0, sample_rate=0.1)
    ledger.reserve_round(run_id="7", round_number=1, steps=5)
    ledger.complete_round(run_id="7", round_number=1)
    ledger.reserve_round(run_id="7", round_number=2, steps=5)   # round 2 under way
    running = _site_runs(tmp_path)["7"]
    assert (running["status"], running["rounds_trained"]) == ("running", 1)
    spent = ledger.raw()

    assert trainer.handle(_cancel(), {}) == ({}, {})
    row = _site_runs(tmp_path)["7"]
    assert (row["status"], row["cancelled_by"], row["cancel_reason"]) == (
        "cancelled", "alice", "wrong cohort")
    # A cancel refunds nothing: the charged round and the reserved one stay as they were.
    assert ledger.raw() == spent
    assert (row["rounds_trained"], row["epsilon_spent"]) == (
        running["rounds_trained"], running["epsilon_spent"])


def test_a_repeated_cancel_writes_once_even_after_a_restart(tmp_path: Path) -> None:
    from site_agent.admission import PendingApproval

    trainer, _log, gate = _site_trainer(tmp_path, require_approval=True)
    assert gate is not None
    with pytest.raises(PendingApproval):
        gate.admit(run_id="7", project="oncology", task="breast_cancer_mlp", total_rounds=3)
    assert trainer.handle(_cancel(), {}) == ({}, {})
    first = gate.approvals.path.read_bytes()
    assert trainer.handle(_cancel(), {}) == ({}, {})
    # A restarted agent remembers nothing in memory: the approvals file says it is done.
    restarted, _log, _gate = _site_trainer(tmp_path, require_approval=True)
    assert restarted.handle(_cancel(), {}) == ({}, {})
    assert gate.approvals.path.read_bytes() == first
    assert _cancel_entries(tmp_path) == [
        {"run": "7", "project": "oncology", "by": "alice", "reason": "wrong cohort"}]
    # A run this site never saw is audited (once) and not added to its approvals.
    for _ in range(2):
        assert trainer.handle(_cancel("8"), {}) == ({}, {})
    assert [e["run"] for e in _cancel_entries(tmp_path)] == ["7", "8"]
    assert sorted(_site_runs(tmp_path)) == ["7"]


def test_a_cancel_with_a_corrupt_approvals_file_says_so_and_loses_nothing(
        tmp_path: Path) -> None:
    trainer, _log, gate = _site_trainer(tmp_path, require_approval=True)
    assert gate is not None
    gate.approvals.path.write_text("{not json")
    for _ in range(2):
        reply, out = trainer.handle(_cancel(), {})
        assert out == {} and "cannot record it in its approvals file" in \
            reply["error"]["reason"], reply
    assert gate.approvals.path.read_text() == "{not json"   # left for IT to restore
    assert [e["run"] for e in _cancel_entries(tmp_path)] == ["7"]   # audited, once


def test_both_clis_print_their_version() -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app as coordinator_app
    from site_agent.cli import app as site_app

    for program, cli in (("fedward-coordinator", coordinator_app), ("fedward-site", site_app)):
        out = CliRunner().invoke(cli, ["--version"])
        assert out.exit_code == 0, out.output
        assert out.output.strip() == run_cli.version_line(program)


# The console scripts without --version before issue 12's follow-up: fedward-demo and the
# clinician's two, whose module must answer it without the training stack.
OTHER_CLIS = (("fedward-demo", "coordinator.demo", "cli"),
              ("fedward-verify", "export.verify_cli", "app"),
              ("fedward-serve", "export.serve", "cli"))


@pytest.mark.parametrize(("program", "module", "attr"), OTHER_CLIS)
def test_the_other_clis_print_their_version(program: str, module: str, attr: str) -> None:
    import importlib

    from typer.testing import CliRunner

    cli = getattr(importlib.import_module(module), attr)
    out = CliRunner().invoke(cli, ["--version"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == run_cli.version_line(program)
    assert "--version" in CliRunner().invoke(cli, ["--help"]).output


@pytest.mark.parametrize(("program", "module", "attr"), OTHER_CLIS[1:])
def test_the_clinicians_clis_answer_version_without_the_training_stack(
        program: str, module: str, attr: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    probe = (f"import sys\nfrom {module} import {attr} as cli\n"
             "try:\n    cli(['--version'], prog_name='x')\nexcept SystemExit as e:\n"
             "    code = e.code\n"
             "print(code, [m for m in ('torch', 'flwr', 'opacus', 'openvino') "
             "if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [run_cli.version_line(program), "0 []"]


def test_launch_needs_project_task_and_epsilon_unless_from(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app as coordinator_app

    # Nothing listens on port 9 (discard): the options are checked before any request.
    out = CliRunner().invoke(coordinator_app, ["launch", "--task", "breast_cancer_mlp",
                                               "--api", "http://127.0.0.1:9",
                                               "--home", str(tmp_path)])
    assert out.exit_code == 2
    assert "--project, --epsilon needed (or --from RUN" in out.output


# --- the run tables at 80 columns ------------------------------------------------------------

_BUDGET = ("refused-budget: run 7 needs epsilon 2.995 at this site for 3 rounds of 1 local "
           "epoch; project cardio-oncology has 1.004 left of its cap 4.000. Nothing was read, "
           "trained or charged; a smaller run (epsilon, rounds, local epochs) may fit, or the "
           "site's IT may raise the cap")
_OFFLINE = "site offline (not connected to the coordinator; waited 3.0 s)"
_RUN_FAILURE = ("round 2: too few usable updates (1 < 2); failed or late: hospital-b, "
                "hospital-c")


class _CannedApi:
    """The REST answers of a failed run and a waiting one, as `runs`, `rounds` and `watch`
    ask for them."""

    base = "http://127.0.0.1:8600"

    def __init__(self) -> None:
        self.run: dict[str, Any] = {
            "id": 7, "project": "cardio-oncology", "task": "breast_cancer_mlp",
            "status": "failed", "launched_by": "alice", "created_at": "2025-05-01T12:00:07.123",
            "failure_reason": _RUN_FAILURE, "config": {"rounds": 3}}
        waiting = {"id": 8, "project": "oncology", "task": "breast_cancer_mlp",
                   "status": "running", "launched_by": "bob",
                   "created_at": "2025-05-02T09:30:00", "failure_reason": None,
                   "waiting_for_approval": ["hospital-b", "hospital-c"],
                   "waiting_since": "2025-05-02T09:31:12"}
        self.answers: dict[str, Any] = {
            "/runs": [waiting, self.run],
            "/runs/7": self.run,
            "/runs/7/rounds": [
                {"number": 1, "status": "completed", "seconds": 12.34, "failed_sites": [
                    {"site": "hospital-c", "phase": "connect", "reason": _OFFLINE}]},
                {"number": 2, "status": "failed", "seconds": 3.2, "failed_sites": [
                    {"site": "hospital-b", "phase": "train", "reason": _BUDGET},
                    {"site": "hospital-c", "phase": "connect", "reason": _OFFLINE}]}],
            "/runs/7/metrics": {"rounds": [
                {"round": 1, "sites": {
                    "hospital-a": {"eval-auc": 0.91, "eval-accuracy": 0.85,
                                   "eval-loss": 0.34, "epsilon-spent": 0.998},
                    "hospital-b": {"eval-auc": 0.88, "eval-accuracy": 0.81,
                                   "eval-loss": 0.41, "epsilon-spent": 0.998}}},
                {"round": 2, "sites": {
                    "hospital-a": {"eval-auc": 0.92, "eval-accuracy": 0.86,
                                   "eval-loss": 0.31, "epsilon-spent": 1.996}}}]},
        }

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.answers[path]

    call_or_raise = call


@pytest.mark.parametrize("command", [["watch", "7"], ["rounds", "7"], ["runs"]])
def test_run_tables_keep_whole_words_at_80_columns(command: list[str]) -> None:
    """`watch`, `rounds` and `runs` on an 80-column terminal: no line wider, nothing cut
    with "…", and every word of every site name, status and failure reason whole."""
    import re

    import typer
    from typer.testing import CliRunner

    from coordinator.run_control_cli import add_run_control_commands, waiting_note

    api = _CannedApi()
    app = typer.Typer()
    add_run_control_commands(app, lambda *_a: api)  # type: ignore[arg-type,return-value]
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, command)
    assert result.exit_code == (2 if command[0] == "watch" else 0), result.output
    out = result.stdout
    assert max(map(len, out.splitlines())) <= 80, out
    assert "…" not in out, out
    shown = set(re.sub(r"[│┃┏┓┗┛┡┩└┘├┤┬┴┼━─╇╈┳┻]", " ", out).split())
    expected = {"failed", *_RUN_FAILURE.split()}
    if command[0] == "runs":
        expected |= {"cardio-oncology", "oncology", "breast_cancer_mlp", "running", "alice",
                     "bob", "2025-05-01", "12:00:07", *waiting_note(api.answers["/runs"][0])
                     .split()}
    else:
        expected |= {"hospital-a", "hospital-b", "hospital-c", "completed", "1/3", "2/3",
                     "12.34", "0.910", "1.996", *_BUDGET.split(), *_OFFLINE.split()}
    assert expected <= shown, sorted(expected - shown)
    print(out)
