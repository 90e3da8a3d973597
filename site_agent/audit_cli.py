"""``fedward-site audit``: show the site's local audit log and verify its hash chain."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from site_agent.cli_common import DirOpt, console, err_console
from site_agent.config import SitePaths

__all__ = ["audit_app"]

audit_app = typer.Typer(help="The site's local audit log: show entries, verify the chain.",
                        no_args_is_help=True, add_completion=False)


@audit_app.command("verify")
def audit_verify(dir: DirOpt) -> None:
    """Check the audit log's hash chain; name the first broken entry."""
    from site_agent.audit import inspect_log

    path = SitePaths(dir.expanduser().resolve()).audit_log
    verdict = inspect_log(path)
    if verdict.broken_seq is not None:
        err_console.print(f"entry {verdict.broken_seq} is broken: {verdict.why}",
                          highlight=False, markup=False)
        err_console.print(f"({verdict.n_entries} entries before it verify; keep a copy of "
                          f"{path} as evidence)", highlight=False, markup=False)
        raise typer.Exit(1)
    console.print(f"audit log intact: {verdict.n_entries} entries", highlight=False)
    console.print(f"head hash {verdict.head_hash} (record it elsewhere to detect later "
                  "rewrites or cut entries)", highlight=False)


@audit_app.command("show")
def audit_show(
    dir: DirOpt,
    run: Annotated[str | None, typer.Option(help="only entries about this run")] = None,
    last: Annotated[int | None, typer.Option(help="only the last N entries", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """Show audit log entries (sizes, names, ids and reasons; never data values)."""
    from site_agent.audit import read_entries

    path = SitePaths(dir.expanduser().resolve()).audit_log
    entries, verdict = read_entries(path)
    if run is not None:
        entries = [e for e in entries if str(e.detail.get("run")) == run]
    if last is not None:
        entries = entries[-last:]
    if as_json:
        for e in entries:
            print(json.dumps(e.to_dict(), sort_keys=True))
    else:
        table = Table("seq", "at (UTC)", "action", "detail")
        for e in entries:
            table.add_row(str(e.seq), e.at[:19].replace("T", " "), e.action,
                          json.dumps(dict(e.detail), sort_keys=True))
        console.print(table)
    if verdict.broken_seq is not None:
        err_console.print(f"warning: entry {verdict.broken_seq} is broken ({verdict.why}); "
                          "entries from it on are not shown: run `fedward-site audit verify`",
                          highlight=False, markup=False)
        raise typer.Exit(1)
