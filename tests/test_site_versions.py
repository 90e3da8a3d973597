"""The versions a site agent reports: the fixed format, the egress guard, what is stored."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import select

from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import AuditEvent, Site
from coordinator.site_versions import note_reply_versions, note_versions
from fedward import __version__
from fedward.agent_versions import (
    MAX_LEN,
    REPLY_VERSIONS,
    VersionFormatError,
    local_versions,
    parse_versions,
)
from fedward.wire import MSG
from site_agent.egress import EgressViolation, check_reply

HOSTILE = ["<script>alert(1)</script>", "1.0 <b>", '1.0"onmouseover="x', "1.0\nforged line",
           "1" * (MAX_LEN + 1), "", "v1.0", "1.0;rm -rf /", "１.0"]


def test_the_format_takes_release_and_development_versions() -> None:
    for good in ["1.42.0", "0.1.dev12+g3f2a9c1.d20261207", "2.0.0rc1", "1.4.0-1", "3"]:
        assert parse_versions({"fedward": good, "flower": "1.42.0"}) == {
            "fedward": good, "flower": "1.42.0"}
    assert parse_versions(None) == {}
    assert local_versions() == {"fedward": __version__, "flower": version("flwr")}


@pytest.mark.parametrize("bad", HOSTILE)
def test_anything_but_a_version_is_refused(bad: str) -> None:
    with pytest.raises(VersionFormatError, match="the fedward version is not a version"):
        parse_versions({"fedward": bad})


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(VersionFormatError) as err:
        parse_versions({"fedward": 1.4, "torch": "2.13.0", "flower": "<i>"})
    said = str(err.value)
    assert "the fedward version is not a version" in said
    assert "unknown component 'torch'" in said
    assert "the flower version is not a version" in said
    with pytest.raises(VersionFormatError, match="must be an object"):
        parse_versions(["1.0"])


def test_the_egress_guard_lets_versions_out_in_their_format_only() -> None:
    accepted = {"status": {MSG.STATUS: MSG.ACCEPTED}, REPLY_VERSIONS: local_versions()}
    report = check_reply(reply=accepted, arrays={}, expected_shapes={})
    assert REPLY_VERSIONS in report.text_fields
    for bad in HOSTILE[:4]:
        with pytest.raises(EgressViolation, match="versions part is not in its fixed format"):
            check_reply(reply={**accepted, REPLY_VERSIONS: {"fedward": bad}}, arrays={},
                        expected_shapes={})
    with pytest.raises(EgressViolation):
        check_reply(reply={**accepted, REPLY_VERSIONS: {"fedward": "1.0"}},
                    arrays={"w": np.zeros(2)}, expected_shapes={})


def test_stored_per_site_audited_when_changed_and_hostile_reports_dropped(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run_migrations(url)
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            session.add(Site(name="hospital-a", status="registered"))
        with session_scope(engine) as session:
            assert note_versions(session, "hospital-a", {"fedward": "1.3.0", "flower": "1.42.0"},
                                 via="enrollment")
            assert not note_versions(session, "nowhere", {"fedward": "1.3.0"}, via="renewal")
        # The same versions again: the time moves, no second audit entry.
        assert note_reply_versions(engine, "hospital-a", {"fedward": "1.3.0",
                                                          "flower": "1.42.0"})
        assert note_reply_versions(engine, "hospital-a", {"fedward": "1.4.0",
                                                          "flower": "1.42.0"})
        for bad in HOSTILE:
            assert not note_reply_versions(engine, "hospital-a", {"fedward": bad})
        assert not note_reply_versions(engine, "hospital-a", None)
        with session_scope(engine) as session:
            site = session.exec(select(Site).where(Site.name == "hospital-a")).one()
            assert (site.agent_version, site.flower_version, site.versions_via) == (
                "1.4.0", "1.42.0", "admission")
            events = session.exec(select(AuditEvent).where(
                AuditEvent.action == "site.versions")).all()
            assert [e.subject for e in events] == ["hospital-a", "hospital-a"]
    finally:
        engine.dispose()
