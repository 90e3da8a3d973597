"""Benchmark 11: the study demo's utility and cost over seeds, against issue 11's targets.

Runs ``make demo-study``'s whole path (``coordinator.study_demo.run_study_demo``: real
coordinator, four real site agents, the statistics phase and DP-SGD at epsilon 3 per site
in total, evaluation, release) once per seed (``--seeds``, 5 by default), one after the
other, each in a scratch folder of its own under /tmp (removed afterwards), and reports:

* per seed: the mean over the four hospitals of held-out accuracy and AUC for the
  federated DP model, the local-only DP models (each site alone, same epsilon) and the pooled
  non-private model; the statistics phase's seconds and the median round's seconds;
* their medians over the seeds, and the targets: federated within 0.04 of pooled, at
  least 0.05 above local-only, the statistics phase at most one round's time, the median
  round at most 2 s with 4 sites on 2 cores.

A seed is the run's seed (the initial model) and the baselines' seed; each site draws its
DP noise from its own secret and fresh entropy, so every repetition draws new noise.

    .venv/bin/python bench/study_demo.py [--seeds 0,1,2,3,4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bu.exit_on_sigterm()
    from coordinator.study_demo import run_study_demo

    seeds = [int(s) for s in args.seeds.split(",")]
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        tmp = Path(tempfile.mkdtemp(prefix="fedward-bench-study-"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                s = run_study_demo(work=tmp / "work", out=tmp / "out", rounds=args.rounds,
                                   epsilon=3.0, statistics_epsilon=1.5, seed=seed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        acc, auc = s["mean_site_accuracy"], s["mean_site_auc"]
        rounds = s["round_seconds"]
        runs.append({"seed": seed, "federated": acc["federated"],
                     "local_only": acc["local_only"], "pooled": acc["pooled"],
                     "auc": {k: auc[k] for k in ("federated", "local_only", "pooled")},
                     "statistics_seconds": s["statistics_seconds"],
                     "median_round_seconds": bu.median(rounds), "round_seconds": rounds,
                     "epsilon_spent": [x["epsilon_spent"] for x in s["sites"]],
                     "verified": s["release"]["verified"],
                     "served_by_name_agrees": (s["release"].get("served_by_name") or {})
                     .get("agrees")})
        print(f"seed {seed}: federated {acc['federated']:.3f}, local-only "
              f"{acc['local_only']:.3f}, pooled {acc['pooled']:.3f}, statistics "
              f"{s['statistics_seconds']:.2f} s, median round {bu.median(rounds):.2f} s",
              flush=True)
    med = {k: bu.median([r[k] for r in runs]) for k in
           ("federated", "local_only", "pooled", "statistics_seconds", "median_round_seconds")}
    targets = [
        ("federated within 0.04 of pooled", f"{med['pooled'] - med['federated']:+.3f}",
         med["pooled"] - med["federated"] <= 0.04),
        ("federated at least 0.05 above local-only",
         f"{med['federated'] - med['local_only']:+.3f}",
         med["federated"] - med["local_only"] >= 0.05),
        ("statistics phase at most one round", f"{med['statistics_seconds']:.2f} s vs "
         f"{med['median_round_seconds']:.2f} s",
         med["statistics_seconds"] <= med["median_round_seconds"]),
        ("median round at most 2 s (4 sites, 2 cores)", f"{med['median_round_seconds']:.2f} s",
         med["median_round_seconds"] <= 2.0),
    ]
    med_auc = {k: bu.median([r["auc"][k] for r in runs])
               for k in ("federated", "local_only", "pooled")}
    rows = [[str(r["seed"]), f"{r['federated']:.3f} / {r['auc']['federated']:.3f}",
             f"{r['local_only']:.3f} / {r['auc']['local_only']:.3f}",
             f"{r['pooled']:.3f} / {r['auc']['pooled']:.3f}",
             f"{r['statistics_seconds']:.2f}", f"{r['median_round_seconds']:.2f}",
             f"{max(r['epsilon_spent']):.3f}"] for r in runs]
    rows.append(["median", f"{med['federated']:.3f} / {med_auc['federated']:.3f}",
                 f"{med['local_only']:.3f} / {med_auc['local_only']:.3f}",
                 f"{med['pooled']:.3f} / {med_auc['pooled']:.3f}",
                 f"{med['statistics_seconds']:.2f}", f"{med['median_round_seconds']:.2f}", ""])
    md = (f"The study demo end to end (real processes, 4 hospitals, epsilon 3 per site with "
          f"1.5 to the statistics, {args.rounds} rounds), one run per seed. Each model: the "
          "mean over the hospitals of its held-out accuracy / AUC (the targets are on "
          "accuracy).\n\n"
          + bu.md_table(["seed", "federated DP", "local-only DP", "pooled, no DP",
                         "statistics s", "median round s", "max epsilon spent"], rows)
          + "\n" + bu.md_table(["target (issue 11)", "measured (medians)", "met"],
                               [[t, v, "yes" if ok else "no"] for t, v, ok in targets]))
    bu.write_results("study_demo", {"seeds": seeds, "rounds": args.rounds, "runs": runs,
                                    "medians": med, "median_auc": med_auc,
                                    "targets": [{"target": t, "measured": v, "met": ok}
                                                for t, v, ok in targets]}, md)


if __name__ == "__main__":
    main()
