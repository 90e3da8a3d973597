"""Federated evaluation on demand: the request's rules, and one real evaluation at two sites.

The unit tests drive :mod:`coordinator.evaluation` over a real database seeded as a
completed run (checkpoints after every round). The end-to-end test runs a real federation
(coordinator, SuperLink, gateway, two site agents): it trains a two-round run, then a site's
hospital IT withdraws the project from its policy, and ``fedward-coordinator evaluate``
evaluates the final checkpoint: one site answers with its held-out figures (nothing trained,
nothing charged to its privacy ledger, an ``evaluated`` entry in its audit log), the other
refuses under its policy and its reason is recorded. Then ``evaluate --round 1`` evaluates the
earlier checkpoint: the site evaluates round 1's model (another digest, other figures).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from coordinator import cli as coordinator_cli
from coordinator import evaluation_cli
from coordinator.api import create_app
from coordinator.auth import API_PREFIX
from coordinator.checkpoints import save_checkpoint
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.evaluation import (
    STALE_AFTER_S,
    EvaluationRefused,
    evaluations_of,
    expire_stale,
    request_evaluation,
    rounds_text,
)
from coordinator.models import (
    AuditEvent,
    Checkpoint,
    Evaluation,
    Release,
    ReleaseCandidate,
    Run,
    utcnow,
)
from coordinator.repository import finish_run, mark_run_started
from coordinator.round_records import finish_round, record_checkpoint, start_round
from coordinator.settings import Settings

from api_support import TestClient, cli_client
from federation import BIN, edit_site_policy, federation, run_cli
from release_support import KNOWN_WARNINGS, PASSWORD, make_user, seed_run, trained_arrays
from tests_support import short_tmp

pytestmark = KNOWN_WARNINGS


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[Engine, Path, int]]:
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    run_id = seed_run(engine, home, rounds=3)
    yield engine, home, run_id
    engine.dispose()


def _run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    assert run is not None
    return run


def test_the_final_checkpoint_is_evaluated_once_at_a_time(
        seeded: tuple[Engine, Path, int]) -> None:
    engine, _, run_id = seeded
    with session_scope(engine) as session:
        row = request_evaluation(session, _run(session, run_id), actor="eng")
        assert (row.round_number, row.status, row.release_id) == (3, "pending", None)
    with session_scope(engine) as session, pytest.raises(EvaluationRefused) as err:
        request_evaluation(session, _run(session, run_id), actor="eng")
    assert err.value.status_code == 409
    assert str(err.value) == (f"evaluation {row.id} of run {run_id} is still pending; wait "
                              f"for it (`fedward-coordinator evaluations {run_id}`)")


def test_a_run_still_going_without_a_checkpoint_or_another_runs_release_is_refused(
        seeded: tuple[Engine, Path, int]) -> None:
    engine, home, run_id = seeded
    other = seed_run(engine, home, rounds=1)
    with session_scope(engine) as session:
        cand = ReleaseCandidate(run_id=other, round_number=1, checkpoint_sha256="a" * 64,
                                proposed_by="eng", intended_use="x", status="approved")
        session.add(cand)
        session.flush()
        assert cand.id is not None
        session.add(Release(release_id="rel-other", candidate_id=cand.id, bundle_path="x",
                            key_fingerprint="f", created_by="rev"))
        fresh = Run(project_id=_run(session, run_id).project_id, task="breast_cancer_mlp",
                    launched_by="eng", config_json=_run(session, run_id).config_json)
        session.add(fresh)
        session.flush()
        fresh_id = fresh.id
    assert fresh_id is not None
    cases = [(run_id, "nope", 404, "release 'nope' not found"),
             (run_id, "rel-other", 409, f"release rel-other comes from run {other}, not run "
                                        f"{run_id}: evaluate it as run {other}'s"),
             (fresh_id, None, 409, f"run {fresh_id} is still pending: its final checkpoint "
                                   "does not exist yet")]
    for target, release, code, said in cases:
        with session_scope(engine) as session, pytest.raises(EvaluationRefused) as err:
            request_evaluation(session, _run(session, target), actor="eng",
                               release_id=release)
        assert err.value.status_code == code and str(err.value).startswith(said), err.value
    mark_run_started(engine, fresh_id, "1")
    finish_run(engine, fresh_id, status="failed", reason="round 1: no site")
    with session_scope(engine) as session, pytest.raises(EvaluationRefused,
                                                         match="has no checkpoint"):
        request_evaluation(session, _run(session, fresh_id), actor="eng")
    # A release of the run itself: its candidate's checkpoint.
    with session_scope(engine) as session:
        row = request_evaluation(session, _run(session, other), actor="eng",
                                 release_id="rel-other")
        assert (row.round_number, row.checkpoint_sha256) == (1, "a" * 64)


def _new_run(engine: Engine, home: Path, like: int, *, done: int, then: str) -> int:
    """A 3-round run like ``like`` whose rounds 1..``done`` completed with a checkpoint
    (round 1's model differs from the later ones); ``then``: ``"running"`` (round done+1
    under way, the run live) or ``"failed"`` (round done+1 failed, and the run)."""
    with session_scope(engine) as session:
        base = _run(session, like)
        fresh = Run(project_id=base.project_id, task=base.task, launched_by="eng",
                    config_json=base.config_json)
        session.add(fresh)
        session.flush()
        assert fresh.id is not None
        run_id = fresh.id
    mark_run_started(engine, run_id, "7")
    arrays = dict(trained_arrays())
    for n in range(1, done + 1):
        start_round(engine, run_id, n)
        finish_round(engine, run_id, n, status="completed", participating=["a"], failed=[],
                     late=[], seconds=1.0)
        model = {k: v + (0.5 if n == 1 else 0.0) for k, v in arrays.items()}
        rel, sha = save_checkpoint(home, run_id, n, model)
        record_checkpoint(engine, run_id, n, str(rel), sha)
    start_round(engine, run_id, done + 1)
    if then == "failed":
        finish_round(engine, run_id, done + 1, status="failed", participating=[],
                     failed=[{"site": "a", "phase": "train", "reason": "offline"}], late=[],
                     seconds=1.0)
        finish_run(engine, run_id, status="failed", reason=f"round {done + 1}: no site")
    return run_id


def _saved(engine: Engine, run_id: int) -> dict[int, str]:
    with session_scope(engine) as session:
        return {c.round_number: c.sha256 for c in session.exec(
            select(Checkpoint).where(Checkpoint.run_id == run_id))}


def test_a_round_of_a_run_still_going_is_chosen_and_its_checkpoint_recorded(
        seeded: tuple[Engine, Path, int]) -> None:
    """A round's checkpoint may be evaluated while the run still trains; the default (the
    final checkpoint) is refused for it with the rounds that have one."""
    engine, home, run_id = seeded
    live = _new_run(engine, home, run_id, done=2, then="running")
    saved = _saved(engine, live)
    assert saved[1] != saved[2]
    with session_scope(engine) as session, pytest.raises(EvaluationRefused) as err:
        request_evaluation(session, _run(session, live), actor="eng")
    assert err.value.status_code == 409
    assert str(err.value) == (
        f"run {live} is still running: its final checkpoint does not exist yet; evaluate it "
        "once it has ended, or name a round that has a checkpoint (--round N, API field "
        f"round): run {live} has checkpoints for rounds 1-2")
    with session_scope(engine) as session:
        row = request_evaluation(session, _run(session, live), actor="eng", round_number=1)
        assert (row.round_number, row.checkpoint_sha256) == (1, saved[1])
        assert (row.status, row.release_id) == ("pending", None)
        evaluation_id = row.id
    with session_scope(engine) as session:
        event = session.exec(select(AuditEvent).where(
            AuditEvent.action == "evaluation.requested",
            AuditEvent.subject == f"run:{live}")).one()
        assert json.loads(event.detail_json) == {
            "evaluation": evaluation_id, "round": 1, "checkpoint_sha256": saved[1],
            "release": None, "local_only": False}
        asked = session.get(Evaluation, evaluation_id)
        assert asked is not None
        asked.status = "completed"
        session.add(asked)
    # The round under way has no checkpoint yet.
    with session_scope(engine) as session, pytest.raises(EvaluationRefused) as err:
        request_evaluation(session, _run(session, live), actor="eng", round_number=3)
    assert (err.value.status_code, str(err.value)) == (409, (
        f"round 3 of run {live} is still running: it has no checkpoint; run {live} has "
        "checkpoints for rounds 1-2"))
    # On an ended run, a named round is taken over the final checkpoint.
    second = _saved(engine, run_id)[2]
    with session_scope(engine) as session:
        row = request_evaluation(session, _run(session, run_id), actor="eng", round_number=2)
        assert (row.round_number, row.checkpoint_sha256) == (2, second)


def test_a_round_without_a_checkpoint_or_with_a_release_is_refused_naming_what_exists(
        seeded: tuple[Engine, Path, int]) -> None:
    engine, home, run_id = seeded
    failed = _new_run(engine, home, run_id, done=1, then="failed")
    live = _new_run(engine, home, run_id, done=0, then="running")
    cases = [
        (run_id, 0, None, 422, f"run {run_id} has rounds 1-3, not round 0: run {run_id} has "
                               "checkpoints for rounds 1-3"),
        (run_id, -2, None, 422, f"run {run_id} has rounds 1-3, not round -2: run {run_id} "
                                "has checkpoints for rounds 1-3"),
        (run_id, 4, None, 422, f"run {run_id} has rounds 1-3, not round 4: run {run_id} has "
                               "checkpoints for rounds 1-3"),
        (run_id, 1, "rel-x", 422, "name a round or a release, not both: release rel-x is "
                                  "evaluated at the round it was proposed from; drop the "
                                  "round or the release"),
        (failed, 2, None, 409, f"round 2 of run {failed} ended with status failed: it has no "
                               f"checkpoint; run {failed} has checkpoints for round 1"),
        (failed, 3, None, 409, f"round 3 of run {failed} was never reached: it has no "
                               f"checkpoint; run {failed} has checkpoints for round 1"),
        (live, 2, None, 409, f"round 2 of run {live} has not been reached yet: it has no "
                             f"checkpoint; run {live} has no checkpoint yet (no round has "
                             "completed)"),
        (live, None, None, 409, f"run {live} is still running: its final checkpoint does not "
                                "exist yet; evaluate it once it has ended, or name a round "
                                "that has a checkpoint (--round N, API field round): run "
                                f"{live} has no checkpoint yet (no round has completed)"),
    ]
    for target, number, release, code, said in cases:
        with session_scope(engine) as session, pytest.raises(EvaluationRefused) as err:
            request_evaluation(session, _run(session, target), actor="eng",
                               round_number=number, release_id=release)
        assert (err.value.status_code, str(err.value)) == (code, said)
    with Session(engine) as session:
        assert session.exec(select(Evaluation)).all() == []
    # The failed run's last checkpoint is its default, and round 1 can be named.
    first = _saved(engine, failed)[1]
    with session_scope(engine) as session:
        row = request_evaluation(session, _run(session, failed), actor="eng")
        assert (row.round_number, row.checkpoint_sha256) == (1, first)


def test_rounds_are_named_as_short_ranges() -> None:
    assert rounds_text([2]) == "round 2"
    assert rounds_text([1, 2, 3, 4]) == "rounds 1-4"
    assert rounds_text([1, 2, 3, 5, 7, 8]) == "rounds 1-3, 5, 7-8"


def test_an_evaluation_without_a_result_in_time_is_failed_when_read(
        seeded: tuple[Engine, Path, int]) -> None:
    engine, _, run_id = seeded
    with session_scope(engine) as session:
        row = request_evaluation(session, _run(session, run_id), actor="eng")
        evaluation_id = row.id
    with session_scope(engine) as session:
        assert expire_stale(session, now=utcnow() + timedelta(seconds=60)) == 0
        late = utcnow() + timedelta(seconds=120 + STALE_AFTER_S + 1)  # deadline 120 s
        assert expire_stale(session, now=late) == 1
    with session_scope(engine) as session:
        (found,) = evaluations_of(session, run_id)
        assert found.id == evaluation_id and found.status == "failed"
        assert found.failure_reason is not None
        assert "did not finish; see the coordinator's log and ask again" in found.failure_reason


class _Launcher:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[int, int]] = []

    def launch(self, run_id: int) -> str:
        raise AssertionError("an evaluation starts no training run")

    def launch_evaluation(self, run_id: int, evaluation_id: int) -> str:
        self.calls.append((run_id, evaluation_id))
        if self.fail:
            raise ConnectionError("SuperLink down")
        return "99"


def test_the_api_starts_it_refuses_what_it_cannot_and_who_may(
        seeded: tuple[Engine, Path, int]) -> None:
    engine, home, run_id = seeded
    eng, rev = make_user(engine, "ml_engineer", "eng"), make_user(engine, "reviewer", "rev")
    launcher = _Launcher()
    client = TestClient(create_app(settings=Settings(home=home), engine=engine,
                                   launcher=launcher))
    url = f"{API_PREFIX}/runs/{run_id}/evaluations"
    assert client.post(url, json={}, headers=rev).status_code == 403
    r = client.post(url, json={}, headers=eng)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["status"], body["round_number"], body["requested_by"]) == ("pending", 3, "eng")
    assert launcher.calls == [(run_id, body["id"])]
    again = client.post(url, json={}, headers=eng)
    assert again.status_code == 409 and "still pending" in again.json()["detail"]
    assert client.post(f"{API_PREFIX}/runs/999/evaluations", json={},
                       headers=eng).status_code == 404
    listed = client.get(url, headers=rev).json()
    assert [e["id"] for e in listed] == [body["id"]]
    assert client.get(f"{API_PREFIX}/evaluations/{body['id']}",
                      headers=rev).json()["status"] == "pending"
    # The SuperLink does not start it: failed with the reason, nothing left pending.
    with session_scope(engine) as session:
        for row in session.exec(select(Evaluation)).all():
            row.status = "completed"
            session.add(row)
    down = TestClient(create_app(settings=Settings(home=home), engine=engine,
                                 launcher=_Launcher(fail=True)))
    r = down.post(url, json={}, headers=eng)
    assert r.status_code == 503 and "could not be started" in r.json()["detail"]
    newest = down.get(url, headers=eng).json()[0]
    assert newest["status"] == "failed"
    assert newest["failure_reason"] == "the SuperLink did not start it (ConnectionError)"
    no_flower = TestClient(create_app(settings=Settings(home=home), engine=engine))
    assert no_flower.post(url, json={}, headers=eng).status_code == 503


def test_the_api_and_the_cli_evaluate_a_chosen_round_and_show_it(
        seeded: tuple[Engine, Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, home, run_id = seeded
    admin = make_user(engine, "admin", "boss")
    eng = make_user(engine, "ml_engineer", "eng")
    saved = _saved(engine, run_id)
    launcher = _Launcher()
    client = TestClient(create_app(settings=Settings(home=home), engine=engine,
                                   launcher=launcher))
    url = f"{API_PREFIX}/runs/{run_id}/evaluations"
    for body, said in [
            ({"round": 0}, f"round: run {run_id} has rounds 1-3, not round 0: run {run_id} "
                           "has checkpoints for rounds 1-3"),
            ({"round": 1, "release_id": "rel-1"}, "round: name a round or a release, not "
                                                  "both")]:
        r = client.post(url, json=body, headers=eng)
        assert r.status_code == 422 and r.json()["message"].startswith(said), r.text
        assert r.json()["detail"][0]["loc"] == ["body", "round"]
    assert client.post(url, json={"round": "1"}, headers=eng).status_code == 422  # no coercion
    assert launcher.calls == []
    r = client.post(url, json={"round": 1}, headers=eng)
    assert r.status_code == 202, r.text
    assert (r.json()["round_number"], r.json()["checkpoint_sha256"]) == (1, saved[1])
    assert launcher.calls == [(run_id, r.json()["id"])]
    with session_scope(engine) as session:
        row = session.get(Evaluation, r.json()["id"])
        assert row is not None
        row.status = "completed"
        session.add(row)
    # The CLI: --round goes in the body; the table names the round; a refusal exits 1
    # with the rounds that exist.
    monkeypatch.setattr(coordinator_cli, "api_client",
                        lambda *_a: cli_client(client, admin))
    runner = CliRunner()
    out = runner.invoke(coordinator_cli.app, ["evaluate", str(run_id), "--round", "2",
                                              "--no-wait", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["round_number"] == 2
    refused = runner.invoke(coordinator_cli.app, ["evaluate", str(run_id), "--round", "9"],
                            env={"COLUMNS": "300"})
    assert refused.exit_code == 1
    assert f"run {run_id} has checkpoints for rounds 1-3" in refused.output, refused.output
    listed = runner.invoke(coordinator_cli.app, ["evaluations", str(run_id)],
                           env={"COLUMNS": "300"})
    assert listed.exit_code == 0, listed.output
    text = " ".join(listed.output.split())   # a table's title wraps at its width
    assert f"Evaluation {r.json()['id']} of run {run_id} (checkpoint of round 1): " \
           "completed" in text
    assert "(checkpoint of round 2): pending" in text
    as_json = runner.invoke(coordinator_cli.app, ["evaluations", str(run_id), "--json"])
    assert [e["round_number"] for e in json.loads(as_json.output)] == [2, 1]


def test_a_local_only_evaluation_is_asked_for_and_shown_beside_the_federated_figures(
        seeded: tuple[Engine, Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate --local-only`: the request is recorded and audited as such; the answer, the
    CLI table and the run's portal page put each site's local-only figures beside the
    federated ones, with their mean over sites."""
    engine, home, run_id = seeded
    admin = make_user(engine, "admin", "boss")
    launcher = _Launcher()
    client = TestClient(create_app(settings=Settings(home=home), engine=engine,
                                   launcher=launcher))
    monkeypatch.setattr(coordinator_cli, "api_client",
                        lambda *_a: cli_client(client, admin))
    runner = CliRunner()
    out = runner.invoke(coordinator_cli.app, ["evaluate", str(run_id), "--local-only",
                                              "--no-wait", "--json"])
    assert out.exit_code == 0, out.output
    asked = json.loads(out.output)
    assert asked["local_only"] is True and asked["means"] == {}
    figures = {
        "hospital-a": {"eval-auc": 0.9, "eval-accuracy": 0.8, "eval-balanced-accuracy": 0.75,
                       "eval-brier": 0.3, "local-only-auc": 0.7, "local-only-accuracy": 0.6,
                       "local-only-balanced-accuracy": 0.55, "local-only-brier": 0.5,
                       "local-only-epsilon": 2.9, "num-eval-examples": 40.0},
        "hospital-b": {"eval-auc": 0.8, "eval-accuracy": 0.7, "eval-balanced-accuracy": 0.65,
                       "eval-brier": 0.4, "local-only-auc": 0.5, "local-only-accuracy": 0.5,
                       "local-only-balanced-accuracy": 0.5, "local-only-brier": 0.6,
                       "local-only-epsilon": 2.8, "num-eval-examples": 20.0}}
    with session_scope(engine) as session:
        row = session.get(Evaluation, asked["id"])
        assert row is not None and row.local_only
        row.status, row.results_json = "completed", json.dumps(figures)
        row.failed_json = json.dumps({"hospital-c": "refused-policy: this site's policy does "
                                                    "not train local-only baselines"})
        session.add(row)
        audited = session.exec(select(AuditEvent).where(
            AuditEvent.action == "evaluation.requested")).all()
        assert json.loads(audited[-1].detail_json)["local_only"] is True
    shown = client.get(f"{API_PREFIX}/evaluations/{asked['id']}", headers=admin).json()
    assert shown["means"]["local-only-auc"] == pytest.approx(0.6)
    assert shown["means"]["eval-accuracy"] == pytest.approx(0.75)
    assert "num-eval-examples" not in shown["means"]
    assert "local-only-epsilon" not in shown["means"]
    monkeypatch.setattr(evaluation_cli, "console", Console(width=200))
    listed = runner.invoke(coordinator_cli.app, ["evaluations", str(run_id)])
    assert listed.exit_code == 0, listed.output
    text = " ".join(listed.output.split())
    assert "with each site's local-only DP baseline): completed" in text
    lines = [" ".join(line.replace("│", " ").split()) for line in listed.output.splitlines()]
    assert "hospital-a federated 0.9 0.8 0.75 0.3 - 40" in lines, lines
    assert "local-only 0.7 0.6 0.55 0.5 2.900" in lines
    assert "mean over sites federated 0.85 0.75 0.7 0.35 -" in lines
    assert "local-only 0.6 0.55 0.525 0.55 -" in lines
    assert any(line.startswith("hospital-c - - - - - - refused-policy") for line in lines)
    # The run's page: a table of both models per site and their means.
    r = client.post("/portal/login", data={"name": "boss", "password": PASSWORD},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get(f"/portal/runs/{run_id}").text
    assert "Was federating worth it?" in page
    for row_id in (f"baseline-{asked['id']}-hospital-a-local-only",
                   f"baseline-{asked['id']}-mean-over-sites-federated"):
        assert f'id="{row_id}"' in page, row_id
    mean_row = page.split(f'id="baseline-{asked["id"]}-mean-over-sites-local-only"')[1]
    assert "<td>0.600</td>" in mean_row.split("</tr>")[0]


def test_a_live_evaluation_holds_a_place_under_the_run_limits(
        seeded: tuple[Engine, Path, int]) -> None:
    """An evaluation starts a ServerApp as a run does: while one is pending, a launch (the
    same check, :func:`coordinator.run_control.check_run_limits`) or another evaluation past
    the limit is refused with 429 naming it."""
    engine, home, run_id = seeded
    other = seed_run(engine, home, rounds=1)
    eng = make_user(engine, "ml_engineer", "eng")
    launcher = _Launcher()
    client = TestClient(create_app(
        settings=Settings(home=home, max_concurrent_runs=1,
                          max_concurrent_runs_per_project=1),
        engine=engine, launcher=launcher))
    evaluation = client.post(f"{API_PREFIX}/runs/{run_id}/evaluations", json={}, headers=eng)
    assert evaluation.status_code == 202, evaluation.text
    refused = client.post(f"{API_PREFIX}/runs/{other}/evaluations", json={}, headers=eng)
    assert refused.status_code == 429, refused.text
    assert refused.json()["detail"].startswith(
        "run limit reached: at most 1 runs at once on this coordinator (setting "
        f"FEDWARD_MAX_CONCURRENT_RUNS); held by evaluation {evaluation.json()['id']} of run "
        f"{run_id} (cardio, pending);")
    with Session(engine) as session:
        assert len(session.exec(select(Evaluation)).all()) == 1  # nothing written
    # Once it has ended, its place is free again.
    with session_scope(engine) as session:
        row = session.get(Evaluation, evaluation.json()["id"])
        assert row is not None
        row.status = "completed"
        session.add(row)
    assert client.post(f"{API_PREFIX}/runs/{other}/evaluations", json={},
                       headers=eng).status_code == 202
    assert len(launcher.calls) == 2


@pytest.mark.integration
@pytest.mark.timeout(720)
def test_a_real_evaluation_at_two_sites_one_of_which_refuses() -> None:
    from site_agent.audit import read_entries

    with short_tmp() as work, federation(work, n_sites=2) as fed:
        deadline = time.monotonic() + 120
        while not (fed.home / "superlink.address").exists():
            assert time.monotonic() < deadline, "the coordinator's SuperLink did not start"
            time.sleep(0.5)
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
        answers, refuses = sorted(fed.sites)
        fed.wait_online(2, timeout=180)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=3.0,
                            min_sites=2, round_deadline_s=60)
        assert fed.wait_run(run_id, timeout=420)["status"] == "completed"

        ledger = fed.sites[answers].root / "privacy-ledger.sqlite"

        def charged() -> list[tuple[object, ...]]:
            db = sqlite3.connect(ledger)
            try:
                return db.execute("SELECT * FROM entries ORDER BY rowid").fetchall()
            finally:
                db.close()

        before = charged()
        # Hospital IT at the second site withdraws the project: its site refuses from now.
        edit_site_policy(fed.sites[refuses], projects={})
        done = fed.coord_cli("evaluate", str(run_id), "--json", "--timeout", "300",
                             check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        ev = json.loads(done.stdout)
        assert ev["status"] == "completed" and ev["round_number"] == 2
        figures = ev["sites"][answers]
        assert 0.0 <= figures["eval-auc"] <= 1.0 and 0.0 <= figures["eval-accuracy"] <= 1.0
        assert figures["num-eval-examples"] > 0
        assert set(ev["sites"]) == {answers}
        assert ev["failed"][refuses].startswith("refused-policy"), ev["failed"]
        # Nothing trained or charged at the site that answered; its audit log says what left.
        assert charged() == before
        entries, _ = read_entries(fed.sites[answers].root / "audit.log")
        evaluated = [e for e in entries if e.action == "evaluated"
                     and e.detail.get("run") == str(run_id)]
        assert evaluated and evaluated[-1].detail["round"] == 2
        assert not [e for e in entries if e.action == "round-trained"
                    and e.detail.get("round", 0) > 2]
        # The CLI lists it; the ServerApp's Flower run for it is not taken for a training run.
        listed = run_cli([str(BIN / "fedward-coordinator"), "evaluations", str(run_id)],
                         env={**fed.env, "COLUMNS": "300"}).stdout
        assert f"Evaluation {ev['id']} of run {run_id}" in listed and refuses in listed
        assert fed.api("GET", f"/runs/{run_id}").json()["status"] == "completed"
        # An earlier checkpoint, chosen by its round: the site gets round 1's model (the
        # ServerApp sends only the file matching the digest recorded for round 1).
        done = fed.coord_cli("evaluate", str(run_id), "--round", "1", "--json",
                             "--timeout", "300", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        first = json.loads(done.stdout)
        assert first["status"] == "completed" and first["round_number"] == 1
        assert first["checkpoint_sha256"] != ev["checkpoint_sha256"]
        assert set(first["sites"]) == {answers} and refuses in first["failed"]
        assert first["sites"][answers]["eval-loss"] != figures["eval-loss"]  # another model
        entries, _ = read_entries(fed.sites[answers].root / "audit.log")
        evaluated = [e for e in entries if e.action == "evaluated"
                     and e.detail.get("run") == str(run_id)]
        assert evaluated[-1].detail["round"] == 1
        assert charged() == before
        audit = fed.api("GET", "/audit?limit=50").json()["items"]
        (ended,) = [e["detail"] for e in audit if e["action"] == "evaluation.completed"
                    and e["detail"].get("evaluation") == first["id"]]
        assert ended["round"] == 1 and ended["sites"] == [answers]
        # The local-only DP baseline, asked of both: the site whose IT allows it trains its
        # own model at the run's epsilon, charged to its ledger, and reports it beside the
        # federated model's figures; once per run.
        edit_site_policy(fed.sites[answers], local_baselines=True)
        done = fed.coord_cli("evaluate", str(run_id), "--local-only", "--json",
                             "--timeout", "300", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        base = json.loads(done.stdout)
        assert base["local_only"] is True and set(base["sites"]) == {answers}
        mine = base["sites"][answers]
        assert 0.0 <= mine["local-only-accuracy"] <= 1.0
        assert 0.0 <= mine["eval-balanced-accuracy"] <= 1.0
        assert 0.0 < mine["local-only-epsilon"] <= 3.0 * (1 + 1e-6)
        assert base["means"]["local-only-accuracy"] == mine["local-only-accuracy"]
        assert base["failed"][refuses].startswith("refused-policy"), base["failed"]
        after = charged()
        assert after[:len(before)] == before and len(after) == len(before) + 1
        assert "baseline" in after[-1] and "local-only-" + str(run_id) in after[-1]
        again = fed.coord_cli("evaluate", str(run_id), "--local-only", "--json",
                              "--timeout", "300", check=False)
        assert again.returncode == 3, again.stdout + again.stderr
        assert "trained at this site already" in json.loads(again.stdout)["failed"][answers]
        assert charged() == after
