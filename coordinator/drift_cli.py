"""``fedward-coordinator drift list``: the drift reports sites sent, with alarms.

Mounted by :mod:`coordinator.cli`, which passes its REST client factory in. Goes through
``GET /api/v1/drift`` with the caller's token.
"""

from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import urlencode

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_client import ClientFactory
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["make_drift_app"]

console = Console()


def _figure(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def make_drift_app(client: ClientFactory) -> typer.Typer:
    """The ``drift`` command group, calling the API through ``client(api, token, home)``."""
    drift_app = typer.Typer(help="Drift and performance of released models at the sites.",
                            no_args_is_help=True, add_completion=False)

    @drift_app.command("list")
    def list_(
        site: Annotated[str | None, typer.Option(help="only this site's reports")] = None,
        release: Annotated[str | None, typer.Option(help="only this release's")] = None,
        limit: Annotated[int, typer.Option(min=1, max=500, help="reports per page")] = 50,
        offset: Annotated[int, typer.Option(min=0, help="skip this many (newest first)")] = 0,
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    ) -> None:
        """Drift reports, newest first: the largest PSI and smallest p-value of each check,
        accuracy and AUC, failed checks, alarms and the proposed retraining command."""
        query = {k: v for k, v in {"site": site, "release": release, "limit": limit,
                                    "offset": offset}.items() if v is not None}
        page = client(api, token, home).call("GET", f"/drift?{urlencode(query)}")
        if as_json:
            print(json.dumps(page))
            return
        table = Table("id", "site", "release", "checked", "status", "rows", "max PSI",
                      "min p", "accuracy", "AUC", "alarm")
        proposals: dict[str, str] = {}
        for r in page["items"]:
            status = r["status"] if r["failure"] is None else f"{r['status']} ({r['failure']})"
            alarm = ", ".join(r["alarm_features"][:3]) + (
                " ..." if len(r["alarm_features"]) > 3 else "") if r["alarm"] else ""
            table.add_row(str(r["id"]), r["site"], r["release"], r["checked_at"][:19], status,
                          r["rows"] or "–", _figure(r["max_psi"], ".3f"),
                          _figure(r["min_p_value"], ".2g"), _figure(r["accuracy"], ".3f"),
                          _figure(r["auc"], ".3f"), alarm)
            if r.get("retrain"):
                proposals[r["release"]] = r["retrain"]
        console.print(table)
        console.print(f"{len(page['items'])} of {page['total']} reports", highlight=False)
        for rel, command in sorted(proposals.items()):
            console.print(f"drift alarm on {rel}: to retrain, `{command}`", highlight=False)

    return drift_app
