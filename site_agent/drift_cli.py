"""``fedward-site drift``: check a released model against the site's recent data, on demand.

``drift check`` runs one check (:mod:`site_agent.drift_runner`), shows the whole result per
feature at the site, queues the report that may leave and, with ``--send``, posts the queue
to the coordinator. ``drift send`` posts what is queued; ``drift show`` prints the queue
(``--json``: as one list).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from site_agent.cli_common import DirOpt, fail
from site_agent.config import ConfigError, SiteConfig

__all__ = ["drift_app"]

drift_app = typer.Typer(help="Drift and performance of a released model at this site.",
                        no_args_is_help=True, add_completion=False)
_console = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)
# What the exit status says to a scheduler: 0 ran (drift or not), 3 the check failed.
EXIT_CHECK_FAILED = 3


def _config(dir: Path) -> tuple[Path, SiteConfig]:
    root = dir.expanduser().resolve()
    try:
        return root, SiteConfig.load(root)
    except ConfigError as err:
        fail(str(err))


@drift_app.command("check")
def check(
    dir: DirOpt,
    release: Annotated[Path | None, typer.Option(
        help="the release bundle folder (default: drift.release in site.json)")] = None,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="the release public key (default: drift.public_key)")] = None,
    data: Annotated[Path | None, typer.Option(
        help="recent rows: a CSV file or a folder of them, in the site's schema "
             "(default: drift.data)")] = None,
    data_config: Annotated[Path | None, typer.Option(
        "--data-config",
        help="instead of --data: a JSON file holding a data connector block for the recent "
             "rows, as site.json's data block is written, e.g. a Parquet file or a "
             "read-only SQL query")] = None,
    send: Annotated[bool, typer.Option(
        "--send", help="post the queued reports to the coordinator afterwards")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check the release against the site's recent data; show every figure; queue the
    report that may leave (scores only, treated as the site policy says)."""
    from site_agent.drift_policy import DriftSchedule
    from site_agent.drift_runner import check_and_queue, source_kind

    root, cfg = _config(dir)
    base = DriftSchedule.from_raw(cfg.drift)
    if data is not None and data_config is not None:
        fail("give --data or --data-config, not both", 2)
    recent: str | dict[str, Any] | None = str(data) if data is not None else (
        _connector_block(data_config) if data_config is not None else None)
    chosen = {"release": release or (base.release if base else None),
              "public_key": public_key or (base.public_key if base else None),
              "data": recent or (base.data if base else None)}
    missing = [k for k, v in chosen.items() if v is None]
    if missing:
        fail(f"no {', '.join(missing)} given: pass "
             f"{' '.join('--' + k.replace('_', '-') for k in missing)} or set them "
             "in the drift section of site.json", 2)
    schedule = DriftSchedule(release=str(chosen["release"]),
                             public_key=str(chosen["public_key"]),
                             data=recent or (base.data if base else ""),
                             revocations=base.revocations if base else None)
    from site_agent.audit import AuditLogError

    try:
        outcome = check_and_queue(root, schedule)
    except AuditLogError as err:
        fail(f"nothing was queued: {err}")
    if as_json:
        _console.print(json.dumps({
            "report": outcome.report,
            "source": source_kind(schedule),
            "local": None if outcome.result is None else {
                "features": outcome.result.table(), "rows": outcome.result.n_rows,
                "accuracy": outcome.result.accuracy, "auc": outcome.result.auc},
            "error": None if outcome.error is None else {"kind": outcome.error.kind,
                                                         "reason": str(outcome.error)}}))
    elif outcome.error is not None:
        _err.print(f"[bold red]drift check failed[/] ({outcome.error.kind}): "
                   f"{escape(str(outcome.error))}")
        _console.print(f"queued for the coordinator: drift-check-failed "
                       f"({outcome.error.kind}), report {outcome.report['report_id']}")
    else:
        result = outcome.result
        assert result is not None
        table = Table(title=f"Release {result.release_id}: {result.n_rows} recent rows "
                            f"read through the {result.source} connector (exact figures; "
                            "they stay at this site)")
        for col in ("feature", "PSI", "chi-square", "dof", "p-value"):
            table.add_column(col)
        for row in result.table():
            table.add_row(escape(row["feature"]), f"{row['psi']:.4f}", f"{row['chi2']:.2f}",
                          str(row["dof"]), f"{row['p_value']:.3g}")
        _console.print(table)
        if result.ref_noise_std == 0:
            _console.print("note: the reference's DP noise is not known here (this site took "
                           "no part in the release's statistics phase and the file does not "
                           "state it): PSI and p-values of sparse bins overstate drift")
        if result.accuracy is not None:
            auc = "n/a" if result.auc is None else f"{result.auc:.4f}"
            _console.print(f"labelled rows: accuracy {result.accuracy:.4f}, AUC {auc}")
        else:
            _console.print("the rows carry no labels: input drift only")
        privacy = outcome.report["privacy"]
        _console.print(f"queued for the coordinator: report {outcome.report['report_id']} "
                       f"({len(outcome.report['features'])} features' scores, rows "
                       f"{outcome.report['rows']}, treatment {privacy['treatment']}"
                       + (f", drift epsilon of this release now {privacy['epsilon']:.3g}"
                          if privacy["epsilon"] is not None else "") + ")")
    if send:
        _send(root)
    if outcome.error is not None:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _connector_block(path: Path) -> dict[str, Any]:
    """The connector block of ``--data-config``, validated as site.json's drift data is
    (every problem at once)."""
    from site_agent.drift_policy import recent_source_problems

    try:
        block = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        fail(f"{path} is not a readable JSON connector block ({type(err).__name__}: {err})", 2)
    if not isinstance(block, dict):
        fail(f"{path} must hold one JSON object naming its 'connector'", 2)
    problems = recent_source_problems(block)
    if problems:
        fail(f"{path} is invalid:\n  - " + "\n  - ".join(problems), 2)
    return block


def _send(root: Path) -> None:
    from site_agent.drift_runner import send_pending

    sent, left, why = send_pending(root)
    _console.print(f"sent {sent} report(s); {left} queued"
                   + (f": {escape(why)}" if why else ""))


@drift_app.command("send")
def send_cmd(dir: DirOpt) -> None:
    """Post the queued drift reports to the coordinator (kept if it is unreachable)."""
    root, _ = _config(dir)
    _send(root)


@drift_app.command("show")
def show(dir: DirOpt, as_json: Annotated[bool, typer.Option(
        "--json", help="one JSON list of the queued reports, oldest first")] = False) -> None:
    """Print the reports queued to leave, exactly as they will be sent."""
    from site_agent.drift_runner import pending

    root, _ = _config(dir)
    queued = pending(root)
    if as_json:
        print(json.dumps([json.loads(path.read_text()) for path in queued]))
        return
    if not queued:
        _console.print("no drift report queued")
    for path in queued:
        _console.print(path.read_text().strip())
