"""One accountant over every disclosure: the recorded mechanisms, their composition with
dp-accounting, and the ledger's figures checked against an independent recomputation."""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dp_accounting import dp_event, pld, rdp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant

from privacy import (
    MECHANISMS,
    BudgetExceededError,
    Caps,
    DpSgd,
    GaussianRelease,
    LaplaceRelease,
    Mechanism,
    PlanExceededError,
    PrivacyLedger,
    TuningSelection,
    UnknownMechanismError,
    check_plan,
    check_run_plan,
    compose_mechanisms,
)
from privacy.mechanisms import (
    CoveredTrial,
    DistributedSkellam,
    MechanismFormatError,
    UnknownMechanismType,
    decode_mechanism,
    register,
)

DELTA = 1e-5


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "privacy-ledger.sqlite")


# --- the mechanisms and their stored form --------------------------------------------------


EXAMPLES: list[Mechanism] = [
    DpSgd(1.84, 0.125, 80),
    GaussianRelease(noise_std=30.0, l2_sensitivity=2.0, count=3),
    LaplaceRelease(scale=20.0, l1_sensitivity=1.0, count=2),
    TuningSelection(trial=DpSgd(1.84, 0.125, 80), mean=10.0, shape=1.0),
    TuningSelection(trial=DpSgd(2.0, 0.1, 30), mean=5.0, shape=math.inf),
    CoveredTrial(trial=DpSgd(2.0, 0.1, 6), search=3),
    DistributedSkellam(variance=4.0e9, l2_sensitivity=32800.0, l1_sensitivity=9.0e5, count=2),
]


@pytest.mark.parametrize("mechanism", EXAMPLES, ids=lambda m: m.TYPE)
def test_every_mechanism_survives_its_stored_form_exactly(mechanism: Mechanism) -> None:
    text = json.dumps(mechanism.to_dict(), allow_nan=False)   # strict JSON, infinity too
    back = decode_mechanism(json.loads(text))
    assert back == mechanism and type(back) is type(mechanism)
    assert json.loads(text)["type"] == mechanism.TYPE


def test_the_registry_is_the_allow_list() -> None:
    assert sorted(MECHANISMS) == ["CoveredTrial", "DistributedSkellam", "DpSgd",
                                  "GaussianRelease", "LaplaceRelease", "TuningSelection"]
    for name in ("GaussianDpEvent",                      # dp-accounting's own class
                 "dp_accounting.dp_event.GaussianDpEvent", "os.system", "__import__", None, 3):
        with pytest.raises(UnknownMechanismType):
            decode_mechanism({"type": name, "noise_multiplier": 1.0})
    # A nested mechanism goes through the same allow-list.
    with pytest.raises(UnknownMechanismType, match="'Skellam'"):
        decode_mechanism({"type": "TuningSelection", "trial": {"type": "Skellam"},
                          "mean": 3, "shape": 1})


@pytest.mark.parametrize(("doc", "problem"), [
    ({"type": "DpSgd", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3,
      "module_name": "os"}, "fields ['module_name', 'noise_multiplier', 'sample_rate', 'steps']"),
    ({"type": "DpSgd", "noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 3},
     "sample_rate must be in (0, 1]"),
    ({"type": "DpSgd", "noise_multiplier": True, "sample_rate": 0.1, "steps": 3},
     "noise_multiplier must be a number"),
    ({"type": "GaussianRelease", "noise_std": 1.0, "l2_sensitivity": 0.0, "count": 1},
     "l2_sensitivity must be > 0"),
    ({"type": "LaplaceRelease", "scale": "inf", "l1_sensitivity": 1.0, "count": 1},
     "scale must be > 0, got inf"),
    ({"type": "TuningSelection", "trial": [1, 2], "mean": 3, "shape": 1},
     "trial must be a mechanism object"),
])
def test_a_malformed_mechanism_is_refused_with_its_problem(doc: dict[str, Any],
                                                           problem: str) -> None:
    with pytest.raises(MechanismFormatError) as info:
        decode_mechanism(doc)
    assert problem in str(info.value)


@dataclass(frozen=True)
class _ZcdpRound(Mechanism):
    """A stand-in for a future mechanism (a Skellam round is zCDP): RDP only."""

    TYPE: ClassVar[str] = "TestZcdpRound"
    rho: float

    def problems(self) -> list[str]:
        return [] if self.rho > 0 else [f"rho must be > 0, got {self.rho}"]

    def dp_event(self) -> dp_event.DpEvent:
        return dp_event.ZCDpEvent(rho=self.rho)

    def describe(self) -> str:
        return f"zCDP round, rho {self.rho:g}"


@pytest.fixture
def zcdp_registered() -> Iterator[type[Mechanism]]:
    from privacy.mechanisms import _FIELDS, _REGISTRY

    cls = register(_ZcdpRound)
    try:
        yield cls
    finally:
        _REGISTRY.pop(cls.TYPE)
        _FIELDS.pop(cls.TYPE)


def test_adding_a_mechanism_is_one_registered_class(zcdp_registered: type[Mechanism],
                                                    ledger: PrivacyLedger) -> None:
    round_ = _ZcdpRound(rho=0.05)
    assert decode_mechanism(round_.to_dict()) == round_
    ledger.open_run(run_id="r", project="p", epsilon_budget=5.0, delta=DELTA)
    reservation = ledger.reserve(run_id="r", purpose="round", key="1", mechanism=round_)
    assert reservation.run is not None and reservation.run.accountant == "rdp"
    expected = rdp.RdpAccountant().compose(dp_event.ZCDpEvent(rho=0.05)).get_epsilon(DELTA)
    assert ledger.epsilon_spent("r") == pytest.approx(expected, rel=1e-9)


# --- composition --------------------------------------------------------------------------


def test_identical_events_are_grouped_exactly() -> None:
    rounds = [DpSgd(1.5, 0.1, 10)] * 6
    assert compose_mechanisms(rounds, delta=DELTA) == compose_mechanisms(
        [DpSgd(1.5, 0.1, 60)], delta=DELTA)
    stats = compose_mechanisms([GaussianRelease(10.0, 1.0, 1)] * 3, delta=DELTA)
    assert stats == compose_mechanisms([GaussianRelease(10.0, 1.0, 3)], delta=DELTA)
    assert compose_mechanisms([], delta=DELTA).epsilon == 0.0


def test_pld_is_reported_with_rdp_as_a_looser_cross_check() -> None:
    c = compose_mechanisms([DpSgd(1.84, 0.125, 80)], delta=DELTA, cross_check=True)
    assert c.accountant == "pld" and c.epsilon == c.pld
    assert c.rdp is not None and c.pld is not None and c.pld < c.rdp < 1.15 * c.pld
    # The research figures for this event: PLD 2.987, RDP 3.302, Opacus PRV 2.997.
    assert c.pld == pytest.approx(2.987, abs=0.01) and c.rdp == pytest.approx(3.302, abs=0.01)


def test_a_tuning_selection_makes_the_whole_figure_rdp() -> None:
    run = DpSgd(1.84, 0.125, 80)
    c = compose_mechanisms([TuningSelection(run, 10.0, 1.0), DpSgd(1.84, 0.125, 240)],
                           delta=DELTA)
    assert c.accountant == "rdp" and c.pld is None and c.rdp == c.epsilon
    # Random stopping costs far less than ten fixed runs (11.5 at this delta).
    alone = compose_mechanisms([TuningSelection(run, 10.0, 1.0)], delta=DELTA)
    assert alone.epsilon == pytest.approx(6.15, abs=0.02)


# --- an independent recomputation from the recorded rows ----------------------------------


def _event_from_row(doc: dict[str, Any]) -> dp_event.DpEvent:
    """The dp-accounting event of a stored mechanism, written out here by hand from the
    documented fields (not through privacy.mechanisms)."""
    kind = doc["type"]
    if kind == "DpSgd":
        return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(
            doc["sample_rate"], dp_event.GaussianDpEvent(doc["noise_multiplier"])), doc["steps"])
    if kind == "GaussianRelease":
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(
            doc["noise_std"] / doc["l2_sensitivity"]), doc["count"])
    if kind == "LaplaceRelease":
        return dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(
            doc["scale"] / doc["l1_sensitivity"]), doc["count"])
    assert kind == "TuningSelection"
    shape = math.inf if doc["shape"] == "inf" else doc["shape"]
    return dp_event.RepeatAndSelectDpEvent(_event_from_row(doc["trial"]), doc["mean"], shape)


def _recompute(path: Path, *, run: str | None = None, project: str | None = None
               ) -> tuple[float, str]:
    """(epsilon, accountant) of the rows of one run, project or the site, straight from the
    SQLite file with dp-accounting's own accountants at their default settings."""
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT run_id, project, delta, mechanism FROM entries").fetchall()
    finally:
        con.close()
    chosen = [r for r in rows if (run is None or r[0] == run)
              and (project is None or r[1] == project)]
    events = [_event_from_row(json.loads(r[3])) for r in chosen]
    delta = max(r[2] for r in chosen)
    composed = dp_event.ComposedDpEvent(events)
    accountant = pld.PLDAccountant()           # value_discretization_interval 1e-4
    if accountant.supports(composed):
        return float(accountant.compose(composed).get_epsilon(delta)), "pld"
    return float(rdp.RdpAccountant().compose(composed).get_epsilon(delta)), "rdp"


def _mixed_site(ledger: PrivacyLedger) -> None:
    """Two projects: training rounds, statistics (Gaussian and Laplace), a drift check."""
    ledger.open_run(run_id="onc-1", project="oncology", epsilon_budget=6.0, delta=1e-5,
                    noise_multiplier=1.6, sample_rate=0.1)
    ledger.open_run(run_id="onc-2", project="oncology", epsilon_budget=4.0, delta=1e-6,
                    noise_multiplier=2.2, sample_rate=0.05)
    ledger.open_run(run_id="card-1", project="cardiology", epsilon_budget=9.0, delta=1e-5,
                    noise_multiplier=1.2, sample_rate=0.2)
    ledger.reserve(run_id="onc-1", purpose="statistics", key="column-means",
                   mechanism=GaussianRelease(noise_std=12.0, l2_sensitivity=1.0, count=4))
    # Runs that only released statistics: each mechanism's accounting on its own.
    ledger.open_run(run_id="gauss", project="registry", epsilon_budget=9.0, delta=1e-5)
    ledger.reserve(run_id="gauss", purpose="statistics", key="means",
                   mechanism=GaussianRelease(noise_std=6.0, l2_sensitivity=2.0, count=3))
    ledger.open_run(run_id="laplace", project="registry", epsilon_budget=9.0, delta=1e-5)
    ledger.reserve(run_id="laplace", purpose="statistics", key="counts",
                   mechanism=LaplaceRelease(scale=4.0, l1_sensitivity=2.0, count=3))
    for n in (1, 2, 3):
        ledger.reserve_round(run_id="onc-1", round_number=n, steps=10)
        ledger.complete_round(run_id="onc-1", round_number=n)
    ledger.reserve_round(run_id="onc-2", round_number=1, steps=40)      # killed mid-round
    ledger.reserve(run_id="card-1", purpose="statistics", key="counts",
                   mechanism=LaplaceRelease(scale=25.0, l1_sensitivity=1.0, count=2))
    ledger.reserve_round(run_id="card-1", round_number=1, steps=5)
    ledger.reserve(run_id="card-1", purpose="drift", key="round-1",
                   mechanism=LaplaceRelease(scale=50.0, l1_sensitivity=2.0, count=1))


def test_an_independent_recomputation_matches_every_reported_figure(
        ledger: PrivacyLedger) -> None:
    _mixed_site(ledger)
    figures = {("run", r): ledger.spent(run_id=r)
               for r in ("onc-1", "onc-2", "card-1", "gauss", "laplace")}
    figures |= {("project", p): ledger.spent(project=p)
                for p in ("oncology", "cardiology", "registry")}
    figures[("site", None)] = ledger.spent()
    for (scope, name), reported in figures.items():
        kwargs = {"run": name} if scope == "run" else {"project": name} if name else {}
        expected, accountant = _recompute(ledger.path, **kwargs)
        assert reported.accountant == accountant == "pld", (scope, name)
        assert reported.epsilon == pytest.approx(expected, rel=0.01), (scope, name)
    # The ledger's figures compose: the site is less than the sum of its runs.
    assert figures[("site", None)].epsilon < sum(
        f.epsilon for (scope, _), f in figures.items() if scope == "run")

    # A tuning search recorded: now everything is RDP-only, and says so.
    ledger.reserve(run_id="card-1", purpose="tuning", key="search-1", mechanism=TuningSelection(
        trial=DpSgd(1.2, 0.2, 5), mean=4.0, shape=1.0))
    for kwargs, reported in (({"run": "card-1"}, ledger.spent(run_id="card-1")),
                             ({"project": "cardiology"}, ledger.spent(project="cardiology")),
                             ({}, ledger.spent())):
        expected, accountant = _recompute(ledger.path, **kwargs)   # type: ignore[arg-type]
        assert reported.accountant == accountant == "rdp"
        assert reported.epsilon == pytest.approx(expected, rel=0.01)
    assert ledger.spent(project="oncology").accountant == "pld"   # untouched project


def test_pure_dp_sgd_figures_match_opacus_prv(ledger: PrivacyLedger) -> None:
    ledger.open_run(run_id="a", project="p", epsilon_budget=9.0, delta=1e-5,
                    noise_multiplier=1.1, sample_rate=1 / 16)
    ledger.open_run(run_id="b", project="p", epsilon_budget=9.0, delta=1e-5,
                    noise_multiplier=1.9, sample_rate=1 / 8)
    for n in (1, 2, 3):
        ledger.reserve_round(run_id="a", round_number=n, steps=16)
        ledger.reserve_round(run_id="b", round_number=n, steps=8)
    con = sqlite3.connect(ledger.path)
    try:
        history = [(d["noise_multiplier"], d["sample_rate"], d["steps"]) for d in
                   (json.loads(r[0]) for r in con.execute("SELECT mechanism FROM entries"))]
    finally:
        con.close()
    accountant = PRVAccountant()
    accountant.history = history
    assert ledger.project_epsilon("p") == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)
    one = PRVAccountant()
    one.history = [h for h in history if h[0] == 1.1]
    assert ledger.epsilon_spent("a") == pytest.approx(one.get_epsilon(1e-5), rel=0.01)


# --- one budget over every disclosure ---------------------------------------------------


def _stored(path: Path) -> Any:
    con = sqlite3.connect(path)
    try:
        return [tuple(r) for r in con.execute("SELECT * FROM entries ORDER BY id")]
    finally:
        con.close()


def test_a_release_over_the_budget_is_refused_before_it_reads_with_the_figures(
        ledger: PrivacyLedger) -> None:
    ledger.open_run(run_id="r", project="p", epsilon_budget=3.0, delta=DELTA,
                    noise_multiplier=1.5, sample_rate=0.1)
    ledger.reserve_round(run_id="r", round_number=1, steps=20)
    spent = ledger.epsilon_spent("r")
    before = _stored(ledger.path)
    release = LaplaceRelease(scale=1.0, l1_sensitivity=1.0, count=2)   # epsilon 2 alone
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(run_id="r", purpose="statistics", key="histogram", mechanism=release,
                       caps=Caps(project=10.0, site=10.0))
    err = info.value
    assert (err.scope, err.budget, err.spent) == ("run", 3.0, spent)
    assert err.needs == pytest.approx(2.0, abs=0.01)     # what it needs on its own
    assert err.projected > 3.0 and err.left == pytest.approx(3.0 - spent)
    assert err.accountant == "pld"
    text = str(err)
    assert text.startswith(f"privacy budget exceeded: this statistics release would bring "
                           f"the run's epsilon from {spent:.4f} to {err.projected:.4f}, over "
                           f"its budget of 3.0000 ({3.0 - spent:.4f} left; it needs")
    assert "Nothing was read for it and nothing was charged" in text
    assert _stored(ledger.path) == before
    # The project's cap bounds it too, and names the project.
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(run_id="r", purpose="drift", key="d1",
                       mechanism=LaplaceRelease(4.0, 1.0, 1), caps=Caps(project=spent * 1.01))
    assert info.value.scope == "run" and "this drift check" in str(info.value)


def test_one_budget_covers_statistics_tuning_and_training(ledger: PrivacyLedger) -> None:
    sigma, q, steps = 1.5, 0.1, 40
    plan = dict(run_id="r", project="p", delta=DELTA, noise_multiplier=sigma, sample_rate=q,
                rounds=4, local_epochs=1, steps=4 * steps, run_budget=20.0)
    training = compose_mechanisms([DpSgd(sigma, q, 4 * steps)], delta=DELTA).epsilon
    cap = training * 1.05
    assert check_run_plan(ledger, cap=cap, **plan).run_needs == training  # type: ignore[arg-type]
    # The run first releases statistics: its training no longer fits the same cap.
    ledger.open_run(run_id="r", project="p", epsilon_budget=20.0, delta=DELTA)
    stats = GaussianRelease(noise_std=3.0, l2_sensitivity=1.0, count=2)
    ledger.reserve(run_id="r", purpose="statistics", key="means", mechanism=stats,
                   caps=Caps(project=cap))
    with pytest.raises(PlanExceededError) as info:
        check_run_plan(ledger, cap=cap, **plan)  # type: ignore[arg-type]
    both = compose_mechanisms([stats, DpSgd(sigma, q, 4 * steps)], delta=DELTA).epsilon
    assert info.value.check.run_needs == both > cap
    # A plan of any mechanisms, e.g. a tuning search, is composed the same way (RDP here).
    search = TuningSelection(trial=DpSgd(sigma, q, steps), mean=3.0, shape=1.0)
    check = check_plan(ledger, run_id="r", project="p", delta=DELTA, plan=[search],
                       summary="a tuning search", run_budget=20.0, cap=30.0, site_cap=30.0)
    assert [s.accountant for s in check.scopes] == ["rdp", "rdp", "rdp"]
    assert check.run_needs == compose_mechanisms([stats, search], delta=DELTA).epsilon


def test_a_retried_disclosure_is_charged_once_and_must_be_the_same(
        ledger: PrivacyLedger) -> None:
    ledger.open_run(run_id="r", project="p", epsilon_budget=5.0, delta=DELTA)
    release = GaussianRelease(noise_std=20.0, l2_sensitivity=1.0, count=1)
    first = ledger.reserve(run_id="r", purpose="statistics", key="k", mechanism=release)
    again = ledger.reserve(run_id="r", purpose="statistics", key="k", mechanism=release)
    assert first.new and not again.new and again.entry == first.entry
    with pytest.raises(ValueError, match="statistics k of run 'r' is already charged for "
                                         "Gaussian release x1"):
        ledger.reserve(run_id="r", purpose="statistics", key="k",
                       mechanism=GaussianRelease(10.0, 1.0, 1))
    charged = ledger.charge(run_id="r", purpose="statistics", key="k")
    assert charged.state == "charged" and charged.charged_at is not None
    assert len(ledger.entries()) == 1
    with pytest.raises(ValueError, match="was never reserved"):
        ledger.charge(run_id="r", purpose="statistics", key="other")
    with pytest.raises(ValueError, match="purpose must be one of"):
        ledger.reserve(run_id="r", purpose="gossip", key="k",  # type: ignore[arg-type]
                       mechanism=release)


def test_a_run_opened_for_statistics_gets_its_noise_at_its_first_round(
        ledger: PrivacyLedger) -> None:
    ledger.open_run(run_id="r", project="p", epsilon_budget=5.0, delta=DELTA)
    with pytest.raises(ValueError, match="opened without a noise multiplier"):
        ledger.reserve_round(run_id="r", round_number=1, steps=5)
    ledger.open_run(run_id="r", project="p", epsilon_budget=5.0, delta=DELTA,
                    noise_multiplier=2.0, sample_rate=0.1)
    ledger.reserve_round(run_id="r", round_number=1, steps=5)
    with pytest.raises(ValueError, match=re.escape("noise_multiplier: ledger has 2.0, got 3.0")):
        ledger.open_run(run_id="r", project="p", epsilon_budget=5.0, delta=DELTA,
                        noise_multiplier=3.0, sample_rate=0.1)


# --- an entry this version cannot account ------------------------------------------------


def _write_unknown_entry(ledger: PrivacyLedger) -> None:
    """What a newer version might write: a distributed-DP round."""
    ledger.open_run(run_id="r", project="p", epsilon_budget=5.0, delta=DELTA,
                    noise_multiplier=2.0, sample_rate=0.1)
    ledger.reserve_round(run_id="r", round_number=1, steps=5)
    con = sqlite3.connect(ledger.path)
    try:
        con.execute("INSERT INTO entries (run_id, project, purpose, key, round, delta, "
                    "mechanism, state, epsilon_after, reserved_at) VALUES ('r', 'p', 'round', "
                    "'2', 2, 1e-5, ?, 'reserved', 1.0, '2027-01-01T00:00:00+00:00')",
                    (json.dumps({"type": "SkellamRound", "mu": 1e6, "l2": 1.0}),))
        con.commit()
    finally:
        con.close()


def test_an_unknown_mechanism_blocks_every_operation_naming_its_entry(
        ledger: PrivacyLedger) -> None:
    _write_unknown_entry(ledger)
    before = _stored(ledger.path)
    operations = [
        lambda: ledger.epsilon_spent("r"), lambda: ledger.site_epsilon(),
        lambda: ledger.project_epsilon("elsewhere"), lambda: ledger.all_runs(),
        lambda: ledger.reserve_round(run_id="r", round_number=3, steps=5),
        lambda: ledger.open_run(run_id="s", project="q", epsilon_budget=1.0, delta=DELTA),
    ]
    for operation in operations:
        with pytest.raises(UnknownMechanismError) as info:
            operation()
        assert info.value.unknown == [(2, "r", "round", "SkellamRound")]
        assert "entry 2 (run 'r', round) records mechanism type 'SkellamRound'" in str(
            info.value)
        assert "do NOT delete the entry" in str(info.value)
    assert _stored(ledger.path) == before          # nothing re-counted, nothing dropped
    meta, rows = ledger.raw()                      # still readable as stored
    assert meta["schema_version"] == "1" and json.loads(rows[1]["mechanism"])["mu"] == 1e6


# --- properties ---------------------------------------------------------------------------


_MECHANISM = st.one_of(
    st.builds(DpSgd, st.floats(0.8, 5.0), st.floats(0.01, 0.5), st.integers(1, 40)),
    st.builds(GaussianRelease, st.floats(1.0, 60.0), st.floats(0.5, 2.0), st.integers(1, 4)),
    st.builds(LaplaceRelease, st.floats(2.0, 60.0), st.floats(0.5, 2.0), st.integers(1, 3)),
    st.builds(TuningSelection,
              st.builds(DpSgd, st.floats(1.5, 5.0), st.floats(0.01, 0.3), st.integers(1, 20)),
              st.floats(1.0, 5.0), st.sampled_from([0.0, 1.0, math.inf])),
)
_RUNS = {"a": "p1", "b": "p1", "c": "p2"}


@settings(max_examples=int(os.environ.get("FEDWARD_PRIVACY_EXAMPLES", "8")), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    delta=st.sampled_from([1e-6, 1e-5, 1e-4]),
    budgets=st.tuples(*[st.floats(0.5, 15.0)] * 3),
    project_cap=st.floats(0.5, 15.0),
    site_cap=st.floats(0.5, 8.0),
    disclosures=st.lists(st.tuples(st.sampled_from(sorted(_RUNS)), _MECHANISM),
                         min_size=1, max_size=6),
)
def test_figures_never_decrease_and_never_pass_a_cap_after_an_accepted_reservation(
        tmp_path_factory: pytest.TempPathFactory, delta: float,
        budgets: tuple[float, float, float], project_cap: float, site_cap: float,
        disclosures: list[tuple[str, Mechanism]]) -> None:
    """As entries are added, every reported figure (each run, each project, the site) stays
    or grows, and an accepted reservation leaves each within its cap. One delta for the
    whole ledger: a figure over runs of several deltas is stated at the largest one, and a
    run with a larger delta may state it lower (a weaker guarantee, not a smaller spend).
    """
    ledger = PrivacyLedger(tmp_path_factory.mktemp("prop") / "privacy-ledger.sqlite")
    for (run_id, project), budget in zip(sorted(_RUNS.items()), budgets, strict=True):
        ledger.open_run(run_id=run_id, project=project, epsilon_budget=budget, delta=delta)
    caps = Caps(project=project_cap, site=site_cap)

    def figures() -> dict[str, float]:
        out = {run: ledger.epsilon_spent(run) for run in _RUNS}
        out |= {p: ledger.project_epsilon(p) for p in set(_RUNS.values())}
        return out | {"site": ledger.site_epsilon()}

    seen = figures()
    accepted = 0
    for i, (run_id, mechanism) in enumerate(disclosures):
        rows = _stored(ledger.path)
        try:
            ledger.reserve(run_id=run_id, purpose="statistics", key=str(i),
                           mechanism=mechanism, caps=caps)
        except BudgetExceededError:
            assert _stored(ledger.path) == rows and figures() == seen
            continue
        now = figures()
        for scope, value in now.items():
            assert value >= seen[scope] * (1 - 1e-12), (scope, seen[scope], value)
        assert now[run_id] <= min(budgets[sorted(_RUNS).index(run_id)], project_cap) * (
            1 + 1e-9)
        assert now[_RUNS[run_id]] <= project_cap * (1 + 1e-9)
        assert now["site"] <= site_cap * (1 + 1e-9)
        seen = now
        accepted += 1
    event(f"accepted {accepted} of {len(disclosures)}")


# --- speed ------------------------------------------------------------------------------


def test_a_rounds_accounting_stays_well_under_half_a_second(ledger: PrivacyLedger) -> None:
    """A site with history (6 runs, 3 projects, statistics): each new round's reservation,
    with its run, project and site-wide checks, every figure composed afresh for its new
    step count. Measured here: see the test's output (``-s``)."""
    for i in range(6):
        run, project = f"old-{i}", f"project-{i % 3}"
        ledger.open_run(run_id=run, project=project, epsilon_budget=50.0, delta=DELTA,
                        noise_multiplier=1.0 + 0.13 * i, sample_rate=0.02 + 0.03 * i)
        ledger.reserve(run_id=run, purpose="statistics", key="means",
                       mechanism=GaussianRelease(30.0 + i, 1.0, 2))
        for n in range(1, 11):
            ledger.reserve_round(run_id=run, round_number=n, steps=25)
    ledger.open_run(run_id="new", project="project-0", epsilon_budget=50.0, delta=DELTA,
                    noise_multiplier=1.37, sample_rate=0.04)
    times = []
    for n in range(1, 8):
        started = time.perf_counter()
        ledger.reserve_round(run_id="new", round_number=n, steps=50, cap=100.0, site_cap=200.0)
        times.append(time.perf_counter() - started)
        ledger.complete_round(run_id="new", round_number=n)
    print(f"round accounting: median {statistics.median(times):.3f} s, max {max(times):.3f} s")
    assert statistics.median(times) < 0.5
