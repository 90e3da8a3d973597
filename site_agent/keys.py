"""The site's Flower node key, generated at the site; the private half never leaves it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedward.files import atomic_write

__all__ = [
    "FINGERPRINT_KEY_FILE",
    "ensure_fingerprint_key",
    "ensure_node_key",
    "ensure_noise_secret",
    "public_key_fingerprint",
]

FINGERPRINT_KEY_FILE = "fingerprint.key"  # in the site's keys/ folder


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
    atomic_write(private_path, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()), mode=0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    atomic_write(public_path, public + "\n", mode=0o644)
    return public


def public_key_fingerprint(public_key: str) -> str:
    """Short SHA-256 fingerprint of an OpenSSH public key, for humans to compare."""
    blob = public_key.split()[1] if len(public_key.split()) > 1 else public_key
    return "SHA256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _ensure_secret(path: Path, *, damaged_hint: str) -> bytes:
    """32 random bytes kept in ``path`` (mode 0600, made once, never replaced silently)."""
    if path.exists():
        data = path.read_bytes()
        if len(data) == 32:
            return data
        raise ValueError(f"{path} is damaged (expected 32 bytes); {damaged_hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return data


def ensure_noise_secret(path: Path) -> bytes:
    """The site's secret for seeding DP noise (32 random bytes, mode 0600, made once).

    The coordinator never sees it: noise it could regenerate would be noise it could remove.
    """
    return _ensure_secret(path, damaged_hint="delete it to make a new one")


def ensure_fingerprint_key(path: Path) -> bytes:
    """The site's key for its data fingerprint (32 random bytes, mode 0600, made once).

    The fingerprint that leaves the site is an HMAC-SHA256 of the data file under this key
    (:func:`site_agent.data.keyed_fingerprint`), so nobody holding a copy of a candidate file
    can confirm that the site holds it; the site can show the key to an auditor, who then
    recomputes the fingerprint (``fedward-site fingerprint --reveal-key``). A new key
    changes every later fingerprint, so lineage stops matching earlier rounds.
    """
    return _ensure_secret(path, damaged_hint=(
        "restore it from this site's backup of keys/ (a new one changes the site's data "
        "fingerprint), or delete it to make a new one"))
