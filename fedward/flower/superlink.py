"""Start ``flower-superlink`` with fetches that wait for a message instead of coming back
empty (long polling).

flwr 1.42's SuperLink answers every fetch at once. A SuperNode with nothing to do asks
again 1-4 times a second (:mod:`fedward.flower.supernode`), and the ServerApp asks for its
round's replies 10 times a second (``coordinator/round_exchange.py``): most of those
requests come back empty, and each costs the SuperLink about 10 ms of CPU (HTTP, node
authentication, protobuf, its state database). That was the largest share of a
coordinator's CPU during a run, and it grows with the number of sites.

This entry point patches one of Flower's request handlers, then runs Flower's own
``flower_superlink`` unchanged: a node's fetch of its messages (Fleet ``PullMessages``) that
finds none waits up to :data:`FLEET_HOLD_S` for one to be stored for any node, then looks
again.

The ServerApp's fetch of replies (ServerAppIo ``PullMessages``) is left as Flower answers
it. Holding it too (up to 1 s) made rounds about 0.15 s slower at 3 sites (median over 5
alternating pairs of runs), probably because it answered a reply before its content was
uploaded and the ServerApp then waited in its object pull's back-off; with only the nodes'
fetches held, rounds took as long as before (2 pairs). :func:`holding` can wrap that
handler too once that is solved.

A message stored while a fetch waits is answered at once. The wait is woken by the method
of the SuperLink's state that stores messages for nodes (:class:`Arrivals`); the handler
itself is Flower's, called again, so what a fetch answers is what Flower would answer.
At most :data:`HOLD_SLOTS` fetches wait at once (each holds a thread of the server's
pool, which other requests, heartbeats among them, need too); a fetch beyond that is
answered at once, as before.
A SuperLink that is stopping answers every waiting fetch at once (uvicorn, which serves the
SuperLink, waits for the requests in progress before it stops).

Flower's HTTP clients wait 30 s for an answer (``ProtobufClient``), the site gateway 60 s:
both far above the holds. It relies on flwr being pinned to one exact version;
``tests/test_superlink_hold.py`` checks that the patched handler and methods are still
where this assumes.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

import uvicorn
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.superlink.cli import flower_superlink
from flwr.superlink.servicer.fleet import fleet_handlers

__all__ = ["FLEET_HOLD_S", "HOLD_ENV", "HOLD_SLOTS", "Arrivals", "holding",
           "main"]

FLEET_HOLD_S: Final = 5.0
"""How long a node's fetch that finds no message waits for one."""
HOLD_SLOTS: Final = 16
"""The most fetches waiting at once, node and ServerApp fetches together."""
HOLD_ENV: Final = "FEDWARD_SUPERLINK_HOLD"
"""Set to ``0`` to answer every fetch at once, as Flower does (for comparisons)."""


class Arrivals:
    """A count of the messages stored, that waiting fetches watch.

    Waiters read the count *before* they look for messages, so a message stored while they
    look is never missed: the count has moved on by the time they wait.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0
        self._closing = False

    def count(self) -> int:
        with self._cond:
            return self._count

    def arrived(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def close(self) -> None:
        """The server is stopping: wake every waiter, and wait no more."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    @property
    def closing(self) -> bool:
        return self._closing

    def wait_past(self, seen: int, timeout: float) -> bool:
        """Up to ``timeout`` s for the count to move past ``seen``; True if it did (False
        on time-out or when closing)."""
        with self._cond:
            self._cond.wait_for(lambda: self._count != seen or self._closing, timeout)
            return self._count != seen and not self._closing


def holding(handler: Callable[..., Any], arrivals: Arrivals, *, hold_s: float,
            slots: threading.BoundedSemaphore) -> Callable[..., Any]:
    """``handler`` (a pull handler whose response has ``messages_list``), waiting up to
    ``hold_s`` for a message when it finds none: it is called again each time one arrives,
    until it finds one or the time is up."""
    @functools.wraps(handler)
    def patched(*args: Any, **kwargs: Any) -> Any:
        seen = arrivals.count()
        response = handler(*args, **kwargs)
        if response.messages_list or arrivals.closing or not slots.acquire(blocking=False):
            return response
        try:
            deadline = time.monotonic() + hold_s
            while not response.messages_list:
                left = deadline - time.monotonic()
                if left <= 0 or not arrivals.wait_past(seen, left):
                    break
                seen = arrivals.count()
                response = handler(*args, **kwargs)
        finally:
            slots.release()
        return response
    return patched


def noting_arrivals(store: Callable[..., Any], arrivals: Arrivals) -> Callable[..., Any]:
    """A state's ``store_message_ins``, counting what it stored (it returns the message id,
    None when it refused the message)."""
    @functools.wraps(store)
    def patched(self: Any, message: Any, *args: Any, **kwargs: Any) -> Any:
        stored = store(self, message, *args, **kwargs)
        if stored is not None:
            arrivals.arrived()
        return stored
    return patched


def closing_on_exit(handle_exit: Callable[..., Any], arrivals: Arrivals) -> Callable[..., Any]:
    """uvicorn's ``Server.handle_exit`` (its SIGTERM and SIGINT handler), first waking the
    waiting fetches: uvicorn lets the requests in progress finish before it stops."""
    @functools.wraps(handle_exit)
    def patched(self: Any, sig: int, frame: FrameType | None) -> None:
        arrivals.close()
        handle_exit(self, sig, frame)
    return patched


def install(arrivals: Arrivals) -> None:
    """Patch the SuperLink's node fetch and its state's stores (see the module doc)."""
    slots = threading.BoundedSemaphore(HOLD_SLOTS)
    for cls in (SqlLinkState, InMemoryLinkState):
        setattr(cls, "store_message_ins",  # noqa: B010
                noting_arrivals(getattr(cls, "store_message_ins"), arrivals))  # noqa: B009
    setattr(fleet_handlers, "pull_messages",  # noqa: B010
            holding(fleet_handlers.pull_messages, arrivals, hold_s=FLEET_HOLD_S, slots=slots))
    setattr(uvicorn.Server, "handle_exit",  # noqa: B010
            closing_on_exit(uvicorn.Server.handle_exit, arrivals))


def main() -> None:
    """Console entry point: ``python -m fedward.flower.superlink <flower-superlink args>``."""
    if os.environ.get(HOLD_ENV, "1") != "0":
        arrivals = Arrivals()
        install(arrivals)
    flower_superlink()


if __name__ == "__main__":
    main()
