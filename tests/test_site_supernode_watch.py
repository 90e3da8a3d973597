"""The agent's reading of its SuperNode's log: outages told once, a stuck SuperNode seen.

The log lines are Flower's own, as its SuperNode writes them (the integration test in
``test_site_recovery.py`` runs the real thing)."""

from __future__ import annotations

from pathlib import Path

from site_agent.supernode_watch import STUCK_AFTER_S, SupernodeWatch

RECEIVED = ("INFO :      [RUN 1, ROUND run-1-round-3]\n"
            "INFO :      Receiving: train message (ID: ab12)\n"
            "INFO :      Received successfully\n")
SENT = "INFO :      Sending: train message (ID: cd34)\nINFO :      Sent successfully\n"


def _append(log: Path, text: str) -> None:
    with log.open("a") as fh:
        fh.write(text)


def test_an_outage_is_told_once_with_its_length(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text("INFO :      SuperNode ID: 7\n")
    watch = SupernodeWatch(log, 0)
    watch.poll(now=100.0)
    assert watch.outage_ended() is None
    # Two calls come back after the same 41 s outage (and a short blip later on).
    _append(log, "WARNING :   Connection attempt failed, retrying in 0.26 seconds\n"
                 "INFO :      Connection successful after 41.20 seconds and 9 tries.\n"
                 "INFO :      Connection successful after 40.90 seconds and 8 tries.\n")
    watch.poll(now=200.0)
    assert watch.outage_ended() == 41.2
    assert watch.outage_ended() is None
    _append(log, "INFO :      Connection successful after 39.0 seconds and 8 tries.\n")
    watch.poll(now=205.0)
    assert watch.outage_ended() is None   # the same outage, a moment later
    _append(log, "INFO :      Connection successful after 2.50 seconds and 3 tries.\n")
    watch.poll(now=400.0)
    assert watch.outage_ended() is None   # a blip
    _append(log, "INFO :      Connection successful after 75.00 seconds and 14 tries")
    watch.poll(now=500.0)
    assert watch.outage_ended() is None   # the line is not complete yet
    _append(log, ".\n")
    watch.poll(now=501.0)
    assert watch.outage_ended() == 75.0


def test_a_received_message_that_no_task_works_on_is_seen_as_stuck(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text("")
    watch = SupernodeWatch(log, 0)
    _append(log, RECEIVED)
    watch.poll(now=1000.0)
    # The executor took the task and trains for a long time: not stuck.
    assert watch.stuck_for(executor_active_at=1000.5, executor_busy=True,
                           now=1000.0 + 10 * STUCK_AFTER_S) is None
    # The task ended without a reply and nothing happened since: stuck, once it lasts.
    assert watch.stuck_for(executor_active_at=1001.0, executor_busy=False,
                           now=1001.0 + STUCK_AFTER_S / 2) is None
    waited = watch.stuck_for(executor_active_at=1001.0, executor_busy=False,
                             now=1001.0 + STUCK_AFTER_S)
    assert waited is not None and waited >= STUCK_AFTER_S
    # The task had failed before the message's content arrived (a coordinator outage).
    assert watch.stuck_for(executor_active_at=970.0, executor_busy=False,
                           now=1000.0 + STUCK_AFTER_S) is not None
    # The reply goes out: the wait is over.
    _append(log, SENT)
    watch.poll(now=1000.0 + STUCK_AFTER_S)
    assert watch.stuck_for(executor_active_at=970.0, executor_busy=False,
                           now=1000.0 + 5 * STUCK_AFTER_S) is None


def test_a_message_given_up_is_not_awaited(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text(RECEIVED + "INFO :      Run ID 1 is not in `RUNNING` status. Ignoring reply "
                   "message cd34.\n")
    watch = SupernodeWatch(log, 0)
    watch.poll(now=0.0)
    assert watch.awaiting_since is None
    assert watch.stuck_for(executor_active_at=0.0, executor_busy=False, now=1e6) is None


def test_an_outage_whose_call_ends_without_going_through_is_told_too(tmp_path: Path) -> None:
    # After a coordinator restart the retried pull may end "run no longer running":
    # Flower then logs no reconnect delay; the watch times the failing stretch itself.
    log = tmp_path / "supernode.log"
    log.write_text(RECEIVED.split("INFO :      Received")[0])
    watch = SupernodeWatch(log, 0)
    watch.poll(now=10.0)
    _append(log, "WARNING :   Connection attempt failed, retrying in 0.70 seconds\n")
    watch.poll(now=11.0)
    _append(log, "WARNING :   Connection attempt failed, retrying in 9.51 seconds\n")
    watch.poll(now=40.0)
    assert watch.outage_ended() is None   # still down
    _append(log, "ERROR :     Failed to receive message ab12: the run is no longer running at "
                 "the SuperLink\n")
    watch.poll(now=58.0)
    assert watch.outage_ended() == 47.0

