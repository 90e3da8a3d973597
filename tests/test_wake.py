"""The SuperNode wakes the site's task executor instead of being asked 20 times a second."""

from __future__ import annotations

import stat
import time
from typing import Any

from fedward.flower.supernode import ShortSleep, noting_messages
from fedward.flower.wake import FALLBACK_S, WakeListener, notify
from site_agent.warm_executor import WarmExecutor

from tests_support import short_tmp


def test_a_wake_up_ends_the_wait_and_every_queued_one_goes_with_it() -> None:
    with short_tmp() as tmp:
        listener = WakeListener(tmp / "wake.sock")
        try:
            assert stat.S_IMODE((tmp / "wake.sock").stat().st_mode) == 0o600
            started = time.monotonic()
            assert listener.wait(0.2) is False
            assert time.monotonic() - started >= 0.19
            for _ in range(5):
                notify(str(tmp / "wake.sock"))
            assert listener.wait(5.0) is True
            assert listener.wait(0.05) is False   # the five came as one
        finally:
            listener.close()
        assert not (tmp / "wake.sock").exists()


def test_notify_without_a_listener_does_nothing() -> None:
    with short_tmp() as tmp:
        notify(str(tmp / "nobody.sock"))
        (tmp / "plain").write_text("x")
        notify(str(tmp / "plain"))


def test_a_replaced_listener_keeps_its_socket_when_the_old_one_closes() -> None:
    """A restarted SuperNode gets a new executor; the old one may close after that."""
    with short_tmp() as tmp:
        old = WakeListener(tmp / "wake.sock")
        new = WakeListener(tmp / "wake.sock")
        old.close()
        assert (tmp / "wake.sock").exists()
        notify(str(tmp / "wake.sock"))
        assert new.wait(5.0) is True
        new.close()
        assert not (tmp / "wake.sock").exists()


def test_the_supernode_wakes_the_executor_for_a_message_and_only_then() -> None:
    results: list[Any] = [None, 7]

    def pull_and_store(**_: Any) -> Any:
        return results.pop(0)

    with short_tmp() as tmp:
        listener = WakeListener(tmp / "wake.sock")
        try:
            patched = noting_messages(ShortSleep(0.25), pull_and_store,
                                      wake=str(tmp / "wake.sock"))
            assert patched() is None
            assert listener.wait(0.1) is False
            assert patched() == 7
            assert listener.wait(5.0) is True
        finally:
            listener.close()


def test_a_woken_executor_asks_often_for_a_moment_then_only_now_and_then() -> None:
    with short_tmp() as tmp:
        listener = WakeListener(tmp / "wake.sock")
        try:
            executor = WarmExecutor(runtime_address="unix:/nonexistent",
                                    app=None,  # type: ignore[arg-type]
                                    poll_s=0.05, woken_for_s=2.0, wake=listener)
            start = executor.active_at
            assert executor.wait_after_empty_ask(start + 1.0) == 0.05   # a task just ended
            assert executor.wait_after_empty_ask(start + 3.0) == FALLBACK_S
            executor.woken_at = start + 10.0
            assert executor.wait_after_empty_ask(start + 11.0) == 0.05
            assert executor.wait_after_empty_ask(start + 12.5) == FALLBACK_S
        finally:
            listener.close()
