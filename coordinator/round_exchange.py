"""One exchange of a round: a task message per site, replies pulled until the deadline.

The round loop (:mod:`coordinator.round_loop`) sends each online site of the run the packed
global model with the round's task configuration and collects the replies on its own short
loop instead of the Grid's 3 s poll. A site that answers one message more than once is named
(neither answer is trusted), a site that does not answer in time is named late, and a resumed
run gives its sites time to reconnect (:data:`RECONNECT_WINDOW_S`): a site the SuperLink calls
unavailable meanwhile is sent its task again once it is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine

from coordinator import repository
from fedward.flower.serverapp import EXPIRED_ERROR_CODES, NODE_UNAVAILABLE_CODE
from fedward.run_config import RunPlan
from fedward.wire import CFG, PACKED, TASK_ARRAYS, TASK_CONFIG, pack_arrays, parse_layout

__all__ = ["RECONNECT_WINDOW_S", "RoundExchange", "online_site_nodes"]

log = logging.getLogger("fedward.coordinator.rounds")

_POLL_S = 0.1
# After a coordinator restart the SuperLink still holds each node's heartbeat deadline from
# before the outage: a site that was up all along can be declared "Node Unavailable" until
# it reconnects and sends a heartbeat (Flower: 2 x 30 s, plus the site's reconnect back-off).
# For this long after a resumed run starts, such a site is waited for (within each round's
# deadline) and sent its task again once it is back, instead of being counted as failed.
RECONNECT_WINDOW_S: Final = 150.0


def online_site_nodes(grid: Grid, engine: Engine, sites: Iterable[str]) -> dict[int, str]:
    """The Flower nodes online now of the registered sites among ``sites``: node id -> site
    name (a node that is no registered site, or not one of ``sites``, is left out)."""
    by_node = repository.site_names_by_node_id(engine)
    wanted = set(sites)
    online = set(grid.get_node_ids())
    return {int(n): s for n, s in by_node.items() if s in wanted and int(n) in online}


@dataclass
class RoundExchange:
    """The message exchanges of one run's rounds.

    Args:
        grid: the Flower Grid of this run.
        run_id: the run (it names each round's message group).
        site_nodes: the online nodes of the run's sites (node id -> site name).
        check_cancel: raises :class:`~coordinator.run_errors.RunCancelled` once someone
            asked to cancel the run (called while replies are awaited).
        clock: monotonic seconds (deadlines).
    """

    grid: Grid
    run_id: int
    site_nodes: Callable[[], dict[int, str]]
    check_cancel: Callable[[], None]
    clock: Callable[[], float] = field(default=time.monotonic)
    # The array layout of the packed model last sent (see fedward.wire.PACKED).
    layout: list[tuple[str, tuple[int, ...]]] = field(default_factory=list, init=False,
                                                     repr=False)
    # Monotonic time until which a resumed run waits for its sites to reconnect (0: fresh).
    reconnect_until: float = field(default=0.0, init=False, repr=False)
    # Sites the last exchange lost to "Node Unavailable" and never got back by the deadline.
    lost: set[str] = field(default_factory=set, init=False, repr=False)

    def reconnecting(self) -> bool:
        """True while a resumed run still gives its sites time to reconnect."""
        return self.clock() < self.reconnect_until

    def _task_message(self, node_id: int, flat: np.ndarray, config: ConfigRecord,
                      number: int, *, train: bool, ttl: float) -> Message:
        content = RecordDict({
            TASK_ARRAYS: ArrayRecord({PACKED: Array(flat)}),
            TASK_CONFIG: config,
        })
        return Message(
            content=content, dst_node_id=node_id,
            message_type=MessageType.TRAIN if train else MessageType.EVALUATE,
            group_id=f"run-{self.run_id}-round-{number}", ttl=ttl,
        )

    def _resend_to_reconnected(self, lost: dict[str, float], flat: np.ndarray,
                               config: ConfigRecord, number: int, *, train: bool,
                               deadline: float) -> dict[str, str]:
        """Send the task again to lost sites that are online again: message id -> site."""
        back = {node: site for node, site in self.site_nodes().items() if site in lost}
        if not back:
            return {}
        ttl = max(1.0, deadline - self.clock())
        msgs = [self._task_message(node, flat, config, number, train=train, ttl=ttl)
                for node in back]
        out: dict[str, str] = {}
        for mid, m in zip(self.grid.push_messages(msgs), msgs, strict=True):
            if mid:
                site = back[m.metadata.dst_node_id]
                out[mid] = site
                log.info("round %s: %s reconnected after %.1f s; its task is sent again",
                         number, site, self.clock() - lost.pop(site))
        return out

    def run(self, nodes: dict[int, str], arrays: dict[str, np.ndarray], number: int, *,
            plan: RunPlan, train: bool, deadline: float
            ) -> tuple[dict[str, Message], list[str], set[str]]:
        """Send one message per site and collect replies until all are in or the deadline.

        Returns the replies by site, the sites that did not answer in time, and the sites
        that answered one message more than once (neither answer is trusted).
        """
        ttl = max(1.0, deadline - self.clock())
        flat, layout = pack_arrays(arrays)
        # Replies are packed in the order of the layout sent: unpack them with it.
        self.layout = parse_layout(layout)
        config = ConfigRecord(plan.task_config(number, train=train))
        config[CFG.LAYOUT] = layout
        msgs = [self._task_message(node_id, flat, config, number, train=train, ttl=ttl)
                for node_id in nodes]
        t_push = self.clock()
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
                   if mid}
        answered: dict[str, str] = {}
        doubled: set[str] = set()
        replies: dict[str, Message] = {}
        lost: dict[str, float] = {}   # site -> when the SuperLink called it unavailable
        while (pending or lost) and self.clock() < deadline:
            self.check_cancel()
            if lost:
                pending.update(self._resend_to_reconnected(lost, flat, config, number,
                                                           train=train, deadline=deadline))
            for reply in self.grid.pull_messages(list(pending)) if pending else []:
                mid = reply.metadata.reply_to_message_id
                if reply.has_error() and reply.error.code in EXPIRED_ERROR_CODES:
                    # The SuperLink's own answer that the message (or its reply) expired:
                    # messages live until the deadline, so this is "no answer in time",
                    # and the site is named late when the deadline passes.
                    continue
                if reply.has_error() and reply.error.code == NODE_UNAVAILABLE_CODE and \
                        mid in pending and self.reconnecting():
                    # Most likely our own outage: the site's heartbeat deadline passed while
                    # the coordinator was down. Wait for it to reconnect, then ask again.
                    gone = pending.pop(mid)
                    lost[gone] = self.clock()
                    log.warning("round %s: %s is unavailable to the restarted coordinator; "
                                "waiting for it to reconnect", number, gone)
                    continue
                if mid in answered:
                    doubled.add(answered[mid])
                    continue
                site = pending.pop(mid, None)
                if site is not None:
                    answered[mid] = site
                    replies[site] = reply
                    log.info("round %s: reply from %s after %.2f s", number, site,
                             self.clock() - t_push)
            if pending or lost:
                time.sleep(_POLL_S)
        self.lost = set(lost)
        return replies, sorted({*pending.values(), *lost}), doubled
