"""Unit tests of the coordinator's engine: update checks, aggregation, the round loop on an
in-process Grid, checkpoints, the PKI and the Flower control helpers."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import math
import os
import re
import stat
import time
import tomllib
import warnings
import zipfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator import run_audit
from coordinator.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from coordinator.db import session_scope
from coordinator.models import AuditEvent, Round, SiteMetric
from coordinator.round_records import finish_round, last_checkpoint, record_checkpoint
from coordinator.schemas import NodeKeyCreate
from fedward.certs import ensure_ca, issue_server_cert
from fedward.wire import (
    ADMISSION_MESSAGE_TYPE,
    CFG,
    PACKED,
    REPLY_ARRAYS,
    REPLY_METRICS,
    TASK_ARRAYS,
    TASK_CONFIG,
    SiteErrorCode,
)
from site_agent.keys import ensure_node_key

from grid_support import (
    EXPECTED,
    PlanFactory,
    SiteFn,
    SiteGrid,
    accepting,
    arrays_of,
    good_site,
    rounds_of,
    run_row,
    task_arrays,
)

with warnings.catch_warnings():
    # flwr imports typer, which touches aliases that Click 8.3+ deprecates: harmless here.
    warnings.filterwarnings("ignore", message=r"'click\.utils\.get_\w+_stream' is deprecated",
                            category=DeprecationWarning)
    from flwr.app import (
        Array,
        ArrayRecord,
        Error,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.common.constant import ErrorCode

    from coordinator.aggregation import aggregate
    from coordinator.round_loop import RoundLoop
    from coordinator.update_checks import (
        NORM_BOUND_FACTOR,
        dp_update_norm_bound,
        update_norm,
        validate_update,
    )
    from fedward.flower.control import NodeKeyError, node_public_key_bytes
    from fedward.flower.fab import APP_COMPONENTS, app_bundle
    from fedward.run_config import RunPlan
    from fedward.wire import update_digest

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def engine(grid_engine: Engine) -> Engine:
    """This module's database: the Grid's, its sites registered (``grid_engine``)."""
    return grid_engine


# --- validate_update ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda a: a["w"].__setitem__((0, 1), np.nan), "array 'w' contains NaN or Inf"),
        (lambda a: a["b"].__setitem__(2, -np.inf), "array 'b' contains NaN or Inf"),
        (lambda a: a.update(w=a["w"].astype(np.float64)),
         "array 'w' has dtype float64, expected float32"),
        (lambda a: a.update(b=np.zeros((1, 3), np.float32)),
         "array 'b' has shape [1, 3], expected [3]"),
        (lambda a: a.pop("b"), "update arrays ['w'] do not match the model's ['b', 'w']"),
        (lambda a: a.update(extra=np.zeros(1, np.float32)),
         "update arrays ['b', 'extra', 'w'] do not match the model's ['b', 'w']"),
    ],
)
def test_validate_update_rejects_with_the_specific_reason(
    change: Callable[[dict[str, np.ndarray]], object], problem: str
) -> None:
    update = arrays_of(0.5)
    change(update)
    assert validate_update(update, EXPECTED) == problem


def test_validate_update_accepts_a_sound_update() -> None:
    assert validate_update(arrays_of(0.5), EXPECTED) is None


# --- aggregate ---------------------------------------------------------------------------


def test_fedavg_is_the_weighted_mean() -> None:
    out = aggregate([(arrays_of(1.0), 100.0), (arrays_of(4.0), 300.0)], method="fedavg")
    assert set(out) == set(EXPECTED)
    for name, shape in EXPECTED.items():
        assert out[name].dtype == np.float32 and out[name].shape == shape
        np.testing.assert_allclose(out[name], 3.25)


def test_fedavg_with_no_positive_weight_is_the_plain_mean() -> None:
    out = aggregate([(arrays_of(1.0), 0.0), (arrays_of(3.0), -5.0)])
    np.testing.assert_allclose(out["w"], 2.0)


def test_fedavg_ignores_a_non_finite_weight_instead_of_spreading_nan() -> None:
    for bad in (math.nan, math.inf):
        out = aggregate([(arrays_of(1.0), bad), (arrays_of(3.0), 10.0), (arrays_of(5.0), 10.0)])
        np.testing.assert_allclose(out["w"], 4.0)
    huge = aggregate([(arrays_of(1.0), 1e308), (arrays_of(3.0), 1e308)])
    np.testing.assert_allclose(huge["w"], 2.0)


def test_robust_aggregations_resist_one_outlier_site_and_fedavg_does_not() -> None:
    honest = [(arrays_of(v), 100.0) for v in (1.0, 1.1, 0.9, 1.05)]
    updates = [*honest, (arrays_of(1e6), 100.0)]

    fedavg = aggregate(updates, method="fedavg")
    median = aggregate(updates, method="median")
    trimmed = aggregate(updates, method="trimmed-mean")

    assert float(fedavg["w"].max()) > 1e5
    np.testing.assert_allclose(median["w"], 1.05)
    np.testing.assert_allclose(trimmed["b"], (1.0 + 1.05 + 1.1) / 3, rtol=1e-6)


def test_unknown_aggregation_and_no_updates_raise() -> None:
    with pytest.raises(ValueError, match="unknown aggregation 'krum': use fedavg, median"):
        aggregate([(arrays_of(1.0), 1.0)], method="krum")
    with pytest.raises(ValueError, match="no updates to aggregate"):
        aggregate([])


# --- RoundLoop on an in-process Grid -----------------------------------------------------

def packed_site(delta: float, n: float = 100.0, *, extra: int = 0) -> SiteFn:
    """Like good_site, but answers as the site relay does: one packed array (``extra``
    values too many, for a malformed one)."""

    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({REPLY_METRICS: MetricRecord({"eval-accuracy": 0.75})}),
                           reply_to=msg)
        flat = msg.content.array_records[TASK_ARRAYS][PACKED].numpy() + np.float32(delta)
        flat = np.concatenate([flat, np.zeros(extra, np.float32)])
        return Message(RecordDict({
            REPLY_ARRAYS: ArrayRecord({PACKED: Array(flat.astype(np.float32))}),
            REPLY_METRICS: MetricRecord({"num-examples": n, "train-loss": 0.3}),
        }), reply_to=msg)

    return answer


def nan_site(msg: Message) -> Message:
    bad = {k: np.full(s, np.nan, np.float32) for k, s in EXPECTED.items()}
    return Message(RecordDict({
        REPLY_ARRAYS: ArrayRecord({k: Array(v) for k, v in bad.items()}),
        REPLY_METRICS: MetricRecord({"num-examples": 100.0}),
    }), reply_to=msg)


def refusing_site(msg: Message) -> Message:
    return Message(Error(code=SiteErrorCode.REFUSED_BUDGET,
                         reason="refused-budget: the round would spend 3.2 > 3.0"), reply_to=msg)


def silent_site(msg: Message) -> None:
    return None


def one_round_with(engine: Engine, tmp_path: Path, plan: RunPlan, middle: SiteFn) -> Round:
    """Run a one-round plan with hospital-b answering as ``middle`` between two sound sites
    (hospital-a and hospital-c, distinct updates); returns the round's row."""
    grid = SiteGrid({11: good_site(1.0), 12: middle, 13: good_site(2.0)}, online=[11, 12, 13])
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()
    (rnd,) = rounds_of(engine, plan.run_id)
    return rnd


def test_round_loop_aggregates_sound_updates_and_names_each_failed_site(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=2)
    grid = SiteGrid({11: good_site(1.0), 12: refusing_site, 13: nan_site}, online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    assert run_row(engine, plan.run_id).status == "completed"
    rounds = rounds_of(engine, plan.run_id)
    assert [(r.number, r.status) for r in rounds] == [(1, "completed"), (2, "completed")]
    assert json.loads(rounds[0].participating_sites_json) == ["hospital-a"]
    failed = {f["site"]: f for f in json.loads(rounds[0].failed_sites_json)}
    assert failed["hospital-b"] == {
        "site": "hospital-b", "phase": "budget", "code": "refused-budget",
        "reason": "refused-budget: the round would spend 3.2 > 3.0"}
    assert failed["hospital-c"]["phase"] == "validate"
    assert failed["hospital-c"]["reason"] == "update rejected: array 'w' contains NaN or Inf"
    # Each round starts from the previous aggregate: only the sound site counted.
    last = last_checkpoint(engine, plan.run_id)
    assert last is not None and last[0] == 2
    final = load_checkpoint(tmp_path / last[1], expected_sha256=last[2])
    np.testing.assert_allclose(final["w"], 2.0)
    configs = [dict(m.content[TASK_CONFIG]) for m in grid.sent]
    assert [c[CFG.ROUND] for c in configs] == [1, 1, 1, 2, 2, 2]
    assert all(c[CFG.RUN_ID] == str(plan.run_id) and c[CFG.TRAIN] for c in configs)


def test_packed_replies_are_unpacked_and_a_packed_reply_of_the_wrong_size_is_rejected(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan()
    grid = SiteGrid({11: packed_site(1.0, n=100.0), 12: good_site(4.0, n=300.0),
                     13: packed_site(1.0, extra=3)}, online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(10.0)).run()

    assert run_row(engine, plan.run_id).status == "completed"
    (rnd,) = rounds_of(engine, plan.run_id)
    assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-b"]
    failed = {f["site"]: f for f in json.loads(rnd.failed_sites_json)}
    assert failed["hospital-c"]["code"] == "rejected-update"
    assert failed["hospital-c"]["phase"] == "validate"
    assert "packed model has 12 values, the layout 9" in failed["hospital-c"]["reason"]
    rejected = audit_of(engine, "update.rejected")
    assert [(subject, detail["phase"], detail["run_id"]) for _, subject, detail in rejected] \
        == [("site:hospital-c", "validate", plan.run_id)]
    # The task went out as one array, with its layout; the sound replies were averaged.
    sent = grid.sent[0].content.array_records[TASK_ARRAYS]
    assert list(sent) == [PACKED]
    last = last_checkpoint(engine, plan.run_id)
    assert last is not None
    np.testing.assert_allclose(load_checkpoint(tmp_path / last[1])["b"], 10.0 + 3.25)


def failing_site(msg: Message) -> Message:
    """A site whose task raised while it evaluated the received model (the reason the site
    agent writes, see site_agent.diagnostics)."""
    return Message(Error(code=SiteErrorCode.TASK_FAILED,
                         reason="task-failed: ValueError during train (phase evaluate): could "
                                "not convert <text> to float\nTraceback ..."), reply_to=msg)


def test_a_site_failure_is_shown_with_its_site_phase_exception_and_scrubbed_message(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    rnd = one_round_with(engine, tmp_path, make_plan(), failing_site)
    (failed,) = json.loads(rnd.failed_sites_json)
    assert failed == {"site": "hospital-b", "phase": "evaluate", "code": "task-failed",
                      "reason": "task-failed: ValueError during train (phase evaluate): "
                                "could not convert <text> to float"}
    (event,) = audit_of(engine, "site.failed")
    assert event[1] == "site:hospital-b" and event[2]["phase"] == "evaluate"


def expired(msg: Message) -> Message:
    """What the SuperLink answers for a message whose time to live (the deadline) ran out."""
    return Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                         reason="Error: Message Unavailable - ... expired due to its TTL"),
                   reply_to=msg)


def test_an_expired_message_is_a_late_site_not_an_engine_failure(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    rnd = one_round_with(engine, tmp_path, make_plan(round_deadline_s=2.0), expired)
    assert json.loads(rnd.late_sites_json) == ["hospital-b"]
    (failed,) = json.loads(rnd.failed_sites_json)
    assert failed["site"] == "hospital-b" and failed["reason"].startswith("late")
    (late,) = audit_of(engine, "site.late")
    assert late[1] == "site:hospital-b"
    assert all(e[2]["phase"] != "engine" for e in audit_of(engine, "site.failed"))


@pytest.mark.parametrize(("code", "reason", "phase"), [
    (SiteErrorCode.TASK_FAILED, "task-failed: OSError during train (phase privacy): x",
     "privacy"),
    (SiteErrorCode.TASK_FAILED, "task-failed: ValueError during train", "train"),
    (SiteErrorCode.REFUSED_DATA, "refused-data-check: ...", "data"),
    (SiteErrorCode.EGRESS_BLOCKED, "egress blocked: ...", "egress"),
    (SiteErrorCode.PENDING_APPROVAL, "pending-approval: ...", "admission"),
    (SiteErrorCode.TRAINER_UNAVAILABLE, "trainer-unavailable: ...", "agent"),
    (0, "the node went offline", "engine"),
    # Only a task failure names its own phase: a refusal cannot claim another.
    (SiteErrorCode.REFUSED_POLICY, "refused-policy: (phase train)", "policy"),
])
def test_failure_phase_from_a_sites_error_reply(code: int, reason: str, phase: str) -> None:
    from coordinator.update_checks import failure_phase

    assert failure_phase(code, reason) == phase


@pytest.mark.parametrize(("aggregation", "expected"), [("median", 2.0), ("fedavg", 103 / 3),
                                                        ("trimmed-mean", 2.0)])
def test_the_runs_aggregation_is_the_one_the_round_loop_uses(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path, aggregation: str, expected: float
) -> None:
    # An outlier within the norm bound (max_update_norm set high): only the robust
    # aggregations keep it out of the model.
    plan = make_plan(aggregation=aggregation, max_update_norm=1e6)
    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0), 13: good_site(100.0)},
                    online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    last = last_checkpoint(engine, plan.run_id)
    assert last is not None
    np.testing.assert_allclose(load_checkpoint(tmp_path / last[1])["w"], expected, rtol=1e-6)


def test_round_loop_fails_the_run_naming_late_and_offline_sites(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2, round_deadline_s=1.0)
    grid = SiteGrid({11: good_site(1.0), 12: silent_site, 13: good_site(1.0)}, online=[11, 12])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    run = run_row(engine, plan.run_id)
    assert run.status == "failed"
    assert run.failure_reason is not None
    assert run.failure_reason.startswith("round 1: 1 usable updates, the run needs at least 2")
    assert "hospital-b: late: no reply within the 1 s round deadline" in run.failure_reason
    assert "hospital-c: site offline" in run.failure_reason
    (round1,) = rounds_of(engine, plan.run_id)
    assert round1.status == "failed"
    assert json.loads(round1.late_sites_json) == ["hospital-b"]
    assert last_checkpoint(engine, plan.run_id) is None


def test_round_loop_fails_at_once_when_too_few_sites_are_online(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2, round_deadline_s=0.6)
    grid = SiteGrid({11: good_site(1.0)}, online=[11])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    run = run_row(engine, plan.run_id)
    assert run.status == "failed" and grid.sent == []
    assert run.failure_reason is not None
    assert "only 1 of 3 sites online" in run.failure_reason
    assert "offline: hospital-b, hospital-c" in run.failure_reason


def test_round_loop_resumes_from_the_last_checkpoint_and_evaluates_at_the_end(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=2, sites=("hospital-a", "hospital-b"), final_evaluate=True)
    rel, sha = save_checkpoint(tmp_path, plan.run_id, 1, arrays_of(10.0))
    record_checkpoint(engine, plan.run_id, 1, str(rel), sha)
    grid = SiteGrid({11: good_site(1.0, n=100.0), 12: good_site(4.0, n=300.0)},
                    online=[11, 12])

    def no_initial() -> dict[str, np.ndarray]:
        raise AssertionError("a resumed run must not start from a fresh model")

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan, initial=no_initial).run()

    assert run_row(engine, plan.run_id).status == "completed"
    assert [r.number for r in rounds_of(engine, plan.run_id)] == [2]
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    eval_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert len(train_msgs) == 2 and len(eval_msgs) == 2
    assert all(m.content[TASK_CONFIG][CFG.ROUND] == 2 for m in train_msgs)
    np.testing.assert_array_equal(task_arrays(train_msgs[0])["w"],
                                  arrays_of(10.0)["w"])
    last = last_checkpoint(engine, plan.run_id)
    assert last is not None and last[0] == 2
    np.testing.assert_allclose(load_checkpoint(tmp_path / last[1])["b"], 10.0 + 3.25)
    assert all(not m.content[TASK_CONFIG][CFG.TRAIN] for m in eval_msgs)
    with session_scope(engine) as session:
        finals = {(m.site_name, m.name): m.value for m in session.exec(
            select(SiteMetric).where(SiteMetric.run_id == plan.run_id,
                                     col(SiteMetric.name).startswith("final-")))}
    assert finals == {("hospital-a", "final-eval-accuracy"): 0.75,
                      ("hospital-b", "final-eval-accuracy"): 0.75}


# --- admission: sites' policies accept the run before round 1 -----------------------------


def pending(msg: Message) -> Message:
    """A site whose policy waits for a local approval of the run."""
    run = msg.content[TASK_CONFIG][CFG.RUN_ID]
    return Message(Error(code=SiteErrorCode.PENDING_APPROVAL,
                         reason=f"pending-approval: run {run} waits for approval at site "
                                f"hospital-b (fedward-site approve {run})"), reply_to=msg)


def denied(msg: Message) -> Message:
    run = msg.content[TASK_CONFIG][CFG.RUN_ID]
    return Message(Error(code=SiteErrorCode.REFUSED_POLICY,
                         reason=f"refused-policy: run {run} was denied at this site"),
                   reply_to=msg)


def in_turn(*answers: SiteFn) -> SiteFn:
    """Answers with each function in turn; the last one answers from then on."""
    calls = iter(range(10**6))

    def answer(msg: Message) -> Message | None:
        return answers[min(next(calls), len(answers) - 1)](msg)

    return answer


def audit_of(engine: Engine, *actions: str) -> list[tuple[str, str, dict[str, object]]]:
    with session_scope(engine) as session:
        rows = session.exec(select(AuditEvent).where(col(AuditEvent.action).in_(actions))
                            .order_by(col(AuditEvent.id))).all()
        return [(e.action, e.subject, json.loads(e.detail_json)) for e in rows]


def test_run_waits_for_a_site_pending_approval_then_both_train_from_round_1(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=2, sites=("hospital-a", "hospital-b"))
    seen_while_waiting: list[tuple[str, dict[str, object]] | None] = []

    def approved_on_the_fourth_ask(msg: Message) -> Message:
        if len([m for m in grid.asked if m.metadata.dst_node_id == 12]) < 4:
            seen_while_waiting.append(run_audit.admission_record(engine, plan.run_id))
            return pending(msg)
        return accepting(msg)

    grid = SiteGrid({11: good_site(1.0), 12: good_site(4.0)}, online=[11, 12],
                    admission={12: approved_on_the_fourth_ask})
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.02).run()

    assert run_row(engine, plan.run_id).status == "completed"
    rounds = rounds_of(engine, plan.run_id)
    for rnd in rounds:
        assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-b"]
        assert json.loads(rnd.failed_sites_json) == []
    # hospital-a was asked once; hospital-b again until it answered (no training meanwhile).
    asked = [m.metadata.dst_node_id for m in grid.asked]
    assert asked.count(11) == 1 and asked.count(12) == 4
    assert all(m.metadata.message_type == ADMISSION_MESSAGE_TYPE
               and not m.content.array_records for m in grid.asked)
    assert all(dict(m.content[TASK_CONFIG])[CFG.TRAIN] is False for m in grid.asked)
    # While it waited, the run's record said so, naming the site, since when and why.
    waiting_view = [v for v in seen_while_waiting if v is not None][-1]
    assert waiting_view[0] == "run.waiting"
    detail = waiting_view[1]
    assert detail["state"] == "waiting" and detail["accepted"] == ["hospital-a"]
    waiting = detail["waiting"]
    assert isinstance(waiting, dict) and list(waiting) == ["hospital-b"]
    assert waiting["hospital-b"]["since"]
    assert waiting["hospital-b"]["reason"].startswith(f"pending-approval: run {plan.run_id} ")
    events = audit_of(engine, "run.waiting", "run.admitted")
    assert [a for a, _, _ in events] == ["run.waiting", "run.waiting", "run.admitted"]
    assert events[-1][2]["accepted"] == ["hospital-a", "hospital-b"]
    assert events[-1][2]["waiting"] == {} and events[-1][2]["state"] == "admitted"


def test_a_denial_is_named_and_the_run_goes_on_with_the_others_at_once(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(sites=("hospital-a", "hospital-b"))
    grid = SiteGrid({11: good_site(1.0), 12: denied}, online=[11, 12], admission={12: denied})

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.02).run()

    assert run_row(engine, plan.run_id).status == "completed"
    assert len(grid.asked) == 2  # a refusal is final: never asked again
    (admitted,) = audit_of(engine, "run.admitted")
    assert admitted[2]["refused"] == {
        "hospital-b": f"refused-policy: run {plan.run_id} was denied at this site"}
    assert admitted[2]["accepted"] == ["hospital-a"]
    # The round loop still asks it (the site may change its mind) and names its refusal.
    (rnd,) = rounds_of(engine, plan.run_id)
    (failed,) = json.loads(rnd.failed_sites_json)
    assert failed["site"] == "hospital-b" and failed["code"] == "refused-policy"


def over_budget(msg: Message) -> Message:
    """A site whose remaining budget cannot hold the whole run (its answer to admission)."""
    run = msg.content[TASK_CONFIG][CFG.RUN_ID]
    return Message(Error(code=SiteErrorCode.REFUSED_BUDGET,
                         reason=f"refused-budget: run {run} needs epsilon 2.995 at this site "
                                "for its 4 round(s) x 1 local epoch(s) (noise multiplier "
                                "1.020); project test's epsilon at this site would go from "
                                "1.996 spent to 3.702, over its cap of 3.500 (1.504 left)"),
                   reply_to=msg)


def test_a_budget_refusal_at_admission_fails_the_run_with_the_sites_figures_untrained(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2, sites=("hospital-a", "hospital-b"))
    grid = SiteGrid({11: good_site(1.0), 12: good_site(1.0)}, online=[11, 12],
                    admission={12: over_budget})

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.02).run()

    run = run_row(engine, plan.run_id)
    # Refused up front: no round was sent, so no site trained or spent anything.
    assert run.status == "failed" and grid.sent == [] and rounds_of(engine, plan.run_id) == []
    assert run.failure_reason is not None
    assert run.failure_reason.startswith("not admitted: 1 of 2 sites accepted the run")
    assert ("refused by hospital-b (refused-budget: run "
            f"{plan.run_id} needs epsilon 2.995 at this site") in run.failure_reason
    assert "from 1.996 spent to 3.702, over its cap of 3.500" in run.failure_reason
    (not_admitted,) = audit_of(engine, "run.not_admitted")
    assert not_admitted[2]["refused"]["hospital-b"].startswith("refused-budget: run ")
    assert "over its cap of 3.500 (1.504 left)" in not_admitted[2]["refused"]["hospital-b"]


def test_refusals_that_leave_too_few_sites_fail_the_run_before_any_training(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=3, sites=("hospital-a", "hospital-b", "hospital-c"))
    grid = SiteGrid({11: good_site(1.0), 12: good_site(1.0), 13: good_site(1.0)},
                    online=[11, 12, 13], admission={12: denied, 13: pending})

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.02).run()

    run = run_row(engine, plan.run_id)
    assert run.status == "failed" and grid.sent == [] and rounds_of(engine, plan.run_id) == []
    assert run.failure_reason is not None
    assert run.failure_reason.startswith("not admitted: 1 of 3 sites accepted the run")
    assert "it needs at least 3" in run.failure_reason
    assert (f"refused by hospital-b (refused-policy: run {plan.run_id} was denied at this "
            "site)") in run.failure_reason
    # hospital-c's approval could not help any more: the run did not wait an hour for it.
    assert (f"still waiting for approval at hospital-c: its IT runs `fedward-site approve "
            f"{plan.run_id}`") in run.failure_reason
    assert [a for a, _, _ in audit_of(engine, "run.not_admitted", "run.finished")] == [
        "run.not_admitted", "run.finished"]


def test_the_approval_wait_limit_fails_the_run_saying_what_the_sites_it_must_do(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2, sites=("hospital-a", "hospital-b"), approval_wait_s=0.4)
    grid = SiteGrid({11: good_site(1.0), 12: good_site(1.0)}, online=[11, 12],
                    admission={12: pending})
    t0 = time.monotonic()

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.05).run()

    assert time.monotonic() - t0 >= 0.4
    run = run_row(engine, plan.run_id)
    assert run.status == "failed" and grid.sent == []
    assert re.fullmatch(
        r"not admitted: 1 of 2 sites accepted the run after \d+ s \(approval wait 0.4 s\); "
        r"it needs at least 2; still waiting for approval at hospital-b: its IT runs "
        rf"`fedward-site approve {plan.run_id}`", run.failure_reason or ""), run.failure_reason
    assert [m.metadata.dst_node_id for m in grid.asked].count(12) >= 2  # asked again
    (not_admitted,) = audit_of(engine, "run.not_admitted")
    assert list(not_admitted[2]["waiting"]) == ["hospital-b"]  # type: ignore[call-overload]


def test_after_the_wait_limit_training_starts_and_a_late_approval_joins_later_rounds(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=3, sites=("hospital-a", "hospital-b"), approval_wait_s=0.2)
    grid = SiteGrid({11: good_site(1.0), 12: in_turn(pending, good_site(2.5))},
                    online=[11, 12], admission={12: pending})

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.05).run()

    assert run_row(engine, plan.run_id).status == "completed"
    rounds = rounds_of(engine, plan.run_id)
    assert json.loads(rounds[0].participating_sites_json) == ["hospital-a"]
    (waiting,) = json.loads(rounds[0].failed_sites_json)
    assert (waiting["site"], waiting["phase"], waiting["code"]) == (
        "hospital-b", "admission", "pending-approval")
    assert json.loads(rounds[1].participating_sites_json) == ["hospital-a", "hospital-b"]
    # The run's record: admitted while hospital-b still waited; it stopped waiting in round 2.
    events = audit_of(engine, "run.waiting", "run.admitted")
    assert [a for a, _, _ in events] == ["run.waiting", "run.admitted", "run.waiting"]
    assert list(events[1][2]["waiting"]) == ["hospital-b"]  # type: ignore[call-overload]
    assert events[2][2]["waiting"] == {} and events[2][2]["state"] == "admitted"


def test_offline_and_unanswering_sites_are_left_to_the_round_loop(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2)

    def old_agent(msg: Message) -> Message:
        # An agent without the admission handler: Flower's "ClientApp raised" error.
        return Message(Error(code=0, reason="ValueError: No query function registered with "
                                            "name 'admission'"), reply_to=msg)

    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0), 13: good_site(3.0)},
                    online=[11, 12], admission={12: old_agent})

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.02).run()

    assert run_row(engine, plan.run_id).status == "completed"
    (rnd,) = rounds_of(engine, plan.run_id)
    assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-b"]
    (admitted,) = audit_of(engine, "run.admitted")
    assert admitted[2]["offline"] == ["hospital-c"]
    assert list(admitted[2]["unanswered"]) == ["hospital-b"]  # type: ignore[call-overload]


def test_a_relaunched_run_keeps_its_admission(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    admitted = make_plan(sites=("hospital-a", "hospital-b"))
    run_audit.record_admission(engine, admitted.run_id, action="run.admitted", detail={
       "state": "admitted", "accepted": ["hospital-a", "hospital-b"], "waiting": {}})
    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0)}, online=[11, 12],
                    admission={12: pending})
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=admitted,
              initial=lambda: arrays_of(0.0)).run()
    assert grid.asked == [] and run_row(engine, admitted.run_id).status == "completed"

    # Relaunched while waiting: the original limit holds (here: passed an hour ago).
    waited = make_plan(min_sites=2, sites=("hospital-a", "hospital-b"), approval_wait_s=3600)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    run_audit.record_admission(engine, waited.run_id, action="run.waiting", detail={
       "state": "waiting", "started": long_ago.isoformat(),
       "deadline": (long_ago + timedelta(hours=1)).isoformat(),
       "waiting": {"hospital-b": {"since": long_ago.isoformat(), "reason": "pending"}}})
    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0)}, online=[11, 12],
                    admission={12: pending})
    t0 = time.monotonic()
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=waited,
              initial=lambda: arrays_of(0.0), approval_poll_s=0.02).run()
    assert time.monotonic() - t0 < 30
    run = run_row(engine, waited.run_id)
    assert run.status == "failed" and run.failure_reason is not None
    assert "still waiting for approval at hospital-b" in run.failure_reason
    (not_admitted,) = audit_of(engine, "run.not_admitted")
    waiting = not_admitted[2]["waiting"]
    assert isinstance(waiting, dict)
    assert waiting["hospital-b"]["since"] == long_ago.isoformat()  # kept, not restarted


# --- update checks: norm bound and duplicates ---------------------------------------------


def test_dp_norm_bound_follows_the_dp_sgd_arithmetic() -> None:
    # 100 examples, batch 32: 4 Poisson steps, Opacus's expected batch 25; examples sampled
    # over the round at most 100 + 8 * 10 + 8 = 188; noise norm at most sigma * (6 + 8).
    assert dp_update_norm_bound(n_examples=100, batch_size=32, local_epochs=1, lr=1.0,
                                max_grad_norm=1.0, noise_multiplier=0.0, n_params=9,
                                factor=1.0) == pytest.approx(188 / 25)
    assert dp_update_norm_bound(n_examples=100, batch_size=32, local_epochs=1, lr=0.5,
                                max_grad_norm=2.0, noise_multiplier=2.0, n_params=9,
                                factor=1.0) == pytest.approx(0.5 / 25 * (2 * 188 + 2 * 2 * 14))
    assert NORM_BOUND_FACTOR == 2.0
    assert dp_update_norm_bound(n_examples=100, batch_size=32, local_epochs=1, lr=1.0,
                                max_grad_norm=1.0, noise_multiplier=0.0,
                                n_params=9) == pytest.approx(2 * 188 / 25)


def test_validate_update_rejects_an_update_beyond_the_norm_bound() -> None:
    start = arrays_of(0.0)
    assert update_norm(arrays_of(0.5), start) == pytest.approx(1.5)
    assert validate_update(arrays_of(0.5), EXPECTED, reference=start, max_norm=1.5) is None
    assert validate_update(arrays_of(0.5), EXPECTED, reference=start, max_norm=1.0) == (
        "update norm 1.5 exceeds the bound 1")
    # NaN never passes as "within the bound".
    nan = arrays_of(0.5)
    nan["w"][0, 0] = np.nan
    assert validate_update(nan, EXPECTED, reference=start, max_norm=1e9) == (
        "array 'w' contains NaN or Inf")


@pytest.fixture(scope="module")
def demo_sites(tmp_path_factory: pytest.TempPathFactory) -> list[object]:
    from site_agent.data import load_site_data
    from site_agent.data_schema import load_schema
    from site_agent.datasets import write_demo_federation

    fed = write_demo_federation(task="breast_cancer_mlp",
                                out_dir=tmp_path_factory.mktemp("fed"), n_sites=3)
    return [load_site_data(csv_path=s.csv_path, schema=load_schema(s.schema_path))
            for s in fed.sites]


def trainer_site(data: object, root: Path, *, scale: float = 1.0) -> SiteFn:
    """A site that trains with the real warm trainer (DP-SGD, Opacus); ``scale`` multiplies
    its change to the global model (1.0: honest)."""
    from privacy import PrivacyLedger
    from site_agent.trainer import WarmTrainer

    trainer = WarmTrainer(site_name=root.name, task="breast_cancer_mlp", data=data,  # type: ignore[arg-type]
                          ledger=PrivacyLedger(root / "privacy-ledger.sqlite"),
                          replies_dir=root / "replies")

    def answer(msg: Message) -> Message:
        incoming = task_arrays(msg)
        reply, out = trainer.handle({"kind": "train", "config": dict(msg.content[TASK_CONFIG])},
                                    incoming)
        assert "error" not in reply, reply
        sent = {k: (incoming[k] + np.float32(scale) * (out[k] - incoming[k])).astype(np.float32)
                for k in out}
        return Message(RecordDict({
            REPLY_ARRAYS: ArrayRecord({k: Array(v) for k, v in sent.items()}),
            REPLY_METRICS: MetricRecord(dict(reply["metrics"])),
        }), reply_to=msg)

    return answer


def test_honest_dp_updates_pass_the_norm_bound_and_a_scaled_one_is_rejected(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path, demo_sites: list[object]
) -> None:
    import torch

    from fedward.models import model_arrays
    from fedward.tasks import build_model

    torch.set_num_threads(1)
    plan = make_plan(rounds=2, min_sites=2, lr=1.0, batch_size=32, max_grad_norm=1.0,
                     epsilon=3.0, local_epochs=2, round_deadline_s=600.0)
    grid = SiteGrid({11: trainer_site(demo_sites[0], tmp_path / "hospital-a"),
                     12: trainer_site(demo_sites[1], tmp_path / "hospital-b"),
                     13: trainer_site(demo_sites[0], tmp_path / "hospital-c", scale=100.0)},
                    online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: model_arrays(build_model("breast_cancer_mlp", seed=0))).run()

    assert run_row(engine, plan.run_id).status == "completed"
    for rnd in rounds_of(engine, plan.run_id):
        assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-b"]
        (poisoned,) = json.loads(rnd.failed_sites_json)
        assert (poisoned["site"], poisoned["phase"], poisoned["code"]) == (
            "hospital-c", "validate", "rejected-update")
        assert poisoned["reason"].startswith("update rejected: update norm ")
        assert "exceeds the bound" in poisoned["reason"]
        assert "(2 x the most DP-SGD can move the model with " in poisoned["reason"]
    rejected = audit_of(engine, "update.rejected")
    assert [(s, d["round"]) for _, s, d in rejected] == [("site:hospital-c", 1),
                                                         ("site:hospital-c", 2)]
    assert set(rejected[0][2]) == {"run_id", "round", "phase", "reason", "code"}


def test_a_run_option_replaces_the_derived_norm_bound(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(max_update_norm=2.0)
    grid = SiteGrid({11: good_site(0.5), 12: good_site(1.0), 13: good_site(0.25)},
                    online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    (rnd,) = rounds_of(engine, plan.run_id)
    assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-c"]
    (failed,) = json.loads(rnd.failed_sites_json)
    assert failed["reason"] == ("update rejected: update norm 3 exceeds the bound 2 (the "
                                "run's max_update_norm)")


def test_an_update_without_its_example_count_cannot_be_bounded_and_is_rejected(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    def no_count(msg: Message) -> Message:
        incoming = task_arrays(msg)
        return Message(RecordDict({
            REPLY_ARRAYS: ArrayRecord({k: Array(v + np.float32(0.1)) for k, v in
                                       incoming.items()}),
            REPLY_METRICS: MetricRecord({"train-loss": 0.3}),
        }), reply_to=msg)

    rnd = one_round_with(engine, tmp_path, make_plan(), no_count)
    (failed,) = json.loads(rnd.failed_sites_json)
    assert failed["site"] == "hospital-b" and failed["phase"] == "validate"
    assert "does not say how many examples" in failed["reason"]


def test_identical_updates_of_two_sites_in_one_round_are_both_rejected(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan()
    grid = SiteGrid({11: good_site(1.0), 12: good_site(1.0), 13: good_site(2.0)},
                    online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    (rnd,) = rounds_of(engine, plan.run_id)
    assert json.loads(rnd.participating_sites_json) == ["hospital-c"]
    failed = {f["site"]: f for f in json.loads(rnd.failed_sites_json)}
    assert failed["hospital-a"] == {
        "site": "hospital-a", "phase": "validate", "code": "duplicate-update",
        "reason": "duplicate update rejected: byte-identical to the update of hospital-b in "
                  "this round"}
    assert failed["hospital-b"]["reason"].endswith("the update of hospital-a in this round")
    assert [s for _, s, _ in audit_of(engine, "update.rejected")] == ["site:hospital-a",
                                                                     "site:hospital-b"]


def test_a_replayed_update_from_an_earlier_round_is_rejected(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    first: list[Message] = []

    def replaying(msg: Message) -> Message:
        if not first:
            first.append(good_site(1.0)(msg))
            return first[0]
        return Message(first[0].content, reply_to=msg)  # round 1's update again

    plan = make_plan(rounds=2)
    grid = SiteGrid({11: replaying, 12: good_site(2.0), 13: good_site(3.0)},
                    online=[11, 12, 13])
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    first_round, second = rounds_of(engine, plan.run_id)
    assert "hospital-a" in json.loads(first_round.participating_sites_json)
    failed = {f["site"]: f for f in json.loads(second.failed_sites_json)}
    assert failed["hospital-a"]["reason"] == (
        "duplicate update rejected: byte-identical to the update it sent in round 1 "
        "(a replay)")
    assert failed["hospital-a"]["code"] == "duplicate-update"


def test_a_round_repeated_after_a_crash_accepts_the_sites_stored_reply(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    # Round 1 was aggregated and recorded, then the coordinator died before its
    # checkpoint: the relaunched run repeats round 1 from the same global model, and the
    # site answers with its stored reply, byte for byte. Same round: not a replay.
    plan = make_plan(sites=("hospital-a", "hospital-b"))
    finish_round(engine, plan.run_id, 1, status="completed",
                 participating=["hospital-a", "hospital-b"], failed=[], late=[], seconds=1.0,
                 update_digests={"hospital-a": update_digest(arrays_of(1.0)),
                                 "hospital-b": update_digest(arrays_of(2.0))})
    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0)}, online=[11, 12])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    assert run_row(engine, plan.run_id).status == "completed"
    (rnd,) = rounds_of(engine, plan.run_id)
    assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-b"]
    assert json.loads(rnd.failed_sites_json) == []


class DoubleReplyGrid(SiteGrid):
    """Delivers every reply of node ``twice`` two times (a replayed or forged answer)."""

    def __init__(self, *args: object, twice: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.twice = twice

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(super().pull_messages(message_ids))
        doubled = [m for m in out if m.metadata.src_node_id == self.twice]
        return [*out, *doubled]


def test_a_second_reply_to_one_task_rejects_the_sites_update(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan()
    grid = DoubleReplyGrid({11: good_site(1.0), 12: good_site(2.0), 13: good_site(3.0)},
                           online=[11, 12, 13], twice=12)
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    (rnd,) = rounds_of(engine, plan.run_id)
    assert json.loads(rnd.participating_sites_json) == ["hospital-a", "hospital-c"]
    (failed,) = json.loads(rnd.failed_sites_json)
    assert failed["site"] == "hospital-b" and failed["code"] == "duplicate-update"
    assert failed["reason"] == ("duplicate update rejected: the site answered round 1's task "
                                "more than once; none of its answers is used")


# --- checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    rel, sha = save_checkpoint(tmp_path, 7, 3, arrays)
    assert rel == Path("checkpoints/run-7/round-0003.safetensors")
    assert sha == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
    loaded = load_checkpoint(tmp_path / rel, expected_sha256=sha)
    assert loaded.keys() == arrays.keys()
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == np.float32
    assert not list((tmp_path / rel).parent.glob("*.tmp"))


def test_checkpoint_with_one_changed_byte_is_refused(tmp_path: Path) -> None:
    rel, sha = save_checkpoint(tmp_path, 1, 1, {"w": np.zeros(16, np.float32)})
    path = tmp_path / rel
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a weight, not the header: the file still parses
    path.write_bytes(bytes(data))

    assert load_checkpoint(path)["w"][-1] != 0  # unverified, the change would go unseen
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        load_checkpoint(path, expected_sha256=sha)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(tmp_path / "nope.safetensors", expected_sha256="0" * 64)


# --- pki ---------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ensure_ca_is_idempotent(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path / "pki")
    before = (files.ca_cert.read_bytes(), files.ca_key.read_bytes())

    again = ensure_ca(tmp_path / "pki")

    assert again == files
    assert (again.ca_cert.read_bytes(), again.ca_key.read_bytes()) == before
    ca = x509.load_pem_x509_certificate(before[0])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_cert_verifies_against_the_ca_with_loopback_san(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path / "pki")
    issue_server_cert(files)

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert mode(files.ca_key) == 0o600 and mode(files.server_key) == 0o600


# --- flower_control ----------------------------------------------------------------------


def test_app_bundle_is_deterministic_and_points_at_installed_modules() -> None:
    with warnings.catch_warnings():
        # flwr's FAB builder asks pathspec for its "gitwildmatch" style, which pathspec 1.x
        # deprecates; the bundle it builds is unaffected.
        warnings.filterwarnings("ignore", message=r"GitWildMatchPattern \('gitwildmatch'\)",
                                category=DeprecationWarning)
        fab, digest = app_bundle()
        again, digest_again = app_bundle()

    assert fab == again and digest == digest_again == hashlib.sha256(fab).hexdigest()
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        pyproject = tomllib.loads(zf.read("pyproject.toml").decode())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "coordinator.server_app:app",
                          "clientapp": "site_agent.clientapp:app"}
    assert components == APP_COMPONENTS
    assert pyproject["project"]["dependencies"] == []


def test_node_key_from_the_site_agent_is_accepted(tmp_path: Path) -> None:
    public = ensure_node_key(tmp_path / "keys" / "node_key", tmp_path / "keys" / "node_key.pub")

    pem = node_public_key_bytes(public + "\n")

    loaded = serialization.load_pem_public_key(pem)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert loaded.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode() == public
    assert mode(tmp_path / "keys" / "node_key") == 0o600


@pytest.mark.parametrize("garbage", ["not a key", "ssh-ecdsa AAAA", "ecdsa-sha2-nistp384 !!"])
def test_garbage_node_keys_are_refused_by_the_control_helper_and_the_api_schema(
    garbage: str,
) -> None:
    with pytest.raises(NodeKeyError, match="is not an OpenSSH public key"):
        node_public_key_bytes(garbage)
    with pytest.raises(ValidationError, match="not an OpenSSH public key"):
        NodeKeyCreate(public_key=garbage)


def test_rsa_node_keys_are_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_text = rsa_key.public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(NodeKeyError, match="must be an ECDSA key"):
        node_public_key_bytes(rsa_text)


# --- sites offline at a round's start; sites a restarted coordinator lost -------------------


def test_a_site_offline_when_a_round_starts_holds_it_for_the_grace_only(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    # Half the deadline (the most the round used to wait for it) is 3 s; the grace 0.3 s.
    plan = make_plan(min_sites=2, round_deadline_s=6.0, offline_grace_s=0.3)
    grid = SiteGrid({11: good_site(1.0), 12: good_site(2.0)}, online=[11, 12])

    t0 = time.monotonic()
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    assert time.monotonic() - t0 < 2.0
    assert run_row(engine, plan.run_id).status == "completed"
    (round1,) = rounds_of(engine, plan.run_id)
    assert json.loads(round1.participating_sites_json) == ["hospital-a", "hospital-b"]
    (offline,) = json.loads(round1.failed_sites_json)
    assert offline["site"] == "hospital-c" and offline["phase"] == "connect"
    assert re.fullmatch(r"site offline \(not connected to the coordinator; waited 0\.\d s\)",
                        offline["reason"]), offline


def _unavailable_once(grid_ref: list[SiteGrid], node: int, answer: SiteFn,
                      back_after_s: float) -> SiteFn:
    """A site whose first task gets the SuperLink's "Node Unavailable" (its heartbeat
    deadline passed while the coordinator was down); it is back online ``back_after_s``
    later and then answers as ``answer``."""
    state = {"calls": 0, "back_at": 0.0}

    def site(msg: Message) -> Message | None:
        state["calls"] += 1
        if state["calls"] == 1:
            grid_ref[0].online.remove(node)
            state["back_at"] = time.monotonic() + back_after_s
            return Message(Error(code=int(ErrorCode.NODE_UNAVAILABLE),
                                 reason="Error: Node Unavailable"), reply_to=msg)
        return answer(msg)

    def online() -> None:
        if state["back_at"] and time.monotonic() >= state["back_at"] and \
                node not in grid_ref[0].online:
            grid_ref[0].online.append(node)

    site.online = online   # type: ignore[attr-defined]
    return site


class _ReconnectingGrid(SiteGrid):
    def get_node_ids(self) -> Iterable[int]:
        for fn in self.sites.values():
            hook = getattr(fn, "online", None)
            if hook is not None:
                hook()
        return list(self.online)


def test_a_resumed_run_waits_for_a_site_its_outage_made_unavailable_and_asks_again(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=2, min_sites=2, round_deadline_s=5.0,
                     sites=("hospital-a", "hospital-b"))
    rel, sha = save_checkpoint(tmp_path, plan.run_id, 1, arrays_of(10.0))
    record_checkpoint(engine, plan.run_id, 1, str(rel), sha)   # resumes after round 1
    ref: list[SiteGrid] = []
    grid = _ReconnectingGrid({11: good_site(1.0),
                              12: _unavailable_once(ref, 12, good_site(2.0), 0.5)},
                             online=[11, 12])
    ref.append(grid)

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    run = run_row(engine, plan.run_id)
    assert run.status == "completed", run.failure_reason
    (round2,) = rounds_of(engine, plan.run_id)
    assert json.loads(round2.participating_sites_json) == ["hospital-a", "hospital-b"]
    assert json.loads(round2.failed_sites_json) == []
    to_b = [m for m in grid.sent if m.metadata.dst_node_id == 12]
    assert len(to_b) == 2   # asked again once it was back


def test_a_fresh_run_still_counts_an_unavailable_site_as_failed_at_once(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=1, round_deadline_s=5.0, sites=("hospital-a", "hospital-b"))
    ref: list[SiteGrid] = []
    grid = _ReconnectingGrid({11: good_site(1.0),
                              12: _unavailable_once(ref, 12, good_site(2.0), 0.5)},
                             online=[11, 12])
    ref.append(grid)

    t0 = time.monotonic()
    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    assert time.monotonic() - t0 < 2.0
    (round1,) = rounds_of(engine, plan.run_id)
    assert json.loads(round1.participating_sites_json) == ["hospital-a"]
    (failed,) = json.loads(round1.failed_sites_json)
    assert failed["site"] == "hospital-b" and "Node Unavailable" in failed["reason"]
