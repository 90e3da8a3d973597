"""``fedward-site ledger show``: the privacy ledger as hospital IT and a privacy officer read it.

Every disclosure the site made (training rounds, statistics releases, drift checks, tuning
searches) with the mechanism it used, and the composed epsilon of every run, project and
the whole site, with the accountant that produced each figure and the RDP cross-check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from site_agent.cli_common import fail
from site_agent.config import SitePaths

if TYPE_CHECKING:
    from privacy import Entry, PrivacyLedger

__all__ = ["entries_table", "ledger_app"]

ledger_app = typer.Typer(help="The site's privacy ledger: every disclosure and what it cost.",
                         no_args_is_help=True, add_completion=False)
_console = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)


def entries_table(entries: list[Entry], *, title: str | None = None) -> Text:
    """The ledger's entries for people: two lines per disclosure (what, when, state; then
    its mechanism in words), readable at any terminal width."""
    out = Text()
    if title:
        out.append(title + "\n", style="italic")
    for e in entries:
        out.append(f"#{e.id}  run {e.run_id}  {e.purpose} {e.key}  ", style="bold")
        out.append(f"{e.state}  reserved {e.reserved_at[:16].replace('T', ' ')} UTC  "
                   f"delta {e.delta:g}  run epsilon after {e.epsilon_after:.3f}\n")
        out.append(f"    {e.mechanism.describe()}\n")
    return out


def _figures(ledger: PrivacyLedger, run: str | None) -> dict[str, Any]:
    """Per run, per project and site-wide: epsilon, its accountant, the RDP cross-check."""
    snap = ledger.snapshot()
    runs = [r for r in snap.runs.values() if run is None or r.run_id == run]
    out: dict[str, Any] = {
        "runs": {r.run_id: ledger.spent(run_id=r.run_id, cross_check=True).to_dict()
                 for r in runs},
        "projects": {p: ledger.spent(project=p, cross_check=True).to_dict()
                     for p in sorted({r.project for r in runs})},
    }
    if run is None:
        out["site"] = ledger.spent(cross_check=True).to_dict()
    return out


def _figure_rows(figures: dict[str, Any]) -> Table:
    table = Table("scope", "epsilon", "delta", "accountant", "RDP cross-check",
                  title="composed epsilon (every disclosure)", title_justify="left")
    rows = [(f"run {k}", v) for k, v in figures["runs"].items()]
    rows += [(f"project {k}", v) for k, v in figures["projects"].items()]
    if "site" in figures:
        rows.append(("site-wide (all projects)", figures["site"]))
    for label, c in rows:
        check = "" if c["rdp"] is None or c["accountant"] == "rdp" else f"{c['rdp']:.3f}"
        none = c["accountant"] == "none"
        table.add_row(label, f"{c['epsilon']:.3f}", "" if none else f"{c['delta']:g}",
                      "(nothing spent)" if none else c["accountant"].upper(), check)
    return table


@ledger_app.command("show")
def show(
    dir: Annotated[Path, typer.Option("--dir", help="the site's data directory")],
    run: Annotated[str | None, typer.Option(help="only this run's entries")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """List every disclosure in the privacy ledger and the composed epsilon per run,
    project and site, with the accountant of each figure (PLD; RDP where a tuning
    selection is involved) and RDP as a cross-check of every PLD figure."""
    from privacy import LedgerCorruptError, PrivacyLedger, UnknownMechanismError

    paths = SitePaths(dir.expanduser().resolve())
    ledger = PrivacyLedger(paths.ledger)
    try:
        entries = [e for e in ledger.entries() if run is None or e.run_id == run]
        figures = _figures(ledger, run)
    except UnknownMechanismError as err:
        # Show what is stored, undecoded, so that IT can see (and report) the entry.
        _err.print(f"[bold red]error:[/] {escape(str(err))}")
        _meta, rows = ledger.raw()
        for row in rows:
            if run is None or row["run_id"] == run:
                _err.print(json.dumps(row, sort_keys=True), markup=False)
        raise typer.Exit(1) from None
    except LedgerCorruptError as err:
        fail(str(err))
    meta, _rows = ledger.raw()
    if as_json:
        print(json.dumps({
            "path": str(paths.ledger), "meta": meta,
            "entries": [{"id": e.id, "run": e.run_id, "project": e.project,
                         "purpose": e.purpose, "key": e.key, "round": e.round,
                         "delta": e.delta, "mechanism": e.mechanism.to_dict(),
                         "state": e.state, "epsilon_after": e.epsilon_after,
                         "reserved_at": e.reserved_at, "charged_at": e.charged_at}
                        for e in entries],
            "figures": figures}, sort_keys=True))
        return
    _console.print(f"privacy ledger {paths.ledger}" + (
        f" (migrated from {meta['migrated_from']} on {meta['migrated_at'][:10]})"
        if "migrated_from" in meta else ""), markup=False)
    if not entries:
        _console.print("no disclosure recorded" + (f" for run {run}" if run else ""),
                       markup=False)
        return
    _console.print(entries_table(entries))
    _console.print(_figure_rows(figures))
    _console.print("Every entry counts from the moment it is reserved (before any row is "
                   "read), whether or not its task finished. Epsilons compose: they do not "
                   "add up.", markup=False)
