"""Aggregation strategies: the server optimisers' steps against hand-computed values, the
registry and its entry-point plugins, and optimiser state that survives a resumed run."""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from sqlalchemy import Engine

from coordinator import aggregation
from coordinator.aggregation import (
    AggregationError,
    FedAvg,
    SiteUpdate,
    aggregator_class,
    known_aggregations,
    make_aggregator,
    register_aggregator,
    reload_plugins,
    validate_options,
)
from coordinator.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_server_state,
    save_checkpoint,
    server_state_path,
)
from coordinator.round_records import last_checkpoint, record_checkpoint
from fedward.models import set_model_arrays
from fedward.tasks import build_model

from federation import federation
from tests_support import short_tmp

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"'click\.utils\.get_\w+_stream' is deprecated",
                            category=DeprecationWarning)
    from coordinator.round_loop import RoundLoop
    from fedward.run_config import RunPlan

from grid_support import PlanFactory, SiteGrid, arrays_of, good_site, rounds_of, run_row

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def engine(grid_engine: Engine) -> Engine:
    """This module's database: the Grid's, its sites registered (``grid_engine``)."""
    return grid_engine


BUILTIN = ["fedavg", "median", "trimmed-mean", "fedavgm", "fedadam", "fedyogi"]


def step(agg: aggregation.Aggregator, global_w: list[float],
         sites: list[tuple[list[float], float]]) -> list[float]:
    """One round on a one-array model: each site sends ``global + change`` with a weight."""
    g = {"w": np.array(global_w, np.float32)}
    ups = [SiteUpdate(f"s{i}", {"w": g["w"] + np.array(c, np.float32)}, w)
           for i, (c, w) in enumerate(sites)]
    out = agg.aggregate(g, ups)
    assert out["w"].dtype == np.float32 and out["w"].shape == g["w"].shape
    return [float(v) for v in out["w"]]


# --- each optimiser's update rule, by hand ----------------------------------------------------


def test_fedavgm_steps_match_a_hand_computed_momentum_sequence() -> None:
    agg = make_aggregator("fedavgm", {"server_lr": 0.8, "momentum": 0.5})
    # Round 1: Delta = (1 * [1, 2] + 3 * [3, -2]) / 4 = [2.5, -1]; v = Delta;
    # x = [0, 1] + 0.8 v = [2, 0.2].
    x1 = step(agg, [0.0, 1.0], [([1.0, 2.0], 1.0), ([3.0, -2.0], 3.0)])
    np.testing.assert_allclose(x1, [2.0, 0.2], rtol=1e-6)
    # Round 2: Delta = [1, 0]; v = 0.5 [2.5, -1] + [1, 0] = [2.25, -0.5]; x = [3.8, -0.2].
    x2 = step(agg, x1, [([1.0, 0.0], 1.0), ([1.0, 0.0], 3.0)])
    np.testing.assert_allclose(x2, [3.8, -0.2], rtol=1e-6)
    # Round 3: the sites change nothing, the momentum still moves the model:
    # v = [1.125, -0.25]; x = [4.7, -0.4].
    x3 = step(agg, x2, [([0.0, 0.0], 1.0)])
    np.testing.assert_allclose(x3, [4.7, -0.4], rtol=1e-6)


ADAPTIVE = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}


def test_fedadam_steps_match_hand_computed_values() -> None:
    agg = make_aggregator("fedadam", ADAPTIVE)
    # Round 1: Delta = [2, -1]; m = [1, -0.5]; v = 0.25 [4, 1] = [1, 0.25];
    # x = m / (sqrt(v) + tau) = [1 / 1.5, -0.5 / 1] = [2/3, -0.5].
    x1 = step(agg, [0.0, 0.0], [([1.0, -1.0], 1.0), ([3.0, -1.0], 1.0)])
    np.testing.assert_allclose(x1, [2 / 3, -0.5], rtol=1e-6)
    # Round 2: Delta = [0, 1]; m = [0.5, 0.25]; v = 0.75 [1, 0.25] + 0.25 [0, 1]
    # = [0.75, 0.4375]; x += [0.5 / (sqrt(0.75) + 0.5), 0.25 / (sqrt(0.4375) + 0.5)].
    x2 = step(agg, x1, [([0.0, 1.0], 5.0)])
    np.testing.assert_allclose(x2, [2 / 3 + 0.5 / (0.75 ** 0.5 + 0.5),
                                    -0.5 + 0.25 / (0.4375 ** 0.5 + 0.5)], rtol=1e-6)
    np.testing.assert_allclose(x2, [1.0326921, -0.2847496], rtol=1e-6)


def test_fedyogi_keeps_its_second_moment_where_adam_lets_it_decay() -> None:
    agg = make_aggregator("fedyogi", ADAPTIVE)
    # Round 1 as FedAdam: v = 0 - 0.25 [4, 1] sign([-4, -1]) = [1, 0.25].
    x1 = step(agg, [0.0, 0.0], [([2.0, -1.0], 1.0)])
    np.testing.assert_allclose(x1, [2 / 3, -0.5], rtol=1e-6)
    # Round 2: Delta^2 = [0, 1]; v = [1 - 0, 0.25 + 0.25] = [1, 0.5] (Adam: [0.75, 0.4375]);
    # x += [0.5 / 1.5, 0.25 / (sqrt(0.5) + 0.5)].
    x2 = step(agg, x1, [([0.0, 1.0], 1.0)])
    np.testing.assert_allclose(x2, [1.0, -0.5 + 0.25 / (0.5 ** 0.5 + 0.5)], rtol=1e-6)
    state = agg.state_dict()
    np.testing.assert_allclose(state["v/w"], [1.0, 0.5])
    np.testing.assert_allclose(state["m/w"], [0.5, 0.25])
    assert int(state["step"][0]) == 2


def test_fedadam_bias_correction_divides_the_moments_as_adam_does() -> None:
    agg = make_aggregator("fedadam", {**ADAPTIVE, "bias_correction": True})
    # m / (1 - 0.5) = [2, -1], v / (1 - 0.75) = [4, 1]: x = [2 / 2.5, -1 / 1.5].
    x1 = step(agg, [0.0, 0.0], [([2.0, -1.0], 1.0)])
    np.testing.assert_allclose(x1, [0.8, -2 / 3], rtol=1e-6)


def test_fedavgm_without_momentum_at_server_lr_1_is_fedavg() -> None:
    plain = make_aggregator("fedavg")
    fedavgm = make_aggregator("fedavgm", {"server_lr": 1.0, "momentum": 0.0})
    sites = [([0.5, -2.0], 10.0), ([1.5, 4.0], 30.0)]
    for _ in range(3):
        np.testing.assert_allclose(step(fedavgm, [1.0, 1.0], sites),
                                   step(plain, [1.0, 1.0], sites), rtol=1e-6)


def test_a_saved_state_continues_the_optimiser_exactly(tmp_path: Path) -> None:
    rounds = [[([1.0, -2.0], 2.0), ([0.5, 1.0], 1.0)], [([0.2, 0.1], 1.0)],
              [([-1.0, 0.3], 1.0), ([2.0, 2.0], 4.0)]]
    for name in ("fedavgm", "fedadam", "fedyogi"):
        straight = make_aggregator(name)
        x = [0.0, 0.0]
        for sites in rounds:
            x = step(straight, x, sites)

        first = make_aggregator(name)
        y = [0.0, 0.0]
        for sites in rounds[:2]:
            y = step(first, y, sites)
        rel, sha = save_checkpoint(tmp_path, 7, 2, {"w": np.array(y, np.float32)},
                                   server_state=first.state_dict(), aggregation=name)
        state = load_server_state(tmp_path / rel, expected_sha256=sha, aggregation=name)
        assert state is not None
        resumed = make_aggregator(name)
        resumed.load_state_dict(state)
        y = step(resumed, [float(v) for v in load_checkpoint(tmp_path / rel)["w"]], rounds[2])
        np.testing.assert_allclose(y, x, rtol=1e-6)
        # Without the state the last step differs: the test would notice a lost state.
        fresh = step(make_aggregator(name), [float(v) for v in y], rounds[2])
        assert not np.allclose(fresh, x, rtol=1e-6)


# --- the saved state's integrity -------------------------------------------------------------


def test_a_changed_missing_or_foreign_state_file_is_refused(tmp_path: Path) -> None:
    agg = make_aggregator("fedadam")
    step(agg, [0.0], [([1.0], 1.0)])
    rel, sha = save_checkpoint(tmp_path, 3, 1, {"w": np.zeros(1, np.float32)},
                               server_state=agg.state_dict(), aggregation="fedadam")
    state_file = tmp_path / server_state_path(3, 1)
    assert state_file.exists()
    # The model checkpoint still reads as the model alone (releases, exports, the demo).
    assert set(load_checkpoint(tmp_path / rel, expected_sha256=sha)) == {"w"}

    with pytest.raises(CheckpointError, match="holds the state of aggregation 'fedadam', "
                                              "but the run uses 'fedyogi'"):
        load_server_state(tmp_path / rel, expected_sha256=sha, aggregation="fedyogi")
    raw = bytearray(state_file.read_bytes())
    raw[-1] ^= 0x01
    state_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 its checkpoint"):
        load_server_state(tmp_path / rel, expected_sha256=sha, aggregation="fedadam")
    state_file.unlink()
    with pytest.raises(CheckpointError, match=r"optimiser state .* is missing"):
        load_server_state(tmp_path / rel, expected_sha256=sha, aggregation="fedadam")


def test_a_stateless_strategy_writes_the_checkpoint_as_before(tmp_path: Path) -> None:
    rel, sha = save_checkpoint(tmp_path, 3, 1, {"w": np.ones(2, np.float32)},
                               server_state=make_aggregator("fedavg").state_dict())
    assert load_server_state(tmp_path / rel, expected_sha256=sha, aggregation="fedavg") is None
    assert not (tmp_path / server_state_path(3, 1)).exists()
    plain, _ = save_checkpoint(tmp_path, 4, 1, {"w": np.ones(2, np.float32)})
    assert (tmp_path / rel).read_bytes() == (tmp_path / plain).read_bytes()


def test_a_state_that_does_not_fit_the_model_is_refused() -> None:
    agg = make_aggregator("fedavgm")
    step(agg, [0.0, 0.0], [([1.0, 1.0], 1.0)])
    other = make_aggregator("fedavgm")
    other.load_state_dict(agg.state_dict())
    with pytest.raises(AggregationError, match="does not fit the model"):
        step(other, [0.0, 0.0, 0.0], [([1.0, 1.0, 1.0], 1.0)])
    with pytest.raises(AggregationError, match="unknown array 'v/w'"):
        make_aggregator("fedavgm").load_state_dict({**agg.state_dict(), "v/w": np.zeros(2)})
    with pytest.raises(AggregationError, match="keeps no state"):
        make_aggregator("fedavg").load_state_dict(agg.state_dict())


# --- the round loop: the optimiser's state survives a resumed run ----------------------------


def test_a_resumed_run_continues_the_server_optimiser_from_its_checkpoint(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path,
) -> None:
    options = {"server_lr": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 0.01,
               "bias_correction": False}
    sites = {11: good_site(1.0, n=100.0), 12: good_site(-0.5, n=300.0), 13: good_site(2.0)}

    def run(plan: RunPlan, home: Path) -> np.ndarray:
        RoundLoop(grid=SiteGrid(sites, online=[11, 12, 13]), engine=engine, home=home,
                  plan=plan, initial=lambda: arrays_of(0.0)).run()
        assert run_row(engine, plan.run_id).status == "completed"
        last = last_checkpoint(engine, plan.run_id)
        assert last is not None
        return load_checkpoint(home / last[1])["w"]

    straight = run(make_plan(rounds=3, aggregation="fedadam", aggregation_options=options),
                   tmp_path / "straight")

    # The same run stopped after round 2 (a coordinator restart), then a new round loop
    # resumes it from round 2's checkpoint.
    home = tmp_path / "resumed"
    plan = make_plan(rounds=2, aggregation="fedadam", aggregation_options=options)
    run(plan, home)
    resumed = run(plan.model_copy(update={"rounds": 3}), home)

    assert [r.number for r in rounds_of(engine, plan.run_id)] == [1, 2, 3]
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)
    # Round 3 with a fresh optimiser (the state lost) gives another model.
    ckpt = last_checkpoint(engine, plan.run_id)
    assert ckpt is not None
    round2 = load_checkpoint(home / ckpt[1].replace("round-0003", "round-0002"))
    fresh = make_aggregator("fedadam", options).aggregate(round2, [
        SiteUpdate(s, {k: v + np.float32(d) for k, v in round2.items()}, n)
        for s, d, n in (("hospital-a", 1.0, 100.0), ("hospital-b", -0.5, 300.0),
                        ("hospital-c", 2.0, 100.0))])
    assert not np.allclose(fresh["w"], straight, rtol=1e-3)


def test_a_resumed_run_whose_state_is_gone_fails_instead_of_restarting_the_optimiser(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path,
) -> None:
    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0), 13: good_site(3.0)},
                    online=[11, 12, 13])
    agg = make_aggregator("fedavgm")
    agg.aggregate(arrays_of(0.0), [SiteUpdate("hospital-a", arrays_of(1.0), 1.0)])

    # Round 1 checkpointed with its state, then the state file lost.
    lost = make_plan(rounds=2, aggregation="fedavgm")
    rel, sha = save_checkpoint(tmp_path, lost.run_id, 1, arrays_of(1.0),
                               server_state=agg.state_dict(), aggregation="fedavgm")
    record_checkpoint(engine, lost.run_id, 1, str(rel), sha)
    state_file = tmp_path / server_state_path(lost.run_id, 1)
    state_file.unlink()
    # Round 1 checkpointed without state (an older coordinator) for a stateful run.
    bare = make_plan(rounds=2, aggregation="fedavgm")
    rel2, sha2 = save_checkpoint(tmp_path, bare.run_id, 1, arrays_of(1.0))
    record_checkpoint(engine, bare.run_id, 1, str(rel2), sha2)

    for plan in (lost, bare):
        RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
                  initial=lambda: arrays_of(0.0)).run()
    assert grid.sent == []  # neither trained a round with a restarted optimiser
    assert run_row(engine, lost.run_id).failure_reason == (
        f"cannot resume after round 1: the server optimiser state {state_file} of checkpoint "
        f"{tmp_path / rel} is missing; the server optimiser cannot continue where it "
        "stopped (launch the run again)")
    assert run_row(engine, bare.run_id).failure_reason == (
        f"cannot resume after round 1: checkpoint {tmp_path / rel2} has no fedavgm state; "
        "the server optimiser cannot continue where it stopped (launch the run again)")


def test_an_aggregation_the_coordinator_does_not_know_fails_the_run_with_the_known_ones(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path,
) -> None:
    plan = make_plan(aggregation="uninstalled-plugin")
    grid = SiteGrid({11: good_site(1.0)}, online=[11])
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()
    run = run_row(engine, plan.run_id)
    assert run.status == "failed" and grid.sent == []
    assert run.failure_reason == ("cannot aggregate: unknown aggregation 'uninstalled-plugin': "
                                  "use " + ", ".join(BUILTIN[:-1]) + " or fedyogi")


# --- the registry -----------------------------------------------------------------------------


def test_an_unknown_name_lists_every_known_strategy() -> None:
    assert known_aggregations()[:6] == BUILTIN
    with pytest.raises(AggregationError) as err:
        aggregator_class("krum")
    assert str(err.value) == ("unknown aggregation 'krum': use fedavg, median, trimmed-mean, "
                              "fedavgm, fedadam or fedyogi")


def test_options_are_validated_with_every_problem_named() -> None:
    assert validate_options("fedadam") == {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99,
                                           "tau": 1e-3, "bias_correction": False}
    assert validate_options("fedavgm", {"server_lr": 2}) == {"server_lr": 2.0,
                                                             "momentum": 0.9}
    with pytest.raises(AggregationError) as err:
        validate_options("fedadam", {"beta1": 1.0, "tau": 0, "lr": 0.1})
    msg = str(err.value)
    assert msg.startswith("aggregation 'fedadam' (takes server_lr, beta1, beta2, tau, "
                          "bias_correction): ")
    assert "beta1: Input should be less than 1" in msg
    assert "tau: Input should be greater than 0" in msg
    assert "lr: unknown option" in msg
    with pytest.raises(AggregationError, match=r"'fedavg' \(takes no options\): server_lr: "
                                               "unknown option"):
        validate_options("fedavg", {"server_lr": 1.0})
    with pytest.raises(AggregationError, match="momentum: Input should be a valid number"):
        validate_options("fedavgm", {"momentum": "0.9"})
    with pytest.raises(AggregationError, match="server_lr: Input should be a finite number"):
        validate_options("fedyogi", {"server_lr": float("inf")})


def test_register_refuses_a_taken_name_or_a_non_strategy() -> None:
    class Shadow(FedAvg):
        name = "fedavg"

    with pytest.raises(AggregationError, match="'fedavg' is already registered"):
        register_aggregator(Shadow)
    with pytest.raises(AggregationError, match="is not an Aggregator subclass"):
        register_aggregator(dict)  # type: ignore[arg-type]


PLUGIN = '''
import numpy as np
from coordinator.aggregation import Aggregator, NoOptions, weighted_mean

class ScaledOptions(NoOptions):
    factor: float = 1.0

class Scaled(Aggregator):
    """The weighted mean times a factor (a plugin for the tests)."""
    name = "scaled-mean"
    Options = ScaledOptions

    def aggregate(self, global_arrays, updates):
        return {k: (v * self.options.factor).astype(np.float32)
                for k, v in weighted_mean(updates).items()}

class Impostor(Scaled):
    name = "fedavg"

NotAStrategy = 42
'''


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution (a dist-info folder on sys.path) with entry points in the
    ``fedward.aggregators`` group: one sound strategy and three broken ones."""
    (tmp_path / "fedward_test_aggregators.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "fedward_test_aggregators-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedward-test-aggregators\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fedward.aggregators]\n"
        "scaled-mean = fedward_test_aggregators:Scaled\n"
        "fedavg = fedward_test_aggregators:Impostor\n"
        "not-a-strategy = fedward_test_aggregators:NotAStrategy\n"
        "misnamed = fedward_test_aggregators:Scaled\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reload_plugins()
    yield tmp_path
    monkeypatch.undo()
    sys.modules.pop("fedward_test_aggregators", None)
    reload_plugins()


def test_a_plugin_strategy_is_found_through_its_entry_point(plugin_dist: Path) -> None:
    assert known_aggregations() == [*BUILTIN, "scaled-mean"]
    assert validate_options("scaled-mean", {"factor": 2}) == {"factor": 2.0}
    agg = make_aggregator("scaled-mean", {"factor": 2.0})
    out = agg.aggregate({"w": np.zeros(2, np.float32)},
                        [SiteUpdate("a", {"w": np.array([1.0, 3.0], np.float32)}, 1.0)])
    np.testing.assert_allclose(out["w"], [2.0, 6.0])
    # A plugin cannot replace a built-in; a broken entry point is named, not fatal.
    assert aggregator_class("fedavg") is FedAvg
    with pytest.raises(AggregationError, match=r"unknown aggregation 'not-a-strategy': .* "
                                               r"\(the plugin 'not-a-strategy' failed to load: "
                                               r"fedward_test_aggregators:NotAStrategy: "):
        aggregator_class("not-a-strategy")
    with pytest.raises(AggregationError, match="its class is named 'scaled-mean', not "
                                               "'misnamed'"):
        aggregator_class("misnamed")


def test_without_the_plugin_installed_its_name_is_unknown(plugin_dist: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin_dist)])
    reload_plugins()
    assert "scaled-mean" not in known_aggregations()
    with pytest.raises(AggregationError, match="unknown aggregation 'scaled-mean'"):
        make_aggregator("scaled-mean")


# --- a real federation: coordinator, SuperLink and site agents as processes ----------------


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_a_real_federated_run_with_fedadam_completes_and_saves_its_state_each_round() -> None:
    options = {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 0.01}
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        names = fed.join_all_sites()
        run_id = fed.launch(task="breast_cancer_mlp", rounds=3, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=90, aggregation="fedadam",
                            aggregation_options=options)
        run = fed.wait_run(run_id, timeout=300)
        assert run["status"] == "completed", run.get("failure_reason")
        assert run["config"]["aggregation_options"] == {**options, "bias_correction": False}
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [(r["number"], sorted(r["participating_sites"])) for r in rounds] == [
            (n, sorted(names)) for n in (1, 2, 3)]
        ckpts = fed.api("GET", f"/runs/{run_id}/checkpoints").json()
        assert [c["round_number"] for c in ckpts] == [1, 2, 3]
        for c in ckpts:
            state = load_server_state(fed.home / c["path"], expected_sha256=c["sha256"],
                                      aggregation="fedadam")
            assert state is not None and int(state["step"][0]) == c["round_number"]
            assert set(state) == {"step"} | {f"{slot}/{k}" for slot in ("m", "v")
                                             for k in load_file(fed.home / c["path"])}
            assert all(np.all(np.isfinite(v)) for v in state.values())
            assert np.any(state["v/net.0.weight"] > 0)
        with safe_open(str(fed.home / ckpts[-1]["path"]), framework="np") as fh:
            assert fh.metadata()["fedward.server-state.aggregation"] == "fedadam"
        # The checkpoint is still a plain model for everything that reads it.
        model = build_model("breast_cancer_mlp", seed=0)
        set_model_arrays(model, load_checkpoint(fed.home / ckpts[-1]["path"],
                                                expected_sha256=ckpts[-1]["sha256"]))
