"""The round loop's side of cancelling a run (the request itself: :mod:`coordinator.run_control`).

:meth:`CancelWatch.check` reads the run's row at most every :data:`CANCEL_POLL_S` seconds
from every loop that waits and raises :class:`~coordinator.run_errors.RunCancelled` once
someone asked to cancel; :meth:`CancelWatch.end` then ends the round in progress as
``cancelled``, sends every online site of the run a cancel message and waits (bounded) for
their acknowledgements, audits which sites were told (``run.cancel_delivered``) and ends the
run as ``cancelled``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine

from coordinator import repository, round_records
from coordinator.run_errors import RunCancelled
from fedward.run_config import RunPlan
from fedward.wire import CANCEL_BY, CANCEL_MESSAGE_TYPE, CANCEL_REASON, TASK_CONFIG

__all__ = ["CANCEL_NOTIFY_MAX_S", "CANCEL_POLL_S", "CancelWatch"]

log = logging.getLogger("fedward.coordinator.rounds")

_POLL_S = 0.1
# How often the round loop looks for a cancel request (one short read of the run's row).
CANCEL_POLL_S: Final = 1.0
# The longest the round loop waits for the sites to acknowledge a cancellation (at most the
# run's round deadline): a site busy with the round's task answers once it is done.
CANCEL_NOTIFY_MAX_S: Final = 60.0


@dataclass
class CancelWatch:
    """Notices a cancel request for one run, and ends the run once one came.

    Args:
        grid: the Flower Grid of this run.
        engine: the coordinator database.
        run_id: the run.
        site_nodes: the online nodes of the run's sites (node id -> site name).
        clock: monotonic seconds (deadlines).
        poll_s: how often the run's row is read for a cancel request.
    """

    grid: Grid
    engine: Engine
    run_id: int
    site_nodes: Callable[[], dict[int, str]]
    clock: Callable[[], float] = field(default=time.monotonic)
    poll_s: float = CANCEL_POLL_S
    # When the run's row is next read for a cancel request (clock seconds).
    _next_check: float = field(default=-math.inf, init=False, repr=False)

    def check(self, *, now: bool = False) -> None:
        """Raise :class:`RunCancelled` once someone asked to cancel the run.

        Reads the run's row at most every :attr:`poll_s` seconds (always with
        ``now``); called from every loop that waits (admission, sites coming online,
        replies), so a cancel is noticed within about a second wherever the run is.
        """
        clock = self.clock()
        if not now and clock < self._next_check:
            return
        self._next_check = clock + self.poll_s
        request = repository.cancel_request(self.engine, self.run_id)
        if request is not None:
            raise RunCancelled(*request)

    def end(self, cancel: RunCancelled, *, plan: RunPlan,
            current: tuple[int, float] | None) -> None:
        """End a cancelled run: its round, the sites told (and audited), then the run.

        Args:
            cancel: who cancelled the run and why.
            plan: the run's plan (as the round loop holds it now).
            current: the round in progress and when it started, if one is.
        """
        log.warning("run %s %s", plan.run_id, cancel)
        if current is not None:
            number, t0 = current
            round_records.finish_round(self.engine, plan.run_id, number, status="cancelled",
                                       participating=[], failed=[], late=[],
                                       seconds=self.clock() - t0)
        told, not_told = self._tell_sites(cancel, plan)
        repository.note_cancel_delivered(self.engine, plan.run_id, told=told,
                                         not_told=not_told)
        repository.finish_run(self.engine, plan.run_id, status="cancelled", reason=str(cancel))

    def _tell_sites(self, cancel: RunCancelled, plan: RunPlan
                    ) -> tuple[list[str], dict[str, str]]:
        """Send every online site of the run the cancellation; wait (bounded) for acks.

        Returns:
            The sites that acknowledged it, and the others with why not.
        """
        wait = max(1.0, min(plan.round_deadline_s, CANCEL_NOTIFY_MAX_S))
        not_told: dict[str, str] = {}
        told: list[str] = []
        try:
            nodes = self.site_nodes()
            for site in sorted(set(plan.sites) - set(nodes.values())):
                not_told[site] = "offline"
            config = ConfigRecord({**plan.task_config(0, train=False),
                                   CANCEL_BY: cancel.by[:64], CANCEL_REASON: cancel.reason[:500]})
            msgs = [Message(content=RecordDict({TASK_CONFIG: config}), dst_node_id=node_id,
                            message_type=CANCEL_MESSAGE_TYPE,
                            group_id=f"run-{plan.run_id}-cancel", ttl=wait)
                    for node_id in nodes]
            ids = list(self.grid.push_messages(msgs))
            pending = {mid: nodes[m.metadata.dst_node_id]
                       for mid, m in zip(ids, msgs, strict=True) if mid}
            deadline = self.clock() + wait
            while pending and self.clock() < deadline:
                for reply in self.grid.pull_messages(list(pending)):
                    answered = pending.pop(reply.metadata.reply_to_message_id, None)
                    if answered is None:
                        continue
                    if reply.has_error():
                        not_told[answered] = (reply.error.reason or "error").splitlines()[0][:300]
                    else:
                        told.append(answered)
                if pending:
                    time.sleep(_POLL_S)
            for site in pending.values():
                not_told[site] = f"no answer within {wait:.0f} s"
        except Exception as err:  # the run ends cancelled whatever the Grid does
            log.error("run %s: could not tell every site of the cancellation: %s",
                      plan.run_id, err)
            for site in plan.sites:
                if site not in told:
                    not_told.setdefault(site, f"not told: {str(err)[:200]}")
        return sorted(told), dict(sorted(not_told.items()))
