"""Export parity of a release candidate, measured by the sites (a Flower run that trains
nothing).

The release workflow's ``SiteParity`` port (``FlowerSiteParity``, :mod:`coordinator.service`)
writes the candidate's checkpoint and artefacts under :func:`parity_dir` and starts a Flower
run of the appliance's app with ``fedward-parity-candidate`` set; its ServerApp
(:mod:`coordinator.server_app`) calls :func:`run_parity`, which sends each online site of the
run the artefacts and collects only the figures each site measured
(``site_agent.parity_task``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine

from coordinator.round_exchange import online_site_nodes
from fedward.files import atomic_write
from fedward.run_config import RunPlan
from fedward.wire import (
    MEMBERSHIP_FIGURES,
    MEMBERSHIP_KEY,
    REPLY_METRICS,
    TASK_ARRAYS,
    TASK_CONFIG,
)

__all__ = ["parity_dir", "run_parity"]

_POLL_S: Final = 0.1


def parity_dir(home: Path, candidate_id: int) -> Path:
    """Where a parity request for a release candidate and its results live."""
    return home / "parity" / f"candidate-{candidate_id}"


def run_parity(*, grid: Grid, engine: Engine, plan: RunPlan, request_dir: Path,
               clock: Callable[[], float] = time.monotonic) -> None:
    """Send each site of the run the candidate's artefacts; collect only the figures.

    A site answers only for a checkpoint it evaluated in the run and artefacts equal to its
    own export, once per format (``site_agent.parity_task``); a refusal is recorded as that
    site's failure with its reason.

    Reads ``request.json`` (checkpoint path, artefact files) from ``request_dir`` and writes
    ``result.json`` there atomically: per site, per format, max_abs_diff, agreement and n,
    plus the sites that failed and why.
    """
    from coordinator.checkpoints import load_checkpoint

    request = json.loads((request_dir / "request.json").read_text())
    arrays = load_checkpoint(Path(request["checkpoint"]), expected_sha256=request.get("sha256"))
    payload: dict[str, np.ndarray] = dict(arrays)
    for name in request["files"]:
        data = (request_dir / name).read_bytes()
        payload[f"artefact/{name}"] = np.frombuffer(data, dtype=np.uint8)
    nodes = online_site_nodes(grid, engine, plan.sites)
    deadline = clock() + plan.round_deadline_s
    msgs = []
    for node_id in nodes:
        msgs.append(Message(
            content=RecordDict({
                TASK_ARRAYS: ArrayRecord({k: Array(v) for k, v in payload.items()}),
                TASK_CONFIG: ConfigRecord(plan.task_config(plan.rounds, train=False)),
            }),
            dst_node_id=node_id, message_type=MessageType.QUERY,
            group_id=f"run-{plan.run_id}-parity", ttl=plan.round_deadline_s,
        ))
    ids = list(grid.push_messages(msgs))
    pending = {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
               if mid}
    results: dict[str, dict[str, dict[str, float]]] = {}
    failed: dict[str, str] = {s: "offline" for s in plan.sites if s not in nodes.values()}
    while pending and clock() < deadline:
        for reply in grid.pull_messages(list(pending)):
            site = pending.pop(reply.metadata.reply_to_message_id, None)
            if site is None:
                continue
            if reply.has_error():
                failed[site] = (reply.error.reason or "error").splitlines()[0][:300]
                continue
            metrics = {k: float(v) for k, v in
                       reply.content.metric_records[REPLY_METRICS].items()
                       if isinstance(v, int | float)}
            results[site] = _parity_by_format(metrics)
        if pending:
            time.sleep(_POLL_S)
    for site in pending.values():
        failed[site] = f"late: no reply within {plan.round_deadline_s:.0f} s"
    atomic_write(request_dir / "result.json",
                 json.dumps({"sites": results, "failed": failed}, indent=2))


def _parity_by_format(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    n = metrics.get("parity-n", 0.0)
    for fmt in ("onnx", "onnx-int8", "openvino"):
        diff = metrics.get(f"parity-{fmt}-max-abs-diff")
        agree = metrics.get(f"parity-{fmt}-agreement")
        if diff is not None and agree is not None:
            out[fmt] = {"max_abs_diff": diff, "agreement": agree, "n": n}
    audit = {key: metrics[name] for key, name in MEMBERSHIP_FIGURES.items() if name in metrics}
    if audit:
        # The site's membership-inference audit of the same candidate (model card).
        out[MEMBERSHIP_KEY] = audit
    return out
