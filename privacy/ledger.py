"""The site's privacy ledger: every mechanism the site has disclosed through, in SQLite.

One accountant per site over every disclosure. The ledger records *mechanisms*, never
epsilons (see :mod:`privacy.mechanisms`): DP-SGD rounds, Gaussian or Laplace releases of
statistics, drift checks, tuning selections. Every figure (a run's, a project's, the whole
site's) is composed from them with dp-accounting (:mod:`privacy.accounting`), and one budget
covers them all: a disclosure that would take its run, its project or the site past a cap is
refused before it reads a row.

Properties that matter more than anything else:

* **Write-ahead.** A disclosure is reserved (its entry written and committed) *before* it
  reads a row; a task killed afterwards leaves the entry, which counts: the safe side. A
  retried disclosure is recognised by its run, purpose and key (the round number) and never
  charged twice. A caller that keeps its own record of charges (the site's audit log) writes
  it from ``on_charge``, which runs after the budget checks and before the commit: a crash
  in between leaves a record without a charge, never a charge without its record.
* **Transactions.** Each reservation is one SQLite transaction (``BEGIN IMMEDIATE``: the
  checks and the insert see no concurrent writer), in WAL mode with ``synchronous=FULL``.
* **Never silently reset.** A ledger that cannot be read, or that holds an entry this
  version cannot account (an unknown mechanism written by a newer version), raises
  :class:`LedgerCorruptError` / :class:`UnknownMechanismError` for every operation, so the
  site refuses to train; nothing is skipped or re-counted.
* **Migration.** A site's ``privacy-ledger.json`` of earlier versions is migrated on first
  open (:mod:`privacy.ledger_migrate`) and kept, renamed, as a backup.

Tables: ``runs`` (a run's project, budget, delta and DP-SGD noise), ``entries`` (one per
disclosure: run, project, purpose, key, round, delta, mechanism ``{"type": ...}``, state
``reserved`` -> ``charged``, times) and ``meta`` (schema version, migration).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from privacy.accounting import Composition, compose_mechanisms
from privacy.dp import BudgetExceededError, HistoryEntry
from privacy.ledger_db import (
    LedgerCorruptError,
    UnknownMechanismError,
    UnknownRunError,
    _Store,
)
from privacy.ledger_types import (
    PURPOSES,
    Caps,
    Entry,
    EntryState,
    Purpose,
    Reservation,
    RoundRecord,
    RunLedger,
    Snapshot,
)
from privacy.mechanisms import CoveredTrial, DpSgd, Mechanism, TuningSelection
from privacy.tuning import NotCoveredError, check_cover

__all__ = [
    "PURPOSES",
    "Caps",
    "Entry",
    "EntryState",
    "LedgerCorruptError",
    "NotCoveredError",
    "PrivacyLedger",
    "Purpose",
    "Reservation",
    "RoundRecord",
    "RunLedger",
    "UnknownMechanismError",
    "UnknownRunError",
]

# Relative slack on a cap, only to absorb float noise in the last digit.
_RTOL: Final = 1e-9

_WHAT: Final = {"round": "this round", "statistics": "this statistics release",
                "drift": "this drift check", "tuning": "this tuning search",
                "baseline": "this local-only baseline"}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _check_covered(snap: Snapshot, run: RunLedger, mechanism: CoveredTrial) -> None:
    """A trial round costs nothing only under its search's charge: the search's selection
    must be recorded, in the run's project, and the trial must stay under its reference.

    Raises:
        NotCoveredError: otherwise, saying why.
    """
    search = snap.find(f"tuning-{mechanism.search}", "tuning", str(mechanism.search))
    if search is None or not isinstance(search.mechanism, TuningSelection):
        raise NotCoveredError(
            f"run {run.run_id!r}: tuning search {mechanism.search} has no charge in this "
            f"ledger; a trial trains only after its search is charged")
    if search.project != run.project:
        raise NotCoveredError(
            f"run {run.run_id!r} (project {run.project}) cannot be covered by tuning search "
            f"{mechanism.search} of project {search.project}")
    recorded = [e.mechanism for e in run.entries if isinstance(e.mechanism, CoveredTrial)]
    if any(r.search != mechanism.search for r in recorded) or any(
            not isinstance(e.mechanism, CoveredTrial) for e in run.entries):
        raise NotCoveredError(f"run {run.run_id!r} has disclosures outside tuning search "
                              f"{mechanism.search}: a trial run is covered as a whole or not")
    check_cover(search.mechanism, recorded, mechanism)


class PrivacyLedger:
    """The site's privacy ledger, one SQLite file (see the module docstring).

    Safe to share between threads and processes: every operation opens its own connection,
    and every change is one transaction. A missing file is an empty ledger; the file (mode
    0600) is created on the first write, or by migrating the JSON ledger beside it.

    Args:
        path: the SQLite file, normally ``privacy-ledger.sqlite`` in the site's directory.
        legacy_path: the JSON ledger of earlier versions to migrate (default: ``path`` with
            the suffix ``.json``).
    """

    def __init__(self, path: Path, *, legacy_path: Path | None = None) -> None:
        path = Path(path)
        if path.suffix == ".json":
            raise ValueError(f"{path}: the privacy ledger is a SQLite file now "
                             f"(privacy-ledger.sqlite); the JSON ledger beside it migrates")
        self._store = _Store(path, legacy_path or path.with_suffix(".json"))

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._store.path

    # -- reading -------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every run and entry, read in one transaction.

        Raises:
            LedgerCorruptError: the ledger cannot be trusted (UnknownMechanismError: an
                entry's mechanism is unknown to this version).
        """
        return self._store.read()

    def raw(self) -> tuple[dict[str, str], list[dict[str, object]]]:
        """``(meta, rows)``: the file's metadata (schema version, migration) and every entry
        row as stored, mechanisms as their JSON text; nothing is decoded or checked, so it
        also shows an entry this version cannot account."""
        return self._store.raw()

    def get_run(self, run_id: str) -> RunLedger | None:
        """The ledger's view of ``run_id``, or None if it was never opened."""
        return self.snapshot().runs.get(run_id)

    def all_runs(self) -> dict[str, RunLedger]:
        """Every run: run id -> :class:`RunLedger`, sorted by id."""
        return dict(self.snapshot().runs)

    def run_ids(self, *, project: str | None = None) -> list[str]:
        """Ids of the runs, sorted; only ``project``'s when given."""
        return [r for r, run in self.snapshot().runs.items()
                if project is None or run.project == project]

    def entries(self) -> list[Entry]:
        """Every entry, in the order they were reserved."""
        return list(self.snapshot().entries)

    def history(self, run_id: str) -> list[HistoryEntry]:
        """The run's DP-SGD rounds as Opacus accountant history ``(sigma, q, steps)``.

        Raises:
            UnknownRunError: if the run was never opened.
        """
        return list(self._run(self.snapshot(), run_id).history)

    def spent(self, *, run_id: str | None = None, project: str | None = None,
              cross_check: bool = False) -> Composition:
        """The composed figure of one run, one project, or (neither given) the whole site.

        A run is stated at its delta; a project or the site at the largest delta of the
        runs it covers (the weakest guarantee among them).

        Raises:
            UnknownRunError: if ``run_id`` was never opened.
        """
        snap = self.snapshot()
        mechanisms, delta = snap.scope(run_id=run_id, project=project)
        if run_id is not None:
            delta = max(delta, self._run(snap, run_id).delta)
        if not mechanisms:
            return Composition(epsilon=0.0, delta=delta, accountant="none")
        return compose_mechanisms(mechanisms, delta=delta, cross_check=cross_check)

    def epsilon_spent(self, run_id: str) -> float:
        """Epsilon spent by ``run_id``: every reserved and charged entry counts.

        Raises:
            UnknownRunError: if the run was never opened.
        """
        return self.spent(run_id=run_id).epsilon

    def project_epsilon(self, project: str) -> float:
        """Epsilon of every disclosure of ``project``'s runs composed (0 for none)."""
        return self.spent(project=project).epsilon

    def site_epsilon(self) -> float:
        """Epsilon of every disclosure at this site composed, over all projects (0 for
        none): the figure the site-wide cap bounds."""
        return self.spent().epsilon

    def _run(self, snap: Snapshot, run_id: str) -> RunLedger:
        run = snap.runs.get(run_id)
        if run is None:
            raise UnknownRunError(f"run {run_id!r} is not in the privacy ledger "
                                  f"{self.path}: call open_run before reserving for it")
        return run

    # -- writing -------------------------------------------------------------------------

    def open_run(self, *, run_id: str, project: str, epsilon_budget: float, delta: float,
                 noise_multiplier: float | None = None,
                 sample_rate: float | None = None) -> None:
        """Create a run's row; a repeated identical call does nothing.

        Args:
            run_id: the coordinator's run id.
            project: the project the run belongs to.
            epsilon_budget: the run's epsilon budget at this site, > 0 (it covers every
                disclosure of the run: statistics, training, tuning, monitoring).
            delta: the run's delta, in (0, 1); every entry of the run is stated at it.
            noise_multiplier: the DP-SGD noise multiplier of every round, > 0 (None for a
                run that has not trained yet; set once, by a later call).
            sample_rate: the DP-SGD sampling rate per step, in (0, 1] (with the former).

        Raises:
            ValueError: an argument out of range, or the run exists with other parameters
                (a run's noise and budget are fixed when it starts).
        """
        problems: list[str] = []
        if not (isinstance(run_id, str) and run_id):
            problems.append(f"run_id must be a non-empty string, got {run_id!r}")
        if not isinstance(project, str):
            problems.append(f"project must be a string, got {project!r}")
        if not (_number(epsilon_budget) and 0 < epsilon_budget < float("inf")):
            problems.append(f"epsilon budget must be > 0; got {epsilon_budget!r}")
        if not (_number(delta) and 0 < delta < 1):
            problems.append(f"delta must be in (0, 1); got {delta!r}")
        if (noise_multiplier is None) != (sample_rate is None):
            problems.append("noise_multiplier and sample_rate go together")
        if noise_multiplier is not None and not (
                _number(noise_multiplier) and 0 < noise_multiplier < float("inf")):
            problems.append(f"noise_multiplier must be > 0; got {noise_multiplier!r}")
        if sample_rate is not None and not (_number(sample_rate) and 0 < sample_rate <= 1):
            problems.append(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        if problems:
            raise ValueError("cannot open run: " + "; ".join(problems))
        self._store.open_run(
            run_id=run_id, project=project, epsilon_budget=float(epsilon_budget),
            delta=float(delta),
            noise_multiplier=None if noise_multiplier is None else float(noise_multiplier),
            sample_rate=None if sample_rate is None else float(sample_rate))

    def reserve(self, *, run_id: str, purpose: Purpose, key: str, mechanism: Mechanism,
                caps: Caps | None = None,
                on_charge: Callable[[float], None] | None = None) -> Reservation:
        """Reserve a disclosure before it reads a row (write-ahead), within every budget.

        Checks, before anything is written, with the disclosure composed onto what is
        recorded: the run's epsilon against the smaller of its budget and the project's
        cap; with a project cap, every disclosure of the project's runs against it; with a
        site cap, every disclosure at the site against it. Then ``on_charge`` runs, the
        entry is written as ``reserved`` and committed. A disclosure already reserved under
        the same run, purpose and key (a retry) is charged nothing again.

        Args:
            run_id: a run opened with :meth:`open_run`.
            purpose: ``round``, ``statistics``, ``drift``, ``tuning`` or ``baseline``.
            key: the disclosure within the run and purpose (the round number for rounds).
            mechanism: what it discloses through.
            caps: the site's caps (from its policy); None: the run's budget alone.
            on_charge: called with the run's epsilon after the disclosure, once the checks
                pass and before the commit, only when charged now. If it raises, nothing is
                charged and the exception propagates.

        Returns:
            The :class:`Reservation` with the figures after it.

        Raises:
            BudgetExceededError: a check fails, with the figures; nothing is written.
            UnknownRunError: the run was never opened.
            ValueError: a bad argument, or the key is reserved with another mechanism.
            NotCoveredError: a :class:`CoveredTrial` its search does not cover.
            LedgerCorruptError: the ledger cannot be trusted.
        """
        caps = caps or Caps()
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}")
        if not (isinstance(key, str) and key):
            raise ValueError(f"key must be a non-empty string; got {key!r}")
        problems = mechanism.problems()
        if problems:
            raise ValueError(f"bad {mechanism.TYPE} mechanism: " + "; ".join(problems))
        for name, cap in (("project cap", caps.project), ("site cap", caps.site)):
            if cap is not None and not (_number(cap) and cap > 0):
                raise ValueError(f"the {name} must be > 0 when given; got {cap!r}")
        with self._store.writing() as tx:
            snap = tx.snapshot
            run = self._run(snap, run_id)
            existing = snap.find(run_id, purpose, key)
            if existing is not None:
                if existing.mechanism != mechanism:
                    # Returning the old charge would let the retry disclose unpaid.
                    raise ValueError(
                        f"{purpose} {key} of run {run_id!r} is already charged for "
                        f"{existing.mechanism.describe()}, not {mechanism.describe()}: a "
                        f"retried disclosure must be the same")
                return Reservation(entry=existing, new=False)
            if isinstance(mechanism, CoveredTrial):
                _check_covered(snap, run, mechanism)
            what = _WHAT[purpose]
            run_cap = run.epsilon_budget if caps.project is None else min(
                run.epsilon_budget, caps.project)
            figures: dict[str, Composition] = {}
            scopes: tuple[tuple[str, dict[str, str], float | None], ...] = (
                ("run", {"run_id": run_id}, run_cap),
                ("project", {"project": run.project}, caps.project),
                ("site", {}, caps.site))
            for scope, kwargs, cap in scopes:
                if cap is None:
                    continue
                before, delta = snap.scope(**kwargs)
                delta = max(delta, run.delta)
                after = compose_mechanisms([*before, mechanism], delta=delta)
                if after.epsilon > cap * (1.0 + _RTOL):
                    raise BudgetExceededError(
                        spent=compose_mechanisms(before, delta=delta).epsilon,
                        projected=after.epsilon, budget=float(cap), scope=scope,
                        needs=compose_mechanisms([mechanism], delta=delta).epsilon,
                        what=what, accountant=after.accountant)
                figures[scope] = after
            if on_charge is not None:
                on_charge(figures["run"].epsilon)
            entry = tx.insert(run=run, purpose=purpose, key=key, mechanism=mechanism,
                              epsilon_after=figures["run"].epsilon)
        return Reservation(entry=entry, new=True, run=figures["run"],
                           project=figures.get("project"), site=figures.get("site"))

    def charge(self, *, run_id: str, purpose: Purpose, key: str) -> Entry:
        """Mark a reserved disclosure as carried out (``charged``); repeating does nothing.

        Raises:
            UnknownRunError: the run was never opened.
            ValueError: nothing was reserved under this purpose and key.
        """
        with self._store.writing() as tx:
            self._run(tx.snapshot, run_id)
            entry = tx.snapshot.find(run_id, purpose, key)
            if entry is None:
                raise ValueError(f"{purpose} {key} of run {run_id!r} was never reserved: "
                                 f"reserve it before it reads any row")
            return tx.mark_charged(entry)

    # -- DP-SGD rounds -------------------------------------------------------------------

    def _round_mechanism(self, run: RunLedger, steps: int) -> DpSgd:
        if run.noise_multiplier is None or run.sample_rate is None:
            raise ValueError(f"run {run.run_id!r} was opened without a noise multiplier: "
                             f"open it with its DP-SGD parameters before its first round")
        return DpSgd(run.noise_multiplier, run.sample_rate, steps)

    def reserve_round(self, *, run_id: str, round_number: int, steps: int,
                      cap: float | None = None, site_cap: float | None = None,
                      on_charge: Callable[[float], None] | None = None) -> float:
        """Reserve a DP-SGD round of ``steps`` steps at the run's noise (see :meth:`reserve`)
        and return the run's epsilon after it (its stored figure for a retry).

        Args:
            run_id: a run opened with its noise multiplier and sample rate.
            round_number: the coordinator's round number, >= 0.
            steps: DP-SGD steps the round takes, >= 1.
            cap: the site's cap for the run's project (also bounds the run), if any.
            site_cap: the site's cap over all its projects, if any.
            on_charge: as for :meth:`reserve`.
        """
        if isinstance(round_number, bool) or not isinstance(round_number, int) \
                or round_number < 0:
            raise ValueError(f"round_number must be an integer >= 0; got {round_number!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
        run = self.get_run(run_id)
        if run is None:
            raise UnknownRunError(f"run {run_id!r} is not in the privacy ledger "
                                  f"{self.path}: call open_run before reserving rounds")
        reservation = self.reserve(
            run_id=run_id, purpose="round", key=str(round_number),
            mechanism=self._round_mechanism(run, steps),
            caps=Caps(project=cap, site=site_cap), on_charge=on_charge)
        return reservation.entry.epsilon_after

    def complete_round(self, *, run_id: str, round_number: int) -> float:
        """Mark a reserved round charged (trained to the end) and return the run's epsilon
        after it; repeating does nothing.

        Raises:
            UnknownRunError: the run was never opened.
            ValueError: the round was never reserved.
        """
        entry = self.charge(run_id=run_id, purpose="round", key=str(round_number))
        return entry.epsilon_after

    # -- warming the caches --------------------------------------------------------------

    def warm_next_round(self, *, run_id: str, steps: int) -> None:
        """Compute, writing nothing, the figures :meth:`reserve_round` will compose for the
        run's next round of ``steps`` steps (every scope), so that it finds them cached.
        Does nothing for an unknown run or one without DP-SGD parameters."""
        snap = self.snapshot()
        run = snap.runs.get(run_id)
        if run is None or run.noise_multiplier is None or run.sample_rate is None:
            return
        self._warm(snap, run_id=run_id, project=run.project, delta=run.delta,
                   step=(run.noise_multiplier, run.sample_rate, steps))

    def warm_first_round(self, *, run_id: str, project: str, delta: float,
                         step: HistoryEntry) -> None:
        """As :meth:`warm_next_round`, for a run not opened yet: its first round ``step``."""
        self._warm(self.snapshot(), run_id=run_id, project=project, delta=delta, step=step)

    @staticmethod
    def _warm(snap: Snapshot, *, run_id: str, project: str, delta: float,
              step: HistoryEntry) -> None:
        mechanism = DpSgd(float(step[0]), float(step[1]), int(step[2]))
        for kwargs in ({"run_id": run_id}, {"project": project}, {}):
            before, scope_delta = snap.scope(**kwargs)  # type: ignore[arg-type]
            compose_mechanisms([*before, mechanism], delta=max(scope_delta, delta))
