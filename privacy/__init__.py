"""Differential privacy for Fedward sites: budget accounting, the privacy ledger, DP training.

* :mod:`privacy.dp`: the run's noise multiplier, composed epsilon of an accountant history
  and the per-round budget check.
* :mod:`privacy.ledger`: the site's write-ahead privacy ledger on disk.
* :mod:`privacy.budget`: a run's whole plan checked against the site's remaining budgets
  (run, project, site-wide), and the composed figures per project and site.
* :mod:`privacy.training`: DP-SGD local training with Opacus, the plain baseline and
  evaluation.

The names below are the package's public surface (pinned by a test); import them from
``privacy`` rather than from the submodules.
"""

from privacy.budget import (
    PlanCheck,
    PlanExceededError,
    ScopeBudget,
    SiteBudget,
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
    LedgerCorruptError,
    PrivacyLedger,
    RoundRecord,
    RunLedger,
    UnknownRunError,
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
    "BudgetExceededError",
    "DPTrainResult",
    "EvalResult",
    "HistoryEntry",
    "LedgerCorruptError",
    "PlainTrainResult",
    "PlanCheck",
    "PlanExceededError",
    "PrivacyLedger",
    "RoundRecord",
    "RunLedger",
    "ScopeBudget",
    "SiteBudget",
    "UnknownRunError",
    "check_round_budget",
    "check_run_plan",
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
