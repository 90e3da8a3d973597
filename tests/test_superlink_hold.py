"""The SuperLink's long polling (``fedward.flower.superlink``): a fetch that finds nothing
waits for a message instead of coming back empty, and is answered as soon as one arrives."""

from __future__ import annotations

import importlib
import inspect
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedward.certs import ensure_ca, issue_server_cert
from fedward.flower.env import flower_env
from fedward.procs import free_port, stop_process_tree

from tests_support import node_key

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Response:
    messages_list: list[str] = field(default_factory=list)


class _Inbox:
    """A pull handler over a list that other threads fill, counting its calls."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.calls = 0

    def pull(self, *_args: Any, **_kwargs: Any) -> _Response:
        self.calls += 1
        taken, self.messages = self.messages, []
        return _Response(taken)


def _deliver_later(arrivals: Any, inbox: _Inbox, after_s: float) -> threading.Thread:
    def deliver() -> None:
        time.sleep(after_s)
        inbox.messages.append("m")
        arrivals.arrived()
    thread = threading.Thread(target=deliver, daemon=True)
    thread.start()
    return thread


def test_a_fetch_that_finds_a_message_is_answered_at_once() -> None:
    from fedward.flower.superlink import Arrivals, holding

    arrivals, inbox = Arrivals(), _Inbox()
    inbox.messages.append("m")
    pull = holding(inbox.pull, arrivals, hold_s=5.0, slots=threading.BoundedSemaphore(1))
    start = time.monotonic()
    assert pull().messages_list == ["m"]
    assert time.monotonic() - start < 1.0 and inbox.calls == 1


def test_an_empty_fetch_waits_for_a_message_and_takes_it_as_it_arrives() -> None:
    from fedward.flower.superlink import Arrivals, holding

    arrivals, inbox = Arrivals(), _Inbox()
    pull = holding(inbox.pull, arrivals, hold_s=10.0, slots=threading.BoundedSemaphore(1))
    start = time.monotonic()
    _deliver_later(arrivals, inbox, 0.3)
    assert pull().messages_list == ["m"]
    took = time.monotonic() - start
    assert 0.25 <= took < 5.0, took        # woken by the arrival, not by the hold's end
    assert inbox.calls == 2


def test_an_arrival_for_another_fetch_looks_again_and_keeps_waiting() -> None:
    from fedward.flower.superlink import Arrivals, holding

    arrivals, inbox = Arrivals(), _Inbox()
    pull = holding(inbox.pull, arrivals, hold_s=0.6, slots=threading.BoundedSemaphore(1))
    threading.Timer(0.1, arrivals.arrived).start()   # stored, but not for this fetch
    start = time.monotonic()
    assert pull().messages_list == []
    assert time.monotonic() - start >= 0.55
    assert inbox.calls == 2


def test_a_message_stored_while_the_handler_looks_is_not_missed() -> None:
    """The count is read before the handler looks: an arrival during the look ends the wait
    at once instead of after the hold."""
    from fedward.flower.superlink import Arrivals, holding

    arrivals, inbox = Arrivals(), _Inbox()

    def racing_pull() -> _Response:
        response = inbox.pull()
        if inbox.calls == 1:            # the message lands just after the first look
            inbox.messages.append("m")
            arrivals.arrived()
        return response

    pull = holding(racing_pull, arrivals, hold_s=10.0, slots=threading.BoundedSemaphore(1))
    start = time.monotonic()
    assert pull().messages_list == ["m"]
    assert time.monotonic() - start < 2.0


def test_fetches_beyond_the_slots_are_answered_at_once_and_slots_come_back() -> None:
    from fedward.flower.superlink import Arrivals, holding

    arrivals, inbox = Arrivals(), _Inbox()
    slots = threading.BoundedSemaphore(1)
    pull = holding(inbox.pull, arrivals, hold_s=0.5, slots=slots)
    waiting = threading.Thread(target=pull)
    waiting.start()
    time.sleep(0.1)                       # the first fetch holds the only slot
    start = time.monotonic()
    assert pull().messages_list == []
    assert time.monotonic() - start < 0.3
    waiting.join(5)
    assert slots.acquire(blocking=False)  # released after the hold
    slots.release()


def test_a_stopping_superlink_answers_waiting_fetches_at_once() -> None:
    from fedward.flower.superlink import Arrivals, holding

    arrivals, inbox = Arrivals(), _Inbox()
    pull = holding(inbox.pull, arrivals, hold_s=10.0, slots=threading.BoundedSemaphore(2))
    threading.Timer(0.2, arrivals.close).start()
    start = time.monotonic()
    assert pull().messages_list == []
    assert time.monotonic() - start < 2.0
    start = time.monotonic()
    assert pull().messages_list == []     # and waits no more
    assert time.monotonic() - start < 0.5


def test_the_patched_handlers_and_stores_are_still_flowers() -> None:
    """Canary: the names and signatures ``fedward.flower.superlink`` patches, and the
    routers that call the handlers through their modules (so the patch is what they call)."""
    import uvicorn
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.servicer.fleet import fleet_handlers

    assert list(inspect.signature(fleet_handlers.pull_messages).parameters) == \
        ["request", "state", "store"]
    # (the package exports an object named ``router`` too: read the module by file)
    fleet_router = importlib.import_module("flwr.superlink.routers.fleet.router")
    assert "fleet_handlers.pull_messages(" in Path(str(fleet_router.__file__)).read_text()
    for cls in (SqlLinkState, InMemoryLinkState):
        assert list(inspect.signature(cls.store_message_ins).parameters)[:2] == \
            ["self", "message"], cls
    assert list(inspect.signature(uvicorn.Server.handle_exit).parameters) == \
        ["self", "sig", "frame"]


def _start_superlink(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Any]:
    pki = ensure_ca(tmp_path / "pki")
    issue_server_cert(pki)
    port = free_port()
    log = (tmp_path / "superlink.log").open("wb")
    link = subprocess.Popen(
        [sys.executable, "-m", "fedward.flower.superlink",
         "--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
         "--ssl-keyfile", str(pki.server_key), "--enable-supernode-auth",
         "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1",
         "--port", str(port), "--disable-runtime-dependency-installation"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**flower_env(str(tmp_path / "flwr-home")), "PYTHONPATH": str(REPO)})
    log.close()
    return link, port, pki


@pytest.mark.integration
def test_a_real_superlink_holds_an_empty_fetch_and_lets_it_go_when_stopped(
        tmp_path: Path) -> None:
    """Against the real SuperLink process: an authenticated node's fetch with no message
    waits about FLEET_HOLD_S; SIGTERM during a second fetch answers it and stops at once."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    from fedward.flower.control import FlowerControl, node_public_key_bytes
    from fedward.flower.fleet import fleet_client
    from fedward.flower.superlink import FLEET_HOLD_S

    link, port, pki = _start_superlink(tmp_path)
    try:
        key_path, public = node_key(tmp_path)
        control = FlowerControl(address=f"127.0.0.1:{port}", ca_cert=pki.ca_cert)
        deadline = time.monotonic() + 60
        while True:
            try:
                node_id = control.register_node(public_key=public, name="hold-test")
                break
            except httpx.HTTPError:   # the SuperLink is still starting
                assert link.poll() is None, (tmp_path / "superlink.log").read_text()
                assert time.monotonic() < deadline, "the SuperLink did not start"
                time.sleep(0.3)
        with fleet_client(upstream=f"127.0.0.1:{port}", root_certificates=pki.ca_cert,
                          node_key=key_path, timeout=30.0) as client:
            assert client.ActivateNode(ActivateNodeRequest(
                public_key=node_public_key_bytes(public), heartbeat_interval=30)
            ).node_id == node_id
            start = time.monotonic()
            assert not client.PullMessages(
                PullMessagesRequest(node=Node(node_id=node_id))).messages_list
            held = time.monotonic() - start
            assert FLEET_HOLD_S - 0.5 <= held < FLEET_HOLD_S + 5, held

            threading.Timer(1.0, link.send_signal, args=(signal.SIGTERM,)).start()
            start = time.monotonic()
            assert not client.PullMessages(
                PullMessagesRequest(node=Node(node_id=node_id))).messages_list
            assert time.monotonic() - start < FLEET_HOLD_S - 1.5
        assert link.wait(timeout=FLEET_HOLD_S) is not None
    finally:
        stop_process_tree(link)  # type: ignore[arg-type]
