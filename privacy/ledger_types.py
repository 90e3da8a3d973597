"""Read-only views of the privacy ledger: entries, runs, rounds, reservations, caps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from privacy.accounting import Composition
from privacy.mechanisms import DpSgd, Mechanism

__all__ = ["Caps", "Entry", "Reservation", "RoundRecord", "RunLedger", "Snapshot"]

Purpose = Literal["round", "statistics", "drift", "tuning", "baseline"]
PURPOSES: tuple[Purpose, ...] = ("round", "statistics", "drift", "tuning", "baseline")
EntryState = Literal["reserved", "charged"]


@dataclass(frozen=True)
class Caps:
    """The site's caps a disclosure must stay within, besides its run's own budget.

    Attributes:
        project: the cap of the run's project (it also bounds the run); None: none.
        site: the site-wide cap over every project; None: none.
    """

    project: float | None = None
    site: float | None = None


@dataclass(frozen=True)
class Entry:
    """One disclosure in the ledger.

    Attributes:
        id: the entry's number (its order of reservation).
        run_id: the run it belongs to.
        project: the run's project.
        purpose: ``round``, ``statistics``, ``drift``, ``tuning`` or ``baseline``.
        key: the disclosure within the run and purpose (the round number for rounds).
        round: the round number, for ``round`` entries.
        delta: the delta it is accounted at (its run's).
        mechanism: what it disclosed through.
        state: ``reserved`` (written before it read a row; counts, whether or not it
            finished) or ``charged`` (carried out to the end).
        epsilon_after: the run's epsilon once it was reserved (informational: every check
            composes the mechanisms again).
        reserved_at: when it was reserved, ISO 8601 in UTC.
        charged_at: when it was marked charged, or None.
    """

    id: int
    run_id: str
    project: str
    purpose: Purpose
    key: str
    round: int | None
    delta: float
    mechanism: Mechanism
    state: EntryState
    epsilon_after: float
    reserved_at: str
    charged_at: str | None

    @property
    def at(self) -> str:
        """When it was last written."""
        return self.charged_at or self.reserved_at


@dataclass(frozen=True)
class RoundRecord:
    """One DP-SGD round's entry.

    Attributes:
        round_number: the coordinator's round number.
        status: ``reserved`` (charged before training; training started or crashed) or
            ``charged`` (trained to the end).
        epsilon_after: the run's epsilon once this round was reserved.
        steps: DP-SGD steps charged for the round.
        at: when the round was reserved or completed, ISO 8601 in UTC.
    """

    round_number: int
    status: EntryState
    epsilon_after: float
    steps: int
    at: str


@dataclass(frozen=True)
class RunLedger:
    """One run as the ledger holds it.

    Attributes:
        run_id: the coordinator's run id.
        project: its project.
        epsilon_budget: its epsilon budget at this site (over every disclosure).
        delta: its delta.
        noise_multiplier: its DP-SGD noise multiplier (None until it trains).
        sample_rate: its DP-SGD sampling rate per step (None until it trains).
        entries: every entry of the run, in order.
        rounds: round number -> :class:`RoundRecord` (an immutable mapping).
    """

    run_id: str
    project: str
    epsilon_budget: float
    delta: float
    noise_multiplier: float | None
    sample_rate: float | None
    entries: tuple[Entry, ...]
    rounds: Mapping[int, RoundRecord]

    @property
    def trains(self) -> bool:
        """Whether a round of the run was reserved here (DP-SGD or secure aggregation)."""
        return self.noise_multiplier is not None or bool(self.rounds)

    @property
    def history(self) -> tuple[tuple[float, float, int], ...]:
        """The DP-SGD rounds as an Opacus accountant history ``(sigma, q, steps)``."""
        return tuple((e.mechanism.noise_multiplier, e.mechanism.sample_rate,
                      e.mechanism.steps) for e in self.entries
                     if e.purpose == "round" and isinstance(e.mechanism, DpSgd))


@dataclass(frozen=True)
class Snapshot:
    """The whole ledger, read in one transaction.

    Attributes:
        runs: run id -> :class:`RunLedger`, sorted by id.
        entries: every entry in the order reserved.
    """

    runs: Mapping[str, RunLedger]
    entries: tuple[Entry, ...]

    def find(self, run_id: str, purpose: str, key: str) -> Entry | None:
        """The entry reserved under (run, purpose, key), if any."""
        for entry in self.entries:
            if (entry.run_id, entry.purpose, entry.key) == (run_id, purpose, key):
                return entry
        return None

    def scope(self, *, run_id: str | None = None, project: str | None = None
              ) -> tuple[list[Mechanism], float]:
        """The mechanisms of one run, one project or (neither) the site, and the largest
        delta among them (0.0 for none)."""
        chosen = [e for e in self.entries
                  if (run_id is None or e.run_id == run_id)
                  and (project is None or e.project == project)]
        return [e.mechanism for e in chosen], max((e.delta for e in chosen), default=0.0)


@dataclass(frozen=True)
class Reservation:
    """A disclosure reserved in the ledger, with the composed figures after it.

    Attributes:
        entry: its ledger entry.
        new: False when it had been reserved before (a retry: nothing charged now).
        run: the run's figure after it (None for a retry).
        project: the project's figure after it, where a project cap was checked.
        site: the site-wide figure after it, where a site cap was checked.
    """

    entry: Entry
    new: bool
    run: Composition | None = None
    project: Composition | None = None
    site: Composition | None = None
