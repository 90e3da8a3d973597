"""Applying a hospital's mapping to its table: check every cell, encode what is trained on.

The site's data path for a study: connector -> :func:`check_mapping` (every problem at
once, row numbers at the site) -> :func:`encode` (the study's encoded input columns,
:meth:`fedward.study.StudySpec.input_columns`) -> :func:`load_study_data` (the split and the
fingerprint every connector ends with). :func:`summarise` is what ``fedward-site mapping
show`` prints: per feature, counts and levels after mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedward.study import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    OrdinalFeature,
    StudySpec,
)
from fedward.study_encoding import encode_values
from site_agent.connectors import Connector
from site_agent.data import SiteData, split_site_data
from site_agent.data_check import MIN_ROWS, _parse_cell, _rows_text, _Tally
from site_agent.data_report import DataCheckError, DataProblem, DataReport, ProblemKind
from site_agent.data_table import TableReadError
from site_agent.mapping import (
    BOOLEAN_CODES,
    Binding,
    FeatureMap,
    code_of,
    column_positions,
    study_problems,
)
from site_agent.units import conversion, same_dimension

__all__ = ["MappedData", "check_mapping", "encode", "load_study_data", "summarise"]

_MAX_CODES_SHOWN = 5
# A column whose values are mostly implausible in the mapped unit but plausible in another
# unit of the table is reported as a wrong unit, not as so many bad values.
_WRONG_UNIT_OUTSIDE = 0.5
_WRONG_UNIT_INSIDE = 0.95
_RANGE_MARGIN = 0.1


@dataclass
class MappedData:
    """A table after the mapping: per study feature one value per row, missing as NaN.

    Attributes:
        report: Every problem and warning (study names in ``column``).
        values: Feature -> float64 array: a numeric value in the study's unit, a level's
            index (categorical, ordinal), 1.0/0.0 (boolean); NaN where missing.
        labels: Class index per row (-1 where the label is unusable).
        rows: The row number of each row, as the site's staff find it.
    """

    report: DataReport
    values: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    rows: list[int] = field(default_factory=list)
    content: bytes = b""


def _shown(codes: dict[str, int]) -> str:
    top = sorted(codes, key=lambda c: (-codes[c], c))[:_MAX_CODES_SHOWN]
    more = ", ..." if len(codes) > _MAX_CODES_SHOWN else ""
    return ", ".join(repr(c[:32]) for c in top) + more


def check_mapping(binding: Binding, connector: Connector) -> MappedData:
    """Read the connector's table through the mapping; report every problem at once.

    Args:
        binding: The study and the mapping.
        connector: Where the rows come from.

    Returns:
        The mapped values and the report (``report.ok`` says whether it can be trained on).
    """
    study, mapping = binding.study, binding.mapping
    declared = frozenset([*(f.name for f in study.features), study.label.name])
    problems, warnings = study_problems(mapping, study)
    try:
        table = connector.read()
    except TableReadError as exc:
        return MappedData(report=DataReport(problems=[exc.problem, *problems],
                                            warnings=warnings, n_rows=0,
                                            declared_columns=declared))
    rows: list[tuple[int, list[object]]] = []
    try:
        rows = [(n, list(cells)) for n, cells in table.rows]
    except TableReadError as exc:
        problems.append(exc.problem)
    ragged = _Tally()
    for n, cells in rows:
        if len(cells) != len(table.header):
            ragged.add(n)
    if ragged.count:
        problems.append(DataProblem(
            kind=ProblemKind.RAGGED_ROW, column=None, rows=ragged.rows, count=ragged.count,
            message=f"{_rows_text(ragged, table.row_word)} do not have the header's "
                    f"{len(table.header)} fields; check for stray commas or unquoted text"))
    entries: dict[str, FeatureMap] = {}
    for e in mapping.features:   # the first entry of a feature (a second is a problem)
        entries.setdefault(e.feature, e)
    used = [e.column for e in entries.values()] + [mapping.label.column]
    pos = column_positions(table.header, used)
    for name in sorted(set(used)):
        if table.header.count(name) > 1:
            problems.append(DataProblem(kind=ProblemKind.DUPLICATE_COLUMN, column=None,
                                        message=f"local column {name!r} appears more than "
                                                "once in the header; keep one"))
    for feature in [*study.features, None]:
        entry_col = mapping.label.column if feature is None else (
            entries[feature.name].column if feature.name in entries else None)
        study_name = study.label.name if feature is None else feature.name
        if entry_col is not None and entry_col not in pos:
            problems.append(DataProblem(
                kind=ProblemKind.MISSING_COLUMN, column=study_name,
                message=f"{'label' if feature is None else 'feature'} {study_name!r}: the "
                        f"mapping reads local column {entry_col!r}, which {table.source} does "
                        f"not have (its columns: {', '.join(table.header[:20])})"))
    out = MappedData(report=DataReport([], [], 0), rows=[n for n, _ in rows],
                     content=table.content)
    for feature in study.features:
        entry = entries.get(feature.name)
        if entry is None or entry.column not in pos:
            continue
        cells = [r[pos[entry.column]] if pos[entry.column] < len(r) else None
                 for _, r in rows]
        values, found = _map_feature(feature, entry, cells, out.rows,
                                     [*mapping.missing_codes, *entry.missing_codes],
                                     table.row_word)
        out.values[feature.name] = values
        for kind, warn, message, tally in found:
            (warnings if warn else problems).append(DataProblem(
                kind=kind, column=feature.name, rows=tally.rows, count=tally.count,
                message=f"feature {feature.name!r} (local column {entry.column!r}): "
                        f"{_rows_text(tally, table.row_word)} {message}"))
    out.labels = _map_label(binding, rows, pos, problems, table.row_word)
    n_ok = int(np.sum(out.labels >= 0))
    if len(rows) < MIN_ROWS:
        problems.append(DataProblem(kind=ProblemKind.TOO_FEW_ROWS, column=None,
                                    count=len(rows), message=f"the {table.noun} has "
                                    f"{len(rows)} data row(s); at least {MIN_ROWS} are needed"))
    elif n_ok and len(set(out.labels[out.labels >= 0].tolist())) == 1:
        problems.append(DataProblem(kind=ProblemKind.SINGLE_CLASS, column=study.label.name,
                                    message="every row has the same class; a model cannot "
                                            "learn from one class"))
    out.report = DataReport(problems=problems, warnings=warnings, n_rows=len(rows),
                            declared_columns=declared)
    return out


def _map_feature(feature: Any, entry: FeatureMap, cells: list[object], row_numbers: list[int],
                 missing_codes: list[str], row_word: str
                 ) -> tuple[np.ndarray, list[tuple[ProblemKind, bool, str, _Tally]]]:
    """One feature's values, and (kind, is-warning, message, rows) per finding."""
    missing = {c.lower() for c in missing_codes}
    values = np.full(len(cells), np.nan)
    tallies: dict[ProblemKind, _Tally] = {}
    unmapped: dict[str, int] = {}
    n_missing = _Tally()
    levels = (list(feature.levels) if isinstance(feature, CategoricalFeature | OrdinalFeature)
              else ["true", "false"] if isinstance(feature, BooleanFeature) else None)
    for i, (cell, row) in enumerate(zip(cells, row_numbers, strict=True)):
        code = code_of(cell)
        if code is None or code.lower() in missing:
            n_missing.add(row)
            continue
        if levels is not None:
            level = entry.codes.get(code) if entry.codes else (
                code if code in levels else None)
            if level is None and isinstance(feature, BooleanFeature) and not entry.codes:
                level = BOOLEAN_CODES.get(code.lower())
            if level is None or level not in levels:
                unmapped[code] = unmapped.get(code, 0) + 1
                tallies.setdefault(ProblemKind.UNMAPPED_CODE, _Tally()).add(row)
                continue
            values[i] = 1.0 if level == "true" else 0.0 if level == "false" else float(
                levels.index(level))
            continue
        kind, number = _parse_cell(cell, "float")
        if kind is not None:
            tallies.setdefault(kind, _Tally()).add(row)
            continue
        values[i] = number
    found: list[tuple[ProblemKind, bool, str, _Tally]] = []
    if isinstance(feature, NumericFeature):
        found.extend(_numeric_checks(feature, entry, values, row_numbers))
    for kind, tally in tallies.items():
        text = {ProblemKind.UNMAPPED_CODE: f"with a code the mapping does not map "
                f"({_shown(unmapped)}); add them under 'codes' or 'missing_codes'",
                ProblemKind.WRONG_TYPE: "not a plain number; correct the cells or add the "
                "marker to 'missing_codes'",
                ProblemKind.NON_FINITE: "infinite or too large to be a number"}.get(
                    kind, str(kind))
        found.append((kind, False, text, tally))
    if n_missing.count:
        found.append((ProblemKind.MISSING_VALUE, True,
                      f"missing: the study's rule for it is {feature.missing!r}", n_missing))
    return values, found


def _numeric_checks(feature: NumericFeature, entry: FeatureMap, values: np.ndarray,
                    row_numbers: list[int]) -> list[tuple[ProblemKind, bool, str, _Tally]]:
    """Convert to the study's unit in place; find implausible values and a wrong unit."""
    lo, hi = feature.range
    # A range is often a published minimum and maximum, rounded (the Breast Cancer spec's
    # 0.05 for a minimum of 0.04996): a value within 10% of the range's width beyond an end
    # is plausible; one beyond that is not.
    margin = _RANGE_MARGIN * (hi - lo)
    lo, hi = lo - margin, hi + margin
    study_unit = feature.unit
    if study_unit is not None and entry.unit is not None:
        try:
            scale, offset = conversion(entry.unit, study_unit, entry.substance)
        except ValueError:
            return []  # reported with the mapping's problems
        values *= scale
        values += offset
    present = ~np.isnan(values)
    outside = present & ((values < lo) | (values > hi))
    if not outside.any():
        return []
    tally = _Tally()
    for i in np.flatnonzero(outside):
        tally.add(row_numbers[int(i)])
    unit_text = f" {study_unit}" if study_unit else ""
    if study_unit is not None and outside.sum() > _WRONG_UNIT_OUTSIDE * present.sum():
        local = entry.unit or study_unit
        raw = values[present]
        for other in [study_unit, *same_dimension(study_unit, entry.substance)]:
            if other == local:
                continue
            scale, offset = conversion(other, study_unit, entry.substance)
            back, fwd = conversion(local, study_unit, entry.substance)
            as_other = (raw - fwd) / back * scale + offset
            inside = np.mean((as_other >= lo) & (as_other <= hi))
            if inside >= _WRONG_UNIT_INSIDE:
                return [(ProblemKind.WRONG_UNIT, False,
                         f"outside [{feature.range[0]:g}, {feature.range[1]:g}]{unit_text}: the "
                         f"values look like "
                         f"{other}, not {local} as the mapping says; set 'unit: {other}'",
                         tally)]
    return [(ProblemKind.OUT_OF_RANGE, False,
             f"outside the study's plausible range [{feature.range[0]:g}, "
             f"{feature.range[1]:g}]{unit_text} (by more than 10% of its width); check the "
             "unit, correct the values, or add a local marker of a missing value to "
             "'missing_codes'", tally)]


def _map_label(binding: Binding, rows: list[tuple[int, list[object]]], pos: dict[str, int],
               problems: list[DataProblem], row_word: str) -> np.ndarray:
    study, label = binding.study, binding.mapping.label
    classes = list(study.label.classes)
    out = np.full(len(rows), -1, np.int64)
    if label.column not in pos:
        return out
    p = pos[label.column]
    missing, unmapped = _Tally(), _Tally()
    missing_codes = {c.lower() for c in binding.mapping.missing_codes}
    codes: dict[str, int] = {}
    for i, (row, cells) in enumerate(rows):
        code = code_of(cells[p]) if p < len(cells) else None
        if code is None or code.lower() in missing_codes:
            missing.add(row)
            continue
        cls = label.codes.get(code) if label.codes else (code if code in classes else None)
        if cls is None or cls not in classes:
            unmapped.add(row)
            codes[code] = codes.get(code, 0) + 1
            continue
        out[i] = classes.index(cls)
    name = study.label.name
    if missing.count:
        problems.append(DataProblem(kind=ProblemKind.MISSING_VALUE, column=name,
                                    rows=missing.rows, count=missing.count,
                                    message=f"label {name!r} (local column {label.column!r})"
                                            f": {_rows_text(missing, row_word)} without a "
                                            "label; fill it in or remove the rows"))
    if unmapped.count:
        problems.append(DataProblem(kind=ProblemKind.UNMAPPED_CODE, column=name,
                                    rows=unmapped.rows, count=unmapped.count,
                                    message=f"label {name!r} (local column {label.column!r})"
                                            f": {_rows_text(unmapped, row_word)} with a code "
                                            f"the mapping does not map ({_shown(codes)}); add "
                                            "them under label.codes"))
    return out


def encode(study: StudySpec, mapped: MappedData,
           imputation: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The model's input (:meth:`StudySpec.input_columns`) and labels of the usable rows.

    A row missing a ``drop-row`` feature is dropped; an ``indicator`` feature's missing
    value is encoded as the range's low end (numeric; 0 after the model's scaling) or no
    level, with its indicator column set to 1; an ``impute-*`` feature's missing value
    stays NaN (in each one-hot column of a categorical feature): the model imputes it
    with the value the run composed from its DP statistics (:mod:`fedward.preprocessing`),
    unless ``imputation`` gives the value here.

    Returns:
        (x float32, y int64, rows dropped).
    """
    n = len(mapped.labels)
    x, usable = encode_values(study, mapped.values, imputation)
    keep = (mapped.labels >= 0) & usable
    x = x[keep]
    return x.astype(np.float32), mapped.labels[keep].astype(np.int64), int(n - keep.sum())


def load_study_data(binding: Binding, connector: Connector, *, holdout_fraction: float = 0.25,
                    seed: int = 0, fingerprint_key: bytes | None = None) -> SiteData:
    """Connector -> mapping -> the study's encoded input -> train and held-out arrays.

    Raises:
        DataCheckError: Every problem of the check, or too few usable rows after it.
    """
    mapped = check_mapping(binding, connector)
    if not mapped.report.ok:
        raise DataCheckError(mapped.report)
    try:
        x, y, _dropped = encode(binding.study, mapped)
    except ValueError as err:
        raise DataCheckError(DataReport(
            problems=[DataProblem(kind=ProblemKind.MISSING_VALUE, column=None,
                                  message=str(err))], warnings=[],
            n_rows=mapped.report.n_rows)) from None
    if len(y) < MIN_ROWS or len(set(y.tolist())) < 2:
        raise DataCheckError(DataReport(
            problems=[DataProblem(kind=ProblemKind.TOO_FEW_ROWS, column=None, count=len(y),
                                  message=f"{len(y)} row(s) are left after the study's "
                                          f"missing-value rules, with {len(set(y.tolist()))} "
                                          f"class(es); at least {MIN_ROWS} rows of two "
                                          "classes are needed")],
            warnings=[], n_rows=mapped.report.n_rows))
    return split_site_data(x=x, y=y, n_rows=mapped.report.n_rows, content=mapped.content,
                           schema_hash=binding.binding_hash, holdout_fraction=holdout_fraction,
                           seed=seed, fingerprint_key=fingerprint_key, connector=connector.kind)


def summarise(study: StudySpec, mapped: MappedData) -> dict[str, Any]:
    """What would be trained on, per feature (for the site's own screen, never sent)."""
    feats: list[dict[str, Any]] = []
    for f in study.features:
        v = mapped.values.get(f.name)
        if v is None:
            feats.append({"feature": f.name, "type": f.type, "mapped": False})
            continue
        present = v[~np.isnan(v)]
        item: dict[str, Any] = {"feature": f.name, "type": f.type, "mapped": True,
                                "n": int(present.size), "missing": int(v.size - present.size),
                                "missing_rule": f.missing}
        if isinstance(f, NumericFeature):
            item.update(unit=f.unit, min=_num(present.min()) if present.size else None,
                        max=_num(present.max()) if present.size else None,
                        mean=_num(present.mean()) if present.size else None)
        elif isinstance(f, BooleanFeature):
            item["levels"] = {"true": int(np.sum(present == 1.0)),
                              "false": int(np.sum(present == 0.0))}
        else:
            item["levels"] = {lv: int(np.sum(present == i)) for i, lv in enumerate(f.levels)}
        feats.append(item)
    labels = mapped.labels
    classes = {c: int(np.sum(labels == i)) for i, c in enumerate(study.label.classes)}
    try:
        x, y, dropped = encode(study, mapped)
        trained: dict[str, Any] = {"rows": len(y), "dropped": dropped,
                                   "input_columns": int(x.shape[1])}
    except ValueError as err:
        trained = {"rows": None, "why": str(err)}
    return {"study": study.name, "rows_read": mapped.report.n_rows, "features": feats,
            "label": {"name": study.label.name, "classes": classes,
                      "unusable": int(np.sum(labels < 0))},
            "trained_on": trained}


def _num(value: float) -> float:
    return round(float(value), 4) if math.isfinite(float(value)) else float("nan")

