"""The coordinator's PKI: the site CA made at init and the certificates it issues.

The X.509 code is shared with the site agent (which makes its own local TLS material and
CSRs) and lives in :mod:`fedward.certs`; this module is the coordinator's view of it.
"""

from fedward.certs import (
    SITE_CERT_DAYS,
    CAFiles,
    CSRError,
    IssuedCert,
    ca_fingerprint,
    ensure_ca,
    issue_server_cert,
    issue_site_cert,
    make_csr,
    write_private_key,
)

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
