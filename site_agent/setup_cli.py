"""``fedward-site`` commands that set a site up: ``init`` (a lab site on the coordinator's
host), ``enroll`` (with a one-time token, through the gateway), ``renew``, ``keygen``, and
the starter site policy they write.

``init`` and ``enroll`` check the site's configuration the same way before anything is
written (:func:`checked_config`): the data through its connector, against its schema or,
for a study, through the site's mapping (``enroll`` runs the mapping check too, so a token
is never spent on data that cannot train).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from site_agent.cli_common import DirOpt, console, err_console, fail
from site_agent.config import ConfigError, SiteConfig, SitePaths

if TYPE_CHECKING:
    from site_agent.site_data import ConfiguredData

__all__ = ["checked_config", "enroll", "init", "keygen", "renew", "write_starter_policy"]

# The options that set a site up on a study instead of a schema (init, enroll).
StudyOpt = Annotated[str | None, typer.Option(
    help="instead of --schema: the study the data is mapped to (the spec file the ML team "
         "sent, or an example study's name), with --mapping")]
MappingOpt = Annotated[Path | None, typer.Option(
    help="the mapping of the site's columns to --study (`fedward-site mapping template` "
         "writes one)")]


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
    cfg, configured = checked_config(
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
    write_starter_policy(root, project=project, task=configured.task, epsilon_cap=10.0,
                          require_approval=False, force=False)


def checked_config(root: Path, raw: dict[str, Any], *, data: Path | None,
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
    assert configured.binding is not None
    report = configured.check()
    if not report.ok:
        for p in report.problems:
            err_console.print(f"  - {p.kind}: {escape(p.message)}")
        fail(f"{len(report.problems)} problem(s) mapping {configured.connector.describe()} to "
             f"study {configured.binding.study.name} (listed above; `fedward-site mapping "
             f"check` shows them too): fix the mapping or the data first{after}", 3)


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
        new = checked_config(
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
        write_starter_policy(root, project=project, task=new[1].task, epsilon_cap=10.0,
                              require_approval=False, force=False)
    console.print(f"site [bold]{name}[/] enrolled: it now reaches the coordinator through "
                  f"{gateway} with mutual TLS; start it with `fedward-site start --dir {root}`")


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


def write_starter_policy(root: Path, *, project: str, task: str, epsilon_cap: float,
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


def keygen(dir: DirOpt) -> None:
    """Create the site's Flower node key (kept here); print the public key to register."""
    from site_agent.keys import ensure_node_key, public_key_fingerprint

    paths = SitePaths(dir.expanduser().resolve())
    public = ensure_node_key(paths.node_key, paths.node_public_key)
    console.print(f"node public key: {paths.node_public_key}")
    console.print(f"fingerprint: {public_key_fingerprint(public)}")
    console.print("send the .pub file (never the private key) to the coordinator team")
