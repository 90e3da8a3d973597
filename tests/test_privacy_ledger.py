"""Tests of privacy.ledger: write-ahead charging, persistence, corruption and crashes."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import (
    BudgetExceededError,
    DpSgd,
    LedgerCorruptError,
    PlanExceededError,
    PrivacyLedger,
    UnknownRunError,
    check_run_plan,
    compose_mechanisms,
    noise_multiplier_for_run,
    planned_steps,
    site_budget,
)

from tests_support import no_warm_ups_left

DELTA = 1e-5
SIGMA = 1.5
Q = 0.1
STEPS = 10

LedgerFactory = Callable[..., PrivacyLedger]


def dpsgd_epsilon(*history: tuple[float, float, int], delta: float = DELTA) -> float:
    """The ledger accountant's figure of DP-SGD steps (sigma, q, steps)."""
    return compose_mechanisms([DpSgd(s, q, n) for s, q, n in history], delta=delta).epsilon


def stored(path: Path) -> Any:
    """What the ledger file holds (metadata and every row), read without the ledger code,
    to show that a refused operation wrote nothing."""
    if not path.exists():
        return None
    con = sqlite3.connect(path)
    try:
        return ([tuple(r) for r in con.execute("SELECT * FROM runs ORDER BY run_id")],
                [tuple(r) for r in con.execute("SELECT * FROM entries ORDER BY id")])
    finally:
        con.close()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "site-data" / "privacy-ledger.sqlite"


@pytest.fixture
def make_ledger(ledger_path: Path) -> LedgerFactory:
    """A ledger on ``ledger_path`` with one run opened (another instance per call)."""

    def make(
        *,
        run_id: str = "run-1",
        project: str = "proj",
        budget: float = 5.0,
        delta: float = DELTA,
        sigma: float = SIGMA,
    ) -> PrivacyLedger:
        ledger = PrivacyLedger(ledger_path)
        ledger.open_run(
            run_id=run_id,
            project=project,
            epsilon_budget=budget,
            delta=delta,
            noise_multiplier=sigma,
            sample_rate=Q,
        )
        return ledger

    return make


def test_missing_file_is_an_empty_ledger(ledger_path: Path) -> None:
    ledger = PrivacyLedger(ledger_path)
    assert ledger.get_run("nope") is None
    assert ledger.project_epsilon("proj") == 0.0
    assert not ledger_path.exists()


def test_open_run_is_idempotent_and_refuses_changed_parameters(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    make_ledger()
    before = stored(ledger_path)
    make_ledger()
    assert stored(ledger_path) == before
    with pytest.raises(ValueError, match=re.escape("noise_multiplier: ledger has 1.5, got 2.0")):
        make_ledger(sigma=2.0)
    with pytest.raises(ValueError, match="epsilon_budget"):
        make_ledger(budget=9.0)
    assert stored(ledger_path) == before


def test_open_run_reports_every_bad_argument(ledger_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        PrivacyLedger(ledger_path).open_run(
            run_id="", project="p", epsilon_budget=0.0, delta=2.0,
            noise_multiplier=1.0, sample_rate=0.1,
        )
    message = str(info.value)
    assert "run_id" in message and "epsilon budget" in message and "delta" in message


def test_reserve_charges_before_training_and_survives_restart(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    ledger = make_ledger()
    eps1 = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    eps2 = ledger.reserve_round(run_id="run-1", round_number=2, steps=STEPS)
    assert 0 < eps1 < eps2
    assert eps2 == dpsgd_epsilon((SIGMA, Q, 2 * STEPS))

    restarted = PrivacyLedger(ledger_path)
    assert restarted.epsilon_spent("run-1") == eps2
    assert restarted.history("run-1") == [(SIGMA, Q, STEPS), (SIGMA, Q, STEPS)]
    view = restarted.get_run("run-1")
    assert view is not None
    assert view.rounds[1].status == "reserved" and view.rounds[1].epsilon_after == eps1
    assert view.rounds[2].steps == STEPS
    assert (view.project, view.noise_multiplier, view.sample_rate) == ("proj", SIGMA, Q)


def test_a_round_is_never_charged_twice(make_ledger: LedgerFactory, ledger_path: Path) -> None:
    ledger = make_ledger()
    first = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    before = stored(ledger_path)
    again = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    assert again == first
    assert stored(ledger_path) == before
    assert ledger.complete_round(run_id="run-1", round_number=1) == first
    assert PrivacyLedger(ledger_path).reserve_round(
        run_id="run-1", round_number=1, steps=STEPS
    ) == first
    assert ledger.history("run-1") == [(SIGMA, Q, STEPS)]


def test_a_retried_round_must_train_the_same_steps(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger()
    ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    with pytest.raises(ValueError, match=r"round 1 of run 'run-1' is already charged for "
                       r"DP-SGD: 10 step\(s\).*not DP-SGD: 20 step\(s\)"):
        ledger.reserve_round(run_id="run-1", round_number=1, steps=2 * STEPS)


def test_over_budget_reserve_persists_nothing(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    ledger = make_ledger(budget=2.0)
    spent = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    before = stored(ledger_path)
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve_round(run_id="run-1", round_number=2, steps=10 * STEPS)
    assert stored(ledger_path) == before
    assert info.value.spent == spent and info.value.budget == 2.0
    assert info.value.projected > 2.0
    assert "policy" in str(info.value)


def test_site_cap_lowers_the_run_budget(make_ledger: LedgerFactory, ledger_path: Path) -> None:
    ledger = make_ledger(budget=50.0)
    before = stored(ledger_path)
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS, cap=0.1)
    assert info.value.budget == 0.1
    assert stored(ledger_path) == before


def test_site_cap_covers_all_runs_of_the_project(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(run_id="a", budget=10.0)
    make_ledger(run_id="b", budget=10.0)
    make_ledger(run_id="other", project="elsewhere", budget=10.0)
    one_round = ledger.reserve_round(run_id="a", round_number=1, steps=STEPS, cap=10.0)
    two_rounds = dpsgd_epsilon((SIGMA, Q, 2 * STEPS))
    cap = (one_round + two_rounds) / 2
    ledger.reserve_round(run_id="other", round_number=1, steps=STEPS, cap=cap)
    # Run "b" alone would stay under the cap, but together with "a" the project would not.
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve_round(run_id="b", round_number=1, steps=STEPS, cap=cap)
    assert info.value.scope == "project"
    assert ledger.get_run("b") is not None and ledger.history("b") == []


def test_crashed_round_stays_charged(make_ledger: LedgerFactory, ledger_path: Path) -> None:
    ledger = make_ledger()
    ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    ledger.complete_round(run_id="run-1", round_number=1)
    eps = ledger.reserve_round(run_id="run-1", round_number=2, steps=STEPS)
    # The process dies while training round 2: it is still counted after a restart.
    restarted = PrivacyLedger(ledger_path)
    assert restarted.epsilon_spent("run-1") == eps
    view = restarted.get_run("run-1")
    assert view is not None
    assert [r.status for r in view.rounds.values()] == ["charged", "reserved"]


def test_complete_round_errors(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger()
    with pytest.raises(ValueError, match="never reserved"):
        ledger.complete_round(run_id="run-1", round_number=3)
    with pytest.raises(UnknownRunError, match="open_run"):
        ledger.complete_round(run_id="ghost", round_number=1)
    with pytest.raises(UnknownRunError):
        ledger.reserve_round(run_id="ghost", round_number=1, steps=STEPS)


def test_project_epsilon_composes_runs_at_the_largest_delta(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(run_id="a")
    make_ledger(run_id="b", delta=1e-6, sigma=2.0)
    make_ledger(run_id="c", project="elsewhere")
    ledger.reserve_round(run_id="a", round_number=1, steps=STEPS)
    ledger.reserve_round(run_id="b", round_number=1, steps=STEPS)
    ledger.reserve_round(run_id="c", round_number=1, steps=STEPS)
    expected = dpsgd_epsilon((SIGMA, Q, STEPS), (2.0, Q, STEPS))
    assert ledger.project_epsilon("proj") == expected
    assert expected > ledger.epsilon_spent("a")
    assert ledger.run_ids(project="proj") == ["a", "b"]
    assert ledger.project_epsilon("nobody") == 0.0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not a database" * 100, "not a readable SQLite file"),
        (b"SQLite format 3\x00" + b"\x00" * 200, "not a readable"),
    ],
)
def test_unreadable_ledger_is_refused(
    ledger_path: Path, content: bytes, problem: str
) -> None:
    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_bytes(content)
    ledger = PrivacyLedger(ledger_path)
    with pytest.raises(LedgerCorruptError) as info:
        ledger.get_run("run-1")
    assert problem in str(info.value)
    assert str(ledger_path) in str(info.value) and "backup" in str(info.value)
    with pytest.raises(LedgerCorruptError):
        ledger.open_run(run_id="r", project="p", epsilon_budget=1.0, delta=DELTA,
                        noise_multiplier=1.0, sample_rate=0.1)
    assert ledger_path.read_bytes() == content  # never reset


def test_a_sqlite_file_that_is_not_a_ledger_is_refused(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True)
    con = sqlite3.connect(ledger_path)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()
    with pytest.raises(LedgerCorruptError, match="not a readable Fedward ledger"):
        PrivacyLedger(ledger_path).site_epsilon()


def _tamper(path: Path, sql: str, *args: object) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute(sql, args)
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize(
    ("sql", "args", "problem"),
    [
        ("UPDATE entries SET mechanism = ?", ("[1.5, 0.1, 10]",),
         "entry 1 (run 'run-1'): the mechanism is not a JSON object"),
        ("UPDATE entries SET mechanism = ?", ("{not json",), "entry 1 (run 'run-1')"),
        ("UPDATE entries SET mechanism = ?",
         ('{"type": "DpSgd", "noise_multiplier": 1.5, "sample_rate": 0.1}',),
         "fields ['noise_multiplier', 'sample_rate'] given"),
        ("UPDATE entries SET mechanism = ?",
         ('{"type": "DpSgd", "noise_multiplier": -1, "sample_rate": 0.1, "steps": 10}',),
         "noise_multiplier must be > 0, got -1.0"),
        ("UPDATE entries SET mechanism = ?",
         ('{"type": "DpSgd", "noise_multiplier": 1.5, "sample_rate": 0.1, "steps": "10"}',),
         "steps must be an integer, got '10'"),
        ("UPDATE entries SET purpose = ?", ("gossip",), "purpose 'gossip' is unknown"),
        ("UPDATE entries SET round = ?", (7,), "round 7 does not match key '1'"),
        ("UPDATE entries SET project = ?", ("elsewhere",), "project 'elsewhere' is not its run's"),
        ("UPDATE meta SET value = ? WHERE key = 'schema_version'", ("2",),
         "schema version is '2'"),
    ],
)
def test_a_tampered_entry_is_refused_naming_it(
    make_ledger: LedgerFactory, ledger_path: Path, sql: str, args: tuple[object, ...],
    problem: str,
) -> None:
    make_ledger().reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    _tamper(ledger_path, sql, *args)
    before = stored(ledger_path)
    with pytest.raises(LedgerCorruptError, match="Restore the file from the site's backup") as info:
        PrivacyLedger(ledger_path).epsilon_spent("run-1")
    assert problem in str(info.value)
    with pytest.raises(LedgerCorruptError):  # every operation, writes included
        PrivacyLedger(ledger_path).reserve_round(run_id="run-1", round_number=2, steps=STEPS)
    assert stored(ledger_path) == before


def test_sqlite_refuses_values_of_the_wrong_kind(make_ledger: LedgerFactory,
                                                 ledger_path: Path) -> None:
    make_ledger().reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    for sql, value in (("UPDATE entries SET state = ?", "maybe"),
                       ("UPDATE entries SET delta = ?", 2.0),
                       ("UPDATE runs SET epsilon_budget = ?", "five")):
        with pytest.raises(sqlite3.IntegrityError):
            _tamper(ledger_path, sql, value)


_KILLED_IN_TRANSACTION = """
import os, signal, sys
from pathlib import Path
import privacy.ledger_db as db
from privacy import PrivacyLedger

real_insert = db._Tx.insert

def insert_then_die(self, **kwargs):
    real_insert(self, **kwargs)      # the row is written inside the open transaction
    os.kill(os.getpid(), signal.SIGKILL)

db._Tx.insert = insert_then_die
PrivacyLedger(Path(sys.argv[1])).reserve_round(run_id="run-1", round_number=2, steps=10)
"""


def test_a_process_killed_inside_a_reservation_leaves_the_ledger_as_it_was(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    import subprocess
    import sys

    ledger = make_ledger()
    eps = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    before = stored(ledger_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_TRANSACTION, str(ledger_path)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert stored(ledger_path) == before       # the uncommitted round left no trace
    restarted = PrivacyLedger(ledger_path)
    assert restarted.epsilon_spent("run-1") == eps
    assert restarted.reserve_round(run_id="run-1", round_number=2, steps=STEPS) > eps


def test_the_ledger_file_is_private_to_the_site_account(make_ledger: LedgerFactory,
                                                        ledger_path: Path) -> None:
    make_ledger().reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    assert ledger_path.stat().st_mode & 0o777 == 0o600
    con = sqlite3.connect(ledger_path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # While a connection is open SQLite keeps its write-ahead log beside the file,
        # with the file's own mode.
        for name in ("privacy-ledger.sqlite-wal", "privacy-ledger.sqlite-shm"):
            assert ledger_path.with_name(name).stat().st_mode & 0o777 == 0o600
    finally:
        con.close()


def test_concurrent_threads_and_instances_lose_no_round(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    make_ledger(budget=100.0)
    errors: list[BaseException] = []

    def reserve(round_number: int) -> None:
        try:
            # Half the threads share nothing but the file (as two processes would).
            ledger = PrivacyLedger(ledger_path)
            ledger.reserve_round(run_id="run-1", round_number=round_number, steps=1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert PrivacyLedger(ledger_path).history("run-1") == [(SIGMA, Q, 1)] * 8


def test_another_writer_holding_the_database_blocks_a_reservation(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    ledger = make_ledger()
    done = threading.Event()

    def reserve() -> None:
        ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
        done.set()

    other = sqlite3.connect(ledger_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")     # another process's write transaction
    worker = threading.Thread(target=reserve)
    worker.start()
    assert not done.wait(0.3)
    other.execute("COMMIT")
    other.close()
    worker.join(timeout=30)
    assert done.is_set()


@settings(
    max_examples=int(os.environ.get("FEDWARD_PRIVACY_EXAMPLES", "5")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    epsilon=st.floats(0.5, 10.0),
    delta=st.floats(1e-6, 1e-4),
    sample_rate=st.floats(0.01, 0.5),
    rounds=st.integers(1, 6),
    local_epochs=st.integers(1, 3),
)
def test_a_planned_run_fits_its_budget_and_no_more(
    tmp_path: Path,
    epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    local_epochs: int,
) -> None:
    """Every round of a run planned with noise_multiplier_for_run is accepted; one more is not.

    The noise comes from Opacus's PRV search and the ledger charges with dp-accounting's
    PLD: the noise must keep the PLD figure within the budget too.

    Opacus's PRV accountant costs 2-4 s per example here (the noise search evaluates it
    about 15 times), so the default is 5 examples to keep the suite under a minute on two
    cores; set FEDWARD_PRIVACY_EXAMPLES=200 for a thorough run.
    """
    sigma = noise_multiplier_for_run(
        epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        total_epochs=rounds * local_epochs,
    )
    run_id = f"run-{epsilon}-{delta}-{sample_rate}-{rounds}-{local_epochs}"
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.open_run(
        run_id=run_id,
        project="p",
        epsilon_budget=epsilon,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
    )
    steps = planned_steps(sample_rate=sample_rate, epochs=local_epochs)
    for r in range(1, rounds + 1):
        ledger.reserve_round(run_id=run_id, round_number=r, steps=steps)
        ledger.complete_round(run_id=run_id, round_number=r)
    spent = ledger.epsilon_spent(run_id)
    assert spent <= epsilon

    history = ledger.history(run_id)
    beyond = dpsgd_epsilon(*history, (sigma, sample_rate, steps), delta=delta)
    if beyond > epsilon * (1 + 1e-9):
        with pytest.raises(BudgetExceededError):
            ledger.reserve_round(run_id=run_id, round_number=rounds + 1, steps=steps)
        assert ledger.history(run_id) == history
    else:  # pragma: no cover - the search leaves at most 0.01 of slack
        assert ledger.reserve_round(run_id=run_id, round_number=rounds + 1, steps=steps) == beyond


def test_warming_the_next_round_leaves_only_cache_hits_for_it(
        make_ledger: LedgerFactory, ledger_path: Path) -> None:
    from privacy.accounting import _pld_epsilon

    no_warm_ups_left()
    ledger = make_ledger(run_id="warm", project="warm-proj", sigma=SIGMA * 1.37)
    ledger.reserve_round(run_id="warm", round_number=1, steps=STEPS, cap=50.0)
    ledger.complete_round(run_id="warm", round_number=1)
    before = stored(ledger_path)
    ledger.warm_next_round(run_id="warm", steps=STEPS)
    assert stored(ledger_path) == before          # nothing written
    misses = _pld_epsilon.cache_info().misses
    after = ledger.reserve_round(run_id="warm", round_number=2, steps=STEPS, cap=50.0)
    assert _pld_epsilon.cache_info().misses == misses      # round 2's accounting was ready
    assert after == dpsgd_epsilon((SIGMA * 1.37, Q, 2 * STEPS))
    ledger.warm_next_round(run_id="unknown", steps=STEPS)  # unknown runs: nothing to do


def test_warming_also_readies_the_site_wide_check(
        make_ledger: LedgerFactory, ledger_path: Path) -> None:
    from privacy.accounting import _pld_epsilon

    no_warm_ups_left()
    make_ledger(run_id="other", project="other-proj", sigma=SIGMA * 1.41)
    ledger = make_ledger(run_id="warm2", project="warm-proj", sigma=SIGMA * 1.43)
    ledger.reserve_round(run_id="other", round_number=1, steps=STEPS)
    ledger.warm_next_round(run_id="warm2", steps=STEPS)
    misses = _pld_epsilon.cache_info().misses
    ledger.reserve_round(run_id="warm2", round_number=1, steps=STEPS, cap=50.0, site_cap=50.0)
    assert _pld_epsilon.cache_info().misses == misses


# --- the site-wide cap, the audit hook, whole-run plans ----------------------------------


def test_site_cap_composes_every_project_of_the_site(make_ledger: LedgerFactory,
                                                     ledger_path: Path) -> None:
    make_ledger(run_id="onc", project="oncology")
    ledger = make_ledger(run_id="card", project="cardiology")
    ledger.reserve_round(run_id="onc", round_number=1, steps=STEPS)
    one = ledger.project_epsilon("oncology")
    both = dpsgd_epsilon((SIGMA, Q, 2 * STEPS))
    assert ledger.site_epsilon() == one
    before = stored(ledger_path)
    # Each project alone stays within the cap; the two composed do not.
    site_cap = (one + both) / 2
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve_round(run_id="card", round_number=1, steps=STEPS, cap=10.0,
                             site_cap=site_cap)
    assert info.value.scope == "site" and info.value.projected == both
    assert info.value.spent == one and info.value.budget == site_cap
    assert "site-wide cap (site_epsilon_cap)" in str(info.value)
    assert stored(ledger_path) == before
    ledger.reserve_round(run_id="card", round_number=1, steps=STEPS, cap=10.0,
                         site_cap=both * 1.01)
    assert ledger.site_epsilon() == both
    assert ledger.project_epsilon("cardiology") == one  # projects stay apart


def test_the_charge_hook_runs_before_the_charge_and_its_failure_charges_nothing(
        make_ledger: LedgerFactory, ledger_path: Path) -> None:
    ledger = make_ledger()
    seen: list[tuple[float, bool]] = []

    def hook(epsilon_after: float) -> None:
        # What another reader sees while the hook runs inside the reservation's transaction.
        rounds = PrivacyLedger(ledger_path).get_run("run-1").rounds  # type: ignore[union-attr]
        seen.append((epsilon_after, 1 in rounds))

    eps = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS, on_charge=hook)
    assert seen == [(eps, False)]            # called once, before round 1 was written
    ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS, on_charge=hook)
    assert len(seen) == 1                    # a retry charges nothing and records nothing

    def failing(epsilon_after: float) -> None:
        raise OSError("the audit log's disk is full")

    before = stored(ledger_path)
    with pytest.raises(OSError, match="disk is full"):
        ledger.reserve_round(run_id="run-1", round_number=2, steps=STEPS, on_charge=failing)
    assert stored(ledger_path) == before
    assert ledger.history("run-1") == [(SIGMA, Q, STEPS)]


def test_a_plan_that_cannot_finish_is_refused_with_the_figures(
        make_ledger: LedgerFactory, ledger_path: Path) -> None:
    ledger = make_ledger(run_id="old")
    for number in (1, 2):
        ledger.reserve_round(run_id="old", round_number=number, steps=STEPS)
    spent = ledger.project_epsilon("proj")
    plan = dict(run_id="new", project="proj", delta=DELTA, noise_multiplier=SIGMA,
                sample_rate=Q, rounds=3, local_epochs=1, steps=3 * STEPS, run_budget=50.0)
    after = dpsgd_epsilon((SIGMA, Q, 5 * STEPS))
    needs = dpsgd_epsilon((SIGMA, Q, 3 * STEPS))
    # The first round alone would fit the cap (the per-round check admits it); the plan
    # does not.
    first_round = dpsgd_epsilon((SIGMA, Q, 3 * STEPS))
    cap = (first_round + after) / 2
    before = stored(ledger_path)
    with pytest.raises(PlanExceededError) as info:
        check_run_plan(ledger, cap=cap, **plan)  # type: ignore[arg-type]
    check = info.value.check
    assert [s.scope for s in check.exceeded] == ["project"]
    (project,) = check.exceeded
    assert (project.spent, project.after, project.cap) == (spent, after, cap)
    assert check.run_needs == needs
    text = str(info.value)
    assert text.startswith(f"run new needs epsilon {needs:.3f} at this site for its 3 "
                           "round(s) x 1 local epoch(s)")
    assert (f"project proj's epsilon at this site would go from {spent:.3f} spent to "
            f"{after:.3f}, over its cap of {cap:.3f} ({cap - spent:.3f} left)") in text
    assert stored(ledger_path) == before
    # A cap that holds the plan: admitted, every figure reported.
    ok = check_run_plan(ledger, cap=after * 1.01, site_cap=after * 1.01,
                        **plan)  # type: ignore[arg-type]
    assert [s.scope for s in ok.scopes] == ["run", "project", "site"]
    assert not ok.exceeded and ok.scopes[2].after == after
    # A run's own budget above the cap: refused for the run itself.
    with pytest.raises(PlanExceededError, match="the run's own epsilon would reach"):
        check_run_plan(ledger, cap=needs * 0.9, **plan)  # type: ignore[arg-type]


def test_a_plan_counts_the_rounds_a_run_has_already_charged(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(run_id="half")
    ledger.reserve_round(run_id="half", round_number=1, steps=STEPS)
    check = check_run_plan(ledger, run_id="half", project="proj", delta=DELTA,
                           noise_multiplier=SIGMA, sample_rate=Q, rounds=1, local_epochs=1,
                           steps=STEPS, run_budget=50.0, cap=50.0)
    two = dpsgd_epsilon((SIGMA, Q, 2 * STEPS))
    assert check.run_needs == two and check.scopes[1].after == two
    assert check.scopes[0].spent == ledger.epsilon_spent("half")


def test_the_site_figures_compose_runs_instead_of_adding_them(
        make_ledger: LedgerFactory) -> None:
    make_ledger(run_id="a", project="oncology")
    ledger = make_ledger(run_id="b", project="oncology", sigma=SIGMA * 1.5)
    make_ledger(run_id="c", project="cardiology")
    ledger.reserve_round(run_id="a", round_number=1, steps=STEPS)
    ledger.reserve_round(run_id="b", round_number=1, steps=STEPS)
    ledger.reserve_round(run_id="c", round_number=1, steps=STEPS)
    budget = site_budget(ledger, project_caps={"oncology": 4.0, "radiology": 1.0},
                         site_cap=None)
    by_name = {p.name: p for p in budget.projects}
    assert sorted(by_name) == ["cardiology", "oncology", "radiology"]
    onc = by_name["oncology"]
    assert onc.spent == ledger.project_epsilon("oncology")
    assert onc.spent < budget.runs["a"] + budget.runs["b"]       # composed, not summed
    assert onc.left == pytest.approx(4.0 - onc.spent)
    assert by_name["cardiology"].cap is None and by_name["cardiology"].left is None
    assert by_name["radiology"].spent == 0.0
    assert budget.site.spent == ledger.site_epsilon() and budget.site.cap is None
    assert budget.to_dict()["site"] == {"scope": "site", "name": "site",
                                        "spent": budget.site.spent, "cap": None, "left": None,
                                        "accountant": "pld"}
