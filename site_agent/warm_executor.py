"""The site agent's executor for its Flower ClientApp tasks: warm, in the agent's process.

The SuperNode runs with ``--isolation process`` and leaves its ClientApp tasks to this
loop: take a task, run the appliance's ClientApp (the relay that hands the task to the warm
trainer), send the reply. A run whose app bundle is not the appliance's own is refused and
audited (sites run only installed code). How a task is taken from the SuperNode and answered
is Flower's side (:mod:`fedward.flower.executor`); this module decides what the site does.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedward.flower.executor import (
    CLIENT_APP_RAISED_EXCEPTION,
    PULL_MAX_TIME_S,
    ClientAppTask,
    TaskSource,
    content_never_arrived,
)
from fedward.flower.wake import FALLBACK_S, WakeListener
from fedward.procs import die_with_parent, stop_process_tree
from fedward.wire import SiteErrorCode
from site_agent.diagnostics import failure_reason

__all__ = ["WarmExecutor"]

log = logging.getLogger("fedward.site.executor")


@dataclass
class WarmExecutor:
    """Runs the SuperNode's ClientApp tasks in this process, one at a time.

    Args:
        runtime_address: the SuperNode's runtime API: ``unix:/path`` (the agent's relay
            into the SuperNode's namespace) or ``127.0.0.1:PORT``.
        app: the ClientApp to run (the appliance's relay).
        poll_s: how often to ask for a task while a run is under way (a task was taken or
            finished in the last ``idle_after_s`` seconds).
        idle_poll_s: how often to ask otherwise. At 20 asks a second an idle site's agent,
            relay and SuperNode spent about a tenth of a core on asking alone; a new run's
            first task waits at most this much longer.
        idle_after_s: see ``poll_s``.
        per_task_process: run each task in its own process (``executor: subprocess``).
        content_wait_s: how long a task waits for its message's content before it is
            given up (the site's ``task_content_wait_s``).
        wake: where the SuperNode says that a message came in
            (:mod:`fedward.flower.wake`). With it the executor asks when woken, every
            ``poll_s`` for ``woken_for_s`` after a wake-up or a task, and otherwise every
            :data:`~fedward.flower.wake.FALLBACK_S`; without it, on ``poll_s`` and
            ``idle_poll_s`` alone.
        audit: records a refused app bundle in the site's audit log (action, detail).
    """

    runtime_address: str
    app: ClientApp
    poll_s: float = 0.05
    idle_poll_s: float = 0.5
    idle_after_s: float = 30.0
    per_task_process: bool = False
    content_wait_s: float = PULL_MAX_TIME_S
    wake: WakeListener | None = None
    woken_for_s: float = 2.0
    audit: Callable[[str, dict[str, Any]], None] = field(default=lambda action, detail: None)
    stop: threading.Event = field(default_factory=threading.Event)
    tasks_done: int = 0
    # For the agent's SuperNode watch (site_agent.supernode_watch): whether a task runs
    # now, and when one was last taken or finished (time.monotonic()).
    busy: bool = False
    active_at: float = field(default_factory=time.monotonic)
    woken_at: float = 0.0

    def run(self) -> None:
        """Serve tasks until :attr:`stop` is set."""
        # httpx logs every request at INFO: one line per poll would drown the agent's log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        source = TaskSource(self.runtime_address)
        try:
            while not self.stop.is_set():
                try:
                    token = source.acquire()
                except Exception as err:
                    log.debug("runtime API not ready: %s", err)
                    self.stop.wait(0.5)
                    continue
                if token is not None:
                    self.busy, self.active_at = True, time.monotonic()
                    try:
                        if self.per_task_process:
                            self.execute_in_process(token)
                        else:
                            self.execute(token)
                    except Exception:
                        log.exception("a ClientApp task could not be completed")
                    finally:
                        self.busy, self.active_at = False, time.monotonic()
                elif self.wake is None:
                    self.stop.wait(self.wait_after_empty_ask(time.monotonic()))
                elif self.wake.wait(self.wait_after_empty_ask(time.monotonic())):
                    self.woken_at = time.monotonic()
        finally:
            source.close()
            if self.wake is not None:
                self.wake.close()

    def wait_after_empty_ask(self, now: float) -> float:
        """Seconds to wait before asking again when an ask found no task at ``now``
        (``time.monotonic()``)."""
        if self.wake is not None:
            recent = now - max(self.active_at, self.woken_at) < self.woken_for_s
            return self.poll_s if recent else FALLBACK_S
        idle = now - self.active_at > self.idle_after_s
        return self.idle_poll_s if idle else self.poll_s

    def execute_in_process(self, token: str, *, timeout_s: float = 3600.0) -> None:
        """Carry out one task in a fresh process (the ``subprocess`` executor).

        Flower's own ``flwr-clientapp`` would load whatever app the bundle names; this
        process runs :meth:`execute`, so the bundle check applies in this mode too. The
        token travels on stdin, never on the command line (``ps`` shows arguments).
        """
        cmd = [sys.executable, "-m", "site_agent.task_process", "--runtime",
               self.runtime_address, "--content-wait", str(self.content_wait_s)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, preexec_fn=die_with_parent)
        assert proc.stdin is not None
        proc.stdin.write(token.encode())
        proc.stdin.close()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_tree(proc)
            code = -1
        if code != 0:
            log.warning("task process exited with code %s", code)
        self.tasks_done += 1

    def execute(self, token: str) -> None:
        """Carry out one task (the body of Flower's ``run_clientapp``, in-process)."""
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        completed, details = False, "ClientApp task failed"
        with ClientAppTask(self.runtime_address, token) as task:
            try:
                pulled = task.pull(max_time=self.content_wait_s)
                message, context = pulled.message, pulled.context
                if pulled.bundle_error is not None:
                    log.warning("refused a run: %s", pulled.bundle_error)
                    self.audit("bundle-refused", {"flwr_run": int(message.metadata.run_id),
                                                  "reason": pulled.bundle_error})
                    reply = Message(Error(code=SiteErrorCode.REFUSED_POLICY,
                                          reason=f"refused-policy: {pulled.bundle_error}"),
                                    reply_to=message)
                    details = pulled.bundle_error
                else:
                    reply = self.app(message=message, context=context)
                    completed, details = True, ""
            except Exception as err:
                if message is None and content_never_arrived(err):
                    # The message's content never reached the SuperNode: the coordinator
                    # went away while the site was receiving it. Nothing failed here, and
                    # the agent says in one line when the coordinator is back (see
                    # site_agent.agent); the traceback is for whoever debugs Flower.
                    log.info("a task's message did not arrive within %g s; the task is "
                             "dropped (task_content_wait_s in site.json)",
                             self.content_wait_s)
                    log.debug("the dropped task's error", exc_info=True)
                else:
                    log.exception("ClientApp task failed")
                details = failure_reason(err, kind="task", phase="executor")
                if message is not None:
                    reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                    reply_to=message)
            finally:
                try:
                    if reply is not None and context is not None:
                        try:
                            task.push_reply(reply)
                        except Exception as err:
                            # Most often a reply to a round the coordinator already closed
                            # (its message expired at the deadline): it never leaves the site.
                            log.warning("the reply to a task could not be handed to the "
                                        "SuperNode (%s: %s); it was not sent",
                                        type(err).__name__, err)
                            self.audit("reply-not-sent", {
                                "flwr_run": int(reply.metadata.run_id),
                                "group": reply.metadata.group_id,
                                "error": type(err).__name__})
                            completed, details = False, "the reply could not be sent"
                    task.finish(completed=completed, details=details)
                finally:
                    self.tasks_done += 1
