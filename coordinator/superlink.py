"""Start, watch and talk to the Flower SuperLink that the coordinator owns.

The SuperLink serves the fleet, control and runtime APIs on one port and the open-source
control API has no authentication, so no other local account may reach it. It runs, with
the SuperExec and ServerApps it starts, in a private network namespace of its own
(:mod:`fedward.sandbox.netns`): its 127.0.0.1 is not the host's. The coordinator reaches it through
one Unix socket in its data directory (mode 0600, directory 0700); sites reach its fleet
API through the coordinator's gateway, never directly.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from sqlalchemy.engine import make_url

from fedward.certs import CAFiles
from fedward.files import atomic_write
from fedward.flower.env import flower_env
from fedward.metrics_http import is_loopback
from fedward.procs import free_port
from fedward.sandbox.netns import EXIT_NO_SANDBOX, Sandbox, isolation_mode, sandbox_failure
from fedward.sandbox.relay import Endpoint, RelayThread, unix_transport

__all__ = ["DATABASE_URL_FILE_ENV", "SuperLinkError", "SuperLinkProcess", "database_route"]

# The ServerApp reads the database URL (which may hold a password) from this 0600 file,
# never from its environment or command line: both are passed on to every Flower process
# and the command line is visible to every local account.
DATABASE_URL_FILE_ENV = "FEDWARD_DATABASE_URL_FILE"


class SuperLinkError(RuntimeError):
    """The SuperLink could not be started or reached."""


def database_route(url: str, run_dir: Path, *, mode: str
                   ) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """How a ServerApp in the SuperLink's namespace reaches the coordinator's database.

    Returns the URL the ServerApp uses, the relays the sandbox opens inside and the relays
    the coordinator serves outside. SQLite and PostgreSQL over a Unix socket need none (a
    file path works in any network namespace). PostgreSQL over TCP goes through a Unix
    socket in ``run_dir`` to the server's real address; inside, a listener on the same port
    of the namespace's 127.0.0.1 leads to it, and ``hostaddr`` keeps the server's name for
    TLS verification when that name is not a loopback address.
    """
    parsed = make_url(url)
    host = parsed.host or ""
    if mode == "container" or parsed.get_backend_name() != "postgresql" or \
            not host or host.startswith("/"):
        return url, [], []
    port = parsed.port or 5432
    sock = f"unix:{run_dir / 'database.sock'}"
    inside = [(f"tcp:127.0.0.1:{port}", sock)]
    outside = [(sock, f"tcp:{host}:{port}")]
    if is_loopback(host):
        parsed = parsed.set(host="127.0.0.1")
    else:
        parsed = parsed.update_query_dict({"hostaddr": "127.0.0.1"})
    return parsed.render_as_string(hide_password=False), inside, outside


@dataclass
class SuperLinkProcess:
    """A supervised Flower SuperLink (``fedward.flower.superlink``: long polling) with TLS
    and node authentication, in a sandbox.

    Args:
        home: folder the SuperLink owns (its state database, FLWR_HOME and log).
        pki: the coordinator's CA and the server certificate for 127.0.0.1.
        run_dir: where the Unix sockets live (created mode 0700).
        database_url: the coordinator's database; ServerApps record rounds in it.
        port: the SuperLink's port on its namespace's 127.0.0.1 (0 picks a free one).
        extra_env: variables every ServerApp process inherits (no secrets: they are passed
            on to every Flower process).
        mode: ``namespace`` or ``container`` (see :mod:`fedward.sandbox.netns`); default from
            ``FEDWARD_FLOWER_ISOLATION``.
    """

    home: Path
    pki: CAFiles
    run_dir: Path
    database_url: str
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    mode: str = field(default_factory=isolation_mode)
    _sandbox: Sandbox | None = field(default=None, init=False, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _outside: RelayThread | None = field(default=None, init=False, repr=False)

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "superlink.sock"

    @property
    def address(self) -> str:
        """How the coordinator reaches the SuperLink: ``unix:/path/to/superlink.sock``."""
        return f"unix:{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.home / "superlink.log"

    @property
    def pid(self) -> int | None:
        """PID of the sandbox process that holds the SuperLink."""
        return None if self._proc is None else self._proc.pid

    def env(self) -> dict[str, str]:
        flwr_home = self.home / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = flower_env(str(flwr_home))
        # Nothing of the coordinator's own settings (the database URL above all) reaches
        # the Flower processes except what extra_env names.
        for key in [k for k in env if k.startswith("FEDWARD_")]:
            del env[key]
        env.update(self.extra_env)
        env[DATABASE_URL_FILE_ENV] = str(self.run_dir / "serverapp-database.url")
        return env

    def _prepare_database(self) -> list[tuple[str, str]]:
        url, inside, outside = database_route(self.database_url, self.run_dir, mode=self.mode)
        atomic_write(self.run_dir / "serverapp-database.url", url.encode(), mode=0o600)
        if outside and self._outside is None:
            self._outside = RelayThread([(Endpoint.parse(a), Endpoint.parse(b))
                                         for a, b in outside], name="database-relay")
            self._outside.start()
        return inside

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until its health endpoint answers over TLS."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._log is not None:
            self._log.close()
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)
        if self.port == 0:
            self.port = free_port()
        inside = self._prepare_database()
        cmd = [
            # Flower's SuperLink, with fetches that wait for a message (long polling).
            sys.executable, "-m", "fedward.flower.superlink",
            "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.server_cert),
            "--ssl-keyfile", str(self.pki.server_key),
            "--enable-supernode-auth",
            "--database", str(self.home / "superlink-state.db"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            # Never install an app's dependencies at run time from a package index.
            "--disable-runtime-dependency-installation",
        ]
        self._sandbox = Sandbox(
            command=cmd, mode=self.mode,
            relays=[(self.address, f"tcp:127.0.0.1:{self.port}"), *inside])
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        since = self._log.tell()
        self._proc = self._sandbox.start(env=self.env(), stdout=self._log, new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                why = sandbox_failure(self.log_path, since) if code == EXIT_NO_SANDBOX else None
                self.stop()
                raise SuperLinkError(why or f"flower-superlink exited with code {code}; "
                                     f"see {self.log_path}")
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise SuperLinkError(f"flower-superlink did not become healthy in {timeout:.0f} s; "
                             f"see {self.log_path}")

    def healthy(self) -> bool:
        """True when ``/health`` answers 200 over TLS verified against the coordinator CA."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        transport = unix_transport(self.socket_path, verify=ctx)
        try:
            with httpx.Client(transport=transport, timeout=2.0) as client:
                r = client.get("https://127.0.0.1/health")
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def exit_code(self) -> int | None:
        """The SuperLink's exit code once it has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the SuperLink and every process it started (SuperExec, ServerApps).

        Returns when all of them are gone: they live in the sandbox's PID namespace, which
        the kernel empties when the sandbox ends.
        """
        if self._sandbox is not None:
            self._sandbox.stop(timeout=timeout)
        self._proc = None
        if self._outside is not None:
            self._outside.stop()
            self._outside = None
        if self._log is not None:
            self._log.close()
            self._log = None
