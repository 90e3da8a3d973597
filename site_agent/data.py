"""The site's data check: a declared schema, the CSV reader, and the table check.

Every data connector (:mod:`site_agent.connectors`: CSV, Parquet, SQL, plugins) hands a
:class:`Table` to :func:`scan_table` (or, for the hospital's mapping to a study,
:mod:`site_agent.mapping`); CSV files keep their own path (:func:`check_data`,
:func:`load_site_data`), which the CSV connector calls.

This module runs only at the site. It reads patient data, so it is careful about what it
lets out of itself:

- Problem messages (for the site's IT staff) name columns, kinds and row numbers, never a
  cell value.
- :meth:`DataReport.summary_for_coordinator` and :meth:`DataFingerprint.to_dict` are the
  only things meant to cross the wire. They hold kinds, counts, hashes and the column
  names of the declared schema, never a value, a row number or a name read from the CSV
  header (a header-less file would turn its first row of data into "column names").

The check follows the "collect everything, then raise once" habit: a site learns every
problem of its file from one run, not one per run.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.model_selection import train_test_split

from fedward.tasks import BREAST_CANCER_RANGES, TASKS, TaskSpec

__all__ = [
    "MIN_ROWS",
    "SCHEMA_VERSION",
    "ColumnSpec",
    "DataCheckError",
    "DataFingerprint",
    "DataProblem",
    "DataReport",
    "DataSchema",
    "ProblemKind",
    "SchemaError",
    "SiteData",
    "Table",
    "TableReadError",
    "check_data",
    "keyed_fingerprint",
    "load_schema",
    "load_site_data",
    "read_csv_table",
    "scan_table",
    "split_site_data",
]

SCHEMA_VERSION = 1
MIN_ROWS = 10
"""Fewer data rows than this cannot train or evaluate anything meaningful."""
_MAX_ROWS_LISTED = 5
_ColumnType = Literal["float", "int"]
_COLUMN_TYPES: tuple[str, ...] = ("float", "int")
_DIGITS_PIXEL_MAX = 16

# Plain decimal numbers only. Python's float() also accepts "1_000", "infinity" and
# surrounding whitespace; a hospital export with such cells is more likely wrong than right.
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MISSING_MARKERS = frozenset({"", "nan", "na", "n/a", "null", "none", "?"})
_INFINITY_MARKERS = frozenset({"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"})


class ProblemKind(StrEnum):
    """Every kind of data problem or warning the connector reports."""

    FILE_MISSING = "file-missing"
    FILE_UNREADABLE = "file-unreadable"
    NOT_UTF8 = "not-utf8"
    FILE_EMPTY = "file-empty"
    MALFORMED_CSV = "malformed-csv"
    NO_HEADER = "no-header"
    MISSING_COLUMN = "missing-column"
    DUPLICATE_COLUMN = "duplicate-column"
    EXTRA_COLUMN = "extra-column"
    RAGGED_ROW = "ragged-row"
    MISSING_VALUE = "missing-value"
    WRONG_TYPE = "wrong-type"
    NON_FINITE = "non-finite"
    OUT_OF_RANGE = "out-of-range"
    UNKNOWN_LABEL = "unknown-label"
    TOO_FEW_ROWS = "too-few-rows"
    SINGLE_CLASS = "single-class"
    # A database or other non-file source (site_agent.connectors).
    SOURCE_UNREACHABLE = "source-unreachable"
    QUERY_REFUSED = "query-refused"
    # The hospital's mapping of its columns to a study (site_agent.mapping).
    STUDY_MISMATCH = "study-mismatch"
    UNKNOWN_FEATURE = "unknown-feature"
    FEATURE_UNMAPPED = "feature-unmapped"
    DUPLICATE_MAPPING = "duplicate-mapping"
    UNKNOWN_LEVEL = "unknown-level"
    LEVEL_UNMAPPED = "level-unmapped"
    UNMAPPED_CODE = "unmapped-code"
    WRONG_UNIT = "wrong-unit"


# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------


class SchemaError(ValueError):
    """A schema file is invalid; ``problems`` lists every problem found in it."""

    def __init__(self, problems: Sequence[str], *, source: str = "schema") -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class ColumnSpec:
    """One declared feature column: its type and optional plausibility limits."""

    name: str
    type: _ColumnType
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The column as it appears in a schema file (limits only when declared)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


def _is_number(value: object) -> bool:
    # bool is an int subclass: "min": true is a typo, not a limit.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(
    obj: Mapping[str, Any],
    *,
    where: str,
    required: Sequence[str],
    optional: Sequence[str],
    problems: list[str],
) -> None:
    allowed = ", ".join((*required, *optional))
    for key in sorted(set(obj) - set(required) - set(optional)):
        problems.append(f"{where}: unknown key {key!r} (allowed: {allowed})")
    for key in required:
        if key not in obj:
            problems.append(f"{where}: missing required key {key!r}")


def _parse_columns(raw: object, problems: list[str]) -> list[ColumnSpec]:
    if not isinstance(raw, list):
        problems.append("'columns' must be a list of column objects")
        return []
    columns: list[ColumnSpec] = []
    seen: set[str] = set()
    for i, col in enumerate(raw):
        where = f"columns[{i}]"
        if not isinstance(col, dict):
            problems.append(f"{where}: must be an object with 'name' and 'type'")
            continue
        _check_keys(col, where=where, required=("name", "type"), optional=("min", "max"),
                    problems=problems)
        name = col.get("name")
        ok = True
        if "name" in col and (not isinstance(name, str) or not name):
            problems.append(f"{where}: 'name' must be a non-empty string")
            ok = False
        elif isinstance(name, str):
            where = f"column {name!r}"
            if name in seen:
                problems.append(f"{where}: declared more than once")
                ok = False
            seen.add(name)
        ctype = col.get("type")
        if "type" in col and ctype not in _COLUMN_TYPES:
            problems.append(f"{where}: 'type' must be one of {', '.join(_COLUMN_TYPES)}")
            ok = False
        limits: dict[str, float | None] = {}
        for key in ("min", "max"):
            value = col.get(key)
            if value is None:
                limits[key] = None
            elif not _is_number(value) or not math.isfinite(float(value)):
                problems.append(f"{where}: {key!r} must be a finite number")
                ok = False
            else:
                limits[key] = float(value)
        lo, hi = limits.get("min"), limits.get("max")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{where}: 'min' is greater than 'max'")
            ok = False
        if ok and isinstance(name, str) and ctype in _COLUMN_TYPES:
            columns.append(ColumnSpec(name=name, type="int" if ctype == "int" else "float",
                                      min=lo, max=hi))
    return columns


def _parse_label(
    raw: object, spec: TaskSpec | None, problems: list[str]
) -> tuple[str, tuple[int, ...]]:
    if not isinstance(raw, dict):
        problems.append("'label' must be an object with 'name' and 'values'")
        return "", ()
    _check_keys(raw, where="label", required=("name", "values"), optional=(), problems=problems)
    name = raw.get("name")
    if "name" in raw and not isinstance(name, str):
        problems.append("label: 'name' must be a string")
    elif isinstance(name, str) and spec is not None and name != spec.label_column:
        problems.append(f"label: name must be {spec.label_column!r} for task {spec.name!r}")
    values = raw.get("values")
    out: list[int] = []
    if "values" in raw:
        if not isinstance(values, list) or not values or not all(_is_int(v) for v in values):
            problems.append("label: 'values' must be a non-empty list of whole numbers")
        else:
            if len(set(values)) != len(values):
                problems.append("label: 'values' lists a class more than once")
            if spec is not None:
                bad = sorted({v for v in values if not 0 <= v < spec.n_classes})
                if bad:
                    problems.append(f"label: task {spec.name!r} has classes 0 to "
                                    f"{spec.n_classes - 1}; not a class: {bad}")
            out = sorted(set(values))
    return name if isinstance(name, str) else "", tuple(out)


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not allowed in a schema file")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


@dataclass(frozen=True)
class DataSchema:
    """What a site declares about its CSV file for one task.

    ``columns`` are kept in the task's feature order, whatever order the file declared
    them in, so that two schemas that say the same thing have the same hash.

    Attributes:
        task: Name of the registry task the data is for.
        label_name: Name of the label column (the task's label column).
        label_values: Sorted class numbers the site declares its labels take.
        columns: Feature columns, in the task's feature order.
        version: Schema file format version.
    """

    task: str
    label_name: str
    label_values: tuple[int, ...]
    columns: tuple[ColumnSpec, ...]
    version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: object, *, source: str = "schema") -> DataSchema:
        """Validate a parsed schema document.

        Args:
            data: The parsed JSON document.
            source: How to name the document in error messages (e.g. its path).

        Returns:
            The validated schema.

        Raises:
            SchemaError: Listing every problem found, not only the first.
        """
        problems: list[str] = []
        if not isinstance(data, dict):
            raise SchemaError(["the schema must be a JSON object"], source=source)
        _check_keys(data, where="schema", required=("version", "task", "label", "columns"),
                    optional=(), problems=problems)
        version = data.get("version")
        if "version" in data and (not _is_int(version) or version != SCHEMA_VERSION):
            problems.append(f"'version' must be {SCHEMA_VERSION}")
        task = data.get("task")
        spec: TaskSpec | None = None
        if "task" in data:
            if not isinstance(task, str):
                problems.append("'task' must be a string")
            elif task not in TASKS:
                problems.append(f"task {task!r} is not in the registry (known: "
                                f"{', '.join(sorted(TASKS))})")
            else:
                spec = TASKS[task]
        label_name = ""
        label_values: tuple[int, ...] = ()
        if "label" in data:
            label_name, label_values = _parse_label(data["label"], spec, problems)
        columns: list[ColumnSpec] = []
        if "columns" in data:
            columns = _parse_columns(data["columns"], problems)
            if spec is not None and isinstance(data["columns"], list):
                declared = {c.get("name") for c in data["columns"] if isinstance(c, dict)}
                missing = [c for c in spec.feature_columns if c not in declared]
                extra = sorted(repr(c) for c in declared - set(spec.feature_columns)
                               if isinstance(c, str))
                if missing:
                    problems.append(f"columns: task {spec.name!r} needs these columns, which "
                                    f"are not declared: {', '.join(missing)}")
                if extra:
                    problems.append(f"columns: task {spec.name!r} has no column(s) named "
                                    f"{', '.join(extra)}; declare exactly the task's columns")
                if spec.label_column in declared:
                    problems.append(f"columns: the label {spec.label_column!r} belongs in "
                                    f"'label', not in 'columns'")
        if problems:
            raise SchemaError(problems, source=source)
        assert spec is not None  # every path that leaves spec unset added a problem
        order = {name: i for i, name in enumerate(spec.feature_columns)}
        return cls(task=spec.name, label_name=label_name, label_values=label_values,
                   columns=tuple(sorted(columns, key=lambda c: order[c.name])))

    @classmethod
    def load(cls, path: Path) -> DataSchema:
        """Read and validate a schema file.

        Args:
            path: The JSON schema file.

        Returns:
            The validated schema.

        Raises:
            SchemaError: Listing every problem of the file (or why it cannot be read).
        """
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SchemaError(["file not found; write the schema file or fix the path"],
                              source=source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SchemaError([f"cannot read the file ({type(exc).__name__})"],
                              source=source) from None
        try:
            data = json.loads(text, parse_constant=_reject_constant,
                              object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise SchemaError([f"not valid JSON: {exc}"], source=source) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def for_task(cls, task_name: str) -> DataSchema:
        """The default schema of a registry task, with plausibility limits.

        Breast cancer features get [0, 2 x the published maximum]; digit pixels are whole
        numbers from 0 to 16.

        Args:
            task_name: A task in :data:`fedward.tasks.TASKS`.

        Returns:
            The schema a site with standard data can use as is.

        Raises:
            SchemaError: If the task is not in the registry.
        """
        if task_name not in TASKS:
            raise SchemaError([f"task {task_name!r} is not in the registry (known: "
                               f"{', '.join(sorted(TASKS))})"], source="for_task")
        spec = TASKS[task_name]
        columns: list[ColumnSpec] = []
        for name in spec.feature_columns:
            if name in BREAST_CANCER_RANGES:
                columns.append(ColumnSpec(name=name, type="float", min=0.0,
                                          max=2.0 * BREAST_CANCER_RANGES[name][1]))
            elif task_name == "digits_cnn":
                columns.append(ColumnSpec(name=name, type="int", min=0.0,
                                          max=float(_DIGITS_PIXEL_MAX)))
            else:  # a future task without published ranges: type only
                columns.append(ColumnSpec(name=name, type="float"))
        return cls(task=task_name, label_name=spec.label_column,
                   label_values=tuple(range(spec.n_classes)), columns=tuple(columns))

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """Feature column names in the task's order (the order of the model's inputs)."""
        return tuple(c.name for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        """The schema as a JSON-ready document (the schema file format)."""
        return {
            "version": self.version,
            "task": self.task,
            "label": {"name": self.label_name, "values": list(self.label_values)},
            "columns": [c.to_dict() for c in self.columns],
        }

    def to_json(self) -> str:
        """The schema file text, indented for people to read and edit."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def schema_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the schema: sorted keys, no spaces."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                               allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_schema(path: Path) -> DataSchema:
    """Read and validate a schema file (same as :meth:`DataSchema.load`).

    Args:
        path: The JSON schema file.

    Returns:
        The validated schema.

    Raises:
        SchemaError: Listing every problem of the file.
    """
    return DataSchema.load(path)


# ---------------------------------------------------------------------------------------
# Data check
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataProblem:
    """One problem (or warning) found in a site's CSV file.

    Attributes:
        kind: What is wrong (a :class:`ProblemKind` value).
        column: The column concerned, or None for a problem of the whole file.
        message: What is wrong and what to fix; never contains a cell value.
        rows: Up to five file line numbers where it happens (the header is line 1).
        count: How many rows (or cells) are affected; 1 for a file or header problem.
    """

    kind: ProblemKind
    column: str | None
    message: str
    rows: list[int] = field(default_factory=list)
    count: int = 1


@dataclass(frozen=True)
class DataReport:
    """Everything :func:`check_data` found; stays at the site.

    Attributes:
        problems: Problems that stop the data from being used.
        warnings: Things worth knowing that do not stop it (e.g. extra columns).
        n_rows: Number of data rows read (blank lines not counted).
        declared_columns: Feature and label column names of the schema (safe to share).
    """

    problems: list[DataProblem]
    warnings: list[DataProblem]
    n_rows: int
    declared_columns: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        """Whether the file can be used for training."""
        return not self.problems

    def summary_for_coordinator(self) -> dict[str, Any]:
        """The part of the report that may leave the site.

        Kinds, counts and declared column names only: no cell value, no row number, and no
        name read from the file's header (a header-less file puts data there).

        Returns:
            ``{"ok": bool, "n_rows": int, "problems": [{"kind", "count", "columns"}],
            "warnings": [{"kind", "count"}]}``, one problem entry per kind, where
            ``count`` is the number of problems of that kind.
        """
        by_kind: dict[str, list[DataProblem]] = {}
        for p in self.problems:
            by_kind.setdefault(str(p.kind), []).append(p)
        problems = [
            {
                "kind": kind,
                "count": len(items),
                "columns": sorted({p.column for p in items
                                   if p.column is not None and p.column in self.declared_columns}),
            }
            for kind, items in sorted(by_kind.items())
        ]
        warnings = Counter(str(w.kind) for w in self.warnings)
        return {
            "ok": self.ok,
            "n_rows": self.n_rows,
            "problems": problems,
            "warnings": [{"kind": k, "count": n} for k, n in sorted(warnings.items())],
        }


class DataCheckError(Exception):
    """The site's data failed its check; ``report`` holds every problem.

    Its text is for the site's staff: it names columns and rows. Send
    ``report.summary_for_coordinator()`` to the coordinator, never ``str(error)``.
    """

    def __init__(self, report: DataReport) -> None:
        self.report = report
        lines = "\n".join(f"  - {p.kind}: {p.message}" for p in report.problems)
        super().__init__(f"the data file has {len(report.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class _Scan:
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


def _parse_cell(cell_value: object, ctype: _ColumnType) -> tuple[ProblemKind | None, float]:
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


def _parse_typed(value: object, ctype: _ColumnType) -> tuple[ProblemKind | None, float]:
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


def _file_problem(kind: ProblemKind, message: str) -> _Scan:
    report = DataReport(problems=[DataProblem(kind=kind, column=None, message=message)],
                        warnings=[], n_rows=0)
    return _Scan(report=report, content=b"", x=np.empty((0, 0), np.float32),
                 y=np.empty(0, np.int64))


@dataclass
class Table:
    """A table a connector read, before any check: what :func:`scan_table` checks.

    Attributes:
        source: How messages name where it came from (a path, "the query"); never a
            password or a cell value.
        header: The column names, as the source spells them.
        rows: (number people find the row by, its cells) per data row, read once; cells
            are CSV text or typed values (None for a missing one). The iterator may raise
            :class:`TableReadError` when the rest cannot be read.
        content: The bytes the data fingerprint digests (a file's bytes, or a canonical
            serialisation of a query's rows).
        row_word: What the row numbers are ("line" of a file, "row" of a table).
        noun: What the source is in messages ("file", "table", "query result").
    """

    source: str
    header: list[str]
    rows: Iterable[tuple[int, Sequence[object]]]
    content: bytes
    row_word: str = "row"
    noun: str = "table"
    header_where: str = ""

    def where_header(self) -> str:
        """Where the header is, for messages."""
        return self.header_where or f"the columns of {self.source}"


class TableReadError(Exception):
    """A table's rows cannot be read on from some point; ``problem`` says why."""

    def __init__(self, problem: DataProblem) -> None:
        self.problem = problem
        super().__init__(problem.message)


def _csv_rows(reader: Any) -> Iterator[tuple[int, Sequence[object]]]:
    """The data rows of a CSV reader, blank lines skipped, a CSV error as TableReadError."""
    try:
        for record in reader:
            if not record or all(not c.strip() for c in record):
                continue  # blank line
            yield reader.line_num, record
    except csv.Error as exc:
        raise TableReadError(DataProblem(
            kind=ProblemKind.MALFORMED_CSV, column=None, rows=[reader.line_num],
            message=f"the file is not valid CSV from line {reader.line_num} on ({exc}); the "
                    f"rest was not checked; export it again as CSV")) from None


def _scan(csv_path: Path, schema: DataSchema) -> _Scan:
    """Read the file once, check everything, and parse the arrays if it is clean."""
    try:
        table = read_csv_table(csv_path)
    except TableReadError as exc:
        return _file_problem(exc.problem.kind, exc.problem.message)
    return _scan_table(table, schema)


def _file_error(kind: ProblemKind, message: str) -> TableReadError:
    return TableReadError(DataProblem(kind=kind, column=None, message=message))


def read_csv_table(csv_path: Path) -> Table:
    """Open a CSV file as a :class:`Table` (text cells, file line numbers).

    Args:
        csv_path: The file.

    Returns:
        The table; its rows are read as they are iterated.

    Raises:
        TableReadError: The file is missing, unreadable, not UTF-8, empty or has no valid
            header line (the problem says which and what to do).
    """
    path = Path(csv_path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise _file_error(ProblemKind.FILE_MISSING,
                          f"data file {path} does not exist; check the configured path"
                          ) from None
    except IsADirectoryError:
        raise _file_error(ProblemKind.FILE_UNREADABLE,
                          f"data file {path} is a directory; point the site at the CSV file"
                          ) from None
    except OSError as exc:
        raise _file_error(ProblemKind.FILE_UNREADABLE,
                          f"data file {path} cannot be read ({exc.strerror or exc}); give "
                          f"the site agent's user read permission on it") from None
    if not content.strip():
        raise _file_error(ProblemKind.FILE_EMPTY,
                          f"data file {path} is empty; export the data again with a "
                          f"header line and one line per case")
    try:
        # utf-8-sig: spreadsheet programs often start a UTF-8 file with a byte-order mark.
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise _file_error(ProblemKind.NOT_UTF8,
                          f"data file {path} is not UTF-8 text (first bad byte on line "
                          f"{line}); save or export it as CSV UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        while not header:  # leading blank lines
            header = next(reader)
    except StopIteration:
        raise _file_error(ProblemKind.FILE_EMPTY,
                          f"data file {path} has no header line") from None
    except csv.Error as exc:
        raise _file_error(ProblemKind.MALFORMED_CSV,
                          f"data file {path} is not valid CSV on line {reader.line_num} "
                          f"({exc}); export it again as CSV") from None
    return Table(source=str(path), header=[h.strip() for h in header],
                 rows=_csv_rows(reader), content=content, row_word="line", noun="file",
                 header_where=f"the first line of {path}")


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


def _scan_table(table: Table, schema: DataSchema) -> _Scan:
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
        return _Scan(report=report, content=content,
                     x=np.empty((0, len(features)), np.float32), y=np.empty(0, np.int64))
    return _Scan(report=report, content=content,
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


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def keyed_fingerprint(key: bytes, content: bytes) -> str:
    """HMAC-SHA256 (hex) of a data file's bytes under the site's fingerprint key.

    Unlike a plain SHA-256, nobody without the key can confirm a guess of the file, and two
    sites holding the same file send different fingerprints. Anyone given the key recomputes
    it with standard tools: ``openssl dgst -sha256 -mac HMAC -macopt hexkey:KEY FILE``.

    Args:
        key: The site's fingerprint key (``site_agent.keys.ensure_fingerprint_key``).
        content: The file's bytes.

    Returns:
        64 lowercase hex characters.
    """
    if len(key) < 16:
        raise ValueError("a fingerprint key has at least 16 bytes")
    return hmac.new(key, content, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class DataFingerprint:
    """What the coordinator may learn about a site's data: hashes and counts, no values.

    Per-class counts are deliberately left out: they reveal the site's case mix.

    Attributes:
        schema_hash: :attr:`DataSchema.schema_hash` of the schema used.
        n_rows: Data rows in the file.
        n_train: Rows used for training.
        n_test: Rows held out for local evaluation.
        content_sha256: SHA-256 (hex) of the file's bytes. It stays at the site: anyone
            with a copy of a candidate file could confirm it.
        content_hmac: :func:`keyed_fingerprint` of the file under the site's key, what may
            leave the site; None when no key was given.
        connector: The kind of connector that read the data (``csv``, ``parquet``,
            ``sql``...): it names how, never what. Shown at the site; the wire's fingerprint
            (:meth:`to_dict`, ``fedward.wire.FINGERPRINT_KEYS``) holds hashes and counts only.
    """

    schema_hash: str
    n_rows: int
    n_train: int
    n_test: int
    content_sha256: str
    content_hmac: str | None = None
    connector: str = "csv"

    def to_dict(self) -> dict[str, str | int | None]:
        """The fingerprint as a JSON-ready dict."""
        return {
            "schema_hash": self.schema_hash,
            "n_rows": self.n_rows,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "content_sha256": self.content_sha256,
            "content_hmac": self.content_hmac,
        }


@dataclass(frozen=True)
class SiteData:
    """A site's checked data, split for local training and held-out evaluation.

    Attributes:
        train_x: float32 features, shape (n_train, n_features), in the task's column order.
        train_y: int64 class labels, shape (n_train,).
        test_x: float32 held-out features.
        test_y: int64 held-out labels.
        fingerprint: Hashes and counts that may be sent to the coordinator.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    fingerprint: DataFingerprint


def _read_checked(csv_path: Path, schema: DataSchema) -> _Scan:
    """Check and parse a file; raise :class:`DataCheckError` unless it is clean."""
    scan = _scan(csv_path, schema)
    if not scan.report.ok:
        raise DataCheckError(scan.report)
    return scan


def load_site_data(
    *,
    csv_path: Path,
    schema: DataSchema,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    fingerprint_key: bytes | None = None,
) -> SiteData:
    """Check a site's CSV file and load it as train and held-out arrays.

    The split is deterministic for a seed, and stratified by class when every class has at
    least two rows (and both parts can hold one of each class).

    Args:
        csv_path: The site's CSV file.
        schema: The schema the site declared for it.
        holdout_fraction: Share of rows held out for local evaluation, in (0, 1).
        seed: Seed of the split.
        fingerprint_key: The site's fingerprint key; without it the fingerprint has no
            ``content_hmac`` and no digest of the file may leave the site.

    Returns:
        The arrays and the data fingerprint.

    Raises:
        ValueError: If ``holdout_fraction`` is not strictly between 0 and 1.
        DataCheckError: If the check finds any problem (all of them are in its report).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    scan = _read_checked(csv_path, schema)
    return split_site_data(x=scan.x, y=scan.y, n_rows=scan.report.n_rows,
                           content=scan.content, schema_hash=schema.schema_hash,
                           holdout_fraction=holdout_fraction, seed=seed,
                           fingerprint_key=fingerprint_key)


def split_site_data(
    *,
    x: np.ndarray,
    y: np.ndarray,
    n_rows: int,
    content: bytes,
    schema_hash: str,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    fingerprint_key: bytes | None = None,
    connector: str = "csv",
) -> SiteData:
    """Split checked arrays into train and held-out parts and fingerprint them.

    The split is deterministic for a seed, and stratified by class when every class has at
    least two rows (and both parts can hold one of each class). Every connector and the
    study mapping end here, so every source splits and fingerprints the same way.

    Args:
        x: float32 features of the rows that passed the check.
        y: int64 labels of those rows.
        n_rows: Data rows read (the fingerprint's ``n_rows``).
        content: The bytes the fingerprint digests (:attr:`Table.content`).
        schema_hash: The hash of what the data was checked against.
        holdout_fraction: Share of rows held out for local evaluation, in (0, 1).
        seed: Seed of the split.
        fingerprint_key: The site's fingerprint key; without it no keyed digest is made.
        connector: The connector's kind, named in the fingerprint.

    Returns:
        The arrays and the data fingerprint.

    Raises:
        ValueError: If ``holdout_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    n = len(y)
    n_test = math.ceil(holdout_fraction * n)
    classes, counts = np.unique(y, return_counts=True)
    stratify = (
        y
        if counts.min() >= 2 and n_test >= len(classes) and n - n_test >= len(classes)
        else None
    )
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=n_test, random_state=seed, shuffle=True, stratify=stratify
    )
    fingerprint = DataFingerprint(
        schema_hash=schema_hash,
        n_rows=n_rows,
        n_train=len(train_y),
        n_test=len(test_y),
        content_sha256=hashlib.sha256(content).hexdigest(),
        content_hmac=(None if fingerprint_key is None
                      else keyed_fingerprint(fingerprint_key, content)),
        connector=connector,
    )
    return SiteData(
        train_x=np.ascontiguousarray(train_x, dtype=np.float32),
        train_y=np.ascontiguousarray(train_y, dtype=np.int64),
        test_x=np.ascontiguousarray(test_x, dtype=np.float32),
        test_y=np.ascontiguousarray(test_y, dtype=np.int64),
        fingerprint=fingerprint,
    )
