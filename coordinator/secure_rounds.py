"""The coordinator's side of a secure-aggregation round (runs with ``secure_aggregation``).

One round is the four stages of :mod:`fedward.flower.secagg`, each one message exchange
with the sites still in the round, all within the round's deadline. The coordinator
relays public keys and encrypted shares, receives masked vectors (uniformly random alone),
and with the survivors' shares unmasks only their sum; a site that fails or is late at any
stage drops out, and the round fails with the reason as soon as fewer than the threshold
remain (never waiting past the deadline). The sum is dequantised and its mean over the
contributing sites is added to the global model (FedAvg with equal weights: the sites'
example counts are not in the sum).

What this module keeps of a site: its keys, its share ciphertexts (opaque to the
coordinator), its masked vector (for the sum only) and the metrics of its evaluation of the
received model. Each round's audit entry ``round.secure`` says, per site, which stage it
reached and, for its masked vector, its size and the share of entries at or above 2**24
(an unmasked update never has any: it lies within a few times 2**14 of zero).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine

from coordinator.audit import append_event
from coordinator.db import session_scope
from fedward.flower.secagg import SecAggError, unmask_sum
from fedward.run_config import RunPlan
from fedward.wire import (
    CFG,
    PACKED,
    REPLY_ARRAYS,
    REPLY_METRICS,
    SECAGG_ACTIVE,
    SECAGG_DROPPED,
    SECAGG_LAYOUT,
    SECAGG_MASKED,
    SECAGG_ME,
    SECAGG_MESSAGE_TYPE,
    SECAGG_N,
    SECAGG_STAGE,
    TASK_ARRAYS,
    TASK_CONFIG,
    SiteErrorCode,
    pack_arrays,
    unpack_arrays,
)
from privacy.distributed import SCALE_UNITS, dequantise, from_field

__all__ = ["SecureOutcome", "secure_round"]

log = logging.getLogger("fedward.coordinator.secagg")

_POLL_S: Final = 0.1
_AUDIT_ACTION: Final = "round.secure"
_HIGH: Final = 1 << 24


@dataclass
class SecureOutcome:
    """How a secure round ended.

    Attributes:
        arrays: the new global model, or None when the round failed.
        reason: why it failed (None: it did not).
        participating: the sites whose update is in the sum.
        failed: each site that dropped out: site, phase, reason, code.
        late: sites that did not answer a stage in time.
        metrics: per contributing site, its evaluation of the received model and its charge.
        digests: per contributing site, the SHA-256 of its masked vector.
    """

    arrays: dict[str, np.ndarray] | None
    reason: str | None
    participating: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def _bytes(arr: np.ndarray) -> bytes:
    return np.asarray(arr, dtype=np.uint8).tobytes()


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


@dataclass
class _Exchange:
    grid: Grid
    plan: RunPlan
    number: int
    deadline: float
    clock: Callable[[], float]
    check_cancel: Callable[[], None]
    failed: list[dict[str, str]] = field(default_factory=list)
    late: list[str] = field(default_factory=list)

    def stage(self, stage: str, content: dict[str, tuple[int, dict[str, Any],
                                                           dict[str, np.ndarray]]]
              ) -> dict[str, Message]:
        """Send ``site -> (node, config, arrays)``; the sites' good replies by site."""
        ttl = max(1.0, self.deadline - self.clock())
        msgs: list[Message] = []
        for _site, (node, config, arrays) in content.items():
            record = RecordDict({TASK_CONFIG: ConfigRecord({**config, SECAGG_STAGE: stage})})
            if arrays:
                record[TASK_ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            msgs.append(Message(content=record, dst_node_id=node,
                                message_type=SECAGG_MESSAGE_TYPE, ttl=ttl,
                                group_id=f"run-{self.plan.run_id}-round-{self.number}-{stage}"))
        by_node = {node: site for site, (node, _c, _a) in content.items()}
        pending = {mid: by_node[m.metadata.dst_node_id]
                   for mid, m in zip(self.grid.push_messages(msgs), msgs, strict=True) if mid}
        out: dict[str, Message] = {}
        while pending and self.clock() < self.deadline:
            self.check_cancel()
            for reply in self.grid.pull_messages(list(pending)):
                site = pending.pop(reply.metadata.reply_to_message_id, None)
                if site is None:
                    continue
                if reply.has_error():
                    code = reply.error.code
                    first = (reply.error.reason or "error").splitlines()[0][:500]
                    self.failed.append({"site": site, "phase": f"secagg-{stage}",
                                        "reason": first,
                                        "code": SiteErrorCode.NAMES.get(
                                            code, f"flower-error-{code}")})
                    continue
                out[site] = reply
            if pending:
                time.sleep(_POLL_S)
        for site in pending.values():
            self.late.append(site)
            self.failed.append({"site": site, "phase": f"secagg-{stage}",
                                "reason": f"late: no {stage} answer within the "
                                          f"{self.plan.round_deadline_s:.0f} s round deadline",
                                "code": "late"})
        return out

    def drop(self, site: str, stage: str, reason: str) -> None:
        self.failed.append({"site": site, "phase": f"secagg-{stage}", "reason": reason,
                            "code": "rejected-update"})


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    if REPLY_ARRAYS not in reply.content.array_records:
        return {}
    return {k: v.numpy() for k, v in reply.content.array_records[REPLY_ARRAYS].items()}


def secure_round(*, grid: Grid, engine: Engine, plan: RunPlan, number: int,
                 arrays: dict[str, np.ndarray], nodes: dict[int, str], deadline: float,
                 check_cancel: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> SecureOutcome:
    """Run one secure round with the online sites ``nodes`` (node id -> site)."""
    threshold = plan.secagg_threshold_or_default()
    ex = _Exchange(grid=grid, plan=plan, number=number, deadline=deadline, clock=clock,
                   check_cancel=check_cancel)
    sites = sorted(nodes.values())
    node_of = {site: node for node, site in nodes.items()}
    me = {site: i + 1 for i, site in enumerate(sites)}
    base = {**plan.task_config(number, train=True), CFG.SECAGG_THRESHOLD: threshold,
            SECAGG_N: len(sites)}
    reached: dict[str, str] = {}

    def fail(stage: str, left: int) -> SecureOutcome:
        names = "; ".join(f"{f['site']}: {f['reason']}" for f in ex.failed) or "none"
        reason = (f"round {number}: secure aggregation stopped at the {stage} stage with "
                  f"{left} site(s); its threshold is {threshold} (the sum of fewer sites is "
                  f"never unmasked). Failed or late: {names}")
        _audit(engine, plan.run_id, number, reached, {}, threshold, failed=reason)
        return SecureOutcome(None, reason, failed=ex.failed, late=ex.late)

    if len(sites) < threshold:
        return fail("advertise", len(sites))
    # Stage 1: public keys.
    public: dict[int, tuple[bytes, bytes]] = {}
    for site, reply in ex.stage("advertise", {
            s: (node_of[s], {**base, SECAGG_ME: me[s]}, {}) for s in sites}).items():
        got = _arrays(reply)
        if len(got.get("c-pk", b"")) != 32 or len(got.get("s-pk", b"")) != 32:
            ex.drop(site, "advertise", "malformed public keys")
            continue
        public[me[site]] = (_bytes(got["c-pk"]), _bytes(got["s-pk"]))
        reached[site] = "advertise"
    u1 = [s for s in sites if me[s] in public]
    if len(u1) < threshold:
        return fail("advertise", len(u1))
    # Stage 2: encrypted shares, relayed unopened.
    keys = {f"c/{i}": _u8(c) for i, (c, _s) in public.items()}
    keys.update({f"s/{i}": _u8(s) for i, (_c, s) in public.items()})
    sent: dict[int, dict[int, bytes]] = {}
    for site, reply in ex.stage("share", {
            s: (node_of[s], {**base, SECAGG_ME: me[s]}, keys) for s in u1}).items():
        got = _arrays(reply)
        sent[me[site]] = {int(k[3:]): _bytes(v) for k, v in got.items() if k.startswith("ct/")}
        reached[site] = "share"
    u2 = [s for s in u1 if me[s] in sent]
    if len(u2) < threshold:
        return fail("share", len(u2))
    # Stage 3: masked vectors (the sites train here).
    flat, layout = pack_arrays(arrays)
    masked: dict[int, np.ndarray] = {}
    out = SecureOutcome(None, None)
    mask_msgs = {}
    for s in u2:
        inbox = {f"ct/{v}": _u8(sent[v][me[s]]) for v in sent if v != me[s]
                 and me[s] in sent[v]}
        mask_msgs[s] = (node_of[s], {**base, SECAGG_ME: me[s], SECAGG_LAYOUT: layout},
                        {PACKED: flat, **inbox})
    for site, reply in ex.stage("mask", mask_msgs).items():
        vec = _arrays(reply).get(SECAGG_MASKED)
        if vec is None or vec.dtype != np.int64 or vec.shape != flat.shape:
            ex.drop(site, "mask", "the masked vector is missing or not the model's size")
            continue
        masked[me[site]] = vec
        reached[site] = "mask"
        out.digests[site] = hashlib.sha256(vec.tobytes()).hexdigest()
        if REPLY_METRICS in reply.content.metric_records:
            out.metrics[site] = {k: float(v) for k, v in
                                 reply.content.metric_records[REPLY_METRICS].items()
                                 if isinstance(v, int | float)}
    u3 = [s for s in u2 if me[s] in masked]
    if len(u3) < threshold:
        return fail("mask", len(u3))
    # Stage 4: shares of each survivor's self mask and of each dropped site's key.
    active = ",".join(str(me[s]) for s in u3)
    dropped = ",".join(str(me[s]) for s in u2 if s not in u3)
    b_shares: dict[int, list[bytes]] = {me[s]: [] for s in u3}
    s_shares: dict[int, list[bytes]] = {me[s]: [] for s in u2 if s not in u3}
    for site, reply in ex.stage("unmask", {
            s: (node_of[s], {**base, SECAGG_ME: me[s], SECAGG_ACTIVE: active,
                             SECAGG_DROPPED: dropped}, {}) for s in u3}).items():
        for name, arr in _arrays(reply).items():
            kind, _, who = name.partition("/")
            target = b_shares if kind == "b" else s_shares if kind == "sk" else None
            if target is not None and who.isdigit() and int(who) in target:
                target[int(who)].append(_bytes(arr))
        reached[site] = "unmask"
    try:
        total = unmask_sum(masked=masked, public=public, b_shares=b_shares,
                           s_shares=s_shares, threshold=threshold,
                           round_tag=f"fedward run {plan.run_id} round {number}".encode())
    except (SecAggError, ValueError) as err:
        names = "; ".join(f"{f['site']}: {f['reason']}" for f in ex.failed) or "none"
        reason = f"round {number}: secure aggregation could not unmask the sum: {err} " \
                 f"(failed or late: {names})"
        _audit(engine, plan.run_id, number, reached, masked_stats(masked, me), threshold,
               failed=reason)
        return SecureOutcome(None, reason, failed=ex.failed, late=ex.late)
    mean = dequantise(from_field(total), scale=SCALE_UNITS / plan.secagg_clip) / len(u3)
    new_flat = (flat.astype(np.float64) + mean).astype(np.float32)
    out.arrays = unpack_arrays(new_flat, [(k, tuple(v.shape)) for k, v in arrays.items()])
    out.participating, out.failed, out.late = u3, ex.failed, ex.late
    _audit(engine, plan.run_id, number, reached, masked_stats(masked, me), threshold)
    log.info("round %s: secure sum of %s unmasked (dropped: %s)", number, u3,
             [s for s in sites if s not in u3])
    return out


def masked_stats(masked: dict[int, np.ndarray], me: dict[str, int]) -> dict[str, Any]:
    """Per site, what the coordinator held of it: size and the share of large entries."""
    site_of = {i: s for s, i in me.items()}
    return {site_of[i]: {"size": int(v.size),
                         "share_at_or_above_2_24": round(float(np.mean(v >= _HIGH)), 4)}
            for i, v in masked.items()}


def _audit(engine: Engine, run_id: int, number: int, reached: dict[str, str],
           held: dict[str, Any], threshold: int, *, failed: str | None = None) -> None:
    with session_scope(engine) as session:
        append_event(session, actor="serverapp", action=_AUDIT_ACTION,
                     subject=f"run:{run_id}",
                     detail={"round": number, "threshold": threshold, "reached": reached,
                             "masked_vectors": held, "failed": failed})
