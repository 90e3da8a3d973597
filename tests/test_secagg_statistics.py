"""Secure aggregation with a statistics phase: one budget per run at each site. The
release comes first; the secure rounds' Skellam noise is sized for what it leaves, at
admission (planned) and at the mask stage (charged) alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedward.agent_versions import REPLY_VERSIONS, local_versions
from fedward.run_config import RunRequest
from fedward.wire import CFG, SiteErrorCode
from privacy import PrivacyLedger
from privacy.accounting import compose_mechanisms
from privacy.distributed import DistributedPlan, mechanism, noise_multiplier_for
from privacy.mechanisms import GaussianRelease
from site_agent.data import SiteData
from site_agent.trainer import WarmTrainer

TASK = "breast_cancer_mlp"
DIM = 266          # the breast-cancer MLP's parameters
STATS = GaussianRelease(noise_std=12.0, l2_sensitivity=2.0, count=1)


def _config(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        CFG.RUN_ID: "run-sec", CFG.PROJECT: "oncology", CFG.TASK: TASK, CFG.ROUND: 0,
        CFG.TOTAL_ROUNDS: 3, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
        CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: False,
        CFG.SECURE: True, CFG.SECAGG_THRESHOLD: 2,
        CFG.STATISTICS: True, CFG.STATISTICS_EPSILON: 0.3,
    }
    out.update(overrides)
    return out


def test_secure_aggregation_and_statistics_launch_together() -> None:
    request = RunRequest.model_validate({"project": "p", "task": TASK, "epsilon": 3.0,
                                         "secure_aggregation": True, "statistics": True})
    assert request.secure_aggregation and request.statistics


def test_the_rounds_get_what_the_statistics_leave_and_no_more() -> None:
    alone = noise_multiplier_for(epsilon=3.0, delta=1e-5, rounds=5, dim=DIM, threshold=2)
    after = noise_multiplier_for(epsilon=3.0, delta=1e-5, rounds=5, dim=DIM, threshold=2,
                                 prior=(STATS,))
    assert after > alone

    def epsilon(z: float) -> float:
        plan = DistributedPlan(clip=1.0, dim=DIM, threshold=2, noise_multiplier=z)
        return compose_mechanisms([STATS, mechanism(plan, 5)], delta=1e-5).epsilon

    assert epsilon(after) <= 3.0                  # within the one budget
    assert epsilon(after / 1.01) > 3.0            # and the least noise that is
    with pytest.raises(ValueError, match="nothing is left for training"):
        noise_multiplier_for(epsilon=0.05, delta=1e-5, rounds=5, dim=DIM, threshold=2,
                             prior=(STATS,))


def test_admission_plans_the_statistics_with_the_secure_rounds(
        tmp_path: Path, site_data: SiteData) -> None:
    tight = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                        ledger=PrivacyLedger(tmp_path / "l.sqlite"),
                        replies_dir=tmp_path / "replies", epsilon_cap=2.0)
    reply, _ = tight.handle({"kind": "admission", "config": _config()}, {})
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_BUDGET, reply
    assert "secure-aggregation round(s) at threshold 2 after the run's statistics" in \
        reply["error"]["reason"]
    ok = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                     ledger=PrivacyLedger(tmp_path / "l2.sqlite"),
                     replies_dir=tmp_path / "replies2")
    assert ok.handle({"kind": "admission", "config": _config()}, {})[0] == {
        "status": {"status": "accepted"}, REPLY_VERSIONS: local_versions()}
    assert PrivacyLedger(tmp_path / "l2.sqlite").entries() == []


def test_statistics_after_a_secure_round_are_refused(
        tmp_path: Path, site_data: SiteData) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.open_run(run_id="run-sec", project="oncology", epsilon_budget=3.0, delta=1e-5)
    plan = DistributedPlan(clip=1.0, dim=DIM, threshold=2, noise_multiplier=5.0)
    ledger.reserve(run_id="run-sec", purpose="round", key="1", mechanism=mechanism(plan))
    run = ledger.get_run("run-sec")
    assert run is not None and run.trains and run.noise_multiplier is None
    trainer = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data, ledger=ledger,
                          replies_dir=tmp_path / "replies")
    reply, out = trainer.handle({"kind": "statistics", "config": _config()}, {})
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_POLICY and out == {}, reply
    assert "trains at this site already" in reply["error"]["reason"]
