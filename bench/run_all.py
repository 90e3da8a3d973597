"""``make bench``: round time of the appliance against a stock Flower FedAvg app.

Both run on this machine in the same invocation, same model, same data, same site count,
TLS and node authentication on for both. Prints the medians and their ratio, and writes
``bench/results/round_time.json`` and ``bench/results/round_time.md``.

Then it runs benchmarks 2-7 (``EXTRA``, each its own script, each bounded in time and
writing ``bench/results/<name>.json`` and ``.md``); ``--no-extra`` skips them,
``--extra-only`` runs only them. A failing extra benchmark is reported and the others still
run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent

# Benchmarks 2-7: script, wall-clock limit in seconds (each is sized for ~3 min on 2 cores).
EXTRA: list[tuple[str, int]] = [
    ("scale_sim.py", 600),   # 2. sites 10/100/1000 on Flower's simulation engine (Ray)
    ("dp_cost.py", 600),     # 3. Opacus grad-sample modes, time per epoch
    ("utility.py", 600),     # 4. federated DP AUC at epsilon 1/3/8 vs pooled baseline
    ("exports.py", 600),     # 5. inference latency: PyTorch, ORT fp32/INT8, OpenVINO
    ("signing.py", 600),     # 6. 500 MB bundle signing/verification vs sha256sum
    ("api_load.py", 600),    # 7. coordinator API under load, SQLite and PostgreSQL
]


def run_extra() -> int:
    """Run benchmarks 2-7 one after the other; return the number that failed."""
    failed = []
    for script, limit in EXTRA:
        print(f"\n=== bench/{script} ===", flush=True)
        t = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(HERE / script)], cwd=ROOT)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the benchmark then stops what it started and cleans up.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = -1
            print(f"bench/{script} exceeded {limit} s and was stopped")
        print(f"=== bench/{script}: exit {rc} after {time.monotonic() - t:.0f} s ===",
              flush=True)
        if rc != 0:
            failed.append(script)
    if failed:
        print("failed: " + ", ".join(failed))
    return len(failed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-extra", action="store_true", help="skip benchmarks 2-7")
    ap.add_argument("--extra-only", action="store_true",
                    help="run only benchmarks 2-7 (not the round-time comparison)")
    args = ap.parse_args()
    if args.extra_only:
        sys.exit(1 if run_extra() else 0)
    out = HERE / "results"
    out.mkdir(exist_ok=True)

    stock_json = out / f"stock_round_time_{args.sites}sites.json"
    t = time.monotonic()
    subprocess.run([sys.executable, str(HERE / "stock_round_time.py"), "--sites",
                    str(args.sites), "--rounds", str(args.rounds), "--json", str(stock_json)],
                   check=True, timeout=1800)
    stock = json.loads(stock_json.read_text())
    stock_wall = time.monotonic() - t

    t = time.monotonic()
    subprocess.run([str(BIN / "fedward-demo"), "--rounds", str(args.rounds), "--sites",
                    str(args.sites), "--out", str(out / "appliance"), "--work",
                    str(ROOT / ".fedward-bench"), "--stock-results", str(stock_json)],
                   check=True, timeout=1800, cwd=ROOT)
    appliance = json.loads((out / "appliance" / "summary.json").read_text())
    appliance_wall = time.monotonic() - t

    a_med = statistics.median(appliance["round_seconds"][1:] or appliance["round_seconds"])
    s_med = statistics.median(stock["round_seconds"][1:] or stock["round_seconds"])
    result = {
        "machine": {"cpus": _cpus(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "sites": args.sites,
        "rounds": args.rounds,
        "appliance_round_seconds": appliance["round_seconds"],
        "stock_round_seconds": stock["round_seconds"],
        "appliance_median_excl_round1": a_med,
        "stock_median_excl_round1": s_med,
        "appliance_median_all": statistics.median(appliance["round_seconds"]),
        "stock_median_all": statistics.median(stock["round_seconds"]),
        "speedup_median": s_med / a_med,
        "appliance_wall_seconds": appliance_wall,
        "stock_wall_seconds": stock_wall,
    }
    (out / "round_time.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"| {args.sites} sites, {args.rounds} rounds | median s/round (rounds 2..n) | "
        "median s/round (all) |\n|---|---|---|\n"
        f"| Fedward appliance | {a_med:.2f} | {result['appliance_median_all']:.2f} |\n"
        f"| stock Flower FedAvg app | {s_med:.2f} | {result['stock_median_all']:.2f} |\n"
        f"| ratio (stock / appliance) | {s_med / a_med:.2f}x | "
        f"{result['stock_median_all'] / result['appliance_median_all']:.2f}x |\n"
    )
    (out / "round_time.md").write_text(md)
    print(md)
    if not args.no_extra and run_extra():
        sys.exit(1)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
