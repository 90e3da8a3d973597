"""The site's Flower node key, generated at the site; the private half never leaves it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["ensure_node_key", "ensure_noise_secret", "public_key_fingerprint"]


def ensure_node_key(private_path: Path, public_path: Path) -> str:
    """Create an ECDSA P-384 node key in OpenSSH format unless it exists.

    Returns the public key text (what the coordinator registers). The private key file is
    created with mode 0600 and is never sent anywhere.
    """
    if private_path.exists() and public_path.exists():
        return public_path.read_text().strip()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_path.parent, 0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    public_path.write_text(public + "\n")
    return public


def public_key_fingerprint(public_key: str) -> str:
    """Short SHA-256 fingerprint of an OpenSSH public key, for humans to compare."""
    blob = public_key.split()[1] if len(public_key.split()) > 1 else public_key
    return "SHA256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def ensure_noise_secret(path: Path) -> bytes:
    """The site's secret for seeding DP noise (32 random bytes, mode 0600, made once).

    The coordinator never sees it: noise it could regenerate would be noise it could remove.
    """
    if path.exists():
        data = path.read_bytes()
        if len(data) == 32:
            return data
        raise ValueError(f"{path} is damaged (expected 32 bytes); delete it to make a new one")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return data
