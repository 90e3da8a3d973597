"""Fault injection with real processes: stragglers and sites that die and come back."""

from __future__ import annotations

import json
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
        sites = fed.join_all_sites()
        run_id = fed.launch(task="breast_cancer_mlp", rounds=3, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=15)
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


def _kill_while_training(fed: Federation, name: str, timeout: float = 120) -> int:
    """SIGKILL a site agent while a round is charged but not yet done: mid-training.

    The ledger charges a round ("reserved") before it trains and marks it "done" after;
    the file is replaced atomically, so polling it never sees a half-written state.
    Returns the number of the round that was cut short.
    """
    ledger = fed.sites[name].root / "privacy-ledger.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            runs = json.loads(ledger.read_text())["runs"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            runs = {}
        for run in runs.values():
            reserved = [int(n) for n, r in run["rounds"].items() if r["status"] == "reserved"]
            if reserved:
                fed.kill_site(name)
                return reserved[0]
        time.sleep(0.002)
    raise AssertionError(f"{name} never started training a round")


def test_site_killed_mid_round_is_named_keeps_its_epsilon_and_rejoins() -> None:
    from privacy import PrivacyLedger

    with short_tmp() as work, federation(work, n_sites=3) as fed:
        sites = fed.join_all_sites()
        # Round 1 includes each site's noise calibration: give it room on a busy machine.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=14, local_epochs=1,
                            epsilon=8.0, min_sites=2, round_deadline_s=20)
        _wait_round(fed, run_id, 1)
        cut = _kill_while_training(fed, sites[2])
        # What the killed agent left behind: a whole ledger in which the round it was
        # training is charged (write-ahead), never forgotten.
        ledger = PrivacyLedger(fed.sites[sites[2]].root / "privacy-ledger.json")
        (site_run,) = ledger.run_ids()
        view = ledger.get_run(site_run)
        assert view is not None and cut in view.rounds
        assert len(ledger.history(site_run)) == len(view.rounds)
        spent_at_kill = ledger.epsilon_spent(site_run)
        assert spent_at_kill > 0
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
        # The cut round stays charged after the restart, and every later round adds to it.
        assert cut in {r["number"] for r in missing}
        after = PrivacyLedger(fed.sites[sites[2]].root / "privacy-ledger.json")
        final = after.get_run(site_run)
        assert final is not None and cut in final.rounds
        assert len(final.history) == len(final.rounds)
        assert after.epsilon_spent(site_run) > spent_at_kill


def test_coordinator_killed_mid_run_resumes_without_losing_or_repeating_rounds() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        sites = fed.data["sites"]
        fed.join_all_sites()
        # After a SuperLink crash Flower keeps the nodes "active" for about 60 s, so sites
        # may need that long to come back: the deadline must cover it.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=4, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=180)
        _wait_round(fed, run_id, 2)
        # SIGKILL the coordinator and everything it runs (SuperLink, ServerApp): a crash,
        # most likely while round 3 is on its way to the sites.
        fed.kill_coordinator()
        fed.restart_coordinator()
        run = fed.wait_run(run_id, timeout=330)
        assert run["status"] == "completed", run.get("failure_reason")
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [r["number"] for r in rounds] == [1, 2, 3, 4]
        assert all(r["status"] == "completed" for r in rounds)
        # A resumed round waits for its sites, never for a deadline: nothing stalled.
        assert all(r["seconds"] < 120 for r in rounds), rounds
        ckpts = fed.api("GET", f"/runs/{run_id}/checkpoints").json()
        assert [c["round_number"] for c in ckpts] == [1, 2, 3, 4]
        for s in sites:
            ledger = json.loads((fed.sites[s["name"]].root / "privacy-ledger.json").read_text())
            entry = next(iter(ledger["runs"].values()))
            # One charge per round, never two, and within the budget.
            assert sorted(int(k) for k in entry["rounds"]) == [1, 2, 3, 4]
            assert len(entry["history"]) == 4
        assert fed.api("GET", "/audit/verify").json()["first_broken_id"] is None
        events = fed.api("GET", "/audit?limit=500").json()
        items = events["items"] if isinstance(events, dict) else events
        assert any(e["action"] == "run.relaunched" for e in items)
