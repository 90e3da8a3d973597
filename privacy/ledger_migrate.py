"""Reading the JSON privacy ledger of earlier Fedward versions, to migrate it to SQLite.

Up to this version a site kept its ledger in ``privacy-ledger.json`` (format version 1)::

    {"version": 1,
     "runs": {"<run id>": {
        "project": str, "run_id": str, "epsilon_budget": float, "delta": float,
        "noise_multiplier": float, "sample_rate": float, "mechanism": "prv",
        "history": [[sigma, q, steps], ...],
        "rounds": {"<round number>": {"status": "reserved" | "done",
                                      "epsilon_after": float, "steps": int,
                                      "at": ISO-8601 time}}}}}

Every round charged ``steps`` DP-SGD steps at the run's noise multiplier and sample rate
(one history entry per round, in the same write), which is exactly what a
:class:`~privacy.mechanisms.DpSgd` entry records. This module only parses and checks the
file; :mod:`privacy.ledger` writes the SQLite ledger and keeps the JSON as a backup.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeGuard

from privacy.mechanisms import DpSgd

__all__ = ["LegacyFormatError", "LegacyRound", "LegacyRun", "read_legacy_ledger"]

LEGACY_VERSION: Final = 1


class LegacyFormatError(ValueError):
    """The JSON ledger cannot be migrated; ``problems`` says why, each in words."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class LegacyRound:
    """One charged round: its number, DP-SGD mechanism, state and last write time."""

    number: int
    mechanism: DpSgd
    done: bool
    epsilon_after: float
    at: str


@dataclass(frozen=True)
class LegacyRun:
    """One run of the JSON ledger, its rounds in round order."""

    run_id: str
    project: str
    epsilon_budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    rounds: tuple[LegacyRound, ...]


def _is_number(value: object) -> TypeGuard[float]:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _run_problems(run_id: str, run: object) -> list[str]:
    where = f"run {run_id!r}"
    if not isinstance(run, dict):
        return [f"{where} is not an object"]
    problems: list[str] = []
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
    if run.get("mechanism") != "prv":
        problems.append(f"{where}: mechanism is {run.get('mechanism')!r}, expected 'prv'")
    history = run.get("history")
    if not isinstance(history, list):
        problems.append(f"{where}: history is not a list")
    else:
        for i, entry in enumerate(history):
            if not (isinstance(entry, list) and len(entry) == 3 and _is_number(entry[0])
                    and entry[0] >= 0 and _is_number(entry[1]) and 0 < entry[1] <= 1
                    and _is_int(entry[2]) and entry[2] >= 0):
                problems.append(f"{where}: history entry {i} is {entry!r}")
    rounds = run.get("rounds")
    if not isinstance(rounds, dict):
        return [*problems, f"{where}: rounds is not an object"]
    if isinstance(history, list) and len(history) != len(rounds):
        problems.append(f"{where}: {len(history)} history entries for {len(rounds)} rounds")
    for key, rec in rounds.items():
        rwhere = f"{where} round {key!r}"
        if not (isinstance(key, str) and key.isdigit()):
            problems.append(f"{rwhere}: round number is not a non-negative integer")
        if not isinstance(rec, dict):
            problems.append(f"{rwhere} is not an object")
            continue
        if rec.get("status") not in ("reserved", "done"):
            problems.append(f"{rwhere}: status is {rec.get('status')!r}")
        if not (_is_number(rec.get("epsilon_after")) and rec["epsilon_after"] >= 0):
            problems.append(f"{rwhere}: epsilon_after is {rec.get('epsilon_after')!r}")
        if not (_is_int(rec.get("steps")) and rec["steps"] >= 1):
            problems.append(f"{rwhere}: steps is {rec.get('steps')!r}")
        if not isinstance(rec.get("at"), str):
            problems.append(f"{rwhere}: 'at' is not a string")
    if not problems and isinstance(history, list):
        # Every round charged the run's own (sigma, q): the history must say the same, or
        # the file was edited and the rounds cannot be trusted to be what was spent.
        charged = sorted((float(run["noise_multiplier"]), float(run["sample_rate"]),
                          int(rec["steps"])) for rec in rounds.values())
        recorded = sorted((float(s), float(q), int(n)) for s, q, n in history)
        if charged != recorded:
            problems.append(f"{where}: its history {recorded} is not the rounds' steps at "
                            f"the run's noise multiplier and sample rate {charged}")
    return problems


def _run_of(run: dict[str, Any]) -> LegacyRun:
    sigma, q = float(run["noise_multiplier"]), float(run["sample_rate"])
    rounds = tuple(
        LegacyRound(number=int(key), mechanism=DpSgd(sigma, q, int(rec["steps"])),
                    done=rec["status"] == "done", epsilon_after=float(rec["epsilon_after"]),
                    at=str(rec["at"]))
        for key, rec in sorted(run["rounds"].items(), key=lambda kv: int(kv[0])))
    return LegacyRun(run_id=str(run["run_id"]), project=str(run["project"]),
                     epsilon_budget=float(run["epsilon_budget"]), delta=float(run["delta"]),
                     noise_multiplier=sigma, sample_rate=q, rounds=rounds)


def read_legacy_ledger(path: Path) -> list[LegacyRun]:
    """Every run of a JSON ledger, checked as strictly as the version that wrote it did.

    Raises:
        LegacyFormatError: with every problem found; nothing is migrated then.
        OSError: if the file cannot be read.
    """
    raw = path.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegacyFormatError([f"not valid JSON ({exc})"]) from exc
    if not isinstance(doc, dict):
        raise LegacyFormatError(["top level is not a JSON object"])
    problems: list[str] = []
    if doc.get("version") != LEGACY_VERSION:
        problems.append(f"version is {doc.get('version')!r}, expected {LEGACY_VERSION}")
    runs = doc.get("runs")
    if not isinstance(runs, dict):
        raise LegacyFormatError([*problems, "'runs' is missing or not an object"])
    for run_id, run in runs.items():
        problems.extend(_run_problems(run_id, run))
    if problems:
        raise LegacyFormatError(problems)
    return [_run_of(run) for _, run in sorted(runs.items())]
