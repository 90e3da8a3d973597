"""How the site's SuperNode reaches the coordinator: directly, or through the tunnel.

An enrolled site (one with a certificate from ``fedward-site enroll``) always goes through
its tunnel to the coordinator's gateway, with mutual TLS. A site configured by hand with the
SuperLink's own address and CA (a single-host lab set-up, the demo) dials it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from export.certs import CAFiles
from site_agent.enroll import EnrollmentFiles, finish_interrupted_renewal
from site_agent.tunnel import SiteTunnel, TunnelConfig

__all__ = ["Route", "open_route"]

log = logging.getLogger("fedward.site.connect")


@dataclass
class Route:
    """What the SuperNode is started with, and the tunnel to stop afterwards."""

    superlink: str
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
        return Route(superlink=superlink, root_certificates=ca_cert)
    local = CAFiles.under(files.local_pki)
    tunnel = SiteTunnel(TunnelConfig(
        gateway=superlink, coordinator_ca=files.coordinator_ca,
        client_cert=files.site_cert, client_key=files.site_key,
        local_cert=local.server_cert, local_key=local.server_key))
    tunnel.start()
    return Route(superlink=tunnel.address, root_certificates=local.ca_cert, tunnel=tunnel)
