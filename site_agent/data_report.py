"""What the site's data check reports: problem kinds, problems, the report and its error.

This module runs only at the site. Problem messages (for the site's IT staff) name columns,
kinds and row numbers, never a cell value. :meth:`DataReport.summary_for_coordinator` is
one of the two things meant to cross the wire (with
:meth:`site_agent.data.DataFingerprint.to_dict`): kinds, counts and the column names of the
declared schema, never a value, a row number or a name read from the file's header (a
header-less file would turn its first row of data into "column names").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "DataCheckError",
    "DataProblem",
    "DataReport",
    "ProblemKind",
]


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
