"""``fedward-serve``'s Prometheus metrics and its plausible-range check.

The metrics live in a registry of the app's own (one service per process in production,
several in the tests) and are served at ``GET /metrics`` beside ``/predict``, on the same
loopback address. Labels are fixed reasons, feature names of the task and the release id:
never a feature value, a path or a token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from export.serve_drift import DRIFT_METRIC_NAMES
from fedward.tasks import TASKS, plausible_ranges

__all__ = ["MAX_WARNINGS", "METRIC_NAMES", "RangeCheck", "ServeMetrics"]

MAX_WARNINGS: Final = 20   # warning lines per answer; the rest are counted in one more line

METRIC_NAMES: Final = frozenset({
    "fedward_serve_predictions_total", "fedward_serve_predict_duration_seconds",
    "fedward_serve_refusals_total", "fedward_serve_out_of_range_inputs_total",
    "fedward_serve_serving", "fedward_serve_release_info",
    "fedward_serve_revocation_checks_total",
    "fedward_serve_last_revocation_check_timestamp_seconds",
}) | DRIFT_METRIC_NAMES   # the drift gauges (export.serve_drift), where a release has a reference


class ServeMetrics:
    """The inference service's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.predictions = Counter("fedward_serve_predictions",
                                   "Rows answered by /predict.", registry=r)
        self.latency = Histogram("fedward_serve_predict_duration_seconds",
                                 "Time to answer /predict (answered requests).", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                          0.5, 1.0, 2.5))
        self.refusals = Counter("fedward_serve_refusals", "Prediction requests refused, by "
                                "reason.", ["reason"], registry=r)
        self.out_of_range = Counter("fedward_serve_out_of_range_inputs",
                                    "Input values outside the task's plausible range, by "
                                    "feature.", ["feature"], registry=r)
        self.serving = Gauge("fedward_serve_serving", "1 while predictions are served, 0 "
                             "while refused (revoked, tampered, list unavailable).", registry=r)
        self.release = Gauge("fedward_serve_release_info", "The release being served (1).",
                             ["release_id"], registry=r)
        self.checks = Counter("fedward_serve_revocation_checks", "Scheduled revocation "
                              "checks, by result (ok, failed).", ["result"], registry=r)
        self.last_check = Gauge("fedward_serve_last_revocation_check_timestamp_seconds",
                                "When the last scheduled revocation check succeeded.",
                                registry=r)

    def now_serving(self, release_id: str | None) -> None:
        """Record what is served now (None: nothing)."""
        self.serving.set(0.0 if release_id is None else 1.0)
        self.release.clear()
        if release_id is not None:
            self.release.labels(release_id=release_id).set(1.0)

    def checked(self, ok: bool) -> None:
        """Record one scheduled revocation check."""
        self.checks.labels(result="ok" if ok else "failed").inc()
        if ok:
            self.last_check.set(time.time())


@dataclass(frozen=True)
class RangeCheck:
    """The task's plausible range per input column, and its class names.

    Attributes:
        task: The task named in the signed model card.
        features: Column names, in input order.
        low: Lower limit per column.
        high: Upper limit per column.
        class_names: Name per class index (empty: the task has none).
    """

    task: str
    features: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray
    class_names: tuple[str, ...]

    @classmethod
    def for_task(cls, task: object, n_features: int) -> RangeCheck | None:
        """The check for a registry task whose inputs match the model, else None."""
        if not isinstance(task, str) or task not in TASKS:
            return None
        spec = TASKS[task]
        if spec.n_features != n_features:
            return None
        ranges = plausible_ranges(task)
        cols = spec.feature_columns
        inf = float("inf")
        low = np.array([ranges.get(c, (-inf, inf))[0] for c in cols], dtype=np.float64)
        high = np.array([ranges.get(c, (-inf, inf))[1] for c in cols], dtype=np.float64)
        return cls(task=task, features=cols, low=low, high=high, class_names=spec.class_names)

    @classmethod
    def for_card(cls, card: Mapping[str, Any], n_features: int) -> RangeCheck | None:
        """The check the signed model card describes: a registry task's (:meth:`for_task`),
        or a study's, from the card's input columns, ranges and class names."""
        task = card.get("task")
        shipped = cls.for_task(task, n_features)
        if shipped is not None or not isinstance(card.get("study"), Mapping):
            return shipped
        spec = card.get("input")
        if not isinstance(spec, Mapping):
            return None
        cols, ranges, classes = spec.get("columns"), spec.get("ranges"), spec.get("classes")
        if not (isinstance(cols, list) and isinstance(ranges, list)
                and len(cols) == len(ranges) == n_features
                and all(isinstance(r, list) and len(r) == 2 for r in ranges)):
            return None
        return cls(task=str(task), features=tuple(str(c) for c in cols),
                   low=np.array([float(r[0]) for r in ranges], dtype=np.float64),
                   high=np.array([float(r[1]) for r in ranges], dtype=np.float64),
                   class_names=tuple(str(c) for c in classes or ()))

    def warnings(self, x: np.ndarray, metrics: ServeMetrics) -> list[str]:
        """One line per input value outside its range (never the value), counted by feature.

        Args:
            x: The rows, shape ``(n, n_features)``.
            metrics: Where the count per feature goes.

        Returns:
            At most :data:`MAX_WARNINGS` lines, then one saying how many more.
        """
        rows, cols = np.nonzero((x < self.low) | (x > self.high))
        if rows.size == 0:
            return []
        for col_index, n in zip(*np.unique(cols, return_counts=True), strict=True):
            metrics.out_of_range.labels(feature=self.features[int(col_index)]).inc(int(n))
        lines = [f"instance {int(i)}: {self.features[int(c)]} is outside the plausible range "
                 f"[{self.low[c]:g}, {self.high[c]:g}]; check the value and its unit"
                 for i, c in zip(rows[:MAX_WARNINGS], cols[:MAX_WARNINGS], strict=True)]
        if rows.size > MAX_WARNINGS:
            lines.append(f"... and {rows.size - MAX_WARNINGS} more values outside their range")
        return lines

    def names(self, classes: Sequence[int]) -> list[str] | None:
        """The class name of each predicted class, or None without names."""
        if not self.class_names:
            return None
        return [self.class_names[c] if 0 <= c < len(self.class_names) else str(c)
                for c in classes]
