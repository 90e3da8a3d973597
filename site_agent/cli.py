"""``fedward-site``: what hospital IT runs to set up and operate a site agent."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from site_agent.audit_cli import audit_app
from site_agent.cli_common import DirOpt, console, err_console, fail
from site_agent.config import ConfigError, SiteConfig, SitePaths
from site_agent.drift_cli import drift_app
from site_agent.fingerprint_cli import fingerprint
from site_agent.ledger_cli import ledger_app
from site_agent.mapping_cli import mapping_app
from site_agent.runs_cli import approve, deny, runs, status
from site_agent.setup_cli import enroll, init, keygen, renew, write_starter_policy
from site_agent.study_cli import allow_plugin, approve_study

__all__ = ["app", "main"]

app = typer.Typer(help="Fedward site agent: configure, check data, run.", no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  add_completion=False)
policy_app = typer.Typer(help="The site policy (policy.json): write a starter, check it.",
                         no_args_is_help=True, add_completion=False)
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.add_typer(ledger_app, name="ledger")
app.add_typer(mapping_app, name="mapping")
app.add_typer(drift_app, name="drift")
app.command("fingerprint")(fingerprint)
policy_app.command("approve-study")(approve_study)
policy_app.command("allow-plugin")(allow_plugin)
for command in (init, enroll, renew, keygen, runs, status, approve, deny):
    app.command()(command)

def _print_version(value: bool) -> None:
    if value:
        import fedward

        print(fedward.version_line("fedward-site"))
        raise typer.Exit()


@app.callback()
def _main_options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="print the version and the commit it was built from, then exit")] = False
                  ) -> None:
    """Fedward site agent: configure, check data, run."""


@app.command()
def check(dir: DirOpt,
          as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False
          ) -> None:
    """Check the site's data against its schema (or its study mapping) and report every
    problem at once."""
    from site_agent.data_schema import SchemaError
    from site_agent.site_data import open_configured

    root = dir.expanduser().resolve()
    try:
        cfg = SiteConfig.load(root)
        configured = open_configured(cfg, root)
    except (ConfigError, SchemaError) as err:
        fail(str(err))
    report = configured.check()
    if as_json:
        print(json.dumps({"ok": report.ok, "rows": report.n_rows,
                          "problems": [p.message for p in report.problems],
                          "warnings": [str(w) for w in report.warnings]}))
    elif report.ok:
        console.print(f"[green]data OK[/]: {report.n_rows} rows match the "
                      f"{'study mapping' if cfg.uses_study else 'schema'} "
                      f"(task {configured.task})")
    else:
        err_console.print(f"[bold red]{len(report.problems)} problem(s)[/] in "
                          f"{cfg.data_path or configured.connector.describe()}:")
        for p in report.problems:
            err_console.print(f"  - {p.message}")
    if not report.ok:
        raise typer.Exit(3)


@app.command()
def start(dir: DirOpt,
          epsilon_cap: Annotated[float | None, typer.Option(
              help="an extra epsilon cap of your own: the smaller of it and the policy's "
                   "project cap bounds each run and each project")] = None) -> None:
    """Run the site agent (warm trainer + SuperNode) until SIGTERM or Ctrl-C."""
    from site_agent.config import SitePaths
    from site_agent.site_lock import LOCKED_EXIT, AgentLockError, hold_site_lock

    root = dir.expanduser().resolve()
    # Before the agent's imports (seconds of torch, Opacus, Flower): a second agent on this
    # directory is refused at once, and changes nothing.
    try:
        lock_fd = hold_site_lock(SitePaths(root))
    except AgentLockError as err:
        fail(str(err), code=LOCKED_EXIT)
    except OSError as err:
        fail(f"cannot open the agent lock in {root}: {err.strerror}; check that the site "
             "directory exists and belongs to this account")
    from site_agent.agent import SiteAgent
    from site_agent.data_schema import SchemaError

    # force: flwr and opacus install handlers at import; the agent's own log must show.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code = SiteAgent(root=root, epsilon_cap=epsilon_cap).run(lock_fd=lock_fd)
    except (ConfigError, SchemaError) as err:
        fail(str(err))
    raise typer.Exit(code)


# -- policy --------------------------------------------------------------------------------


@policy_app.command("init")
def policy_init(
    dir: DirOpt,
    project: Annotated[str, typer.Option(help="project to accept (from the coordinator team)")
                       ] = "default",
    task: Annotated[str | None, typer.Option(
        help="task to accept (default: the task of the site's schema)")] = None,
    epsilon_cap: Annotated[float, typer.Option(
        help="epsilon cap for all of the project's runs at this site, composed")] = 10.0,
    require_approval: Annotated[bool, typer.Option(
        "--require-approval", help="each new run waits for `fedward-site approve`")] = False,
    site_epsilon_cap: Annotated[float | None, typer.Option(
        help="epsilon cap for all runs of all projects at this site, composed "
             "(default: none)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing policy")] = False,
) -> None:
    """Write a starter site policy (policy.json) for one project."""
    root = dir.expanduser().resolve()
    if task is None:
        from site_agent.data_schema import SchemaError
        from site_agent.site_data import open_configured

        try:
            cfg = SiteConfig.load(root)
            task = open_configured(cfg, root).task   # the schema's task, or the study's
        except (ConfigError, SchemaError) as err:
            fail(f"{err}\n(or name the task with --task)")
    path = SitePaths(root).policy
    if path.exists() and not force:
        fail(f"{path} exists; edit it, or replace it with --force")
    write_starter_policy(root, project=project, task=task, epsilon_cap=epsilon_cap,
                          require_approval=require_approval, force=True,
                          site_epsilon_cap=site_epsilon_cap)


@policy_app.command("check")
def policy_check(dir: DirOpt,
                 as_json: Annotated[bool, typer.Option("--json", help="machine-readable")
                                    ] = False) -> None:
    """Validate policy.json and show what it lets through; every problem at once."""
    from site_agent.policy import PolicyError, SitePolicy

    path = SitePaths(dir.expanduser().resolve()).policy
    try:
        policy = SitePolicy.load(path)
    except PolicyError as err:
        if as_json:
            print(json.dumps({"ok": False, "problems": err.problems}))
        else:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"ok": True, "policy": policy.to_dict()}))
        return
    console.print(f"[green]site policy OK[/]: {path}")
    for name, spec in sorted(policy.projects.items()):
        console.print(f"  project {name}: tasks {', '.join(spec.tasks) or 'none'}; epsilon cap "
                      f"{spec.epsilon_cap:g}", highlight=False)
        for digest in spec.studies:
            console.print(f"    study approved: sha256 {digest}", highlight=False)
    console.print(f"  approval of each new run: "
                  f"{'required' if policy.require_approval else 'not required'}")
    console.print(f"  rounds per 24 h: {policy.max_rounds_per_day or 'unlimited'}")
    site_cap = policy.site_epsilon_cap
    console.print("  site-wide epsilon cap (all projects composed): "
                  + ("none" if site_cap is None else f"{site_cap:g}"), highlight=False)


# -- runs and approvals ----------------------------------------------------------------------


# -- doctor ----------------------------------------------------------------------------------


@app.command()
def doctor(dir: DirOpt,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           timeout: Annotated[float, typer.Option(help="network timeout, seconds")] = 3.0,
           ) -> None:
    """Check the site (config, data, policy, keys, certificates, clock, network, disk,
    packages) and say how to fix what is wrong. Exit 1 if any check fails."""
    from site_agent.doctor import run_doctor, summary

    checks = run_doctor(dir.expanduser().resolve(), timeout=timeout)
    result = summary(checks)
    if as_json:
        print(json.dumps(result))
    else:
        colour = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
        for c in checks:
            console.print(f"[{colour[c.status]}]{c.status.upper():4}[/] {c.name}: ", end="")
            console.print(c.message, markup=False, highlight=False)
        fails = sum(c.status == "fail" for c in checks)
        warns = sum(c.status == "warn" for c in checks)
        console.print(f"{fails} failed, {warns} warning(s)")
    if not result["ok"]:
        raise typer.Exit(1)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="folder to write the partitions into")],
    task: Annotated[str, typer.Option()] = "breast_cancer_mlp",
    sites: Annotated[int, typer.Option()] = 3,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a non-IID demo federation from scikit-learn's bundled data (no download)."""
    from site_agent.datasets import write_demo_federation

    fed = write_demo_federation(task=task, out_dir=out, n_sites=sites, seed=seed)
    print(json.dumps({
        "sites": [{"name": s.name, "csv": str(s.csv_path), "schema": str(s.schema_path),
                   "rows": s.n_rows} for s in fed.sites],
        "test_csv": str(fed.test_csv), "pooled_csv": str(fed.pooled_csv),
    }))


def main() -> None:
    """Console entry point."""
    # The site directory holds keys, the audit log, replies and logs derived from patient
    # data: whatever any command writes there is for the site's account alone.
    os.umask(0o077)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
