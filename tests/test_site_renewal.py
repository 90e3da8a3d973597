"""Enrollment and renewal edges at the site: a renewal cut short never leaves the site with
a key that does not match its certificate (the next start completes it or drops it); enroll
refuses on an enrolled site and checks its own inputs before it spends a token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedward.certs import write_private_key
from site_agent.enroll import EnrollmentFiles, finish_interrupted_renewal


def _pair() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hospital-a")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def site(tmp_path: Path) -> tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]:
    files = EnrollmentFiles(tmp_path)
    files.keys.mkdir(parents=True)
    old_key, old_cert = _pair()
    write_private_key(files.site_key, old_key)
    files.site_cert.write_bytes(old_cert)
    new_key, new_cert = _pair()
    return files, old_cert, new_key, new_cert


def _new(files: EnrollmentFiles) -> tuple[Path, Path]:
    return (files.site_key.with_name("site-tls.key.new"),
            files.site_cert.with_name("site-tls.pem.new"))


def _matches(files: EnrollmentFiles) -> bool:
    key = serialization.load_pem_private_key(files.site_key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(files.site_cert.read_bytes())
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_nothing_to_do_on_a_clean_site(
        site: tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]) -> None:
    files, old_cert, _, _ = site
    assert finish_interrupted_renewal(files) is None
    assert files.site_cert.read_bytes() == old_cert and _matches(files)


def test_crash_between_the_two_moves_is_rolled_forward(
        site: tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]) -> None:
    files, _, new_key, new_cert = site
    _, cert_new = _new(files)
    write_private_key(files.site_key, new_key)   # the key was moved ...
    cert_new.write_bytes(new_cert)               # ... the certificate was not
    assert not _matches(files)
    assert finish_interrupted_renewal(files) == "completed an interrupted certificate renewal"
    assert files.site_cert.read_bytes() == new_cert and _matches(files)
    assert not cert_new.exists()


def test_crash_before_the_moves_is_rolled_forward(
        site: tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]) -> None:
    files, _, new_key, new_cert = site
    key_new, cert_new = _new(files)
    write_private_key(key_new, new_key)
    cert_new.write_bytes(new_cert)
    assert finish_interrupted_renewal(files) is not None
    assert files.site_cert.read_bytes() == new_cert and _matches(files)
    assert not key_new.exists() and not cert_new.exists()


def test_a_key_without_its_certificate_is_dropped(
        site: tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]) -> None:
    files, old_cert, new_key, _ = site
    key_new, _ = _new(files)
    write_private_key(key_new, new_key)          # crash before the certificate was written
    assert finish_interrupted_renewal(files) is not None
    assert files.site_cert.read_bytes() == old_cert and _matches(files)
    assert not key_new.exists()


def test_a_certificate_that_matches_no_key_is_dropped(
        site: tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]) -> None:
    files, old_cert, _, _ = site
    _, cert_new = _new(files)
    cert_new.write_bytes(_pair()[1])             # someone else's certificate
    assert "discarded" in (finish_interrupted_renewal(files) or "")
    assert files.site_cert.read_bytes() == old_cert and _matches(files)
    assert not cert_new.exists()


def test_enroll_on_an_enrolled_site_says_so_and_changes_nothing(
        site: tuple[EnrollmentFiles, bytes, ec.EllipticCurvePrivateKey, bytes]) -> None:
    from typer.testing import CliRunner

    from site_agent.cli import app

    files, old_cert, _, _ = site
    res = CliRunner().invoke(app, ["enroll", "--dir", str(files.root), "--gateway",
                                   "127.0.0.1:9", "--token", "fw1.hospital-a.x.y.z"])
    assert res.exit_code != 0
    assert "enrolled already" in res.output and "fedward-site renew" in res.output
    assert files.site_cert.read_bytes() == old_cert


def test_a_certificate_date_failure_points_at_the_clock() -> None:
    import ssl

    from site_agent.enroll import _clock_hint

    err = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                          "verify failed: certificate is not yet valid")
    assert "clock" in _clock_hint(err) and "doctor" in _clock_hint(err)
    assert _clock_hint(ConnectionRefusedError("refused")) == ""


def test_a_site_clock_an_hour_behind_is_named_as_the_likely_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import ssl
    import threading

    import fedward.certs as certs
    from site_agent.connect import probe_coordinator

    files = certs.ensure_ca(tmp_path / "pki")
    real_now = certs._now
    # The coordinator's clock is an hour ahead of this one: its certificate starts later.
    monkeypatch.setattr(certs, "_now", lambda: real_now() + timedelta(hours=1))
    certs.issue_server_cert(files)
    monkeypatch.setattr(certs, "_now", real_now)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        problem = probe_coordinator(f"127.0.0.1:{listener.getsockname()[1]}", files.ca_cert,
                                    timeout=5)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert problem is not None and "clock" in problem and "not yet valid" in problem


@pytest.mark.parametrize("missing", ["data", "schema"])
def test_enroll_checks_the_data_and_schema_paths_before_it_spends_the_token(
        tmp_path: Path, missing: str) -> None:
    from typer.testing import CliRunner

    from site_agent.cli import app
    from site_agent.datasets import write_demo_federation

    demo = write_demo_federation(task="breast_cancer_mlp", out_dir=tmp_path / "demo",
                                 n_sites=1).sites[0]
    data = tmp_path / "nowhere.csv" if missing == "data" else demo.csv_path
    schema = tmp_path / "nowhere.json" if missing == "schema" else demo.schema_path
    root = tmp_path / "site"
    # Nothing listens on port 9: had enroll contacted the coordinator, it would say so.
    res = CliRunner().invoke(app, ["enroll", "--dir", str(root), "--gateway", "127.0.0.1:9",
                                   "--token", "fw1.hospital-a.x.y.z", "--data", str(data),
                                   "--schema", str(schema)])
    assert res.exit_code != 0
    said = " ".join(res.output.split())   # the console wraps long lines
    assert "nowhere" in said and "the token is still unused" in said
    assert not (root / "keys").exists() and not (root / "site.json").exists()


def test_enroll_into_a_study_checks_the_mapping_before_it_spends_the_token(
        tmp_path: Path) -> None:
    """`enroll --study --mapping`: a mapping that does not fit the data is named, with the
    token still unused, and nothing is written; one that fits passes the check and goes on
    to the token (here a made-up one: the refusal then names the token, not the mapping)."""
    from typer.testing import CliRunner

    from fedward.tasks import example_spec_path
    from site_agent.cli import app
    from site_agent.datasets import write_demo_federation

    demo = write_demo_federation(task="breast_cancer_mlp", out_dir=tmp_path / "demo",
                                 n_sites=1).sites[0]
    spec = example_spec_path("breast_cancer_mlp")
    mapping = tmp_path / "mapping.yaml"
    made = CliRunner().invoke(app, ["mapping", "template", "--data", str(demo.csv_path),
                                    "--study", str(spec), "--out", str(mapping)])
    assert made.exit_code == 0, made.output
    root = tmp_path / "site"
    argv = ["enroll", "--dir", str(root), "--gateway", "127.0.0.1:9", "--token",
            "fw1.hospital-a.x.y.z", "--data", str(demo.csv_path), "--study", str(spec),
            "--mapping", str(mapping)]
    # The template leaves the label's codes blank: not a mapping yet.
    res = CliRunner().invoke(app, argv)
    said = " ".join(res.output.split())
    assert res.exit_code != 0 and "mapping" in said and "label" in said, said
    assert "the token is still unused" in said
    assert not (root / "keys").exists() and not (root / "site.json").exists()
    mapping.write_text(mapping.read_text().replace("'0': ''", "'0': malignant")
                       .replace("'1': ''", "'1': benign"))
    res = CliRunner().invoke(app, argv)
    said = " ".join(res.output.split())
    assert res.exit_code != 0 and "the token is still unused" not in said, said
    assert "this is not a Fedward enrollment token" in said, said
    assert "problem(s) mapping" not in said
    assert not (root / "site.json").exists()
