"""Drift reports over the real route: a real coordinator, its gateway, enrolled sites.

One federation for the file. The gateway's ``POST /fedward/drift`` is refused without a
certificate, with a revoked one, above its size cap (before a byte of the body is read),
and for anything but JSON; a site whose coordinator is unreachable keeps its reports and
sends them later. Then the real thing: an enrolled site agent with a drift schedule in its
configuration checks a signed release against its data and its report arrives at the
coordinator (``fedward-coordinator drift list --json``), scores only.
"""

from __future__ import annotations

import csv
import json
import socket
import sqlite3
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from drift_support import dp_reference, make_release, release_key
from sqlmodel import select

from coordinator.db import make_engine, session_scope
from coordinator.models import Project, Release, ReleaseCandidate, Run
from fedward.procs import free_port
from fedward.tasks import get_task
from site_agent.datasets import read_labeled_csv
from site_agent.enroll import EnrollmentFiles

from federation import BIN, Federation, Site, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420), pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")]

TASK = "breast_cancer_mlp"
RELEASE = "test-run1-round1-c1"


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    with short_tmp() as work, federation(work, n_sites=1) as f:
        yield f


def _enroll(fed: Federation, name: str) -> Path:
    """Enroll a site with the operator's command; its data is the demo site's."""
    s = fed.data["sites"][0]
    token = json.loads(fed.coord_cli("enroll-token", name, "--json").stdout)["token"]
    root = fed.work / "sites" / name
    run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway", fed.fleet,
             "--token", token, "--data", s["csv"], "--schema", s["schema"],
             "--project", "test"])
    fed.sites[name] = Site(name=name, root=root)
    return root


def _failed_report() -> dict[str, Any]:
    return {"format": "fedward-drift-report", "version": 1, "report_id": uuid.uuid4().hex,
            "release_id": RELEASE, "checked_at": "2026-12-07T01:02:03Z", "status": "failed",
            "failure": "data-empty"}


def _client(root: Path | None, ca: Path) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(ca))
    if root is not None:
        files = EnrollmentFiles(root)
        ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    return httpx.Client(verify=ctx, timeout=15)


def _head_only(root: Path, address: str, length: int) -> bytes:
    """Send a request head announcing ``length`` bytes and no body; return the answer."""
    files = EnrollmentFiles(root)
    ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
    ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"POST /fedward/drift HTTP/1.1\r\nHost: {address}\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {length}\r\n\r\n".encode())
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    return reply


def _listed(fed: Federation, **query: str) -> list[dict[str, Any]]:
    args = [f"--{k}={v}" for k, v in query.items()]
    return list(json.loads(fed.coord_cli("drift", "list", "--json", *args).stdout)["items"])


def test_the_drift_path_refuses_no_certificate_oversize_non_json_and_revoked(
        fed: Federation) -> None:
    root = _enroll(fed, "drift-gw")
    ca = EnrollmentFiles(root).coordinator_ca
    url = f"https://{fed.fleet}/fedward/drift"
    with _client(None, ca) as anonymous:
        r = anonymous.post(url, json=_failed_report())
        assert r.status_code == 403 and "certificate" in r.text
    # Refused on the head: the answer comes although not one byte of the body was sent.
    t0 = time.monotonic()
    answer = _head_only(root, fed.fleet, 10_000_000)
    assert answer.startswith(b"HTTP/1.1 413") and b"too large" in answer, answer[:200]
    assert time.monotonic() - t0 < 5
    with _client(root, ca) as site:
        r = site.post(url, content=b"<report/>", headers={"content-type": "text/xml"})
        assert r.status_code == 415
        r = site.post(url, content=b"not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = site.post(url, json={**_failed_report(), "note": "patient 17"})
        assert r.status_code == 422 and "not on the allow-list" in r.text
        stored = _failed_report()
        r = site.post(url, json=stored)
        assert r.status_code == 200, r.text
        listed = _listed(fed, site="drift-gw")
        assert [(i["report_id"], i["status"], i["failure"]) for i in listed] == [
            (stored["report_id"], "drift-check-failed", "data-empty")]
        assert fed.api("POST", "/sites/drift-gw/revoke", {"reason": "test"}).status_code == 200
        r = site.post(url, json=_failed_report())
        assert r.status_code == 403 and "revoked" in r.text
    assert len(_listed(fed, site="drift-gw")) == 1


def test_reports_wait_while_the_coordinator_is_unreachable(fed: Federation) -> None:
    from site_agent.drift_runner import OUTBOX, pending, send_pending

    root = _enroll(fed, "drift-later")
    config = json.loads((root / "site.json").read_text())
    box = root / OUTBOX
    box.mkdir(mode=0o700)
    reports = [_failed_report() for _ in range(2)]
    for doc in reports:
        (box / f"{doc['report_id']}.json").write_text(json.dumps(doc))
    (root / "site.json").write_text(json.dumps({**config,
                                                "superlink": f"127.0.0.1:{free_port()}"}))
    sent, left, why = send_pending(root)
    assert (sent, left) == (0, 2) and why is not None and "kept for later" in why
    assert len(pending(root)) == 2
    (root / "site.json").write_text(json.dumps(config))
    assert send_pending(root)[:2] == (2, 0)
    assert pending(root) == []
    assert {i["report_id"] for i in _listed(fed, site="drift-later")} == {
        d["report_id"] for d in reports}


def _seed_release(fed: Federation) -> int:
    """The release's row, as approving a candidate writes it (the release workflow has its
    own tests); returns the run it came from."""
    if fed.api("GET", "/projects").json() == []:
        assert fed.api("POST", "/projects", {"name": "test"}).status_code == 201
    engine = make_engine(f"sqlite:///{fed.home / 'coordinator.db'}")
    try:
        with session_scope(engine) as session:
            project = session.exec(select(Project).where(Project.name == "test")).one()
            assert project.id is not None
            run = Run(project_id=project.id, task=TASK, launched_by="admin", config_json="{}")
            session.add(run)
            session.flush()
            assert run.id is not None
            cand = ReleaseCandidate(run_id=run.id, round_number=1, checkpoint_sha256="0" * 64,
                                    intended_use="test", status="approved",
                                    proposed_by="admin")
            session.add(cand)
            session.flush()
            assert cand.id is not None
            session.add(Release(release_id=RELEASE, candidate_id=cand.id, bundle_path="x",
                                key_fingerprint="0" * 64, created_by="admin"))
            return run.id
    finally:
        engine.dispose()


def test_an_enrolled_site_agent_checks_on_its_schedule_and_its_report_arrives(
        fed: Federation) -> None:
    s = fed.data["sites"][0]
    root = _enroll(fed, s["name"])
    run_id = _seed_release(fed)
    work = fed.work / "release"
    private, public = release_key(work / "keys")
    x, _ = read_labeled_csv(csv_path=Path(s["csv"]), task=TASK)
    bundle = make_release(work, release_id=RELEASE, reference=dp_reference([x]),
                          private_key=private)
    # The recent rows through a data connector (a read-only SQL query on the site's rows
    # copied into SQLite), as the site's training data can be read.
    with Path(s["csv"]).open(encoding="utf-8", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    con = sqlite3.connect(work / "recent.sqlite")
    con.execute("CREATE TABLE recent (" + ", ".join(f'"{h}"' for h in header) + ")")
    con.executemany(f"INSERT INTO recent VALUES ({', '.join('?' for _ in header)})",  # noqa: S608
                    [[float(v) for v in r] for r in rows])
    con.commit()
    con.close()
    config = json.loads((root / "site.json").read_text())
    config["drift"] = {"release": str(bundle), "public_key": str(public), "interval_s": 3600,
                       "data": {"connector": "sql", "url": f"sqlite:///{work}/recent.sqlite",
                                "query": "SELECT * FROM recent"}}
    (root / "site.json").write_text(json.dumps(config))
    fed.start_site(s["name"])
    deadline = time.monotonic() + 180
    while not (found := _listed(fed, site=s["name"])):
        assert time.monotonic() < deadline, (fed.work / f"site-{s['name']}.log").read_text()
        time.sleep(1)
    [item] = found
    assert item["status"] == "ok" and item["release"] == RELEASE
    assert set(item["features"]) == set(get_task(TASK).feature_columns)
    assert item["treatment"] == "gaussian" and item["epsilon"] > 0
    assert item["rows"] in ("100-249", "250-499")
    assert 0 <= item["accuracy"] <= 1
    # What left the site is what its audit log says left, and nothing waits any more.
    entries = fed.site_audit(s["name"])
    actions = [e.action for e in entries]
    assert "drift-check" in actions and "drift-report-sent" in actions
    assert [e.detail["source"] for e in entries if e.action == "drift-check"] == ["sql"]
    assert not list((root / "drift-outbox").glob("*.json"))
    text = run_cli([str(BIN / "fedward-coordinator"), "drift", "list"],
                   env={**fed.env, "COLUMNS": "250"}).stdout
    assert s["name"] in text and RELEASE in text
    if item["alarm"]:
        assert f"fedward-coordinator launch --from {run_id}" in text
