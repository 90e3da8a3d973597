"""A site's side of a secure-aggregation round (runs with ``secure_aggregation`` on).

The warm trainer hands every ``secagg`` task here. The four stages of
:mod:`fedward.flower.secagg` arrive as four messages of one round; this site's keys live
in the :class:`SecAggSessions` of the long-lived site agent between them and never leave
it but as Shamir shares encrypted for one other site.

The mask stage is where the site trains and discloses, in this order: the round's
distributed-DP charge (:class:`privacy.mechanisms.DistributedSkellam`, sized for the
run's threshold) is reserved in the ledger before a row is read; the received model is
evaluated; it is trained locally (plain SGD: the privacy comes from the clip and the noise
on the whole update, not from DP-SGD); the update is clipped to ``secagg_clip``, quantised,
given this site's share of Skellam noise (from operating-system entropy: nothing the
coordinator chose seeds it) and masked; the charge is confirmed. What leaves is uniformly
random to anyone without the other sites' shares.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch

from fedward.flower.secagg import MODULUS, SecAggClient, SecAggError
from fedward.models import model_arrays
from fedward.wire import (
    ALLOWED_REPLY_METRICS,
    CFG,
    PACKED,
    SECAGG_ACTIVE,
    SECAGG_DROPPED,
    SECAGG_LAYOUT,
    SECAGG_MASKED,
    SECAGG_ME,
    SECAGG_N,
    SECAGG_STAGE,
    SiteErrorCode,
    pack_arrays,
    parse_layout,
    unpack_arrays,
)
from privacy import BudgetExceededError, Caps, PrivacyLedger
from privacy.distributed import (
    DistributedPlan,
    mechanism,
    noise_multiplier_for,
    quantise,
    skellam,
    to_field,
)
from privacy.mechanisms import Mechanism

__all__ = ["SecAggRefused", "SecAggSessions", "check_egress", "round_tag"]

log = logging.getLogger("fedward.site.secagg")

_THRESHOLD: Final = CFG.SECAGG_THRESHOLD
_CLIP: Final = CFG.SECAGG_CLIP
_KEY_BYTES: Final = 32


class SecAggRefused(Exception):
    """The site will not take this step; ``code`` and ``reason`` go back to the coordinator."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def round_tag(run_id: str, round_number: int) -> bytes:
    """The bytes both sides bind a round's keys and ciphertexts to."""
    return f"fedward run {run_id} round {round_number}".encode()


def _ids(raw: object) -> list[int]:
    text = str(raw or "").strip()
    return [int(x) for x in text.split(",")] if text else []


def _bytes_arrays(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for name, arr in arrays.items():
        if name.startswith(prefix):
            out[int(name[len(prefix):])] = np.asarray(arr, dtype=np.uint8).tobytes()
    return out


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def local_train(model: torch.nn.Module, *, features: np.ndarray, labels: np.ndarray,
                lr: float, batch_size: int, epochs: int) -> float:
    """Plain minibatch SGD with cross-entropy (no per-sample clipping, no noise); seconds."""
    t0 = time.monotonic()
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return time.monotonic() - t0


@dataclass
class SecAggSessions:
    """The secure rounds in progress at this site: (run, round) -> its protocol state."""

    _clients: dict[tuple[str, int], SecAggClient] = field(default_factory=dict)

    def handle(self, config: dict[str, Any], arrays: dict[str, np.ndarray], *,
               ledger: PrivacyLedger, caps: Caps, audit: Callable[[str, dict[str, Any]], None],
               build: Callable[[dict[str, np.ndarray]], torch.nn.Module],
               evaluate: Callable[[torch.nn.Module], dict[str, float]],
               train_xy: tuple[np.ndarray, np.ndarray],
               prior: Callable[[], tuple[Mechanism, ...]] = tuple,
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Answer one stage message. ``prior``: what the run's rounds share its budget
        with here (its statistics release: ``site_agent.statistics.statistics_prior``).

        Raises:
            SecAggRefused: a malformed or out-of-order stage, too few sites, or a budget
                refusal (with the ledger's figures).
        """
        try:
            run_id = str(config[CFG.RUN_ID])
            number = int(config[CFG.ROUND])
            stage = str(config[SECAGG_STAGE])
            key = (run_id, number)
            if stage == "advertise":
                # A repeated round (a restarted coordinator) starts with fresh keys.
                self._clients = {k: v for k, v in self._clients.items() if k[0] != run_id}
                client = SecAggClient(me=int(config[SECAGG_ME]), n=int(config[SECAGG_N]),
                                      threshold=int(config[_THRESHOLD]),
                                      round_tag=round_tag(run_id, number))
                self._clients[key] = client
                c_pk, s_pk = client.advertise()
                return {"metrics": {}}, {"c-pk": _u8(c_pk), "s-pk": _u8(s_pk)}
            client = self._clients[key]
            if stage == "share":
                cs, ss = _bytes_arrays(arrays, "c/"), _bytes_arrays(arrays, "s/")
                public = {v: (cs[v], ss[v]) for v in cs}
                return {"metrics": {}}, {f"ct/{v}": _u8(blob)
                                         for v, blob in client.share(public).items()}
            if stage == "mask":
                return self._mask(client, config, arrays, ledger=ledger, caps=caps,
                                  audit=audit, build=build, evaluate=evaluate,
                                  train_xy=train_xy, prior=prior())
            if stage == "unmask":
                b, s = client.unmask(_ids(config.get(SECAGG_ACTIVE)),
                                     _ids(config.get(SECAGG_DROPPED)))
                del self._clients[key]   # one answer per round, then the keys are gone
                out = {f"b/{v}": _u8(share) for v, share in b.items()}
                out.update({f"sk/{v}": _u8(share) for v, share in s.items()})
                audit("secagg-unmask", {"run": run_id, "round": number,
                                        "active": sorted(b), "dropped": sorted(s)})
                return {"metrics": {}}, out
            raise SecAggRefused(SiteErrorCode.BAD_TASK, f"bad-task: unknown stage {stage!r}")
        except SecAggError as err:
            raise SecAggRefused(SiteErrorCode.REFUSED_POLICY,
                                f"refused-policy: secure aggregation: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggRefused(SiteErrorCode.BAD_TASK,
                                f"bad-task: secure aggregation stage: {err!r}") from None

    def _mask(self, client: SecAggClient, config: dict[str, Any],
              arrays: dict[str, np.ndarray], *, ledger: PrivacyLedger, caps: Caps,
              audit: Callable[[str, dict[str, Any]], None],
              build: Callable[[dict[str, np.ndarray]], torch.nn.Module],
              evaluate: Callable[[torch.nn.Module], dict[str, float]],
              train_xy: tuple[np.ndarray, np.ndarray], prior: tuple[Mechanism, ...],
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        run_id = str(config[CFG.RUN_ID])
        number = int(config[CFG.ROUND])
        epsilon, delta = float(config[CFG.EPSILON]), float(config[CFG.DELTA])
        rounds = int(config[CFG.TOTAL_ROUNDS])
        layout = parse_layout(str(config[SECAGG_LAYOUT]))
        received = unpack_arrays(np.asarray(arrays[PACKED], dtype=np.float32), layout)
        model = build(received)
        dim = sum(int(v.size) for v in received.values())
        known = ledger.get_run(run_id)
        done = known.rounds.get(number) if known is not None else None
        if done is not None and done.status == "charged":
            raise SecAggRefused(SiteErrorCode.REFUSED_POLICY,
                                f"refused-policy: round {number} of run {run_id} was already "
                                "trained and answered; a site trains each round once")
        plan = DistributedPlan(
            clip=float(config[_CLIP]), dim=dim, threshold=client.threshold,
            noise_multiplier=noise_multiplier_for(epsilon=epsilon, delta=delta,
                                                  rounds=rounds, dim=dim,
                                                  threshold=client.threshold, prior=prior))
        if known is None:
            ledger.open_run(run_id=run_id, project=str(config[CFG.PROJECT]),
                            epsilon_budget=epsilon, delta=delta)
        spent_before = ledger.epsilon_spent(run_id)

        def record(epsilon_after: float) -> None:
            audit("round-reserved", {"run": run_id, "round": number,
                                     "epsilon_after": epsilon_after,
                                     "mechanism": "DistributedSkellam"})

        try:
            ledger.reserve(run_id=run_id, purpose="round", key=str(number),
                           mechanism=mechanism(plan), caps=caps, on_charge=record)
        except BudgetExceededError as err:
            raise SecAggRefused(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        metrics = evaluate(model)
        x, y = train_xy
        seconds = local_train(model, features=x, labels=y, lr=float(config[CFG.LR]),
                              batch_size=int(config[CFG.BATCH]),
                              epochs=int(config[CFG.LOCAL_EPOCHS]))
        trained = model_arrays(model)
        flat_new, _ = pack_arrays({name: trained[name] for name, _ in layout})
        flat_old, _ = pack_arrays(received)
        update = flat_new.astype(np.float64) - flat_old.astype(np.float64)
        # The noise and the rounding draw from fresh operating-system entropy, kept nowhere.
        rng = np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
        vector = quantise(update, clip=plan.clip, scale=plan.scale, rng=rng)
        vector = vector + skellam(plan.share_variance, dim, rng)
        ciphertexts = _bytes_arrays(arrays, "ct/")
        masked = client.mask(to_field(vector), ciphertexts)
        ledger.charge(run_id=run_id, purpose="round", key=str(number))
        spent = ledger.epsilon_spent(run_id)
        metrics.update({"epsilon-spent": spent,
                        "epsilon-round": max(0.0, spent - spent_before),
                        "noise-multiplier": plan.noise_multiplier,
                        "train-seconds": seconds})
        metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        audit("round-trained", {"run": run_id, "round": number, "epsilon_spent": spent,
                                "secure_aggregation": True, "masked_size": dim,
                                "metrics": sorted(metrics)})
        return {"metrics": metrics}, {SECAGG_MASKED: masked.astype(np.int64)}


_STAGE_ARRAYS: Final = {"advertise": ("c-pk", "s-pk"), "share": ("ct/",),
                        "mask": (SECAGG_MASKED,), "unmask": ("b/", "sk/")}


def check_egress(config: Mapping[str, Any], reply: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray], dim: int | None) -> list[str]:
    """Every reason a secure-aggregation answer may not leave (empty: it may).

    Only the stage's own arrays leave: public keys and share ciphertexts (bytes), the
    masked vector (int64 residues, the model's size) and allow-listed metrics.
    """
    problems: list[str] = []
    if "error" in reply:
        return [] if not arrays else ["an error reply carries nothing else"]
    stage = str(config.get(SECAGG_STAGE, ""))
    allowed = _STAGE_ARRAYS.get(stage, ())
    for name, arr in arrays.items():
        if not any(name == a or (a.endswith("/") and name.startswith(a)
                                 and name[len(a):].isdigit()) for a in allowed):
            problems.append(f"array {name!r} is not part of the {stage or '?'} stage")
            continue
        if name == SECAGG_MASKED:
            if arr.dtype != np.int64 or arr.ndim != 1 or (dim is not None and arr.size != dim):
                problems.append("the masked vector is not one int64 vector of the model's size")
            elif arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MODULUS):
                problems.append("the masked vector holds values outside the field")
        elif arr.dtype != np.uint8 or arr.ndim != 1 or arr.size > 4096:
            problems.append(f"array {name!r} is not a short byte string")
        elif stage == "advertise" and arr.size != _KEY_BYTES:
            problems.append(f"array {name!r} is not a public key")
    metrics = reply.get("metrics", {})
    if not isinstance(metrics, Mapping):
        return [*problems, "the metrics part is not a mapping"]
    extra = sorted(set(metrics) - ALLOWED_REPLY_METRICS)
    if extra:
        problems.append(f"metrics not on the allow-list: {', '.join(extra)}")
    if stage != "mask" and metrics:
        problems.append("only the mask stage sends metrics")
    return problems
