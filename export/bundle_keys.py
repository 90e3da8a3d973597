"""Release keys: EC P-256 key pairs that sign bundles and revocation lists, fingerprints.

The private key never leaves the coordinator that made it; the public key and its
fingerprint are what a clinician compares out of band.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from export.bundle_format import BundleVerificationError, BundleWriteError

__all__ = [
    "generate_release_key",
    "load_private_key",
    "load_public_key",
    "public_key_fingerprint",
    "public_key_path",
    "public_pem",
]


def public_key_path(private_key: Path) -> Path:
    """Where :func:`generate_release_key` puts the public half of ``private_key``.

    ``release.pem`` -> ``release.pub.pem``; ``release_key`` -> ``release_key.pub.pem``.

    Args:
        private_key: Path of the private key file.

    Returns:
        Path of the public key file beside it.
    """
    private_key = Path(private_key)
    stem = private_key.stem if private_key.suffix == ".pem" else private_key.name
    return private_key.with_name(stem + ".pub.pem")


def generate_release_key(path: Path) -> None:
    """Create a release signing key: EC P-256, PEM, private file mode 0600.

    The private key is written to ``path`` (PKCS#8, unencrypted: protect it with file
    permissions and the host's disk encryption) and the public key to
    :func:`public_key_path` of it. Neither file may exist already: a release key is never
    silently replaced, because every bundle signed with the old one would stop verifying.

    Args:
        path: Path of the private key file to create.

    Raises:
        FileExistsError: One of the two files exists.
    """
    path = Path(path)
    pub_path = public_key_path(path)
    if pub_path.exists():
        raise FileExistsError(f"public key {pub_path} exists; refusing to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: never overwrite; mode 0600 from creation, never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
        fh.flush()
        os.fsync(fh.fileno())
    pub_path.write_bytes(public_pem(key.public_key()))


def public_key_fingerprint(pub_pem: bytes) -> str:
    """The fingerprint people compare to trust a release key.

    It is the SHA-256 (hex) of the key's canonical SubjectPublicKeyInfo PEM, the same value
    that model-signing writes as the key hint in every ``model.sig``, so a reader can match
    a signature to the key the portal shows.

    Args:
        pub_pem: A PEM public key.

    Returns:
        64 lowercase hex characters.

    Raises:
        ValueError: ``pub_pem`` is not a PEM public key.
    """
    key = serialization.load_pem_public_key(pub_pem)
    return hashlib.sha256(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleVerificationError(f"cannot read the release public key {path}: {exc}") \
            from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise BundleVerificationError(f"release public key {path} is not an EC P-256 key")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleWriteError(f"cannot read the release private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise BundleWriteError(f"release private key {path} is not an EC P-256 key")
    return key
