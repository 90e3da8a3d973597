"""``fedward-coordinator statistics RUN``: a run's federated DP statistics.

Mounted by :mod:`coordinator.cli`, which passes its REST client factory in (as the
``study`` group). Reads ``GET /api/v1/runs/{id}/statistics`` with the caller's token.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_client import ClientFactory
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["add_statistics_command"]

console = Console()


def _figure(value: object, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}g}"  # type: ignore[arg-type]


def add_statistics_command(app: typer.Typer, client: ClientFactory) -> None:
    """Add ``statistics RUN`` to ``app``, calling the API through ``client(api, token, home)``
    (a command of its own: ``runs`` already lists the runs)."""

    @app.command("statistics")
    def statistics(
        run: Annotated[int, typer.Argument(help="the run id")],
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: Annotated[bool, typer.Option(
            "--json", help="the reference statistics document itself")] = False,
    ) -> None:
        """The run's federated DP statistics (summed over the sites' noised releases): per
        feature its rows, missing values, mean, standard deviation and histogram."""
        out = client(api, token, home).call("GET", f"/runs/{run}/statistics")
        if as_json:
            print(json.dumps(out))
            return
        doc = out["reference"]
        privacy = doc["privacy"]
        console.print(
            f"run {run}: statistics of {privacy['sites']} site(s), epsilon "
            f"{privacy['epsilon']:g} per site (Gaussian, delta {privacy['delta']:g}); "
            f"sites: {', '.join(out['sites'])}", highlight=False)
        for site, reason in sorted(out.get("failed", {}).items()):
            console.print(f"  not included: {site}: {reason}", highlight=False)
        table = Table("feature", "rows", "missing", "mean", "std", "histogram (counts)")
        for f in doc["features"]:
            table.add_row(f["name"], _figure(f["n"], 5), _figure(f["missing"], 3),
                          _figure(f["mean"]), _figure(f["std"]),
                          " ".join(f"{c:.0f}" for c in f["counts"]))
        console.print(table)
