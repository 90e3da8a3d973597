"""The gateway on its own: enrollment when the SuperLink does not take the node key, and
the limits on what one client can hold (idle connections, connections at once)."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select

from coordinator.db import make_engine, session_scope
from coordinator.enrollment import create_token
from coordinator.gateway import GatewayConfig, SiteGateway
from coordinator.models import EnrollmentToken, Site
from coordinator.service import gateway_cert_paths, init_home
from coordinator.settings import Settings
from export.certs import make_csr
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
    status, _, payload = gateway._enroll(body)
    assert status == 503
    detail = json.loads(payload)["detail"]
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
    extra = _connect(gateway, client)
    assert _closed_within(extra, 2.0)      # at once, before the 3 s idle limit
    extra.close()
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
