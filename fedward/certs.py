"""X.509 plumbing shared by the coordinator (its site CA) and the site agent (its local TLS).

Private keys are generated where they are used and written with mode 0600; the CA's key
never leaves the coordinator's data directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedward.files import atomic_write

__all__ = [
    "SITE_CERT_DAYS",
    "CAFiles",
    "CSRError",
    "IssuedCert",
    "ca_fingerprint",
    "ensure_ca",
    "issue_server_cert",
    "issue_site_cert",
    "make_csr",
    "write_private_key",
]

_CA_DAYS = 3650
_SERVER_DAYS = 825


@dataclass(frozen=True)
class CAFiles:
    """Paths of the coordinator's CA and of the SuperLink's server certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def under(cls, pki_dir: Path) -> CAFiles:
        """The standard layout inside ``pki_dir``."""
        return cls(
            ca_cert=pki_dir / "ca.pem",
            ca_key=pki_dir / "ca.key",
            server_cert=pki_dir / "server.pem",
            server_key=pki_dir / "server.key",
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM with mode 0600, atomically."""
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _load_ca(files: CAFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{files.ca_key} is not an EC private key")
    return cert, key


def ensure_ca(pki_dir: Path, *, common_name: str = "Fedward site CA") -> CAFiles:
    """Create the site CA in ``pki_dir`` unless it exists; return its file layout."""
    files = CAFiles.under(pki_dir)
    if files.ca_cert.exists() and files.ca_key.exists():
        return files
    pki_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    write_private_key(files.ca_key, key)
    _write_cert(files.ca_cert, cert)
    return files


def issue_server_cert(
    files: CAFiles, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    cert_path: Path | None = None, key_path: Path | None = None,
) -> None:
    """Issue (or re-issue) a TLS server certificate for the given host names and IPs.

    By default it is the SuperLink's (``files.server_cert``); the site gateway gets its own
    with the fleet host names sites connect to.
    """
    ca_cert, ca_key = _load_ca(files)
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_private_key(key_path or files.server_key, key)
    _write_cert(cert_path or files.server_cert, cert)


SITE_CERT_DAYS = 90


def ca_fingerprint(files: CAFiles) -> str:
    """SHA-256 of the CA certificate (DER), hex: what an enrollment token pins."""
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


class CSRError(ValueError):
    """A certificate signing request the CA will not sign."""


@dataclass(frozen=True)
class IssuedCert:
    """A certificate the CA issued: PEM, serial (hex) and expiry."""

    pem: bytes
    serial: str
    not_after: dt.datetime


def issue_site_cert(files: CAFiles, *, csr_pem: bytes, site_name: str,
                    days: int = SITE_CERT_DAYS) -> IssuedCert:
    """Sign a site's CSR as a TLS client certificate whose CN is the site's name.

    The site made its key pair itself; only the public half is in the CSR. The CA checks
    the CSR's own signature and that it asks for exactly this site's name.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise CSRError(f"not a PEM certificate signing request ({err})") from None
    if not csr.is_signature_valid:
        raise CSRError("the CSR's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != site_name:
        raise CSRError(f"the CSR must ask for common name {site_name!r}")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CSRError("the site's TLS key must be an EC key")
    ca_cert, ca_key = _load_ca(files)
    not_after = _now() + dt.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return IssuedCert(pem=cert.public_bytes(serialization.Encoding.PEM),
                      serial=format(cert.serial_number, "x"), not_after=not_after)


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A CSR for ``common_name`` signed with ``key`` (used by sites; here for tests)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
