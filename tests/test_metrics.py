"""Tests of the coordinator's Prometheus metrics (coordinator.metrics, fedward.metrics_http).

Scrapes go over real HTTP to a real listener, and the figures come from a real (SQLite)
coordinator database and a real site gateway.
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlmodel import select

from coordinator import round_records
from coordinator.api import create_app
from coordinator.auth import create_user
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.gateway import GatewayConfig, SiteGateway
from coordinator.home import gateway_cert_paths, init_home
from coordinator.metrics import METRIC_NAMES, build_registry, note_site_contact
from coordinator.models import Project, Run, Site, SiteCertificate, utcnow
from coordinator.settings import Settings
from fedward.metrics_http import MetricsListener, MetricsListenerError

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    warnings.filterwarnings("ignore", message="The anyio.abc.BlockingPortal alias")
    from fastapi.testclient import TestClient

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str, *, token: str | None = None) -> tuple[str, Samples]:
    """GET /metrics over HTTP; the text and every sample by (name, sorted labels)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    res = httpx.get(f"http://{address}/metrics", headers=headers, timeout=10)
    assert res.status_code == 200, res.text
    samples: Samples = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return res.text, samples


def family_names(text: str) -> set[str]:
    """The metric family names a scrape declares (as alert rules must name them)."""
    names = set()
    for family in text_string_to_metric_families(text):
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    return names


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'home' / 'coordinator.db'}"
    (tmp_path / "home").mkdir()
    run_migrations(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def listener(engine: Engine) -> Iterator[MetricsListener]:
    served = MetricsListener(registry=build_registry(engine, cache_s=0.0))
    served.start()
    yield served
    served.stop()


def _populate(engine: Engine) -> dict[str, float]:
    """Runs in several states, rounds with durations and failures, sites with certificates."""
    with session_scope(engine) as session:
        project = Project(name="oncology")
        session.add(project)
        session.flush()
        runs = []
        for status in ("completed", "completed", "failed", "running"):
            run = Run(project_id=project.id or 0, task="breast_cancer_mlp", status=status,
                      config_json="{}", launched_by="ml")
            session.add(run)
            runs.append(run)
        for name, status in (("hospital-a", "registered"), ("hospital-b", "registered"),
                             ("hospital-c", "revoked"), ("hospital-d", "added")):
            session.add(Site(name=name, status=status))
        session.flush()
        run_id = runs[0].id or 0
        site_a = session.exec(select(Site).where(Site.name == "hospital-a")).one()
        expiry = utcnow() + timedelta(days=10)
        session.add(SiteCertificate(site_id=site_a.id or 0, serial="abc1", not_after=expiry))
        session.add(SiteCertificate(site_id=site_a.id or 0, serial="abc0", superseded_by="abc1",
                                    not_after=utcnow() + timedelta(days=400)))
    for number, seconds, failed in ((1, 0.5, []), (2, 7.0, [
            {"site": "hospital-b", "phase": "train", "reason": "out of memory"},
            {"site": "hospital-a", "phase": "connect", "reason": "site offline"}]),
            (3, 45.0, [{"site": "hospital-b", "phase": "train", "reason": "again"}])):
        round_records.start_round(engine, run_id, number)
        round_records.finish_round(engine, run_id, number, status="completed",
                                   participating=["hospital-a"], failed=failed, late=[],
                                   seconds=seconds)
    round_records.start_round(engine, run_id, 4)   # still running: not in the histogram
    return {"expiry": expiry.timestamp()}


def test_coordinator_metrics_reflect_the_database(engine: Engine,
                                                  listener: MetricsListener) -> None:
    facts = _populate(engine)
    note_site_contact("hospital-a")
    note_site_contact("hospital-b", now=time.time() - 3600)   # gone an hour ago
    text, s = scrape(listener.address)
    assert s[("fedward_runs", (("state", "completed"),))] == 2
    assert s[("fedward_runs", (("state", "failed"),))] == 1
    assert s[("fedward_runs", (("state", "running"),))] == 1
    assert s[("fedward_runs", (("state", "pending"),))] == 0
    assert s[("fedward_round_duration_seconds_count", ())] == 3
    assert s[("fedward_round_duration_seconds_sum", ())] == pytest.approx(52.5)
    assert s[("fedward_round_duration_seconds_bucket", (("le", "1.0"),))] == 1
    assert s[("fedward_round_duration_seconds_bucket", (("le", "10.0"),))] == 2
    assert s[("fedward_round_duration_seconds_bucket", (("le", "60.0"),))] == 3
    assert s[("fedward_site_failures_total", (("phase", "train"),))] == 2
    assert s[("fedward_site_failures_total", (("phase", "connect"),))] == 1
    assert s[("fedward_sites", (("status", "registered"),))] == 2
    assert s[("fedward_sites_online", ())] == 1
    assert s[("fedward_site_online", (("site", "hospital-a"),))] == 1
    assert s[("fedward_site_online", (("site", "hospital-b"),))] == 0
    assert ("fedward_site_online", (("site", "hospital-c"),)) not in s   # revoked
    # The current certificate, not the superseded one that expires later.
    assert s[("fedward_site_certificate_expiry_timestamp_seconds",
              (("site", "hospital-a"),))] == pytest.approx(facts["expiry"], abs=1)
    assert family_names(text) >= METRIC_NAMES - {"fedward_api_request_duration_seconds",
                                                 "fedward_gateway_refusals_total"}


def test_api_latency_is_labelled_by_route_template_and_shows_no_token(
        engine: Engine, listener: MetricsListener, tmp_path: Path) -> None:
    with session_scope(engine) as session:
        _, token = create_user(session, name="ml-user", role="ml_engineer")
    settings = Settings(home=tmp_path / "home")
    with TestClient(create_app(settings=settings, engine=engine)) as client:
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/v1/runs/987654", headers=auth).status_code == 404
        assert client.get("/api/v1/runs", headers=auth).status_code == 200
        assert client.get(f"/api/v1/nowhere/{token}").status_code == 404
    text, s = scrape(listener.address)
    assert s[("fedward_api_request_duration_seconds_count", (
        ("method", "GET"), ("route", "/api/v1/runs/{run_id}"), ("status", "4xx")))] >= 1
    assert s[("fedward_api_request_duration_seconds_count", (
        ("method", "GET"), ("route", "/api/v1/runs"), ("status", "2xx")))] >= 1
    assert s[("fedward_api_request_duration_seconds_count", (
        ("method", "GET"), ("route", "unmatched"), ("status", "4xx")))] >= 1
    assert token not in text and "987654" not in text
    assert str(tmp_path) not in text


def test_the_listener_needs_a_token_beyond_loopback(engine: Engine) -> None:
    with pytest.raises(MetricsListenerError, match="without a token"):
        MetricsListener(registry=build_registry(engine), host="0.0.0.0")
    secret = "s3cret-scrape-token-0123456789"
    served = MetricsListener(registry=build_registry(engine), token=secret)
    served.start()
    try:
        url = f"http://{served.address}"
        assert httpx.get(url + "/metrics", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer wrong-token-0123456789"}
        assert httpx.get(url + "/metrics", headers=wrong, timeout=10).status_code == 401
        assert httpx.get(url + "/api/v1/runs", timeout=10).status_code == 404
        text, _ = scrape(served.address, token=secret)
        assert "fedward_runs" in text and secret not in text
    finally:
        served.stop()


def test_a_taken_port_is_a_clear_error(engine: Engine) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        served = MetricsListener(registry=CollectorRegistry(), port=taken.getsockname()[1])
        with pytest.raises(MetricsListenerError, match=r"cannot listen for metrics on 127\.0"):
            served.start()


def test_gateway_connections_and_refusals_are_counted(tmp_path: Path, engine: Engine,
                                                      listener: MetricsListener) -> None:
    settings = Settings(home=tmp_path / "gw")
    pki = init_home(settings)
    cert, key = gateway_cert_paths(pki)
    gateway = SiteGateway(config=GatewayConfig(host="127.0.0.1", port=0, pki=pki, cert=cert,
                                               key=key, superlink="127.0.0.1:1",
                                               idle_timeout_s=3.0),
                          engine=engine, registrar=lambda key, name: "0")
    _, before = scrape(listener.address)
    gateway.start()
    try:
        for _ in range(2):   # not TLS at all: refused in the handshake
            with socket.create_connection(("127.0.0.1", gateway.config.port), timeout=10) as s:
                s.sendall(b"GET /v1/fleet HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(10)
                while s.recv(4096):
                    pass
        deadline = time.monotonic() + 10
        while True:
            _, after = scrape(listener.address)
            key_ = ("fedward_gateway_refusals_total", (("reason", "tls-handshake"),))
            if after.get(key_, 0) - before.get(key_, 0) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        gateway.stop()
    assert after[key_] - before.get(key_, 0) == 2
    conns = ("fedward_gateway_connections_total", ())
    assert after[conns] - before[conns] == 2


def test_metric_names_pin_the_in_process_metrics() -> None:
    # A metric added to coordinator.metrics without METRIC_NAMES would be invisible to the
    # check of the alert rules and the dashboard (tests/test_deploy_monitoring.py).
    reg = build_registry(make_engine("sqlite://"), cache_s=0)
    names = {m.name + ("_total" if m.type == "counter" else "")
             for m in reg.collect()}
    assert names <= METRIC_NAMES


# --- the site agent --------------------------------------------------------------------------


def test_site_metrics_show_budget_state_and_no_paths(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from privacy import PrivacyLedger
    from site_agent.metrics import METRIC_NAMES as SITE_METRICS
    from site_agent.metrics import SiteState, start_listener
    from site_agent.policy import SitePolicy

    site = tmp_path / "site-data"
    site.mkdir()
    SitePolicy.starter(project="oncology", task="breast_cancer_mlp", epsilon_cap=4.0,
                       require_approval=False).save(site / "policy.json")
    ledger = PrivacyLedger(site / "ledger.db")
    ledger.open_run(run_id="7", project="oncology", epsilon_budget=3.0, delta=1e-5,
                    noise_multiplier=1.1, sample_rate=0.01)
    ledger.reserve_round(run_id="7", round_number=1, steps=10)
    ledger.complete_round(run_id="7", round_number=1)
    ledger.reserve_round(run_id="7", round_number=2, steps=10)   # reserved, not trained
    spent = ledger.project_epsilon("oncology")
    state = SiteState(data_check_passed=True)
    monkeypatch.setenv("FEDWARD_SITE_METRICS", "127.0.0.1:0")
    served = start_listener(ledger=site / "ledger.db", policy=site / "policy.json",
                            state=state)
    assert served is not None
    try:
        text, s = scrape(served.address)
        assert s[("fedward_agent_rounds_trained", (("project", "oncology"),))] == 1
        assert s[("fedward_agent_epsilon_spent", (("project", "oncology"),))] == \
            pytest.approx(spent)
        assert s[("fedward_agent_epsilon_budget", (("project", "oncology"),))] == 4.0
        assert s[("fedward_agent_epsilon_left", (("project", "oncology"),))] == \
            pytest.approx(4.0 - spent)
        assert s[("fedward_agent_data_check_passed", ())] == 1
        assert s[("fedward_agent_route_up", ())] == 0
        assert ("fedward_agent_last_coordinator_contact_timestamp_seconds", ()) not in s
        assert family_names(text) == SITE_METRICS
        assert str(tmp_path) not in text and "site-data" not in text
        state.route_up = True
        state.contact()
        _, s = scrape(served.address)
        assert s[("fedward_agent_route_up", ())] == 1
        assert abs(s[("fedward_agent_last_coordinator_contact_timestamp_seconds", ())]
                   - time.time()) < 30
    finally:
        served.stop()
    monkeypatch.setenv("FEDWARD_SITE_METRICS", "off")
    assert start_listener(ledger=site / "ledger.db", policy=site / "policy.json",
                          state=state) is None
    monkeypatch.setenv("FEDWARD_SITE_METRICS", "0.0.0.0:0")   # no token: refused, not opened
    assert start_listener(ledger=site / "ledger.db", policy=site / "policy.json",
                          state=state) is None


def test_site_metrics_beyond_loopback_answer_the_token_and_never_show_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from site_agent.metrics import METRIC_NAMES as SITE_METRICS
    from site_agent.metrics import SiteState, start_listener
    from site_agent.policy import SitePolicy

    site = tmp_path / "site-data"
    site.mkdir()
    SitePolicy.starter(project="oncology", task="breast_cancer_mlp", epsilon_cap=4.0,
                       require_approval=False).save(site / "policy.json")
    secret = "site-scrape-token-5f3a9c0e7b21d4"
    token_file = tmp_path / "metrics.token"
    token_file.write_text(secret + "\n")
    token_file.chmod(0o600)
    caplog.set_level(logging.DEBUG)   # every logger of the agent, at every level
    monkeypatch.setenv("FEDWARD_SITE_METRICS", "0.0.0.0:0")
    monkeypatch.setenv("FEDWARD_SITE_METRICS_TOKEN_FILE", str(token_file))
    served = start_listener(ledger=site / "ledger.db", policy=site / "policy.json",
                            state=SiteState(data_check_passed=True))
    assert served is not None
    try:
        local = f"127.0.0.1:{served.port}"   # bound on every address, loopback included
        url = f"http://{local}/metrics"
        assert httpx.get(url, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer " + secret[::-1]}
        assert httpx.get(url, headers=wrong, timeout=10).status_code == 401
        text, s = scrape(local, token=secret)
        assert s[("fedward_agent_epsilon_budget", (("project", "oncology"),))] == 4.0
        assert s[("fedward_agent_data_check_passed", ())] == 1
        assert family_names(text) == SITE_METRICS
        assert secret not in text and str(token_file) not in text
    finally:
        served.stop()
    # A token too short is refused (no listener), and said so without the token.
    short = "short-tok"
    token_file.write_text(short)
    assert start_listener(ledger=site / "ledger.db", policy=site / "policy.json",
                          state=SiteState()) is None
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Prometheus metrics on http://0.0.0.0:" in logged and "too short" in logged
    assert secret not in logged and short not in logged
