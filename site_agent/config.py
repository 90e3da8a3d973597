"""The site agent's configuration: one JSON file in the site's data directory.

Hospital IT owns this file. Relative paths in it are relative to the data directory, so a
site folder can be moved or restored from backup as a whole.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedward.files import atomic_write
from site_agent.drift_policy import drift_schedule_problems

if TYPE_CHECKING:
    from site_agent.connectors import Connector

__all__ = ["CONFIG_FILE", "ConfigError", "SiteConfig", "SitePaths"]

CONFIG_FILE = "site.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$")
_KEYS = {"version", "name", "superlink", "ca_cert", "data_path", "schema_path",
         "torch_threads", "reconnect_backoff_s", "executor", "data", "study", "mapping",
         "drift", "task_content_wait_s"}
EXECUTORS = ("warm", "subprocess")


class ConfigError(ValueError):
    """The site configuration is missing or invalid; the message says how to fix it."""


@dataclass(frozen=True)
class SitePaths:
    """Where a site keeps its own state inside its data directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def node_key(self) -> Path:
        return self.keys / "node_key"

    @property
    def node_public_key(self) -> Path:
        return self.keys / "node_key.pub"

    @property
    def ledger(self) -> Path:
        """The privacy ledger (SQLite). Earlier versions kept ``privacy-ledger.json``: it
        migrates on the ledger's first open and stays beside it as
        ``privacy-ledger.json.migrated``."""
        return self.root / "privacy-ledger.sqlite"

    @property
    def noise_cache(self) -> Path:
        """Noise multipliers already searched for (a hint the ledger's accountant confirms
        before use; see :mod:`privacy.noise_cache`). ``FEDWARD_CACHE_DIR`` moves it, e.g.
        to share one cache between the sites of a lab host."""
        shared = os.environ.get("FEDWARD_CACHE_DIR")
        return (Path(shared) if shared else self.root / "cache") / "noise-multipliers.json"

    @property
    def site_cert(self) -> Path:
        """The site's TLS client certificate, issued at enrollment."""
        return self.keys / "site-tls.pem"

    @property
    def site_key(self) -> Path:
        """The private key of the site's TLS client certificate (never leaves the site)."""
        return self.keys / "site-tls.key"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    @property
    def policy(self) -> Path:
        """The site policy, owned by hospital IT (see :mod:`site_agent.policy`)."""
        return self.root / "policy.json"

    @property
    def approvals(self) -> Path:
        """Runs seen at this site and the local approve/deny decisions."""
        return self.root / "approvals.json"

    @property
    def run(self) -> Path:
        """The agent's sockets (mode 0700): only the agent's user may connect to them."""
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run / "trainer.sock"

    @property
    def tunnel_socket(self) -> Path:
        """The tunnel's entrance (an enrolled site's SuperNode reaches the gateway here)."""
        return self.run / "tunnel.sock"

    @property
    def supernode_socket(self) -> Path:
        """The SuperNode's runtime API, relayed out of its private network namespace."""
        return self.run / "supernode.sock"

    @property
    def wake_socket(self) -> Path:
        """Where the SuperNode wakes the agent's task executor (:mod:`fedward.flower.wake`)."""
        return self.run / "wake.sock"

    @property
    def upstream_socket(self) -> Path:
        """A site that is not enrolled: the agent relays this socket to the SuperLink."""
        return self.run / "upstream.sock"

    @property
    def lock(self) -> Path:
        """Held by the running agent: one agent per site directory."""
        return self.root / "agent.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def replies(self) -> Path:
        return self.root / "replies"


@dataclass(frozen=True)
class SiteConfig:
    """A site's settings.

    Attributes:
        name: the site's name as the coordinator knows it (lowercase, digits, dashes).
        superlink: host:port of the coordinator's fleet endpoint (a lab site on the
            coordinator's own host that is not enrolled: ``unix:`` and the path of the
            coordinator's SuperLink socket, as in its ``superlink.address`` file).
        ca_cert: the coordinator's CA certificate (PEM) that the site trusts.
        data_path: the CSV file with the site's training data ("" when ``data`` names a
            connector instead).
        schema_path: the JSON schema the data must match ("" when the site trains a study
            through its ``mapping`` instead).
        torch_threads: CPU threads the trainer may use.
        reconnect_backoff_s: wait before restarting a SuperNode that exited; Flower keeps
            an authenticated node "active" for about 60 s after it drops.
        task_content_wait_s: how long a task waits for its message (the model) to reach
            the site before the agent gives it up and takes the next one (Flower alone
            waits two hours, and the site is stuck meanwhile). Raise it for a large model
            on a slow line.
        executor: ``warm`` runs ClientApp tasks inside the agent (no process per message);
            ``subprocess`` starts one process per message, as stock Flower does (slower;
            for sites that want each task isolated). Both check the app bundle first.
        data: the data connector and its options (:mod:`site_agent.connectors`), e.g.
            ``{"connector": "parquet", "path": "extract.parquet"}``; None reads
            ``data_path`` as CSV.
        study: the study spec the site's data is mapped to (a file, or the name of an
            example study shipped with fedward); with ``mapping``.
        mapping: the hospital's mapping of its columns to the study
            (:mod:`site_agent.mapping`); with ``study``, it replaces ``schema_path``.
        drift: the drift check's settings (:class:`site_agent.drift_policy.DriftSchedule`
            reads them); None: no scheduled drift check.
    """

    name: str
    superlink: str
    ca_cert: str
    data_path: str
    schema_path: str
    torch_threads: int = 1
    reconnect_backoff_s: float = 65.0
    executor: str = "warm"
    task_content_wait_s: float = 30.0
    drift: dict[str, Any] | None = None
    version: int = 1
    data: dict[str, Any] | None = None
    study: str | None = None
    mapping: str | None = None

    def connector(self, root: Path) -> Connector:
        """The site's data connector (``data``, else ``data_path`` read as CSV).

        Raises:
            site_agent.connectors.ConnectorError: Every problem of the ``data`` block.
        """
        from site_agent.connectors import open_connector

        block = self.data if self.data is not None else {"connector": "csv",
                                                         "path": self.data_path}
        return open_connector(block, root=root, source=f"{CONFIG_FILE} 'data'")

    @property
    def uses_study(self) -> bool:
        """Whether the site's data is read through a study mapping (not a schema)."""
        return self.study is not None and self.mapping is not None

    def resolve(self, root: Path, value: str) -> Path:
        """A path from the config, made absolute against the site's data directory."""
        p = Path(value)
        return p if p.is_absolute() else (root / p)

    @classmethod
    def load(cls, root: Path) -> SiteConfig:
        """Load and validate ``root/site.json``; every problem is reported at once."""
        path = SitePaths(root).config
        if not path.exists():
            raise ConfigError(
                f"no site configuration at {path}; run `fedward-site init --dir {root} ...` first"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); fix or re-run init") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "site config") -> SiteConfig:
        """Validate a mapping; raise :class:`ConfigError` listing every problem."""
        problems: list[str] = []
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            problems.append(f"unknown keys {unknown} (known: {sorted(_KEYS)})")
        for key in ("name", "superlink", "ca_cert"):
            if not isinstance(raw.get(key), str) or not raw.get(key):
                problems.append(f"{key!r} is required and must be a non-empty string")
        problems.extend(_data_problems(raw))
        name = raw.get("name")
        if isinstance(name, str) and name and not _NAME_RE.match(name):
            problems.append(
                f"name {name!r} must be 3-40 characters of lowercase letters, digits and dashes"
            )
        superlink = raw.get("superlink")
        if isinstance(superlink, str) and superlink and not re.match(
                r"^(?:[^:\s]+:\d{1,5}|unix:/\S+)$", superlink):
            problems.append(f"superlink {superlink!r} must be host:port")
        threads = raw.get("torch_threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            problems.append("torch_threads must be an integer from 1 to 64")
        backoff = raw.get("reconnect_backoff_s", 65.0)
        if not isinstance(backoff, int | float) or isinstance(backoff, bool) or backoff < 0:
            problems.append("reconnect_backoff_s must be a number >= 0")
        content_wait = raw.get("task_content_wait_s", 30.0)
        if (not isinstance(content_wait, int | float) or isinstance(content_wait, bool)
                or not 1 <= content_wait <= 7200):
            problems.append("task_content_wait_s must be a number of seconds from 1 to 7200")
        executor = raw.get("executor", "warm")
        if executor not in EXECUTORS:
            problems.append(f"executor must be one of {list(EXECUTORS)}")
        problems += drift_schedule_problems(raw.get("drift"))
        if problems:
            raise ConfigError(f"{source} is invalid:\n  - " + "\n  - ".join(problems))
        return cls(
            name=str(raw["name"]),
            superlink=str(raw["superlink"]),
            ca_cert=str(raw["ca_cert"]),
            data_path=str(raw.get("data_path") or ""),
            schema_path=str(raw.get("schema_path") or ""),
            torch_threads=int(threads),
            reconnect_backoff_s=float(backoff),
            executor=str(executor),
            task_content_wait_s=float(content_wait),
            data=dict(raw["data"]) if isinstance(raw.get("data"), dict) else None,
            study=raw.get("study") or None,
            mapping=raw.get("mapping") or None,
            drift=raw.get("drift"),
        )

    def save(self, root: Path) -> Path:
        """Write ``root/site.json`` atomically."""
        root.mkdir(parents=True, exist_ok=True)
        path = SitePaths(root).config
        # The optional data/study/mapping/drift keys only when set: a site.json without them
        # reads the same in earlier versions.
        doc = {k: v for k, v in asdict(self).items()
               if not (k in ("data", "study", "mapping", "drift") and v is None)
               and not (k == "task_content_wait_s" and v == 30.0)}
        atomic_write(path, json.dumps(doc, indent=2) + "\n", mode=0o600)
        return path


def _data_problems(raw: dict[str, Any]) -> list[str]:
    """Where the data comes from and what it is checked against: ``data_path`` (CSV) or a
    ``data`` connector block, and ``schema_path`` or ``study`` with ``mapping``."""
    out: list[str] = []
    data, data_path = raw.get("data"), raw.get("data_path")
    if data is not None:
        if not isinstance(data, dict) or not isinstance(data.get("connector"), str):
            out.append("'data' must be an object naming its 'connector' (csv, parquet, sql "
                       "or an installed plugin) with the connector's options")
        if data_path:
            out.append("give 'data_path' or 'data', not both")
    elif not isinstance(data_path, str) or not data_path:
        out.append("'data_path' (a CSV file) or 'data' (a connector) is required")
    for key in ("study", "mapping", "schema_path"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            out.append(f"{key!r} must be a string")
    study, mapping, schema = raw.get("study"), raw.get("mapping"), raw.get("schema_path")
    if bool(study) != bool(mapping):
        out.append("'study' and 'mapping' go together: name both, or neither")
    elif not study and not schema:
        out.append("'schema_path' is required (or 'study' with 'mapping')")
    return out
