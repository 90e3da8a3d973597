"""How the site's SuperNode reaches the coordinator: directly, or through the tunnel; and
whether the coordinator answers with a certificate the site trusts.

An enrolled site (one with a certificate from ``fedward-site enroll``) always goes through
its tunnel to the coordinator's gateway, with mutual TLS; the tunnel listens on a Unix
socket in the site's ``run/`` directory. A site configured by hand with the SuperLink's own
address and CA (a single-host lab set-up, the demo: ``unix:`` and the path of the
coordinator's SuperLink socket) dials it directly. Either way the SuperNode, in its own
network namespace, reaches ``Route.upstream`` through a relay (see ``site_agent.agent``).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedward.certs import CAFiles
from fedward.sandbox.relay import unix_connect, unix_path
from site_agent.config import SitePaths
from site_agent.enroll import EnrollmentFiles, finish_interrupted_renewal
from site_agent.tunnel import SiteTunnel, TunnelConfig

__all__ = ["Route", "open_route", "probe_coordinator"]

log = logging.getLogger("fedward.site.connect")


@dataclass
class Route:
    """Where the SuperNode's connections go, and the tunnel to stop afterwards.

    Attributes:
        upstream: ``unix:/path`` (the tunnel, or the coordinator's SuperLink socket) or
            ``host:port`` (relayed by the agent).
        root_certificates: the CA that the SuperNode verifies the far end with.
    """

    upstream: str
    root_certificates: Path
    tunnel: SiteTunnel | None = None

    @property
    def via_gateway(self) -> bool:
        return self.tunnel is not None

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()
            self.tunnel = None


def open_route(*, root: Path, superlink: str, ca_cert: Path) -> Route:
    """Start the tunnel for an enrolled site, or route directly to ``superlink``."""
    files = EnrollmentFiles(root)
    done = finish_interrupted_renewal(files)
    if done is not None:
        log.warning("%s", done)
    if not files.enrolled:
        return Route(upstream=superlink, root_certificates=ca_cert)
    local = CAFiles.under(files.local_pki)
    tunnel = SiteTunnel(TunnelConfig(
        gateway=superlink, coordinator_ca=files.coordinator_ca,
        client_cert=files.site_cert, client_key=files.site_key,
        local_cert=local.server_cert, local_key=local.server_key,
        socket_path=SitePaths(root).tunnel_socket))
    tunnel.start()
    return Route(upstream=tunnel.address, root_certificates=local.ca_cert, tunnel=tunnel)


def probe_coordinator(address: str, ca_cert: Path, *, timeout: float = 3.0) -> str | None:
    """None if a TLS connection to ``address`` verifies against the CA, else why not."""
    path = unix_path(address)
    host, _, port = address.rpartition(":")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as err:
        return f"cannot read the coordinator CA certificate {ca_cert}: {err}"
    try:
        raw = unix_connect(path, timeout=timeout) if path is not None else \
            socket.create_connection((host, int(port)), timeout=timeout)
        # A SuperLink socket on this host carries the SuperLink's 127.0.0.1 certificate.
        with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1" if path else host):
            return None
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID / _HAS_EXPIRED
            return (f"the coordinator at {address} presented a certificate that is "
                    f"{err.verify_message} by this machine's clock: the clock is probably "
                    "wrong; set it right (NTP); `fedward-site doctor` measures the skew")
        return (f"the coordinator at {address} presented a certificate the site's CA does "
                f"not trust ({err.verify_message}); get the current CA certificate")
    except OSError as err:
        return f"the coordinator at {address} is not reachable ({err})"
