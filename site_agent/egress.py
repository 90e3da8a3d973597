"""The site's egress guard: what may leave the site, checked on every outgoing result.

It runs inside the site agent at the point where a result is handed back to the relay, so
it holds whatever the training code does. Only parameter arrays with exactly the shapes of
the task's model and scalar metrics from the allow-list pass; anything else blocks the
whole message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from export.wire import ALLOWED_REPLY_METRICS

__all__ = ["EgressReport", "EgressViolation", "check_outgoing"]


class EgressViolation(Exception):
    """The outgoing message carried something the site does not let out."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("egress blocked: " + "; ".join(problems))


@dataclass(frozen=True)
class EgressReport:
    """What left the site: for the audit log (sizes and names, never values)."""

    n_bytes: int
    array_shapes: dict[str, list[int]]
    metric_names: list[str]


def check_outgoing(
    *,
    expected_shapes: Mapping[str, tuple[int, ...]],
    arrays: Mapping[str, object],
    metrics: Mapping[str, object],
) -> EgressReport:
    """Check an outgoing result; return what leaves or raise :class:`EgressViolation`.

    Args:
        expected_shapes: the task model's array names and shapes.
        arrays: the arrays about to leave (empty for an evaluate-only reply).
        metrics: the scalar metrics about to leave.
    """
    problems: list[str] = []
    if arrays:
        extra = sorted(set(arrays) - set(expected_shapes))
        missing = sorted(set(expected_shapes) - set(arrays))
        if extra:
            problems.append(f"arrays not in the task's model: {extra}")
        if missing:
            problems.append(f"model arrays missing: {missing}")
        for name, arr in arrays.items():
            if name not in expected_shapes:
                continue
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                problems.append(f"array {name!r} is not a float32 numpy array")
            elif tuple(arr.shape) != tuple(expected_shapes[name]):
                problems.append(
                    f"array {name!r} has shape {list(arr.shape)}, "
                    f"expected {list(expected_shapes[name])}"
                )
    for key, value in metrics.items():
        if key not in ALLOWED_REPLY_METRICS:
            problems.append(f"metric {key!r} is not on the allow-list")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"metric {key!r} is not a number")
        elif not math.isfinite(float(value)):
            problems.append(f"metric {key!r} is not finite")
    if problems:
        raise EgressViolation(problems)
    n_bytes = sum(int(a.nbytes) for a in arrays.values() if isinstance(a, np.ndarray))
    return EgressReport(
        n_bytes=n_bytes + 8 * len(metrics),
        array_shapes={k: list(v.shape) for k, v in arrays.items() if isinstance(v, np.ndarray)},
        metric_names=sorted(metrics),
    )
