"""Imputation and scaling composed from a run's DP statistics and built into the model.

A study whose features use every imputation rule; a reference document in the shared
format (what the coordinator sums from the sites' noised releases); the rule of
fedward.preprocessing; the model that imputes a NaN input inside itself; the site's
encoding that leaves a value to impute as NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedward.preprocessing import (
    Preprocessing,
    PreprocessingError,
    compose,
    model_params,
)
from fedward.study import StudySpec, parse_spec
from fedward.tasks import study_task

from study_support import IMPUTED_SPEC as SPEC
from study_support import flat_counts, reference_entry
from study_support import imputed_reference as reference


@pytest.fixture(scope="module")
def spec() -> StudySpec:
    return parse_spec(SPEC, check_dp=False)


def test_the_rule_from_the_dp_statistics(spec: StudySpec) -> None:
    pre = compose(spec, reference())
    assert pre.impute["age"] == 57.3                           # the DP mean
    assert pre.impute["chol"] == pytest.approx(275.0)          # the histogram's median
    assert pre.impute["sex"] == 1.0                            # male: more ones
    assert pre.impute["fbs"] == 0.0                            # more zeros than ones
    assert pre.impute["slope"] == 1.0                          # flat: the fullest level bin
    assert set(pre.impute) == {"age", "chol", "sex", "fbs", "slope"}   # bp: indicator
    assert pre.scaling["age"] == (57.3, 9.0)
    # A scale below a twentieth of the range's width is held at it; no mean: the midpoint.
    assert pre.scaling["bp"] == (140.0, 10.0)
    assert pre.scaling["chol"] == (350.0, 125.0)
    assert set(pre.scaling) == {"age", "chol", "bp"}
    # What travels is checked against the study at the site.
    assert Preprocessing.from_json(pre.to_json(), spec) == pre


def test_a_mean_the_reference_does_not_state_falls_back_to_the_midpoint(
        spec: StudySpec) -> None:
    pre = compose(spec, reference(age=reference_entry("age", flat_counts())))
    assert pre.impute["age"] == 60.0 and pre.scaling["age"] == (60.0, 20.0)
    with pytest.raises(PreprocessingError, match="lack the study's columns sex=male"):
        compose(spec, {"features": [e for e in reference()["features"]
                                    if e["name"] != "sex=male"]})


@pytest.mark.parametrize(("doc", "why"), [
    ({"impute": {"bp": 1.0}, "scaling": {}}, "bp: the study does not impute it"),
    ({"impute": {"slope": 3.0}, "scaling": {}}, "slope: 3.0 is not a level index"),
    ({"impute": {"fbs": 0.5}, "scaling": {}}, "a boolean imputes 0 or 1"),
    ({"impute": {}, "scaling": {"sex": [0, 1]}}, "only a numeric feature"),
    ({"impute": {}, "scaling": {"age": [50, 0]}}, "a positive scale"),
])
def test_a_site_refuses_preprocessing_that_does_not_fit_its_study(
        spec: StudySpec, doc: dict[str, Any], why: str) -> None:
    with pytest.raises(PreprocessingError, match=why):
        Preprocessing.from_json(json.dumps({"version": 1, **doc}), spec)
    with pytest.raises(PreprocessingError, match="not the expected JSON"):
        Preprocessing.from_json("[1]", spec)


def test_the_model_imputes_and_scales_inside_itself(spec: StudySpec) -> None:
    pre = compose(spec, reference())
    task = study_task(spec, pre)
    assert task.feature_columns == study_task(spec).feature_columns
    params = model_params(spec, pre, study_task(spec).model_params)
    # Columns: age, chol, sex=female, sex=male, fbs, slope, bp, bp__missing.
    assert params["fill"] == [57.3, pytest.approx(275.0), 0.0, 1.0, 0.0, 1.0, None, None]
    assert params["low"][0] == 57.3 and params["high"][0] == pytest.approx(66.3)
    model = task.build(seed=0).eval()
    nan = float("nan")
    raw = torch.tensor([[nan, nan, nan, nan, nan, nan, 120.0, 0.0]])
    filled = torch.tensor([[57.3, 275.0, 0.0, 1.0, 0.0, 1.0, 120.0, 0.0]])
    with torch.no_grad():
        got, want = model(raw), model(filled)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    # The imputation values are architecture, not weights: nothing more travels in a round.
    assert set(model.state_dict()) == set(study_task(spec).build(seed=0).state_dict())


def test_the_site_leaves_a_value_to_impute_missing_for_the_model(spec: StudySpec) -> None:
    from site_agent.data_report import DataReport
    from site_agent.mapping_apply import MappedData, encode

    nan = np.nan
    mapped = MappedData(
        report=DataReport(problems=[], warnings=[], n_rows=3),
        values={"age": np.array([30.0, nan, 50.0]), "chol": np.array([200.0, 300.0, nan]),
                "sex": np.array([0.0, nan, 1.0]), "fbs": np.array([nan, 1.0, 0.0]),
                "slope": np.array([2.0, 0.0, nan]), "bp": np.array([nan, 130.0, 120.0])},
        labels=np.array([0, 1, 1]), rows=[2, 3, 4])
    x, y, dropped = encode(spec, mapped)
    assert (x.shape, dropped, y.tolist()) == ((3, 8), 0, [0, 1, 1])
    assert np.isnan(x[1, 0]) and np.isnan(x[2, 1]) and np.isnan(x[0, 4])
    assert np.isnan(x[1, 2:4]).all()                 # a missing level: NaN in each one-hot
    assert x[0, 6] == 50.0 and x[0, 7] == 1.0        # indicator: low end, flagged
    pre = compose(spec, reference())
    model = study_task(spec, pre).build(seed=0).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.from_numpy(x))).all()


def test_a_site_trains_a_study_that_imputes_only_with_the_runs_preprocessing(
        spec: StudySpec, tmp_path: Path) -> None:
    from fedward.models import model_arrays
    from fedward.wire import CFG, SiteErrorCode
    from privacy import PrivacyLedger
    from site_agent.data import split_site_data
    from site_agent.trainer import WarmTrainer

    rng = np.random.default_rng(1)
    n = 96
    x = np.column_stack([rng.uniform(30, 80, n), rng.uniform(150, 400, n),
                         np.eye(2)[rng.integers(0, 2, n)], rng.integers(0, 2, n),
                         rng.integers(0, 3, n), rng.uniform(100, 160, n), np.zeros(n)])
    x[::5, 0] = np.nan                      # age not recorded: the study imputes it
    y = (x[:, 1] > 275).astype(np.int64)
    data = split_site_data(x=x.astype(np.float32), y=y, n_rows=n, content=b"rows",
                           schema_hash="a" * 64, holdout_fraction=0.25, seed=0)
    trainer = WarmTrainer(site_name="hospital-a", task="imputed", data=data, study=spec,
                          ledger=PrivacyLedger(tmp_path / "l.sqlite"),
                          replies_dir=tmp_path / "replies")
    config = {CFG.RUN_ID: "run-i", CFG.PROJECT: "cardio", CFG.TASK: "imputed",
              CFG.STUDY: "imputed@1", CFG.STUDY_HASH: spec.content_hash(), CFG.ROUND: 1,
              CFG.TOTAL_ROUNDS: 1, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
              CFG.CLIP: 1.0, CFG.LR: 0.1, CFG.BATCH: 16, CFG.SEED: 1, CFG.TRAIN: True}
    start = model_arrays(study_task(spec).build(seed=0))
    reply, _ = trainer.handle({"kind": "train", "config": config}, start)
    assert reply["error"]["code"] == SiteErrorCode.BAD_TASK
    assert "missing values in features the study imputes (age, chol, sex, fbs, slope)" \
        in reply["error"]["reason"] and "--statistics" in reply["error"]["reason"]
    bad = Preprocessing(impute={"bp": 1.0}).to_json()
    reply, _ = trainer.handle({"kind": "train", "config": {
        **config, CFG.PREPROCESSING: bad}}, start)
    assert "bp: the study does not impute it" in reply["error"]["reason"]
    pre = compose(spec, reference()).to_json()
    reply, out = trainer.handle({"kind": "train", "config": {
        **config, CFG.PREPROCESSING: pre}}, start)
    assert "error" not in reply, reply
    assert set(out) == set(start) and all(np.isfinite(v).all() for v in out.values())


# --- evaluation baselines (site_agent.baselines) -------------------------------------------


def test_the_baseline_metrics_are_the_textbook_ones() -> None:
    from sklearn.metrics import balanced_accuracy_score, brier_score_loss, roc_auc_score

    from site_agent.baselines import classification_metrics

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1)
    probs = np.column_stack([1 - p1, p1])
    got = classification_metrics(probs, y)
    assert got["accuracy"] == pytest.approx(np.mean((p1 > 0.5) == y))
    assert got["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert got["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, (p1 > 0.5).astype(int)))
    # Over both classes: twice the single-probability Brier score.
    assert got["brier"] == pytest.approx(2 * brier_score_loss(y, p1))
    assert np.isnan(classification_metrics(probs[y == 1], y[y == 1])["auc"])


def test_a_local_only_model_spends_the_runs_budget_and_the_pooled_one_none(
        spec: StudySpec) -> None:
    from site_agent.baselines import held_out_metrics, train_local_only, train_pooled

    rng = np.random.default_rng(2)
    n = 240
    age = rng.uniform(30, 80, n)
    y = (age + rng.normal(0, 5, n) > 55).astype(np.int64)
    x = np.column_stack([age, rng.uniform(150, 400, n), np.eye(2)[rng.integers(0, 2, n)],
                         rng.integers(0, 2, n), rng.integers(0, 3, n),
                         rng.uniform(100, 160, n), np.zeros(n)]).astype(np.float32)
    x[::7, 0] = np.nan                     # imputed by the run's preprocessing
    task = study_task(spec, compose(spec, reference()))
    local = train_local_only(task=task, train_x=x[:180], train_y=y[:180], epsilon=3.0,
                             delta=1e-5, rounds=3, local_epochs=2, batch_size=32, lr=0.5,
                             max_grad_norm=1.0, statistics_epsilon=0.3, seed=0)
    assert 2.9 <= local.epsilon_spent <= 3.0 and local.noise_multiplier > 0
    pooled = train_pooled(task=task, train_x=x[:180], train_y=y[:180], epochs=30,
                          batch_size=32, lr=0.5, seed=0)
    for model in (local.model, pooled):
        figures = held_out_metrics(model, x[180:], y[180:])
        assert set(figures) == {"accuracy", "auc", "balanced_accuracy", "brier"}
        assert all(0.0 <= v <= 2.0 for v in figures.values())
    assert held_out_metrics(pooled, x[180:], y[180:])["auc"] > 0.8
