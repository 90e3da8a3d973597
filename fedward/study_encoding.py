"""A study's features, one value each, turned into the model's encoded input columns.

Two paths end here, so that a site's training rows and a clinician's record are encoded by
the same rule:

- a site's mapped table (:mod:`site_agent.mapping_apply`): per feature one float per row,
  already in the study's terms (a numeric value in the study's unit, a level's index, 1/0);
- a record of named fields sent to ``fedward-serve`` (:func:`record_values`):
  ``{"age": 63, "sex": "male", "smoker": true}``, values as the study names them.

:func:`encode_values` makes the columns of :meth:`fedward.study.StudySpec.input_columns`: a
numeric, boolean or ordinal feature is one column (the value, 1/0, the level's index), a
categorical feature one column per level (one-hot), and an ``indicator`` feature adds its
``NAME__missing`` column. A missing value of an ``impute-*`` feature stays NaN (in each
one-hot column of a categorical feature) for the model to impute; of an ``indicator``
feature it becomes the range's low end (numeric) or no level, with the indicator set; a row
missing a ``drop-row`` feature is not usable.

A problem names the record and the field, never the value given: answers and client logs
never carry a patient's values. This module imports neither torch nor the site agent: the
clinician's install runs it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

from fedward.study import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    OrdinalFeature,
    StudySpec,
)

__all__ = ["MAX_PROBLEMS", "RecordError", "encode_values", "record_values"]

# At most this many problems are listed in a refusal; the rest are counted.
MAX_PROBLEMS: Final = 20


class RecordError(ValueError):
    """Records that do not fit the study: every problem at once (``problems``)."""

    def __init__(self, problems: list[str], hint: str = "") -> None:
        self.problems = problems
        shown = problems[:MAX_PROBLEMS]
        more = len(problems) - len(shown)
        super().__init__("; ".join(shown) + (f"; ... and {more} more" if more else "")
                         + (f". {hint}" if hint else ""))


def encode_values(study: StudySpec, values: Mapping[str, np.ndarray],
                  imputation: Mapping[str, float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The model's input columns for rows given one value per feature.

    Args:
        study: The study.
        values: Feature name -> float64 array, one value per row, NaN where missing: a
            numeric value in the study's unit, a level's index (categorical, ordinal),
            1.0/0.0 (boolean).
        imputation: Values to put in for a missing ``impute-*`` feature here instead of
            leaving NaN for the model.

    Returns:
        (x float64 of shape (rows, input columns), usable: bool per row, False where a
        ``drop-row`` feature is missing).
    """
    n = len(next(iter(values.values()))) if values else 0
    usable = np.ones(n, dtype=bool)
    columns: list[np.ndarray] = []
    for f in study.features:
        v = np.array(values[f.name], dtype=np.float64)
        miss = np.isnan(v)
        if f.missing == "drop-row":
            usable &= ~miss
        elif f.missing != "indicator" and imputation is not None and f.name in imputation:
            v[miss] = imputation[f.name]
            miss = np.isnan(v)
        to_impute = f.missing.startswith("impute-")
        if isinstance(f, CategoricalFeature):
            onehot = np.zeros((n, len(f.levels)))
            idx = np.flatnonzero(~miss)
            onehot[idx, v[idx].astype(int)] = 1.0
            if to_impute:
                onehot[miss] = np.nan
            columns.extend(onehot.T)
        else:
            low = f.range[0] if isinstance(f, NumericFeature) else 0.0
            columns.append(np.where(miss, np.nan if to_impute else low, v))
        if f.missing == "indicator":
            columns.append(miss.astype(float))
    x = np.stack(columns, axis=1) if columns else np.empty((n, 0))
    return x, usable


def _value(f: object, given: object) -> float | str:
    """A feature's value as a float, or the problem (a sentence without the value)."""
    if isinstance(f, NumericFeature):
        if isinstance(given, bool) or not isinstance(given, int | float):
            return f"must be a number{f' in {f.unit}' if f.unit else ''}"
        if not math.isfinite(given):
            return "must be a finite number"
        return float(given)
    if isinstance(f, BooleanFeature):
        if not isinstance(given, bool):
            return "must be true or false"
        return 1.0 if given else 0.0
    assert isinstance(f, CategoricalFeature | OrdinalFeature)
    levels = f.levels
    if not isinstance(given, str):
        return f"must be one of its levels as text: {', '.join(levels)}"
    if given not in levels:
        # Not echoed: answers and client logs never carry a patient's values.
        return f"is not one of its levels: {', '.join(levels)} (exact text)"
    return float(levels.index(given))


def record_values(study: StudySpec, records: Sequence[Mapping[str, object]]
                  ) -> dict[str, np.ndarray]:
    """Records of named fields as :func:`encode_values` takes them, every problem checked.

    A field missing from a record, or given as ``null``, is a missing value: accepted for a
    feature whose rule imputes it or adds an indicator, refused for a ``drop-row`` feature
    (the model cannot answer without it). A field the study does not define is refused,
    the label included.

    Raises:
        RecordError: Every problem of every record at once, each naming the record and the
            field.
    """
    known = {f.name: f for f in study.features}
    out = {name: np.full(len(records), np.nan) for name in known}
    problems: list[str] = []
    unknown = False
    for i, record in enumerate(records):
        for name in sorted(record.keys() - known.keys()):
            unknown = True
            why = ("is the label the model predicts, not an input" if name == study.label.name
                   else f"is not a field of study {study.name}")
            problems.append(f"record {i}: {name!r} {why}")
        for name, f in known.items():
            given = record.get(name)
            if given is None:
                if f.missing == "drop-row":
                    problems.append(f"record {i}: {name} is required: this model cannot "
                                    "answer without it")
                continue
            got = _value(f, given)
            if isinstance(got, str):
                problems.append(f"record {i}: {name} {got}")
            else:
                out[name][i] = got
    if problems:
        hint = f"The study's fields are: {', '.join(known)}" if unknown else ""
        raise RecordError(problems, hint)
    return out
