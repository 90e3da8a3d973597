"""Enrollment mistakes hospital IT makes, against a real coordinator: each gets a clear
message that says what to do, and a failed enrollment leaves nothing behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from site_agent.enroll import (
    DEFAULT_GATEWAY_PORT,
    EnrollError,
    EnrollmentFiles,
    enroll,
    gateway_address,
)
from site_agent.keys import ensure_node_key

from federation import BIN, Federation, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    with short_tmp() as work, federation(work, n_sites=1) as f:
        yield f


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_the_default_gateway_port_is_the_coordinators() -> None:
    from coordinator.settings import Settings

    assert Settings.model_fields["fleet_port"].default == DEFAULT_GATEWAY_PORT


def test_a_gateway_without_a_port_takes_the_default_and_a_bad_one_is_named() -> None:
    assert gateway_address("coordinator.example.org") == "coordinator.example.org:9092"
    assert gateway_address(" 10.0.0.5:9443 ") == "10.0.0.5:9443"
    for bad in ("coordinator.example.org:", "host:http", "host:70000", ":9092"):
        with pytest.raises(EnrollError, match="HOST:PORT"):
            gateway_address(bad)


def test_enroll_with_a_host_alone_uses_the_default_port_without_a_traceback(
        fed: Federation, tmp_path: Path) -> None:
    # Through the real command, as hospital IT types it. Port 9092 on this host may be
    # anyone's (or no one's): what matters is that the command names the address it tried
    # and ends with a message, not a traceback.
    root = tmp_path / "site"
    demo = fed.data["sites"][0]
    res = run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway",
                   "127.0.0.1", "--token", fed.enrollment_token("hostonly"), "--data", demo["csv"],
                   "--schema", demo["schema"]], check=False, env=fed.env)
    said = " ".join((res.stdout + res.stderr).split())
    assert "Traceback" not in said, said
    assert "127.0.0.1:9092" in said, said
    res = run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway",
                   "127.0.0.1:http", "--token", fed.enrollment_token("hostonly"), "--data",
                   demo["csv"], "--schema", demo["schema"]], check=False, env=fed.env)
    said = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0 and "Traceback" not in said and "HOST:PORT" in said, said


def test_the_api_port_given_for_the_gateway_is_named_as_the_api_port(
        fed: Federation, tmp_path: Path) -> None:
    root = tmp_path / "site"
    with pytest.raises(EnrollError) as caught:
        enroll(root=root, gateway=f"127.0.0.1:{fed.api_port}",
               token=fed.enrollment_token("apiport"))
    said = str(caught.value)
    assert "the coordinator's web API" in said and "not the site gateway" in said, said
    assert "site gateway on HOST:PORT" in said and str(DEFAULT_GATEWAY_PORT) in said, said
    assert _files(root) == set()
    # The same token still works at the right port: nothing was sent with it.
    assert enroll(root=root, gateway=fed.fleet, token=fed.enrollment_token("apiport")) == "apiport"


def test_a_refused_enrollment_leaves_no_keys_and_a_retry_works(fed: Federation,
                                                               tmp_path: Path) -> None:
    token = fed.enrollment_token("refused")
    assert enroll(root=tmp_path / "first", gateway=fed.fleet, token=token) == "refused"
    # The same token again (already used): the coordinator refuses after the site made its
    # keys and fetched the CA. None of that may stay.
    root = tmp_path / "second"
    with pytest.raises(EnrollError, match="already used"):
        enroll(root=root, gateway=fed.fleet, token=token)
    assert _files(root) == set(), _files(root)
    assert not root.exists()
    # A retry with a new token starts clean and enrolls.
    token = fed.enrollment_token("refused-2")
    assert enroll(root=root, gateway=fed.fleet, token=token) == "refused-2"
    assert EnrollmentFiles(root).enrolled


def test_a_refused_enrollment_keeps_the_keys_that_were_there(fed: Federation,
                                                             tmp_path: Path) -> None:
    files = EnrollmentFiles(tmp_path / "site")
    public = ensure_node_key(files.node_key, files.node_public_key)   # `fedward-site keygen`
    (files.root / "site.json").write_text("{}\n")
    before = _files(files.root)
    token = fed.enrollment_token("kept")
    assert enroll(root=tmp_path / "other", gateway=fed.fleet, token=token) == "kept"
    with pytest.raises(EnrollError, match="already used"):
        enroll(root=files.root, gateway=fed.fleet, token=token)
    assert _files(files.root) == before
    assert files.node_public_key.read_text().strip() == public
