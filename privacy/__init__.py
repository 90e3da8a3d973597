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
* :mod:`privacy.training`: DP-SGD local training with Opacus, the plain baseline and
  evaluation.

The names below are the package's public surface (pinned by a test); import them from
``privacy`` rather than from the submodules.
"""

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
from privacy.training import (
    DPTrainResult,
    EvalResult,
    PlainTrainResult,
    evaluate,
    expected_steps,
    sample_rate_for,
    train_dp,
    train_plain,
)

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
