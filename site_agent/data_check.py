"""The site's data check: a :class:`~site_agent.data_table.Table` against its schema.

The check follows the "collect everything, then raise once" habit: a site learns every
problem of its file from one run, not one per run. Messages name columns, kinds and row
numbers, never a cell value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from site_agent.data_report import DataCheckError, DataProblem, DataReport, ProblemKind
from site_agent.data_schema import ColumnSpec, ColumnType, DataSchema
from site_agent.data_table import Table, TableReadError, read_csv_table

__all__ = [
    "MIN_ROWS",
    "CheckedScan",
    "check_data",
    "read_checked",
    "scan_table",
]


MIN_ROWS = 10
"""Fewer data rows than this cannot train or evaluate anything meaningful."""
_MAX_ROWS_LISTED = 5


# Plain decimal numbers only. Python's float() also accepts "1_000", "infinity" and
# surrounding whitespace; a hospital export with such cells is more likely wrong than right.
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MISSING_MARKERS = frozenset({"", "nan", "na", "n/a", "null", "none", "?"})
_INFINITY_MARKERS = frozenset({"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"})


@dataclass(frozen=True)
class CheckedScan:
    """What one pass over the file produced: the report and, if clean, the arrays."""

    report: DataReport
    content: bytes
    x: np.ndarray
    y: np.ndarray


class _Tally:
    """Counts of one (column, kind) and its first few rows."""

    def __init__(self) -> None:
        self.count = 0
        self.rows: list[int] = []

    def add(self, row: int) -> None:
        self.count += 1
        if len(self.rows) < _MAX_ROWS_LISTED:
            self.rows.append(row)


def _rows_text(tally: _Tally, row_word: str = "line") -> str:
    listed = ", ".join(str(r) for r in tally.rows)
    more = "" if tally.count <= len(tally.rows) else ", ..."
    return f"{tally.count} row(s) ({row_word} {listed}{more})"


def _parse_cell(cell_value: object, ctype: ColumnType) -> tuple[ProblemKind | None, float]:
    """Parse one cell (CSV text, or a typed value from a table); returns (problem kind or
    None, value)."""
    if not isinstance(cell_value, str):
        return _parse_typed(cell_value, ctype)
    cell = cell_value.strip()
    lowered = cell.lower()
    if lowered in _MISSING_MARKERS:
        return ProblemKind.MISSING_VALUE, math.nan
    if lowered in _INFINITY_MARKERS:
        return ProblemKind.NON_FINITE, math.nan
    if not _NUMBER_RE.fullmatch(cell):
        return ProblemKind.WRONG_TYPE, math.nan
    value = float(cell)
    if not math.isfinite(value):  # e.g. 1e999
        return ProblemKind.NON_FINITE, math.nan
    if ctype == "int" and not value.is_integer():
        return ProblemKind.WRONG_TYPE, math.nan
    return None, value


def _parse_typed(value: object, ctype: ColumnType) -> tuple[ProblemKind | None, float]:
    """A typed cell from Parquet or SQL: None is missing; a bool, a date or text is not a
    number (bool is an int subclass, so it is refused first)."""
    if value is None:
        return ProblemKind.MISSING_VALUE, math.nan
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return ProblemKind.WRONG_TYPE, math.nan
    try:
        number = float(value)
    except OverflowError:
        return ProblemKind.NON_FINITE, math.nan
    if math.isnan(number):
        return ProblemKind.MISSING_VALUE, math.nan
    if not math.isfinite(number):
        return ProblemKind.NON_FINITE, math.nan
    if ctype == "int" and not number.is_integer():
        return ProblemKind.WRONG_TYPE, math.nan
    return None, number


_FIX_HINTS: dict[ProblemKind, str] = {
    ProblemKind.MISSING_VALUE: "is empty or marked missing (NaN, NA, null); fill it in or "
                               "remove the row",
    ProblemKind.NON_FINITE: "is infinite or too large to be a number; correct it or remove "
                            "the row",
    ProblemKind.OUT_OF_RANGE: "is outside the plausible range the schema declares",
}


def _cell_message(kind: ProblemKind, column: str, spec: ColumnSpec | None, tally: _Tally,
                  *, is_label: bool, label_values: tuple[int, ...],
                  row_word: str = "line") -> str:
    what = f"label column {column!r}" if is_label else f"column {column!r}"
    where = _rows_text(tally, row_word)
    if kind == ProblemKind.WRONG_TYPE:
        if is_label or (spec is not None and spec.type == "int"):
            need = "a whole number such as 3"
        else:
            need = "a plain decimal number such as 12.5 (no units, no thousands separators)"
        return f"{what}: {where} not {need}; correct these cells"
    if kind == ProblemKind.UNKNOWN_LABEL:
        return (f"{what}: {where} with a class the schema does not declare (allowed: "
                f"{', '.join(str(v) for v in label_values)}); correct the labels or the schema")
    if kind == ProblemKind.OUT_OF_RANGE and spec is not None:
        lo = "-inf" if spec.min is None else f"{spec.min:g}"
        hi = "+inf" if spec.max is None else f"{spec.max:g}"
        return (f"{what}: {where} outside the plausible range [{lo}, {hi}] the schema "
                f"declares; check the units or correct the values")
    return f"{what}: {where} {_FIX_HINTS[kind]}"


def _file_problem(kind: ProblemKind, message: str) -> CheckedScan:
    report = DataReport(problems=[DataProblem(kind=kind, column=None, message=message)],
                        warnings=[], n_rows=0)
    return CheckedScan(report=report, content=b"", x=np.empty((0, 0), np.float32),
                 y=np.empty(0, np.int64))


def _scan(csv_path: Path, schema: DataSchema) -> CheckedScan:
    """Read the file once, check everything, and parse the arrays if it is clean."""
    try:
        table = read_csv_table(csv_path)
    except TableReadError as exc:
        return _file_problem(exc.problem.kind, exc.problem.message)
    return _scan_table(table, schema)


def scan_table(table: Table, schema: DataSchema
               ) -> tuple[DataReport, np.ndarray, np.ndarray]:
    """Check a connector's table against a schema, every problem at once.

    Args:
        table: What the connector read.
        schema: The schema the site declared.

    Returns:
        The report, and the features and labels (empty unless the report is clean).
    """
    scan = _scan_table(table, schema)
    return scan.report, scan.x, scan.y


def _scan_table(table: Table, schema: DataSchema) -> CheckedScan:
    problems: list[DataProblem] = []
    warnings: list[DataProblem] = []
    header = table.header
    features = schema.feature_columns
    specs = {c.name: c for c in schema.columns}
    label = schema.label_name
    wanted = (*features, label)
    positions: dict[str, int] = {}
    extra: list[str] = []
    for i, name in enumerate(header):
        if name in positions or (name not in wanted and name in extra):
            target = problems if name in wanted else warnings
            if not any(p.kind == ProblemKind.DUPLICATE_COLUMN and p.column == name
                       for p in target):
                target.append(DataProblem(
                    kind=ProblemKind.DUPLICATE_COLUMN, column=name,
                    message=f"column {name!r} appears more than once in the header; keep "
                            f"one"))
            continue
        if name in wanted:
            positions[name] = i
        else:
            extra.append(name)
    if not any(name in positions for name in wanted):
        problems.append(DataProblem(
            kind=ProblemKind.NO_HEADER, column=None,
            message=f"{table.where_header()} names none of the {len(wanted)} declared "
                    f"columns; the first line must be the header (e.g. "
                    f"{features[0]!r}, ..., {label!r})"))
    else:
        for name in wanted:
            if name not in positions:
                role = "label column" if name == label else "column"
                problems.append(DataProblem(
                    kind=ProblemKind.MISSING_COLUMN, column=name,
                    message=f"{role} {name!r} is missing from the header; task "
                            f"{schema.task!r} needs it (any column order is fine)"))
    if extra:
        shown = ", ".join(repr(e) for e in extra[:_MAX_ROWS_LISTED])
        more = "" if len(extra) <= _MAX_ROWS_LISTED else ", ..."
        warnings.append(DataProblem(
            kind=ProblemKind.EXTRA_COLUMN, column=None, count=len(extra),
            message=f"{len(extra)} column(s) not in the schema will be ignored: {shown}{more}"))

    tallies: dict[tuple[str, ProblemKind], _Tally] = {}
    ragged = _Tally()
    present_features = [(j, name, positions[name]) for j, name in enumerate(features)
                        if name in positions]
    label_pos = positions.get(label)
    allowed = frozenset(schema.label_values)
    x_rows: list[list[float]] = []
    y_rows: list[int] = []
    n_rows = 0
    try:
        for line, record in table.rows:
            n_rows += 1
            if len(record) != len(header):
                ragged.add(line)
                continue
            values = [math.nan] * len(features)
            row_ok = True
            for j, name, pos in present_features:
                spec = specs[name]
                kind, value = _parse_cell(record[pos], spec.type)
                if kind is None and ((spec.min is not None and value < spec.min)
                                     or (spec.max is not None and value > spec.max)):
                    kind = ProblemKind.OUT_OF_RANGE
                if kind is not None:
                    tallies.setdefault((name, kind), _Tally()).add(line)
                    row_ok = False
                values[j] = value
            if label_pos is not None:
                kind, value = _parse_cell(record[label_pos], "int")
                if kind is None and int(value) not in allowed:
                    kind = ProblemKind.UNKNOWN_LABEL
                if kind is not None:
                    tallies.setdefault((label, kind), _Tally()).add(line)
                    row_ok = False
                else:
                    y_rows.append(int(value))
            if row_ok:
                x_rows.append(values)
    except TableReadError as exc:
        problems.append(exc.problem)

    if ragged.count:
        problems.append(DataProblem(
            kind=ProblemKind.RAGGED_ROW, column=None, rows=ragged.rows, count=ragged.count,
            message=f"{_rows_text(ragged, table.row_word)} do not have the header's "
                    f"{len(header)} fields; check for stray commas or unquoted text"))
    order = {name: i for i, name in enumerate(wanted)}
    kind_order = {k: i for i, k in enumerate(ProblemKind)}
    for (name, kind), tally in sorted(tallies.items(),
                                      key=lambda kv: (order[kv[0][0]], kind_order[kv[0][1]])):
        problems.append(DataProblem(
            kind=kind, column=name, rows=tally.rows, count=tally.count,
            message=_cell_message(kind, name, specs.get(name), tally, is_label=name == label,
                                  label_values=schema.label_values, row_word=table.row_word)))
    if n_rows < MIN_ROWS:
        problems.append(DataProblem(
            kind=ProblemKind.TOO_FEW_ROWS, column=None, count=n_rows,
            message=f"the {table.noun} has {n_rows} data row(s); at least {MIN_ROWS} are "
                    f"needed"))
    if n_rows >= MIN_ROWS and label_pos is not None and len(set(y_rows)) == 1:
        problems.append(DataProblem(
            kind=ProblemKind.SINGLE_CLASS, column=label,
            message=f"every row has the same class in {label!r}; a model cannot learn "
                    f"from one class: add cases of the other class(es)"))

    report = DataReport(problems=problems, warnings=warnings, n_rows=n_rows,
                        declared_columns=frozenset(wanted))
    content = table.content
    if problems:
        return CheckedScan(report=report, content=content,
                     x=np.empty((0, len(features)), np.float32), y=np.empty(0, np.int64))
    return CheckedScan(report=report, content=content,
                 x=np.asarray(x_rows, dtype=np.float32).reshape(-1, len(features)),
                 y=np.asarray(y_rows, dtype=np.int64))


def check_data(*, csv_path: Path, schema: DataSchema) -> DataReport:
    """Check a CSV file against a schema and report every problem at once.

    Checks, all in one pass: the file exists, is readable, UTF-8 and not empty; the
    header has every declared column (any order; extra columns are a warning); every cell
    parses as its declared type, is present, finite and within the declared limits; every
    label is a declared class; there are at least :data:`MIN_ROWS` rows and more than one
    class.

    Args:
        csv_path: The site's CSV file.
        schema: The schema the site declared for it.

    Returns:
        The report; ``report.ok`` says whether the data can be used.
    """
    return _scan(csv_path, schema).report


def read_checked(csv_path: Path, schema: DataSchema) -> CheckedScan:
    """Check and parse a file; raise :class:`DataCheckError` unless it is clean."""
    scan = _scan(csv_path, schema)
    if not scan.report.ok:
        raise DataCheckError(scan.report)
    return scan
