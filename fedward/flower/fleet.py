"""A site's own node at the SuperLink: telling a stale "online" apart, and ending it.

A site agent that crashed (SIGKILL, power cut) never told the SuperLink that its SuperNode
left, so the SuperLink keeps the node online until two heartbeats are missed (about 60 s).
Meanwhile a restarted SuperNode is refused ("could not be activated", exit code 305) and
the site misses every round. The node's own key may end that stale session
(``DeactivateNode``, signed like every Fleet request; the SuperLink checks that the key is
the node's), after which the SuperNode is accepted at once. Flower's own SuperNode sends the
same request when it stops cleanly.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Final

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fleet_pb2 import DeactivateNodeRequest
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedward.sandbox.relay import over_unix_socket, unix_path

__all__ = ["deactivate_node", "fleet_client", "refused_as_still_active", "refused_as_unknown",
           "still_active_node_id"]

# What the SuperLink answers an ActivateNode for a node it still counts as online, and for
# a key it does not know (``flwr/superlink/servicer/fleet/fleet_handlers.py``), as the
# SuperNode logs it before exiting with code 305.
_STILL_ACTIVE_RE: Final = re.compile(rb"SuperNode with node ID (\d+) could not be activated")
_UNKNOWN_KEY: Final = b"No SuperNode found with the given public key"
# What the SuperNode logs once the SuperLink accepted it.
_ACCEPTED_RE: Final = re.compile(rb"SuperNode ID: (\d+)")


def _log_since(log_path: Path, since: int) -> bytes:
    try:
        with log_path.open("rb") as fh:
            fh.seek(since)
            return fh.read()
    except OSError:
        return b""


def still_active_node_id(log_text: bytes) -> int | None:
    """The node id, when this piece of SuperNode log says it was refused because the
    SuperLink still counts the node as online; None otherwise."""
    found = _STILL_ACTIVE_RE.findall(log_text)
    return int(found[-1]) if found else None


def refused_as_still_active(log_path: Path, *, since: int = 0) -> int | None:
    """The node id to end a stale session of, after a SuperNode that started at ``since``
    in its log was refused; None when there is none to try.

    The SuperLink tells a remote SuperNode only "Failed to activate SuperNode" (its reason,
    with the node id, stays in the SuperLink's own log), so the id is the one this site's
    node was last accepted under, earlier in the log (with node authentication a node keeps
    its id across restarts). Ending that session is refused unless it is this key's node.
    """
    named = still_active_node_id(_log_since(log_path, since))
    if named is not None:
        return named
    try:
        with log_path.open("rb") as fh:
            fh.seek(max(0, since - 256 * 1024))
            earlier = fh.read(since - fh.tell())
    except OSError:
        return None
    found = _ACCEPTED_RE.findall(earlier)
    return int(found[-1]) if found else None


def refused_as_unknown(log_path: Path, *, since: int = 0) -> bool:
    """Whether the SuperNode was refused because the SuperLink does not know its key."""
    return _UNKNOWN_KEY in _log_since(log_path, since)


def fleet_client(*, upstream: str, root_certificates: Path, node_key: Path,
                 timeout: float = 10.0) -> FleetHttpClient:
    """A Fleet API client that signs its requests with the site's node key, as the
    SuperNode does (the caller closes it; it retries nothing).

    Args:
        upstream: where the SuperNode's connections go: ``unix:/path`` (the site's tunnel
            or the SuperLink's socket, whose certificate names 127.0.0.1) or ``host:port``.
        root_certificates: the CA that the far end's certificate is checked against.
        node_key: the site's node private key (OpenSSH format, as the SuperNode reads it).
        timeout: seconds for each request.
    """
    private = serialization.load_ssh_private_key(node_key.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{node_key} is not an EC key")
    path = unix_path(upstream)
    client = FleetHttpClient.from_server_address(
        "127.0.0.1" if path is not None else upstream, False,
        root_certificates.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                      NodeAuthHttpInterceptor(private, private.public_key())])
    if path is not None:
        ctx = ssl.create_default_context(cafile=str(root_certificates))
        over_unix_socket(client, path, verify=ctx)
    client._client.timeout = httpx.Timeout(timeout)
    return client


def deactivate_node(*, upstream: str, root_certificates: Path, node_key: Path, node_id: int,
                    timeout: float = 10.0) -> None:
    """Mark this site's node offline at the SuperLink, signed with its node key.

    Args:
        upstream: as for :func:`fleet_client`.
        root_certificates: as for :func:`fleet_client`.
        node_key: as for :func:`fleet_client`.
        node_id: the node id the SuperLink named when it refused the SuperNode.
        timeout: seconds for the one request.

    Raises:
        Exception: the request failed (unreachable, refused); the caller falls back to
            waiting for the SuperLink to time the node out.
    """
    with fleet_client(upstream=upstream, root_certificates=root_certificates,
                      node_key=node_key, timeout=timeout) as client:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
