"""Small helpers shared by tests."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A short temporary folder: AF_UNIX socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    try:
        yield path
    finally:
        if not os.environ.get("FEDWARD_TEST_KEEP"):  # set it to keep logs for a post-mortem
            shutil.rmtree(path, ignore_errors=True)


def no_warm_ups_left() -> None:
    """Wait for privacy warm-ups that earlier tests' trainers left running.

    The accountant's cache is shared by the whole test process: one finishing during a test
    that counts cache misses would count as that test's miss.
    """
    for thread in threading.enumerate():
        if thread.name == "privacy-warm-up":
            thread.join(timeout=120)
            assert not thread.is_alive(), "a privacy warm-up ran past two minutes"
