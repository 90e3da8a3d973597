"""The ServerApp side of an evaluation on demand (see :mod:`coordinator.evaluation`).

A Flower run started with ``fedward-evaluation = ID`` trains nothing: the ServerApp reads
the evaluation's row, loads the checkpoint of the round it names (the final one, a round
the engineer chose, or a release's; refused if its SHA-256 changed since), sends each
online site of the run one evaluate message (the packed model and the run's task
configuration at the checkpoint's round, ``train`` false), pulls the replies until all are
in or the run's round deadline passes, and records each site's figures, or its refusal,
its absence or its lateness, on the row. The site answers exactly as to a round's
evaluation: its policy first (a refusal comes back with its reason), then the model on its
held-out split, and only allow-listed figures leave.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine
from sqlmodel import select

from coordinator.audit import append_event
from coordinator.checkpoints import CheckpointError, load_checkpoint
from coordinator.db import session_scope
from coordinator.models import Checkpoint, Evaluation, utcnow
from coordinator.round_exchange import online_site_nodes
from fedward.flower.serverapp import EXPIRED_ERROR_CODES
from fedward.run_config import RunPlan
from fedward.wire import CFG, PACKED, REPLY_METRICS, TASK_ARRAYS, TASK_CONFIG, pack_arrays

__all__ = ["EVALUATION_KEY", "run_evaluation"]

log = logging.getLogger("fedward.coordinator.evaluation")

# The run-config key of a Flower run that carries an evaluation (fedward.flower.fab).
EVALUATION_KEY: Final = "fedward-evaluation"
_POLL_S: Final = 0.2


def _record(engine: Engine, evaluation_id: int, **fields: object) -> None:
    with session_scope(engine) as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        for name, value in fields.items():
            setattr(row, name, value)
        session.add(row)
        if fields.get("status") in ("completed", "failed"):
            append_event(session, actor="serverapp", action=f"evaluation.{fields['status']}",
                         subject=f"run:{row.run_id}", detail={
                             "evaluation": evaluation_id, "round": row.round_number,
                             "failed": json.loads(row.failed_json),
                             "sites": sorted(json.loads(row.results_json))})


def _load(engine: Engine, home: Path, evaluation_id: int
          ) -> tuple[Evaluation, dict[str, object]]:
    with session_scope(engine) as session:
        row = session.get(Evaluation, evaluation_id)
        if row is None:
            raise CheckpointError(f"evaluation {evaluation_id} not found")
        ckpt = session.exec(select(Checkpoint).where(
            Checkpoint.run_id == row.run_id,
            Checkpoint.round_number == row.round_number)).first()
        if ckpt is None:
            raise CheckpointError(f"run {row.run_id} has no checkpoint of round "
                                  f"{row.round_number}")
        session.expunge(row)
        return row, {"path": home / ckpt.path, "sha256": row.checkpoint_sha256}


def run_evaluation(*, grid: Grid, engine: Engine, home: Path, plan: RunPlan,
                   evaluation_id: int, flwr_run_id: str,
                   clock: Callable[[], float] = time.monotonic) -> None:
    """Carry out one evaluation and record its results (never raises for a site's fault).

    Args:
        grid: The Flower grid of this run.
        engine: Coordinator database engine.
        home: The coordinator's home (checkpoints live under it).
        plan: The evaluated run's plan (sites, task configuration, round deadline).
        evaluation_id: The row to carry out.
        flwr_run_id: This Flower run's id (recorded on the row).
        clock: Monotonic seconds (tests).
    """
    try:
        row, where = _load(engine, home, evaluation_id)
        arrays = load_checkpoint(Path(str(where["path"])), expected_sha256=str(where["sha256"]))
    except CheckpointError as err:
        _record(engine, evaluation_id, status="failed", finished_at=utcnow(),
                flwr_run_id=flwr_run_id, failure_reason=str(err))
        return
    _record(engine, evaluation_id, status="running", flwr_run_id=flwr_run_id)
    nodes = online_site_nodes(grid, engine, plan.sites)
    failed: dict[str, str] = {s: "offline: not connected when the evaluation started"
                              for s in plan.sites if s not in nodes.values()}
    flat, layout = pack_arrays(dict(arrays))
    config = ConfigRecord(plan.task_config(row.round_number, train=False))
    config[CFG.LAYOUT] = layout
    if row.local_only:
        config[CFG.LOCAL_ONLY] = evaluation_id   # each site's baseline, once per run
    deadline = clock() + plan.round_deadline_s
    msgs = [Message(content=RecordDict({TASK_ARRAYS: ArrayRecord({PACKED: Array(flat)}),
                                        TASK_CONFIG: config}),
                    dst_node_id=node, message_type=MessageType.EVALUATE,
                    group_id=f"run-{plan.run_id}-evaluation-{evaluation_id}",
                    ttl=plan.round_deadline_s) for node in nodes]
    ids = list(grid.push_messages(msgs))
    pending = {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
               if mid}
    results: dict[str, dict[str, float]] = {}
    while pending and clock() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if reply.has_error() and reply.error.code in EXPIRED_ERROR_CODES:
                continue   # no answer in time: named late at the deadline
            site = pending.pop(mid, None)
            if site is None:
                continue
            if reply.has_error():
                failed[site] = (reply.error.reason or f"error {reply.error.code}"
                                ).splitlines()[0][:500]
            elif REPLY_METRICS in reply.content.metric_records:
                results[site] = {k: float(v) for k, v in
                                 reply.content.metric_records[REPLY_METRICS].items()
                                 if isinstance(v, int | float) and math.isfinite(float(v))}
            else:
                failed[site] = "answered without figures"
        if pending:
            time.sleep(_POLL_S)
    for site in pending.values():
        failed[site] = f"late: no answer within the round deadline ({plan.round_deadline_s:.0f} s)"
    done = bool(results)
    log.info("evaluation %s of run %s: %d sites answered, %d did not", evaluation_id,
             plan.run_id, len(results), len(failed))
    _record(engine, evaluation_id, status="completed" if done else "failed",
            finished_at=utcnow(), results_json=json.dumps(results, sort_keys=True),
            failed_json=json.dumps(failed, sort_keys=True),
            failure_reason=None if done else "no site evaluated the model: " + "; ".join(
                f"{s}: {r}" for s, r in sorted(failed.items())))
