"""The site gate as the warm trainer applies it to a task, and the admission and
cancellation answers it keeps.

:func:`admit` puts a task's run (and the model plugin it pins) to the site's policy and
local approvals (:mod:`site_agent.policy`) before any data is touched.
:class:`AdmissionAnswers` writes what the site answered to "does this site accept the
run?" to the audit log when the answer changes, and records a run's cancellation once: in
the audit log and in the run's local approval record (:meth:`ApprovalBook.cancel`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedward.plugins import PluginPin
from fedward.study import StudySpec
from fedward.wire import CANCEL_BY, CANCEL_REASON, CFG, SiteErrorCode
from site_agent.admission import Admission, PendingApproval, PolicyRefusal, SiteGate
from site_agent.approvals import ApprovalBook, ApprovalsError
from site_agent.task_errors import AuditFn, TaskError

__all__ = ["AdmissionAnswers", "admit", "plugin_needed"]

log = logging.getLogger("fedward.site.trainer")


def admit(config: dict[str, Any], *, gate: SiteGate | None, study: StudySpec | None
          ) -> Admission | None:
    """Apply the site gate; None when the trainer runs without one."""
    if gate is None:
        return None
    try:
        run_id = str(config[CFG.RUN_ID])
        project = str(config[CFG.PROJECT])
        task = str(config[CFG.TASK])
        total_rounds = int(config[CFG.TOTAL_ROUNDS])
    except (KeyError, TypeError, ValueError) as err:
        raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}") from None
    plugin = plugin_needed(config, study)
    try:
        study_hash = config.get(CFG.STUDY_HASH)
        return gate.admit(
            run_id=run_id, project=project, task=task, total_rounds=total_rounds,
            study=None if study_hash is None else str(config.get(CFG.STUDY, "")),
            study_hash=None if study_hash is None else str(study_hash), plugin=plugin)
    except PendingApproval as err:
        raise TaskError(SiteErrorCode.PENDING_APPROVAL, err.reason) from None
    except PolicyRefusal as err:
        raise TaskError(SiteErrorCode.REFUSED_POLICY, err.reason) from None
    except ApprovalsError as err:
        log.error("task refused: %s", err)
        raise TaskError(
            SiteErrorCode.REFUSED_POLICY,
            "refused-policy: the site cannot read its approvals file; its IT restores it "
            "(the site agent's log says how)") from None


def plugin_needed(config: dict[str, Any], study: StudySpec | None
                  ) -> tuple[PluginPin, str | None] | None:
    """The model plugin a run pins, with the entry point this site's study names when
    the run trains that study (else None: the gate checks the distribution alone).

    Raises:
        TaskError: a malformed pin; a run of this site's plugin study that pins none.
    """
    try:
        pin = PluginPin.from_config(config, (CFG.MODEL_PLUGIN, CFG.MODEL_PLUGIN_VERSION,
                                             CFG.MODEL_PLUGIN_SHA256))
    except ValueError as err:
        raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
    own = study
    ours = own is not None and config.get(CFG.STUDY_HASH) == own.content_hash()
    entry = own.model.name if ours and own is not None and own.model.family == "plugin" \
        else None
    if pin is None and entry is not None:
        raise TaskError(
            SiteErrorCode.REFUSED_POLICY,
            f"refused-policy: the run trains a study whose model is the plugin {entry!r} "
            "but pins no plugin distribution; the coordinator must be upgraded")
    return None if pin is None else (pin, entry)


@dataclass
class AdmissionAnswers:
    """What the site answered each run's admission question, and the runs it saw cancelled."""

    # run id -> the last admission answer written to the audit log (code, reason): the
    # coordinator asks a waiting site again every few seconds; only changes are recorded.
    _answers: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)
    # Runs whose cancellation is in the audit log already (the message may come twice).
    _cancelled_runs: set[str] = field(default_factory=set)

    def record(self, run_id: str, code: int | None, reason: str | None, *,
               audit: AuditFn) -> None:
        """Write an admission answer to the audit log unless it is the run's last one."""
        if self._answers.get(run_id) != (code, reason):
            if code is None:
                audit("admission-accepted", {"run": run_id})
            else:
                audit("task-refused", {"run": run_id, "round": 0, "kind": "admission",
                                       "code": code, "reason": reason})
            self._answers[run_id] = (code, reason)

    def cancelled(self, config: dict[str, Any], run_id: str, *, audit: AuditFn,
                  approvals: ApprovalBook | None = None
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Record that the coordinator cancelled a run; answer with an empty reply.

        No data is touched and nothing leaves: the answer only tells the coordinator the
        message arrived. The audit entry is written once per run (a repeated message adds
        none), and the run's record in ``approvals`` (when the site has a gate) is marked
        cancelled, once: ``fedward-site runs`` shows it ``cancelled``, a pending approval
        is closed. The privacy ledger is not touched: what was spent stays spent.

        Returns:
            The empty reply; an error reply if the approvals file cannot be read or written
            (the cancel is still in the audit log; the coordinator records the site as not
            told, with the reason).
        """
        by = str(config.get(CANCEL_BY, "?"))[:64]
        reason = str(config.get(CANCEL_REASON, ""))[:500]

        def audit_once() -> None:
            if run_id not in self._cancelled_runs:
                audit("run-cancelled", {"run": run_id,
                                        "project": str(config.get(CFG.PROJECT, "?")),
                                        "by": by, "reason": reason})
                self._cancelled_runs.add(run_id)
                self._answers.pop(run_id, None)

        if approvals is None:
            audit_once()
            return {}, {}
        try:
            # The record's cancel keys make a repeat a no-op across restarts as well.
            if approvals.cancel(run_id, by=by, reason=reason, on_record=audit_once) is None:
                audit_once()   # a run never seen here: the audit log alone records it
        except ApprovalsError as err:
            log.error("run %s cancelled by %s, but not recorded in the approvals file: %s",
                      run_id, by, err)
            audit_once()
            return {"error": {
                "code": SiteErrorCode.REFUSED_POLICY,
                "reason": ("the site audited the cancel but cannot record it in its approvals "
                           "file; its IT restores the file (the site agent's log says how)")},
            }, {}
        return {}, {}
