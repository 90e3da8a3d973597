"""A warm in-agent executor for the site's Flower ClientApp tasks.

Stock Flower (``--isolation subprocess``) has the SuperNode's SuperExec start a fresh
``flwr-clientapp`` process for every message: about 1.5 s of interpreter and Flower start-up
per site per round on this hardware, the largest cost of a round once training is warm. With
``--isolation process`` the SuperNode leaves task execution to an outside process; this
module is that process's loop, running inside the long-lived site agent:

1. acquire a ClientApp task from the SuperNode's runtime API (a Unix socket in the site's
   0700 ``run/`` directory, relayed into the SuperNode's private network namespace),
2. pull its message, context, run and app bundle (FAB),
3. refuse any bundle that is not the appliance's own (sites run only installed code),
4. call the appliance's ClientApp (the same relay module Flower would load, which hands the
   task to the warm trainer), and push the reply and the task's status back.

It mirrors ``flwr.supernode.runtime.run_clientapp`` of the pinned flwr (1.42.0) step for
step, without the per-task process, FAB installation or dependency installation. Nothing
from the network is unpickled: messages are Flower's protobuf and numpy ``.npy`` arrays.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedward.flower.backoff import with_short_backoff
from fedward.procs import die_with_parent, stop_process_tree
from fedward.sandbox.relay import over_unix_socket, unix_path
from fedward.wire import APP_COMPONENTS, APP_PUBLISHER, SiteErrorCode
from site_agent.diagnostics import failure_reason

__all__ = ["UnknownBundleError", "WarmExecutor", "check_bundle"]

log = logging.getLogger("fedward.site.executor")



def _bounded_retries() -> RetryInvoker:
    """Retries for calls to the local SuperNode: a few, bounded, and nothing else.

    Flower's ``make_simple_http_retry_invoker`` is meant for its one-task processes: it
    retries forever and, on a 401 (a task token the SuperNode no longer knows, e.g. after
    the SuperLink restarted), sends SIGINT to its own process. Here that process is the
    site agent, so an expired task must fail the task, never stop the agent.
    """
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2),
        recoverable_exceptions=(httpx.TransportError,),
        max_tries=5,
        max_time=20.0,
    )


# How long a task may wait for its message's content to reach the local SuperNode. Flower
# waits up to 2 hours (PULL_MAX_TIME), which turns a stale task into a stuck site: after
# the SuperLink restarts, a SuperNode can be left with a task whose message content will
# never arrive (it logs "Run ... is not in RUNNING status. Ignoring message" after creating
# the task), and this executor, holding that task, would never take the next one. The
# content is normally on the SuperNode within a second of the task: 30 s is generous.
PULL_MAX_TIME_S = 30.0


def pull_task_input(client: RuntimeHttpClient, *, max_time: float = PULL_MAX_TIME_S
                    ) -> tuple[Message, Context, Fab]:
    """Pull a task's context, bundle and message, giving up after ``max_time`` seconds.

    The same calls as ``flwr.supernode.runtime.run_clientapp.pull_task_input``, with a
    bounded wait and the appliance's short back-off (``fedward.procs``; Flower starts at
    1 s, which a round pays whenever the task is acquired before its message content is
    local).
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the task has no message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = with_short_backoff(pull_and_inflate_object_from_tree)(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message,
        max_time=max_time,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, fab


class UnknownBundleError(ValueError):
    """The run's app bundle is not the appliance's own."""


def check_bundle(fab: Fab) -> None:
    """Accept only the appliance's own bundle: a pointer to modules installed here."""
    try:
        config = get_fab_config(fab.content)
    except Exception as err:
        raise UnknownBundleError(f"unreadable app bundle ({type(err).__name__})") from None
    app_cfg = config.get("tool", {}).get("flwr", {}).get("app", {})
    publisher = app_cfg.get("publisher")
    components = app_cfg.get("components", {})
    if publisher != APP_PUBLISHER or components != APP_COMPONENTS:
        raise UnknownBundleError(
            f"app bundle from publisher {publisher!r} with components {components!r} is not "
            "the appliance's own; this site runs only code installed with its site agent"
        )


@dataclass
class WarmExecutor:
    """Runs the SuperNode's ClientApp tasks in this process, one at a time.

    Args:
        runtime_address: the SuperNode's runtime API: ``unix:/path`` (the agent's relay
            into the SuperNode's namespace) or ``127.0.0.1:PORT``.
        app: the ClientApp to run (the appliance's relay).
        poll_s: how often to ask for a task when idle.
        per_task_process: run each task in its own process (``executor: subprocess``).
        audit: records a refused app bundle in the site's audit log (action, detail).
    """

    runtime_address: str
    app: ClientApp
    poll_s: float = 0.05
    per_task_process: bool = False
    audit: Callable[[str, dict[str, Any]], None] = field(default=lambda action, detail: None)
    stop: threading.Event = field(default_factory=threading.Event)
    tasks_done: int = 0

    def _client(self, token: str | None) -> RuntimeHttpClient:
        interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))  # type: ignore[arg-type]
        path = unix_path(self.runtime_address)
        client = RuntimeHttpClient.from_server_address(
            server_address="127.0.0.1" if path is not None else self.runtime_address,
            # Plain HTTP: the runtime API never leaves this host, and only the agent's
            # user may open its socket.
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=_bounded_retries(),
        )
        if path is not None:
            over_unix_socket(client, path)
        return client

    def run(self) -> None:
        """Serve tasks until :attr:`stop` is set."""
        # httpx logs every request at INFO: one line per poll would drown the agent's log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        acquirer = self._client(None)
        try:
            while not self.stop.is_set():
                try:
                    res = acquirer.AcquireTask(AcquireTaskRequest(
                        supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
                except Exception as err:
                    log.debug("runtime API not ready: %s", err)
                    self.stop.wait(0.5)
                    continue
                if res.HasField("task") and res.token:
                    try:
                        if self.per_task_process:
                            self.execute_in_process(res.token)
                        else:
                            self.execute(res.token)
                    except Exception:
                        log.exception("a ClientApp task could not be completed")
                else:
                    self.stop.wait(self.poll_s)
        finally:
            acquirer.close()

    def execute_in_process(self, token: str, *, timeout_s: float = 3600.0) -> None:
        """Carry out one task in a fresh process (the ``subprocess`` executor).

        Flower's own ``flwr-clientapp`` would load whatever app the bundle names; this
        process runs :meth:`execute`, so the bundle check applies in this mode too. The
        token travels on stdin, never on the command line (``ps`` shows arguments).
        """
        cmd = [sys.executable, "-m", "site_agent.task_process", "--runtime",
               self.runtime_address]
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
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, fab = pull_task_input(client)
            try:
                check_bundle(fab)
            except UnknownBundleError as err:
                log.warning("refused a run: %s", err)
                self.audit("bundle-refused", {"flwr_run": int(message.metadata.run_id),
                                              "reason": str(err)})
                reply = Message(Error(code=SiteErrorCode.REFUSED_POLICY,
                                      reason=f"refused-policy: {err}"), reply_to=message)
                details = str(err)
            else:
                reply = self.app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
        except Exception as err:
            log.exception("ClientApp task failed")
            details = failure_reason(err, kind="task", phase="executor")
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    try:
                        push_message(client, reply, context)
                    except Exception as err:
                        # Most often a reply to a round the coordinator already closed (its
                        # message expired at the deadline): it never leaves the site.
                        log.warning("the reply to a task could not be handed to the SuperNode "
                                    "(%s: %s); it was not sent", type(err).__name__, err)
                        self.audit("reply-not-sent", {
                            "flwr_run": int(reply.metadata.run_id),
                            "group": reply.metadata.group_id,
                            "error": type(err).__name__})
                        status, details = SubStatus.FAILED, "the reply could not be sent"
                push_task_output(client=client, context=context, sub_status=status,
                                 details=details)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                self.tasks_done += 1
