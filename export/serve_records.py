"""Records of named fields for ``fedward-serve``: ``{"age": 63, "sex": "male", ...}``.

A clinician's system knows a patient's fields by name, not the model's encoded column
order. ``POST /predict`` with ``{"records": [...]}`` takes them as the release defines them:

- a release of a study ships the study's spec (``study.json``, its SHA-256 the study hash
  in the signed model card): each field is a study feature, with its value as the study
  names it (a number in the feature's unit, a level's text, true or false); the fields are
  encoded exactly as the sites encoded their rows (:mod:`fedward.study_encoding`);
- a release of a built-in task (all inputs numeric): each field is one of the card's input
  columns, every one required.

Every problem of every record is reported at once (:class:`fedward.study_encoding.RecordError`):
an unknown field, an unknown level (with the levels it has), a missing field the model
cannot impute, a value of the wrong type.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from export.bundle_verify import VerifiedBundle
from fedward.study import STUDY_FILE, StudyError, StudySpec, parse_spec
from fedward.study_encoding import RecordError, encode_values, record_values

__all__ = ["RecordError", "RecordReader", "record_reader"]


@dataclass(frozen=True)
class RecordReader:
    """How this release reads records: by its study's features, or by its input columns."""

    study: StudySpec | None
    columns: tuple[str, ...]

    def fields(self) -> list[str]:
        """The field names a record may carry."""
        return [f.name for f in self.study.features] if self.study else list(self.columns)

    def rows(self, records: Sequence[Mapping[str, object]]) -> np.ndarray:
        """The model's input rows (float64, NaN where the model imputes).

        Raises:
            RecordError: Every problem of every record.
        """
        if self.study is not None:
            x, _usable = encode_values(self.study, record_values(self.study, records))
            return x     # record_values refused any row a drop-row feature would drop
        problems: list[str] = []
        x = np.full((len(records), len(self.columns)), np.nan)
        known = set(self.columns)
        for i, record in enumerate(records):
            problems.extend(f"record {i}: {name!r} is not an input of this model"
                            for name in sorted(set(record) - known))
            for j, name in enumerate(self.columns):
                value = record.get(name)
                if value is None:
                    problems.append(f"record {i}: {name} is required")
                elif (isinstance(value, bool) or not isinstance(value, int | float)
                      or not math.isfinite(value)):
                    problems.append(f"record {i}: {name} must be a finite number")
                else:
                    x[i, j] = float(value)
        if problems:
            hint = (f"The model's inputs are: {', '.join(self.columns)}"
                    if any(set(r) - known for r in records) else "")
            raise RecordError(problems, hint)
        return x


def record_reader(bundle: VerifiedBundle, columns: Sequence[str], n_features: int
                  ) -> tuple[RecordReader | None, str]:
    """How records are read for this verified release, or None, with a note saying which.

    Args:
        bundle: The verified release bundle.
        columns: The card's input columns, in the model's order.
        n_features: The model's input width.
    """
    card = bundle.model_card
    study = card.get("study")
    if isinstance(study, Mapping):
        if STUDY_FILE not in bundle.files:
            return None, (f"records by name: not for this release (it has no {STUDY_FILE}; "
                          "send instances in the card's column order)")
        data = bundle.read_verified(STUDY_FILE)
        if hashlib.sha256(data).hexdigest() != study.get("sha256"):
            return None, (f"records by name: not for this release ({STUDY_FILE} is not the "
                          "study its model card names)")
        try:
            spec = parse_spec(json.loads(data), source=STUDY_FILE, check_dp=False)
        except (StudyError, ValueError) as err:
            return None, f"records by name: not for this release ({STUDY_FILE}: {err})"
        if len(spec.input_columns()) != n_features:
            return None, ("records by name: not for this release (the study's encoding does "
                          "not match the model's input width)")
        return RecordReader(study=spec, columns=tuple(columns)), (
            f"records by name: the fields of study {spec.name}")
    if len(columns) != n_features or not columns:
        return None, ("records by name: not for this release (its card does not name the "
                      "model's input columns)")
    return RecordReader(study=None, columns=tuple(columns)), (
        "records by name: the model's input columns")

