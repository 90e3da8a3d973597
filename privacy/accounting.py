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
``privacy.mechanisms``) and composed once per figure; figures are cached by their groups
and delta. Another round of a run then costs one self-composition and a few convolutions.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from dp_accounting import dp_event, rdp
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution as PLD

from privacy.mechanisms import Mechanism

__all__ = [
    "PLD_INTERVAL",
    "Composition",
    "compose_mechanisms",
    "group_mechanisms",
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


logging.getLogger("absl").addFilter(_DropConvergenceNotices())


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


def _group_key(group: Group) -> tuple[str, int]:
    return json.dumps(group[0].to_dict(), sort_keys=True), group[1]


def group_mechanisms(mechanisms: Iterable[Mechanism]) -> tuple[Group, ...]:
    """Identical mechanisms grouped: ``(unit, times)``, in a canonical order.

    The order does not depend on the order of ``mechanisms``, so that the same mechanisms
    listed differently hit the same cache entries.
    """
    counts: dict[Mechanism, int] = {}
    for mechanism in mechanisms:
        unit, times = mechanism.unit()
        counts[unit] = counts.get(unit, 0) + times
    return tuple(sorted(counts.items(), key=_group_key))


@functools.lru_cache(maxsize=128)
def _group_pld(unit: Mechanism, times: int) -> PLD | None:
    return unit.pld(times, PLD_INTERVAL)


@functools.lru_cache(maxsize=512)
def _pld_epsilon(groups: tuple[Group, ...], delta: float) -> float | None:
    total: PLD | None = None
    for unit, times in groups:
        dist = _group_pld(unit, times)
        if dist is None:
            return None
        total = dist if total is None else total.compose(dist)
    assert total is not None
    return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=512)
def _rdp_epsilon(groups: tuple[Group, ...], delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.ComposedDpEvent(
        [dp_event.SelfComposedDpEvent(unit.dp_event(), times) for unit, times in groups]))
    return float(accountant.get_epsilon(delta))


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
