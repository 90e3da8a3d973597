"""``fedward-site doctor``'s checks of the link to the coordinator: the certificates, the
node's registration (from the SuperNode's log), the clock skew, reachability and whether the
gateway accepts the site's certificate.

The only network traffic is a TLS connection and one ``GET /health`` to the coordinator,
verified against the coordinator's CA.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Final

from cryptography import x509

from site_agent.config import SitePaths
from site_agent.doctor_check import Check, skip

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "ClockSkewError",
    "check_ca_cert",
    "check_clock_skew",
    "check_gateway_identity",
    "check_reachability",
    "check_registration",
    "check_site_cert",
    "measure_clock_skew",
]

MAX_CLOCK_SKEW_S: Final = 60.0
CERT_WARN_DAYS: Final = 30
RECENT_LOG_S: Final = 3600.0
_EXIT_RE: Final = re.compile(rb"Exit Code: (\d+)")
_NODE_ID_RE: Final = re.compile(rb"SuperNode ID: (\d+)")
_NTP_HINT: Final = ("enable time synchronisation on the site host (`timedatectl set-ntp true`, "
                    "or chrony), then check that `timedatectl status` says 'System clock "
                    "synchronized: yes'")


# -- certificates ------------------------------------------------------------------------


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
        return skip(name, f"no site certificate at {paths.site_cert} (the site is not "
                     "enrolled with a token; it connects with its node key only)")
    return _cert_check(name, paths.site_cert, now or datetime.now(UTC),
                       what="the site's TLS certificate",
                       fix="renew it before it expires, or enroll again with a new token "
                           "from the coordinator team")

# -- registration ------------------------------------------------------------------------


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
        return skip(name, "the site agent has not connected yet (no logs/supernode.log); "
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
        return skip(name, f"{err} (see 'coordinator reachable')")
    direction = "ahead of" if skew > 0 else "behind"
    if abs(skew) > max_skew_s:
        return Check(name, "fail", f"this site's clock is {abs(skew):.0f} s {direction} the "
                     f"coordinator's (the limit is {max_skew_s:.0f} s): certificates, tokens "
                     f"and round deadlines go wrong with a wrong clock; {_NTP_HINT}")
    return Check(name, "ok", f"within {max(abs(skew), 1.0):.0f} s of the coordinator's clock")


def check_reachability(address: str, ca_cert: Path, *, timeout: float = 3.0) -> Check:
    """A TLS connection to the coordinator verifies against the CA."""
    from site_agent.connect import probe_coordinator

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
        return skip(name, f"no answer from {address} ({type(err).__name__}; see "
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
