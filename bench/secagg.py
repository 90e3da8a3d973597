"""Benchmark: secure aggregation with distributed DP, in process (no Flower, no network).

Two questions, on the breast-cancer MLP (Breast Cancer Wisconsin from scikit-learn, 569
rows, 20% held out, stratified, seed 0):

* **protocol cost per round**: the four SecAgg+ stages of ``fedward.flower.secagg`` for
  every site in turn (keys, Shamir shares, encryption, ChaCha20 masks over the model's
  266 parameters, unmasking by the coordinator), at 3 and 8 sites, with no dropout and
  with one site dropped after sharing its keys; median of 5. This is the compute the
  protocol adds; the message exchanges it adds (three more per round) cost what any
  exchange costs in deployment (about 3 s each on the 2-core build machine, see
  docs/ml-team-guide.md "Round time"), which dominates.
* **test AUC at the same epsilon**: secure mode (each site: local SGD, clip the update,
  quantise, Skellam share for ``threshold = sites``; the mean of the unmasked sum added to
  the model; noise from ``privacy.distributed.noise_multiplier_for``) against central DP
  (DP-SGD on the pooled training rows with Opacus, the noise for the same epsilon over the
  same number of epochs) and against secure mode without noise (the clip alone); 5 rounds,
  1 local epoch, the task's learning rate and batch size, epsilon 3 and 30, delta 1e-5, 3
  and 8 sites, seeds 0-2; medians.

    .venv/bin/python bench/secagg.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedward.flower.secagg import SecAggClient, unmask_sum  # noqa: E402
from fedward.models import model_arrays, set_model_arrays  # noqa: E402
from fedward.tasks import TASKS, build_model  # noqa: E402
from fedward.wire import pack_arrays, unpack_arrays  # noqa: E402
from privacy.distributed import (  # noqa: E402
    SCALE_UNITS,
    DistributedPlan,
    dequantise,
    from_field,
    noise_multiplier_for,
    quantise,
    skellam,
    to_field,
)

TASK = "breast_cancer_mlp"


def protocol_seconds(n: int, dim: int, *, drop: bool) -> float:
    """One round of the four stages among ``n`` sites, in process."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tag = b"bench"
    clients = {i: SecAggClient(me=i, n=n, threshold=max(2, n - 1), round_tag=tag)
               for i in range(1, n + 1)}
    public = {i: c.advertise() for i, c in clients.items()}
    sent = {i: c.share(public) for i, c in clients.items()}
    active = [i for i in clients if not (drop and i == n)]
    dropped = [n] if drop else []
    masked = {u: clients[u].mask(to_field(rng.integers(-1000, 1000, dim)),
                                 {v: sent[v][u] for v in sent if v != u}) for u in active}
    b_sh: dict[int, list[bytes]] = {u: [] for u in active}
    s_sh: dict[int, list[bytes]] = {v: [] for v in dropped}
    for u in active:
        b, s = clients[u].unmask(active, dropped)
        for v, x in b.items():
            b_sh[v].append(x)
        for v, x in s.items():
            s_sh[v].append(x)
    unmask_sum(masked=masked, public=public, b_shares=b_sh, s_shares=s_sh,
               threshold=max(2, n - 1), round_tag=tag)
    return time.perf_counter() - t0


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y, test_size=0.2,
                                          stratify=y, random_state=seed)
    return xtr, ytr, xte, yte


def secure_auc(*, sites: int, epsilon: float | None, seed: int, rounds: int) -> float:
    """Test AUC of a secure-mode federation (epsilon None: the clip alone, no noise)."""
    from privacy import evaluate
    from site_agent.secagg_site import local_train

    xtr, ytr, xte, yte = _data(seed)
    task = TASKS[TASK]
    model = build_model(TASK, seed=seed)
    arrays = model_arrays(model)
    flat, _layout_text = pack_arrays(arrays)
    layout = [(k, tuple(v.shape)) for k, v in arrays.items()]
    dim = flat.size
    z = (noise_multiplier_for(epsilon=epsilon, delta=1e-5, rounds=rounds, dim=dim,
                              threshold=sites) if epsilon is not None else 0.0)
    plan = DistributedPlan(clip=1.0, dim=dim, threshold=sites, noise_multiplier=max(z, 1e-9))
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(ytr)), sites)
    for _ in range(rounds):
        total = np.zeros(dim, dtype=np.int64)
        for idx in parts:
            local = build_model(TASK, seed=seed)
            set_model_arrays(local, unpack_arrays(flat, layout))
            local_train(local, features=xtr[idx], labels=ytr[idx], lr=task.default_lr,
                        batch_size=task.default_batch_size, epochs=1)
            new, _ = pack_arrays(model_arrays(local))
            vec = quantise(new.astype(np.float64) - flat, clip=1.0, scale=plan.scale, rng=rng)
            if epsilon is not None:
                vec = vec + skellam(plan.share_variance, dim, rng)
            total = to_field(total + to_field(vec))
        mean = dequantise(from_field(total), scale=SCALE_UNITS / 1.0) / sites
        flat = (flat.astype(np.float64) + mean).astype(np.float32)
    set_model_arrays(model, unpack_arrays(flat, layout))
    return float(evaluate(model=model, features=xte, labels=yte).auc)


def central_auc(*, epsilon: float, seed: int, rounds: int) -> float:
    """Test AUC of DP-SGD on the pooled training rows at ``epsilon`` over ``rounds`` epochs."""
    from opacus.accountants.utils import get_noise_multiplier

    from privacy import evaluate, sample_rate_for, train_dp

    xtr, ytr, xte, yte = _data(seed)
    task = TASKS[TASK]
    q = sample_rate_for(batch_size=task.default_batch_size, n_examples=len(ytr))
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=q,
                                 epochs=rounds, accountant="prv")
    model = build_model(TASK, seed=seed)
    train_dp(model=model, features=xtr, labels=ytr, noise_multiplier=sigma, max_grad_norm=1.0,
             batch_size=task.default_batch_size, epochs=rounds, lr=task.default_lr, seed=seed)
    return float(evaluate(model=model, features=xte, labels=yte).auc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed, epsilon 3 only")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    epsilons = [3.0] if args.quick else [3.0, 30.0]
    rounds = 5
    dim = sum(v.size for v in model_arrays(build_model(TASK, seed=0)).values())
    out: dict[str, Any] = {"task": TASK, "dim": int(dim), "rounds": rounds, "protocol": {},
                           "auc": {}}
    for n in (3, 8):
        for drop in (False, True):
            times = [protocol_seconds(n, dim, drop=drop) for _ in range(5)]
            out["protocol"][f"{n} sites{' one dropped' if drop else ''}"] = round(
                statistics.median(times), 4)
    for eps in epsilons:
        row: dict[str, float] = {}
        row["central DP-SGD (pooled)"] = statistics.median(
            central_auc(epsilon=eps, seed=s, rounds=rounds) for s in seeds)
        for n in (3, 8):
            row[f"secure, {n} sites"] = statistics.median(
                secure_auc(sites=n, epsilon=eps, seed=s, rounds=rounds) for s in seeds)
        out["auc"][f"epsilon {eps:g}"] = {k: round(v, 4) for k, v in row.items()}
    out["auc"]["no noise (clip only)"] = {
        f"secure, {n} sites": round(statistics.median(
            secure_auc(sites=n, epsilon=None, seed=s, rounds=rounds) for s in seeds), 4)
        for n in (3, 8)}
    print(json.dumps(out, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "secagg.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
