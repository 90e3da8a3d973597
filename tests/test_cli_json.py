"""``--json`` on every listing and on every watch of ``fedward-coordinator`` and
``fedward-site`` (issue 12).

One test walks both typer apps and checks that each command of an explicit list of the
listing and watch commands takes ``--json`` (a new listing must join the list, or the test
names it). The others run ``evaluations``, ``study list``, ``tune list`` and ``tune watch``
with ``--json`` through the real API in process (a real SQLite database, no Flower): each
prints what the API answered, machine-readable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select
from typer.main import get_command
from typer.testing import CliRunner

from coordinator import cli as coordinator_cli
from coordinator import tuning as tuning_module
from coordinator.api import create_app
from coordinator.auth import create_user
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import Evaluation, Project, Run, Site, utcnow
from coordinator.settings import Settings
from site_agent.cli import app as site_app

from api_support import cli_client, tuning_when_ended

ROOT = Path(__file__).resolve().parents[1]

# The commands that list things (or report a state as a table) and the watches. Commands
# that act (launch, approve, revoke...) or always print JSON (study show, release lineage)
# are not listings.
COORDINATOR_LISTINGS = frozenset({
    "sites", "runs", "rounds", "users", "evaluations", "statistics", "compare", "watch",
    "release candidates", "release list", "release gates", "mlflow status", "study list",
    "tune list", "tune show", "tune watch", "drift list",
})
SITE_LISTINGS = frozenset({
    "runs", "status", "audit show", "ledger show", "mapping show", "drift show",
    "policy check", "mapping check", "check", "doctor",
})


def _commands(app: typer.Typer) -> dict[str, click.Command]:
    """Every command of the app by its full name (``release list``), sub-apps walked."""
    out: dict[str, click.Command] = {}

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            out[" ".join(path)] = command

    walk(get_command(app), ())
    return out


@pytest.mark.parametrize(("app", "listings"), [
    (coordinator_cli.app, COORDINATOR_LISTINGS), (site_app, SITE_LISTINGS)],
    ids=["fedward-coordinator", "fedward-site"])
def test_every_listing_and_watch_takes_json(app: typer.Typer, listings: frozenset[str]
                                            ) -> None:
    commands = _commands(app)
    assert listings <= commands.keys(), sorted(listings - commands.keys())
    without = sorted(name for name in listings
                     if not any("--json" in p.opts for p in commands[name].params))
    assert without == [], f"listings without --json: {without}"


# --- the API in process ----------------------------------------------------------------


class NoFlower:
    def launch(self, run_id: int) -> str:
        raise RuntimeError("the SuperLink is down")


@pytest.fixture
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[tuple[TestClient, dict[str, str], Engine]]:
    """The coordinator's API on a fresh database; the CLI's client talks to it in process."""
    url = f"sqlite:///{tmp_path / 'home' / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, token = create_user(session, name="admin", role="admin")
        session.add(Project(name="onc"))
        session.add(Site(name="site-a", status="registered"))
    client = TestClient(create_app(settings=Settings(home=tmp_path / "home"), engine=engine,
                                   launcher=NoFlower()))
    headers = {"Authorization": f"Bearer {token}"}

    monkeypatch.setattr(coordinator_cli, "api_client", lambda *_a: cli_client(client, headers))
    with client:
        yield client, headers, engine
    engine.dispose()


def _cli(*args: str, code: int = 0) -> str:
    out = CliRunner().invoke(coordinator_cli.app, list(args))
    assert out.exit_code == code, out.output
    return out.output


def test_evaluations_and_study_list_print_the_api_answer_as_json(
        coordinator: tuple[TestClient, dict[str, str], Engine]) -> None:
    client, headers, engine = coordinator
    with session_scope(engine) as session:
        project = session.exec(select(Project)).one()
        assert project.id is not None
        run = Run(project_id=project.id, task="breast_cancer_mlp", status="completed",
                  config_json="{}", launched_by="admin")
        session.add(run)
        session.flush()
        assert run.id is not None
        run_id = run.id
        session.add(Evaluation(
            run_id=run_id, round_number=3, checkpoint_sha256="c" * 64, requested_by="admin",
            status="completed", finished_at=utcnow(),
            results_json=json.dumps({"site-a": {"eval-auc": 0.91, "eval-accuracy": 0.87}}),
            failed_json=json.dumps({"site-b": "refused-policy: not in this site's policy"})))
    listed = json.loads(_cli("evaluations", str(run_id), "--json"))
    assert listed == client.get(f"/api/v1/runs/{run_id}/evaluations", headers=headers).json()
    assert len(listed) == 1 and "site-a" in json.dumps(listed[0])
    assert "refused-policy" in json.dumps(listed[0])

    assert json.loads(_cli("study", "list", "--json")) == []
    _cli("study", "register", str(ROOT / "fedward" / "studies" / "breast_cancer_mlp.yaml"))
    studies = json.loads(_cli("study", "list", "--json"))
    assert studies == client.get("/api/v1/studies", headers=headers).json()
    assert [s["ref"].split("@")[0] for s in studies] == ["breast_cancer_mlp"]


def test_tune_list_and_watch_print_json(
        coordinator: tuple[TestClient, dict[str, str], Engine],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, headers, _ = coordinator
    monkeypatch.setenv(tuning_module.UNSAFE_TRIALS_ENV, "3")
    assert json.loads(_cli("tune", "list", "--json")) == []
    # No SuperLink: the first trial cannot launch and the search fails with the reason.
    r = client.post("/api/v1/tunings", headers=headers, json={
        "project": "onc", "task": "breast_cancer_mlp", "epsilon": 3.0, "mean_trials": 2.0})
    assert r.status_code == 201, r.text
    final = tuning_when_ended(client, headers, r.json()["id"])
    assert final["status"] == "failed"

    listed = json.loads(_cli("tune", "list", "--json"))
    assert listed == client.get("/api/v1/tunings", headers=headers).json()
    assert [t["id"] for t in listed] == [final["id"]]
    # A search that failed: one line, the search as `tune show --json`, and exit 1 as the
    # table view.
    lines = _cli("tune", "watch", str(final["id"]), "--json", code=1).splitlines()
    assert [json.loads(line) for line in lines] == [final]
    assert json.loads(_cli("tune", "show", str(final["id"]), "--json")) == final


def test_tune_watch_json_prints_one_object_per_update(monkeypatch: pytest.MonkeyPatch) -> None:
    def search(status: str, trials: list[str]) -> dict[str, Any]:
        return {"id": 4, "status": status, "trials": [
            {"number": n, "status": s} for n, s in enumerate(trials)]}

    answers = [search("running", ["running"]), search("running", ["running"]),
               search("running", ["completed", "running"]),
               search("completed", ["completed", "completed"])]
    asked: list[str] = []

    class Answers:
        def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            asked.append(f"{method} {path}")
            return answers.pop(0)

    monkeypatch.setattr(coordinator_cli, "api_client", lambda *_a: Answers())
    # The watch polls every 2 s; here at once (time.sleep as tuning_cli sees it).
    monkeypatch.setattr("coordinator.tuning_cli.time.sleep", lambda _s: None)
    lines = _cli("tune", "watch", "4", "--json").splitlines()
    assert asked == ["GET /tunings/4"] * 4
    # Four polls, three different answers: three lines, the last one final.
    assert [json.loads(line)["status"] for line in lines] == ["running", "running",
                                                                "completed"]
    assert [len(json.loads(line)["trials"]) for line in lines] == [1, 2, 2]
