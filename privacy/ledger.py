"""The site's privacy ledger: every epsilon the site has spent, run by run, on disk.

The ledger is a small JSON file in the site's data directory. It is the site's own record
and the one that decides whether a round may train, so two properties matter more than
anything else:

* **Write-ahead charging.** A round is charged (its steps appended to the run's accountant
  history) and persisted *before* it trains. A round that trains and then crashes has
  still been charged; a retried or resumed round is recognised by its number and never
  charged twice. A caller that keeps its own record of charges (the site's audit log) writes
  it from the ``on_charge`` hook of :meth:`PrivacyLedger.reserve_round`, which runs after
  the budget checks and before the charge is persisted: a crash in between leaves a record
  without a charge, never a charge without its record.
* **Never half-written, never silently reset.** Every change is written to a temporary
  file in the same directory, fsynced, atomically renamed over the ledger and the
  directory fsynced. A ledger that cannot be read raises :class:`LedgerCorruptError`:
  starting again from zero would forget epsilon that has already been spent.

File format, version 1::

    {"version": 1,
     "runs": {"<run id>": {
        "project": str, "run_id": str, "epsilon_budget": float, "delta": float,
        "noise_multiplier": float, "sample_rate": float, "mechanism": "prv",
        "history": [[sigma, q, steps], ...],
        "rounds": {"<round number>": {"status": "reserved" | "done",
                                      "epsilon_after": float, "steps": int,
                                      "at": ISO-8601 time}}}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeGuard

from fedward.files import FileLock, atomic_write
from privacy.dp import (
    HistoryEntry,
    check_round_budget,
    epsilon_for_history,
)

__all__ = [
    "LEDGER_VERSION",
    "LedgerCorruptError",
    "PrivacyLedger",
    "RoundRecord",
    "RunLedger",
    "UnknownRunError",
]

LEDGER_VERSION: Final = 1
_MECHANISM: Final = "prv"
_STATUSES: Final = ("reserved", "done")

RoundStatus = Literal["reserved", "done"]


class LedgerCorruptError(Exception):
    """The ledger file exists but cannot be trusted; nothing was read from it or written."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(
            f"privacy ledger {path} is unreadable or damaged: {'; '.join(problems)}. "
            f"Training is blocked until it is fixed. Restore the file from the site's "
            f"backup (then restart the site agent); do NOT delete it or reset it, since "
            f"that would forget epsilon that has already been spent."
        )


class UnknownRunError(LookupError):
    """The ledger has no entry for this run id (it was never opened with ``open_run``)."""


@dataclass(frozen=True)
class RoundRecord:
    """One round's entry in a run's ledger.

    Attributes:
        round_number: the coordinator's round number.
        status: ``"reserved"`` (charged, training started or crashed) or ``"done"``.
        epsilon_after: the run's epsilon once this round was charged.
        steps: DP-SGD steps charged for the round.
        at: when the round was reserved or completed, ISO 8601 in UTC.
    """

    round_number: int
    status: RoundStatus
    epsilon_after: float
    steps: int
    at: str


@dataclass(frozen=True)
class RunLedger:
    """Read-only view of one run's ledger entry.

    Attributes:
        run_id: the coordinator's run id.
        project: the project the run belongs to.
        epsilon_budget: the run's epsilon budget at this site.
        delta: the run's delta.
        noise_multiplier: the noise multiplier used in every round of the run.
        sample_rate: the Poisson sampling rate charged per step.
        mechanism: the accounting mechanism (``"prv"``).
        history: the accountant history, one entry per charged round.
        rounds: round number -> :class:`RoundRecord` (an immutable mapping).
    """

    run_id: str
    project: str
    epsilon_budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    mechanism: str
    history: tuple[HistoryEntry, ...]
    rounds: Mapping[int, RoundRecord]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _is_number(value: object) -> TypeGuard[float]:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(doc: object) -> list[str]:
    """Every problem of a parsed ledger document (empty when it is sound)."""
    if not isinstance(doc, dict):
        return ["top level is not a JSON object"]
    problems: list[str] = []
    if doc.get("version") != LEDGER_VERSION:
        problems.append(f"version is {doc.get('version')!r}, expected {LEDGER_VERSION}")
    runs = doc.get("runs")
    if not isinstance(runs, dict):
        return [*problems, "'runs' is missing or not an object"]
    for run_id, run in runs.items():
        where = f"run {run_id!r}"
        if not isinstance(run, dict):
            problems.append(f"{where} is not an object")
            continue
        if run.get("run_id") != run_id:
            problems.append(f"{where}: run_id field is {run.get('run_id')!r}")
        if not isinstance(run.get("project"), str):
            problems.append(f"{where}: project is not a string")
        for name in ("epsilon_budget", "delta", "noise_multiplier", "sample_rate"):
            value = run.get(name)
            if not (_is_number(value) and value > 0):
                problems.append(f"{where}: {name} is {value!r}, expected a number > 0")
        if _is_number(run.get("delta")) and not run["delta"] < 1:
            problems.append(f"{where}: delta is {run['delta']!r}, expected < 1")
        if _is_number(run.get("sample_rate")) and not run["sample_rate"] <= 1:
            problems.append(f"{where}: sample_rate is {run['sample_rate']!r}, expected <= 1")
        if run.get("mechanism") != _MECHANISM:
            problems.append(f"{where}: mechanism is {run.get('mechanism')!r}, expected 'prv'")
        history = run.get("history")
        if not isinstance(history, list):
            problems.append(f"{where}: history is not a list")
        else:
            for i, entry in enumerate(history):
                if not (
                    isinstance(entry, list)
                    and len(entry) == 3
                    and _is_number(entry[0])
                    and entry[0] >= 0
                    and _is_number(entry[1])
                    and 0 < entry[1] <= 1
                    and _is_int(entry[2])
                    and entry[2] >= 0
                ):
                    problems.append(f"{where}: history entry {i} is {entry!r}")
        rounds = run.get("rounds")
        if not isinstance(rounds, dict):
            problems.append(f"{where}: rounds is not an object")
            continue
        if isinstance(history, list) and len(history) != len(rounds):
            # One history entry is appended per reserved round, in the same write.
            problems.append(
                f"{where}: {len(history)} history entries for {len(rounds)} rounds"
            )
        for key, rec in rounds.items():
            rwhere = f"{where} round {key!r}"
            if not (isinstance(key, str) and key.isdigit()):
                problems.append(f"{rwhere}: round number is not a non-negative integer")
            if not isinstance(rec, dict):
                problems.append(f"{rwhere} is not an object")
                continue
            if rec.get("status") not in _STATUSES:
                problems.append(f"{rwhere}: status is {rec.get('status')!r}")
            if not (_is_number(rec.get("epsilon_after")) and rec["epsilon_after"] >= 0):
                problems.append(f"{rwhere}: epsilon_after is {rec.get('epsilon_after')!r}")
            if not (_is_int(rec.get("steps")) and rec["steps"] >= 1):
                problems.append(f"{rwhere}: steps is {rec.get('steps')!r}")
            if not isinstance(rec.get("at"), str):
                problems.append(f"{rwhere}: 'at' is not a string")
    return problems


def _history_of(run: Mapping[str, Any]) -> list[HistoryEntry]:
    return [(float(s), float(q), int(n)) for s, q, n in run["history"]]


def _view(run: Mapping[str, Any]) -> RunLedger:
    rounds = {
        int(key): RoundRecord(
            round_number=int(key),
            status=rec["status"],
            epsilon_after=float(rec["epsilon_after"]),
            steps=int(rec["steps"]),
            at=rec["at"],
        )
        for key, rec in sorted(run["rounds"].items(), key=lambda kv: int(kv[0]))
    }
    return RunLedger(
        run_id=run["run_id"],
        project=run["project"],
        epsilon_budget=float(run["epsilon_budget"]),
        delta=float(run["delta"]),
        noise_multiplier=float(run["noise_multiplier"]),
        sample_rate=float(run["sample_rate"]),
        mechanism=run["mechanism"],
        history=tuple(_history_of(run)),
        rounds=MappingProxyType(rounds),
    )


class PrivacyLedger:
    """The site's privacy ledger, one JSON file (see the module docstring for its format).

    Safe to share between threads (a lock serialises read-modify-write) and between
    processes (an advisory ``flock`` on the sidecar file ``<ledger>.lock``). Each operation
    re-reads the file, so several instances on the same path always see each other's
    changes.

    Args:
        path: the ledger file, normally inside the site's data directory. A missing file
            is an empty ledger; the file and its directory are created on the first write.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._file_lock = FileLock(self._path.with_name(self._path.name + ".lock"))

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    # -- storage -------------------------------------------------------------------------

    def _locked(self) -> FileLock:
        """Hold the thread lock and the cross-process file lock."""
        return self._file_lock

    def _read(self) -> dict[str, Any]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {"version": LEDGER_VERSION, "runs": {}}
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerCorruptError(self._path, [f"not valid JSON ({exc})"]) from exc
        problems = _validate(doc)
        if problems:
            raise LedgerCorruptError(self._path, problems)
        assert isinstance(doc, dict)
        return doc

    def _write(self, doc: Mapping[str, Any]) -> None:
        """Replace the ledger atomically: temp file, fsync, rename, fsync the directory."""
        data = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
        atomic_write(self._path, data)

    def _run(self, doc: Mapping[str, Any], run_id: str) -> dict[str, Any]:
        run = doc["runs"].get(run_id)
        if run is None:
            raise UnknownRunError(
                f"run {run_id!r} is not in the privacy ledger {self._path}: "
                f"call open_run before reserving rounds"
            )
        assert isinstance(run, dict)
        return run

    # -- reading -------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunLedger | None:
        """The ledger entry of ``run_id``, or ``None`` if the run was never opened.

        Raises:
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            run = self._read()["runs"].get(run_id)
        return None if run is None else _view(run)

    def run_ids(self, *, project: str | None = None) -> list[str]:
        """Ids of the runs in the ledger, sorted; only ``project``'s when given."""
        with self._locked():
            runs = self._read()["runs"]
        return sorted(r for r, run in runs.items() if project is None or run["project"] == project)

    def history(self, run_id: str) -> list[HistoryEntry]:
        """The accountant history of ``run_id``: one entry per charged round.

        Raises:
            UnknownRunError: if the run was never opened.
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            return _history_of(self._run(self._read(), run_id))

    def epsilon_spent(self, run_id: str) -> float:
        """Epsilon spent by ``run_id``: every reserved and done round counts.

        A round that was reserved and then crashed may have touched the data, so it stays
        charged.

        Raises:
            UnknownRunError: if the run was never opened.
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            run = self._run(self._read(), run_id)
        return epsilon_for_history(_history_of(run), delta=run["delta"], mechanism=_MECHANISM)

    def project_epsilon(self, project: str) -> float:
        """Epsilon spent by all runs of ``project`` at this site, composed together.

        The histories of every run of the project are composed with one accountant. Runs
        may have been launched with different deltas; the composed epsilon is reported at
        the largest of them, which is the delta of the weakest guarantee among the runs
        (a smaller delta would need a larger epsilon). ``0.0`` if the project has no runs.

        Raises:
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            runs = self._read()["runs"]
        history, delta = self._project_history(runs, project)
        if not history:
            return 0.0
        return epsilon_for_history(history, delta=delta, mechanism=_MECHANISM)

    def site_epsilon(self) -> float:
        """Epsilon spent by every run of every project at this site, composed together.

        A site that serves several projects on the same patients releases all of them
        about the same people: this is the figure a site-wide cap bounds. Reported at the
        largest delta of the runs, as :meth:`project_epsilon` does. ``0.0`` for no runs.

        Raises:
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            runs = self._read()["runs"]
        history, delta = self._project_history(runs, None)
        if not history:
            return 0.0
        return epsilon_for_history(history, delta=delta, mechanism=_MECHANISM)

    def all_runs(self) -> dict[str, RunLedger]:
        """Every run of the ledger, read at once: run id -> :class:`RunLedger`.

        Raises:
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            runs = self._read()["runs"]
        return {run_id: _view(run) for run_id, run in sorted(runs.items())}

    @staticmethod
    def _project_history(
        runs: Mapping[str, Any], project: str | None
    ) -> tuple[list[HistoryEntry], float]:
        """The histories of ``project``'s runs (every run for None) and their largest delta."""
        history: list[HistoryEntry] = []
        delta = 0.0
        for run in runs.values():
            if project is None or run["project"] == project:
                history.extend(_history_of(run))
                delta = max(delta, float(run["delta"]))
        return history, delta

    # -- writing -------------------------------------------------------------------------

    def open_run(
        self,
        *,
        run_id: str,
        project: str,
        epsilon_budget: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
    ) -> None:
        """Create the ledger entry of a run; a repeated identical call does nothing.

        Args:
            run_id: the coordinator's run id.
            project: the project the run belongs to.
            epsilon_budget: the run's epsilon budget at this site, > 0.
            delta: the run's delta, in (0, 1).
            noise_multiplier: the run's noise multiplier (from
                :func:`privacy.dp.noise_multiplier_for_run`), > 0.
            sample_rate: the sampling rate charged per step, in (0, 1].

        Raises:
            ValueError: if an argument is out of range, or the run already exists with
                other parameters (a run's noise and budget are fixed when it starts).
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        problems: list[str] = []
        if not (isinstance(run_id, str) and run_id):
            problems.append(f"run_id must be a non-empty string, got {run_id!r}")
        if not isinstance(project, str):
            problems.append(f"project must be a string, got {project!r}")
        if not (_is_number(epsilon_budget) and epsilon_budget > 0):
            problems.append(f"epsilon budget must be > 0; got {epsilon_budget!r}")
        if not (_is_number(delta) and 0 < delta < 1):
            problems.append(f"delta must be in (0, 1); got {delta!r}")
        if not (_is_number(noise_multiplier) and noise_multiplier > 0):
            problems.append(f"noise_multiplier must be > 0; got {noise_multiplier!r}")
        if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
            problems.append(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        if problems:
            raise ValueError("cannot open run: " + "; ".join(problems))
        wanted: dict[str, Any] = {
            "project": project,
            "run_id": run_id,
            "epsilon_budget": float(epsilon_budget),
            "delta": float(delta),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "mechanism": _MECHANISM,
        }
        with self._locked():
            doc = self._read()
            existing = doc["runs"].get(run_id)
            if existing is not None:
                differ = [
                    f"{k}: ledger has {existing[k]!r}, got {v!r}"
                    for k, v in wanted.items()
                    if existing[k] != v
                ]
                if differ:
                    raise ValueError(
                        f"run {run_id!r} is already in the privacy ledger with other "
                        f"parameters ({'; '.join(differ)}); a run's noise and budget are "
                        f"fixed when it starts: launch a new run instead"
                    )
                return
            doc["runs"][run_id] = {**wanted, "history": [], "rounds": {}}
            self._write(doc)

    def reserve_round(
        self,
        *,
        run_id: str,
        round_number: int,
        steps: int,
        cap: float | None = None,
        site_cap: float | None = None,
        on_charge: Callable[[float], None] | None = None,
    ) -> float:
        """Charge a round before it trains (write-ahead) and return the run's epsilon after it.

        The round's ``(noise_multiplier, sample_rate, steps)`` is appended to the run's
        history and the round marked ``"reserved"``, then the ledger is persisted; only then
        may training start. If the round is already reserved or done (a retry, or a resumed
        round) nothing is charged again and its stored epsilon is returned.

        Budget checks, both before anything is written:

        * the run's epsilon after the round must not exceed ``min(epsilon_budget, cap)``;
        * with a ``cap``, the epsilon of all the project's runs composed (see
          :meth:`project_epsilon`) must not exceed ``cap`` either: the cap is the site's
          limit for the whole project, not only for one run;
        * with a ``site_cap``, the epsilon of every run of every project composed (see
          :meth:`site_epsilon`) must not exceed it.

        Args:
            run_id: a run opened with :meth:`open_run`.
            round_number: the coordinator's round number, >= 0.
            steps: DP-SGD steps the round will take (``privacy.training.expected_steps``).
            cap: the site's epsilon cap for the run's project (from its policy), if any.
            site_cap: the site's cap over all its projects (from its policy), if any.
            on_charge: called with the run's epsilon after the round once every check has
                passed and before the charge is written, only when the round is charged
                now (not for a retry). It runs under the ledger's lock, so it must not call
                this ledger (the lock is not re-entrant). If it raises, nothing is
                charged and the exception propagates: the site's audit entry of the charge
                is written here, so that no charge can exist without it.

        Returns:
            The run's epsilon once this round is charged.

        Raises:
            BudgetExceededError: if a check fails; nothing is persisted.
            UnknownRunError: if the run was never opened.
            ValueError: if an argument is out of range, or the round is already charged
                for a different number of steps.
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        if not (_is_int(round_number) and round_number >= 0):
            raise ValueError(f"round_number must be an integer >= 0; got {round_number!r}")
        if not (_is_int(steps) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
        for name, value in (("cap", cap), ("site_cap", site_cap)):
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"{name} must be > 0 when given; got {value!r}")
        with self._locked():
            doc = self._read()
            run = self._run(doc, run_id)
            key = str(round_number)
            if key in run["rounds"]:
                rec = run["rounds"][key]
                if rec["steps"] != steps:
                    # Returning the old charge would let the retry train unpaid steps.
                    raise ValueError(
                        f"round {round_number} of run {run_id!r} is already charged for "
                        f"{rec['steps']} steps, not {steps}: a retried round must train "
                        f"the same number of steps"
                    )
                return float(rec["epsilon_after"])
            step: HistoryEntry = (
                float(run["noise_multiplier"]),
                float(run["sample_rate"]),
                steps,
            )
            budget = float(run["epsilon_budget"])
            if cap is not None:
                budget = min(budget, float(cap))
            projected = check_round_budget(
                history=_history_of(run),
                next_step=step,
                delta=run["delta"],
                budget=budget,
                mechanism=_MECHANISM,
            )
            if cap is not None:
                project_history, project_delta = self._project_history(
                    doc["runs"], run["project"]
                )
                check_round_budget(
                    history=project_history,
                    next_step=step,
                    delta=project_delta,
                    budget=float(cap),
                    mechanism=_MECHANISM,
                    scope="project",
                )
            if site_cap is not None:
                site_history, site_delta = self._project_history(doc["runs"], None)
                check_round_budget(
                    history=site_history,
                    next_step=step,
                    delta=site_delta,
                    budget=float(site_cap),
                    mechanism=_MECHANISM,
                    scope="site",
                )
            if on_charge is not None:
                on_charge(projected)
            run["history"].append(list(step))
            run["rounds"][key] = {
                "status": "reserved",
                "epsilon_after": projected,
                "steps": steps,
                "at": _now(),
            }
            self._write(doc)
            return projected

    def warm_next_round(self, *, run_id: str, steps: int) -> None:
        """Compute, without writing anything, the epsilons :meth:`reserve_round` will need
        for one more round of ``steps`` steps (run and project), so that the accountant's
        cache answers them at once when the round comes. Does nothing for unknown runs.

        A PRV composition takes about half a second on a small machine: done while the
        site waits between rounds, it leaves the round's critical path.
        """
        with self._locked():
            doc = self._read()
        run = doc["runs"].get(run_id)
        if run is None:
            return
        step: HistoryEntry = (float(run["noise_multiplier"]), float(run["sample_rate"]),
                              int(steps))
        self._warm(doc, run_id=run_id, project=run["project"], delta=float(run["delta"]),
                   step=step)

    def warm_first_round(self, *, run_id: str, project: str, delta: float,
                         step: HistoryEntry) -> None:
        """As :meth:`warm_next_round`, for a run not opened yet: the epsilons
        :meth:`reserve_round` will compute for its first round ``step``."""
        with self._locked():
            doc = self._read()
        self._warm(doc, run_id=run_id, project=project, delta=delta, step=step)

    def _warm(self, doc: Mapping[str, Any], *, run_id: str, project: str, delta: float,
              step: HistoryEntry) -> None:
        runs = doc["runs"]
        run = runs.get(run_id)
        own = _history_of(run) if run is not None else []
        epsilon_for_history([*own, step], delta=delta, mechanism=_MECHANISM)
        others = {k: v for k, v in runs.items() if k != run_id}
        for scope in (project, None):
            history, scope_delta = self._project_history(others, scope)
            history = [*history, *own, step]
            epsilon_for_history(history, delta=max(scope_delta, delta), mechanism=_MECHANISM)

    def complete_round(self, *, run_id: str, round_number: int) -> float:
        """Mark a reserved round done; repeating it does nothing.

        Args:
            run_id: a run opened with :meth:`open_run`.
            round_number: a round reserved with :meth:`reserve_round`.

        Returns:
            The run's epsilon after this round (as stored when it was reserved).

        Raises:
            UnknownRunError: if the run was never opened.
            ValueError: if the round was never reserved.
            LedgerCorruptError: if the ledger file cannot be trusted.
        """
        with self._locked():
            doc = self._read()
            run = self._run(doc, run_id)
            rec = run["rounds"].get(str(round_number))
            if rec is None:
                raise ValueError(
                    f"round {round_number} of run {run_id!r} was never reserved: "
                    f"call reserve_round before training it"
                )
            if rec["status"] != "done":
                rec["status"] = "done"
                rec["at"] = _now()
                self._write(doc)
            return float(rec["epsilon_after"])

