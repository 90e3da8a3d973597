"""A site's budgets as a whole: a run's plan checked up front, and the composed figures.

The ledger checks one disclosure at a time (:meth:`privacy.ledger.PrivacyLedger.reserve`).
That alone admits a run whose later rounds cannot fit: it trains until the round that
crosses a cap, and the epsilon spent on the rounds before it buys nothing. Here a run's
*whole plan* (the mechanisms it will still add: the DP-SGD steps of every round it has left
at the noise multiplier it will use, any statistics or tuning it declares) is composed with
every mechanism the site has already recorded, per scope:

* ``run``: the run's own epsilon, against the smaller of its budget and the project's cap;
* ``project``: every disclosure of the run's project at this site, against its cap;
* ``site``: every disclosure of every project at this site, against the site-wide cap.

Composition, not addition, with the ledger's own accountant (:mod:`privacy.accounting`:
PLD, or RDP where a tuning selection is involved): two runs of 2.99 and 2.00 composed may
be 3.70. Projects and the site are stated at the largest delta of what they cover.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from privacy.accounting import Composition, compose_mechanisms
from privacy.ledger import PrivacyLedger
from privacy.ledger_types import Snapshot
from privacy.mechanisms import DpSgd, Mechanism

__all__ = [
    "PlanCheck",
    "PlanExceededError",
    "ScopeBudget",
    "SiteBudget",
    "check_plan",
    "check_run_plan",
    "site_budget",
]

Scope = Literal["run", "project", "site"]

# The same float allowance as the ledger's per-disclosure check: a plan exactly at a cap fits.
_RTOL: Final = 1e-9


@dataclass(frozen=True)
class ScopeBudget:
    """One budget of a site: what is spent, its cap, and (for a plan) where it would end.

    Attributes:
        scope: ``run``, ``project`` or ``site``.
        name: the run id, the project name, or ``site``.
        spent: epsilon spent in this scope so far, composed over every disclosure.
        cap: the most it may reach; None when no cap applies.
        after: the composed epsilon once the plan is charged in full (None when no plan
            was checked).
        accountant: which accountant produced the figures: ``pld``, ``rdp`` (a tuning
            selection is involved) or ``none`` (nothing spent).
        cross_check: the RDP figure of ``spent``, where it was asked for and ``pld`` is
            the accountant (an upper bound too, looser).
    """

    scope: Scope
    name: str
    spent: float
    cap: float | None
    after: float | None = None
    accountant: str = "none"
    cross_check: float | None = None

    @property
    def left(self) -> float | None:
        """``cap - spent`` (never below 0); None without a cap.

        A disclosure fits when the *composed* figure after it stays within the cap, which
        the checks compute exactly; this difference is what hospital IT reads at a glance.
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
                                  "spent": self.spent, "cap": self.cap, "left": self.left,
                                  "accountant": self.accountant}
        if self.after is not None:
            out["after"] = self.after
        if self.cross_check is not None:
            out["rdp_cross_check"] = self.cross_check
        return out


@dataclass(frozen=True)
class PlanCheck:
    """A run's whole plan against the site's budgets.

    Attributes:
        run_id: the run.
        project: its project.
        plan: the mechanisms the run will still add.
        summary: the plan in words (``its 4 round(s) x 1 local epoch(s) (noise ...)``).
        run_needs: the run's own epsilon once the plan is charged in full.
        scopes: the run, project and site budgets (the last two only where a cap applies).
    """

    run_id: str
    project: str
    plan: tuple[Mechanism, ...]
    summary: str
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
            f"run {self.run_id} needs epsilon {self.run_needs:.3f} at this site for "
            f"{self.summary}; " + "; ".join(parts) + ". Nothing was read, trained or "
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


def _scope_figures(snap: Snapshot, extra: Sequence[Mechanism], delta: float, *,
                   run_id: str | None = None, project: str | None = None
                   ) -> tuple[Composition, Composition]:
    """(spent, after): a scope's recorded mechanisms composed, without and with ``extra``.

    ``after`` is stated at the largest delta of the scope and ``delta`` (the run's).
    """
    before, scope_delta = snap.scope(run_id=run_id, project=project)
    spent = (compose_mechanisms(before, delta=scope_delta) if before else
             Composition(epsilon=0.0, delta=delta, accountant="none"))
    after = compose_mechanisms([*before, *extra], delta=max(scope_delta, delta))
    return spent, after


def check_plan(ledger: PrivacyLedger, *, run_id: str, project: str, delta: float,
               plan: Sequence[Mechanism], summary: str, run_budget: float,
               cap: float | None = None, site_cap: float | None = None) -> PlanCheck:
    """Check that the mechanisms a run will still add fit every budget of the site.

    Args:
        ledger: the site's privacy ledger (read only; nothing is written).
        run_id: the run (it may already be open in the ledger with entries charged).
        project: its project.
        delta: the run's delta (the ledger's, once the run is open).
        plan: every mechanism the run will still add at this site.
        summary: the plan in words, for the message.
        run_budget: the run's epsilon budget.
        cap: the cap of the run's project at this site, which also bounds one run.
        site_cap: the site-wide cap over every project; None: none.

    Returns:
        The :class:`PlanCheck` (every figure), when the plan fits.

    Raises:
        PlanExceededError: when it does not, with the figures.
        LedgerCorruptError: if the ledger cannot be trusted.
    """
    snap = ledger.snapshot()
    own = snap.runs.get(run_id)
    run_delta = own.delta if own is not None else float(delta)
    run_spent, run_after = _scope_figures(snap, plan, run_delta, run_id=run_id)
    run_cap = run_budget if cap is None else min(run_budget, cap)
    scopes = [ScopeBudget("run", run_id, run_spent.epsilon, run_cap, run_after.epsilon,
                          run_after.accountant)]
    for scope, name, scope_cap in (("project", project, cap), ("site", None, site_cap)):
        if scope_cap is None:
            continue
        spent, after = _scope_figures(snap, plan, run_delta, project=name)
        scopes.append(ScopeBudget("project" if scope == "project" else "site",
                                  name or "site", spent.epsilon, scope_cap, after.epsilon,
                                  after.accountant))
    check = PlanCheck(run_id=run_id, project=project, plan=tuple(plan), summary=summary,
                      run_needs=run_after.epsilon, scopes=tuple(scopes))
    if check.exceeded:
        raise PlanExceededError(check)
    return check


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
    before: Sequence[Mechanism] = (),
) -> PlanCheck:
    """:func:`check_plan` for the DP-SGD rounds a run still has to train.

    Args:
        ledger: the site's privacy ledger (read only).
        run_id: the run.
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
        before: what the run discloses here before those rounds and has not yet recorded
            (its statistics release), planned with them.

    Raises:
        PlanExceededError: when the plan does not fit, with the figures.
    """
    plan = [*before, DpSgd(float(noise_multiplier), float(sample_rate), int(steps))]
    summary = (f"its {rounds} round(s) x {local_epochs} local epoch(s) (noise multiplier "
               f"{noise_multiplier:.3f})")
    if before:
        summary = f"its statistics release and {summary}"
    return check_plan(ledger, run_id=run_id, project=project, delta=delta, plan=plan,
                      summary=summary, run_budget=run_budget, cap=cap, site_cap=site_cap)


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
                site_cap: float | None, cross_check: bool = False) -> SiteBudget:
    """The composed figures hospital IT reads (``fedward-site runs``, ``status``, ``ledger``).

    Args:
        ledger: the site's privacy ledger.
        project_caps: project -> its epsilon cap (from the site policy); projects in the
            ledger but no longer in the policy are shown without a cap.
        site_cap: the site-wide cap, if any.
        cross_check: also compute the RDP figure of every PLD one.

    Raises:
        LedgerCorruptError: if the ledger cannot be trusted.
    """
    snap = ledger.snapshot()

    def figure(scope: Scope, name: str, cap: float | None, **kwargs: str) -> ScopeBudget:
        mechanisms, delta = snap.scope(**kwargs)  # type: ignore[arg-type]
        if not mechanisms:
            return ScopeBudget(scope, name, 0.0, cap)
        c = compose_mechanisms(mechanisms, delta=delta, cross_check=cross_check)
        return ScopeBudget(scope, name, c.epsilon, cap, accountant=c.accountant,
                           cross_check=c.rdp if c.accountant == "pld" else None)

    names = sorted({r.project for r in snap.runs.values()} | set(project_caps))
    projects = tuple(figure("project", name, project_caps.get(name), project=name)
                     for name in names)
    runs = {run_id: figure("run", run_id, None, run_id=run_id).spent
            for run_id in snap.runs}
    return SiteBudget(projects=projects, site=figure("site", "site", site_cap), runs=runs)
