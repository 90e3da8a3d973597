"""The Flower side of the site's warm task executor: one ClientApp task at a time, in-process.

Stock Flower (``--isolation subprocess``) has the SuperNode's SuperExec start a fresh
``flwr-clientapp`` process for every message: about 1.5 s of interpreter and Flower start-up
per site per round on this hardware, the largest cost of a round once training is warm. With
``--isolation process`` the SuperNode leaves task execution to an outside process; the site
agent's executor is that process, and this module is its
Flower side:

1. acquire a ClientApp task from the SuperNode's runtime API (:class:`TaskSource`; a Unix
   socket in the site's 0700 ``run/`` directory, relayed into the SuperNode's private
   network namespace),
2. pull its message, context, run and app bundle, and check that the bundle is the
   appliance's own (:meth:`ClientAppTask.pull`),
3. push the reply and the task's status back (:meth:`ClientAppTask.push_reply`,
   :meth:`ClientAppTask.finish`), with Flower's task heartbeat running meanwhile.

It mirrors ``flwr.supernode.runtime.run_clientapp`` of the pinned flwr (1.42.0) step for
step, without the per-task process, FAB installation or dependency installation; the one
private field it writes (a pulled message's id, which Flower's own pull sets the same way) is
checked by ``tests/test_flower_canaries.py``. Nothing from the network is unpickled: messages
are Flower's protobuf and numpy ``.npy`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Final

import httpx
from flwr.app import Context, Message
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
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedward.flower.backoff import with_short_backoff
from fedward.flower.fab import UnknownBundleError, check_bundle
from fedward.sandbox.relay import over_unix_socket, unix_path

__all__ = [
    "CLIENT_APP_RAISED_EXCEPTION",
    "PULL_MAX_TIME_S",
    "ClientAppTask",
    "PulledTask",
    "TaskSource",
    "content_never_arrived",
    "pull_task_input",
]

# Flower's error code for a ClientApp that raised: the reply a failed task sends.
CLIENT_APP_RAISED_EXCEPTION: Final = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)

# How long a task may wait for its message's content to reach the local SuperNode. Flower
# waits up to 2 hours (PULL_MAX_TIME), which turns a stale task into a stuck site: after
# the SuperLink restarts, a SuperNode can be left with a task whose message content will
# never arrive (it logs "Run ... is not in RUNNING status. Ignoring message" after creating
# the task), and the executor, holding that task, would never take the next one. The
# content is normally on the SuperNode within a second of the task: 30 s is generous.
PULL_MAX_TIME_S: Final = 30.0


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


def _runtime_client(address: str, token: str | None) -> RuntimeHttpClient:
    """A client of the SuperNode's runtime API: ``unix:/path`` or ``127.0.0.1:PORT``."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))  # type: ignore[arg-type]
    path = unix_path(address)
    client = RuntimeHttpClient.from_server_address(
        server_address="127.0.0.1" if path is not None else address,
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


def content_never_arrived(err: BaseException) -> bool:
    """Whether a task failed because its message's content never reached the SuperNode
    within :data:`PULL_MAX_TIME_S` (the coordinator went away while it was being received)."""
    return isinstance(err, ObjectPullError)


def pull_task_input(client: RuntimeHttpClient, *, max_time: float = PULL_MAX_TIME_S
                    ) -> tuple[Message, Context, Fab]:
    """Pull a task's context, bundle and message, giving up after ``max_time`` seconds.

    The same calls as ``flwr.supernode.runtime.run_clientapp.pull_task_input``, with a
    bounded wait and the appliance's short back-off (:mod:`fedward.flower.backoff`; Flower
    starts at 1 s, which a round pays whenever the task is acquired before its message
    content is local).
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
    # Flower's Message keeps its id in a private metadata field that only its own pull
    # sets; the reply's ``reply_to`` needs it.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, fab


class TaskSource:
    """Asks the SuperNode's runtime API for the next ClientApp task."""

    def __init__(self, address: str) -> None:
        self._client = _runtime_client(address, None)

    def acquire(self) -> str | None:
        """The token of the next ClientApp task, or None when there is none.

        Raises:
            Exception: the runtime API cannot be reached (not ready yet, or gone).
        """
        res = self._client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        return str(res.token) if res.HasField("task") and res.token else None

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


@dataclass(frozen=True)
class PulledTask:
    """A task's message and context; ``bundle_error`` says why its app bundle is not the
    appliance's own (None when it is)."""

    message: Message
    context: Context
    bundle_error: str | None


class ClientAppTask:
    """One ClientApp task at the SuperNode (a context manager that runs Flower's task
    heartbeat while it is open and closes the connection at the end)."""

    def __init__(self, address: str, token: str) -> None:
        self._client = _runtime_client(address, token)
        self._heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self._client))
        self._context: Context | None = None

    def __enter__(self) -> ClientAppTask:
        self._heartbeat.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._heartbeat.is_running:
                self._heartbeat.stop()
        finally:
            self._client.close()

    def pull(self, *, max_time: float = PULL_MAX_TIME_S) -> PulledTask:
        """Pull the task's message and context and check its app bundle."""
        message, context, fab = pull_task_input(self._client, max_time=max_time)
        self._context = context
        try:
            check_bundle(fab)
        except UnknownBundleError as err:
            return PulledTask(message, context, str(err))
        return PulledTask(message, context, None)

    def push_reply(self, reply: Message) -> None:
        """Hand the reply to the SuperNode (after :meth:`pull`)."""
        if self._context is None:
            raise RuntimeError("the task's message was not pulled")
        push_message(self._client, reply, self._context)

    def finish(self, *, completed: bool, details: str) -> None:
        """Report the task's outcome (Flower's task output)."""
        status = SubStatus.COMPLETED if completed else SubStatus.FAILED
        push_task_output(client=self._client, context=self._context, sub_status=status,
                         details=details)
