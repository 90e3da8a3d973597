"""Start ``flower-supernode`` with a short idle fetch interval.

flwr 1.42's SuperNode sleeps a fixed 3 s whenever a fetch from the SuperLink finds no
message, and 0.5 s while waiting for its ClientApp's reply
(``flwr/supernode/start_client_internal.py``); there is no option for either. Those sleeps
are most of a round's latency on a small model. This entry point caps every sleep in that
one module (and nowhere else) at ``FEDWARD_SUPERNODE_POLL_S`` seconds, then runs Flower's
own ``flower_supernode`` unchanged. It also shortens the back-off of that module's object
pulls (Flower waits 1 s before the first retry of an object still being uploaded). It
relies on flwr being pinned to one exact version; tests check that the patched module
still sleeps and pulls where this assumes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flwr.supernode.start_client_internal as _start_client_internal
from flwr.supernode.cli.flower_supernode import flower_supernode

from export.runtime import with_short_backoff

__all__ = ["POLL_ENV", "ShortSleep", "main"]

POLL_ENV = "FEDWARD_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.25


class ShortSleep:
    """Stands in for the ``time`` module: the same, except that sleeps are capped."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def main() -> None:
    """Console entry point: ``python -m site_agent.supernode_main <flower-supernode args>``."""
    cap = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
    setattr(_start_client_internal, "time", ShortSleep(max(0.05, cap)))  # noqa: B010
    setattr(_start_client_internal, "pull_objects",  # noqa: B010
            with_short_backoff(getattr(_start_client_internal, "pull_objects")))  # noqa: B009
    flower_supernode()


if __name__ == "__main__":
    main()
