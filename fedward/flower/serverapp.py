"""The ServerApp's touches of Flower internals: a shorter, bounded object-pull back-off,
and the error codes of expired messages."""

from __future__ import annotations

from typing import Final

from flwr.common.constant import ErrorCode

from fedward.flower.backoff import with_short_backoff

__all__ = ["EXPIRED_ERROR_CODES", "NODE_UNAVAILABLE_CODE", "REPLY_PULL_MAX_S",
           "shorten_object_pulls"]

# Flower's error replies for a message or reply whose time to live ran out.
EXPIRED_ERROR_CODES: Final = frozenset({int(ErrorCode.MESSAGE_UNAVAILABLE),
                                        int(ErrorCode.REPLY_MESSAGE_UNAVAILABLE)})
# The SuperLink's error reply for a message whose destination node missed its heartbeats
# (also a node that was up all along while the SuperLink itself was down).
NODE_UNAVAILABLE_CODE: Final = int(ErrorCode.NODE_UNAVAILABLE)
REPLY_PULL_MAX_S: Final = 20.0
"""How long the ServerApp waits for a listed reply's content. Flower retries a missing
object 500 times (with the short back-off, about four minutes) inside one ``pull_messages``
call: the reply of a site that died while uploading it held every other site's reply, and
the round, that long. Past this the reply is an error ("Reply message objects are
unavailable") and the site is counted failed for the round, as a site that never answered."""


def shorten_object_pulls() -> None:
    """Give the deployment Grid's object pulls the appliance's short back-off and bound them.

    A reply pulled while its objects are still being uploaded waits 1 s in Flower before
    the first retry (see :mod:`fedward.flower.backoff`), and a reply whose objects never
    arrive is retried for minutes: here each pull gives up after :data:`REPLY_PULL_MAX_S`.
    The patch replaces the name ``pull_objects`` in ``flwr.superlink.grid.http_grid`` only,
    once per process (imported here: only the ServerApp process needs that module).
    """
    from flwr.superlink.grid import http_grid

    current = getattr(http_grid, "pull_objects")  # noqa: B009
    if getattr(current, "func", None) is not None:
        return  # already patched in this process
    setattr(http_grid, "pull_objects",  # noqa: B010
            with_short_backoff(current, max_time=REPLY_PULL_MAX_S))
