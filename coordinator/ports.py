"""The ports ``fedward-coordinator serve`` opens, checked before anything starts.

``serve`` opens the REST API and the site gateway on the host, and the SuperLink on
127.0.0.1 of its private network namespace (where no host port can clash with it), or on the
host's own 127.0.0.1 in container mode. Two of them on one port, or a port another process
already holds, used to end in a traceback half-way through the start; :func:`port_problem`
finds it first and says which options clash.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from coordinator.settings import Settings

__all__ = ["OpenedPort", "opened_ports", "port_problem", "sites_address"]

_ANY = frozenset({"", "0.0.0.0", "::"})   # the wildcard addresses


@dataclass(frozen=True)
class OpenedPort:
    """One listening port of ``serve``, with the options that set it."""

    what: str      # e.g. "the site gateway"
    options: str   # e.g. "--fleet-port / FEDWARD_FLEET_PORT"
    host: str
    port: int      # 0: a free one is picked at start


def opened_ports(settings: Settings, *, superlink_port: int, mode: str) -> list[OpenedPort]:
    """The host ports ``serve`` will listen on (the SuperLink's only in container mode)."""
    ports = [
        OpenedPort("the REST API", "--port / FEDWARD_API_PORT", settings.api_host,
                   settings.api_port),
        OpenedPort("the site gateway", "--fleet-port / FEDWARD_FLEET_PORT",
                   settings.fleet_host, settings.fleet_port),
    ]
    if mode == "container":
        ports.append(OpenedPort("the SuperLink", "--superlink-port", "127.0.0.1",
                                superlink_port))
    return ports


def _overlap(a: str, b: str) -> bool:
    return a == b or a in _ANY or b in _ANY or {a, b} <= {"127.0.0.1", "localhost"}


def _in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn and asyncio
        try:
            s.bind((host or "0.0.0.0", port))   # only tried, then closed
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return "is already in use by another process"
            return f"cannot be opened ({err.strerror})"
    return None


def port_problem(ports: list[OpenedPort]) -> str | None:
    """One line saying why ``serve`` cannot open these ports, or None when it can."""
    for i, a in enumerate(ports):
        for b in ports[i + 1:]:
            if a.port and a.port == b.port and _overlap(a.host, b.host):
                return (f"{a.what} ({a.options}) and {b.what} ({b.options}) are both set to "
                        f"port {a.port}: each needs its own port; change one of them")
    for p in ports:
        if p.port:
            why = _in_use(p.host, p.port)
            if why is not None:
                return (f"port {p.port} on {p.host or '*'} for {p.what} ({p.options}) {why}; "
                        "stop that process or choose another port")
    return None


def sites_address(settings: Settings, port: int) -> str:
    """``host:port`` that hospitals give to ``fedward-site enroll --gateway``: the first of
    ``FEDWARD_FLEET_HOSTNAMES`` (the names in the gateway's certificate) and the gateway's
    port."""
    names = [h.strip() for h in settings.fleet_hostnames.split(",") if h.strip()]
    return f"{names[0] if names else settings.fleet_host}:{port}"
