"""``fedward-coordinator evaluate`` and ``evaluations``: federated evaluation on demand.

Both talk to the coordinator's REST API with the caller's token; the coordinator starts the
evaluation as a Flower run that trains nothing (:mod:`coordinator.evaluation`).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_client import ClientFactory
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["EVALUATE_EXIT_HELP", "add_commands", "render"]

console = Console()
err_console = Console(stderr=True)

# Exit codes of `evaluate` (1: any error of the request, 2: usage, as every command).
EVALUATE_EXIT_HELP: Final = {
    0: "the evaluation completed (at least one site evaluated the model)",
    3: "the evaluation failed (no site evaluated the model; the reasons are printed)",
    6: "--timeout passed while it was still pending or running",
}
_FIGURES: Final = (("eval-auc", "AUC"), ("eval-accuracy", "accuracy"),
                   ("eval-loss", "loss"), ("num-eval-examples", "held-out rows"))
# With the local-only baseline: a line per site and model, these figures of each.
_BASELINE_FIGURES: Final = (("auc", "AUC"), ("accuracy", "accuracy"),
                            ("balanced-accuracy", "balanced acc."), ("brier", "Brier"))
_MODELS: Final = (("federated", "eval-"), ("local-only", "local-only-"))

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")]


def render(ev: dict[str, Any]) -> Table:
    """One evaluation as a table: a line per site, its figures or why it has none.

    Args:
        ev: An evaluation as the API answers it.
    """
    of = (f"release {ev['release_id']}, round {ev['round_number']}" if ev.get("release_id")
          else f"checkpoint of round {ev['round_number']}")
    if ev.get("local_only"):
        return _render_baselines(ev, of)
    table = Table("site", *(label for _, label in _FIGURES), "note", title=(
        f"Evaluation {ev['id']} of run {ev['run_id']} ({of}): {ev['status']}"))
    for site, figures in sorted(ev.get("sites", {}).items()):
        table.add_row(site, *(f"{figures[k]:.4g}" if k in figures else "-" for k, _ in _FIGURES),
                      "")
    for site, why in sorted(ev.get("failed", {}).items()):
        table.add_row(site, *("-" for _ in _FIGURES), why)
    return table


def _render_baselines(ev: dict[str, Any], of: str) -> Table:
    """An evaluation with the sites' local-only baselines: per site, a line for each model
    (the federated one, the site's own), then the same for the mean over sites."""
    def cells(figures: dict[str, float], prefix: str) -> list[str]:
        return [f"{figures[prefix + k]:.4g}" if prefix + k in figures else "-"
                for k, _ in _BASELINE_FIGURES]

    table = Table("site", "model", *(label for _, label in _BASELINE_FIGURES), "epsilon",
                  "held-out rows", "note", title=(
                      f"Evaluation {ev['id']} of run {ev['run_id']} ({of}, with each site's "
                      f"local-only DP baseline): {ev['status']}"))
    rows = [*sorted(ev.get("sites", {}).items())]
    if ev.get("means"):
        rows.append(("mean over sites", ev["means"]))
    for site, figures in rows:
        for i, (model, prefix) in enumerate(_MODELS):
            eps = figures.get("local-only-epsilon") if model == "local-only" else None
            n = figures.get("num-eval-examples") if i == 0 else None
            table.add_row(site if i == 0 else "", model, *cells(figures, prefix),
                          "-" if eps is None else f"{eps:.3f}",
                          "" if n is None else f"{n:.0f}", "")
    for site, why in sorted(ev.get("failed", {}).items()):
        table.add_row(site, "-", *("-" for _ in _BASELINE_FIGURES), "-", "", why)
    return table


def add_commands(app: typer.Typer,
                 client: ClientFactory) -> None:
    """Declare ``evaluate`` and ``evaluations`` on the CLI.

    Args:
        app: ``fedward-coordinator``'s Typer app.
        client: Makes the REST client from ``--api``, ``--token`` and ``--home``.
    """
    _client = client

    @app.command("evaluate")
    def evaluate(
        run_id: Annotated[int | None, typer.Argument(
            metavar="RUN",
            help="the run whose final checkpoint is evaluated (optional with --release)")] = None,
        round_number: Annotated[int | None, typer.Option(
            "--round", metavar="N",
            help="evaluate the checkpoint saved after round N instead (also while the run "
                 "is still going)")] = None,
        release: Annotated[str | None, typer.Option(
            "--release", metavar="ID", help="evaluate this release's model instead")] = None,
        wait: Annotated[bool, typer.Option(
            "--wait/--no-wait", help="wait for the results (default) or return at once")] = True,
        timeout: Annotated[float, typer.Option(help="seconds to wait at most")] = 600.0,
        local_only: Annotated[bool, typer.Option(
            "--local-only", help="also ask each site for its local-only DP baseline (trained "
                                 "at the site at the run's epsilon and charged to its "
                                 "ledger, once per run; sites whose policy allows it)")] = False,
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Evaluate a run's final checkpoint (or a round's, or a release) on the sites' current
        held-out data.

        Without --round or --release: the final checkpoint of a run that has ended (a run
        still going has none yet: name a round). Nothing is trained and nothing is charged
        to a site's privacy budget, unless --local-only asks each site for its local-only
        DP baseline; each site's policy still decides whether it takes part.
        Exit codes: 0 completed, 3 failed (no site evaluated it), 6 timed out, 1 the request
        was refused (the reason is printed).
        """
        client = _client(api, token, home)
        if run_id is None:
            if release is None:
                raise typer.BadParameter("give a RUN, or --release ID")
            run_id = int(client.call("GET", f"/releases/{release}")["run_id"])
        ev = client.call("POST", f"/runs/{run_id}/evaluations",
                         {"release_id": release, "round": round_number,
                          "local_only": local_only})
        deadline = time.monotonic() + timeout
        while wait and ev["status"] in ("pending", "running") and time.monotonic() < deadline:
            time.sleep(1.0)
            ev = client.call("GET", f"/evaluations/{ev['id']}")
        if as_json:
            print(json.dumps(ev))
        else:
            console.print(render(ev))
            if ev.get("failure_reason"):
                err_console.print(f"[bold red]failed:[/] {ev['failure_reason']}", soft_wrap=True)
            elif ev["status"] in ("pending", "running"):
                console.print(f"evaluation {ev['id']} is {ev['status']}: "
                              f"`fedward-coordinator evaluations {run_id}` shows it later")
        if ev["status"] == "failed":
            raise typer.Exit(3)
        if wait and ev["status"] != "completed":
            raise typer.Exit(6)


    @app.command("evaluations")
    def evaluations(run_id: int, home: HomeOpt = None, api: ApiOpt = None,
                    token: TokenOpt = None, as_json: JsonOpt = False) -> None:
        """A run's evaluations on demand, newest first, with each site's figures."""
        rows = _client(api, token, home).call("GET", f"/runs/{run_id}/evaluations")
        if as_json:
            print(json.dumps(rows))
            return
        if not rows:
            console.print(f"run {run_id} has not been evaluated on demand "
                          f"(`fedward-coordinator evaluate {run_id}`)")
        for ev in rows:
            console.print(render(ev))
