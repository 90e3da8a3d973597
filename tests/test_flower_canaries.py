"""Canaries: one test per touch of Flower's internals (:mod:`fedward.flower`).

Each fails when Flower changes the thing the appliance patches, reimplements or reads, so a
Flower upgrade shows at once what must be revisited. Real Flower throughout: its own
modules, node state and, for the exit code, a real SuperLink and SuperNode.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedward.certs import ensure_ca, issue_server_cert
from fedward.flower import FLWR_VERSION, check_flower_version, exit_codes
from fedward.flower.env import flower_env
from fedward.procs import free_port, stop_process_tree, venv_bin

from tests_support import node_key

with warnings.catch_warnings():
    # flwr imports typer, which touches an alias that Click 8.3+ deprecates: harmless here.
    warnings.filterwarnings("ignore", message=r"'click\.utils\.get_\w+_stream' is deprecated",
                            category=DeprecationWarning)
    import flwr.supernode.start_client_internal as start_client_internal

    from fedward.flower import supernode

REPO = Path(__file__).resolve().parents[1]


# --- version pin ---------------------------------------------------------------------------


def test_the_installed_flower_is_the_pinned_one() -> None:
    import flwr

    assert flwr.__version__ == FLWR_VERSION
    check_flower_version(flwr.__version__)


def test_another_flower_version_is_refused_at_import_naming_both() -> None:
    with pytest.raises(ImportError) as err:
        check_flower_version("1.43.0")
    assert "1.42.0" in str(err.value) and "1.43.0" in str(err.value)
    assert "pip install flwr==1.42.0" in str(err.value)
    with pytest.raises(ImportError, match="flwr is not installed"):
        check_flower_version(None)


def test_importing_the_flower_package_checks_the_installed_version(tmp_path: Path) -> None:
    """A fake ``flwr`` distribution of another version first on the path: import fails."""
    dist = tmp_path / "flwr-9.9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flwr\nVersion: 9.9.9\n")
    code = "import fedward.flower"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, env=env)
    assert done.returncode != 0
    assert "ImportError: fedward needs flwr 1.42.0 exactly, but flwr 9.9.9 is installed" in \
        done.stderr


# --- SuperNode: sleeps, pull back-off, a run ending mid-pull (fedward.flower.supernode) ------


def test_short_sleep_caps_sleeps_and_passes_the_rest_through() -> None:
    short = supernode.ShortSleep(0.05)
    short.message_received()  # a node in a run
    t0 = time.monotonic()
    short.sleep(3)
    assert time.monotonic() - t0 < 1.0
    assert short.monotonic is time.monotonic
    assert short.time is time.time


def test_an_idle_supernode_fetches_less_often_until_a_message_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[float] = []
    monkeypatch.setattr(time, "sleep", asked.append)  # restored after the test
    short = supernode.ShortSleep(0.25, idle_cap_s=1.0, idle_after_s=30.0)
    short.sleep(3)  # just started, nothing received yet: the idle interval
    short.message_received()
    short.sleep(3)  # a message came in a moment ago: the short interval
    short.last_message -= 31.0  # nothing for 31 s
    short.sleep(3)  # Flower's empty-fetch wait: the idle interval
    short.sleep(0.5)  # waiting for a reply (a local look) is never slowed: the reply cap
    pulled = supernode.noting_messages(short, lambda **_: 7)
    assert pulled() == 7
    short.sleep(3)  # a message came in: the short interval again
    short.last_message -= 31.0
    assert supernode.noting_messages(short, lambda **_: None)() is None
    short.sleep(3)  # an empty fetch does not count as a message
    assert asked == [1.0, 0.25, 1.0, supernode.REPLY_POLL_S, 0.25, 1.0]
    assert supernode.REPLY_POLL_S <= 0.02 < supernode.DEFAULT_POLL_S  # the reply leaves soon


def test_flwr_supernode_still_sleeps_where_the_patch_applies() -> None:
    sci = start_client_internal
    source = inspect.getsource(sci)
    assert "time.sleep(3)" in source
    # The 0.5 s sleeps wait for the ClientApp's reply and its objects in the node's own
    # state, with no request to the SuperLink: ShortSleep polls those every REPLY_POLL_S.
    assert "while not (reply_messages := state.get_messages_legacy(is_reply=True)):\n" \
           "        time.sleep(0.5)" in source
    # ... and those are all its sleeps: a new one (a network wait?) must be looked at.
    assert source.count("time.sleep(") == 3
    assert re.search(r"^import time$", source, flags=re.M)
    assert sci.time is time or isinstance(sci.time, supernode.ShortSleep)


def test_main_patches_only_the_supernode_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    sci = start_client_internal
    monkeypatch.setattr(sci, "time", time)  # restored after the test
    flowers_pull = getattr(sci, "pull_objects")  # noqa: B009
    monkeypatch.setattr(sci, "pull_objects", flowers_pull)  # restored after the test
    flowers_pull_and_store = sci._pull_and_store_message
    monkeypatch.setattr(sci, "_pull_and_store_message", flowers_pull_and_store)
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    flowers_finish = InMemoryNodeState.finish_task
    monkeypatch.setattr(InMemoryNodeState, "finish_task", flowers_finish)  # restored after
    seen: list[object] = []
    monkeypatch.setattr(supernode, "flower_supernode",
                        lambda: seen.append((sci.time, getattr(sci, "pull_objects"),  # noqa: B009
                                             sci._pull_and_store_message)))
    monkeypatch.setenv(supernode.POLL_ENV, "0.3")

    supernode.main()

    assert len(seen) == 1
    sleep, pull, pull_and_store = seen[0]  # type: ignore[misc]
    assert isinstance(sleep, supernode.ShortSleep) and sleep.cap_s == 0.3
    assert isinstance(pull, functools.partial) and pull.func is flowers_pull
    assert pull_and_store.__wrapped__.__wrapped__.__wrapped__ is flowers_pull_and_store
    assert InMemoryNodeState.finish_task.__wrapped__ is flowers_finish  # type: ignore[attr-defined]
    assert inspect.isbuiltin(time.sleep)  # the real time module is untouched


def _stale_task_scenario(pull_and_store: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
                         ) -> tuple[Any, list[Any]]:
    """Flower's own node state receives a message of run 77 whose content pull is answered
    "run not running" (what a SuperLink restarted after that run ended answers)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run, RunNotRunningException
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate import NodeStateFactory

    for name, value in (("_task_id", 1), ("_run_id", 77), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(7)
    run = Run.create_empty(77)
    run.fab_hash = "f" * 64
    state.store_run(run)
    message = Message(content=RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=7,
                      message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id

    def run_ended(*_: Any) -> bytes:
        raise RunNotRunningException

    pull_and_store(state=state, object_store=state.object_store, node_config={},
                   receive=lambda: (message, get_object_tree(message)),
                   get_run=lambda _: run, get_fab=lambda *_: None,
                   pull_object=run_ended, confirm_message_received=run_ended,
                   trusted_entities=None)
    return state, list(state.get_tasks(run_ids=[77]))


def test_flower_alone_leaves_a_pending_task_when_a_run_ends_mid_pull(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug the patch below works around: if this fails, Flower fixed it (drop the patch).
    _, tasks = _stale_task_scenario(start_client_internal._pull_and_store_message,
                                    monkeypatch)
    assert [t.status.status for t in tasks] == ["pending"]


def test_a_run_ending_mid_pull_fails_its_task_instead_of_leaving_it_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    patched = supernode.finish_tasks_of_ended_runs(
        start_client_internal._pull_and_store_message)
    state, tasks = _stale_task_scenario(patched, monkeypatch)
    assert [(t.status.status, t.status.sub_status) for t in tasks] == [("finished", "failed")]
    assert "no longer running" in tasks[0].status.details
    assert not state.get_messages_legacy(run_ids=[77])   # the message is gone with it


def _client_task_whose_message_was_taken(monkeypatch: pytest.MonkeyPatch
                                         ) -> tuple[Any, int, str]:
    """Flower's own node state holding a message of run 78 that a ClientApp task took (the
    runtime API's PullMessages marks it retrieved) and has not answered."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate import NodeStateFactory

    for name, value in (("_task_id", 1), ("_run_id", 78), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(7)
    state.store_run(Run.create_empty(78))
    message = Message(content=RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=7,
                      message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    state.store_message(message)
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=78)
    assert task_id is not None
    (taken,) = state.get_messages_legacy(run_ids=[78], is_reply=False, limit=1)
    state.record_message_processing_start(taken.metadata.message_id)
    assert state.claim_task(task_id) is not None and state.activate_task(task_id)
    return state, task_id, message.metadata.message_id


def test_flower_alone_leaves_a_failed_client_task_unanswered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The wedge the patch below removes: the SuperNode would wait for ever for this reply.
    # If this fails, Flower answers failed ClientApp tasks itself (drop the patch).
    state, task_id, _ = _client_task_whose_message_was_taken(monkeypatch)
    assert state.finish_task(task_id, "failed", "ObjectPullError")
    assert not state.get_messages_legacy(is_reply=True)


def test_a_failed_client_task_leaves_an_error_reply_to_its_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state, task_id, message_id = _client_task_whose_message_was_taken(monkeypatch)
    finish = supernode.answer_failed_client_tasks(InMemoryNodeState.finish_task)
    assert finish(state, task_id, "failed", "ObjectPullError: pulling timed out")
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.metadata.reply_to_message_id == message_id
    assert reply.has_error() and "ObjectPullError" in reply.error.reason
    # Finishing it again changes nothing (Flower refuses, no second reply).
    assert not finish(state, task_id, "failed", "again")
    assert not state.get_messages_legacy(is_reply=True)


def test_a_completed_client_task_gets_no_error_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state, task_id, _ = _client_task_whose_message_was_taken(monkeypatch)
    finish = supernode.answer_failed_client_tasks(InMemoryNodeState.finish_task)
    assert finish(state, task_id, "completed", "")
    assert not state.get_messages_legacy(is_reply=True)


def test_a_reply_to_a_message_that_never_arrived_is_not_sent_with_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import Error, Message
    from flwr.supercore.inflatable.inflatable_object import get_object_tree

    state, _, message_id = _client_task_whose_message_was_taken(monkeypatch)
    taken = state.msg_store[message_id].message
    # The executor gave up and its error reply is written; then the SuperNode's own pull of
    # the message's content fails too, and Flower deletes the message (not the reply).
    error_reply = Message(Error(code=0, reason="gave up"), reply_to=taken)
    error_reply.metadata.__dict__["_message_id"] = error_reply.object_id
    state.store_message(error_reply)

    def unreachable(*_: Any) -> bytes:
        raise ConnectionError("the coordinator is unreachable")

    patched = supernode.drop_replies_of_unreceived_messages(
        start_client_internal._pull_and_store_message)
    assert patched(state=state, object_store=state.object_store, node_config={},
                   receive=lambda: (taken, get_object_tree(taken)),
                   get_run=lambda _: None, get_fab=lambda *_: None,
                   pull_object=unreachable, confirm_message_received=unreachable,
                   trusted_entities=None) is None
    assert not state.get_messages_legacy(is_reply=True)


def test_object_pulls_retry_after_a_short_back_off_not_flowers_second() -> None:
    import functools

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
    from flwr.superlink.grid import http_grid

    from fedward.flower.backoff import with_short_backoff

    # Both modules the appliance patches still call Flower's pull_objects by that name.
    assert getattr(start_client_internal, "pull_objects") is inflatable_utils.pull_objects  # noqa: B009
    assert getattr(http_grid, "pull_objects") is inflatable_utils.pull_objects  # noqa: B009

    def timed(pull: object) -> float:
        tries: dict[str, int] = {}

        def fetch(object_id: str) -> bytes:  # not uploaded yet on the first try
            tries[object_id] = tries.get(object_id, 0) + 1
            if tries[object_id] == 1:
                raise ObjectUnavailableError(object_id)
            return b"x"

        t0 = time.monotonic()
        assert pull(["a"], fetch) == {"a": b"x"}  # type: ignore[operator]
        return time.monotonic() - t0

    short = with_short_backoff(inflatable_utils.pull_objects)
    assert isinstance(short, functools.partial)
    assert timed(short) < 0.3 < 0.7 < timed(inflatable_utils.pull_objects)


# --- ServerApp: object pulls (fedward.flower.serverapp) ------------------------------------


def test_the_serverapp_patch_shortens_the_grids_object_pulls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from flwr.superlink.grid import http_grid

    from fedward.flower import serverapp
    from fedward.flower.backoff import PULL_BACKOFF_CAP_S, PULL_INITIAL_BACKOFF_S

    flowers = getattr(http_grid, "pull_objects")  # noqa: B009
    monkeypatch.setattr(http_grid, "pull_objects", flowers)  # restored after the test
    # The Grid still pulls a reply's objects through that module-level name, with the
    # back-off keywords the patch sets.
    assert "pull_objects(" in inspect.getsource(http_grid)
    params = inspect.signature(flowers).parameters
    assert {"initial_backoff", "backoff_cap", "max_time"} <= set(params)
    serverapp.shorten_object_pulls()
    serverapp.shorten_object_pulls()  # once per process, however often it is called
    patched = getattr(http_grid, "pull_objects")  # noqa: B009
    assert isinstance(patched, functools.partial) and patched.func is flowers
    # A reply whose content never arrives (its site died uploading it) is given up after
    # REPLY_PULL_MAX_S, not after Flower's 500 tries.
    assert patched.keywords == {"initial_backoff": PULL_INITIAL_BACKOFF_S,
                                "backoff_cap": PULL_BACKOFF_CAP_S,
                                "max_time": serverapp.REPLY_PULL_MAX_S}


def test_expired_message_codes_are_flowers() -> None:
    from flwr.common.constant import ErrorCode

    from fedward.flower.serverapp import EXPIRED_ERROR_CODES

    assert {ErrorCode.MESSAGE_UNAVAILABLE,
                                   ErrorCode.REPLY_MESSAGE_UNAVAILABLE} == EXPIRED_ERROR_CODES


# --- warm executor: run_clientapp's steps and a message's private id (fedward.flower.executor)


def test_the_executor_mirrors_flowers_run_clientapp_steps() -> None:
    from flwr.supernode.runtime import run_clientapp

    # The steps fedward.flower.executor.pull_task_input repeats, in Flower's own version.
    source = inspect.getsource(run_clientapp.pull_task_input)
    for step in ("PullTaskInput", "PullMessages", "pull_and_inflate_object_from_tree",
                 "TaskIdentity", "_message_id"):
        assert step in source, step
    push = inspect.signature(run_clientapp.push_message).parameters
    assert list(push)[:3] == ["client", "message", "context"]
    output = inspect.signature(run_clientapp.push_task_output).parameters
    assert {"client", "context", "sub_status", "details"} <= set(output)


def test_a_message_id_written_through_metadata_dict_is_the_messages_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 77), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    message = Message(content=RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=7,
                      message_type="train")
    assert "_message_id" in message.metadata.__dict__
    message.metadata.__dict__["_message_id"] = "m-42"
    assert message.metadata.message_id == "m-42"
    reply = Message(Error(code=1, reason="r"), reply_to=message)
    assert reply.metadata.reply_to_message_id == "m-42"


def test_the_task_identity_the_executor_sets_exists() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # pull_task_input sets these class-level properties for the task it runs.
    for name in ("task_id", "run_id", "node_id"):
        prop = inspect.getattr_static(type(TaskIdentity), name)
        assert isinstance(prop, property) and prop.fset is not None, name


# --- control client (fedward.flower.control) and app bundle (fedward.flower.fab) -----------


def test_the_control_client_still_builds_and_names_itself_as_flowers_cli() -> None:
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    from fedward.flower.control import CONTROL_COMPONENT

    params = inspect.signature(ControlHttpClient.from_server_address).parameters
    assert {"server_address", "insecure", "root_certificates", "interceptors"} <= set(params)
    router = importlib.import_module("flwr.superlink.routers.control.router")
    assert f"{CONTROL_COMPONENT} <-> SuperLink Control API" in inspect.getsource(router)
    RuntimeVersionHttpInterceptor(component_name=CONTROL_COMPONENT)
    for rpc in ("RegisterNode", "UnregisterNode", "ListNodes", "StartRun", "StopRun",
                "ListRuns"):
        assert callable(getattr(ControlHttpClient, rpc)), rpc


def test_the_fab_builder_takes_files_and_reads_its_config_back() -> None:
    from flwr.common.config import get_fab_config

    from fedward.flower.fab import APP_COMPONENTS, APP_PUBLISHER, app_bundle

    fab, digest = app_bundle()
    assert len(digest) == 64
    app_cfg = get_fab_config(fab)["tool"]["flwr"]["app"]
    assert app_cfg["publisher"] == APP_PUBLISHER and app_cfg["components"] == APP_COMPONENTS


# --- SuperNode exit codes (fedward.flower.exit_codes) ------------------------------------


def test_the_exit_codes_the_agent_acts_on_are_flowers() -> None:
    from flwr.supercore.exit import ExitCode

    assert exit_codes.NODE_AUTH_KEY_INVALID == ExitCode.SUPERNODE_NODE_AUTH_KEY_INVALID
    assert exit_codes.NODE_WITHOUT_TLS == \
        ExitCode.SUPERNODE_STARTED_WITHOUT_TLS_BUT_NODE_AUTH_ENABLED
    assert exit_codes.NODE_CONNECTION_REFUSED == ExitCode.SUPERNODE_CONNECTION_ERROR
    assert exit_codes.RUNTIME_VERSION_INCOMPATIBLE == ExitCode.RUNTIME_VERSION_INCOMPATIBLE


@pytest.mark.integration
def test_a_refusing_superlink_is_read_as_exit_code_305(tmp_path: Path) -> None:
    """A real SuperNode whose node key the SuperLink does not know exits with status 1;
    the code the agent reads from its log is Flower's 305."""
    pki = ensure_ca(tmp_path / "pki")
    issue_server_cert(pki)
    port = free_port()
    env = flower_env(str(tmp_path / "flwr-home"))
    link_log = (tmp_path / "superlink.log").open("wb")
    link = subprocess.Popen(
        [venv_bin("flower-superlink"), "--ssl-ca-certfile", str(pki.ca_cert),
         "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key),
         "--enable-supernode-auth", "--database", str(tmp_path / "state.db"),
         "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation"],
        stdout=link_log, stderr=subprocess.STDOUT, env=env)
    node_log_path = tmp_path / "supernode.log"
    node: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        while b"Starting" not in (tmp_path / "superlink.log").read_bytes():
            assert link.poll() is None, (tmp_path / "superlink.log").read_text()
            assert time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.2)
        with node_log_path.open("wb") as node_log:
            node = subprocess.Popen(
                [sys.executable, "-m", "fedward.flower.supernode",
                 "--root-certificates", str(pki.ca_cert),
                 "--superlink", f"127.0.0.1:{port}",
                 "--auth-supernode-private-key", str(node_key(tmp_path)[0]),
                 "--port", str(free_port()), "--isolation", "process"],
                stdout=node_log, stderr=subprocess.STDOUT,
                env={**env, "PYTHONPATH": str(REPO)})
            status = node.wait(timeout=120)
        assert status == 1   # flwr_exit maps every code of 100 and above to 1
        assert exit_codes.flower_exit_code(node_log_path, status) == 305, \
            node_log_path.read_text()[-2000:]
    finally:
        if node is not None and node.poll() is None:
            stop_process_tree(node)  # type: ignore[arg-type]
        stop_process_tree(link)  # type: ignore[arg-type]
        link_log.close()
