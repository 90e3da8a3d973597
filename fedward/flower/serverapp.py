"""The ServerApp's touches of Flower internals: a shorter object-pull back-off, and the
error codes of expired messages."""

from __future__ import annotations

from typing import Final

from flwr.common.constant import ErrorCode

from fedward.flower.backoff import with_short_backoff

__all__ = ["EXPIRED_ERROR_CODES", "NODE_UNAVAILABLE_CODE", "shorten_object_pulls"]

# Flower's error replies for a message or reply whose time to live ran out.
EXPIRED_ERROR_CODES: Final = frozenset({int(ErrorCode.MESSAGE_UNAVAILABLE),
                                        int(ErrorCode.REPLY_MESSAGE_UNAVAILABLE)})
# The SuperLink's error reply for a message whose destination node missed its heartbeats
# (also a node that was up all along while the SuperLink itself was down).
NODE_UNAVAILABLE_CODE: Final = int(ErrorCode.NODE_UNAVAILABLE)


def shorten_object_pulls() -> None:
    """Give the deployment Grid's object pulls the appliance's short back-off.

    A reply pulled while its objects are still being uploaded waits 1 s in Flower before
    the first retry (see :mod:`fedward.flower.backoff`). The patch replaces the name
    ``pull_objects`` in ``flwr.superlink.grid.http_grid`` only, once per process (imported
    here: only the ServerApp process needs that module).
    """
    from flwr.superlink.grid import http_grid

    current = getattr(http_grid, "pull_objects")  # noqa: B009
    if getattr(current, "func", None) is not None:
        return  # already patched in this process
    setattr(http_grid, "pull_objects", with_short_backoff(current))  # noqa: B010
