"""A site's JSON privacy ledger of earlier versions migrates to SQLite on first open.

The fixture ``fixtures/privacy-ledger-v1.json`` was written by the JSON ledger itself
(commit e1858b1, see ``fixtures/make_privacy_ledger_v1.py``), with the figures that version
reported beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from privacy import LedgerCorruptError, PrivacyLedger
from site_agent.cli import app as site_cli
from site_agent.config import SitePaths
from site_agent.doctor_site import check_ledger

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "privacy-ledger-v1.json"
V1_FIGURES = json.loads((FIXTURES / "privacy-ledger-v1.figures.json").read_text())


@pytest.fixture
def site(tmp_path: Path) -> SitePaths:
    """A site directory holding the JSON ledger an earlier version wrote."""
    paths = SitePaths(tmp_path)
    paths.ledger.with_suffix(".json").write_bytes(V1.read_bytes())
    return paths


def test_a_json_ledger_of_the_previous_version_migrates_on_first_open(site: SitePaths) -> None:
    legacy = site.ledger.with_suffix(".json")
    ledger = PrivacyLedger(site.ledger)
    assert ledger.run_ids() == ["card-1", "card-2", "onc-1", "onc-2"]   # the first open
    assert not legacy.exists() and site.ledger.exists()

    # The same epsilons, within 1% (PRV then, dp-accounting's PLD now).
    for run_id, figure in V1_FIGURES["runs"].items():
        assert ledger.epsilon_spent(run_id) == pytest.approx(figure, rel=0.01, abs=1e-12)
    for project, figure in V1_FIGURES["projects"].items():
        assert ledger.project_epsilon(project) == pytest.approx(figure, rel=0.01)
    assert ledger.site_epsilon() == pytest.approx(V1_FIGURES["site"], rel=0.01)

    # Kept, renamed, byte for byte; never deleted.
    assert not legacy.exists()
    backup = legacy.with_name("privacy-ledger.json.migrated")
    assert backup.read_bytes() == V1.read_bytes()
    assert site.ledger.stat().st_mode & 0o777 == 0o600
    meta, rows = ledger.raw()
    assert meta["migrated_from"] == "privacy-ledger.json"
    assert meta["migrated_from_sha256"] == hashlib.sha256(V1.read_bytes()).hexdigest()

    # Every round, its state and steps, as the JSON had them.
    old = json.loads(V1.read_text())["runs"]
    runs = ledger.all_runs()
    assert sorted(runs) == sorted(old)
    for run_id, run in runs.items():
        assert (run.project, run.epsilon_budget, run.delta, run.noise_multiplier,
                run.sample_rate) == tuple(old[run_id][k] for k in (
                    "project", "epsilon_budget", "delta", "noise_multiplier", "sample_rate"))
        assert {n: (r.status, r.steps, r.at) for n, r in run.rounds.items()} == {
            int(k): ({"done": "charged", "reserved": "reserved"}[v["status"]], v["steps"],
                     v["at"]) for k, v in old[run_id]["rounds"].items()}
        assert sorted(run.history) == sorted(tuple(h) for h in old[run_id]["history"])
    assert len(rows) == sum(len(r["rounds"]) for r in old.values())

    # The site carries on: the killed round 2 of onc-2 is not charged again, round 3 is.
    before = ledger.epsilon_spent("onc-2")
    assert ledger.reserve_round(run_id="onc-2", round_number=2, steps=40) == pytest.approx(
        before)
    assert ledger.epsilon_spent("onc-2") == before
    assert ledger.reserve_round(run_id="onc-2", round_number=3, steps=40) > before
    assert PrivacyLedger(site.ledger).raw()[0] == meta | {}  # migrated once, not again


def _corrupt(doc: dict[str, Any], how: str) -> bytes:
    if how == "not JSON":
        return b"{not json"
    if how == "version":
        doc["version"] = 2
    elif how == "history":
        doc["runs"]["onc-1"]["history"][0][2] = 99
    elif how == "status":
        doc["runs"]["card-1"]["rounds"]["2"]["status"] = "maybe"
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("how", "problem"), [
    ("not JSON", "not valid JSON"),
    ("version", "version is 2, expected 1"),
    ("history", "run 'onc-1': its history"),
    ("status", "run 'card-1' round '2': status is 'maybe'"),
])
def test_a_corrupt_json_ledger_is_refused_and_nothing_is_lost(
        site: SitePaths, how: str, problem: str) -> None:
    legacy = site.ledger.with_suffix(".json")
    damaged = _corrupt(json.loads(V1.read_text()), how)
    legacy.write_bytes(damaged)
    for operation in (lambda ledger: ledger.site_epsilon(),
                      lambda ledger: ledger.open_run(run_id="new", project="p",
                                                     epsilon_budget=1.0, delta=1e-5)):
        with pytest.raises(LedgerCorruptError) as info:
            operation(PrivacyLedger(site.ledger))
        text = str(info.value)
        assert str(legacy) in text and problem in text
        assert "Restore the JSON file from the site's backup" in text
        assert "do NOT delete it" in text
    assert legacy.read_bytes() == damaged            # untouched
    assert not site.ledger.exists()                  # no half-migrated ledger
    assert sorted(p.name for p in site.root.iterdir()) == [
        "privacy-ledger.json", "privacy-ledger.sqlite.lock"]
    # The operator's tools say the same, and nothing is migrated by looking.
    result = CliRunner().invoke(site_cli, ["status", "--dir", str(site.root)])
    assert result.exit_code == 1 and problem in result.output
    check = check_ledger(site)
    assert check.status == "fail" and problem in check.message
    assert legacy.read_bytes() == damaged


def test_an_interrupted_migration_finishes_at_the_next_open(
        site: SitePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from privacy import ledger_db

    def power_cut(self: Any) -> None:
        raise OSError("power cut before the JSON was renamed")

    monkeypatch.setattr(ledger_db._Store, "_backup_legacy", power_cut)
    with pytest.raises(OSError, match="power cut"):
        PrivacyLedger(site.ledger).site_epsilon()
    monkeypatch.undo()
    assert site.ledger.exists() and site.ledger.with_suffix(".json").exists()
    ledger = PrivacyLedger(site.ledger)
    assert ledger.site_epsilon() == pytest.approx(V1_FIGURES["site"], rel=0.01)
    assert not site.ledger.with_suffix(".json").exists()
    assert site.root.joinpath("privacy-ledger.json.migrated").read_bytes() == V1.read_bytes()
    assert len(ledger.entries()) == 9                 # migrated once


def test_a_json_ledger_written_after_the_migration_is_refused(site: SitePaths) -> None:
    PrivacyLedger(site.ledger).site_epsilon()          # migrates
    # An older agent, started by mistake, writes a JSON ledger again.
    newer = json.loads(V1.read_text())
    newer["runs"]["onc-1"]["epsilon_budget"] = 4.0
    legacy = site.ledger.with_suffix(".json")
    legacy.write_text(json.dumps(newer))
    with pytest.raises(LedgerCorruptError, match=re.escape(
            "not the JSON ledger that privacy-ledger.sqlite was migrated from")) as info:
        PrivacyLedger(site.ledger).reserve_round(run_id="onc-2", round_number=3, steps=40)
    assert "do NOT delete either file" in str(info.value)
    assert legacy.exists() and site.root.joinpath("privacy-ledger.json.migrated").exists()


def test_agents_opening_an_unmigrated_ledger_together_migrate_it_once(
        site: SitePaths) -> None:
    results: list[float] = []
    errors: list[BaseException] = []

    def first_open() -> None:
        try:
            results.append(PrivacyLedger(site.ledger).site_epsilon())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_open) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(set(results)) == 1
    names = sorted(p.name for p in site.root.iterdir())
    assert names == ["privacy-ledger.json.migrated", "privacy-ledger.sqlite",
                     "privacy-ledger.sqlite.lock"]
    con = sqlite3.connect(site.ledger)
    try:
        assert con.execute("SELECT count(*) FROM entries").fetchone()[0] == 9
    finally:
        con.close()


def test_doctor_reads_a_json_ledger_without_migrating_it(site: SitePaths) -> None:
    check = check_ledger(site)
    assert check.status == "ok" and "(4 run(s)) migrates to privacy-ledger.sqlite" in check.message
    assert not site.ledger.exists()
    PrivacyLedger(site.ledger).site_epsilon()
    check = check_ledger(site)
    assert check.status == "ok" and "4 run(s), 9 entr" in check.message
