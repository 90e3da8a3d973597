"""Retiring a study version (issue 12): over REST and the CLI, on the real app and a real
SQLite database. A retired version stays listed with who retired it and why; its runs go
on; a new launch naming it, and ``launch --from`` a run that pinned it, are refused (409,
nothing written) with the reason and the version to launch instead. The migration that
adds the columns upgrades a database made at the previous head. ``launch --from`` a run
of a version still in use launches that version again, even once a newer one exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from rich.console import Console
from sqlalchemy import Engine, func, inspect, text
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from coordinator import cli as coordinator_cli
from coordinator import study_cli
from coordinator.db import alembic_config, make_engine, run_migrations
from coordinator.models import AuditEvent, Project, Run, Study
from coordinator.repository import finish_run
from coordinator.study_registry import plan_task
from fedward.run_config import RunPlan

from api_support import TestClient, api, cli_client, setup_registered_sites
from study_support import readmission, register

REASON = "the label counts planned readmissions; fixed in the next version"
KEEPS = "No new run may use it (runs and releases already made from it stay as they are)."


@pytest.fixture
def eng(client: TestClient, token_for: Callable[..., dict[str, str]]) -> dict[str, str]:
    """An ML engineer (``ml_engineer-0``) with a registered site, project ``oncology`` and
    study ``readmission`` at versions 1 and 2."""
    headers = token_for("ml_engineer")
    setup_registered_sites(client, headers, ["site-a"])
    assert client.post(api("/projects"), json={"name": "oncology"},
                       headers=headers).status_code == 201
    assert register(client, headers, spec=readmission()).status_code == 201
    v2 = register(client, headers, spec=readmission(
        training={"lr": 0.25, "batch_size": 32, "local_epochs": 2, "max_grad_norm": 1.0}))
    assert v2.json()["ref"] == "readmission@2", v2.text
    return headers


@pytest.fixture
def cli(client: TestClient, eng: dict[str, str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., Any]:
    """Runs ``fedward-coordinator`` against the app in process, as the ML engineer."""
    monkeypatch.setattr(coordinator_cli, "api_client", lambda *_a: cli_client(client, eng))
    # Wide enough for the listing's columns whatever COLUMNS the test process had when the
    # module's console was made (rich reads it once; xdist workers differ from pytest -s).
    monkeypatch.setattr(study_cli, "console", Console(width=250))

    def run(*args: str, code: int = 0) -> str:
        out = CliRunner(env={"COLUMNS": "250"}).invoke(coordinator_cli.app, list(args))
        assert out.exit_code == code, out.output
        return out.output

    return run


def _launch(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post(api("/runs"), json={"project": "oncology", "rounds": 2,
                                           "epsilon": 3.0, "min_sites": 1, **body},
                       headers=headers)


def _retire(client: TestClient, headers: dict[str, str], ref: str,
            reason: str | None = REASON) -> Any:
    return client.post(api(f"/studies/{ref}/retire"),
                       json={} if reason is None else {"reason": reason}, headers=headers)


def _when(view: dict[str, Any]) -> str:
    return f"{datetime.fromisoformat(view['retired']['at']):%Y-%m-%d %H:%M:%S} UTC"


def _counts(engine: Engine) -> tuple[int, int, int]:
    """Runs, projects and audit entries: a refused launch must add none."""
    with Session(engine) as session:
        return tuple(session.exec(select(func.count()).select_from(t)).one()  # type: ignore[return-value]
                     for t in (Run, Project, AuditEvent))


def test_retiring_records_who_when_why_and_keeps_the_version_listed(
        client: TestClient, eng: dict[str, str], token_for: Callable[..., dict[str, str]],
        engine: Engine) -> None:
    r = _retire(client, eng, "readmission@1", reason=f"  {REASON}\n")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["ref"] == "readmission@1"
    assert {k: v for k, v in view["retired"].items() if k != "at"} == {
        "by": "ml_engineer-0", "reason": REASON, "instead": "readmission@2"}
    with Session(engine) as session:
        row = session.exec(select(Study).where(Study.version == 1)).one()
        assert (row.retired_by, row.retire_reason) == ("ml_engineer-0", REASON)
        assert row.retired_at is not None and row.retired_at.isoformat() == view["retired"]["at"]
        (event,) = session.exec(select(AuditEvent).where(
            AuditEvent.action == "study.retired")).all()
        assert (event.actor, event.subject) == ("ml_engineer-0", "study:readmission@1")
        assert json.loads(event.detail_json) == {"name": "readmission", "version": 1,
                                                 "hash": row.content_hash, "reason": REASON}
    # Not deleted: every reader still lists it, marked, and shows it with its spec.
    reader = token_for("clinician")
    listing = client.get(api("/studies"), headers=reader).json()
    assert [(s["ref"], s["retired"] and s["retired"]["by"]) for s in listing] == [
        ("readmission@1", "ml_engineer-0"), ("readmission@2", None)]
    shown = client.get(api("/studies/readmission@1"), headers=reader).json()
    assert shown["retired"] == view["retired"] and shown["spec"]["training"]["lr"] == 0.5
    assert client.get(api("/studies/readmission"), headers=reader).json()["retired"] is None
    # Registering the same content again is that version, and says it is retired.
    again = register(client, eng, spec=readmission())
    assert again.status_code == 200 and again.json()["retired"]["reason"] == REASON
    # Retiring the newest too: nothing is left in use.
    assert _retire(client, eng, "readmission@2", reason="superseded").status_code == 200
    listing = client.get(api("/studies"), headers=reader).json()
    assert [s["retired"]["instead"] for s in listing] == [None, None]


def test_bad_retirements_are_refused_and_change_nothing(
        client: TestClient, eng: dict[str, str], token_for: Callable[..., dict[str, str]],
        engine: Engine) -> None:
    assert _retire(client, eng, "readmission@1").status_code == 200
    before = _counts(engine)

    def refused(status: int, ref: str, headers: dict[str, str] | None = None,
                **kw: Any) -> Any:
        r = _retire(client, eng if headers is None else headers, ref, **kw)
        assert r.status_code == status, r.text
        return r.json()

    # Twice: the first retirement stands, and the answer says whose it was.
    first = client.get(api("/studies/readmission@1"), headers=eng).json()
    assert refused(409, "readmission@1", reason="again")["detail"] == (
        f"study readmission@1 was already retired by ml_engineer-0 on {_when(first)}: "
        f"{REASON}; nothing changed")
    # A name alone never retires its newest version.
    out = refused(422, "readmission")
    assert out["detail"][0]["loc"] == ["path", "ref"]
    assert out["message"] == (
        "ref: name the version, as NAME@VERSION (e.g. readmission@2) (versions of "
        "readmission: 1, 2): a study name alone never retires its newest version")
    assert refused(404, "readmission@7")["detail"] == (
        "study 'readmission' has no version 7 (versions: 1, 2)")
    assert refused(404, "sepsis@1")["detail"].startswith("no study named 'sepsis' is "
                                                         "registered (registered: readmission)")
    assert "is not a study reference" in refused(422, "Bad Name@1")["message"]
    # No reason, an empty one, only spaces.
    assert refused(422, "readmission@2", reason=None)["message"] == "reason: Field required"
    assert refused(422, "readmission@2", reason="")["message"].startswith("reason: String "
                                                                          "should have at least")
    assert refused(422, "readmission@2", reason="   ")["message"] == (
        "reason: Value error, give the reason for retiring the version (not only spaces)")
    # Roles: reviewers and clinicians may read studies but not retire them; no token, 401.
    for role in ("reviewer", "clinician"):
        assert refused(403, "readmission@2", headers=token_for(role))["detail"].startswith(
            f"role {role!r} may not do this; needs one of ")
    assert refused(401, "readmission@2", headers={})
    assert _counts(engine)[0:2] == before[0:2]
    with Session(engine) as session:
        v2 = session.exec(select(Study).where(Study.version == 2)).one()
        assert (v2.retired_at, v2.retired_by, v2.retire_reason) == (None, None, None)
        assert len(session.exec(select(AuditEvent).where(
            AuditEvent.action == "study.retired")).all()) == 1
    # An admin may retire.
    assert _retire(client, token_for("admin"), "readmission@2").status_code == 200


def test_a_new_launch_of_a_retired_version_is_refused_and_a_going_run_goes_on(
        client: TestClient, eng: dict[str, str], engine: Engine) -> None:
    going = _launch(client, eng, study="readmission@1")
    assert going.status_code == 201, going.text
    retired = _retire(client, eng, "readmission@1").json()
    before = _counts(engine)
    r = _launch(client, eng, study="readmission@1")
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"study readmission@1 was retired by ml_engineer-0 on {_when(retired)}: {REASON}. "
        f"{KEEPS} Launch the newest version of readmission that is not retired instead: "
        "`--study readmission@2`")
    assert _counts(engine) == before
    # The run launched before goes on: it still reads its pinned study by hash.
    with Session(engine) as session:
        run = session.get(Run, going.json()["id"])
        assert run is not None and run.status == "pending"
        plan = RunPlan(**json.loads(run.config_json), run_id=run.id, project="oncology",
                       task=run.task)
    assert plan_task(engine, plan).name == "readmission"
    # NAME alone is the newest version; retired, the refusal names the newest in use.
    v3 = register(client, eng, spec=readmission(metrics=["accuracy"])).json()
    assert v3["ref"] == "readmission@3"
    _retire(client, eng, "readmission@3", reason="superseded")
    r = _launch(client, eng, study="readmission")
    assert r.status_code == 409 and r.json()["detail"].startswith(
        "study readmission@3 was retired by ml_engineer-0 on ")
    assert r.json()["detail"].endswith(": superseded. " + KEEPS + " Launch the newest "
                                       "version of readmission that is not retired instead: "
                                       "`--study readmission@2`")
    assert _counts(engine)[0] == before[0]
    # Runs of a plain task are not affected.
    assert _launch(client, eng, task="breast_cancer_mlp").status_code == 201


def test_the_cli_retires_lists_and_refuses_a_relaunch_with_the_version_to_use(
        client: TestClient, eng: dict[str, str], engine: Engine, cli: Callable[..., str]
        ) -> None:
    first = _launch(client, eng, study="readmission@1")
    assert first.status_code == 201, first.text
    run_id = first.json()["id"]
    out = cli("study", "retire", "readmission@1", "--reason", REASON)
    shown = client.get(api("/studies/readmission@1"), headers=eng).json()
    assert " ".join(out.split()) == (
        f"study readmission@1 retired by ml_engineer-0 on {_when(shown)}: {REASON}. "
        "New runs: use readmission@2 instead.")
    # The table (a long reason wraps within its cell): version 1 marked, version 2 not.
    table = " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘├┤┬┴┼━─╇╈┳┻]", " ", cli("study", "list")).split())
    v1, v2 = table.split("readmission@1 ")[1].split("readmission@2 ")
    assert v1.strip().endswith(f"retired by ml_engineer-0 on {_when(shown)}: {REASON}"), v1
    assert "retired" not in v2
    listing = json.loads(cli("study", "list", "--json"))
    assert listing[0]["retired"] == shown["retired"] and listing[1]["retired"] is None
    assert json.loads(cli("study", "show", "readmission@1"))["retired"] == shown["retired"]
    assert "name the version, as NAME@VERSION" in cli("study", "retire", "readmission",
                                                      "--reason", "x", code=1)
    assert "was already retired by ml_engineer-0" in cli("study", "retire", "readmission@1",
                                                         "--reason", "x", code=1)

    before = _counts(engine)
    refused = cli("launch", "--from", str(run_id), code=1)
    assert " ".join(refused.split()) == (
        f"error: study readmission@1 was retired by ml_engineer-0 on {_when(shown)}: "
        f"{REASON}. {KEEPS} Launch the newest version of readmission that is not retired "
        f"instead: `fedward-coordinator launch --from {run_id} --study readmission@2`")
    # A new launch into a new project: refused before the project is created.
    refused = cli("launch", "--project", "cardio", "--study", "readmission@1",
                  "--epsilon", "3", "--min-sites", "1", code=1)
    assert refused.startswith("error: study readmission@1 was retired by ml_engineer-0")
    assert "instead: `--study readmission@2`" in refused
    assert _counts(engine) == before
    # What the refusal says to do works.
    again = json.loads(cli("launch", "--from", str(run_id), "--study", "readmission@2",
                           "--json"))
    assert (again["config"]["study"], again["config"]["rounds"]) == ("readmission@2", 2)
    # Every version retired: register a new one, and the relaunch command to use then.
    cli("study", "retire", "readmission@2", "--reason", "superseded")
    refused = " ".join(cli("launch", "--from", str(run_id), code=1).split())
    assert refused.endswith(
        f"{KEEPS} Every version of readmission is retired: register a corrected spec as a "
        "new version (`fedward-coordinator study register FILE`), then launch that version "
        f"(`fedward-coordinator launch --from {run_id} --study readmission@VERSION`)")
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Run)).one() == before[0] + 1


def test_a_relaunch_keeps_the_recorded_study_version_after_a_newer_one_is_registered(
        client: TestClient, eng: dict[str, str], engine: Engine, cli: Callable[..., str]
        ) -> None:
    def pinned(run_id: int) -> tuple[str, str, dict[str, Any]]:
        # As the coordinator recorded it: what the ServerApp and the sites are given.
        with Session(engine) as session:
            run = session.get(Run, run_id)
            assert run is not None
            config = json.loads(run.config_json)
        return config.pop("study"), config.pop("study_hash"), config

    v2 = client.get(api("/studies/readmission@2"), headers=eng).json()
    first = _launch(client, eng, study="readmission")   # NAME alone: the newest, version 2
    assert first.status_code == 201, first.text
    run_id = first.json()["id"]
    study, digest, recorded = pinned(run_id)
    assert (study, digest) == ("readmission@2", v2["hash"])
    # Meanwhile a newer version is registered, and the run ends.
    v3 = register(client, eng, spec=readmission(metrics=["accuracy"])).json()
    assert v3["ref"] == "readmission@3" and v3["hash"] != v2["hash"]
    finish_run(engine, run_id, status="completed", reason=None)

    # Launched again with one setting changed: version 2 and its hash, the rest as recorded.
    again = json.loads(cli("launch", "--from", str(run_id), "--rounds", "3", "--json"))
    assert again["id"] != run_id
    study, digest, config = pinned(again["id"])
    assert (study, digest) == ("readmission@2", v2["hash"])
    assert config == {**recorded, "rounds": 3}
    assert (config["lr"], config["sites"]) == (0.25, ["site-a"])   # version 2's lr
    finish_run(engine, again["id"], status="completed", reason=None)
    # --study chooses another version: the newest, pinned by its own hash.
    newest = json.loads(cli("launch", "--from", str(run_id), "--study", "readmission@3",
                            "--json"))
    study, digest, config = pinned(newest["id"])
    assert (study, digest) == ("readmission@3", v3["hash"])
    assert config["rounds"] == recorded["rounds"] == 2


def test_the_migration_upgrades_a_database_of_the_previous_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old' / 'c.db'}"
    run_migrations(url, revision="0015")
    eng = make_engine(url)
    try:
        with eng.begin() as connection:   # a version as the 0015 release registered it
            connection.execute(text(
                "INSERT INTO studies (name, version, content_hash, spec_json, registered_by, "
                "created_at) VALUES ('readmission', 1, :h, :spec, 'alice', "
                "'2026-12-01 10:00:00.000000')"),
                {"h": "a" * 64, "spec": json.dumps(readmission())})
        run_migrations(url)
        columns = {c["name"] for c in inspect(eng).get_columns("studies")}
        assert {"retired_at", "retired_by", "retire_reason"} <= columns
        with Session(eng) as session:
            old = session.exec(select(Study)).one()
            assert (old.name, old.registered_by, old.retired_at, old.retired_by,
                    old.retire_reason) == ("readmission", "alice", None, None, None)
            old.retired_at = datetime.fromisoformat("2026-12-07T14:00:00+00:00")
            session.add(old)
            session.commit()
        # Down again and up: the columns go and come back, the version stays.
        config = alembic_config()
        with eng.begin() as connection:   # one transaction, committed at the end
            config.attributes["connection"] = connection
            command.downgrade(config, "0015")
            assert "retired_at" not in {c["name"] for c in
                                        inspect(connection).get_columns("studies")}
            command.upgrade(config, "head")
        with Session(eng) as session:
            assert session.exec(select(col(Study.name), col(Study.retired_at))).all() == [
                ("readmission", None)]
    finally:
        eng.dispose()
