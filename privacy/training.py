"""Local training at a site: DP-SGD with Opacus, and the plain (non-private) baseline.

DP training follows Opacus's own design: a fresh :class:`~opacus.PrivacyEngine` per round
whose accountant is loaded with the run's history so far, hooked onto the DP optimizer, so
every step the optimizer really takes is recorded as it happens. The noise multiplier is
fixed for the whole run (see :func:`privacy.dp.noise_multiplier_for_run`), never chosen per
round from a zero start.

The numbers a site reserves in its ledger before a round are in :mod:`privacy.sampling`;
:func:`train_dp` checks that Opacus recorded exactly those. Evaluation of the trained model
is :mod:`privacy.evaluation`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import HistoryEntry, without_warnings
from privacy.labelled_data import labelled_tensors
from privacy.sampling import check_positive_int, expected_steps, sample_rate_for

__all__ = [
    "DPTrainResult",
    "PlainTrainResult",
    "pick_grad_sample_mode",
    "train_dp",
    "train_plain",
]

_GRAD_SAMPLE_MODES: Final = ("auto", "hooks", "ew", "functorch")
# Layers whose per-sample gradients PyTorch's expanded weights ("ew") compute. Benchmark 3
# (bench/dp_cost.py) measured "ew" as the fastest valid mode for both appliance models
# (identical updates to "hooks"); a model with any other parameterised layer uses "hooks".
_EW_LAYERS: Final = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm,
                     nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_OPTIMIZERS: Final = ("sgd", "adam")
_MECHANISM: Final = "prv"


def pick_grad_sample_mode(model: nn.Module) -> str:
    """The fastest Opacus per-sample gradient mode that is valid for ``model``.

    ``"ew"`` when every module that holds its own trainable parameters is a layer expanded
    weights supports, else ``"hooks"`` (which supports every layer Opacus knows).
    """
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and not isinstance(module, _EW_LAYERS):
            return "hooks"
    return "ew"


@dataclass(frozen=True)
class DPTrainResult:
    """Outcome of one round of DP-SGD training.

    Attributes:
        loss: mean training loss over the examples of the last epoch.
        steps: DP-SGD steps taken (and recorded by the accountant) this round.
        sample_rate: the sampling rate the accountant recorded per step.
        noise_multiplier: the noise multiplier used.
        accountant_history: the accountant history after this round (prior history plus
            this round's steps), ready to be stored and loaded next round.
        seconds: wall time of the round's training.
    """

    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    accountant_history: list[HistoryEntry]
    seconds: float


@dataclass(frozen=True)
class PlainTrainResult:
    """Outcome of non-private training (the pooled baseline).

    Attributes:
        loss: mean training loss over the examples of the last epoch.
        steps: optimizer steps taken.
        seconds: wall time of training.
    """

    loss: float
    steps: int
    seconds: float


# -- helpers ------------------------------------------------------------------------------


def _make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(_OPTIMIZERS)}")


def _check_training_args(*, batch_size: int, epochs: int, lr: float) -> None:
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs)
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be > 0; got {lr!r}")


def _seeds(seed: int, count: int) -> list[int]:
    """Independent generator seeds derived from one run seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (dropout and the like) without leaking the change."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _strip_opacus(model: nn.Module) -> None:
    """Leave the caller's model as a plain module after Opacus is done with it.

    Cleanup of the GradSampleModule removes its hooks and per-parameter attributes; the
    DP optimizer also leaves ``summed_grad`` on each parameter, and gradients stay behind.
    """
    for p in model.parameters():
        if hasattr(p, "summed_grad"):
            del p.summed_grad
        p.grad = None


def _empty_step(dp_optimizer: Any) -> None:
    """Take the DP step of an empty Poisson batch: noise only, accounted like any other.

    Poisson sampling can draw no example at all. The step must still happen (the
    accounting assumes it), but a forward pass on zero rows fails in "ew" mode, so the
    (empty) per-sample gradients are set directly instead of through the model.
    """
    for p in dp_optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    dp_optimizer.step()


def _history(raw: Sequence[Sequence[Any]]) -> list[HistoryEntry]:
    return [(float(s), float(q), int(n)) for s, q, n in raw]


# -- training -----------------------------------------------------------------------------


def train_dp(
    *,
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    history: Sequence[HistoryEntry] = (),
    grad_sample_mode: str = "auto",
    optimizer: str = "sgd",
) -> DPTrainResult:
    """Train ``model`` in place with DP-SGD for one round, continuing the run's accountant.

    Poisson sampling at :func:`sample_rate_for`, per-sample clipping at ``max_grad_norm``
    and Gaussian noise of ``noise_multiplier x max_grad_norm``; cross-entropy loss. The
    accountant starts from ``history`` (the run's steps in earlier rounds) and records this
    round's steps, so the returned history composes the whole run. The ledger must have
    reserved :func:`expected_steps` for the round beforehand.

    ``model`` ends up holding the trained weights and free of every Opacus hook and
    attribute, ready for a plain forward pass, evaluation or export.

    Args:
        model: the model to train; a plain module, not an Opacus wrapper.
        features: training features, examples x columns.
        labels: class numbers, one per example.
        noise_multiplier: the run's noise multiplier, > 0.
        max_grad_norm: per-sample gradient clipping bound, > 0.
        batch_size: expected (Poisson) batch size, >= 1; larger than the data is fine.
        epochs: local epochs, >= 1.
        lr: learning rate, > 0.
        seed: makes sampling, noise and any randomness in the model reproducible.
        history: the run's accountant history before this round.
        grad_sample_mode: how Opacus computes per-sample gradients: ``"auto"`` (the
            fastest valid mode for the model, :func:`pick_grad_sample_mode`), ``"hooks"``,
            ``"ew"`` (expanded weights) or ``"functorch"``.
        optimizer: ``"sgd"`` or ``"adam"``.

    Returns:
        The round's :class:`DPTrainResult`.

    Raises:
        ValueError: for empty or malformed data, or an argument out of range.
    """
    if isinstance(model, AbstractGradSampleModule):
        raise ValueError("pass the plain model, not an Opacus wrapper (use its ._module)")
    x, y = labelled_tensors(features, labels)
    _check_training_args(batch_size=batch_size, epochs=epochs, lr=lr)
    if not (
        isinstance(noise_multiplier, int | float)
        and math.isfinite(noise_multiplier)
        and noise_multiplier > 0
    ):
        raise ValueError(
            f"noise_multiplier must be > 0 (use train_plain for no DP); got {noise_multiplier!r}"
        )
    if not (isinstance(max_grad_norm, int | float) and math.isfinite(max_grad_norm)
            and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0; got {max_grad_norm!r}")
    if grad_sample_mode not in _GRAD_SAMPLE_MODES:
        raise ValueError(
            f"unknown grad_sample_mode {grad_sample_mode!r}; use one of "
            f"{', '.join(_GRAD_SAMPLE_MODES)}"
        )
    if grad_sample_mode == "auto":
        grad_sample_mode = pick_grad_sample_mode(model)
    prior = _history(history)
    n = len(y)
    sample_rate = sample_rate_for(n_examples=n, batch_size=batch_size)
    steps_planned = expected_steps(n_examples=n, batch_size=batch_size, epochs=epochs)
    loader_seed, noise_seed, torch_seed = _seeds(seed, 3)

    started = time.perf_counter()
    was_training = model.training
    opt = _make_optimizer(optimizer, model, lr)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(loader_seed),
    )
    with without_warnings("Secure RNG turned off"):
        # Opacus warns on every engine that its secure RNG is off and asks to retrain with
        # secure_mode before production. secure_mode needs torchcsprng, whose last release
        # (2021) does not install with this torch: advice no hospital can follow. The noise
        # source is chosen on purpose instead (a generator seeded for each round from the
        # operating system's entropy at the site: site_agent.noise_seed.round_noise_seed,
        # docs/operator-guide.md "Privacy"), so only this one warning is dropped, here where
        # Opacus emits it; every other warning still shows.
        engine = PrivacyEngine(accountant=_MECHANISM)
    # A fresh engine per round, loaded with the run's history: epsilon composes over the
    # run instead of restarting from zero each round.
    engine.accountant.load_state_dict({"history": list(prior), "mechanism": _MECHANISM})
    # Opacus refuses a module in eval mode (e.g. just after evaluating the received model);
    # the caller's mode is restored below.
    model.train()
    private_model, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(noise_seed),
        grad_sample_mode=grad_sample_mode,
    )
    criterion = nn.CrossEntropyLoss()
    loss_sum, loss_n = 0.0, 0
    try:
        with _seeded(torch_seed):
            private_model.train()
            for _ in range(epochs):
                loss_sum, loss_n = 0.0, 0
                for xb, yb in dp_loader:
                    dp_opt.zero_grad(set_to_none=True)
                    if len(yb) == 0:
                        _empty_step(dp_opt)
                        continue
                    loss = criterion(private_model(xb), yb)
                    loss.backward()
                    dp_opt.step()
                    loss_sum += float(loss.detach()) * len(yb)
                    loss_n += len(yb)
    finally:
        # In "ew" mode a forward after training fails unless gradients are cleared first.
        dp_opt.zero_grad(set_to_none=True)
        private_model._close()
        _strip_opacus(model)
        model.train(was_training)
    seconds = time.perf_counter() - started

    after = _history(engine.accountant.history)
    steps = sum(s for _, _, s in after) - sum(s for _, _, s in prior)
    recorded_rate = 1 / len(dp_loader)
    # The ledger reserved expected_steps at sample_rate_for before this round: if Opacus
    # ever recorded something else the ledger would under-charge, so fail loudly.
    if steps != steps_planned or recorded_rate != sample_rate:
        raise RuntimeError(
            f"Opacus recorded {steps} steps at sample rate {recorded_rate}, but "
            f"{steps_planned} at {sample_rate} were planned: the privacy ledger and the "
            f"accountant disagree (was opacus upgraded?)"
        )
    return DPTrainResult(
        loss=loss_sum / loss_n if loss_n else math.nan,
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=float(noise_multiplier),
        accountant_history=after,
        seconds=seconds,
    )


def train_plain(
    *,
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    optimizer: str = "sgd",
) -> PlainTrainResult:
    """Train ``model`` in place without DP: the pooled, non-private baseline.

    Shuffled mini-batches of ``batch_size``, cross-entropy loss.

    Args:
        model: the model to train.
        features: training features, examples x columns.
        labels: class numbers, one per example.
        batch_size: mini-batch size, >= 1.
        epochs: epochs, >= 1.
        lr: learning rate, > 0.
        seed: makes shuffling and any randomness in the model reproducible.
        optimizer: ``"sgd"`` or ``"adam"``.

    Returns:
        The :class:`PlainTrainResult`.

    Raises:
        ValueError: for empty or malformed data, or an argument out of range.
    """
    x, y = labelled_tensors(features, labels)
    _check_training_args(batch_size=batch_size, epochs=epochs, lr=lr)
    loader_seed, torch_seed = _seeds(seed, 2)
    started = time.perf_counter()
    was_training = model.training
    opt = _make_optimizer(optimizer, model, lr)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(loader_seed),
    )
    criterion = nn.CrossEntropyLoss()
    steps, loss_sum, loss_n = 0, 0.0, 0
    try:
        with _seeded(torch_seed):
            model.train()
            for _ in range(epochs):
                loss_sum, loss_n = 0.0, 0
                for xb, yb in loader:
                    opt.zero_grad(set_to_none=True)
                    loss = criterion(model(xb), yb)
                    loss.backward()
                    opt.step()
                    steps += 1
                    loss_sum += float(loss.detach()) * len(yb)
                    loss_n += len(yb)
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    return PlainTrainResult(
        loss=loss_sum / loss_n, steps=steps, seconds=time.perf_counter() - started
    )
