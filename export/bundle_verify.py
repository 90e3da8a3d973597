"""Verifying a signed release bundle; fails closed.

Verification here does not use ``model_signing``: it reads the same format
(:mod:`export.bundle`) with plain ``cryptography`` (ECDSA P-256 over the DSSE
pre-authentication encoding) and is stricter than the standard tool's defaults. That tool
ignores ``.git*`` files and follows the serialization options named inside the signature;
:func:`verify_bundle` accepts exactly one serialization (every file, SHA-256, no symlinks,
only ``model.sig`` left out), refuses any symlink, special file, unlisted file or folder,
and any manifest name that is not a plain relative path, and refuses a release id it is
told is revoked (the signed revocation list is :mod:`export.revocations`). It returns a
:class:`VerifiedBundle` or raises one
:class:`~export.bundle_format.BundleVerificationError` whose message says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from export.bundle_format import (
    CHUNK_BYTES,
    MODEL_CARD_JSON,
    RELEASE_ID_KEY,
    RELEASE_ID_RE,
    SIGNATURE_FILE,
    BundleVerificationError,
    name_problem,
)
from export.bundle_keys import load_public_key, public_pem

__all__ = [
    "VerifiedBundle",
    "verify_bundle",
    "verify_folder",
]


# The OpenSSF model-signing v1.0 format, key mode, as model-signing 1.1.1 writes it.
_BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
_PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
_STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"
_SERIALIZATION: Final[Mapping[str, Any]] = {
    "method": "files",
    "hash_type": "sha256",
    "allow_symlinks": False,
    "ignore_paths": [SIGNATURE_FILE],
}

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MAX_SIGNATURE_BYTES: Final = 16 * 1024 * 1024
_MAX_CARD_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed :func:`verify_bundle`.

    Attributes:
        path: The bundle folder.
        release_id: The release id from the signed model card.
        files: Every signed file name and its SHA-256 (hex); ``model.sig`` is not listed.
        model_card: The signed model card.
        key_fingerprint: Fingerprint of the key that verified it (see
            :func:`public_key_fingerprint`).
    """

    path: Path
    release_id: str
    files: Mapping[str, str]
    model_card: Mapping[str, Any] = field(repr=False)
    key_fingerprint: str

    def read_verified(self, name: str) -> bytes:
        """Read one signed file and check its digest again on the bytes returned.

        Loading an artefact from these bytes (rather than from the path) closes the gap
        between verification and use: a file swapped after :func:`verify_bundle` is caught.

        Args:
            name: A file name from :attr:`files`.

        Returns:
            The file's content.

        Raises:
            BundleVerificationError: The name is not signed, or the file changed.
        """
        if name not in self.files:
            raise BundleVerificationError(f"{name!r} is not a signed file of this bundle")
        data = _read_regular(self.path, name)
        if hashlib.sha256(data).hexdigest() != self.files[name]:
            raise BundleVerificationError(f"digest mismatch: {name} changed since it was "
                                          "verified")
        return data


def verify_bundle(*, bundle_dir: Path, public_key: Path,
                  revoked: set[str] | frozenset[str] = frozenset(),
                  release_id: str | None = None) -> VerifiedBundle:
    """Verify a bundle; fail closed.

    Checks, in order: the folder holds only regular files and folders (no symlink
    anywhere, even one that points inside); ``model.sig`` exists and is signed by
    ``public_key``; the signed manifest uses the expected serialization and names only
    plain relative paths; no signed file is missing and no unsigned file or folder is
    present; every file's SHA-256 matches; the signed model card has a release id, which
    equals ``release_id`` if given and is not in ``revoked``.

    Args:
        bundle_dir: The bundle folder.
        public_key: The release public key (PEM), obtained out of band (the portal shows
            its fingerprint); never one shipped inside the bundle.
        revoked: Revoked release ids.
        release_id: The release the caller expects (guards against being handed another,
            validly signed release, such as an older one).

    Returns:
        The verified bundle.

    Raises:
        BundleVerificationError: With the reason, on any failure.
    """
    key = load_public_key(Path(public_key))
    return verify_folder(Path(bundle_dir), key, frozenset(revoked), release_id)


def verify_folder(root: Path, key: ec.EllipticCurvePublicKey, revoked: frozenset[str],
            expected_release: str | None) -> VerifiedBundle:
    fingerprint = hashlib.sha256(public_pem(key)).hexdigest()
    on_disk, folders = _scan(root)
    if SIGNATURE_FILE not in on_disk:
        raise BundleVerificationError(f"unsigned bundle: {SIGNATURE_FILE} is missing")
    statement = _verified_statement(root, key, fingerprint)
    manifest = _manifest(statement)

    problems = []
    on_disk.discard(SIGNATURE_FILE)
    missing = sorted(set(manifest) - on_disk)
    extra = sorted(on_disk - set(manifest))
    expected_folders = {str(p) for n in manifest for p in PurePosixPath(n).parents
                        if str(p) != "."}
    extra_folders = sorted(folders - expected_folders)
    if missing:
        problems.append(f"missing file{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    if extra:
        problems.append(f"extra file{'s' if len(extra) > 1 else ''} not in the signed "
                        f"manifest: {', '.join(extra)}")
    if extra_folders:
        problems.append("extra folder not in the signed manifest: " + ", ".join(extra_folders))
    if problems:
        raise BundleVerificationError("; ".join(problems))

    card_bytes = b""
    changed = []
    for name in sorted(manifest):
        if name == MODEL_CARD_JSON:
            card_bytes = _read_regular(root, name, limit=_MAX_CARD_BYTES)
            digest = hashlib.sha256(card_bytes).hexdigest()
        else:
            digest = _sha256_file(root, name)
        if digest != manifest[name]:
            changed.append(name)
    if changed:
        raise BundleVerificationError(f"digest mismatch: {', '.join(changed)} changed since "
                                      "it was signed")

    if MODEL_CARD_JSON not in manifest:
        raise BundleVerificationError(f"{MODEL_CARD_JSON} is not in the signed manifest")
    try:
        card = json.loads(card_bytes)
    except ValueError:
        raise BundleVerificationError(f"{MODEL_CARD_JSON} is not valid JSON") from None
    release_id = card.get(RELEASE_ID_KEY) if isinstance(card, dict) else None
    if not isinstance(release_id, str) or not RELEASE_ID_RE.fullmatch(release_id):
        raise BundleVerificationError(f"{MODEL_CARD_JSON} has no valid {RELEASE_ID_KEY}")
    if expected_release is not None and release_id != expected_release:
        raise BundleVerificationError(f"bundle is release {release_id}, expected release "
                                      f"{expected_release}")
    if release_id in revoked:
        raise BundleVerificationError(f"release {release_id} is revoked")
    return VerifiedBundle(path=root, release_id=release_id, files=MappingProxyType(manifest),
                          model_card=card, key_fingerprint=fingerprint)


def _scan(root: Path) -> tuple[set[str], set[str]]:
    """Relative names of every file and folder under ``root``; refuse anything else."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise BundleVerificationError(f"bundle folder {root} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleVerificationError(f"bundle path {root} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise BundleVerificationError(f"bundle path {root} is not a folder")
    files: set[str] = set()
    folders: set[str] = set()
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as it:
            for entry in it:
                rel = prefix + entry.name
                # is_symlink/is_file/is_dir(follow_symlinks=False) use lstat: a symlink is
                # never followed, wherever it points.
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    raise BundleVerificationError(f"symlink in bundle: {rel} -> {target}")
                if entry.is_dir(follow_symlinks=False):
                    folders.add(rel)
                    pending.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    files.add(rel)
                else:
                    raise BundleVerificationError(f"not a regular file in bundle: {rel}")
    return files, folders


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    return b"DSSEv1 %d %s %d %s" % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(),
                                    len(payload), payload)


def _verified_statement(root: Path, key: ec.EllipticCurvePublicKey,
                        fingerprint: str) -> Mapping[str, Any]:
    raw = _read_regular(root, SIGNATURE_FILE, limit=_MAX_SIGNATURE_BYTES)
    malformed = f"{SIGNATURE_FILE} is malformed"
    try:
        sig_bundle = json.loads(raw)
        if sig_bundle["mediaType"] != _BUNDLE_MEDIA_TYPE:
            raise BundleVerificationError(f"{malformed}: media type "
                                          f"{sig_bundle['mediaType']!r}")
        envelope = sig_bundle["dsseEnvelope"]
        if envelope["payloadType"] != _PAYLOAD_TYPE:
            raise BundleVerificationError(f"{malformed}: payload type "
                                          f"{envelope['payloadType']!r}")
        signatures = envelope["signatures"]
        if not isinstance(signatures, list) or len(signatures) != 1:
            raise BundleVerificationError(f"{malformed}: expected exactly one signature")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(signatures[0]["sig"], validate=True)
        hint = (sig_bundle.get("verificationMaterial") or {}).get("publicKey", {}).get("hint")
    except BundleVerificationError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise BundleVerificationError(malformed) from None

    if hint and hint != fingerprint:
        raise BundleVerificationError(
            f"bad signature: signed by another key ({str(hint)[:16]}), not the release key "
            f"({fingerprint[:16]})"
        )
    try:
        key.verify(signature, _pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BundleVerificationError(
            f"bad signature: {SIGNATURE_FILE} does not verify with the release key "
            f"({fingerprint[:16]})"
        ) from None
    try:
        statement = json.loads(payload)
    except ValueError:
        raise BundleVerificationError(f"{malformed}: signed statement is not JSON") from None
    if not isinstance(statement, dict):
        raise BundleVerificationError(f"{malformed}: signed statement is not an object")
    return statement


def _manifest(statement: Mapping[str, Any]) -> dict[str, str]:
    """The signed file -> SHA-256 manifest, after checking the statement's shape."""
    if (statement.get("_type") != _STATEMENT_TYPE
            or statement.get("predicateType") != _PREDICATE_TYPE):
        raise BundleVerificationError("unsupported signature: not an OpenSSF model-signing "
                                      "v1.0 statement")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        raise BundleVerificationError("unsupported signature: statement has no predicate")
    serialization_ = predicate.get("serialization")
    if serialization_ != dict(_SERIALIZATION):
        raise BundleVerificationError(
            f"unsupported signature: serialization {serialization_!r}, expected "
            f"{dict(_SERIALIZATION)!r}"
        )
    resources = predicate.get("resources")
    if not isinstance(resources, list):
        raise BundleVerificationError("unsupported signature: statement lists no files")
    manifest: dict[str, str] = {}
    for res in resources:
        if not isinstance(res, dict):
            raise BundleVerificationError("unsupported signature: bad manifest entry")
        name, digest = res.get("name"), res.get("digest")
        why = name_problem(name)
        if why is not None:
            raise BundleVerificationError(
                f"manifest entry {name!r} is not a plain relative path inside the bundle "
                f"({why})"
            )
        assert isinstance(name, str)  # checked by name_problem
        if name == SIGNATURE_FILE:
            raise BundleVerificationError(f"manifest entry {name!r} is reserved")
        if name in manifest:
            raise BundleVerificationError(f"manifest lists {name!r} twice")
        if (res.get("algorithm") != "sha256" or not isinstance(digest, str)
                or not _HEX64.fullmatch(digest)):
            raise BundleVerificationError(f"manifest entry {name!r} has no SHA-256 digest")
        manifest[name] = digest
    return manifest


def _open_nofollow(root: Path, name: str) -> int:
    # O_NOFOLLOW on the last component; _scan already refused symlinks in the folders.
    try:
        return os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BundleVerificationError(f"missing file: {name}") from None
    except OSError as exc:
        raise BundleVerificationError(f"cannot read {name}: {exc.strerror}") from None


def _read_regular(root: Path, name: str, *, limit: int | None = None) -> bytes:
    fd = _open_nofollow(root, name)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleVerificationError(f"not a regular file in bundle: {name}")
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise BundleVerificationError(f"{name} is larger than {limit} bytes")
    return data


def _sha256_file(root: Path, name: str) -> str:
    fd = _open_nofollow(root, name)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleVerificationError(f"not a regular file in bundle: {name}")
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()
