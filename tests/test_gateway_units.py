"""The gateway's enrollment step when the SuperLink does not take the node key."""

from __future__ import annotations

import json
from pathlib import Path

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
