"""Start ``flower-supernode`` with a short idle fetch interval.

flwr 1.42's SuperNode sleeps a fixed 3 s whenever a fetch from the SuperLink finds no
message, and 0.5 s while waiting for its ClientApp's reply
(``flwr/supernode/start_client_internal.py``); there is no option for either. Those sleeps
are most of a round's latency on a small model. This entry point caps every sleep in that
one module (and nowhere else) at ``FEDWARD_SUPERNODE_POLL_S`` seconds (at
:data:`IDLE_POLL_S` once the node has received nothing for :data:`IDLE_AFTER_S`), and its
waits for the ClientApp's reply at :data:`REPLY_POLL_S`, then runs Flower's own
``flower_supernode`` unchanged. It also shortens the back-off of that module's object
pulls (Flower waits 1 s before the first retry of an object still being uploaded),
makes a run that ends while a message's content is being pulled fail that message's task
(see :func:`finish_tasks_of_ended_runs`), and answers a ClientApp task that ended without
a reply with an error reply, so that a lost reply never leaves the SuperNode waiting for
one (see :func:`answer_failed_client_tasks`). It relies on flwr being pinned to one exact
version; ``tests/test_flower_canaries.py`` checks that the patched module still sleeps
and pulls where this assumes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, Final

import flwr.supernode.start_client_internal as _start_client_internal
from flwr.app import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.constant import TaskType
from flwr.supercore.run import RunNotRunningException
from flwr.supernode.cli.flower_supernode import flower_supernode
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from fedward.flower.backoff import with_short_backoff
from fedward.flower.wake import WAKE_ENV, notify

__all__ = ["POLL_ENV", "RunEndedWhileReceiving", "ShortSleep", "answer_failed_client_tasks",
           "drop_replies_of_unreceived_messages", "finish_tasks_of_ended_runs", "main",
           "noting_messages"]

POLL_ENV = "FEDWARD_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.25
IDLE_POLL_S: Final = 1.0
"""The fetch interval of a SuperNode that has received nothing for :data:`IDLE_AFTER_S`
(and of one that has just started)."""
IDLE_AFTER_S: Final = 10.0
_IDLE_WAIT_S: Final = 1.0
"""Flower sleeps 3 s after an empty fetch and 0.5 s while it waits for a reply: a sleep of
at least this long is the idle one."""
REPLY_POLL_S: Final = 0.02
"""How often a SuperNode looks for its ClientApp's reply (Flower: every 0.5 s). The look
is local (the node's in-memory state, no request to the SuperLink), and the node fetches
nothing while it waits, so looking often costs next to nothing and sends each reply up to
a fetch interval sooner."""


class ShortSleep:
    """Stands in for the ``time`` module: the same, except that sleeps are capped.

    A SuperNode in a run fetches every ``cap_s`` seconds. One that has received no message
    for ``idle_after_s`` seconds fetches every ``idle_cap_s`` instead: at 4 fetches a second
    an idle site costs the coordinator's SuperLink as much CPU as a busy one, and a new run's
    first message waits at most ``idle_cap_s`` longer. Flower's shorter waits (for the
    ClientApp's reply, for an object of it) look only at the node's own state: they are
    capped at ``reply_cap_s``.
    """

    def __init__(self, cap_s: float, *, idle_cap_s: float = IDLE_POLL_S,
                 idle_after_s: float = IDLE_AFTER_S, reply_cap_s: float = REPLY_POLL_S
                 ) -> None:
        self.cap_s = cap_s
        self.idle_cap_s = max(cap_s, idle_cap_s)
        self.idle_after_s = idle_after_s
        self.reply_cap_s = min(cap_s, reply_cap_s)
        # A node starts idle: its first message (a run's first round) waits at most
        # ``idle_cap_s``, and an agent that is started and then waits costs the SuperLink a
        # fetch a second, not four.
        self.last_message = time.monotonic() - self.idle_after_s - 1.0

    def message_received(self) -> None:
        """A message came in: fetch at the short interval again."""
        self.last_message = time.monotonic()

    def sleep(self, seconds: float) -> None:
        cap = self.cap_s
        if seconds < _IDLE_WAIT_S:
            cap = self.reply_cap_s
        elif time.monotonic() - self.last_message > self.idle_after_s:
            cap = self.idle_cap_s
        time.sleep(min(seconds, cap))

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


def answer_failed_client_tasks(finish_task: Callable[..., bool]) -> Callable[..., bool]:
    """``InMemoryNodeState.finish_task``, except that a ClientApp task that ends without a
    reply (failed or stopped) leaves an error reply to its message.

    Flower's SuperNode handles one message at a time: after it has received a message it
    waits, with no time limit, for a reply to it (``_push_messages``), and takes no other
    message meanwhile. Flower writes an error reply itself when an AgentApp task fails or a
    ClientApp's task token expires, but not when a ClientApp task reports that it failed.
    A site's executor does just that when the message's content does not reach it in time:
    after a coordinator outage the SuperNode may finish receiving that content later still,
    and would then wait for ever for a reply nobody will write (the site took no task again
    until its agent was restarted). With this, the error reply is there, the SuperNode sends
    it (the coordinator ignores or counts it as that site's failure) and takes the next
    message. A reply already written is never replaced (Flower skips answered messages).
    """
    @functools.wraps(finish_task)
    def patched(self: InMemoryNodeState, task_id: int, sub_status: str, details: str
                ) -> bool:
        finished = finish_task(self, task_id, sub_status, details)
        if finished and sub_status != SubStatus.COMPLETED:
            tasks = self.get_tasks(task_ids=[task_id])
            if tasks and tasks[0].type == TaskType.CLIENT_APP:
                self._store_error_replies({tasks[0].run_id}, Error(
                    int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION),
                    f"the site's task ended without a reply: {details}"))
        return finished
    return patched


def drop_replies_of_unreceived_messages(pull_and_store: Callable[..., Any]
                                        ) -> Callable[..., Any]:
    """Flower's ``_pull_and_store_message``, except that when a message could not be
    received, any reply already written to it is dropped with it.

    The executor may fail a task (and :func:`answer_failed_client_tasks` answer it) before
    the SuperNode itself gives up on receiving the message; Flower then deletes the message
    but not that reply, which would be sent along with the next message's reply. Nothing is
    in flight when a receive fails (one message at a time), so every reply still waiting
    then belongs to the message that was not received.
    """
    @functools.wraps(pull_and_store)
    def patched(**kwargs: Any) -> Any:
        received: list[object] = []
        receive = kwargs["receive"]

        def noting_receive() -> Any:
            got = receive()
            received.append(got)
            return got

        kwargs["receive"] = noting_receive
        run_id = pull_and_store(**kwargs)
        if run_id is None and any(got is not None for got in received):
            state, store = kwargs["state"], kwargs["object_store"]
            stale = [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)]
            state.delete_messages(message_ids=stale)
            for message_id in stale:
                store.delete(message_id)
        return run_id
    return patched


def noting_messages(sleeper: ShortSleep, pull_and_store: Callable[..., Any], *,
                    wake: str | None = None) -> Callable[..., Any]:
    """Flower's pull-and-store, telling ``sleeper`` whenever a message was pulled (its
    result is the message's run id, None when there was none), and waking the site's
    executor listening at ``wake`` (:mod:`fedward.flower.wake`): its task is waiting."""
    @functools.wraps(pull_and_store)
    def patched(**kwargs: Any) -> Any:
        run_id = pull_and_store(**kwargs)
        if run_id is not None:
            sleeper.message_received()
            if wake:
                notify(wake)
        return run_id
    return patched


def main() -> None:
    """Console entry point: ``python -m fedward.flower.supernode <flower-supernode args>``."""
    cap = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
    sleeper = ShortSleep(max(0.05, cap))
    setattr(_start_client_internal, "time", sleeper)  # noqa: B010
    setattr(_start_client_internal, "pull_objects",  # noqa: B010
            with_short_backoff(getattr(_start_client_internal, "pull_objects")))  # noqa: B009
    setattr(_start_client_internal, "_pull_and_store_message",  # noqa: B010
            noting_messages(sleeper, drop_replies_of_unreceived_messages(
                finish_tasks_of_ended_runs(
                    getattr(_start_client_internal, "_pull_and_store_message"))),  # noqa: B009
            wake=os.environ.get(WAKE_ENV)))
    InMemoryNodeState.finish_task = answer_failed_client_tasks(  # type: ignore[method-assign]
        InMemoryNodeState.finish_task)
    flower_supernode()


if __name__ == "__main__":
    main()
