"""Drift settings of a site: how reports are disclosed (the ``drift`` section of its policy
file) and what the agent checks how often (the ``drift`` section of ``site.json``, whose
``data`` is a CSV file or folder, or a data connector block as the site's training data's).

Hospital IT chooses, in ``policy.json``::

    "drift": {"disclosure": "gaussian", "noise_multiplier": 1.0, "delta": 1e-6}

* ``gaussian`` (the default when the section is absent): the counts the scores are computed
  from (each feature's histogram, the row count, the correct predictions and the score
  histograms) get Gaussian noise of standard deviation ``noise_multiplier`` times their L2
  sensitivity; the report's scores are computed from the noised counts, and the release is
  charged to the site's privacy ledger (a Gaussian release) within the project's cap.
* ``laplace``: the same with Laplace noise of scale ``noise_multiplier`` times the L1
  sensitivity (a pure-epsilon release).
* ``unnoised``: the scores leave computed from the exact counts, with no noise and no
  ledger charge. Off unless written here: it is a disclosure the site accepts knowingly.

Only the scores ever leave, never the counts (see :mod:`fedward.drift_wire`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedward.drift_wire import TREATMENTS

__all__ = ["DEFAULT_DELTA", "DEFAULT_NOISE_MULTIPLIER", "MIN_INTERVAL_S", "DriftDisclosure",
           "DriftSchedule", "drift_policy_problems", "drift_schedule_problems",
           "recent_source_problems"]

DEFAULT_NOISE_MULTIPLIER: Final = 1.0
DEFAULT_DELTA: Final = 1e-6
_KEYS: Final = ("disclosure", "noise_multiplier", "delta")


@dataclass(frozen=True)
class DriftDisclosure:
    """The site's choice for drift reports (see the module docstring).

    Attributes:
        disclosure: ``gaussian``, ``laplace`` or ``unnoised``.
        noise_multiplier: Noise over sensitivity (std for Gaussian, scale for Laplace).
        delta: The delta each Gaussian release is stated at in the ledger.
    """

    disclosure: str = "gaussian"
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER
    delta: float = DEFAULT_DELTA

    @classmethod
    def from_raw(cls, raw: object) -> DriftDisclosure:
        """The choice from a validated ``drift`` section (None: the default)."""
        if raw is None:
            return cls()
        assert isinstance(raw, dict) and not drift_policy_problems(raw)
        return cls(disclosure=str(raw.get("disclosure", "gaussian")),
                   noise_multiplier=float(raw.get("noise_multiplier",
                                                  DEFAULT_NOISE_MULTIPLIER)),
                   delta=float(raw.get("delta", DEFAULT_DELTA)))

    def to_dict(self) -> dict[str, Any]:
        """The section as written to ``policy.json``."""
        return {"disclosure": self.disclosure, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta}


def drift_policy_problems(raw: object) -> list[str]:
    """Every problem of a policy's ``drift`` section (None: absent, fine)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return ['drift must be an object: {"disclosure": "gaussian" | "laplace" | '
                '"unnoised", "noise_multiplier": number, "delta": number}']
    problems = []
    extra = sorted(set(raw) - set(_KEYS))
    if extra:
        problems.append(f"drift: unknown keys {extra} (known: {list(_KEYS)})")
    if raw.get("disclosure", "gaussian") not in TREATMENTS:
        problems.append(f"drift: disclosure must be one of {list(TREATMENTS)}")
    nm = raw.get("noise_multiplier", DEFAULT_NOISE_MULTIPLIER)
    if not (isinstance(nm, int | float) and not isinstance(nm, bool) and math.isfinite(nm)
            and nm > 0):
        problems.append("drift: noise_multiplier must be a number > 0")
    delta = raw.get("delta", DEFAULT_DELTA)
    if not (isinstance(delta, float | int) and not isinstance(delta, bool)
            and 0 < delta < 1):
        problems.append("drift: delta must be a number in (0, 1)")
    return problems


_SCHEDULE_KEYS: Final = ("release", "public_key", "data", "interval_s", "revocations")
MIN_INTERVAL_S: Final = 60.0


@dataclass(frozen=True)
class DriftSchedule:
    """The ``drift`` section of the site's configuration (``site.json``): what the agent
    checks and how often. Absent, or ``interval_s`` null: no scheduled check (the default);
    ``fedward-site drift check`` still runs one on demand.

    Attributes:
        release: The release bundle folder in use at the site.
        public_key: The release public key (PEM), obtained from the coordinator team.
        data: The recent rows: a CSV file or a folder of such files (a path), or a data
            connector block as the site's ``data`` is written (``{"connector": "sql",
            ...}``, :mod:`site_agent.connectors`), in the site's schema or read through
            its study mapping.
        interval_s: Seconds between scheduled checks (at least 60); None: on demand only.
        revocations: A signed revocation list file to check the release against; None:
            none (the bundle's signature is still verified).
    """

    release: str
    public_key: str
    data: str | dict[str, Any]
    interval_s: float | None = None
    revocations: str | None = None

    @classmethod
    def from_raw(cls, raw: object) -> DriftSchedule | None:
        """The section from a validated configuration (None: absent)."""
        if raw is None:
            return None
        assert isinstance(raw, dict) and not drift_schedule_problems(raw)
        interval = raw.get("interval_s")
        data = raw["data"]
        return cls(release=str(raw["release"]), public_key=str(raw["public_key"]),
                   data=dict(data) if isinstance(data, dict) else str(data),
                   interval_s=None if interval is None else float(interval),
                   revocations=raw.get("revocations"))


def drift_schedule_problems(raw: object) -> list[str]:
    """Every problem of a configuration's ``drift`` section (None: absent, fine)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return ['drift must be an object: {"release": folder, "public_key": file, '
                '"data": file, folder or connector block, "interval_s": seconds or null}']
    problems = []
    extra = sorted(set(raw) - set(_SCHEDULE_KEYS))
    if extra:
        problems.append(f"drift: unknown keys {extra} (known: {list(_SCHEDULE_KEYS)})")
    for key in ("release", "public_key", "data"):
        if key == "data" and isinstance(raw.get(key), dict):
            problems += recent_source_problems(raw[key])
        elif not (isinstance(raw.get(key), str) and raw[key]):
            problems.append(f"drift: {key!r} is required and must be a non-empty path"
                            + (" or a data connector block" if key == "data" else ""))
    if raw.get("revocations") is not None and not isinstance(raw["revocations"], str):
        problems.append("drift: revocations must be a path or null")
    interval = raw.get("interval_s")
    if interval is not None and not (isinstance(interval, int | float)
                                     and not isinstance(interval, bool)
                                     and math.isfinite(interval)
                                     and interval >= MIN_INTERVAL_S):
        problems.append(f"drift: interval_s must be null (on demand only) or a number of "
                        f"seconds >= {MIN_INTERVAL_S:g}")
    return problems


def recent_source_problems(block: dict[str, Any]) -> list[str]:
    """Every problem of a connector block as the drift check's recent data: the same
    validation as the site's training ``data`` block (:func:`site_agent.connectors.
    open_connector`; nothing is read, no password is looked up)."""
    from site_agent.connectors import ConnectorError, open_connector

    try:
        # Relative paths are resolved when the check runs; validating reads nothing.
        open_connector(block, root=Path("."), source="drift 'data'")
    except ConnectorError as err:
        return [f"drift: data: {p}" for p in err.problems]
    return []
