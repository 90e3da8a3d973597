"""Benchmark: what federated hyperparameter tuning buys at the same total epsilon.

On the breast-cancer demo (3 sites, ``write_demo_federation`` seed 0), per benchmark seed:

* **default**: one federated DP run with the appliance's defaults (5 rounds x 3 local
  epochs, SGD lr 1.0, batch 32, clip 1.0) at epsilon 3 per site (delta 1e-5);
* **tuned**: a search whose WHOLE cost is epsilon 3 per site, as the sites account it
  (``site_agent.tuning.selection``: the best of a geometric number of trials of mean 3,
  each trial at the noise of the search's reference trial), over two search spaces:
  ``lr+clip`` (lr 0.1-3, clip 0.3-3; batch 32 and 3 local epochs fixed, so the reference is
  the default's own shape and the cost is the selection's alone) and ``full`` (also batch 16,
  32, 64 and 1-3 local epochs: the reference is the largest sample rate with the most steps,
  so every trial pays for the largest one). Each trial has the default's 5 rounds; Optuna's
  TPE sampler (seeded) proposes; the score is the mean of the sites' held-out AUC (what the
  coordinator reads from the sites); the released model is the best trial's.

Reported: the test AUC (the federation's ``global_test.csv``, no site holds its rows) of the
default model and of each search's released model; the gain is their difference, median
over the seeds. The number of trials is drawn from the geometric distribution with a
generator seeded by the benchmark seed (the appliance draws it from fresh entropy), so that
a run can be repeated.

IMPORTANT: IN-PROCESS, like benchmark 4 (``bench/utility.py``, whose federation, noise
seeds and aggregation it reuses): the appliance's training, privacy and aggregation code,
not its Flower transport. ``tests/test_tuning_federation.py`` runs a real search end to end.

    .venv/bin/python bench/tuning.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu
import utility as ut

EPSILON = 3.0
MEAN_TRIALS = 3.0
SPACES: dict[str, dict[str, Any]] = {
    "lr+clip": {"batch_sizes": [32], "max_local_epochs": 3, "epochs": (3, 3)},
    "full": {"batch_sizes": [16, 32, 64], "max_local_epochs": 3, "epochs": (1, 3)},
}


def sites_with_holdout(tmp: Path) -> dict[str, Any]:
    """The demo federation, with each site's own held-out split (what it scores on)."""
    from site_agent.data import load_site_data
    from site_agent.data_schema import DataSchema
    from site_agent.datasets import write_demo_federation

    fed = ut.federation(tmp)
    demo = write_demo_federation(task=ut.TASK, out_dir=tmp / "again", n_sites=ut.N_SITES,
                                 seed=0)
    schema = DataSchema.for_task(ut.TASK)
    for site, s in zip(fed["sites"], demo.sites, strict=True):
        d = load_site_data(csv_path=s.csv_path, schema=schema)
        site["val"] = (d.test_x, d.test_y)
    return fed


def run_trial(fed: dict[str, Any], *, sigmas: dict[str, float], params: dict[str, Any],
              seed: int, run_id: str) -> tuple[float, float]:
    """One federated run at the given per-site noise; (mean site held-out AUC, test AUC)."""
    from coordinator.aggregation import SiteUpdate, make_aggregator
    from fedward.models import model_arrays, set_model_arrays
    from fedward.tasks import build_model
    from privacy import evaluate, train_dp

    aggregator = make_aggregator("fedavg", {})
    global_arrays = model_arrays(build_model(ut.TASK, seed=seed))
    histories: dict[str, list[Any]] = {s["name"]: [] for s in fed["sites"]}
    for rnd in range(1, ut.ROUNDS + 1):
        updates = []
        for s in fed["sites"]:
            model = build_model(ut.TASK, seed=0)
            set_model_arrays(model, global_arrays)
            r = train_dp(model=model, features=s["x"], labels=s["y"],
                         noise_multiplier=sigmas[s["name"]],
                         max_grad_norm=params["max_grad_norm"], batch_size=params["batch_size"],
                         epochs=params["local_epochs"], lr=params["lr"],
                         seed=ut.site_round_seed(seed=seed, site=s["name"], run_id=run_id,
                                                 rnd=rnd, shared=False),
                         history=histories[s["name"]])
            histories[s["name"]] = r.accountant_history
            updates.append(SiteUpdate(s["name"], model_arrays(model), float(len(s["y"]))))
        global_arrays = aggregator.aggregate(global_arrays, updates)
    final = build_model(ut.TASK, seed=0)
    set_model_arrays(final, global_arrays)
    val = [evaluate(model=final, features=s["val"][0], labels=s["val"][1]).auc
           for s in fed["sites"]]
    test = evaluate(model=final, features=fed["test"][0], labels=fed["test"][1]).auc
    return float(np.mean(val)), float(test)


def search(fed: dict[str, Any], *, space: str, seed: int) -> dict[str, Any]:
    """One search at total epsilon EPSILON per site, as the sites charge it."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from privacy.mechanisms import DpSgd
    from privacy.tuning import SearchTerms
    from site_agent import tuning

    sp = SPACES[space]
    terms = SearchTerms(search_id=1, mean=MEAN_TRIALS, shape=1.0, rounds=ut.ROUNDS,
                        max_local_epochs=sp["max_local_epochs"],
                        min_batch_size=min(sp["batch_sizes"]),
                        max_batch_size=max(sp["batch_sizes"]))
    chosen = {s["name"]: tuning.selection(terms, epsilon=EPSILON, delta=ut.DELTA,
                                          n_train=len(s["y"])) for s in fed["sites"]}
    sigma = {n: c.trial.noise_multiplier for n, c in chosen.items()
             if isinstance(c.trial, DpSgd)}
    n_trials = int(np.random.default_rng(1000 + seed).geometric(1.0 / MEAN_TRIALS))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    dists: dict[str, Any] = {
        "lr": FloatDistribution(0.1, 3.0, log=True),
        "max_grad_norm": FloatDistribution(0.3, 3.0, log=True),
        "batch_size": CategoricalDistribution(sp["batch_sizes"])}
    low, high = sp["epochs"]
    if low != high:
        from optuna.distributions import IntDistribution

        dists["local_epochs"] = IntDistribution(low, high)
    trials = []
    for k in range(n_trials):
        trial = study.ask(dists)
        params = {"local_epochs": low, **trial.params}
        val, test = run_trial(fed, sigmas=sigma, params=params, seed=seed,
                              run_id=f"bench-tuning-{space}-{seed}-{k}")
        study.tell(trial, val)
        trials.append({"params": params, "val_auc": val, "test_auc": test})
    best = max(trials, key=lambda t: t["val_auc"])
    return {"trials": len(trials), "sigma": sigma, "best": best, "all": trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="benchmark seeds (default 3)")
    args = ap.parse_args()
    bu.mark_start()
    t0 = time.monotonic()
    seeds = list(range(args.seeds))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fed = sites_with_holdout(Path(tmp))
        for seed in seeds:
            default = ut.run_federated(fed, epsilon=EPSILON, seed=seed)
            row: dict[str, Any] = {"seed": seed, "default_auc": float(default["auc"]),
                                   "default_sigma": default["noise_multipliers"]}
            for space in SPACES:
                row[space] = search(fed, space=space, seed=seed)
            rows.append(row)
            print(f"seed {seed}: default {row['default_auc']:.4f}; " + "; ".join(
                f"{sp} {row[sp]['best']['test_auc']:.4f} ({row[sp]['trials']} trials)"
                for sp in SPACES), flush=True)
    summary: dict[str, Any] = {"default_median_auc": bu.median(r["default_auc"] for r in rows)}
    for space in SPACES:
        gains = [r[space]["best"]["test_auc"] - r["default_auc"] for r in rows]
        summary[space] = {
            "median_auc": bu.median(r[space]["best"]["test_auc"] for r in rows),
            "median_gain": bu.median(gains), "gains": gains,
            "median_trials": bu.median(r[space]["trials"] for r in rows)}
    data = {"provenance": bu.provenance(), "epsilon": EPSILON, "delta": ut.DELTA,
            "mean_trials": MEAN_TRIALS, "seeds": seeds, "rows": rows, "summary": summary,
            "seconds": round(time.monotonic() - t0, 1)}
    table = bu.md_table(
        ["configuration", "median test AUC", "median gain over default", "median trials"],
        [["default (one run, epsilon 3)", bu.fmt(summary["default_median_auc"], 4), "", ""]]
        + [[f"tuned, {sp} (search total epsilon 3)", bu.fmt(summary[sp]["median_auc"], 4),
            f"{summary[sp]['median_gain']:+.4f}", bu.fmt(summary[sp]["median_trials"], 1)]
           for sp in SPACES])
    md = (f"\n{table}\n\n"
          f"Every figure: test AUC on global_test.csv, epsilon {EPSILON:g} per site in total "
          f"(delta {ut.DELTA:g}); geometric number of trials, mean {MEAN_TRIALS:g}. "
          f"{data['seconds']:.0f} s.\n")
    bu.write_results("tuning", data, md)
    print(md)
    assert all(math.isfinite(r["default_auc"]) for r in rows)


if __name__ == "__main__":
    main()
