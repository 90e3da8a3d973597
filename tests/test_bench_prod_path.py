"""Benchmark 1b's own logic (``bench/prod_path.py``): its goals and its route check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import prod_path


def _run(rounds: list[float]) -> dict[str, Any]:
    return {"round_seconds": rounds}


def test_ratios_and_goals_are_computed_from_rounds_after_the_first() -> None:
    s = prod_path.summarize(2, {"production": _run([3.0, 1.0, 1.2, 0.8]),
                                "stock": _run([30.0, 15.0, 16.0, 14.0])})
    assert s["production"]["median_s"] == 1.0
    assert s["stock"]["median_s"] == 15.0
    assert s["ratio_stock_over_production"] == 15.0 and s["goal_met"] is True
    # Round 1 at 3x a later round misses the 1.5x goal.
    assert s["production"]["round1_over_later"] == 3.0 and s["round1_goal_met"] is False
    slow = prod_path.summarize(2, {"production": _run([1.4, 2.0, 2.0, 2.0]),
                                   "stock": _run([15.0, 15.0, 15.0, 15.0])})
    assert slow["goal_met"] is False and slow["round1_goal_met"] is True
    md = prod_path.report([s, slow], rounds=4, local_epochs=1, epsilon=3.0, wall_s=60,
                          lab=False)
    assert "15.00x | met" in md and "7.50x | **not met**" in md


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to make a network namespace")
def test_the_isolation_check_tells_a_namespaced_process_from_one_that_is_not(
        children: list[subprocess.Popen[bytes]]) -> None:
    children.append(subprocess.Popen(["sleep", "41"]))
    children.append(subprocess.Popen(["unshare", "--net", "sleep", "42"]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not prod_path._isolated(os.getpid(), "sleep 42"):
        time.sleep(0.1)
    assert prod_path._isolated(os.getpid(), "sleep 42")
    assert not prod_path._isolated(os.getpid(), "sleep 41")   # same namespace as its parent
    assert not prod_path._isolated(os.getpid(), "sleep 43")   # no such process


def test_cpu_per_round_counts_only_rounds_after_the_first_by_role() -> None:
    tick = prod_path._TICK
    rounds = [{"started_at": "2026-01-01T00:00:00Z", "seconds": 10.0},
              {"started_at": "2026-01-01T00:00:10Z", "seconds": 10.0},
              {"started_at": "2026-01-01T00:00:20Z", "seconds": 10.0}]
    t0 = prod_path.r1._db_epoch(rounds[0]["started_at"])
    cpu = {"roles": {"1": "SuperLink", "2": "coordinator (API, gateway)", "3": "ServerApp"},
           "samples": [
               [t0 + 5, {"1": 0, "2": 0}],                       # round 1: left out
               [t0 + 10, {"1": 2 * tick, "2": tick}],            # round 2 starts
               [t0 + 20, {"1": 4 * tick, "2": 2 * tick, "3": tick}],   # 3 born in round 2
               [t0 + 30, {"1": 6 * tick, "2": 5 * tick}],         # 3 has ended
               [t0 + 35, {"1": 100 * tick, "2": 100 * tick}]]}   # after the last round
    out = prod_path.cpu_per_round(cpu, rounds)
    assert out["SuperLink"] == 2.0                        # (6 - 2) / 2 rounds
    assert out["coordinator (API, gateway)"] == 2.0       # (5 - 1) / 2
    assert out["ServerApp"] == 0.5                        # 1 / 2
    assert out["total"] == 4.5 and out["window_s"] == 20
