"""The signed revocation list: which releases must no longer be used, as of when.

The coordinator publishes it at ``GET /api/v1/revocations``, signed with the release key
(the key that signs the bundles, so a clinician who trusts one trusts the other), in the
same DSSE envelope format as a bundle's ``model.sig`` but with its own payload type, so a
signature over one can never pass for the other::

    {"mediaType": "application/vnd.fedward.revocations.v1+json",
     "dsseEnvelope": {"payloadType": "application/vnd.fedward.revocation-list+json",
                      "payload": "<base64 JSON>", "signatures": [{"keyid": ..., "sig": ...}]}}

The payload names every revoked release with its reason and says when the list was issued.
``fedward-verify`` and ``fedward-serve`` check revocation by default (:class:`RevocationSource`):
from the coordinator (``--coordinator URL``), or from a list saved from it
(``--revocations FILE``); a list that is unsigned, signed by another key, altered, older
than its maximum age (7 days by default) or dated in the future is refused. Skipping the
check needs ``--unsafe-skip-revocation-check``, which warns every time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from export.bundle_format import BundleVerificationError
from export.bundle_keys import load_private_key, load_public_key

__all__ = [
    "API_PATH",
    "DEFAULT_MAX_AGE",
    "MEDIA_TYPE",
    "UNSAFE_SKIP_FLAG",
    "RevocationList",
    "RevocationSource",
    "load_revocations",
    "parse_revocations",
    "sign_revocations",
]

MEDIA_TYPE: Final = "application/vnd.fedward.revocations.v1+json"
_PAYLOAD_TYPE: Final = "application/vnd.fedward.revocation-list+json"
_LIST_TYPE: Final = "fedward.revocation-list.v1"
API_PATH: Final = "/api/v1/revocations"
DEFAULT_MAX_AGE: Final = timedelta(days=7)
UNSAFE_SKIP_FLAG: Final = "--unsafe-skip-revocation-check"
# A list dated this far ahead of the local clock is refused (clocks disagree a little).
_CLOCK_SKEW: Final = timedelta(minutes=5)
_MAX_BYTES: Final = 8 * 1024 * 1024


@dataclass(frozen=True)
class RevocationList:
    """A verified revocation list.

    Attributes:
        revoked: Revoked release ids.
        reasons: Release id -> why it was revoked.
        issued_at: When the coordinator signed the list (UTC).
        key_fingerprint: Fingerprint of the release key that signed it.
    """

    revoked: frozenset[str]
    reasons: Mapping[str, str]
    issued_at: datetime
    key_fingerprint: str


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of a revocation list payload."""
    return b"DSSEv1 %d %s %d %s" % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(),
                                    len(payload), payload)


def _fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def sign_revocations(*, revoked: Sequence[Mapping[str, Any]], private_key: Path,
                     issued_at: datetime) -> dict[str, Any]:
    """The signed revocation list document (what the coordinator serves).

    Args:
        revoked: ``{"release_id", "revoked_at", "reason"}`` per revoked release.
        private_key: The release signing key (PEM, EC P-256).
        issued_at: When the list is issued (timezone-aware).

    Returns:
        The JSON-ready document.
    """
    key = load_private_key(private_key)
    payload = json.dumps({
        "_type": _LIST_TYPE,
        "issued_at": issued_at.astimezone(UTC).isoformat(),
        "revoked": [{"release_id": str(r["release_id"]), "revoked_at": r.get("revoked_at"),
                     "reason": str(r.get("reason") or "")} for r in revoked],
    }, sort_keys=True, separators=(",", ":")).encode()
    signature = key.sign(_pae(payload), ec.ECDSA(hashes.SHA256()))
    return {"mediaType": MEDIA_TYPE, "dsseEnvelope": {
        "payloadType": _PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": _fingerprint(key.public_key()),
                        "sig": base64.b64encode(signature).decode()}],
    }}


def parse_revocations(data: bytes, *, public_key: Path, where: str,
                      max_age: timedelta = DEFAULT_MAX_AGE,
                      now: datetime | None = None) -> RevocationList:
    """Verify a signed revocation list; fail closed.

    Args:
        data: The document's bytes.
        public_key: The release public key (PEM), the one the bundles verify with.
        where: Where the list came from, for messages (a path or a URL).
        max_age: Refuse a list issued longer ago than this.
        now: The current time (tests).

    Returns:
        The verified list.

    Raises:
        BundleVerificationError: Unsigned (for example the unsigned lists of earlier
            versions), malformed, signed by another key, altered, too old or from the
            future.
    """
    key = load_public_key(public_key)
    fingerprint = _fingerprint(key)
    try:
        doc = json.loads(data)
    except ValueError:
        raise BundleVerificationError(f"the revocation list {where} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != MEDIA_TYPE:
        raise BundleVerificationError(
            f"the revocation list {where} is not signed (it must be the signed list the "
            "coordinator serves at /api/v1/revocations)")
    malformed = f"the signed revocation list {where} is malformed"
    try:
        envelope = doc["dsseEnvelope"]
        if envelope["payloadType"] != _PAYLOAD_TYPE:
            raise BundleVerificationError(f"{malformed}: payload type")
        (signature_entry,) = envelope["signatures"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(signature_entry["sig"], validate=True)
    except BundleVerificationError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BundleVerificationError(malformed) from None
    try:
        key.verify(signature, _pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BundleVerificationError(
            f"bad signature: the revocation list {where} does not verify with the release key "
            f"({fingerprint[:16]}); it was altered or signed by another key") from None
    try:
        body = json.loads(payload)
        if body["_type"] != _LIST_TYPE:
            raise BundleVerificationError(f"{malformed}: not a revocation list")
        issued_at = datetime.fromisoformat(body["issued_at"])
        entries = body["revoked"]
        reasons = {str(e["release_id"]): str(e.get("reason") or "") for e in entries}
    except BundleVerificationError:
        raise
    except (ValueError, KeyError, TypeError):
        raise BundleVerificationError(f"{malformed}: unexpected content") from None
    if issued_at.tzinfo is None:
        raise BundleVerificationError(f"{malformed}: issue time without a time zone")
    now = now or datetime.now(UTC)
    if issued_at > now + _CLOCK_SKEW:
        raise BundleVerificationError(
            f"the revocation list {where} is dated {issued_at.isoformat()}, in the future: "
            "check this computer's clock")
    if now - issued_at > max_age:
        days = (now - issued_at).total_seconds() / 86400
        raise BundleVerificationError(
            f"the revocation list {where} was issued {days:.1f} days ago (at most "
            f"{max_age.total_seconds() / 86400:g} allowed): fetch a fresh one from the release "
            "portal, or give --coordinator URL to fetch it at each check")
    return RevocationList(revoked=frozenset(reasons), reasons=MappingProxyType(reasons),
                          issued_at=issued_at, key_fingerprint=fingerprint)


def load_revocations(path: Path, *, public_key: Path,
                     max_age: timedelta = DEFAULT_MAX_AGE) -> RevocationList:
    """Read and verify a signed revocation list file (see :func:`parse_revocations`).

    Raises:
        BundleVerificationError: It cannot be read or fails verification (fail closed: an
            unreadable revocation list never means "nothing is revoked").
    """
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise BundleVerificationError(f"cannot read the revocation list {path}: {exc}") \
            from None
    if len(data) > _MAX_BYTES:
        raise BundleVerificationError(f"the revocation list {path} is too large")
    return parse_revocations(data, public_key=public_key, where=str(path), max_age=max_age)


def _list_url(coordinator: str) -> str:
    base = coordinator.strip().rstrip("/")
    if not base.startswith(("https://", "http://")):
        raise BundleVerificationError(
            f"--coordinator must be the release portal's address, such as "
            f"https://coordinator.example.org (got {coordinator!r})")
    return base if base.endswith("/revocations") else base + API_PATH


def _fetch(url: str, timeout: float) -> bytes:
    import httpx  # only the online check needs it

    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        raise BundleVerificationError(
            f"cannot fetch the revocation list from {url}: {type(exc).__name__}: {exc}") \
            from None
    if response.status_code != 200:
        raise BundleVerificationError(f"cannot fetch the revocation list from {url}: HTTP "
                                      f"{response.status_code}")
    if len(response.content) > _MAX_BYTES:
        raise BundleVerificationError(f"the revocation list from {url} is too large")
    return response.content


@dataclass(frozen=True)
class RevocationSource:
    """Where ``fedward-verify`` and ``fedward-serve`` get the revocation list from.

    Exactly one of: ``coordinator`` (fetched at every check), ``path`` (a signed list saved
    from the portal), or ``unsafe_skip`` (no check: only for an offline check made
    knowingly).

    Attributes:
        coordinator: The release portal's address (``https://host``) or the list's URL.
        path: A signed revocation list file.
        unsafe_skip: Skip the revocation check.
        max_age: Refuse a list issued longer ago than this.
        timeout_s: Seconds to wait for the coordinator.
    """

    coordinator: str | None = None
    path: Path | None = None
    unsafe_skip: bool = False
    max_age: timedelta = DEFAULT_MAX_AGE
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        given = sum([self.coordinator is not None, self.path is not None, self.unsafe_skip])
        if given == 0:
            raise BundleVerificationError(
                "the release's revocation status is unknown: give --coordinator URL (the "
                "release portal's address, or set FEDWARD_COORDINATOR) to check the signed "
                "revocation list online, or --revocations FILE (the signed list saved from the "
                f"portal); to verify offline without it, knowingly, {UNSAFE_SKIP_FLAG}")
        if given > 1:
            raise BundleVerificationError(
                f"give only one of --coordinator, --revocations and {UNSAFE_SKIP_FLAG}")
        if self.coordinator is not None:
            _list_url(self.coordinator)  # refuse a malformed address at once

    def describe(self) -> str:
        """Where the list comes from, for messages."""
        if self.coordinator is not None:
            return _list_url(self.coordinator)
        return str(self.path) if self.path is not None else "nowhere (check skipped)"

    def load(self, public_key: Path) -> RevocationList | None:
        """The verified list, or None when the check is skipped.

        Raises:
            BundleVerificationError: The list cannot be had or fails verification.
        """
        if self.unsafe_skip:
            return None
        if self.path is not None:
            return load_revocations(self.path, public_key=public_key, max_age=self.max_age)
        assert self.coordinator is not None
        url = _list_url(self.coordinator)
        return parse_revocations(_fetch(url, self.timeout_s), public_key=public_key,
                                 where=url, max_age=self.max_age)
