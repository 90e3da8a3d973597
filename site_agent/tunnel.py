"""The site's tunnel to the coordinator's gateway: mutual TLS on behalf of the SuperNode.

Flower's SuperNode can verify the server it talks to but cannot present a client
certificate, and the coordinator's gateway requires one. The tunnel listens on a Unix socket
(mode 0600, in the site's 0700 ``run/`` directory: no TCP port, so no other local account
can borrow the site's certificate through it, to renew it or to speak as the site), with a
server certificate for 127.0.0.1 from a CA that exists only at this site (made at
enrollment) and that the local SuperNode trusts; the SuperNode, in its own network
namespace, reaches the socket through a relay (:mod:`fedward.sandbox.netns`). Each connection the
tunnel accepts is relayed byte for byte over a new TLS connection to the gateway that
presents the site's certificate and verifies the gateway against the coordinator's CA.
Nothing is parsed or changed in between.

The site's certificate is read again whenever its file changes, so a certificate renewed
with ``fedward-site renew`` is used from the next connection on, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SiteTunnel", "TunnelConfig"]

log = logging.getLogger("fedward.site.tunnel")


@dataclass(frozen=True)
class TunnelConfig:
    """The tunnel's two TLS identities and where the gateway is."""

    gateway: str            # host:port of the coordinator's fleet gateway
    coordinator_ca: Path    # verifies the gateway
    client_cert: Path       # the site's certificate (issued at enrollment)
    client_key: Path
    local_cert: Path        # the tunnel's own 127.0.0.1 certificate (site-local CA)
    local_key: Path
    socket_path: Path       # where it listens: a Unix socket, in a directory of mode 0700


class SiteTunnel:
    """Runs the tunnel on its own event-loop thread; ``address`` is where it listens."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._open: set[asyncio.StreamWriter] = set()   # both ends of every relayed connection
        self._client_stamp: tuple[int, ...] = ()

    @property
    def address(self) -> str:
        return f"unix:{self.config.socket_path}"

    def _client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.config.coordinator_ca))
        ctx.load_cert_chain(str(self.config.client_cert), str(self.config.client_key))
        return ctx

    def _stamp(self) -> tuple[int, ...]:
        cert, key = self.config.client_cert.stat(), self.config.client_key.stat()
        return cert.st_mtime_ns, cert.st_size, key.st_mtime_ns, key.st_size

    def client_context(self) -> ssl.SSLContext:
        """The context for the next connection to the gateway: the site certificate as it
        is on disk now (a renewed one from the next connection on). A pair that cannot be
        loaded (a renewal half-written) leaves the last good context in use."""
        try:
            stamp = self._stamp()
            if self._client_ctx is None or stamp != self._client_stamp:
                ctx = self._client_ssl()
                if self._client_ctx is not None:
                    log.info("the site certificate changed on disk: using the new one")
                self._client_ctx, self._client_stamp = ctx, stamp
        except (OSError, ssl.SSLError) as err:
            if self._client_ctx is None:
                raise
            log.warning("cannot load the site certificate again (%s); still using the "
                        "previous one", err)
        return self._client_ctx

    def _server_ssl(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.config.local_cert), str(self.config.local_key))
        return ctx

    def start(self, *, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="site-tunnel", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the site tunnel did not start")
        if self._error is not None:
            raise RuntimeError(f"the site tunnel could not start: {self._error}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        path = self.config.socket_path
        try:
            self.client_context()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            path.unlink(missing_ok=True)   # the site lock says no other agent owns it
            old_umask = os.umask(0o177)    # born 0600: no moment where others may connect
            try:
                server = loop.run_until_complete(asyncio.start_unix_server(
                    lambda r, w: self._relay(r, w, self.client_context()), str(path),
                    ssl=self._server_ssl()))
            finally:
                os.umask(old_umask)
        except (OSError, ssl.SSLError) as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            # Close what is still open (relays in flight) before the loop goes away.
            server.close()
            for writer in list(self._open):
                writer.close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(asyncio.sleep(0.05))   # transports finish closing
            loop.close()
            path.unlink(missing_ok=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     client_ctx: ssl.SSLContext) -> None:
        host, _, port = self.config.gateway.rpartition(":")
        self._open.add(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), ssl=client_ctx,
                                        server_hostname=host), timeout=15)
        except (OSError, ssl.SSLError, TimeoutError) as err:
            log.warning("cannot reach the coordinator gateway %s: %s", self.config.gateway, err)
            self._open.discard(writer)
            writer.close()
            return
        self._open.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._open.discard(writer)
            self._open.discard(up_writer)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
