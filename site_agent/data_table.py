"""A connector's table before any check, and the CSV reader that makes one.

Every data connector (:mod:`site_agent.connectors`: CSV, Parquet, SQL, plugins) hands a
:class:`Table` to :func:`site_agent.data_check.scan_table` (or, for the hospital's mapping
to a study, :mod:`site_agent.mapping`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from site_agent.data_report import DataProblem, ProblemKind

__all__ = [
    "Table",
    "TableReadError",
    "read_csv_table",
]


@dataclass
class Table:
    """A table a connector read, before any check (:func:`site_agent.data_check.scan_table`).

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
