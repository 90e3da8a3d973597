"""How the warm trainer refuses a task (:class:`TaskError` and the refusals it builds)
and records it (:data:`AuditFn`, the site's audit log as its tasks see it).

A refusal carries a ``SiteErrorCode`` and a reason that may leave the site: kinds, counts
and names, never values (the full text of a failure stays in the site's log). A task
config without the run's terms (:class:`RunTerms`) is refused as ``BAD_TASK``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedward.wire import CFG, SiteErrorCode
from privacy import LedgerCorruptError, UnknownMechanismError

__all__ = ["AuditFn", "RunTerms", "TaskError", "bad_task", "data_failure_reason",
           "ledger_refusal"]

log = logging.getLogger("fedward.site.trainer")

# Called with (action, detail) for every step of a task; details carry no values.
AuditFn = Callable[[str, dict[str, Any]], None]


class TaskError(Exception):
    """A task the site refuses or cannot carry out; ``code`` is a SiteErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


def bad_task(err: Exception) -> TaskError:
    """The refusal of a task config with a key missing or of the wrong type."""
    return TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}")


@dataclass(frozen=True)
class RunTerms:
    """The terms of a run that every training task's config carries."""

    run_id: str
    project: str
    total_rounds: int
    local_epochs: int
    epsilon: float
    delta: float
    batch: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> RunTerms:
        """Read them from a task config.

        Raises:
            TaskError: ``BAD_TASK``, naming the key that is missing or bad.
        """
        try:
            return cls(run_id=str(config[CFG.RUN_ID]), project=str(config[CFG.PROJECT]),
                       total_rounds=int(config[CFG.TOTAL_ROUNDS]),
                       local_epochs=int(config[CFG.LOCAL_EPOCHS]),
                       epsilon=float(config[CFG.EPSILON]), delta=float(config[CFG.DELTA]),
                       batch=int(config[CFG.BATCH]))
        except (KeyError, TypeError, ValueError) as err:
            raise bad_task(err) from None


def ledger_refusal(err: LedgerCorruptError) -> TaskError:
    """The refusal a site answers while its privacy ledger cannot be trusted.

    An entry with an unknown mechanism is named (its number and type: nothing about the
    data); other damage is only reported as such (the full text, with paths, stays in the
    site's log).
    """
    log.error("task refused: %s", err)
    if isinstance(err, UnknownMechanismError):
        named = "; ".join(f"entry {i} records mechanism type {kind!r}"
                          for i, _run, _purpose, kind in err.unknown)
        detail = (f"its privacy ledger holds an entry this version cannot account ({named}), "
                  "and nothing is left out of its budget")
    else:
        detail = "its privacy ledger cannot be read"
    return TaskError(SiteErrorCode.REFUSED_POLICY,
                     f"refused-policy: the site refuses to train: {detail}; its IT runs "
                     "`fedward-site doctor` and `fedward-site ledger show`")


def data_failure_reason(summary: dict[str, Any] | None) -> str:
    """The refusal's reason while the site's data failed its checks."""
    # Kinds, counts and declared column names only (DataReport.summary_for_coordinator).
    summary = summary or {}
    parts = [
        f"{p['kind']} x{p['count']}" + (f" ({', '.join(p['columns'])})" if p.get("columns")
                                        else "")
        for p in summary.get("problems", [])
    ]
    return ("refused-data-check: the site's data failed its checks: "
            + ("; ".join(parts) or "no data loaded")
            + "; the site's IT runs `fedward-site check` to see and fix them")
