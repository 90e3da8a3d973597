"""``fedward-coordinator launch``: start a federated DP run, or launch a recorded one again
(``--from RUN``).

Its options are the run configuration's (:class:`fedward.run_config.RunRequest`): each one's
help and default come from the field it sets, so the CLI and the API never disagree. A
launch or relaunch naming a retired study version is refused before anything is written,
with who retired it, why and what to launch instead (:mod:`coordinator.study_retirement`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final

import click
import typer
from rich.console import Console

from coordinator import run_cli
from coordinator.cli_client import ApiClient, fail
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt
from coordinator.study_retirement import retired_refusal
from fedward.run_config import RunRequest

__all__ = ["LAUNCH_OPTION_FIELDS", "add_launch_command"]

console = Console()


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that reads as a JSON number or true/false is one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"{option} {item!r}: write KEY=VALUE, e.g. {option} server_lr=0.5")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value if isinstance(value, int | float | bool) else raw
    return out


def _run_option(name: str, *flags: str) -> Any:
    """A ``launch`` option for the run setting ``name``, described by the run config."""
    return typer.Option(*flags, help=RunRequest.model_fields[name].description)


# The run config's defaults (the ones the API uses too), for the options below.
_DEF: Final[dict[str, Any]] = {
    name: info.get_default() for name, info in RunRequest.model_fields.items()
    if not info.is_required()}


# Option -> the run config field it sets (every other option has the field's own name).
LAUNCH_OPTION_FIELDS: Final = {"round_deadline": "round_deadline_s",
                               "approval_wait": "approval_wait_s", "site": "sites",
                               "offline_grace": "offline_grace_s"}


def add_launch_command(
        app: typer.Typer,
        api_client: Callable[[str | None, str | None, Path | None], ApiClient]) -> None:
    """Declare ``launch`` on ``fedward-coordinator``'s app.

    Args:
        app: ``fedward-coordinator``'s Typer app.
        api_client: Makes the REST client from ``--api``, ``--token`` and ``--home``.
    """

    @app.command()
    def launch(
        ctx: typer.Context,
        project: Annotated[str | None, typer.Option(help="project name (created if new)")] = None,
        task: Annotated[str | None, typer.Option(
            help="task from the registry, e.g. breast_cancer_mlp (or --study)")] = None,
        epsilon: Annotated[float | None, _run_option("epsilon")] = None,
        study: Annotated[str | None, _run_option("study")] = None,
        from_run: Annotated[int | None, typer.Option(
            "--from", metavar="RUN",
            help="launch again with this run's recorded configuration; any option given "
                 "replaces its setting")] = None,
        rounds: Annotated[int, _run_option("rounds")] = _DEF["rounds"],
        local_epochs: Annotated[int, _run_option("local_epochs")] = _DEF["local_epochs"],
        delta: Annotated[float, _run_option("delta")] = _DEF["delta"],
        min_sites: Annotated[int, _run_option("min_sites")] = _DEF["min_sites"],
        round_deadline: Annotated[float, _run_option("round_deadline_s")
                                  ] = _DEF["round_deadline_s"],
        offline_grace: Annotated[float, _run_option("offline_grace_s")] = _DEF["offline_grace_s"],
        lr: Annotated[float | None, _run_option("lr")] = _DEF["lr"],
        batch_size: Annotated[int | None, _run_option("batch_size")] = _DEF["batch_size"],
        max_grad_norm: Annotated[float, _run_option("max_grad_norm")] = _DEF["max_grad_norm"],
        seed: Annotated[int, _run_option("seed")] = _DEF["seed"],
        site: Annotated[list[str] | None, _run_option("sites", "--site")] = _DEF["sites"],
        aggregation: Annotated[str, _run_option("aggregation")] = _DEF["aggregation"],
        aggregation_option: Annotated[list[str] | None, typer.Option(
            "--aggregation-option", metavar="KEY=VALUE",
            help="an option of the aggregation, repeatable, e.g. server_lr=0.5 momentum=0.9 "
                 "(docs/ml-team-guide.md lists each strategy's options)")] = None,
        approval_wait: Annotated[float, _run_option("approval_wait_s")] = _DEF["approval_wait_s"],
        max_update_norm: Annotated[float | None,
                                   _run_option("max_update_norm")] = _DEF["max_update_norm"],
        statistics: Annotated[bool, _run_option("statistics", "--statistics/--no-statistics")
                              ] = _DEF["statistics"],
        statistics_epsilon: Annotated[float | None, _run_option("statistics_epsilon")
                                      ] = _DEF["statistics_epsilon"],
        secure_aggregation: Annotated[bool, _run_option(
            "secure_aggregation", "--secure-aggregation/--no-secure-aggregation")
                                      ] = _DEF["secure_aggregation"],
        secagg_threshold: Annotated[int | None, _run_option("secagg_threshold")
                                    ] = _DEF["secagg_threshold"],
        secagg_clip: Annotated[float, _run_option("secagg_clip")] = _DEF["secagg_clip"],
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Launch a federated DP run (options and defaults: the run configuration's).

        --project, --task and --epsilon are needed unless --from RUN gives them.
        """
        client = api_client(api, token, home)
        given = {"project": project, "task": task, "study": study, "rounds": rounds,
                 "local_epochs": local_epochs,
                 "epsilon": epsilon, "delta": delta, "min_sites": min_sites,
                 "round_deadline": round_deadline, "offline_grace": offline_grace, "lr": lr,
                 "batch_size": batch_size,
                 "max_grad_norm": max_grad_norm, "seed": seed, "site": site or None,
                 "aggregation": aggregation, "approval_wait": approval_wait,
                 "max_update_norm": max_update_norm, "statistics": statistics,
                 "statistics_epsilon": statistics_epsilon,
                 "secure_aggregation": secure_aggregation, "secagg_threshold": secagg_threshold,
                 "secagg_clip": secagg_clip}
        # Unset optional settings are left out: the coordinator fills in the task's defaults.
        body: dict[str, Any] = {LAUNCH_OPTION_FIELDS.get(k, k): v for k, v in given.items()
                                if v is not None}
        if study is not None:  # options left at their defaults take the study's own
            body = {k: v for k, v in body.items()
                    if k not in ("local_epochs", "max_grad_norm") or v != _DEF[k]}
        if aggregation_option:
            body["aggregation_options"] = _key_values(aggregation_option, "--aggregation-option")
        if from_run is not None:
            # Only what was typed replaces the recorded setting, not an option's default.
            typed = {k for k in given if ctx.get_parameter_source(k) not in (
                None, click.core.ParameterSource.DEFAULT)}
            overrides = {LAUNCH_OPTION_FIELDS.get(k, k): v for k, v in given.items()
                         if k in typed and v is not None}
            if "aggregation_options" in body:
                overrides["aggregation_options"] = body["aggregation_options"]
            body = run_cli.relaunch_body(client.call("GET", f"/runs/{from_run}"), overrides)
        missing = [f"--{k}" for k in ("project", "epsilon") if body.get(k) is None]
        if body.get("task") is None and body.get("study") is None:
            missing.insert(1, "--task (or --study)")
        if missing:
            fail(f"{', '.join(missing)} needed (or --from RUN, to launch a recorded run again)",
                  code=2)
        if body.get("study") is not None:
            # A retired version is refused before anything is written (a new project
            # included), naming the run relaunched in the command to use instead.
            pinned = client.call("GET", f"/studies/{body['study']}")
            if pinned.get("retired"):
                fail(retired_refusal(pinned["ref"], pinned["retired"], from_run=from_run))
        if body["project"] not in {p["name"] for p in client.call("GET", "/projects")}:
            client.call("POST", "/projects", {"name": body["project"]})
        run = client.call("POST", "/runs", body)
        if as_json:
            print(json.dumps(run))
        else:
            origin = f" from run {from_run}'s configuration" if from_run is not None else ""
            console.print(f"run [bold]{run['id']}[/] launched{origin} (Flower run "
                          f"{run.get('flwr_run_id')}); watch it with `fedward-coordinator watch "
                          f"{run['id']}`")
