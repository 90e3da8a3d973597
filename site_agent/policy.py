"""The site policy: the hospital, not the coordinator, decides.

``policy.json`` in the site's data directory is written by hospital IT (``fedward-site init``
or ``fedward-site policy init`` writes a starter) and only ever read by the agent. The
coordinator cannot change it: nothing that arrives over the network is written to it. It is
re-read for every task, so an edit applies at once without a restart; an edit that makes it
invalid makes the site refuse every task with a reason (it never falls back to something
more permissive). Without a policy file the site refuses every run: default-deny. Format,
version 1::

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
* ``local_baselines`` (optional, default ``false``): whether an evaluation on demand may
  ask this site for its local-only DP baseline (:mod:`site_agent.local_baseline`): a model
  trained here on the site's own rows alone, at the run's epsilon, charged to the ledger
  like a run of the project.

The local decisions on runs live in :mod:`site_agent.approvals`; :mod:`site_agent.admission`
applies the policy and those decisions to every task.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from fedward.files import atomic_write
from fedward.plugins import PluginPin
from site_agent.drift_policy import DriftDisclosure, drift_policy_problems
from site_agent.plugin_policy import plugin_policy_problems, plugins_from_raw, plugins_to_raw

__all__ = [
    "POLICY_VERSION",
    "PolicyError",
    "PolicyMissingError",
    "ProjectPolicy",
    "SitePolicy",
]

POLICY_VERSION: Final = 1
_TOP_KEYS: Final = ("version", "projects", "require_approval", "max_rounds_per_day",
                    "site_epsilon_cap", "drift", "plugins", "local_baselines")
_REQUIRED_KEYS: Final = ("version", "projects", "require_approval")
_PROJECT_KEYS: Final = ("epsilon_cap", "tasks", "studies")
_HASH_CHARS: Final = frozenset("0123456789abcdef")


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
        local_baselines: an evaluation on demand may ask for the site's local-only DP
            baseline (charged to the ledger); off by default.
        version: the file format version (1).
    """

    projects: Mapping[str, ProjectPolicy]
    require_approval: bool
    max_rounds_per_day: int | None = None
    site_epsilon_cap: float | None = None
    drift: DriftDisclosure = field(default_factory=DriftDisclosure)
    plugins: tuple[PluginPin, ...] = ()
    local_baselines: bool = False
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
                   plugins=plugins_from_raw(raw.get("plugins")),
                   local_baselines=bool(raw.get("local_baselines", False)))

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
            **({"local_baselines": True} if self.local_baselines else {}),
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
    if "local_baselines" in raw and not isinstance(raw["local_baselines"], bool):
        problems.append(f"local_baselines is {raw['local_baselines']!r}, expected true or "
                        "false")
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
