"""Fault injection with real processes: stragglers and sites that die and come back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from federation import Federation, federation
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _wait_round(fed: Federation, run_id: int, number: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        if any(r["number"] == number and r["status"] == "completed" for r in rounds):
            return
        time.sleep(0.1)
    raise AssertionError(f"round {number} did not complete")


def _agent_pid(fed: Federation, name: str) -> int:
    """The site agent's Python process (the site is started under `timeout`)."""
    proc = fed.sites[name].proc
    assert proc is not None
    from export.runtime import descendants

    for pid in descendants(proc.pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if "fedward-site" in cmd and "start" in cmd:
            return pid
    raise AssertionError("site agent process not found")


def test_straggler_is_named_late_and_its_late_reply_is_ignored() -> None:
    with short_tmp() as work, federation(work, n_sites=3) as fed:
        sites = [s["name"] for s in fed.data["sites"]]
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
        fed.wait_online(3)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=3, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=10)
        _wait_round(fed, run_id, 1)
        slow = _agent_pid(fed, sites[2])
        os.kill(slow, signal.SIGSTOP)      # the site hangs: a straggler
        try:
            _wait_round(fed, run_id, 2)
        finally:
            os.kill(slow, signal.SIGCONT)  # it wakes up and answers round 2, too late
        run = fed.wait_run(run_id)
        assert run["status"] == "completed", run
        rounds = {r["number"]: r for r in fed.api("GET", f"/runs/{run_id}/rounds").json()}
        assert sorted(rounds[2]["participating_sites"]) == sorted(sites[:2])
        late = {f["site"]: f["reason"] for f in rounds[2]["failed_sites"]}
        assert sites[2] in late and late[sites[2]].startswith("late")
        assert sites[2] in rounds[2]["late_sites"]
        metrics = {m["round"]: m["sites"] for m in
                   fed.api("GET", f"/runs/{run_id}/metrics").json()["rounds"]}
        # Its late round-2 answer was never counted as a round-2 result.
        assert sites[2] not in metrics.get(2, {})


def test_killed_site_is_named_and_rejoins_a_later_round_after_the_back_off() -> None:
    with short_tmp() as work, federation(work, n_sites=3) as fed:
        sites = [s["name"] for s in fed.data["sites"]]
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
        fed.wait_online(3)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=14, local_epochs=1,
                            epsilon=8.0, min_sites=2, round_deadline_s=12)
        _wait_round(fed, run_id, 1)
        fed.kill_site(sites[2])
        time.sleep(2)
        fed.start_site(sites[2])           # restarted at once: Flower says "already active"
        run = fed.wait_run(run_id, timeout=380)
        assert run["status"] == "completed", run
        rounds = sorted(fed.api("GET", f"/runs/{run_id}/rounds").json(),
                        key=lambda r: r["number"])
        missing = [r for r in rounds if sites[2] not in r["participating_sites"]]
        assert missing, "the killed site took part in every round"
        for rnd in missing:
            assert sites[2] in {f["site"] for f in rnd["failed_sites"]}
        back = [r["number"] for r in rounds
                if r["number"] > missing[0]["number"] and sites[2] in r["participating_sites"]]
        assert back, "the site never rejoined after its restart"
