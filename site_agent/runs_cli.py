"""``fedward-site runs``, ``status``, ``approve`` and ``deny``: the runs seen at this site,
its privacy budget, and hospital IT's decisions on runs that wait for approval."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column, Table

from site_agent.cli_common import DirOpt, console, err_console, fail
from site_agent.config import ConfigError, SiteConfig, SitePaths
from site_agent.ledger_cli import entries_table

if TYPE_CHECKING:
    from privacy.budget import SiteBudget

__all__ = ["approve", "deny", "runs", "status"]


def _user(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _budget(paths: SitePaths) -> tuple[SiteBudget, str]:
    """The site's composed privacy figures, and the policy's state (``ok``, ``missing`` or
    ``invalid``: then no cap is shown, and the agent refuses every run anyway)."""
    from privacy import PrivacyLedger, site_budget
    from site_agent.policy import PolicyError, PolicyMissingError, SitePolicy

    caps: dict[str, float] = {}
    site_cap: float | None = None
    try:
        policy = SitePolicy.load(paths.policy)
        caps = {name: p.epsilon_cap for name, p in policy.projects.items()}
        site_cap, state = policy.site_epsilon_cap, "ok"
    except PolicyMissingError:
        state = "missing"
    except PolicyError:
        state = "invalid"
    return site_budget(PrivacyLedger(paths.ledger), project_caps=caps, site_cap=site_cap), state


def _cap_text(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _budget_table(budget: SiteBudget) -> Table:
    """Spent (composed) and left per project and site-wide, for people."""
    table = Table("privacy budget", "spent (composed)", "cap", "left", "accountant",
                  title="epsilon at this site", title_justify="left")
    for scope in (*budget.projects, budget.site):
        label = f"project {scope.name}" if scope.scope == "project" else "site-wide (all projects)"
        table.add_row(label, f"{scope.spent:.3f}", _cap_text(scope.cap), _cap_text(scope.left),
                      "" if scope.accountant == "none" else scope.accountant.upper())
    return table


_COMPOSED_NOTE = ("Per-run epsilons do not add up: a project's figure composes every "
                  "disclosure of all its runs (training, statistics, tuning, monitoring: the "
                  "figure its cap bounds), and is usually well below their sum. "
                  "`fedward-site ledger show` lists every disclosure.")


def runs(dir: DirOpt,
         as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
         detail: Annotated[bool, typer.Option(
             "--detail", help="also list each run's disclosures (the privacy ledger's "
                              "mechanisms)")] = False,
         ) -> None:
    """List the runs this site has seen, their state and the epsilon they spent here, and
    the epsilon spent (composed) and left per project and site-wide."""
    from privacy import LedgerCorruptError, PrivacyLedger
    from site_agent.approvals import ApprovalBook, ApprovalsError
    from site_agent.run_status import run_statuses

    paths = SitePaths(dir.expanduser().resolve())
    ledger = PrivacyLedger(paths.ledger)
    try:
        statuses = run_statuses(ApprovalBook(paths.approvals), ledger)
        budget, _state = _budget(paths)
        entries = ledger.entries() if detail else []
    except (ApprovalsError, LedgerCorruptError) as err:
        fail(str(err))
    projects = {p.name: p for p in budget.projects}
    if as_json:
        # One object per run, as before; each also carries its project's and the site's
        # composed figures (spent, cap, left), and with --detail its disclosures.
        print(json.dumps([{
            **s.to_dict(),
            "project_budget": (projects[s.record.project].to_dict()
                               if s.record.project in projects else None),
            "site_budget": budget.site.to_dict(),
            **({"disclosures": [{"id": e.id, "purpose": e.purpose, "key": e.key,
                                 "state": e.state, "mechanism": e.mechanism.to_dict(),
                                 "delta": e.delta, "epsilon_after": e.epsilon_after}
                                for e in entries if e.run_id == s.record.run]}
               if detail else {}),
        } for s in statuses]))
        return
    if not statuses:
        console.print("no run seen yet (a run is listed when its first task arrives)")
    else:
        # The status is never cut ("cance…" would hide a cancelled run at 80 columns).
        table = Table("run", "project", "task", "first seen (UTC)",
                      Column("status", no_wrap=True,
                             min_width=max(len(st.status) for st in statuses)),
                      "rounds", "run epsilon", "decided by", "note")
        for st in statuses:
            rec = st.record
            note = (rec.cancel_note() if st.status == "cancelled" else
                    rec.reason if st.status == "denied" else (rec.last_refusal or ""))
            table.add_row(rec.run, rec.project, rec.task,
                          rec.first_seen[:19].replace("T", " "), st.status,
                          f"{st.rounds_trained}/{rec.total_rounds}", f"{st.epsilon_spent:.3f}",
                          rec.by or "", note or "")
        console.print(table)
        # Who cancelled and why in full: the note column is cut at 80 columns.
        for st in statuses:
            if st.status == "cancelled":
                console.print(f"run {st.record.run} was {st.record.cancel_note()} (the "
                              "coordinator's cancel reached this site at "
                              f"{st.record.cancelled_at}); it cannot be approved any more",
                              highlight=False, markup=False)
    if detail:
        for st in statuses:
            own = [e for e in entries if e.run_id == st.record.run]
            if own:
                console.print(entries_table(own, title=f"run {st.record.run}: disclosures"))
    console.print(_budget_table(budget))
    console.print(_COMPOSED_NOTE, highlight=False)


def status(dir: DirOpt,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False
           ) -> None:
    """The site at a glance: its policy, the runs it has seen, and the epsilon spent
    (composed) and left per project and site-wide."""
    from privacy import LedgerCorruptError, PrivacyLedger
    from site_agent.approvals import ApprovalBook, ApprovalsError
    from site_agent.run_status import run_statuses

    root = dir.expanduser().resolve()
    paths = SitePaths(root)
    name: str | None = None
    try:
        name = SiteConfig.load(root).name
    except ConfigError:
        name = None  # shown as not configured; the budget is still read
    try:
        statuses = run_statuses(ApprovalBook(paths.approvals), PrivacyLedger(paths.ledger))
        budget, policy_state = _budget(paths)
    except (ApprovalsError, LedgerCorruptError) as err:
        fail(str(err))
    counts: dict[str, int] = {}
    for st in statuses:
        counts[st.status] = counts.get(st.status, 0) + 1
    if as_json:
        print(json.dumps({"site": name, "policy": policy_state, "runs": counts,
                          "projects": [p.to_dict() for p in budget.projects],
                          "site_budget": budget.site.to_dict(), "run_epsilon": budget.runs}))
        return
    console.print(f"site {name or '(not configured: run `fedward-site init`)'} at {root}",
                  highlight=False, markup=False)
    console.print(f"policy: {policy_state}" + ("" if policy_state == "ok" else
                  " (every run is refused until it is fixed: `fedward-site policy check`)"),
                  highlight=False)
    seen = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none yet"
    console.print(f"runs seen: {seen}", highlight=False)
    console.print(_budget_table(budget))
    console.print(_COMPOSED_NOTE, highlight=False)


def _decide(root: Path, run: str, decision: str, *, by: str, reason: str | None) -> None:
    from site_agent.approvals import ApprovalBook, ApprovalsError
    from site_agent.audit import AuditLog, AuditLogError

    paths = SitePaths(root)
    audit = AuditLog(paths.audit_log)
    try:
        record, before = ApprovalBook(paths.approvals).decide(
            run, "approved" if decision == "approve" else "denied", by=by, reason=reason)
    except ApprovalsError as err:
        fail(str(err))
    detail: dict[str, Any] = {"run": run, "project": record.project, "task": record.task,
                              "by": by, "previous": before}
    if reason is not None:
        detail["reason"] = reason
    try:
        audit.append("run-approved" if decision == "approve" else "run-denied", detail)
    except AuditLogError as err:
        err_console.print(f"[bold yellow]warning:[/] the decision is recorded but the audit "
                          f"log could not be written: {err}")
    if decision == "approve":
        console.print(f"run {run} ({record.project}, {record.task}) approved by {by}: its next "
                      "task trains here")
    else:
        console.print(f"run {run} ({record.project}, {record.task}) denied by {by}: every "
                      "further task of it is refused")


def approve(run: Annotated[str, typer.Argument(help="the run id (see `fedward-site runs`)")],
            dir: DirOpt,
            by: Annotated[str | None, typer.Option(
                help="who approves (default: the login name)")] = None) -> None:
    """Approve a run that waits at this site (policy require_approval)."""
    _decide(dir.expanduser().resolve(), run, "approve", by=_user(by), reason=None)


def deny(run: Annotated[str, typer.Argument(help="the run id (see `fedward-site runs`)")],
         dir: DirOpt,
         reason: Annotated[str, typer.Option(help="why (kept in the local audit log)")],
         by: Annotated[str | None, typer.Option(
             help="who denies (default: the login name)")] = None) -> None:
    """Deny a run: every further task of it is refused at this site."""
    if not reason.strip():
        fail("give a reason with --reason")
    _decide(dir.expanduser().resolve(), run, "deny", by=_user(by), reason=reason.strip())
