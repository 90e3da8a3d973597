"""``fedward-site doctor``: check a site and say, in plain words, how to fix what is wrong.

Each check returns a :class:`Check`: a name, a status (``ok``, ``warn``, ``fail``, or
``skip`` when a check cannot run because an earlier one failed) and a message that says
what was found and what to do. Nothing here sends data anywhere: the only network traffic
is a TLS connection and one ``GET /health`` to the coordinator (for reachability and the
clock), verified against the coordinator's CA.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import re
import shutil
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from site_agent.config import ConfigError, SiteConfig, SitePaths

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "MIN_FREE_BYTES",
    "PINNED_PACKAGES",
    "Check",
    "ClockSkewError",
    "check_ca_cert",
    "check_clock_skew",
    "check_config",
    "check_data",
    "check_disk",
    "check_ledger",
    "check_node_key",
    "check_packages",
    "check_policy",
    "check_reachability",
    "check_registration",
    "check_site_cert",
    "measure_clock_skew",
    "run_doctor",
    "summary",
]

Status = Literal["ok", "warn", "fail", "skip"]

MAX_CLOCK_SKEW_S: Final = 60.0
MIN_FREE_BYTES: Final = 1 << 30
CERT_WARN_DAYS: Final = 30
RECENT_LOG_S: Final = 3600.0
# Exact versions the site agent is built and tested with; None: present, any version.
PINNED_PACKAGES: Final[dict[str, str | None]] = {
    "fedward": None,
    "flwr": "1.42.0",
    "torch": "2.13.0",
    "opacus": None,
    # Every epsilon of the privacy ledger is computed with it: figures must not drift.
    "dp-accounting": "0.6.0",
}
_EXIT_RE: Final = re.compile(rb"Exit Code: (\d+)")
_NODE_ID_RE: Final = re.compile(rb"SuperNode ID: (\d+)")
_NTP_HINT: Final = ("enable time synchronisation on the site host (`timedatectl set-ntp true`, "
                    "or chrony), then check that `timedatectl status` says 'System clock "
                    "synchronized: yes'")


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        name: what was checked.
        status: ``ok``, ``warn``, ``fail`` or ``skip``.
        message: what was found and, when it is not ok, what to do.
    """

    name: str
    status: Status
    message: str

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready view."""
        return {"name": self.name, "status": self.status, "message": self.message}


def _skip(name: str, why: str) -> Check:
    return Check(name, "skip", f"not checked: {why}")


# -- local checks ------------------------------------------------------------------------


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
        return _skip(name, "site.json is missing or invalid"), None
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


def _cert_check(name: str, path: Path, now: datetime, *, what: str, fix: str) -> Check:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return Check(name, "fail", f"{what} {path} does not exist; {fix}")
    except (OSError, ValueError) as err:
        return Check(name, "fail", f"{what} {path} cannot be read ({err}); {fix}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return Check(name, "fail", f"{what} is not valid before {start:%Y-%m-%d %H:%M} UTC "
                     f"but this site's clock says {now:%Y-%m-%d %H:%M} UTC: the site clock is "
                     f"probably wrong; {_NTP_HINT}")
    days = (end - now).total_seconds() / 86400
    if days < 0:
        return Check(name, "fail", f"{what} expired on {end:%Y-%m-%d} ({-days:.0f} days "
                     f"ago); {fix}")
    if days < CERT_WARN_DAYS:
        return Check(name, "warn", f"{what} expires on {end:%Y-%m-%d}, in {days:.0f} days; "
                     f"{fix}")
    return Check(name, "ok", f"{what} valid until {end:%Y-%m-%d} ({days:.0f} days left)")


def check_ca_cert(path: Path, *, now: datetime | None = None) -> Check:
    """The coordinator's CA certificate is readable and in its validity period."""
    return _cert_check("coordinator CA certificate", path, now or datetime.now(UTC),
                       what="the coordinator CA certificate",
                       fix="get the current ca.pem from the coordinator team and re-run "
                           "`fedward-site init` (or enroll again)")


def check_site_cert(paths: SitePaths, *, now: datetime | None = None) -> Check:
    """The site's own TLS certificate (from enrollment), if the site is enrolled."""
    name = "site certificate"
    if not paths.site_cert.exists():
        return _skip(name, f"no site certificate at {paths.site_cert} (the site is not "
                     "enrolled with a token; it connects with its node key only)")
    return _cert_check(name, paths.site_cert, now or datetime.now(UTC),
                       what="the site's TLS certificate",
                       fix="renew it before it expires, or enroll again with a new token "
                           "from the coordinator team")


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


def check_registration(paths: SitePaths, *, config_name: str | None = None,
                       now: float | None = None) -> Check:
    """Whether the coordinator accepted this site's node key, from the SuperNode's log."""
    from fedward.flower.exit_codes import SUPERNODE_EXIT_HELP
    from fedward.flower.fleet import still_active_node_id
    from site_agent.keys import public_key_fingerprint

    name = "node registration"
    log_path = paths.logs / "supernode.log"
    try:
        size = log_path.stat().st_size
        mtime = log_path.stat().st_mtime
        with log_path.open("rb") as fh:
            fh.seek(max(0, size - 256 * 1024))
            tail = fh.read()
    except FileNotFoundError:
        return _skip(name, "the site agent has not connected yet (no logs/supernode.log); "
                     "run doctor again after `fedward-site start`")
    except OSError as err:
        return Check(name, "warn", f"cannot read {log_path} ({err})")
    exits = list(_EXIT_RE.finditer(tail))
    joined = list(_NODE_ID_RE.finditer(tail))
    last_exit = exits[-1] if exits else None
    last_join = joined[-1] if joined else None
    if last_join is not None and (last_exit is None or last_join.start() > last_exit.start()):
        return Check(name, "ok", "the coordinator accepted this node (SuperNode ID "
                     f"{last_join.group(1).decode()})")
    if last_exit is None:
        return Check(name, "warn", f"{log_path} shows no connection yet; if this persists, "
                     "check the 'coordinator reachable' result and the agent's own log")
    code = int(last_exit.group(1))
    age_s = (time.time() if now is None else now) - mtime
    when = f"logged {age_s / 60:.0f} min ago"
    # Accepted before, then refused: after a crash the coordinator still counts the old
    # connection (Flower tells the SuperNode only "Failed to activate SuperNode").
    if code == 305 and (last_join is not None or still_active_node_id(tail) is not None):
        return Check(name, "warn", f"the coordinator still counted this site's previous "
                     f"connection as active ({when}): the agent did not stop cleanly (a "
                     "crash, a power cut). Nothing to do: the agent ends that connection "
                     "with the node key and rejoins, or the coordinator forgets it within "
                     "about a minute")
    if code == 305:
        fingerprint = ""
        if paths.node_public_key.exists():
            fingerprint = (" (fingerprint " + public_key_fingerprint(
                paths.node_public_key.read_text().strip()) + ")")
        site = config_name or "SITE-NAME"
        if paths.site_cert.exists():   # enrolled: the key was registered at enrollment
            ask = (f"ask the coordinator team to check `fedward-coordinator sites` for {site} "
                   f"and compare its node key with {paths.node_public_key}{fingerprint} by "
                   "phone; if the site is not registered any more, they send a new token "
                   "and you enroll again (keep keys/node_key)")
        else:
            ask = (f"send {paths.node_public_key}{fingerprint} to the coordinator team and "
                   f"ask them to run `fedward-coordinator add-site {site} --node-key "
                   "node_key.pub`; compare the fingerprint by phone")
        message = (f"the coordinator refused this site's node key (SuperNode exit code 305, "
                   f"{when}): the key is not registered. {ask}. (Right after an agent "
                   "restart this can also mean the coordinator still sees the node as "
                   "active: the agent retries after its back-off.)")
        return Check(name, "fail" if age_s <= RECENT_LOG_S else "warn", message)
    help_text = SUPERNODE_EXIT_HELP.get(code, "see the SuperNode log")
    return Check(name, "warn", f"the SuperNode last exited with code {code} ({when}): "
                 f"{help_text}")


# -- network checks ----------------------------------------------------------------------


class ClockSkewError(Exception):
    """The clock skew could not be measured; the message says why."""

    def __init__(self, message: str, *, clock_suspect: bool = False) -> None:
        self.clock_suspect = clock_suspect
        super().__init__(message)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def measure_clock_skew(
    address: str,
    ca_cert: Path,
    *,
    client_cert: tuple[Path, Path] | None = None,
    timeout: float = 3.0,
    clock: Callable[[], float] = time.time,
) -> float:
    """Seconds this site's clock is ahead of the coordinator's (negative: behind).

    One ``GET https://ADDRESS/health``, verified against the coordinator's CA, and the
    ``Date`` header of the answer (any status: a refusal carries it too). The header has a
    resolution of one second, which is plenty against a limit of a minute.

    Raises:
        ClockSkewError: if the coordinator cannot be asked or sends no usable ``Date``;
            ``clock_suspect`` is True when its certificate looks not-yet-valid or expired
            by this site's clock (a clock far off does that).
    """
    host, port = _split_address(address)
    try:
        ctx = ssl.create_default_context(cafile=str(ca_cert))
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    except (OSError, ssl.SSLError) as err:
        raise ClockSkewError(f"cannot load the TLS files ({err})") from None
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        t0 = clock()
        conn.request("GET", "/health", headers={"User-Agent": "fedward-site-doctor"})
        response = conn.getresponse()
        t1 = clock()
        response.read()
        date = response.getheader("Date")
    except ssl.SSLCertVerificationError as err:
        suspect = err.verify_code in (9, 10)  # not yet valid / expired
        raise ClockSkewError(
            f"the coordinator's certificate did not verify ({err.verify_message})",
            clock_suspect=suspect) from None
    except (OSError, http.client.HTTPException) as err:
        raise ClockSkewError(f"the coordinator at {address} did not answer ({err})") from None
    finally:
        conn.close()
    if not date:
        raise ClockSkewError(f"the coordinator at {address} sent no Date header")
    try:
        server = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        raise ClockSkewError(f"the coordinator sent an unreadable Date header {date!r}") from None
    if server.tzinfo is None:
        server = server.replace(tzinfo=UTC)
    # The header is truncated to the second: its true time lies within the next second.
    return (t0 + t1) / 2 - (server.timestamp() + 0.5)


def check_clock_skew(
    address: str,
    ca_cert: Path,
    *,
    client_cert: tuple[Path, Path] | None = None,
    timeout: float = 3.0,
    clock: Callable[[], float] = time.time,
    max_skew_s: float = MAX_CLOCK_SKEW_S,
) -> Check:
    """The site's clock agrees with the coordinator's within ``max_skew_s``."""
    name = "clock skew"
    try:
        skew = measure_clock_skew(address, ca_cert, client_cert=client_cert, timeout=timeout,
                                  clock=clock)
    except ClockSkewError as err:
        if err.clock_suspect:
            now = datetime.fromtimestamp(clock(), UTC)
            return Check(name, "fail", f"{err} and this site's clock says "
                         f"{now:%Y-%m-%d %H:%M} UTC: the site clock is probably wrong; "
                         f"{_NTP_HINT}")
        return _skip(name, f"{err} (see 'coordinator reachable')")
    direction = "ahead of" if skew > 0 else "behind"
    if abs(skew) > max_skew_s:
        return Check(name, "fail", f"this site's clock is {abs(skew):.0f} s {direction} the "
                     f"coordinator's (the limit is {max_skew_s:.0f} s): certificates, tokens "
                     f"and round deadlines go wrong with a wrong clock; {_NTP_HINT}")
    return Check(name, "ok", f"within {max(abs(skew), 1.0):.0f} s of the coordinator's clock")


def check_reachability(address: str, ca_cert: Path, *, timeout: float = 3.0) -> Check:
    """A TLS connection to the coordinator verifies against the CA."""
    from site_agent.agent import probe_coordinator

    problem = probe_coordinator(address, ca_cert, timeout=timeout)
    if problem is None:
        return Check("coordinator reachable", "ok",
                     f"TLS to {address} verified against the coordinator CA")
    return Check("coordinator reachable", "fail",
                 f"{problem}. Check that the firewall allows outbound TCP to {address}, that "
                 "the name resolves from this host, and that the coordinator is up (ask its "
                 "team)")


def check_gateway_identity(address: str, ca_cert: Path, client_cert: tuple[Path, Path], *,
                           timeout: float = 3.0) -> Check:
    """The gateway accepts this site's certificate: one ``GET /health`` presenting it.

    The gateway answers 403 with its reason for a revoked certificate, a site it does not
    know as registered, or no certificate; that reason is what the check reports.
    """
    name = "gateway accepts this site"
    host, port = _split_address(address)
    try:
        ctx = ssl.create_default_context(cafile=str(ca_cert))
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    except (OSError, ssl.SSLError) as err:
        return Check(name, "fail", f"cannot load the site's TLS files ({err}): restore keys/ "
                     "from backup, or enroll again with a new token")
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", "/health", headers={"User-Agent": "fedward-site-doctor"})
        response = conn.getresponse()
        body = response.read(64 * 1024)
        status = response.status
    except (OSError, http.client.HTTPException) as err:
        return _skip(name, f"no answer from {address} ({type(err).__name__}; see "
                     "'coordinator reachable')")
    finally:
        conn.close()
    if status == 200:
        return Check(name, "ok", "the gateway accepts this site's certificate")
    try:
        detail = str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        detail = ""
    detail = detail or f"HTTP {status}"
    if "revoked" in detail:
        fix = ("the coordinator team revoked this site; it can come back only under a new "
               "name: ask them for a token, move keys/ aside and enroll again")
    elif "not registered" in detail:
        fix = ("ask the coordinator team to check `fedward-coordinator sites`; if the site is "
               "not listed as registered, they send a new token and you enroll again")
    else:
        fix = "if the coordinator rotated its CA, enroll again with a new token"
    return Check(name, "fail", f"the gateway refuses this site: {detail}. {fix}")


# -- all together ------------------------------------------------------------------------


def run_doctor(root: Path, *, timeout: float = 3.0) -> list[Check]:
    """Run every check for the site at ``root``, in an order that reads top to bottom."""
    paths = SitePaths(root)
    checks: list[Check] = []
    config_check, cfg = check_config(root)
    checks.append(config_check)
    data_check, task = check_data(root, cfg)
    checks.append(data_check)
    checks.append(check_policy(root, task))
    checks.append(check_node_key(paths))
    if cfg is None:
        for name in ("coordinator CA certificate", "clock skew", "coordinator reachable"):
            checks.append(_skip(name, "site.json is missing or invalid"))
    else:
        ca = cfg.resolve(root, cfg.ca_cert)
        ca_check = check_ca_cert(ca)
        checks.append(ca_check)
        checks.append(check_site_cert(paths))
        client = ((paths.site_cert, paths.site_key)
                  if paths.site_cert.exists() and paths.site_key.exists() else None)
        if ca_check.status == "fail" and not ca.exists():
            checks.append(_skip("clock skew", "no coordinator CA certificate"))
            checks.append(_skip("coordinator reachable", "no coordinator CA certificate"))
        else:
            checks.append(_skip("clock skew", "the coordinator runs on this host")
                          if cfg.superlink.startswith("unix:") else
                          check_clock_skew(cfg.superlink, ca, client_cert=client,
                                           timeout=timeout))
            checks.append(check_reachability(cfg.superlink, ca, timeout=timeout))
            if client is not None:
                checks.append(check_gateway_identity(cfg.superlink, ca, client,
                                                     timeout=timeout))
    checks.append(check_registration(paths, config_name=cfg.name if cfg else None))
    checks.append(check_ledger(paths))
    checks.append(check_disk(root))
    checks.append(check_packages())
    return checks


def summary(checks: list[Check]) -> dict[str, Any]:
    """``{"ok": no check failed, "checks": [...]}`` for ``--json``."""
    return {"ok": all(c.status != "fail" for c in checks),
            "checks": [c.to_dict() for c in checks]}
