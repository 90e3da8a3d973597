"""File connectors: CSV (the site's original data path) and Parquet (pyarrow).

CSV goes through :func:`site_agent.data_check.check_data` and
:func:`site_agent.data.load_site_data` unchanged, so a site that moved to connectors gets
exactly the report, the arrays and the fingerprint it got before. Parquet keeps the file's
column types: a number column holds numbers, a null is a missing value, and rows are
numbered from 1 (the first data row).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import Field

from site_agent.connectors.base import Connector, ConnectorOptions, source_problem
from site_agent.data import SiteData, load_site_data
from site_agent.data_check import check_data
from site_agent.data_report import DataReport, ProblemKind
from site_agent.data_schema import DataSchema
from site_agent.data_table import Table, read_csv_table

__all__ = ["CsvConnector", "FileOptions", "ParquetConnector"]


class FileOptions(ConnectorOptions):
    """A data file: ``path``, relative to the site's data directory or absolute."""

    path: str = Field(min_length=1, description="the data file")


class _FileConnector(Connector):
    Options = FileOptions
    options: FileOptions

    @property
    def path(self) -> Path:
        """The data file, absolute."""
        return self.resolve(self.options.path)

    @property
    def data_dir(self) -> Path:
        return self.path.parent

    def describe(self) -> str:
        return f"{self.kind} file {self.path}"


class CsvConnector(_FileConnector):
    """A CSV file with a header line (UTF-8, any column order)."""

    kind = "csv"

    def read(self) -> Table:
        return read_csv_table(self.path)

    def check(self, schema: DataSchema) -> DataReport:
        return check_data(csv_path=self.path, schema=schema)

    def load(self, schema: DataSchema, *, holdout_fraction: float = 0.25, seed: int = 0,
             fingerprint_key: bytes | None = None) -> SiteData:
        return load_site_data(csv_path=self.path, schema=schema,
                              holdout_fraction=holdout_fraction, seed=seed,
                              fingerprint_key=fingerprint_key)


class ParquetConnector(_FileConnector):
    """A Parquet file (one table; nested columns are read as values of the wrong type)."""

    kind = "parquet"

    def read(self) -> Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            raise source_problem(ProblemKind.FILE_MISSING,
                                 f"data file {path} does not exist; check the configured "
                                 "path") from None
        except OSError as exc:
            raise source_problem(ProblemKind.FILE_UNREADABLE,
                                 f"data file {path} cannot be read ({exc.strerror or exc}); "
                                 "give the site agent's user read permission on it") from None
        try:
            table = pq.read_table(pa.BufferReader(content))
        except (pa.ArrowException, OSError) as exc:
            raise source_problem(ProblemKind.FILE_UNREADABLE,
                                 f"data file {path} is not a readable Parquet file "
                                 f"({type(exc).__name__}); export it again as Parquet"
                                 ) from None
        columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
        return Table(source=str(path), header=[str(n).strip() for n in table.column_names],
                     rows=_numbered(columns, table.num_rows), content=content,
                     row_word="row", noun="file")


def _numbered(columns: list[list[object]], n_rows: int
              ) -> Iterator[tuple[int, Sequence[object]]]:
    for i in range(n_rows):
        yield i + 1, [col[i] for col in columns]
