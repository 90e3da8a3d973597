"""Benchmark: the coordinator's ``GET /metrics`` while its REST API is under load.

Target (issue 12): under 50 ms at p99 under the API load of ``bench/api_load.py``.

A child process serves, as ``fedward-coordinator serve`` does, the REST API (uvicorn, one
process) and the metrics listener (``coordinator.metrics.start_listener``'s registry and
``fedward.metrics_http.MetricsListener``) over one SQLite database, seeded with
``api_load.seed`` (10 runs x 20 rounds x 3 sites) plus 50 registered sites with a
certificate each, with the GIL switch interval the service sets
(``coordinator.metrics.SWITCH_INTERVAL_S``). The driver loads ``GET /api/v1/runs/{id}``
with ``api_load``'s 16 concurrent keep-alive clients while a thread scrapes ``/metrics``
every 100 ms (a fresh connection each time, as Prometheus may); the scrape latency is
measured client-side. Three servers: with the default 5 s cache of the database figures;
the same with Python's default 5 ms switch interval (the baseline of that setting); and with
no cache (every scrape reads the database); each also without load as a baseline. The
client shares the machine's cores with the server: the figures are upper bounds.

    .venv/bin/python bench/metrics_scrape.py [--seconds 15] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_load
import benchutil as bu
from common import free_port

SCRAPE_EVERY_S = 0.1
N_SITES = 50


def serve(db_url: str, home: Path, port: int, metrics_port: int, cache_s: float,
          switch_s: float) -> None:
    import uvicorn

    from coordinator.api import create_app
    from coordinator.db import make_engine
    from coordinator.metrics import build_registry
    from coordinator.settings import Settings
    from fedward.metrics_http import MetricsListener

    sys.setswitchinterval(switch_s)
    engine = make_engine(db_url)
    app = create_app(settings=Settings(home=home, database_url=db_url), engine=engine)
    MetricsListener(registry=build_registry(engine, cache_s=cache_s),
                    port=metrics_port).start()
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                  access_log=False)).run()


def add_sites(db_url: str) -> None:
    from coordinator.db import make_engine, session_scope
    from coordinator.models import Site, SiteCertificate, utcnow

    engine = make_engine(db_url)
    with session_scope(engine) as session:
        for i in range(N_SITES):
            site = Site(name=f"site-{i:03d}", status="registered")
            session.add(site)
            session.flush()
            session.add(SiteCertificate(site_id=site.id or 0, serial=f"{i:040x}",
                                        not_after=utcnow() + timedelta(days=365)))
    engine.dispose()


class Server(api_load.Server):
    def __init__(self, name: str, db_url: str, home: Path, log: Path, cache_s: float,
                 switch_s: float) -> None:
        import subprocess

        self.name, self.port, self.metrics_port = name, free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.log = log
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", "1200", sys.executable, __file__, "--serve", db_url,
             "--home", str(home), "--port", str(self.port), "--metrics-port",
             str(self.metrics_port), "--cache-s", str(cache_s), "--switch-s", str(switch_s)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=bu.ROOT)


def scrape_while(port: int, stop: threading.Event, out: list[float]) -> None:
    # http.client, not httpx.get: a new httpx client loads a CA bundle (tens of ms of CPU)
    # that has nothing to do with the server's answer.
    while not stop.is_set():
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        res = conn.getresponse()
        body = res.read()
        conn.close()
        out.append((time.perf_counter() - t) * 1000)
        assert res.status == 200 and b"fedward_runs" in body, res.status
        stop.wait(SCRAPE_EVERY_S)


def in_process(db_url: str, n: int = 200) -> dict[str, float]:
    """The cost of one uncached scrape's body, without HTTP: generate_latest, n times."""
    from prometheus_client import generate_latest

    from coordinator.db import make_engine
    from coordinator.metrics import build_registry

    engine = make_engine(db_url)
    registry = build_registry(engine, cache_s=0.0)
    times, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.thread_time()
        generate_latest(registry)
        cpu.append((time.thread_time() - c) * 1000)
        times.append((time.perf_counter() - t) * 1000)
    engine.dispose()
    # CPU time is what the scrape costs; wall time adds waiting for a core on a busy host.
    return {"p50_ms": bu.percentile(times, 50), "p99_ms": bu.percentile(times, 99),
            "cpu_p50_ms": bu.percentile(cpu, 50), "cpu_p99_ms": bu.percentile(cpu, 99)}


def measure(srv: Server, headers: dict[str, str], run_id: int, seconds: float,
            loaded: bool) -> dict[str, Any]:
    stop, latencies = threading.Event(), list[float]()
    thread = threading.Thread(target=scrape_while, args=(srv.metrics_port, stop, latencies),
                              daemon=True)
    thread.start()
    api: dict[str, Any] | None = None
    if loaded:
        api = api_load.load(srv.base, f"/api/v1/runs/{run_id}", headers, 10**9, seconds)
    else:
        time.sleep(seconds)
    stop.set()
    thread.join(timeout=30)
    return {"scrapes": len(latencies), "p50_ms": bu.percentile(latencies, 50),
            "p99_ms": bu.percentile(latencies, 99), "max_ms": max(latencies),
            "api_rps": None if api is None else api["rps"],
            "api_p99_ms": None if api is None else api["p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--metrics-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache-s", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--switch-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.home, args.port, args.metrics_port, args.cache_s, args.switch_s)
        return
    from coordinator.metrics import SWITCH_INTERVAL_S
    bu.exit_on_sigterm()
    t_start = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedward-metricsbench-") as tmp, \
            contextlib.ExitStack() as stack:
        tmp_p = Path(tmp)
        url = f"sqlite:///{tmp_p / 'coordinator.db'}"
        token, run_id = api_load.seed(url)
        add_sites(url)
        headers = {"Authorization": f"Bearer {token}"}
        direct = in_process(url)
        print(f"in process, no HTTP, no cache: p50 {direct['p50_ms']:.1f} ms, p99 "
              f"{direct['p99_ms']:.1f} ms; CPU p50 {direct['cpu_p50_ms']:.1f} ms, p99 "
              f"{direct['cpu_p99_ms']:.1f} ms", flush=True)
        python_default = 0.005
        for i, (cache_s, switch_s) in enumerate(((5.0, SWITCH_INTERVAL_S),
                                                 (5.0, python_default),
                                                 (0.0, SWITCH_INTERVAL_S))):
            case = f"cache {cache_s:g} s, " + (
                "" if switch_s == SWITCH_INTERVAL_S else
                f"Python's {switch_s * 1000:g} ms GIL switch (baseline), ")
            home = tmp_p / f"home-{i}"
            home.mkdir()
            srv = Server(case, url, home, tmp_p / f"{i}.log", cache_s, switch_s)
            stack.callback(srv.stop)
            srv.wait_ready()
            for rep in range(args.reps):
                for loaded in (False, True):
                    key = case + ("API under load" if loaded else "idle")
                    r = measure(srv, headers, run_id, args.seconds, loaded)
                    results.setdefault(key, []).append(r)
                    print(f"rep {rep + 1} {key}: {r['scrapes']} scrapes, p50 "
                          f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max "
                          f"{r['max_ms']:.1f} ms" + ("" if r["api_rps"] is None else
                                                     f"; API {r['api_rps']:.0f} req/s, p99 "
                                                     f"{r['api_p99_ms']:.1f} ms"), flush=True)
            srv.stop()
    rows, summary = [], {}
    for key, reps in results.items():
        s = {"p50_ms_median": bu.median(r["p50_ms"] for r in reps),
             "p99_ms_median": bu.median(r["p99_ms"] for r in reps),
             "p99_ms_worst": max(r["p99_ms"] for r in reps),
             "scrapes": sum(r["scrapes"] for r in reps)}
        api_rps = [r["api_rps"] for r in reps if r["api_rps"] is not None]
        s["api_rps_median"] = bu.median(api_rps) if api_rps else None
        summary[key] = s
        rows.append([key, s["scrapes"], bu.fmt(s["p50_ms_median"], 1),
                     bu.fmt(s["p99_ms_median"], 1), bu.fmt(s["p99_ms_worst"], 1),
                     "-" if s["api_rps_median"] is None else f"{s['api_rps_median']:.0f}",
                     "yes" if s["p99_ms_worst"] < 50 else "NO"])
    md = (f"`GET /metrics` on the coordinator's metrics listener, scraped every "
          f"{SCRAPE_EVERY_S * 1000:.0f} ms for {args.seconds:.0f} s per repetition, "
          f"{args.reps} repetitions, medians (worst p99 too); under load: "
          f"{api_load.CONCURRENCY} clients on GET /api/v1/runs/{{id}} in the same process as "
          f"the API. GIL switch interval {SWITCH_INTERVAL_S * 1000:g} ms as the service sets "
          f"it, unless the case says otherwise. Database: SQLite, {api_load.N_RUNS} runs x "
          f"{api_load.N_ROUNDS} rounds, "
          f"{N_SITES + len(api_load.SITES)} sites.\n\n"
          + bu.md_table(["case", "scrapes", "p50 ms", "p99 ms", "worst p99 ms", "API req/s",
                         "p99 < 50 ms"], rows)
          + f"\nOne uncached scrape body built in process (no HTTP, idle server): wall p50 "
          f"{direct['p50_ms']:.1f} ms, p99 {direct['p99_ms']:.1f} ms; CPU p50 "
          f"{direct['cpu_p50_ms']:.1f} ms, p99 {direct['cpu_p99_ms']:.1f} ms.\n")
    bu.write_results("metrics_scrape", {"seconds_per_rep": args.seconds, "reps": args.reps,
                                        "in_process": direct,
                                        "summary": summary, "raw": results,
                                        "seconds": time.monotonic() - t_start}, md)
    print(json.dumps({k: v["p99_ms_median"] for k, v in summary.items()}))


if __name__ == "__main__":
    main()
