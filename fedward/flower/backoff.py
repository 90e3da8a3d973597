"""A short, bounded back-off for Flower's object pulls.

Flower's object pulls wait 1 s before the first retry of an object that is not on the
server yet (a message whose upload is still under way), then double up to 10 s: most of a
round's latency whenever a message is fetched just before its objects land. The
appliance's own Flower processes (ServerApp, SuperNode, the site's task executor) use a
short, bounded back-off instead. The overall time limit stays Flower's unless the caller
gives its own (the ServerApp does: :mod:`fedward.flower.serverapp`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

__all__ = ["PULL_BACKOFF_CAP_S", "PULL_INITIAL_BACKOFF_S", "with_short_backoff"]

PULL_INITIAL_BACKOFF_S: Final = 0.05
PULL_BACKOFF_CAP_S: Final = 0.5


def with_short_backoff(pull_objects: Callable[..., Any], *,
                       max_time: float | None = None) -> Callable[..., Any]:
    """A Flower object-pull function (``pull_objects``, ``pull_and_inflate_object_from_tree``)
    with a short first back-off and cap and, given ``max_time``, that overall time limit;
    all else unchanged."""
    limit = {} if max_time is None else {"max_time": max_time}
    return functools.partial(pull_objects, initial_backoff=PULL_INITIAL_BACKOFF_S,
                             backoff_cap=PULL_BACKOFF_CAP_S, **limit)
