"""A read-only SQL query over SQLAlchemy (PostgreSQL, SQLite).

Read-only is enforced three times, from the cheapest to the strongest:

1. the options accept one statement that reads (``SELECT``, ``WITH``, ``VALUES``,
   ``TABLE``; comments allowed, a second statement refused);
2. the connection is opened read-only where the backend allows it: PostgreSQL with
   ``default_transaction_read_only=on`` and a read-only transaction (so even a
   ``WITH ... DELETE ... RETURNING`` that passes 1 is refused by the server); SQLite
   through a ``mode=ro`` URI with ``PRAGMA query_only`` on;
3. the transaction is rolled back after the rows are read.

The database account should still be one that may only ``SELECT`` the tables it needs
(docs/operator-guide.md). The password (in the URL, or better in ``password_file`` or the
agent's environment variable ``password_env``) is never logged, shown or put in a message:
the options hold the URL as a secret, messages name the database with the password masked,
and any text from the driver is scrubbed of it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from site_agent.connectors.base import Connector, ConnectorOptions, source_problem
from site_agent.data_report import ProblemKind
from site_agent.data_table import Table

__all__ = ["SqlConnector", "SqlOptions", "reading_statement_problem"]

_BACKENDS = ("postgresql", "sqlite")
_READING = ("select", "with", "values", "table")
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


def reading_statement_problem(query: str) -> str | None:
    """Why ``query`` is not one statement that reads, or None when it is."""
    bare = _COMMENTS.sub(" ", query).strip()
    bare = bare.rstrip(";").strip()
    if not bare:
        return "the query is empty; write one SELECT statement"
    if ";" in _STRINGS.sub("''", bare):
        return "the query holds more than one statement; write exactly one SELECT"
    first = bare.split(None, 1)[0].lower().rstrip("(")
    if first not in _READING:
        return (f"the query starts with {first.upper()!r}; the SQL connector only reads: "
                "write one SELECT (or WITH ... SELECT) statement")
    return None


class SqlOptions(ConnectorOptions):
    """A read-only query.

    Attributes:
        url: SQLAlchemy URL, e.g. ``postgresql+psycopg2://reader@db.example:5432/ehr`` or
            ``sqlite:///extract.sqlite`` (a relative SQLite path is relative to the site's
            data directory). Keep the password out of it: use ``password_file`` or
            ``password_env``.
        password_file: A file (mode 0600) holding the database password on its first line.
        password_env: The name of an environment variable of the site agent holding the
            database password (e.g. set by the systemd unit); not with ``password_file``.
        query: One SELECT statement; its result columns are the table's header.
        timeout_s: Connection and statement time limit.
    """

    url: SecretStr
    password_file: str | None = Field(default=None, min_length=1)
    password_env: str | None = Field(default=None, pattern=_ENV_NAME)
    query: str = Field(min_length=1, max_length=100_000)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _known_backend(cls, value: SecretStr) -> SecretStr:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(value.get_secret_value()).get_backend_name()
        except ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql+psycopg2://user@host/db "
                             "or sqlite:///file.sqlite)") from None
        if backend not in _BACKENDS:
            raise ValueError(f"backend {backend!r} is not supported by the sql connector "
                             f"(supported: {', '.join(_BACKENDS)}); another database needs "
                             "a connector plugin (docs/operator-guide.md)")
        return value

    @field_validator("password_env")
    @classmethod
    def _one_password_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator (not a model validator): reported with every other problem.
        if value is not None and info.data.get("password_file") is not None:
            raise ValueError("give 'password_file' or 'password_env', not both")
        return value

    @field_validator("query")
    @classmethod
    def _reads(cls, value: str) -> str:
        problem = reading_statement_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class SqlConnector(Connector):
    """One read-only query's result as the site's table (rows numbered from 1)."""

    kind = "sql"
    Options = SqlOptions
    options: SqlOptions

    def _url(self) -> Any:
        from sqlalchemy.engine import make_url

        url = make_url(self.options.url.get_secret_value())
        if self.options.password_file is not None:
            path = self.resolve(self.options.password_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise source_problem(ProblemKind.SOURCE_UNREACHABLE,
                                     f"the password file {path} cannot be read "
                                     f"({type(exc).__name__}); give the site agent's user "
                                     "read permission on it") from None
            url = url.set(password=lines[0] if lines else "")
        elif self.options.password_env is not None:
            name = self.options.password_env
            password = os.environ.get(name)
            if password is None:
                raise source_problem(ProblemKind.SOURCE_UNREACHABLE,
                                     f"the environment variable {name} (password_env) is "
                                     "not set in the site agent's environment; set it where "
                                     "the agent is started (e.g. the systemd unit)")
            url = url.set(password=password)
        return url

    def _secrets(self) -> list[str]:
        try:
            password = self._url().password
        except Exception:  # an unreadable password file: nothing of it to scrub
            password = None
        return [s for s in (password, self.options.url.get_secret_value()) if s]

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def describe(self) -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.options.url.get_secret_value())
        return f"sql query on {url.render_as_string(hide_password=True)}"

    def engine(self) -> Any:
        """A SQLAlchemy engine whose connections are read-only (see the module docstring).

        Raises:
            TableReadError: A SQLite file that does not exist, or an unreadable password.
        """
        from sqlalchemy import create_engine, event
        from sqlalchemy.pool import NullPool

        url = self._url()
        timeout = self.options.timeout_s
        if url.get_backend_name() == "sqlite":
            database = url.database or ""
            if database in ("", ":memory:"):
                raise source_problem(ProblemKind.SOURCE_UNREACHABLE,
                                     "a SQLite URL must name a database file")
            path = self.resolve(database)
            if not path.is_file():
                raise source_problem(ProblemKind.SOURCE_UNREACHABLE,
                                     f"SQLite database {path} does not exist; check the URL")
            # mode=ro: SQLite itself refuses every write on this connection.
            engine = create_engine(f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true",
                                   poolclass=NullPool, connect_args={"timeout": timeout})

            @event.listens_for(engine, "connect")
            def _query_only(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.execute("PRAGMA query_only = ON")

            return engine
        ms = int(timeout * 1000)
        return create_engine(url, poolclass=NullPool, connect_args={
            "connect_timeout": max(1, int(timeout)),
            "options": f"-c default_transaction_read_only=on -c statement_timeout={ms}",
        }).execution_options(postgresql_readonly=True)

    def read(self) -> Table:
        from sqlalchemy.exc import DBAPIError, SQLAlchemyError

        engine = self.engine()
        try:
            try:
                connection = engine.connect()
            except SQLAlchemyError as exc:
                raise source_problem(
                    ProblemKind.SOURCE_UNREACHABLE,
                    f"cannot connect to {self.describe()} ({self._why(exc)}); check the "
                    "address, the account and that the database accepts this host"
                ) from None
            with connection:
                query = self.options.query
                if connection.dialect.paramstyle in ("format", "pyformat"):
                    # psycopg2 formats the statement with the (empty) parameters: a
                    # literal % (LIKE 'a%') must reach it as %%.
                    query = query.replace("%", "%%")
                try:
                    result = connection.exec_driver_sql(query)
                    names = result.keys()
                    header = [str(k).strip() for k in names]
                    rows = [tuple(r) for r in result.fetchall()]
                except DBAPIError as exc:
                    raise source_problem(ProblemKind.QUERY_REFUSED,
                                         self._refusal(exc)) from None
                finally:
                    connection.rollback()
        finally:
            engine.dispose()
        content = _canonical(header, rows)
        return Table(source=self.describe(), header=header, rows=_numbered(rows),
                     content=content, row_word="row", noun="query result")

    def _why(self, exc: BaseException) -> str:
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
        return self._scrub(f"{type(orig).__name__}: {first}" if first
                           else type(orig).__name__)

    def _refusal(self, exc: BaseException) -> str:
        orig = getattr(exc, "orig", None)
        code = getattr(orig, "pgcode", None)
        if code == "25006" or "readonly" in str(orig).replace("-", "").lower():
            return ("the database refused the query because it writes; the sql connector "
                    "is read-only: write one SELECT")
        # The database's own message can quote a value of the data: it is not shown here.
        # Run the query in the database's own client to read it.
        detail = f"SQLSTATE {code}" if code else type(orig or exc).__name__
        return (f"the database refused the query ({detail}); run it in the database's "
                f"own client to see why, and fix it in the site's configuration")


def _numbered(rows: list[tuple[object, ...]]) -> Iterator[tuple[int, Sequence[object]]]:
    for i, row in enumerate(rows):
        yield i + 1, row


def _canonical(header: list[str], rows: list[tuple[object, ...]]) -> bytes:
    """The query's result as bytes for the fingerprint's digest: JSON lines, the header
    first, each value as JSON (decimals, dates and times as text)."""
    lines = [json.dumps(header, ensure_ascii=False)]
    lines.extend(json.dumps(list(r), ensure_ascii=False, default=str) for r in rows)
    return ("\n".join(lines) + "\n").encode("utf-8")
