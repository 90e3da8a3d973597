"""The runs view of ``fedward-site runs``: each run seen here with its state and epsilon.

Read from the approvals file (:mod:`site_agent.approvals`) and the privacy ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from site_agent.approvals import PENDING_PREFIX, ApprovalBook, RunRecord

if TYPE_CHECKING:
    from privacy.ledger import PrivacyLedger

__all__ = [
    "RunStatus",
    "run_statuses",
]


RunState = Literal["pending", "approved", "denied", "accepted", "refused", "running", "done",
                   "cancelled"]


@dataclass(frozen=True)
class RunStatus:
    """A run seen at this site with its state, for ``fedward-site runs``.

    Attributes:
        record: what the approvals file holds.
        status: ``pending`` (waits for approval), ``approved``, ``denied``, ``accepted``
            (no approval needed, nothing trained yet), ``refused`` (its last task was
            refused by the policy), ``running`` (rounds trained), ``done`` (its last
            planned round trained here), ``cancelled`` (the coordinator cancelled it:
            whatever it was before, a pending approval included; the record says who, why
            and when).
        rounds_trained: rounds trained to the end (charged in the privacy ledger).
        epsilon_spent: the run's epsilon at this site, every disclosure composed.
    """

    record: RunRecord
    status: RunState
    rounds_trained: int
    epsilon_spent: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the cancel keys are null for a run not cancelled)."""
        return {"cancelled_by": None, "cancel_reason": None, "cancelled_at": None,
                **self.record.to_dict(), "status": self.status,
                "rounds_trained": self.rounds_trained, "epsilon_spent": self.epsilon_spent}


def run_statuses(book: ApprovalBook, ledger: PrivacyLedger) -> list[RunStatus]:
    """Every run seen at the site, oldest first, with its state and epsilon spent."""
    out: list[RunStatus] = []
    runs = ledger.all_runs()
    for rec in book.all():
        entry = runs.get(rec.run)
        rounds = entry.rounds if entry is not None else {}
        trained = sum(1 for r in rounds.values() if r.status == "charged")
        eps = max((e.epsilon_after for e in entry.entries), default=0.0) if entry else 0.0
        status: RunState
        if rec.cancelled:
            status = "cancelled"  # the run's end, whatever the site had decided or trained
        elif rec.decision == "denied":
            status = "denied"
        elif any(n >= rec.total_rounds and r.status == "charged" for n, r in rounds.items()):
            status = "done"  # its last planned round trained here
        elif rec.last_refusal is not None and rec.last_refusal.startswith(PENDING_PREFIX):
            status = "pending"
        elif rec.last_refusal is not None:
            status = "refused"
        elif rounds:
            status = "running"
        elif rec.decision == "approved":
            status = "approved"
        else:
            status = "accepted"
        out.append(RunStatus(record=rec, status=status, rounds_trained=trained,
                             epsilon_spent=eps))
    return out
