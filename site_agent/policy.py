"""The site policy and local run approvals: the hospital, not the coordinator, decides.

Two small JSON files in the site's data directory:

``policy.json`` is written by hospital IT (``fedward-site init`` or ``fedward-site policy
init`` writes a starter) and only ever read by the agent. The coordinator cannot change it:
nothing that arrives over the network is written to it. It is re-read for every task, so an
edit applies at once without a restart; an edit that makes it invalid makes the site refuse
every task with a reason (it never falls back to something more permissive). Without a
policy file the site refuses every run: default-deny. Format, version 1::

    {"version": 1,
     "projects": {"oncology": {"epsilon_cap": 4.0, "tasks": ["breast_cancer_mlp"]}},
     "require_approval": true,
     "max_rounds_per_day": 50,
     "site_epsilon_cap": 6.0}

* ``projects``: the only projects the site works for; per project, the epsilon cap for all
  of the project's runs at this site composed together, the registry tasks accepted, and
  (optional) ``studies``: the study specs approved, each by its content hash (the SHA-256
  that ``fedward-site policy approve-study FILE`` prints and the coordinator's ``study
  show`` lists). A run of a study is let through only if its hash is listed: a changed spec
  has another hash and needs its own approval. Until then it waits ("pending-approval")
  when ``require_approval`` is on, and is refused otherwise.
* ``site_epsilon_cap`` (optional, ``null``: none): the most epsilon every run of every
  project may spend at this site, composed together. Projects that train on the same
  patients release information about the same people: a cap per project alone would let
  each project spend its whole cap on them.
* ``require_approval``: each new run waits ("pending-approval") until someone at the site
  runs ``fedward-site approve RUN``.
* ``max_rounds_per_day``: at most this many rounds trained in any 24 hours (``null``: no
  limit).

``approvals.json`` is written by the agent (when a run's first task or admission question
arrives) and by the ``approve`` / ``deny`` commands, atomically and under a file lock::

    {"version": 1,
     "runs": {"7": {"run": "7", "project": "oncology", "task": "breast_cancer_mlp",
                    "total_rounds": 3, "first_seen": "2025-...+00:00",
                    "decision": null | "approved" | "denied", "by": null | "alice",
                    "decided_at": null | "...", "reason": null | "text",
                    "last_refusal": null | "refused-policy: ..."}}}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

from fedward.files import FileLock, atomic_write
from fedward.plugins import PluginPin, plugin_refusal
from site_agent.drift_policy import DriftDisclosure, drift_policy_problems
from site_agent.plugin_policy import plugin_policy_problems, plugins_from_raw, plugins_to_raw

if TYPE_CHECKING:
    from privacy.ledger import PrivacyLedger

__all__ = [
    "APPROVALS_VERSION",
    "PENDING_PREFIX",
    "POLICY_VERSION",
    "Admission",
    "ApprovalBook",
    "ApprovalsError",
    "PendingApproval",
    "PolicyError",
    "PolicyMissingError",
    "PolicyRefusal",
    "ProjectPolicy",
    "RunRecord",
    "RunStatus",
    "SiteGate",
    "SitePolicy",
    "check_rounds_per_day",
    "rounds_trained_since",
    "run_statuses",
]

POLICY_VERSION: Final = 1
APPROVALS_VERSION: Final = 1
PENDING_PREFIX: Final = "pending-approval"
_TOP_KEYS: Final = ("version", "projects", "require_approval", "max_rounds_per_day",
                    "site_epsilon_cap", "drift", "plugins")
_REQUIRED_KEYS: Final = ("version", "projects", "require_approval")
_PROJECT_KEYS: Final = ("epsilon_cap", "tasks", "studies")
_HASH_CHARS: Final = frozenset("0123456789abcdef")
_DAY: Final = timedelta(hours=24)

Decision = Literal["approved", "denied"]


class PolicyError(ValueError):
    """The site policy is missing or invalid; the message lists every problem.

    Attributes:
        problems: each problem, one sentence each.
    """

    def __init__(self, message: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(message)


class PolicyMissingError(PolicyError):
    """There is no policy file: the site refuses every run until IT writes one."""


class ApprovalsError(Exception):
    """The approvals file cannot be read or a decision cannot be recorded."""


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


# -- the policy file --------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectPolicy:
    """What the site accepts for one project.

    Attributes:
        epsilon_cap: the most epsilon all of the project's runs may spend at this site,
            composed together.
        tasks: registry task names the site trains for this project.
        studies: content hashes (SHA-256, hex) of the study specs approved for it.
    """

    epsilon_cap: float
    tasks: tuple[str, ...]
    studies: tuple[str, ...] = ()


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _known_tasks() -> frozenset[str]:
    # Imported here: fedward.tasks imports torch, which the light CLI commands never need.
    from fedward.tasks import TASKS

    return frozenset(TASKS)


@dataclass(frozen=True)
class SitePolicy:
    """The site's policy (see the module docstring for the file format).

    Attributes:
        projects: project name -> :class:`ProjectPolicy` (an immutable mapping).
        require_approval: each new run waits for a local approval.
        max_rounds_per_day: at most this many rounds trained in any 24 hours; None: no limit.
        site_epsilon_cap: the most epsilon all runs of all projects may spend at this
            site, composed together; None: no site-wide cap.
        drift: how drift reports leave (:mod:`site_agent.drift_policy`); the default
            (no ``drift`` section) is Gaussian noise charged to the ledger.
        plugins: the model plugin distributions runs may use, each exactly (name,
            version, RECORD hash; :mod:`site_agent.plugin_policy`); none by default.
        version: the file format version (1).
    """

    projects: Mapping[str, ProjectPolicy]
    require_approval: bool
    max_rounds_per_day: int | None = None
    site_epsilon_cap: float | None = None
    drift: DriftDisclosure = field(default_factory=DriftDisclosure)
    plugins: tuple[PluginPin, ...] = ()
    version: int = POLICY_VERSION

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read and validate the policy file at ``path``.

        Raises:
            PolicyMissingError: if there is no file (the site then refuses every run).
            PolicyError: listing every problem of an unreadable or invalid file.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyMissingError(
                f"no site policy at {path}: this site refuses every run until hospital IT "
                f"writes one (`fedward-site policy init --dir {path.parent} --project NAME`, "
                "see the operator guide, 'Site policy')",
                ["the policy file does not exist"],
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise PolicyError(f"cannot read the site policy {path}: {err}",
                              [f"unreadable ({err})"]) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyError(
                f"the site policy {path} is not valid JSON ({err}); fix it, then run "
                f"`fedward-site policy check --dir {path.parent}`",
                [f"not valid JSON ({err})"],
            ) from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: object, *, source: str = "site policy") -> SitePolicy:
        """Validate a parsed policy; raise :class:`PolicyError` listing every problem."""
        problems = _validate(raw)
        if problems:
            raise PolicyError(
                f"{source} is invalid; until it is fixed this site refuses every run:\n  - "
                + "\n  - ".join(problems),
                problems,
            )
        assert isinstance(raw, dict)
        projects = {
            str(name): ProjectPolicy(epsilon_cap=float(spec["epsilon_cap"]),
                                     tasks=tuple(str(t) for t in spec["tasks"]),
                                     studies=tuple(str(h) for h in spec.get("studies", ())))
            for name, spec in raw["projects"].items()
        }
        rounds = raw.get("max_rounds_per_day")
        site_cap = raw.get("site_epsilon_cap")
        return cls(projects=MappingProxyType(projects),
                   require_approval=bool(raw["require_approval"]),
                   max_rounds_per_day=None if rounds is None else int(rounds),
                   site_epsilon_cap=None if site_cap is None else float(site_cap),
                   drift=DriftDisclosure.from_raw(raw.get("drift")),
                   plugins=plugins_from_raw(raw.get("plugins")))

    @classmethod
    def starter(cls, *, project: str, task: str, epsilon_cap: float = 10.0,
                require_approval: bool = False,
                site_epsilon_cap: float | None = None) -> SitePolicy:
        """The policy ``fedward-site init`` writes: one project, the site's own task.

        A site mapped to a study of its own (not a registry task) gets a project that
        accepts no task and only the studies approved for it: none until its IT reviews
        the spec (``fedward-site policy approve-study``).
        """
        accepts: dict[str, Any] = ({"tasks": [task]} if task in _known_tasks()
                                   else {"tasks": [], "studies": []})
        return cls.from_dict({
            "version": POLICY_VERSION,
            "projects": {project: {"epsilon_cap": epsilon_cap, **accepts}},
            "require_approval": require_approval,
            "max_rounds_per_day": None,
            "site_epsilon_cap": site_epsilon_cap,
        }, source="starter policy")

    def to_dict(self) -> dict[str, Any]:
        """The policy as written to ``policy.json``."""
        return {
            "version": self.version,
            "projects": {name: {"epsilon_cap": p.epsilon_cap, "tasks": list(p.tasks),
                                **({"studies": list(p.studies)}
                                   if p.studies or not p.tasks else {})}
                         for name, p in sorted(self.projects.items())},
            "require_approval": self.require_approval,
            "max_rounds_per_day": self.max_rounds_per_day,
            "site_epsilon_cap": self.site_epsilon_cap,
            **({"drift": self.drift.to_dict()} if self.drift != DriftDisclosure() else {}),
            **({"plugins": plugins_to_raw(self.plugins)} if self.plugins else {}),
        }

    def save(self, path: Path) -> None:
        """Write the policy to ``path`` atomically (mode 0644: IT reads it; the agent too)."""
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2) + "\n", mode=0o644)

    def digest(self) -> str:
        """A short fingerprint of the policy's content, for the audit log."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _validate(raw: object) -> list[str]:
    """Every problem of a parsed policy document (empty when it is sound)."""
    if not isinstance(raw, dict):
        return ["the file must hold one JSON object"]
    problems: list[str] = []
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        problems.append(f"unknown keys {unknown} (known: {list(_TOP_KEYS)})")
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        problems.append(f"required keys missing: {missing}")
    if "version" in raw and (raw["version"] != POLICY_VERSION
                             or isinstance(raw["version"], bool)):
        problems.append(f"version is {raw['version']!r}, expected {POLICY_VERSION}")
    if "require_approval" in raw and not isinstance(raw["require_approval"], bool):
        problems.append(f"require_approval is {raw['require_approval']!r}, expected true or "
                        "false")
    rounds = raw.get("max_rounds_per_day")
    if rounds is not None and not (isinstance(rounds, int) and not isinstance(rounds, bool)
                                   and rounds >= 1):
        problems.append(f"max_rounds_per_day is {rounds!r}, expected an integer >= 1 or null")
    site_cap = raw.get("site_epsilon_cap")
    if site_cap is not None and not (_is_number(site_cap) and site_cap > 0):
        problems.append(f"site_epsilon_cap is {site_cap!r}, expected a number > 0 or null")
    problems += drift_policy_problems(raw.get("drift"))
    problems += plugin_policy_problems(raw.get("plugins"))
    projects = raw.get("projects")
    if "projects" in raw and not isinstance(projects, dict):
        problems.append("projects must be an object: project name -> "
                        '{"epsilon_cap": number, "tasks": [task names]}')
    elif isinstance(projects, dict):
        known = _known_tasks()
        for name, spec in projects.items():
            where = f"project {name!r}"
            if not name.strip():
                problems.append("a project name is empty")
            if not isinstance(spec, dict):
                problems.append(f"{where} must be an object with epsilon_cap and tasks")
                continue
            extra = sorted(set(spec) - set(_PROJECT_KEYS))
            if extra:
                problems.append(f"{where}: unknown keys {extra} (known: {list(_PROJECT_KEYS)})")
            cap = spec.get("epsilon_cap")
            if not (isinstance(cap, int | float) and _is_number(cap) and cap > 0):
                problems.append(f"{where}: epsilon_cap is {cap!r}, expected a number > 0")
            problems.extend(_study_problems(where, spec.get("studies", [])))
            tasks = spec.get("tasks")
            # A project that only trains approved studies may list no task (and, until its
            # IT approves one, an empty list of studies: it then accepts nothing).
            studies = spec.get("studies")
            if not (isinstance(tasks, list) and (tasks or isinstance(studies, list))):
                problems.append(f"{where}: tasks is {tasks!r}, expected a non-empty list of "
                                f"task names (known: {sorted(known)})")
                continue
            for task in tasks:
                if not isinstance(task, str) or task not in known:
                    problems.append(f"{where}: task {task!r} is not a registry task (known: "
                                    f"{sorted(known)})")
            dupes = sorted({t for t in tasks if isinstance(t, str) and tasks.count(t) > 1})
            if dupes:
                problems.append(f"{where}: tasks listed twice: {dupes}")
    return problems


def _study_problems(where: str, studies: object) -> list[str]:
    """Problems of a project's ``studies``: a list of distinct SHA-256 hex digests."""
    if not isinstance(studies, list):
        return [f"{where}: studies is {studies!r}, expected a list of study hashes (SHA-256, "
                "64 hex digits; `fedward-site policy approve-study FILE` adds one)"]
    problems = [f"{where}: study hash {h!r} is not a SHA-256 (64 lowercase hex digits)"
                for h in studies
                if not (isinstance(h, str) and len(h) == 64 and set(h) <= _HASH_CHARS)]
    dupes = sorted({h for h in studies if isinstance(h, str) and studies.count(h) > 1})
    if dupes:
        problems.append(f"{where}: studies listed twice: {dupes}")
    return problems


# -- approvals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """A run as this site has seen it (one entry of ``approvals.json``).

    Attributes:
        run: the coordinator's run id.
        project: the run's project.
        task: the run's registry task.
        total_rounds: rounds the run plans.
        first_seen: when its first task arrived, ISO 8601 in UTC.
        decision: the local decision, if any: ``approved`` or ``denied``.
        by: who decided.
        decided_at: when, ISO 8601 in UTC.
        reason: the reason given with a denial.
        last_refusal: the reason the run's last task was refused by the site policy (None
            when its last task was let through).
        study: the study the run trains, NAME@VERSION (None: a registry task).
        study_hash: that study's content hash.
    """

    run: str
    project: str
    task: str
    total_rounds: int
    first_seen: str
    decision: Decision | None = None
    by: str | None = None
    decided_at: str | None = None
    reason: str | None = None
    last_refusal: str | None = None
    study: str | None = None
    study_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as stored (the study keys only for a run of a study)."""
        out: dict[str, Any] = {
            "run": self.run, "project": self.project, "task": self.task,
            "total_rounds": self.total_rounds, "first_seen": self.first_seen,
            "decision": self.decision, "by": self.by, "decided_at": self.decided_at,
            "reason": self.reason, "last_refusal": self.last_refusal}
        if self.study_hash is not None:
            out.update(study=self.study, study_hash=self.study_hash)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunRecord:
        """Parse a stored record (validated by :class:`ApprovalBook`)."""
        return cls(run=raw["run"], project=raw["project"], task=raw["task"],
                   total_rounds=int(raw["total_rounds"]), first_seen=raw["first_seen"],
                   decision=raw.get("decision"), by=raw.get("by"),
                   decided_at=raw.get("decided_at"), reason=raw.get("reason"),
                   last_refusal=raw.get("last_refusal"), study=raw.get("study"),
                   study_hash=raw.get("study_hash"))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _validate_book(doc: object) -> list[str]:
    if not isinstance(doc, dict):
        return ["top level is not a JSON object"]
    problems: list[str] = []
    if doc.get("version") != APPROVALS_VERSION:
        problems.append(f"version is {doc.get('version')!r}, expected {APPROVALS_VERSION}")
    runs = doc.get("runs")
    if not isinstance(runs, dict):
        return [*problems, "'runs' is missing or not an object"]
    for run_id, rec in runs.items():
        where = f"run {run_id!r}"
        if not isinstance(rec, dict) or rec.get("run") != run_id:
            problems.append(f"{where} is not a run record")
            continue
        for key in ("project", "task", "first_seen"):
            if not isinstance(rec.get(key), str):
                problems.append(f"{where}: {key} is not a string")
        if not (isinstance(rec.get("total_rounds"), int)
                and not isinstance(rec.get("total_rounds"), bool)):
            problems.append(f"{where}: total_rounds is not an integer")
        if rec.get("decision") not in (None, "approved", "denied"):
            problems.append(f"{where}: decision is {rec.get('decision')!r}")
        for key in ("by", "decided_at", "reason", "last_refusal", "study", "study_hash"):
            if rec.get(key) is not None and not isinstance(rec.get(key), str):
                problems.append(f"{where}: {key} is not a string")
    return problems


class ApprovalBook:
    """``approvals.json``: the runs seen at this site and the local decisions on them.

    Shared by the agent and the CLI: every change re-reads the file under a thread lock and
    an advisory ``flock`` on ``approvals.json.lock``, and replaces it atomically.

    Args:
        path: the approvals file; missing means no run seen yet.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._file_lock = FileLock(self._path.with_name(self._path.name + ".lock"))

    @property
    def path(self) -> Path:
        """The approvals file."""
        return self._path

    def _locked(self) -> FileLock:
        return self._file_lock

    def _read(self) -> dict[str, Any]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": APPROVALS_VERSION, "runs": {}}
        except (OSError, UnicodeDecodeError) as err:
            raise ApprovalsError(f"cannot read {self._path}: {err}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ApprovalsError(
                f"{self._path} is not valid JSON ({err}); restore it from backup: the site "
                "refuses runs until it can read its approvals") from None
        problems = _validate_book(doc)
        if problems:
            raise ApprovalsError(
                f"{self._path} is damaged ({'; '.join(problems)}); restore it from backup: "
                "the site refuses runs until it can read its approvals")
        assert isinstance(doc, dict)
        return doc

    def _write(self, doc: Mapping[str, Any]) -> None:
        atomic_write(self._path, json.dumps(doc, indent=2, sort_keys=True) + "\n",
                      mode=0o600)

    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None if the run was never seen."""
        with self._locked():
            raw = self._read()["runs"].get(run_id)
        return None if raw is None else RunRecord.from_dict(raw)

    def all(self) -> list[RunRecord]:
        """Every run seen, oldest first."""
        with self._locked():
            runs = self._read()["runs"]
        return sorted((RunRecord.from_dict(r) for r in runs.values()),
                      key=lambda r: (r.first_seen, r.run))

    def observe(self, *, run_id: str, project: str, task: str, total_rounds: int,
                refusal: Callable[[RunRecord], str | None], study: str | None = None,
                study_hash: str | None = None) -> tuple[RunRecord, bool, str | None]:
        """Record a task of ``run_id`` and decide on it in one locked step.

        Args:
            run_id: the run's id.
            project: its project (as the task says).
            task: its task name.
            total_rounds: rounds it plans.
            study: the study it trains (NAME@VERSION), if any.
            study_hash: that study's content hash.
            refusal: given the run's record, the refusal reason or None to let it through;
                called under the lock so that a decision cannot change in between.

        Returns:
            (the stored record, whether the run was seen for the first time, the refusal).
        """
        with self._locked():
            doc = self._read()
            raw = doc["runs"].get(run_id)
            new = raw is None
            record = (RunRecord(run=run_id, project=project, task=task,
                                total_rounds=total_rounds, first_seen=_now(), study=study,
                                study_hash=study_hash)
                      if raw is None else RunRecord.from_dict(raw))
            reason = refusal(record)
            if new or record.last_refusal != reason:
                record = RunRecord(**{**record.to_dict(), "last_refusal": reason})
                doc["runs"][run_id] = record.to_dict()
                self._write(doc)
        return record, new, reason

    def decide(self, run_id: str, decision: Decision, *, by: str,
               reason: str | None = None) -> tuple[RunRecord, Decision | None]:
        """Approve or deny a run that this site has seen.

        Returns:
            (the updated record, the decision it had before).

        Raises:
            ApprovalsError: if the run was never seen here (a typo would otherwise approve a
                run that does not exist yet), or the file cannot be read.
        """
        with self._locked():
            doc = self._read()
            raw = doc["runs"].get(run_id)
            if raw is None:
                seen = ", ".join(sorted(doc["runs"])) or "none yet"
                raise ApprovalsError(
                    f"run {run_id!r} has not been seen at this site (runs seen: {seen}); a run "
                    "is listed once its first task arrives: see `fedward-site runs`")
            before = RunRecord.from_dict(raw)
            refusal = before.last_refusal
            if refusal is not None and refusal.startswith(PENDING_PREFIX):
                refusal = None  # no longer waiting; the next task is decided afresh
            record = RunRecord(**{**before.to_dict(), "decision": decision, "by": by,
                                  "decided_at": _now(), "reason": reason,
                                  "last_refusal": refusal})
            doc["runs"][run_id] = record.to_dict()
            self._write(doc)
        return record, before.decision


# -- enforcement -------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """What the site policy lets a task do.

    Attributes:
        epsilon_cap: the project's epsilon cap (all its runs at this site, composed).
        max_rounds_per_day: the daily round limit, if any.
        site_epsilon_cap: the site-wide cap (every run of every project, composed), if any.
    """

    epsilon_cap: float
    max_rounds_per_day: int | None
    site_epsilon_cap: float | None = None


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
                         site_epsilon_cap=policy.site_epsilon_cap)


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


# -- the runs view -----------------------------------------------------------------------


RunState = Literal["pending", "approved", "denied", "accepted", "refused", "running", "done"]


@dataclass(frozen=True)
class RunStatus:
    """A run seen at this site with its state, for ``fedward-site runs``.

    Attributes:
        record: what the approvals file holds.
        status: ``pending`` (waits for approval), ``approved``, ``denied``, ``accepted``
            (no approval needed, nothing trained yet), ``refused`` (its last task was
            refused by the policy), ``running`` (rounds trained), ``done`` (its last
            planned round trained here).
        rounds_trained: rounds trained to the end (charged in the privacy ledger).
        epsilon_spent: the run's epsilon at this site, every disclosure composed.
    """

    record: RunRecord
    status: RunState
    rounds_trained: int
    epsilon_spent: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {**self.record.to_dict(), "status": self.status,
                "rounds_trained": self.rounds_trained, "epsilon_spent": self.epsilon_spent}


def run_statuses(book: ApprovalBook, ledger: PrivacyLedger) -> list[RunStatus]:
    """Every run seen at the site, oldest first, with its state and epsilon spent."""
    out: list[RunStatus] = []
    runs = ledger.all_runs()
    for rec in book.all():
        entry = runs.get(rec.run)
        rounds = entry.rounds if entry is not None else {}
        trained = sum(1 for r in rounds.values() if r.status == "charged")
        eps = max((e.epsilon_after for e in entry.entries), default=0.0) if entry else 0.0
        status: RunState
        if rec.decision == "denied":
            status = "denied"
        elif any(n >= rec.total_rounds and r.status == "charged" for n, r in rounds.items()):
            status = "done"  # its last planned round trained here
        elif rec.last_refusal is not None and rec.last_refusal.startswith(PENDING_PREFIX):
            status = "pending"
        elif rec.last_refusal is not None:
            status = "refused"
        elif rounds:
            status = "running"
        elif rec.decision == "approved":
            status = "approved"
        else:
            status = "accepted"
        out.append(RunStatus(record=rec, status=status, rounds_trained=trained,
                             epsilon_spent=eps))
    return out
