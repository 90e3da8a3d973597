"""``fedward-coordinator``: the central ML team's command line.

``init`` and ``serve`` act on the data directory; every other command talks to the REST API
of a running coordinator with an API token (``--token``, ``FEDWARD_TOKEN`` or the admin
token that ``init`` wrote into the data directory).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt
from coordinator.mlflow_cli import mlflow_app
from coordinator.release_cli import release_app
from coordinator.settings import Settings, load_settings
from coordinator.study_cli import make_study_app
from fedward.files import atomic_write
from fedward.roles import ADMIN
from fedward.run_config import RunRequest

__all__ = ["ApiClient", "app", "main", "waiting_note"]

app = typer.Typer(help="Fedward coordinator: sites, runs, rounds.", no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)


ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret
app.add_typer(release_app, name="release")
app.add_typer(mlflow_app, name="mlflow")
app.add_typer(make_study_app(lambda api, token, home: _client(api, token, home)), name="study")


def _settings(home: Path | None) -> Settings:
    return load_settings(home.expanduser().resolve() if home else None)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


class ApiClient:
    """A thin REST client that turns HTTP errors into one readable message."""

    def __init__(self, base: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = base.rstrip("/")
        self._http = httpx.Client(base_url=self.base + "/api/v1", headers=headers, timeout=30)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.ConnectError:
            _fail(f"the coordinator API at {self.base} is not reachable; is "
                  "`fedward-coordinator serve` running?")
        if r.status_code >= 400:
            try:
                detail = r.json()
                msg = detail.get("message") or detail.get("detail")
            except ValueError:
                msg = r.text
            _fail(f"{method} {path} -> {r.status_code}: {msg}")
        return r.json() if r.content else None


def _client(api: str | None, token: str | None, home: Path | None) -> ApiClient:
    base = api or os.environ.get("FEDWARD_API")
    settings = _settings(home)
    if base is None:
        base = f"http://{settings.api_host}:{settings.api_port}"
    tok = token or os.environ.get("FEDWARD_TOKEN")
    if tok is None:
        f = settings.home / ADMIN_TOKEN_FILE
        if f.exists():
            tok = f.read_text().strip()
    return ApiClient(base, tok)


@app.command()
def init(home: HomeOpt = None,
         admin: Annotated[str, typer.Option(help="name of the first admin account")] = "admin"
         ) -> None:
    """Create the data directory, the site CA, the database schema and the first admin."""
    from sqlmodel import select

    from coordinator.api import create_user
    from coordinator.db import make_engine, session_scope
    from coordinator.models import User
    from coordinator.service import init_home

    settings = _settings(home)
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

    settings = _settings(home)
    if not (settings.home / "pki").exists():
        _fail(f"{settings.home} is not a coordinator data directory; give --home or set "
              "FEDWARD_HOME (run `fedward-coordinator init` first on a new host)")
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(engine) as session:
            user = session.exec(select(User).where(User.name == admin)).first()
            if user is None or user.role != ADMIN:
                _fail(f"no admin account named {admin!r}; give its name with --admin")
            assert user is not None
            if user.disabled_at is not None:
                _fail(f"admin {admin!r} is disabled; another admin can enable it "
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

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per SuperLink call
    settings = _settings(home)
    if port is not None:
        settings = settings.model_copy(update={"api_port": port})
    if fleet_port is not None:
        settings = settings.model_copy(update={"fleet_port": fleet_port})
    from coordinator.superlink import SuperLinkError

    try:
        Coordinator(settings=settings, superlink_port=superlink_port).serve()
    except SuperLinkError as err:
        _fail(f"the Flower SuperLink could not start: {err}")


@app.command("add-site")
def add_site(name: str,
             node_key: Annotated[Path | None, typer.Option(
                 "--node-key", help="the site's node public key file (node_key.pub)")] = None,
             home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Add a site and, with --node-key, register its Flower node key."""
    client = _client(api, token, home)
    existing = {s["name"] for s in client.call("GET", "/sites")}
    if name not in existing:
        client.call("POST", "/sites", {"name": name})
    if node_key is not None:
        if not node_key.exists():
            _fail(f"{node_key} does not exist; copy node_key.pub from the site's keys folder")
        site = client.call("POST", f"/sites/{name}/node-key",
                           {"public_key": node_key.read_text().strip()})
        console.print(f"site [bold]{name}[/] registered (Flower node {site.get('flower_node_id')})")
    else:
        console.print(f"site [bold]{name}[/] added; register its node key with --node-key")


@app.command("enroll-token")
def enroll_token(name: str, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Add the site if new and issue its one-time enrollment token (valid 24 h)."""
    client = _client(api, token, home)
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
    """List the sites: status (new, registered, revoked), Flower node, registration time."""
    client = _client(api, token, home)
    rows = client.call("GET", "/sites")
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "status", "Flower node", "registered", "added")
    for s in rows:
        table.add_row(s["name"], s["status"], str(s.get("flower_node_id") or ""),
                      str(s.get("registered_at") or "")[:19], str(s.get("created_at", ""))[:19])
    console.print(table)


@app.command("revoke-site")
def revoke_site(name: str,
                reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
                home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Revoke a site: its certificates stop working at the gateway at once."""
    client = _client(api, token, home)
    client.call("POST", f"/sites/{name}/revoke", {"reason": reason})
    console.print(f"site [bold]{name}[/] revoked")


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that reads as a JSON number or true/false is one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            _fail(f"{option} {item!r}: write KEY=VALUE, e.g. {option} server_lr=0.5")
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
                               "approval_wait": "approval_wait_s", "site": "sites"}


@app.command()
def launch(
    project: Annotated[str, typer.Option(help="project name (created if new)")],
    epsilon: Annotated[float, _run_option("epsilon")],
    task: Annotated[str | None, typer.Option(
        help="task from the registry, e.g. breast_cancer_mlp (or --study)")] = None,
    study: Annotated[str | None, _run_option("study")] = None,
    rounds: Annotated[int, _run_option("rounds")] = _DEF["rounds"],
    local_epochs: Annotated[int, _run_option("local_epochs")] = _DEF["local_epochs"],
    delta: Annotated[float, _run_option("delta")] = _DEF["delta"],
    min_sites: Annotated[int, _run_option("min_sites")] = _DEF["min_sites"],
    round_deadline: Annotated[float, _run_option("round_deadline_s")] = _DEF["round_deadline_s"],
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
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Launch a federated DP run (options and defaults: the run configuration's)."""
    client = _client(api, token, home)
    if project not in {p["name"] for p in client.call("GET", "/projects")}:
        client.call("POST", "/projects", {"name": project})
    given = {"project": project, "task": task, "study": study, "rounds": rounds,
             "local_epochs": local_epochs,
             "epsilon": epsilon, "delta": delta, "min_sites": min_sites,
             "round_deadline": round_deadline, "lr": lr, "batch_size": batch_size,
             "max_grad_norm": max_grad_norm, "seed": seed, "site": site or None,
             "aggregation": aggregation, "approval_wait": approval_wait,
             "max_update_norm": max_update_norm}
    # Unset optional settings are left out: the coordinator fills in the task's defaults.
    body: dict[str, Any] = {LAUNCH_OPTION_FIELDS.get(k, k): v for k, v in given.items()
                            if v is not None}
    if study is not None:  # options left at their defaults take the study's own
        body = {k: v for k, v in body.items()
                if k not in ("local_epochs", "max_grad_norm") or v != _DEF[k]}
    if aggregation_option:
        body["aggregation_options"] = _key_values(aggregation_option, "--aggregation-option")
    run = client.call("POST", "/runs", body)
    if as_json:
        print(json.dumps(run))
    else:
        console.print(f"run [bold]{run['id']}[/] launched (Flower run {run.get('flwr_run_id')}); "
                      f"watch it with `fedward-coordinator watch {run['id']}`")


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
          interval: Annotated[float, typer.Option()] = 1.0) -> None:
    """Show a run's progress per round and site, live, until it ends."""
    client = _client(api, token, home)
    deadline = time.monotonic() + timeout
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            run = client.call("GET", f"/runs/{run_id}")
            rounds = client.call("GET", f"/runs/{run_id}/rounds")
            metrics = client.call("GET", f"/runs/{run_id}/metrics")
            live.update(_progress_table(run, rounds, metrics))
            if run["status"] in ("completed", "failed", "stopped"):
                break
            if time.monotonic() > deadline:
                _fail(f"run {run_id} still {run['status']} after {timeout:.0f} s")
            time.sleep(interval)
    if run["status"] != "completed":
        raise typer.Exit(2)


@app.command()
def runs(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """List runs."""
    client = _client(api, token, home)
    table = Table("id", "project", "task", "status", "launched by", "created", "reason / note")
    for r in client.call("GET", "/runs"):
        table.add_row(str(r["id"]), str(r.get("project", "")), r["task"], r["status"],
                      str(r.get("launched_by", "")), str(r.get("created_at", ""))[:19],
                      str(r.get("failure_reason") or waiting_note(r)))
    console.print(table)


@app.command()
def rounds(run_id: int, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List a run's rounds and per-site metrics."""
    client = _client(api, token, home)
    run = client.call("GET", f"/runs/{run_id}")
    rnds = client.call("GET", f"/runs/{run_id}/rounds")
    metrics = client.call("GET", f"/runs/{run_id}/metrics")
    if as_json:
        print(json.dumps({"run": run, "rounds": rnds, "metrics": metrics}))
    else:
        console.print(_progress_table(run, rnds, metrics))


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
    out = _client(api, token, home).call("POST", "/users", body)
    console.print(f"user [bold]{name}[/] ({role}) created; its API token, shown only now:")
    print(out["token"])


@app.command()
def users(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the users (admins): role, when the API token expires, disabled or not."""
    rows = _client(api, token, home).call("GET", "/users")
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
    out = _client(api, token, home).call("POST", f"/users/{name}/token")
    console.print(f"new API token for [bold]{name}[/], valid until "
                  f"{str(out['expires_at'])[:16]} UTC, shown only now:")
    print(out["token"])


@app.command("revoke-tokens")
def revoke_tokens(name: str, home: HomeOpt = None, api: ApiOpt = None,
                  token: TokenOpt = None) -> None:
    """Revoke a user's API token and end all its login sessions (admins for anyone, a user
    for themself)."""
    _client(api, token, home).call("POST", f"/users/{name}/revoke-tokens")
    console.print(f"every token of [bold]{name}[/] is revoked; `fedward-coordinator new-token "
                  f"{name}` issues a new one")


@app.command("disable-user")
def disable_user(name: str,
                 reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
                 home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Disable a user (admins): no login and no token of theirs works until enabled."""
    _client(api, token, home).call("POST", f"/users/{name}/disable", {"reason": reason})
    console.print(f"user [bold]{name}[/] disabled")


@app.command("enable-user")
def enable_user(name: str, home: HomeOpt = None, api: ApiOpt = None,
                token: TokenOpt = None) -> None:
    """Enable a disabled user again (admins); its old tokens stay revoked."""
    _client(api, token, home).call("POST", f"/users/{name}/enable")
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
    _client(api, token, home).call("DELETE", f"/users/{name}")
    console.print(f"user [bold]{name}[/] deleted")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
