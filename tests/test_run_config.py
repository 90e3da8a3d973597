"""The one run configuration (fedward.run_config): API, CLI, ServerApp and wire derive from it."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from coordinator.cli import app as coordinator_cli
from coordinator.launch_cli import LAUNCH_OPTION_FIELDS
from coordinator.run_schemas import RunCreate
from fedward.run_config import RunConfig, RunPlan, RunRequest, RunSettings, wire_keys
from fedward.wire import CFG


def _launch_options() -> dict[str, Any]:
    command = typer.main.get_command(coordinator_cli)
    launch = command.commands["launch"]  # type: ignore[attr-defined]
    return {p.name: p for p in launch.params}


def test_every_launch_option_has_the_run_configs_default() -> None:
    options = _launch_options()
    fields = RunRequest.model_fields
    # --aggregation-option KEY=VALUE (repeatable) gives the aggregation_options mapping.
    by_field = {LAUNCH_OPTION_FIELDS.get(name, name): opt for name, opt in options.items()}
    by_field["aggregation_options"] = by_field.pop("aggregation_option")
    assert set(fields) <= set(by_field), set(fields) - set(by_field)
    for name, info in fields.items():
        option = by_field[name]
        # No option is required by the parser: `launch --from RUN` takes the recorded run's
        # (the command itself names a missing --project/--task/--epsilon otherwise).
        assert not option.required, name
        if name == "aggregation_options":
            assert option.default is None and info.get_default(call_default_factory=True) == {}
        elif not info.is_required():
            assert option.default == info.get_default(), (name, option.default)


def test_the_api_request_is_the_run_config() -> None:
    assert issubclass(RunCreate, RunRequest)
    assert set(RunCreate.model_fields) == set(RunRequest.model_fields)
    assert RunCreate.model_fields["min_sites"].get_default() == 1
    assert RunCreate.model_fields["epsilon"].is_required()
    with pytest.raises(ValueError, match="unknown task"):
        RunCreate(project="p", task="nope", epsilon=1.0)


def test_the_wire_keys_come_from_the_run_plan_and_keep_their_spelling() -> None:
    # The spelling is the protocol with sites that may run another release: pinned.
    assert dict(wire_keys(RunPlan)) == {
        "rounds": "total-rounds", "local_epochs": "local-epochs", "epsilon": "epsilon-budget",
        "delta": "delta", "lr": "learning-rate", "batch_size": "batch-size",
        "max_grad_norm": "max-grad-norm", "seed": "seed", "study": "study",
        "study_hash": "study-hash", "statistics": "statistics",
        "statistics_epsilon": "statistics-epsilon", "model_plugin": "model-plugin",
        "model_plugin_version": "model-plugin-version",
        "model_plugin_sha256": "model-plugin-sha256", "tuning_search": "tuning-search",
        "secure_aggregation": "secure-aggregation", "secagg_threshold": "secagg-threshold",
        "secagg_clip": "secagg-clip", "run_id": "run-id", "project": "project", "task": "task-name",
        "preprocessing": "preprocessing"}
    assert (CFG.RUN_ID, CFG.TASK, CFG.EPSILON, CFG.CLIP, CFG.LR, CFG.BATCH) == (
        "run-id", "task-name", "epsilon-budget", "max-grad-norm", "learning-rate",
        "batch-size")


def test_the_serverapp_plan_is_the_stored_config_with_the_runs_identity() -> None:
    stored = RunConfig(rounds=4, epsilon=2.5, lr=0.5, batch_size=16, sites=["a-1", "b-2"])
    # Configs stored before the later settings existed still load, with their defaults.
    old = stored.model_dump(exclude={"aggregation", "approval_wait_s", "max_update_norm"})
    plan = RunPlan.model_validate({**old, "run_id": 7, "project": "onc",
                                   "task": "breast_cancer_mlp"})
    assert plan.sites == ("a-1", "b-2") and plan.aggregation == "fedavg"
    assert plan.task_config(2, train=True) == {
        "run-id": "7", "project": "onc", "task-name": "breast_cancer_mlp", "total-rounds": 4,
        "local-epochs": 1, "epsilon-budget": 2.5, "delta": 1e-5, "learning-rate": 0.5,
        "batch-size": 16, "max-grad-norm": 1.0, "seed": 0, "statistics": False,
        "secure-aggregation": False, "secagg-clip": 1.0, "round": 2, "train": True}
    assert set(RunSettings.model_fields) < set(RunPlan.model_fields)


def test_statistics_are_off_by_default_and_their_share_leaves_room_for_training() -> None:
    base = {"project": "p", "task": "breast_cancer_mlp", "epsilon": 3.0}
    assert RunRequest(**base).statistics_share() is None
    assert RunRequest(**base, statistics=True).statistics_share() == pytest.approx(0.3)
    assert RunRequest(**base, statistics=True,
                      statistics_epsilon=1.5).statistics_share() == 1.5
    with pytest.raises(ValueError, match="leaves too little of epsilon 3 for training"):
        RunRequest(**base, statistics=True, statistics_epsilon=1.6)
    with pytest.raises(ValueError, match="statistics is off"):
        RunRequest(**base, statistics_epsilon=0.2)
    # Stored and sent resolved: the site charges what the run was launched with.
    config = RunConfig(epsilon=3.0, lr=0.5, batch_size=16, sites=["a-1"], statistics=True)
    assert config.statistics_epsilon == pytest.approx(0.3)
    plan = RunPlan.model_validate({**config.model_dump(), "run_id": 1, "project": "p",
                                   "task": "breast_cancer_mlp"})
    sent = plan.task_config(0, train=False)
    assert sent[CFG.STATISTICS] is True and sent[CFG.STATISTICS_EPSILON] == pytest.approx(0.3)
