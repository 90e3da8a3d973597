"""A small HTTP listener that serves one Prometheus registry at ``/metrics``.

The coordinator and the site agent each expose their metrics on a listener of their own,
apart from any API, so that a Prometheus server can scrape them without an API token that
could also change things. It binds to 127.0.0.1 by default. Another address needs a bearer
token (a file only the service and the Prometheus server can read): metrics name sites and
projects, which an unauthenticated listener on a network would tell anyone who asks.

Only ``GET /metrics`` is answered; everything else is 404. The server is
prometheus-client's threaded WSGI server, so a slow scrape never holds up another.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = ["MetricsListener", "MetricsListenerError", "is_loopback", "parse_address",
           "read_token"]

log = logging.getLogger("fedward.metrics")

_PATH: Final = "/metrics"

StartResponse = Callable[..., Any]


class MetricsListenerError(RuntimeError):
    """The metrics listener cannot start; the message says what to change."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` as a pair.

    Raises:
        MetricsListenerError: Not ``host:port`` with a port from 0 to 65535.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsListenerError(
            f"metrics address {value!r} must be host:port, such as 127.0.0.1:8602")
    return host.strip("[]"), int(port)


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding white space removed).

    Raises:
        MetricsListenerError: The file cannot be read or holds fewer than 16 characters.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise MetricsListenerError(f"cannot read the metrics token file {path}: "
                                   f"{err.strerror}") from None
    if len(token) < 16:
        raise MetricsListenerError(f"the metrics token in {path} is too short: use at least "
                                   "16 random characters (e.g. `openssl rand -hex 32`)")
    return token


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (every 15 s, forever)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


@dataclass
class MetricsListener:
    """Serves ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Attributes:
        registry: What to serve.
        host: Address to bind; loopback unless a token is given.
        port: TCP port; 0 picks a free one (read :attr:`port` back after :meth:`start`).
        token: A bearer token every scrape must present, or None (loopback only).
    """

    registry: CollectorRegistry
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None

    def __post_init__(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise MetricsListenerError(
                f"metrics on {self.host} would be open to the network without a token: "
                "bind them to 127.0.0.1, or give a token file for Prometheus to present")
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _app(self) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
        metrics_app = make_wsgi_app(self.registry)
        expected = None if self.token is None else f"Bearer {self.token}".encode()

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != _PATH or environ.get("REQUEST_METHOD") != "GET":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"only GET /metrics is served here\n"]
            if expected is not None:
                given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
                if not hmac.compare_digest(given, expected):
                    start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                        ("WWW-Authenticate", "Bearer")])
                    return [b"a bearer token is required\n"]
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result

        return app

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises:
            MetricsListenerError: The address cannot be bound (in use, not this host's).
        """
        try:
            server = make_server(self.host, self.port, self._app(), ThreadingWSGIServer,
                                 handler_class=_QuietHandler)
        except OSError as err:
            raise MetricsListenerError(f"cannot listen for metrics on {self.host}:{self.port}: "
                                       f"{err.strerror}") from None
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` actually bound."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
