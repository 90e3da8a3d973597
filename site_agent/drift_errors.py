"""Why a drift check could not run: :class:`DriftCheckError`, raised by the check
(:mod:`site_agent.drift`) and by the reading of its recent rows (:mod:`site_agent.drift_rows`).
"""

from __future__ import annotations

__all__ = ["DriftCheckError"]


class DriftCheckError(Exception):
    """A drift check could not run; ``kind`` is one of :data:`fedward.drift_wire.FAILURE_KINDS`
    (what the coordinator learns), the message the whole reason (shown at the site)."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        super().__init__(reason)
