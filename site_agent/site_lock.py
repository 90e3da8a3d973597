"""The site directory's agent lock: one agent per site directory.

Light on purpose (no torch, no Flower): ``fedward-site start`` takes the lock before it
imports the agent, so a second agent on the same directory is refused in a moment, and
changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Final

from site_agent.config import SitePaths

__all__ = ["LOCKED_EXIT", "AgentLockError", "hold_site_lock"]

LOCKED_EXIT: Final = 6
"""The exit code of an agent refused because another one holds the directory."""


class AgentLockError(RuntimeError):
    """Another site agent runs on this site directory."""


def hold_site_lock(paths: SitePaths) -> int:
    """Take the site directory's agent lock for the life of this process; returns its fd.

    ``flock`` on ``agent.lock``: the kernel drops it when the agent ends, however it ends,
    so a crash leaves nothing to clean up. The file holds the holder's PID, for the message.
    """
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise AgentLockError(
            f"another site agent (pid {holder}) is already running on {paths.root}; a "
            "site directory serves one agent at a time. Stop the running one first "
            "(`systemctl stop fedward-site`, or Ctrl-C in its terminal), or give this one "
            "a directory of its own with --dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
