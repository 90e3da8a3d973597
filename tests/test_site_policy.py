"""The site policy, local approvals and their enforcement in the warm trainer.

Every refusal is checked through ``WarmTrainer.handle`` (the point where every task from the
coordinator arrives) with its exact reason, and with the site's data guarded: evaluation and
training raise if they are reached, so a refusal that touched the data would show up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedward.agent_versions import REPLY_VERSIONS, local_versions
from fedward.wire import CFG, SiteErrorCode
from privacy import DpSgd, PrivacyLedger, compose_mechanisms
from site_agent.admission import PolicyRefusal, SiteGate, check_rounds_per_day
from site_agent.approvals import ApprovalBook, ApprovalsError
from site_agent.audit import AuditLog, read_entries, verify_log
from site_agent.cli import app as site_cli
from site_agent.config import SitePaths
from site_agent.policy import PolicyError, PolicyMissingError, SitePolicy
from site_agent.run_status import run_statuses
from site_agent.trainer import WarmTrainer

from site_policy_support import (
    SITE,
    TASK,
    DataGuard,
    policy_doc,
    refusal,
    task_config,
    write_policy,
)

# --- policy file -------------------------------------------------------------------------


def test_valid_policy_loads(tmp_path: Path) -> None:
    path = write_policy(tmp_path, require_approval=True, max_rounds_per_day=5)
    policy = SitePolicy.load(path)
    assert set(policy.projects) == {"oncology"}
    assert policy.projects["oncology"].epsilon_cap == 10.0
    assert policy.projects["oncology"].tasks == (TASK,)
    assert policy.require_approval is True and policy.max_rounds_per_day == 5


def test_policy_reports_every_problem_at_once() -> None:
    raw = {
        "version": 2,
        "projects": {
            "oncology": {"epsilon_cap": 0, "tasks": ["no-such-task", TASK, TASK],
                         "colour": "red"},
            "cardiology": {"epsilon_cap": float("inf"), "tasks": []},
            "radiology": "yes",
        },
        "require_approval": "no",
        "max_rounds_per_day": 0,
        "site_epsilon_cap": -1,
        "allow_everything": True,
    }
    with pytest.raises(PolicyError) as info:
        SitePolicy.from_dict(raw, source="policy.json")
    problems = info.value.problems
    assert problems == [
        "unknown keys ['allow_everything'] (known: ['version', 'projects', "
        "'require_approval', 'max_rounds_per_day', 'site_epsilon_cap', 'drift', 'plugins', "
        "'local_baselines'])",
        "version is 2, expected 1",
        "require_approval is 'no', expected true or false",
        "max_rounds_per_day is 0, expected an integer >= 1 or null",
        "site_epsilon_cap is -1, expected a number > 0 or null",
        "project 'oncology': unknown keys ['colour'] (known: ['epsilon_cap', 'tasks', 'studies'])",
        "project 'oncology': epsilon_cap is 0, expected a number > 0",
        "project 'oncology': task 'no-such-task' is not a registry task (known: "
        "['breast_cancer_mlp', 'digits_cnn'])",
        "project 'oncology': tasks listed twice: ['breast_cancer_mlp']",
        "project 'cardiology': epsilon_cap is inf, expected a number > 0",
        "project 'cardiology': tasks is [], expected a non-empty list of task names "
        "(known: ['breast_cancer_mlp', 'digits_cnn'])",
        "project 'radiology' must be an object with epsilon_cap and tasks",
    ]
    text = str(info.value)
    assert text.startswith("policy.json is invalid; until it is fixed this site refuses")
    assert text.count("\n  - ") == len(problems)


def test_policy_requires_its_keys_and_an_object() -> None:
    with pytest.raises(PolicyError) as info:
        SitePolicy.from_dict({"max_rounds_per_day": None})
    assert info.value.problems == [
        "required keys missing: ['version', 'projects', 'require_approval']"]
    with pytest.raises(PolicyError, match="must hold one JSON object"):
        SitePolicy.from_dict([1, 2])
    with pytest.raises(PolicyError, match="require_approval is 1"):
        SitePolicy.from_dict(policy_doc(require_approval=1))
    with pytest.raises(PolicyError, match="max_rounds_per_day is True"):
        SitePolicy.from_dict(policy_doc(max_rounds_per_day=True))


def test_missing_and_broken_policy_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PolicyMissingError, match=r"refuses every run until hospital IT "
                       r"writes one \(`fedward-site policy init"):
        SitePolicy.load(tmp_path / "policy.json")
    (tmp_path / "policy.json").write_text("{not json")
    with pytest.raises(PolicyError, match="is not valid JSON") as info:
        SitePolicy.load(tmp_path / "policy.json")
    assert not isinstance(info.value, PolicyMissingError)


def test_starter_policy_round_trips(tmp_path: Path) -> None:
    starter = SitePolicy.starter(project="default", task=TASK)
    starter.save(tmp_path / "policy.json")
    loaded = SitePolicy.load(tmp_path / "policy.json")
    assert loaded == starter
    assert loaded.to_dict() == {
        "version": 1, "projects": {"default": {"epsilon_cap": 10.0, "tasks": [TASK]}},
        "require_approval": False, "max_rounds_per_day": None, "site_epsilon_cap": None,
    }


# --- enforcement through WarmTrainer.handle ---------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(round_number: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"kind": "train", "config": task_config(round_number, **overrides)}


def actions(audit: AuditLog) -> list[str]:
    entries, verdict = read_entries(audit.path)
    assert verdict.intact, verdict
    return [e.action for e in entries]


def test_without_a_policy_file_every_task_is_refused(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    trainer, audit = make_trainer()
    for header in (train(1), {"kind": "evaluate", "config": task_config()}):
        reply, out = trainer.handle(header, global_arrays)
        code, reason = refusal(reply)
        assert code == SiteErrorCode.REFUSED_POLICY == 703 and out == {}
        assert reason == ("refused-policy: site hospital-a has no site policy yet; its IT must "
                          "write policy.json before it accepts any run "
                          "(fedward-site policy init)")
    assert guard.touched == 0
    assert not (tmp_path / "privacy-ledger.sqlite").exists()
    assert actions(audit) == ["policy-missing", "run-seen", "task-refused", "task-refused"]


def test_an_invalid_edit_refuses_tasks_and_never_falls_back(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path)
    trainer, _ = make_trainer()
    guard.arm(False)
    reply, _ = trainer.handle(train(1), global_arrays)
    assert "error" not in reply
    # IT edits the file while the agent runs; the edit has a typo.
    write_policy(tmp_path, require_aproval=True)
    guard.arm(True)
    code, reason = refusal(trainer.handle(train(2), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason == ("refused-policy: the site policy of hospital-a is invalid; its IT runs "
                      "`fedward-site policy check` to see and fix it")
    assert guard.touched == 0


def test_project_not_in_the_policy_is_refused_before_any_data(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path)
    trainer, audit = make_trainer()
    reply, out = trainer.handle(train(1, **{CFG.PROJECT: "cardiology"}), global_arrays)
    code, reason = refusal(reply)
    assert code == SiteErrorCode.REFUSED_POLICY and out == {}
    assert reason == "refused-policy: project cardiology is not accepted by this site"
    assert guard.touched == 0
    assert not (tmp_path / "privacy-ledger.sqlite").exists()
    entries, _ = read_entries(audit.path)
    seen = next(e for e in entries if e.action == "run-seen")
    assert seen.detail == {"run": "run-1", "project": "cardiology", "task": TASK,
                           "total_rounds": 2, "approval": "refused"}


def test_task_not_accepted_for_the_project_is_refused(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, projects={"oncology": {"epsilon_cap": 5, "tasks": ["digits_cnn"]}})
    trainer, _ = make_trainer()
    code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason == ("refused-policy: task breast_cancer_mlp is not accepted for project "
                      "oncology by this site")
    assert guard.touched == 0


def test_pending_run_waits_then_trains_once_approved(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True)
    trainer, audit = make_trainer()
    for _ in range(2):  # asked again: still waiting, still recorded once
        code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
        # Waiting is not a refusal: a code of its own, which the coordinator shows as such.
        assert code == SiteErrorCode.PENDING_APPROVAL == 708
        assert reason == ("pending-approval: run run-1 waits for approval at site hospital-a "
                          "(fedward-site approve run-1)")
    assert guard.touched == 0
    assert not (tmp_path / "privacy-ledger.sqlite").exists()
    book = ApprovalBook(SitePaths(tmp_path).approvals)
    record = book.get("run-1")
    assert record is not None and record.decision is None
    assert run_statuses(book, PrivacyLedger(tmp_path / "privacy-ledger.sqlite"))[0].status == \
        "pending"

    result = CliRunner().invoke(site_cli, ["approve", "run-1", "--dir", str(tmp_path),
                                           "--by", "dr-it"])
    assert result.exit_code == 0, result.output
    assert "approved by dr-it" in result.output

    guard.arm(False)
    reply, out = trainer.handle(train(1), global_arrays)
    assert "error" not in reply and out
    assert reply["metrics"]["epsilon-spent"] > 0
    statuses = run_statuses(book, PrivacyLedger(tmp_path / "privacy-ledger.sqlite"))
    assert [(s.status, s.rounds_trained, s.record.by) for s in statuses] == \
        [("running", 1, "dr-it")]
    assert actions(audit) == ["policy-loaded", "run-seen", "task-refused", "task-refused",
                              "run-approved", "round-reserved", "round-trained"]
    assert verify_log(audit.path) is None


def admission(**overrides: Any) -> dict[str, Any]:
    return {"kind": "admission", "config": task_config(0, **{CFG.TRAIN: False, **overrides})}


def test_admission_is_answered_from_the_policy_alone_and_recorded_once_per_answer(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True)
    trainer, audit = make_trainer()
    for _ in range(3):  # the coordinator asks a waiting site again every few seconds
        reply, out = trainer.handle(admission(), {})
        code, reason = refusal(reply)
        assert code == SiteErrorCode.PENDING_APPROVAL and out == {}
        assert reason == ("pending-approval: run run-1 waits for approval at site hospital-a "
                          "(fedward-site approve run-1)")
    book = ApprovalBook(SitePaths(tmp_path).approvals)
    assert run_statuses(book, PrivacyLedger(tmp_path / "privacy-ledger.sqlite"))[0].status == \
        "pending"
    result = CliRunner().invoke(site_cli, ["approve", "run-1", "--dir", str(tmp_path),
                                           "--by", "dr-it"])
    assert result.exit_code == 0, result.output
    for _ in range(2):
        reply, out = trainer.handle(admission(), {})
        # The acceptance carries the agent's versions (and nothing else).
        assert reply == {"status": {"status": "accepted"},
                         REPLY_VERSIONS: local_versions()} and out == {}
    # Nothing was read, trained or charged: the answer comes from the policy check only.
    assert guard.touched == 0
    assert not (tmp_path / "privacy-ledger.sqlite").exists()
    assert run_statuses(book, PrivacyLedger(tmp_path / "privacy-ledger.sqlite"))[0].status == \
        "approved"
    assert actions(audit) == ["policy-loaded", "run-seen", "task-refused", "run-approved",
                              "admission-accepted"]
    entries, _ = read_entries(audit.path)
    assert entries[2].detail == {
        "run": "run-1", "round": 0, "kind": "admission", "code": 708,
        "reason": "pending-approval: run run-1 waits for approval at site hospital-a "
                  "(fedward-site approve run-1)"}


def test_admission_of_a_denied_or_unaccepted_run_is_a_refusal(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True)
    trainer, _ = make_trainer()
    refusal(trainer.handle(admission(), {})[0])
    result = CliRunner().invoke(site_cli, ["deny", "run-1", "--dir", str(tmp_path),
                                           "--reason", "no ethics approval"])
    assert result.exit_code == 0, result.output
    code, reason = refusal(trainer.handle(admission(), {})[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason == "refused-policy: run run-1 was denied at this site"
    code, reason = refusal(trainer.handle(admission(**{CFG.RUN_ID: "run-2",
                                                        CFG.PROJECT: "cardiology"}), {})[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason == "refused-policy: project cardiology is not accepted by this site"
    assert guard.touched == 0


def test_denied_run_is_refused_for_training_and_evaluation(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True)
    trainer, audit = make_trainer()
    refusal(trainer.handle(train(1), global_arrays)[0])
    result = CliRunner().invoke(site_cli, ["deny", "run-1", "--dir", str(tmp_path),
                                           "--reason", "not in our ethics approval",
                                           "--by", "dr-it"])
    assert result.exit_code == 0, result.output
    for header in (train(1), {"kind": "evaluate", "config": task_config()}):
        code, reason = refusal(trainer.handle(header, global_arrays)[0])
        assert code == SiteErrorCode.REFUSED_POLICY
        assert reason == "refused-policy: run run-1 was denied at this site"
    assert guard.touched == 0
    # A denial holds even if IT later drops the approval requirement.
    write_policy(tmp_path, require_approval=False)
    code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
    assert reason == "refused-policy: run run-1 was denied at this site"
    entries, _ = read_entries(audit.path)
    denied = [e for e in entries if e.action == "run-denied"]
    assert [e.detail for e in denied] == [{
        "run": "run-1", "project": "oncology", "task": TASK, "by": "dr-it",
        "previous": None, "reason": "not in our ethics approval"}]
    statuses = run_statuses(ApprovalBook(SitePaths(tmp_path).approvals),
                            PrivacyLedger(tmp_path / "privacy-ledger.sqlite"))
    assert statuses[0].status == "denied"


def test_a_reused_run_id_with_another_project_does_not_inherit_the_approval(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True, projects={
        "oncology": {"epsilon_cap": 10, "tasks": [TASK]},
        "cardiology": {"epsilon_cap": 10, "tasks": [TASK]}})
    trainer, _ = make_trainer()
    refusal(trainer.handle(train(1), global_arrays)[0])
    ApprovalBook(SitePaths(tmp_path).approvals).decide("run-1", "approved", by="dr-it")
    code, reason = refusal(
        trainer.handle(train(1, **{CFG.PROJECT: "cardiology"}), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason == ("refused-policy: run run-1 was first seen here for project oncology, "
                      "task breast_cancer_mlp; a run's project and task cannot change")
    assert guard.touched == 0


def test_approving_a_run_never_seen_is_refused(tmp_path: Path) -> None:
    book = ApprovalBook(tmp_path / "approvals.json")
    with pytest.raises(ApprovalsError, match=r"run 'run-9' has not been seen at this site "
                       r"\(runs seen: none yet\)"):
        book.decide("run-9", "approved", by="x")
    result = CliRunner().invoke(site_cli, ["approve", "run-9", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert not (tmp_path / "approvals.json").exists()


def test_damaged_approvals_file_refuses_tasks(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path)
    (tmp_path / "approvals.json").write_text('{"version": 1, "runs": [')
    trainer, _ = make_trainer()
    code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason.startswith("refused-policy: the site cannot read its approvals file")
    assert guard.touched == 0


def test_max_rounds_per_day_refuses_the_round_over_the_limit(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, max_rounds_per_day=1)
    trainer, _ = make_trainer()
    guard.arm(False)
    reply, out1 = trainer.handle(train(1), global_arrays)
    assert "error" not in reply
    # The same round again is a replay: no training, not counted, still answered.
    again, _ = trainer.handle(train(1), global_arrays)
    assert again == reply
    guard.arm(True)
    code, reason = refusal(trainer.handle(train(2), out1)[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert reason.startswith("refused-policy: this site trains at most 1 round(s) per 24 "
                             "hours and has trained 1; the next round can train in 2")
    assert guard.touched == 0
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    assert len(ledger.history("run-1")) == 1
    # A day later the window has moved on.
    check_rounds_per_day(ledger, limit=1, run_id="run-1", round_number=2,
                         now=datetime.now(UTC) + timedelta(hours=24, minutes=1))


def test_project_cap_composes_the_runs_of_a_project(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path)  # cap 10: both runs are admitted and train their first round
    trainer, audit = make_trainer()
    guard.arm(False)
    reply1, out1 = trainer.handle(train(1), global_arrays)
    assert "error" not in reply1
    assert "error" not in trainer.handle(train(1, **{CFG.RUN_ID: "run-2"}), global_arrays)[0]
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    one_round = ledger.history("run-1")
    assert len(one_round) == 1
    two_rounds = compose_mechanisms([DpSgd(*h) for h in one_round * 2], delta=1e-5).epsilon
    three_rounds = compose_mechanisms([DpSgd(*h) for h in one_round * 3], delta=1e-5).epsilon
    # IT lowers the cap mid-run: run-1's round 2 alone fits (two rounds), but not composed
    # with run-2's round (three rounds), so the per-round check refuses it.
    cap = (two_rounds + three_rounds) / 2
    write_policy(tmp_path, projects={"oncology": {"epsilon_cap": cap, "tasks": [TASK]}})
    guard.arm(True)
    before = ledger.history("run-1")
    reply2, out2 = trainer.handle(train(2), out1)
    code, reason = refusal(reply2)
    assert code == SiteErrorCode.REFUSED_BUDGET == 701 and out2 == {}
    assert reason.startswith("refused-budget: privacy budget exceeded: this round would "
                             "bring the project's epsilon from")
    assert f"over its budget of {cap:.4f}" in reason
    assert ledger.history("run-1") == before
    assert two_rounds < cap   # the run alone fits: the refusal came from the composition
    # Another project at the same site is not charged with oncology's epsilon.
    write_policy(tmp_path, projects={
        "oncology": {"epsilon_cap": cap, "tasks": [TASK]},
        "cardiology": {"epsilon_cap": 10.0, "tasks": [TASK]}})
    guard.arm(False)
    reply3, _ = trainer.handle(train(1, **{CFG.RUN_ID: "run-3", CFG.PROJECT: "cardiology"}),
                               global_arrays)
    assert "error" not in reply3
    assert verify_log(audit.path) is None


def test_the_smaller_of_the_agent_cap_and_the_policy_cap_applies(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, projects={"oncology": {"epsilon_cap": 0.01, "tasks": [TASK]}})
    trainer, _ = make_trainer(epsilon_cap=100.0)
    code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_BUDGET and "over the 0.010 this site" in reason
    write_policy(tmp_path)  # policy cap 10
    trainer, _ = make_trainer(epsilon_cap=0.02)
    code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_BUDGET and "over the 0.020 this site" in reason
    assert guard.touched == 0
    assert PrivacyLedger(tmp_path / "privacy-ledger.sqlite").get_run("run-1") is None


def test_the_coordinator_never_writes_the_policy(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    path = write_policy(tmp_path, require_approval=True)
    before = path.read_bytes()
    trainer, _ = make_trainer()
    hostile = train(1, **{"require_approval": False, "projects": {}})
    refusal(trainer.handle(hostile, global_arrays)[0])
    assert path.read_bytes() == before


def test_policy_changes_are_audited_once_each(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True)
    trainer, audit = make_trainer()
    trainer.handle(train(1), global_arrays)
    trainer.handle(train(1), global_arrays)
    write_policy(tmp_path, require_approval=True, max_rounds_per_day=3)
    trainer.handle(train(1), global_arrays)
    entries, _ = read_entries(audit.path)
    loaded = [e.detail for e in entries if e.action == "policy-loaded"]
    assert [d["max_rounds_per_day"] for d in loaded] == [None, 3]
    assert loaded[0]["projects"] == ["oncology"] and loaded[0]["require_approval"] is True


# --- runs view and CLI -------------------------------------------------------------------


def test_run_statuses_cover_every_state(tmp_path: Path) -> None:
    write_policy(tmp_path, require_approval=True)
    paths = SitePaths(tmp_path)
    gate = SiteGate(site_name=SITE, policy_path=paths.policy,
                    approvals=ApprovalBook(paths.approvals))
    ledger = PrivacyLedger(paths.ledger)

    def seen(run: str, project: str = "oncology") -> None:
        with pytest.raises(PolicyRefusal):
            gate.admit(run_id=run, project=project, task=TASK, total_rounds=1)

    for run in ("r-pending", "r-approved", "r-denied", "r-done"):
        seen(run)
    seen("r-refused", project="cardiology")
    book = ApprovalBook(paths.approvals)
    book.decide("r-approved", "approved", by="a")
    book.decide("r-denied", "denied", by="a", reason="no")
    book.decide("r-done", "approved", by="a")
    ledger.open_run(run_id="r-done", project="oncology", epsilon_budget=3.0, delta=1e-5,
                    noise_multiplier=1.0, sample_rate=0.1)
    ledger.reserve_round(run_id="r-done", round_number=1, steps=5)
    ledger.complete_round(run_id="r-done", round_number=1)
    statuses = {s.record.run: s for s in run_statuses(book, ledger)}
    assert {r: s.status for r, s in statuses.items()} == {
        "r-pending": "pending", "r-approved": "approved", "r-denied": "denied",
        "r-done": "done", "r-refused": "refused"}
    assert statuses["r-done"].epsilon_spent > 0

    result = CliRunner().invoke(site_cli, ["runs", "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads(result.output)}
    assert rows["r-denied"]["reason"] == "no" and rows["r-done"]["rounds_trained"] == 1
    assert rows["r-refused"]["last_refusal"] == \
        "refused-policy: project cardiology is not accepted by this site"


def test_policy_cli_writes_a_starter_and_checks_it(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(site_cli, ["policy", "init", "--dir", str(tmp_path), "--project",
                                      "oncology", "--task", TASK, "--require-approval"])
    assert result.exit_code == 0, result.output
    policy = SitePolicy.load(tmp_path / "policy.json")
    assert policy.require_approval and set(policy.projects) == {"oncology"}
    again = runner.invoke(site_cli, ["policy", "init", "--dir", str(tmp_path), "--task", TASK])
    assert again.exit_code == 1 and "exists" in again.output
    ok = runner.invoke(site_cli, ["policy", "check", "--dir", str(tmp_path), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["policy"]["require_approval"] is True
    write_policy(tmp_path, colour="blue", version=3)
    bad = runner.invoke(site_cli, ["policy", "check", "--dir", str(tmp_path), "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.output)["problems"] == [
        "unknown keys ['colour'] (known: ['version', 'projects', 'require_approval', "
        "'max_rounds_per_day', 'site_epsilon_cap', 'drift', 'plugins', 'local_baselines'])",
        "version is 3, expected 1"]
