"""Keys both sides of the wire must agree on: one spelling, imported everywhere.

The coordinator's ServerApp writes these into each round's task message; the site agent's
relay and warm trainer read them; the egress guard checks replies against the allow-lists.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Final

import numpy as np

from fedward.run_config import ROUND_KEY, TRAIN_KEY, RunPlan, wire_keys

__all__ = [
    "ADMISSION_ACTION",
    "ADMISSION_MESSAGE_TYPE",
    "ALLOWED_REPLY_METRICS",
    "CANCEL_ACTION",
    "CANCEL_BY",
    "CANCEL_MESSAGE_TYPE",
    "CANCEL_REASON",
    "CFG",
    "FINGERPRINT_KEYS",
    "MEMBERSHIP_FIGURES",
    "MEMBERSHIP_KEY",
    "MSG",
    "PACKED",
    "PARITY_AGREEMENT_STEPS",
    "PARITY_DIFF_CEILINGS",
    "REPLY_ARRAYS",
    "REPLY_CONFIG",
    "REPLY_FINGERPRINT",
    "REPLY_METRICS",
    "SECAGG_ACTION",
    "SECAGG_ACTIVE",
    "SECAGG_DROPPED",
    "SECAGG_LAYOUT",
    "SECAGG_MASKED",
    "SECAGG_ME",
    "SECAGG_MESSAGE_TYPE",
    "SECAGG_N",
    "SECAGG_STAGE",
    "SECAGG_STAGES",
    "STATISTICS_ACTION",
    "STATISTICS_MESSAGE_TYPE",
    "TASK_ARRAYS",
    "TASK_CONFIG",
    "SiteErrorCode",
    "coarse_agreement",
    "coarse_max_abs_diff",
    "is_coarse_parity_figure",
    "pack_arrays",
    "parse_layout",
    "unpack_arrays",
    "update_digest",
]

# Record names inside a Flower Message's RecordDict.
TASK_ARRAYS: Final = "global_model"      # ArrayRecord: the global model's arrays
TASK_CONFIG: Final = "task"              # ConfigRecord: what the site must do this round
REPLY_ARRAYS: Final = "local_model"      # ArrayRecord: the site's updated arrays
REPLY_METRICS: Final = "metrics"         # MetricRecord: allow-listed scalar metrics
REPLY_CONFIG: Final = "status"           # ConfigRecord: outcome code and scrubbed reason

# A model travels as ONE float32 array (PACKED) inside TASK_ARRAYS / REPLY_ARRAYS, its
# arrays concatenated in the order of CFG.LAYOUT: Flower sends every array of a record as
# its own objects, each its own HTTPS request at every hop, so one array instead of one per
# layer halves a round message's requests (benchmark 1). The reply follows the layout of
# its task; the coordinator unpacks it against the model's own layout.
PACKED: Final = "packed"


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """One float32 array and its layout (JSON) from named float32 arrays."""
    layout = [[name, list(arr.shape)] for name, arr in arrays.items()]
    for name, arr in arrays.items():
        if arr.dtype != np.float32:
            raise ValueError(f"array {name!r} has dtype {arr.dtype}; only float32 is packed")
    flat = (np.concatenate([np.ravel(a) for a in arrays.values()]) if arrays
            else np.zeros(0, np.float32))
    return flat.astype(np.float32, copy=False), json.dumps(layout)


def parse_layout(layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape), ...]`` from a layout; ValueError if it is not one."""
    try:
        raw = json.loads(layout)
        out = [(str(name), tuple(int(d) for d in shape)) for name, shape in raw]
    except (TypeError, ValueError) as err:
        raise ValueError(f"malformed array layout ({type(err).__name__})") from None
    if any(d < 0 for _, shape in out for d in shape) or len({n for n, _ in out}) != len(out):
        raise ValueError("malformed array layout (negative size or repeated name)")
    return out


def unpack_arrays(flat: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]
                  ) -> dict[str, np.ndarray]:
    """Named arrays from a packed one; ValueError if sizes or dtype do not match."""
    if flat.dtype != np.float32 or flat.ndim != 1:
        raise ValueError(f"packed model is {flat.dtype} with {flat.ndim} dimensions, "
                         "expected 1-dimensional float32")
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.size != sum(sizes):
        raise ValueError(f"packed model has {flat.size} values, the layout {sum(sizes)}")
    out: dict[str, np.ndarray] = {}
    start = 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


def update_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of named arrays, in name order.

    One digest for a model that crosses the wire, on both sides: the coordinator records
    the digest of every update it receives (``round.updates`` in its audit log) and refuses
    duplicates and replays by it; a site keys the reply it stores for a round by the digest
    of the global model it received. Two arrays of equal values but another dtype or shape
    differ (byte identity).
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, str(arr.dtype), list(arr.shape)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# Admission (before round 1): "does your policy accept this run?". A Flower query message
# with this action carries only TASK_CONFIG (no arrays); the site answers from its policy
# check alone, touching no data: a reply whose REPLY_CONFIG says MSG.ACCEPTED, or an Error
# with SiteErrorCode.PENDING_APPROVAL or REFUSED_POLICY and the reason.
ADMISSION_ACTION: Final = "admission"
ADMISSION_MESSAGE_TYPE: Final = f"query.{ADMISSION_ACTION}"

# Cancellation: "this run was cancelled; stop working on it". A Flower query message with
# this action carries only TASK_CONFIG (the run's settings plus CANCEL_BY and
# CANCEL_REASON); the site records it in its audit log, drops the run's warm state and
# answers with an empty reply (nothing leaves).
CANCEL_ACTION: Final = "cancel"
CANCEL_MESSAGE_TYPE: Final = f"query.{CANCEL_ACTION}"
CANCEL_BY: Final = "cancelled-by"          # who cancelled the run (a user name, str)
CANCEL_REASON: Final = "cancel-reason"     # why (str, at most 500 characters)


# Statistics (before round 1, runs with ``statistics`` on): "release your DP statistics". A
# Flower query message with this action carries only TASK_CONFIG; the site charges a
# Gaussian release to its privacy ledger before it reads a row, and answers with one float64
# array (REPLY_ARRAYS / fedward.statistics.STATISTICS_ARRAY) of noised sums, the metrics
# "statistics-noise-std" and "epsilon-spent", or an Error (REFUSED_BUDGET with the figures).
STATISTICS_ACTION: Final = "statistics"
STATISTICS_MESSAGE_TYPE: Final = f"query.{STATISTICS_ACTION}"

# Secure aggregation (runs with ``secure_aggregation`` on): each round is four query
# messages with this action, one per stage of fedward.flower.secagg (SECAGG_STAGE says
# which). Every array is a plain uint8 or int64 array in TASK_ARRAYS / REPLY_ARRAYS; the
# mask stage also carries the packed global model (PACKED) with its layout under
# SECAGG_LAYOUT, and its reply one int64 array, SECAGG_MASKED, uniformly random alone.
SECAGG_ACTION: Final = "secagg"
SECAGG_MESSAGE_TYPE: Final = f"query.{SECAGG_ACTION}"
SECAGG_STAGE: Final = "secagg-stage"        # advertise, share, mask or unmask (str)
SECAGG_ME: Final = "secagg-me"              # the site's number in the round, 1..n (int)
SECAGG_N: Final = "secagg-n"                # participants in the round (int)
SECAGG_LAYOUT: Final = "secagg-layout"      # the packed model's layout (str)
SECAGG_ACTIVE: Final = "secagg-active"      # unmask: sites that sent vectors ("1,2,4")
SECAGG_DROPPED: Final = "secagg-dropped"    # unmask: sites that shared keys, sent none
SECAGG_MASKED: Final = "secagg-masked"      # mask reply: the masked vector (int64)
SECAGG_STAGES: Final = ("advertise", "share", "mask", "unmask")

_RUN: Final = wire_keys(RunPlan)


class CFG:
    """Keys of the task ConfigRecord sent to a site each round.

    The run's settings travel under the keys their fields declare in
    :class:`fedward.run_config.RunPlan`; the round, the train flag and the layout are per
    message.
    """

    RUN_ID: Final = _RUN["run_id"]                # coordinator run id (str)
    PROJECT: Final = _RUN["project"]              # project name (str)
    TASK: Final = _RUN["task"]                    # task registry name (str)
    STUDY: Final = _RUN["study"]                  # study NAME@VERSION (str; absent: none)
    STUDY_HASH: Final = _RUN["study_hash"]        # SHA-256 of the study spec (str)
    MODEL_PLUGIN: Final = _RUN["model_plugin"]    # plugin distribution (str; absent: none)
    MODEL_PLUGIN_VERSION: Final = _RUN["model_plugin_version"]  # its version (str)
    MODEL_PLUGIN_SHA256: Final = _RUN["model_plugin_sha256"]    # its RECORD's SHA-256 (str)
    TUNING_SEARCH: Final = _RUN["tuning_search"]  # a trial's search terms (JSON str; absent: none)
    TOTAL_ROUNDS: Final = _RUN["rounds"]          # rounds planned for the run (int)
    LOCAL_EPOCHS: Final = _RUN["local_epochs"]    # local epochs per round (int)
    EPSILON: Final = _RUN["epsilon"]              # run's epsilon budget per site (float)
    DELTA: Final = _RUN["delta"]                  # DP delta (float)
    CLIP: Final = _RUN["max_grad_norm"]           # per-sample clipping bound (float)
    LR: Final = _RUN["lr"]                        # local learning rate (float)
    BATCH: Final = _RUN["batch_size"]             # expected batch size (int)
    SEED: Final = _RUN["seed"]                    # run seed (int)
    STATISTICS: Final = _RUN["statistics"]        # a statistics phase before round 1 (bool)
    SECURE: Final = _RUN["secure_aggregation"]    # secure aggregation rounds (bool)
    SECAGG_THRESHOLD: Final = _RUN["secagg_threshold"]  # fewest sites unmasked (int)
    SECAGG_CLIP: Final = _RUN["secagg_clip"]      # L2 bound of a site's update (float)
    STATISTICS_EPSILON: Final = _RUN["statistics_epsilon"]  # its epsilon per site (float)
    # The run's imputation and scaling from its DP statistics (JSON str; absent: none).
    PREPROCESSING: Final = _RUN["preprocessing"]
    ROUND: Final = ROUND_KEY                      # 1-based round number (int)
    TRAIN: Final = TRAIN_KEY                      # False: evaluate only (bool)
    LAYOUT: Final = "layout"               # JSON [[name, shape], ...] of a packed model (str)
    # An evaluation on demand that also asks each site for its local-only DP baseline: the
    # evaluation's id (int; absent: none). See site_agent.local_baseline.
    LOCAL_ONLY: Final = "local-only-evaluation"


class MSG:
    """Values of the status ConfigRecord in a reply."""

    STATUS: Final = "status"
    REASON: Final = "reason"
    OK: Final = "ok"
    REFUSED_BUDGET: Final = "refused-budget"
    REFUSED_DATA: Final = "refused-data-check"
    REFUSED_POLICY: Final = "refused-policy"
    FAILED: Final = "failed"
    ACCEPTED: Final = "accepted"           # admission: the site's policy accepts the run


# The only scalar metrics a site may send back. Everything else is blocked at the site.
ALLOWED_REPLY_METRICS: Final = frozenset(
    {
        "num-examples",        # training examples used (weight for FedAvg)
        "num-eval-examples",   # held-out examples evaluated
        # No "train-loss": the loss on the training rows is not covered by DP-SGD's
        # accounting (it singled out an outlier record), so it never leaves a site.
        "eval-loss",           # loss of the received global model on the site's held-out split
        "eval-accuracy",
        "eval-auc",
        "epsilon-spent",       # cumulative epsilon of this run at this site after this round
        "epsilon-round",       # epsilon added by this round
        "noise-multiplier",
        "train-seconds",
        # Export parity measured at the site on its held-out data (release gates).
        "parity-n",
        "parity-onnx-max-abs-diff",
        "parity-onnx-agreement",
        "parity-onnx-int8-max-abs-diff",
        "parity-onnx-int8-agreement",
        "parity-openvino-max-abs-diff",
        "parity-openvino-agreement",
        # Membership-inference audit of a release candidate at the site (model card): the
        # attacks' AUCs rounded up to a hundredth, the empirical epsilon lower bound rounded
        # down to a tenth, and the rows audited per side (privacy.membership).
        "mia-auc",
        "mia-loss-auc",
        "mia-calibrated-auc",
        "mia-epsilon-lb",
        "mia-n",
        # An evaluation on demand with the local-only baseline (site_agent.local_baseline):
        # the received model's balanced accuracy and Brier score on the held-out split, and
        # the site's own DP model's four figures there and the epsilon it was charged.
        "eval-balanced-accuracy",
        "eval-brier",
        "local-only-accuracy",
        "local-only-auc",
        "local-only-balanced-accuracy",
        "local-only-brier",
        "local-only-epsilon",
    }
)

# A site's membership-inference audit in a candidate's parity result: the key, and the
# figure -> reply metric names (the card's names on the left).
MEMBERSHIP_KEY: Final = "membership_inference"
MEMBERSHIP_FIGURES: Final = {"auc": "mia-auc", "loss_auc": "mia-loss-auc",
                             "calibrated_auc": "mia-calibrated-auc",
                             "epsilon_lower_bound": "mia-epsilon-lb", "n": "mia-n"}

# Parity figures leave a site only on a coarse grid (export parity, see
# the site's parity task): the agreement rounded DOWN to a multiple of 1/20, the largest
# logit difference rounded UP to a power of ten (0 stays 0; anything over 100 reads 1000).
# Both are bounds in the safe direction for the release gates (whose tolerances, 1e-4,
# 1.0 and 0.95, lie on the grid), and neither can carry a patient's value.
PARITY_AGREEMENT_STEPS: Final = 20
PARITY_DIFF_CEILINGS: Final = tuple(10.0 ** k for k in range(-7, 4))


def coarse_agreement(value: float) -> float:
    """A class agreement share rounded down to the grid (NaN stays NaN, and is blocked)."""
    if not math.isfinite(value):
        return value
    # The tiny nudge keeps an exact 19/20 from flooring to 18/20 through float error;
    # shares of real row counts are never that close to a grid point without being on it.
    steps = math.floor(min(max(value, 0.0), 1.0) * PARITY_AGREEMENT_STEPS + 1e-9)
    return steps / PARITY_AGREEMENT_STEPS


def coarse_max_abs_diff(value: float) -> float:
    """A largest absolute difference rounded up to a power of ten (NaN stays NaN)."""
    if not math.isfinite(value) or value == 0.0:
        return value
    return next((c for c in PARITY_DIFF_CEILINGS if abs(value) <= c), PARITY_DIFF_CEILINGS[-1])


def is_coarse_parity_figure(name: str, value: float) -> bool:
    """Whether a parity or membership-audit figure lies on its grid (others: True)."""
    if name.startswith("parity-") and name.endswith("-agreement"):
        scaled = value * PARITY_AGREEMENT_STEPS
        return 0.0 <= value <= 1.0 and abs(scaled - round(scaled)) < 1e-9
    if name.startswith("parity-") and name.endswith("-max-abs-diff"):
        return value == 0.0 or value in PARITY_DIFF_CEILINGS
    if name.startswith("mia-") and name.endswith("auc"):
        return 0.0 <= value <= 1.0 and abs(value * 100 - round(value * 100)) < 1e-6
    if name == "mia-epsilon-lb":
        return value >= 0.0 and abs(value * 10 - round(value * 10)) < 1e-6
    return True


# What a site may say about its data: hashes and counts, never values. The file's digest is
# keyed (HMAC-SHA256 under a key only the site holds): a
# plain SHA-256 would let anyone holding a candidate copy of the file confirm it.
FINGERPRINT_KEYS: Final = frozenset(
    {"schema-hash", "content-hmac", "n-rows", "n-train", "n-test"})
REPLY_FINGERPRINT: Final = "fingerprint"   # ConfigRecord name in a reply



class SiteErrorCode:
    """Codes of the Error replies a site sends instead of a result.

    Flower's own error codes are small integers; ours start at 700 so the coordinator can
    tell a site's deliberate refusal from an engine failure.
    """

    REFUSED_BUDGET: Final = 701     # the round would exceed the site's epsilon budget
    REFUSED_DATA: Final = 702       # the site's data failed its checks
    REFUSED_POLICY: Final = 703     # the site's policy does not accept this run
    TRAINER_UNAVAILABLE: Final = 704  # the relay could not reach the warm trainer
    TASK_FAILED: Final = 705        # training or evaluation raised at the site
    EGRESS_BLOCKED: Final = 706     # the egress guard blocked the outgoing result
    BAD_TASK: Final = 707           # the task message was malformed
    # The site's policy wants a local approval of this run and nobody has given it yet: not
    # a refusal, the run waits at the site until its IT runs `fedward-site approve RUN`
    # (a denial is answered with REFUSED_POLICY).
    PENDING_APPROVAL: Final = 708

    NAMES: Final = {
        701: "refused-budget",
        702: "refused-data-check",
        703: "refused-policy",
        704: "trainer-unavailable",
        705: "task-failed",
        706: "egress-blocked",
        707: "bad-task",
        708: "pending-approval",
    }
