"""Benchmark 1: seconds per round, the appliance against a stock Flower deployment, per site count.

In ONE invocation, for each site count N (``--sites 2,4,8``), on 127.0.0.1 only:

* **appliance**: a real coordinator (``fedward-coordinator serve``: API, SuperLink with TLS
  and node authentication, the appliance's ServerApp) and N real site agents
  (``fedward-site start``: SuperNode, warm in-agent executor, warm DP trainer), each its
  own process tree, started with the test harness ``tests/federation.py`` exactly as the
  integration tests do; the breast-cancer MLP task on the non-IID split of
  ``fedward-site demo-data``; one DP run of R rounds (epsilon budget 3 per site, every site
  required in every round).
* **stock Flower**: a SuperLink (TLS, node authentication) and N SuperNodes with Flower's
  default settings, running ``bench/stock_flower`` (Flower's FedAvg strategy, separate train
  and evaluate messages, a ``flwr-clientapp`` process per message): same model
  (``fedward.tasks.build_model``), same CSV partitions (byte-identical files, checked by
  SHA-256), same local epochs, R rounds. No DP: plain SGD.

The two sides run one after the other, never at the same time; which goes first alternates
from one site count to the next. Every process has a bounded lifetime and is stopped by its
PID; the temporary folder is removed at the end. Torch uses one thread per process
(``OMP_NUM_THREADS=1``; the site agent's own default ``torch_threads`` is 1 as well).

Reported per N: median seconds per round over rounds 2..R (round 1 separately: on the
appliance it includes each site's noise-multiplier search, on both the first delivery of the
app), their ratio stock / appliance, and where the appliance's remaining time goes. The
breakdown joins three sources, all on this machine's clock:

* the coordinator's REST API: ``GET /runs/{id}/rounds`` (each round's start and its
  ``seconds``) and ``GET /runs/{id}/metrics`` (what the sites' replies carry, among them
  ``train-seconds``, the wall time of ``privacy.train_dp``);
* the ServerApp's log, which Flower keeps in the SuperLink's state database (``task_logs``):
  ``round N: reply from SITE after X s`` (X counted from just before ``push_messages``;
  the line is written once the reply and its arrays are pulled);
* each site agent's log: ``task train handled in X s`` (the warm trainer's whole task,
  written when it ends).

    .venv/bin/python bench/round_overhead.py                      # 2, 4 and 8 sites, 6 rounds
    .venv/bin/python bench/round_overhead.py --sites 2 --rounds 3  # a quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
# tests/federation.py: the harness that starts a real coordinator and real site agents.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import benchutil as bu  # also puts the repository root on sys.path
from stock_round_time import run_stock

import federation as harness

TASK = "breast_cancer_mlp"
_T = TypeVar("_T")
NAME = "round_overhead"
GOAL = 4.0
DELTA = 1e-5  # the runs' delta (the coordinator's default)
# One torch/BLAS thread in every process either side starts (inherited through the env).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

for _msg in ("Secure RNG turned off", "Optimal order is the largest alpha",
             "Using a non-full backward hook", "Full backward hook"):
    warnings.filterwarnings("ignore", message=f".*{_msg}.*")

_REPLY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) fedward\.coordinator\.rounds "
                    r"round (\d+): reply from (\S+) after ([\d.]+) s")
_DONE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) fedward\.coordinator\.rounds "
                   r"round (\d+) done in ([\d.]+) s")
_HTTPX = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) httpx HTTP Request: POST "
                    r"\S+/v1/runtime/([\w-]+) ")
_HANDLED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO fedward\.site\.trainer "
                      r"task (\w+) handled in ([\d.]+) s")

# The appliance's breakdown, in round order: (key, label, what it holds).
COMPONENTS: list[tuple[str, str, str]] = [
    ("pre_push", "coordinator before push",
     "round start -> the ServerApp pushes the round's messages: waiting until the run's "
     "sites are online (get-nodes), the round's database row, building the messages"),
    ("deliver", "delivery to site trainer",
     "push -> the slowest site's warm trainer starts the task: ServerApp push-messages and "
     "push-object to the SuperLink (TLS), the SuperNode's fetch (idle sleep capped at "
     "0.25 s), its object pulls, the warm executor's task poll (0.05 s) and pull of the "
     "task, the relay's decode and the Unix-socket hand-off to the trainer"),
    ("push", "of which ServerApp push",
     "push -> the ServerApp's push-messages and push-object requests for all the round's "
     "messages have returned (from its own HTTP log lines)"),
    ("site_work", "site work",
     "the slowest site's trainer, start to end of the task (`task train handled in`)"),
    ("dp_train", "of which DP training",
     "`train-seconds` in the reply: `privacy.train_dp` (Opacus set-up, DP-SGD local epochs, "
     "clean-up)"),
    ("site_other", "of which other site work",
     "site work minus DP training: policy and budget checks, privacy ledger writes and "
     "accounting, evaluation of the received model, egress check, audit log, stored reply; "
     "in round 1 also the noise-multiplier search"),
    ("ret", "return to ServerApp",
     "the slowest site's trainer ends -> the ServerApp holds its reply: socket reply, relay "
     "builds the Message, push to the SuperNode (its reply wait is capped at 0.25 s), "
     "SuperNode push-messages and push-object to the SuperLink, the ServerApp's 0.1 s pull "
     "loop, its object pulls and confirmation"),
    ("post", "coordinator after last reply",
     "last reply -> round recorded: validating the updates, per-site metric and "
     "fingerprint rows, FedAvg, the checkpoint (safetensors + SHA-256), the round's row"),
]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _log_epoch(stamp: str) -> float:
    """A Python logging ``asctime`` (local time) as seconds since the epoch."""
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _db_epoch(stamp: str) -> float:
    """An API timestamp (UTC, ISO 8601, ``Z`` or naive) as seconds since the epoch."""
    when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _med(values: list[float]) -> float:
    return bu.median(values) if values else float("nan")


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def code_version() -> dict[str, Any]:
    """Which appliance code ran: the commit and dirty flag (``benchutil.git_state``; every
    benchmark's ``provenance`` carries them too) and how many of the appliance's own files
    differ from the commit; ``FEDWARD_BENCH_CODE_NOTE`` adds a note (e.g. the commit a
    snapshot outside a checkout was taken from)."""
    info: dict[str, Any] = {"root": str(bu.ROOT),
                            "note": os.environ.get("FEDWARD_BENCH_CODE_NOTE"),
                            **bu.git_state()}
    try:
        dirty = subprocess.run(["git", "-C", str(bu.ROOT), "status", "--porcelain", "--",
                                "coordinator", "site_agent", "privacy", "export"],
                               capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return info
    info["git_head"] = info.get("commit_full")
    info["appliance_files_changed_since_head"] = len(dirty.stdout.splitlines())
    return info


def demo_data(out: Path, n_sites: int) -> dict[str, Any]:
    """The appliance's non-IID split for ``n_sites`` (``fedward-site demo-data``)."""
    res = subprocess.run([str(harness.BIN / "fedward-site"), "demo-data", "--out", str(out),
                          "--task", TASK, "--sites", str(n_sites)], capture_output=True,
                         text=True, timeout=180, check=True)
    data: dict[str, Any] = json.loads(res.stdout)
    return data


# ---------------------------------------------------------------------------------------------
# The appliance


def serverapp_log(superlink_db: Path) -> list[str]:
    """The ServerApp's log lines, which Flower 1.42 stores in the SuperLink's state
    database (table ``task_logs``; the same text ``flwr log`` prints). Read-only."""
    con = sqlite3.connect(f"file:{superlink_db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT log FROM task_logs ORDER BY timestamp").fetchall()
    finally:
        con.close()
    lines: list[str] = []
    for (chunk,) in rows:
        lines.extend(str(chunk).splitlines())
    return lines


def parse_serverapp(lines: list[str]) -> dict[int, dict[str, Any]]:
    """Per round: each site's reply (when the ServerApp had it, seconds after the push) and
    the round's end, from the ServerApp's log. Replies logged after ``round N done`` belong
    to the final evaluation and are left out."""
    rounds: dict[int, dict[str, Any]] = {}
    done: set[int] = set()
    requests: list[tuple[float, str]] = []
    rounds[0] = {"replies": {}, "requests": requests}
    for line in lines:
        m = _HTTPX.match(line)
        if m:
            requests.append((_log_epoch(m.group(1)), m.group(2)))
            continue
        m = _REPLY.match(line)
        if m:
            number = int(m.group(2))
            if number in done:
                continue  # the final evaluation after the last round
            rounds.setdefault(number, {"replies": {}})["replies"][m.group(3)] = {
                "at": _log_epoch(m.group(1)), "after_push_s": float(m.group(4))}
            continue
        m = _DONE.match(line)
        if m:
            number = int(m.group(2))
            done.add(number)
            rounds.setdefault(number, {"replies": {}})["done_at"] = _log_epoch(m.group(1))
    return rounds


def push_seconds(requests: list[tuple[float, str]], t_push: float) -> float:
    """From ``t_push`` until the ServerApp's push-messages / push-object requests that
    follow it have all returned (its log uploads, push-logs, run in another thread and are
    left out); NaN when its HTTP requests are not in the log."""
    end = None
    for t, endpoint in requests:
        if t < t_push - 0.05 or endpoint == "push-logs":
            continue
        if endpoint in ("push-messages", "push-object"):
            end = t
        elif end is not None:
            break
    return end - t_push if end is not None else float("nan")


def parse_site_log(path: Path) -> list[dict[str, float]]:
    """The warm trainer's train tasks, in order: when each ended and how long it took."""
    out: list[dict[str, float]] = []
    for line in path.read_text(errors="replace").splitlines():
        m = _HANDLED.match(line)
        if m and m.group(2) == "train":
            end = _log_epoch(m.group(1))
            secs = float(m.group(3))
            out.append({"start": end - secs, "end": end, "seconds": secs})
    return out


def breakdown(rounds_api: list[dict[str, Any]], metrics_api: dict[str, Any],
              server: dict[int, dict[str, Any]],
              site_tasks: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Where each round's time went, on the critical path (the site whose reply came last).

    ``pre_push + deliver + site_work + ret`` are measured from independent timestamps;
    ``post`` is the rest of the round's recorded ``seconds`` after the last reply.
    """
    metrics = {int(r["round"]): r["sites"] for r in metrics_api.get("rounds", [])}
    out: list[dict[str, Any]] = []
    for row in rounds_api:
        number = int(row["number"])
        rec: dict[str, Any] = {"round": number, "status": row["status"],
                               "seconds": row["seconds"],
                               "participating": len(row["participating_sites"])}
        replies = server.get(number, {}).get("replies", {})
        if row["status"] != "completed" or row["seconds"] is None or not replies:
            rec["complete"] = False
            out.append(rec)
            continue
        started = _db_epoch(row["started_at"])
        t_push = _med([r["at"] - r["after_push_s"] for r in replies.values()])
        requests = server.get(0, {}).get("requests", [])
        per_site: dict[str, dict[str, float]] = {}
        for site, reply in replies.items():
            tasks = site_tasks.get(site, [])
            if len(tasks) < number:
                continue
            task = tasks[number - 1]  # the k-th train task of a fresh site is round k
            train_s = float(metrics.get(number, {}).get(site, {}).get("train-seconds",
                                                                       float("nan")))
            per_site[site] = {
                "deliver": task["start"] - t_push,
                "site_work": task["seconds"],
                "dp_train": train_s,
                "site_other": task["seconds"] - train_s,
                "ret": reply["at"] - task["end"],
                "reply_after_push": reply["after_push_s"],
            }
        last = max(replies, key=lambda s: replies[s]["at"])
        first = min(replies, key=lambda s: replies[s]["at"])
        rec.update({
            "complete": last in per_site and len(per_site) == len(replies),
            "critical_site": last,
            "pre_push": t_push - started,
            "push": push_seconds(requests, t_push),
            "post": float(row["seconds"]) - (replies[last]["at"] - started),
            "reply_spread": replies[last]["at"] - replies[first]["at"],
            "sites": per_site,
        })
        if last in per_site:
            rec.update({k: per_site[last][k] for k in
                        ("deliver", "site_work", "dp_train", "site_other", "ret")})
        for k in ("deliver", "site_work", "dp_train", "ret"):
            vals = [v[k] for v in per_site.values()]
            rec[f"mean_{k}"] = sum(vals) / len(vals) if vals else float("nan")
        out.append(rec)
    return out


def wait_run(fed: harness.Federation, run_id: int, *, stall_s: float,
             timeout: float) -> dict[str, Any]:
    """Poll the run once a second until it ends; give up when no round has started or
    finished for ``stall_s`` (e.g. a ServerApp that died), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_change, last_state = time.monotonic(), None
    while True:
        run: dict[str, Any] = fed.api("GET", f"/runs/{run_id}").json()
        if run["status"] in ("completed", "failed", "stopped"):
            return run
        state = (run.get("rounds_completed"), run.get("rounds_failed"),
                 run.get("current_round"), run["status"])
        now = time.monotonic()
        if state != last_state:
            last_change, last_state = now, state
        if now - last_change > stall_s:
            raise TimeoutError(f"run {run_id} made no progress for {stall_s:.0f} s "
                               f"(status {run['status']}, state {state})")
        if now > deadline:
            raise TimeoutError(f"run {run_id} did not end within {timeout:.0f} s")
        if fed.coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited ({fed.coordinator.returncode})")
        time.sleep(1.0)


def enroll_site(fed: harness.Federation, site: dict[str, Any]) -> None:
    """Enroll one site as hospital IT does (``enroll-token`` on the coordinator, then
    ``fedward-site enroll`` through the gateway): its agent then reaches the coordinator
    through its local tunnel and the gateway, with mutual TLS."""
    out = fed.coord_cli("enroll-token", site["name"], "--json")
    token = json.loads(out.stdout)["token"]
    root = fed.work / "sites" / site["name"]
    harness.run_cli([str(harness.BIN / "fedward-site"), "enroll", "--dir", str(root),
                     "--gateway", fed.fleet, "--token", token, "--data", site["csv"],
                     "--schema", site["schema"], "--project", "test"], timeout=180)
    fed.sites[site["name"]] = harness.Site(name=site["name"], root=root)


def run_appliance(*, n_sites: int, rounds: int, local_epochs: int, epsilon: float,
                  deadline_s: float, work: Path, enrolled: bool = False,
                  probe: Callable[[harness.Federation], dict[str, Any]] | None = None,
                  sampler: Any = None, extra_lifetime_s: float = 0.0) -> dict[str, Any]:
    """One DP run of the appliance with ``n_sites`` site agents; its figures.

    ``enrolled``: the sites enroll through the gateway and train through their tunnels (the
    production route) instead of dialling the SuperLink's socket (the lab route).
    ``probe`` is called once every site is online; what it returns goes under ``probe``.
    ``sampler`` (``prod_path.CpuSampler``) is started with the federation just before the
    launch and stopped when the run ends; what it returns goes under ``cpu_samples``.
    ``extra_lifetime_s`` lengthens every process's lifetime and the waits for the sites and
    the run (enrollment, and a machine loaded far beyond its cores, need it).
    """
    lifetime = 300 + 30 * n_sites + rounds * 60 * max(1, n_sites // 2) + int(extra_lifetime_s)
    harness.LIFETIME_S = lifetime  # every process the harness starts dies by then
    res: dict[str, Any] = {"sites": n_sites, "rounds": rounds, "local_epochs": local_epochs,
                           "epsilon": epsilon, "dp": True, "loadavg_before": _loadavg()}
    t_all = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    with harness.federation(work, n_sites=n_sites, task=TASK) as fed:
        t0 = time.monotonic()
        if enrolled:
            # One enrollment after another took about a minute each on the loaded 2-core
            # machine; they are independent, and not what is measured.
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda s: enroll_site(fed, s), fed.data["sites"]))
        else:
            for s in fed.data["sites"]:
                fed.add_site(s["name"], s["csv"], s["schema"])
        for s in fed.data["sites"]:
            fed.start_site(s["name"])
        fed.wait_online(n_sites, timeout=60 + 20 * n_sites + extra_lifetime_s / 2)
        res["sites_online_seconds"] = time.monotonic() - t0
        if probe is not None:
            res["probe"] = probe(fed)
        res["data_sha256"] = {s["name"]: _sha256(Path(s["csv"])) for s in fed.data["sites"]}
        t0 = time.monotonic()
        if sampler is not None:
            sampler.start(fed)
        try:
            run_id = fed.launch(task=TASK, rounds=rounds, local_epochs=local_epochs,
                                epsilon=epsilon, delta=DELTA, min_sites=n_sites,
                                round_deadline_s=deadline_s)
            run = wait_run(fed, run_id, stall_s=deadline_s + 60,
                           timeout=max(60.0, lifetime - (time.monotonic() - t_all) - 30))
        finally:
            if sampler is not None:
                res["cpu_samples"] = sampler.stop()
        res["run_wall_seconds"] = time.monotonic() - t0
        res["run_status"] = run["status"]
        res["failure_reason"] = run.get("failure_reason")
        rounds_api = fed.api("GET", f"/runs/{run_id}/rounds").json()
        metrics_api = fed.api("GET", f"/runs/{run_id}/metrics").json()
        site_logs = {name: site.log for name, site in fed.sites.items()}
        superlink_db = fed.home / "superlink" / "superlink-state.db"
    # Every process has stopped: the logs and the SuperLink's database are complete.
    res["loadavg_after"] = _loadavg()
    res["wall_seconds"] = time.monotonic() - t_all
    res["rounds_api"] = rounds_api
    res["metrics_api"] = metrics_api
    if run["status"] != "completed":
        raise RuntimeError(f"appliance run {run['status']}: {run.get('failure_reason')}")
    server = parse_serverapp(serverapp_log(superlink_db))
    site_tasks = {name: parse_site_log(log) for name, log in site_logs.items() if log}
    res["breakdown"] = breakdown(rounds_api, metrics_api, server, site_tasks)
    res["round_seconds"] = [float(r["seconds"]) for r in rounds_api]
    res["participating"] = [len(r["participating_sites"]) for r in rounds_api]
    if any(p != n_sites for p in res["participating"]):
        raise RuntimeError(f"not every site took part in every round: {res['participating']}")
    return res


# ---------------------------------------------------------------------------------------------
# What DP costs the appliance's training, measured in this process


def dp_cost(data: dict[str, Any], metrics_api: dict[str, Any], *, local_epochs: int,
            reps: int) -> dict[str, Any]:
    """Per site: ``train_dp`` (the site's noise multiplier from the run) against
    ``train_plain`` on the site's own training rows (the site agent's split), same local
    epochs, batch and lr; median of ``reps``, interleaved; one torch thread.

    Also the privacy accounting a round costs the site: its ledger charges each round
    before training with the composed epsilon of the run's recorded mechanisms up to and
    including that round (dp-accounting's PLD, ``privacy.accounting``). Timed here for
    round 2 from cold caches (in the appliance it is usually computed in the background
    while the site waits for the round).
    """
    import torch

    from fedward.tasks import build_model, get_task
    from privacy import (
        DpSgd,
        compose_mechanisms,
        expected_steps,
        sample_rate_for,
        train_dp,
        train_plain,
    )
    from privacy.accounting import clear_caches
    from site_agent.data import load_site_data
    from site_agent.data_schema import DataSchema

    torch.set_num_threads(1)
    spec = get_task(TASK)
    schema = DataSchema.for_task(TASK)
    sigmas = {}
    for rnd in metrics_api.get("rounds", []):
        for site, vals in rnd["sites"].items():
            if "noise-multiplier" in vals:
                sigmas[site] = float(vals["noise-multiplier"])
    out: dict[str, Any] = {}
    for s in data["sites"]:
        d = load_site_data(csv_path=Path(s["csv"]), schema=schema)
        sigma = sigmas.get(s["name"], 1.0)
        dp_s: list[float] = []
        plain_s: list[float] = []
        acct_s: list[float] = []
        q = sample_rate_for(n_examples=len(d.train_y), batch_size=spec.default_batch_size)
        steps = expected_steps(n_examples=len(d.train_y), batch_size=spec.default_batch_size,
                               epochs=local_epochs)
        for rep in range(reps):
            clear_caches()
            t = time.perf_counter()
            compose_mechanisms([DpSgd(sigma, q, steps)] * 2, delta=DELTA)
            acct_s.append(time.perf_counter() - t)
            r = train_dp(model=build_model(TASK, seed=0), features=d.train_x,
                         labels=d.train_y, noise_multiplier=sigma, max_grad_norm=1.0,
                         batch_size=spec.default_batch_size, epochs=local_epochs,
                         lr=spec.default_lr, seed=rep)
            dp_s.append(r.seconds)
            p = train_plain(model=build_model(TASK, seed=0), features=d.train_x,
                            labels=d.train_y, batch_size=spec.default_batch_size,
                            epochs=local_epochs, lr=spec.default_lr, seed=rep)
            plain_s.append(p.seconds)
        out[s["name"]] = {"train_rows": len(d.train_y), "noise_multiplier": sigma,
                          "dp_seconds": dp_s, "plain_seconds": plain_s,
                          "dp_median_s": _med(dp_s), "plain_median_s": _med(plain_s),
                          "accounting_seconds": acct_s, "accounting_median_s": _med(acct_s)}
    return out


# ---------------------------------------------------------------------------------------------
# Summaries and the report


def _after_round1(values: list[_T]) -> list[_T]:
    return values[1:] if len(values) > 1 else values


def summarize(n: int, app_runs: list[dict[str, Any]], stock_runs: list[dict[str, Any]],
              dp: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds 2..R of every repetition, round 1 separately, the ratio."""
    app_rounds = [x for r in app_runs for x in _after_round1(r["round_seconds"])]
    stock_rounds = [x for r in stock_runs for x in _after_round1(r["round_seconds"])]
    app_r1 = [r["round_seconds"][0] for r in app_runs]
    stock_r1 = [r["round_seconds"][0] for r in stock_runs]
    a_med, s_med = _med(app_rounds), _med(stock_rounds)
    warm = [b for r in app_runs for b in r["breakdown"][1:] if b.get("complete")]
    first = [r["breakdown"][0] for r in app_runs if r["breakdown"][0].get("complete")]
    keys = [k for k, _, _ in COMPONENTS] + ["reply_spread", "mean_deliver", "mean_site_work",
                                           "mean_dp_train", "mean_ret"]
    bd = {k: _med([b[k] for b in warm]) for k in keys}
    bd["rounds_used"] = len(warm)
    bd["seconds"] = _med([float(b["seconds"]) for b in warm])
    bd_r1 = {k: _med([b[k] for b in first]) for k in keys}
    bd_r1["seconds"] = _med([float(b["seconds"]) for b in first])
    stock_phase: dict[str, list[float]] = {"train": [], "evaluate": [], "rest": []}
    for r in stock_runs:
        for d in _after_round1(r["rounds_detail"]):
            off = d["phase_offsets_s"]
            tr = off["aggregate_train"] - off["configure_train"]
            ev = off["aggregate_evaluate"] - off["configure_evaluate"]
            stock_phase["train"].append(tr)
            stock_phase["evaluate"].append(ev)
            stock_phase["rest"].append(d["seconds"] - tr - ev)
    dp_extra = {s: v["dp_median_s"] - v["plain_median_s"] for s, v in dp.items()}
    return {
        "sites": n,
        "appliance_round_seconds_after_round1": app_rounds,
        "stock_round_seconds_after_round1": stock_rounds,
        "appliance_median_s": a_med,
        "stock_median_s": s_med,
        "ratio_stock_over_appliance": s_med / a_med if a_med else float("nan"),
        "goal_met": bool(a_med and s_med / a_med >= GOAL),
        "appliance_round1_s": _med(app_r1),
        "stock_round1_s": _med(stock_r1),
        "appliance_min_max_s": [min(app_rounds), max(app_rounds)] if app_rounds else None,
        "stock_min_max_s": [min(stock_rounds), max(stock_rounds)] if stock_rounds else None,
        "appliance_breakdown_median": bd,
        "appliance_breakdown_round1": bd_r1,
        "stock_phases_median": {k: _med(v) for k, v in stock_phase.items()},
        "dp_cost_in_process": dp,
        "dp_extra_max_over_sites_s": max(dp_extra.values()) if dp_extra else float("nan"),
        "accounting_max_over_sites_s": max(
            (v["accounting_median_s"] for v in dp.values()), default=float("nan")),
        "dp_train_in_run_max_over_sites_median_s": _med(
            [max(v["dp_train"] for v in b["sites"].values()) for b in warm if b["sites"]]),
    }


def _dp_share(s: dict[str, Any]) -> float:
    """DP's training extra plus its accounting, in % of the appliance's median round."""
    extra = s["dp_extra_max_over_sites_s"] + s["accounting_max_over_sites_s"]
    return float(100 * extra / s["appliance_median_s"])


def report(summaries: list[dict[str, Any]], *, rounds: int, repeats: int, local_epochs: int,
           epsilon: float, wall_s: float) -> str:
    f = bu.fmt
    head = (
        f"Breast-cancer MLP, `fedward-site demo-data` non-IID split (the same CSV files on "
        f"both sides), {local_epochs} local epochs, {rounds} rounds per run x {repeats} "
        f"run(s) per side and site count; medians over rounds 2..{rounds} (round 1 "
        "separately). Both sides in this one invocation, on this machine, one after the "
        "other, order alternating per site count; TLS and node authentication on for both; "
        f"one torch thread per process. Appliance: DP-SGD (epsilon budget {epsilon:g} per "
        f"site, delta {DELTA:g}, clip 1.0). Stock Flower: **no DP** (plain SGD), Flower's "
        f"default settings. Goal: stock / appliance >= {GOAL:g}x. Whole invocation: "
        f"{wall_s / 60:.1f} min.\n\n"
    )
    t1 = bu.md_table(
        ["sites", "appliance s/round (DP on)", "stock Flower s/round (DP off)",
         "ratio stock / appliance", f"goal >= {GOAL:g}x", "appliance round 1",
         "stock round 1", "appliance min-max", "stock min-max"],
        [[s["sites"], f(s["appliance_median_s"]), f(s["stock_median_s"]),
          f"{f(s['ratio_stock_over_appliance'])}x",
          "met" if s["goal_met"] else "**not met**",
          f(s["appliance_round1_s"]), f(s["stock_round1_s"]),
          "-".join(f(x) for x in s["appliance_min_max_s"] or []),
          "-".join(f(x) for x in s["stock_min_max_s"] or [])] for s in summaries])
    labels = [lab for _, lab, _ in COMPONENTS]
    rows = []
    for s in summaries:
        for tag, bd in (("2..R", s["appliance_breakdown_median"]),
                        ("1", s["appliance_breakdown_round1"])):
            rows.append([s["sites"], tag, f(bd["seconds"]),
                         *[f(bd[k]) for k, _, _ in COMPONENTS], f(bd["reply_spread"])])
    t2 = bu.md_table(["sites", "round", "round s", *labels, "first to last reply"], rows)
    t3 = bu.md_table(
        ["sites", "delivery (mean over sites)", "site work (mean)", "DP training (mean)",
         "return (mean)"],
        [[s["sites"], *[f(s["appliance_breakdown_median"][k]) for k in
                        ("mean_deliver", "mean_site_work", "mean_dp_train", "mean_ret")]]
         for s in summaries])
    t4 = bu.md_table(
        ["sites", "DP training in the run, slowest site", "`train_dp`", "`train_plain`",
         "DP training extra", "PLD accounting of a round",
         "DP extra + accounting, share of the appliance's round"],
        [[s["sites"], f(s["dp_train_in_run_max_over_sites_median_s"], 3),
          f(max(v["dp_median_s"] for v in s["dp_cost_in_process"].values()), 3),
          f(max(v["plain_median_s"] for v in s["dp_cost_in_process"].values()), 3),
          f(s["dp_extra_max_over_sites_s"], 3), f(s["accounting_max_over_sites_s"], 3),
          f"{_dp_share(s):.1f}%"]
         for s in summaries])
    t5 = bu.md_table(
        ["sites", "stock round s", "train phase", "evaluate phase", "rest"],
        [[s["sites"], f(s["stock_median_s"]),
          *[f(s["stock_phases_median"][k]) for k in ("train", "evaluate", "rest")]]
         for s in summaries])
    legend = "\n".join(f"- **{lab}**: {what}." for _, lab, what in COMPONENTS)
    return (
        head + t1
        + "\nWhere the appliance's round goes (seconds, median per component over the "
        "rounds; critical path = the site whose reply reached the ServerApp last; the "
        "components of one round add up to its seconds, medians need not):\n\n" + t2
        + "\n" + legend + "\n- **first to last reply**: how long the ServerApp waited "
        "between the first and the last site's reply.\n\n"
        "The same components averaged over all sites of a round (median over rounds "
        "2..R):\n\n" + t3
        + "\nDP's cost to the appliance (the stock app trains without DP, so the ratio above "
        "is measured with the appliance doing more work): DP training in the run is "
        "`train-seconds` of the slowest site's reply (median over rounds 2..R); the other "
        "columns are timed in this process after the runs, one thread, nothing else of this "
        "benchmark running, median of the repetitions, max over the sites: "
        "`privacy.train_dp` against `train_plain` on each site's own training rows (the "
        "site agent's split), same epochs, batch and lr; and the composed PLD epsilon "
        "that the site's ledger computes before each round, from cold caches (its budget "
        "check; part of "
        "'other site work' above):\n\n" + t4
        + "\nStock Flower's round (median over rounds 2..R; train phase = "
        "`configure_train` to `aggregate_train`, i.e. one train message per site and its "
        "reply; evaluate phase likewise):\n\n" + t5
    )


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--sites", default="2,4,8", help="site counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (>= 2)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per side and site count (rounds 2..R of all are pooled)")
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--round-deadline", type=float, default=240.0,
                    help="the appliance run's round deadline, seconds")
    ap.add_argument("--dp-reps", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = ap.parse_args()
    site_counts = [int(x) for x in args.sites.split(",") if x.strip()]
    if not site_counts or min(site_counts) < 2 or args.rounds < 2 or args.repeats < 1:
        ap.error("--sites must list counts >= 2, --rounds must be >= 2, --repeats >= 1")
    bu.exit_on_sigterm()
    os.environ.update(THREAD_ENV)
    # Only the loopback coordinator the harness starts: never a configured database.
    os.environ.pop("FEDWARD_DATABASE_URL", None)

    bu.mark_start()  # the provenance's start load average and clock
    t_start = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = Path(tempfile.mkdtemp(prefix="fedward-bench1-"))
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {"appliance": [], "stock": []} for n in site_counts}
    data_by_n: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    try:
        order_i = 0
        for rep in range(args.repeats):
            for n in site_counts:
                base = tmp / f"n{n}-r{rep}"
                base.mkdir(parents=True)
                data = demo_data(base / "data", n)
                data_by_n.setdefault(n, data)
                sides = ["appliance", "stock"] if order_i % 2 == 0 else ["stock", "appliance"]
                order_i += 1
                for side in sides:
                    print(f"--- {n} sites, run {rep + 1}/{args.repeats}: {side}", flush=True)
                    t = time.monotonic()
                    try:
                        if side == "appliance":
                            r = run_appliance(n_sites=n, rounds=args.rounds,
                                              local_epochs=args.local_epochs,
                                              epsilon=args.epsilon,
                                              deadline_s=args.round_deadline,
                                              work=base / "appliance")
                            stock_sha = {s["name"]: _sha256(Path(s["csv"]))
                                         for s in data["sites"]}
                            r["same_data_as_stock"] = r["data_sha256"] == stock_sha
                            if not r["same_data_as_stock"]:
                                raise RuntimeError("the appliance's partitions differ from "
                                                   "the stock run's")
                        else:
                            lb = _loadavg()
                            (base / "stock").mkdir()
                            r = run_stock(sites=n, rounds=args.rounds, tmp=base / "stock",
                                          data_paths=[Path(s["csv"]) for s in data["sites"]],
                                          local_epochs=args.local_epochs,
                                          env_extra=THREAD_ENV)
                            r.update(loadavg_before=lb, loadavg_after=_loadavg(), dp=False)
                    except Exception as exc:
                        msg = f"{n} sites, {side}: {type(exc).__name__}: {exc}"
                        print(msg, file=sys.stderr, flush=True)
                        errors.append(msg[:2000])
                        continue
                    r["order"] = sides.index(side) + 1
                    runs[n][side].append(r)
                    print(f"    rounds {[round(x, 2) for x in r['round_seconds']]} "
                          f"({time.monotonic() - t:.0f} s)", flush=True)
                if not args.keep:
                    shutil.rmtree(base / "appliance", ignore_errors=True)
                    shutil.rmtree(base / "stock", ignore_errors=True)
        summaries = []
        dp_by_n = {}
        for n in site_counts:
            if not runs[n]["appliance"] or not runs[n]["stock"]:
                continue
            print(f"--- {n} sites: DP training cost, in process", flush=True)
            dp_by_n[n] = dp_cost(data_by_n[n], runs[n]["appliance"][0]["metrics_api"],
                                 local_epochs=args.local_epochs, reps=args.dp_reps)
            summaries.append(summarize(n, runs[n]["appliance"], runs[n]["stock"], dp_by_n[n]))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    wall = time.monotonic() - t_start
    md = report(summaries, rounds=args.rounds, repeats=args.repeats,
                local_epochs=args.local_epochs, epsilon=args.epsilon, wall_s=wall)
    if errors:
        md += "\nFailed: " + "; ".join(e.splitlines()[0] for e in errors) + "\n"
    bu.write_results(NAME, {
        "started_at": started_at,
        "code": code_version(),
        "wall_seconds": wall,
        "settings": {"sites": site_counts, "rounds": args.rounds, "repeats": args.repeats,
                     "local_epochs": args.local_epochs, "epsilon": args.epsilon,
                     "round_deadline_s": args.round_deadline, "task": TASK,
                     "thread_env": THREAD_ENV, "goal_ratio": GOAL},
        "components": {k: {"label": lab, "means": what} for k, lab, what in COMPONENTS},
        "summaries": summaries,
        "runs": {str(n): v for n, v in runs.items()},
        "errors": errors,
    }, md)
    return 1 if errors or len(summaries) != len(site_counts) else 0


if __name__ == "__main__":
    sys.exit(main())
