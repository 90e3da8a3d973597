"""The local approvals of runs: which runs this site has seen and what its IT decided.

``approvals.json`` in the site's data directory is written by the agent (when a run's first
task or admission question arrives) and by the ``approve`` / ``deny`` commands, atomically
and under a file lock::

    {"version": 1,
     "runs": {"7": {"run": "7", "project": "oncology", "task": "breast_cancer_mlp",
                    "total_rounds": 3, "first_seen": "2025-...+00:00",
                    "decision": null | "approved" | "denied", "by": null | "alice",
                    "decided_at": null | "...", "reason": null | "text",
                    "last_refusal": null | "refused-policy: ...",
                    "cancelled_by": "admin", "cancel_reason": "text",
                    "cancelled_at": "..."}}}

The three ``cancel`` keys are there only once the coordinator cancelled the run (who and
why as its cancel message said, when the site received it): such a run is ``cancelled`` at
the site for good, and it can no longer be approved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from fedward.files import FileLock, atomic_write

__all__ = [
    "APPROVALS_VERSION",
    "PENDING_PREFIX",
    "ApprovalBook",
    "ApprovalsError",
    "RunRecord",
]

APPROVALS_VERSION: Final = 1
# How the reason of a run that waits for a local approval starts (not a refusal).
PENDING_PREFIX: Final = "pending-approval"

Decision = Literal["approved", "denied"]


class ApprovalsError(Exception):
    """The approvals file cannot be read or a decision cannot be recorded."""


@dataclass(frozen=True)
class RunRecord:
    """A run as this site has seen it (one entry of ``approvals.json``).

    Attributes:
        run: the coordinator's run id.
        project: the run's project.
        task: the run's registry task.
        total_rounds: rounds the run plans.
        first_seen: when its first task arrived, ISO 8601 in UTC.
        decision: the local decision, if any: ``approved`` or ``denied``.
        by: who decided.
        decided_at: when, ISO 8601 in UTC.
        reason: the reason given with a denial.
        last_refusal: the reason the run's last task was refused by the site policy (None
            when its last task was let through).
        study: the study the run trains, NAME@VERSION (None: a registry task).
        study_hash: that study's content hash.
        cancelled_by: who cancelled the run at the coordinator (None: not cancelled).
        cancel_reason: why, as the coordinator's cancel message said.
        cancelled_at: when the site received the cancel, ISO 8601 in UTC.
    """

    run: str
    project: str
    task: str
    total_rounds: int
    first_seen: str
    decision: Decision | None = None
    by: str | None = None
    decided_at: str | None = None
    reason: str | None = None
    last_refusal: str | None = None
    study: str | None = None
    study_hash: str | None = None
    cancelled_by: str | None = None
    cancel_reason: str | None = None
    cancelled_at: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the coordinator cancelled the run (a cancel message reached the site)."""
        return self.cancelled_at is not None

    def cancel_note(self) -> str:
        """``cancelled by WHO: WHY`` (empty for a run not cancelled)."""
        if not self.cancelled:
            return ""
        return f"cancelled by {self.cancelled_by}" + (
            f": {self.cancel_reason}" if self.cancel_reason else "")

    def to_dict(self) -> dict[str, Any]:
        """The record as stored (the study keys only for a run of a study, the cancel keys
        only for a cancelled run)."""
        out: dict[str, Any] = {
            "run": self.run, "project": self.project, "task": self.task,
            "total_rounds": self.total_rounds, "first_seen": self.first_seen,
            "decision": self.decision, "by": self.by, "decided_at": self.decided_at,
            "reason": self.reason, "last_refusal": self.last_refusal}
        if self.study_hash is not None:
            out.update(study=self.study, study_hash=self.study_hash)
        if self.cancelled:
            out.update(cancelled_by=self.cancelled_by, cancel_reason=self.cancel_reason,
                       cancelled_at=self.cancelled_at)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunRecord:
        """Parse a stored record (validated by :class:`ApprovalBook`)."""
        return cls(run=raw["run"], project=raw["project"], task=raw["task"],
                   total_rounds=int(raw["total_rounds"]), first_seen=raw["first_seen"],
                   decision=raw.get("decision"), by=raw.get("by"),
                   decided_at=raw.get("decided_at"), reason=raw.get("reason"),
                   last_refusal=raw.get("last_refusal"), study=raw.get("study"),
                   study_hash=raw.get("study_hash"), cancelled_by=raw.get("cancelled_by"),
                   cancel_reason=raw.get("cancel_reason"),
                   cancelled_at=raw.get("cancelled_at"))


# The keys of a cancelled run's record (all three, or none).
_CANCEL_KEYS: Final = ("cancelled_by", "cancel_reason", "cancelled_at")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _validate_book(doc: object) -> list[str]:
    if not isinstance(doc, dict):
        return ["top level is not a JSON object"]
    problems: list[str] = []
    if doc.get("version") != APPROVALS_VERSION:
        problems.append(f"version is {doc.get('version')!r}, expected {APPROVALS_VERSION}")
    runs = doc.get("runs")
    if not isinstance(runs, dict):
        return [*problems, "'runs' is missing or not an object"]
    for run_id, rec in runs.items():
        where = f"run {run_id!r}"
        if not isinstance(rec, dict) or rec.get("run") != run_id:
            problems.append(f"{where} is not a run record")
            continue
        for key in ("project", "task", "first_seen"):
            if not isinstance(rec.get(key), str):
                problems.append(f"{where}: {key} is not a string")
        if not (isinstance(rec.get("total_rounds"), int)
                and not isinstance(rec.get("total_rounds"), bool)):
            problems.append(f"{where}: total_rounds is not an integer")
        if rec.get("decision") not in (None, "approved", "denied"):
            problems.append(f"{where}: decision is {rec.get('decision')!r}")
        for key in ("by", "decided_at", "reason", "last_refusal", "study", "study_hash",
                    *_CANCEL_KEYS):
            if rec.get(key) is not None and not isinstance(rec.get(key), str):
                problems.append(f"{where}: {key} is not a string")
        if rec.get("cancelled_at") is not None and not isinstance(rec.get("cancelled_by"), str):
            problems.append(f"{where}: cancelled_at without cancelled_by")
    return problems


def _unpending(refusal: str | None) -> str | None:
    """A run's last refusal once its approval is closed: a "pending" one is dropped."""
    return None if refusal is not None and refusal.startswith(PENDING_PREFIX) else refusal


class ApprovalBook:
    """``approvals.json``: the runs seen at this site and the local decisions on them.

    Shared by the agent and the CLI: every change re-reads the file under a thread lock and
    an advisory ``flock`` on ``approvals.json.lock``, and replaces it atomically.

    Args:
        path: the approvals file; missing means no run seen yet.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._file_lock = FileLock(self._path.with_name(self._path.name + ".lock"))

    @property
    def path(self) -> Path:
        """The approvals file."""
        return self._path

    def _locked(self) -> FileLock:
        return self._file_lock

    def _read(self) -> dict[str, Any]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": APPROVALS_VERSION, "runs": {}}
        except (OSError, UnicodeDecodeError) as err:
            raise ApprovalsError(f"cannot read {self._path}: {err}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ApprovalsError(
                f"{self._path} is not valid JSON ({err}); restore it from backup: the site "
                "refuses runs until it can read its approvals") from None
        problems = _validate_book(doc)
        if problems:
            raise ApprovalsError(
                f"{self._path} is damaged ({'; '.join(problems)}); restore it from backup: "
                "the site refuses runs until it can read its approvals")
        assert isinstance(doc, dict)
        return doc

    def _write(self, doc: Mapping[str, Any]) -> None:
        """Replace the file atomically; a failed write is an :class:`ApprovalsError` (the
        old file stays whole), for every caller alike."""
        try:
            atomic_write(self._path, json.dumps(doc, indent=2, sort_keys=True) + "\n",
                         mode=0o600)
        except OSError as err:
            raise ApprovalsError(f"cannot write {self._path}: {err}") from None

    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None if the run was never seen."""
        with self._locked():
            raw = self._read()["runs"].get(run_id)
        return None if raw is None else RunRecord.from_dict(raw)

    def all(self) -> list[RunRecord]:
        """Every run seen, oldest first."""
        with self._locked():
            runs = self._read()["runs"]
        return sorted((RunRecord.from_dict(r) for r in runs.values()),
                      key=lambda r: (r.first_seen, r.run))

    def observe(self, *, run_id: str, project: str, task: str, total_rounds: int,
                refusal: Callable[[RunRecord], str | None], study: str | None = None,
                study_hash: str | None = None) -> tuple[RunRecord, bool, str | None]:
        """Record a task of ``run_id`` and decide on it in one locked step.

        Args:
            run_id: the run's id.
            project: its project (as the task says).
            task: its task name.
            total_rounds: rounds it plans.
            study: the study it trains (NAME@VERSION), if any.
            study_hash: that study's content hash.
            refusal: given the run's record, the refusal reason or None to let it through;
                called under the lock so that a decision cannot change in between.

        Returns:
            (the stored record, whether the run was seen for the first time, the refusal).
        """
        with self._locked():
            doc = self._read()
            raw = doc["runs"].get(run_id)
            new = raw is None
            record = (RunRecord(run=run_id, project=project, task=task,
                                total_rounds=total_rounds, first_seen=_now(), study=study,
                                study_hash=study_hash)
                      if raw is None else RunRecord.from_dict(raw))
            reason = refusal(record)
            if new or record.last_refusal != reason:
                record = RunRecord(**{**record.to_dict(), "last_refusal": reason})
                doc["runs"][run_id] = record.to_dict()
                self._write(doc)
        return record, new, reason

    def decide(self, run_id: str, decision: Decision, *, by: str,
               reason: str | None = None) -> tuple[RunRecord, Decision | None]:
        """Approve or deny a run that this site has seen.

        Returns:
            (the updated record, the decision it had before).

        Raises:
            ApprovalsError: if the run was never seen here (a typo would otherwise approve a
                run that does not exist yet), is approved after it was cancelled, or the
                file cannot be read.
        """
        with self._locked():
            doc = self._read()
            raw = doc["runs"].get(run_id)
            if raw is None:
                seen = ", ".join(sorted(doc["runs"])) or "none yet"
                raise ApprovalsError(
                    f"run {run_id!r} has not been seen at this site (runs seen: {seen}); a run "
                    "is listed once its first task arrives: see `fedward-site runs`")
            before = RunRecord.from_dict(raw)
            if before.cancelled and decision == "approved":
                # Approving a run the coordinator ended would only mislead: nothing of it
                # trains any more (a denial is still recorded: it only closes more).
                raise ApprovalsError(
                    f"run {run_id} was {before.cancel_note()} (the coordinator's cancel "
                    f"reached this site at {before.cancelled_at}); a cancelled run cannot be "
                    "approved: the ML team launches a new run if it is still wanted")
            refusal = _unpending(before.last_refusal)  # the next task is decided afresh
            record = RunRecord(**{**before.to_dict(), "decision": decision, "by": by,
                                  "decided_at": _now(), "reason": reason,
                                  "last_refusal": refusal})
            doc["runs"][run_id] = record.to_dict()
            self._write(doc)
        return record, before.decision

    def cancel(self, run_id: str, *, by: str, reason: str,
               on_record: Callable[[], None]) -> RunRecord | None:
        """Record, once, that the coordinator cancelled a run this site has seen.

        Only the cancel is added: the decision stays as it was, and a pending approval is
        closed (the run no longer waits for one). A run already recorded cancelled is left
        as it is (the message may come twice, or again after a restart).

        Args:
            run_id: the run's id.
            by: who cancelled it, as the coordinator's message says.
            reason: why, as the message says.
            on_record: called under the lock just before the cancel is written (and only
                then): the caller's audit entry comes first, so the file never holds a
                cancel that the audit log lacks.

        Returns:
            The run's record (cancelled), or None if the run was never seen here (nothing is
            written: a run the site never saw needs no closing).

        Raises:
            ApprovalsError: if the file cannot be read (it is left as it is) or written.
        """
        with self._locked():
            doc = self._read()
            raw = doc["runs"].get(run_id)
            if raw is None:
                return None
            before = RunRecord.from_dict(raw)
            if before.cancelled:
                return before
            refusal = _unpending(before.last_refusal)  # its approval is closed: cancelled
            record = RunRecord(**{**before.to_dict(), "last_refusal": refusal,
                                  "cancelled_by": by, "cancel_reason": reason,
                                  "cancelled_at": _now()})
            on_record()
            doc["runs"][run_id] = record.to_dict()
            self._write(doc)
        return record
