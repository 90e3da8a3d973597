"""The coordinator's data directory: created and brought up to date (``fedward-coordinator
init``, and ``serve`` at every start).

Apart from the service (its FastAPI app, the gateway, the SuperLink's supervision), so that
``init`` imports only what it runs: this, the schema's migrations and the first admin.
"""

from __future__ import annotations

import os
from pathlib import Path

from coordinator.db import run_migrations
from coordinator.settings import Settings
from fedward.certs import CAFiles, ensure_ca, issue_server_cert

__all__ = ["gateway_cert_paths", "init_home"]


def init_home(settings: Settings) -> CAFiles:
    """Create the data directory, the site CA, the SuperLink certificate and the schema."""
    settings.home.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.home, 0o700)
    pki = ensure_ca(settings.home / "pki")
    if not pki.server_cert.exists():
        issue_server_cert(pki)
    cert, key = gateway_cert_paths(pki)
    hosts = tuple(h.strip() for h in settings.fleet_hostnames.split(",") if h.strip())
    if not cert.exists() or _cert_hosts(cert) != set(hosts):
        issue_server_cert(pki, hosts=hosts, cert_path=cert, key_path=key)
    run_migrations(settings.effective_database_url)
    return pki


def gateway_cert_paths(pki: CAFiles) -> tuple[Path, Path]:
    """The site gateway's TLS certificate and key, beside the CA."""
    return pki.ca_cert.with_name("gateway.pem"), pki.ca_cert.with_name("gateway.key")


def _cert_hosts(path: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}
