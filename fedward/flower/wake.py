"""A wake-up call from a site's SuperNode to the site's task executor.

Flower's SuperNode has no way to tell a ClientApp process that a task is waiting: the
process asks its runtime API again and again. The site's executor asked 20 times a second
during a run, and each ask crossed the agent, the namespace relay and the SuperNode: about
a third of a core for a 3-site federation on one host that only waited. Now the SuperNode
(:mod:`fedward.flower.supernode`) sends one datagram to a Unix socket in the site's
``run/`` folder whenever it has received a message, and the executor waits on that socket
between asks: it asks at once when woken, often for a moment after that, and otherwise
only every :data:`FALLBACK_S` (so a lost datagram delays a task, never loses it).

The datagram carries nothing; anyone who could send one (only the agent's own user: the
folder is mode 0700) can at most make the executor ask once more.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from pathlib import Path
from typing import Final

__all__ = ["FALLBACK_S", "WAKE_ENV", "WakeListener", "notify"]

WAKE_ENV: Final = "FEDWARD_TASK_WAKE_SOCKET"
"""The SuperNode's environment variable naming the executor's wake socket."""
FALLBACK_S: Final = 1.0
"""How often an executor that listens for wake-ups asks anyway."""


def notify(path: str) -> None:
    """Wake the executor listening at ``path``; never blocks, never raises (no listener,
    a full queue: the executor's fallback ask finds the task)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.sendto(b"!", path)


class WakeListener:
    """The executor's end: a datagram socket at ``path`` (mode 0600). A file already
    there (left by an agent that crashed, or by the executor of a SuperNode that is being
    replaced) is replaced; closing removes the file only if it is still this listener's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            old = os.umask(0o177)
            try:
                self._sock.bind(str(path))
            finally:
                os.umask(old)
            self._sock.setblocking(False)
            self._inode = path.stat().st_ino
        except OSError:
            self._sock.close()
            raise

    def wait(self, timeout: float) -> bool:
        """Up to ``timeout`` seconds for a wake-up; True if one came (all that queued up
        meanwhile are consumed with it)."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while self._sock.recv(64):
                pass
        return True

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
