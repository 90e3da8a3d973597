"""The site gateway: the only door from the sites into the coordinator.

The SuperLink listens on 127.0.0.1 and its control API has no authentication, so sites
never reach it directly. The gateway listens on the fleet address, terminates TLS with a
certificate from the site CA, and:

* forwards ``/v1/fleet/*`` and ``/health`` to the SuperLink only for a client that presents
  a valid, unrevoked certificate issued by the site CA, and only when the Flower node key in
  the request (``flwr-public-key``, required, once) is the key registered for the site named
  in that certificate: a site can speak only for its own node;
* serves enrollment (``/fedward/ca``, ``/fedward/enroll``) without a client certificate:
  a site has none before it enrolls, and the one-time token is the credential;
* serves renewal (``/fedward/renew``) to a site with its current certificate;
* takes a site's drift reports (``POST /fedward/drift``, JSON, at most
  :data:`SMALL_BODY`) with its current certificate, the site named by the certificate
  (:mod:`coordinator.drift` checks and stores them; nothing is unpickled);
* refuses every other path (403), the control and runtime APIs above all.

It is a small HTTP/1.1 proxy (h11 for parsing, httpx for the upstream) running in the
coordinator process. Everything is decided on the request head, before any of the body is
read: a refused request's body is never read, enrollment and renewal bodies are capped at
:data:`SMALL_BODY` and fleet bodies are streamed to the SuperLink (and its answers back),
never held whole. Like a front server it bounds what a client can hold: a TLS handshake, a
read and a write each have a deadline (``idle_timeout_s``), request heads are limited to
h11's 16 KiB, fleet bodies to 512 MiB, and connections are counted per source address and
per site (:mod:`coordinator.gateway_limits`), with room kept for verified sites. Every
refusal is logged with its reason and the client's address and site (rate-limited).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from coordinator.db import session_scope
from coordinator.drift import AlarmRule, DriftReportError, store_report
from coordinator.enrollment import (
    EnrollmentError,
    redeem_token,
    renew_certificate,
    revoked_serials,
    superseded_serials,
)
from coordinator.gateway_limits import ConnectionLimits, LimitSettings
from coordinator.metrics import GATEWAY_CONNECTIONS, CountingRefusalLog, note_site_contact
from coordinator.models import Site, utcnow
from coordinator.pki import CAFiles, CSRError
from coordinator.presence import Presence
from coordinator.site_versions import note_versions
from fedward.flower.control import NodeKeyError, node_public_key_bytes

__all__ = ["SMALL_BODY", "GatewayConfig", "SiteGateway"]

log = logging.getLogger("fedward.coordinator.gateway")

# The exact shape of every path forwarded: Flower's fleet calls are /v1/fleet/<name>. Nothing
# that a client library or the SuperLink could normalise into another path (``..``, ``//``,
# percent-escapes, backslashes) matches, so the path checked is the path the SuperLink sees.
_FORWARDABLE = re.compile(r"^(?:/v1/fleet/[a-z0-9][a-z0-9-]{0,63}|/health)$")
_NODE_KEY = b"flwr-public-key"
# Flower's node authentication headers. The gateway checks the key and the SuperLink the
# signature; if either could see another copy than the one checked, a site's certificate
# could carry another node's signed requests. Each may appear once, and only the value
# checked is forwarded.
_FLOWER_AUTH = (_NODE_KEY, b"flwr-signature", b"flwr-timestamp")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
               b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host",
               b"content-length"}
# What a client says about forwarding is not the gateway's word: the SuperLink would log
# (and its server could trust) an address the site made up.
_CLIENT_FORWARDING = {b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
                      b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-prefix",
                      b"x-forwarded-server", b"x-real-ip", b"x-client-ip", b"true-client-ip",
                      b"via"}
MAX_FLEET_BODY = 512 * 1024 * 1024
SMALL_BODY = 16 * 1024   # enrollment, renewal, CA: a CSR and a token fit many times over
DRIFT_PATH = "/fedward/drift"
_LINGER_BYTES = 64 * 1024   # read and dropped after a refusal, so the client sees the answer
_CACHE_S = 2.0
_HANDSHAKE_S = 15.0   # a TLS handshake takes milliseconds; a slow link, a few seconds
_STALE_OK_S = 30.0   # a registry read that fails (a busy database) reuses what was read

Registrar = Callable[[str, str], str]
_Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, what it forwards to, and what a client may hold."""

    host: str
    port: int
    pki: CAFiles
    cert: Path
    key: Path
    superlink: str
    idle_timeout_s: float = 60.0    # nginx's client_header/body and send timeouts
    max_connections: int = 512      # nginx's default worker_connections
    max_per_address: int = 32       # anonymous connections (no verified certificate yet)
    max_per_site: int = 64
    reserved_for_sites: int | None = None   # None: a quarter of max_connections
    drift_rule: AlarmRule = field(default_factory=AlarmRule)   # a drift report's alarm

    @property
    def limits(self) -> LimitSettings:
        """The connection limits as :class:`LimitSettings`."""
        return LimitSettings(max_connections=self.max_connections,
                             max_per_address=self.max_per_address,
                             max_per_site=self.max_per_site,
                             reserved_for_sites=self.reserved_for_sites)


@dataclass
class _SiteCache:
    at: float = 0.0
    node_keys: dict[str, bytes] = field(default_factory=dict)   # site -> SuperLink key bytes
    revoked: frozenset[str] = frozenset()
    superseded: frozenset[str] = frozenset()   # retired by a renewal (also in ``revoked``)


@dataclass
class _Client:
    """Who is on the other end of one connection."""

    address: str
    site: str | None = None      # from a verified client certificate
    serial: str | None = None
    served: int = 0              # requests answered on this connection


class _RegistrationFailed(RuntimeError):
    """The SuperLink did not take a site's node key during enrollment."""


class _Refused(Exception):
    """A request the gateway answers with an error, and then closes the connection."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class _Drop(Exception):
    """Close the connection without an answer (the client retries on a new one)."""


def make_upstream(superlink: str, ca_cert: Path) -> httpx.AsyncClient:
    """The HTTP client that reaches the SuperLink's fleet API (built on the gateway's loop).

    ``superlink`` is ``unix:/path`` for the SuperLink's socket in the coordinator's data
    directory (TLS still checks its 127.0.0.1 certificate), or ``host:port``.
    """
    ca = ssl.create_default_context(cafile=str(ca_cert))
    if superlink.startswith("unix:"):
        return httpx.AsyncClient(
            base_url="https://127.0.0.1", timeout=120.0,
            transport=httpx.AsyncHTTPTransport(uds=superlink[5:], verify=ca))
    return httpx.AsyncClient(base_url=f"https://{superlink}", verify=ca, timeout=120.0)


class SiteGateway:
    """Runs the gateway on its own event loop thread."""

    def __init__(self, *, config: GatewayConfig, engine: Engine, registrar: Registrar,
                 presence: Presence | None = None) -> None:
        self.config = config
        self.presence = presence   # told of every verified site request (last contact)
        self.engine = engine
        self.registrar = registrar
        self._cache = _SiteCache()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._upstream: httpx.AsyncClient | None = None
        self._tls: ssl.SSLContext | None = None
        self._stopping = False
        self._limits = ConnectionLimits(config.limits)   # touched only on the event loop
        self.refusals = CountingRefusalLog(log)   # also counted for Prometheus

    # -- lifecycle --------------------------------------------------------------------

    def _server_ssl(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.config.cert), str(self.config.key))
        ctx.load_verify_locations(cafile=str(self.config.pki.ca_cert))
        # OPTIONAL: enrollment has no certificate yet; every fleet request requires one.
        # A certificate from another CA still fails the handshake.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def start(self, *, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="site-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the site gateway did not start")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._upstream = make_upstream(self.config.superlink, self.config.pki.ca_cert)
        self._tls = self._server_ssl()
        # Plain TCP first: a connection is counted (and refused, if its address holds too
        # many) before its TLS handshake costs anything; the handshake follows in _handle.
        self._server = loop.run_until_complete(asyncio.start_server(
            self._handle, self.config.host, self.config.port))
        if self.config.port == 0:
            sock = self._server.sockets[0]
            self.config = GatewayConfig(**{**self.config.__dict__,
                                           "port": int(sock.getsockname()[1])})
        self._ready.set()

        def _summarise() -> None:   # refusals left out of the log are counted within a minute
            self.refusals.flush()
            loop.call_later(self.refusals.window_s, _summarise)

        loop.call_later(self.refusals.window_s, _summarise)
        try:
            loop.run_forever()
        finally:
            # Connections still open end here, each closing its socket on the way out.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(self._upstream.aclose())
            loop.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        def _close() -> None:
            self._stopping = True
            if self._server is not None:
                self._server.close()
            loop.stop()

        loop.call_soon_threadsafe(_close)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.refusals.flush()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- identity -----------------------------------------------------------------------

    def _refresh(self) -> _SiteCache:
        cache = self._cache
        if time.monotonic() - cache.at < _CACHE_S:
            return cache
        keys: dict[str, bytes] = {}
        try:
            with session_scope(self.engine) as session:
                for site in session.exec(select(Site).where(Site.status == "registered")
                                         ).all():
                    if site.public_key:
                        try:
                            keys[site.name] = node_public_key_bytes(site.public_key)
                        except NodeKeyError:
                            continue
                revoked = revoked_serials(session)
                superseded = superseded_serials(session)
        except SQLAlchemyError as err:
            # A database busy with other writers must not drop every site's connection:
            # what was read moments ago still holds. An invalidated cache (a revocation
            # just happened) is never reused: the request is refused until it can be read.
            if cache.at and time.monotonic() - cache.at < _STALE_OK_S:
                log.warning("gateway: reading the site registry failed (%s); using the one "
                            "read %.0f s ago", type(err).__name__, time.monotonic() - cache.at)
                return cache
            raise
        self._cache = _SiteCache(at=time.monotonic(), node_keys=keys, revoked=revoked,
                                 superseded=superseded)
        return self._cache

    def invalidate(self) -> None:
        """Forget cached identities (after a revocation or a new registration)."""
        self._cache = _SiteCache()

    @staticmethod
    def _peer(writer: asyncio.StreamWriter) -> tuple[str, str] | None:
        """(site name, serial hex) of a verified client certificate, or None."""
        ssl_obj = writer.get_extra_info("ssl_object")
        if ssl_obj is None:
            return None
        cert = ssl_obj.getpeercert()
        if not cert:
            return None
        subject = dict(x[0] for x in cert.get("subject", ()))
        serial = str(cert.get("serialNumber", "")).lower().lstrip("0") or "0"
        cn = subject.get("commonName")
        return (str(cn), serial) if cn else None

    # -- connections --------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        client = _Client(address=str(peername[0]) if peername else "?")
        GATEWAY_CONNECTIONS.inc()
        slot = self._limits.admit(client.address)
        if isinstance(slot, str):
            self.refusals.refused(address=client.address, site=None, kind="connection-limit",
                                  reason=slot)
            writer.transport.abort()
            return
        try:
            assert self._tls is not None
            try:
                await writer.start_tls(self._tls, ssl_handshake_timeout=min(
                    self.config.idle_timeout_s, _HANDSHAKE_S))
            except (ssl.SSLError, OSError, TimeoutError) as err:
                self.refusals.refused(address=client.address, site=None, kind="tls-handshake",
                                      reason=f"TLS handshake failed: {_reason(err)}")
                return
            peer = self._peer(writer)
            if peer is None:
                refusal = self._limits.anonymous_ok(slot)
            else:
                refusal = self._limits.verified(slot, peer[0])
                if refusal is None:
                    client.site, client.serial = peer
            if refusal is not None:
                self.refusals.refused(address=client.address, site=None if peer is None
                                      else peer[0], kind="connection-limit", reason=refusal)
                return
            await self._serve(reader, writer, client)
        except (h11.RemoteProtocolError, ConnectionError, asyncio.IncompleteReadError,
                ssl.SSLError) as err:
            log.debug("gateway connection from %s closed: %s", client.address, err)
        except TimeoutError:
            log.debug("gateway connection from %s idle past %.0f s: closed", client.address,
                      self.config.idle_timeout_s)
        finally:
            self._limits.release(slot)
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close gracefully (TLS close_notify) if the client lets us within a few seconds;
        else, or when the gateway stops, drop the socket."""
        if self._stopping:
            writer.transport.abort()
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5.0)
        except (TimeoutError, OSError, ssl.SSLError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     client: _Client) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            try:
                event = await self._next_event(conn, reader)
            except h11.RemoteProtocolError as err:
                await self._bad_request(conn, writer, client, err)
                return
            if not isinstance(event, h11.Request):
                return   # closed between requests
            try:
                keep = await self._respond(conn, reader, writer, event, client)
            except _Refused as refused:
                self.refusals.refused(address=client.address, site=client.site,
                                      kind=refused.kind, reason=refused.detail)
                await self._send(conn, writer, refused.status,
                                 [(b"content-type", b"application/json")],
                                 json.dumps({"detail": refused.detail}).encode(), close=True)
                if _body_pending(conn):
                    await self._linger(reader)
                return
            except _Drop:
                return
            client.served += 1
            note_site_contact(client.site)   # presence, for metrics (coordinator.metrics)
            if not keep or conn.our_state is h11.MUST_CLOSE \
                    or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _bad_request(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                           client: _Client, err: h11.RemoteProtocolError) -> None:
        self.refusals.refused(address=client.address, site=client.site, kind="bad-request",
                              reason=f"malformed HTTP request: {err}")
        try:
            await self._send(conn, writer, err.error_status_hint,
                             [(b"content-type", b"application/json")],
                             json.dumps({"detail": f"malformed HTTP request: {err}"}).encode(),
                             close=True)
        except h11.LocalProtocolError:
            return   # too late for an answer (a response was under way)

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader
                          ) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(reader.read(65536), self.config.idle_timeout_s)
            conn.receive_data(data)

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """Read (and drop) a little of an unread body, so the client gets the answer
        instead of a reset; never more than :data:`_LINGER_BYTES` or a second."""
        left = _LINGER_BYTES
        deadline = time.monotonic() + 1.0
        try:
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                data = await asyncio.wait_for(reader.read(min(left, 16384)), wait)
                if not data:
                    return
                left -= len(data)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            return

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                    headers: _Headers, content: bytes, *, close: bool = False) -> None:
        headers = [*headers, (b"content-length", str(len(content)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=content)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await asyncio.wait_for(writer.drain(), self.config.idle_timeout_s)

    async def _small_body(self, conn: h11.Connection, reader: asyncio.StreamReader,
                          request: h11.Request) -> bytes:
        """The whole body of an enrollment, renewal or CA request, at most SMALL_BODY."""
        too_large = _Refused(413, "body-too-large", f"request body too large: at most "
                                                    f"{SMALL_BODY} bytes on this path")
        for name, value in request.headers:
            if name == b"content-length" and int(value) > SMALL_BODY:
                raise too_large   # refused on the head: not a byte of it is read
        body = bytearray()
        while True:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.Data):
                body.extend(event.data)
                if len(body) > SMALL_BODY:
                    raise too_large
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise ConnectionError("the client closed the connection mid-request")

    # -- routing ------------------------------------------------------------------------

    async def _respond(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, request: h11.Request,
                       client: _Client) -> bool:
        """Answer one request; False when the connection must close after it."""
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode()
        # A client without a certificate gets one answer per connection: nothing it may
        # do needs a second, and it should not hold a connection it does not need.
        keep = client.site is not None
        json_type = [(b"content-type", b"application/json")]
        if path == "/fedward/ca" and method == "GET":
            await self._small_body(conn, reader, request)
            await self._send(conn, writer, 200, [(b"content-type", b"application/x-pem-file")],
                             self.config.pki.ca_cert.read_bytes(), close=not keep)
            return keep
        if path == "/fedward/enroll" and method == "POST":
            body = await self._small_body(conn, reader, request)
            status, payload = await asyncio.to_thread(self._enroll, body, client)
            await self._send(conn, writer, status, json_type, json.dumps(payload).encode(),
                             close=not keep)
            return keep
        if path == "/fedward/renew" and method == "POST":
            if client.site is None:
                raise _Refused(403, "no-certificate", "renewal needs the site's current "
                                                      "certificate")
            await self._site_identity(client)   # a revoked or retired one renews nothing
            body = await self._small_body(conn, reader, request)
            status, payload = await asyncio.to_thread(self._renew, body, client)
            await self._send(conn, writer, status, json_type, json.dumps(payload).encode(),
                             close=status != 200)
            return status == 200
        if path == DRIFT_PATH and method == "POST":
            if client.site is None:
                raise _Refused(403, "no-certificate", "drift reports need the site's "
                                                      "current certificate")
            await self._site_identity(client)   # revoked, retired, unregistered: refused
            media = next((v for k, v in request.headers if k == b"content-type"), b"")
            if media.split(b";", 1)[0].strip().lower() != b"application/json":
                raise _Refused(415, "drift-content-type", "a drift report is JSON "
                                                          "(content-type: application/json)")
            body = await self._small_body(conn, reader, request)
            status, payload = await asyncio.to_thread(self._drift, body, client)
            await self._send(conn, writer, status, json_type, json.dumps(payload).encode(),
                             close=status != 200)
            return status == 200
        if not _FORWARDABLE.fullmatch(path):
            raise _Refused(403, "path", f"{method} {path[:200]}: forbidden: the site gateway "
                                        "forwards only the Flower fleet API")
        if client.site is None:
            raise _Refused(403, "no-certificate", f"{method} {path}: forbidden: a client "
                           "certificate from the site CA is required (enroll the site first)")
        cache = await self._site_identity(client)
        headers = self._checked_headers(request, path, client, cache)
        if self.presence is not None:
            self.presence.seen(client.site)
        await self._forward(conn, reader, writer, request, method, path, headers)
        return True

    async def _site_identity(self, client: _Client) -> _SiteCache:
        """The registry, after checking the client's certificate and site against it."""
        site, serial = client.site, client.serial
        assert site is not None and serial is not None
        try:
            cache = await asyncio.to_thread(self._refresh)
        except SQLAlchemyError as err:
            raise _Refused(503, "registry-unavailable", "the coordinator cannot read its "
                           f"site registry right now ({type(err).__name__}); retry") from err
        if serial in cache.superseded:
            if client.served:
                # Renewed while this connection was open: the site has the new certificate
                # on disk. No answer, so its client retries, on a new connection with it.
                self.refusals.refused(address=client.address, site=site, kind="superseded",
                                      reason=f"certificate {serial} was replaced by a "
                                             "renewal: connection closed")
                raise _Drop
            raise _Refused(403, "superseded", f"forbidden: this certificate of site {site!r} "
                           "was replaced by a renewal; use the renewed certificate")
        if serial in cache.revoked:
            raise _Refused(403, "revoked", f"forbidden: the certificate of site {site!r} is "
                                           "revoked")
        if site not in cache.node_keys:
            raise _Refused(403, "unregistered", f"forbidden: site {site!r} is not registered")
        return cache

    def _checked_headers(self, request: h11.Request, path: str, client: _Client,
                         cache: _SiteCache) -> _Headers:
        """The headers to forward: Flower's authentication headers once each, as checked;
        no hop-by-hop or client-made forwarding headers."""
        site = client.site
        assert site is not None
        seen: dict[bytes, list[bytes]] = {name: [] for name in _FLOWER_AUTH}
        forward: _Headers = []
        for name, value in request.headers:
            canonical = name.lower().replace(b"_", b"-")
            if canonical in seen:
                seen[canonical].append(value)
            elif canonical not in _HOP_BY_HOP and canonical not in _CLIENT_FORWARDING:
                forward.append((name, value))
        repeated = [n.decode() for n, values in seen.items() if len(values) > 1]
        if repeated:
            raise _Refused(400, "repeated-header", f"{path}: refused: the request carries "
                           f"{', '.join(repeated)} more than once; each Flower authentication "
                           "header may appear once")
        if path.startswith("/v1/fleet/"):
            # Flower signs every fleet request with the node key and sends that key along;
            # a request without one is refused here rather than left to the SuperLink.
            if not seen[_NODE_KEY]:
                raise _Refused(403, "no-node-key", f"{path}: forbidden: fleet requests must "
                               "carry the site's Flower node key (flwr-public-key)")
            try:
                key = base64.b64decode(seen[_NODE_KEY][0], validate=True)
            except ValueError:
                key = b""
            if key != cache.node_keys[site]:
                raise _Refused(403, "foreign-node-key", f"{path}: forbidden: the Flower node "
                               f"key does not belong to site {site!r}")
        return forward + [(name, values[0]) for name, values in seen.items() if values]

    async def _forward(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, request: h11.Request, method: str,
                       path: str, headers: _Headers) -> None:
        """Stream the request body to the SuperLink and its answer back, chunk by chunk."""
        assert self._upstream is not None
        length = next((int(v) for k, v in request.headers if k == b"content-length"), None)
        if length is not None and length > MAX_FLEET_BODY:
            raise _Refused(413, "body-too-large", f"request body too large: at most "
                                                  f"{MAX_FLEET_BODY} bytes")
        if length is not None:
            headers = [*headers, (b"content-length", str(length).encode())]

        async def body() -> AsyncIterator[bytes]:
            total = 0
            while True:
                event = await self._next_event(conn, reader)
                if isinstance(event, h11.Data):
                    total += len(event.data)
                    if total > MAX_FLEET_BODY:
                        raise ConnectionError("fleet request body over the limit")
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise ConnectionError("the client closed the connection mid-request")

        upstream = self._upstream.build_request(method, path, headers=headers, content=body())
        try:
            resp = await self._upstream.send(upstream, stream=True)
        except httpx.HTTPError as err:
            if conn.their_state is not h11.DONE:
                raise ConnectionError("request body not delivered upstream") from err
            await self._send(conn, writer, 502, [(b"content-type", b"application/json")],
                             json.dumps({"detail": "the coordinator's SuperLink is not "
                                         f"reachable ({type(err).__name__}); retry later"}
                                        ).encode())
            return
        try:
            out = [(k.encode(), v.encode()) for k, v in resp.headers.items()
                   if k.lower().encode() not in _HOP_BY_HOP or k.lower() == "content-length"]
            writer.write(conn.send(h11.Response(status_code=resp.status_code, headers=out))
                         or b"")
            async for chunk in resp.aiter_raw():
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await asyncio.wait_for(writer.drain(), self.config.idle_timeout_s)
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await asyncio.wait_for(writer.drain(), self.config.idle_timeout_s)
        except httpx.HTTPError as err:
            raise ConnectionError(f"the SuperLink's answer broke off: {err}") from err
        finally:
            await resp.aclose()

    # -- enrollment ---------------------------------------------------------------------

    def _refuse_in_thread(self, client: _Client, kind: str, detail: str) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: self.refusals.refused(
                address=client.address, site=client.site, kind=kind, reason=detail))

    def _enroll(self, body: bytes, client: _Client | None = None
                ) -> tuple[int, dict[str, Any]]:
        client = client or _Client(address="?")
        try:
            req = json.loads(body)
            token, csr, node_key = str(req["token"]), str(req["csr_pem"]), str(
                req["node_public_key"])
        except (ValueError, KeyError, TypeError):
            self._refuse_in_thread(client, "enroll", "enrollment: malformed request")
            return 400, {"detail": "expected JSON with token, csr_pem and node_public_key"}
        try:
            node_public_key_bytes(node_key)
            with session_scope(self.engine) as session:
                site, issued = redeem_token(session, token=token, csr_pem=csr.encode(),
                                            pki=self.config.pki)
                if site.public_key not in (None, node_key.strip()):
                    raise EnrollmentError(f"site {site.name!r} already has another node key")
                if site.public_key == node_key.strip() and site.flower_node_id:
                    # Re-enrolling with the node key it has (a new TLS certificate, e.g.
                    # after the coordinator rotated its CA): the SuperLink knows the key
                    # already and would refuse to register it twice.
                    node_id = site.flower_node_id
                else:
                    try:
                        node_id = self.registrar(node_key.strip(), site.name)
                    except Exception as err:  # Flower's control API; the token stays unused
                        raise _RegistrationFailed(type(err).__name__) from err
                site.public_key = node_key.strip()
                site.flower_node_id = str(node_id)
                site.status = "registered"
                site.registered_at = utcnow()
                session.add(site)
                note_versions(session, site, req.get("versions"), via="enrollment")
                name = site.name
        except (EnrollmentError, CSRError, NodeKeyError) as err:
            self._refuse_in_thread(client, "enroll", f"enrollment refused: {err}")
            return 403, {"detail": str(err)}
        except _RegistrationFailed as err:
            log.error("enrollment: registering the node key with the SuperLink failed (%s)",
                      err.__cause__)
            return 503, {"detail": f"the coordinator could not register this site's node key "
                                   f"({err}); the token was not used: try again in a minute, "
                                   "and if it persists ask the coordinator team to check "
                                   "their superlink.log"}
        self.invalidate()
        log.info("site %s enrolled from %s (certificate %s)", name, client.address,
                 issued.serial)
        return 200, {"site": name, "certificate_pem": issued.pem.decode(),
                     "ca_pem": self.config.pki.ca_cert.read_text(),
                     "not_after": issued.not_after.isoformat()}

    def _renew(self, body: bytes, client: _Client) -> tuple[int, dict[str, Any]]:
        assert client.site is not None and client.serial is not None
        try:
            req = json.loads(body)
            csr = str(req["csr_pem"])
        except (ValueError, KeyError, TypeError):
            return 400, {"detail": "expected JSON with csr_pem"}
        try:
            with session_scope(self.engine) as session:
                issued = renew_certificate(session, site_name=client.site,
                                           serial=client.serial, csr_pem=csr.encode(),
                                           pki=self.config.pki)
                note_versions(session, client.site, req.get("versions"), via="renewal")
        except (EnrollmentError, CSRError) as err:
            self._refuse_in_thread(client, "renew", f"renewal refused: {err}")
            return 403, {"detail": str(err)}
        # The old certificate is retired: forget it at once, not in _CACHE_S.
        self.invalidate()
        log.info("site %s renewed its certificate (%s replaces %s)", client.site,
                 issued.serial, client.serial)
        return 200, {"certificate_pem": issued.pem.decode(),
                     "not_after": issued.not_after.isoformat()}

    def _drift(self, body: bytes, client: _Client) -> tuple[int, dict[str, Any]]:
        assert client.site is not None
        try:
            doc = _drift_answer(body)
        except (ValueError, UnicodeDecodeError, RecursionError):   # nested past the limit
            self._refuse_in_thread(client, "drift", "drift report: not JSON")
            return 400, {"detail": "a drift report is one JSON object"}
        try:
            row, new = store_report(self.engine, site=client.site, doc=doc,
                                    rule=self.config.drift_rule)
        except DriftReportError as err:
            self._refuse_in_thread(client, "drift", str(err))
            return err.status, {"detail": str(err)}
        except SQLAlchemyError as err:
            return 503, {"detail": f"the coordinator cannot store the report right now "
                                   f"({type(err).__name__}); the site keeps it and retries"}
        if new:
            log.info("site %s reported drift check %s of release %s: %s%s", client.site,
                     row.report_id, row.release_id, row.status,
                     " (alarm)" if row.alarm else "")
        return 200, {"stored": row.report_id, "alarm": row.alarm}


def _drift_answer(body: bytes) -> object:
    """The JSON of a drift report body (json.loads only: never pickle, never eval)."""
    return json.loads(body.decode("utf-8"))


def _body_pending(conn: h11.Connection) -> bool:
    """Whether the client may still be sending a body (drops what h11 already holds)."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return True
            if not isinstance(event, h11.Data):
                return False
    except h11.RemoteProtocolError:
        return False


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
