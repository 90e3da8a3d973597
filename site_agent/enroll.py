"""Enrolling a site with a one-time token: keys made here, a certificate back.

1. Fetch the coordinator's CA from the gateway and check it against the pin in the token
   (first contact is unauthenticated; the pin is what makes it safe).
2. Make the site's TLS key and Flower node key here; only public halves leave.
3. Send the token, a CSR, the node public key and the agent's Fedward and Flower versions
   (a renewal sends the versions too: the coordinator shows what each site runs); receive
   the site certificate.
4. Make a site-local CA and a 127.0.0.1 certificate for the tunnel the SuperNode dials.

Every file is written atomically and the certificate last; an enrollment that fails at
any step removes what it made (keys included: a key pair the coordinator never accepted is
of no use), so the site is exactly as before, "not enrolled yet", and a retry starts clean.
Keys that were there before (a site enrolling again keeps its node key) are never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedward.agent_versions import local_versions
from fedward.certs import ensure_ca, issue_server_cert, make_csr, write_private_key
from fedward.files import atomic_write, fsync_dir
from fedward.tokens import TokenFormatError, parse_enrollment_token
from site_agent.config import SitePaths
from site_agent.keys import ensure_node_key

__all__ = ["DEFAULT_GATEWAY_PORT", "CoordinatorUnreachable", "EnrollError", "EnrollmentFiles",
           "enroll", "finish_interrupted_renewal", "gateway_address", "renew",
           "report_versions", "report_versions_at_start"]

log = logging.getLogger("fedward.site.enroll")

# The coordinator's site gateway port unless its team chose another (``fleet_port`` in the
# coordinator's settings; a test keeps the two equal).
DEFAULT_GATEWAY_PORT: Final = 9092


class EnrollError(RuntimeError):
    """Enrollment failed; the message says what happened and what to do."""


@dataclass(frozen=True)
class EnrollmentFiles(SitePaths):
    """Where enrollment leaves the site's TLS material: the site's own paths (``keys``,
    ``site_key``, ``site_cert``) plus what only enrollment uses."""

    @property
    def coordinator_ca(self) -> Path:
        return self.root / "coordinator-ca.pem"

    @property
    def local_pki(self) -> Path:
        return self.keys / "local"

    @property
    def enrolled(self) -> bool:
        return self.site_cert.exists() and self.site_key.exists()


def _clock_hint(err: Exception) -> str:
    """What to do when TLS failed on certificate dates: usually this machine's clock."""
    text = str(err).lower()
    if "not yet valid" in text or "expired" in text:
        return ("; a certificate looked not yet valid or expired, which usually means this "
                "machine's clock is wrong: set it right (NTP) and retry; `fedward-site "
                "doctor` measures the skew against the coordinator")
    return ""


def gateway_address(text: str) -> str:
    """``host:port`` of the gateway from what the operator typed: ``host`` alone means the
    default gateway port.

    Raises:
        EnrollError: the port is not a number from 1 to 65535.
    """
    text = text.strip()
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, str(DEFAULT_GATEWAY_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnrollError(f"--gateway {text!r} is not an address: give the coordinator's "
                          f"site gateway as HOST:PORT, e.g. coordinator.example.org:"
                          f"{DEFAULT_GATEWAY_PORT} (the coordinator team has it)")
    return f"{host}:{port}"


def _plain_http_server(host: str, port: int, *, timeout: float) -> str | None:
    """What a server that failed the TLS handshake is, if it speaks plain HTTP: the
    coordinator's API (its health route answers), some other web server, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.sendall(f"GET /api/v1/health HTTP/1.1\r\nHost: {host}\r\n"
                        "Connection: close\r\n\r\n".encode())
            answer = raw.recv(4096)
    except OSError:
        return None
    if not answer.startswith(b"HTTP/1."):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    if b'"database"' in body or b"uvicorn" in head.lower():
        return "the coordinator's web API"
    return "a plain-HTTP web server"


def _fetch_ca(gateway: str, pin: str, *, timeout: float) -> bytes:
    """The gateway's CA, accepted only if its SHA-256 starts with the token's pin."""
    host, _, port = gateway.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # first contact: the pin below is the check
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET /fedward/ca HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                        .encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    except ssl.SSLError as err:
        what = _plain_http_server(host, int(port), timeout=timeout)
        if what is not None:
            raise EnrollError(
                f"{gateway} is {what}, not the site gateway: it answers plain HTTP, while "
                "sites enroll and connect over TLS on the gateway's own port. That port is "
                "the one `fedward-coordinator serve` names in 'site gateway on HOST:PORT' "
                f"({DEFAULT_GATEWAY_PORT} unless the coordinator team chose another); ask "
                "them for it and retry with --gateway HOST:PORT") from None
        raise EnrollError(f"{gateway} did not complete a TLS handshake ({err}); is it the "
                          "coordinator's site gateway? Check the address with the "
                          "coordinator team") from None
    except OSError as err:
        raise EnrollError(f"the coordinator gateway at {gateway} is not reachable ({err}); "
                          "check the address and that outbound TCP to it is allowed") from None
    raw_resp = b"".join(chunks)
    head, _, body = raw_resp.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise EnrollError(f"{gateway} did not answer like a Fedward gateway")
    try:
        cert = x509.load_pem_x509_certificate(body)
    except ValueError:
        raise EnrollError(f"{gateway} did not send a CA certificate") from None
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    if not fingerprint.startswith(pin):
        raise EnrollError(
            f"the coordinator at {gateway} presented a CA ({fingerprint[:32]}) that does not "
            f"match your token ({pin}); do not proceed: check the address, or ask the "
            "coordinator team whether they rotated their CA and need to send a new token")
    return body


@contextmanager
def _undone_on_failure(files: EnrollmentFiles) -> Iterator[None]:
    """Remove what the block made if it fails; files that were there stay as they were."""
    made = [files.root, files.keys, files.site_key, files.node_key, files.node_public_key,
            files.local_pki, files.root / "enrollment.json", files.site_cert]
    existed = {path for path in made if path.exists()}
    ca_before = files.coordinator_ca.read_bytes() if files.coordinator_ca.exists() else None
    try:
        yield
    except BaseException:
        for path in reversed(made):
            if path in existed or not path.exists():
                continue
            if path.is_dir():
                if path == files.local_pki:
                    shutil.rmtree(path, ignore_errors=True)
                elif not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        if ca_before is not None:
            atomic_write(files.coordinator_ca, ca_before)
        else:
            files.coordinator_ca.unlink(missing_ok=True)
            if files.root not in existed and files.root.exists() \
                    and not any(files.root.iterdir()):
                files.root.rmdir()
        raise


def enroll(*, root: Path, gateway: str, token: str, timeout: float = 30.0) -> str:
    """Enroll the site in ``root`` with the gateway; returns the site name.

    Args:
        root: the site directory.
        gateway: the coordinator's site gateway, ``host:port`` (``host`` alone: the
            default gateway port).
        token: the one-time enrollment token from the coordinator team.
        timeout: seconds for each network step.

    Raises:
        EnrollError: enrollment failed (the message says why and what to do); nothing
            that this attempt made is left behind.
    """
    try:
        parts = parse_enrollment_token(token)
    except TokenFormatError as err:
        raise EnrollError(str(err)) from None
    gateway = gateway_address(gateway)
    files = EnrollmentFiles(root)
    ca_pem = _fetch_ca(gateway, parts.ca_pin, timeout=timeout)
    with _undone_on_failure(files):
        return _enroll_with(files, gateway=gateway, token=token, site=parts.site,
                            ca_pem=ca_pem, timeout=timeout)


def _enroll_with(files: EnrollmentFiles, *, gateway: str, token: str, site: str,
                 ca_pem: bytes, timeout: float) -> str:
    """The steps of :func:`enroll` that write files (undone by the caller on failure)."""
    root = files.root
    if files.site_key.exists():
        key = serialization.load_pem_private_key(files.site_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EnrollError(f"{files.site_key} is not an EC key; delete it and retry")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        write_private_key(files.site_key, key)
    node_public = ensure_node_key(files.keys / "node_key", files.keys / "node_key.pub")
    atomic_write(files.coordinator_ca, ca_pem)
    verify = ssl.create_default_context(cafile=str(files.coordinator_ca))
    try:
        resp = httpx.post(f"https://{gateway}/fedward/enroll", verify=verify, timeout=timeout,
                          json={"token": token.strip(),
                                "csr_pem": make_csr(key, site).decode(),
                                "node_public_key": node_public,
                                "versions": local_versions()})
    except httpx.HTTPError as err:
        raise EnrollError(f"enrollment request to {gateway} failed ({err}){_clock_hint(err)}"
                          ) from None
    if resp.status_code != 200:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise EnrollError(f"the coordinator refused the enrollment: {detail}")
    body = resp.json()
    # The site's own local CA and the tunnel's 127.0.0.1 certificate.
    local = ensure_ca(files.local_pki, common_name=f"Fedward site-local CA ({site})")
    if not local.server_cert.exists():
        issue_server_cert(local, hosts=("127.0.0.1",))
    atomic_write(root / "enrollment.json", (json.dumps(
        {"site": body["site"], "gateway": gateway, "not_after": body["not_after"],
         "ca_sha256": hashlib.sha256(x509.load_pem_x509_certificate(ca_pem).public_bytes(
             serialization.Encoding.DER)).hexdigest()}, indent=2) + "\n").encode())
    atomic_write(files.site_cert, body["certificate_pem"].encode())  # last: now enrolled
    return str(body["site"])


def renew(*, root: Path, gateway: str, timeout: float = 30.0) -> str:
    """Renew the site certificate before it expires, with the current one; returns expiry."""
    files = EnrollmentFiles(root)
    finish_interrupted_renewal(files)
    if not files.enrolled:
        raise EnrollError("this site is not enrolled; run `fedward-site enroll` first")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = x509.load_pem_x509_certificate(files.site_cert.read_bytes())
    name = str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)
    ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
    ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    try:
        resp = httpx.post(f"https://{gateway}/fedward/renew", verify=ctx, timeout=timeout,
                          json={"csr_pem": make_csr(key, name).decode(),
                                "versions": local_versions()})
    except httpx.HTTPError as err:
        raise EnrollError(f"renewal request to {gateway} failed ({err}){_clock_hint(err)}"
                          ) from None
    if resp.status_code != 200:
        raise EnrollError(f"the coordinator refused the renewal: {resp.text}")
    body = resp.json()
    new_key, new_cert = _pending(files)
    write_private_key(new_key, key)
    atomic_write(new_cert, body["certificate_pem"].encode())
    # Both new files are on disk: from here a crash is completed by the next start.
    finish_interrupted_renewal(files)
    return str(body["not_after"])


class CoordinatorUnreachable(EnrollError):
    """The gateway could not be reached or answered 5xx: worth trying again later."""


def report_versions(*, root: Path, gateway: str, timeout: float = 10.0) -> bool:
    """Tell the coordinator which Fedward and Flower versions this agent runs (an enrolled
    site, with its certificate); returns whether the coordinator stored them.

    Raises:
        CoordinatorUnreachable: no answer, or a 5xx one (try again later).
        EnrollError: the coordinator refused the report (not enrolled, revoked, ...).
    """
    files = EnrollmentFiles(root)
    if not files.enrolled:
        raise EnrollError("this site is not enrolled; run `fedward-site enroll` first")
    ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
    ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    try:
        resp = httpx.post(f"https://{gateway}/fedward/versions", verify=ctx, timeout=timeout,
                          json={"versions": local_versions()})
    except httpx.HTTPError as err:
        raise CoordinatorUnreachable(f"the gateway {gateway} is not reachable ({err})"
                                     ) from None
    if resp.status_code >= 500:
        raise CoordinatorUnreachable(f"the coordinator answered {resp.status_code}")
    if resp.status_code != 200:
        raise EnrollError(f"the coordinator refused the version report: {resp.text[:300]}")
    return bool(resp.json().get("stored"))


# Waits between tries of the version report at start: about 3 minutes in all, then the
# next admission answer carries the versions anyway.
_VERSION_REPORT_WAITS_S: Final = (2.0, 5.0, 15.0, 30.0, 60.0, 60.0)


def report_versions_at_start(root: Path, gateway: str, stop: threading.Event) -> None:
    """:func:`report_versions` once the gateway is reachable (the agent runs this in a
    thread when it starts), so that the sites page shows an upgrade as soon as the agent
    restarts, not at the next run. Gives up, with one log line, when refused, when
    ``stop`` is set, or after about 3 minutes."""
    for wait in (*_VERSION_REPORT_WAITS_S, None):
        try:
            report_versions(root=root, gateway=gateway)
            log.info("the coordinator has this agent's versions")
            return
        except CoordinatorUnreachable as err:
            if wait is None or stop.wait(wait):
                log.info("versions not reported (%s); the next admission answer carries "
                         "them", err)
                return
        except EnrollError as err:
            log.warning("versions not reported: %s", err)
            return


def _pending(files: EnrollmentFiles) -> tuple[Path, Path]:
    return (files.site_key.with_name(files.site_key.name + ".new"),
            files.site_cert.with_name(files.site_cert.name + ".new"))


def finish_interrupted_renewal(files: EnrollmentFiles) -> str | None:
    """Make the site's key and certificate a matching pair again after a renewal crash.

    A renewal writes ``site-tls.key.new`` and ``site-tls.pem.new``, then moves the key and
    then the certificate into place. A crash between those two moves would leave a new key
    with the old certificate. This rolls forward when the new certificate is on disk and
    matches a key (moved or not), and rolls back (drops the leftovers) otherwise. Returns
    what it did, or None when there was nothing to do.
    """
    new_key, new_cert = _pending(files)
    if not new_key.exists() and not new_cert.exists():
        return None
    key_path = new_key if new_key.exists() else files.site_key
    try:
        cert = x509.load_pem_x509_certificate(new_cert.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        matches = cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    except (OSError, ValueError):
        matches = False
    if matches:
        if new_key.exists():
            os.replace(new_key, files.site_key)
        os.replace(new_cert, files.site_cert)
        fsync_dir(files.site_cert.parent)
        return "completed an interrupted certificate renewal"
    for leftover in (new_key, new_cert):
        leftover.unlink(missing_ok=True)
    return "discarded an unfinished certificate renewal (the current certificate stays)"
