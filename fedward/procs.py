"""Process plumbing shared by the coordinator and the site agent.

Both sides start Flower processes (SuperLink, SuperNode) that in turn start children of
their own (SuperExec, ServerApp, ClientApp). These helpers stop a whole tree that *we*
started, by PID, and nothing else, and make children die with their parent.

``psutil`` is imported where a process tree is walked, not at module level: the sandbox
(:mod:`fedward.sandbox.netns`) imports this module and may run on an interpreter that has
only the standard library.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

__all__ = [
    "descendants",
    "die_with_parent",
    "free_port",
    "stop_process_tree",
    "venv_bin",
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
    """PIDs of every living descendant of ``pid``, children first (empty if it is gone)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child.pid for child in children]


def stop_process_tree(proc: subprocess.Popen[bytes], *, timeout: float = 5.0) -> None:
    """Stop ``proc`` and every descendant it started: SIGTERM, then SIGKILL after timeout.

    Flower detaches its helpers into sessions of their own, so a process group is not
    enough; the tree is collected before the parent is signalled (a child whose parent has
    died is re-parented and could no longer be found from it).
    """
    import psutil

    if proc.poll() is not None:
        return
    try:
        parent = psutil.Process(proc.pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    others = [m for m in tree if m.pid != proc.pid]
    while others and time.monotonic() < deadline:
        others = [m for m in others if _running(m)]
        if others:
            time.sleep(0.05)
    for member in others:
        if _running(member):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def _running(member: psutil.Process) -> bool:
    """Whether a process still runs: a zombie is dead for our purposes, and psutil checks
    the creation time, so a PID the kernel gave to a new process is not ours."""
    import psutil

    try:
        return bool(member.is_running() and member.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
