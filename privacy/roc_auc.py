"""ROC AUC of scores against binary truth, in numpy.

The same figure as scikit-learn's ``roc_auc_score`` for binary labels: the area under the
ROC curve equals the Mann-Whitney statistic, the probability that a random positive scores
above a random negative, a tie counting one half. Computed from the scores' ranks (tied
scores share their mean rank). The site's evaluation, membership audit and drift check
use it; importing scikit-learn for it cost a site agent over a second at every start.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["binary_auc", "class_auc"]


def _mean_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Start index of each run of equal values in sorted order, and the run's mean rank.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0       # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_auc(truth: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC of ``scores`` for the positives marked in ``truth``.

    Args:
        truth: one label per example; nonzero (or ``True``) marks a positive.
        scores: one finite score per example; higher means more likely positive.

    Returns:
        The AUC in [0, 1].

    Raises:
        ValueError: for lengths that differ, no examples, a score that is not finite, or
            labels of one kind only (AUC is undefined then).
    """
    t = np.asarray(truth).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"{t.size} labels but {s.size} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("every score must be a finite number")
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative example")
    rank_sum = float(_mean_ranks(s)[t].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def class_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of a classifier's probabilities (examples x classes) for class numbers.

    Binary: the AUC of class 1's probability. Multiclass: the one-vs-rest macro average
    over the classes present in ``labels`` (the definition of scikit-learn's
    ``multi_class="ovr"``, which refuses outright when a class is missing). ``nan`` when
    the labels hold a single class, where AUC is undefined (a small site's held-out split
    can be like that).
    """
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([binary_auc(labels == c, probs[:, c]) for c in present]))
