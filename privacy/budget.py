"""A site's budgets as a whole: a run's plan checked up front, and the composed figures.

The ledger checks one round at a time (:meth:`privacy.ledger.PrivacyLedger.reserve_round`).
That alone admits a run whose later rounds cannot fit: it trains until the round that
crosses a cap, and the epsilon spent on the rounds before it buys nothing. Here a run's
*whole plan* (the steps of every round it still has to train, at the noise multiplier it
will use) is composed with what the site has already spent, per scope:

* ``run``: the run's own epsilon, against the smaller of its budget and the caps;
* ``project``: every run of the run's project at this site, against the project's cap;
* ``site``: every run of every project at this site, against the site-wide cap.

Composition, not addition: epsilons of tight accountants (PRV here) do not add up, so two
runs of 2.995 and 1.996 composed may be 3.70. Every figure below is composed over the
accountant histories in the ledger, at the largest delta of the runs it covers (the
weakest guarantee among them), exactly as the per-round checks compose them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from privacy.dp import HistoryEntry, epsilon_for_history
from privacy.ledger import PrivacyLedger, RunLedger

__all__ = [
    "PlanCheck",
    "PlanExceededError",
    "ScopeBudget",
    "SiteBudget",
    "check_run_plan",
    "site_budget",
]

Scope = Literal["run", "project", "site"]

# The same float allowance as privacy.dp's per-round check: a plan exactly at a cap fits.
_RTOL: Final = 1e-9


@dataclass(frozen=True)
class ScopeBudget:
    """One budget of a site: what is spent, its cap, and (for a plan) where it would end.

    Attributes:
        scope: ``run``, ``project`` or ``site``.
        name: the run id, the project name, or ``site``.
        spent: epsilon spent in this scope so far, composed.
        cap: the most it may reach; None when no cap applies.
        after: the composed epsilon once the planned run is charged in full (None when
            no plan was checked).
    """

    scope: Scope
    name: str
    spent: float
    cap: float | None
    after: float | None = None

    @property
    def left(self) -> float | None:
        """``cap - spent`` (never below 0); None without a cap.

        A run fits when the *composed* figure after it stays within the cap, which the
        checks compute exactly; this difference is what hospital IT reads at a glance.
        """
        return None if self.cap is None else max(0.0, self.cap - self.spent)

    @property
    def exceeded(self) -> bool:
        """The plan would take this scope past its cap."""
        return (self.cap is not None and self.after is not None
                and self.after > self.cap * (1.0 + _RTOL))

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        out: dict[str, object] = {"scope": self.scope, "name": self.name,
                                  "spent": self.spent, "cap": self.cap, "left": self.left}
        if self.after is not None:
            out["after"] = self.after
        return out


@dataclass(frozen=True)
class PlanCheck:
    """A run's whole plan against the site's budgets.

    Attributes:
        run_id: the run.
        project: its project.
        rounds: rounds the plan still trains at this site.
        local_epochs: local epochs per round.
        noise_multiplier: the run's noise multiplier.
        sample_rate: its Poisson sampling rate per step.
        steps: DP-SGD steps the plan still charges.
        run_needs: the run's own epsilon once the plan is charged in full.
        scopes: the run, project and site budgets (the last two only where a cap applies).
    """

    run_id: str
    project: str
    rounds: int
    local_epochs: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_needs: float
    scopes: tuple[ScopeBudget, ...]

    @property
    def exceeded(self) -> tuple[ScopeBudget, ...]:
        """The scopes the plan would take past their caps."""
        return tuple(s for s in self.scopes if s.exceeded)

    def reason(self) -> str:
        """Why the plan does not fit, with the numbers (empty when it fits)."""
        over = self.exceeded
        if not over:
            return ""
        parts = []
        for s in over:
            assert s.cap is not None and s.after is not None
            if s.scope == "run":
                parts.append(f"the run's own epsilon would reach {s.after:.3f}, over the "
                             f"{s.cap:.3f} this site allows one run of project {self.project}")
            else:
                what = (f"project {s.name}'s epsilon at this site" if s.scope == "project"
                        else "the site-wide epsilon (all projects composed)")
                parts.append(f"{what} would go from {s.spent:.3f} spent to {s.after:.3f}, "
                             f"over its cap of {s.cap:.3f} ({s.left or 0.0:.3f} left)")
        return (
            f"run {self.run_id} needs epsilon {self.run_needs:.3f} at this site for its "
            f"{self.rounds} round(s) x {self.local_epochs} local epoch(s) (noise multiplier "
            f"{self.noise_multiplier:.3f}); " + "; ".join(parts) + ". Nothing was trained or "
            "charged; a smaller run (epsilon, rounds, local epochs) may fit, or the site's IT "
            "may raise the cap"
        )


class PlanExceededError(Exception):
    """A run's whole plan does not fit the site's remaining budgets.

    Attributes:
        check: the :class:`PlanCheck` with every figure.
    """

    def __init__(self, check: PlanCheck) -> None:
        self.check = check
        super().__init__(check.reason())


def _composed(runs: Mapping[str, RunLedger], *, project: str | None,
              extra: list[HistoryEntry], delta: float) -> tuple[float, float]:
    """(spent, after): the scope's runs composed, without and with the ``extra`` steps.

    The scope is ``project``'s runs, or every run for None; ``after`` is reported at the
    largest delta of the scope's runs and ``delta`` (the planned run's).
    """
    chosen = [r for r in runs.values() if project is None or r.project == project]
    history = [h for r in chosen for h in r.history]
    spent_delta = max((r.delta for r in chosen), default=0.0)
    spent = epsilon_for_history(history, delta=spent_delta) if history else 0.0
    after = epsilon_for_history([*history, *extra], delta=max(spent_delta, delta))
    return spent, after


def check_run_plan(
    ledger: PrivacyLedger,
    *,
    run_id: str,
    project: str,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    local_epochs: int,
    steps: int,
    run_budget: float,
    cap: float | None = None,
    site_cap: float | None = None,
) -> PlanCheck:
    """Check that a run's remaining plan fits every budget of the site, before it trains.

    Args:
        ledger: the site's privacy ledger (read only; nothing is written).
        run_id: the run (it may already be open in the ledger with rounds charged).
        project: its project.
        delta: the run's delta.
        noise_multiplier: the noise multiplier it trains with (the ledger's, once opened).
        sample_rate: its Poisson sampling rate per step.
        rounds: rounds it still trains at this site.
        local_epochs: local epochs per round (for the message).
        steps: the DP-SGD steps of those rounds, in total.
        run_budget: the run's epsilon budget.
        cap: the cap of the run's project at this site (the smaller of the policy's and the
            agent's own), which also bounds one run; None: none.
        site_cap: the site-wide cap over every project; None: none.

    Returns:
        The :class:`PlanCheck` (every figure), when the plan fits.

    Raises:
        PlanExceededError: when it does not, with the figures.
        LedgerCorruptError: if the ledger file cannot be trusted.
    """
    runs = ledger.all_runs()
    plan: list[HistoryEntry] = [(float(noise_multiplier), float(sample_rate), int(steps))]
    own = runs.get(run_id)
    own_history = list(own.history) if own is not None else []
    run_delta = own.delta if own is not None else float(delta)
    run_spent = epsilon_for_history(own_history, delta=run_delta) if own_history else 0.0
    run_needs = epsilon_for_history([*own_history, *plan], delta=run_delta)
    run_cap = run_budget if cap is None else min(run_budget, cap)
    scopes = [ScopeBudget("run", run_id, run_spent, run_cap, run_needs)]
    if cap is not None:
        spent, after = _composed(runs, project=project, extra=plan, delta=run_delta)
        scopes.append(ScopeBudget("project", project, spent, cap, after))
    if site_cap is not None:
        spent, after = _composed(runs, project=None, extra=plan, delta=run_delta)
        scopes.append(ScopeBudget("site", "site", spent, site_cap, after))
    check = PlanCheck(run_id=run_id, project=project, rounds=rounds,
                      local_epochs=local_epochs, noise_multiplier=float(noise_multiplier),
                      sample_rate=float(sample_rate), steps=int(steps), run_needs=run_needs,
                      scopes=tuple(scopes))
    if check.exceeded:
        raise PlanExceededError(check)
    return check


@dataclass(frozen=True)
class SiteBudget:
    """What the site has spent, composed, per project and over all projects.

    Attributes:
        projects: one :class:`ScopeBudget` per project in the ledger or the policy, by name.
        site: every project composed, with the site-wide cap.
        runs: run id -> the run's own epsilon.
    """

    projects: tuple[ScopeBudget, ...]
    site: ScopeBudget
    runs: Mapping[str, float]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {"projects": [p.to_dict() for p in self.projects],
                "site": self.site.to_dict(), "runs": dict(self.runs)}


def site_budget(ledger: PrivacyLedger, *, project_caps: Mapping[str, float],
                site_cap: float | None) -> SiteBudget:
    """The composed figures hospital IT reads (``fedward-site runs`` and ``status``).

    Args:
        ledger: the site's privacy ledger.
        project_caps: project -> its epsilon cap (from the site policy); projects in the
            ledger but no longer in the policy are shown without a cap.
        site_cap: the site-wide cap, if any.

    Raises:
        LedgerCorruptError: if the ledger file cannot be trusted.
    """
    runs = ledger.all_runs()

    def composed(project: str | None) -> float:
        chosen = [r for r in runs.values() if project is None or r.project == project]
        history = [h for r in chosen for h in r.history]
        if not history:
            return 0.0
        return epsilon_for_history(history, delta=max(r.delta for r in chosen))

    names = sorted({r.project for r in runs.values()} | set(project_caps))
    projects = tuple(ScopeBudget("project", name, composed(name), project_caps.get(name))
                     for name in names)
    own = {run_id: (epsilon_for_history(list(r.history), delta=r.delta) if r.history
                    else 0.0) for run_id, r in runs.items()}
    return SiteBudget(projects=projects, site=ScopeBudget("site", "site", composed(None),
                                                          site_cap), runs=own)
