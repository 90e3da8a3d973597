"""Benchmark 2: how a round's cost grows with sites, on Flower's simulation engine (Ray).

A stock ``ServerApp`` (Flower's ``FedAvg``) and a ``ClientApp`` that trains the appliance's
breast-cancer MLP (``export.tasks``) for one local epoch on a tiny partition (16 rows drawn
per site from the Breast Cancer Wisconsin data, scikit-learn, nothing downloaded), run with
``flwr.simulation.run_simulation`` for 10, 100 and 1000 virtual sites, 2 rounds each:

* 10 and 100 sites: every site trains and evaluates every round.
* 1000 sites: 10% of the sites (100) are sampled per round for training and for evaluation,
  so 100 and 1000 sites do the same work per round and differ only in how many sites the
  engine knows about.

Each site count runs in its own child process (a fresh Ray instance), whose whole process
tree (driver, Ray's GCS, raylet, workers, actors) is sampled every second from /proc for
peak memory: the sum of RSS (counts shared pages once per process, so it overstates) and of
PSS (shared pages split among their users). Reported per site count: wall time of the child
(Ray start included), seconds of round 1 (includes creating the Ray actors) and round 2, and
their ratio to the 10-site figures measured in the same invocation.

Scaled down for a ~3 minute budget on 2 cores: ONE repetition per site count and 2 rounds
(the brief's setting); medians are over the 2 rounds. Ray workers get ``num_cpus=1`` per
ClientApp (2 actors on 2 cores). Ray's usage statistics and Flower's telemetry are off.

    .venv/bin/python bench/scale_sim.py [--sites 10,100,1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import benchutil as bu

ROWS_PER_SITE = 16
FRACTION_AT_1000 = 0.1
TASK = "breast_cancer_mlp"


# --------------------------------------------------------------------------------------------
# The apps (run inside the child process; the ClientApp is shipped to Ray actors by value)


def _build_apps(n_sites: int, rounds: int, fraction: float, timings: list[tuple[int, float]]):
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from export.tasks import build_model

    client = ClientApp()

    def partition(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        rng = np.random.default_rng(1000 + pid)
        idx = rng.choice(len(data.target), size=ROWS_PER_SITE, replace=False)
        x = torch.tensor(data.data[idx], dtype=torch.float32)
        y = torch.tensor(data.target[idx], dtype=torch.int64)
        return x, y

    def load(msg: Message, context: Context):
        torch.set_num_threads(1)
        model = build_model(TASK)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = partition(int(context.node_config["partition-id"]))
        return model, x, y

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model, x, y = load(msg, context)
        opt = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
        model.train()
        loss_sum = 0.0
        for i in range(0, len(y), 8):  # one local epoch, batch 8
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 8]), y[i:i + 8])
            loss.backward()
            opt.step()
            loss_sum += float(loss) * len(y[i:i + 8])
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss_sum / len(y), "num-examples": len(y)}),
        })
        return Message(content=content, reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, x, y = load(msg, context)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
        content = RecordDict({"metrics": MetricRecord(
            {"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        per_round = max(2, round(n_sites * fraction))
        strategy = FedAvg(fraction_train=fraction, fraction_evaluate=fraction,
                          min_train_nodes=per_round, min_evaluate_nodes=per_round,
                          min_available_nodes=n_sites)

        def mark(server_round: int, arrays: ArrayRecord) -> None:
            # Strategy.start calls this before round 1 and after each round.
            timings.append((server_round, time.monotonic()))

        strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(TASK, seed=0)
                                                             .state_dict()),
                       num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}),
                       evaluate_fn=mark)

    return server, client


def run_one(n_sites: int, rounds: int, out: Path) -> None:
    """Child process: one simulation of ``n_sites`` sites; write its timings to ``out``."""
    import logging

    t0 = time.monotonic()
    from flwr.simulation import run_simulation

    fraction = FRACTION_AT_1000 if n_sites >= 1000 else 1.0
    timings: list[tuple[int, float]] = []
    server, client = _build_apps(n_sites, rounds, fraction, timings)
    t_import = time.monotonic() - t0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t1 = time.monotonic()
    run_simulation(
        server_app=server, client_app=client, num_supernodes=n_sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "log_to_driver": False,
                                      "include_dashboard": False}},
    )
    t_sim = time.monotonic() - t1
    round_s = [b - a for (_, a), (_, b) in itertools.pairwise(timings)]
    first_round_start = timings[0][1] - t1 if timings else None
    out.write_text(json.dumps({
        "sites": n_sites, "rounds": rounds, "fraction": fraction,
        "sites_per_round": max(2, round(n_sites * fraction)),
        "import_seconds": t_import, "run_simulation_seconds": t_sim,
        "startup_seconds": first_round_start, "round_seconds": round_s,
    }))


# --------------------------------------------------------------------------------------------
# The driver


def measure(n_sites: int, rounds: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedward-scale-") as tmp:
        out = Path(tmp) / "one.json"
        log = Path(tmp) / "child.log"
        env = dict(os.environ, **bu.QUIET_ENV, RAY_TMPDIR=tmp)
        t0 = time.monotonic()
        with open(log, "wb") as fh:
            # Own session: on a timeout the whole group (Ray's processes included) is killed
            # by the PID started here, nothing else.
            # `timeout` bounds the child's life even if this driver dies.
            child = subprocess.Popen(
                ["timeout", "-k", "5", str(int(timeout_s)), sys.executable, __file__,
                 "--one", str(n_sites), "--rounds", str(rounds), "--out", str(out)],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                cwd=bu.ROOT)
            with bu.PeakMemory(child.pid, interval_s=1.0) as mem:
                try:
                    rc = child.wait(timeout=timeout_s + 15)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, 9)
                    child.wait()
                    rc = "timeout"
                except BaseException:  # SIGTERM from run_all, Ctrl-C: stop what we started
                    os.killpg(child.pid, 9)
                    raise
        if rc == 124:
            rc = "timeout"
        wall = time.monotonic() - t0
        tail = log.read_text(errors="replace")[-3000:]
        result: dict = {"sites": n_sites, "exit": rc, "wall_seconds": wall,
                        "peak_rss_mib": mem.peak_rss_mib, "peak_pss_mib": mem.peak_pss_mib,
                        "peak_processes": mem.peak_processes}
        if rc == 0 and out.exists():
            result.update(json.loads(out.read_text()))
        else:
            result["error"] = tail
        # Sweep anything of the child's group still alive (Ray may leave workers briefly).
        try:
            os.killpg(child.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="10,100,1000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=150, help="seconds per site count")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one, args.rounds, args.out)
        return
    bu.exit_on_sigterm()

    try:
        import ray  # noqa: F401
    except ImportError as exc:
        msg = (f"Ray is not installed ({exc}); install flwr[simulation]==1.42.0 "
               "(pins ray==2.55.1)\n")
        bu.write_results("scale_sim", {"error": msg}, msg)
        sys.exit(1)

    results = []
    for n in [int(s) for s in args.sites.split(",")]:
        print(f"simulating {n} sites ...", flush=True)
        r = measure(n, args.rounds, args.timeout)
        results.append(r)
        print(f"  exit {r['exit']}, wall {r['wall_seconds']:.1f}s, rounds "
              f"{[round(s, 2) for s in r.get('round_seconds', [])]}, peak PSS "
              f"{r['peak_pss_mib']:.0f} MiB", flush=True)

    base = next((r for r in results if r.get("round_seconds")), None)
    rows = []
    for r in results:
        rs = r.get("round_seconds") or []
        if not rs:
            rows.append([r["sites"], "-", bu.fmt(r["wall_seconds"], 1), "-", "-", "-", "-",
                         "-", f"FAILED (exit {r['exit']})"])
            continue
        warm = bu.median(rs[1:]) if len(rs) > 1 else float("nan")
        r["warm_round_median_seconds"] = warm
        r["ms_per_site_message"] = 1000 * warm / (2 * r["sites_per_round"])
        base_warm = bu.median(base["round_seconds"][1:]) if base else float("nan")
        rows.append([
            r["sites"], r["sites_per_round"], bu.fmt(r["wall_seconds"], 1), bu.fmt(rs[0], 1),
            bu.fmt(warm), f"{warm / base_warm:.1f}x", bu.fmt(r["ms_per_site_message"], 1),
            f"{r['peak_pss_mib']:.0f} / {r['peak_rss_mib']:.0f}",
            f"{r['peak_pss_mib'] / base['peak_pss_mib']:.2f}x" if base else "-",
        ])
    md = (
        f"Flower {bu.machine()['flwr']} simulation engine (Ray {bu.machine()['ray']}), "
        f"breast-cancer MLP, {ROWS_PER_SITE} rows per site, train + evaluate per round, "
        f"{args.rounds} rounds, 1 repetition per site count (scaled down); 1000 sites sample "
        f"{FRACTION_AT_1000:.0%} per round. Round 1 is cold (Ray start, actors, imports); "
        "the warm figure is the median of rounds 2..n (with 2 rounds: round 2). Ratios are "
        "against the 10-site run of this invocation. Memory: peak over the whole process "
        "tree.\n\n"
        + bu.md_table(
            ["sites", "sites/round", "wall s (incl. Ray start)", "round 1 s (cold)",
             "warm s/round", "warm vs 10 sites", "ms per site message (warm)",
             "peak PSS / RSS MiB", "PSS vs 10 sites"],
            rows)
    )
    failed = [r for r in results if r["exit"] != 0]
    if failed:
        md += "\nFailed: " + "; ".join(
            f"{r['sites']} sites: exit {r['exit']}: ...{r.get('error', '')[-400:]}"
            for r in failed) + "\n"
    bu.write_results("scale_sim", {"rows_per_site": ROWS_PER_SITE,
                                   "fraction_at_1000": FRACTION_AT_1000,
                                   "rounds": args.rounds, "repetitions": 1,
                                   "results": results}, md)


if __name__ == "__main__":
    main()
