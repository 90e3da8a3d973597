"""Benchmark 4: what differential privacy costs in model quality, federated, per epsilon.

Test AUC of the federated DP model at epsilon 1, 3 and 8 (delta 1e-5) against the pooled,
non-private baseline, on the same split, for 3 seeds.

IMPORTANT: this runs the federation IN-PROCESS. It reuses the appliance's training and
privacy code exactly (``site_agent.datasets.write_demo_federation`` for the data,
``site_agent.data.load_site_data`` for each site's train/held-out split as the site agent
makes it, ``privacy.noise_multiplier_for_run`` over rounds x local epochs,
``privacy.train_dp`` per site per round with the run's accountant history,
``coordinator.server_app.aggregate`` for FedAvg weighted by training rows,
``privacy.evaluate``), but NOT its Flower transport: no SuperLink, SuperNodes or site agents
run. The transport's cost is measured by benchmark 1 (``bench/run_all.py``); the numbers a
model ends up with do not depend on it.

Setting: breast-cancer MLP, ``write_demo_federation`` with 3 sites, seed 0 (the same split
for every seed and epsilon); 5 rounds x 3 local epochs; the task's default lr (1.0, SGD) and
batch size (32); clip 1.0; each site's own noise multiplier for its sample rate. Test set:
the federation's ``global_test.csv`` (20% held out, stratified; no site holds any of its
rows).

DP noise and Poisson sampling are seeded as the appliance seeds them: each site derives the
round's seed with ``site_agent.trainer.round_noise_seed`` (HMAC-SHA256 under the site's
``noise_secret`` of the run, the round and fresh entropy), so every site draws its own,
independent noise. The appliance makes the secret from ``os.urandom`` once per site and
draws the entropy fresh every round; here both are derived from the benchmark seed and the
site's name, so that a run can be repeated. Seeds 0, 1, 2 change the initial model and
every site's secret, not the split.

Baseline, as ``fedward-demo`` computes it: all sites' rows pooled in one place
(``pooled_train.csv``), no DP, Adam lr 0.01, as many epochs as the federated run trained in
total (15), ``privacy.train_plain``. A second, non-private FedAvg run of the same federation
(``train_plain`` at the sites, same lr, batch, rounds and per-site seeds) separates the cost
of DP from the cost of federating.

A secondary variant, labelled "shared run seed (appliance before 9d632bf)", seeds every
site with the run seed (``seed x 100003 + round``), as the site agent did before the
per-site noise secret: all sites then draw the same noise each round and averaging does not
average it down. It is kept for comparison only; ``--no-shared`` skips it. About 1 minute on
2 cores; 3 seeds (the brief's setting).

    .venv/bin/python bench/utility.py
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

TASK = "breast_cancer_mlp"
EPSILONS = (1.0, 3.0, 8.0)
SEEDS = (0, 1, 2)
ROUNDS = 5
LOCAL_EPOCHS = 3
DELTA = 1e-5
CLIP = 1.0
N_SITES = 3
SHARED_LABEL = "secondary, NOT the appliance: shared run seed (before 9d632bf)"

for _msg in ("Secure RNG turned off", "Optimal order is the largest alpha",
             "Using a non-full backward hook", "Full backward hook"):
    warnings.filterwarnings("ignore", message=f".*{_msg}.*")


def federation(tmp: Path) -> dict[str, Any]:
    from site_agent.data import DataSchema, load_site_data
    from site_agent.datasets import read_labeled_csv, write_demo_federation

    fed = write_demo_federation(task=TASK, out_dir=tmp, n_sites=N_SITES, seed=0)
    schema = DataSchema.for_task(TASK)
    sites = []
    for s in fed.sites:
        d = load_site_data(csv_path=s.csv_path, schema=schema)  # the site agent's split
        sites.append({"name": s.name, "rows": s.n_rows, "x": d.train_x, "y": d.train_y})
    test_x, test_y = read_labeled_csv(csv_path=fed.test_csv, task=TASK)
    pooled_x, pooled_y = read_labeled_csv(csv_path=fed.pooled_csv, task=TASK)
    return {"sites": sites, "test": (test_x, test_y), "pooled": (pooled_x, pooled_y)}


def site_secret(seed: int, site: str) -> bytes:
    """A site's 32-byte noise secret, reproducible from the benchmark seed and site name.

    The appliance draws it from ``os.urandom`` (``site_agent.keys.ensure_noise_secret``);
    only its independence between sites matters for the model's quality.
    """
    return hashlib.sha256(f"fedward-bench-utility/{seed}/{site}".encode()).digest()


def site_round_seed(*, seed: int, site: str, run_id: str, rnd: int, shared: bool) -> int:
    """The training seed of one site in one round.

    ``shared=False``: the appliance's own derivation, ``round_noise_seed``, with entropy
    derived from the benchmark seed, the site, the run and the round in place of the
    operating system's fresh bytes (so that a run can be repeated).
    ``shared=True``: the old run seed, the same at every site.
    """
    if shared:
        return seed * 100_003 + rnd
    from site_agent.trainer import round_noise_seed

    entropy = hashlib.sha256(f"fedward-bench-utility/{seed}/{site}/{run_id}/{rnd}".encode())
    return round_noise_seed(secret=site_secret(seed, site), run_id=run_id, round_number=rnd,
                            entropy=entropy.digest())


def run_federated(fed: dict[str, Any], *, epsilon: float | None, seed: int,
                  shared_seed: bool = False) -> dict[str, Any]:
    """One in-process federated run; ``epsilon=None`` trains without DP.

    ``shared_seed``: every site trains with the run seed (the old behaviour) instead of its
    own secret-derived seed (the appliance's).
    """
    from coordinator.server_app import aggregate
    from fedward.models import model_arrays, set_model_arrays
    from fedward.tasks import build_model, get_task
    from privacy import (
        epsilon_for_history,
        evaluate,
        noise_multiplier_for_run,
        sample_rate_for,
        train_dp,
        train_plain,
    )

    spec = get_task(TASK)
    batch, lr = spec.default_batch_size, spec.default_lr
    global_arrays = model_arrays(build_model(TASK, seed=seed))
    sigmas, histories = {}, {}
    for s in fed["sites"]:
        if epsilon is not None:
            q = sample_rate_for(n_examples=len(s["y"]), batch_size=batch)
            sigmas[s["name"]] = noise_multiplier_for_run(
                epsilon=epsilon, delta=DELTA, sample_rate=q,
                total_epochs=ROUNDS * LOCAL_EPOCHS)
        histories[s["name"]] = []
    # The noise seed depends on the run id; one id per benchmark seed, so every epsilon of a
    # seed sees the same secrets (common random numbers across epsilons).
    run_id = f"bench-utility-seed-{seed}"
    for rnd in range(1, ROUNDS + 1):
        updates = []
        for s in fed["sites"]:
            model = build_model(TASK, seed=0)
            set_model_arrays(model, global_arrays)
            site_seed = site_round_seed(seed=seed, site=s["name"], run_id=run_id, rnd=rnd,
                                        shared=shared_seed)
            if epsilon is None:
                train_plain(model=model, features=s["x"], labels=s["y"], batch_size=batch,
                            epochs=LOCAL_EPOCHS, lr=lr, seed=site_seed)
            else:
                r = train_dp(model=model, features=s["x"], labels=s["y"],
                             noise_multiplier=sigmas[s["name"]], max_grad_norm=CLIP,
                             batch_size=batch, epochs=LOCAL_EPOCHS, lr=lr, seed=site_seed,
                             history=histories[s["name"]])
                histories[s["name"]] = r.accountant_history
            updates.append((model_arrays(model), float(len(s["y"]))))
        global_arrays = aggregate(updates, method="fedavg")
    final = build_model(TASK, seed=0)
    set_model_arrays(final, global_arrays)
    test_x, test_y = fed["test"]
    ev = evaluate(model=final, features=test_x, labels=test_y)
    spent = ({n: epsilon_for_history(h, delta=DELTA) for n, h in histories.items()}
             if epsilon is not None else {})
    return {"auc": ev.auc, "accuracy": ev.accuracy, "epsilon_spent": spent,
            "noise_multipliers": sigmas}


def pooled_baseline(fed: dict[str, Any], seed: int) -> dict[str, float]:
    from fedward.tasks import build_model, get_task
    from privacy import evaluate, train_plain

    spec = get_task(TASK)
    x, y = fed["pooled"]
    model = build_model(TASK, seed=seed)
    train_plain(model=model, features=x, labels=y, batch_size=spec.default_batch_size,
                epochs=ROUNDS * LOCAL_EPOCHS, lr=0.01, seed=seed, optimizer="adam")
    test_x, test_y = fed["test"]
    ev = evaluate(model=model, features=test_x, labels=test_y)
    return {"auc": ev.auc, "accuracy": ev.accuracy}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": bu.median(values), "mean": sum(values) / len(values),
            "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-shared", action="store_true",
                    help="skip the secondary shared-run-seed variant (the old behaviour)")
    args = ap.parse_args()
    bu.exit_on_sigterm()
    import torch

    torch.set_num_threads(1)  # the site agent's default torch_threads
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedward-utility-") as tmp:
        fed = federation(Path(tmp))
    runs: dict[str, list[dict[str, Any]]] = {"pooled, no DP (baseline)": [],
                                             "federated, no DP": []}
    for seed in SEEDS:
        runs["pooled, no DP (baseline)"].append(pooled_baseline(fed, seed))
        runs["federated, no DP"].append(run_federated(fed, epsilon=None, seed=seed))
        for eps in EPSILONS:
            runs.setdefault(f"federated DP, epsilon {eps:g}", []).append(
                run_federated(fed, epsilon=eps, seed=seed))
            if not args.no_shared:
                runs.setdefault(f"{SHARED_LABEL}, epsilon {eps:g}", []).append(
                    run_federated(fed, epsilon=eps, seed=seed, shared_seed=True))
        print(f"seed {seed} done ({time.monotonic() - t0:.0f}s)", flush=True)

    base = _stats([r["auc"] for r in runs["pooled, no DP (baseline)"]])
    summary, rows = {}, []
    order = sorted(runs, key=lambda k: (not k.startswith("pooled"),
                                        k.startswith(SHARED_LABEL), k != "federated, no DP", k))
    for name in order:
        auc = _stats([r["auc"] for r in runs[name]])
        acc = _stats([r["accuracy"] for r in runs[name]])
        spent = [max(r["epsilon_spent"].values()) for r in runs[name] if r.get("epsilon_spent")]
        summary[name] = {"auc": auc, "accuracy": acc, "per_seed": runs[name],
                         "max_epsilon_spent": max(spent) if spent else None}
        rows.append([name, f"{auc['median']:.4f}", f"{auc['mean']:.4f}",
                     f"{auc['min']:.4f} / {auc['max']:.4f}",
                     f"{auc['median'] - base['median']:+.4f}",
                     f"{auc['median'] / base['median']:.3f}",
                     f"{acc['median']:.3f}", bu.fmt(max(spent), 3) if spent else "-"])
    sigma = runs[f"federated DP, epsilon {EPSILONS[1]:g}"][0]["noise_multipliers"]
    sizes = ", ".join(f"{s['name']} {len(s['y'])}" for s in fed["sites"])
    md = (
        "In-process federation with the appliance's training, privacy and aggregation code "
        "(not its Flower transport: see benchmark 1). Breast-cancer MLP, "
        f"`write_demo_federation` {N_SITES} sites seed 0 (training rows per site after the "
        f"site agent's 25% hold-out: {sizes}; test {len(fed['test'][1])} rows), {ROUNDS} "
        f"rounds x {LOCAL_EPOCHS} local epochs, SGD lr 1.0, batch 32, clip {CLIP}, delta "
        f"{DELTA:g}; seeds {', '.join(map(str, SEEDS))}. Noise multipliers at epsilon "
        f"{EPSILONS[1]:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in sigma.items()) + ". "
        "DP noise and sampling seeded per site from a secret only that site holds "
        "and fresh entropy (`round_noise_seed`), as the appliance does: every site draws "
        "independent noise. Ratios and differences are against the pooled baseline of the "
        "same seeds in this run; medians and means over the seeds.\n\n"
        + bu.md_table(["setting", "test AUC median", "mean", "min / max",
                       "median vs baseline (diff)", "median vs baseline (ratio)",
                       "accuracy median", "max epsilon spent"], rows)
    )
    if not args.no_shared:
        md += (f"\nThe rows \"{SHARED_LABEL}\" are NOT the appliance's behaviour: every site "
               "trains with the run seed (`seed x 100003 + round`), as the site agent did "
               "before commit 9d632bf, so all sites draw the same noise each round and "
               "FedAvg does not average it down. Kept for comparison only.\n")
    bu.write_results("utility", {
        "task": TASK, "epsilons": EPSILONS, "seeds": SEEDS, "rounds": ROUNDS,
        "local_epochs": LOCAL_EPOCHS, "delta": DELTA, "max_grad_norm": CLIP,
        "site_train_rows": {s["name"]: len(s["y"]) for s in fed["sites"]},
        "test_rows": len(fed["test"][1]), "seconds": time.monotonic() - t0,
        "noise_seeding": "per site: round_noise_seed(HMAC of run/round/entropy under the "
                         "site's secret; entropy derived from the seed so a run repeats); "
                         "secondary rows: shared run seed (old behaviour)",
        "summary": summary}, md)


if __name__ == "__main__":
    main()
