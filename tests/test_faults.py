"""Fault injection with real processes: stragglers and sites that die and come back."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from federation import Federation, federation
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

def _agent_pid(fed: Federation, name: str) -> int:
    """The site agent's Python process (the site is started under `timeout`)."""
    proc = fed.sites[name].proc
    assert proc is not None
    from fedward.procs import descendants

    for pid in descendants(proc.pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if "fedward-site" in cmd and "start" in cmd:
            return pid
    raise AssertionError("site agent process not found")


def _ledger_rounds(fed: Federation, name: str) -> dict[int, str]:
    """Round number -> state ("reserved" or "charged") in a site's privacy ledger.

    The sites in these tests take part in one run each, so rounds are not told apart by run.
    Read with SQLite itself (a read sees committed transactions only), never creating the
    file: an empty file would not be a ledger.
    """
    path = fed.sites[name].root / "privacy-ledger.sqlite"
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return {}  # not created yet
    try:
        rows = con.execute("SELECT round, state FROM entries WHERE purpose = 'round'")
        return {int(n): str(state) for n, state in rows}
    except sqlite3.OperationalError:
        return {}  # being created
    finally:
        con.close()


def _on_training(fed: Federation, names: list[str], act: Callable[[], None], *,
                 rounds: Collection[int] | None = None,
                 timeout: float = 120) -> tuple[str, int]:
    """Call ``act`` the moment one of the sites ``names`` is training a round.

    The ledger charges a round ("reserved") before the site touches its data and marks it
    "charged" after training, just before the site answers: in between, the round is charged
    at the site and its answer has not left it. ``rounds`` limits which round numbers
    count; once all of them are done at every site, the moment was missed and this fails.
    Returns the site and the round it was training.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {name: _ledger_rounds(fed, name) for name in names}
        for name, ledger in seen.items():
            training = sorted(n for n, status in ledger.items() if status == "reserved"
                              and (rounds is None or n in rounds))
            if training:
                act()
                return name, training[0]
        if rounds is not None and all(seen[name].get(n) == "charged"
                                      for name in names for n in rounds):
            raise AssertionError(f"{names} trained rounds {sorted(rounds)} between two looks "
                                 "at their ledgers")
        time.sleep(0.002)
    raise AssertionError(f"none of {names} was seen training a round within {timeout} s")


def _kill_while_training(fed: Federation, name: str, timeout: float = 120) -> int:
    """SIGKILL a site agent while a round is charged but not yet done: mid-training.

    Returns the number of the round that was cut short.
    """
    return _on_training(fed, [name], lambda: fed.kill_site(name), timeout=timeout)[1]


def _utc(stamp: str) -> datetime:
    at = datetime.fromisoformat(stamp)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _by_round(entries: list[Any], run_id: int, action: str) -> dict[int, list[Any]]:
    """A site's audit entries of one action for one run, by round number."""
    out: dict[int, list[Any]] = {}
    for e in entries:
        if e.action == action and e.detail.get("run") == str(run_id):
            out.setdefault(int(e.detail["round"]), []).append(e)
    return out


def _run_events(fed: Federation, run_id: int, action: str) -> list[dict[str, Any]]:
    return [e for e in fed.audit_events()
            if e["action"] == action and e["subject"] == f"run:{run_id}"]


def test_straggler_answers_late_and_its_late_reply_is_not_used() -> None:
    with short_tmp() as work, federation(work, n_sites=3) as fed:
        sites = fed.join_all_sites()
        slow = sites[2]
        # Only the straggler's round waits for its deadline (the others end once every
        # site answered); round 1 includes each site's noise calibration: give it room.
        # Two local epochs keep a site busy with a round long enough to be caught at it.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=4, local_epochs=2, epsilon=3.0,
                            min_sites=2, round_deadline_s=30)
        pid = _agent_pid(fed, slow)
        frozen: list[datetime] = []

        def freeze() -> None:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(datetime.now(UTC))

        # The site hangs in the middle of training a round: it holds the task, charged,
        # and will answer it once it wakes up.
        _, late = _on_training(fed, [slow], freeze, rounds=(2, 3), timeout=180)
        try:
            fed.wait_round(run_id, late, timeout=120, interval=0.1)
        finally:
            os.kill(pid, signal.SIGCONT)  # it wakes up and answers, too late
        run = fed.wait_run(run_id)
        assert run["status"] == "completed", run
        rounds = {r["number"]: r for r in fed.api("GET", f"/runs/{run_id}/rounds").json()}
        assert sorted(rounds) == [1, 2, 3, 4]
        assert sorted(rounds[late]["participating_sites"]) == sorted(sites[:2])
        named = {f["site"]: f["reason"] for f in rounds[late]["failed_sites"]}
        # Under load this can read Flower's "Message Unavailable" instead: the round's
        # messages expire at the deadline itself, and a last pull that reaches the
        # SuperLink after that gets the SuperLink's expiry error, taken as the site's answer.
        assert named.get(slow, "").startswith("late"), rounds[late]
        assert rounds[late]["late_sites"] == [slow]

        # The straggler did answer that round: it was charged for it (seen in its ledger)
        # while the round was open, and trained and answered it only after the coordinator
        # had closed the round. (Its "round-reserved" audit entry is written just before
        # the ledger's charge, inside the reservation.)
        entries = fed.site_audit(slow)
        trained = _by_round(entries, run_id, "round-trained")
        assert late in trained, f"the straggler never answered round {late}"
        assert all(len(v) == 1 for v in trained.values()), trained
        closed = _utc(rounds[late]["finished_at"])
        assert frozen[0] < closed < _utc(trained[late][0].at), (
            frozen, rounds[late], trained[late])

        # Nothing the coordinator kept from the straggler is that late answer. Its epsilon
        # grows every round, so each answer names the round it was trained for.
        metrics = {m["round"]: m["sites"] for m in
                   fed.api("GET", f"/runs/{run_id}/metrics").json()["rounds"]}
        assert slow not in metrics.get(late, {})
        updates = {e["detail"]["round"]: e["detail"]["sha256"]
                   for e in _run_events(fed, run_id, "round.updates")}
        assert slow not in updates[late]
        again = [n for n in sorted(rounds) if n > late and slow in rounds[n]["participating_sites"]]
        assert again, "the straggler never took part again: nothing shows its late answer unused"
        late_eps = trained[late][0].detail["epsilon_spent"]
        for n in again:
            counted = metrics[n][slow]["epsilon-spent"]
            assert counted == pytest.approx(trained[n][0].detail["epsilon_spent"], rel=1e-9)
            assert counted != pytest.approx(late_eps, rel=1e-9)
            assert slow in updates[n]


def test_site_killed_mid_round_is_named_keeps_its_epsilon_and_rejoins() -> None:
    from privacy import PrivacyLedger

    with short_tmp() as work, federation(work, n_sites=3) as fed:
        sites = fed.join_all_sites()
        # Round 1 includes each site's noise calibration: give it room on a busy machine.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=14, local_epochs=1,
                            epsilon=8.0, min_sites=2, round_deadline_s=20)
        fed.wait_round(run_id, 1, timeout=120, interval=0.1)
        cut = _kill_while_training(fed, sites[2])
        # What the killed agent left behind: a whole ledger in which the round it was
        # training is charged (write-ahead), never forgotten.
        ledger = PrivacyLedger(fed.sites[sites[2]].root / "privacy-ledger.sqlite")
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
        after = PrivacyLedger(fed.sites[sites[2]].root / "privacy-ledger.sqlite")
        final = after.get_run(site_run)
        assert final is not None and cut in final.rounds
        assert len(final.history) == len(final.rounds)
        assert after.epsilon_spent(site_run) > spent_at_kill


def test_coordinator_killed_while_a_site_trains_resumes_from_the_last_checkpoint() -> None:
    from privacy import DpSgd, PrivacyLedger, compose_mechanisms

    with short_tmp() as work, federation(work, n_sites=2) as fed:
        names = fed.join_all_sites()
        # After a SuperLink crash Flower keeps the nodes "active" for about 60 s, so sites
        # may need that long to come back: the deadline must cover it. Three local epochs
        # keep a site busy with a round long enough to be caught at it.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=4, local_epochs=3, epsilon=3.0,
                            min_sites=2, round_deadline_s=180)
        # SIGKILL the coordinator and everything it runs (SuperLink, ServerApp) while a site
        # trains round 3: it has charged the round, the coordinator has not got its answer
        # (nor can it have finished the round, which needs both sites). A site reserves
        # round 3 well under a second after round 2 ends: the ledgers are watched from now.
        caught, _ = _on_training(fed, names, fed.kill_coordinator, rounds=(3,), timeout=240)
        killed_at = datetime.now(UTC)
        fed.restart_coordinator()
        run = fed.wait_run(run_id, timeout=330)
        assert run["status"] == "completed", run.get("failure_reason")

        # Resumed after round 2: rounds 1 and 2 and their checkpoints date from before the
        # crash, untouched; round 3 was started again after the restart and ran once.
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [r["number"] for r in rounds] == [1, 2, 3, 4]
        assert all(r["status"] == "completed" for r in rounds)
        assert all(_utc(r["finished_at"]) < killed_at for r in rounds[:2]), rounds
        assert _utc(rounds[2]["started_at"]) > killed_at, rounds[2]
        # A resumed round waits for its sites, never for a deadline: nothing stalled.
        assert all(r["seconds"] < 120 for r in rounds), rounds
        ckpts = fed.api("GET", f"/runs/{run_id}/checkpoints").json()
        assert [c["round_number"] for c in ckpts] == [1, 2, 3, 4]
        assert all(_utc(c["created_at"]) < killed_at for c in ckpts[:2]), ckpts
        saved = _run_events(fed, run_id, "checkpoint.saved")
        (relaunch,) = _run_events(fed, run_id, "run.relaunched")
        assert [(e["detail"]["round"], e["detail"]["sha256"]) for e in saved] == [
            (c["round_number"], c["sha256"]) for c in ckpts]
        assert saved[1]["id"] < relaunch["id"] < saved[2]["id"]

        # The coordinator's audit log: intact, and each round's updates and checkpoint
        # recorded once (round 3's after the relaunch only).
        assert fed.api("GET", "/audit/verify").json()["first_broken_id"] is None
        for action in ("round.updates", "checkpoint.saved"):
            per_round = Counter(e["detail"]["round"] for e in _run_events(fed, run_id, action))
            assert per_round == {1: 1, 2: 1, 3: 1, 4: 1}, (action, per_round)

        metrics = {m["round"]: m["sites"] for m in
                   fed.api("GET", f"/runs/{run_id}/metrics").json()["rounds"]}
        for name in names:
            # Each site's own audit log: its chain verifies, it trained every round exactly
            # once, and after the crash it was never asked for round 1 or 2 again.
            entries = fed.site_audit(name)
            trained = _by_round(entries, run_id, "round-trained")
            assert {n: len(v) for n, v in trained.items()} == {1: 1, 2: 1, 3: 1, 4: 1}
            asked_after = {int(e.detail["round"]) for e in entries
                           if _utc(e.at) > killed_at and e.detail.get("run") == str(run_id)
                           and "round" in e.detail}
            assert min(asked_after) == 3, (name, asked_after)
            if name == caught:
                # Asked again for round 3 with the same global model (round 2's
                # checkpoint), it answered from its stored reply instead of training again.
                replayed = _by_round(entries, run_id, "round-replayed")
                assert 3 in replayed, [e.action for e in entries]
                assert _utc(trained[3][0].at) < _utc(replayed[3][0].at)
            # The privacy ledger charged each round it trained once: its epsilon is exactly
            # that of four rounds, and it is what the site reported after round 4.
            ledger = PrivacyLedger(fed.sites[name].root / "privacy-ledger.sqlite")
            (site_run,) = ledger.run_ids()
            view = ledger.get_run(site_run)
            assert view is not None
            assert {n: r.status for n, r in view.rounds.items()} == {
                1: "charged", 2: "charged", 3: "charged", 4: "charged"}
            steps = {r.steps for r in view.rounds.values()}
            assert len(steps) == 1
            one_round = (view.noise_multiplier, view.sample_rate, steps.pop())
            assert list(view.history) == [one_round] * 4
            spent = ledger.epsilon_spent(site_run)
            assert spent == pytest.approx(compose_mechanisms(
                [DpSgd(*one_round)] * len(trained), delta=view.delta).epsilon, rel=1e-9)
            assert spent == pytest.approx(trained[4][0].detail["epsilon_spent"], rel=1e-9)
            assert spent == pytest.approx(metrics[4][name]["epsilon-spent"], rel=1e-9)
            assert spent <= 3.0
