"""``fedward-site``: what hospital IT runs to set up and operate a site agent."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
from site_agent.study_cli import allow_plugin, approve_study

if TYPE_CHECKING:
    from site_agent.site_data import ConfiguredData

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
for command in (runs, status, approve, deny):
    app.command()(command)

# The options that set a site up on a study instead of a schema (init, enroll).
StudyOpt = Annotated[str | None, typer.Option(
    help="instead of --schema: the study the data is mapped to (the spec file the ML team "
         "sent, or an example study's name), with --mapping")]
MappingOpt = Annotated[Path | None, typer.Option(
    help="the mapping of the site's columns to --study (`fedward-site mapping template` "
         "writes one)")]


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
def init(
    dir: DirOpt,
    name: Annotated[str, typer.Option(help="site name, as the coordinator knows it")],
    superlink: Annotated[str, typer.Option(
        help="coordinator fleet address host:port (a lab site on the coordinator's host: "
             "the content of the coordinator's superlink.address, unix:/...)")],
    ca_cert: Annotated[Path, typer.Option(help="the coordinator's CA certificate (PEM)")],
    data: Annotated[Path | None, typer.Option(
        help="the site's training data (CSV; Parquet by its .parquet suffix)")] = None,
    schema: Annotated[Path | None, typer.Option(help="the data's schema (JSON)")] = None,
    torch_threads: Annotated[int, typer.Option()] = 1,
    reconnect_backoff: Annotated[float, typer.Option(help="seconds before restarting a "
                                                     "dropped SuperNode")] = 65.0,
    task_content_wait: Annotated[float, typer.Option(
        help="seconds a task waits for its model to arrive before the site gives it up "
             "(raise it for a large model on a slow line)")] = 30.0,
    project: Annotated[str, typer.Option(
        help="project the starter policy accepts (from the coordinator team)")] = "default",
    data_config: Annotated[Path | None, typer.Option(
        help="instead of --data: a JSON file holding the data connector block, e.g. a "
             "read-only SQL query (see the operator's guide)")] = None,
    study: StudyOpt = None,
    mapping: MappingOpt = None,
) -> None:
    """Write the site configuration (site.json), copy the CA certificate in, and write a
    starter site policy (policy.json) unless one exists."""
    problems = [] if ca_cert.exists() else [f"CA certificate {ca_cert} does not exist"]
    root = dir.expanduser().resolve()
    cfg, configured = _checked_config(
        root, {"name": name, "superlink": superlink, "ca_cert": "coordinator-ca.pem",
               "torch_threads": torch_threads, "reconnect_backoff_s": reconnect_backoff,
               "task_content_wait_s": task_content_wait},
        data=data, schema=schema, data_config=data_config, study=study, mapping=mapping,
        problems=problems)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    if ca_cert.resolve() != (root / "coordinator-ca.pem").resolve():
        shutil.copyfile(ca_cert, root / "coordinator-ca.pem")
    path = cfg.save(root)
    console.print(f"site configuration written to {path}")
    _write_starter_policy(root, project=project, task=configured.task, epsilon_cap=10.0,
                          require_approval=False, force=False)


def _checked_config(root: Path, raw: dict[str, Any], *, data: Path | None,
                    schema: Path | None, data_config: Path | None, study: str | None,
                    mapping: Path | None, problems: list[str],
                    after: str = "") -> tuple[SiteConfig, ConfiguredData]:
    """The site configuration ``raw`` plus its data (``--data`` or ``--data-config``) and
    what the data is checked against (``--schema``, or ``--study`` with ``--mapping``),
    with the data read and checked: every problem at once, before anything is written
    (``after`` is added to a refusal, e.g. that the token is still unused). Returns the
    configuration and what it names, opened (its ``task`` is the study's name for a
    study)."""
    from site_agent.data_schema import SchemaError
    from site_agent.site_data import open_configured

    named = [("data file", data), ("schema file", schema),
             ("data connector file", data_config), ("mapping file", mapping)]
    problems = [*problems, *(f"{label} {p} does not exist" for label, p in named
                             if p is not None and not p.expanduser().exists())]
    if (data is None) == (data_config is None):
        problems.append("name the data with --data FILE or --data-config FILE (one of them)")
    if schema is None and (study is None or mapping is None):
        problems.append("name what the data is checked against: --schema FILE, or --study "
                        "with --mapping")
    if problems:
        fail("; ".join(problems) + after)
    raw = dict(raw)
    if data_config is not None:
        try:
            raw["data"] = json.loads(data_config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            fail(f"{data_config} is not a JSON connector block ({err}){after}")
    elif data is not None and data.suffix.lower() in (".parquet", ".pq"):
        raw["data"] = {"connector": "parquet", "path": str(data.expanduser().resolve())}
    elif data is not None:
        raw["data_path"] = str(data.expanduser().resolve())
    if schema is not None:
        raw["schema_path"] = str(schema.expanduser().resolve())
    else:
        assert study is not None and mapping is not None
        raw["study"] = (str(Path(study).expanduser().resolve()) if Path(study).is_file()
                        else study)
        raw["mapping"] = str(mapping.expanduser().resolve())
    try:
        cfg = SiteConfig.from_dict(raw)
        configured = open_configured(cfg, root)
    except (ConfigError, SchemaError) as err:
        fail(f"{err}{after}")
    return cfg, configured


def _check_mapping_fits(configured: ConfiguredData, *, after: str) -> None:
    """Refuse a study mapping that does not fit the data (what `mapping check` reports:
    every problem, on this screen only)."""
    from site_agent.mapping_apply import check_mapping

    assert configured.binding is not None
    report = check_mapping(configured.binding, configured.connector).report
    if not report.ok:
        for p in report.problems:
            err_console.print(f"  - {p.kind}: {escape(p.message)}")
        fail(f"{len(report.problems)} problem(s) mapping {configured.connector.describe()} to "
             f"study {configured.binding.study.name} (listed above; `fedward-site mapping "
             f"check` shows them too): fix the mapping or the data first{after}", 3)


@app.command()
def enroll(
    dir: DirOpt,
    gateway: Annotated[str, typer.Option(help="the coordinator's site gateway, host:port "
                                         "(from the coordinator team; host alone: port "
                                         "9092)")],
    token: Annotated[str, typer.Option(help="the one-time enrollment token",
                                       envvar="FEDWARD_ENROLLMENT_TOKEN")],
    data: Annotated[Path | None, typer.Option(help="training data (CSV; Parquet by its "
                                              ".parquet suffix); needed when the site is "
                                              "not configured yet")] = None,
    schema: Annotated[Path | None, typer.Option(help="the data's schema (JSON)")] = None,
    project: Annotated[str, typer.Option(help="project the starter policy accepts")]
    = "default",
    study: StudyOpt = None,
    mapping: MappingOpt = None,
) -> None:
    """Enroll the site with a one-time token: keys made here, a certificate back.

    Fetches the coordinator's CA and checks it against the token's pin, makes the site's
    TLS key and Flower node key locally (private halves never leave), sends a CSR and the
    node public key, and stores the certificate. The site then reaches the coordinator only
    through its gateway, with mutual TLS.
    """
    from fedward.tokens import TokenFormatError, parse_enrollment_token
    from site_agent.enroll import EnrollError, gateway_address
    from site_agent.enroll import enroll as do_enroll

    try:
        address = gateway_address(gateway)
    except EnrollError as err:
        fail(str(err))
    if address != gateway.strip():
        console.print(f"no port given: using the gateway's default port, {address}")
    gateway = address
    root = dir.expanduser().resolve()
    paths = SitePaths(root)
    if paths.site_cert.exists() and paths.site_key.exists():
        fail(f"this site is enrolled already (certificate {paths.site_cert}); nothing to do. "
              "Renew a certificate with `fedward-site renew`. To enroll again after the "
              "coordinator rotated its CA, move keys/site-tls.pem and keys/site-tls.key "
              "aside first; after a revocation (the site comes back under a new name), "
              "move all of keys/ aside")
    existing: SiteConfig | None = None
    if paths.config.exists():
        try:
            existing = SiteConfig.load(root)
        except ConfigError as err:
            fail(str(err))
    elif data is None or (schema is None and (study is None or mapping is None)):
        fail("this site is not configured yet: give --data and --schema too (or, for a "
             "study, --data, --study and --mapping)")
    new: tuple[SiteConfig, ConfiguredData] | None = None
    unused = " (nothing was sent to the coordinator; the token is still unused)"
    if existing is None:
        # Every problem of the data and its schema or mapping is found before the token is
        # spent: a typo here must not leave a site with a certificate but no configuration.
        try:
            site = parse_enrollment_token(token).site
        except TokenFormatError:
            site = "unenrolled"   # the token's own problem is named by enroll, below
        new = _checked_config(
            root, {"name": site, "superlink": gateway, "ca_cert": "coordinator-ca.pem"},
            data=data, schema=schema, data_config=None, study=study, mapping=mapping,
            problems=[], after=unused)
        if new[1].binding is not None:
            _check_mapping_fits(new[1], after=unused)
    try:
        name = do_enroll(root=root, gateway=gateway, token=token)
    except EnrollError as err:
        fail(str(err))
    if existing is not None:
        raw = {**existing.__dict__, "superlink": gateway, "ca_cert": "coordinator-ca.pem"}
        raw.pop("version", None)
        cfg = SiteConfig.from_dict(raw)
    else:
        assert new is not None
        cfg = new[0]
    cfg.save(root)
    if new is not None:
        _write_starter_policy(root, project=project, task=new[1].task, epsilon_cap=10.0,
                              require_approval=False, force=False)
    console.print(f"site [bold]{name}[/] enrolled: it now reaches the coordinator through "
                  f"{gateway} with mutual TLS; start it with `fedward-site start --dir {root}`")


@app.command()
def renew(dir: DirOpt) -> None:
    """Renew the site's certificate before it expires (no new token needed)."""
    from site_agent.enroll import EnrollError
    from site_agent.enroll import renew as do_renew

    root = dir.expanduser().resolve()
    try:
        cfg = SiteConfig.load(root)
        not_after = do_renew(root=root, gateway=cfg.superlink)
    except (ConfigError, EnrollError) as err:
        fail(str(err))
    console.print(f"certificate renewed; valid until {not_after}")


def _write_starter_policy(root: Path, *, project: str, task: str, epsilon_cap: float,
                          require_approval: bool, force: bool,
                          site_epsilon_cap: float | None = None) -> None:
    from site_agent.policy import PolicyError, SitePolicy

    path = SitePaths(root).policy
    if path.exists() and not force:
        console.print(f"site policy {path} exists and was kept (see `fedward-site policy "
                      "check`)")
        return
    try:
        policy = SitePolicy.starter(project=project, task=task, epsilon_cap=epsilon_cap,
                                    require_approval=require_approval,
                                    site_epsilon_cap=site_epsilon_cap)
    except PolicyError as err:
        fail(str(err))
    policy.save(path)
    path.chmod(0o600)   # like everything in the site directory: this account's alone
    what = (f"task {task}" if policy.projects[project].tasks else
            f"the studies approved for it (none yet: review the spec, then `fedward-site "
            f"policy approve-study FILE --project {project} --dir {root}`)")
    console.print(f"site policy written to {path}: accepts project {project!r} for "
                  f"{what}, epsilon cap {epsilon_cap:g}, approval "
                  f"{'required' if require_approval else 'not required'}; edit it to change")


@app.command()
def keygen(dir: DirOpt) -> None:
    """Create the site's Flower node key (kept here); print the public key to register."""
    from site_agent.keys import ensure_node_key, public_key_fingerprint

    paths = SitePaths(dir.expanduser().resolve())
    public = ensure_node_key(paths.node_key, paths.node_public_key)
    console.print(f"node public key: {paths.node_public_key}")
    console.print(f"fingerprint: {public_key_fingerprint(public)}")
    console.print("send the .pub file (never the private key) to the coordinator team")


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
    _write_starter_policy(root, project=project, task=task, epsilon_cap=epsilon_cap,
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
