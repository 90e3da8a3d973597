"""Helpers for the tests of a site's policy: the policy file, a training task's
configuration, a guard that fails the test if the site's data is touched, and a refusal's
code and reason.

The fixtures these tests share (``site_data``, ``global_arrays``, ``guard``,
``make_trainer``) are in ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import site_agent.training_round as trainer_module
from fedward.wire import CFG
from site_agent.config import SitePaths

TASK = "breast_cancer_mlp"
SITE = "hospital-a"




def policy_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "projects": {"oncology": {"epsilon_cap": 10.0, "tasks": [TASK]}},
        "require_approval": False,
        "max_rounds_per_day": None,
    }
    doc.update(overrides)
    return doc


def write_policy(root: Path, **overrides: Any) -> Path:
    path = SitePaths(root).policy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy_doc(**overrides)))
    return path


def task_config(round_number: int = 1, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        CFG.RUN_ID: "run-1", CFG.PROJECT: "oncology", CFG.TASK: TASK, CFG.ROUND: round_number,
        CFG.TOTAL_ROUNDS: 2, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
        CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: True,
    }
    config.update(overrides)
    return config


class DataGuard:
    """Makes evaluation and training raise while armed, and counts attempts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.touched = 0
        self._real_evaluate = vars(trainer_module)["evaluate"]
        self._real_train = vars(trainer_module)["train_dp"]
        self._armed = True
        monkeypatch.setattr(trainer_module, "evaluate", self._evaluate)
        monkeypatch.setattr(trainer_module, "train_dp", self._train)

    def arm(self, armed: bool = True) -> None:
        self._armed = armed

    def _evaluate(self, **kwargs: Any) -> Any:
        if self._armed:
            self.touched += 1
            raise AssertionError("the site's data was evaluated")
        return self._real_evaluate(**kwargs)

    def _train(self, **kwargs: Any) -> Any:
        if self._armed:
            self.touched += 1
            raise AssertionError("the site's data was trained on")
        return self._real_train(**kwargs)


def refusal(reply: dict[str, Any]) -> tuple[int, str]:
    assert "error" in reply, reply
    return int(reply["error"]["code"]), str(reply["error"]["reason"])
