"""The gateway on its own: enrollment when the SuperLink does not take the node key, the
limits on what one client can hold (idle connections, connections at once and per address,
bodies), what it forwards (Flower's authentication headers once, no client-made forwarding
headers, bodies streamed both ways) and what it logs.

Where the gateway forwards, the upstream here is a small TLS server on 127.0.0.1 that
records what reaches it, in the SuperLink's place: these tests look at the bytes the
gateway passes on. tests/test_gateway.py runs the same paths against the real SuperLink.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator.db import make_engine, session_scope
from coordinator.enrollment import create_token
from coordinator.gateway import GatewayConfig, SiteGateway
from coordinator.gateway_http import SMALL_BODY
from coordinator.gateway_limits import RefusalLog
from coordinator.home import gateway_cert_paths, init_home
from coordinator.models import EnrollmentToken, Site, SiteCertificate
from coordinator.settings import Settings
from fedward.certs import CAFiles, make_csr, write_private_key
from fedward.flower.control import node_public_key_bytes
from site_agent.keys import ensure_node_key


def test_a_node_key_the_superlink_refuses_is_a_503_and_the_token_stays_unused(
        tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    pki = init_home(settings)
    engine = make_engine(settings.effective_database_url)
    with session_scope(engine) as session:
        site = Site(name="hospital-a")
        session.add(site)
        session.flush()
        token, _ = create_token(session, site=site, pki=pki, actor="admin")

    def refuse(public_key: str, name: str) -> str:
        raise ConnectionError("SuperLink restarting")

    cert, key = gateway_cert_paths(pki)
    gateway = SiteGateway(config=GatewayConfig(host="127.0.0.1", port=0, pki=pki, cert=cert,
                                               key=key, superlink="127.0.0.1:1"),
                          engine=engine, registrar=refuse)
    node_pub = ensure_node_key(tmp_path / "node_key", tmp_path / "node_key.pub")
    body = json.dumps({"token": token,
                       "csr_pem": make_csr(ec.generate_private_key(ec.SECP256R1()),
                                           "hospital-a").decode(),
                       "node_public_key": node_pub}).encode()
    status, payload = gateway.requests.enroll(body)
    assert status == 503
    detail = payload["detail"]
    assert "ConnectionError" in detail and "token was not used" in detail
    with session_scope(engine) as session:
        assert session.exec(select(EnrollmentToken)).one().used_at is None
        row = session.exec(select(Site)).one()
        assert row.public_key is None and row.status != "registered"
    engine.dispose()


# --- what a client can hold ----------------------------------------------------------------


@pytest.fixture
def small_gateway(tmp_path: Path) -> Iterator[tuple[SiteGateway, ssl.SSLContext]]:
    settings = Settings(home=tmp_path / "home")
    pki = init_home(settings)
    engine = make_engine(settings.effective_database_url)
    cert, key = gateway_cert_paths(pki)
    gateway = SiteGateway(config=GatewayConfig(host="127.0.0.1", port=0, pki=pki, cert=cert,
                                               key=key, superlink="127.0.0.1:1",
                                               idle_timeout_s=3.0, max_connections=2),
                          engine=engine, registrar=lambda key, name: "0")
    gateway.start()
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    client.check_hostname = False
    try:
        yield gateway, client
    finally:
        gateway.stop()
        engine.dispose()


def _connect(gateway: SiteGateway, client: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", gateway.config.port), timeout=10)
    return client.wrap_socket(raw)


def _closed_within(sock: ssl.SSLSocket, seconds: float) -> bool:
    """True if the gateway closes the connection within ``seconds`` (it sends nothing)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def test_a_connection_that_sends_nothing_or_half_a_request_is_closed_after_the_idle_limit(
        small_gateway: tuple[SiteGateway, ssl.SSLContext]) -> None:
    gateway, client = small_gateway
    silent = _connect(gateway, client)
    slow = _connect(gateway, client)
    slow.sendall(b"GET /fedward/ca HTTP/1.1\r\nHost: x\r\n")   # and never the blank line
    started = time.monotonic()
    assert _closed_within(silent, 10) and _closed_within(slow, 10)
    assert time.monotonic() - started < 9
    silent.close()
    slow.close()
    # Nor may a client hold one by never finishing the TLS handshake.
    no_tls = socket.create_connection(("127.0.0.1", gateway.config.port), timeout=10)
    no_tls.sendall(b"\x16\x03\x01")   # the start of a ClientHello, then nothing
    assert no_tls.recv(1) == b""
    no_tls.close()


def test_connections_beyond_the_cap_are_closed_and_the_gateway_serves_again_after(
        small_gateway: tuple[SiteGateway, ssl.SSLContext]) -> None:
    gateway, client = small_gateway
    held = [_connect(gateway, client) for _ in range(2)]
    time.sleep(0.3)   # both are being served (idle) before the third arrives
    started = time.monotonic()
    # Refused before its TLS handshake: the handshake itself fails, at once.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _connect(gateway, client)
    assert time.monotonic() - started < 2.0      # before the 3 s idle limit
    for sock in held:
        sock.close()
    time.sleep(0.5)
    again = _connect(gateway, client)
    again.sendall(b"GET /fedward/ca HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = b""
    while chunk := again.recv(65536):
        reply += chunk
    again.close()
    assert reply.startswith(b"HTTP/1.1 200") and b"BEGIN CERTIFICATE" in reply


# --- a gateway with an enrolled site and an upstream that records what reaches it -----------


class _Upstream:
    """A TLS HTTP/1.1 server in the SuperLink's place (its certificate, its address).

    ``/health`` answers ``ok``; ``/v1/fleet/echo`` answers the headers it received, as
    JSON; ``/v1/fleet/count`` reads the body in pieces (``received`` grows as they arrive)
    and answers its length; ``/v1/fleet/big`` answers :data:`BIG` bytes, sending the first
    MiB and the rest only once ``release`` is set.
    """

    BIG = 8 * 1024 * 1024

    def __init__(self, pki: CAFiles) -> None:
        self.received = 0
        self.release = threading.Event()
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self._ctx = ctx
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="upstream")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._connection, args=(raw,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(30)
                conn = h11.Connection(h11.SERVER)
                while True:
                    request = _next(conn, tls)
                    if not isinstance(request, h11.Request):
                        return
                    self._answer(conn, tls, request)
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            return

    def _answer(self, conn: h11.Connection, tls: ssl.SSLSocket, request: h11.Request) -> None:
        path = request.target.decode()
        self.requests.append((path, [(k.decode(), v.decode()) for k, v in request.headers]))
        length = 0
        while isinstance(event := _next(conn, tls), h11.Data):
            length += len(event.data)
            self.received += len(event.data)
        if path == "/v1/fleet/big":
            tls.sendall(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", str(self.BIG))])) or b"")
            tls.sendall(conn.send(h11.Data(data=b"a" * (1024 * 1024))) or b"")
            self.release.wait(30)
            for _ in range(7):
                tls.sendall(conn.send(h11.Data(data=b"b" * (1024 * 1024))) or b"")
            tls.sendall(conn.send(h11.EndOfMessage()) or b"")
            return
        body = {"/health": b"ok", "/v1/fleet/count": str(length).encode()}.get(
            path, json.dumps(self.requests[-1][1]).encode())
        tls.sendall(conn.send(h11.Response(status_code=200, headers=[
            ("content-length", str(len(body)))])) or b"")
        tls.sendall(conn.send(h11.Data(data=body)) or b"")
        tls.sendall(conn.send(h11.EndOfMessage()) or b"")


def _next(conn: h11.Connection, sock: ssl.SSLSocket) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(sock.recv(65536))


@dataclass
class World:
    gateway: SiteGateway
    upstream: _Upstream
    engine: Engine
    pki: CAFiles
    site: ssl.SSLContext       # the enrolled site's client certificate
    node_key: str              # its Flower node key, as flwr-public-key carries it
    anonymous: ssl.SSLContext  # no client certificate


def _enroll_site(gateway: SiteGateway, engine: Engine, pki: CAFiles, tmp: Path,
                 name: str) -> tuple[ssl.SSLContext, str]:
    with session_scope(engine) as session:
        site = Site(name=name)
        session.add(site)
        session.flush()
        token, _ = create_token(session, site=site, pki=pki, actor="admin")
    key = ec.generate_private_key(ec.SECP256R1())
    node_pub = ensure_node_key(tmp / f"{name}.node", tmp / f"{name}.node.pub")
    status, payload = gateway.requests.enroll(json.dumps({
        "token": token, "csr_pem": make_csr(key, name).decode(),
        "node_public_key": node_pub}).encode())
    assert status == 200, payload
    write_private_key(tmp / f"{name}.key", key)
    (tmp / f"{name}.pem").write_text(payload["certificate_pem"])
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(tmp / f"{name}.pem"), str(tmp / f"{name}.key"))
    return ctx, base64.b64encode(node_public_key_bytes(node_pub)).decode()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = Settings(home=tmp_path / "home")
    pki = init_home(settings)
    engine = make_engine(settings.effective_database_url)
    upstream = _Upstream(pki)
    cert, key = gateway_cert_paths(pki)
    ids = iter(range(100, 200))
    gateway = SiteGateway(config=GatewayConfig(
        host="127.0.0.1", port=0, pki=pki, cert=cert, key=key,
        superlink=f"127.0.0.1:{upstream.port}", idle_timeout_s=5.0, max_connections=8,
        max_per_address=2, reserved_for_sites=4),
        engine=engine, registrar=lambda key, name: str(next(ids)))
    gateway.start()
    site, node_key = _enroll_site(gateway, engine, pki, tmp_path, "hospital-a")
    anonymous = ssl.create_default_context(cafile=str(pki.ca_cert))
    try:
        yield World(gateway, upstream, engine, pki, site, node_key, anonymous)
    finally:
        upstream.release.set()
        gateway.stop()
        upstream.close()
        engine.dispose()


class _Http:
    """One TLS connection to the gateway, from a chosen source address, spoken with h11."""

    def __init__(self, world: World, ctx: ssl.SSLContext, *, source: str = "127.0.0.1"
                 ) -> None:
        raw = socket.socket()
        raw.settimeout(10)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", world.gateway.config.port))
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.conn = h11.Connection(h11.CLIENT)

    def send_head(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        self.sock.sendall(self.conn.send(h11.Request(
            method=method, target=target, headers=[("host", "gateway"), *headers])) or b"")

    def send_body(self, data: bytes, *, end: bool = False) -> None:
        if data:
            self.sock.sendall(self.conn.send(h11.Data(data=data)) or b"")
        if end:
            self.sock.sendall(self.conn.send(h11.EndOfMessage()) or b"")

    def response(self) -> tuple[int, bytes]:
        response = _next(self.conn, self.sock)
        assert isinstance(response, h11.Response), response
        body = b""
        while isinstance(event := _next(self.conn, self.sock), h11.Data):
            body += event.data
        return response.status_code, body

    def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                body: bytes = b"") -> tuple[int, bytes]:
        self.send_head(method, target, [*(headers or []),
                                        ("content-length", str(len(body)))])
        self.send_body(body, end=True)
        status, content = self.response()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status, content

    def closed(self, seconds: float = 3.0) -> bool:
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def _fleet_headers(world: World, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("flwr-public-key", world.node_key), ("flwr-signature", "c2ln"),
            ("flwr-timestamp", "2026-12-06T10:00:00+00:00"), *extra]


def test_repeated_flower_auth_headers_are_refused_and_only_the_checked_ones_forwarded(
        world: World, tmp_path: Path) -> None:
    _, other_key = _enroll_site(world.gateway, world.engine, world.pki, tmp_path,
                                    "hospital-b")
    http = _Http(world, world.site)
    # Flower trusts the first flwr-public-key: hospital-b's key first, hospital-a's own last.
    for headers in ([("flwr-public-key", other_key), *_fleet_headers(world)],
                    [*_fleet_headers(world), ("flwr-signature", "b3RoZXI=")],
                    [*_fleet_headers(world), ("flwr-timestamp", "2026-12-06T10:00:01+00:00")],
                    [*_fleet_headers(world), ("flwr_public_key", other_key)]):
        status, body = http.request("POST", "/v1/fleet/echo", headers)
        assert status == 400, body
        assert b"more than once" in body
        assert http.closed()
        http.close()
        http = _Http(world, world.site)
    assert world.upstream.requests == []
    spoofed = [("x-forwarded-for", "203.0.113.9"), ("Forwarded", "for=203.0.113.9"),
               ("x-real-ip", "203.0.113.9"), ("x_forwarded_for", "203.0.113.9")]
    status, body = http.request("POST", "/v1/fleet/echo", _fleet_headers(world, *spoofed))
    assert status == 200, body
    (path, seen), = world.upstream.requests
    names = [k.lower() for k, _ in seen]
    assert path == "/v1/fleet/echo"
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp"):
        assert names.count(name) == 1
    assert dict(seen)["flwr-public-key"] == world.node_key
    assert "203.0.113.9" not in json.dumps(seen)
    http.close()


def test_a_fleet_body_is_streamed_to_the_superlink_as_it_arrives(world: World) -> None:
    http = _Http(world, world.site)
    total = 32 * 1024 * 1024
    http.send_head("POST", "/v1/fleet/count",
                   [*_fleet_headers(world), ("content-length", str(total))])
    http.send_body(b"x" * (4 * 1024 * 1024))
    # The SuperLink has part of the body while the site still holds the rest back.
    deadline = time.monotonic() + 10
    while world.upstream.received < 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world.upstream.received >= 1024 * 1024, "nothing reached the SuperLink yet"
    for _ in range(7):
        http.send_body(b"x" * (4 * 1024 * 1024))
    http.send_body(b"", end=True)
    assert http.response() == (200, str(total).encode())
    http.close()


def test_a_large_answer_is_streamed_back_as_it_comes(world: World) -> None:
    http = _Http(world, world.site)
    http.send_head("POST", "/v1/fleet/big", [*_fleet_headers(world), ("content-length", "0")])
    http.send_body(b"", end=True)
    response = _next(http.conn, http.sock)
    assert isinstance(response, h11.Response) and response.status_code == 200
    first = _next(http.conn, http.sock)   # arrives before the SuperLink sent the rest
    assert isinstance(first, h11.Data) and first.data
    world.upstream.release.set()
    size = len(first.data)
    while isinstance(event := _next(http.conn, http.sock), h11.Data):
        size += len(event.data)
    assert size == _Upstream.BIG
    http.close()


def _peak_rss_growth(action: Callable[[], int]) -> tuple[int, int]:
    """(what ``action`` returns, the process's peak RSS growth in bytes while it ran)."""
    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    Path("/proc/self/clear_refs").write_text("5")   # reset the peak to the current RSS
    before = rss("VmRSS")
    result = action()
    return result, rss("VmHWM") - before


def test_large_bodies_before_a_verified_certificate_are_refused_without_being_read(
        world: World) -> None:
    huge = str(300 * 1024 * 1024)
    # Refused on the head: the answer comes before a byte of the body is sent.
    for target, ctx, status in [("/v1/control/start-run", world.anonymous, 403),
                                ("/fedward/enroll", world.anonymous, 413),
                                ("/v1/fleet/pull-messages", world.anonymous, 403),
                                ("/fedward/renew", world.site, 413)]:
        http = _Http(world, ctx)
        http.send_head("POST", target, [("content-length", huge)])
        assert http.response()[0] == status, target
        http.close()

    def send_chunked() -> int:
        """Stream 200 MiB to enrollment; return how much the gateway let through."""
        http = _Http(world, world.anonymous, source="127.0.0.3")
        http.send_head("POST", "/fedward/enroll", [("transfer-encoding", "chunked")])
        sent = 0
        piece = b"{" * (1024 * 1024)
        try:
            while sent < 200 * 1024 * 1024:
                http.send_body(piece)
                sent += len(piece)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        http.close()
        return sent

    sent, growth = _peak_rss_growth(send_chunked)
    assert sent < 16 * 1024 * 1024, f"the gateway read {sent} bytes of a refused body"
    assert growth < 64 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert world.upstream.requests == []


def test_enrollment_bodies_are_capped_at_small_body_exactly(world: World,
                                                             tmp_path: Path) -> None:
    """One byte over SMALL_BODY is refused with 413 and its reason, whether the length is
    announced on the head or only found while reading a chunked body, and the token stays
    unused; the same enrollment at exactly SMALL_BODY bytes goes through (a real CSR and
    token, padded with JSON whitespace)."""
    too_large = {"detail": f"request body too large: at most {SMALL_BODY} bytes on this path"}
    for name, chunked in (("hospital-b", False), ("hospital-c", True)):
        with session_scope(world.engine) as session:
            site = Site(name=name)
            session.add(site)
            session.flush()
            token, _ = create_token(session, site=site, pki=world.pki, actor="admin")
            site_id = site.id
        body = json.dumps({
            "token": token,
            "csr_pem": make_csr(ec.generate_private_key(ec.SECP256R1()), name).decode(),
            "node_public_key": ensure_node_key(tmp_path / f"{name}.node",
                                               tmp_path / f"{name}.node.pub")}).encode()
        assert len(body) < SMALL_BODY
        for size, want in ((SMALL_BODY + 1, 413), (SMALL_BODY, 200)):
            padded = body + b" " * (size - len(body))
            http = _Http(world, world.anonymous)
            if chunked:
                http.send_head("POST", "/fedward/enroll", [("transfer-encoding", "chunked")])
                http.send_body(padded, end=True)
                status, answer = http.response()
            else:
                status, answer = http.request("POST", "/fedward/enroll", body=padded)
            http.close()
            assert status == want, (name, size, answer)
            if want == 413:
                assert json.loads(answer) == too_large
                with session_scope(world.engine) as session:
                    assert session.exec(select(EnrollmentToken)
                                        .where(EnrollmentToken.site_id == site_id)
                                        ).one().used_at is None
            else:
                assert "certificate_pem" in json.loads(answer)
    assert world.upstream.requests == []


def _raw(world: World, source: str) -> socket.socket:
    raw = socket.socket()
    raw.settimeout(10)
    raw.bind((source, 0))
    raw.connect(("127.0.0.1", world.gateway.config.port))
    return raw


def _reset_or_eof(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_connections_are_capped_per_address_and_verified_sites_still_get_in(
        world: World) -> None:
    # The world's gateway: 8 connections; per address 2 in a TLS handshake and 2 without
    # a certificate; 4 of the 8 kept for verified sites.
    stalled = [_raw(world, "127.0.0.6") for _ in range(2)]   # handshakes never finished
    time.sleep(0.3)
    third = _raw(world, "127.0.0.6")
    assert _reset_or_eof(third, 2.0)          # refused at once, before any TLS
    third.close()
    held = [_Http(world, world.anonymous, source="127.0.0.2") for _ in range(2)]
    extra = _Http(world, world.anonymous, source="127.0.0.2")
    assert extra.closed(2.0)                  # this address holds its 2: closed at once
    extra.close()
    site = _Http(world, world.site, source="127.0.0.2")   # the same host, verified: in
    assert site.request("GET", "/health", _fleet_headers(world)) == (200, b"ok")
    other = _Http(world, world.anonymous, source="127.0.0.3")   # another host: in
    status, pem = other.request("GET", "/fedward/ca")
    assert status == 200 and b"BEGIN CERTIFICATE" in pem
    other.close()
    for sock in stalled:
        sock.close()
    held += [_Http(world, world.anonymous, source="127.0.0.3") for _ in range(2)]
    # Four anonymous connections hold every slot not kept for sites: a fifth, from yet
    # another host, is closed after its handshake; a site still gets in.
    fifth = _Http(world, world.anonymous, source="127.0.0.4")
    assert fifth.closed(2.0)
    fifth.close()
    again = _Http(world, world.site, source="127.0.0.5")
    assert again.request("GET", "/health", _fleet_headers(world)) == (200, b"ok")
    for http in [*held, site, again]:
        http.close()


def test_a_renewed_certificate_retires_the_old_one_at_once(world: World, tmp_path: Path
                                                          ) -> None:
    http = _Http(world, world.site)
    assert http.request("GET", "/health")[0] == 200
    key = ec.generate_private_key(ec.SECP256R1())
    renewing = _Http(world, world.site)
    status, body = renewing.request("POST", "/fedward/renew", body=json.dumps(
        {"csr_pem": make_csr(key, "hospital-a").decode()}).encode())
    assert status == 200, body
    renewed = json.loads(body)["certificate_pem"]
    renewing.close()
    # The connection opened with the old certificate is closed without an answer, so the
    # site's client retries on a new one; a new connection with the old one is refused.
    http.send_head("GET", "/health", [("content-length", "0")])
    http.send_body(b"", end=True)
    assert http.closed()
    old = _Http(world, world.site)
    status, body = old.request("GET", "/health")
    assert status == 403 and b"replaced by a renewal" in body
    http.close()
    old.close()
    write_private_key(tmp_path / "new.key", key)
    (tmp_path / "new.pem").write_text(renewed)
    new = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    new.load_cert_chain(str(tmp_path / "new.pem"), str(tmp_path / "new.key"))
    fresh = _Http(world, new)
    assert fresh.request("GET", "/health") == (200, b"ok")
    fresh.close()
    with session_scope(world.engine) as session:
        valid = session.exec(select(SiteCertificate).where(
            col(SiteCertificate.revoked_at).is_(None))).all()
    assert len(valid) == 1


def test_enrolling_again_with_a_new_token_retires_the_earlier_certificate(
        world: World, tmp_path: Path) -> None:
    """A site enrolled again (a reinstalled host, a new token) holds only its new
    certificate, as after a renewal: the earlier one is marked superseded, an open
    connection with it is closed and a new one refused, and the new one is served."""
    http = _Http(world, world.site)
    assert http.request("GET", "/health")[0] == 200
    with session_scope(world.engine) as session:
        site = session.exec(select(Site).where(Site.name == "hospital-a")).one()
        token, _ = create_token(session, site=site, pki=world.pki, actor="admin")
        (earlier,) = session.exec(select(SiteCertificate.serial)).all()
    key = ec.generate_private_key(ec.SECP256R1())
    enrolling = _Http(world, world.anonymous)
    status, body = enrolling.request("POST", "/fedward/enroll", body=json.dumps({
        "token": token, "csr_pem": make_csr(key, "hospital-a").decode(),
        # the node key it enrolled with: the same Flower node, a new TLS certificate
        "node_public_key": ensure_node_key(tmp_path / "hospital-a.node",
                                           tmp_path / "hospital-a.node.pub")}).encode())
    enrolling.close()
    assert status == 200, body
    write_private_key(tmp_path / "again.key", key)
    (tmp_path / "again.pem").write_text(json.loads(body)["certificate_pem"])
    http.send_head("GET", "/health", [("content-length", "0")])
    http.send_body(b"", end=True)
    assert http.closed()
    http.close()
    old = _Http(world, world.site)
    status, body = old.request("GET", "/health")
    old.close()
    assert status == 403 and b"new enrollment" in body, body
    again = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    again.load_cert_chain(str(tmp_path / "again.pem"), str(tmp_path / "again.key"))
    fresh = _Http(world, again)
    assert fresh.request("GET", "/health") == (200, b"ok")
    fresh.close()
    with session_scope(world.engine) as session:
        certs = {c.serial: (c.revoked_at is None, c.superseded_by)
                 for c in session.exec(select(SiteCertificate)).all()}
    (newer,) = set(certs) - {earlier}
    assert certs == {earlier: (False, newer), newer: (True, None)}


def test_every_refusal_is_logged_with_the_address_and_why(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedward.coordinator.gateway")
    plain = socket.create_connection(("127.0.0.1", world.gateway.config.port), timeout=10)
    plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")   # HTTP on the TLS port
    assert plain.recv(100) == b""
    plain.close()
    http = _Http(world, world.anonymous)
    assert http.request("POST", "/v1/fleet/pull-messages")[0] == 403
    http.close()
    with session_scope(world.engine) as session:
        site = session.exec(select(Site).where(Site.name == "hospital-a")).one()
        site.status = "added"
        session.add(site)
    world.gateway.invalidate()
    http = _Http(world, world.site)
    status, body = http.request("GET", "/health", _fleet_headers(world))
    assert status == 403 and b"not registered" in body
    http.close()
    deadline = time.monotonic() + 5
    wanted = ["[tls-handshake]", "[no-certificate]", "[unregistered]"]
    while time.monotonic() < deadline and not all(w in caplog.text for w in wanted):
        time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records]
    for kind in wanted:
        (line,) = [m for m in lines if kind in m]
        assert line.startswith("gateway refused 127.0.0.1"), line
    assert any("(site hospital-a) [unregistered]" in m for m in lines)


def test_a_flood_of_refusals_is_logged_at_a_bounded_rate(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(logging.getLogger("fedward.test.refusals"), per_window=10,
                          window_s=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="fedward.test.refusals")
    for i in range(10_000):
        now[0] = i * 0.001   # 10,000 refusals in 10 s
        refusals.refused(address="198.51.100.7", site=None, kind="no-certificate",
                         reason="a client certificate is required")
    assert len(caplog.records) == 10
    now[0] = 61.0
    refusals.refused(address="198.51.100.7", site=None, kind="path", reason="forbidden")
    summary, last = caplog.records[-2:]
    assert "9990 more refusals were not logged" in summary.getMessage()
    assert "no-certificate 9990" in summary.getMessage()
    assert "[path]" in last.getMessage()
