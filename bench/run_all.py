"""``make bench``: round time of the appliance against a stock Flower FedAvg app.

Both run on this machine in the same invocation, same model, same data, same site count,
TLS and node authentication on for both. Prints the medians and their ratio, and writes
``bench/results/round_time.json`` and ``bench/results/round_time.md``.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
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


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
