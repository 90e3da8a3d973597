"""The coordinator's watchdog for runs whose ServerApp ended before the run did.

The decision logic is exercised against a recording stand-in for the SuperLink's control
API (what Flower reports is the input); the real path, a ServerApp that dies in a live
federation, is covered by tests/test_faults.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlmodel import select

from coordinator import repository
from coordinator.db import session_scope
from coordinator.models import AuditEvent, Project, Run
from coordinator.service import (
    MAX_SERVERAPP_RELAUNCHES,
    ORPHAN_GRACE_S,
    Coordinator,
)
from coordinator.settings import Settings
from fedward.flower.control import FlowerRunState


@dataclass
class Control:
    """What the SuperLink says about the newest Flower run of each coordinator run."""

    runs: dict[int, FlowerRunState] = field(default_factory=dict)
    started: list[int] = field(default_factory=list)

    def training_runs(self) -> dict[int, FlowerRunState]:
        return dict(self.runs)

    def start_run(self, *, fedward_run_id: int) -> int:
        self.started.append(fedward_run_id)
        flwr_id = 1000 + len(self.started)
        self.runs[fedward_run_id] = FlowerRunState(flwr_id, "pending", "", "")
        return flwr_id


@pytest.fixture
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Coordinator, Control]:
    coord = Coordinator(settings=Settings(home=tmp_path / "home"))
    control = Control()
    monkeypatch.setattr(coord, "_control", lambda: control)
    return coord, control


def _running_run(coord: Coordinator) -> int:
    with session_scope(coord.engine) as session:
        project = Project(name="oncology")
        session.add(project)
        session.flush()
        assert project.id is not None
        run = Run(project_id=project.id, task="breast_cancer_mlp", launched_by="alice",
                  config_json='{"rounds": 3, "sites": ["site-a"]}')
        session.add(run)
        session.flush()
        assert run.id is not None
        run_id = run.id
    repository.mark_run_started(coord.engine, run_id, "77")
    return run_id


def _run(coord: Coordinator, run_id: int) -> Run:
    with session_scope(coord.engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        session.expunge(run)
        return run


def test_a_live_flower_run_is_left_alone(coordinator: tuple[Coordinator, Control]) -> None:
    coord, control = coordinator
    run_id = _running_run(coord)
    control.runs[run_id] = FlowerRunState(77, "running", "", "")
    for t in (0.0, 100.0, 1000.0):
        coord.check_orphaned_runs(now=t)
    assert control.started == [] and _run(coord, run_id).status == "running"


def test_a_dead_serverapp_is_relaunched_after_the_grace_then_the_run_fails(
        coordinator: tuple[Coordinator, Control]) -> None:
    coord, control = coordinator
    run_id = _running_run(coord)
    crashed = FlowerRunState(77, "finished", "failed", "ServerApp exited\nTraceback ...")
    control.runs[run_id] = crashed
    coord.check_orphaned_runs(now=0.0)
    coord.check_orphaned_runs(now=ORPHAN_GRACE_S / 2)
    assert control.started == []          # within the grace period: nothing yet
    t = ORPHAN_GRACE_S + 1
    for attempt in range(1, MAX_SERVERAPP_RELAUNCHES + 1):
        coord.check_orphaned_runs(now=t)
        assert control.started == [run_id] * attempt
        control.runs[run_id] = crashed     # the relaunched ServerApp dies again
        coord.check_orphaned_runs(now=t + 1)
        t += ORPHAN_GRACE_S + 2
        coord.check_orphaned_runs(now=t)
    run = _run(coord, run_id)
    assert run.status == "failed"
    assert run.failure_reason is not None
    assert "finished:failed (ServerApp exited)" in run.failure_reason
    assert f"relaunched {MAX_SERVERAPP_RELAUNCHES} times" in run.failure_reason
    with session_scope(coord.engine) as session:
        actions = [e.action for e in session.exec(select(AuditEvent)).all()]
    assert actions.count("run.relaunched") == MAX_SERVERAPP_RELAUNCHES


def test_a_run_stopped_in_flower_is_recorded_as_stopped(
        coordinator: tuple[Coordinator, Control]) -> None:
    coord, control = coordinator
    run_id = _running_run(coord)
    control.runs[run_id] = FlowerRunState(77, "finished", "stopped", "")
    coord.check_orphaned_runs(now=0.0)
    coord.check_orphaned_runs(now=ORPHAN_GRACE_S + 1)
    run = _run(coord, run_id)
    assert run.status == "stopped" and control.started == []


def test_a_run_that_recovers_within_the_grace_is_not_relaunched(
        coordinator: tuple[Coordinator, Control]) -> None:
    coord, control = coordinator
    run_id = _running_run(coord)
    coord.check_orphaned_runs(now=0.0)    # no Flower run yet (being launched)
    control.runs[run_id] = FlowerRunState(78, "starting", "", "")
    coord.check_orphaned_runs(now=ORPHAN_GRACE_S + 1)
    del control.runs[run_id]
    coord.check_orphaned_runs(now=ORPHAN_GRACE_S + 2)   # the clock starts again
    assert control.started == [] and _run(coord, run_id).status == "running"
