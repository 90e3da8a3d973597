"""The site's local-only DP baseline in an evaluation on demand (site_agent.local_baseline):
only where the policy allows it, charged to the ledger before it trains, once per run, and
the federated and local-only figures side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedward.wire import ALLOWED_REPLY_METRICS, CFG, SiteErrorCode
from privacy import PrivacyLedger
from site_agent import local_baseline
from site_agent.config import SitePaths
from site_agent.policy import PolicyError, SitePolicy
from site_agent.trainer import WarmTrainer

from site_policy_support import policy_doc, task_config, write_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TrainerFactory = Callable[..., tuple[WarmTrainer, Any]]
FIGURES = {"eval-balanced-accuracy", "eval-brier", "local-only-accuracy", "local-only-auc",
           "local-only-balanced-accuracy", "local-only-brier", "local-only-epsilon"}


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every local-only training started (none is, while this fixture is in use)."""
    calls: list[object] = []
    monkeypatch.setattr(local_baseline, "train_local_only",
                        lambda **kwargs: calls.append(kwargs))
    return calls


def _ask(trainer: WarmTrainer, arrays: dict[str, np.ndarray], evaluation: int
         ) -> dict[str, Any]:
    config = task_config(2, **{CFG.TRAIN: False, CFG.LOCAL_ONLY: evaluation})
    reply, out = trainer.handle({"kind": "evaluate", "config": config}, arrays)
    assert out == {}   # no model leaves, the local one least of all
    return reply


def _entries(root: Path) -> list[Any]:
    path = SitePaths(root).ledger
    return PrivacyLedger(path).entries() if path.exists() else []


def test_a_site_whose_policy_does_not_allow_it_refuses_and_charges_nothing(
        make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
        tmp_path: Path, trained: list[object]) -> None:
    write_policy(tmp_path)
    trainer, _audit = make_trainer()
    reply = _ask(trainer, global_arrays, 5)
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_POLICY, reply
    assert "local_baselines" in reply["error"]["reason"]
    assert _entries(tmp_path) == [] and trained == []


def test_the_baseline_is_charged_trained_once_and_reported_beside_the_federated_figures(
        make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
        tmp_path: Path) -> None:
    write_policy(tmp_path, local_baselines=True)
    trainer, _audit = make_trainer()
    reply = _ask(trainer, global_arrays, 5)
    metrics = reply["metrics"]
    assert FIGURES <= set(metrics) <= ALLOWED_REPLY_METRICS, reply
    for name in ("local-only-accuracy", "local-only-auc", "local-only-balanced-accuracy",
                 "eval-balanced-accuracy"):
        assert 0.0 <= metrics[name] <= 1.0
    assert 0.0 <= metrics["local-only-brier"] <= 2.0 and 0.0 <= metrics["eval-brier"] <= 2.0
    # The ledger holds one charged baseline entry under the run's project, within the run's
    # epsilon (3), and the site reported the ledger's own figure.
    (entry,) = _entries(tmp_path)
    assert (entry.run_id, entry.purpose, entry.key, entry.state) == (
        "local-only-run-1", "baseline", "5", "charged")
    ledger = PrivacyLedger(SitePaths(tmp_path).ledger)
    spent = ledger.epsilon_spent("local-only-run-1")
    assert 2.5 < spent <= 3.0 * (1 + 1e-6)
    assert metrics["local-only-epsilon"] == pytest.approx(spent, rel=1e-9)
    assert ledger.project_epsilon("oncology") == pytest.approx(spent, rel=1e-9)
    # Once per run: a second evaluation asking for it is refused and charges nothing more.
    again = _ask(trainer, global_arrays, 6)
    assert again["error"]["code"] == SiteErrorCode.REFUSED_POLICY, again
    assert "trained at this site already (evaluation 5)" in again["error"]["reason"]
    assert len(_entries(tmp_path)) == 1
    # An evaluation without it still answers, with the usual figures only.
    plain, _ = trainer.handle({"kind": "evaluate",
                               "config": task_config(2, **{CFG.TRAIN: False})}, global_arrays)
    assert "eval-auc" in plain["metrics"] and not FIGURES & set(plain["metrics"])


def test_a_baseline_beyond_the_projects_cap_is_refused_before_it_trains(
        make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
        tmp_path: Path, trained: list[object]) -> None:
    write_policy(tmp_path, local_baselines=True,
                 projects={"oncology": {"epsilon_cap": 1.0, "tasks": ["breast_cancer_mlp"]}})
    trainer, _audit = make_trainer()
    reply = _ask(trainer, global_arrays, 5)
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_BUDGET, reply
    assert "local-only baseline" in reply["error"]["reason"]
    assert _entries(tmp_path) == [] and trained == []


def test_the_policy_key_is_a_boolean_and_is_written_only_when_on() -> None:
    with pytest.raises(PolicyError, match="local_baselines is 'yes', expected true or false"):
        SitePolicy.from_dict(policy_doc(local_baselines="yes"))
    assert SitePolicy.from_dict(policy_doc(local_baselines=True)).local_baselines
    off = SitePolicy.from_dict(policy_doc())
    assert not off.local_baselines and "local_baselines" not in off.to_dict()
    assert SitePolicy.from_dict(policy_doc(local_baselines=True)).to_dict()[
        "local_baselines"] is True
