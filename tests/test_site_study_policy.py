"""A site approves a study by its content hash; a changed spec needs a new approval.

Enforced through WarmTrainer.handle with a real gate, approvals file and audit log, as in
tests/test_site_policy.py (whose fixtures, in conftest.py, this module shares).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedward.study import load_spec
from fedward.tasks import example_spec_path
from fedward.wire import CFG, SiteErrorCode
from site_agent.approvals import ApprovalBook
from site_agent.audit import AuditLog, read_entries
from site_agent.cli import app as site_cli
from site_agent.config import SitePaths
from site_agent.policy import PolicyError, SitePolicy
from site_agent.trainer import WarmTrainer

from site_policy_support import DataGuard, policy_doc, refusal, task_config, write_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = example_spec_path("breast_cancer_mlp")
HASH = load_spec(SPEC, check_dp=False).content_hash()


def study_config(round_number: int = 1, *, digest: str = HASH, ref: str = "breast_cancer_mlp@1",
                 **overrides: Any) -> dict[str, Any]:
    return task_config(round_number, **{CFG.STUDY: ref, CFG.STUDY_HASH: digest, **overrides})


def admission(**kwargs: Any) -> dict[str, Any]:
    return {"kind": "admission", "config": study_config(0, **{CFG.TRAIN: False, **kwargs})}


def approve_study(root: Path, spec: Path = SPEC, project: str = "oncology") -> Any:
    return CliRunner().invoke(site_cli, ["policy", "approve-study", str(spec), "--dir",
                                         str(root), "--project", project, "--by", "dr-it"])


def test_policy_file_checks_study_hashes() -> None:
    with pytest.raises(PolicyError) as caught:
        SitePolicy.from_dict(policy_doc(projects={
            "oncology": {"epsilon_cap": 5, "tasks": [], "studies": ["abc", HASH, HASH]},
            "cardio": {"epsilon_cap": 5, "tasks": [], "studies": "all"}}))
    assert caught.value.problems == [
        "project 'oncology': study hash 'abc' is not a SHA-256 (64 lowercase hex digits)",
        f"project 'oncology': studies listed twice: ['{HASH}']",
        "project 'cardio': studies is 'all', expected a list of study hashes (SHA-256, 64 hex "
        "digits; `fedward-site policy approve-study FILE` adds one)",
        "project 'cardio': tasks is [], expected a non-empty list of task names (known: "
        "['breast_cancer_mlp', 'digits_cnn'])",
    ]
    # A project that trains only approved studies needs no task.
    only_studies = SitePolicy.from_dict(policy_doc(projects={
        "oncology": {"epsilon_cap": 5, "tasks": [], "studies": [HASH]}}))
    assert only_studies.projects["oncology"].studies == (HASH,)
    assert SitePolicy.from_dict(only_studies.to_dict()) == only_studies


def test_an_unapproved_study_is_refused_then_trains_once_its_hash_is_approved(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    global_arrays: dict[str, np.ndarray], guard: DataGuard, tmp_path: Path,
) -> None:
    # The task is accepted, but a run of a study needs the study itself approved.
    write_policy(tmp_path)
    trainer, audit = make_trainer()
    reason = (f"refused-policy: study breast_cancer_mlp@1 (sha256 {HASH}) is not approved "
              "for project oncology at site hospital-a; its IT reviews the spec and approves "
              "it (fedward-site policy approve-study FILE --project oncology)")
    for header in (admission(), {"kind": "train", "config": study_config(1)}):
        code, got = refusal(trainer.handle(header, global_arrays)[0])
        assert (code, got) == (SiteErrorCode.REFUSED_POLICY, reason)
    assert guard.touched == 0
    record = ApprovalBook(SitePaths(tmp_path).approvals).get("run-1")
    assert record is not None and (record.study, record.study_hash) == (
        "breast_cancer_mlp@1", HASH)

    result = approve_study(tmp_path)
    assert result.exit_code == 0, result.output
    assert f"approved for project oncology by dr-it: sha256 {HASH}" in result.output
    assert SitePolicy.load(SitePaths(tmp_path).policy).projects["oncology"].studies == (HASH,)
    assert "already approved" in approve_study(tmp_path).output
    reply, _ = trainer.handle(admission(), {})
    assert reply.get("status") == {"status": "accepted"}
    guard.arm(False)
    reply, out = trainer.handle({"kind": "train", "config": study_config(1)}, global_arrays)
    assert "error" not in reply and out

    # The ML team changes the spec: a new version with another hash, not approved here.
    changed = "1" * 64
    code, got = refusal(trainer.handle(admission(**{CFG.RUN_ID: "run-2"}, digest=changed,
                                                 ref="breast_cancer_mlp@2"), {})[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert got.startswith(f"refused-policy: study breast_cancer_mlp@2 (sha256 {changed}) is "
                          "not approved for project oncology")
    # A reused run id cannot swap its study for another.
    code, got = refusal(trainer.handle(admission(digest=changed), {})[0])
    assert got == ("refused-policy: run run-1 was first seen here for project oncology, task "
                   "breast_cancer_mlp, study breast_cancer_mlp@1; a run's project, task and "
                   "study cannot change")
    entries, verdict = read_entries(audit.path)
    assert verdict.intact
    seen = [e.detail for e in entries if e.action == "run-seen"]
    assert seen[0] == {"run": "run-1", "project": "oncology", "task": "breast_cancer_mlp",
                       "total_rounds": 2, "study": "breast_cancer_mlp@1",
                       "study_hash": HASH, "approval": "refused"}
    approved = [e.detail for e in entries if e.action == "study-approved"]
    assert approved == [{"project": "oncology", "study": "breast_cancer_mlp",
                         "study_hash": HASH, "by": "dr-it"}]


def test_with_require_approval_an_unapproved_study_waits_as_pending(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    guard: DataGuard, tmp_path: Path,
) -> None:
    write_policy(tmp_path, require_approval=True)
    trainer, _ = make_trainer()
    code, got = refusal(trainer.handle(admission(), {})[0])
    assert code == SiteErrorCode.PENDING_APPROVAL
    assert got == (f"pending-approval: study breast_cancer_mlp@1 (sha256 {HASH}) is not "
                   "approved for project oncology at site hospital-a; its IT reviews the spec "
                   "and approves it (fedward-site policy approve-study FILE --project "
                   "oncology)")
    assert approve_study(tmp_path).exit_code == 0
    # The study is approved; the run itself still waits for its own approval, as any run.
    code, got = refusal(trainer.handle(admission(), {})[0])
    assert (code, got) == (SiteErrorCode.PENDING_APPROVAL,
                           "pending-approval: run run-1 waits for approval at site hospital-a "
                           "(fedward-site approve run-1)")
    assert guard.touched == 0


def test_approve_study_refuses_a_bad_spec_or_project_and_leaves_the_policy(
    tmp_path: Path,
) -> None:
    path = write_policy(tmp_path)
    before = path.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.read_text().replace("kind: binary", "kind: binary\n  extra: 1")
                   .replace("type: numeric, range: [6.981", "type: number, range: [6.981"))
    result = approve_study(tmp_path, bad)
    assert result.exit_code == 1
    assert "2 problem(s)" in result.output and "features.0: unknown type 'number'" in \
        result.output and "label.extra: Extra inputs are not permitted" in result.output
    result = approve_study(tmp_path, project="cardio")
    assert result.exit_code == 1 and "project 'cardio' is not in" in result.output
    assert path.read_text() == before
    assert json.loads(before)["projects"]["oncology"].get("studies") is None
