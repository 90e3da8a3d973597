"""What the site agent learns from its SuperNode's log while it runs.

Flower's SuperNode reports its state only in its log. The agent follows that log for two
things hospital IT should not have to dig for:

* a coordinator outage, told once when it ends: when the coordinator answers again, every
  call the SuperNode was retrying goes through and Flower logs how long it waited
  (:func:`fedward.flower.exit_codes.reconnect_delays`);
* a SuperNode that no longer takes tasks: it received a message (Flower then waits for
  the reply before it takes the next one) while no task reached the site's executor for a
  long time. The SuperNode patch (:mod:`fedward.flower.supernode`) answers a task that
  ends without a reply, so this should not happen; should it all the same, the agent
  restarts the SuperNode rather than leave the site deaf until someone notices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedward.flower.exit_codes import reconnect_delays

__all__ = ["OUTAGE_REPORT_S", "STUCK_AFTER_S", "SupernodeWatch"]

# A coordinator that did not answer for less than this was a blip, not news for hospital IT.
OUTAGE_REPORT_S: Final = 10.0
# How long a received message may wait for a task to reach the executor. A task is taken
# within a second of its message arriving; training time does not count (the executor is
# busy then).
STUCK_AFTER_S: Final = 90.0

# Flower's SuperNode log lines (flwr/supernode/start_client_internal.py): a message is in
# and its reply is awaited; the wait is over (a reply sent, or the message given up).
_RECEIVED: Final = b"Received successfully"
# Flower's HTTP retry, each time a call to the SuperLink fails and is tried again; and
# lines that only an answer from the SuperLink produces.
_RETRYING: Final = b"Connection attempt failed"
_BACK: Final = (b"Connection successful", b"Receiving:", b"Received successfully",
                b"Failed to receive", b"Sent successfully", b"Ignoring", b"SuperNode ID:")
_WAIT_OVER: Final = (b"Sending:", b"Failed to receive", b"Ignoring message",
                     b"Ignoring reply", b"SuperNode ID:")


@dataclass
class SupernodeWatch:
    """Follows one SuperNode's log from ``offset`` (where this SuperNode's lines start).

    Call :meth:`poll` regularly; it reads what was added since.
    """

    log_path: Path
    offset: int
    _partial: bytes = b""
    _last_report: float = float("-inf")
    _outage: float | None = None
    _failing_since: float | None = None
    awaiting_since: float | None = None

    def poll(self, now: float | None = None) -> None:
        """Read the lines added since the last call."""
        now = time.monotonic() if now is None else now
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return
        self.offset += len(chunk)
        done, _, self._partial = (self._partial + chunk).rpartition(b"\n")
        # How long calls kept failing, as seen here: a call that ends otherwise than by
        # going through (say, "run no longer running") logs no reconnect delay.
        seen_down = 0.0
        for line in done.split(b"\n"):
            if _RETRYING in line:
                if self._failing_since is None:
                    self._failing_since = now
                continue
            if self._failing_since is not None and any(mark in line for mark in _BACK):
                seen_down, self._failing_since = now - self._failing_since, None
            if _RECEIVED in line:
                self.awaiting_since = now
            elif any(mark in line for mark in _WAIT_OVER):
                self.awaiting_since = None
        longest = max([seen_down, *reconnect_delays(done)])
        # Several calls come back after one outage: reports closer together than the
        # outage itself are the same outage.
        if longest >= OUTAGE_REPORT_S and now - self._last_report >= max(longest, 30.0):
            self._last_report = now
            self._outage = longest

    def outage_ended(self) -> float | None:
        """The length (seconds) of an outage that ended since the last call, or None."""
        outage, self._outage = self._outage, None
        return outage

    def stuck_for(self, *, executor_active_at: float, executor_busy: bool,
                  now: float | None = None) -> float | None:
        """How long the SuperNode has waited for a reply that no task is working on, once
        neither it nor the executor has moved for :data:`STUCK_AFTER_S`; None while all
        is well.

        Args:
            executor_active_at: when the executor last took or finished a task
                (``time.monotonic()``).
            executor_busy: whether the executor is running a task now.
            now: the current ``time.monotonic()`` (for tests).
        """
        now = time.monotonic() if now is None else now
        if self.awaiting_since is None or executor_busy:
            return None
        # Waiting, and nothing has happened at the executor for that long either (a task
        # that ended without its reply counts as nothing happening after it ended).
        waited = now - max(self.awaiting_since, executor_active_at)
        return now - self.awaiting_since if waited >= STUCK_AFTER_S else None
