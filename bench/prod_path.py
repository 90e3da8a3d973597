"""Benchmark 1b: seconds per round on the production route, against stock Flower, per site count.

Benchmark 1 (``round_overhead.py``) lets the site agents dial the SuperLink's socket
directly (the lab route of ``make demo``). Production sites do not: hospital IT enrolls a
site with a one-time token (``fedward-coordinator enroll-token``, ``fedward-site enroll
--gateway``), and ``fedward-site start`` then sends every Flower request through the site's
local tunnel (a Unix socket, relayed into the SuperNode's network namespace) and over
mutual TLS to the coordinator's gateway, which checks the certificate against the Flower
node key of each request and streams it to the SuperLink through its Unix socket, inside
the coordinator's namespace. Both hosts run Flower in its default isolation (network and
PID namespaces, ``FEDWARD_FLOWER_ISOLATION`` unset).

In ONE invocation, for each site count N (``--sites 2,4,8``), on 127.0.0.1 only, one side
after the other (the order rotates from one site count to the next):

* **production**: a real coordinator and N site agents enrolled through the gateway and
  started as in production; the same DP run as benchmark 1 (breast-cancer MLP, the
  non-IID split of ``fedward-site demo-data``, 3 local epochs, epsilon 3 per site, every
  site in every round, R rounds). Before the run it checks that each agent says it reaches
  the gateway through its tunnel and that the SuperLink and every SuperNode run in a network
  namespace other than their parent's.
* **stock Flower**: benchmark 1's stock baseline (``stock_round_time.run_stock``: Flower's
  FedAvg app with Flower's defaults, TLS and node authentication, no DP), same model, same
  CSV files (checked by SHA-256), same epochs and rounds.
* **lab** (``--lab``): benchmark 1's appliance run on the lab route, for the cost of the
  tunnel and gateway on the same machine in the same invocation.

Reported per N: the median seconds per round over rounds 2..R, the ratio stock /
production (goal: at least 10x), round 1 and its ratio to the later rounds' median (goal:
at most 1.5x), and where the production round goes (benchmark 1's breakdown: delivery and
return include the tunnel, the gateway and the namespace relays). Results in
``bench/results/prod_path.json`` and ``.md``.

    .venv/bin/python bench/prod_path.py                       # 2, 4 and 8 sites, 6 rounds
    .venv/bin/python bench/prod_path.py --sites 2 --rounds 3   # a quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # also puts the repository root on sys.path
import round_overhead as r1
from stock_round_time import run_stock

import federation as harness  # tests/federation.py, on sys.path through round_overhead

NAME = "prod_path"
GOAL = 10.0         # stock Flower / production, seconds per round
ROUND1_GOAL = 1.5   # round 1 / the median of rounds 2..R, at most
SIDES = ("production", "stock", "lab")
ROUTE_LINE = "enrolled: the SuperNode reaches the gateway"
# Breakdown columns of the report (benchmark 1's components).
SHOWN = ("pre_push", "deliver", "site_work", "ret", "post")


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _isolated(root: int, needle: str) -> bool:
    """Whether the processes under ``root`` whose command line holds ``needle`` exist and
    all run in a network namespace other than ``root``'s."""
    from fedward.procs import descendants

    mine = _netns(root)
    found = [pid for pid in descendants(root) if needle in _cmdline(pid)]
    return bool(found) and all(_netns(pid) not in (None, mine) for pid in found)


def check_production(fed: harness.Federation) -> dict[str, Any]:
    """Evidence that the federation runs as in production; raises when it does not."""
    assert fed.coordinator.pid
    sites: dict[str, dict[str, bool]] = {}
    for name, site in fed.sites.items():
        assert site.proc is not None and site.log is not None
        log = site.log.read_text(errors="replace")
        sites[name] = {"via_tunnel_and_gateway": ROUTE_LINE in log,
                       "supernode_in_own_netns": _isolated(site.proc.pid, "supernode")}
    found = {"gateway": fed.fleet,
             "superlink_in_own_netns": _isolated(fed.coordinator.pid, "fedward.flower.superlink"),
             "sites": sites}
    bad = [f"{n}: {k}" for n, v in sites.items() for k, ok in v.items() if not ok]
    if not found["superlink_in_own_netns"]:
        bad.append("coordinator: superlink_in_own_netns")
    if bad:
        raise RuntimeError("not the production route / isolation: " + ", ".join(bad))
    try:
        found["hop_latency"] = hop_latency(fed)
    except (httpx.HTTPError, OSError, ssl.SSLError) as err:  # a probe, not the benchmark
        found["hop_latency"] = {"error": f"{type(err).__name__}: {err}"}
    return found


def _request_ms(make: Callable[[], httpx.Client], url: str, reps: int, *,
                fresh: bool) -> float:
    """Median milliseconds of ``GET url``: on one kept-alive connection (after a first
    request that opens it), or with a new connection (and TLS handshake) each time."""
    times: list[float] = []
    client = make()
    try:
        if not fresh:
            client.get(url).raise_for_status()
        for _ in range(reps):
            if fresh:
                client.close()
                client = make()
            t = time.perf_counter()
            client.get(url).raise_for_status()
            times.append(1000 * (time.perf_counter() - t))
    finally:
        client.close()
    return bu.median(times)


def hop_latency(fed: harness.Federation, reps: int = 40) -> dict[str, dict[str, float]]:
    """What one request costs at each hop of the production route, measured from outside
    (``GET /health``, which the gateway forwards to the SuperLink like a fleet request, for
    a verified site): at the SuperLink's socket (the coordinator's namespace relay and the
    SuperLink), at the gateway (plus mutual TLS, the gateway's checks and its upstream
    call), and at one site's tunnel socket (plus the tunnel's TLS and its relay). Median
    ms, kept-alive connection (as Flower's HTTP client keeps them) and new connection."""
    from fedward.certs import CAFiles
    from site_agent.enroll import EnrollmentFiles

    site = next(iter(fed.sites.values()))
    files = EnrollmentFiles(site.root)
    local = CAFiles.under(files.local_pki)
    coord_ca = str(fed.home / "pki" / "ca.pem")
    superlink = fed.superlink.removeprefix("unix:")

    def at_superlink() -> httpx.Client:
        ctx = ssl.create_default_context(cafile=coord_ca)
        return httpx.Client(transport=httpx.HTTPTransport(uds=superlink, verify=ctx),
                            timeout=30)

    def at_gateway() -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
        ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
        return httpx.Client(verify=ctx, timeout=30)

    def at_tunnel() -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(local.ca_cert))
        return httpx.Client(transport=httpx.HTTPTransport(
            uds=str(site.root / "run" / "tunnel.sock"), verify=ctx), timeout=30)

    hops = (("superlink_socket", at_superlink, "https://127.0.0.1/health"),
            ("gateway", at_gateway, f"https://{fed.fleet}/health"),
            ("site_tunnel", at_tunnel, "https://127.0.0.1/health"))
    return {name: {"kept_alive_ms": _request_ms(make, url, reps, fresh=False),
                   "new_connection_ms": _request_ms(make, url, max(5, reps // 4),
                                                    fresh=True)}
            for name, make, url in hops}


# Which process a CPU figure belongs to, by its command line (first match wins: a sandbox's
# command line also holds the command it runs).
ROLES: tuple[tuple[str, str], ...] = (
    ("fedward.sandbox", "namespace relays"),
    ("flwr-serverapp", "ServerApp"),
    ("flower-superexec", "SuperExec"),
    ("fedward.flower.superlink", "SuperLink"),
    ("fedward.flower.supernode", "SuperNodes"),
    ("fedward-coordinator", "coordinator (API, gateway)"),
    ("fedward-site", "site agents (tunnel, executor, trainer)"),
)
_TICK = os.sysconf("SC_CLK_TCK")


def _role(pid: int) -> str | None:
    cmd = _cmdline(pid)
    if not cmd or Path(cmd.split(" ", 1)[0]).name == "timeout":
        return None
    return next((role for needle, role in ROLES if needle in cmd), "other")


def _cpu_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])   # utime + stime


class CpuSampler:
    """Samples the CPU time of every process of a federation (coordinator and site agents,
    with all they start) twice a second, from /proc, in a thread. CPU time, unlike wall
    time, hardly depends on what else the machine runs: it says where a round's work goes
    even on a loaded machine."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, roots: list[int]) -> None:
        from fedward.procs import descendants

        ticks: dict[int, int] = {}
        for pid in [q for root in roots for q in (root, *descendants(root))]:
            if pid not in self.roles:
                role = _role(pid)
                if role is None:
                    continue
                self.roles[pid] = role
            got = _cpu_ticks(pid)
            if got is not None:
                ticks[pid] = got
        self.samples.append((time.time(), ticks))

    def start(self, fed: harness.Federation) -> None:
        roots = [fed.coordinator.pid, *[s.proc.pid for s in fed.sites.values() if s.proc]]

        def loop() -> None:
            while not self._stop.is_set():
                self._sample(roots)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="cpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return {"samples": [[t, {str(k): v for k, v in ticks.items()}]
                            for t, ticks in self.samples],
                "roles": {str(k): v for k, v in self.roles.items()}}


def cpu_per_round(cpu: dict[str, Any], rounds_api: list[dict[str, Any]]) -> dict[str, float]:
    """CPU seconds per round by role over rounds 2..R: from the first sample at or after
    round 2's start to the last at or before the last round's end (a process that ends in
    between counts up to its last sample)."""
    done = [r for r in rounds_api if r.get("seconds") is not None]
    if len(done) < 2 or not cpu.get("samples"):
        return {}
    t0 = r1._db_epoch(done[1]["started_at"])
    t1 = r1._db_epoch(done[-1]["started_at"]) + float(done[-1]["seconds"])
    window = [(t, ticks) for t, ticks in cpu["samples"] if t0 <= t <= t1]
    if len(window) < 2:
        return {}
    first, used = window[0][1], {}
    for _t, ticks in window[1:]:
        for pid, value in ticks.items():
            used[pid] = value - first.get(pid, 0)   # born in the window: all of it
    per_role: dict[str, float] = {}
    for pid, value in used.items():
        role = cpu["roles"].get(pid, "other")
        per_role[role] = per_role.get(role, 0.0) + value / _TICK
    n_rounds = len(done) - 1
    out = {role: v / n_rounds for role, v in sorted(per_role.items())}
    out["total"] = sum(per_role.values()) / n_rounds
    out["window_s"] = window[-1][0] - window[0][0]
    return out


def later(values: list[float]) -> list[float]:
    return values[1:] if len(values) > 1 else values


def side_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Median of rounds 2..R, round 1 and its ratio; the breakdown where there is one."""
    rounds = [float(x) for x in run["round_seconds"]]
    med = bu.median(later(rounds))
    out: dict[str, Any] = {"median_s": med, "round1_s": rounds[0],
                           "round1_over_later": rounds[0] / med if med else float("nan"),
                           "min_max_s": [min(later(rounds)), max(later(rounds))],
                           "round_seconds": rounds}
    if "breakdown" in run:
        warm = [b for b in run["breakdown"][1:] if b.get("complete")]
        keys = [k for k, _, _ in r1.COMPONENTS] + ["mean_deliver", "mean_ret", "reply_spread"]
        out["breakdown_median"] = {k: bu.median(b[k] for b in warm) for k in keys}
        first = run["breakdown"][0]
        out["breakdown_round1"] = {k: first.get(k, float("nan")) for k in keys}
    if "cpu_samples" in run:
        out["cpu_seconds_per_round"] = cpu_per_round(run["cpu_samples"], run["rounds_api"])
    return out


def summarize(n: int, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"sites": n}
    for side, run in runs.items():
        s[side] = side_summary(run)
    prod, stock = s.get("production"), s.get("stock")
    if prod and stock:
        s["ratio_stock_over_production"] = stock["median_s"] / prod["median_s"]
        s["goal_met"] = s["ratio_stock_over_production"] >= GOAL
    if prod:
        s["round1_goal_met"] = prod["round1_over_later"] <= ROUND1_GOAL
    probe = runs.get("production", {}).get("probe") or {}
    if "hop_latency" in probe:
        s["hop_latency"] = probe["hop_latency"]
    if prod and s.get("lab"):
        s["production_minus_lab_s"] = prod["median_s"] - s["lab"]["median_s"]
    return s


def report(summaries: list[dict[str, Any]], *, rounds: int, local_epochs: int,
           epsilon: float, wall_s: float, lab: bool) -> str:
    f = bu.fmt
    head = (
        f"Production route: sites enrolled with a one-time token through the gateway, "
        f"`fedward-site start` (local tunnel -> mutual TLS -> gateway -> SuperLink socket), "
        f"Flower in network and PID namespaces on both hosts. Breast-cancer MLP, "
        f"`fedward-site demo-data` non-IID split (the same CSV files on every side), "
        f"{local_epochs} local epochs, {rounds} rounds; DP-SGD on the appliance (epsilon "
        f"{epsilon:g} per site), stock Flower **without DP**, Flower's defaults, TLS and node "
        f"authentication. Medians over rounds 2..{rounds}. All sides in this one invocation, "
        f"one after the other, order rotating per site count. Goals: stock / production >= "
        f"{GOAL:g}x; round 1 <= {ROUND1_GOAL:g}x a later round. Whole invocation: "
        f"{wall_s / 60:.1f} min.\n\n")

    def side(s: dict[str, Any], name: str, key: str, digits: int = 2) -> str:
        return f(s.get(name, {}).get(key), digits)

    cols = ["sites", "production s/round (DP on)", "stock Flower s/round (DP off)",
            "ratio stock / production", f"goal >= {GOAL:g}x", "production round 1",
            "round 1 / later", f"goal <= {ROUND1_GOAL:g}x", "stock round 1"]
    if lab:
        cols += ["lab route s/round", "production - lab"]
    rows = []
    for s in summaries:
        ratio = s.get("ratio_stock_over_production")
        row = [s["sites"], side(s, "production", "median_s"), side(s, "stock", "median_s"),
               f"{f(ratio)}x" if ratio is not None else "-",
               "-" if "goal_met" not in s else ("met" if s["goal_met"] else "**not met**"),
               side(s, "production", "round1_s"),
               f"{side(s, 'production', 'round1_over_later')}x",
               "-" if "round1_goal_met" not in s else
               ("met" if s["round1_goal_met"] else "**not met**"),
               side(s, "stock", "round1_s")]
        if lab:
            row += [side(s, "lab", "median_s"), f(s.get("production_minus_lab_s"))]
        rows.append(row)
    t1 = bu.md_table(cols, rows)
    labels = {k: lab_ for k, lab_, _ in r1.COMPONENTS}
    bd_rows = []
    for s in summaries:
        for name in ("production", "lab"):
            if "breakdown_median" not in s.get(name, {}):
                continue
            for tag, key in (("2..R", "breakdown_median"), ("1", "breakdown_round1")):
                bd = s[name][key]
                bd_rows.append([s["sites"], name, tag, *[f(bd[k]) for k in SHOWN],
                                f(bd["mean_deliver"]), f(bd["mean_ret"]),
                                f(bd["reply_spread"])])
    t2 = bu.md_table(["sites", "route", "round", *[labels[k] for k in SHOWN],
                      "delivery, mean over sites", "return, mean over sites",
                      "first to last reply"], bd_rows)
    roles = [role for _, role in ROLES]
    cpu_rows = []
    for s in summaries:
        for name in ("production", "lab"):
            cpu = s.get(name, {}).get("cpu_seconds_per_round")
            if cpu:
                cpu_rows.append([s["sites"], name, *[f(cpu.get(r, 0.0)) for r in roles],
                                 f(cpu["total"])])
    t3 = bu.md_table(["sites", "route", *roles, "total"], cpu_rows) if cpu_rows else ""
    hop_rows = []
    for s in summaries:
        hops = s.get("hop_latency") or {}
        if "error" in hops or not hops:
            continue
        hop_rows.append([s["sites"], *[f"{f(hops[h]['kept_alive_ms'], 1)} / "
                                       f"{f(hops[h]['new_connection_ms'], 1)}"
                                       for h in ("superlink_socket", "gateway", "site_tunnel")]])
    t4 = bu.md_table(["sites", "at the SuperLink's socket", "at the gateway (mutual TLS)",
                      "at a site's tunnel socket"], hop_rows) if hop_rows else ""
    tail = ""
    if t3:
        tail += ("\nCPU seconds per round by process (rounds 2..R, all processes of the "
                 "federation sampled from /proc twice a second; unlike wall time, CPU time "
                 "hardly depends on the machine's other load). The gateway runs in the "
                 "coordinator's process, the tunnel in each site agent's; *namespace "
                 "relays* are the sandboxes' byte relays on both hosts:\n\n" + t3)
    if t4:
        tail += ("\nOne request at each hop (`GET /health`, forwarded like a fleet request; "
                 "median ms, kept-alive connection / new connection each time), measured "
                 "before the run; each hop includes the ones after it:\n\n" + t4)
    return (head + t1 + "\nWhere the production round goes (seconds; benchmark 1's "
            "components, critical path = the site whose reply came last; median over rounds "
            "2..R, and round 1). On the production route *delivery* and *return* also hold "
            "the site's tunnel (Unix socket, relay into the SuperNode's namespace, mutual "
            "TLS), the gateway (handshake on a new connection, certificate and node-key "
            "check, streaming to the SuperLink's socket) and the coordinator's relay into "
            "its namespace:\n\n" + t2 + tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--sites", default="2,4,8", help="site counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (>= 2)")
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--round-deadline", type=float, default=240.0,
                    help="the appliance run's round deadline, seconds")
    ap.add_argument("--lab", action="store_true",
                    help="also run benchmark 1's lab route (sites dial the SuperLink socket)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    ap.add_argument("--extra-lifetime", type=float, default=600.0,
                    help="seconds added to every process's lifetime (both sides) and to the "
                         "appliance's waits for sites and run (enrollment; a loaded machine)")
    ap.add_argument("--name", default=NAME,
                    help=f"results file name under bench/results (default {NAME})")
    args = ap.parse_args()
    site_counts = [int(x) for x in args.sites.split(",") if x.strip()]
    if not site_counts or min(site_counts) < 2 or args.rounds < 2:
        ap.error("--sites must list counts >= 2 and --rounds must be >= 2")
    bu.exit_on_sigterm()
    os.environ.update(r1.THREAD_ENV)
    os.environ.pop("FEDWARD_DATABASE_URL", None)
    os.environ.pop("FEDWARD_FLOWER_ISOLATION", None)  # the default: namespaces

    bu.mark_start()
    t_start = time.monotonic()
    sides = [s for s in SIDES if s != "lab" or args.lab]
    tmp = Path(tempfile.mkdtemp(prefix="fedward-bench1b-"))
    runs: dict[int, dict[str, dict[str, Any]]] = {n: {} for n in site_counts}
    errors: list[str] = []
    try:
        for i, n in enumerate(site_counts):
            base = tmp / f"n{n}"
            base.mkdir(parents=True)
            data = r1.demo_data(base / "data", n)
            sha = {s["name"]: r1._sha256(Path(s["csv"])) for s in data["sites"]}
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            for side in order:
                print(f"--- {n} sites: {side}", flush=True)
                t = time.monotonic()
                try:
                    if side == "stock":
                        lb = r1._loadavg()
                        (base / side).mkdir()
                        r = run_stock(sites=n, rounds=args.rounds, tmp=base / side,
                                      data_paths=[Path(s["csv"]) for s in data["sites"]],
                                      local_epochs=args.local_epochs,
                                      env_extra=r1.THREAD_ENV,
                                      extra_lifetime_s=args.extra_lifetime)
                        r.update(loadavg_before=lb, loadavg_after=r1._loadavg(), dp=False)
                    else:
                        r = r1.run_appliance(
                            n_sites=n, rounds=args.rounds, local_epochs=args.local_epochs,
                            epsilon=args.epsilon, deadline_s=args.round_deadline,
                            work=base / side, enrolled=side == "production",
                            probe=check_production if side == "production" else None,
                            sampler=CpuSampler(), extra_lifetime_s=args.extra_lifetime)
                        if r["data_sha256"] != sha:
                            raise RuntimeError(f"the {side} run's partitions differ from "
                                               "the stock run's")
                        # The API's copies are large and in the breakdown already.
                        r.pop("metrics_api", None)
                except Exception as exc:
                    msg = f"{n} sites, {side}: {type(exc).__name__}: {exc}"
                    print(msg, file=sys.stderr, flush=True)
                    errors.append(msg[:2000])
                    continue
                r["order"] = order.index(side) + 1
                runs[n][side] = r
                print(f"    rounds {[round(x, 2) for x in r['round_seconds']]} "
                      f"({time.monotonic() - t:.0f} s)", flush=True)
            if not args.keep:
                for side in sides:
                    shutil.rmtree(base / side, ignore_errors=True)
            # After each site count: a run stopped at its time limit keeps what it measured.
            save(args, site_counts[:i + 1], site_counts, sides, runs, errors,
                 time.monotonic() - t_start)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    complete = all(set(runs[n]) == set(sides) for n in site_counts)
    return 1 if errors or not complete else 0


def save(args: argparse.Namespace, done: list[int], site_counts: list[int], sides: list[str],
         runs: dict[int, dict[str, dict[str, Any]]], errors: list[str],
         wall: float) -> None:
    """Write ``results/prod_path.json`` and ``.md`` with the site counts ``done`` so far."""
    summaries = [summarize(n, runs[n]) for n in done if runs[n]]
    md = report(summaries, rounds=args.rounds, local_epochs=args.local_epochs,
                epsilon=args.epsilon, wall_s=wall, lab=args.lab)
    left = [n for n in site_counts if n not in done]
    if left:
        md += ("\n**Incomplete**: written after " + ", ".join(map(str, done)) + " sites; "
               + ", ".join(map(str, left)) + " not measured (yet).\n")
    if errors:
        md += "\nFailed: " + "; ".join(e.splitlines()[0] for e in errors) + "\n"
    bu.write_results(args.name, {
        "code": r1.code_version(),
        "wall_seconds": wall,
        "settings": {"sites": site_counts, "rounds": args.rounds,
                     "local_epochs": args.local_epochs, "epsilon": args.epsilon,
                     "round_deadline_s": args.round_deadline, "task": r1.TASK,
                     "sides": sides, "thread_env": r1.THREAD_ENV, "goal_ratio": GOAL,
                     "round1_goal": ROUND1_GOAL},
        "site_counts_done": done,
        "complete": not left,
        "components": {k: {"label": lab, "means": what} for k, lab, what in r1.COMPONENTS},
        "summaries": summaries,
        "runs": {str(n): runs[n] for n in done},
        "errors": errors,
    }, md)


if __name__ == "__main__":
    sys.exit(main())
