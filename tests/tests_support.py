"""Small helpers shared by tests."""

from __future__ import annotations

import os
import shutil
import tempfile
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
