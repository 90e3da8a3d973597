"""``fedward-coordinator mlflow ...``: hand runs and approved releases to MLflow.

Every command talks to the coordinator's REST API with the caller's token (admins and ML
engineers); the coordinator does the export, so the bundles never leave its disk except to
the tracking server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_client import ApiClient, api_client
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["mlflow_app"]

mlflow_app = typer.Typer(help="Hand runs and approved releases to an MLflow tracking server.",
                         no_args_is_help=True, pretty_exceptions_enable=False,
                         add_completion=False)
console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")]
UriOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="http(s)://host:port of the MLflow tracking server (default: the "
                           "coordinator's FEDWARD_MLFLOW_TRACKING_URI).")]


HANDOFF_TIMEOUT_S: Final = 300.0
"""How long `mlflow export`/`register` wait for the coordinator: it answers once the tracking
server has taken everything (a run's every metric point, or a release's files), which takes
longer than the CLI's usual 30 s on a busy server (the MLflow client itself retries for up
to two minutes)."""


def _client(api: str | None, token: str | None, home: Path | None) -> ApiClient:
    return api_client(api, token, home)


def _body(tracking_uri: str | None) -> dict[str, Any]:
    return {} if tracking_uri is None else {"tracking_uri": tracking_uri}


@mlflow_app.command("export")
def export_run(run_id: int, tracking_uri: UriOpt = None, home: HomeOpt = None,
               api: ApiOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Log a run to MLflow: parameters, per-site metrics per round, epsilon, tags.

    Repeating it updates the same MLflow run. If the server cannot be reached, the export
    stays pending on the coordinator and is retried (see `mlflow status`).
    """
    done = _client(api, token, home).call("POST", f"/mlflow/runs/{run_id}/export",
                                          _body(tracking_uri), timeout=HANDOFF_TIMEOUT_S)
    if as_json:
        console.print_json(json.dumps(done))
        return
    res = done["result"]
    console.print(f"run {run_id} -> MLflow run {res['mlflow_run_id']} in experiment "
                  f"{res['experiment']!r} ({res['points_logged']} new metric points)")
    console.print(res["run_url"], soft_wrap=True)


@mlflow_app.command("register")
def register_release(release_id: str, tracking_uri: UriOpt = None, home: HomeOpt = None,
                     api: ApiOpt = None, token: TokenOpt = None,
                     as_json: JsonOpt = False) -> None:
    """Register an approved release in the MLflow model registry (ONNX model, model card,
    signature, lineage) and point the alias at the newest approved release.

    Repeating it adds no second version.
    """
    done = _client(api, token, home).call("POST", f"/mlflow/releases/{release_id}/export",
                                          _body(tracking_uri), timeout=HANDOFF_TIMEOUT_S)
    if as_json:
        console.print_json(json.dumps(done))
        return
    res = done["result"]
    if res.get("version") is None:
        console.print(f"release {release_id} is revoked and was never registered; nothing "
                      "to fetch")
        return
    state = " (revoked: the alias does not name it)" if res.get("revoked") else ""
    console.print(f"release {release_id} -> {res['model_name']} version {res['version']}"
                  f"{state}; @{res['alias']} names version {res.get('alias_version')}")
    console.print(f"fetch it with: mlflow.artifacts.download_artifacts("
                  f"artifact_uri={res['model_uri']!r})", soft_wrap=True, markup=False)


@mlflow_app.command("status")
def status(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Show the hand-off's settings, what is pending and why, what failed, and the latest
    exports done."""
    got = _client(api, token, home).call("GET", "/mlflow/exports")
    if as_json:
        console.print_json(json.dumps(got))
        return
    uri = got["tracking_uri"] or "not configured (FEDWARD_MLFLOW_TRACKING_URI)"
    console.print(f"tracking server: {uri}\nexperiment: {got['experiment']} · model: "
                  f"{got['model_name']} @{got['alias']} · retried every {got['retry_s']:g} s "
                  "(doubling after each failure, at most 15 min)", markup=False)
    for title, rows in (("pending", got["pending"]), ("failed", got["failed"])):
        table = Table("what", "to", "tries", "next try", "why", title=f"{title}: {len(rows)}")
        for row in rows:
            table.add_row(f"{row['kind']} {row['subject']}", row["tracking_uri"] or "-",
                          str(row["attempts"]), row["next_attempt_at"] or "-",
                          row["last_error"] or "-")
        console.print(table)
    table = Table("what", "exported at", "to", title=f"latest done: {len(got['recent'])}")
    for row in got["recent"]:
        res = row["result"]
        where = (f"MLflow run {res.get('mlflow_run_id')}" if row["kind"] == "run" else
                 f"{res.get('model_name')} v{res.get('version')}")
        table.add_row(f"{row['kind']} {row['subject']}", row["exported_at"] or "-", where)
    console.print(table)
