"""Privacy accounting for a whole federated run: noise, composed epsilon, budget checks.

A site's privacy loss composes over every DP-SGD step it ever takes for a run, not per
round. These helpers therefore work on an accountant *history*, the list of
``(noise_multiplier, sample_rate, steps)`` entries that Opacus's accountants keep, and on
the noise multiplier chosen once for the run's whole budget (rounds x local epochs).

Why a history and not a running epsilon: epsilons do not add up under tight accounting
(PRV, RDP), so the only correct way to learn the epsilon after one more round is to compose
the full history with that round's steps appended.

The site's ledger composes every disclosure with dp-accounting instead
(:mod:`privacy.accounting`); Opacus's PRV stays here for the noise-multiplier search, for
Opacus's own optimizer history, and as an independent check of pure DP-SGD histories.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

from privacy.accounting import compose_mechanisms
from privacy.mechanisms import DpSgd
from privacy.noise_cache import NoiseCache

__all__ = [
    "SUPPORTED_MECHANISMS",
    "BudgetExceededError",
    "HistoryEntry",
    "check_round_budget",
    "epsilon_for_history",
    "noise_multiplier_for_run",
    "planned_steps",
    "use_noise_cache",
]

HistoryEntry = tuple[float, float, int]
"""One accountant history entry: ``(noise_multiplier, sample_rate, steps)``."""

SUPPORTED_MECHANISMS: Final = ("prv", "rdp")
# What noise_multiplier_for_run may search with: the ledger's own accountant (``"pld"``,
# the default), or one of Opacus's.
NOISE_SEARCH_ACCOUNTANTS: Final = ("pld", *SUPPORTED_MECHANISMS)

# Relative slack on the budget comparison, only to absorb float noise in the last digit.
# It is not a privacy allowance: the noise multiplier is chosen with the accountant's own
# binary search, which always lands on an epsilon at or below the target.
_BUDGET_RTOL: Final = 1e-9


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in SUPPORTED_MECHANISMS:
        raise ValueError(
            f"unsupported accounting mechanism {mechanism!r}; use one of "
            f"{', '.join(SUPPORTED_MECHANISMS)}"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")


def _check_sample_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, int | float) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")


def planned_steps(*, sample_rate: float, epochs: int) -> int:
    """Number of DP-SGD steps that ``epochs`` epochs take at ``sample_rate``.

    This is the rule of Opacus's Poisson data loader, ``int(1 / sample_rate)`` batches per
    epoch, so that what is planned and reserved equals what the optimizer's accountant
    records. When ``sample_rate`` is the reciprocal of an integer ``k`` (always the case for
    the rates Opacus records, ``1 / len(data_loader)``), ``1 / sample_rate`` can come out a
    hair under ``k`` in floating point; it is rounded to ``k`` rather than truncated to
    ``k - 1``.

    Args:
        sample_rate: Poisson sampling rate per step, in (0, 1].
        epochs: number of epochs, at least 1.

    Returns:
        The total number of steps.

    Raises:
        ValueError: if an argument is out of range.
    """
    _check_sample_rate(sample_rate)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1; got {epochs!r}")
    inverse = 1.0 / sample_rate
    nearest = round(inverse)
    per_epoch = nearest if math.isclose(inverse, nearest, rel_tol=1e-9) else int(inverse)
    return epochs * max(1, per_epoch)


# Opacus's PRV accountant takes 0.05-0.6 s per epsilon on a small CPU, and the noise search
# evaluates it about 15 times. Both are pure functions of their arguments, and the same
# questions recur (every site of a run, every check of a ledger), so answers are cached.
_CACHE_SIZE: Final = 512


# Python's warning filters are process-wide and ``warnings.catch_warnings`` is not
# thread-safe: a context that ends in one thread restores the filter list it saved, removing
# a filter another thread's context added meanwhile. The site computes epsilons in background
# threads while a round trains, so every such context in the appliance holds this one lock.
_WARNING_FILTERS_LOCK: Final = threading.RLock()


@contextlib.contextmanager
def without_warnings(*messages: str) -> Iterator[None]:
    """Drop the ``UserWarning`` whose message starts with one of ``messages`` (regular
    expressions), and only those, inside the block; safe to use from several threads."""
    with _WARNING_FILTERS_LOCK, warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _without_alpha_advice() -> contextlib.AbstractContextManager[None]:
    """Drop Opacus's "Optimal order is the largest alpha ... consider expanding the range
    of alphas" warning, and only that one, while an epsilon is computed.

    The PRV accountant uses an RDP bound only to size its numerical domain; a loose bound
    widens the domain and leaves the PRV epsilon's error bound intact (with the RDP
    accountant the epsilon is a valid, if looser, upper bound). The advice names a
    setting that neither hospital IT nor the ML team can change, so it would only alarm the
    people who read the site's and the coordinator's logs.
    """
    return without_warnings("Optimal order is the (largest|smallest) alpha")


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _search_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    # Opacus (and torch under it) is imported here, not at module level: the site agent, the
    # coordinator and the CLI import this module, and most of them never search for a noise.
    from opacus.accountants.utils import get_noise_multiplier

    with _without_alpha_advice():
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


# The ledger's search stops when the bracket's ends differ by this factor: the noise it
# returns is at most 0.1% above the smallest that fits.
_LEDGER_SEARCH_RATIO: Final = 1.001
_LEDGER_SEARCH_LIMITS: Final = (1e-3, 1e4)
_LEDGER_SEARCH_EVALS: Final = 60


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _search_noise_ledger(epsilon: float, delta: float, sample_rate: float, steps: int
                         ) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``steps`` DP-SGD steps the ledger's own
    accountant (:func:`privacy.accounting.compose_mechanisms`: dp-accounting's PLD) puts at
    most at ``epsilon``.

    A bracket by doubling from sigma 1, then regula falsi (Illinois) on log epsilon against
    log sigma, which is smooth and decreasing: about 8 evaluations of a few hundredths of a
    second each, where Opacus's PRV search takes 15 of up to half a second.
    """
    def excess(sigma: float) -> float:
        eps = compose_mechanisms([DpSgd(sigma, sample_rate, steps)], delta=delta).epsilon
        return math.inf if not math.isfinite(eps) else math.log(eps) - math.log(epsilon)

    floor, ceiling = _LEDGER_SEARCH_LIMITS
    evals = 0
    lo, hi = 1.0, 1.0
    f_lo = f_hi = excess(1.0)
    evals += 1
    while f_hi > 0:                         # too little noise: double until it fits
        lo, f_lo = hi, f_hi
        hi *= 2.0
        if hi > ceiling:
            raise ValueError(f"even noise multiplier {ceiling:g} spends more than epsilon "
                             f"{epsilon}")
        f_hi, evals = excess(hi), evals + 1
    while f_lo <= 0:                        # fits already: halve until it does not
        hi, f_hi = lo, f_lo
        lo /= 2.0
        if lo < floor:
            return hi
        f_lo, evals = excess(lo), evals + 1
    # Now f_lo > 0 >= f_hi, in log sigma.
    a, b, fa, fb, side = math.log(lo), math.log(hi), f_lo, f_hi, 0
    while b - a > math.log(_LEDGER_SEARCH_RATIO) and evals < _LEDGER_SEARCH_EVALS:
        c = b - fb * (b - a) / (fb - fa) if math.isfinite(fa) else (a + b) / 2
        # Keep strictly inside, and at least a tenth of the way from either end.
        c = min(max(c, a + (b - a) / 10), b - (b - a) / 10)
        fc, evals = excess(math.exp(c)), evals + 1
        if fc > 0:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb = c, fc
            if side == 1:
                fa /= 2
            side = 1
    return math.exp(b)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _epsilon(entries: tuple[HistoryEntry, ...], delta: float, mechanism: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant: IAccountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    accountant.history = list(entries)
    with _without_alpha_advice():
        return float(accountant.get_epsilon(delta=delta))


def noise_multiplier_for_run(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    total_epochs: int,
    accountant: str = "pld",
) -> float:
    """The noise multiplier that spends exactly a run's whole budget over all its epochs.

    Computed once per run, for ``rounds x local_epochs`` epochs, and then used unchanged in
    every round. Choosing the noise per round from a zero start (as
    ``make_private_with_epsilon`` does) would let every round spend the full budget.

    The number of steps is :func:`planned_steps`, i.e. what the training loop will really
    take. By default the search asks the ledger's own accountant (dp-accounting's PLD,
    which the ledger charges every round with) and returns the smallest noise, to 0.1%,
    that puts the whole run at or below ``epsilon``: charging every planned round never
    exceeds the budget, and nothing is left on the table. With ``"prv"`` or ``"rdp"``,
    Opacus's binary search picks it (an epsilon within 0.01 below the target by that
    accountant; several times slower), and it is then raised where needed until the
    ledger's figure fits too.

    Args:
        epsilon: the run's epsilon budget, > 0.
        delta: the run's delta, in (0, 1).
        sample_rate: Poisson sampling rate per step, in (0, 1].
        total_epochs: all local epochs of the run, summed over rounds; at least 1.
        accountant: what the search asks: ``"pld"`` (default, the ledger's accountant),
            ``"prv"`` or ``"rdp"`` (Opacus's).

    Returns:
        The noise multiplier (sigma).

    Raises:
        ValueError: if an argument is out of range or the budget cannot be met with any
            noise multiplier the search is willing to try.
    """
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon budget must be > 0; got {epsilon!r}")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be an integer >= 1; got {total_epochs!r}")
    if accountant not in NOISE_SEARCH_ACCOUNTANTS:
        raise ValueError(f"unsupported accounting mechanism {accountant!r}; use one of "
                         f"{', '.join(NOISE_SEARCH_ACCOUNTANTS)}")
    steps = planned_steps(sample_rate=sample_rate, epochs=total_epochs)
    plan = (accountant, float(epsilon), float(delta), float(sample_rate), steps)
    cache = _disk_cache
    if cache is not None and (known := cache.get(*plan)) is not None:
        return known
    try:
        if accountant == "pld":
            sigma = _search_noise_ledger(float(epsilon), float(delta), float(sample_rate),
                                         steps)
        else:
            sigma = _search_noise(float(epsilon), float(delta), float(sample_rate), steps,
                                  accountant)
        sigma = _within_ledger_figure(sigma, float(epsilon), float(delta),
                                      float(sample_rate), steps)
    except ValueError as exc:
        raise ValueError(
            f"no noise multiplier reaches epsilon {epsilon} at delta {delta} over {steps} "
            f"steps at sample rate {sample_rate}: raise the budget or plan fewer rounds or "
            f"epochs ({exc})"
        ) from exc
    if cache is not None:
        cache.put(*plan, sigma)
    return sigma


_disk_cache: NoiseCache | None = None


def use_noise_cache(path: Path | None) -> None:
    """Keep :func:`noise_multiplier_for_run`'s answers in ``path`` across restarts (see
    :mod:`privacy.noise_cache`: an answer read back is confirmed by the ledger's accountant
    before use); ``None`` keeps them in memory only."""
    global _disk_cache
    _disk_cache = None if path is None else NoiseCache(path)


# Each try raises the noise by 0.2%; Opacus's PRV and the ledger's PLD differ by about 1%
# of epsilon at most, which a handful of tries covers.
_NOISE_STEP: Final = 1.002
_NOISE_TRIES: Final = 100


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _within_ledger_figure(sigma: float, epsilon: float, delta: float, sample_rate: float,
                          steps: int) -> float:
    """The smallest ``sigma * 1.002**k`` whose run the ledger's accountant (dp-accounting's
    PLD) puts at most at ``epsilon``.

    The ledger charges rounds with PLD, the search used Opacus's PRV: the two agree within
    about 0.01 but not exactly, and a noise that PRV puts just under the budget could leave
    the run's last round refused by the ledger.
    """
    for _ in range(_NOISE_TRIES):
        if compose_mechanisms([DpSgd(sigma, sample_rate, steps)],
                              delta=delta).epsilon <= epsilon:
            return sigma
        sigma *= _NOISE_STEP
    raise ValueError(f"the ledger's accountant puts noise multiplier {sigma:.4g} still "
                     f"over epsilon {epsilon}")


def _normalise(history: Sequence[Sequence[float]]) -> list[HistoryEntry]:
    """Validate a history and merge entries that share ``(sigma, q)``.

    Merging is exact: composition does not depend on order, and Opacus's own accountants
    merge consecutive steps at the same ``(sigma, q)`` the same way. It keeps a history
    charged round by round numerically identical to the single entry the noise multiplier
    was searched for.
    """
    merged: dict[tuple[float, float], int] = {}
    problems: list[str] = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            problems.append(f"entry {i}: expected (sigma, q, steps), got {entry!r}")
            continue
        sigma, q, steps = entry
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            problems.append(f"entry {i}: steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
            problems.append(f"entry {i}: noise multiplier must be >= 0, got {sigma!r}")
        if not (isinstance(q, int | float) and 0.0 < q <= 1.0):
            problems.append(f"entry {i}: sample rate must be in (0, 1], got {q!r}")
        if problems:
            continue
        if steps == 0:
            continue
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    if problems:
        raise ValueError("invalid accountant history: " + "; ".join(problems))
    # Sorted, so that the same steps charged in another order (runs listed differently,
    # a round warmed ahead) hit the same cache entry.
    return sorted((sigma, q, steps) for (sigma, q), steps in merged.items())


def epsilon_for_history(
    history: Sequence[HistoryEntry], *, delta: float, mechanism: str = "prv"
) -> float:
    """Epsilon of the composition of every step in ``history``, at ``delta``.

    Args:
        history: accountant entries ``(noise_multiplier, sample_rate, steps)``.
        delta: target delta, in (0, 1).
        mechanism: ``"prv"`` (default) or ``"rdp"``.

    Returns:
        The epsilon upper bound Opacus reports; ``0.0`` for an empty history (no step taken,
        nothing spent) and ``inf`` if any step ran without noise.

    Raises:
        ValueError: for a malformed history, a delta outside (0, 1) or an unknown mechanism.
    """
    _check_delta(delta)
    _check_mechanism(mechanism)
    entries = _normalise(history)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf
    return _epsilon(tuple(entries), float(delta), mechanism)


# What a site's IT can raise when a budget of this scope is reached.
_RAISE_HINT: Final = {
    "run": "raise the site's epsilon cap for this project in its policy",
    "project": "raise the site's epsilon cap for this project in its policy",
    "site": "raise the site-wide cap (site_epsilon_cap) in the site's policy",
}


class BudgetExceededError(Exception):
    """A disclosure (a round, a statistics release...) would take a site's spent epsilon past
    a budget; nothing was read or charged.

    Attributes:
        spent: epsilon spent in the scope before the refused disclosure.
        projected: epsilon the disclosure would have brought it to.
        budget: the budget (cap) it would have exceeded.
        scope: what the budget belongs to: ``"run"``, ``"project"`` or ``"site"``.
        needs: the disclosure's own epsilon, alone (None when not computed).
        what: the disclosure, in words (``"this round"``).
        accountant: the accountant of the figures (``"pld"``, ``"rdp"``; empty: Opacus).
    """

    def __init__(
        self, *, spent: float, projected: float, budget: float, scope: str = "run",
        needs: float | None = None, what: str = "this round", accountant: str = "",
    ) -> None:
        self.spent = spent
        self.projected = projected
        self.budget = budget
        self.scope = scope
        self.needs = needs
        self.what = what
        self.accountant = accountant
        hint = _RAISE_HINT.get(scope, _RAISE_HINT["run"])
        own = "" if needs is None else f"; it needs {needs:.4f} on its own"
        by = f" ({accountant.upper()} accounting)" if accountant else ""
        super().__init__(
            f"privacy budget exceeded: {what} would bring the {scope}'s epsilon from "
            f"{spent:.4f} to {projected:.4f}, over its budget of {budget:.4f} "
            f"({self.left:.4f} left{own}){by}. Nothing was read for it and nothing was "
            f"charged. To go on, {hint}, or launch a new run with fewer rounds or local "
            f"epochs (or a larger budget) so that its noise is planned for it."
        )

    @property
    def left(self) -> float:
        """What the scope had left before the refused disclosure (never below 0)."""
        return max(0.0, self.budget - self.spent)


def check_round_budget(
    *,
    history: Sequence[HistoryEntry],
    next_step: HistoryEntry,
    delta: float,
    budget: float,
    mechanism: str = "prv",
    scope: str = "run",
) -> float:
    """Epsilon after adding ``next_step`` to ``history``; refuse if it exceeds ``budget``.

    Args:
        history: entries already charged.
        next_step: the round about to be trained, ``(noise_multiplier, sample_rate, steps)``.
        delta: target delta, in (0, 1).
        budget: the epsilon the projection must not exceed, > 0.
        mechanism: ``"prv"`` (default) or ``"rdp"``.
        scope: named in the error: whose budget this is (``"run"``, ``"project"``).

    Returns:
        The projected epsilon.

    Raises:
        BudgetExceededError: if the projection is over ``budget`` (beyond float noise).
        ValueError: for malformed arguments.
    """
    if not (isinstance(budget, int | float) and budget > 0):
        raise ValueError(f"epsilon budget must be > 0; got {budget!r}")
    projected = epsilon_for_history([*history, next_step], delta=delta, mechanism=mechanism)
    if projected > budget * (1.0 + _BUDGET_RTOL):
        spent = epsilon_for_history(history, delta=delta, mechanism=mechanism)
        raise BudgetExceededError(
            spent=spent, projected=projected, budget=float(budget), scope=scope
        )
    return projected
