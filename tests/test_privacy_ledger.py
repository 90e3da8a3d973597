"""Tests of privacy.ledger: write-ahead charging, persistence, corruption and crashes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    PrivacyLedger,
    UnknownRunError,
    epsilon_for_history,
    noise_multiplier_for_run,
    planned_steps,
)

from tests_support import no_warm_ups_left

DELTA = 1e-5
SIGMA = 1.5
Q = 0.1
STEPS = 10

LedgerFactory = Callable[..., PrivacyLedger]


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "site-data" / "privacy-ledger.json"


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
    before = ledger_path.read_bytes()
    make_ledger()
    assert ledger_path.read_bytes() == before
    with pytest.raises(ValueError, match=re.escape("noise_multiplier: ledger has 1.5, got 2.0")):
        make_ledger(sigma=2.0)
    with pytest.raises(ValueError, match="epsilon_budget"):
        make_ledger(budget=9.0)
    assert ledger_path.read_bytes() == before


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
    assert eps2 == epsilon_for_history([(SIGMA, Q, 2 * STEPS)], delta=DELTA)

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
    before = ledger_path.read_bytes()
    again = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    assert again == first
    assert ledger_path.read_bytes() == before
    assert ledger.complete_round(run_id="run-1", round_number=1) == first
    assert PrivacyLedger(ledger_path).reserve_round(
        run_id="run-1", round_number=1, steps=STEPS
    ) == first
    assert ledger.history("run-1") == [(SIGMA, Q, STEPS)]


def test_a_retried_round_must_train_the_same_steps(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger()
    ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    with pytest.raises(ValueError, match="already charged for 10 steps, not 20"):
        ledger.reserve_round(run_id="run-1", round_number=1, steps=2 * STEPS)


def test_over_budget_reserve_persists_nothing(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    ledger = make_ledger(budget=2.0)
    spent = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    before = ledger_path.read_bytes()
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve_round(run_id="run-1", round_number=2, steps=10 * STEPS)
    assert ledger_path.read_bytes() == before
    assert info.value.spent == spent and info.value.budget == 2.0
    assert info.value.projected > 2.0
    assert "policy" in str(info.value)


def test_site_cap_lowers_the_run_budget(make_ledger: LedgerFactory, ledger_path: Path) -> None:
    ledger = make_ledger(budget=50.0)
    before = ledger_path.read_bytes()
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS, cap=0.1)
    assert info.value.budget == 0.1
    assert ledger_path.read_bytes() == before


def test_site_cap_covers_all_runs_of_the_project(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(run_id="a", budget=10.0)
    make_ledger(run_id="b", budget=10.0)
    make_ledger(run_id="other", project="elsewhere", budget=10.0)
    one_round = ledger.reserve_round(run_id="a", round_number=1, steps=STEPS, cap=10.0)
    two_rounds = epsilon_for_history([(SIGMA, Q, 2 * STEPS)], delta=DELTA)
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
    assert [r.status for r in view.rounds.values()] == ["done", "reserved"]


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
    expected = epsilon_for_history([(SIGMA, Q, STEPS), (2.0, Q, STEPS)], delta=DELTA)
    assert ledger.project_epsilon("proj") == expected
    assert expected > ledger.epsilon_spent("a")
    assert ledger.run_ids(project="proj") == ["a", "b"]
    assert ledger.project_epsilon("nobody") == 0.0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "top level is not a JSON object"),
        (json.dumps({"version": 2, "runs": {}}).encode(), "version is 2"),
        (json.dumps({"version": 1}).encode(), "'runs' is missing"),
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


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("epsilon_budget",), "5", "epsilon_budget is '5'"),
        (("delta",), 2.0, "delta is 2.0, expected < 1"),
        (("mechanism",), "rdp", "mechanism is 'rdp'"),
        (("history",), [[1.5, 0.1, "10"]], "history entry 0"),
        (("history",), {}, "history is not a list"),
        (("rounds", "1", "status"), "maybe", "status is 'maybe'"),
        (("rounds", "1", "steps"), True, "steps is True"),
        (("run_id",), "run-2", "run_id field is 'run-2'"),
        (("history",), [], "0 history entries for 1 rounds"),
    ],
)
def test_wrongly_typed_ledger_is_refused(
    make_ledger: LedgerFactory,
    ledger_path: Path,
    path: tuple[str, ...],
    value: object,
    problem: str,
) -> None:
    make_ledger().reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    doc = json.loads(ledger_path.read_text())
    target = doc["runs"]["run-1"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    ledger_path.write_text(json.dumps(doc))
    with pytest.raises(LedgerCorruptError, match="Restore the file from the site's backup") as info:
        PrivacyLedger(ledger_path).epsilon_spent("run-1")
    assert problem in str(info.value)


def test_crash_during_write_leaves_the_old_ledger_intact(
    make_ledger: LedgerFactory, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = make_ledger()
    eps = ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
    before = ledger_path.read_bytes()

    def power_cut(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="simulated crash"):
        ledger.reserve_round(run_id="run-1", round_number=2, steps=STEPS)
    monkeypatch.undo()

    assert ledger_path.read_bytes() == before
    assert sorted(p.name for p in ledger_path.parent.iterdir()) == [
        "privacy-ledger.json",
        "privacy-ledger.json.lock",
    ]
    restarted = PrivacyLedger(ledger_path)
    assert restarted.epsilon_spent("run-1") == eps
    assert restarted.reserve_round(run_id="run-1", round_number=2, steps=STEPS) > eps


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


def test_another_process_holding_the_lock_blocks_writes(
    make_ledger: LedgerFactory, ledger_path: Path
) -> None:
    ledger = make_ledger()
    lock_path = ledger_path.with_name(ledger_path.name + ".lock")
    done = threading.Event()

    def reserve() -> None:
        ledger.reserve_round(run_id="run-1", round_number=1, steps=STEPS)
        done.set()

    with lock_path.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=reserve)
        worker.start()
        assert not done.wait(0.3)
        fcntl.flock(held, fcntl.LOCK_UN)
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
    ledger = PrivacyLedger(tmp_path / "ledger.json")
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
    beyond = epsilon_for_history([*history, (sigma, sample_rate, steps)], delta=delta)
    if beyond > epsilon * (1 + 1e-9):
        with pytest.raises(BudgetExceededError):
            ledger.reserve_round(run_id=run_id, round_number=rounds + 1, steps=steps)
        assert ledger.history(run_id) == history
    else:  # pragma: no cover - the search leaves at most 0.01 of slack
        assert ledger.reserve_round(run_id=run_id, round_number=rounds + 1, steps=steps) == beyond


def test_warming_the_next_round_leaves_only_cache_hits_for_it(
        make_ledger: LedgerFactory, ledger_path: Path) -> None:
    from privacy.dp import _epsilon

    no_warm_ups_left()
    ledger = make_ledger(run_id="warm", project="warm-proj", sigma=SIGMA * 1.37)
    ledger.reserve_round(run_id="warm", round_number=1, steps=STEPS, cap=50.0)
    ledger.complete_round(run_id="warm", round_number=1)
    before = ledger_path.read_bytes()
    ledger.warm_next_round(run_id="warm", steps=STEPS)
    assert ledger_path.read_bytes() == before          # nothing written
    misses = _epsilon.cache_info().misses
    after = ledger.reserve_round(run_id="warm", round_number=2, steps=STEPS, cap=50.0)
    assert _epsilon.cache_info().misses == misses      # round 2's accounting was ready
    assert after == epsilon_for_history([(SIGMA * 1.37, Q, 2 * STEPS)], delta=DELTA)
    ledger.warm_next_round(run_id="unknown", steps=STEPS)  # unknown runs: nothing to do
