"""Federated hyperparameter tuning: the privacy cost of a search, the site's one charge for
it, the cover of its trials, and the refusal of a search that does not fit, before any trial.

The cost is checked against dp-accounting used directly (not through the ledger); the site
side goes through ``WarmTrainer.handle`` with a real gate, ledger and audit log.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

import site_agent.training_round as trainer_module
from fedward.agent_versions import REPLY_VERSIONS, local_versions
from fedward.models import model_arrays
from fedward.tasks import build_model
from fedward.wire import CFG, SiteErrorCode
from privacy import BudgetExceededError, PrivacyLedger, compose_mechanisms
from privacy.ledger import Caps
from privacy.mechanisms import CoveredTrial, DpSgd, TuningSelection, decode_mechanism
from privacy.sampling import expected_steps, sample_rate_for
from privacy.tuning import NotCoveredError, SearchTerms, selection_for_budget
from site_agent import tuning
from site_agent.admission import SiteGate
from site_agent.approvals import ApprovalBook
from site_agent.audit import AuditLog, read_entries
from site_agent.config import SitePaths
from site_agent.data import SiteData, load_site_data
from site_agent.data_schema import load_schema
from site_agent.datasets import write_demo_federation
from site_agent.trainer import WarmTrainer

TASK = "breast_cancer_mlp"
DELTA = 1e-5


def independent_epsilon(sigma: float, q: float, steps: int, mean: float, shape: float,
                        delta: float = DELTA) -> float:
    """The search's epsilon with dp-accounting alone, spelled out event by event."""
    trial = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.RepeatAndSelectDpEvent(trial, mean, shape))
    return float(accountant.get_epsilon(delta))


# --- the cost of a search ------------------------------------------------------------------


@pytest.mark.parametrize(("mean", "shape"), [(3.0, 1.0), (4.0, math.inf)])
def test_a_search_costs_its_epsilon_as_dp_accounting_computes_it_independently(
        mean: float, shape: float) -> None:
    chosen = selection_for_budget(epsilon=3.0, delta=DELTA, sample_rate=0.1, steps=40,
                                  mean=mean, shape=shape)
    assert isinstance(chosen.trial, DpSgd)
    sigma = chosen.trial.noise_multiplier

    figure = independent_epsilon(sigma, 0.1, 40, mean, shape)
    # Within the budget and within 1% of it: the smallest noise that fits.
    assert 3.0 * 0.99 <= figure <= 3.0
    assert independent_epsilon(sigma * 0.99, 0.1, 40, mean, shape) > 3.0
    # The ledger's accountant (what every site composes) says the same, by RDP.
    ledger_figure = compose_mechanisms([chosen], delta=DELTA)
    assert ledger_figure.accountant == "rdp"
    assert ledger_figure.epsilon == pytest.approx(figure, rel=1e-9)
    # And the stored form decodes to the same mechanism.
    assert decode_mechanism(json.loads(json.dumps(chosen.to_dict()))) == chosen


def test_the_selection_costs_the_measured_factor_over_one_run() -> None:
    # Measured on these machines with dp-accounting 0.6 (RDP): one run of 80 steps is 3.30;
    # the best of a geometric number of runs of mean 5 is 5.55, of a Poisson mean 10, 6.91.
    one = DpSgd(1.84, 0.125, 80)
    assert compose_mechanisms([one], delta=DELTA, cross_check=True).rdp == pytest.approx(
        3.30, abs=0.01)
    assert compose_mechanisms([TuningSelection(one, 5, 1)], delta=DELTA).epsilon == \
        pytest.approx(5.55, abs=0.01)
    assert compose_mechanisms([TuningSelection(one, 10, math.inf)], delta=DELTA).epsilon == \
        pytest.approx(6.91, abs=0.01)


def test_search_terms_round_trip_and_bad_terms_are_refused_with_every_problem() -> None:
    terms = SearchTerms(search_id=5, mean=2.0, shape=math.inf, rounds=1, max_local_epochs=2,
                        min_batch_size=16, max_batch_size=64)
    assert SearchTerms.from_wire(terms.to_wire()) == terms
    bad = json.loads(terms.to_wire()) | {"mean": 0, "min_batch_size": 128}
    with pytest.raises(ValueError, match="mean number of trials must be in") as err:
        SearchTerms.from_wire(json.dumps(bad))
    assert "min_batch_size 128 is above max_batch_size 64" in str(err.value)
    with pytest.raises(ValueError, match="bad tuning-search terms"):
        SearchTerms.from_wire("{not json")


# --- the ledger: one charge, trials covered ------------------------------------------------


TERMS = SearchTerms(search_id=7, mean=2.0, shape=1.0, rounds=2, max_local_epochs=2,
                    min_batch_size=16, max_batch_size=32)
N_TRAIN = 200


def test_trial_rounds_cost_nothing_under_the_search_charge_and_are_refused_outside_it(
        tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    chosen = tuning.charge_search(ledger, TERMS, project="onc", epsilon=2.0, delta=DELTA,
                                  n_train=N_TRAIN, cap=None, site_cap=None)
    again = tuning.charge_search(ledger, TERMS, project="onc", epsilon=2.0, delta=DELTA,
                                 n_train=N_TRAIN, cap=None, site_cap=None)
    assert again == chosen
    searches = [e for e in ledger.entries() if e.purpose == "tuning"]
    assert len(searches) == 1 and searches[0].state == "charged"
    cost = ledger.site_epsilon()
    assert cost == pytest.approx(2.0, rel=0.01) and cost <= 2.0

    def open_trial(run_id: str, batch: int, epochs: int) -> CoveredTrial:
        covered = tuning.trial_round(chosen, TERMS, n_train=N_TRAIN, batch=batch,
                                     local_epochs=epochs)
        assert isinstance(covered.trial, DpSgd)
        ledger.open_run(run_id=run_id, project="onc", epsilon_budget=2.0, delta=DELTA,
                        noise_multiplier=covered.trial.noise_multiplier,
                        sample_rate=covered.trial.sample_rate)
        return covered

    # Two trials of two rounds, at the smallest and the largest batch: nothing more spent.
    covered = {run_id: open_trial(run_id, batch, epochs)
               for run_id, batch, epochs in (("11", 16, 2), ("12", 32, 1))}
    for run_id, mechanism in covered.items():
        for number in (1, 2):
            ledger.reserve(run_id=run_id, purpose="round", key=str(number),
                           mechanism=mechanism)
    assert ledger.site_epsilon() == cost
    assert ledger.epsilon_spent("11") == 0.0

    # A third round of the largest trial is more than a trial of the search may take.
    with pytest.raises(NotCoveredError, match="more than the reference trial search 7"):
        ledger.reserve(run_id="11", purpose="round", key="3", mechanism=covered["11"])
    assert sorted(ledger.get_run("11").rounds) == [1, 2]  # type: ignore[union-attr]
    trial = covered["12"].trial
    # A batch above the search's largest (a larger sample rate): refused.
    bigger = open_trial("13", 64, 1)
    with pytest.raises(NotCoveredError, match="more than the reference trial"):
        ledger.reserve(run_id="13", purpose="round", key="1", mechanism=bigger)
    # Less noise than the search charged for: refused.
    assert isinstance(trial, DpSgd)
    weaker = CoveredTrial(DpSgd(trial.noise_multiplier / 2, trial.sample_rate, 1), 7)
    ledger.open_run(run_id="14", project="onc", epsilon_budget=2.0, delta=DELTA,
                    noise_multiplier=trial.noise_multiplier / 2, sample_rate=trial.sample_rate)
    with pytest.raises(NotCoveredError):
        ledger.reserve(run_id="14", purpose="round", key="1", mechanism=weaker)
    # A search never charged here covers nothing; nor does one of another project.
    ledger.open_run(run_id="15", project="onc", epsilon_budget=2.0, delta=DELTA)
    with pytest.raises(NotCoveredError, match="tuning search 99 has no charge"):
        ledger.reserve(run_id="15", purpose="round", key="1",
                       mechanism=CoveredTrial(trial, 99))
    ledger.open_run(run_id="16", project="other", epsilon_budget=2.0, delta=DELTA)
    with pytest.raises(NotCoveredError, match="of project onc"):
        ledger.reserve(run_id="16", purpose="round", key="1", mechanism=covered["12"])
    assert ledger.get_run("13") is not None and ledger.get_run("13").rounds == {}  # type: ignore[union-attr]
    assert ledger.site_epsilon() == cost


def test_a_search_over_a_cap_is_not_charged(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    with pytest.raises(BudgetExceededError, match="this tuning search would bring"):
        tuning.charge_search(ledger, TERMS, project="onc", epsilon=2.0, delta=DELTA,
                             n_train=N_TRAIN, cap=1.5, site_cap=None)
    assert [e for e in ledger.entries()] == []
    assert ledger.site_epsilon() == 0.0
    ledger.open_run(run_id="x", project="onc", epsilon_budget=1.0, delta=DELTA)
    with pytest.raises(NotCoveredError):
        ledger.reserve(run_id="x", purpose="round", key="1",
                       mechanism=CoveredTrial(DpSgd(5.0, 0.1, 1), TERMS.search_id),
                       caps=Caps(project=10.0))


# --- the site: the charge at admission and at the first trial --------------------------


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    fed = write_demo_federation(task=TASK, out_dir=tmp_path_factory.mktemp("fed"), n_sites=2)
    site = fed.sites[0]
    return load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path))


def make_trainer(root: Path, data: SiteData, cap: float) -> WarmTrainer:
    paths = SitePaths(root)
    paths.policy.write_text(json.dumps({
        "version": 1, "require_approval": False, "max_rounds_per_day": None,
        "site_epsilon_cap": None,
        "projects": {"oncology": {"epsilon_cap": cap, "tasks": [TASK]}}}))
    log = AuditLog(paths.audit_log)
    gate = SiteGate(site_name="hospital-a", policy_path=paths.policy,
                    approvals=ApprovalBook(paths.approvals), audit=log)
    return WarmTrainer(site_name="hospital-a", task=TASK, data=data,
                       ledger=PrivacyLedger(paths.ledger), replies_dir=paths.replies,
                       audit=log, gate=gate)


def trial_config(run_id: str, round_number: int, terms: SearchTerms, *, epsilon: float,
                 batch: int = 16, epochs: int = 1) -> dict[str, Any]:
    return {CFG.RUN_ID: run_id, CFG.PROJECT: "oncology", CFG.TASK: TASK,
            CFG.ROUND: round_number, CFG.TOTAL_ROUNDS: terms.rounds, CFG.LOCAL_EPOCHS: epochs,
            CFG.EPSILON: epsilon, CFG.DELTA: DELTA, CFG.CLIP: 1.0, CFG.LR: 0.1,
            CFG.BATCH: batch, CFG.SEED: 0, CFG.TRAIN: round_number > 0,
            CFG.TUNING_SEARCH: terms.to_wire()}


def test_a_search_over_the_sites_budget_is_refused_at_admission_with_the_figures(
        tmp_path: Path, site_data: SiteData, monkeypatch: pytest.MonkeyPatch) -> None:
    terms = SearchTerms(search_id=3, mean=2.0, shape=1.0, rounds=1, max_local_epochs=1,
                        min_batch_size=16, max_batch_size=32)
    trainer = make_trainer(tmp_path, site_data, cap=1.0)
    read: list[str] = []
    monkeypatch.setattr(trainer_module, "train_dp", lambda **_: read.append("train"))
    monkeypatch.setattr(trainer_module, "evaluate", lambda *_, **__: read.append("eval"))

    reply, _ = trainer.handle({"kind": "admission",
                               "config": trial_config("21", 0, terms, epsilon=2.5)}, {})

    assert reply["error"]["code"] == SiteErrorCode.REFUSED_BUDGET
    reason = reply["error"]["reason"]
    assert reason.startswith("refused-budget: run tuning-3 needs epsilon 2.4"), reason
    assert "for tuning search 3 (the best of a geometric number of trials, mean 2" in reason
    assert "over the 1.000 this site allows one run of project oncology" in reason
    # Asked to train the trial anyway: refused before any row is read, nothing charged.
    arrays = model_arrays(build_model(TASK, seed=0))
    reply, _ = trainer.handle({"kind": "train",
                               "config": trial_config("21", 1, terms, epsilon=2.5)}, arrays)
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_BUDGET
    assert "this tuning search would bring the run's epsilon from 0.0000 to 2.4" in \
        reply["error"]["reason"]
    assert read == []
    assert trainer.ledger.site_epsilon() == 0.0
    assert [e.purpose for e in trainer.ledger.entries()] == []


def test_the_site_charges_a_search_once_and_trains_its_trials_under_that_charge(
        tmp_path: Path, site_data: SiteData) -> None:
    torch.set_num_threads(1)
    terms = SearchTerms(search_id=4, mean=2.0, shape=1.0, rounds=1, max_local_epochs=2,
                        min_batch_size=16, max_batch_size=32)
    trainer = make_trainer(tmp_path, site_data, cap=10.0)
    arrays = model_arrays(build_model(TASK, seed=0))
    n_train = len(site_data.train_y)

    admitted, _ = trainer.handle({"kind": "admission",
                                  "config": trial_config("31", 0, terms, epsilon=2.0)}, {})
    assert admitted == {"status": {"status": "accepted"}, REPLY_VERSIONS: local_versions()}
    assert trainer.ledger.entries() == []          # asking charges nothing
    first, out = trainer.handle({"kind": "train", "config": trial_config(
        "31", 1, terms, epsilon=2.0, batch=16, epochs=2)}, arrays)
    second, _ = trainer.handle({"kind": "train", "config": trial_config(
        "32", 1, terms, epsilon=2.0, batch=32, epochs=1)}, arrays)

    assert "error" not in first and "error" not in second, (first, second)
    assert set(out) == set(arrays)
    entries = trainer.ledger.entries()
    (search,) = [e for e in entries if e.purpose == "tuning"]
    assert isinstance(search.mechanism, TuningSelection)
    q, steps = terms.reference(n_train)
    assert search.mechanism.trial == DpSgd(search.mechanism.trial.noise_multiplier, q, steps)  # type: ignore[attr-defined]
    assert q == sample_rate_for(n_examples=n_train, batch_size=32)
    assert steps == expected_steps(n_examples=n_train, batch_size=16, epochs=2)
    rounds = [e for e in entries if e.purpose == "round"]
    assert [(e.run_id, type(e.mechanism).__name__, e.state) for e in rounds] == [
        ("31", "CoveredTrial", "charged"), ("32", "CoveredTrial", "charged")]
    cost = trainer.ledger.site_epsilon()
    assert cost == pytest.approx(2.0, rel=0.01)
    assert first["metrics"]["epsilon-spent"] == pytest.approx(cost)
    assert first["metrics"]["noise-multiplier"] == pytest.approx(
        search.mechanism.trial.noise_multiplier)  # type: ignore[attr-defined]
    audit, verdict = read_entries(SitePaths(tmp_path).audit_log)
    assert verdict.intact
    assert [e.detail["search"] for e in audit if e.action == "tuning-charged"] == [4]
    assert np.isfinite(np.concatenate([a.ravel() for a in out.values()])).all()
