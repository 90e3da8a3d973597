"""Database engine, migrations and sessions of the coordinator.

The schema is owned by the Alembic migrations in ``coordinator/migrations``: tables are
created and changed only by :func:`run_migrations`, never by ``create_all``, so a SQLite file
and a PostgreSQL server always carry the same, versioned schema.

SQLite transactions
    Every transaction on a SQLite engine made here starts with ``BEGIN IMMEDIATE``, which
    takes SQLite's single write lock at the start instead of at the first write. SQLite
    serialises writers anyway; taking the lock up front means a transaction that read first
    and writes later (the audit chain reads the last hash, then appends) can neither fail
    half-way with ``SQLITE_BUSY_SNAPSHOT`` nor fork the chain when the API process and the
    ServerApp process write at the same time. Waiting writers block for up to the
    ``busy_timeout`` (10 s); coordinator transactions last milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Final

from alembic import command
from alembic.config import Config
from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlmodel import Session

__all__ = [
    "MIGRATIONS_DIR",
    "SQLITE_BUSY_TIMEOUT_MS",
    "SessionDep",
    "alembic_config",
    "get_session",
    "make_engine",
    "run_migrations",
    "session_scope",
]

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS: Final = 10_000


def make_engine(url: str) -> Engine:
    """Create the SQLAlchemy engine for ``url``.

    SQLite: WAL journal (readers outside a transaction never block), a 10 s busy timeout,
    foreign keys enforced, usable from several threads, and ``BEGIN IMMEDIATE`` for every
    transaction (see the module docstring). The file's parent directory is created.
    PostgreSQL (``postgresql+psycopg2://...``): a pooled engine that pings connections
    before use, so a restarted server does not fail the first request.

    Args:
        url: SQLAlchemy database URL.

    Returns:
        The engine. Call ``dispose()`` when done with it.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)

    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith(
        "file:"
    ):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (which would emit a
        # deferred BEGIN on its own); the "begin" hook below emits BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def alembic_config() -> Config:
    """The Alembic configuration of the migrations shipped inside the package (whatever
    the working directory)."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def run_migrations(url: str, *, revision: str = "head") -> None:
    """Bring the database at ``url`` to the newest schema (``alembic upgrade head``).

    Uses the migrations shipped inside the package, whatever the working directory, and
    runs them over an engine from :func:`make_engine` (so SQLite gets the same pragmas as
    the application). Safe to call at every start: an up-to-date database is left as is.

    Args:
        url: SQLAlchemy database URL.
        revision: the revision to upgrade to (tests build older schemas with it).
    """
    config = alembic_config()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            # env.py uses this connection instead of building its own engine.
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit when the block ends, roll back if it raises.

    Objects stay usable after the block (``expire_on_commit=False``).

    Args:
        engine: Engine from :func:`make_engine`.

    Yields:
        The session.
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def get_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: a session on the engine stored in ``app.state.engine``.

    Routes commit explicitly; anything not committed is rolled back when the request ends.

    Args:
        request: The current request (gives access to the application state).

    Yields:
        The session.
    """
    engine: Engine = request.app.state.engine
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
