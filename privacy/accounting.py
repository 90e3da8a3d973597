"""Composition of a site's recorded mechanisms with Google's dp-accounting.

The figure reported for a set of mechanisms (a run's, a project's, the whole site's) is the
epsilon of their composition at one delta:

* **PLD** (privacy loss distributions, pessimistic estimate) whenever every mechanism has
  one: the tightest accountant dp-accounting offers (within about 0.01 of Opacus's PRV).
* **RDP** when any mechanism has none (a tuning selection, dp-accounting's
  ``RepeatAndSelectDpEvent``, is RDP-only): then the RDP figure of everything is reported.
  Splitting delta between a PLD of the rest and an RDP of the selection gave a larger
  epsilon in every case measured, so one RDP composition is both simpler and tighter.

RDP also serves as a cross-check of the PLD figure (``cross_check=True``): both are upper
bounds, RDP the looser, so a PLD figure well above the RDP one means a numerical problem.

Speed: identical mechanisms are grouped first (a run's rounds at one noise multiplier and
sample rate are one DP-SGD event of all their steps, exact since composition does not
depend on order); each group's distribution is cached (its single step too, see
``privacy.mechanisms``); the composition of every prefix of groups is kept as a live
accountant (a composed distribution, an RDP accountant) that the next figure builds on; and
figures are cached by their groups and delta. Another round of a run then costs one
self-composition and one convolution, whatever the site's history.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from dp_accounting import rdp
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution as PLD

from privacy.mechanisms import Mechanism

__all__ = [
    "PLD_INTERVAL",
    "Composition",
    "clear_caches",
    "compose_mechanisms",
    "group_mechanisms",
    "new_rdp_accountant",
]

PLD_INTERVAL: Final = 1e-3
"""PLD value discretisation. 1e-4 (the library's default) moves epsilon by about 1e-3 and
costs ten times as long; the discretisation is pessimistic, so a coarser one only ever
reports a (slightly) larger epsilon."""

Accountant = Literal["pld", "rdp", "none"]
Group = tuple[Mechanism, int]


class _DropConvergenceNotices(logging.Filter):
    """dp-accounting logs (through absl) every fractional RDP order it cannot evaluate and
    leaves out; the bound stays valid without that order. Site logs are read by hospital
    IT, who can do nothing about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()




@dataclass(frozen=True)
class Composition:
    """The composed privacy loss of a set of mechanisms.

    Attributes:
        epsilon: the reported figure (``pld`` when available, else ``rdp``; 0 when empty).
        delta: the delta it is stated at.
        accountant: which accountant produced ``epsilon``: ``pld``, ``rdp`` or ``none``
            (nothing to compose).
        pld: the PLD figure, None where some mechanism has no PLD.
        rdp: the RDP figure, when it was computed (RDP-only sets, or a cross-check).
    """

    epsilon: float
    delta: float
    accountant: Accountant
    pld: float | None = None
    rdp: float | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
                "pld": self.pld, "rdp": self.rdp}


def group_mechanisms(mechanisms: Iterable[Mechanism]) -> tuple[Group, ...]:
    """Identical mechanisms grouped: ``(unit, times)``, each group placed where its *last*
    occurrence is.

    Composition does not depend on order; the order only decides what the prefix caches
    below can reuse. A ledger lists its entries oldest first, so the group that a new
    round changes (its run's DP-SGD steps) comes last, and everything before it is a prefix
    composed in an earlier round.
    """
    counts: dict[Mechanism, int] = {}
    for mechanism in mechanisms:
        unit, times = mechanism.unit()
        counts[unit] = counts.pop(unit, 0) + times   # re-inserted: moves to the end
    return tuple(counts.items())


@functools.lru_cache(maxsize=128)
def _group_pld(unit: Mechanism, times: int) -> PLD | None:
    return unit.pld(times, PLD_INTERVAL)


T = TypeVar("T")


class _PrefixCache(Generic[T]):
    """Composition state per prefix of groups (a live accountant per prefix), least
    recently used dropped first. Another round of a run then composes one group onto a
    cached prefix instead of every group again."""

    def __init__(self, size: int, start: Callable[[], T],
                 add: Callable[[T, Group], T]) -> None:
        self._size = size
        self._start = start
        self._add = add
        self._items: OrderedDict[tuple[Group, ...], T] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, key: tuple[Group, ...]) -> tuple[bool, T | None]:
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    def _put(self, key: tuple[Group, ...], value: T) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def state(self, groups: tuple[Group, ...]) -> T:
        """The composed state of ``groups``, built on the longest cached prefix."""
        state = self._start()
        length = 0
        for prefix in range(len(groups), 0, -1):
            found, cached = self._get(groups[:prefix])
            if found:
                length, state = prefix, cached  # type: ignore[assignment]
                break
        for i in range(length, len(groups)):
            state = self._add(state, groups[i])
            # Only the whole and the one-shorter prefix are kept: the next round of the
            # same run reuses the latter.
            if i >= len(groups) - 2:
                self._put(groups[:i + 1], state)
        return state

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _add_pld(total: PLD | None, group: Group) -> PLD | None:
    dist = _group_pld(*group)
    assert dist is not None
    return dist if total is None else total.compose(dist)


def _add_rdp(total: rdp.RdpAccountant, group: Group) -> rdp.RdpAccountant:
    from dp_accounting import dp_event

    # The accountant accumulates in place: each prefix keeps its own copy.
    out = copy.deepcopy(total)
    out.compose(dp_event.SelfComposedDpEvent(group[0].dp_event(), group[1]))
    return out


def new_rdp_accountant() -> rdp.RdpAccountant:
    """A fresh dp-accounting RDP accountant, with absl's convergence notices filtered.

    dp-accounting is imported here, on first use, and not by every process that imports
    :mod:`privacy`: it costs about a second of CPU (it loads SciPy's signal package). The
    filter goes on after that import: absl must create its own ``absl`` logger first.
    """
    from dp_accounting import rdp as rdp_lib

    _quiet_absl()
    return rdp_lib.RdpAccountant()


@functools.cache
def _quiet_absl() -> None:
    """Filter absl's convergence notices, once (after dp-accounting has created absl's
    logger)."""
    logging.getLogger("absl").addFilter(_DropConvergenceNotices())


# A composed distribution of a site's whole history is a few hundred kilobytes.
_PLD_PREFIXES: Final = _PrefixCache["PLD | None"](32, lambda: None, _add_pld)
_RDP_PREFIXES: Final = _PrefixCache["rdp.RdpAccountant"](64, new_rdp_accountant, _add_rdp)


@functools.lru_cache(maxsize=512)
def _pld_epsilon(groups: tuple[Group, ...], delta: float) -> float | None:
    if any(_group_pld(*group) is None for group in groups):
        return None
    total = _PLD_PREFIXES.state(groups)
    assert total is not None
    return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=512)
def _rdp_epsilon(groups: tuple[Group, ...], delta: float) -> float:
    return float(_RDP_PREFIXES.state(groups).get_epsilon(delta))


def compose_mechanisms(mechanisms: Iterable[Mechanism], *, delta: float,
                       cross_check: bool = False) -> Composition:
    """The epsilon of all ``mechanisms`` composed, at ``delta``.

    Args:
        mechanisms: the mechanisms (any order; repeats count).
        delta: the delta to state epsilon at, in (0, 1).
        cross_check: also compute the RDP figure where the PLD one is reported.

    Returns:
        The :class:`Composition`; epsilon 0 for no mechanism.

    Raises:
        ValueError: for a delta outside (0, 1) or a mechanism with a bad parameter.
    """
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")
    groups = group_mechanisms(mechanisms)
    problems = [f"{unit.TYPE}: {p}" for unit, _ in groups for p in unit.problems()]
    if problems:
        raise ValueError("cannot account these mechanisms: " + "; ".join(problems))
    if not groups:
        return Composition(epsilon=0.0, delta=float(delta), accountant="none")
    pld = _pld_epsilon(groups, float(delta))
    if pld is None:
        figure = _rdp_epsilon(groups, float(delta))
        return Composition(epsilon=figure, delta=float(delta), accountant="rdp", rdp=figure)
    rdp_figure = _rdp_epsilon(groups, float(delta)) if cross_check else None
    return Composition(epsilon=pld, delta=float(delta), accountant="pld", pld=pld,
                       rdp=rdp_figure)


def clear_caches() -> None:
    """Forget every cached distribution and figure (benchmarks time a cold composition)."""
    from privacy.mechanisms import _unit_pld

    for cached in (_unit_pld, _group_pld, _pld_epsilon, _rdp_epsilon):
        cached.cache_clear()
    _PLD_PREFIXES.clear()
    _RDP_PREFIXES.clear()
