"""The coordinator's side of the statistics phase: ask, sum, keep, show.

Before round 1 of a run with ``statistics`` on, the ServerApp's round loop calls
:func:`statistics_phase`: one query message per admitted online site
(:data:`fedward.wire.STATISTICS_MESSAGE_TYPE`, through the same Message API as the rounds),
replies pulled every 0.1 s until all are in or the run's round deadline passes. Each site
answers with one float64 array of noised sums (``site_agent.statistics``) or a refusal
(budget, policy) with its reason. The coordinator checks each array's shape and values,
sums them, and stores the reference statistics document (:mod:`fedward.statistics`) with
the run (table ``run_statistics``), with the sites summed and the sites left out and why.
Fewer contributing sites than the run's ``min_sites`` fail the run with every reason.

Nothing here ever sees a site's exact statistics: each site noised its own release, and
only the sum is kept.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import Run, RunStatistics
from fedward.run_config import RunPlan
from fedward.statistics import (
    STATISTICS_ARRAY,
    expected_shape,
    reference_document,
    study_identity,
)
from fedward.wire import REPLY_ARRAYS, STATISTICS_MESSAGE_TYPE, TASK_CONFIG, SiteErrorCode
from privacy.release import statistics_release

if TYPE_CHECKING:  # Flower is imported by the phase alone: the API and releases read rows
    from flwr.app import Message
    from flwr.serverapp import Grid

    from fedward.tasks import TaskRef

__all__ = ["StatisticsFailed", "preprocessing_json", "read_statistics", "reference_bytes",
           "statistics_phase", "store_statistics"]

log = logging.getLogger("fedward.coordinator.statistics")

_POLL_S: Final = 0.1
_ACTOR: Final = "serverapp"


class StatisticsFailed(Exception):
    """Too few sites released statistics for the run to go on; the message says who and why."""


def _site_array(reply: Message, shape: tuple[int, int]) -> np.ndarray:
    """The site's noised release in a reply; ValueError if it is not exactly that."""
    records = reply.content.array_records
    if REPLY_ARRAYS not in records or set(records[REPLY_ARRAYS]) != {STATISTICS_ARRAY}:
        raise ValueError(f"the reply carries no single {STATISTICS_ARRAY!r} array")
    values = records[REPLY_ARRAYS][STATISTICS_ARRAY].numpy()
    if values.dtype != np.float64 or tuple(values.shape) != shape:
        raise ValueError(f"the release is {values.dtype} of shape {list(values.shape)}, "
                         f"expected float64 of shape {list(shape)}")
    if not np.isfinite(values).all():
        raise ValueError("the release holds values that are not finite")
    return np.asarray(values, dtype=np.float64)


def statistics_phase(*, grid: Grid, engine: Engine, plan: RunPlan, nodes: dict[int, str],
                     check_cancel: Callable[[], None],
                     clock: Callable[[], float] = time.monotonic) -> None:
    """Ask each site in ``nodes`` for its DP statistics release; sum and store them.

    Does nothing when the run already has its statistics (a resumed run).

    Args:
        grid: the run's Flower Grid.
        engine: the coordinator database.
        plan: the run's plan (``statistics`` on).
        nodes: node id -> site, the admitted online sites to ask.
        check_cancel: raises when the run is cancelled (called while waiting).
        clock: monotonic seconds.

    Raises:
        StatisticsFailed: fewer than ``min_sites`` sites released statistics.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    with session_scope(engine) as session:
        if _row(session, plan.run_id) is not None:
            return
    share = plan.statistics_share()
    assert share is not None, "statistics_phase on a run without statistics"
    t0 = clock()
    deadline = t0 + plan.round_deadline_s
    # A run of a registered study bins its features over the study's own ranges.
    task = _statistics_task(engine, plan)
    shape = expected_shape(task)
    msgs = [Message(
        content=RecordDict({TASK_CONFIG: ConfigRecord(plan.task_config(0, train=False))}),
        dst_node_id=node_id, message_type=STATISTICS_MESSAGE_TYPE,
        group_id=f"run-{plan.run_id}-statistics", ttl=plan.round_deadline_s,
    ) for node_id in nodes]
    pending = {mid: nodes[m.metadata.dst_node_id]
               for mid, m in zip(grid.push_messages(msgs), msgs, strict=True) if mid}
    releases: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {s: "offline" for s in plan.sites if s not in nodes.values()}
    while pending and clock() < deadline:
        check_cancel()
        for reply in grid.pull_messages(list(pending)):
            site = pending.pop(reply.metadata.reply_to_message_id, None)
            if site is None:
                continue
            if reply.has_error():
                label = SiteErrorCode.NAMES.get(reply.error.code,
                                                f"flower-error-{reply.error.code}")
                failed[site] = (reply.error.reason or label).splitlines()[0][:500]
                continue
            try:
                releases[site] = _site_array(reply, shape)
            except ValueError as err:
                failed[site] = f"invalid statistics release: {err}"
        if pending:
            time.sleep(_POLL_S)
    for site in pending.values():
        failed[site] = f"late: no statistics within {plan.round_deadline_s:.0f} s"
    seconds = clock() - t0
    if len(releases) < plan.min_sites:
        why = "; ".join(f"{s}: {r}" for s, r in sorted(failed.items())) or "no site online"
        raise StatisticsFailed(
            f"statistics phase: {len(releases)} of {len(plan.sites)} sites released "
            f"statistics, the run needs at least {plan.min_sites} ({why})")
    total = np.sum([releases[s] for s in sorted(releases)], axis=0)
    # Each site's noise follows from the run's settings alone (site_agent.statistics).
    site_noise_std = statistics_release(n_features=shape[0], epsilon=share,
                                        delta=plan.delta).noise_std
    reference = reference_document(
        run_id=plan.run_id, study=study_identity(plan.task, plan.study, plan.study_hash),
        epsilon=share, delta=plan.delta, sites=len(releases), task=task, total=total,
        site_noise_std=site_noise_std)
    store_statistics(engine, run_id=plan.run_id, reference=reference, sites=sorted(releases),
                     failed=failed, seconds=seconds)
    log.info("run %s: statistics of %d site(s) in %.2f s", plan.run_id, len(releases), seconds)


def _statistics_task(engine: Engine, plan: RunPlan) -> TaskRef:
    """What the phase bins: the run's pinned study's task, else the shipped task's name."""
    if plan.study_hash is None:
        return plan.task
    from coordinator.study_registry import plan_task

    return plan_task(engine, plan)


def _row(session: Session, run_id: int) -> RunStatistics | None:
    return session.exec(select(RunStatistics).where(RunStatistics.run_id == run_id)).first()


def store_statistics(engine: Engine, *, run_id: int, reference: dict[str, Any],
                     sites: list[str], failed: dict[str, str], seconds: float) -> None:
    """Keep a run's summed statistics (once) and audit it (who contributed, no values)."""
    privacy = reference["privacy"]
    with session_scope(engine) as session:
        if _row(session, run_id) is not None:
            return
        session.add(RunStatistics(
            run_id=run_id, epsilon=float(privacy["epsilon"]), delta=float(privacy["delta"]),
            reference_json=json.dumps(reference, sort_keys=True, allow_nan=False),
            sites_json=json.dumps(sites), failed_json=json.dumps(failed, sort_keys=True),
            seconds=float(seconds)))
        append_event(session, actor=_ACTOR, action="run.statistics", subject=f"run:{run_id}",
                     detail={"sites": sites, "failed": failed,
                             "epsilon_per_site": privacy["epsilon"],
                             "seconds": round(seconds, 3)})


def preprocessing_json(engine: Engine, plan: RunPlan) -> str | None:
    """The imputation and scaling of ``plan``'s run as it travels to the sites (None: the
    run has no study or no statistics yet), :func:`coordinator.study_registry.
    run_preprocessing`."""
    if plan.study_hash is None:
        return None
    from coordinator.study_registry import run_preprocessing

    with Session(engine) as session:
        pre = run_preprocessing(session, run_id=plan.run_id, study_hash=plan.study_hash)
    return None if pre is None else pre.to_json()


def read_statistics(session: Session, run_id: int) -> dict[str, Any] | None:
    """A run's statistics as the API shows them, or None if it has none (yet).

    Raises:
        LookupError: no such run.
    """
    if session.get(Run, run_id) is None:
        raise LookupError(f"run {run_id} not found")
    row = _row(session, run_id)
    if row is None:
        return None
    return {"run_id": run_id, "epsilon": row.epsilon, "delta": row.delta,
            "sites": json.loads(row.sites_json), "failed": json.loads(row.failed_json),
            "seconds": row.seconds, "created_at": row.created_at.isoformat(),
            "reference": json.loads(row.reference_json)}


def reference_bytes(session: Session, run_id: int) -> bytes | None:
    """The reference statistics document of a run as a release ships it, or None."""
    row = _row(session, run_id)
    if row is None:
        return None
    doc = json.loads(row.reference_json)
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
