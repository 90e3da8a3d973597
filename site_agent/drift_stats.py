"""Drift statistics of a released model at a site: PSI, a two-sample test, accuracy, AUC.

Pure functions on binned counts, shared by the site's check (:mod:`site_agent.drift`), its
benchmark and its tests. Nothing here reads data or talks to the network.

* **Population stability index** per feature, between the reference histogram shipped in
  the release (the study's federated DP statistics) and the site's recent rows binned on
  the same edges: :func:`fedward.drift_psi.psi` (re-exported here with its binning and
  floor), the PSI that ``fedward-serve`` scores its answered inputs with too.
* **Two-sample chi-square test of homogeneity** on the same bins (the site's counts
  against the reference's): ``X2 = sum_i (a_i - e_i)^2 / (p_i (1/n_a + 1/n_e) + v_i)``
  with ``p_i`` the pooled proportion, ``B' - 1`` degrees of freedom (``B'`` the bins
  that are not empty on both sides) and its upper-tail p-value. With ``v_i = 0`` this is
  Pearson's chi-square of the 2 x B table. When the site's counts carry DP noise of
  standard deviation ``s`` (the disclosed report) and the reference's of ``r`` (its DP
  noise summed over the sites), ``v_i = s^2 / n_a^2 + r^2 / n_e^2`` adds the noises'
  variances to the denominator, so the noise alone does not read as drift.
* **Accuracy and AUC** from counts that can be noised: the number of correct predictions,
  and per class a histogram of the predicted probability of class 1 on :data:`SCORE_BINS`
  bins (two-class tasks; the AUC of binned scores counts ties as half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy.stats import chi2

from fedward.drift_psi import noise_floor, psi

__all__ = ["ROW_BUCKETS", "SCORE_BINS", "FeatureScore", "auc_from_histograms", "chi_square",
           "feature_score", "row_bucket"]

SCORE_BINS: Final = 20
# What leaves about how many rows a check read: a bucket, never the count.
ROW_BUCKETS: Final = ((0, 49, "<50"), (50, 99, "50-99"), (100, 249, "100-249"),
                      (250, 499, "250-499"), (500, 999, "500-999"),
                      (1000, 4999, "1000-4999"), (5000, None, "5000+"))


@dataclass(frozen=True)
class FeatureScore:
    """One feature's drift figures.

    Attributes:
        psi: Population stability index against the reference.
        chi2: The two-sample chi-square statistic.
        dof: Its degrees of freedom (0: nothing to test).
        p_value: Its upper-tail p-value (1.0 when dof is 0).
    """

    psi: float
    chi2: float
    dof: int
    p_value: float


def chi_square(observed: np.ndarray, reference: np.ndarray, *, noise_std: float = 0.0,
               ref_noise_std: float = 0.0) -> tuple[float, int, float]:
    """Two-sample chi-square test of homogeneity (see the module docstring).

    Args:
        observed: The site's counts per bin (negatives, from noise, count as 0).
        reference: The reference counts on the same bins.
        noise_std: Standard deviation of the noise on each of ``observed``'s counts.
        ref_noise_std: The same for the reference's counts (its DP noise, summed over
            the sites that released it).

    Returns:
        ``(statistic, degrees of freedom, p-value)``; ``(0.0, 0, 1.0)`` when one side
        is empty or a single bin holds everything.
    """
    o = np.clip(np.asarray(observed, dtype=np.float64), 0.0, None)
    r = np.clip(np.asarray(reference, dtype=np.float64), 0.0, None)
    n_o, n_r = o.sum(), r.sum()
    if n_o <= 0 or n_r <= 0:
        return 0.0, 0, 1.0
    keep = (o + r) > 0
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 0.0, 0, 1.0
    pooled = (o[keep] + r[keep]) / (n_o + n_r)
    diff = o[keep] / n_o - r[keep] / n_r
    var = pooled * (1.0 / n_o + 1.0 / n_r) + (noise_std / n_o) ** 2 \
        + (ref_noise_std / n_r) ** 2
    stat = float(np.sum(diff * diff / var))
    return stat, dof, float(chi2.sf(stat, dof))


def feature_score(observed: np.ndarray, reference: np.ndarray, *, noise_std: float = 0.0,
                  ref_noise_std: float = 0.0) -> FeatureScore:
    """PSI and the chi-square test of one feature.

    With noised counts (the site's, the reference's or both) the PSI's floor is raised to
    two noise standard deviations' share of the rows: noise in a bin that is empty on the
    other side would otherwise read as a shift (a noised count of 6 against a floor of
    0.01 % weighs as much as a real one).
    """
    stat, dof, p = chi_square(observed, reference, noise_std=noise_std,
                              ref_noise_std=ref_noise_std)
    floor = noise_floor(observed, reference, noise_std=noise_std, ref_noise_std=ref_noise_std)
    return FeatureScore(psi=psi(observed, reference, floor=floor), chi2=stat, dof=dof,
                        p_value=p)


def auc_from_histograms(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """AUC from score histograms of the two classes (ties count as half).

    Args:
        negatives: Counts per score bin of rows whose label is class 0 (may be noised).
        positives: The same for class 1.

    Returns:
        The AUC, or None when a class has no rows.
    """
    neg = np.clip(np.asarray(negatives, dtype=np.float64), 0.0, None)
    pos = np.clip(np.asarray(positives, dtype=np.float64), 0.0, None)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg <= 0 or n_pos <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])   # negatives in lower bins
    wins = float(np.sum(pos * (below + 0.5 * neg)))
    return float(min(1.0, max(0.0, wins / float(n_neg * n_pos))))


def row_bucket(n: float) -> str:
    """The bucket of :data:`ROW_BUCKETS` a row count falls in (a noised count rounds)."""
    k = max(0, math.floor(n + 0.5))
    for low, high, label in ROW_BUCKETS:
        if k >= low and (high is None or k <= high):
            return label
    raise AssertionError("unreachable: the buckets cover every count")
