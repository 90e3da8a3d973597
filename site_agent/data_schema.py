"""The schema a site declares for its data: columns, types, plausible ranges, the label.

A schema file is checked whole: :class:`SchemaError` lists every problem of it at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedward.tasks import BREAST_CANCER_RANGES, TASKS, TaskSpec

__all__ = [
    "SCHEMA_VERSION",
    "ColumnSpec",
    "ColumnType",
    "DataSchema",
    "SchemaError",
    "load_schema",
]


SCHEMA_VERSION = 1

ColumnType = Literal["float", "int"]
_COLUMN_TYPES: tuple[str, ...] = ("float", "int")
_DIGITS_PIXEL_MAX = 16


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
    type: ColumnType
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
