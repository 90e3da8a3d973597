"""Benchmark: seconds per round with real processes, plain against secure aggregation.

For each site count N (``--sites 3,8``): a real coordinator and N real site agents, each
its own process tree (``tests/federation.py``'s lab set-up: the sites reach the SuperLink's
socket directly, without the gateway; 127.0.0.1 only), then the same run twice,
one after the other, in the same federation: plain (DP-SGD at each site, FedAvg) and with
``secure_aggregation`` (threshold N: each round's four SecAgg+ exchanges). Breast-cancer
MLP, epsilon 3, R rounds (``--rounds``, default 3), 1 local epoch, final evaluation on.
Reported per N and mode: each round's seconds as the coordinator recorded them, and the
median of rounds 2..R, and the ratio secure / plain. Benchmark 12 in docs/benchmarks.md;
results in ``bench/results/secagg_rounds.{json,md}``.

    .venv/bin/python bench/secagg_rounds.py --sites 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import benchutil as bu  # noqa: E402

import federation as harness  # noqa: E402


def one(fed: harness.Federation, *, rounds: int, secure: bool, sites: int) -> dict[str, Any]:
    body: dict[str, Any] = {"task": "breast_cancer_mlp", "rounds": rounds, "local_epochs": 1,
                            "epsilon": 3.0, "min_sites": sites, "round_deadline_s": 300}
    if secure:
        body.update(secure_aggregation=True, secagg_threshold=sites)
    run_id = fed.launch(**body)
    run = fed.wait_run(run_id, timeout=1800)
    seconds = [float(r["seconds"]) for r in fed.api("GET", f"/runs/{run_id}/rounds").json()
               if r.get("seconds") is not None]
    return {"status": run["status"], "failure_reason": run.get("failure_reason"),
            "round_seconds": [round(s, 2) for s in seconds],
            "median_later": (round(statistics.median(seconds[1:] or seconds), 2)
                             if seconds else None)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", default="3,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bu.mark_start()
    out: dict[str, Any] = {}
    rows = []
    for n in [int(x) for x in args.sites.split(",")]:
        with tempfile.TemporaryDirectory(prefix="fw-sa-", dir="/tmp") as tmp, \
                harness.federation(Path(tmp), n_sites=n) as fed:
            fed.join_all_sites()
            out[f"{n} sites"] = found = {
                "plain": one(fed, rounds=args.rounds, secure=False, sites=n),
                "secure": one(fed, rounds=args.rounds, secure=True, sites=n)}
        print(json.dumps(out, indent=2), flush=True)
        plain, secure = found["plain"]["median_later"], found["secure"]["median_later"]
        rows.append([str(n), " / ".join(bu.fmt(s) for s in found["plain"]["round_seconds"]),
                     bu.fmt(plain), " / ".join(bu.fmt(s) for s in found["secure"]["round_seconds"]),
                     bu.fmt(secure),
                     f"{secure / plain:.1f}x" if plain and secure else "-",
                     f"{found['plain']['status']} / {found['secure']['status']}"])
    md = (f"Seconds per round as the coordinator recorded them, {args.rounds} rounds per run, "
          "both runs in one federation, one after the other; median of rounds 2.."
          f"{args.rounds}.\n\n"
          + bu.md_table(["sites", "plain rounds (s)", "plain median", "secure rounds (s)",
                         "secure median", "secure / plain", "status"], rows))
    bu.write_results("secagg_rounds", {"rounds": args.rounds, "results": out}, md)


if __name__ == "__main__":
    main()
