"""Benchmark 2: how a round's cost grows with sites, on Flower's simulation engine (Ray).

A stock ``ServerApp`` (Flower's ``FedAvg``) and a ``ClientApp`` that trains the appliance's
breast-cancer MLP (``fedward.tasks``) for one local epoch on a tiny partition (16 rows drawn
per site from the Breast Cancer Wisconsin data, scikit-learn, nothing downloaded), run with
``flwr.simulation.run_simulation``. Cases (``--sites``, each ``N`` or ``N@fraction``):

* ``10``, ``100``, ``1000``: every site trains and evaluates every round.
* ``1000@0.1``: 10% of the 1000 sites (100) are sampled per round for training and for
  evaluation, so it does the same work per round as ``100`` and differs only in how many
  sites the engine knows about.

Each case runs in its own child process (a fresh Ray instance), whose whole process tree
(driver, Ray's GCS, raylet, workers, actors) is sampled every second from /proc for peak
memory: the sum of RSS (counts shared pages once per process, so it overstates) and of PSS
(shared pages split among their users). Reported per case: wall time of the child (Ray
start included), round 1 (cold: includes creating the Ray actors and their imports), the
MEDIAN of rounds 2..R (warm; R = ``--rounds``, 4 by default, so a median of 3 warm rounds)
with their min and max, and the ratios to the 10-site case of the same invocation.

One repetition per case (each is its own Ray start); the repetitions are the warm rounds.
Ray workers get ``num_cpus=1`` per ClientApp (2 actors on 2 cores). Ray's usage statistics
and Flower's telemetry are off. About 6 minutes on 2 cores, most of it the 1000-site case
where all sites take part. Needs Ray: ``pip install -e ".[bench]"`` (``make bench`` does it).

    .venv/bin/python bench/scale_sim.py [--sites 10,100,1000@0.1,1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import benchutil as bu

ROWS_PER_SITE = 16
TASK = "breast_cancer_mlp"
DEFAULT_CASES = "10,100,1000@0.1,1000"


def parse_cases(spec: str) -> list[tuple[int, float]]:
    """``"10,1000@0.1"`` -> ``[(10, 1.0), (1000, 0.1)]``: sites and the fraction per round."""
    cases = []
    for item in spec.split(","):
        n, _, frac = item.strip().partition("@")
        cases.append((int(n), float(frac) if frac else 1.0))
    return cases


def sites_per_round(n_sites: int, fraction: float) -> int:
    return n_sites if fraction >= 1.0 else max(2, round(n_sites * fraction))


# --------------------------------------------------------------------------------------------
# The apps (run inside the child process; the ClientApp is shipped to Ray actors by value)


def _build_apps(n_sites: int, rounds: int, fraction: float,
                on_round: Callable[[int, float], None]):
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fedward.tasks import build_model

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
        per_round = sites_per_round(n_sites, fraction)
        strategy = FedAvg(fraction_train=fraction, fraction_evaluate=fraction,
                          min_train_nodes=per_round, min_evaluate_nodes=per_round,
                          min_available_nodes=n_sites)

        def mark(server_round: int, arrays: ArrayRecord) -> None:
            # Strategy.start calls this before round 1 and after each round.
            on_round(server_round, time.monotonic())

        strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(TASK, seed=0)
                                                             .state_dict()),
                       num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}),
                       evaluate_fn=mark)

    return server, client


def run_one(n_sites: int, fraction: float, rounds: int, out: Path) -> None:
    """Child process: one simulation of ``n_sites`` sites; write its timings to ``out``."""
    import logging

    t0 = time.monotonic()
    from flwr.simulation import run_simulation

    timings: list[tuple[int, float]] = []
    t1 = float("nan")

    def write(done: bool) -> None:
        # Written after every round too: a case stopped at its time limit still reports
        # the rounds it completed.
        out.write_text(json.dumps({
            "sites": n_sites, "rounds": rounds, "fraction": fraction,
            "sites_per_round": sites_per_round(n_sites, fraction), "completed": done,
            "import_seconds": t_import,
            "run_simulation_seconds": time.monotonic() - t1 if done else None,
            "startup_seconds": timings[0][1] - t1 if timings else None,
            "round_seconds": [b - a for (_, a), (_, b) in itertools.pairwise(timings)],
        }))

    def on_round(server_round: int, now: float) -> None:
        timings.append((server_round, now))
        write(done=False)

    server, client = _build_apps(n_sites, rounds, fraction, on_round)
    t_import = time.monotonic() - t0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t1 = time.monotonic()
    run_simulation(
        server_app=server, client_app=client, num_supernodes=n_sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "log_to_driver": False,
                                      "include_dashboard": False}},
    )
    write(done=True)


# --------------------------------------------------------------------------------------------
# The driver


def measure(n_sites: int, fraction: float, rounds: int, timeout_s: float) -> dict:
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
                 "--one", str(n_sites), "--fraction", str(fraction), "--rounds",
                 str(rounds), "--out", str(out)],
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
        result: dict = {"sites": n_sites, "fraction": fraction,
                        "sites_per_round": sites_per_round(n_sites, fraction),
                        "timeout_seconds": timeout_s, "exit": rc, "wall_seconds": wall,
                        "peak_rss_mib": mem.peak_rss_mib, "peak_pss_mib": mem.peak_pss_mib,
                        "peak_processes": mem.peak_processes}
        if out.exists():  # complete, or the rounds done before a failure or time limit
            result.update(json.loads(out.read_text()))
        if rc != 0:
            result["error"] = tail
        # Sweep anything of the child's group still alive (Ray may leave workers briefly).
        try:
            os.killpg(child.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        return result


def case_timeout(n_sites: int, fraction: float, rounds: int, scale: float) -> float:
    """Seconds allowed for one case: Ray's start plus about 0.1 s per site message and
    round (4x the 25 ms measured on 2 cores), times ``scale``."""
    messages = 2 * sites_per_round(n_sites, fraction) * rounds
    return scale * (120 + 0.1 * messages + 0.01 * n_sites)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default=DEFAULT_CASES,
                    help="cases, comma-separated, each N (all sites every round) or "
                         "N@fraction (that share sampled per round)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds per case, >= 2 (round 1 is cold; the median is over rounds 2..R)")
    ap.add_argument("--timeout-scale", type=float, default=1.0,
                    help="multiply every case's time limit (see case_timeout)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one, args.fraction, args.rounds, args.out)
        return
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is cold and left out of the median)")
    bu.exit_on_sigterm()

    try:
        import ray  # noqa: F401
    except ImportError as exc:
        msg = (f"Ray is not installed ({exc}); install the bench extra: "
               '`.venv/bin/pip install -e ".[bench]"` (flwr[simulation]==1.42.0, which pins '
               "ray==2.55.1)\n")
        bu.write_results("scale_sim", {"error": msg}, msg)
        sys.exit(1)

    results = []
    for n, fraction in parse_cases(args.sites):
        limit = case_timeout(n, fraction, args.rounds, args.timeout_scale)
        print(f"simulating {n} sites, {sites_per_round(n, fraction)} per round "
              f"(limit {limit:.0f} s) ...", flush=True)
        r = measure(n, fraction, args.rounds, limit)
        results.append(r)
        print(f"  exit {r['exit']}, wall {r['wall_seconds']:.1f}s, rounds "
              f"{[round(s, 2) for s in r.get('round_seconds', [])]}, peak PSS "
              f"{r['peak_pss_mib']:.0f} MiB", flush=True)

    base = next((r for r in results if len(r.get("round_seconds") or []) > 1), None)
    base_warm = bu.median(base["round_seconds"][1:]) if base else float("nan")
    rows = []
    for r in results:
        rs = r.get("round_seconds") or []
        why = "timed out" if r["exit"] == "timeout" else f"exit {r['exit']}"
        status = ("ok" if r["exit"] == 0 else
                  f"FAILED: {why} after {r['wall_seconds']:.0f} s (limit "
                  f"{r['timeout_seconds']:.0f} s), {len(rs)} of {args.rounds} rounds done")
        if not rs:
            rows.append([r["sites"], r["sites_per_round"], bu.fmt(r["wall_seconds"], 1), "-",
                         "-", "-", "-", "-",
                         f"{r['peak_pss_mib']:.0f} / {r['peak_rss_mib']:.0f}", "-", status])
            continue
        warm_rounds = rs[1:]
        warm = bu.median(warm_rounds) if warm_rounds else float("nan")
        r["warm_round_median_seconds"] = warm
        r["warm_rounds"] = len(warm_rounds)
        r["ms_per_site_message"] = 1000 * warm / (2 * r["sites_per_round"])
        rows.append([
            r["sites"], r["sites_per_round"], bu.fmt(r["wall_seconds"], 1), bu.fmt(rs[0], 1),
            bu.fmt(warm),
            f"{bu.fmt(min(warm_rounds))}-{bu.fmt(max(warm_rounds))}" if warm_rounds else "-",
            f"{warm / base_warm:.1f}x" if warm_rounds else "-",
            bu.fmt(r["ms_per_site_message"], 1),
            f"{r['peak_pss_mib']:.0f} / {r['peak_rss_mib']:.0f}",
            f"{r['peak_pss_mib'] / base['peak_pss_mib']:.2f}x" if base else "-",
            status,
        ])
    m = bu.machine()
    md = (
        f"Flower {m['flwr']} simulation engine (Ray {m['ray']}), breast-cancer MLP, "
        f"{ROWS_PER_SITE} rows per site, one train and one evaluate message per site taking "
        f"part per round, {args.rounds} rounds per case, 1 run per case (its own Ray start), "
        "2 Ray actors of 1 CPU. Round 1 is cold (Ray start, actors, imports); warm s/round "
        f"is the median of rounds 2..{args.rounds} ({args.rounds - 1} rounds), min-max beside "
        "it. Ratios are against the 10-site case of this invocation. Memory: peak over the "
        "whole process tree, sampled each second.\n\n"
        + bu.md_table(
            ["sites", "sites/round", "wall s (incl. Ray start)", "round 1 s (cold)",
             "warm s/round (median)", "warm min-max", "warm vs 10 sites",
             "ms per site message (warm)", "peak PSS / RSS MiB", "PSS vs 10 sites", "status"],
            rows)
    )
    failed = [r for r in results if r["exit"] != 0]
    if failed:
        md += "\nFailed: " + "; ".join(
            f"{r['sites']} sites ({r['sites_per_round']} per round): exit {r['exit']}: "
            f"...{r.get('error', '')[-400:]}" for r in failed) + "\n"
    bu.write_results("scale_sim", {"rows_per_site": ROWS_PER_SITE, "cases": args.sites,
                                   "rounds": args.rounds, "repetitions": 1,
                                   "warm_rounds_in_median": args.rounds - 1,
                                   "results": results}, md)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
