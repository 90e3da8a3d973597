"""Imputation and scaling of a study's inputs, composed from a run's DP statistics.

After the statistics phase of a run that pins a study (:mod:`fedward.statistics`), the
coordinator composes one :class:`Preprocessing` from the summed, noised reference document
(:func:`compose`): nothing else about any site's data goes into it. It travels to every
site in the run's task configuration (``CFG.PREPROCESSING``, :meth:`Preprocessing.to_json`)
before round 1, and the model is built with it (:func:`model_params`), so every site, the
global model, every export and the served bundle impute and scale the same way, inside the
model. The rule, exactly:

Imputation (only features whose rule is ``impute-*``; values in the study's encoding):
    - ``impute-mean`` (numeric): the DP mean; the range's midpoint when the reference
      states no mean (fewer than 2 noised rows).
    - ``impute-median`` (numeric): the 50% point of the DP histogram (noised counts clipped
      at 0), interpolated linearly inside its bin; (ordinal) that point rounded to the
      nearest level's index. All counts 0: the midpoint.
    - ``impute-mode``: (categorical) the level whose one-hot column has the largest noised
      count of ones (its histogram's last bin); (boolean) true when the noised count of
      ones is at least that of zeros; (ordinal) the level whose bin has the largest count.
      Ties: the first level.

Scaling (numeric features only; categorical, boolean and ordinal inputs keep the spec's
fixed scaling): the model standardises ``(x - center) / scale`` with ``center`` the DP
mean (the range's midpoint when none is stated) and ``scale`` the DP standard deviation
held within [width / 20, width / 2] of the plausible range (the width / 4 when none is
stated), so that noise in a small release cannot make the scale vanish or explode.

A missing value reaches the model as NaN and the model replaces it with its column's value
(:class:`fedward.models.tabular.TabularMLP`'s ``fill``); a categorical feature's missing
value is NaN in each of its one-hot columns and becomes the mode's one-hot vector.

This module imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from fedward.study import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    OrdinalFeature,
    StudySpec,
)

__all__ = [
    "PREPROCESSING_VERSION",
    "Preprocessing",
    "PreprocessingError",
    "compose",
    "fill_missing",
    "imputed_features",
    "model_params",
]

PREPROCESSING_VERSION: Final = 1
_MIN_SCALE: Final = 1 / 20     # of the range's width
_MAX_SCALE: Final = 1 / 2
_DEFAULT_SCALE: Final = 1 / 4


class PreprocessingError(ValueError):
    """A preprocessing document that does not fit the study; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """A run's imputation values and numeric scaling (see the module docstring).

    Attributes:
        impute: study feature -> its value in the study's encoding (a number in the
            feature's unit, a level's index, 1.0/0.0 for a boolean).
        scaling: numeric study feature -> (center, scale).
    """

    impute: Mapping[str, float] = field(default_factory=dict)
    scaling: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        """The compact JSON that travels in the task configuration (sorted keys)."""
        return json.dumps({"version": PREPROCESSING_VERSION,
                           "impute": {k: float(v) for k, v in sorted(self.impute.items())},
                           "scaling": {k: [float(c), float(s)]
                                       for k, (c, s) in sorted(self.scaling.items())}},
                          separators=(",", ":"), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, spec: StudySpec) -> Preprocessing:
        """Parse and check a document against ``spec``.

        Raises:
            PreprocessingError: not the format, a feature the spec does not impute or
                scale, a value that is not finite, a level index out of the levels, or a
                scale that is not positive.
        """
        try:
            doc = json.loads(text)
            if doc.get("version") != PREPROCESSING_VERSION:
                raise PreprocessingError(f"preprocessing version {doc.get('version')!r} is "
                                         f"not {PREPROCESSING_VERSION}")
            impute = {str(k): float(v) for k, v in dict(doc["impute"]).items()}
            scaling = {str(k): (float(v[0]), float(v[1]))
                       for k, v in dict(doc["scaling"]).items()}
        except PreprocessingError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise PreprocessingError(f"preprocessing is not the expected JSON ({err})"
                                     ) from None
        out = cls(impute=impute, scaling=scaling)
        problems = out.problems(spec)
        if problems:
            raise PreprocessingError("preprocessing does not fit study "
                                     f"{spec.name}: " + "; ".join(problems))
        return out

    def problems(self, spec: StudySpec) -> list[str]:
        """What in this document does not fit ``spec`` (empty: it fits)."""
        feats = {f.name: f for f in spec.features}
        out: list[str] = []
        for name, value in self.impute.items():
            f = feats.get(name)
            if f is None or not f.missing.startswith("impute-"):
                out.append(f"{name}: the study does not impute it")
            elif not math.isfinite(value):
                out.append(f"{name}: imputation value is not finite")
            elif isinstance(f, CategoricalFeature | OrdinalFeature) and (
                    value != int(value) or not 0 <= value < len(f.levels)):
                out.append(f"{name}: {value} is not a level index (0..{len(f.levels) - 1})")
            elif isinstance(f, BooleanFeature) and value not in (0.0, 1.0):
                out.append(f"{name}: a boolean imputes 0 or 1, not {value}")
        for name, (center, scale) in self.scaling.items():
            if not isinstance(feats.get(name), NumericFeature):
                out.append(f"{name}: only a numeric feature of the study is scaled")
            elif not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
                out.append(f"{name}: scaling needs a finite center and a positive scale")
        return out


def imputed_features(spec: StudySpec) -> list[str]:
    """The study's features whose missing values are imputed (rule ``impute-*``)."""
    return [f.name for f in spec.features if f.missing.startswith("impute-")]


def _histogram_point(counts: list[float], low: float, high: float, q: float) -> float | None:
    """The ``q`` point of a histogram of equal bins over [low, high], linear in a bin."""
    c = [max(0.0, float(v)) for v in counts]
    total = sum(c)
    if total <= 0:
        return None
    width = (high - low) / len(c)
    target, cum = q * total, 0.0
    for i, v in enumerate(c):
        if v > 0 and cum + v >= target:
            return low + width * (i + (target - cum) / v)
        cum += v
    return high


def _level_bin(index: int, n_levels: int, bins: int) -> int:
    """The bin an ordinal level's index falls in (``bins`` edges over [0, levels - 1])."""
    return min(int(index / (n_levels - 1) * bins), bins - 1)


def _impute_value(f: Any, entries: Mapping[str, Mapping[str, Any]]) -> float:
    if isinstance(f, NumericFeature):
        lo, hi = f.range
        e = entries[f.name]
        if f.missing == "impute-median":
            point = _histogram_point(list(e["counts"]), lo, hi, 0.5)
            return (lo + hi) / 2 if point is None else point
        return (lo + hi) / 2 if e.get("mean") is None else float(e["mean"])
    if isinstance(f, CategoricalFeature):
        ones = [float(entries[f"{f.name}={lv}"]["counts"][-1]) for lv in f.levels]
        return float(ones.index(max(ones)))
    if isinstance(f, BooleanFeature):
        counts = entries[f.name]["counts"]
        return 1.0 if float(counts[-1]) >= float(counts[0]) else 0.0
    assert isinstance(f, OrdinalFeature)
    counts = [float(v) for v in entries[f.name]["counts"]]
    k = len(f.levels)
    if f.missing == "impute-median":
        point = _histogram_point(counts, 0.0, float(k - 1), 0.5)
        return float(round((k - 1) / 2 if point is None else point))
    per_level = [counts[_level_bin(i, k, len(counts))] for i in range(k)]
    return float(per_level.index(max(per_level)))


def compose(spec: StudySpec, reference: Mapping[str, Any]) -> Preprocessing:
    """The run's preprocessing from its reference statistics (format version 1).

    Args:
        spec: the study the run pins.
        reference: the summed, noised statistics of the run (its features are the
            study's encoded input columns).

    Raises:
        PreprocessingError: the reference does not hold the study's columns.
    """
    entries = {str(e["name"]): e for e in reference.get("features", [])}
    wanted = [name for name, _, _ in spec.input_columns()]
    absent = [c for c in wanted if c not in entries]
    if absent:
        raise PreprocessingError(f"the reference statistics lack the study's columns "
                                 f"{', '.join(absent[:5])}")
    impute = {f.name: _impute_value(f, entries) for f in spec.features
              if f.missing.startswith("impute-")}
    scaling: dict[str, tuple[float, float]] = {}
    for f in spec.features:
        if isinstance(f, NumericFeature):
            lo, hi = f.range
            width = hi - lo
            e = entries[f.name]
            center = (lo + hi) / 2 if e.get("mean") is None else float(e["mean"])
            std = e.get("std")
            scale = (width * _DEFAULT_SCALE if std is None else
                     min(max(float(std), width * _MIN_SCALE), width * _MAX_SCALE))
            scaling[f.name] = (center, scale)
    return Preprocessing(impute=impute, scaling=scaling)


def model_params(spec: StudySpec, pre: Preprocessing | None,
                 params: Mapping[str, Any]) -> dict[str, Any]:
    """The tabular model's parameters with ``pre`` in them: per encoded column, its
    imputation value (``fill``, None where nothing is imputed) and its scaling
    (``low``/``high`` with ``(x - low) / (high - low)`` the standardisation)."""
    out = dict(params)
    if pre is None:
        return out
    low, high = list(out["low"]), list(out["high"])
    fill: list[float | None] = []
    i = 0
    for f in spec.features:
        value = pre.impute.get(f.name)
        if isinstance(f, CategoricalFeature):
            for j, _ in enumerate(f.levels):
                fill.append(None if value is None else float(int(value) == j))
            i += len(f.levels)
        else:
            fill.append(value)
            if isinstance(f, NumericFeature) and f.name in pre.scaling:
                center, scale = pre.scaling[f.name]
                low[i], high[i] = center, center + scale
            i += 1
        if f.missing == "indicator":
            fill.append(None)
            i += 1
    out["low"], out["high"] = low, high
    if any(v is not None for v in fill):
        out["fill"] = fill
    return out


def fill_missing(x: np.ndarray, fill: list[float | None] | None) -> np.ndarray:
    """``x`` with each NaN replaced by its column's value in ``fill`` (what the model's
    imputation step does, for code that checks its input before the model sees it, e.g.
    DP-SGD's data check). A column without a value keeps its NaN."""
    if fill is None or not np.isnan(x).any():
        return x
    values = np.array([np.nan if v is None else float(v) for v in fill], dtype=x.dtype)
    out: np.ndarray = np.where(np.isnan(x), values[None, :], x)
    return out
