"""The appliance's Flower ServerApp: our own round loop over the site agents.

Stock strategies wait forever for ``min_available_nodes`` and drop stragglers silently.
This loop gives every round a deadline and a minimum number of sites, names every site that
failed or was late and why, checkpoints the global model after every round, records each
round in the coordinator database as it happens, and resumes a run from its last
checkpoint. It sends one message per site per round (the site evaluates the received global
model and then trains) and pulls replies on its own short loop instead of the Grid's 3 s poll.

The SuperLink starts this module in a ``flwr-serverapp`` process; it inherits
``FEDWARD_HOME`` and ``FEDWARD_DATABASE_URL`` from the coordinator.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from sqlalchemy.engine import Engine

from coordinator import repository
from coordinator.checkpoints import load_checkpoint, save_checkpoint
from export.wire import (
    CFG,
    FINGERPRINT_KEYS,
    REPLY_ARRAYS,
    REPLY_FINGERPRINT,
    REPLY_METRICS,
    TASK_ARRAYS,
    TASK_CONFIG,
    SiteErrorCode,
)

__all__ = ["RoundLoop", "RunPlan", "aggregate", "app", "validate_update"]

log = logging.getLogger("fedward.coordinator.rounds")

_POLL_S = 0.1
_ONLINE_POLL_S = 0.5


@dataclass(frozen=True)
class RunPlan:
    """What a run asks for, read from the coordinator database."""

    run_id: int
    project: str
    task: str
    rounds: int
    local_epochs: int
    epsilon: float
    delta: float
    min_sites: int
    round_deadline_s: float
    lr: float
    batch_size: int
    max_grad_norm: float
    seed: int
    sites: tuple[str, ...]
    aggregation: str = "fedavg"
    final_evaluate: bool = True

    def task_config(self, round_number: int, *, train: bool) -> ConfigRecord:
        return ConfigRecord({
            CFG.RUN_ID: str(self.run_id),
            CFG.PROJECT: self.project,
            CFG.TASK: self.task,
            CFG.ROUND: round_number,
            CFG.TOTAL_ROUNDS: self.rounds,
            CFG.LOCAL_EPOCHS: self.local_epochs,
            CFG.EPSILON: self.epsilon,
            CFG.DELTA: self.delta,
            CFG.CLIP: self.max_grad_norm,
            CFG.LR: self.lr,
            CFG.BATCH: self.batch_size,
            CFG.SEED: self.seed,
            CFG.TRAIN: train,
        })


class RunFailed(Exception):
    """The run cannot go on; the message is the reason recorded for the ML team."""


def validate_update(
    arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]
) -> str | None:
    """Why a site's update must be rejected before aggregation, or None if it is sound."""
    if set(arrays) != set(expected):
        return (f"update arrays {sorted(arrays)} do not match the model's "
                f"{sorted(expected)}")
    for name, arr in arrays.items():
        if arr.dtype != np.float32:
            return f"array {name!r} has dtype {arr.dtype}, expected float32"
        if tuple(arr.shape) != tuple(expected[name]):
            return f"array {name!r} has shape {list(arr.shape)}, expected {list(expected[name])}"
        if not np.all(np.isfinite(arr)):
            return f"array {name!r} contains NaN or Inf"
    return None


def aggregate(
    updates: list[tuple[dict[str, np.ndarray], float]], *, method: str = "fedavg"
) -> dict[str, np.ndarray]:
    """Combine site updates: weighted mean (FedAvg), coordinate-wise median or trimmed mean."""
    if not updates:
        raise ValueError("no updates to aggregate")
    names = list(updates[0][0])
    out: dict[str, np.ndarray] = {}
    # A site-reported weight that is NaN or infinite counts as 0: max(nan, 0.0) is nan, and
    # one such weight would turn the whole global model into NaN.
    weights = np.array([w if math.isfinite(w) and w > 0 else 0.0 for _, w in updates],
                       dtype=np.float64)
    if weights.max() <= 0:
        weights = np.ones_like(weights)
    weights = weights / weights.max()  # huge counts must not overflow the sum
    for name in names:
        stack = np.stack([u[name].astype(np.float64) for u, _ in updates])
        if method == "fedavg":
            agg = np.tensordot(weights / weights.sum(), stack, axes=1)
        elif method == "median":
            agg = np.median(stack, axis=0)
        elif method == "trimmed-mean":
            # Drop the highest and lowest 20% per coordinate, and at least one of each as
            # soon as there are 3 sites: hospital federations are small, and int(0.2 * n)
            # would trim nothing below 5 sites.
            n = len(updates)
            k = max(1, int(n * 0.2)) if n >= 3 else 0
            srt = np.sort(stack, axis=0)
            agg = srt[k:len(updates) - k].mean(axis=0) if len(updates) > 2 * k else srt.mean(0)
        else:
            raise ValueError(f"unknown aggregation {method!r}: use fedavg, median or trimmed-mean")
        out[name] = agg.astype(np.float32)
    return out


@dataclass
class RoundLoop:
    """Runs one coordinator run on a Flower Grid.

    Args:
        grid: the Flower Grid of this run.
        engine: the coordinator database.
        home: the coordinator data directory (checkpoints live under it).
        plan: the run's plan.
        initial: builds the initial global model arrays (and their shapes) for the task.
    """

    grid: Grid
    engine: Engine
    home: Path
    plan: RunPlan
    initial: Callable[[], dict[str, np.ndarray]]
    clock: Callable[[], float] = field(default=time.monotonic)

    def run(self) -> None:
        plan = self.plan
        try:
            start_round, arrays = self._resume_point()
            expected = {k: tuple(v.shape) for k, v in arrays.items()}
            for number in range(start_round, plan.rounds + 1):
                arrays = self._round(number, arrays, expected)
            if plan.final_evaluate:
                self._final_evaluate(arrays)
        except RunFailed as err:
            log.error("run %s failed: %s", plan.run_id, err)
            repository.finish_run(self.engine, plan.run_id, status="failed", reason=str(err))
            return
        repository.finish_run(self.engine, plan.run_id, status="completed", reason=None)

    # -- pieces ------------------------------------------------------------------------

    def _resume_point(self) -> tuple[int, dict[str, np.ndarray]]:
        last = repository.last_checkpoint(self.engine, self.plan.run_id)
        if last is None:
            return 1, self.initial()
        number, rel_path, sha = last
        arrays = load_checkpoint(self.home / rel_path, expected_sha256=sha)
        log.info("run %s resumes after round %s from its checkpoint", self.plan.run_id, number)
        return number + 1, arrays

    def _site_nodes(self) -> dict[int, str]:
        """Online nodes of this run's sites: node id -> site name."""
        by_node = repository.site_names_by_node_id(self.engine)
        wanted = set(self.plan.sites)
        online = set(self.grid.get_node_ids())
        return {int(n): s for n, s in by_node.items() if s in wanted and int(n) in online}

    def _wait_for_sites(self, deadline: float) -> dict[int, str]:
        nodes = self._site_nodes()
        while len(nodes) < len(self.plan.sites) and self.clock() < deadline:
            if len(nodes) >= self.plan.min_sites and self.clock() > deadline - (
                    0.5 * self.plan.round_deadline_s):
                break  # enough sites; do not spend more than half the deadline waiting
            time.sleep(_ONLINE_POLL_S)
            nodes = self._site_nodes()
        return nodes

    def _exchange(self, nodes: dict[int, str], arrays: dict[str, np.ndarray],
                  number: int, *, train: bool, deadline: float
                  ) -> tuple[dict[str, Message], list[str]]:
        """Send one message per site and collect replies until all are in or the deadline."""
        ttl = max(1.0, deadline - self.clock())
        msgs = []
        for node_id in nodes:
            content = RecordDict({
                TASK_ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                TASK_CONFIG: self.plan.task_config(number, train=train),
            })
            msgs.append(Message(
                content=content, dst_node_id=node_id,
                message_type=MessageType.TRAIN if train else MessageType.EVALUATE,
                group_id=f"run-{self.plan.run_id}-round-{number}", ttl=ttl,
            ))
        t_push = self.clock()
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
                   if mid}
        replies: dict[str, Message] = {}
        while pending and self.clock() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                site = pending.pop(reply.metadata.reply_to_message_id, None)
                if site is not None:
                    replies[site] = reply
                    log.info("round %s: reply from %s after %.2f s", number, site,
                             self.clock() - t_push)
            if pending:
                time.sleep(_POLL_S)
        return replies, sorted(pending.values())

    def _round(self, number: int, arrays: dict[str, np.ndarray],
               expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        plan = self.plan
        t0 = self.clock()
        deadline = t0 + plan.round_deadline_s
        repository.start_round(self.engine, plan.run_id, number)
        nodes = self._wait_for_sites(deadline)
        offline = sorted(set(plan.sites) - set(nodes.values()))
        failed: list[dict[str, str]] = [
            {"site": s, "phase": "connect", "reason": "site offline (not connected to the "
             "coordinator)"} for s in offline
        ]
        if len(nodes) < plan.min_sites:
            self._fail_round(number, t0, [], failed, [])
            raise RunFailed(
                f"round {number}: only {len(nodes)} of {len(plan.sites)} sites online after "
                f"{plan.round_deadline_s:.0f} s (offline: {', '.join(offline) or 'none'}); "
                f"the run needs at least {plan.min_sites}"
            )
        replies, late = self._exchange(nodes, arrays, number, train=True, deadline=deadline)
        updates: list[tuple[dict[str, np.ndarray], float]] = []
        participating: list[str] = []
        for site, reply in sorted(replies.items()):
            outcome = self._accept(site, reply, expected)
            if isinstance(outcome, dict):
                failed.append(outcome)
                continue
            update, metrics = outcome
            repository.record_site_metrics(self.engine, plan.run_id, number, site, metrics)
            fingerprint = _fingerprint(reply)
            if fingerprint:
                repository.record_data_fingerprint(self.engine, plan.run_id, number, site,
                                                   fingerprint)
            updates.append((update, metrics.get("num-examples", 1.0)))
            participating.append(site)
        for site in late:
            failed.append({"site": site, "phase": "train",
                           "reason": f"late: no reply within the {plan.round_deadline_s:.0f} s "
                                     "round deadline"})
        if len(updates) < plan.min_sites:
            self._fail_round(number, t0, participating, failed, late)
            names = "; ".join(f"{f['site']}: {f['reason']}" for f in failed) or "none"
            raise RunFailed(
                f"round {number}: {len(updates)} usable updates, the run needs at least "
                f"{plan.min_sites} (failed or late: {names})"
            )
        new = aggregate(updates, method=plan.aggregation)
        rel = save_checkpoint(self.home, plan.run_id, number, new)
        # The round is recorded as completed before its checkpoint: a crash in between
        # resumes from the previous checkpoint and runs this round again (its row is reset,
        # the sites answer from their stored replies), instead of leaving a round that has
        # a checkpoint but is still "running".
        repository.finish_round(self.engine, plan.run_id, number, status="completed",
                                participating=participating, failed=failed, late=late,
                                seconds=self.clock() - t0)
        repository.record_checkpoint(self.engine, plan.run_id, number, str(rel[0]), rel[1])
        log.info("round %s done in %.2f s with %s", number, self.clock() - t0, participating)
        return new

    def _accept(self, site: str, reply: Message, expected: dict[str, tuple[int, ...]]
                ) -> tuple[dict[str, np.ndarray], dict[str, float]] | dict[str, str]:
        if reply.has_error():
            code = reply.error.code
            label = SiteErrorCode.NAMES.get(code, f"flower-error-{code}")
            reason = reply.error.reason or label
            # An engine error (e.g. the node went offline) comes from the SuperLink, not from
            # the site: keep only its first line; it can hold a stack trace.
            return {"site": site, "phase": "train", "reason": reason.splitlines()[0][:500],
                    "code": label}
        try:
            update = {k: v.numpy() for k, v in reply.content.array_records[REPLY_ARRAYS].items()}
            metrics = {k: float(v) for k, v in reply.content[REPLY_METRICS].items()
                       if isinstance(v, int | float)}
        except (KeyError, TypeError, ValueError) as err:
            return {"site": site, "phase": "train", "reason": f"malformed reply: {err}",
                    "code": "rejected-update"}
        problem = validate_update(update, expected)
        if problem is not None:
            return {"site": site, "phase": "validate", "reason": f"update rejected: {problem}",
                    "code": "rejected-update"}
        return update, metrics

    def _fail_round(self, number: int, t0: float, participating: list[str],
                    failed: list[dict[str, str]], late: list[str]) -> None:
        repository.finish_round(self.engine, self.plan.run_id, number, status="failed",
                                participating=participating, failed=failed, late=late,
                                seconds=self.clock() - t0)

    def _final_evaluate(self, arrays: dict[str, np.ndarray]) -> None:
        """Each site evaluates the final global model on its held-out split."""
        plan = self.plan
        deadline = self.clock() + plan.round_deadline_s
        nodes = self._site_nodes()
        if not nodes:
            return
        replies, _late = self._exchange(nodes, arrays, plan.rounds, train=False,
                                        deadline=deadline)
        for site, reply in replies.items():
            if reply.has_error() or REPLY_METRICS not in reply.content.metric_records:
                continue
            metrics = {f"final-{k}": float(v) for k, v in reply.content[REPLY_METRICS].items()
                       if isinstance(v, int | float) and math.isfinite(float(v))}
            repository.record_site_metrics(self.engine, plan.run_id, plan.rounds, site, metrics)


def parity_dir(home: Path, candidate_id: int) -> Path:
    """Where a parity request for a release candidate and its results live."""
    return home / "parity" / f"candidate-{candidate_id}"


def run_parity(*, grid: Grid, engine: Engine, plan: RunPlan, request_dir: Path,
               clock: Callable[[], float] = time.monotonic) -> None:
    """Send each site of the run the candidate's artefacts; collect only the figures.

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
    by_node = repository.site_names_by_node_id(engine)
    online = set(grid.get_node_ids())
    nodes = {int(n): s for n, s in by_node.items() if s in plan.sites and int(n) in online}
    deadline = clock() + plan.round_deadline_s
    msgs = []
    for node_id in nodes:
        msgs.append(Message(
            content=RecordDict({
                TASK_ARRAYS: ArrayRecord({k: Array(v) for k, v in payload.items()}),
                TASK_CONFIG: plan.task_config(plan.rounds, train=False),
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
    out = request_dir / "result.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sites": results, "failed": failed}, indent=2))
    os.replace(tmp, out)


def _parity_by_format(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    n = metrics.get("parity-n", 0.0)
    for fmt in ("onnx", "onnx-int8", "openvino"):
        diff = metrics.get(f"parity-{fmt}-max-abs-diff")
        agree = metrics.get(f"parity-{fmt}-agreement")
        if diff is not None and agree is not None:
            out[fmt] = {"max_abs_diff": diff, "agreement": agree, "n": n}
    return out


def _fingerprint(reply: Message) -> dict[str, str]:
    """The site's data fingerprint in a reply (hashes and counts only), if it sent one."""
    if REPLY_FINGERPRINT not in reply.content.config_records:
        return {}
    raw = reply.content.config_records[REPLY_FINGERPRINT]
    return {k: str(v) for k, v in raw.items() if k in FINGERPRINT_KEYS}


def load_plan(engine: Engine, run_id: int) -> RunPlan:
    """Read a run's plan from the database."""
    raw = repository.run_config(engine, run_id)
    names = {f.name for f in fields(RunPlan)}
    values = {k: v for k, v in raw.items() if k in names}
    values["sites"] = tuple(values.get("sites") or ())
    return RunPlan(**values)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point the SuperLink calls for every run of the appliance's app."""
    from coordinator.db import make_engine
    from export.tasks import build_model, model_arrays

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_id = int(str(context.run_config["fedward-run-id"]))
    home = Path(os.environ["FEDWARD_HOME"])
    engine = make_engine(os.environ["FEDWARD_DATABASE_URL"])
    plan = load_plan(engine, run_id)
    candidate = int(str(context.run_config.get("fedward-parity-candidate", "0")))
    if candidate:
        # Not a training run: the sites measure a release candidate's export parity.
        run_parity(grid=grid, engine=engine, plan=plan, request_dir=parity_dir(home, candidate))
        return
    repository.mark_run_started(engine, run_id, str(context.run_id))

    def initial() -> dict[str, np.ndarray]:
        return model_arrays(build_model(plan.task, seed=plan.seed))

    RoundLoop(grid=grid, engine=engine, home=home, plan=plan, initial=initial).run()
