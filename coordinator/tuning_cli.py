"""``fedward-coordinator tune``: start a federated hyperparameter search, watch it, read it.

Mounted by :mod:`coordinator.cli`, which passes its REST client factory in (this module
does not import ``coordinator.cli``). Every command goes through ``/api/v1/tunings``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.cli_client import Api, ClientFactory
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["make_tuning_app"]

console = Console()
_FINAL = ("completed", "refused", "failed")


def _pair(text: str, option: str) -> list[float]:
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return [float(low), float(high)]
    except ValueError:
        raise typer.BadParameter(f"{option} {text!r}: write LOW:HIGH, e.g. 0.01:0.5") from None


def _table(t: dict[str, Any]) -> Table:
    cost = t["cost"]
    title = (f"tuning {t['id']} · {t['task']} · {t['status']} · cost epsilon "
             f"{cost['epsilon']:g} (delta {cost['delta']:g}, RDP) per site, charged once · "
             f"{len(t['trials'])} of {t['trials_planned']} trial(s)")
    if t.get("reason"):
        title += f"\n{escape(t['reason'])}"
    table = Table(title=title)
    for name in ("trial", "run", "lr", "clip", "epochs", "batch", "status", "AUC"):
        table.add_column(name)
    for trial in t["trials"]:
        p = trial["params"]
        best = " (best)" if trial["run_id"] == t.get("best_run_id") else ""
        table.add_row(str(trial["number"]), str(trial["run_id"]), f"{p['lr']:.4g}",
                      f"{p['max_grad_norm']:.3g}", str(p["local_epochs"]),
                      str(p["batch_size"]), trial["status"] + best,
                      "" if trial["score"] is None else f"{trial['score']:.4f}")
    return table


def _best_note(t: dict[str, Any]) -> str:
    if t.get("best_run_id") is None:
        return ""
    return (f"best: run {t['best_run_id']} (mean held-out AUC {t['best_score']:.4f}); train "
            f"its settings again with `fedward-coordinator launch --from {t['best_run_id']}`")


def make_tuning_app(client: ClientFactory) -> typer.Typer:
    """The ``tune`` command group, calling the API with ``client(api, token, home)``."""
    app = typer.Typer(help="Federated hyperparameter search under the sites' privacy budgets.",
                      no_args_is_help=True)

    @app.command("start")
    def start(
        project: Annotated[str, typer.Option(help="project name")],
        task: Annotated[str, typer.Option(help="task from the registry")],
        epsilon: Annotated[float, typer.Option(
            help="the whole search's epsilon per site, charged once before the first trial")],
        delta: Annotated[float, typer.Option()] = 1e-5,
        mean_trials: Annotated[float, typer.Option(
            help="mean of the random number of trials")] = 4.0,
        distribution: Annotated[str, typer.Option(
            help="of the number of trials: geometric or poisson")] = "geometric",
        rounds: Annotated[int, typer.Option(help="federated rounds per trial")] = 2,
        lr: Annotated[str, typer.Option(help="learning rate range LOW:HIGH")] = "0.01:0.5",
        max_grad_norm: Annotated[str, typer.Option(
            help="clipping norm range LOW:HIGH")] = "0.3:3.0",
        max_local_epochs: Annotated[int, typer.Option()] = 2,
        batch_size: Annotated[list[int] | None, typer.Option(
            help="a batch size to try, repeatable (default 16, 32, 64)")] = None,
        site: Annotated[list[str] | None, typer.Option(
            help="a site, repeatable (default: every registered site)")] = None,
        seed: Annotated[int, typer.Option(help="seed of the sampler and the models")] = 0,
        wait: Annotated[bool, typer.Option("--wait", help="watch it until it ends")] = False,
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Start a search: a random number of short federated trials, the best one kept."""
        c = client(api, token, home)
        body: dict[str, Any] = {
            "project": project, "task": task, "epsilon": epsilon, "delta": delta,
            "mean_trials": mean_trials, "distribution": distribution, "rounds": rounds,
            "lr": _pair(lr, "--lr"), "max_grad_norm": _pair(max_grad_norm, "--max-grad-norm"),
            "max_local_epochs": max_local_epochs, "seed": seed,
            "batch_sizes": batch_size or [16, 32, 64]}
        if site:
            body["sites"] = site
        out = c.call("POST", "/tunings", body)
        if wait:
            out = _watch(c, out["id"], quiet=as_json)
        if as_json:
            print(json.dumps(out))
            return
        if not wait:
            console.print(f"tuning [bold]{out['id']}[/] started (cost: epsilon {epsilon:g} per "
                          f"site, charged once); watch it with `fedward-coordinator tune watch "
                          f"{out['id']}`")

    def _watch(c: Api, tuning_id: int, *, quiet: bool, as_json: bool = False,
               timeout_s: float = 86400) -> Any:
        deadline = time.monotonic() + timeout_s
        seen, last = -1, ""
        while True:
            t = c.call("GET", f"/tunings/{tuning_id}")
            done = sum(tr["status"] != "running" for tr in t["trials"])
            if as_json:   # as the run's `watch --json`: one line whenever anything changed
                line = json.dumps(t, sort_keys=True)
                if line != last:
                    print(line, flush=True)
                    last = line
            elif not quiet and done != seen:
                console.print(_table(t))
                seen = done
            if t["status"] in _FINAL or time.monotonic() > deadline:
                break
            time.sleep(2)
        if not quiet and not as_json:
            note = _best_note(t)
            if t["status"] in ("refused", "failed"):
                console.print(f"[bold red]{t['status']}:[/] {escape(t['reason'] or '')}")
            elif note:
                console.print(note)
        return t

    @app.command("watch")
    def watch(tuning_id: int, home: HomeOpt = None, api: ApiOpt = None,
              token: TokenOpt = None,
              as_json: Annotated[bool, typer.Option(
                  "--json", help="one JSON object per line (the search, as `show --json`) "
                                 "each time it changes")] = False) -> None:
        """Follow a search until it ends; exits 1 if it was refused or failed."""
        t = _watch(client(api, token, home), tuning_id, quiet=False, as_json=as_json)
        if t["status"] in ("refused", "failed"):
            raise typer.Exit(1)

    @app.command("show")
    def show(tuning_id: int, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """One search: its cost, its trials, the best one."""
        t = client(api, token, home).call("GET", f"/tunings/{tuning_id}")
        if as_json:
            print(json.dumps(t))
            return
        console.print(_table(t))
        if _best_note(t):
            console.print(_best_note(t))

    @app.command("list")
    def list_(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Every search, newest first."""
        rows = client(api, token, home).call("GET", "/tunings")
        if as_json:
            print(json.dumps(rows))
            return
        table = Table("id", "project", "task", "status", "epsilon", "trials", "best run",
                      "best AUC")
        for t in rows:
            table.add_row(str(t["id"]), t["project"], t["task"], t["status"],
                          f"{t['cost']['epsilon']:g}", f"{len(t['trials'])}",
                          str(t["best_run_id"] or ""),
                          "" if t["best_score"] is None else f"{t['best_score']:.4f}")
        console.print(table)

    return app
