"""Process plumbing shared by the coordinator and the site agent.

Both sides start Flower processes (SuperLink, SuperNode) that in turn start children of
their own (SuperExec, ServerApp, ClientApp). These helpers give every such process the
same environment and stop a whole tree that *we* started, by PID, and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "FileLock",
    "atomic_write",
    "descendants",
    "die_with_parent",
    "flower_env",
    "free_port",
    "stop_process_tree",
    "venv_bin",
    "with_short_backoff",
]


def die_with_parent() -> None:
    """``preexec_fn`` for children that must not outlive the appliance process.

    Linux delivers SIGKILL to the child when the process that started it dies, even by
    SIGKILL, so a crashed coordinator or site agent never leaves an orphaned SuperLink or
    SuperNode holding ports and node registrations.
    """
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def flower_env(flwr_home: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process the appliance starts.

    Telemetry and update checks are off (the appliance runs offline and must not phone
    home), ``FLWR_HOME`` is a folder the appliance owns, and the interpreter's ``bin``
    folder comes first on ``PATH`` because Flower starts its helpers (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_HOME"] = flwr_home
    env["PYTHONUNBUFFERED"] = "1"
    # SuperExec polls for ClientApp/ServerApp tasks every 1.0 s by default; a round waits
    # on that poll once per message. A documented Flower knob.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def venv_bin(name: str) -> str:
    """Path of an executable installed beside the running interpreter."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        raise FileNotFoundError(
            f"{name} is not installed beside {sys.executable}; reinstall fedward "
            "(make install)"
        )
    return str(candidate)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """PIDs of every living descendant of ``pid`` (read from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children.get(child, []))
    return out


def stop_process_tree(proc: subprocess.Popen[bytes], *, timeout: float = 5.0) -> None:
    """Stop ``proc`` and every descendant it started: SIGTERM, then SIGKILL after timeout.

    Flower detaches its helpers into sessions of their own, so a process group is not
    enough; the tree is collected from /proc before the parent is signalled.
    """
    if proc.poll() is not None:
        return
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if proc.poll() is None:
        proc.wait(timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a
    mix: temp file in the same directory, fsync, rename, fsync the directory."""

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileLock:
    """A lock held across threads (a mutex) and processes (``flock`` on a sidecar file)."""

    def __init__(self, lock_path: Path) -> None:
        self.lock_path = lock_path
        self._thread_lock = threading.Lock()

    def __enter__(self) -> FileLock:
        self._thread_lock.acquire()
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        finally:
            self._thread_lock.release()


# Flower's object pulls wait 1 s before the first retry of an object that is not on the
# server yet (a message whose upload is still under way), then double up to 10 s: most of
# a round's latency whenever a message is fetched just before its objects land. The
# appliance's own Flower processes (ServerApp, SuperNode, the site's task executor) use a
# short, bounded back-off instead; the overall time limit stays Flower's.
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.5


def with_short_backoff(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """A Flower object-pull function (``pull_objects``, ``pull_and_inflate_object_from_tree``)
    with a short first back-off and cap, all else unchanged."""
    return functools.partial(pull_objects, initial_backoff=PULL_INITIAL_BACKOFF_S,
                             backoff_cap=PULL_BACKOFF_CAP_S)
