"""The recent rows of a drift check: where they come from and how they become model inputs.

The drift settings name the recent data (:class:`site_agent.drift_policy.DriftSchedule`) as a
CSV file, a folder of CSV files, or a data connector block written exactly as the site's
training ``data`` block (:mod:`site_agent.connectors`: a Parquet file, a read-only SQL
query, a plugin). :func:`recent_data` opens them as connectors; :func:`read_recent` reads
every one of them the way the site's training data is read: through the site's schema
(:func:`site_agent.data_check.scan_table`), or, at a site that trains a study, through the
hospital's mapping to it (:func:`site_agent.mapping_apply.check_mapping` then
:func:`~site_agent.mapping_apply.encode`: local codes and units become the study's values).

Unlike training data, recent rows may carry no label (the outcome has not arrived yet), or
one class only: they are then checked for input drift only. Every other problem fails the
check (:class:`site_agent.drift.DriftCheckError`) with its kind and a reason written for the
site: the source named as :meth:`Connector.describe` names it (a path, or a database with
its password masked), never a value of the data; the connector's kind (:attr:`RecentData.
kind`) is what outputs name the source by.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from site_agent.connectors import Connector, ConnectorError, open_connector
from site_agent.data_check import MIN_ROWS, scan_table
from site_agent.data_report import DataCheckError, DataProblem, DataReport, ProblemKind
from site_agent.data_schema import DataSchema
from site_agent.data_table import Table, TableReadError
from site_agent.drift_errors import DriftCheckError
from site_agent.mapping import Binding

__all__ = ["RecentData", "read_recent", "recent_data"]

# A problem of these kinds means there were no rows to check (not rows that are wrong).
_EMPTY = frozenset({ProblemKind.TOO_FEW_ROWS, ProblemKind.FILE_EMPTY})


@dataclass(frozen=True)
class RecentData:
    """The recent rows to check, opened (nothing read yet).

    Attributes:
        connectors: One per source (a folder of CSV files: one per file).
        schema: The site's schema (a site that trains a schema's task).
        binding: The study and the hospital's mapping (a site that trains a study).
    """

    connectors: tuple[Connector, ...]
    schema: DataSchema | None = None
    binding: Binding | None = None

    @property
    def kind(self) -> str:
        """The connector's kind (``csv``, ``parquet``, ``sql``...): how outputs name the
        source, never by its path, its query or its password."""
        return self.connectors[0].kind

    @property
    def columns(self) -> list[str]:
        """The model input columns of the rows :func:`read_recent` returns, in order."""
        if self.binding is not None:
            return [name for name, _lo, _hi in self.binding.study.input_columns()]
        assert self.schema is not None
        return list(self.schema.feature_columns)


def recent_data(source: str | Path | Mapping[str, Any], *, root: Path,
                schema: DataSchema | None = None,
                binding: Binding | None = None) -> RecentData:
    """Open the recent data the drift settings name.

    Args:
        source: A CSV file or a folder of them (relative to ``root``), or a connector block.
        root: The site's data directory.
        schema: The site's schema; or
        binding: the site's study and mapping.

    Returns:
        The opened sources.

    Raises:
        DriftCheckError: ``data-empty`` for a folder without CSV files, ``data-unreadable``
            for a path that does not exist or an invalid connector block.
    """
    assert (schema is None) != (binding is None)
    if isinstance(source, Mapping):
        try:
            connector = open_connector(source, root=root, source="drift 'data'")
        except ConnectorError as err:
            raise DriftCheckError("data-unreadable", str(err)) from None
        return RecentData(connectors=(connector,), schema=schema, binding=binding)
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        files = sorted(p for p in path.glob("*.csv") if p.is_file())
        if not files:
            raise DriftCheckError("data-empty", f"the folder {path} holds no .csv file of "
                                  "recent rows; put the new rows there as CSV in the site's "
                                  "schema")
    elif not path.exists():
        raise DriftCheckError("data-unreadable", f"the recent data {path} does not exist")
    else:
        files = [path]
    connectors = tuple(open_connector({"connector": "csv", "path": str(f)}, root=root)
                       for f in files)
    return RecentData(connectors=connectors, schema=schema, binding=binding)


def read_recent(data: RecentData) -> tuple[np.ndarray, np.ndarray | None]:
    """Every recent row as the model's input (:attr:`RecentData.columns`) and its labels.

    Returns:
        ``(x, y)``: float32 inputs and int64 labels; ``y`` None when any source has no
        label column, or holds one class only (input drift only).

    Raises:
        DriftCheckError: ``data-empty`` (no rows, too few rows) or ``data-unreadable`` (a
            source that cannot be read or reached, a query refused, a missing column, bad
            cells), with every problem of the source.
    """
    parts = []
    for connector in data.connectors:
        try:
            parts.append(_mapped(data.binding, connector) if data.binding is not None
                         else _checked(data.schema, connector))
        except DataCheckError as err:
            kinds = {p.kind for p in err.report.problems}
            raise DriftCheckError("data-empty" if kinds & _EMPTY else "data-unreadable",
                                  f"the recent data ({connector.describe()}) fails the "
                                  f"site's data check: {err}") from None
    x = np.concatenate([p[0] for p in parts])
    labels = [p[1] for p in parts]
    y = None if any(lab is None for lab in labels) else np.concatenate(
        [lab for lab in labels if lab is not None])
    return x, y


def _failed(problem: DataProblem) -> DataCheckError:
    return DataCheckError(DataReport(problems=[problem], warnings=[], n_rows=0))


def _checked(schema: DataSchema | None, connector: Connector
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """One source through the site's schema check (its labels None: see the module
    docstring)."""
    assert schema is not None
    try:
        table = connector.read()
        rows = list(table.rows)
    except TableReadError as exc:
        raise _failed(exc.problem) from None
    label_at = table.header.index(schema.label_name) \
        if schema.label_name in table.header else None
    report, x, y = scan_table(dataclasses.replace(table, rows=rows), schema)
    labelled = label_at is not None
    if labelled and {p.kind for p in report.problems} == {ProblemKind.SINGLE_CLASS}:
        labelled = False
    if not labelled:
        report, x, y = scan_table(_relabelled(table, rows, schema, label_at), schema)
    if not report.ok:
        raise DataCheckError(report)
    return x, y if labelled else None


def _relabelled(table: Table, rows: list[tuple[int, Any]], schema: DataSchema,
                label_at: int | None) -> Table:
    """The table with classes that take turns in its label column (added when absent): the
    schema check needs labels of more than one class, the drift check then uses none."""
    labels = [str(v) for v in schema.label_values]
    width = len(table.header)
    header = table.header if label_at is not None else [*table.header, schema.label_name]
    out: list[tuple[int, list[object]]] = []
    for i, (n, cells) in enumerate(rows):
        row = list(cells)
        if len(row) == width:  # a ragged row stays ragged: the check reports it
            if label_at is None:
                row.append(labels[i % len(labels)])
            else:
                row[label_at] = labels[i % len(labels)]
        out.append((n, row))
    return dataclasses.replace(table, header=header, rows=out)


def _mapped(binding: Binding, connector: Connector) -> tuple[np.ndarray, np.ndarray | None]:
    """One source through the hospital's mapping to the study, encoded as the model's
    input (:func:`site_agent.mapping_apply.encode`, as for training)."""
    from site_agent.mapping_apply import check_mapping, encode

    mapped = check_mapping(binding, connector)
    label = binding.study.label.name

    def unlabelled(p: DataProblem) -> bool:
        return (p.kind == ProblemKind.MISSING_COLUMN and p.column == label) \
            or p.kind == ProblemKind.SINGLE_CLASS

    problems = [p for p in mapped.report.problems if not unlabelled(p)]
    if problems:
        raise DataCheckError(dataclasses.replace(
            mapped.report, problems=[_without_codes(p) for p in problems]))
    labelled = not mapped.report.problems   # none was a missing or single-class label
    if not labelled:   # every row is kept for its inputs, whatever its label
        mapped = dataclasses.replace(mapped, labels=np.zeros(len(mapped.labels), np.int64))
    x, y, _dropped = encode(binding.study, mapped)
    if len(y) < MIN_ROWS:
        raise _failed(DataProblem(
            kind=ProblemKind.TOO_FEW_ROWS, column=None, count=len(y),
            message=f"{len(y)} row(s) are left after the study's missing-value rules; at "
                    f"least {MIN_ROWS} are needed"))
    return x, y if labelled else None


def _without_codes(problem: DataProblem) -> DataProblem:
    """A problem of the mapping check whose message quotes local codes (unmapped codes) says
    where and how often instead: the drift check's reason goes to the site's logs and audit
    log, where no value of the data belongs."""
    if problem.kind != ProblemKind.UNMAPPED_CODE:
        return problem
    rows = ", ".join(str(r) for r in problem.rows)
    return dataclasses.replace(problem, message=(
        f"{problem.column!r}: {problem.count} row(s) (e.g. rows {rows}) hold a code the "
        "mapping does not map; `fedward-site mapping check` lists the codes: add them to "
        "the mapping"))
