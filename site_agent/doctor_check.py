"""The outcome of one ``fedward-site doctor`` check: :class:`Check`, shared by every check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Check", "Status", "skip"]

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        name: what was checked.
        status: ``ok``, ``warn``, ``fail`` or ``skip``.
        message: what was found and, when it is not ok, what to do.
    """

    name: str
    status: Status
    message: str

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready view."""
        return {"name": self.name, "status": self.status, "message": self.message}


def skip(name: str, why: str) -> Check:
    """The check ``name``, not run, and why not."""
    return Check(name, "skip", f"not checked: {why}")
