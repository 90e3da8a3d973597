"""The connector interface: where a site's rows come from, checked and loaded the same way.

A connector reads one table from a source (a file, a database query) and hands it over as
a :class:`site_agent.data_table.Table`: the header as the source spells it, and rows with the
number people find them by. Everything after that is shared: :meth:`Connector.check`
reports every problem at once (the schema check of :mod:`site_agent.data`, or the
hospital's study mapping of :mod:`site_agent.mapping`), :meth:`Connector.load` splits the
checked arrays, and the fingerprint names the connector's kind and digests the rows under
the site's key: it never holds a value, a path or a password.

A connector is built from its options, a pydantic model the connector declares
(:attr:`Connector.Options`), validated with every problem reported at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from site_agent.data import SiteData, split_site_data
from site_agent.data_check import scan_table
from site_agent.data_report import DataCheckError, DataProblem, DataReport, ProblemKind
from site_agent.data_schema import DataSchema
from site_agent.data_table import Table, TableReadError

__all__ = ["Connector", "ConnectorError", "ConnectorOptions", "source_problem"]


class ConnectorError(ValueError):
    """A connector's options are invalid or name no installed connector; ``problems``
    lists every one."""

    def __init__(self, problems: list[str], *, source: str = "data connector") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  - "
                         + "\n  - ".join(problems))


class ConnectorOptions(BaseModel):
    """Base of every connector's options (the ``data`` block of ``site.json`` without its
    ``connector`` key): unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def source_problem(kind: ProblemKind, message: str) -> TableReadError:
    """The error a connector raises when its source cannot be read at all."""
    return TableReadError(DataProblem(kind=kind, column=None, message=message))


class Connector(ABC):
    """One way of reading a site's table.

    Subclasses set :attr:`kind` (the name the site's configuration uses) and
    :attr:`Options`, and implement :meth:`read` and :meth:`describe`.

    Args:
        options: The validated options.
        root: The site's data directory; relative paths in the options are relative to it.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[ConnectorOptions]]

    def __init__(self, options: ConnectorOptions, *, root: Path) -> None:
        self.options = options
        self.root = root

    def resolve(self, value: str) -> Path:
        """A path from the options, made absolute against the site's data directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    @abstractmethod
    def read(self) -> Table:
        """Open the source and return its table.

        Raises:
            TableReadError: The source cannot be read at all (missing, unreachable,
                refused); its problem says what to do.
        """

    @abstractmethod
    def describe(self) -> str:
        """Where the data comes from, for the site's own logs and screens: a path or a
        database address, never a password or a value."""

    @property
    def data_dir(self) -> Path:
        """The folder whose paths may appear in this connector's messages (the data
        file's folder; the site directory for a database)."""
        return self.root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    # -- shared behaviour ----------------------------------------------------------------

    def check(self, schema: DataSchema) -> DataReport:
        """Check the source against a schema; every problem at once.

        Args:
            schema: The schema the site declared.

        Returns:
            The report (``report.ok`` says whether the data can be used).
        """
        try:
            table = self.read()
        except TableReadError as exc:
            return DataReport(problems=[exc.problem], warnings=[], n_rows=0)
        report, _x, _y = scan_table(table, schema)
        return report

    def load(self, schema: DataSchema, *, holdout_fraction: float = 0.25, seed: int = 0,
             fingerprint_key: bytes | None = None) -> SiteData:
        """Check the source and load it as train and held-out arrays.

        Args:
            schema: The schema the site declared.
            holdout_fraction: Share of rows held out for local evaluation, in (0, 1).
            seed: Seed of the split.
            fingerprint_key: The site's fingerprint key (keyed digest of the rows).

        Returns:
            The arrays and the fingerprint (naming this connector's kind).

        Raises:
            ValueError: If ``holdout_fraction`` is not strictly between 0 and 1.
            DataCheckError: Listing every problem, if there is any.
        """
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be between 0 and 1, got "
                             f"{holdout_fraction}")
        try:
            table = self.read()
        except TableReadError as exc:
            raise DataCheckError(DataReport(problems=[exc.problem], warnings=[],
                                            n_rows=0)) from None
        report, x, y = scan_table(table, schema)
        if not report.ok:
            raise DataCheckError(report)
        return split_site_data(x=x, y=y, n_rows=report.n_rows, content=table.content,
                               schema_hash=schema.schema_hash,
                               holdout_fraction=holdout_fraction, seed=seed,
                               fingerprint_key=fingerprint_key, connector=self.kind)
