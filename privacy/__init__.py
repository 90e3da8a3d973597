"""Differential privacy for Fedward sites: budget accounting, the privacy ledger, DP training.

* :mod:`privacy.dp`: the run's noise multiplier (Opacus's search, checked against the
  ledger's accountant), Opacus's composed epsilon of an accountant history.
* :mod:`privacy.mechanisms`: what a site discloses through (DP-SGD, Gaussian and Laplace
  releases, tuning selections), as the ledger records it.
* :mod:`privacy.accounting`: their composition with dp-accounting (PLD, RDP).
* :mod:`privacy.ledger`: the site's write-ahead privacy ledger (SQLite), one accountant over
  every disclosure.
* :mod:`privacy.budget`: a run's whole plan checked against the site's remaining budgets
  (run, project, site-wide), and the composed figures per project and site.
* :mod:`privacy.sampling`: the sample rate and step count a site reserves in its ledger
  before a DP-SGD round (Opacus's arithmetic, without loading Opacus).
* :mod:`privacy.training`: DP-SGD local training with Opacus, and the plain baseline.
* :mod:`privacy.evaluation`: loss, accuracy and AUC of a trained model.

The names below are the package's public surface (pinned by a test); import them from
``privacy`` rather than from the submodules.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privacy.accounting import Composition, compose_mechanisms
    from privacy.budget import (
        PlanCheck,
        PlanExceededError,
        ScopeBudget,
        SiteBudget,
        check_plan,
        check_run_plan,
        site_budget,
    )
    from privacy.dp import (
        BudgetExceededError,
        HistoryEntry,
        check_round_budget,
        epsilon_for_history,
        noise_multiplier_for_run,
        planned_steps,
    )
    from privacy.evaluation import EvalResult, evaluate
    from privacy.ledger import (
        Caps,
        Entry,
        LedgerCorruptError,
        PrivacyLedger,
        Reservation,
        RoundRecord,
        RunLedger,
        UnknownMechanismError,
        UnknownRunError,
    )
    from privacy.mechanisms import (
        MECHANISMS,
        DpSgd,
        GaussianRelease,
        LaplaceRelease,
        Mechanism,
        TuningSelection,
    )
    from privacy.sampling import expected_steps, sample_rate_for
    from privacy.training import DPTrainResult, PlainTrainResult, train_dp, train_plain

# Each name is imported from its submodule on first use (PEP 562): a process that only reads
# the ledger (the site agent, the coordinator, the CLI) never loads Opacus, torch or
# dp-accounting for it. Those imports cost seconds of CPU per process.
_WHERE: dict[str, str] = {
    "Composition": "privacy.accounting",
    "compose_mechanisms": "privacy.accounting",
    "PlanCheck": "privacy.budget",
    "PlanExceededError": "privacy.budget",
    "ScopeBudget": "privacy.budget",
    "SiteBudget": "privacy.budget",
    "check_plan": "privacy.budget",
    "check_run_plan": "privacy.budget",
    "site_budget": "privacy.budget",
    "BudgetExceededError": "privacy.dp",
    "HistoryEntry": "privacy.dp",
    "check_round_budget": "privacy.dp",
    "epsilon_for_history": "privacy.dp",
    "noise_multiplier_for_run": "privacy.dp",
    "planned_steps": "privacy.dp",
    "Caps": "privacy.ledger",
    "Entry": "privacy.ledger",
    "LedgerCorruptError": "privacy.ledger",
    "PrivacyLedger": "privacy.ledger",
    "Reservation": "privacy.ledger",
    "RoundRecord": "privacy.ledger",
    "RunLedger": "privacy.ledger",
    "UnknownMechanismError": "privacy.ledger",
    "UnknownRunError": "privacy.ledger",
    "MECHANISMS": "privacy.mechanisms",
    "DpSgd": "privacy.mechanisms",
    "GaussianRelease": "privacy.mechanisms",
    "LaplaceRelease": "privacy.mechanisms",
    "Mechanism": "privacy.mechanisms",
    "TuningSelection": "privacy.mechanisms",
    "DPTrainResult": "privacy.training",
    "EvalResult": "privacy.evaluation",
    "PlainTrainResult": "privacy.training",
    "evaluate": "privacy.evaluation",
    "expected_steps": "privacy.sampling",
    "sample_rate_for": "privacy.sampling",
    "train_dp": "privacy.training",
    "train_plain": "privacy.training",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
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
