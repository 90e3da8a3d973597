"""Benchmark 10: the run's noise-multiplier search, the ledger's (PLD) against Opacus's (PRV).

Each site searches once per run plan for the smallest noise multiplier that keeps the whole
run within its epsilon (``privacy.dp.noise_multiplier_for_run``). This times, in one
process, interleaved, CPU time (``time.process_time``), every in-memory cache cleared
before each search:

* ``pld``: the default, a bracket then regula falsi on the ledger's own accountant
  (dp-accounting's PLD);
* ``prv``: the search it replaced, Opacus's binary search with its PRV accountant, then
  raised until the ledger's figure fits.

over run plans like the demo's and the tests' (epsilon, sampling rate, epochs), and prints
per plan the median CPU-seconds of each, their ratio, both noise multipliers and the
ledger's epsilon of each (the smaller noise that still fits is the better answer).

    .venv/bin/python bench/noise_search.py [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

DELTA = 1e-5
# (epsilon, sample rate, total epochs): the demo's sites (about 140 training rows, batch
# 32, 5 rounds x 1 epoch), short test runs, a statistics share, a larger site.
PLANS = [(3.0, 32 / 140, 5), (3.0, 32 / 140, 2), (1.5, 32 / 100, 1), (3.0, 0.25, 5),
         (1.0, 0.1, 4), (3.0, 64 / 5000, 10)]


def _clear() -> None:
    from privacy import dp
    from privacy.accounting import clear_caches

    clear_caches()
    for fn in (dp._search_noise, dp._search_noise_ledger, dp._within_ledger_figure,
               dp._epsilon):
        fn.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    bu.mark_start()
    from privacy import DpSgd, compose_mechanisms, dp

    dp.use_noise_cache(None)
    compose_mechanisms([DpSgd(1.0, 0.1, 10)], delta=DELTA)   # imports, once
    rows, results = [], []
    for eps, q, epochs in PLANS:
        steps = dp.planned_steps(sample_rate=q, epochs=epochs)
        times: dict[str, list[float]] = {"pld": [], "prv": []}
        sigma: dict[str, float] = {}
        for _ in range(args.reps):
            for name in times:
                _clear()
                t = time.process_time()
                sigma[name] = dp.noise_multiplier_for_run(
                    epsilon=eps, delta=DELTA, sample_rate=q, total_epochs=epochs,
                    accountant=name)
                times[name].append(time.process_time() - t)
        ledger = {n: compose_mechanisms([DpSgd(s, q, steps)], delta=DELTA).epsilon
                  for n, s in sigma.items()}
        pld, prv = bu.median(times["pld"]), bu.median(times["prv"])
        results.append({"epsilon": eps, "sample_rate": q, "epochs": epochs, "steps": steps,
                        "cpu_s": times, "sigma": sigma, "ledger_epsilon": ledger})
        rows.append([f"{eps:g}", f"{q:.4f}", str(steps), bu.fmt(pld, 3), bu.fmt(prv, 3),
                     f"{prv / pld:.1f}x", f"{sigma['pld']:.4f} / {sigma['prv']:.4f}",
                     f"{ledger['pld']:.4f} / {ledger['prv']:.4f}"])
    md = (f"CPU-seconds per search, median of {args.reps}, caches cleared, interleaved; "
          "delta 1e-5.\n\n"
          + bu.md_table(["epsilon", "sample rate", "steps", "ledger (PLD) s", "Opacus PRV s",
                         "PRV / PLD", "sigma PLD / PRV", "ledger epsilon PLD / PRV"], rows))
    bu.write_results("noise_search", {"reps": args.reps, "delta": DELTA,
                                      "results": results}, md)


if __name__ == "__main__":
    main()
