"""``fedward-coordinator``: the central ML team's command line.

``init``, ``admin-token`` and ``serve`` act on the data directory; every other command talks
to the REST API of a running coordinator with an API token (``--token``, ``FEDWARD_TOKEN``
or the admin token that ``init`` wrote into the data directory).

This module assembles the app from the command modules beside it: the host's commands
(:mod:`coordinator.host_cli`), sites (:mod:`coordinator.site_cli`), ``launch``
(:mod:`coordinator.launch_cli`), run control (:mod:`coordinator.run_control_cli`), users
(:mod:`coordinator.user_cli`), and the ``release``, ``mlflow``, ``study``, ``tune`` and
``drift`` groups with ``evaluate`` and ``statistics``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from coordinator import evaluation_cli, run_cli
from coordinator.cli_client import ApiClient, api_client
from coordinator.drift_cli import make_drift_app
from coordinator.host_cli import add_host_commands
from coordinator.launch_cli import add_launch_command
from coordinator.mlflow_cli import mlflow_app
from coordinator.release_cli import release_app
from coordinator.run_control_cli import add_run_control_commands
from coordinator.run_statistics_cli import add_statistics_command
from coordinator.site_cli import add_site_commands
from coordinator.study_cli import make_study_app
from coordinator.tuning_cli import make_tuning_app
from coordinator.user_cli import add_user_commands

__all__ = ["app", "main"]

app = typer.Typer(help="Fedward coordinator: sites, runs, rounds.", no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  add_completion=False)


def _client(api: str | None, token: str | None, home: Path | None) -> ApiClient:
    # Looks ``api_client`` up here at each call, so one replacement of it (a test's
    # in-process client) reaches every command module.
    return api_client(api, token, home)


app.add_typer(release_app, name="release")
evaluation_cli.add_commands(app, _client)
app.add_typer(mlflow_app, name="mlflow")
app.add_typer(make_study_app(_client), name="study")
add_statistics_command(app, _client)
app.add_typer(make_tuning_app(_client), name="tune")
app.add_typer(make_drift_app(_client), name="drift")
# Typer lists the commands in the order they are declared here.
add_host_commands(app)
add_site_commands(app, _client)
add_launch_command(app, _client)
add_run_control_commands(app, _client)
add_user_commands(app, _client)


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


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
