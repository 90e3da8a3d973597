"""``fedward-coordinator``: the central ML team's command line.

``init`` and ``serve`` act on the data directory; every other command talks to the REST API
of a running coordinator with an API token (``--token``, ``FEDWARD_TOKEN`` or the admin
token that ``init`` wrote into the data directory).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final

import click
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table

from coordinator import evaluation_cli, run_cli
from coordinator.cli_client import (
    ADMIN_TOKEN_FILE,
    ApiClient,
    CoordinatorUnreachable,
    api_client,
    fail,
    settings_for,
)
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt
from coordinator.drift_cli import make_drift_app
from coordinator.mlflow_cli import mlflow_app
from coordinator.release_cli import release_app
from coordinator.run_statistics_cli import add_statistics_command
from coordinator.study_cli import make_study_app
from coordinator.tuning_cli import make_tuning_app
from fedward.files import atomic_write
from fedward.roles import ADMIN
from fedward.run_config import RunRequest

__all__ = ["ApiClient", "CoordinatorUnreachable", "app", "main", "waiting_note"]

app = typer.Typer(help="Fedward coordinator: sites, runs, rounds.", no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)


# `watch` retries an unreachable coordinator after 1 s, doubling up to 15 s between tries.
WATCH_RETRY_FIRST_S: Final = 1.0
WATCH_RETRY_MAX_S: Final = 15.0
app.add_typer(release_app, name="release")
evaluation_cli.add_commands(app, lambda api, token, home: api_client(api, token, home))
app.add_typer(mlflow_app, name="mlflow")
app.add_typer(make_study_app(lambda api, token, home: api_client(api, token, home)), name="study")
add_statistics_command(app, lambda api, token, home: api_client(api, token, home))
app.add_typer(make_tuning_app(lambda api, token, home: api_client(api, token, home)), name="tune")
app.add_typer(make_drift_app(lambda api, token, home: api_client(api, token, home)), name="drift")


def _print_version(value: bool) -> None:
    if value:
        print(run_cli.version_line("fedward-coordinator"))
        raise typer.Exit()


@app.callback()
def _main_options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="print the version and the commit it was built from, then exit")] = False
                  ) -> None:
    """Fedward coordinator: sites, runs, rounds."""


@app.command()
def init(home: HomeOpt = None,
         admin: Annotated[str, typer.Option(help="name of the first admin account")] = "admin"
         ) -> None:
    """Create the data directory, the site CA, the database schema and the first admin."""
    from sqlmodel import select

    from coordinator.auth import create_user
    from coordinator.db import make_engine, session_scope
    from coordinator.models import User
    from coordinator.service import init_home

    settings = settings_for(home)
    pki = init_home(settings)
    engine = make_engine(settings.effective_database_url)
    token_file = settings.home / ADMIN_TOKEN_FILE
    with session_scope(engine) as session:
        if session.exec(select(User).where(User.name == admin)).first() is None:
            _user, token = create_user(session, name=admin, role=ADMIN,
                                       token_ttl=timedelta(days=settings.token_ttl_days))
            _write_token_file(token_file, token)
            console.print(f"admin account [bold]{admin}[/] created; its API token is in "
                          f"{token_file} (mode 0600, valid {settings.token_ttl_days} days: "
                          "renew it with `fedward-coordinator admin-token`)")
    engine.dispose()
    console.print(f"coordinator initialised in {settings.home}")
    console.print(f"site CA certificate: {pki.ca_cert} (sites get it with their enrollment "
                  "token, which pins it: `fedward-coordinator enroll-token SITE`)")


def _write_token_file(path: Path, token: str) -> None:
    atomic_write(path, token + "\n", mode=0o600)


@app.command("admin-token")
def admin_token(home: HomeOpt = None,
                admin: Annotated[str, typer.Option(help="the admin account")] = "admin") -> None:
    """Issue the admin a new API token, directly in the database, into the admin token file.

    For the coordinator host only (it needs the data directory): when the admin's token
    expired or was revoked, or to rotate it. The previous token stops working.
    """
    from sqlmodel import select

    from coordinator.db import make_engine, session_scope
    from coordinator.models import User
    from coordinator.users_api import issue_api_token

    settings = settings_for(home)
    if not (settings.home / "pki").exists():
        fail(f"{settings.home} is not a coordinator data directory; give --home or set "
              "FEDWARD_HOME (run `fedward-coordinator init` first on a new host)")
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(engine) as session:
            user = session.exec(select(User).where(User.name == admin)).first()
            if user is None or user.role != ADMIN:
                fail(f"no admin account named {admin!r}; give its name with --admin")
            assert user is not None
            if user.disabled_at is not None:
                fail(f"admin {admin!r} is disabled; another admin can enable it "
                      f"(`fedward-coordinator enable-user {admin}`)")
            token = issue_api_token(session, user, actor="local:admin-token",
                                    ttl=timedelta(days=settings.token_ttl_days))
            expires = user.token_expires_at
    finally:
        engine.dispose()
    token_file = settings.home / ADMIN_TOKEN_FILE
    _write_token_file(token_file, token)
    console.print(f"new API token for [bold]{admin}[/] in {token_file} (mode 0600), valid "
                  f"until {expires:%Y-%m-%d %H:%M} UTC; the previous one no longer works")


@app.command()
def serve(home: HomeOpt = None,
          port: Annotated[int | None, typer.Option(help="REST API port")] = None,
          superlink_port: Annotated[int, typer.Option(
              help="SuperLink port on 127.0.0.1 inside its private network namespace "
                   "(0: pick one); the coordinator reaches it through run/superlink.sock")
          ] = 0,
          fleet_port: Annotated[int | None, typer.Option(
              help="site gateway port (the one port sites connect to)")] = None) -> None:
    """Run the coordinator: SuperLink (private namespace), gateway and REST API, until
    Ctrl-C/SIGTERM."""
    from coordinator.service import Coordinator

    # force: an import on the way (Opacus, through the privacy accounting) configures the
    # root logger itself, which would make this a no-op and the coordinator's log silent.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per SuperLink call
    settings = settings_for(home)
    if port is not None:
        settings = settings.model_copy(update={"api_port": port})
    if fleet_port is not None:
        settings = settings.model_copy(update={"fleet_port": fleet_port})
    from coordinator.ports import opened_ports, port_problem
    from coordinator.superlink import SuperLinkError

    clash = port_problem(opened_ports(settings, superlink_port=superlink_port,
                                      mode=settings.flower_isolation))
    if clash is not None:
        fail(clash)
    try:
        Coordinator(settings=settings, superlink_port=superlink_port).serve()
    except SuperLinkError as err:
        fail(f"the Flower SuperLink could not start: {err}")


@app.command("add-site")
def add_site(name: str,
             node_key: Annotated[Path | None, typer.Option(
                 "--node-key", help="the site's node public key file (node_key.pub)")] = None,
             home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Add a site and, with --node-key, register its Flower node key."""
    client = api_client(api, token, home)
    existing = {s["name"] for s in client.call("GET", "/sites")}
    if name not in existing:
        client.call("POST", "/sites", {"name": name})
    if node_key is not None:
        if not node_key.exists():
            fail(f"{node_key} does not exist; copy node_key.pub from the site's keys folder")
        site = client.call("POST", f"/sites/{name}/node-key",
                           {"public_key": node_key.read_text().strip()})
        console.print(f"site [bold]{name}[/] registered (Flower node {site.get('flower_node_id')})")
    else:
        console.print(f"site [bold]{name}[/] added; register its node key with --node-key")


@app.command("enroll-token")
def enroll_token(name: str, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Add the site if new and issue its one-time enrollment token (valid 24 h)."""
    client = api_client(api, token, home)
    if name not in {s["name"] for s in client.call("GET", "/sites")}:
        client.call("POST", "/sites", {"name": name})
    out = client.call("POST", f"/sites/{name}/enrollment-token")
    if as_json:
        print(json.dumps(out))
        return
    console.print(f"enrollment token for [bold]{name}[/] (one use, expires "
                  f"{out['expires_at'][:16]} UTC):")
    print(out["token"])
    console.print("send it to the site's IT with the fleet address "
                  f"[bold]{out['fleet_address']}[/]; they run:\n  fedward-site enroll --dir DIR "
                  f"--gateway {out['fleet_address']} --token TOKEN")


@app.command()
def sites(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the sites: status (added, registered, revoked), online or not and when the
    gateway last heard from it, the Fedward and Flower versions its agent reported, when its
    certificate expires, Flower node, registration time."""
    client = api_client(api, token, home)
    rows = client.call("GET", "/sites")
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "status", "online", "last seen (UTC)", "Flower node", "registered",
                  "added")
    for s in rows:
        table.add_row(s["name"], s["status"], "online" if s.get("online") else "offline",
                      str(s.get("last_seen_at") or "never")[:19].replace("T", " "),
                      str(s.get("flower_node_id") or ""),
                      str(s.get("registered_at") or "")[:19], str(s.get("created_at", ""))[:19])
    console.print(table)
    # A second table: one table with every column would not fit 80 columns.
    versions = Table("name", Column("Fedward", overflow="fold"), Column("Flower", overflow="fold"),
                     "reported (UTC)", "certificate expires")
    for s in rows:
        versions.add_row(s["name"], str(s.get("agent_version") or "-"),
                         str(s.get("flower_version") or "-"),
                         f"{str(s.get('versions_at'))[:16].replace('T', ' ')} at "
                         f"{s.get('versions_via')}" if s.get("versions_at") else "never",
                         str(s["certificate_expires_at"])[:10]
                         if s.get("certificate_expires_at") else "no valid certificate")
    console.print(versions)


@app.command("revoke-site")
def revoke_site(name: str,
                reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
                home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Revoke a site: its certificates stop working at the gateway at once."""
    client = api_client(api, token, home)
    client.call("POST", f"/sites/{name}/revoke", {"reason": reason})
    console.print(f"site [bold]{name}[/] revoked")


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that reads as a JSON number or true/false is one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"{option} {item!r}: write KEY=VALUE, e.g. {option} server_lr=0.5")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value if isinstance(value, int | float | bool) else raw
    return out
def _run_option(name: str, *flags: str) -> Any:
    """A ``launch`` option for the run setting ``name``, described by the run config."""
    return typer.Option(*flags, help=RunRequest.model_fields[name].description)


# The run config's defaults (the ones the API uses too), for the options below.
_DEF: Final[dict[str, Any]] = {
    name: info.get_default() for name, info in RunRequest.model_fields.items()
    if not info.is_required()}


# Option -> the run config field it sets (every other option has the field's own name).
LAUNCH_OPTION_FIELDS: Final = {"round_deadline": "round_deadline_s",
                               "approval_wait": "approval_wait_s", "site": "sites",
                               "offline_grace": "offline_grace_s"}


@app.command()
def launch(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="project name (created if new)")] = None,
    task: Annotated[str | None, typer.Option(
        help="task from the registry, e.g. breast_cancer_mlp (or --study)")] = None,
    epsilon: Annotated[float | None, _run_option("epsilon")] = None,
    study: Annotated[str | None, _run_option("study")] = None,
    from_run: Annotated[int | None, typer.Option(
        "--from", metavar="RUN",
        help="launch again with this run's recorded configuration; any option given "
             "replaces its setting")] = None,
    rounds: Annotated[int, _run_option("rounds")] = _DEF["rounds"],
    local_epochs: Annotated[int, _run_option("local_epochs")] = _DEF["local_epochs"],
    delta: Annotated[float, _run_option("delta")] = _DEF["delta"],
    min_sites: Annotated[int, _run_option("min_sites")] = _DEF["min_sites"],
    round_deadline: Annotated[float, _run_option("round_deadline_s")] = _DEF["round_deadline_s"],
    offline_grace: Annotated[float, _run_option("offline_grace_s")] = _DEF["offline_grace_s"],
    lr: Annotated[float | None, _run_option("lr")] = _DEF["lr"],
    batch_size: Annotated[int | None, _run_option("batch_size")] = _DEF["batch_size"],
    max_grad_norm: Annotated[float, _run_option("max_grad_norm")] = _DEF["max_grad_norm"],
    seed: Annotated[int, _run_option("seed")] = _DEF["seed"],
    site: Annotated[list[str] | None, _run_option("sites", "--site")] = _DEF["sites"],
    aggregation: Annotated[str, _run_option("aggregation")] = _DEF["aggregation"],
    aggregation_option: Annotated[list[str] | None, typer.Option(
        "--aggregation-option", metavar="KEY=VALUE",
        help="an option of the aggregation, repeatable, e.g. server_lr=0.5 momentum=0.9 "
             "(docs/ml-team-guide.md lists each strategy's options)")] = None,
    approval_wait: Annotated[float, _run_option("approval_wait_s")] = _DEF["approval_wait_s"],
    max_update_norm: Annotated[float | None,
                               _run_option("max_update_norm")] = _DEF["max_update_norm"],
    statistics: Annotated[bool, _run_option("statistics", "--statistics/--no-statistics")
                          ] = _DEF["statistics"],
    statistics_epsilon: Annotated[float | None, _run_option("statistics_epsilon")
                                  ] = _DEF["statistics_epsilon"],
    secure_aggregation: Annotated[bool, _run_option(
        "secure_aggregation", "--secure-aggregation/--no-secure-aggregation")
                                  ] = _DEF["secure_aggregation"],
    secagg_threshold: Annotated[int | None, _run_option("secagg_threshold")
                                ] = _DEF["secagg_threshold"],
    secagg_clip: Annotated[float, _run_option("secagg_clip")] = _DEF["secagg_clip"],
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Launch a federated DP run (options and defaults: the run configuration's).

    --project, --task and --epsilon are needed unless --from RUN gives them.
    """
    client = api_client(api, token, home)
    given = {"project": project, "task": task, "study": study, "rounds": rounds,
             "local_epochs": local_epochs,
             "epsilon": epsilon, "delta": delta, "min_sites": min_sites,
             "round_deadline": round_deadline, "offline_grace": offline_grace, "lr": lr,
             "batch_size": batch_size,
             "max_grad_norm": max_grad_norm, "seed": seed, "site": site or None,
             "aggregation": aggregation, "approval_wait": approval_wait,
             "max_update_norm": max_update_norm, "statistics": statistics,
             "statistics_epsilon": statistics_epsilon,
             "secure_aggregation": secure_aggregation, "secagg_threshold": secagg_threshold,
             "secagg_clip": secagg_clip}
    # Unset optional settings are left out: the coordinator fills in the task's defaults.
    body: dict[str, Any] = {LAUNCH_OPTION_FIELDS.get(k, k): v for k, v in given.items()
                            if v is not None}
    if study is not None:  # options left at their defaults take the study's own
        body = {k: v for k, v in body.items()
                if k not in ("local_epochs", "max_grad_norm") or v != _DEF[k]}
    if aggregation_option:
        body["aggregation_options"] = _key_values(aggregation_option, "--aggregation-option")
    if from_run is not None:
        # Only what was typed replaces the recorded setting, not an option's default.
        typed = {k for k in given if ctx.get_parameter_source(k) not in (
            None, click.core.ParameterSource.DEFAULT)}
        overrides = {LAUNCH_OPTION_FIELDS.get(k, k): v for k, v in given.items()
                     if k in typed and v is not None}
        if "aggregation_options" in body:
            overrides["aggregation_options"] = body["aggregation_options"]
        body = run_cli.relaunch_body(client.call("GET", f"/runs/{from_run}"), overrides)
    missing = [f"--{k}" for k in ("project", "epsilon") if body.get(k) is None]
    if body.get("task") is None and body.get("study") is None:
        missing.insert(1, "--task (or --study)")
    if missing:
        fail(f"{', '.join(missing)} needed (or --from RUN, to launch a recorded run again)",
              code=2)
    if body["project"] not in {p["name"] for p in client.call("GET", "/projects")}:
        client.call("POST", "/projects", {"name": body["project"]})
    run = client.call("POST", "/runs", body)
    if as_json:
        print(json.dumps(run))
    else:
        origin = f" from run {from_run}'s configuration" if from_run is not None else ""
        console.print(f"run [bold]{run['id']}[/] launched{origin} (Flower run "
                      f"{run.get('flwr_run_id')}); watch it with `fedward-coordinator watch "
                      f"{run['id']}`")


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
                    metrics: dict[str, Any]) -> Table:
    cfg = run.get("config") or {}
    note = waiting_note(run)
    table = Table(title=f"run {run['id']} · {run['task']} · {run['status']}"
                  + (f" · {run['failure_reason']}" if run.get("failure_reason") else "")
                  + (f"\n{note}" if note else ""))
    for col in ("round", "status", "seconds", "site", "eval AUC", "eval acc", "eval loss",
                "epsilon", "failed / late"):
        table.add_column(col)
    by_round: dict[int, dict[str, dict[str, float]]] = {
        int(r["round"]): r["sites"] for r in metrics.get("rounds", [])
    }
    total = cfg.get("rounds", "?")
    for rnd in rounds:
        n = int(rnd["number"])
        sites = by_round.get(n, {})
        failed = ", ".join(f"{f['site']} ({f['reason'][:60]})" for f in rnd.get("failed_sites", []))
        first = True
        for site_name, vals in sorted(sites.items()) or [("-", {})]:
            table.add_row(
                f"{n}/{total}" if first else "", rnd["status"] if first else "",
                f"{rnd['seconds']:.2f}" if first and rnd.get("seconds") else "",
                site_name,
                _fmt(vals.get("eval-auc")), _fmt(vals.get("eval-accuracy")),
                _fmt(vals.get("eval-loss")), _fmt(vals.get("epsilon-spent")),
                failed if first else "",
            )
            first = False
    return table


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


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


@app.command()
def runs(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
         as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List runs (newest first)."""
    client = api_client(api, token, home)
    rows = client.call("GET", "/runs")
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("id", "project", "task", "status", "launched by", "created", "reason / note")
    for r in rows:
        table.add_row(str(r["id"]), str(r.get("project", "")), r["task"], r["status"],
                      str(r.get("launched_by", "")), str(r.get("created_at", ""))[:19],
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


@app.command("create-user")
def create_user_cmd(
    name: str,
    role: Annotated[str, typer.Option(help="admin, ml_engineer, reviewer or clinician")],
    password: Annotated[str | None, typer.Option(
        help="password for the release portal and POST /login (asked if omitted)")] = None,
    no_password: Annotated[bool, typer.Option(
        "--no-password", help="a token-only account (scripts, services)")] = False,
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
) -> None:
    """Create a user (admins); prints its API token once."""
    if password is None and not no_password:
        password = typer.prompt("password (12 characters or more)", hide_input=True,
                                confirmation_prompt=True)
    body: dict[str, Any] = {"name": name, "role": role}
    if not no_password:
        body["password"] = password
    out = api_client(api, token, home).call("POST", "/users", body)
    console.print(f"user [bold]{name}[/] ({role}) created; its API token, shown only now:")
    print(out["token"])


@app.command()
def users(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the users (admins): role, when the API token expires, disabled or not."""
    rows = api_client(api, token, home).call("GET", "/users")
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "role", "API token", "state")
    for u in rows:
        expires = f"expires {str(u['token_expires_at'])[:16]}"
        table.add_row(u["name"], u["role"], "revoked" if u["token_revoked"] else expires,
                      f"disabled since {str(u['disabled_at'])[:16]}" if u.get("disabled_at")
                      else "enabled")
    console.print(table)


@app.command("new-token")
def new_token(name: str, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None
              ) -> None:
    """Issue a user a new API token (admins for anyone, a user for themself); the old one
    stops working. Prints the token once."""
    out = api_client(api, token, home).call("POST", f"/users/{name}/token")
    console.print(f"new API token for [bold]{name}[/], valid until "
                  f"{str(out['expires_at'])[:16]} UTC, shown only now:")
    print(out["token"])


@app.command("revoke-tokens")
def revoke_tokens(name: str, home: HomeOpt = None, api: ApiOpt = None,
                  token: TokenOpt = None) -> None:
    """Revoke a user's API token and end all its login sessions (admins for anyone, a user
    for themself)."""
    api_client(api, token, home).call("POST", f"/users/{name}/revoke-tokens")
    console.print(f"every token of [bold]{name}[/] is revoked; `fedward-coordinator new-token "
                  f"{name}` issues a new one")


@app.command("disable-user")
def disable_user(name: str,
                 reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
                 home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Disable a user (admins): no login and no token of theirs works until enabled."""
    api_client(api, token, home).call("POST", f"/users/{name}/disable", {"reason": reason})
    console.print(f"user [bold]{name}[/] disabled")


@app.command("enable-user")
def enable_user(name: str, home: HomeOpt = None, api: ApiOpt = None,
                token: TokenOpt = None) -> None:
    """Enable a disabled user again (admins); its old tokens stay revoked."""
    api_client(api, token, home).call("POST", f"/users/{name}/enable")
    console.print(f"user [bold]{name}[/] enabled; it logs in with its password, or "
                  f"`fedward-coordinator new-token {name}` gives it an API token")


@app.command("delete-user")
def delete_user(name: str,
                yes: Annotated[bool, typer.Option("--yes", help="do not ask to confirm")] = False,
                home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Delete a user (admins): account, password and sessions. The audit log keeps what it
    did."""
    if not yes and not typer.confirm(f"delete user {name}?"):
        raise typer.Exit(1)
    api_client(api, token, home).call("DELETE", f"/users/{name}")
    console.print(f"user [bold]{name}[/] deleted")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
