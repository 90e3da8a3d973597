"""The site gateway: the only door from the sites into the coordinator.

The SuperLink listens on 127.0.0.1 and its control API has no authentication, so sites
never reach it directly. The gateway listens on the fleet address, terminates TLS with a
certificate from the site CA, and:

* forwards ``/v1/fleet/*`` and ``/health`` to the SuperLink only for a client that presents
  a valid, unrevoked certificate issued by the site CA, and only when the Flower node key in
  the request (``flwr-public-key``, required) is the key registered for the site named in
  that certificate: a site can speak only for its own node;
* serves enrollment (``/fedward/ca``, ``/fedward/enroll``) without a client certificate:
  a site has none before it enrolls, and the one-time token is the credential;
* serves renewal (``/fedward/renew``) to a site with its current certificate;
* refuses every other path (403), the control and runtime APIs above all.

It is a small HTTP/1.1 proxy (h11 for parsing, httpx for the upstream) running in the
coordinator process; every refusal is logged with the client's identity. Like a front
server it bounds what a client can hold: a TLS handshake, a read between two chunks and a
write each have a deadline (``idle_timeout_s``), request heads are limited to h11's 16 KiB,
bodies to 512 MiB, and connections at once to ``max_connections`` (more are closed at once).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
from sqlalchemy.engine import Engine
from sqlmodel import select

from coordinator.db import session_scope
from coordinator.enrollment import (
    EnrollmentError,
    redeem_token,
    renew_certificate,
    revoked_serials,
)
from coordinator.flower_control import NodeKeyError, node_public_key_bytes
from coordinator.models import Site, utcnow
from coordinator.pki import CAFiles, CSRError

__all__ = ["GatewayConfig", "SiteGateway"]

log = logging.getLogger("fedward.coordinator.gateway")

# The exact shape of every path forwarded: Flower's fleet calls are /v1/fleet/<name>. Nothing
# that a client library or the SuperLink could normalise into another path (``..``, ``//``,
# percent-escapes, backslashes) matches, so the path checked is the path the SuperLink sees.
_FORWARDABLE = re.compile(r"^(?:/v1/fleet/[a-z0-9][a-z0-9-]{0,63}|/health)$")
_NODE_KEY_HEADER = b"flwr-public-key"
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
               b"te", b"trailers", b"transfer-encoding", b"upgrade", b"host",
               b"content-length"}
_MAX_BODY = 512 * 1024 * 1024
_CACHE_S = 2.0

Registrar = Callable[[str, str], str]


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens and what it forwards to."""

    host: str
    port: int
    pki: CAFiles
    cert: Path
    key: Path
    superlink: str
    idle_timeout_s: float = 60.0    # nginx's client_header/body and send timeouts
    max_connections: int = 512      # nginx's default worker_connections


@dataclass
class _SiteCache:
    at: float = 0.0
    node_keys: dict[str, bytes] = field(default_factory=dict)   # site -> SuperLink key bytes
    revoked: frozenset[str] = frozenset()


class _RegistrationFailed(RuntimeError):
    """The SuperLink did not take a site's node key during enrollment."""


class SiteGateway:
    """Runs the gateway on its own event loop thread."""

    def __init__(self, *, config: GatewayConfig, engine: Engine, registrar: Registrar) -> None:
        self.config = config
        self.engine = engine
        self.registrar = registrar
        self._cache = _SiteCache()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._upstream: httpx.AsyncClient | None = None
        self._open = 0   # connections being served (touched only on the event loop)

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
        ca = ssl.create_default_context(cafile=str(self.config.pki.ca_cert))
        if self.config.superlink.startswith("unix:"):
            # The SuperLink's socket in the coordinator's data directory; TLS still checks
            # its 127.0.0.1 certificate.
            self._upstream = httpx.AsyncClient(
                base_url="https://127.0.0.1", timeout=120.0,
                transport=httpx.AsyncHTTPTransport(uds=self.config.superlink[5:], verify=ca))
        else:
            self._upstream = httpx.AsyncClient(base_url=f"https://{self.config.superlink}",
                                               verify=ca, timeout=120.0)
        self._server = loop.run_until_complete(asyncio.start_server(
            self._handle, self.config.host, self.config.port, ssl=self._server_ssl(),
            ssl_handshake_timeout=self.config.idle_timeout_s))
        if self.config.port == 0:
            sock = self._server.sockets[0]
            self.config = GatewayConfig(**{**self.config.__dict__,
                                           "port": int(sock.getsockname()[1])})
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._upstream.aclose())
            loop.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        def _close() -> None:
            if self._server is not None:
                self._server.close()
            loop.stop()

        loop.call_soon_threadsafe(_close)
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- identity -----------------------------------------------------------------------

    def _refresh(self) -> _SiteCache:
        if time.monotonic() - self._cache.at < _CACHE_S:
            return self._cache
        keys: dict[str, bytes] = {}
        with session_scope(self.engine) as session:
            for site in session.exec(select(Site).where(Site.status == "registered")).all():
                if site.public_key:
                    try:
                        keys[site.name] = node_public_key_bytes(site.public_key)
                    except NodeKeyError:
                        continue
            revoked = revoked_serials(session)
        self._cache = _SiteCache(at=time.monotonic(), node_keys=keys, revoked=revoked)
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

    # -- HTTP ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.config.max_connections:
            log.warning("gateway at %d connections: closed one from %s",
                        self._open, writer.get_extra_info("peername"))
            writer.close()
            return
        self._open += 1
        conn = h11.Connection(h11.SERVER)
        peer = self._peer(writer)
        try:
            while True:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    break
                status, headers, content = await self._route(request, body, peer)
                await self._send(conn, writer, status, headers, content)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (h11.RemoteProtocolError, ConnectionError, asyncio.IncompleteReadError,
                ssl.SSLError) as err:
            log.debug("gateway connection closed: %s", err)
        except TimeoutError:
            log.debug("gateway connection from %s idle past %.0f s: closed", peer,
                      self.config.idle_timeout_s)
        finally:
            self._open -= 1
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader
                            ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536),
                                              self.config.idle_timeout_s)
                conn.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body.extend(event.data)
                if len(body) > _MAX_BODY:
                    raise h11.RemoteProtocolError("body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                    headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(content)).encode())]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=content)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await asyncio.wait_for(writer.drain(), self.config.idle_timeout_s)

    @staticmethod
    def _json(status: int, payload: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]],
                                                             bytes]:
        return status, [(b"content-type", b"application/json")], json.dumps(payload).encode()

    async def _route(self, request: h11.Request, body: bytes, peer: tuple[str, str] | None
                     ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode()
        if path == "/fedward/ca" and method == "GET":
            return 200, [(b"content-type", b"application/x-pem-file")], \
                self.config.pki.ca_cert.read_bytes()
        if path == "/fedward/enroll" and method == "POST":
            return await asyncio.to_thread(self._enroll, body)
        if path == "/fedward/renew" and method == "POST":
            return await asyncio.to_thread(self._renew, body, peer)
        if not _FORWARDABLE.fullmatch(path):
            log.warning("gateway refused %s %s from %s", method, path, peer)
            return self._json(403, {"detail": "forbidden: the site gateway forwards only the "
                                              "Flower fleet API"})
        if peer is None:
            return self._json(403, {"detail": "forbidden: a client certificate from the site "
                                              "CA is required (enroll the site first)"})
        site, serial = peer
        cache = await asyncio.to_thread(self._refresh)
        if serial in cache.revoked:
            log.warning("gateway refused revoked certificate %s of %s", serial, site)
            return self._json(403, {"detail": f"forbidden: the certificate of site {site!r} "
                                              "is revoked"})
        if site not in cache.node_keys:
            return self._json(403, {"detail": f"forbidden: site {site!r} is not registered"})
        if path.startswith("/v1/fleet/"):
            # Flower signs every fleet request with the node key and sends that key along;
            # a request without one is refused here rather than left to the SuperLink.
            presented = dict(request.headers).get(_NODE_KEY_HEADER)
            if presented is None:
                log.warning("gateway refused %s from site %s: no Flower node key", path, site)
                return self._json(403, {"detail": "forbidden: fleet requests must carry the "
                                                  "site's Flower node key (flwr-public-key)"})
            try:
                key = base64.b64decode(presented, validate=True)
            except ValueError:
                key = b""
            if key != cache.node_keys[site]:
                log.warning("gateway refused %s: node key is not site %s's", path, site)
                return self._json(403, {"detail": "forbidden: the Flower node key does "
                                                  f"not belong to site {site!r}"})
        return await self._forward(method, path, request, body)

    async def _forward(self, method: str, path: str, request: h11.Request, body: bytes
                       ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        assert self._upstream is not None
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
        try:
            resp = await self._upstream.request(method, path, headers=headers, content=body)
        except httpx.HTTPError as err:
            return self._json(502, {"detail": f"the coordinator's SuperLink is not reachable "
                                              f"({type(err).__name__}); retry later"})
        out = [(k.encode(), v.encode()) for k, v in resp.headers.items()
               if k.lower().encode() not in _HOP_BY_HOP and k.lower() != "content-encoding"]
        return resp.status_code, out, resp.content

    # -- enrollment ---------------------------------------------------------------------

    def _enroll(self, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        try:
            req = json.loads(body)
            token, csr, node_key = str(req["token"]), str(req["csr_pem"]), str(
                req["node_public_key"])
        except (ValueError, KeyError, TypeError):
            return self._json(400, {"detail": "expected JSON with token, csr_pem and "
                                              "node_public_key"})
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
                name = site.name
        except (EnrollmentError, CSRError, NodeKeyError) as err:
            log.warning("enrollment refused: %s", err)
            return self._json(403, {"detail": str(err)})
        except _RegistrationFailed as err:
            log.error("enrollment: registering the node key with the SuperLink failed (%s)",
                      err.__cause__)
            return self._json(503, {"detail": f"the coordinator could not register this "
                                              f"site's node key ({err}); the token was not "
                                              "used: try again in a minute, and if it "
                                              "persists ask the coordinator team to check "
                                              "their superlink.log"})
        self.invalidate()
        log.info("site %s enrolled (certificate %s)", name, issued.serial)
        return self._json(200, {"site": name, "certificate_pem": issued.pem.decode(),
                                "ca_pem": self.config.pki.ca_cert.read_text(),
                                "not_after": issued.not_after.isoformat()})

    def _renew(self, body: bytes, peer: tuple[str, str] | None
               ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if peer is None:
            return self._json(403, {"detail": "renewal needs the site's current certificate"})
        try:
            csr = str(json.loads(body)["csr_pem"])
        except (ValueError, KeyError, TypeError):
            return self._json(400, {"detail": "expected JSON with csr_pem"})
        try:
            with session_scope(self.engine) as session:
                issued = renew_certificate(session, site_name=peer[0], serial=peer[1],
                                           csr_pem=csr.encode(), pki=self.config.pki)
        except (EnrollmentError, CSRError) as err:
            return self._json(403, {"detail": str(err)})
        return self._json(200, {"certificate_pem": issued.pem.decode(),
                                "not_after": issued.not_after.isoformat()})
