"""The tuning API in process, with a real database: bad requests, a search whose first trial
cannot launch, a search orphaned by a restart, and relaunching a trial as an ordinary run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select

from coordinator import tuning as tuning_module
from coordinator.api import create_app
from coordinator.auth import create_user
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import Project, Run, Site, Tuning
from coordinator.run_cli import relaunch_body
from coordinator.settings import Settings

from api_support import tuning_when_ended


class NoFlower:
    def launch(self, run_id: int) -> str:
        raise RuntimeError("the SuperLink is down")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Engine]]:
    url = f"sqlite:///{tmp_path / 'home' / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, token = create_user(session, name="ml", role="ml_engineer")
        session.add(Project(name="onc"))
        session.add(Site(name="site-a", status="registered"))
    client = TestClient(create_app(settings=Settings(home=tmp_path / "home"), engine=engine,
                                   launcher=NoFlower()))
    with client:
        yield client, {"Authorization": f"Bearer {token}"}, engine
    engine.dispose()


def test_bad_requests_are_refused_saying_what_to_change(
        app: tuple[TestClient, dict[str, str], Engine]) -> None:
    client, headers, _ = app
    body = {"project": "onc", "task": "breast_cancer_mlp", "epsilon": 3.0}
    r = client.post("/api/v1/tunings", json={**body, "lr": [0.5, 0.1]}, headers=headers)
    assert r.status_code == 422
    assert "lr: give [low, high] with 0 < low <= high, got [0.5, 0.1]" in r.text
    r = client.post("/api/v1/tunings", json={**body, "mean_trials": 0.5}, headers=headers)
    assert r.status_code == 422
    assert "a geometric number of trials has a mean of at least 1, got 0.5" in r.text
    r = client.post("/api/v1/tunings", json={**body, "project": "nope"}, headers=headers)
    assert r.status_code == 422 and "unknown project 'nope': create it first" in r.text
    r = client.post("/api/v1/tunings", json={**body, "sites": ["site-z"]}, headers=headers)
    assert r.status_code == 422 and "sites not registered: site-z" in r.text
    r = client.post("/api/v1/tunings", json={**body, "task": "nope"}, headers=headers)
    assert r.status_code == 422 and "unknown task 'nope'" in r.text
    assert client.get("/api/v1/tunings/9", headers=headers).status_code == 404


def test_a_search_whose_first_trial_cannot_launch_fails_with_the_reason(
        app: tuple[TestClient, dict[str, str], Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, headers, engine = app
    monkeypatch.setenv(tuning_module.UNSAFE_TRIALS_ENV, "3")
    r = client.post("/api/v1/tunings", headers=headers, json={
        "project": "onc", "task": "breast_cancer_mlp", "epsilon": 3.0, "mean_trials": 2.0})
    assert r.status_code == 201, r.text
    out = tuning_when_ended(client, headers, r.json()["id"])
    assert out["status"] == "failed"
    assert out["reason"].startswith("the first trial (run 1) failed: launch failed: "
                                    "RuntimeError: the SuperLink is down")
    assert [t["status"] for t in out["trials"]] == ["failed"]
    assert out["cost"]["epsilon"] == 3.0 and out["cost"]["accountant"] == "rdp"
    with session_scope(engine) as session:
        (run,) = session.exec(select(Run)).all()
        assert run.status == "failed" and '"tuning_search":' in run.config_json


def test_a_search_this_process_is_not_running_is_shown_failed(
        app: tuple[TestClient, dict[str, str], Engine]) -> None:
    client, headers, engine = app
    with session_scope(engine) as session:
        project = session.exec(select(Project)).one()
        assert project.id is not None
        session.add(Tuning(project_id=project.id, task="breast_cancer_mlp",
                           request_json='{"epsilon": 3.0, "delta": 1e-05, "mean_trials": 2.0,'
                                        ' "distribution": "geometric"}',
                           created_by="ml", trials_planned=2))
    out = client.get("/api/v1/tunings/1", headers=headers).json()
    assert out["status"] == "failed"
    assert out["reason"].startswith("the coordinator restarted during the search")


def test_a_trial_launched_again_is_an_ordinary_run() -> None:
    run = {"project": "onc", "task": "breast_cancer_mlp",
           "config": {"rounds": 1, "epsilon": 3.0, "lr": 0.2, "tuning_search": "{}"}}
    body = relaunch_body(run, {"rounds": 5})
    assert "tuning_search" not in body
    assert body["rounds"] == 5 and body["lr"] == 0.2
