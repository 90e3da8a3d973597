"""Fixtures shared by several test modules.

Helpers that are not fixtures (the federation harness, ``wait_until``, ``short_tmp``) live in
``federation.py`` and ``tests_support.py`` beside this file and are imported by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine


@pytest.fixture(scope="session", autouse=True)
def shared_noise_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One noise-multiplier cache for every site agent the tests start (``FEDWARD_CACHE_DIR``).

    A site searches its run's noise multiplier once per plan (1-3 CPU-seconds) and keeps the
    answer; the tests start hundreds of fresh sites with the same few plans, so they share
    the answers, as the sites of one lab host may. Each answer read back is still confirmed
    by the ledger's accountant (``privacy.noise_cache``). Both xdist workers use the
    session's folder; pytest removes it with the session's other temporary folders.
    """
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "noise-cache"
    shared.mkdir(exist_ok=True)
    before = os.environ.get("FEDWARD_CACHE_DIR")
    os.environ["FEDWARD_CACHE_DIR"] = str(shared)
    yield
    if before is None:
        os.environ.pop("FEDWARD_CACHE_DIR", None)
    else:
        os.environ["FEDWARD_CACHE_DIR"] = before


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

