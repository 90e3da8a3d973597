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
  :data:`~coordinator.gateway_http.SMALL_BODY`) with its current certificate, the site
  named by the certificate (:mod:`coordinator.drift` checks and stores them; nothing is
  unpickled);
* takes a site agent's versions when it starts (``POST /fedward/versions``, JSON, small)
  with its current certificate (:mod:`coordinator.site_versions` checks their format);
* refuses every other path (403), the control and runtime APIs above all.

It is a small HTTP/1.1 proxy (h11 for parsing, httpx for the upstream) running in the
coordinator process. Everything is decided on the request head, before any of the body is
read: a refused request's body is never read, enrollment and renewal bodies are capped at
:data:`~coordinator.gateway_http.SMALL_BODY` and fleet bodies are streamed to the SuperLink
(and its answers back), never held whole. Like a front server it bounds what a client can
hold: a TLS handshake, a read and a write each have a deadline (``idle_timeout_s``),
request heads are limited to h11's 16 KiB, fleet bodies to 512 MiB, and connections are
counted per source address and per site (:mod:`coordinator.gateway_limits`), with room kept
for verified sites. Every refusal is logged with its reason and the client's address and site
(rate-limited).

This module holds the listener, the connections and the routing; one HTTP/1.1 exchange is
:mod:`coordinator.gateway_http`, the forwarding rules and the stream to the SuperLink
:mod:`coordinator.gateway_fleet`, and enrollment, renewal and drift reports
:mod:`coordinator.gateway_requests`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from coordinator.api_errors import exception_reason
from coordinator.db import session_scope
from coordinator.drift import AlarmRule
from coordinator.enrollment import revoked_serials, superseded_serials
from coordinator.gateway_fleet import checked_headers, forward, forwardable, make_upstream
from coordinator.gateway_http import (
    Client,
    Drop,
    Headers,
    Refused,
    body_pending,
    linger,
    next_event,
    send,
    small_body,
)
from coordinator.gateway_limits import ConnectionLimits, LimitSettings
from coordinator.gateway_requests import Registrar, SiteRequests
from coordinator.metrics import GATEWAY_CONNECTIONS, CountingRefusalLog, note_site_contact
from coordinator.models import Site
from coordinator.presence import Presence
from fedward.certs import CAFiles
from fedward.flower.control import NodeKeyError, node_public_key_bytes

__all__ = ["DRIFT_PATH", "VERSIONS_PATH", "GatewayConfig", "SiteGateway"]

log = logging.getLogger("fedward.coordinator.gateway")

DRIFT_PATH = "/fedward/drift"
VERSIONS_PATH = "/fedward/versions"
_CACHE_S = 2.0
_HANDSHAKE_S = 15.0   # a TLS handshake takes milliseconds; a slow link, a few seconds
_STALE_OK_S = 30.0   # a registry read that fails (a busy database) reuses what was read


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
    # retired by a renewal or a new enrollment (also in ``revoked``)
    superseded: frozenset[str] = frozenset()


class SiteGateway:
    """Runs the gateway on its own event loop thread."""

    def __init__(self, *, config: GatewayConfig, engine: Engine, registrar: Registrar,
                 presence: Presence | None = None) -> None:
        self.config = config
        self.presence = presence   # told of every verified site request (last contact)
        self.engine = engine
        self.registrar = registrar
        self._cache = _SiteCache()
        self.requests = SiteRequests(engine=engine, registrar=registrar, pki=config.pki,
                                     drift_rule=config.drift_rule, invalidate=self.invalidate,
                                     refuse=self._refuse_in_thread)
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
        client = Client(address=str(peername[0]) if peername else "?")
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
                                      reason=f"TLS handshake failed: {exception_reason(err)}")
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
                     client: Client) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            try:
                event = await next_event(conn, reader, self.config.idle_timeout_s)
            except h11.RemoteProtocolError as err:
                await self._bad_request(conn, writer, client, err)
                return
            if not isinstance(event, h11.Request):
                return   # closed between requests
            try:
                keep = await self._respond(conn, reader, writer, event, client)
            except Refused as refused:
                self.refusals.refused(address=client.address, site=client.site,
                                      kind=refused.kind, reason=refused.detail)
                await self._send(conn, writer, refused.status,
                                 [(b"content-type", b"application/json")],
                                 json.dumps({"detail": refused.detail}).encode(), close=True)
                if body_pending(conn):
                    await linger(reader)
                return
            except Drop:
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
                           client: Client, err: h11.RemoteProtocolError) -> None:
        self.refusals.refused(address=client.address, site=client.site, kind="bad-request",
                              reason=f"malformed HTTP request: {err}")
        try:
            await self._send(conn, writer, err.error_status_hint,
                             [(b"content-type", b"application/json")],
                             json.dumps({"detail": f"malformed HTTP request: {err}"}).encode(),
                             close=True)
        except h11.LocalProtocolError:
            return   # too late for an answer (a response was under way)


    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                    headers: Headers, content: bytes, *, close: bool = False) -> None:
        await send(conn, writer, status, headers, content, timeout=self.config.idle_timeout_s,
                   close=close)

    # -- routing ------------------------------------------------------------------------

    async def _respond(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, request: h11.Request,
                       client: Client) -> bool:
        """Answer one request; False when the connection must close after it."""
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode()
        # A client without a certificate gets one answer per connection: nothing it may
        # do needs a second, and it should not hold a connection it does not need.
        keep = client.site is not None
        json_type = [(b"content-type", b"application/json")]
        if path == "/fedward/ca" and method == "GET":
            await small_body(conn, reader, request, self.config.idle_timeout_s)
            await self._send(conn, writer, 200, [(b"content-type", b"application/x-pem-file")],
                             self.config.pki.ca_cert.read_bytes(), close=not keep)
            return keep
        if path == "/fedward/enroll" and method == "POST":
            body = await small_body(conn, reader, request, self.config.idle_timeout_s)
            status, payload = await asyncio.to_thread(self.requests.enroll, body, client)
            await self._send(conn, writer, status, json_type, json.dumps(payload).encode(),
                             close=not keep)
            return keep
        if path == "/fedward/renew" and method == "POST":
            if client.site is None:
                raise Refused(403, "no-certificate", "renewal needs the site's current "
                                                      "certificate")
            await self._site_identity(client)   # a revoked or retired one renews nothing
            body = await small_body(conn, reader, request, self.config.idle_timeout_s)
            status, payload = await asyncio.to_thread(self.requests.renew, body, client)
            await self._send(conn, writer, status, json_type, json.dumps(payload).encode(),
                             close=status != 200)
            return status == 200
        if path in (DRIFT_PATH, VERSIONS_PATH) and method == "POST":
            kind = "drift" if path == DRIFT_PATH else "versions"
            what = "drift report" if path == DRIFT_PATH else "version report"
            if client.site is None:
                raise Refused(403, "no-certificate", f"{what}s need the site's current "
                                                      "certificate")
            await self._site_identity(client)   # revoked, retired, unregistered: refused
            media = next((v for k, v in request.headers if k == b"content-type"), b"")
            if media.split(b";", 1)[0].strip().lower() != b"application/json":
                raise Refused(415, f"{kind}-content-type",
                              f"a {what} is JSON (content-type: application/json)")
            body = await small_body(conn, reader, request, self.config.idle_timeout_s)
            handler = self.requests.drift if path == DRIFT_PATH else self.requests.versions
            status, payload = await asyncio.to_thread(handler, body, client)
            await self._send(conn, writer, status, json_type, json.dumps(payload).encode(),
                             close=status != 200)
            return status == 200
        if not forwardable(path):
            raise Refused(403, "path", f"{method} {path[:200]}: forbidden: the site gateway "
                                        "forwards only the Flower fleet API")
        if client.site is None:
            raise Refused(403, "no-certificate", f"{method} {path}: forbidden: a client "
                           "certificate from the site CA is required (enroll the site first)")
        cache = await self._site_identity(client)
        headers = checked_headers(request, path, client.site, cache.node_keys[client.site])
        if self.presence is not None:
            self.presence.seen(client.site)
        assert self._upstream is not None
        await forward(self._upstream, conn, reader, writer, request, method, path, headers,
                      timeout=self.config.idle_timeout_s)
        return True

    async def _site_identity(self, client: Client) -> _SiteCache:
        """The registry, after checking the client's certificate and site against it."""
        site, serial = client.site, client.serial
        assert site is not None and serial is not None
        try:
            cache = await asyncio.to_thread(self._refresh)
        except SQLAlchemyError as err:
            raise Refused(503, "registry-unavailable", "the coordinator cannot read its "
                           f"site registry right now ({type(err).__name__}); retry") from err
        if serial in cache.superseded:
            if client.served:
                # Renewed while this connection was open: the site has the new certificate
                # on disk. No answer, so its client retries, on a new connection with it.
                self.refusals.refused(address=client.address, site=site, kind="superseded",
                                      reason=f"certificate {serial} was replaced by a "
                                             "renewal or a new enrollment: connection closed")
                raise Drop
            # Renewal and enrollment with a new token both retire the earlier certificates
            # (coordinator.enrollment._retire): the answer names both, so that a reinstalled
            # site's IT is not sent looking for a renewal that never happened.
            raise Refused(403, "superseded", f"forbidden: this certificate of site {site!r} "
                           "was replaced by a renewal or a new enrollment; use the newer "
                           "certificate")
        if serial in cache.revoked:
            raise Refused(403, "revoked", f"forbidden: the certificate of site {site!r} is "
                                           "revoked")
        if site not in cache.node_keys:
            raise Refused(403, "unregistered", f"forbidden: site {site!r} is not registered")
        return cache

    def _refuse_in_thread(self, client: Client, kind: str, detail: str) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: self.refusals.refused(
                address=client.address, site=client.site, kind=kind, reason=detail))

