"""The membership-inference audit (privacy.membership): it tells a memorising model from a
DP-trained one, and what may leave a site is coarse and conservative."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler

from fedward.tasks import build_model
from privacy.membership import (
    audit_membership,
    coarse_auc,
    coarse_epsilon_bound,
    epsilon_lower_bound,
)
from privacy.training import train_dp, train_plain


def _tiny_site() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """40 training and 40 held-out rows of real features with labels they do not
    determine: a model fits the training labels only by memorising its rows."""
    x, _ = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    y = rng.integers(0, 2, len(x))
    tr, te = idx[:40], idx[40:80]
    scale = StandardScaler().fit(x[tr])
    return (scale.transform(x[tr]).astype(np.float32), y[tr],
            scale.transform(x[te]).astype(np.float32), y[te])


def test_a_model_trained_without_dp_on_a_tiny_site_leaks_more_than_a_dp_one() -> None:
    xtr, ytr, xte, yte = _tiny_site()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = build_model("breast_cancer_mlp", seed=0)
        train_plain(model=plain, features=xtr, labels=ytr, batch_size=10, epochs=150,
                    lr=0.01, seed=0, optimizer="adam")
        private = build_model("breast_cancer_mlp", seed=0)
        train_dp(model=private, features=xtr, labels=ytr, noise_multiplier=2.0,
                 max_grad_norm=1.0, batch_size=10, epochs=20, lr=0.05, seed=0,
                 optimizer="adam")
    leaky = audit_membership(model=plain, train_x=xtr, train_y=ytr, test_x=xte, test_y=yte,
                             delta=1e-5)
    safe = audit_membership(model=private, train_x=xtr, train_y=ytr, test_x=xte, test_y=yte,
                            delta=1e-5)
    assert leaky.auc >= 0.7, leaky
    assert safe.auc <= 0.62, safe
    assert leaky.auc - safe.auc >= 0.15
    assert leaky.epsilon_lower_bound > safe.epsilon_lower_bound == 0.0
    coarse = leaky.coarse()
    assert set(coarse) == {"mia-auc", "mia-loss-auc", "mia-calibrated-auc", "mia-epsilon-lb",
                           "mia-n"}
    assert coarse["mia-auc"] >= leaky.auc and coarse["mia-epsilon-lb"] <= leaky.epsilon_lower_bound


def test_the_epsilon_bound_is_zero_for_a_guessing_attack_and_grows_with_separation() -> None:
    rng = np.random.default_rng(1)
    same = epsilon_lower_bound(rng.normal(size=400), rng.normal(size=400), delta=1e-5)
    apart = epsilon_lower_bound(rng.normal(3, 1, 400), rng.normal(size=400), delta=1e-5)
    assert same == 0.0
    assert apart > 1.0


def test_coarse_figures_round_in_the_conservative_direction() -> None:
    assert coarse_auc(0.501) == 0.51
    assert coarse_auc(0.5) == 0.5
    assert coarse_auc(1.2) == 1.0
    assert coarse_epsilon_bound(0.69) == 0.6
    assert coarse_epsilon_bound(-1.0) == 0.0


def test_too_few_rows_are_refused_with_the_reason() -> None:
    xtr, ytr, xte, yte = _tiny_site()
    with pytest.raises(ValueError, match="at least 10 training and 10 held-out rows"):
        audit_membership(model=build_model("breast_cancer_mlp", seed=0), train_x=xtr,
                         train_y=ytr, test_x=xte[:5], test_y=yte[:5], delta=1e-5)
