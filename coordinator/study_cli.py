"""``fedward-coordinator study``: register a study spec, list the registry, show a version,
retire a version (:mod:`coordinator.study_retirement`).

Mounted by :mod:`coordinator.cli`, which passes its REST client factory in (this module
does not import ``coordinator.cli``, so no import cycle). Every command goes through the
REST API (``/api/v1/studies``) with the caller's token, like ``launch``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_client import ClientFactory, fail
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt
from coordinator.study_retirement import retired_note

__all__ = ["make_study_app"]

console = Console()


def make_study_app(client: ClientFactory) -> typer.Typer:
    """The ``study`` command group, calling the API through ``client(api, token, home)``."""
    study_app = typer.Typer(help="Study specs: register one, list the registry, show one, "
                                 "retire a version.",
                            no_args_is_help=True, add_completion=False)

    @study_app.command("register")
    def register(
        spec_file: Annotated[Path, typer.Argument(help="the study spec, YAML or JSON",
                                                  exists=True, dir_okay=False)],
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    ) -> None:
        """Validate a study spec (every problem at once) and register it: identical content
        again is the same version; a changed spec gets the name's next version."""
        try:
            text = spec_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            fail(f"cannot read {spec_file}: {err}")
        out = client(api, token, home).call(
            "POST", "/studies", {"text": text, "source": spec_file.name})
        if as_json:
            print(json.dumps(out))
            return
        what = "registered" if out["created"] else "already registered (same content)"
        console.print(f"study [bold]{out['ref']}[/] {what}: sha256 {out['hash']}",
                      highlight=False)
        if out.get("retired"):  # the same content is that version: change the spec
            console.print(f"note: {out['ref']} was {retired_note(out['retired'])}; no new "
                          "run may use it: change the spec to register a new version",
                          highlight=False, markup=False)

    @study_app.command("list")
    def list_(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False
              ) -> None:
        """Every version of every registered study."""
        rows = client(api, token, home).call("GET", "/studies")
        if as_json:
            print(json.dumps(rows))
            return
        table = Table("study", "features", "label", "model", "sha256", "registered by",
                      "created", "retired")
        for r in rows:
            table.add_row(r["ref"], str(r["n_features"]), str(r["label"]), str(r["model"]),
                          r["hash"], r["registered_by"], r["created_at"][:19],
                          retired_note(r["retired"]) if r.get("retired") else "")
        console.print(table)

    @study_app.command("show")
    def show(ref: Annotated[str, typer.Argument(help="NAME@VERSION, or NAME for the newest")],
             home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
             spec_only: Annotated[bool, typer.Option(
                 "--spec", help="print only the spec (JSON), e.g. to send to the sites")
             ] = False) -> None:
        """One version: its hash, who registered it, and the spec."""
        out = client(api, token, home).call("GET", f"/studies/{ref}")
        print(json.dumps(out["spec"] if spec_only else out, indent=2))

    @study_app.command("retire")
    def retire(
        ref: Annotated[str, typer.Argument(help="NAME@VERSION: the version to retire (a name "
                                                "alone is refused)")],
        reason: Annotated[str, typer.Option(help="why no new run may use it (shown to "
                                                 "whoever launches it; audited)")],
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    ) -> None:
        """Retire a study version: no new run, and no `launch --from` a run of it, may use
        it. It stays registered and listed; its runs and releases are untouched."""
        out = client(api, token, home).call("POST", f"/studies/{ref}/retire",
                                            {"reason": reason})
        if as_json:
            print(json.dumps(out))
            return
        instead = out["retired"]["instead"]
        console.print(f"study {out['ref']} {retired_note(out['retired'])}. New runs: "
                      + (f"use {instead} instead." if instead else
                         "register a new version (`fedward-coordinator study register FILE`)."),
                      highlight=False, markup=False)

    return study_app
