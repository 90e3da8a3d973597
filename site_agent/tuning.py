"""A site's side of a federated hyperparameter search (see :mod:`privacy.tuning`).

A run whose configuration carries ``tuning-search`` terms is one trial of a search. The
site charges the search once, as one tuning selection over every trial (before its first
trial reads a row, against the run, project and site caps), and then records each trial
round as covered by that charge. Nothing here reads data: only the number of training rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fedward.wire import CFG
from privacy.budget import PlanCheck, check_plan
from privacy.ledger import Caps, PrivacyLedger
from privacy.mechanisms import CoveredTrial, DpSgd, TuningSelection
from privacy.sampling import expected_steps, sample_rate_for
from privacy.tuning import SearchTerms, selection_for_budget

__all__ = ["SearchTerms", "charge_search", "check_search", "search_terms", "selection",
           "trial_round"]


def search_terms(config: dict[str, Any]) -> SearchTerms | None:
    """The search a task's run is a trial of; None for an ordinary run.

    Raises:
        ValueError: the terms are malformed (the task is refused as bad).
    """
    raw = config.get(CFG.TUNING_SEARCH)
    return None if raw is None else SearchTerms.from_wire(raw)


@functools.lru_cache(maxsize=16)
def selection(terms: SearchTerms, *, epsilon: float, delta: float,
              n_train: int) -> TuningSelection:
    """The search's selection at this site: its reference trial at the smallest noise for
    which the whole search is within ``epsilon`` (computed once per search)."""
    q, steps = terms.reference(n_train)
    return selection_for_budget(epsilon=epsilon, delta=delta, sample_rate=q, steps=steps,
                                mean=terms.mean, shape=terms.shape)


def _summary(terms: SearchTerms, chosen: TuningSelection) -> str:
    kind = "Poisson" if terms.shape == float("inf") else "geometric"
    return (f"tuning search {terms.search_id} (the best of a {kind} number of trials, mean "
            f"{terms.mean:g}; each trial at most {chosen.trial.describe()})")


def check_search(ledger: PrivacyLedger, terms: SearchTerms, *, project: str, epsilon: float,
                 delta: float, n_train: int, cap: float | None,
                 site_cap: float | None) -> PlanCheck | None:
    """Check, writing nothing, that the search's charge fits every budget of the site;
    None when it is charged already (its trials are then covered).

    Raises:
        PlanExceededError: with the cost and what is spent and left in each scope.
        ValueError: the search cannot fit its own epsilon at any noise.
    """
    if ledger.snapshot().find(terms.ledger_run, "tuning", str(terms.search_id)) is not None:
        return None
    chosen = selection(terms, epsilon=epsilon, delta=delta, n_train=n_train)
    return check_plan(ledger, run_id=terms.ledger_run, project=project, delta=delta,
                      plan=[chosen], summary=_summary(terms, chosen), run_budget=epsilon,
                      cap=cap, site_cap=site_cap)


def charge_search(ledger: PrivacyLedger, terms: SearchTerms, *, project: str,
                  epsilon: float, delta: float, n_train: int, cap: float | None,
                  site_cap: float | None,
                  on_charge: Callable[[float], None] | None = None) -> TuningSelection:
    """Charge the search once (a repeat does nothing) and return its selection.

    Raises:
        BudgetExceededError: the charge does not fit a cap; nothing is written but the
            search's ledger run.
        ValueError: the search cannot fit its own epsilon, or it was opened with other terms.
    """
    chosen = selection(terms, epsilon=epsilon, delta=delta, n_train=n_train)
    ledger.open_run(run_id=terms.ledger_run, project=project, epsilon_budget=epsilon,
                    delta=delta)
    ledger.reserve(run_id=terms.ledger_run, purpose="tuning", key=str(terms.search_id),
                   mechanism=chosen, caps=Caps(project=cap, site=site_cap),
                   on_charge=on_charge)
    ledger.charge(run_id=terms.ledger_run, purpose="tuning", key=str(terms.search_id))
    return chosen


def trial_round(chosen: TuningSelection, terms: SearchTerms, *, n_train: int, batch: int,
                local_epochs: int) -> CoveredTrial:
    """One round of a trial at the search's reference noise, with the trial's own batch
    size and local epochs (the ledger checks it stays under the reference)."""
    sigma = chosen.trial.noise_multiplier if isinstance(chosen.trial, DpSgd) else 0.0
    q = sample_rate_for(n_examples=n_train, batch_size=batch)
    steps = expected_steps(n_examples=n_train, batch_size=batch, epochs=local_epochs)
    return CoveredTrial(DpSgd(sigma, q, steps), terms.search_id)
