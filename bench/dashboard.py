"""Dashboard pages: server time of the portal's runs, run and sites pages at scale.

The database (SQLite, and PostgreSQL 15 where its binaries are installed, started like the
tests do) is migrated with ``coordinator.db.run_migrations`` and filled in bulk with what
the ServerApp would have written for 1,000 runs and 50 sites: 10 projects; each run over 5
of the sites, 5 rounds (running runs stop at round 3, pending ones have none), 6 metrics per
site and round (150,000 ``site_metrics`` rows), failures in every tenth run, an admission
entry per run in the hash-chained audit log (``coordinator.audit.append_event``), and a
certificate per site. Run states: 70% completed, 10% failed, 10% running, 10% pending.

The real app (``coordinator.api.create_app``) is called in this process through Starlette's
test client (no network), logged in as an ML engineer through the portal's login form.
Server time is measured inside the app by an ASGI wrapper: from the request entering the
app to the last byte of the response body. Each page is requested 5 times to warm up, then
``--reps`` times; the table gives the median and the 95th percentile. The target is 300 ms.

    .venv/bin/python bench/dashboard.py [--reps 40] [--no-postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

N_RUNS = 1000
N_SITES = 50
N_PROJECTS = 10
SITES_PER_RUN = 5
ROUNDS = 5
TARGET_MS = 300.0
PASSWORD = "benchmark password 1234"  # noqa: S105 - a throw-away bench user

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


class ServerClock:
    """ASGI wrapper: the server time of the latest request, in ``last_ms``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.last_ms = float("nan")
        self.last_cpu_ms = float("nan")

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.last_ms = (time.perf_counter() - t0) * 1000
                # CPU of the whole process (the client waits meanwhile): what the page costs
                # when other programs do not compete for the cores.
                self.last_cpu_ms = (time.process_time() - c0) * 1000

        await self.app(scope, receive, timed_send)


def seed(db_url: str) -> dict[str, Any]:
    """Migrate and fill the database; return the ids the pages are asked about."""
    from sqlalchemy import insert

    from coordinator.audit import append_event
    from coordinator.auth import create_user
    from coordinator.db import make_engine, run_migrations, session_scope
    from coordinator.models import Project, Round, Run, Site, SiteCertificate, SiteMetric, utcnow
    from coordinator.repository import SERVERAPP_ACTOR
    from fedward.run_config import RunConfig

    rng = random.Random(12)
    run_migrations(db_url)
    engine = make_engine(db_url)
    sites = [f"hospital-{i:02d}" for i in range(N_SITES)]
    now = utcnow()
    try:
        with session_scope(engine) as session:
            create_user(session, name="bench-eng", role="ml_engineer", password=PASSWORD)
            projects = [Project(name=f"project-{i}") for i in range(N_PROJECTS)]
            session.add_all(projects)
            for i, name in enumerate(sites):
                site = Site(name=name, status="registered", flower_node_id=str(1000 + i),
                            registered_at=now - timedelta(days=90))
                session.add(site)
                session.flush()
                assert site.id is not None
                session.add(SiteCertificate(site_id=site.id, serial=f"{i:04x}",
                                            not_after=now + timedelta(days=rng.randint(3, 360))))
            session.flush()
            runs: list[tuple[Run, list[str], str]] = []
            for i in range(N_RUNS):
                state = ("completed",) * 7 + ("failed", "running", "pending")
                status = state[i % 10]
                chosen = rng.sample(sites, SITES_PER_RUN)
                project = projects[i % N_PROJECTS]
                assert project.id is not None
                config = RunConfig(rounds=ROUNDS, local_epochs=1, epsilon=4.0, delta=1e-5,
                                   min_sites=3, round_deadline_s=120.0, lr=0.1, batch_size=32,
                                   max_grad_norm=1.0, seed=i, sites=chosen)
                start = now - timedelta(minutes=N_RUNS - i)
                run = Run(project_id=project.id, task="breast_cancer_mlp", status=status,
                          config_json=config.model_dump_json(), launched_by="bench-eng",
                          created_at=start,
                          started_at=None if status == "pending" else start,
                          finished_at=start + timedelta(seconds=50)
                          if status in ("completed", "failed") else None,
                          failure_reason="round 5: 2 usable updates, the run needs at least 3"
                          if status == "failed" else None)
                session.add(run)
                runs.append((run, chosen, status))
            session.flush()
            metrics: list[dict[str, Any]] = []
            rounds: list[dict[str, Any]] = []
            for run, chosen, status in runs:
                assert run.id is not None
                played = {"pending": 0, "running": 3}.get(status, ROUNDS)
                for n in range(1, played + 1):
                    failed = ([{"site": chosen[0], "phase": "train", "reason": "late: no "
                                "reply within the 120 s round deadline"}]
                              if run.id % 10 == 0 and n == 2 else [])
                    rounds.append(dict(
                        run_id=run.id, number=n, started_at=run.created_at,
                        status="running" if status == "running" and n == played else "completed",
                        seconds=10.0, participating_sites_json=json.dumps(chosen),
                        failed_sites_json=json.dumps(failed), late_sites_json="[]"))
                    for k, site in enumerate(chosen):
                        values = {"eval-auc": 0.6 + 0.05 * n, "eval-loss": 0.8 - 0.1 * n,
                                  "eval-accuracy": 0.6 + 0.04 * n, "epsilon-spent": 0.7 * n,
                                  "num-examples": 200.0 + k, "num-eval-examples": 50.0}
                        metrics += [dict(run_id=run.id, round_number=n, site_name=site,
                                         name=name, value=value)
                                    for name, value in values.items()]
                if status != "pending":
                    append_event(session, actor=SERVERAPP_ACTOR, action="run.admitted",
                                 subject=f"run:{run.id}", detail={
                                     "state": "admitted", "accepted": chosen[1:],
                                     "waiting": {chosen[0]: {"since": now.isoformat(),
                                                             "reason": "local approval"}}
                                     if status == "running" else {},
                                     "refused": {}, "unanswered": {}, "offline": []})
            # Core bulk inserts: the ORM would spend minutes on 150,000 objects.
            session.execute(insert(Round), rounds)
            session.execute(insert(SiteMetric), metrics)
        detailed = next(r.id for r, _, s in runs if s == "completed")
        live = next(r.id for r, _, s in runs if s == "running")
        return {"completed": detailed, "running": live, "metrics": len(metrics),
                "rounds": len(rounds)}
    finally:
        engine.dispose()


def measure(db_url: str, home: Path, ids: dict[str, Any], reps: int) -> dict[str, Any]:
    """Median and p95 server time per page."""
    from starlette.testclient import TestClient

    from coordinator.api import create_app
    from coordinator.db import make_engine
    from coordinator.settings import Settings

    engine = make_engine(db_url)
    clock = ServerClock(create_app(settings=Settings(home=home, database_url=db_url),
                                   engine=engine))
    pages = {
        "runs, page 1": "/portal/runs",
        "runs, page 40 (last)": "/portal/runs?page=40",
        "runs, state + project filter": "/portal/runs?state=completed&project=project-3",
        "run (completed, 5 rounds x 5 sites)": f"/portal/runs/{ids['completed']}",
        "run (running)": f"/portal/runs/{ids['running']}",
        "sites (50)": "/portal/sites",
        "bad filter (422)": "/portal/runs?state=finished",
    }
    out: dict[str, Any] = {}
    try:
        with TestClient(clock, base_url="http://127.0.0.1") as client:
            r = client.post("/portal/login", data={"name": "bench-eng", "password": PASSWORD,
                                                   "next": "/portal/runs"},
                            follow_redirects=False)
            assert r.status_code == 303, r.text
            for label, path in pages.items():
                times, cpu = [], []
                for i in range(5 + reps):
                    r = client.get(path)
                    assert r.status_code == (422 if "422" in label else 200), (path, r.text)
                    if i >= 5:
                        times.append(clock.last_ms)
                        cpu.append(clock.last_cpu_ms)
                out[label] = {"path": path, "median_ms": bu.median(times),
                              "p95_ms": bu.percentile(times, 95), "max_ms": max(times),
                              "cpu_median_ms": bu.median(cpu),
                              "cpu_p95_ms": bu.percentile(cpu, 95),
                              "bytes": len(r.content), "reps": reps}
    finally:
        engine.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--keep", type=Path, help="an empty folder to fill and keep (SQLite only, "
                    "to profile the pages afterwards)")
    args = ap.parse_args()

    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = args.keep or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fw-dash-")))
        urls = {"SQLite": f"sqlite:///{tmp / 'coordinator.db'}"}
        notes = []
        if not args.no_postgres and args.keep is None:
            from api_load import postgres
            try:
                urls["PostgreSQL"] = stack.enter_context(postgres())
            except RuntimeError as err:
                notes.append(f"PostgreSQL not measured: {err}")
        for db, url in urls.items():
            home = tmp / db
            home.mkdir()
            t0 = time.monotonic()
            ids = seed(url)
            print(f"{db}: seeded in {time.monotonic() - t0:.0f} s ({ids})", flush=True)
            results[db] = {"seed": ids, "pages": measure(url, home, ids, args.reps)}

    rows = []
    for db, res in results.items():
        for label, fig in res["pages"].items():
            verdict = "yes" if fig["p95_ms"] < TARGET_MS else "NO"
            rows.append([db, label, bu.fmt(fig["median_ms"], 1), bu.fmt(fig["p95_ms"], 1),
                         bu.fmt(fig["cpu_median_ms"], 1), f"{fig['bytes'] // 1024} KiB",
                         verdict])
    md = (f"\n### Dashboard pages: server time with {N_RUNS} runs and {N_SITES} sites\n\n"
          f"{args.reps} requests per page after 5 warm-ups, in process (no network); "
          f"{N_RUNS * 0.7 * ROUNDS * SITES_PER_RUN * 6:,.0f}+ metric rows. Target: p95 under "
          f"{TARGET_MS:.0f} ms. CPU: the process's CPU time per request (the "
          "wall-clock figures grow with the machine's load).\n\n"
          + bu.md_table(["Database", "Page", "median ms", "p95 ms", "CPU median ms", "size",
                        "p95 < 300 ms"], rows)
          + "".join(f"\n{n}\n" for n in notes))
    bu.write_results("dashboard", {"results": results, "reps": args.reps,
                                   "target_ms": TARGET_MS, "notes": notes}, md)


if __name__ == "__main__":
    main()
