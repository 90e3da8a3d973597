"""Benchmark 7: the coordinator's REST API under load, on SQLite and on PostgreSQL.

For each database a real coordinator API (``coordinator.api.create_app``, no launcher, the
same uvicorn settings as ``fedward-coordinator serve``: one process, log level warning, no
access log) runs as a child process on 127.0.0.1 over a migrated database
(``coordinator.db.run_migrations``) seeded through the appliance's own functions: an
``ml_engineer`` user and token (``coordinator.api.create_user``), a project, 10 runs of 20
rounds each with 3 sites (``coordinator.repository.start_round``/``finish_round``/
``record_site_metrics``, 5 metrics per site per round). PostgreSQL 15 is started like the
tests do (``tests/pg.py``: initdb and pg_ctl in a temporary folder, loopback only, fsync
off); if its binaries are missing the PostgreSQL rows say so.

Load: an ``httpx.AsyncClient`` in this process with 16 concurrent workers (keep-alive)
sends ``GET /api/v1/runs/{id}`` (the run-status endpoint: the run, its project and its
rounds, behind token authentication), bounded to 2000 requests or 15 s per repetition,
whichever comes first, after 100 warm-up requests. Baseline in the same run and server:
``GET /api/v1/health`` (no authentication, ``SELECT 1``). 3 repetitions per endpoint and
database, interleaved; medians of requests/s, p50 and p99 latency (client-side, per
request). The client shares the 2 cores with the server, so these are lower bounds of what
the server alone could do.

    .venv/bin/python bench/api_load.py [--requests 2000] [--seconds 15] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu
from common import free_port

CONCURRENCY = 16
WARMUP = 100
N_RUNS = 10
N_ROUNDS = 20
SITES = ("hospital-a", "hospital-b", "hospital-c")


# --------------------------------------------------------------------------------------------
# Server (child process)


def serve(db_url: str, home: Path, port: int) -> None:
    import uvicorn

    from coordinator.api import create_app
    from coordinator.db import make_engine
    from coordinator.settings import Settings

    engine = make_engine(db_url)
    app = create_app(settings=Settings(home=home, database_url=db_url), engine=engine)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                  access_log=False)).run()


# --------------------------------------------------------------------------------------------
# Seeding


def seed(db_url: str) -> tuple[str, int]:
    """Migrate and fill the database; return (token, id of the run to query)."""
    from coordinator.auth import create_user
    from coordinator.db import make_engine, run_migrations, session_scope
    from coordinator.models import Project, Run
    from coordinator.repository import finish_run, mark_run_started
    from coordinator.round_records import finish_round, record_site_metrics, start_round
    from fedward.run_config import RunConfig

    run_migrations(db_url)
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as session:
            _, token = create_user(session, name="bench", role="ml_engineer")
            project = Project(name="oncology", description="benchmark")
            session.add(project)
            session.flush()
            assert project.id is not None
            config = RunConfig(rounds=N_ROUNDS, local_epochs=3, epsilon=3.0, delta=1e-5,
                               min_sites=2, round_deadline_s=90, lr=1.0, batch_size=32,
                               max_grad_norm=1.0, seed=0, sites=list(SITES))
            run_ids = []
            for _ in range(N_RUNS):
                run = Run(project_id=project.id, task="breast_cancer_mlp",
                          config_json=config.model_dump_json(), launched_by="bench")
                session.add(run)
                session.flush()
                assert run.id is not None
                run_ids.append(run.id)
        for i, run_id in enumerate(run_ids):
            mark_run_started(engine, run_id, str(4242 + i))
            for n in range(1, N_ROUNDS + 1):
                start_round(engine, run_id, n)
                for site in SITES:
                    record_site_metrics(engine, run_id, n, site, {
                        "train-loss": 0.5, "eval-auc": 0.9, "epsilon-spent": 0.1 * n,
                        "num-examples": 100.0, "train-seconds": 0.2})
                finish_round(engine, run_id, n, status="completed", participating=list(SITES),
                             failed=[], late=[], seconds=1.0)
            if i < N_RUNS - 1:
                finish_run(engine, run_id, status="completed", reason=None)
        # The run queried is the last one, still "running" with all its rounds.
        return token, run_ids[-1]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# Load


async def _load(base: str, path: str, headers: dict[str, str], n: int, seconds: float
                ) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=30.0) as client:
        for _ in range(WARMUP // CONCURRENCY + 1):
            await asyncio.gather(*(client.get(path) for _ in range(CONCURRENCY)))
        latencies: list[float] = []
        errors: dict[str, int] = {}
        sent = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def worker() -> None:
            nonlocal sent
            while sent < n and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.get(path)
                    code = str(r.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                latencies.append((time.perf_counter() - t) * 1000)
                if code != "200":
                    errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - t0
    return {"requests": len(latencies), "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50_ms": bu.percentile(latencies, 50),
            "p99_ms": bu.percentile(latencies, 99), "errors": errors}


def load(base: str, path: str, headers: dict[str, str], n: int, seconds: float
         ) -> dict[str, Any]:
    return asyncio.run(_load(base, path, headers, n, seconds))


# --------------------------------------------------------------------------------------------
# Servers and PostgreSQL


class Server:
    def __init__(self, name: str, db_url: str, home: Path, log: Path) -> None:
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.log = log
        # `timeout` bounds the server's life even if this driver dies.
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", "1200", sys.executable, __file__, "--serve", db_url,
             "--home", str(home), "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=bu.ROOT)

    def wait_ready(self, timeout_s: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} API exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/api/v1/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} API not ready in {timeout_s:.0f} s")

    def stop(self) -> None:
        # Only the process group this object started (its PID), TERM then KILL.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """tests/pg.py's server, without pytest: missing binaries raise RuntimeError."""
    sys.path.insert(0, str(bu.ROOT / "tests"))
    os.environ.setdefault("FEDWARD_ALLOW_SKIP_PG", "1")
    import pytest

    from pg import PG_BIN, create_database, postgres_server

    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "pg_ctl").is_file():
        raise RuntimeError(f"PostgreSQL server binaries (initdb, pg_ctl) not found in {PG_BIN}:"
                           " apt-get install -y postgresql, or set FEDWARD_PG_BIN")
    try:
        with postgres_server() as server_url:
            yield create_database(server_url, "bench")
    except pytest.skip.Exception as exc:  # pg.py skips when it cannot run (e.g. no user)
        raise RuntimeError(f"PostgreSQL unavailable: {exc}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.home, args.port)
        return
    bu.exit_on_sigterm()

    t_start = time.monotonic()
    errors: dict[str, str] = {}
    servers: dict[str, tuple[Server, dict[str, str], int]] = {}
    with tempfile.TemporaryDirectory(prefix="fedward-apiload-") as tmp, \
            contextlib.ExitStack() as stack:
        tmp_p = Path(tmp)
        urls = {"SQLite": f"sqlite:///{tmp_p / 'sqlite' / 'coordinator.db'}"}
        try:
            urls["PostgreSQL"] = stack.enter_context(postgres())
        except Exception as exc:
            errors["PostgreSQL"] = f"{type(exc).__name__}: {exc}"[:1000]
        for name, url in urls.items():
            try:
                t = time.monotonic()
                token, run_id = seed(url)
                seed_s = time.monotonic() - t
                home = tmp_p / f"home-{name}"
                home.mkdir()
                srv = Server(name, url, home, tmp_p / f"{name}.log")
                stack.callback(srv.stop)
                srv.wait_ready()
                servers[name] = (srv, {"Authorization": f"Bearer {token}"}, run_id)
                print(f"{name}: seeded in {seed_s:.1f}s, API on {srv.base}", flush=True)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"[:1000]

        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            n: {"run_status": [], "health": []} for n in servers}
        for rep in range(args.reps):
            for name, (srv, headers, run_id) in servers.items():
                for endpoint, path, hdrs in (("run_status", f"/api/v1/runs/{run_id}", headers),
                                             ("health", "/api/v1/health", {})):
                    r = load(srv.base, path, hdrs, args.requests, args.seconds)
                    results[name][endpoint].append(r)
                    print(f"rep {rep + 1} {name} {endpoint}: {r['rps']:.0f} req/s, p50 "
                          f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors "
                          f"{r['errors'] or 0}", flush=True)

    summary: dict[str, Any] = {}
    rows = []
    for name, eps in results.items():
        summary[name] = {}
        for endpoint, reps in eps.items():
            summary[name][endpoint] = {
                "rps_median": bu.median(r["rps"] for r in reps),
                "p50_ms_median": bu.median(r["p50_ms"] for r in reps),
                "p99_ms_median": bu.median(r["p99_ms"] for r in reps),
                "requests": [r["requests"] for r in reps],
                "errors": [r["errors"] for r in reps],
            }
    sqlite_rs = summary.get("SQLite", {}).get("run_status", {}).get("rps_median")
    for name in ("SQLite", "PostgreSQL"):
        if name not in summary:
            rows.append([name, "run status", "-", "-", "-", "-", "-",
                         "FAILED: " + errors.get(name, "?").replace("|", "/")[:300]])
            continue
        s, h = summary[name]["run_status"], summary[name]["health"]
        n_err = sum(sum(e.values()) for e in s["errors"])
        rows.append([name, f"GET /runs/{{id}} ({N_ROUNDS} rounds)", f"{s['rps_median']:.0f}",
                     bu.fmt(s["p50_ms_median"], 1), bu.fmt(s["p99_ms_median"], 1),
                     f"{s['rps_median'] / h['rps_median']:.2f}x",
                     f"{s['rps_median'] / sqlite_rs:.2f}x" if sqlite_rs else "-",
                     f"{n_err} errors"])
        n_err = sum(sum(e.values()) for e in h["errors"])
        rows.append([name, "GET /health (baseline)", f"{h['rps_median']:.0f}",
                     bu.fmt(h["p50_ms_median"], 1), bu.fmt(h["p99_ms_median"], 1), "1.00x",
                     "-", f"{n_err} errors"])
    md = (
        f"{CONCURRENCY} concurrent keep-alive clients (httpx.AsyncClient, same machine), up to "
        f"{args.requests} requests or {args.seconds:.0f} s per repetition, {args.reps} "
        "repetitions interleaved, medians; one uvicorn process per database, 127.0.0.1. "
        f"Database: {N_RUNS} runs x {N_ROUNDS} rounds x {len(SITES)} sites.\n\n"
        + bu.md_table(["database", "endpoint", "req/s", "p50 ms", "p99 ms",
                       "req/s vs /health", "run status vs SQLite", "errors"], rows)
    )
    for name, err in errors.items():
        md += f"\n{name} failed: {err}\n"
    bu.write_results("api_load", {
        "concurrency": CONCURRENCY, "max_requests": args.requests,
        "max_seconds": args.seconds, "reps": args.reps, "runs": N_RUNS, "rounds": N_ROUNDS,
        "errors": errors, "summary": summary, "raw": results,
        "seconds": time.monotonic() - t_start}, md)
    print(json.dumps({k: v["run_status"]["rps_median"] for k, v in summary.items()}))


if __name__ == "__main__":
    main()
