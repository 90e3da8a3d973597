"""Run control for real: coordinator, SuperLink and site agents as processes on 127.0.0.1.

Cancel a training run and a run waiting for approval (the rounds stop within the round
deadline plus 5 s, every site's audit log records it and its ``fedward-site runs`` shows
the run cancelled, nothing is left running), relaunch
from a recorded run, compare the two, and gate on ``wait``'s exit codes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psutil
import pytest

from fedward.flower.control import FlowerControl
from fedward.procs import descendants

from federation import BIN, Federation, edit_site_policy, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DEADLINE_S = 60.0


def _poll(fed: Federation, run_id: int, done: Any, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < end:
        run = fed.api("GET", f"/runs/{run_id}").json()
        if done(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never got there: {run}")


def _flower_processes(fed: Federation, name: str) -> list[str]:
    """Command lines of the living ``name`` processes under the coordinator and the sites."""
    roots = [fed.coordinator.pid, *(s.proc.pid for s in fed.sites.values() if s.proc)]
    out = []
    for pid in [p for root in roots for p in descendants(root)]:
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if name in cmd:
            out.append(cmd)
    return out


def _no_process_left(fed: Federation) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        left = _flower_processes(fed, "flwr-serverapp") + _flower_processes(fed,
                                                                            "flwr-clientapp")
        if not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes left behind: {left}")


def _site_cancellations(fed: Federation, run_id: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name in fed.sites:
        mine = [e for e in fed.site_audit(name) if e.action == "run-cancelled"
                and e.detail.get("run") == str(run_id)]
        assert len(mine) <= 1, mine
        if mine:
            out[name] = dict(mine[0].detail)
    return out


def _site_run(fed: Federation, name: str, run_id: int) -> dict[str, Any]:
    """The run as ``fedward-site runs --dir SITE --json`` shows it at site ``name``."""
    out = run_cli([str(BIN / "fedward-site"), "runs", "--dir", str(fed.sites[name].root),
                   "--json"])
    rows = {r["run"]: r for r in json.loads(out.stdout)}
    return dict(rows[str(run_id)])


def test_cancel_a_running_run_then_relaunch_compare_and_wait() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        names = []
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
            names.append(s["name"])
        fed.wait_online(len(names), timeout=180)   # slow on a loaded 2-core machine
        run_id = fed.launch(task="breast_cancer_mlp", rounds=12, local_epochs=1, epsilon=3.0,
                            min_sites=1, round_deadline_s=DEADLINE_S)
        # Cancel once the first round is done and the second is under way.
        run = _poll(fed, run_id, lambda r: r.get("rounds_completed", 0) >= 1
                    or r["status"] not in ("pending", "running"), 240)
        assert run["status"] == "running", run
        asked = time.monotonic()
        out = fed.coord_cli("cancel", str(run_id), "--reason", "wrong cohort")
        assert "cancel requested by admin (wrong cohort)" in out.stdout, out.stdout
        run = _poll(fed, run_id, lambda r: r["status"] != "running", DEADLINE_S + 30)
        took = time.monotonic() - asked
        assert run["status"] == "cancelled", run
        assert took <= DEADLINE_S + 5, f"cancelled after {took:.1f} s"
        print(f"cancelled {took:.1f} s after the request (running)")
        assert (run["cancelled_by"], run["cancel_reason"]) == ("admin", "wrong cohort")
        assert run["failure_reason"] == "cancelled by admin: wrong cohort"
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        # A cancel between rounds starts no other; one mid-round ends that round cancelled.
        assert len(rounds) < 12 and rounds[-1]["status"] in ("completed", "cancelled"), rounds
        assert all(r["status"] == "completed" for r in rounds[:-1]), rounds
        # Every site was told and wrote it in its own (hash-chained) audit log.
        told = _site_cancellations(fed, run_id)
        assert sorted(told) == sorted(names)
        assert all((d["by"], d["reason"]) == ("admin", "wrong cohort") for d in told.values())
        # ... and its own view of the run says so (it no longer shows it running).
        for name in names:
            row = _site_run(fed, name, run_id)
            assert (row["status"], row["cancelled_by"], row["cancel_reason"]) == (
                "cancelled", "admin", "wrong cohort"), row
        events = fed.audit_events()
        delivered = [e for e in events if e["action"] == "run.cancel_delivered"
                     and e["subject"] == f"run:{run_id}"]
        assert [e["detail"] for e in delivered] == [{"told": sorted(names), "not_told": {}}]
        # The Flower run has ended and no ServerApp or ClientApp process is left.
        control = FlowerControl(address=fed.superlink, ca_cert=fed.home / "pki" / "ca.pem")
        # The ServerApp records the run cancelled, then exits; Flower marks its run finished
        # when it has exited: moments later (bounded).
        ended_by = time.monotonic() + 30
        while not control.training_runs()[run_id].finished and time.monotonic() < ended_by:
            time.sleep(0.5)
        assert control.training_runs()[run_id].finished
        _no_process_left(fed)

        # The CLI: listings in JSON, wait's exit code, a clear 409 on a second cancel.
        listed = json.loads(fed.coord_cli("runs", "--json").stdout)
        assert [(r["id"], r["status"], r["cancelled_by"]) for r in listed] == [
            (run_id, "cancelled", "admin")]
        assert fed.coord_cli("wait", str(run_id), check=False).returncode == 4
        watched = fed.coord_cli("watch", str(run_id), "--json", check=False)
        lines = [json.loads(line) for line in watched.stdout.splitlines()]
        assert lines[-1]["run"]["status"] == "cancelled" and watched.returncode == 2
        again = fed.coord_cli("cancel", str(run_id), "--reason", "again", check=False)
        assert again.returncode == 1
        assert "409" in again.stderr and "has already ended (cancelled" in again.stderr

        # Relaunch with the recorded configuration, fewer rounds; then compare the two.
        relaunched = json.loads(fed.coord_cli("launch", "--from", str(run_id), "--rounds", "1",
                                              "--json").stdout)
        second = relaunched["id"]
        waited = run_cli([str(BIN / "fedward-coordinator"), "wait", str(second), "--timeout",
                          "400", "--interval", "1"], env=fed.env, timeout=420, check=False)
        assert waited.returncode == 0, (waited.stdout, waited.stderr)
        assert waited.stdout.strip() == f"run {second} completed"
        compared = json.loads(fed.coord_cli("compare", str(run_id), str(second),
                                            "--json").stdout)
        assert compared["config"] == {"rounds": {"a": 12, "b": 1}}
        assert compared["rounds"][0]["round"] == 1
        assert compared["rounds"][0]["b"]["eval-accuracy"] is not None
        assert compared["final"] and all(v["a"] is None and v["b"] is not None
                                         for v in compared["final"].values())
        text = fed.coord_cli("compare", str(run_id), str(second)).stdout
        assert all(len(line) <= 80 for line in text.splitlines()), text
        assert fed.coord_cli("wait", "999", check=False).returncode == 1


def test_cancel_a_run_waiting_for_approval_tells_every_site() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        names = [s["name"] for s in fed.data["sites"]]
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
        careful = names[1]
        edit_site_policy(fed.sites[careful], require_approval=True)
        for name in names:
            fed.start_site(name)
        fed.wait_online(len(names), timeout=180)
        third = fed.launch(task="breast_cancer_mlp", rounds=3, local_epochs=1, epsilon=3.0,
                           min_sites=2, round_deadline_s=DEADLINE_S, approval_wait_s=600)
        _poll(fed, third, lambda r: r["waiting_for_approval"] == [careful], 180)
        asked = time.monotonic()
        fed.coord_cli("cancel", str(third), "--reason", "not needed", "--wait")
        took = time.monotonic() - asked
        run = fed.api("GET", f"/runs/{third}").json()
        assert run["status"] == "cancelled" and run["waiting_for_approval"] == [], run
        assert took <= DEADLINE_S + 5, f"cancelled after {took:.1f} s"
        print(f"cancelled {took:.1f} s after the request (waiting for approval)")
        assert fed.api("GET", f"/runs/{third}/rounds").json() == []
        assert sorted(_site_cancellations(fed, third)) == sorted(names)
        # Each site shows the run cancelled; the approval it waited for is closed.
        for name in names:
            row = _site_run(fed, name, third)
            assert (row["status"], row["cancelled_by"], row["cancel_reason"]) == (
                "cancelled", "admin", "not needed"), row
        assert _site_run(fed, careful, third)["last_refusal"] is None
        late = run_cli([str(BIN / "fedward-site"), "approve", str(third), "--dir",
                        str(fed.sites[careful].root), "--by", "it"], check=False)
        assert late.returncode == 1 and "cannot be approved" in " ".join(late.stderr.split()), (
            late.stdout, late.stderr)
        _no_process_left(fed)
