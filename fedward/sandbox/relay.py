"""Byte relays between Unix sockets and TCP ports, for Flower processes kept off the host.

Flower 1.42 serves and dials everything over TCP. The appliance runs its Flower processes
in a private network namespace (see :mod:`fedward.sandbox.netns`), where 127.0.0.1 is theirs alone,
and joins that namespace to the rest of the appliance through Unix sockets in directories
only the appliance's user can enter: a relay accepts on one side and copies bytes, both
ways, to a new connection on the other. Nothing is parsed or changed in between, so TLS
stays end to end.

Endpoints are written ``unix:/absolute/path`` or ``tcp:HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_UNIX_PATH",
    "Endpoint",
    "RelayError",
    "RelayThread",
    "open_relay",
    "over_unix_socket",
    "unix_connect",
    "unix_path",
    "unix_transport",
]

log = logging.getLogger("fedward.relay")

# sun_path is 108 bytes on Linux, with a terminating NUL.
MAX_UNIX_PATH = 107
_CHUNK = 256 * 1024


class RelayError(ValueError):
    """An endpoint cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Endpoint:
    """One side of a relay: a Unix socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, spec: str) -> Endpoint:
        """``unix:/abs/path`` or ``tcp:HOST:PORT``."""
        if spec.startswith("unix:"):
            path = Path(spec[5:])
            if not path.is_absolute():
                raise RelayError(f"{spec!r}: a Unix socket path must be absolute")
            if len(os.fsencode(path)) > MAX_UNIX_PATH:
                raise RelayError(
                    f"the Unix socket path {path} is {len(os.fsencode(path))} bytes long; "
                    f"Linux allows {MAX_UNIX_PATH}: use a shorter data directory")
            return cls(path=path)
        if spec.startswith("tcp:"):
            host, _, port = spec[4:].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise RelayError(f"{spec!r}: expected tcp:HOST:PORT")
            return cls(host=host.strip("[]"), port=int(port))
        raise RelayError(f"{spec!r}: an endpoint is unix:/PATH or tcp:HOST:PORT")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"tcp:{self.host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.path is not None:
            return await asyncio.open_unix_connection(str(self.path), limit=_CHUNK)
        return await asyncio.open_connection(self.host, self.port, limit=_CHUNK)


def unix_path(address: str) -> Path | None:
    """The socket path of a ``unix:/path`` address, None for ``host:port``."""
    return Path(address[5:]) if address.startswith("unix:") else None


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *,
                reset_if_silent: bool = False) -> None:
    """Copy ``src`` to ``dst`` until EOF; pass a half-close on.

    With ``reset_if_silent``, a far end that ends (or fails) before sending a single byte
    resets ``dst`` instead: behind a relay, "nothing is listening there" must still read as
    a refused connection, not as a server that hung up mid-handshake.
    """
    sent = 0
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            sent += len(data)
            await dst.drain()
    except (ConnectionError, OSError):
        if reset_if_silent and sent == 0:
            _reset(dst)
        else:
            dst.close()
        return
    if reset_if_silent and sent == 0:
        _reset(dst)
    elif dst.can_write_eof():
        dst.write_eof()   # the other direction may still talk


async def _bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  target: Endpoint) -> None:
    try:
        up_reader, up_writer = await asyncio.wait_for(target.connect(), timeout=10)
    except (OSError, TimeoutError) as err:
        log.debug("relay: cannot reach %s: %s", target, err)
        _reset(writer)
        return
    try:
        await asyncio.gather(_pump(reader, up_writer),
                             _pump(up_reader, writer, reset_if_silent=True))
    finally:
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a reset, not an orderly end.

    The far end is down: to the client this must look like a connection refused, which
    Flower's clients retry. An orderly close in the middle of its TLS handshake reads as an
    "SSL" error instead, on which Flower's retry policy gives up for good.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _remove_stale_socket(path: Path) -> None:
    """Delete a socket left by a process that is gone; refuse to delete anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RelayError(f"{path} exists and is not a socket; move it away")
    path.unlink()


async def open_relay(listen: Endpoint, target: Endpoint) -> asyncio.Server:
    """Start accepting on ``listen``; each connection is bridged to a new one to ``target``.

    A Unix socket is created mode 0600 (whatever the umask), in a directory that must
    already exist; a stale socket file there is replaced.
    """
    def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Any:
        return _bridge(r, w, target)

    if listen.path is not None:
        _remove_stale_socket(listen.path)
        old = os.umask(0o177)   # the socket file is born 0600: no window where others connect
        try:
            return await asyncio.start_unix_server(handle, str(listen.path), limit=_CHUNK)
        finally:
            os.umask(old)
    return await asyncio.start_server(handle, listen.host, listen.port, limit=_CHUNK,
                                      reuse_address=True)


class RelayThread:
    """Relays served on an event loop of their own, in a daemon thread."""

    def __init__(self, pairs: list[tuple[Endpoint, Endpoint]], *, name: str = "relay") -> None:
        self.pairs = pairs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, *, timeout: float = 10.0) -> None:
        """Bind every listener; raises :class:`OSError` or :class:`RelayError` if one fails."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RelayError("the relays did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            for listen, target in self.pairs:
                self._servers.append(loop.run_until_complete(open_relay(listen, target)))
        except (OSError, RelayError) as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for server in self._servers:
                server.close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
            for listen, _ in self.pairs:
                if listen.path is not None:
                    with contextlib.suppress(OSError, RelayError):
                        _remove_stale_socket(listen.path)

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def unix_transport(path: Path, *, verify: Any = False) -> Any:
    """An ``httpx.HTTPTransport`` that connects to the Unix socket ``path``.

    httpcore 1.0 leaves the socket of a failed Unix connect to the garbage collector (a
    ResourceWarning each time the SuperLink is restarting); this transport's connects close
    it. TLS, when ``verify`` asks for it, still checks the host named in the request URL.
    """
    import httpcore
    import httpx
    from httpcore._backends.sync import SyncStream

    class ClosingUnixBackend(httpcore.SyncBackend):
        def connect_unix_socket(self, path: str, timeout: float | None = None,
                                socket_options: Any = None) -> httpcore.NetworkStream:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(path)
            except TimeoutError as err:
                sock.close()
                raise httpcore.ConnectTimeout(str(err)) from None
            except OSError as err:
                sock.close()
                raise httpcore.ConnectError(str(err)) from None
            return SyncStream(sock)

    transport = httpx.HTTPTransport(uds=str(path), verify=verify)
    transport._pool._network_backend = ClosingUnixBackend()  # pinned httpcore 1.0
    return transport


def over_unix_socket(client: Any, path: Path, *, verify: Any = False) -> Any:
    """Point a Flower protobuf-over-HTTP client (``ControlHttpClient``,
    ``RuntimeHttpClient``) at a Unix socket instead of a TCP port; returns the client.

    Flower 1.42 builds its ``httpx.Client`` from a URL only; the URL still names the host
    checked in the server's TLS certificate, and the connection goes to ``path``. Relies on
    flwr's pinned version (``ProtobufClient._client``); tests cover every caller.
    """
    import httpx  # not at module level: the sandbox needs only the standard library

    old: httpx.Client = client._client
    client._client = httpx.Client(transport=unix_transport(path, verify=verify),
                                  timeout=old.timeout, follow_redirects=old.follow_redirects)
    old.close()
    return client


def unix_connect(path: Path, *, timeout: float = 3.0) -> socket.socket:
    """A connected Unix stream socket (the caller closes it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock
