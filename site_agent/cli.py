"""``fedward-site``: what hospital IT runs to set up and operate a site agent."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from site_agent.config import ConfigError, SiteConfig, SitePaths

__all__ = ["app", "main"]

app = typer.Typer(help="Fedward site agent: configure, check data, run.", no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)

DirOpt = Annotated[Path, typer.Option("--dir", help="the site's data directory")]


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def init(
    dir: DirOpt,
    name: Annotated[str, typer.Option(help="site name, as the coordinator knows it")],
    superlink: Annotated[str, typer.Option(help="coordinator fleet address host:port")],
    ca_cert: Annotated[Path, typer.Option(help="the coordinator's CA certificate (PEM)")],
    data: Annotated[Path, typer.Option(help="the site's training data (CSV)")],
    schema: Annotated[Path, typer.Option(help="the data's schema (JSON)")],
    torch_threads: Annotated[int, typer.Option()] = 1,
    reconnect_backoff: Annotated[float, typer.Option(help="seconds before restarting a "
                                                     "dropped SuperNode")] = 65.0,
) -> None:
    """Write the site configuration (site.json) and copy the CA certificate in."""
    problems = [f"{label} {p} does not exist" for label, p in
                (("CA certificate", ca_cert), ("data file", data), ("schema file", schema))
                if not p.exists()]
    if problems:
        _fail("; ".join(problems))
    root = dir.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_cert, root / "coordinator-ca.pem")
    try:
        cfg = SiteConfig.from_dict({
            "name": name, "superlink": superlink, "ca_cert": "coordinator-ca.pem",
            "data_path": str(data.expanduser().resolve()),
            "schema_path": str(schema.expanduser().resolve()),
            "torch_threads": torch_threads, "reconnect_backoff_s": reconnect_backoff,
        })
    except ConfigError as err:
        _fail(str(err))
    path = cfg.save(root)
    console.print(f"site configuration written to {path}")


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
    """Check the site's data against its schema and report every problem at once."""
    from site_agent.data import SchemaError, check_data, load_schema

    root = dir.expanduser().resolve()
    try:
        cfg = SiteConfig.load(root)
        schema = load_schema(cfg.resolve(root, cfg.schema_path))
    except (ConfigError, SchemaError) as err:
        _fail(str(err))
    report = check_data(csv_path=cfg.resolve(root, cfg.data_path), schema=schema)
    if as_json:
        print(json.dumps({"ok": report.ok, "rows": report.n_rows,
                          "problems": [p.message for p in report.problems],
                          "warnings": [str(w) for w in report.warnings]}))
    elif report.ok:
        console.print(f"[green]data OK[/]: {report.n_rows} rows match the schema "
                      f"(task {schema.task})")
    else:
        err_console.print(f"[bold red]{len(report.problems)} problem(s)[/] in "
                          f"{cfg.data_path}:")
        for p in report.problems:
            err_console.print(f"  - {p.message}")
    if not report.ok:
        raise typer.Exit(3)


@app.command()
def start(dir: DirOpt,
          epsilon_cap: Annotated[float | None, typer.Option(
              help="the site's own epsilon cap per run")] = None) -> None:
    """Run the site agent (warm trainer + SuperNode) until SIGTERM or Ctrl-C."""
    from site_agent.agent import SiteAgent
    from site_agent.data import SchemaError

    # force: flwr and opacus install handlers at import; the agent's own log must show.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code = SiteAgent(root=dir.expanduser().resolve(), epsilon_cap=epsilon_cap).run()
    except (ConfigError, SchemaError) as err:
        _fail(str(err))
    raise typer.Exit(code)


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
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
