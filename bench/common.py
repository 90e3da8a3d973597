"""Process helpers for the benchmarks: free ports, bounded processes killed by PID, Flower env.

Every process is started in its own session under ``timeout`` so that it (and anything it
spawns, e.g. ``flower-superexec``/``flwr-serverapp``/``flwr-clientapp``) has a bounded
lifetime even if this driver dies; :meth:`Proc.stop` ends its process group by the PID we
started, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: private FLWR_HOME, no telemetry, venv bin first."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # SuperLink/SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp by name.
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("PYTHONPATH", None)
    # The stock baseline runs Flower's own defaults: never inherit the appliance's shorter
    # SuperExec task poll (fedward.flower.env.flower_env sets it for the appliance's processes).
    env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
    if extra:
        env.update(extra)
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


class Proc:
    """A background process with a bounded lifetime, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 lifetime_s: float, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        # `timeout` signals its whole process group at the deadline; the new session makes
        # that group contain only this process and its descendants.
        self.popen = subprocess.Popen(
            ["timeout", "-k", "5", str(int(lifetime_s)), *argv],
            env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid = self.popen.pid
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM then SIGKILL the process group this object started (pgid == our PID)."""
        try:
            if self.popen.poll() is None:
                _killpg(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
            # Children may outlive the leader: sweep the group regardless.
            _killpg(self.pid, signal.SIGKILL)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log.close()
        return self.popen.returncode


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_cmd(argv: list[str], env: dict[str, str], timeout_s: float,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion with a hard timeout."""
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def wait_until(pred: Callable[[], _T | None], timeout_s: float, interval_s: float = 0.2,
               what: str = "condition") -> _T:
    """Call ``pred`` until it returns a truthy value; raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
