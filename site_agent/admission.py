"""The site's gate: the site policy and the local approvals applied to every task.

:class:`SiteGate` admits a task of a run, or refuses it with the reason the coordinator
gets, before any data is touched; :func:`check_rounds_per_day` enforces the policy's daily
round limit before each round trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedward.plugins import PluginPin, plugin_refusal
from site_agent.approvals import PENDING_PREFIX, ApprovalBook, RunRecord
from site_agent.policy import PolicyError, PolicyMissingError, SitePolicy

if TYPE_CHECKING:
    from privacy.ledger import PrivacyLedger

__all__ = [
    "Admission",
    "PendingApproval",
    "PolicyRefusal",
    "SiteGate",
    "check_rounds_per_day",
    "rounds_trained_since",
]

_DAY: Final = timedelta(hours=24)


class PolicyRefusal(Exception):
    """A task the site policy does not let through; ``reason`` goes to the coordinator."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PendingApproval(PolicyRefusal):
    """The policy wants a local approval of the run and nobody has decided yet.

    Not a refusal: the run waits at the site until its IT approves or denies it. The
    reason starts with :data:`PENDING_PREFIX`.
    """


@dataclass(frozen=True)
class Admission:
    """What the site policy lets a task do.

    Attributes:
        epsilon_cap: the project's epsilon cap (all its runs at this site, composed).
        max_rounds_per_day: the daily round limit, if any.
        site_epsilon_cap: the site-wide cap (every run of every project, composed), if any.
        local_baselines: an evaluation may ask for the site's local-only DP baseline.
    """

    epsilon_cap: float
    max_rounds_per_day: int | None
    site_epsilon_cap: float | None = None
    local_baselines: bool = False


AuditFn = Callable[[str, dict[str, Any]], None]


def _no_audit(action: str, detail: dict[str, Any]) -> None:
    """The default audit callback: records nothing."""


@dataclass
class SiteGate:
    """Applies the site policy and the local approvals to every task, before any data.

    Args:
        site_name: the site's name (quoted in the pending-approval reason).
        policy_path: ``policy.json``; re-read for every task.
        approvals: the site's :class:`ApprovalBook`.
        audit: called with (action, detail) for runs seen and policy changes.
    """

    site_name: str
    policy_path: Path
    approvals: ApprovalBook
    audit: AuditFn = field(default=_no_audit)
    _last_policy: str | None = field(default=None, init=False)

    def current_policy(self) -> SitePolicy:
        """Load the policy now; record in the audit log when its content changed.

        Raises:
            PolicyError: if it is missing or invalid.
        """
        try:
            policy = SitePolicy.load(self.policy_path)
        except PolicyError as err:
            state = "missing" if isinstance(err, PolicyMissingError) else "invalid"
            if self._last_policy != state:
                self._last_policy = state
                self.audit(f"policy-{state}", {"problems": len(err.problems)})
            raise
        digest = policy.digest()
        if self._last_policy != digest:
            self._last_policy = digest
            self.audit("policy-loaded", {
                "digest": digest, "projects": sorted(policy.projects),
                "require_approval": policy.require_approval,
                "max_rounds_per_day": policy.max_rounds_per_day,
                "site_epsilon_cap": policy.site_epsilon_cap,
            })
        return policy

    def admit(self, *, run_id: str, project: str, task: str, total_rounds: int,
              study: str | None = None, study_hash: str | None = None,
              plugin: tuple[PluginPin, str | None] | None = None) -> Admission:
        """Let a task of ``run_id`` through, or raise :class:`PolicyRefusal` with the reason.

        The run is recorded as seen on its first task, whatever the outcome. A run of a
        study (``study_hash`` given) needs that hash approved for the project instead of
        the task being listed. A run that pins a model plugin (``plugin``: the pin and the
        entry point the site's study names, if known) needs exactly that distribution
        installed here and allowed by the policy (:func:`fedward.plugins.plugin_refusal`).

        Raises:
            PendingApproval: the run waits for a local approval (nobody decided yet).
            PolicyRefusal: the policy is missing or invalid, the project or task is not
                accepted, or the run is denied.
            ApprovalsError: if the approvals file cannot be read or written.
        """
        policy: SitePolicy | None
        try:
            policy = self.current_policy()
            policy_problem = None
        except PolicyMissingError:
            policy = None
            policy_problem = (
                f"refused-policy: site {self.site_name} has no site policy yet; its IT must "
                "write policy.json before it accepts any run (fedward-site policy init)")
        except PolicyError:
            policy = None
            policy_problem = (
                f"refused-policy: the site policy of {self.site_name} is invalid; its IT runs "
                "`fedward-site policy check` to see and fix it")

        def decide(record: RunRecord) -> str | None:
            if (record.project, record.task, record.study_hash) != (project, task, study_hash):
                # A reused run id (e.g. a coordinator database started afresh) must not
                # inherit an approval given for another run.
                if record.study_hash is None and study_hash is None:
                    return (f"refused-policy: run {run_id} was first seen here for project "
                            f"{record.project}, task {record.task}; a run's project and "
                            "task cannot change")
                return (f"refused-policy: run {run_id} was first seen here for project "
                        f"{record.project}, task {record.task}, study "
                        f"{record.study or 'none'}; a run's project, task and study cannot "
                        "change")
            if policy is None:
                return policy_problem
            accepted = policy.projects.get(project)
            if accepted is None:
                return f"refused-policy: project {project} is not accepted by this site"
            if study_hash is not None:
                if study_hash not in accepted.studies:
                    what = (f"study {study or '?'} (sha256 {study_hash}) is not approved for "
                            f"project {project} at site {self.site_name}; its IT reviews the "
                            "spec and approves it (fedward-site policy approve-study FILE "
                            f"--project {project})")
                    return (f"{PENDING_PREFIX}: {what}" if policy.require_approval
                            else f"refused-policy: {what}")
            elif task not in accepted.tasks:
                return (f"refused-policy: task {task} is not accepted for project {project} "
                        "by this site")
            if plugin is not None:
                why = plugin_refusal(site=self.site_name, pin=plugin[0],
                                     allowed=policy.plugins, entry_point=plugin[1])
                if why is not None:
                    return f"refused-policy: {why}"
            if record.decision == "denied":
                return f"refused-policy: run {run_id} was denied at this site"
            if policy.require_approval and record.decision != "approved":
                if record.cancelled:
                    # Its approval was closed by the cancel: it would wait for ever.
                    return (f"refused-policy: run {run_id} was {record.cancel_note()} before "
                            f"it was approved at site {self.site_name}; a cancelled run "
                            "cannot be approved any more")
                return (f"{PENDING_PREFIX}: run {run_id} waits for approval at site "
                        f"{self.site_name} (fedward-site approve {run_id})")
            return None

        _record, new, reason = self.approvals.observe(
            run_id=run_id, project=project, task=task, total_rounds=total_rounds,
            refusal=decide, study=study, study_hash=study_hash)
        if new:
            self.audit("run-seen", {
                "run": run_id, "project": project, "task": task,
                "total_rounds": total_rounds,
                **({"study": study, "study_hash": study_hash} if study_hash else {}),
                **({"model_plugin": plugin[0].to_config()} if plugin else {}),
                "approval": ("pending" if reason is not None
                             and reason.startswith(PENDING_PREFIX) else
                             "refused" if reason is not None else "not-required"),
            })
        if reason is not None:
            if reason.startswith(PENDING_PREFIX):
                raise PendingApproval(reason)
            raise PolicyRefusal(reason)
        assert policy is not None
        return Admission(epsilon_cap=policy.projects[project].epsilon_cap,
                         max_rounds_per_day=policy.max_rounds_per_day,
                         site_epsilon_cap=policy.site_epsilon_cap,
                         local_baselines=policy.local_baselines)


def rounds_trained_since(ledger: PrivacyLedger, since: datetime, *,
                         exclude: tuple[str, int] | None = None) -> list[datetime]:
    """When each round charged in the ledger since ``since`` was last written, oldest first.

    Every charged round counts (a reserved round that crashed may have touched the data).

    Args:
        ledger: the site's privacy ledger.
        since: the start of the window (timezone-aware).
        exclude: a (run id, round) not to count: the round about to be retried.
    """
    times: list[datetime] = []
    for run_id, run in ledger.all_runs().items():
        for number, rec in run.rounds.items():
            if exclude is not None and (run_id, number) == exclude:
                continue
            try:
                at = datetime.fromisoformat(rec.at)
            except ValueError:
                at = datetime.now(UTC)  # unreadable: count it, the safe side
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            if at >= since:
                times.append(at)
    return sorted(times)


def check_rounds_per_day(ledger: PrivacyLedger, *, limit: int | None, run_id: str,
                         round_number: int, now: datetime | None = None) -> None:
    """Raise :class:`PolicyRefusal` if one more round would exceed the daily limit."""
    if limit is None:
        return
    now = now or datetime.now(UTC)
    recent = rounds_trained_since(ledger, now - _DAY, exclude=(run_id, round_number))
    if len(recent) >= limit:
        free_at = recent[len(recent) - limit] + _DAY
        hours = max(0.0, (free_at - now).total_seconds() / 3600)
        raise PolicyRefusal(
            f"refused-policy: this site trains at most {limit} round(s) per 24 hours and has "
            f"trained {len(recent)}; the next round can train in {hours:.1f} h")
