"""The release CLI as a person meets it: the real ``fedward-coordinator`` in a subprocess, on
an 80-column terminal, against a real uvicorn serving the coordinator app.

What the sites would measure (export parity) comes from :class:`SlowParity`, which answers
fixed good figures after a pause, as sites do; everything else is real (exports, gates,
signing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from coordinator import release_cli
from coordinator.api import create_app
from coordinator.auth import API_PREFIX
from coordinator.db import make_engine, run_migrations
from coordinator.settings import Settings

from api_support import TestClient, cli_client
from release_support import (
    INTENDED_USE,
    KNOWN_WARNINGS,
    good_figures,
    make_user,
    seed_run,
)
from tests_support import served_app

pytestmark = [*KNOWN_WARNINGS, pytest.mark.timeout(300)]

THREE = ("hospital-a", "hospital-b", "hospital-c")


class SlowParity:
    """Good parity figures for the given sites, after ``delay_s`` (sites take a while)."""

    def __init__(self, sites: tuple[str, ...], delay_s: float) -> None:
        self.sites = sites
        self.delay_s = delay_s

    def evaluate(self, *, run_id: int, candidate_id: int,
                 artefacts: dict[str, Path]) -> dict[str, dict[str, dict[str, float]]]:
        time.sleep(self.delay_s)
        return good_figures(self.sites)


@dataclass
class Coordinator:
    """A served coordinator app and the tokens of its users."""

    base: str
    engine: Engine
    home: Path
    tokens: dict[str, str]     # user name -> API token


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    tokens = {name: make_user(engine, role, name, password=None)["Authorization"].split()[1]
              for name, role in [("eng", "ml_engineer"), ("rev", "reviewer"),
                                 ("admin", "admin")]}
    app = create_app(settings=Settings(home=home), engine=engine,
                     site_parity=SlowParity(THREE, delay_s=3.0))
    try:
        with served_app(app, name="release-cli-uvicorn") as port:
            yield Coordinator(base=f"http://127.0.0.1:{port}", engine=engine, home=home,
                              tokens=tokens)
    finally:
        engine.dispose()


def cli(coord: Coordinator, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fedward-coordinator ARGS`` as ``user`` on an 80-column terminal."""
    env = {**os.environ, "COLUMNS": "80", "LINES": "40", "FEDWARD_API": coord.base,
           "FEDWARD_TOKEN": coord.tokens[user], "FEDWARD_HOME": str(coord.home / "cli-home"),
           "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-c", "from coordinator.cli import main; main()",
                           *args], env=env, capture_output=True, text=True, timeout=240,
                          check=False)


def words(text: str) -> set[str]:
    """The whitespace-separated words of a terminal table, without its box characters."""
    return set(re.sub(r"[│┃┏┓┗┛┡┩└┘├┤┬┴┼━─╇╈┳┻]", " ", text).split())


def test_propose_shows_each_gate_as_it_runs_and_parity_per_site(
        coordinator: Coordinator) -> None:
    run_id = seed_run(coordinator.engine, coordinator.home, sites=THREE)
    t0 = time.monotonic()
    done = cli(coordinator, "eng", "release", "propose", str(run_id), "--intended-use",
               INTENDED_USE, "--json")
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "awaiting_review"   # stdout: JSON only
    progress = done.stderr.splitlines()
    assert progress[0].startswith(f"candidate 1 (run {run_id}, round 3): running 5 gates")

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(progress) if line.startswith(prefix))

    # Parity is announced while the sites measure it, then each site's figures follow.
    running = first("  export_parity: running, each site compares the exports")
    passed = first("  export_parity: passed at ")
    assert first("  site_participation: passed at ") < first("  export: passed at ") \
        < running < passed < first("  privacy_statement: passed at ")
    assert [line.split(":")[0].strip() for line in progress[passed + 1:passed + 4]] == \
        list(THREE)
    assert "onnx agreement 1.00, max diff 1e-06" in progress[passed + 1]
    print(f"propose took {took:.1f} s; progress:\n{done.stderr}")


def test_tables_keep_whole_ids_and_reasons_at_80_columns(coordinator: Coordinator) -> None:
    engine, home = coordinator.engine, coordinator.home
    good = seed_run(engine, home, project="cardio-oncology-research", sites=THREE)
    lonely = seed_run(engine, home, project="cardio-oncology-research", sites=THREE,
                      trained={n: ["hospital-a"] for n in (1, 2, 3)})
    with TestClient(create_app(settings=Settings(home=home), engine=engine,
                               site_parity=SlowParity(THREE, delay_s=0))) as client:
        def propose(run_id: int) -> dict[str, Any]:
            r = client.post(f"{API_PREFIX}/candidates", json={
                "run_id": run_id, "intended_use": INTENDED_USE},
                headers={"Authorization": f"Bearer {coordinator.tokens['eng']}"})
            assert r.status_code == 201, r.text
            body: dict[str, Any] = r.json()
            return body

        ok, failed = propose(good), propose(lonely)
        r = client.post(f"{API_PREFIX}/candidates/{ok['id']}/approve",
                        json={"reason": "gates pass; clinical safety review CS-12 done"},
                        headers={"Authorization": f"Bearer {coordinator.tokens['rev']}"})
        assert r.status_code == 201, r.text
        release_id = r.json()["release_id"]
    assert failed["status"] == "gates_failed"
    reason = next(g["reason"] for g in failed["gates"] if g["name"] == "site_participation")

    listed = cli(coordinator, "rev", "release", "list", "--all")
    assert listed.returncode == 0, listed.stderr
    assert max(map(len, listed.stdout.splitlines())) <= 80
    assert any(re.search(rf"│ {re.escape(release_id)}\s+│", line)
               for line in listed.stdout.splitlines()), listed.stdout
    assert "…" not in listed.stdout

    shown = cli(coordinator, "rev", "release", "candidates", "--status", "gates_failed")
    assert shown.returncode == 0, shown.stderr
    assert max(map(len, shown.stdout.splitlines())) <= 80
    assert "…" not in shown.stdout
    assert set(reason.split()) <= words(shown.stdout), shown.stdout
    assert "site_participation" in words(shown.stdout)

    # --json on both listings: the API's answer, whole.
    as_json = cli(coordinator, "rev", "release", "list", "--all", "--json")
    assert [r["release_id"] for r in json.loads(as_json.stdout)] == [release_id]
    as_json = cli(coordinator, "rev", "release", "candidates", "--json")
    assert {c["id"]: c["status"] for c in json.loads(as_json.stdout)} == {
        ok["id"]: "approved", failed["id"]: "gates_failed"}
    print(listed.stdout + shown.stdout)


def test_gates_without_options_shows_the_thresholds_and_changes_nothing(
        coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_run(coordinator.engine, coordinator.home, rounds=1)
    with TestClient(create_app(settings=Settings(home=coordinator.home),
                               engine=coordinator.engine)) as client:
        as_ = {u: cli_client(client, {"Authorization": f"Bearer {t}"})
               for u, t in coordinator.tokens.items()}
        who = {"now": "rev"}
        monkeypatch.setattr(release_cli, "_client", lambda *_a: as_[who["now"]])
        runner = CliRunner(env={"COLUMNS": "80"})

        def run(*args: str) -> str:
            result = runner.invoke(release_cli.release_app, ["gates", "cardio", *args])
            assert result.exit_code == 0, result.output
            return result.stdout

        run("--min-site-auc", "0.8", "--min-sites", "3")
        out = run()
        assert "release gates of project cardio" in out and "(changed)" not in out
        assert re.search(r"│ min_site_auc\s+│ 0\.8\s+│", out), out
        assert re.search(r"│ min_sites\s+│ 3\s+│", out), out
        assert re.search(r"│ min_round_share\s+│ 0\.5 \(default\)\s+│", out), out
        assert re.search(r"│ min_site_accuracy\s+│ not set\s+│", out), out
        assert "--clear NAME" in out
        # Showing changed nothing; one option changes one threshold.
        assert json.loads(run("--json"))["thresholds"] == {"min_site_auc": 0.8, "min_sites": 3}
        run("--min-site-accuracy", "0.7")
        run("--clear", "min_sites")
        assert json.loads(run("--json"))["thresholds"] == {"min_site_auc": 0.8,
                                                           "min_site_accuracy": 0.7}

        bad = runner.invoke(release_cli.release_app, ["gates", "cardio", "--clear", "min_auc"])
        assert bad.exit_code == 1
        assert "--clear min_auc: no such threshold (known: min_sites, min_round_share" in \
            " ".join(bad.output.split())
        who["now"] = "eng"   # ML engineers see the thresholds, never change them
        assert "min_site_auc" in run()
        denied = runner.invoke(release_cli.release_app, ["gates", "cardio", "--min-sites", "1"])
        assert denied.exit_code == 1 and "403" in denied.output
