"""Membership-inference audit of a model on one site's own rows.

What a model card's epsilon promises is a bound; this audit measures what an attacker who
holds the model and a candidate record could actually tell: whether the record was one of
the site's training rows (a *member*) or one of its held-out rows (a *non-member*). Two
attacks, both on per-example cross-entropy losses:

- **loss threshold** (Yeom et al., 2018): members tend to have lower loss; the score is the
  negative loss.
- **class-calibrated loss**: the loss standardised by the mean and spread of the held-out
  losses of the record's own class, so that a class that is simply harder does not pass for
  a sign of membership (difficulty calibration, as in Watson et al., 2022, with per-class
  statistics in place of reference models: a site trains no shadow models).

Each attack gives an AUC (0.5 is guessing). The **empirical epsilon lower bound** follows
the auditing literature (Jagielski et al., 2020; Nasr et al., 2021): an attack with true- and
false-positive rates TPR and FPR at a threshold proves epsilon >= log((TPR - delta) / FPR)
(and the complementary form). The threshold is chosen on one half of the rows and the rates
are measured on the other half with 95% Clopper-Pearson bounds (TPR's lower, FPR's upper),
so the bound is a statistically valid lower bound, not an optimistic fit.

What leaves a site is coarse: AUCs rounded *up* to a hundredth, the epsilon bound rounded
*down* to a tenth (both in the conservative direction for a privacy statement). They are
computed on private rows without noise; the model card lists them among the figures DP does
not cover.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from scipy.stats import beta
from torch import nn

from privacy.roc_auc import binary_auc

__all__ = [
    "AUC_STEP",
    "EPSILON_STEP",
    "MembershipAudit",
    "audit_membership",
    "coarse_auc",
    "coarse_epsilon_bound",
    "epsilon_lower_bound",
    "per_example_losses",
]

AUC_STEP: Final = 0.01
EPSILON_STEP: Final = 0.1
CONFIDENCE: Final = 0.95
MIN_ROWS: Final = 10  # per side: fewer members or non-members and there is no audit


@dataclass(frozen=True)
class MembershipAudit:
    """The audit's figures (exact; :meth:`coarse` gives what may leave a site).

    Attributes:
        loss_auc: AUC of the loss-threshold attack.
        calibrated_auc: AUC of the class-calibrated loss attack.
        epsilon_lower_bound: The empirical epsilon lower bound of the stronger attack.
        n_members: Training rows audited.
        n_nonmembers: Held-out rows audited.
    """

    loss_auc: float
    calibrated_auc: float
    epsilon_lower_bound: float
    n_members: int
    n_nonmembers: int

    @property
    def auc(self) -> float:
        """The stronger attack's AUC (the figure a card leads with)."""
        return max(self.loss_auc, self.calibrated_auc)

    def coarse(self) -> dict[str, float]:
        """The figures that may leave a site, on their coarse grids (see module docstring)."""
        return {
            "mia-auc": coarse_auc(self.auc),
            "mia-loss-auc": coarse_auc(self.loss_auc),
            "mia-calibrated-auc": coarse_auc(self.calibrated_auc),
            "mia-epsilon-lb": coarse_epsilon_bound(self.epsilon_lower_bound),
            "mia-n": float(min(self.n_members, self.n_nonmembers)),
        }


def coarse_auc(value: float) -> float:
    """An attack AUC rounded up to :data:`AUC_STEP` (clipped to [0, 1])."""
    steps = math.ceil(min(max(value, 0.0), 1.0) / AUC_STEP - 1e-9)
    return round(steps * AUC_STEP, 2)


def coarse_epsilon_bound(value: float) -> float:
    """An epsilon lower bound rounded down to :data:`EPSILON_STEP` (never below 0)."""
    steps = math.floor(max(value, 0.0) / EPSILON_STEP + 1e-9)
    return round(steps * EPSILON_STEP, 1)


def per_example_losses(model: nn.Module, features: np.ndarray,
                       labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each row under ``model`` (eval mode, no gradients)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    finally:
        model.train(was_training)
    out = losses.numpy().astype(np.float64)
    if np.isnan(out).any():
        raise ValueError("the model gives NaN losses: it cannot be audited")
    # A probability of exactly 0 gives an infinite loss: the largest loss still ranks last.
    return np.minimum(out, 1e6)


def _calibrated(losses: np.ndarray, labels: np.ndarray, ref_losses: np.ndarray,
                ref_labels: np.ndarray) -> np.ndarray:
    """Negative loss standardised by the reference rows' loss statistics of each class."""
    out = np.empty_like(losses)
    for c in np.unique(labels):
        ref = ref_losses[ref_labels == c]
        mean = float(ref.mean()) if ref.size else float(ref_losses.mean())
        spread = float(ref.std()) if ref.size > 1 else float(ref_losses.std())
        out[labels == c] = -(losses[labels == c] - mean) / max(spread, 1e-12)
    return out


def _clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _bound(tpr_low: float, fpr_high: float, delta: float) -> float:
    if fpr_high <= 0.0 or tpr_low - delta <= 0.0:
        return 0.0
    return max(0.0, math.log((tpr_low - delta) / fpr_high))


def epsilon_lower_bound(member_scores: np.ndarray, nonmember_scores: np.ndarray, *,
                        delta: float, seed: int = 0,
                        confidence: float = CONFIDENCE) -> float:
    """A valid empirical epsilon lower bound of an attack (higher score = "member").

    The threshold is picked on a random half of each side (the best point estimate), the
    rates are measured on the other half with Clopper-Pearson bounds; both directions of
    the DP inequality are tried.

    Args:
        member_scores: The attack's scores of member rows.
        nonmember_scores: Its scores of non-member rows.
        delta: The delta of the DP guarantee the bound is read against.
        seed: Seed of the split into halves.
        confidence: Two-sided confidence of the rate bounds.

    Returns:
        The bound (0.0 when the attack proves nothing).
    """
    rng = np.random.default_rng(seed)
    m = rng.permutation(member_scores)
    n = rng.permutation(nonmember_scores)
    m_pick, m_test = m[: len(m) // 2], m[len(m) // 2:]
    n_pick, n_test = n[: len(n) // 2], n[len(n) // 2:]
    if min(len(m_pick), len(m_test), len(n_pick), len(n_test)) == 0:
        return 0.0
    best_t, best_point = 0.0, -math.inf
    for t in np.unique(np.concatenate([m_pick, n_pick])):
        tpr = float(np.mean(m_pick >= t))
        fpr = float(np.mean(n_pick >= t))
        for point in (_bound(tpr, fpr, delta), _bound(1 - fpr, 1 - tpr, delta)):
            if point > best_point:
                best_t, best_point = float(t), point
    tp, fp = int(np.sum(m_test >= best_t)), int(np.sum(n_test >= best_t))
    tpr_lo, _ = _clopper_pearson(tp, len(m_test), confidence)
    _, fpr_hi = _clopper_pearson(fp, len(n_test), confidence)
    return max(_bound(tpr_lo, fpr_hi, delta), _bound(1 - fpr_hi, 1 - tpr_lo, delta))


def audit_membership(*, model: nn.Module, train_x: np.ndarray, train_y: np.ndarray,
                     test_x: np.ndarray, test_y: np.ndarray, delta: float,
                     seed: int = 0) -> MembershipAudit:
    """Run both attacks of ``model`` with the training rows as members.

    Members are subsampled to as many rows as there are non-members (a balanced audit; the
    AUC does not need it, the epsilon bound's rates are read per side anyway).

    Args:
        model: The model audited (plain torch module producing logits).
        train_x: Training features (members).
        train_y: Training labels.
        test_x: Held-out features (non-members).
        test_y: Held-out labels.
        delta: The run's delta.
        seed: Seed of the subsampling and of the bound's split.

    Returns:
        The :class:`MembershipAudit`.

    Raises:
        ValueError: Fewer than :data:`MIN_ROWS` rows on either side.
    """
    if len(train_y) < MIN_ROWS or len(test_y) < MIN_ROWS:
        raise ValueError(f"a membership audit needs at least {MIN_ROWS} training and "
                         f"{MIN_ROWS} held-out rows (has {len(train_y)} and {len(test_y)})")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(train_y))[: len(test_y)])
    mx, my = np.asarray(train_x)[keep], np.asarray(train_y)[keep]
    m_loss = per_example_losses(model, mx, my)
    n_loss = per_example_losses(model, test_x, test_y)
    truth = np.concatenate([np.ones(len(m_loss)), np.zeros(len(n_loss))])
    loss_scores = -np.concatenate([m_loss, n_loss])
    cal_m = _calibrated(m_loss, my, n_loss, np.asarray(test_y))
    cal_n = _calibrated(n_loss, np.asarray(test_y), n_loss, np.asarray(test_y))
    loss_auc = float(binary_auc(truth, loss_scores))
    cal_auc = float(binary_auc(truth, np.concatenate([cal_m, cal_n])))
    bound = max(epsilon_lower_bound(-m_loss, -n_loss, delta=delta, seed=seed),
                epsilon_lower_bound(cal_m, cal_n, delta=delta, seed=seed))
    return MembershipAudit(loss_auc=loss_auc, calibrated_auc=cal_auc,
                           epsilon_lower_bound=bound, n_members=len(m_loss),
                           n_nonmembers=len(n_loss))
