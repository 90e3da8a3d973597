"""Coordinator database layer on SQLite: settings, engine, migrations, audit chain, repository."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import rfc8785
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import Session, SQLModel, col, select

from coordinator.audit import GENESIS_HASH, append_event, event_hash, verify_chain
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import AuditEvent, Checkpoint, Project, Round, Run, Site, SiteMetric
from coordinator.repository import (
    RunNotFoundError,
    finish_run,
    mark_run_started,
    run_config,
    site_names_by_node_id,
)
from coordinator.round_records import (
    finish_round,
    last_checkpoint,
    record_checkpoint,
    record_site_metrics,
    start_round,
)
from coordinator.settings import Settings, load_settings

TABLES = {"users", "projects", "sites", "runs", "rounds", "site_metrics", "checkpoints",
          "audit_events", "enrollment_tokens", "site_certificates", "user_credentials",
          "login_sessions", "project_gates", "release_candidates", "releases", "mlflow_exports",
          "site_presence", "studies", "run_statistics", "tunings", "tuning_trials",
          "evaluations", "drift_reports", "alembic_version"}
HEAD_REVISION = "0017"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'home' / 'coordinator.db'}"
    run_migrations(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def make_run(engine: Engine) -> Callable[..., int]:
    """Factory: insert a pending run (with its project, once) and return its id."""

    def make(sites: tuple[str, ...] = ("site-a",)) -> int:
        with session_scope(engine) as session:
            project = session.exec(select(Project)).first()
            if project is None:
                project = Project(name="oncology")
                session.add(project)
                session.flush()
            assert project.id is not None
            run = Run(project_id=project.id, task="breast_cancer_mlp", launched_by="alice",
                      config_json=f'{{"rounds": 3, "sites": {list(sites)!r}}}'.replace("'", '"'))
            session.add(run)
            session.flush()
            assert run.id is not None
            return run.id

    return make


# --- settings ----------------------------------------------------------------------------


def test_settings_default_to_sqlite_in_home(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDWARD_DATABASE_URL", raising=False)
    monkeypatch.setenv("FEDWARD_HOME", str(tmp_path / "env-home"))
    settings = load_settings()
    assert settings.home == tmp_path / "env-home"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'env-home'}/coordinator.db"
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8600)
    assert load_settings(tmp_path / "cli-home").home == tmp_path / "cli-home"
    assert not (tmp_path / "env-home").exists()  # loading settings creates nothing


def test_settings_read_database_url_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDWARD_DATABASE_URL", "postgresql+psycopg2://u@db:5432/fedward")
    monkeypatch.setenv("FEDWARD_API_PORT", "9000")
    settings = Settings(home=Path("relative/home"))
    assert settings.effective_database_url == "postgresql+psycopg2://u@db:5432/fedward"
    assert settings.api_port == 9000
    assert settings.home.is_absolute()
    monkeypatch.setenv("FEDWARD_DATABASE_URL", "")
    assert Settings(home=Path("/srv/f")).effective_database_url == "sqlite:////srv/f/coordinator.db"


# --- engine and migrations ---------------------------------------------------------------


def test_sqlite_engine_pragmas(engine: Engine) -> None:
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(Run(project_id=12345, task="t", launched_by="x", config_json="{}"))


def test_migrations_create_schema_matching_models_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing of the repository is reachable from here
    url = f"sqlite:///{tmp_path / 'new' / 'c.db'}"
    run_migrations(url)
    run_migrations(url)  # a second start is a no-op
    eng = make_engine(url)
    try:
        assert set(inspect(eng).get_table_names()) == TABLES
        with eng.connect() as connection:
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").all() \
                == [(HEAD_REVISION,)]
            diff = compare_metadata(
                MigrationContext.configure(connection, opts={"compare_type": True}),
                SQLModel.metadata,
            )
        assert diff == []
    finally:
        eng.dispose()


def test_product_code_never_creates_tables_itself() -> None:
    root = Path(__file__).resolve().parents[1] / "coordinator"
    offenders = [str(p) for p in root.rglob("*.py")
                 if "create_all(" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_timestamps_are_utc_aware_and_naive_ones_refused(engine: Engine) -> None:
    with session_scope(engine) as session:
        session.add(Project(name="p"))
    with Session(engine) as session:
        project = session.exec(select(Project)).one()
        assert project.created_at.tzinfo is UTC
        assert abs((datetime.now(UTC) - project.created_at).total_seconds()) < 60
    with pytest.raises(StatementError, match="naive datetime"), session_scope(engine) as session:
        session.add(Project(name="q", created_at=datetime(2025, 1, 1)))


# --- audit chain -------------------------------------------------------------------------


def _append(engine: Engine, n: int, actor: str = "alice") -> list[int]:
    ids = []
    for i in range(n):
        with session_scope(engine) as session:
            event = append_event(session, actor=actor, action="test.event",
                                 subject=f"thing:{i}", detail={"i": i, "x": 0.1})
            assert event.id is not None
            ids.append(event.id)
    return ids


def _append_as_old_release(engine: Engine, n: int, *, start: int = 0) -> None:
    """Audit entries as releases before the chain format's version 2 wrote them: hash =
    SHA-256(prev_hash + JSON with sorted keys, no spaces, non-ASCII kept)."""
    with engine.begin() as connection:
        last = connection.execute(text(
            "SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1")).first()
        prev = last[0] if last is not None else GENESIS_HASH
        for i in range(start, start + n):
            detail = {"i": i, "x": 0.1, "who": "Zoë"}
            body = json.dumps({"at": f"2026-01-02T03:04:{i:02d}+00:00", "actor": "alice",
                               "action": "test.event", "subject": f"thing:{i}",
                               "detail": detail}, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False)
            digest = hashlib.sha256((prev + body).encode("utf-8")).hexdigest()
            connection.execute(text(
                "INSERT INTO audit_events (at, actor, action, subject, detail_json, "
                "prev_hash, hash) VALUES (:at, 'alice', 'test.event', :subject, :detail, "
                ":prev, :hash)"), {
                    "at": f"2026-01-02 03:04:{i:02d}.000000", "subject": f"thing:{i}",
                    "detail": json.dumps(detail, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False),
                    "prev": prev, "hash": digest})
            prev = digest


def test_audit_chain_links_and_verifies(engine: Engine) -> None:
    ids = _append(engine, 3)
    with Session(engine) as session:
        events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
        assert events[0].prev_hash == GENESIS_HASH
        assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
        first = events[0]
        assert first.hash == event_hash(prev_hash=GENESIS_HASH, at=first.at, actor="alice",
                                        action="test.event", subject="thing:0",
                                        detail={"i": 0, "x": 0.1})
        assert verify_chain(session) is None
    assert len(ids) == 3


def test_a_database_from_an_older_release_upgrades_with_its_audit_chain_intact(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old' / 'c.db'}"
    run_migrations(url, revision="0003")     # the schema before the audit lookup index
    eng = make_engine(url)
    try:
        _append_as_old_release(eng, 4)
        run_migrations(url)
        assert "ix_audit_events_action_subject" in {
            ix["name"] for ix in inspect(eng).get_indexes("audit_events")}
        with Session(eng) as session:
            assert len(session.exec(select(AuditEvent)).all()) == 4
            assert verify_chain(session) is None
    finally:
        eng.dispose()


def test_an_upgrade_from_0004_keeps_users_and_certificates_and_gives_old_tokens_an_end(
        tmp_path: Path) -> None:
    from datetime import timedelta

    from coordinator.auth import user_for_token
    from coordinator.models import SiteCertificate, User

    url = f"sqlite:///{tmp_path / 'old' / 'c.db'}"
    run_migrations(url, revision="0004")     # before token expiry, disabled users, renewal
    eng = make_engine(url)
    try:
        with eng.begin() as connection:   # rows as the 0004 release wrote them
            connection.execute(text(
                "INSERT INTO users (name, role, token_hash, created_at) VALUES "
                "('alice', 'admin', :h, '2026-01-02 03:04:05.000000')"),
                {"h": hashlib.sha256(b"old-token").hexdigest()})
            connection.execute(text(
                "INSERT INTO sites (name, status, created_at) VALUES "
                "('site-a', 'registered', '2026-01-02 03:04:05.000000')"))
            connection.execute(text(
                "INSERT INTO site_certificates (site_id, serial, issued_at, not_after) VALUES "
                "(1, 'abc1', '2026-01-02 03:04:05.000000', '2027-01-02 03:04:05.000000')"))
        _append_as_old_release(eng, 2)
        run_migrations(url)
        with Session(eng) as session:
            alice = session.exec(select(User)).one()
            assert (alice.name, alice.role, alice.disabled_at, alice.token_revoked_at) == (
                "alice", "admin", None, None)
            left = alice.token_expires_at - datetime.now(UTC)
            assert timedelta(days=89) < left <= timedelta(days=90)
            assert user_for_token(session, "old-token") == alice   # still works, until then
            cert = session.exec(select(SiteCertificate)).one()
            assert (cert.serial, cert.revoked_at, cert.superseded_by) == ("abc1", None, None)
            assert verify_chain(session) is None
    finally:
        eng.dispose()


@pytest.mark.parametrize(
    ("sql", "broken"),
    [
        # An edited detail: that entry's hash no longer matches.
        ("UPDATE audit_events SET detail_json = :edited WHERE id = :b", 0),
        # An edited actor.
        ("UPDATE audit_events SET actor = 'mallory' WHERE id = :b", 0),
        # Edited with a made-up hash.
        ("UPDATE audit_events SET hash = :fake WHERE id = :b", 0),
        # A deleted entry: the next entry's link breaks.
        ("DELETE FROM audit_events WHERE id = :b", 1),
        # Unparseable detail.
        ("UPDATE audit_events SET detail_json = 'not json' WHERE id = :b", 0),
    ],
)
def test_audit_tampering_is_found_at_the_right_entry(engine: Engine, sql: str,
                                                     broken: int) -> None:
    ids = _append(engine, 4)
    target = ids[1]
    with engine.begin() as connection:
        connection.execute(text(sql), {"b": target, "fake": "f" * 64,
                                         "edited": '{"i":1,"x":0.2}'})
    with Session(engine) as session:
        assert verify_chain(session) == ids[1 + broken]


def test_edited_and_rehashed_entry_breaks_the_next_link(engine: Engine) -> None:
    ids = _append(engine, 3)
    with session_scope(engine) as session:
        event = session.get(AuditEvent, ids[1])
        assert event is not None
        event.subject = "thing:forged"
        event.hash = event_hash(prev_hash=event.prev_hash, at=event.at, actor=event.actor,
                                action=event.action, subject=event.subject,
                                detail={"i": 1, "x": 0.1})
    with Session(engine) as session:
        assert verify_chain(session) == ids[2]


def test_an_old_chain_goes_on_in_the_new_format_and_still_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old' / 'c.db'}"
    run_migrations(url, revision="0006")     # the last schema before the format version
    eng = make_engine(url)
    try:
        _append_as_old_release(eng, 3)
        run_migrations(url)
        ids = _append(eng, 2)
        with Session(eng) as session:
            events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
            assert [e.hash_version for e in events] == [1, 1, 1, 2, 2]
            assert events[3].prev_hash == events[2].hash
            assert verify_chain(session) is None
            # The new entries are RFC 8785 canonical JSON over the entry with "v": 2.
            new = events[3]
            body = {"at": new.at.astimezone(UTC).isoformat(), "actor": "alice",
                    "action": "test.event", "subject": "thing:0",
                    "detail": {"i": 0, "x": 0.1}, "v": 2}
            assert new.hash == hashlib.sha256(
                new.prev_hash.encode() + rfc8785.dumps(body)).hexdigest()
        with eng.begin() as connection:   # an old entry edited: found at that entry
            connection.execute(text(
                "UPDATE audit_events SET detail_json = :d WHERE id = 2"),
                {"d": '{"i":1,"who":"Zoe","x":0.1}'})
        with Session(eng) as session:
            assert verify_chain(session) == 2
        with eng.begin() as connection:   # restored; then a new entry relabelled as old
            connection.execute(text(
                "UPDATE audit_events SET detail_json = :d WHERE id = 2"),
                {"d": '{"i":1,"who":"Zoë","x":0.1}'})
            connection.execute(text(
                "UPDATE audit_events SET hash_version = 1 WHERE id = :i"), {"i": ids[1]})
        with Session(eng) as session:
            assert verify_chain(session) == ids[1]
    finally:
        eng.dispose()


def test_an_old_format_entry_after_a_new_one_breaks_the_chain(engine: Engine) -> None:
    _append(engine, 1)
    _append_as_old_release(engine, 1, start=5)   # correctly linked and hashed, but old
    with Session(engine) as session:
        events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
        assert [e.hash_version for e in events] == [2, 1]
        assert verify_chain(session) == events[1].id


def test_prev_hash_is_unique_so_the_chain_cannot_fork(engine: Engine) -> None:
    _append(engine, 1)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO audit_events (at, actor, action, subject, detail_json, prev_hash, hash)"
            " VALUES ('2025-01-01 00:00:00', 'x', 'y', 'z', '{}', :p, :h)"),
            {"p": GENESIS_HASH, "h": "e" * 64})


def test_concurrent_appenders_keep_one_linear_chain(db_url: str) -> None:
    # Two engines = two independent connection pools, as the API and ServerApp processes have.
    engines = [make_engine(db_url), make_engine(db_url)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(eng: Engine, actor: str) -> None:
        try:
            barrier.wait()
            for i in range(25):
                with session_scope(eng) as session:
                    # Read something first, as an API route does, before appending.
                    session.exec(select(Project)).all()
                    append_event(session, actor=actor, action="test.concurrent",
                                 subject=f"n:{i}", detail={"i": i})
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(eng, f"w{k}"))
               for k, eng in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with Session(engines[0]) as session:
            events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
            assert len(events) == 50
            assert {e.actor for e in events} == {"w0", "w1"}
            assert verify_chain(session) is None
    finally:
        for eng in engines:
            eng.dispose()


# --- repository (what the ServerApp writes) ----------------------------------------------


def test_start_round_twice_is_one_row(engine: Engine, make_run: Callable[..., int]) -> None:
    run_id = make_run()
    start_round(engine, run_id, 1)
    finish_round(engine, run_id, 1, status="failed", participating=[], failed=[],
                 late=["site-a"], seconds=120.0)
    start_round(engine, run_id, 1)  # resumed run repeats round 1
    with Session(engine) as session:
        rounds = session.exec(select(Round)).all()
    assert len(rounds) == 1
    assert (rounds[0].status, rounds[0].finished_at, rounds[0].late_sites_json) == (
        "running", None, "[]")


def test_finish_round_validates_input(engine: Engine, make_run: Callable[..., int]) -> None:
    run_id = make_run()
    with pytest.raises(ValueError, match="completed, failed or cancelled"):
        finish_round(engine, run_id, 1, status="running", participating=[], failed=[],
                     late=[], seconds=1)
    with pytest.raises(ValueError, match="lacks phase, reason"):
        finish_round(engine, run_id, 1, status="failed", participating=[],
                     failed=[{"site": "site-a"}], late=[], seconds=1)
    with pytest.raises(RunNotFoundError, match="run 999 not found"):
        start_round(engine, 999, 1)


def test_mark_run_started_and_finish_run(engine: Engine, make_run: Callable[..., int]) -> None:
    run_id = make_run()
    mark_run_started(engine, run_id, "11")
    mark_run_started(engine, run_id, "11")  # repeated: no change, no second audit entry
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        first_start = run.started_at
        assert (run.status, run.flwr_run_id) == ("running", "11")
    mark_run_started(engine, run_id, "12")  # resumed as a new Flower run
    finish_run(engine, run_id, status="failed", reason="SuperLink crashed")
    finish_run(engine, run_id, status="completed", reason=None)  # first outcome kept
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert (run.status, run.failure_reason) == ("failed", "SuperLink crashed")
    mark_run_started(engine, run_id, "13")  # a failed run resumes from its checkpoint
    finish_run(engine, run_id, status="completed", reason=None)
    with pytest.raises(ValueError, match="already finished"):
        mark_run_started(engine, run_id, "14")
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert (run.status, run.failure_reason, run.flwr_run_id) == ("completed", None, "13")
        assert run.started_at == first_start
        assert run.finished_at is not None
        events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
    assert [e.action for e in events] == [
        "run.started", "run.resumed", "run.finished", "run.resumed", "run.finished"]
    assert '"reason":"SuperLink crashed"' in events[2].detail_json
    with pytest.raises(ValueError, match="run status must be one of"):
        finish_run(engine, run_id, status="done", reason=None)


def test_non_finite_values_are_not_stored(engine: Engine, make_run: Callable[..., int],
                                          caplog: pytest.LogCaptureFixture) -> None:
    run_id = make_run()
    record_site_metrics(engine, run_id, 1, "site-a",
                        {"eval-loss": float("nan"), "train-loss": float("inf"), "eval-auc": 0.9})
    finish_round(engine, run_id, 1, status="completed", participating=["site-a"], failed=[],
                 late=[], seconds=float("nan"))
    with Session(engine) as session:
        metrics = session.exec(select(SiteMetric.name, SiteMetric.value)).all()
        round_ = session.exec(select(Round)).one()
    assert [tuple(m) for m in metrics] == [("eval-auc", 0.9)]
    assert round_.seconds is None
    assert "non-finite metrics not stored: eval-loss, train-loss" in caplog.text


def test_record_checkpoint_rejects_paths_outside_home(engine: Engine,
                                                      make_run: Callable[..., int]) -> None:
    run_id = make_run()
    for bad in ("/etc/passwd", "../outside.safetensors", "C:\\x.safetensors"):
        with pytest.raises(ValueError, match="relative to the home"):
            record_checkpoint(engine, run_id, 1, bad, "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        record_checkpoint(engine, run_id, 1, "runs/1/r1.safetensors", "abc")
    record_checkpoint(engine, run_id, 1, "runs/1/r1.safetensors", "A" * 64)
    record_checkpoint(engine, run_id, 1, "runs/1/r1b.safetensors", "b" * 64)  # replaced
    with Session(engine) as session:
        rows = session.exec(select(Checkpoint.path, Checkpoint.sha256)).all()
    assert [tuple(r) for r in rows] == [("runs/1/r1b.safetensors", "b" * 64)]


def test_last_checkpoint_is_the_highest_round(engine: Engine,
                                              make_run: Callable[..., int]) -> None:
    run_id = make_run()
    assert last_checkpoint(engine, run_id) is None
    record_checkpoint(engine, run_id, 2, "runs/1/r2.safetensors", "2" * 64)
    record_checkpoint(engine, run_id, 1, "runs/1/r1.safetensors", "1" * 64)
    assert last_checkpoint(engine, run_id) == (2, "runs/1/r2.safetensors", "2" * 64)
    with pytest.raises(RunNotFoundError):
        last_checkpoint(engine, 999)


def test_site_names_by_node_id_only_registered(engine: Engine) -> None:
    with session_scope(engine) as session:
        session.add(Site(name="site-a", flower_node_id=str(2**64 - 1), status="registered"))
        session.add(Site(name="site-b", flower_node_id="5", status="revoked"))
        session.add(Site(name="site-c"))
    assert site_names_by_node_id(engine) == {str(2**64 - 1): "site-a"}


def test_run_config_adds_identity(engine: Engine, make_run: Callable[..., int]) -> None:
    run_id = make_run(("site-a", "site-b"))
    config = run_config(engine, run_id)
    assert config == {"rounds": 3, "sites": ["site-a", "site-b"], "run_id": run_id,
                      "project": "oncology", "task": "breast_cancer_mlp"}


def test_sqlite_file_is_created_under_home(tmp_path: Path) -> None:
    url = Settings(home=tmp_path / "fresh").effective_database_url
    run_migrations(url)
    assert (tmp_path / "fresh" / "coordinator.db").is_file()
    assert os.access(tmp_path / "fresh" / "coordinator.db", os.R_OK)
