"""The site gateway with a real coordinator: enrollment, mutual TLS, what it forwards."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedward.certs import ensure_ca, make_csr, write_private_key
from fedward.procs import descendants
from fedward.tokens import format_enrollment_token, parse_enrollment_token
from site_agent.enroll import EnrollError, EnrollmentFiles, enroll
from site_agent.keys import ensure_node_key

from federation import BIN, Federation, Site, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    with short_tmp() as work, federation(work, n_sites=1) as f:
        yield f


def _enrolled(fed: Federation, site: str, tmp: Path) -> EnrollmentFiles:
    root = tmp / site
    assert enroll(root=root, gateway=fed.fleet, token=fed.enrollment_token(site)) == site
    return EnrollmentFiles(root)


def _client(files: EnrollmentFiles | None, ca: Path) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(ca))
    if files is not None:
        ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    return httpx.Client(verify=ctx, timeout=10)


def test_enrolled_site_reaches_the_fleet_api_and_nothing_else(fed: Federation,
                                                              tmp_path: Path) -> None:
    files = _enrolled(fed, "site-ok", tmp_path)
    ca = files.coordinator_ca
    site = fed.api("GET", "/sites/site-ok").json()
    assert site["status"] == "registered" and site["flower_node_id"]
    with _client(files, ca) as c:
        assert c.get(f"https://{fed.fleet}/health").status_code == 200
        for path in ("/v1/control/list-nodes", "/v1/runtime/get-nodes", "/docs", "/"):
            r = c.post(f"https://{fed.fleet}{path}", content=b"")
            assert r.status_code == 403, (path, r.text)
            assert "only the Flower fleet API" in r.text
    # The private keys never left: no file the coordinator keeps (database, logs, PKI)
    # holds the site's TLS key or its node key, in PEM or as the raw private number.
    from cryptography.hazmat.primitives import serialization

    secrets_: list[bytes] = []
    for key in (serialization.load_pem_private_key(files.site_key.read_bytes(), None),
                serialization.load_ssh_private_key((files.keys / "node_key").read_bytes(),
                                                   None)):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes((key.key_size + 7) // 8, "big")
        secrets_ += [scalar, scalar.hex().encode(), base64.b64encode(scalar)[:40]]
    kept = [p for p in fed.home.rglob("*") if p.is_file()]
    assert any(p.name == "coordinator.db" for p in kept)
    for path in kept:
        content = path.read_bytes()
        assert not any(secret in content for secret in secrets_), path


def test_no_certificate_or_another_ca_is_refused(fed: Federation, tmp_path: Path) -> None:
    files = _enrolled(fed, "site-nocert", tmp_path)
    with _client(None, files.coordinator_ca) as c:
        r = c.post(f"https://{fed.fleet}/v1/fleet/pull-messages", content=b"")
        assert r.status_code == 403
        assert "client certificate from the site CA is required" in r.text
    rogue = ensure_ca(tmp_path / "rogue")
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_key(tmp_path / "rogue.key", key)
    from fedward.certs import issue_site_cert

    cert = issue_site_cert(rogue, csr_pem=make_csr(key, "site-nocert"), site_name="site-nocert")
    (tmp_path / "rogue.pem").write_bytes(cert.pem)
    ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
    ctx.load_cert_chain(str(tmp_path / "rogue.pem"), str(tmp_path / "rogue.key"))
    # TLS 1.3 reports the rejected client certificate after the handshake: the gateway
    # closes the connection and no HTTP answer ever comes.
    with httpx.Client(verify=ctx, timeout=10) as c, pytest.raises(httpx.TransportError):
        c.get(f"https://{fed.fleet}/health")


def test_revoked_site_is_refused_at_once(fed: Federation, tmp_path: Path) -> None:
    from site_agent.doctor_coordinator import check_gateway_identity

    files = _enrolled(fed, "site-rev", tmp_path)
    pair = (files.site_cert, files.site_key)
    assert check_gateway_identity(fed.fleet, files.coordinator_ca, pair).status == "ok"
    with _client(files, files.coordinator_ca) as c:
        assert c.get(f"https://{fed.fleet}/health").status_code == 200
        r = fed.api("POST", "/sites/site-rev/revoke", {"reason": "laptop stolen"})
        assert r.status_code == 200, r.text
        r = c.get(f"https://{fed.fleet}/health")
        assert r.status_code == 403 and "revoked" in r.text
    # What the site's IT sees from `fedward-site doctor`.
    check = check_gateway_identity(fed.fleet, files.coordinator_ca, pair)
    assert check.status == "fail"
    assert "the certificate of site 'site-rev' is revoked" in check.message
    assert "new name" in check.message
    events = fed.api("GET", "/audit").json()
    items = events["items"] if isinstance(events, dict) else events
    assert any(e["action"] == "site.revoked" and "laptop stolen" in str(e["detail"])
               for e in items)
    listed = {s["name"]: s for s in json.loads(fed.coord_cli("sites", "--json").stdout)}
    assert listed["site-rev"]["status"] == "revoked"
    assert "site-rev" in fed.coord_cli("sites").stdout


def test_a_site_cannot_speak_for_another_sites_node(fed: Federation, tmp_path: Path) -> None:
    a = _enrolled(fed, "site-a1", tmp_path)
    other = ensure_node_key(tmp_path / "x" / "k", tmp_path / "x" / "k.pub")
    from fedward.flower.control import node_public_key_bytes

    forged = base64.b64encode(node_public_key_bytes(other)).decode()
    with _client(a, a.coordinator_ca) as c:
        r = c.post(f"https://{fed.fleet}/v1/fleet/pull-messages", content=b"",
                   headers={"flwr-public-key": forged})
        assert r.status_code == 403
        assert "does not belong to site 'site-a1'" in r.text
        r = c.post(f"https://{fed.fleet}/v1/fleet/pull-messages", content=b"")
        assert r.status_code == 403
        assert "must carry the site's Flower node key" in r.text


def _raw_request(files: EnrollmentFiles, address: str, target: str,
                 headers: dict[str, str]) -> bytes:
    """One request with ``target`` sent byte for byte (httpx would normalise ``..``)."""
    ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
    ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        tls.sendall(f"POST {target} HTTP/1.1\r\nHost: {address}\r\n{head}"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("target", [
    "/v1/fleet/../control/list-runs",            # a client library removes the ..
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/..%2fcontrol/list-runs",
    "//v1/control/list-runs",
    "/v1/fleet//../../v1/control/list-runs",
    "/v1/fleet/pull-messages/../../control/stop-run",
    "/health/../v1/control/list-runs",
    "/v1/fleet\\..\\control\\list-runs",
])
def test_no_path_trick_reaches_the_control_api(fed: Federation, tmp_path: Path,
                                               target: str) -> None:
    files = _enrolled(fed, f"site-{hashlib.sha256(target.encode()).hexdigest()[:8]}", tmp_path)
    node_key = (files.keys / "node_key.pub").read_text()
    from fedward.flower.control import node_public_key_bytes

    own_key = base64.b64encode(node_public_key_bytes(node_key)).decode()
    reply = _raw_request(files, fed.fleet, target, {"flwr-public-key": own_key})
    assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
    assert b"only the Flower fleet API" in reply


def test_a_site_enrolls_again_with_its_node_key_for_a_new_certificate(
        fed: Federation, tmp_path: Path) -> None:
    """What a CA rotation asks of every site: a new token, a new TLS key and certificate,
    the same Flower node key (which the SuperLink already knows and would not register
    twice)."""
    files = _enrolled(fed, "site-again", tmp_path)
    before = fed.api("GET", "/sites/site-again").json()
    node_key = (files.keys / "node_key.pub").read_text()
    for old in (files.site_cert, files.site_key):
        old.rename(old.with_name(old.name + ".old"))
    assert enroll(root=files.root, gateway=fed.fleet, token=fed.enrollment_token("site-again")) \
        == "site-again"
    after = fed.api("GET", "/sites/site-again").json()
    assert after["status"] == "registered"
    assert after["flower_node_id"] == before["flower_node_id"]
    assert (files.keys / "node_key.pub").read_text() == node_key
    assert files.site_cert.read_bytes() != (files.site_cert.with_name("site-tls.pem.old")
                                            .read_bytes())
    with _client(files, files.coordinator_ca) as c:
        assert c.get(f"https://{fed.fleet}/health").status_code == 200


def test_token_reuse_typo_expiry_and_wrong_ca_pin_are_refused(fed: Federation,
                                                              tmp_path: Path) -> None:
    token = fed.enrollment_token("site-tok")
    assert enroll(root=tmp_path / "one", gateway=fed.fleet, token=token) == "site-tok"
    with pytest.raises(EnrollError, match="already used"):
        enroll(root=tmp_path / "two", gateway=fed.fleet, token=token)
    with pytest.raises(EnrollError, match="not a Fedward enrollment token"):
        enroll(root=tmp_path / "three", gateway=fed.fleet, token=token[:-3] + " x")
    # One character of the secret or of the pin mistyped: a typo, said before anything is
    # sent, not "unknown token" or "wrong coordinator".
    fresh = fed.enrollment_token("site-typo")
    parts = parse_enrollment_token(fresh)
    for typo in (fresh.replace(parts.secret, parts.secret[:5] + ("A" if parts.secret[5] != "A"
                                                                   else "B") + parts.secret[6:]),
                 fresh.replace(parts.ca_pin, ("1" if parts.ca_pin[0] != "1" else "2")
                               + parts.ca_pin[1:])):
        with pytest.raises(EnrollError, match="has a typo"):
            enroll(root=tmp_path / "typo", gateway=fed.fleet, token=typo)
    assert not (tmp_path / "typo").exists()
    assert enroll(root=tmp_path / "typo-fixed", gateway=fed.fleet, token=fresh) == "site-typo"
    # A well-formed token made for another CA: the coordinator reached is not the one that
    # issued it (wrong address, or a CA rotated since).
    parts = parse_enrollment_token(fed.enrollment_token("site-pin"))
    wrong_pin = format_enrollment_token(site=parts.site, secret=parts.secret, ca_pin="0" * 32)
    with pytest.raises(EnrollError, match="does not match your token"):
        enroll(root=tmp_path / "four", gateway=fed.fleet, token=wrong_pin)
    # Nothing half-written: no certificate, so the site is simply not enrolled.
    assert not EnrollmentFiles(tmp_path / "four").enrolled
    expired = fed.enrollment_token("site-exp")
    import sqlite3

    db = sqlite3.connect(fed.home / "coordinator.db")
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    db.execute("UPDATE enrollment_tokens SET expires_at = ? WHERE used_at IS NULL", (past,))
    db.commit()
    db.close()
    with pytest.raises(EnrollError, match="expired"):
        enroll(root=tmp_path / "five", gateway=fed.fleet, token=expired)


def _listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:   # 0A = LISTEN
                ip_hex = fields[1].split(":")[0]
                if len(ip_hex) == 8:
                    found.add(".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add(ip_hex)
    return found


def test_enrolled_sites_train_through_the_gateway_and_listen_on_no_host_port() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        for s in fed.data["sites"]:
            out = fed.coord_cli("enroll-token", s["name"], "--json")
            token = json.loads(out.stdout)["token"]
            root = work / "sites" / s["name"]
            run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway",
                     fed.fleet, "--token", token, "--data", s["csv"], "--schema", s["schema"],
                     "--project", "test"])
            fed.sites[s["name"]] = Site(name=s["name"], root=root)
            fed.start_site(s["name"])
        fed.wait_online(2)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        run = fed.wait_run(run_id)
        assert run["status"] == "completed", run
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert all(sorted(r["participating_sites"]) ==
                   sorted(s["name"] for s in fed.data["sites"]) for r in rounds)
        for site in fed.sites.values():
            assert site.proc is not None
            tree = {site.proc.pid, *descendants(site.proc.pid)}
            # The tunnel and the SuperNode's runtime API are Unix sockets that only the
            # site's account may open; the SuperNode's own ports are in its namespace.
            assert _listening_addresses(tree) == set()
            run_dir = site.root / "run"
            assert run_dir.stat().st_mode & 0o777 == 0o700
            for name in ("tunnel.sock", "supernode.sock", "trainer.sock", "wake.sock"):
                assert (run_dir / name).stat().st_mode & 0o777 == 0o600, name
            # Each enrolled agent told the coordinator its versions when it started.
            assert "the coordinator has this agent's versions" in \
                (site.log or Path()).read_text(errors="replace")


def test_a_site_renews_its_certificate_before_expiry_without_a_token(
        fed: Federation, tmp_path: Path) -> None:
    from cryptography import x509

    from site_agent.connect import open_route
    from site_agent.enroll import renew

    files = _enrolled(fed, "site-renew", tmp_path)
    old = x509.load_pem_x509_certificate(files.site_cert.read_bytes()).serial_number
    route = open_route(root=files.root, superlink=fed.fleet,   # a running agent's tunnel
                       ca_cert=files.coordinator_ca)
    assert route.tunnel is not None
    try:
        old_pair = (files.root / "old.pem", files.root / "old.key")
        old_pair[0].write_bytes(files.site_cert.read_bytes())
        old_pair[1].write_bytes(files.site_key.read_bytes())
        renew(root=files.root, gateway=fed.fleet)
        new = x509.load_pem_x509_certificate(files.site_cert.read_bytes()).serial_number
        assert new != old
        with _client(files, files.coordinator_ca) as c:
            assert c.get(f"https://{fed.fleet}/health").status_code == 200
        # The old certificate is retired at once: the site holds one valid certificate.
        ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
        ctx.load_cert_chain(str(old_pair[0]), str(old_pair[1]))
        with httpx.Client(verify=ctx, timeout=10) as c:
            r = c.get(f"https://{fed.fleet}/health")
            assert r.status_code == 403 and "replaced by a renewal" in r.text
        db = sqlite3.connect(fed.home / "coordinator.db")
        valid = db.execute("SELECT serial FROM site_certificates JOIN sites ON sites.id = "
                           "site_certificates.site_id WHERE sites.name = 'site-renew' AND "
                           "revoked_at IS NULL").fetchall()
        db.close()
        assert valid == [(format(new, "x"),)]
        # The running tunnel presents the renewed certificate from its next connection on.
        assert route.upstream == f"unix:{files.root / 'run' / 'tunnel.sock'}"
        local = httpx.Client(transport=httpx.HTTPTransport(
            uds=route.upstream[5:], verify=ssl.create_default_context(
                cafile=str(route.root_certificates))), timeout=10)
        with local:
            assert local.get("https://127.0.0.1/health").status_code == 200
    finally:
        route.tunnel.stop()
    events = fed.api("GET", "/audit?limit=500").json()
    items = events["items"] if isinstance(events, dict) else events
    assert any(e["action"] == "site.cert_renewed" and e["subject"] == "site-renew"
               for e in items)


def test_repeated_flower_headers_are_refused_and_forwarding_headers_never_reach_the_superlink(
        fed: Federation, tmp_path: Path) -> None:
    from fedward.flower.control import node_public_key_bytes

    files = _enrolled(fed, "site-dup", tmp_path)
    other = _enrolled(fed, "site-dup-other", tmp_path)
    keys = [base64.b64encode(node_public_key_bytes((f.keys / "node_key.pub").read_text())
                             ).decode() for f in (files, other)]
    # Flower would trust the first key (the other site's); the gateway checked the last.
    for target, headers in [("/v1/fleet/pull-messages", [keys[1], keys[0]])]:
        ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
        ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
        host, port = fed.fleet.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            head = "".join(f"flwr-public-key: {k}\r\n" for k in headers)
            tls.sendall(f"POST {target} HTTP/1.1\r\nHost: {fed.fleet}\r\n{head}"
                        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
        assert b"flwr-public-key more than once" in reply
    # The SuperLink's access log names each fleet call's client: the gateway, never an
    # address the site made up (its server would take one from 127.0.0.1 at its word).
    log = fed.home / "superlink" / "superlink.log"
    path = "/v1/fleet/pull-messages"
    before = log.read_text().count(path)
    with _client(files, files.coordinator_ca) as c:
        r = c.post(f"https://{fed.fleet}{path}", content=b"",
                   headers={"flwr-public-key": keys[0], "X-Forwarded-For": "198.51.100.23",
                            "X-Real-IP": "198.51.100.23", "Forwarded": "for=198.51.100.23"})
        assert r.status_code != 403, r.text   # the gateway let it through
    deadline = time.monotonic() + 10
    while log.read_text().count(path) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.read_text().count(path) > before
    assert "198.51.100.23" not in log.read_text()


def test_revoking_a_site_unregisters_its_flower_node(fed: Federation, tmp_path: Path) -> None:
    from flwr.proto.control_pb2 import ListNodesRequest

    from fedward.flower.control import FlowerControl

    _enrolled(fed, "site-gone", tmp_path)
    node_id = int(fed.api("GET", "/sites/site-gone").json()["flower_node_id"])
    control = FlowerControl(address=fed.superlink, ca_cert=fed.home / "pki" / "ca.pem")

    def status() -> str:
        client = control._client()
        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        finally:
            client.close()
        return next(str(n.status) for n in nodes if int(n.node_id) == node_id)

    assert status() != "unregistered"
    r = fed.api("POST", "/sites/site-gone/revoke", {"reason": "hospital left the project"})
    assert r.status_code == 200, r.text
    assert status() == "unregistered"
    assert any(e["action"] == "site.unregistered" and e["subject"] == "site:site-gone"
               for e in fed.audit_events())


def test_the_gateway_serves_sites_while_wrong_logins_flood_the_api(
        fed: Federation, tmp_path: Path) -> None:
    files = _enrolled(fed, "site-busy", tmp_path)
    stop = threading.Event()
    statuses: list[int] = []

    def flood() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{fed.api_port}/api/v1",
                          timeout=60) as api:
            while not stop.is_set():
                r = api.post("/login", json={"name": "admin", "password": "not the password"})
                statuses.append(r.status_code)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(24)]
    for t in threads:
        t.start()
    slowest = 0.0
    answers: list[int] = []
    try:
        with _client(files, files.coordinator_ca) as c:
            deadline = time.monotonic() + 15   # several registry reads (one per 2 s)
            while time.monotonic() < deadline:
                started = time.monotonic()
                answers.append(c.get(f"https://{fed.fleet}/health").status_code)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.25)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert set(answers) == {200}, answers
    assert slowest < 5.0, f"a site waited {slowest:.1f} s"
    assert statuses and set(statuses) <= {401, 429}, sorted(set(statuses))
    assert 429 in statuses


def test_a_running_site_renews_mid_run_and_keeps_taking_part() -> None:
    """Renewal retires the certificate the running agent's open connections use: they are
    closed at their next request and Flower's client reconnects with the new one."""
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        for s in fed.data["sites"]:
            token = json.loads(fed.coord_cli("enroll-token", s["name"], "--json").stdout)["token"]
            root = work / "sites" / s["name"]
            run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway",
                     fed.fleet, "--token", token, "--data", s["csv"], "--schema", s["schema"],
                     "--project", "test"])
            fed.sites[s["name"]] = Site(name=s["name"], root=root)
            fed.start_site(s["name"])
        fed.wait_online(2)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=4, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        fed.wait_round(run_id, 1, interval=0.5)
        first = fed.data["sites"][0]["name"]
        out = run_cli([str(BIN / "fedward-site"), "renew", "--dir",
                       str(fed.sites[first].root)])
        assert "certificate renewed" in out.stdout
        run = fed.wait_run(run_id)
        assert run["status"] == "completed", run
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert all(r["participating_sites"] == sorted(fed.sites) for r in rounds), rounds
        assert any("replaced by a renewal" in line
                   for line in (work / "coordinator.log").read_text().splitlines())


def test_a_site_reports_its_versions_at_enrollment_and_renewal_and_bad_ones_are_dropped(
        fed: Federation, tmp_path: Path) -> None:
    from importlib.metadata import version

    from fedward import __version__
    from fedward.agent_versions import local_versions
    from site_agent.enroll import renew, report_versions

    def listed(name: str) -> dict[str, object]:
        rows = json.loads(run_cli([str(BIN / "fedward-coordinator"), "sites", "--json"],
                                  env=fed.env).stdout)
        return next(r for r in rows if r["name"] == name)

    files = _enrolled(fed, "site-vers", tmp_path)
    row = listed("site-vers")
    assert (row["agent_version"], row["flower_version"], row["versions_via"]) == (
        __version__, version("flwr"), "enrollment")
    assert str(row["certificate_expires_at"])[:4].isdigit()
    table = run_cli([str(BIN / "fedward-coordinator"), "sites"],
                    env={**fed.env, "COLUMNS": "300"}).stdout
    assert __version__ in table and version("flwr") in table

    # An agent of an earlier release (as the coordinator last heard) renews: the new
    # versions replace the old ones, and the change is audited.
    db = sqlite3.connect(fed.home / "coordinator.db")
    db.execute("UPDATE sites SET agent_version = '0.0.1' WHERE name = 'site-vers'")
    db.commit()
    db.close()
    renew(root=files.root, gateway=fed.fleet)
    row = listed("site-vers")
    assert (row["agent_version"], row["versions_via"]) == (__version__, "renewal")
    events = fed.api("GET", "/audit?limit=500").json()
    items = events["items"] if isinstance(events, dict) else events
    assert any(e["action"] == "site.versions" and e["subject"] == "site-vers"
               and e["detail"]["previous"]["fedward"] == "0.0.1"
               and e["detail"]["via"] == "renewal" for e in items)

    # A restarted agent (fedward-site start calls this) reports its versions at once.
    db = sqlite3.connect(fed.home / "coordinator.db")
    db.execute("UPDATE sites SET agent_version = '0.0.2' WHERE name = 'site-vers'")
    db.commit()
    db.close()
    assert report_versions(root=files.root, gateway=fed.fleet) is True
    row = listed("site-vers")
    assert (row["agent_version"], row["versions_via"]) == (__version__, "start")
    with _client(files, files.coordinator_ca) as c:
        hostile = c.post(f"https://{fed.fleet}/fedward/versions",
                         json={"versions": {"fedward": "1.0\nforged line"}})
        assert hostile.status_code == 200 and hostile.json() == {"stored": False}
        assert c.post(f"https://{fed.fleet}/fedward/versions", content=b"{}",
                      headers={"content-type": "text/plain"}).status_code == 415
    with _client(None, files.coordinator_ca) as c:
        assert c.post(f"https://{fed.fleet}/fedward/versions",
                      json={"versions": local_versions()}).status_code == 403
    assert listed("site-vers")["agent_version"] == __version__

    # A hostile version is never stored: the enrollment goes through, the versions do not.
    token = fed.enrollment_token("site-hostile")
    key = ec.generate_private_key(ec.SECP256R1())
    node_public = ensure_node_key(tmp_path / "hostile_node", tmp_path / "hostile_node.pub")
    ca = tmp_path / "coordinator-ca.pem"
    ca.write_bytes(files.coordinator_ca.read_bytes())
    with _client(None, ca) as c:
        r = c.post(f"https://{fed.fleet}/fedward/enroll", json={
            "token": token, "csr_pem": make_csr(key, "site-hostile").decode(),
            "node_public_key": node_public,
            "versions": {"fedward": "<script>alert(1)</script>", "flower": "1.42.0"}})
    assert r.status_code == 200, r.text
    row = listed("site-hostile")
    assert row["status"] == "registered"
    assert (row["agent_version"], row["flower_version"]) == (None, None)
