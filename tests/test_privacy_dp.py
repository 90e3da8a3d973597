"""Tests of privacy.dp: the run's noise, composed epsilon and the round budget check."""

from __future__ import annotations

import math
import re

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

import privacy
from privacy import (
    BudgetExceededError,
    check_round_budget,
    epsilon_for_history,
    noise_multiplier_for_run,
    planned_steps,
)

DELTA = 1e-5


def test_public_api() -> None:
    assert privacy.__all__ == [
        "MECHANISMS",
        "BudgetExceededError",
        "Caps",
        "Composition",
        "DPTrainResult",
        "DpSgd",
        "Entry",
        "EvalResult",
        "GaussianRelease",
        "HistoryEntry",
        "LaplaceRelease",
        "LedgerCorruptError",
        "Mechanism",
        "PlainTrainResult",
        "PlanCheck",
        "PlanExceededError",
        "PrivacyLedger",
        "Reservation",
        "RoundRecord",
        "RunLedger",
        "ScopeBudget",
        "SiteBudget",
        "TuningSelection",
        "UnknownMechanismError",
        "UnknownRunError",
        "check_plan",
        "check_round_budget",
        "check_run_plan",
        "compose_mechanisms",
        "epsilon_for_history",
        "evaluate",
        "expected_steps",
        "noise_multiplier_for_run",
        "planned_steps",
        "sample_rate_for",
        "site_budget",
        "train_dp",
        "train_plain",
    ]
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "epsilon budget must be > 0; got 0.0"),
        ({"epsilon": -1.0}, "epsilon budget must be > 0; got -1.0"),
        ({"delta": 0.0}, "delta must be in (0, 1); got 0.0"),
        ({"delta": 1.0}, "delta must be in (0, 1); got 1.0"),
        ({"sample_rate": 0.0}, "sample_rate must be in (0, 1]; got 0.0"),
        ({"sample_rate": 1.5}, "sample_rate must be in (0, 1]; got 1.5"),
        ({"total_epochs": 0}, "total_epochs must be an integer >= 1; got 0"),
        ({"accountant": "gdp"}, "unsupported accounting mechanism 'gdp'"),
    ],
)
def test_noise_multiplier_for_run_rejects_bad_input(
    kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "epsilon": 3.0, "delta": DELTA, "sample_rate": 0.1, "total_epochs": 2, **kwargs
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        noise_multiplier_for_run(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("epsilon", "q", "epochs"), [
    (1.0, 0.1, 4), (3.0, 32 / 140, 2), (0.1, 0.01, 10), (8.0, 0.5, 1), (3.0, 0.9, 3)])
def test_noise_multiplier_is_the_least_the_ledger_accepts_for_the_planned_steps(
        epsilon: float, q: float, epochs: int) -> None:
    from privacy import DpSgd, compose_mechanisms

    sigma = noise_multiplier_for_run(epsilon=epsilon, delta=DELTA, sample_rate=q,
                                     total_epochs=epochs)
    steps = planned_steps(sample_rate=q, epochs=epochs)

    def ledger(s: float) -> float:
        return compose_mechanisms([DpSgd(s, q, steps)], delta=DELTA).epsilon

    # Within the budget by the ledger's own figure, and 0.2% less noise would not be.
    assert ledger(sigma) <= epsilon < ledger(sigma / 1.002)
    # Opacus's PRV puts the same run within about 1% of the ledger's PLD.
    assert epsilon_for_history([(sigma, q, steps)], delta=DELTA) == pytest.approx(
        epsilon, rel=0.015)


def test_opacus_searches_agree_in_order_and_fit_the_ledger() -> None:
    from privacy import DpSgd, compose_mechanisms

    def sigma(accountant: str) -> float:
        return noise_multiplier_for_run(
            epsilon=1.0, delta=DELTA, sample_rate=0.05, total_epochs=4, accountant=accountant
        )

    # RDP is the loosest bound; PRV's search stops within 0.01 below the target by PRV,
    # and is raised where the ledger disagrees, so it never undercuts the ledger's search.
    assert sigma("rdp") > sigma("prv") >= sigma("pld")
    steps = planned_steps(sample_rate=0.05, epochs=4)
    for name in ("rdp", "prv", "pld"):
        assert compose_mechanisms([DpSgd(sigma(name), 0.05, steps)], delta=DELTA).epsilon <= 1.0
    with pytest.raises(ValueError, match="unsupported accounting mechanism 'gdp'"):
        sigma("gdp")


@pytest.mark.parametrize(
    ("sample_rate", "epochs", "steps"),
    [(0.1, 3, 30), (1 / 93, 2, 186), (1 / 9, 30, 270), (1.0, 5, 5), (0.3, 2, 6), (0.7, 2, 2)],
)
def test_planned_steps_follow_opacus_poisson_loader(
    sample_rate: float, epochs: int, steps: int
) -> None:
    assert planned_steps(sample_rate=sample_rate, epochs=epochs) == steps


def test_epsilon_of_empty_history_is_zero() -> None:
    assert epsilon_for_history([], delta=DELTA) == 0.0
    assert epsilon_for_history([(1.0, 0.1, 0)], delta=DELTA) == 0.0


def test_epsilon_matches_opacus_accountants() -> None:
    history = [(2.0, 0.1, 20), (3.0, 0.05, 10)]
    prv = PRVAccountant()
    prv.history = list(history)
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert epsilon_for_history(history, delta=DELTA) == prv.get_epsilon(delta=DELTA)
    assert epsilon_for_history(history, delta=DELTA, mechanism="rdp") == rdp.get_epsilon(
        delta=DELTA
    )


def test_history_split_by_round_composes_like_one_entry() -> None:
    # Opacus merges consecutive steps at the same (sigma, q); so does epsilon_for_history.
    whole = epsilon_for_history([(1.1, 0.1, 30)], delta=DELTA)
    split = epsilon_for_history([(1.1, 0.1, 10), (1.1, 0.1, 10), (1.1, 0.1, 10)], delta=DELTA)
    assert split == whole


def test_step_without_noise_is_infinite_epsilon() -> None:
    assert epsilon_for_history([(1.0, 0.1, 5), (0.0, 0.1, 1)], delta=DELTA) == math.inf


@pytest.mark.parametrize(
    "history",
    [[(1.0, 0.0, 5)], [(-1.0, 0.1, 5)], [(1.0, 0.1, -1)], [(1.0, 0.1, 2.5)], [(1.0, 0.1)]],
)
def test_malformed_history_is_rejected(history: list[tuple[float, ...]]) -> None:
    with pytest.raises(ValueError, match="invalid accountant history"):
        epsilon_for_history(history, delta=DELTA)  # type: ignore[arg-type]


def test_check_round_budget_returns_projection() -> None:
    projected = check_round_budget(
        history=[(1.0, 0.1, 10)], next_step=(1.0, 0.1, 10), delta=DELTA, budget=100.0
    )
    assert projected == epsilon_for_history([(1.0, 0.1, 20)], delta=DELTA)


def test_check_round_budget_refuses_with_numbers_and_advice() -> None:
    history = [(1.0, 0.1, 10)]
    spent = epsilon_for_history(history, delta=DELTA)
    projected = epsilon_for_history([(1.0, 0.1, 20)], delta=DELTA)
    budget = (spent + projected) / 2
    with pytest.raises(BudgetExceededError) as info:
        check_round_budget(
            history=history, next_step=(1.0, 0.1, 10), delta=DELTA, budget=budget
        )
    err = info.value
    assert (err.spent, err.projected, err.budget) == (spent, projected, budget)
    assert "raise the site's epsilon cap" in str(err)
    assert "fewer rounds" in str(err)


def test_every_planned_round_of_a_run_passes_the_check() -> None:
    rounds, local_epochs, q = 5, 2, 1 / 10
    # check_round_budget accounts with Opacus's PRV: the noise is searched with it too (the
    # ledger's own search and check: tests/test_privacy_ledger.py).
    sigma = noise_multiplier_for_run(
        epsilon=1.0, delta=DELTA, sample_rate=q, total_epochs=rounds * local_epochs,
        accountant="prv"
    )
    steps = planned_steps(sample_rate=q, epochs=local_epochs)
    history: list[tuple[float, float, int]] = []
    for _ in range(rounds):
        check_round_budget(history=history, next_step=(sigma, q, steps), delta=DELTA, budget=1.0)
        history.append((sigma, q, steps))
    with pytest.raises(BudgetExceededError):
        check_round_budget(history=history, next_step=(sigma, q, steps), delta=DELTA, budget=1.0)


def test_the_noise_keeps_the_ledgers_own_figure_within_the_budget() -> None:
    """Opacus's PRV search picks the noise, the ledger charges with dp-accounting's PLD: the
    two differ by up to about 0.01, so a noise just under the budget by PRV is raised until
    the PLD figure of the whole run fits too."""
    from privacy import DpSgd, compose_mechanisms
    from privacy.dp import _within_ledger_figure

    q, steps, epsilon = 0.05, planned_steps(sample_rate=0.05, epochs=6), 2.0
    sigma = noise_multiplier_for_run(epsilon=epsilon, delta=DELTA, sample_rate=q,
                                     total_epochs=6)

    def pld(s: float) -> float:
        return compose_mechanisms([DpSgd(s, q, steps)], delta=DELTA).epsilon

    assert pld(sigma) <= epsilon
    too_little = sigma * 0.97                     # PRV and PLD both put it over the budget
    assert pld(too_little) > epsilon
    raised = _within_ledger_figure(too_little, epsilon, DELTA, q, steps)
    assert pld(raised) <= epsilon < pld(raised / 1.002)   # the first step that fits
    assert _within_ledger_figure(sigma, epsilon, DELTA, q, steps) == sigma  # nothing to do
