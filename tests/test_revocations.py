"""The signed revocation list: what passes, and the exact refusal of everything else."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from export.bundle_format import BundleVerificationError
from export.bundle_keys import generate_release_key, public_key_path
from export.revocations import (
    RevocationSource,
    load_revocations,
    parse_revocations,
    sign_revocations,
)

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    """A release key pair; returns the private key (the public one is beside it)."""
    (tmp_path / "k").mkdir()
    generate_release_key(tmp_path / "k" / "release.pem")
    return tmp_path / "k" / "release.pem"


def signed(key: Path, *revoked: str, issued_at: datetime = NOW) -> bytes:
    return json.dumps(sign_revocations(
        revoked=[{"release_id": r, "revoked_at": NOW.isoformat(), "reason": f"{r}: recalled"}
                 for r in revoked], private_key=key, issued_at=issued_at)).encode()


def refusal(data: bytes, key: Path, **kwargs: object) -> str:
    with pytest.raises(BundleVerificationError) as info:
        parse_revocations(data, public_key=public_key_path(key), where="L", now=NOW,
                          **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_a_signed_list_verifies(key: Path) -> None:
    listed = parse_revocations(signed(key, "rel-1", "rel-2"), public_key=public_key_path(key),
                               where="L", now=NOW + timedelta(days=6))
    assert listed.revoked == {"rel-1", "rel-2"}
    assert listed.reasons["rel-2"] == "rel-2: recalled"
    assert listed.issued_at == NOW


def test_a_tampered_list_is_refused(key: Path) -> None:
    doc = json.loads(signed(key, "rel-1"))
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    payload["revoked"] = []  # someone lifts the revocation
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    assert refusal(json.dumps(doc).encode(), key).startswith(
        "bad signature: the revocation list L does not verify with the release key")


def test_a_list_signed_by_another_key_is_refused(key: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    generate_release_key(tmp_path / "other" / "release.pem")
    data = signed(tmp_path / "other" / "release.pem")
    assert "altered or signed by another key" in refusal(data, key)


@pytest.mark.parametrize("unsigned", [
    ["rel-0"],
    {"revoked": []},
    {"revoked": [{"release_id": "rel-0", "reason": "x"}], "generated_at": NOW.isoformat()},
])
def test_an_unsigned_list_is_refused(key: Path, unsigned: object) -> None:
    """The unsigned shapes earlier versions served and read: nothing vouches for them."""
    assert refusal(json.dumps(unsigned).encode(), key) == (
        "the revocation list L is not signed (it must be the signed list the coordinator "
        "serves at /api/v1/revocations)")


def test_a_stale_or_future_list_is_refused(key: Path) -> None:
    stale = signed(key, issued_at=NOW - timedelta(days=8))
    assert refusal(stale, key).startswith(
        "the revocation list L was issued 8.0 days ago (at most 7 allowed): fetch a fresh one")
    parse_revocations(stale, public_key=public_key_path(key), where="L", now=NOW,
                      max_age=timedelta(days=30))
    future = signed(key, issued_at=NOW + timedelta(hours=1))
    assert "in the future: check this computer's clock" in refusal(future, key)


def test_a_malformed_envelope_is_refused(key: Path) -> None:
    doc = json.loads(signed(key))
    doc["dsseEnvelope"]["signatures"].append(doc["dsseEnvelope"]["signatures"][0])
    assert refusal(json.dumps(doc).encode(), key) == (
        "the signed revocation list L is malformed")


def test_load_reads_a_saved_list(key: Path, tmp_path: Path) -> None:
    path = tmp_path / "revocations.json"
    path.write_bytes(signed(key, "rel-9", issued_at=datetime.now(UTC)))
    assert load_revocations(path, public_key=public_key_path(key)).revoked == {"rel-9"}


def test_a_revocation_source_is_exactly_one_thing(tmp_path: Path) -> None:
    with pytest.raises(BundleVerificationError, match="revocation status is unknown"):
        RevocationSource()
    with pytest.raises(BundleVerificationError, match="give only one of"):
        RevocationSource(coordinator="https://c.example", path=tmp_path / "r.json")
    with pytest.raises(BundleVerificationError, match="must be the release portal's address"):
        RevocationSource(coordinator="c.example:8600")
    assert RevocationSource(coordinator="https://c.example/").describe() == (
        "https://c.example/api/v1/revocations")
    assert RevocationSource(unsafe_skip=True).load(tmp_path / "unused.pem") is None
