"""Evaluation baselines: was federating worth it?

For one site's held-out split, the figures of a model (:func:`held_out_metrics`: accuracy,
AUC, balanced accuracy, Brier score) and the two models a federated one is compared with:

- the site's **local-only** model (:func:`train_local_only`): the same task (the same
  preprocessing, so the same model), trained on the site's own training rows alone with
  DP-SGD at the same epsilon and delta as the federated run, the run's statistics release
  included in that budget when the run had one: what the hospital would have without
  federating, under the same privacy promise;
- the **pooled** non-private model (:func:`train_pooled`): trained on every site's
  training rows together, without DP: the ceiling, possible only where the data is public
  (a demo or a benchmark).

Training goes through :mod:`privacy.training` (the site's own DP-SGD and its accountant).
A value the study imputes is filled in with the model's own imputation values before the
rows reach DP-SGD's input check (:func:`fedward.preprocessing.fill_missing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedward.preprocessing import fill_missing
from privacy import compose_mechanisms, expected_steps, sample_rate_for, train_dp
from privacy.mechanisms import DpSgd, Mechanism
from privacy.release import noise_multiplier_after, statistics_release
from privacy.roc_auc import class_auc
from privacy.training import train_plain

if TYPE_CHECKING:
    from torch import nn

    from fedward.tasks import TaskSpec

__all__ = ["LocalOnly", "classification_metrics", "held_out_metrics", "local_only_plan",
           "train_local_only", "train_pooled"]


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, AUC, balanced accuracy and Brier score of class probabilities.

    AUC: binary, of class 1's probability (rank statistic, ties counted half); multiclass,
    the one-vs-rest mean over the classes present; ``nan`` with a single class present.
    Balanced accuracy: the mean recall over the classes present. Brier score: the mean over
    rows of the squared distance between the probabilities and the one-hot label (binary:
    twice the familiar single-probability score's value, as the sum runs over both classes).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pred = p.argmax(axis=1)
    present = sorted(set(y.tolist()))
    recalls = [float(np.mean(pred[y == c] == c)) for c in present]
    onehot = np.eye(p.shape[1])[y]
    return {"accuracy": float(np.mean(pred == y)),
            "auc": class_auc(y, p),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,
            "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1)))}


def held_out_metrics(model: nn.Module, features: np.ndarray, labels: np.ndarray
                     ) -> dict[str, float]:
    """:func:`classification_metrics` of ``model`` on a held-out split (raw rows: a model
    that imputes does so itself)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(features, dtype=np.float32)))
        probs = torch.softmax(logits, dim=1).numpy()
    return classification_metrics(probs, labels)


@dataclass(frozen=True)
class LocalOnly:
    """A site's local-only DP model and what it cost.

    Attributes:
        model: the trained model (the task's, with the run's preprocessing).
        epsilon_spent: the epsilon of everything charged for it (statistics included).
        noise_multiplier: the DP-SGD noise multiplier it was trained with.
    """

    model: nn.Module
    epsilon_spent: float
    noise_multiplier: float


def _fill(task: TaskSpec, x: np.ndarray) -> np.ndarray:
    fill = task.model_params.get("fill")
    return fill_missing(x, fill if isinstance(fill, list) else None)


def local_only_plan(*, n_features: int, n_train: int, epsilon: float, delta: float,
                    rounds: int, local_epochs: int, batch_size: int,
                    statistics_epsilon: float | None) -> tuple[list[Mechanism], DpSgd]:
    """What a local-only model at the federated run's budget discloses: the statistics
    release the run's budget also paid for (when it had one), and the DP-SGD of ``rounds``
    x ``local_epochs`` epochs on ``n_train`` rows at the noise multiplier that fills the
    rest of ``epsilon`` (:func:`privacy.release.noise_multiplier_after`), as the site's
    ledger plans a run."""
    q = sample_rate_for(n_examples=n_train, batch_size=batch_size)
    prior: list[Mechanism] = []
    if statistics_epsilon is not None:
        prior.append(statistics_release(n_features=n_features, epsilon=statistics_epsilon,
                                        delta=delta))
    sigma = noise_multiplier_after(prior=prior, epsilon=epsilon, delta=delta, sample_rate=q,
                                   total_epochs=rounds * local_epochs)
    steps = rounds * expected_steps(n_examples=n_train, batch_size=batch_size,
                                    epochs=local_epochs)
    return prior, DpSgd(noise_multiplier=sigma, sample_rate=q, steps=steps)


def train_local_only(*, task: TaskSpec, train_x: np.ndarray, train_y: np.ndarray,
                     epsilon: float, delta: float, rounds: int, local_epochs: int,
                     batch_size: int, lr: float, max_grad_norm: float,
                     statistics_epsilon: float | None, seed: int,
                     plan: tuple[list[Mechanism], DpSgd] | None = None) -> LocalOnly:
    """Train ``task``'s model on one site's rows with DP-SGD, at the federated run's budget.

    The noise multiplier is the one the site's ledger would plan for a run of ``rounds`` x
    ``local_epochs`` epochs whose budget also pays for the statistics release
    (:func:`local_only_plan`), so the local-only model gets the same epsilon as the site
    spends in the federated run, statistics included. ``plan``: that plan, when the caller
    has made it already (and charged it).
    """
    prior, sgd = plan or local_only_plan(
        n_features=task.n_features, n_train=len(train_y), epsilon=epsilon, delta=delta,
        rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
        statistics_epsilon=statistics_epsilon)
    x = _fill(task, train_x)
    sigma = sgd.noise_multiplier
    model = task.build(seed=seed)
    history: Any = ()
    steps = 0
    for r in range(rounds):
        result = train_dp(model=model, features=x, labels=train_y, noise_multiplier=sigma,
                          max_grad_norm=max_grad_norm, batch_size=batch_size,
                          epochs=local_epochs, lr=lr, seed=seed * 1000 + r, history=history)
        history = result.accountant_history
        steps += result.steps
    if steps > sgd.steps:
        raise RuntimeError(f"local-only training took {steps} DP-SGD steps, more than the "
                           f"{sgd.steps} planned")
    spent = compose_mechanisms([*prior, sgd], delta=delta).epsilon
    return LocalOnly(model=model, epsilon_spent=float(spent), noise_multiplier=float(sigma))


def train_pooled(*, task: TaskSpec, train_x: np.ndarray, train_y: np.ndarray,
                 epochs: int, batch_size: int, lr: float, seed: int) -> nn.Module:
    """The pooled, non-private model: every site's training rows together, no DP."""
    model = task.build(seed=seed)
    train_plain(model=model, features=_fill(task, train_x), labels=train_y,
                batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
    return model
