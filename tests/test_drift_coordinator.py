"""Drift reports at the coordinator: storing, the alarm rule, the API, the CLI's source,
the Prometheus gauges and the portal pages, over a real (migrated) SQLite database; the
portal pages also as a user sees them, in Debian's headless Chromium (driven by Playwright;
never ``playwright install``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator.api import create_app
from coordinator.auth import create_user
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.drift import FAILED, AlarmRule, DriftReportError, alarm_features, store_report
from coordinator.metrics import build_registry
from coordinator.models import (
    DriftReport,
    Project,
    Release,
    ReleaseCandidate,
    Run,
    Site,
    User,
)
from coordinator.portal import COOKIE_NAME
from coordinator.settings import Settings

from browser_support import CHROMIUM, CHROMIUM_ARGS
from release_support import KNOWN_WARNINGS, PASSWORD, make_user
from tests_support import served_app

RELEASE = "onc-run1-round2-c1"
FEATURES = ("mean_radius", "mean_texture", "worst_area")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    run_migrations(url)
    eng = make_engine(url)
    with session_scope(eng) as session:
        project = Project(name="onc")
        session.add(project)
        session.flush()
        assert project.id is not None
        run = Run(project_id=project.id, task="breast_cancer_mlp", launched_by="eng",
                  config_json="{}")
        session.add(run)
        session.flush()
        assert run.id is not None
        cand = ReleaseCandidate(run_id=run.id, round_number=2, checkpoint_sha256="0" * 64,
                                intended_use="test", status="approved", proposed_by="eng")
        session.add(cand)
        session.flush()
        assert cand.id is not None
        session.add(Release(release_id=RELEASE, candidate_id=cand.id, bundle_path="x",
                            key_fingerprint="0" * 64, created_by="rev"))
        for name in ("hospital-a", "hospital-b"):
            session.add(Site(name=name, status="registered"))
    yield eng
    eng.dispose()


def report(*, psi: dict[str, float] | None = None, p: dict[str, float] | None = None,
           release: str = RELEASE, **extra: Any) -> dict[str, Any]:
    psi, p = psi or {}, p or {}
    return {"format": "fedward-drift-report", "version": 1, "report_id": uuid.uuid4().hex,
            "release_id": release, "checked_at": "2026-12-07T01:02:03Z", "status": "ok",
            "rows": "100-249", "labelled": True,
            "privacy": {"treatment": "gaussian", "noise_multiplier": 1.0, "epsilon": 0.4,
                        "delta": 1e-6},
            "features": {f: {"psi": psi.get(f, 0.01), "chi2": 5.0, "dof": 9,
                             "p_value": p.get(f, 0.6)} for f in FEATURES},
            "accuracy": 0.9, "auc": 0.95, **extra}


def test_the_alarm_rule_psi_threshold_and_bonferroni() -> None:
    rule = AlarmRule()
    scores = {f: {"psi": 0.1, "p_value": 0.5} for f in FEATURES}
    assert alarm_features(scores, rule) == []
    assert alarm_features({**scores, "mean_radius": {"psi": 0.26, "p_value": 0.5}},
                          rule) == ["mean_radius"]
    assert alarm_features({**scores, "mean_radius": {"psi": 0.25, "p_value": 0.5}}, rule) == []
    # Three features: the cut is 0.01 / 3 = 0.00333.
    assert alarm_features({**scores, "worst_area": {"psi": 0.0, "p_value": 0.003}},
                          rule) == ["worst_area"]
    assert alarm_features({**scores, "worst_area": {"psi": 0.0, "p_value": 0.004}},
                          rule) == []
    assert alarm_features({**scores, "worst_area": {"psi": 0.0, "p_value": 0.004}},
                          AlarmRule(psi=0.25, alpha=0.05)) == ["worst_area"]


def test_reports_are_stored_once_and_alarmed_per_feature(engine: Engine) -> None:
    doc = report(psi={"worst_area": 0.4})
    row, new = store_report(engine, site="hospital-a", doc=doc, rule=AlarmRule())
    assert new and row.alarm and json.loads(row.alarm_features_json) == ["worst_area"]
    assert row.max_psi == 0.4 and row.min_p_value == 0.6
    again, new = store_report(engine, site="hospital-a", doc=doc, rule=AlarmRule())
    assert not new and again.id == row.id
    with pytest.raises(DriftReportError) as info:
        store_report(engine, site="hospital-b", doc=doc, rule=AlarmRule())
    assert info.value.status == 409
    quiet, _ = store_report(engine, site="hospital-b", doc=report(), rule=AlarmRule())
    assert not quiet.alarm
    failed = {k: v for k, v in report().items() if k in {
        "format", "version", "report_id", "release_id", "checked_at"}}
    row, _ = store_report(engine, site="hospital-b", rule=AlarmRule(),
                          doc={**failed, "status": "failed", "failure": "data-empty"})
    assert (row.status, row.failure, row.alarm) == (FAILED, "data-empty", False)
    with Session(engine) as session:
        assert len(session.exec(select(DriftReport)).all()) == 3


@pytest.mark.parametrize(("doc", "status", "says"), [
    (report(release="onc-run9-round9-c9"), 404, "is not a release of this coordinator"),
    ({**report(), "raw_rows": [[1.0, 2.0]]}, 422, "not on the allow-list"),
    ({**report(), "rows": 137}, 422, "rows must be one of the buckets"),
    ([1, 2], 422, "a drift report is a JSON object"),
])
def test_a_bad_report_is_refused_and_nothing_is_stored(engine: Engine, doc: Any, status: int,
                                                       says: str) -> None:
    with pytest.raises(DriftReportError) as info:
        store_report(engine, site="hospital-a", doc=doc, rule=AlarmRule())
    assert info.value.status == status and says in str(info.value)
    with Session(engine) as session:
        assert session.exec(select(DriftReport)).all() == []


def _staff(engine: Engine) -> str:
    with session_scope(engine) as session:
        _, token = create_user(session, name="eng", role="ml_engineer", password=None)
    return str(token)


def test_api_cli_source_metrics_and_portal(engine: Engine, tmp_path: Path) -> None:
    store_report(engine, site="hospital-a", doc=report(), rule=AlarmRule())
    store_report(engine, site="hospital-a", doc=report(psi={"worst_area": 0.5}),
                 rule=AlarmRule())
    store_report(engine, site="hospital-b", doc=report(), rule=AlarmRule())
    token = _staff(engine)
    client = TestClient(create_app(settings=Settings(home=tmp_path), engine=engine))
    auth = {"Authorization": f"Bearer {token}"}
    page = client.get("/api/v1/drift", headers=auth).json()
    assert page["total"] == 3 and [i["site"] for i in page["items"]] == [
        "hospital-b", "hospital-a", "hospital-a"]
    alarmed = page["items"][1]
    assert alarmed["alarm_features"] == ["worst_area"]
    with Session(engine) as session:
        run_id = session.exec(select(Run.id)).one()
    assert alarmed["retrain"] == f"fedward-coordinator launch --from {run_id}"
    one = client.get("/api/v1/drift?site=hospital-a&limit=1&offset=1", headers=auth).json()
    assert one["total"] == 2 and len(one["items"]) == 1 and not one["items"][0]["alarm"]
    for query, where in (("site=nowhere", "site"), (f"release={RELEASE}x", "release"),
                         ("limit=0", "limit"), ("offset=-1", "offset"), ("limit=abc", "limit")):
        r = client.get(f"/api/v1/drift?{query}", headers=auth)
        assert r.status_code == 422, (query, r.text)
        assert where in r.text
    assert client.get("/api/v1/drift").status_code == 401
    with session_scope(engine) as session:
        _, clinician = create_user(session, name="doc", role="clinician", password=None)
    assert client.get("/api/v1/drift", headers={
        "Authorization": f"Bearer {clinician}"}).status_code == 403

    # Prometheus: the newest report per site and release; 1 for the feature in alarm only.
    text = generate_latest(build_registry(engine, cache_s=0)).decode()
    assert (f'fedward_drift_alarm{{feature="worst_area",release="{RELEASE}",'
            'site="hospital-a"} 1.0') in text
    assert (f'fedward_drift_alarm{{feature="mean_radius",release="{RELEASE}",'
            'site="hospital-a"} 0.0') in text
    assert (f'fedward_drift_alarm{{feature="worst_area",release="{RELEASE}",'
            'site="hospital-b"} 0.0') in text
    assert (f'fedward_drift_psi{{feature="worst_area",release="{RELEASE}",'
            'site="hospital-a"} 0.5') in text

    # The portal: the list, one pair over time with its picture, bad queries as 422.
    cookie = {"Cookie": f"{COOKIE_NAME}={token}"}
    listing = client.get("/portal/drift", headers=cookie)
    assert listing.status_code == 200 and "worst_area" in listing.text
    pair = client.get(f"/portal/drift/hospital-a/{RELEASE}", headers=cookie)
    assert pair.status_code == 200
    assert "<svg" in pair.text and "PSI by check" in pair.text
    assert f"fedward-coordinator launch --from {run_id}" in pair.text
    assert client.get("/portal/drift?page=0", headers=cookie).status_code == 422
    assert client.get("/portal/drift?site=nowhere", headers=cookie).status_code == 422
    assert client.get("/portal/drift?page=9", headers=cookie).status_code == 422
    assert client.get("/portal/drift/hospital-c/nothing", headers=cookie).status_code == 404
    with Session(engine) as session:
        assert session.exec(select(User).where(User.name == "eng")).one()
    # A check that fails after the alarm says nothing about drift: the alarm and the
    # retraining proposal stand (read from the newest check that ran, as the metric does).
    failed = {k: v for k, v in report().items() if k in {
        "format", "version", "report_id", "release_id", "checked_at"}}
    store_report(engine, site="hospital-a", rule=AlarmRule(),
                 doc={**failed, "status": "failed", "failure": "data-empty"})
    pair = client.get(f"/portal/drift/hospital-a/{RELEASE}", headers=cookie)
    assert pair.status_code == 200 and 'id="alarm"' in pair.text, pair.text
    assert 'id="retrain"' in pair.text and "worst_area" in pair.text
    # A later quiet check: the drift has subsided, nothing is proposed any more.
    store_report(engine, site="hospital-a", doc=report(), rule=AlarmRule())
    pair = client.get(f"/portal/drift/hospital-a/{RELEASE}", headers=cookie)
    assert pair.status_code == 200 and 'id="retrain"' not in pair.text


def test_the_gateway_handler_answers_bad_bodies_and_stores_as_the_certified_site(
        engine: Engine, tmp_path: Path) -> None:
    from coordinator.gateway import GatewayConfig, SiteGateway
    from coordinator.gateway_http import Client
    from fedward.certs import CAFiles

    gateway = SiteGateway(
        config=GatewayConfig(host="127.0.0.1", port=0, pki=CAFiles.under(tmp_path / "pki"),
                             cert=tmp_path / "c.pem", key=tmp_path / "k.pem", superlink="x",
                             drift_rule=AlarmRule(psi=0.3)),
        engine=engine, registrar=lambda key, name: "1")
    client = Client(address="192.0.2.1", site="hospital-b", serial="1")
    assert gateway.requests.drift(b"[" * 20_000, client)[0] == 400    # nested past the parser
    assert gateway.requests.drift(b"\xff\xfe", client)[0] == 400
    status, body = gateway.requests.drift(json.dumps(report(psi={"worst_area": 0.28})).encode(),
                                  client)
    assert status == 200 and body["alarm"] is False   # the configured rule: 0.3
    with Session(engine) as session:
        [row] = session.exec(select(DriftReport)).all()
    assert row.site_name == "hospital-b"


# In the browser: per series of a drift picture (named by its legend), its points' count.
_SERIES_POINTS = """svg => {
  const named = {};
  for (const text of svg.querySelectorAll('text')) {
    const box = text.previousElementSibling;
    if (box && box.tagName === 'rect' && box.getAttribute('width') === '12')
      named[box.getAttribute('fill')] = text.textContent;
  }
  const out = {};
  for (const line of svg.querySelectorAll('polyline'))
    out[named[line.getAttribute('stroke')]] =
      line.getAttribute('points').trim().split(/\\s+/).length;
  return out;
}"""


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at "
                    "/usr/bin/chromium (apt-get install chromium)")
@pytest.mark.timeout(120)
@KNOWN_WARNINGS[0]
@KNOWN_WARNINGS[1]
def test_the_drift_pages_in_chromium(engine: Engine, tmp_path: Path) -> None:
    # hospital-a: worst_area drifts away over four checks (in alarm from the third),
    # outcomes arrived for three of them, and one check failed; hospital-b stays put.
    def at(day: int, **extra: Any) -> dict[str, Any]:
        return {"checked_at": f"2026-11-{day:02d}T06:00:00Z", **extra}

    a_checks = [
        report(psi={"worst_area": 0.02}, **at(1, accuracy=0.93, auc=0.97)),
        report(psi={"worst_area": 0.12}, **at(8, accuracy=0.91, auc=0.95)),
        report(psi={"worst_area": 0.31}, p={"worst_area": 1e-4},
               **at(15, labelled=False, accuracy=None, auc=None)),
        report(psi={"worst_area": 0.45}, p={"worst_area": 1e-6},
               **at(22, accuracy=0.84, auc=0.88)),
    ]
    failed = {k: v for k, v in report(**at(29)).items()
              if k in {"format", "version", "report_id", "release_id", "checked_at"}}
    for doc in [*a_checks, {**failed, "status": "failed", "failure": "data-empty"}]:
        store_report(engine, site="hospital-a", doc=doc, rule=AlarmRule())
    for day in (2, 9, 16):
        store_report(engine, site="hospital-b", doc=report(psi={"worst_area": 0.03},
                                                           **at(day)), rule=AlarmRule())
    make_user(engine, "ml_engineer", "eng")
    with Session(engine) as session:
        run_id = session.exec(select(Run.id)).one()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    app = create_app(settings=Settings(home=tmp_path), engine=engine)
    with served_app(app, name="drift-uvicorn") as port, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            base = f"http://127.0.0.1:{port}"
            page = chromium.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{base}/portal/drift")
            assert "/portal/login" in page.url
            page.fill("#name", "eng")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/portal/drift")

            # The overview: both pairs, the alarm for hospital-a's worst_area only.
            a_row = page.locator(f"#drift-hospital-a-{RELEASE}")
            b_row = page.locator(f"#drift-hospital-b-{RELEASE}")
            assert page.locator("table[aria-label='Drift per site and release'] tbody tr"
                                ).count() == 2
            assert a_row.locator(".alarm").inner_text().split() == ["alarm", "worst_area"]
            assert b_row.locator(".alarm").inner_text().strip() == ""
            assert "data-empty" in a_row.inner_text()   # its newest check failed
            assert a_row.locator("td").nth(2).inner_text() == "5"

            # hospital-a's page, through the link: the alarm, the retraining proposal and
            # the pictures, one point per check that ran (outcomes where they arrived).
            a_row.locator("a").click()
            page.wait_for_url(f"**/portal/drift/hospital-a/{RELEASE}")
            alarm = page.locator("#alarm").inner_text()
            assert "worst_area" in alarm and not any(f in alarm for f in FEATURES[:2])
            assert page.locator("#retrain code").inner_text() == (
                f"fedward-coordinator launch --from {run_id}")
            picture = page.locator("figure.chart svg")
            assert picture.count() == 1
            assert picture.evaluate("svg => svg.getBoundingClientRect().width") > 300
            assert picture.evaluate(_SERIES_POINTS) == {
                "worst_area": 4, "mean_radius": 4, "mean_texture": 4, "alarm (0.25)": 2,
                "accuracy": 3, "auc": 3}
            text = picture.text_content()
            assert "PSI by check" in text and "Accuracy and AUC by check" in text
            assert "check (oldest first)" in text and "model after round" not in text
            checks = page.locator("table[aria-label='Drift checks'] tbody tr")
            assert checks.count() == 5 and "data-empty" in checks.nth(0).inner_text()
            assert "worst_area" in checks.nth(1).inner_text()
            assert checks.nth(2).inner_text().split("\t")[6:8] == ["–", "–"]  # no labels
            page.screenshot(path=str(tmp_path / "drift-a.png"), full_page=True)

            # hospital-b's page: its curves, no alarm, nothing to retrain.
            page.goto(f"{base}/portal/drift/hospital-b/{RELEASE}")
            assert page.locator("#alarm").count() == 0
            assert page.locator("#retrain").count() == 0
            assert page.locator("figure.chart svg").evaluate(_SERIES_POINTS)["worst_area"] == 3
        finally:
            chromium.close()
