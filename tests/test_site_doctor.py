"""``fedward-site doctor``: every check's failure path says what is wrong and how to fix it.

The network checks talk to a real HTTPS server on 127.0.0.1 with a certificate from the
coordinator's PKI, whose ``Date`` header the test controls.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedward.certs import CAFiles, ensure_ca, issue_server_cert
from site_agent import doctor, doctor_coordinator, doctor_site
from site_agent.cli import app as site_cli
from site_agent.config import SiteConfig, SitePaths
from site_agent.datasets import write_demo_federation
from site_agent.keys import ensure_node_key

NOW = dt.datetime.now(dt.UTC)


# --- PKI and a local HTTPS server ----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CAFiles:
    files = ensure_ca(tmp_path_factory.mktemp("pki"))
    issue_server_cert(files)
    return files


def make_cert(path: Path, *, not_before: dt.datetime, not_after: dt.datetime,
              ca: CAFiles | None = None) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 with the given validity (self-signed without ``ca``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    issuer, signer = subject, key
    if ca is not None:
        issuer = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes()).subject
        loaded = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer = loaded
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(signer, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path, key_path


class DateServer:
    """HTTPS on 127.0.0.1 answering every GET with 200 and the ``Date`` that ``date`` gives."""

    def __init__(self, cert: Path, key: Path, date: Callable[[], str | None]) -> None:
        outer = self
        self.date = date
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response_only(200)
                value = outer.date()
                if value is not None:
                    self.send_header("Date", value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # The handshake happens in the request's thread, not in the accept loop.
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True,
                                            do_handshake_on_connect=False)
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def serve(pki: CAFiles) -> Iterator[Callable[..., DateServer]]:
    servers: list[DateServer] = []

    def start(date: Callable[[], str | None] = lambda: formatdate(usegmt=True),
              cert: tuple[Path, Path] | None = None) -> DateServer:
        cert_path, key_path = cert or (pki.server_cert, pki.server_key)
        server = DateServer(cert_path, key_path, date)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# --- clock skew ------------------------------------------------------------------------


def test_clock_in_step_with_the_coordinator_is_ok(
    pki: CAFiles, serve: Callable[..., DateServer],
) -> None:
    server = serve()
    skew = doctor_coordinator.measure_clock_skew(server.address, pki.ca_cert)
    assert abs(skew) < 2
    check = doctor_coordinator.check_clock_skew(server.address, pki.ca_cert)
    assert check.status == "ok" and "of the coordinator's clock" in check.message
    assert server.requests == 2


@pytest.mark.parametrize(("offset_s", "direction"), [(-300, "ahead of"), (180, "behind")])
def test_a_skewed_clock_fails_and_says_to_enable_ntp(
    pki: CAFiles, serve: Callable[..., DateServer], offset_s: int, direction: str,
) -> None:
    server = serve(lambda: formatdate(time.time() + offset_s, usegmt=True))
    skew = doctor_coordinator.measure_clock_skew(server.address, pki.ca_cert)
    assert abs(skew + offset_s) < 2
    check = doctor_coordinator.check_clock_skew(server.address, pki.ca_cert)
    assert check.status == "fail"
    assert f"s {direction} the coordinator's (the limit is 60 s)" in check.message
    assert f"this site's clock is {abs(offset_s) - 1}" in check.message or \
        f"this site's clock is {abs(offset_s)}" in check.message or \
        f"this site's clock is {abs(offset_s) + 1}" in check.message
    assert "timedatectl set-ntp true" in check.message


def test_a_small_skew_within_the_limit_is_ok(
    pki: CAFiles, serve: Callable[..., DateServer],
) -> None:
    server = serve(lambda: formatdate(time.time() - 30, usegmt=True))
    assert doctor_coordinator.check_clock_skew(server.address, pki.ca_cert).status == "ok"


def test_no_date_header_means_the_skew_is_not_measured(
    pki: CAFiles, serve: Callable[..., DateServer],
) -> None:
    server = serve(lambda: None)
    check = doctor_coordinator.check_clock_skew(server.address, pki.ca_cert)
    assert check.status == "skip" and "sent no Date header" in check.message


def test_a_coordinator_certificate_not_yet_valid_points_at_the_site_clock(
    pki: CAFiles, serve: Callable[..., DateServer], tmp_path: Path,
) -> None:
    future = make_cert(tmp_path / "future.pem", ca=pki,
                       not_before=NOW + dt.timedelta(days=2),
                       not_after=NOW + dt.timedelta(days=30))
    server = serve(cert=future)
    check = doctor_coordinator.check_clock_skew(server.address, pki.ca_cert)
    assert check.status == "fail"
    assert "certificate is not yet valid" in check.message
    assert "the site clock is probably wrong" in check.message


def test_an_unreachable_coordinator_skips_the_clock_check(pki: CAFiles) -> None:
    check = doctor_coordinator.check_clock_skew(closed_port(), pki.ca_cert, timeout=2)
    assert check.status == "skip" and "did not answer" in check.message


# --- reachability ------------------------------------------------------------------------


def test_reachability_ok_and_fail(pki: CAFiles, serve: Callable[..., DateServer],
                                  tmp_path: Path) -> None:
    server = serve()
    assert doctor_coordinator.check_reachability(server.address, pki.ca_cert).status == "ok"
    address = closed_port()
    check = doctor_coordinator.check_reachability(address, pki.ca_cert, timeout=2)
    assert check.status == "fail"
    assert f"the coordinator at {address} is not reachable" in check.message
    assert "firewall allows outbound TCP" in check.message
    other = ensure_ca(tmp_path / "other")
    check = doctor_coordinator.check_reachability(server.address, other.ca_cert)
    assert check.status == "fail" and "the site's CA does not trust" in check.message


# --- certificates ------------------------------------------------------------------------


def test_ca_certificate_states(pki: CAFiles, tmp_path: Path) -> None:
    ok = doctor_coordinator.check_ca_cert(pki.ca_cert)
    assert ok.status == "ok" and "days left" in ok.message
    missing = doctor_coordinator.check_ca_cert(tmp_path / "nope.pem")
    assert missing.status == "fail" and "does not exist" in missing.message
    assert "get the current ca.pem from the coordinator team" in missing.message
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert "cannot be read" in doctor_coordinator.check_ca_cert(tmp_path / "junk.pem").message
    expired, _ = make_cert(tmp_path / "old.pem", not_before=NOW - dt.timedelta(days=400),
                           not_after=NOW - dt.timedelta(days=10))
    check = doctor_coordinator.check_ca_cert(expired)
    assert check.status == "fail" and "expired on" in check.message
    assert "(10 days ago)" in check.message
    soon, _ = make_cert(tmp_path / "soon.pem", not_before=NOW - dt.timedelta(days=1),
                        not_after=NOW + dt.timedelta(days=5, hours=1))
    check = doctor_coordinator.check_ca_cert(soon)
    assert check.status == "warn" and "in 5 days" in check.message
    future, _ = make_cert(tmp_path / "future.pem", not_before=NOW + dt.timedelta(days=1),
                          not_after=NOW + dt.timedelta(days=100))
    check = doctor_coordinator.check_ca_cert(future)
    assert check.status == "fail" and "the site clock is probably wrong" in check.message


def test_site_certificate_is_skipped_until_enrolled_and_checked_after(tmp_path: Path) -> None:
    paths = SitePaths(tmp_path)
    assert doctor_coordinator.check_site_cert(paths).status == "skip"
    paths.keys.mkdir()
    make_cert(paths.site_cert, not_before=NOW - dt.timedelta(days=100),
              not_after=NOW - dt.timedelta(days=1))
    check = doctor_coordinator.check_site_cert(paths)
    assert check.status == "fail" and "the site's TLS certificate expired" in check.message
    assert "enroll again" in check.message


# --- node key, registration --------------------------------------------------------------


def test_node_key_states(tmp_path: Path) -> None:
    paths = SitePaths(tmp_path)
    check = doctor_site.check_node_key(paths)
    assert check.status == "fail" and "fedward-site keygen" in check.message
    ensure_node_key(paths.node_key, paths.node_public_key)
    assert doctor_site.check_node_key(paths).status == "ok"
    os.chmod(paths.node_key, 0o644)
    check = doctor_site.check_node_key(paths)
    assert check.status == "fail" and "mode 0644" in check.message
    assert f"chmod 600 {paths.node_key}" in check.message
    os.chmod(paths.node_key, 0o600)
    paths.node_key.write_text("garbage")
    check = doctor_site.check_node_key(paths)
    assert check.status == "fail" and "cannot be read as a node key" in check.message


def write_log(paths: SitePaths, text: str, *, age_s: float = 0.0) -> None:
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = paths.logs / "supernode.log"
    log.write_text(text)
    when = time.time() - age_s
    os.utime(log, (when, when))


def test_registration_refused_says_what_to_send(tmp_path: Path) -> None:
    paths = SitePaths(tmp_path)
    assert doctor_coordinator.check_registration(paths).status == "skip"
    ensure_node_key(paths.node_key, paths.node_public_key)
    write_log(paths, "INFO Starting\nERROR Node not registered\nExit Code: 305\n")
    check = doctor_coordinator.check_registration(paths, config_name="hospital-a")
    assert check.status == "fail"
    assert "the key is not registered" in check.message
    assert "fedward-coordinator add-site hospital-a --node-key node_key.pub" in check.message
    assert "fingerprint SHA256:" in check.message
    # An enrolled site registered its key at enrollment: add-site is not its remedy.
    paths.site_cert.write_text("enrolled")
    check = doctor_coordinator.check_registration(paths, config_name="hospital-a")
    assert "fedward-coordinator sites" in check.message and "add-site" not in check.message
    paths.site_cert.unlink()
    write_log(paths, "Exit Code: 305\n", age_s=3 * 3600)
    assert doctor_coordinator.check_registration(paths).status == "warn"
    write_log(paths, "Exit Code: 305\nINFO SuperNode ID: 123456\nINFO [RUN 4]\n")
    check = doctor_coordinator.check_registration(paths)
    assert check.status == "ok" and "SuperNode ID 123456" in check.message
    # Refused because the coordinator still counts the crashed agent's node as online: not a
    # registration problem (Flower's own wording, as the SuperNode logs it).
    write_log(paths, "INFO SuperNode ID: 1\nERROR Exit Code: 305\nFailed to initialize the "
                     "connection to the SuperLink.\n[code: 2004] Failed to activate "
                     "SuperNode.\n")
    check = doctor_coordinator.check_registration(paths, config_name="hospital-a")
    assert check.status == "warn" and "add-site" not in check.message
    assert "still counted this site's previous connection as active" in check.message
    write_log(paths, "INFO SuperNode ID: 1\nExit Code: 606\n")
    check = doctor_coordinator.check_registration(paths)
    assert check.status == "warn" and "another Flower version" in check.message


# --- data, policy, disk, packages ---------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, pki: CAFiles) -> Path:
    """A configured site (init through the CLI, keygen) pointing at a closed port."""
    fed = write_demo_federation(task="breast_cancer_mlp", out_dir=tmp_path / "data",
                                n_sites=2)
    root = tmp_path / "site"
    result = CliRunner().invoke(site_cli, [
        "init", "--dir", str(root), "--name", "hospital-a", "--superlink", closed_port(),
        "--ca-cert", str(pki.ca_cert), "--data", str(fed.sites[0].csv_path),
        "--schema", str(fed.sites[0].schema_path), "--project", "oncology"])
    assert result.exit_code == 0, result.output
    paths = SitePaths(root)
    ensure_node_key(paths.node_key, paths.node_public_key)
    return root


def test_data_check_fails_on_bad_or_missing_data(site: Path) -> None:
    cfg = SiteConfig.load(site)
    check, task = doctor_site.check_data(site, cfg)
    assert check.status == "ok" and task == "breast_cancer_mlp"
    data = cfg.resolve(site, cfg.data_path)
    lines = data.read_text().splitlines()
    cells = lines[2].split(",")
    cells[0] = "oops"
    lines[2] = ",".join(cells)
    data.write_text("\n".join(lines) + "\n")
    check, _ = doctor_site.check_data(site, cfg)
    assert check.status == "fail" and "wrong-type" in check.message
    assert f"fedward-site check --dir {site}" in check.message
    assert "oops" not in check.message
    data.unlink()
    check, _ = doctor_site.check_data(site, cfg)
    assert check.status == "fail" and "does not exist" in check.message


def test_policy_check_states(site: Path) -> None:
    assert doctor_site.check_policy(site, "breast_cancer_mlp").status == "ok"
    check = doctor_site.check_policy(site, "digits_cnn")
    assert check.status == "warn" and "accepts no project for this site's task" in check.message
    policy = SitePaths(site).policy
    policy.write_text(json.dumps({"version": 1, "projects": {}, "require_approval": False,
                                  "colour": 1}))
    check = doctor_site.check_policy(site, "breast_cancer_mlp")
    assert check.status == "fail" and "unknown keys ['colour']" in check.message
    policy.unlink()
    check = doctor_site.check_policy(site, "breast_cancer_mlp")
    assert check.status == "fail" and "refuses every run" in check.message
    assert "fedward-site policy init" in check.message


def test_low_disk_space_is_a_warning(tmp_path: Path) -> None:
    assert doctor_site.check_disk(tmp_path).status == "ok"
    check = doctor_site.check_disk(tmp_path, min_free=1 << 62)
    assert check.status == "warn" and "GiB free" in check.message


def test_package_versions(tmp_path: Path) -> None:
    import importlib.metadata as md

    assert doctor_site.check_packages().status == "ok"
    versions = {"fedward": "0.1.0", "flwr": "1.41.0", "torch": "2.13.0+cpu"}

    def version_of(name: str) -> str:
        if name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    check = doctor_site.check_packages(version_of=version_of)
    assert check.status == "fail"
    assert "flwr is 1.41.0, the site agent needs exactly 1.42.0" in check.message
    assert "opacus is not installed" in check.message
    assert "torch is" not in check.message  # 2.13.0+cpu is the pinned 2.13.0


# --- the privacy ledger ---------------------------------------------------------------------


def test_the_ledger_check_fails_on_what_would_stop_training(tmp_path: Path) -> None:
    import sqlite3

    from privacy import PrivacyLedger

    paths = SitePaths(tmp_path)
    assert doctor_site.check_ledger(paths).status == "ok"          # nothing spent yet
    ledger = PrivacyLedger(paths.ledger)
    ledger.open_run(run_id="r", project="p", epsilon_budget=3.0, delta=1e-5,
                    noise_multiplier=2.0, sample_rate=0.1)
    ledger.reserve_round(run_id="r", round_number=1, steps=5)
    check = doctor_site.check_ledger(paths)
    assert check.status == "ok" and "1 run(s), 1 entr(y/ies)" in check.message
    paths.ledger.chmod(0o644)
    check = doctor_site.check_ledger(paths)
    assert check.status == "warn" and "chmod 600" in check.message
    paths.ledger.chmod(0o600)
    con = sqlite3.connect(paths.ledger)
    try:
        con.execute("UPDATE entries SET mechanism = '{\"type\": \"SkellamRound\"}'")
        con.commit()
    finally:
        con.close()
    check = doctor_site.check_ledger(paths)
    assert check.status == "fail"
    assert "entry 1 (run 'r', round) records mechanism type 'SkellamRound'" in check.message


# --- all together -------------------------------------------------------------------------


def test_doctor_on_an_empty_directory_fails_with_what_to_do(tmp_path: Path) -> None:
    checks = {c.name: c for c in doctor.run_doctor(tmp_path)}
    assert checks["site configuration"].status == "fail"
    assert "fedward-site init" in checks["site configuration"].message
    assert checks["data against schema"].status == "skip"
    assert checks["site policy"].status == "fail"
    assert checks["node key"].status == "fail"
    assert checks["clock skew"].status == "skip"
    result = CliRunner().invoke(site_cli, ["doctor", "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["ok"] is False


def test_doctor_on_a_healthy_site_passes(site: Path, serve: Callable[..., DateServer]) -> None:
    server = serve()
    cfg = SiteConfig.load(site)
    SiteConfig.from_dict({**cfg.__dict__, "superlink": server.address}).save(site)
    result = CliRunner().invoke(site_cli, ["doctor", "--dir", str(site), "--json"])
    report = json.loads(result.output)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert result.exit_code == 0, report
    assert statuses == {
        "site configuration": "ok", "data against schema": "ok", "site policy": "ok",
        "node key": "ok", "coordinator CA certificate": "ok", "site certificate": "skip",
        "clock skew": "ok", "coordinator reachable": "ok", "node registration": "skip",
        "privacy ledger": "ok", "disk space": "ok", "package versions": "ok",
    }
    human = CliRunner().invoke(site_cli, ["doctor", "--dir", str(site)])
    assert human.exit_code == 0 and "0 failed" in human.output
