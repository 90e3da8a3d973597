"""Start a real MLflow tracking server (the full ``mlflow`` package) for tests.

The server runs from its own virtual environment, ``.venv-mlflow`` at the repository root
(``make mlflow-server`` creates it; ``FEDWARD_MLFLOW_VENV`` names another), never from the
product's: the product ships only the client. SQLite backend and artifacts under a folder
the test owns (absolute paths, so a restart from another directory finds the same
artifacts), 127.0.0.1 on a free port, telemetry and server-side jobs off.

A missing server venv fails the test with what to run; set ``FEDWARD_ALLOW_SKIP_MLFLOW=1``
to skip instead (never in CI: a skipped MLflow test proves nothing).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

__all__ = ["MLFLOW_VENV", "MlflowServer", "free_port", "mlflow_server"]

REPO = Path(__file__).resolve().parents[1]
MLFLOW_VENV = Path(os.environ.get("FEDWARD_MLFLOW_VENV") or REPO / ".venv-mlflow")
START_TIMEOUT_S = 180.0  # a new database runs its migrations first (20-40 s on 2 busy cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MlflowServer:
    """One ``mlflow server`` on 127.0.0.1; :meth:`stop` and :meth:`start` keep its port,
    database and artifacts (a restart, as after an outage)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "artifacts").mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = MLFLOW_VENV / "bin" / "mlflow"
        if not exe.is_file():
            message = (f"no MLflow server at {exe}: run `make mlflow-server` (it makes "
                       ".venv-mlflow with mlflow==3.17.2)")
            if os.environ.get("FEDWARD_ALLOW_SKIP_MLFLOW") == "1":
                pytest.skip(message)
            pytest.fail(message, pytrace=False)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root),
               "XDG_CONFIG_HOME": str(self.root / "xdg"),
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
               # No background job runner: it starts worker processes in sessions of their
               # own, which would outlive the server; the hand-off uses no server jobs.
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)  # its workers: one group
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n"
                                   + (self.root / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).text == "OK":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {START_TIMEOUT_S:.0f} s:\n"
                           + (self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this process leads (ours)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        try:  # workers left in the group after the leader exited
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the port is free again when stop returns
            try:
                httpx.get(f"{self.uri}/health", timeout=1)
            except httpx.HTTPError:
                return
            time.sleep(0.2)


@contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """Run a tracking server for the length of the block (its data under ``root``)."""
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
