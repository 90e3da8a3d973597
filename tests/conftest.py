"""Fixtures shared by several test modules.

Helpers that are not fixtures (the federation harness, ``wait_until``, ``short_tmp``) live in
``federation.py`` and ``tests_support.py`` beside this file and are imported by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train tiny models on one intra-op thread, as a site's trainer does.

    On a 2-core machine that is busy with anything else, torch's default of one thread per
    core makes the tiny per-sample ops of DP-SGD 10-20x slower (threads spin waiting for
    each other); one thread gives the same numbers. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty coordinator home folder."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def engine(home: Path) -> Iterator[Engine]:
    """The coordinator's database in ``home``, migrated to the head revision."""
    from coordinator.db import make_engine, run_migrations

    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()

