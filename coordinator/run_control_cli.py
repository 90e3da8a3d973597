"""``fedward-coordinator watch``, ``runs``, ``rounds``, ``cancel``, ``wait`` and ``compare``:
following and controlling runs once launched, through the REST API.

What these commands compute (exit codes, comparisons, ``watch --json`` snapshots) is
:mod:`coordinator.run_cli`; this module declares them and draws the progress table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.padding import Padding
from rich.table import Column, Table
from rich.text import Text

from coordinator import run_cli
from coordinator.cli_client import ApiClient, CoordinatorUnreachable, fail
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt
from coordinator.cli_tables import id_column, text_column

__all__ = ["add_run_control_commands", "waiting_note"]

console = Console()
err_console = Console(stderr=True)

# `watch` retries an unreachable coordinator after 1 s, doubling up to 15 s between tries.
WATCH_RETRY_FIRST_S: Final = 1.0
WATCH_RETRY_MAX_S: Final = 15.0


def waiting_note(run: dict[str, Any]) -> str:
    """What a run waits for, for people: empty unless sites wait for a local approval."""
    sites = run.get("waiting_for_approval") or []
    if not sites:
        return ""
    since = str(run.get("waiting_since") or "")[11:19]
    return (f"waiting for approval at {', '.join(sites)}"
            + (f" since {since} UTC" if since else "")
            + f": {'its' if len(sites) == 1 else 'their'} IT runs "
            f"`fedward-site approve {run['id']}`")


def _progress_table(run: dict[str, Any], rounds: list[dict[str, Any]],
                    metrics: dict[str, Any]) -> Group:
    """The run's rounds, one line per site, then each failed or late site with its reason.

    The reasons sit under the table, whole and wrapped between words: in a column of their own
    they left nine columns to share 80, and rich cut site names, statuses and reasons
    mid-word ("hospi…", "(refused-…"). Each round's seconds sit under its number for the same
    reason.
    """
    cfg = run.get("config") or {}
    note = waiting_note(run)
    by_round: dict[int, dict[str, dict[str, float]]] = {
        int(r["round"]): r["sites"] for r in metrics.get("rounds", [])
    }
    site_names = [name for sites in by_round.values() for name in sites]
    table = Table(Column("round", no_wrap=True),
                  id_column("status", [str(r["status"]) for r in rounds]),
                  id_column("site", site_names),
                  "eval AUC", "eval acc", "eval loss", "epsilon",
                  title=f"run {run['id']} · {run['task']} · {run['status']}"
                  + (f" · {run['failure_reason']}" if run.get("failure_reason") else "")
                  + (f"\n{note}" if note else ""))
    total = cfg.get("rounds", "?")
    failures: list[str] = []
    for rnd in rounds:
        n = int(rnd["number"])
        sites = by_round.get(n, {})
        failures += [f"round {n} · {f['site']}: {f['reason']}"
                     for f in rnd.get("failed_sites", [])]
        first = True
        for site_name, vals in sorted(sites.items()) or [("-", {})]:
            table.add_row(
                (f"{n}/{total}" + (f"\n{rnd['seconds']:.2f} s" if rnd.get("seconds") else ""))
                if first else "",
                rnd["status"] if first else "", site_name,
                _fmt(vals.get("eval-auc")), _fmt(vals.get("eval-accuracy")),
                _fmt(vals.get("eval-loss")), _fmt(vals.get("epsilon-spent")),
            )
            first = False
    if not failures:
        return Group(table)
    return Group(table, Text("failed / late:"),
                 *(Padding(Text(line, overflow="fold"), (0, 0, 0, 2)) for line in failures))


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _watch_json(client: ApiClient, run_id: int, *, deadline: float, timeout: float,
                interval: float) -> None:
    """``watch --json``: print a JSON line whenever the run, its rounds or metrics change."""
    last = ""
    pause, down_since = WATCH_RETRY_FIRST_S, None
    while True:
        try:
            snapshot = run_cli.watch_snapshot(
                client.call_or_raise("GET", f"/runs/{run_id}"),
                client.call_or_raise("GET", f"/runs/{run_id}/rounds"),
                client.call_or_raise("GET", f"/runs/{run_id}/metrics"))
        except CoordinatorUnreachable as err:  # a restart: as the table view, on stderr
            if down_since is None:
                down_since = time.monotonic()
                err_console.print(f"the coordinator at {client.base} is unreachable ({err}); "
                                  "retrying until it is back")
            if time.monotonic() + pause > deadline:
                fail(f"the coordinator at {client.base} is still unreachable after "
                      f"{time.monotonic() - down_since:.0f} s (--timeout {timeout:.0f} s)")
            time.sleep(pause)
            pause = min(pause * 2, WATCH_RETRY_MAX_S)
            continue
        pause, down_since = WATCH_RETRY_FIRST_S, None
        line = json.dumps(snapshot, sort_keys=True)
        if line != last:
            print(line, flush=True)
            last = line
        status = snapshot["run"]["status"]
        if status in run_cli.FINAL_STATUSES:
            if status != "completed":
                raise typer.Exit(2)
            return
        if time.monotonic() > deadline:
            fail(f"run {run_id} still {status} after {timeout:.0f} s")
        time.sleep(interval)


def add_run_control_commands(
        app: typer.Typer,
        api_client: Callable[[str | None, str | None, Path | None], ApiClient]) -> None:
    """Declare ``watch``, ``runs``, ``rounds``, ``cancel``, ``wait`` and ``compare`` on
    ``fedward-coordinator``'s app.

    Args:
        app: ``fedward-coordinator``'s Typer app.
        api_client: Makes the REST client from ``--api``, ``--token`` and ``--home``.
    """

    @app.command()
    def watch(run_id: int, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
              timeout: Annotated[float, typer.Option(help="stop watching after this many "
                                                     "seconds")] = 3600.0,
              interval: Annotated[float, typer.Option()] = 1.0,
              as_json: Annotated[bool, typer.Option(
                  "--json", help="one JSON object per line for every change: run, rounds, "
                                 "metrics")] = False) -> None:
        """Show a run's progress per round and site, live, until it ends.

        While the coordinator is unreachable (restarting), says so once and tries again with a
        growing pause (1 s doubling to 15 s), then goes on where it was; --timeout still bounds
        the whole watch.
        """
        client = api_client(api, token, home)
        deadline = time.monotonic() + timeout
        if as_json:
            _watch_json(client, run_id, deadline=deadline, timeout=timeout, interval=interval)
            return
        pause, down_since = WATCH_RETRY_FIRST_S, None
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                try:
                    run = client.call_or_raise("GET", f"/runs/{run_id}")
                    rounds = client.call_or_raise("GET", f"/runs/{run_id}/rounds")
                    metrics = client.call_or_raise("GET", f"/runs/{run_id}/metrics")
                except CoordinatorUnreachable as err:
                    if down_since is None:
                        down_since = time.monotonic()
                        err_console.print(f"the coordinator at {client.base} is unreachable "
                                          f"({err}); retrying until it is back")
                    if time.monotonic() + pause > deadline:
                        fail(f"the coordinator at {client.base} is still unreachable after "
                              f"{time.monotonic() - down_since:.0f} s; stopped watching run "
                              f"{run_id} (--timeout {timeout:.0f} s)")
                    time.sleep(pause)
                    pause = min(pause * 2, WATCH_RETRY_MAX_S)
                    continue
                if down_since is not None:
                    err_console.print(f"the coordinator is reachable again after "
                                      f"{time.monotonic() - down_since:.0f} s; watching run "
                                      f"{run_id}")
                    pause, down_since = WATCH_RETRY_FIRST_S, None
                live.update(_progress_table(run, rounds, metrics))
                if run["status"] in run_cli.FINAL_STATUSES:
                    break
                if time.monotonic() > deadline:
                    fail(f"run {run_id} still {run['status']} after {timeout:.0f} s")
                time.sleep(interval)
        if run["status"] != "completed":
            raise typer.Exit(2)

    @app.command()
    def runs(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List runs (newest first)."""
        client = api_client(api, token, home)
        rows = client.call("GET", "/runs")
        if as_json:
            print(json.dumps(rows))
            return
        # Project over task, and who over the day over the time, so that ids stay whole and
        # the reason keeps room to wrap between words at 80 columns.
        table = Table(id_column("id", [str(r["id"]) for r in rows]),
                      id_column("project / task", [str(v) for r in rows
                                                   for v in (r.get("project", ""), r["task"])]),
                      id_column("status", [r["status"] for r in rows]),
                      Column("launched"), text_column("reason / note"), expand=True)
        for r in rows:
            table.add_row(str(r["id"]), f"{r.get('project', '')}\n{r['task']}", r["status"],
                          "\n".join([str(r.get("launched_by", "")),
                                     *str(r.get("created_at", ""))[:19].split("T")]),
                          str(r.get("failure_reason") or waiting_note(r)))
        console.print(table)


    @app.command()
    def rounds(run_id: int, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List a run's rounds and per-site metrics."""
        client = api_client(api, token, home)
        run = client.call("GET", f"/runs/{run_id}")
        rnds = client.call("GET", f"/runs/{run_id}/rounds")
        metrics = client.call("GET", f"/runs/{run_id}/metrics")
        if as_json:
            print(json.dumps({"run": run, "rounds": rnds, "metrics": metrics}))
        else:
            console.print(_progress_table(run, rnds, metrics))


    @app.command()
    def cancel(run_id: int,
               reason: Annotated[str, typer.Option(help="why (kept in the audit logs of the "
                                                        "coordinator and of every site)")],
               wait: Annotated[bool, typer.Option(
                   "--wait", help="wait until the run has ended")] = False,
               home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Cancel a pending or running run: it ends within its round deadline plus 5 s."""
        client = api_client(api, token, home)
        run = client.call("POST", f"/runs/{run_id}/cancel", {"reason": reason})
        if wait:
            limit = float(run["config"]["round_deadline_s"]) + 60.0
            code, run = run_cli.wait_for_run(client, run_id, timeout=limit, interval=1.0)
            if code == run_cli.WAIT_TIMED_OUT:
                fail(f"run {run_id} still {run['status']} {limit:.0f} s after the cancel")
        if as_json:
            print(json.dumps(run))
            return
        if run["status"] in run_cli.FINAL_STATUSES:
            console.print(f"run [bold]{run_id}[/] {run['status']}: {run.get('failure_reason')}")
        else:
            console.print(f"run [bold]{run_id}[/]: cancel requested by {run['cancelled_by']} "
                          f"({run['cancel_reason']}); it ends within its round deadline "
                          f"({run['config']['round_deadline_s']:g} s) plus 5 s: "
                          f"`fedward-coordinator wait {run_id}`")


    @app.command()
    def wait(run_id: int,
             timeout: Annotated[float, typer.Option(
                 help="give up after this many seconds (exit code 6)")] = 86400.0,
             interval: Annotated[float, typer.Option(help="seconds between polls")] = 5.0,
             home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Wait until a run ends; the exit code says how (for schedulers and scripts).

        0 completed, 3 failed, 4 cancelled, 5 stopped outside the coordinator, 6 --timeout
        passed; 1 the command could not ask (API, run id, token), 2 a usage error.
        """
        client = api_client(api, token, home)
        code, run = run_cli.wait_for_run(client, run_id, timeout=timeout, interval=interval)
        if as_json:
            print(json.dumps(run))
        elif code == run_cli.WAIT_TIMED_OUT:
            err_console.print(f"run {run_id} still {run['status']} after {timeout:g} s")
        else:
            print(f"run {run_id} {run['status']}"
                  + (f": {run['failure_reason']}" if run.get("failure_reason") else ""))
        raise typer.Exit(code)


    @app.command()
    def compare(run_a: int, run_b: int, home: HomeOpt = None, api: ApiOpt = None,
                token: TokenOpt = None,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Compare two runs: configuration differences, per-round and final metrics."""
        client = api_client(api, token, home)
        data = run_cli.compare_runs(
            client.call("GET", f"/runs/{run_a}"), client.call("GET", f"/runs/{run_a}/metrics"),
            client.call("GET", f"/runs/{run_b}"), client.call("GET", f"/runs/{run_b}/metrics"))
        if as_json:
            print(json.dumps(data))
        else:
            print(run_cli.render_comparison(data, width=80))
