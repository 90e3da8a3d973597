"""Start, watch and talk to the Flower SuperLink that the coordinator owns.

The SuperLink serves the fleet, control and runtime APIs on one port and the open-source
control API has no authentication, so it binds to 127.0.0.1 only. Sites reach the fleet API
through the coordinator's gateway, never directly.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from coordinator.pki import CAFiles
from export.runtime import (
    die_with_parent,
    flower_env,
    free_port,
    stop_process_tree,
    venv_bin,
)

__all__ = ["SuperLinkError", "SuperLinkProcess"]


class SuperLinkError(RuntimeError):
    """The SuperLink could not be started or reached."""


@dataclass
class SuperLinkProcess:
    """A supervised ``flower-superlink`` bound to loopback with TLS and node authentication.

    Args:
        home: folder the SuperLink owns (its state database, FLWR_HOME and log).
        pki: the coordinator's CA and the server certificate for 127.0.0.1.
        port: loopback port (0 picks a free one).
        extra_env: variables every ServerApp process inherits (database URL, data dir).
    """

    home: Path
    pki: CAFiles
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "superlink.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def env(self) -> dict[str, str]:
        flwr_home = self.home / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = flower_env(str(flwr_home))
        env.update(self.extra_env)
        return env

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until its health endpoint answers over TLS."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._log is not None:
            self._log.close()
        self.home.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        cmd = [
            venv_bin("flower-superlink"),
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
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            cmd, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SuperLinkError(
                    f"flower-superlink exited with code {self._proc.returncode}; "
                    f"see {self.log_path}"
                )
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise SuperLinkError(f"flower-superlink did not become healthy in {timeout:.0f} s; "
                             f"see {self.log_path}")

    def healthy(self) -> bool:
        """True when ``/health`` answers 200 over TLS verified against the coordinator CA."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        try:
            r = httpx.get(f"https://{self.address}/health", verify=ctx, timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def exit_code(self) -> int | None:
        """The SuperLink's exit code once it has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop the SuperLink and every process it started (SuperExec, ServerApps)."""
        if self._proc is not None:
            stop_process_tree(self._proc, timeout=timeout)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
