"""The noise multiplier a site keeps on disk is used only when the ledger confirms it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from privacy import dp
from privacy.accounting import compose_mechanisms
from privacy.mechanisms import DpSgd
from privacy.noise_cache import NoiseCache


def _sigma(epsilon: float = 3.0) -> float:
    return dp.noise_multiplier_for_run(epsilon=epsilon, delta=1e-5, sample_rate=0.05,
                                       total_epochs=3)

STEPS = dp.planned_steps(sample_rate=0.05, epochs=3)


@pytest.fixture
def cache_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "cache" / "noise-multipliers.json"
    dp.use_noise_cache(path)
    yield path
    dp.use_noise_cache(None)


def _spent(sigma: float) -> float:
    return compose_mechanisms([DpSgd(sigma, 0.05, STEPS)], delta=1e-5).epsilon


def _stored(path: Path) -> dict[str, float]:
    return dict(json.loads(path.read_text(encoding="utf-8"))["entries"])


def test_the_answer_is_stored_and_read_back_without_searching(
        cache_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sigma = _sigma()
    assert list(_stored(cache_file).values()) == [sigma]
    assert oct(cache_file.stat().st_mode & 0o777) == oct(0o600)

    def no_search(*_: object) -> float:
        raise AssertionError("searched again although the cache holds the answer")

    # A restarted agent: the in-memory caches are gone, the file is not.
    monkeypatch.setattr(dp, "_search_noise_ledger", no_search)
    monkeypatch.setattr(dp, "_search_noise", no_search)
    assert _sigma() == sigma


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_an_entry_the_ledger_does_not_confirm_is_searched_again(
        cache_file: Path, factor: float) -> None:
    sigma = _sigma()
    key = next(iter(_stored(cache_file)))
    # Less noise would overspend the budget; more would cost utility for nothing.
    cache_file.write_text(json.dumps({"format": "fedward-noise-cache/1",
                                      "entries": {key: sigma * factor}}), encoding="utf-8")
    assert (_spent(sigma * factor) > 3.0) == (factor < 1)
    assert NoiseCache(cache_file).get("prv", 3.0, 1e-5, 0.05, STEPS) is None
    assert _sigma() == sigma
    assert _stored(cache_file)[key] == sigma


def test_an_unreadable_cache_is_a_miss_not_an_error(cache_file: Path) -> None:
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json", encoding="utf-8")
    sigma = _sigma()
    assert _spent(sigma) <= 3.0
    assert list(_stored(cache_file).values()) == [sigma]


def test_another_plan_does_not_read_this_plans_answer(cache_file: Path) -> None:
    _sigma()
    other = _sigma(epsilon=1.0)
    assert len(_stored(cache_file)) == 2
    assert other > _sigma()
