"""The round loop ends a cancelled run: mid-round, during admission, and tells its sites.

In-process sites (``SiteGrid`` of ``grid_support``); the same path with Flower and
real site agents is in ``tests/test_run_control_integration.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message, RecordDict
from sqlalchemy import Engine
from sqlmodel import select

from coordinator.db import session_scope
from coordinator.models import AuditEvent, Run
from coordinator.round_loop import RoundLoop
from coordinator.run_control import request_cancel
from fedward.wire import (
    CANCEL_BY,
    CANCEL_MESSAGE_TYPE,
    CANCEL_REASON,
    TASK_CONFIG,
    SiteErrorCode,
)

from grid_support import (
    NODES,
    PlanFactory,
    SiteFn,
    SiteGrid,
    arrays_of,
    good_site,
    rounds_of,
    run_row,
)

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def engine(grid_engine: Engine) -> Engine:
    """This module's database: the Grid's, its sites registered (``grid_engine``)."""
    return grid_engine


def _cancel(engine: Engine, run_id: int, reason: str = "wrong cohort") -> None:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        request_cancel(session, run, actor="alice", reason=reason)


def _acking(train: SiteFn, cancels: list[Message]) -> SiteFn:
    """A site that answers a cancel message with an empty reply, and tasks with ``train``."""

    def answer(msg: Message) -> Message | None:
        if msg.metadata.message_type == CANCEL_MESSAGE_TYPE:
            cancels.append(msg)
            return Message(RecordDict(), reply_to=msg)
        return train(msg)

    return answer


def test_a_cancel_mid_round_ends_the_round_and_the_run_and_tells_the_sites(
        engine: Engine, make_plan: PlanFactory, tmp_path: Path) -> None:
    plan = make_plan(rounds=5, round_deadline_s=60.0)
    trained: list[int] = []

    def slow_second_round(msg: Message) -> Message | None:
        trained.append(1)
        if len(trained) <= 3:   # distinct updates (identical ones are rejected)
            return good_site(float(msg.metadata.dst_node_id) / 100)(msg)
        # Round 2 at the first site: the ML team cancels while nobody has answered yet.
        if len(trained) == 4:
            _cancel(engine, plan.run_id)
        return None

    cancels: list[Message] = []
    gone = Error(code=SiteErrorCode.TRAINER_UNAVAILABLE, reason="trainer-unavailable: down")
    sites = {11: _acking(slow_second_round, cancels), 12: _acking(slow_second_round, cancels),
             13: lambda m: Message(gone, reply_to=m) if m.metadata.message_type
             == CANCEL_MESSAGE_TYPE else slow_second_round(m)}
    grid = SiteGrid(sites, online=[11, 12, 13])
    t0 = time.monotonic()
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), cancel_poll_s=0.2).run()
    took = time.monotonic() - t0
    assert took < 10, f"the loop took {took:.1f} s; the round deadline is 60 s"

    run = run_row(engine, plan.run_id)
    assert (run.status, run.failure_reason) == ("cancelled", "cancelled by alice: wrong cohort")
    assert [(r.number, r.status) for r in rounds_of(engine, plan.run_id)] == [
        (1, "completed"), (2, "cancelled")]
    assert len(cancels) == 2
    assert all((m.content[TASK_CONFIG][CANCEL_BY], m.content[TASK_CONFIG][CANCEL_REASON])
               == ("alice", "wrong cohort") for m in cancels)
    with session_scope(engine) as session:
        delivered = session.exec(select(AuditEvent).where(
            AuditEvent.action == "run.cancel_delivered")).one()
        assert delivered.subject == f"run:{plan.run_id}"
        detail = json.loads(delivered.detail_json)
    assert detail == {"told": ["hospital-a", "hospital-b"],
                      "not_told": {"hospital-c": "trainer-unavailable: down"}}


def test_a_run_waiting_for_approval_is_cancelled_during_admission(
        engine: Engine, make_plan: PlanFactory, tmp_path: Path) -> None:
    plan = make_plan(rounds=3, round_deadline_s=60.0, approval_wait_s=3600.0)
    asked: list[int] = []

    def waiting(msg: Message) -> Message:
        asked.append(1)
        if len(asked) == 2:   # the site is asked again while it waits: cancel now
            _cancel(engine, plan.run_id, "not needed")
        return Message(Error(code=SiteErrorCode.PENDING_APPROVAL,
                             reason="pending-approval: waits"), reply_to=msg)

    cancels: list[Message] = []
    trains: list[Message] = []

    def never(msg: Message) -> Message | None:
        trains.append(msg)
        return None

    grid = SiteGrid({n: _acking(never, cancels) for n in NODES.values()},
                    online=list(NODES.values()), admission={12: waiting})
    t0 = time.monotonic()
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.2, cancel_poll_s=0.2).run()
    assert time.monotonic() - t0 < 10
    run = run_row(engine, plan.run_id)
    assert (run.status, run.failure_reason) == ("cancelled", "cancelled by alice: not needed")
    assert rounds_of(engine, plan.run_id) == [] and trains == []
    assert len(cancels) == 3   # every online site, the waiting one included
