"""The coordinator's client for the SuperLink's control API (a Unix socket only it can open).

flwr 1.42 has no public Python API for starting runs or registering nodes; these calls go
through the same internal modules the ``flwr`` CLI uses, which is why flwr is pinned to one
exact version. Flower's version handshake sends the caller's component name with every
call; this client sends the CLI's (:data:`CONTROL_COMPONENT`), the control API's only caller
in Flower. Everything here is reached only from the coordinator host.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.serde import fab_to_proto, scalar_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedward.flower.fab import app_bundle
from fedward.sandbox.relay import over_unix_socket, unix_path

__all__ = [
    "CONTROL_COMPONENT",
    "FlowerControl",
    "FlowerRunState",
    "NodeKeyError",
    "node_public_key_bytes",
]

# The component name the control client sends with every call: the flwr CLI's own.
CONTROL_COMPONENT: Final = "flwr CLI"


@dataclass(frozen=True)
class FlowerRunState:
    """The state of the newest Flower run that trains a coordinator run."""

    flwr_run_id: int
    status: str        # pending, starting, running or finished
    sub_status: str    # for finished runs: completed, failed or stopped
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"


class NodeKeyError(ValueError):
    """A site's node public key is not an OpenSSH EC key on a NIST curve."""


def node_public_key_bytes(openssh_public_key: str) -> bytes:
    """Validate an OpenSSH public key text and return the bytes the SuperLink expects."""
    try:
        key = serialization.load_ssh_public_key(openssh_public_key.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:  # unknown key type
        raise NodeKeyError(
            "the node public key is not an OpenSSH public key; send the content of the "
            f"site's node key .pub file ({err})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NodeKeyError("the node public key must be an ECDSA key (ssh-keygen -t ecdsa)")
    return public_key_to_bytes(key)


@dataclass
class FlowerControl:
    """A control-API client bound to the coordinator's own SuperLink.

    ``address`` is ``unix:/path`` (the SuperLink's socket in the coordinator's data
    directory) or ``host:port``; either way TLS is verified against ``ca_cert`` for the
    SuperLink's 127.0.0.1 certificate.
    """

    address: str
    ca_cert: Path

    def _client(self) -> ControlHttpClient:
        path = unix_path(self.address)
        client = ControlHttpClient.from_server_address(
            server_address="127.0.0.1" if path is not None else self.address,
            insecure=False,
            root_certificates=self.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name=CONTROL_COMPONENT)],
        )
        if path is not None:
            ctx = ssl.create_default_context(cafile=str(self.ca_cert))
            over_unix_socket(client, path, verify=ctx)
        return client

    def register_node(self, *, public_key: str, name: str) -> int:
        """Register a site's node key; returns the Flower node id (stable across restarts)."""
        client = self._client()
        try:
            res = client.RegisterNode(
                RegisterNodeRequest(public_key=node_public_key_bytes(public_key), name=name)
            )
        finally:
            client.close()
        return int(res.node_id)

    def unregister_node(self, node_id: int) -> bool:
        """Unregister a node: the SuperLink refuses its key from now on.

        Returns:
            True if it was registered, False if it was not (already unregistered).
        """
        client = self._client()
        try:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 404:   # "Node ID not found for account"
                return False
            raise
        finally:
            client.close()
        return True

    def online_node_ids(self) -> list[int]:
        """Ids of the registered nodes the SuperLink currently sees online."""
        client = self._client()
        try:
            res = client.ListNodes(ListNodesRequest())
        finally:
            client.close()
        return [int(n.node_id) for n in res.nodes_info if n.status == "online"]

    def start_run(self, *, fedward_run_id: int, parity_candidate: int = 0,
                  evaluation: int = 0) -> int:
        """Start a Flower run of the appliance's app for a coordinator run; returns its id.

        With ``parity_candidate`` the run does not train: the sites of run
        ``fedward_run_id`` measure that release candidate's export parity. With
        ``evaluation`` it does not train either: the sites evaluate the checkpoint of that
        evaluation on demand (``coordinator.evaluation``).
        """
        fab_bytes, fab_hash = app_bundle()
        client = self._client()
        try:
            res = client.StartRun(
                StartRunRequest(
                    fab=fab_to_proto(Fab(fab_hash, fab_bytes, {})),
                    override_config=user_config_to_proto({
                        "fedward-run-id": str(fedward_run_id),
                        "fedward-parity-candidate": str(parity_candidate),
                        "fedward-evaluation": str(evaluation),
                    }),
                )
            )
        finally:
            client.close()
        if not res.HasField("run_id"):
            raise RuntimeError("the SuperLink did not start the run")
        return int(res.run_id)

    def stop_run(self, flwr_run_id: int) -> None:
        """Ask the SuperLink to stop a Flower run."""
        client = self._client()
        try:
            client.StopRun(StopRunRequest(run_id=flwr_run_id))
        finally:
            client.close()

    def training_runs(self, limit: int = 100) -> dict[int, FlowerRunState]:
        """Coordinator run id -> the state of its newest Flower training run.

        Read from the ``fedward-run-id`` each run was started with; parity runs (which
        measure a release candidate and train nothing) and evaluations on demand are left
        out.
        """
        client = self._client()
        try:
            res = client.ListRuns(ListRunsRequest(limit=limit))
        finally:
            client.close()
        newest: dict[int, tuple[str, FlowerRunState]] = {}
        for flwr_id, run in res.run_dict.items():
            cfg = {k: scalar_from_proto(v) for k, v in run.override_config.items()}
            try:
                ours = int(str(cfg.get("fedward-run-id", "")))
                parity = int(str(cfg.get("fedward-parity-candidate", "0")))
                evaluation = int(str(cfg.get("fedward-evaluation", "0")))
            except ValueError:
                continue
            if parity or evaluation:
                continue
            state = FlowerRunState(flwr_run_id=int(flwr_id), status=run.status.status,
                                   sub_status=run.status.sub_status,
                                   details=run.status.details)
            if ours not in newest or run.pending_at > newest[ours][0]:
                newest[ours] = (run.pending_at, state)
        return {ours: state for ours, (_, state) in newest.items()}
