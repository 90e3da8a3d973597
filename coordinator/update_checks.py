"""Checks on a site's training reply before its update reaches the aggregate.

A reply is either an error (the phase where the site stopped, :func:`failure_phase`) or an
update: its arrays must match the model's names, shapes and dtype and be finite, and its
change to the global model may be at most the run's ``max_update_norm`` or, without one,
:data:`NORM_BOUND_FACTOR` times the most DP-SGD could move it (:func:`dp_update_norm_bound`).
:func:`accept_reply` applies them all and names the reason a reply is rejected; the round
loop (:mod:`coordinator.round_loop`) records every rejection as the site's failure.
"""

from __future__ import annotations

import math
import re
from typing import Final

import numpy as np
from flwr.app import Message

from fedward.run_config import RunPlan
from fedward.wire import (
    FINGERPRINT_KEYS,
    PACKED,
    REPLY_ARRAYS,
    REPLY_FINGERPRINT,
    REPLY_METRICS,
    SiteErrorCode,
    unpack_arrays,
)

__all__ = [
    "NORM_BOUND_FACTOR",
    "accept_reply",
    "dp_update_norm_bound",
    "duplicate_failure",
    "failure_phase",
    "norm_bound",
    "reply_fingerprint",
    "update_norm",
    "validate_update",
]

# The DP norm bound (dp_update_norm_bound) is a high-probability worst case: every clipped
# per-sample gradient pointing the same way, Poisson batches and Gaussian noise 8 standard
# deviations above their means. Honest updates of the real trainer measured at 0.04-0.55 of
# it (breast_cancer_mlp and digits_cnn, epsilon 1-50, clip 0.1-5, 2-8 sites; see
# docs/ml-team-guide.md). This factor on top keeps float rounding, a changed Opacus detail or
# an unusual dataset from ever rejecting an honest site; the same updates scaled by 100 were
# 9-28 times the bound at the default settings (1.8 times with a clip of 5, where clipping
# hardly binds and the worst case is loose).
NORM_BOUND_FACTOR: Final = 2.0
_TAIL: Final = 8.0
# Where a site's error reply says it stopped: its refusals by code; a task that raised says
# its phase itself ("task-failed: ValueError during train (phase evaluate): ...").
_PHASE_OF_CODE: Final = {
    SiteErrorCode.PENDING_APPROVAL: "admission",
    SiteErrorCode.REFUSED_POLICY: "policy",
    SiteErrorCode.REFUSED_BUDGET: "budget",
    SiteErrorCode.REFUSED_DATA: "data",
    SiteErrorCode.EGRESS_BLOCKED: "egress",
    SiteErrorCode.BAD_TASK: "task",
    SiteErrorCode.TRAINER_UNAVAILABLE: "agent",
    SiteErrorCode.TASK_FAILED: "train",
}
_PHASE_IN_REASON: Final = re.compile(r"\(phase ([a-z][a-z-]{0,31})\)")


def failure_phase(code: int, reason: str) -> str:
    """The phase a site's error reply names, or the one its code implies (``engine`` for
    Flower's own errors, e.g. a node that went away)."""
    if code == SiteErrorCode.TASK_FAILED and (found := _PHASE_IN_REASON.search(reason)):
        return found.group(1)
    return _PHASE_OF_CODE.get(code, "engine")


def validate_update(
    arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], *,
    reference: dict[str, np.ndarray] | None = None, max_norm: float | None = None,
) -> str | None:
    """Why a site's update must be rejected before aggregation, or None if it is sound.

    Args:
        arrays: the model arrays the site sent back.
        expected: the model's array names and shapes.
        reference: the global model the site was sent this round; with ``max_norm``, the
            update's change to it (:func:`update_norm`) may be at most ``max_norm``.
        max_norm: the norm bound (see :func:`dp_update_norm_bound`).
    """
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
    if reference is not None and max_norm is not None:
        norm = update_norm(arrays, reference)
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the change from ``reference`` to ``arrays`` over all arrays (float64)."""
    total = 0.0
    for name, arr in arrays.items():
        diff = arr.astype(np.float64) - reference[name].astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def dp_update_norm_bound(
    *, n_examples: int, batch_size: int, local_epochs: int, lr: float, max_grad_norm: float,
    noise_multiplier: float, n_params: int, factor: float = NORM_BOUND_FACTOR,
) -> float:
    """The largest L2 norm an honest DP-SGD round can move a site's model, times ``factor``.

    The site trains with Opacus's DP-SGD and plain SGD (see :func:`privacy.train_dp`):
    Poisson batches at rate ``q = 1 / ceil(n / batch)`` over ``T = local_epochs / q``
    steps, and each step moves the parameters by ``lr / B * (sum of the batch's clipped
    per-sample gradients + N(0, (sigma * C)^2 I))`` with ``B = int(n * q)`` (Opacus's
    expected batch size). Over the round, by the triangle inequality::

        ||delta|| <= lr / B * (C * S + sigma * C * ||sum of T standard normals in R^d||)

    where ``S`` is the number of examples sampled over all steps (Binomial, mean
    ``n * local_epochs``). The bound takes ``S <= mean + 8 sqrt(mean) + 8`` (at most
    ``n * T``) and the noise norm ``<= sqrt(d * T) + 8``: exceeded with a probability far
    below 1e-12, and only when every clipped gradient points the same way, which real
    training never comes close to.

    Args:
        n_examples: the site's training examples (its ``num-examples`` metric).
        batch_size: the run's expected batch size.
        local_epochs: local epochs per round.
        lr: the run's learning rate.
        max_grad_norm: the per-sample clipping bound C.
        noise_multiplier: sigma (the site's ``noise-multiplier`` metric; 0 when absent).
        n_params: the number of values in the model (d).
        factor: safety factor on top (:data:`NORM_BOUND_FACTOR`).

    Returns:
        The bound on the update's L2 norm.
    """
    n = max(1, int(n_examples))
    steps_per_epoch = math.ceil(n / max(1, int(batch_size)))
    steps = max(1, int(local_epochs)) * steps_per_epoch
    expected_batch = max(1, int(n * (1 / steps_per_epoch)))  # as Opacus computes it
    mean = float(n * max(1, int(local_epochs)))
    sampled = min(float(n * steps), mean + _TAIL * math.sqrt(mean) + _TAIL)
    noise = max(0.0, noise_multiplier) * max_grad_norm * (math.sqrt(n_params * steps) + _TAIL)
    return factor * lr / expected_batch * (max_grad_norm * sampled + noise)


def norm_bound(plan: RunPlan, metrics: dict[str, float], n_params: int
               ) -> tuple[float, str] | str:
    """The norm bound for one site's update and how it was set, or why none can be."""
    if plan.max_update_norm is not None:
        return plan.max_update_norm, "the run's max_update_norm"
    n = metrics.get("num-examples")
    if n is None or not math.isfinite(n) or n < 1:
        return ("the reply does not say how many examples the site trained on "
                "(num-examples), so the update's norm cannot be bounded")
    sigma = metrics.get("noise-multiplier", 0.0)
    sigma = sigma if math.isfinite(sigma) and sigma > 0 else 0.0
    bound = dp_update_norm_bound(
        n_examples=int(n), batch_size=plan.batch_size, local_epochs=plan.local_epochs,
        lr=plan.lr, max_grad_norm=plan.max_grad_norm, noise_multiplier=sigma,
        n_params=n_params)
    return bound, (f"{NORM_BOUND_FACTOR:g} x the most DP-SGD can move the model with "
                   f"{int(n)} examples, noise multiplier {sigma:.3g}")


def accept_reply(site: str, reply: Message, expected: dict[str, tuple[int, ...]],
                 reference: dict[str, np.ndarray], *, plan: RunPlan,
                 layout: list[tuple[str, tuple[int, ...]]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]] | dict[str, str]:
    """A site's update and metrics, or its failure (site, phase, reason, code).

    Args:
        site: the site that sent the reply.
        reply: its reply to the round's training task.
        expected: the model's array names and shapes.
        reference: the global model the site was sent this round.
        plan: the run's plan (its norm bound or DP settings).
        layout: the array layout of the packed model sent (a packed reply follows it).
    """
    if reply.has_error():
        code = reply.error.code
        label = SiteErrorCode.NAMES.get(code, f"flower-error-{code}")
        reason = reply.error.reason or label
        # An engine error (e.g. the node went offline) comes from the SuperLink, not from
        # the site: keep only its first line; it can hold a stack trace.
        first = reason.splitlines()[0][:500] if reason.strip() else label
        return {"site": site, "phase": failure_phase(code, first), "reason": first,
                "code": label}
    try:
        update = {k: v.numpy() for k, v in reply.content.array_records[REPLY_ARRAYS].items()}
        if set(update) == {PACKED}:
            update = unpack_arrays(update[PACKED], layout)
        metrics = {k: float(v) for k, v in reply.content[REPLY_METRICS].items()
                   if isinstance(v, int | float)}
    except (KeyError, TypeError, ValueError) as err:
        return {"site": site, "phase": "validate", "reason": f"malformed reply: {err}",
                "code": "rejected-update"}
    bound = norm_bound(plan, metrics, sum(math.prod(s) for s in expected.values()))
    problem: str | None
    if isinstance(bound, str):
        problem = validate_update(update, expected) or bound
    else:
        problem = validate_update(update, expected, reference=reference, max_norm=bound[0])
        if problem is not None and problem.startswith("update norm"):
            problem = f"{problem} ({bound[1]})"
    if problem is not None:
        return {"site": site, "phase": "validate", "reason": f"update rejected: {problem}",
                "code": "rejected-update"}
    return update, metrics


def duplicate_failure(site: str, why: str) -> dict[str, str]:
    """The failure of a site whose update repeats one already received (``why`` says which)."""
    return {"site": site, "phase": "validate", "reason": f"duplicate update rejected: {why}",
            "code": "duplicate-update"}


def reply_fingerprint(reply: Message) -> dict[str, str]:
    """The site's data fingerprint in a reply (hashes and counts only), if it sent one."""
    if REPLY_FINGERPRINT not in reply.content.config_records:
        return {}
    raw = reply.content.config_records[REPLY_FINGERPRINT]
    return {k: str(v) for k, v in raw.items() if k in FINGERPRINT_KEYS}
