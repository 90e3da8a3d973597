"""Start ``flower-supernode`` with a short idle fetch interval.

flwr 1.42's SuperNode sleeps a fixed 3 s whenever a fetch from the SuperLink finds no
message, and 0.5 s while waiting for its ClientApp's reply
(``flwr/supernode/start_client_internal.py``); there is no option for either. Those sleeps
are most of a round's latency on a small model. This entry point caps every sleep in that
one module (and nowhere else) at ``FEDWARD_SUPERNODE_POLL_S`` seconds, then runs Flower's
own ``flower_supernode`` unchanged. It also shortens the back-off of that module's object
pulls (Flower waits 1 s before the first retry of an object still being uploaded), and
makes a run that ends while a message's content is being pulled fail that message's task
(see :func:`finish_tasks_of_ended_runs`). It relies on flwr being pinned to one exact
version; ``tests/test_flower_canaries.py`` checks that the patched module still sleeps
and pulls where this assumes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flwr.supernode.start_client_internal as _start_client_internal
from flwr.supercore.run import RunNotRunningException
from flwr.supernode.cli.flower_supernode import flower_supernode

from fedward.flower.backoff import with_short_backoff

__all__ = ["POLL_ENV", "RunEndedWhileReceiving", "ShortSleep", "finish_tasks_of_ended_runs",
           "main"]

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


class RunEndedWhileReceiving(RuntimeError):
    """The SuperLink said the message's run is no longer running while its content was
    being pulled (an ordinary error, so that Flower's own clean-up path handles it)."""


def _run_end_is_an_error(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except RunNotRunningException:
            raise RunEndedWhileReceiving(
                "the run is no longer running at the SuperLink") from None
    return wrapped


def finish_tasks_of_ended_runs(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``_pull_and_store_message``, except that a run ending mid-pull fails the task.

    In flwr 1.42 the SuperNode creates a task for a message and stores the message before it
    pulls the message's content. ``RunNotRunningException`` derives from ``BaseException``,
    so when it comes from that pull (or from the receipt confirmation) it skips the clean-up
    that every other pull error gets and leaves a pending task whose content never arrives.
    After a coordinator restart that is what a site sees for the old run's last message; its
    executor then waited on that task instead of the resumed round's. Turning the exception
    into an ordinary error there lets Flower's own handler delete the message and its objects
    and finish the task as failed.
    """
    @functools.wraps(pull_and_store)
    def patched(**kwargs: Any) -> Any:
        for name in ("pull_object", "confirm_message_received"):
            kwargs[name] = _run_end_is_an_error(kwargs[name])
        return pull_and_store(**kwargs)
    return patched


def main() -> None:
    """Console entry point: ``python -m fedward.flower.supernode <flower-supernode args>``."""
    cap = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
    setattr(_start_client_internal, "time", ShortSleep(max(0.05, cap)))  # noqa: B010
    setattr(_start_client_internal, "pull_objects",  # noqa: B010
            with_short_backoff(getattr(_start_client_internal, "pull_objects")))  # noqa: B009
    setattr(_start_client_internal, "_pull_and_store_message",  # noqa: B010
            finish_tasks_of_ended_runs(
                getattr(_start_client_internal, "_pull_and_store_message")))  # noqa: B009
    flower_supernode()


if __name__ == "__main__":
    main()
