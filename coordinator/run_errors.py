"""How a run ends early: :class:`RunFailed` (the reason recorded for the ML team) and
:class:`RunCancelled` (who cancelled it and why).

The round loop (:mod:`coordinator.round_loop`), its admission (:mod:`coordinator.admission`)
and its cancellation (:mod:`coordinator.cancellation`) raise them; the loop ends the run with
the matching status.
"""

from __future__ import annotations

__all__ = ["RunCancelled", "RunFailed"]


class RunFailed(Exception):
    """The run cannot go on; the message is the reason recorded for the ML team."""


class RunCancelled(Exception):
    """Someone cancelled the run (``POST /runs/{id}/cancel``): who and why."""

    def __init__(self, by: str, reason: str) -> None:
        super().__init__(f"cancelled by {by}: {reason}")
        self.by = by
        self.reason = reason

