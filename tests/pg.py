"""Start a real, throw-away PostgreSQL 15 server for tests.

``postgres_server()`` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/15/bin``
(else the newest ``/usr/lib/postgresql/N/bin``, or ``FEDWARD_PG_BIN``) in a fresh temporary
folder, on a free loopback port, and yields a SQLAlchemy URL for the superuser ``fedward``.
PostgreSQL refuses to run as root, so as root the binaries run as the ``postgres`` user
(``runuser``) and the folder is chowned to it.

Missing binaries fail the test with what to install; set ``FEDWARD_ALLOW_SKIP_PG=1`` to skip
instead (never in CI: a skipped PostgreSQL test proves nothing).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = ["PG_BIN", "create_database", "postgres_server"]


def _default_bin() -> Path:
    # PostgreSQL 15 is the tested version; a newer Debian ships another major version, so
    # fall back to the newest one installed rather than failing on a path.
    preferred = Path("/usr/lib/postgresql/15/bin")
    if preferred.is_dir():
        return preferred
    installed = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    return installed[-1] if installed else preferred


PG_BIN = Path(os.environ["FEDWARD_PG_BIN"]) if os.environ.get("FEDWARD_PG_BIN") else (
    _default_bin())
PG_USER = "fedward"


def _missing(message: str) -> None:
    if os.environ.get("FEDWARD_ALLOW_SKIP_PG") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(cmd: list[str], *, log: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            f"\n{tail}"
        )


@contextmanager
def postgres_server() -> Iterator[str]:
    """Run a PostgreSQL server for the length of the block.

    Yields:
        ``postgresql+psycopg2://fedward@127.0.0.1:PORT/postgres``.
    """
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "pg_ctl").is_file():
        _missing(
            f"PostgreSQL server binaries (initdb, pg_ctl) not found in {PG_BIN}: install the "
            "'postgresql' package (apt-get install -y postgresql), or point FEDWARD_PG_BIN "
            "at them"
        )
    as_postgres: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root needs the 'postgres' user (install the 'postgresql' "
                     "package), because PostgreSQL refuses to run as root")
            raise  # unreachable: _missing fails or skips
        as_postgres = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="fedward-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"
    started = False
    try:
        _run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
              "-U", PG_USER, "-E", "UTF8", "--locale=C", "--no-sync"])
        # A port is free when we look, but another process may take it before the server
        # binds: try a few.
        for _attempt in range(3):
            port = _free_port()
            options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            try:
                _run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log),
                      "-o", options, "-w", "-t", "60", "start"], log=log)
            except RuntimeError:
                if "could not bind" in (log.read_text(errors="replace") if log.exists() else ""):
                    continue
                raise
            started = True
            break
        if not started:
            raise RuntimeError(f"PostgreSQL could not bind a free port; see {log}")
        yield f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data),
                            "-m", "fast", "-w", "stop"], capture_output=True, timeout=60,
                           check=False)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server and return its URL.

    Args:
        server_url: URL from :func:`postgres_server`.
        name: New database name (lowercase letters, digits, ``_``).

    Returns:
        The URL of the new, empty database.
    """
    if not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(f"bad database name {name!r}")
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)
