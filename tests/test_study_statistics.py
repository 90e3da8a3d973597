"""The statistics phase for a study of one's own: bins from the spec, per-level counts,
missing rates, the charge, and the launch that used to be refused.

The study is tests/fixtures/heart_study.yaml (numeric features with plausible ranges, two
categoricals, a boolean, an ordinal, indicator and drop-row rules): not a shipped task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedward.statistics import (
    BINS,
    expected_shape,
    feature_bins,
    reference_document,
)
from fedward.study import load_spec
from fedward.tasks import TaskSpec, study_task
from fedward.wire import CFG
from privacy import Caps, PrivacyLedger, compose_mechanisms
from site_agent.statistics import (
    exact_sums,
    pending_statistics,
    release_statistics,
    statistics_mechanism,
)

STUDY = Path(__file__).parent / "fixtures" / "heart_study.yaml"


@pytest.fixture(scope="module")
def task() -> TaskSpec:
    return study_task(load_spec(STUDY, check_dp=False))


def config(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        CFG.RUN_ID: "run-h", CFG.PROJECT: "cardio", CFG.TASK: "heart_disease", CFG.ROUND: 0,
        CFG.TOTAL_ROUNDS: 3, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
        CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: False,
        CFG.STATISTICS: True, CFG.STATISTICS_EPSILON: 0.3,
    }
    out.update(overrides)
    return out


def test_a_study_of_its_own_is_binned_over_its_spec_ranges(task: TaskSpec,
                                                           tmp_path: Path) -> None:
    bins = feature_bins(task)
    assert [b.name for b in bins] == list(task.feature_columns)
    by_name = {b.name: (b.low, b.high) for b in bins}
    assert by_name["age"] == (18.0, 100.0)              # a numeric feature's plausible range
    assert by_name["cholesterol"] == (2.0, 15.0)
    assert by_name["sex=male"] == (0.0, 1.0)            # one-hot level
    assert by_name["fasting_sugar_high"] == (0.0, 1.0)  # boolean
    assert by_name["st_slope"] == (0.0, 2.0)            # ordinal: the level's index
    assert by_name["st_slope__missing"] == (0.0, 1.0)   # missing indicator
    assert expected_shape(task) == (16, BINS + 4)
    # The mechanism's sensitivity follows the study's 16 encoded columns.
    mech = statistics_mechanism(task=task, epsilon=0.3, delta=1e-5)
    assert mech.l2_sensitivity == pytest.approx(2 * math.sqrt(16))
    # Admission plans the release a site of this study will make.
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert pending_statistics(ledger, config(), task) == [mech]


def test_per_level_counts_and_missing_rates_of_a_study(task: TaskSpec) -> None:
    cols = list(task.feature_columns)
    x = np.zeros((6, len(cols)))
    x[:, cols.index("age")] = [30, 40, 50, 60, 70, 200]      # 200: clipped to the range
    x[:, cols.index("sex=male")] = [1, 1, 1, 0, 0, 1]
    x[:, cols.index("sex=female")] = [0, 0, 0, 1, 1, 0]
    x[:, cols.index("st_slope")] = [0, 1, 2, 2, 2, np.nan]    # one missing value
    out = exact_sums(x, feature_bins(task))
    present, missing, total = (BINS, BINS + 1, BINS + 2)
    male, female = cols.index("sex=male"), cols.index("sex=female")
    # A one-hot level's clipped sum is the level's count.
    assert (out[male, total], out[female, total]) == (4.0, 2.0)
    slope = cols.index("st_slope")
    assert (out[slope, present], out[slope, missing]) == (5.0, 1.0)
    # An ordinal's levels fall in distinct bins: per-level counts.
    assert (out[slope, 0], out[slope, 5], out[slope, BINS - 1]) == (1.0, 1.0, 3.0)
    age = cols.index("age")
    assert out[age, BINS - 1] == 1.0 and out[age, total] == pytest.approx(
        sum((v - 18) / 82 for v in (30, 40, 50, 60, 70)) + 1.0)


def test_a_site_releases_its_study_statistics_charged_to_the_run(
        task: TaskSpec, tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(80, len(task.feature_columns)))
    audit: list[str] = []
    metrics, arrays = release_statistics(
        ledger=ledger, config=config(), features=lambda: x, caps=Caps(project=10.0),
        replies_dir=tmp_path, audit=lambda a, d: audit.append(a), task=task)
    (values,) = arrays.values()
    assert values.shape == expected_shape(task)
    assert not np.array_equal(values, exact_sums(x, feature_bins(task)))   # noised
    spent = metrics["metrics"]["epsilon-spent"]
    charged = [e.mechanism for e in ledger.entries() if e.purpose == "statistics"]
    assert charged == [statistics_mechanism(task=task, epsilon=0.3, delta=1e-5)]
    assert spent == pytest.approx(compose_mechanisms(charged, delta=1e-5).epsilon)
    assert 0.29 <= spent <= 0.3 and "statistics-released" in audit
    # The coordinator's sum of such releases becomes the reference document of the study.
    doc = reference_document(run_id=4, study={"name": "heart_disease", "hash": "sha256:x"},
                             epsilon=0.3, delta=1e-5, sites=1, task=task, total=values)
    assert [f["name"] for f in doc["features"]] == list(task.feature_columns)
