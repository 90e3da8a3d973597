"""Files both sides write: one durable atomic write, one cross-process lock.

Every file the appliance replaces (configuration, policy and approvals, the ledger, keys and
certificates, checkpoints, stored replies, parity results) goes through
:func:`atomic_write`, so each has the same guarantee: after a crash, the old content or the
new, never a mix, and once the call returns the new content survives a power cut.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
from pathlib import Path

__all__ = ["FileLock", "atomic_write", "file_sha256", "fsync_dir"]


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably: a temp file in the same directory, written
    and fsynced, given ``mode``, renamed over ``path``, then the directory fsynced.

    Args:
        path: the file to replace (its directory is created if missing).
        data: the new content; text is written as UTF-8.
        mode: the file's permission bits (set before the rename: the file never appears
            with wider permissions).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in chunks, never whole into memory)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
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
