"""privacy.roc_auc: the numpy ROC AUC the sites use, against scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from privacy.roc_auc import binary_auc, class_auc


@pytest.mark.parametrize("seed", range(6))
def test_it_equals_sklearn_with_and_without_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    truth = rng.integers(0, 2, n)
    truth[:2] = [0, 1]                                  # both kinds present
    scores = rng.normal(size=n) + truth * rng.uniform(0, 2)
    if seed % 2:
        scores = np.round(scores, 1)                    # many ties, across the two kinds
    assert binary_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_perfect_reversed_and_all_tied() -> None:
    truth = np.array([0, 0, 1, 1])
    assert binary_auc(truth, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert binary_auc(truth, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert binary_auc(truth, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert binary_auc([False, True, True], [0.3, 0.3, 0.7]) == 0.75


@pytest.mark.parametrize(("truth", "scores", "says"), [
    ([0, 0, 0], [0.1, 0.2, 0.3], "at least one positive and one negative"),
    ([0, 1], [0.1, float("nan")], "finite"),
    ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
])
def test_what_it_refuses(truth: list[int], scores: list[float], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        binary_auc(truth, scores)


def test_class_auc_is_sklearns_binary_and_one_vs_rest_auc() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 120)
    probs = rng.dirichlet(np.ones(3), 120) + np.eye(3)[labels] * 0.3
    probs /= probs.sum(axis=1, keepdims=True)
    assert class_auc(labels, probs) == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)
    two = probs[:, :2] / probs[:, :2].sum(axis=1, keepdims=True)
    binary = labels.clip(max=1)
    assert class_auc(binary, two) == pytest.approx(roc_auc_score(binary, two[:, 1]), abs=1e-12)
    assert np.isnan(class_auc(np.zeros(5, dtype=int), two[:5]))
