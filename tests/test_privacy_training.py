"""Tests of privacy.training: DP-SGD rounds with Opacus, the baseline and evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedward.models import model_arrays
from fedward.tasks import build_model
from privacy import (
    DpSgd,
    compose_mechanisms,
    epsilon_for_history,
    evaluate,
    expected_steps,
    noise_multiplier_for_run,
    planned_steps,
    sample_rate_for,
    train_dp,
    train_plain,
)

DELTA = 1e-5
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def breast_cancer() -> Split:
    """Breast cancer data split 80/20 with a fixed permutation."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


@pytest.fixture
def fresh_model() -> Callable[[], nn.Module]:
    return lambda: build_model("breast_cancer_mlp", seed=0)


# -- planned numbers equal Opacus's -------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 455, 569, 2970, 2976, 3000])
@pytest.mark.parametrize("batch_size", [1, 16, 32, 64, 1000])
def test_planned_numbers_match_opacus_poisson_loader(n: int, batch_size: int) -> None:
    data = TensorDataset(torch.zeros(n, 1))
    dp_loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch_size))
    # make_private records sample_rate = 1 / len(dp_loader) and steps one per batch.
    assert sample_rate_for(n_examples=n, batch_size=batch_size) == 1 / len(dp_loader)
    assert expected_steps(n_examples=n, batch_size=batch_size, epochs=3) == 3 * len(dp_loader)
    q = sample_rate_for(n_examples=n, batch_size=batch_size)
    assert planned_steps(sample_rate=q, epochs=3) == 3 * len(dp_loader)


def test_float_round_trip_in_opacus_loses_a_batch() -> None:
    # 2970 / 32 -> 93 batches, but int(1 / (1 / 93)) == 92: what Opacus records wins.
    assert expected_steps(n_examples=2970, batch_size=32, epochs=1) == 92
    assert sample_rate_for(n_examples=2970, batch_size=32) == 1 / 92


def test_batch_larger_than_data_is_one_full_batch() -> None:
    assert sample_rate_for(n_examples=10, batch_size=64) == 1.0
    assert expected_steps(n_examples=10, batch_size=64, epochs=4) == 4


# -- DP training --------------------------------------------------------------------------


def test_rounds_with_carried_history_equal_one_long_lived_accountant(
    breast_cancer: Split, fresh_model: Callable[[], nn.Module]
) -> None:
    x, y, _, _ = breast_cancer
    model = fresh_model()
    history: list[tuple[float, float, int]] = []
    q = sample_rate_for(n_examples=len(y), batch_size=64)
    long_lived = PRVAccountant()
    for round_number in range(3):
        result = train_dp(
            model=model, features=x, labels=y, noise_multiplier=1.3, max_grad_norm=1.0,
            batch_size=64, epochs=2, lr=0.1, seed=round_number, history=history,
        )
        steps = expected_steps(n_examples=len(y), batch_size=64, epochs=2)
        assert result.steps == steps
        assert result.sample_rate == q
        assert sum(s for _, _, s in result.accountant_history) == (round_number + 1) * steps
        for _ in range(steps):
            long_lived.step(noise_multiplier=1.3, sample_rate=q)
        history = result.accountant_history
        carried = epsilon_for_history(history, delta=DELTA)
        assert carried == pytest.approx(long_lived.get_epsilon(delta=DELTA), abs=1e-6)
    assert history == long_lived.history


def test_model_is_plain_and_trained_after_dp_training(
    breast_cancer: Split, fresh_model: Callable[[], nn.Module]
) -> None:
    x, y, _, _ = breast_cancer
    for mode in ("hooks", "ew", "functorch"):
        model = fresh_model()
        before = model_arrays(model)
        train_dp(
            model=model, features=x, labels=y, noise_multiplier=1.0, max_grad_norm=1.0,
            batch_size=64, epochs=1, lr=0.1, seed=0, grad_sample_mode=mode,
        )
        after = model_arrays(model)
        assert after.keys() == before.keys()  # no "_module." prefix
        assert any(not np.array_equal(before[k], after[k]) for k in before)
        for module in model.modules():
            assert not module._forward_hooks and not module._backward_hooks
            assert not module._forward_pre_hooks
        assert not hasattr(model, "autograd_grad_sample_hooks")
        assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules())
        for p in model.parameters():
            assert p.grad is None
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                assert not hasattr(p, attr)
        model.eval()
        with torch.no_grad():
            assert model(torch.as_tensor(x[:3], dtype=torch.float32)).shape == (3, 2)
        # and it trains again as a plain module
        train_plain(model=model, features=x[:32], labels=y[:32], batch_size=16, epochs=1,
                    lr=0.01, seed=0)


def test_dp_training_is_deterministic_given_the_seed(
    breast_cancer: Split, fresh_model: Callable[[], nn.Module]
) -> None:
    x, y, _, _ = breast_cancer
    runs = []
    for seed in (7, 7, 8):
        model = fresh_model()
        train_dp(model=model, features=x, labels=y, noise_multiplier=1.0, max_grad_norm=1.0,
                 batch_size=64, epochs=1, lr=0.1, seed=seed, grad_sample_mode="ew")
        runs.append(model_arrays(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_dp_training_reaches_good_auc_at_epsilon_3(
    breast_cancer: Split, fresh_model: Callable[[], nn.Module]
) -> None:
    x, y, x_test, y_test = breast_cancer
    epochs, batch = 30, 64
    q = sample_rate_for(n_examples=len(y), batch_size=batch)
    sigma = noise_multiplier_for_run(epsilon=3.0, delta=DELTA, sample_rate=q, total_epochs=epochs)
    model = fresh_model()
    result = train_dp(
        model=model, features=x, labels=y, noise_multiplier=sigma, max_grad_norm=1.0,
        batch_size=batch, epochs=epochs, lr=0.5, seed=0,
    )
    # Within the budget by the ledger's accountant (PLD), which the noise was searched with.
    assert compose_mechanisms([DpSgd(*h) for h in result.accountant_history],
                              delta=DELTA).epsilon <= 3.0
    assert epsilon_for_history(result.accountant_history, delta=DELTA) == pytest.approx(
        3.0, rel=0.015)
    metrics = evaluate(model=model, features=x_test, labels=y_test)
    assert metrics.auc > 0.9
    assert metrics.n == len(y_test)
    assert result.seconds < 20


def test_empty_poisson_batches_are_stepped_and_accounted(
    fresh_model: Callable[[], nn.Module],
) -> None:
    x, y = load_breast_cancer(return_X_y=True)
    for mode in ("hooks", "ew"):
        result = train_dp(
            model=fresh_model(), features=x[:4], labels=y[:4], noise_multiplier=1.0,
            max_grad_norm=1.0, batch_size=1, epochs=10, lr=0.1, seed=3,
            grad_sample_mode=mode,
        )
        assert result.steps == 40 and result.accountant_history == [(1.0, 0.25, 40)]


def test_opacus_wrapper_is_refused(fresh_model: Callable[[], nn.Module]) -> None:
    wrapped = GradSampleModule(fresh_model())
    with pytest.raises(ValueError, match="plain model"):
        train_dp(model=wrapped, features=np.zeros((4, 30)), labels=np.zeros(4),
                 noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2, epochs=1, lr=0.1,
                 seed=0)


def test_batch_larger_than_data_trains(fresh_model: Callable[[], nn.Module]) -> None:
    x, y = load_breast_cancer(return_X_y=True)
    result = train_dp(
        model=fresh_model(), features=x[:20], labels=y[:20], noise_multiplier=1.0,
        max_grad_norm=1.0, batch_size=500, epochs=2, lr=0.1, seed=0, optimizer="adam",
    )
    assert (result.sample_rate, result.steps) == (1.0, 2)


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros((0, 30)), np.zeros(0), "no examples"),
        (np.zeros((3, 30)), np.zeros(2), "3 feature rows but 2 labels"),
        (np.zeros(30), np.zeros(30), "features must be 2-D"),
        (np.full((2, 30), np.nan), np.zeros(2), "NaN"),
        (np.zeros((2, 30)), np.array([0.5, 1.0]), "non-negative integers"),
    ],
)
def test_bad_data_is_refused(
    fresh_model: Callable[[], nn.Module], features: np.ndarray, labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train_dp(model=fresh_model(), features=features, labels=labels, noise_multiplier=1.0,
                 max_grad_norm=1.0, batch_size=8, epochs=1, lr=0.1, seed=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"grad_sample_mode": "ghost"}, "unknown grad_sample_mode"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_refused(
    fresh_model: Callable[[], nn.Module], override: dict[str, object], message: str
) -> None:
    x, y = load_breast_cancer(return_X_y=True)
    args: dict[str, object] = {
        "model": fresh_model(), "features": x[:10], "labels": y[:10], "noise_multiplier": 1.0,
        "max_grad_norm": 1.0, "batch_size": 4, "epochs": 1, "lr": 0.1, "seed": 0, **override,
    }
    with pytest.raises(ValueError, match=message):
        train_dp(**args)  # type: ignore[arg-type]


# -- baseline and evaluation --------------------------------------------------------------


def test_plain_training_baseline(
    breast_cancer: Split, fresh_model: Callable[[], nn.Module]
) -> None:
    x, y, x_test, y_test = breast_cancer
    model = fresh_model()
    result = train_plain(model=model, features=x, labels=y, batch_size=32, epochs=10, lr=0.05,
                         seed=0)
    assert result.steps == 10 * math.ceil(len(y) / 32)
    assert evaluate(model=model, features=x_test, labels=y_test).auc > 0.95


def test_evaluate_multiclass_auc_is_one_vs_rest_macro() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = rng.integers(0, 3, size=60)
    result = evaluate(model=model, features=x, labels=y)
    with torch.no_grad():
        probs = torch.softmax(model(torch.as_tensor(x, dtype=torch.float32)), dim=1).numpy()
    assert result.auc == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    assert 0.0 <= result.accuracy <= 1.0 and result.n == 60
    # A class missing from the labels: macro over the classes present.
    partial = evaluate(model=model, features=x[y < 2], labels=y[y < 2])
    assert math.isfinite(partial.auc)


def test_evaluate_single_class_auc_is_nan(fresh_model: Callable[[], nn.Module]) -> None:
    x, y = load_breast_cancer(return_X_y=True)
    model = fresh_model()
    model.train()
    result = evaluate(model=model, features=x[y == 1][:10], labels=y[y == 1][:10])
    assert math.isnan(result.auc)
    assert math.isfinite(result.loss)
    assert model.training  # restored


def test_evaluate_rejects_labels_outside_the_model(fresh_model: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError, match="model has 2 classes"):
        evaluate(model=fresh_model(), features=np.zeros((2, 30)), labels=np.array([0, 5]))


# -- the per-sample gradient mode -----------------------------------------------------------


def test_both_appliance_models_get_expanded_weights() -> None:
    from privacy.training import pick_grad_sample_mode

    assert pick_grad_sample_mode(build_model("breast_cancer_mlp", seed=0)) == "ew"
    assert pick_grad_sample_mode(build_model("digits_cnn", seed=0)) == "ew"


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.LSTM(4, 4), nn.PReLU()])
def test_a_layer_expanded_weights_cannot_do_falls_back_to_hooks(layer: nn.Module) -> None:
    from privacy.training import pick_grad_sample_mode

    assert pick_grad_sample_mode(nn.Sequential(nn.Linear(4, 4), layer)) == "hooks"
    layer.requires_grad_(False)  # frozen layers need no per-sample gradients
    assert pick_grad_sample_mode(nn.Sequential(nn.Linear(4, 4), layer)) == "ew"


def test_auto_mode_trains_exactly_as_the_mode_it_picks(
    breast_cancer: Split, fresh_model: Callable[[], nn.Module]
) -> None:
    x, y, _, _ = breast_cancer
    out = {}
    for mode in ("auto", "ew"):
        model = fresh_model()
        train_dp(model=model, features=x, labels=y, noise_multiplier=1.0, max_grad_norm=1.0,
                 batch_size=64, epochs=1, lr=0.1, seed=3, grad_sample_mode=mode)
        out[mode] = model_arrays(model)
    assert all(np.array_equal(out["auto"][k], out["ew"][k]) for k in out["ew"])
