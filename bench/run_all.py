"""``make bench``: benchmarks 1 and 1b, then benchmarks 2-7 and 10-12.

Benchmark 1 (``bench/round_overhead.py``): seconds per round of the appliance against a
stock Flower FedAvg deployment, both run on this machine in the same invocation, same model,
same data partitions, same site count (2, 4 and 8 by default), TLS and node authentication
on for both; the medians, their ratio and where the appliance's round time goes, in
``bench/results/round_overhead.json`` and ``.md``.

Benchmark 1b (``bench/prod_path.py``): the same comparison with the sites on the production
route (enrolled, through their tunnels and the coordinator's gateway, Flower in its
namespaces) against stock Flower measured again in the same invocation, same site counts and
rounds; round 1 against the later rounds; in ``bench/results/prod_path.json`` and ``.md``.
``--no-prod`` skips it.

Then it runs benchmarks 2-7 and 10-12 (``EXTRA``, each its own script, each bounded in
time and writing ``bench/results/<name>.json`` and ``.md``); ``--no-extra`` skips them,
``--extra-only`` runs only them, ``--only`` picks some by script name. A failing benchmark
is reported and the others still run; the exit status is then 1.

Last, ``bench/update_docs.py`` copies the tables in ``bench/results/`` into
``docs/benchmarks.md`` (between its ``<!-- results:NAME -->`` markers, with each one's
commit and load); ``--no-docs`` skips that.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Benchmark 1 at 2, 4 and 8 sites x 6 rounds took 17 minutes on a loaded 2-core machine
# (stock Flower at 8 sites a third of it); the limit leaves room for a slower one.
ROUND_OVERHEAD_LIMIT_S = 3 * 3600
# Benchmark 1b runs the same stock baseline plus the production route: the same order.
PROD_PATH_LIMIT_S = 3 * 3600

# Benchmarks 2-7 and 10-12: script, wall-clock limit in seconds (each but benchmark 2 is sized for
# ~3 min on 2 cores; benchmark 2 took about 6 min with all 1000 sites taking part).
EXTRA: list[tuple[str, int]] = [
    ("scale_sim.py", 1800),  # 2. sites 10/100/1000 on Flower's simulation engine (Ray)
    ("dp_cost.py", 600),     # 3. Opacus grad-sample modes, time per epoch
    ("utility.py", 600),     # 4. federated DP AUC at epsilon 1/3/8 vs pooled baseline
    ("exports.py", 600),     # 5. inference latency: PyTorch, ORT fp32/INT8, OpenVINO
    ("signing.py", 600),     # 6. 500 MB bundle signing/verification vs sha256sum
    ("api_load.py", 600),    # 7. coordinator API under load, SQLite and PostgreSQL
    ("noise_search.py", 300),  # 10. a run's noise search: the ledger's PLD vs Opacus's PRV
    ("study_demo.py", 1800),   # 11. the study demo over 5 seeds against issue 11's targets
    ("secagg_rounds.py", 1800),  # 12. round time, plain vs secure aggregation, 3 and 8 sites
]


def run_script(script: str, args: list[str], limit: int) -> int:
    """Run one benchmark script with a wall-clock limit; return its exit status."""
    print(f"\n=== bench/{script} {' '.join(args)} ===", flush=True)
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / script), *args], cwd=ROOT)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark then stops what it started and cleans up.
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = -1
        print(f"bench/{script} exceeded {limit} s and was stopped")
    print(f"=== bench/{script}: exit {rc} after {time.monotonic() - t:.0f} s ===", flush=True)
    return rc


def run_extra(only: set[str] | None = None) -> int:
    """Run benchmarks 2-7 and 10-12 (or those named in ``only``) one after the other; return the
    number that failed."""
    failed = [script for script, limit in EXTRA
              if (only is None or script in only) and run_script(script, [], limit) != 0]
    if failed:
        print("failed: " + ", ".join(failed))
    return len(failed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="2,4,8",
                    help="benchmarks 1 and 1b: site counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=6, help="benchmarks 1 and 1b: rounds per run")
    ap.add_argument("--no-prod", action="store_true",
                    help="skip benchmark 1b (the production route against stock Flower)")
    ap.add_argument("--no-extra", action="store_true", help="skip benchmarks 2-7 and 10-12")
    ap.add_argument("--extra-only", action="store_true",
                    help="run only benchmarks 2-7, 10-12 (not the round-time comparisons 1, 1b)")
    ap.add_argument("--only", default="",
                    help="run only these of benchmarks 2-7, 10-12, comma-separated script names "
                         "(e.g. utility.py,scale_sim.py); implies --extra-only")
    ap.add_argument("--no-docs", action="store_true",
                    help="do not copy the results tables into docs/benchmarks.md")
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    unknown = (only or set()) - {script for script, _ in EXTRA}
    if unknown:
        ap.error(f"unknown --only script(s): {', '.join(sorted(unknown))}")
    failed = False
    if not (args.extra_only or only):
        failed = run_script("round_overhead.py", ["--sites", args.sites, "--rounds",
                                                  str(args.rounds)],
                            ROUND_OVERHEAD_LIMIT_S) != 0
        if not args.no_prod and run_script("prod_path.py", ["--sites", args.sites, "--rounds",
                                                            str(args.rounds)],
                                           PROD_PATH_LIMIT_S) != 0:
            failed = True
    if (only or not args.no_extra) and run_extra(only):
        failed = True
    if not args.no_docs and run_script("update_docs.py", [], 60) != 0:
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
