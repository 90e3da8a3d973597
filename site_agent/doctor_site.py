"""``fedward-site doctor``'s checks of the site itself: configuration, data, policy, node
key, privacy ledger, disk space and installed packages (nothing here talks to the
coordinator)."""

from __future__ import annotations

import importlib.metadata
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization

from site_agent.config import ConfigError, SiteConfig, SitePaths
from site_agent.doctor_check import Check, skip

__all__ = [
    "MIN_FREE_BYTES",
    "PINNED_PACKAGES",
    "check_config",
    "check_data",
    "check_disk",
    "check_ledger",
    "check_node_key",
    "check_packages",
    "check_policy",
]

MIN_FREE_BYTES: Final = 1 << 30
# Exact versions the site agent is built and tested with; None: present, any version.
PINNED_PACKAGES: Final[dict[str, str | None]] = {
    "fedward": None,
    "flwr": "1.42.0",
    "torch": "2.13.0",
    "opacus": None,
    # Every epsilon of the privacy ledger is computed with it: figures must not drift.
    "dp-accounting": "0.6.0",
}


def check_config(root: Path) -> tuple[Check, SiteConfig | None]:
    """site.json loads and validates."""
    try:
        cfg = SiteConfig.load(root)
    except ConfigError as err:
        return Check("site configuration", "fail", str(err)), None
    return Check("site configuration", "ok",
                 f"{SitePaths(root).config} is valid: site {cfg.name}, coordinator "
                 f"{cfg.superlink}"), cfg


def check_data(root: Path, cfg: SiteConfig | None) -> tuple[Check, str | None]:
    """The data matches its schema (or its study mapping); returns the check and the task."""
    from site_agent.data_schema import SchemaError
    from site_agent.site_data import open_configured

    name = "data against schema"
    if cfg is None:
        return skip(name, "site.json is missing or invalid"), None
    if cfg.uses_study:
        name = "data against study mapping"
    try:
        configured = open_configured(cfg, root)
    except SchemaError as err:
        return Check(name, "fail", f"the schema cannot be used: {err}"), None
    except ConfigError as err:
        return Check(name, "fail", f"the data source cannot be used: {err}"), None
    if cfg.data is None:
        data_path = cfg.resolve(root, cfg.data_path)
        if not data_path.exists():
            return Check(name, "fail", f"the data file {data_path} does not exist; fix "
                         "data_path in site.json or restore the file"), configured.task
    where = cfg.data_path or configured.connector.describe()
    report = configured.check()
    what = "study mapping" if cfg.uses_study else "schema"
    if report.ok:
        return Check(name, "ok", f"{report.n_rows} rows match the {what} (task "
                     f"{configured.task})"), configured.task
    kinds = sorted({str(p.kind) for p in report.problems})
    fix = "fedward-site mapping check" if cfg.uses_study else "fedward-site check"
    return Check(name, "fail", f"{len(report.problems)} problem(s) in "
                 f"{cfg.resolve(root, where) if cfg.data is None else where} "
                 f"({', '.join(kinds)}); every run is refused until they are fixed: run "
                 f"`{fix} --dir {root}` to see them"), configured.task


def check_policy(root: Path, task: str | None) -> Check:
    """The site policy exists, is valid, and accepts the site's own task somewhere."""
    from site_agent.policy import PolicyError, PolicyMissingError, SitePolicy

    name = "site policy"
    path = SitePaths(root).policy
    try:
        policy = SitePolicy.load(path)
    except PolicyMissingError:
        return Check(name, "fail", f"there is no {path}: this site refuses every run. Write "
                     f"one: `fedward-site policy init --dir {root} --project NAME` (the "
                     "project name comes from the coordinator team), then edit it")
    except PolicyError as err:
        return Check(name, "fail", f"{err}\nFix the file, then run `fedward-site policy "
                     f"check --dir {root}`")
    accepting = sorted(p for p, spec in policy.projects.items()
                       if task is None or task in spec.tasks)
    if not accepting:
        return Check(name, "warn", f"{path} is valid but accepts no project for this site's "
                     f"task {task}: every run will be refused. Add the task to a project's "
                     "'tasks' if the site should train")
    limit = policy.max_rounds_per_day
    return Check(name, "ok", f"accepts {', '.join(accepting)}; approval "
                 f"{'required' if policy.require_approval else 'not required'}; "
                 + (f"at most {limit} round(s) per 24 h" if limit else "no daily round limit"))


def check_node_key(paths: SitePaths) -> Check:
    """The Flower node key exists, parses, and only its owner can read it."""
    name = "node key"
    key = paths.node_key
    if not key.exists():
        return Check(name, "fail", f"no node key at {key}: create it with `fedward-site "
                     f"keygen --dir {paths.root}` and send keys/node_key.pub to the "
                     "coordinator team")
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        return Check(name, "fail", f"{key} has mode {mode:04o}: other users can read the "
                     f"site's private key. Run `chmod 600 {key}` (and check who could copy "
                     "it; if in doubt, make a new key and re-register it)")
    try:
        serialization.load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        return Check(name, "fail", f"{key} cannot be read as a node key ({err}); re-create "
                     "it with `fedward-site keygen` and re-register the new .pub file")
    if not paths.node_public_key.exists():
        return Check(name, "warn", f"{paths.node_public_key} is missing; the coordinator "
                     "team needs it to register this site: re-run `fedward-site keygen`")
    return Check(name, "ok", f"{key} present, mode 0600")


def check_disk(root: Path, *, min_free: int = MIN_FREE_BYTES) -> Check:
    """Free space where the site keeps its ledger, audit log and replies."""
    name = "disk space"
    try:
        free = shutil.disk_usage(root).free
    except OSError as err:
        return Check(name, "fail", f"cannot read the free space of {root} ({err})")
    gib = free / (1 << 30)
    if free < min_free:
        return Check(name, "warn", f"only {gib:.2f} GiB free in {root}: the privacy ledger "
                     "and the audit log must always be writable (the site refuses tasks "
                     "otherwise); free some space or grow the volume")
    return Check(name, "ok", f"{gib:.1f} GiB free in {root}")


def check_ledger(paths: SitePaths) -> Check:
    """The privacy ledger can be read and every entry accounted (else the site refuses to
    train); a JSON ledger of an earlier version is checked, not migrated, here."""
    from privacy import LedgerCorruptError, PrivacyLedger
    from privacy.ledger_migrate import LegacyFormatError, read_legacy_ledger

    name = "privacy ledger"
    legacy = paths.ledger.with_suffix(".json")
    if not paths.ledger.exists():
        if not legacy.exists():
            return Check(name, "ok", f"no ledger yet at {paths.ledger}: nothing spent")
        try:
            runs = read_legacy_ledger(legacy)
        except (OSError, LegacyFormatError) as err:
            return Check(name, "fail", f"{legacy} cannot be migrated: {err}. The site "
                         "refuses to train until it is restored from the site's backup")
        return Check(name, "ok", f"{legacy} ({len(runs)} run(s)) migrates to "
                     f"{paths.ledger.name} when the site agent next opens it")
    try:
        snap = PrivacyLedger(paths.ledger).snapshot()
        mode = paths.ledger.stat().st_mode & 0o777
    except (LedgerCorruptError, OSError) as err:
        return Check(name, "fail", str(err))
    if mode & 0o077:
        return Check(name, "warn", f"{paths.ledger} has mode {mode:04o}: make it 0600 "
                     f"(`chmod 600 {paths.ledger}`)")
    return Check(name, "ok", f"{len(snap.runs)} run(s), {len(snap.entries)} entr(y/ies) at "
                 f"{paths.ledger}; see `fedward-site ledger show`")


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def check_packages(
    pins: dict[str, str | None] | None = None,
    *,
    version_of: Callable[[str], str] = importlib.metadata.version,
) -> Check:
    """The packages the site agent runs on are installed at the tested versions."""
    name = "package versions"
    wanted = PINNED_PACKAGES if pins is None else pins
    found: list[str] = []
    problems: list[str] = []
    for package, pin in wanted.items():
        try:
            version = version_of(package)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed" + (f" (need {pin})" if pin else ""))
            continue
        found.append(f"{package} {version}")
        if pin is not None and _base_version(version) != pin:
            problems.append(f"{package} is {version}, the site agent needs exactly {pin}")
    if problems:
        return Check(name, "fail", "; ".join(problems) + ". Reinstall the site agent as the "
                     "operator guide says (torch pinned first), into a fresh virtual "
                     "environment")
    return Check(name, "ok", ", ".join(found))
