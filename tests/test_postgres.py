"""The coordinator database on a real PostgreSQL 15 server started by the test run."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect
from sqlmodel import Session, SQLModel, col, select

from coordinator.api import create_app
from coordinator.audit import append_event, verify_chain
from coordinator.auth import create_user
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import AuditEvent, Site
from coordinator.settings import Settings

from api_support import (
    BIG_NODE_ID,
    FakeLauncher,
    FakeRegistrar,
    TestClient,
    exercise_api_flow,
)
from pg import create_database, postgres_server

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database per test."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    url = create_database(pg_server, name)
    run_migrations(url)
    return url


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def test_migrations_on_postgres_match_models(pg_url: str, pg_engine: Engine) -> None:
    run_migrations(pg_url)  # again: no-op
    assert pg_engine.dialect.name == "postgresql"
    assert "audit_events" in inspect(pg_engine).get_table_names()
    with pg_engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [
            ("0017",)]
        diff = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}),
            SQLModel.metadata,
        )
    assert diff == []


def test_types_round_trip_on_postgres(pg_engine: Engine) -> None:
    with session_scope(pg_engine) as session:
        session.add(Site(name="site-a", flower_node_id=BIG_NODE_ID, status="registered"))
    with Session(pg_engine) as session:
        site = session.exec(select(Site)).one()
        assert site.flower_node_id == BIG_NODE_ID
        assert site.created_at.tzinfo is UTC


def test_api_flow_on_postgres(pg_engine: Engine, tmp_path: Path) -> None:
    with session_scope(pg_engine) as session:
        _, token = create_user(session, name="alice", role="ml_engineer")
    launcher = FakeLauncher(pg_engine)
    app = create_app(settings=Settings(home=tmp_path), engine=pg_engine, launcher=launcher,
                     registrar=FakeRegistrar())
    with TestClient(app) as client:
        exercise_api_flow(client, pg_engine, {"Authorization": f"Bearer {token}"}, launcher)


def test_concurrent_audit_appends_stay_linear(pg_url: str) -> None:
    engines = [make_engine(pg_url), make_engine(pg_url)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(engine: Engine, actor: str) -> None:
        try:
            barrier.wait()
            for i in range(40):
                with session_scope(engine) as session:
                    append_event(session, actor=actor, action="test.concurrent",
                                 subject=f"n:{i}", detail={"i": i})
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(e, f"w{k}"))
               for k, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with Session(engines[0]) as session:
            events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
            assert len(events) == 80
            assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
            assert {e.actor for e in events} == {"w0", "w1"}
            assert verify_chain(session) is None
    finally:
        for e in engines:
            e.dispose()


def test_second_appender_waits_for_the_first_to_commit(pg_url: str) -> None:
    engines = [make_engine(pg_url), make_engine(pg_url)]
    first_appended = threading.Event()
    committed_at: list[float] = []
    second_done_at: list[float] = []

    def first() -> None:
        with session_scope(engines[0]) as session:
            append_event(session, actor="a", action="test.hold", subject="s", detail={})
            first_appended.set()
            time.sleep(0.3)
        committed_at.append(time.monotonic())

    def second() -> None:
        first_appended.wait(5)
        with session_scope(engines[1]) as session:
            append_event(session, actor="b", action="test.wait", subject="s", detail={})
        second_done_at.append(time.monotonic())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert second_done_at[0] >= committed_at[0] - 0.05
        with Session(engines[0]) as session:
            actions = [e.action for e in session.exec(
                select(AuditEvent).order_by(col(AuditEvent.id))).all()]
            assert actions == ["test.hold", "test.wait"]
            assert verify_chain(session) is None
    finally:
        for e in engines:
            e.dispose()
