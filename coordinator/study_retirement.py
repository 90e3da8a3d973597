"""Retired study versions: what the coordinator says when a new run names one.

The ML team retires a version it must not train again (a wrong label definition, a feature
that leaks the outcome) with ``fedward-coordinator study retire NAME@VERSION --reason TEXT``
(``POST /api/v1/studies/NAME@VERSION/retire``). Retiring is not deleting: the version stays
registered and listed, with who retired it, when and why; runs and releases made from it are
untouched and a run already going continues. Only a *new* run is refused: a launch naming
the version, and ``launch --from RUN`` of a run that pinned it.

The database side (recording a retirement, finding the newest version still in use) is
:mod:`coordinator.study_registry`'s. This module holds what the API's refusal (409) and the
CLI's say, from the version's public view (``retired``: ``by``, ``at``, ``reason``,
``instead``), and imports neither the database nor the training stack, so the CLI that
checks a relaunch before it writes anything stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

__all__ = [
    "RETIRE_REASON_MAX",
    "StudyAlreadyRetiredError",
    "StudyRetiredError",
    "retired_note",
    "retired_refusal",
]

# The longest reason for retiring a version (the API's body).
RETIRE_REASON_MAX: Final = 500


class StudyRetiredError(Exception):
    """A new run names a retired study version; the message says which, who retired it and
    why, and what to launch instead."""


class StudyAlreadyRetiredError(ValueError):
    """The version was retired before; the first retirement's who and why stand."""


def retired_note(retired: Mapping[str, Any]) -> str:
    """``retired by NAME on DATE TIME UTC: WHY`` of a version's public ``retired`` view."""
    at = datetime.fromisoformat(str(retired["at"]))
    return f"retired by {retired['by']} on {at:%Y-%m-%d %H:%M:%S} UTC: {retired['reason']}"


def retired_refusal(ref: str, retired: Mapping[str, Any], *,
                    from_run: int | None = None) -> str:
    """Why a new run of the retired version ``ref`` is refused, and what to do.

    Args:
        ref: The version, ``NAME@VERSION``.
        retired: Its public ``retired`` view: ``by``, ``at`` (ISO 8601), ``reason`` and
            ``instead``, the newest version of the same study that is not retired (None
            when every version is).
        from_run: The run being launched again (``launch --from RUN``), to name the
            command that launches it with another version.

    Returns:
        One sentence per point: the version and its retirement, what stays, what to do.
    """
    name = ref.partition("@")[0]
    head = (f"study {ref} was {retired_note(retired)}. No new run may use it (runs and "
            "releases already made from it stay as they are). ")
    instead = retired.get("instead")
    # A relaunch names the whole command; a plain launch (CLI or API) the setting to change.
    if instead:
        use = (f"`fedward-coordinator launch --from {from_run} --study {instead}`"
               if from_run is not None else f"`--study {instead}`")
        return head + f"Launch the newest version of {name} that is not retired instead: {use}"
    then = (f" (`fedward-coordinator launch --from {from_run} --study {name}@VERSION`)"
            if from_run is not None else "")
    return head + (f"Every version of {name} is retired: register a corrected spec as a new "
                   "version (`fedward-coordinator study register FILE`), then launch that "
                   f"version{then}")
