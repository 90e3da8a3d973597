"""The statistics phase's site side: computation, sensitivity, noise, charge, egress, budget.

The release is charged to the privacy ledger before a row is read, its noise is exactly the
charged Gaussian mechanism, only noised values pass the egress guard, and DP-SGD then
trains on what the run's budget has left: an independent recomputation of the run's epsilon
from the ledger's recorded mechanisms matches the figure the site reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedward.agent_versions import REPLY_VERSIONS, local_versions
from fedward.models import model_arrays
from fedward.statistics import (
    BINS,
    STATISTICS_ARRAY,
    FeatureBins,
    expected_shape,
    feature_bins,
    l2_sensitivity,
    reference_document,
)
from fedward.tasks import build_model
from fedward.wire import CFG, SiteErrorCode
from privacy import Caps, PrivacyLedger, compose_mechanisms, sample_rate_for
from privacy.release import gaussian_noise_multiplier, noise_multiplier_after
from site_agent.data import SiteData, load_site_data
from site_agent.data_schema import load_schema
from site_agent.datasets import write_demo_federation
from site_agent.egress import EgressViolation, check_statistics_reply
from site_agent.statistics import (
    StatisticsRefusal,
    exact_sums,
    noised,
    release_statistics,
    statistics_mechanism,
)
from site_agent.trainer import WarmTrainer

TASK = "breast_cancer_mlp"
BINS3 = (FeatureBins("a", 0.0, 10.0), FeatureBins("b", -1.0, 1.0), FeatureBins("c", 5.0, 6.0))


def config(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        CFG.RUN_ID: "run-s", CFG.PROJECT: "oncology", CFG.TASK: TASK, CFG.ROUND: 0,
        CFG.TOTAL_ROUNDS: 3, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
        CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: False,
        CFG.STATISTICS: True, CFG.STATISTICS_EPSILON: 0.3,
    }
    out.update(overrides)
    return out


# --- the computation ---------------------------------------------------------------------


def test_exact_sums_bin_clip_and_count_missing_values() -> None:
    x = np.array([[0.0, -1.0, 5.5],
                  [9.99, 1.0, np.nan],
                  [-4.0, 0.0, 7.0],       # below / inside / above the range
                  [np.nan, 0.5, 5.0]])
    out = exact_sums(x, BINS3)
    assert out.shape == (3, BINS + 4) and out.dtype == np.float64
    # Feature a: 0 and -4 (clipped) in the first bin, 9.99 in the last; one missing.
    assert out[0, :BINS].tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert out[0, BINS:BINS + 2].tolist() == [3, 1]
    assert out[0, BINS + 2] == pytest.approx(0.999)             # u = 0, 0.999, 0
    assert out[0, BINS + 3] == pytest.approx(0.999 ** 2)
    # Feature b: u = 0, 1, 0.5, 0.75; the high end falls in the last bin.
    assert out[1, :BINS].tolist() == [1, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    assert out[1, BINS + 2] == pytest.approx(2.25)
    assert out[1, BINS + 3] == pytest.approx(1 + 0.25 + 0.5625)
    # Feature c: 7.0 is clipped to 6.0 (u = 1), counted in the last bin.
    assert out[2, BINS - 1] == 1 and out[2, BINS + 1] == 1


def test_one_row_moves_the_release_by_at_most_the_stated_sensitivity() -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(-20, 20, size=(40, 3))
    base[rng.random(base.shape) < 0.2] = np.nan
    bound = l2_sensitivity(3)
    assert bound == pytest.approx(2 * math.sqrt(3))
    before = exact_sums(base, BINS3)
    worst = 0.0
    candidates = [np.array([[10.0, 1.0, 6.0]]),          # every u = 1: the worst case
                  np.array([[np.nan, np.nan, np.nan]]),
                  np.array([[1e9, -1e9, np.nan]]),
                  *[rng.uniform(-30, 30, size=(1, 3)) for _ in range(50)]]
    for row in candidates:
        change = float(np.linalg.norm(exact_sums(np.vstack([base, row]), BINS3) - before))
        assert change <= bound + 1e-12
        worst = max(worst, change)
    assert worst == pytest.approx(bound)   # tight: the stated sensitivity is reached
    # Removing a row is the same change the other way.
    removed = float(np.linalg.norm(exact_sums(base[1:], BINS3) - before))
    assert removed <= bound + 1e-12


def test_the_noise_is_the_charged_mechanism_and_costs_the_share() -> None:
    mechanism = statistics_mechanism(task=TASK, epsilon=0.3, delta=1e-5)
    n_features = len(feature_bins(TASK))
    assert mechanism.l2_sensitivity == pytest.approx(2 * math.sqrt(n_features))
    z = gaussian_noise_multiplier(epsilon=0.3, delta=1e-5)
    assert mechanism.noise_std == pytest.approx(z * mechanism.l2_sensitivity)
    cost = compose_mechanisms([mechanism], delta=1e-5).epsilon
    assert 0.297 <= cost <= 0.3
    # The analytic Gaussian mechanism (Balle and Wang) agrees that z buys about 0.3.
    from scipy.stats import norm

    def analytic_delta(eps: float) -> float:
        return float(norm.cdf(0.5 / z - eps * z) - math.exp(eps) * norm.cdf(-0.5 / z - eps * z))

    assert analytic_delta(0.3) <= 1e-5 <= analytic_delta(0.29)
    # The draws have that standard deviation (in the release's units).
    draws = noised(np.zeros((400, 50)), noise_std=mechanism.noise_std,
                   rng=np.random.default_rng(5))
    assert np.std(draws) == pytest.approx(mechanism.noise_std, rel=0.02)
    with pytest.raises(ValueError, match="noise_std must be > 0"):
        noised(np.zeros(3), noise_std=0.0)


def test_the_reference_document_is_the_shared_format() -> None:
    bins = feature_bins(TASK)
    total = np.zeros(expected_shape(TASK))
    total[:, :BINS] = 10.0
    total[0, 0] = -4.0                       # a noised count below zero is clipped at 0
    total[:, BINS:] = (100.0, 3.0, 50.0, 30.0)
    doc = reference_document(run_id=12, study={"name": TASK, "hash": "sha256:ab"},
                             epsilon=0.3, delta=1e-6, sites=3, task=TASK, total=total)
    assert doc["format"] == "fedward-reference-statistics" and doc["version"] == 1
    assert doc["privacy"] == {"mechanism": "gaussian", "epsilon": 0.3, "delta": 1e-6,
                              "sites": 3}
    first = doc["features"][0]
    assert first["name"] == bins[0].name and len(first["edges"]) == BINS + 1
    assert first["edges"][0] == bins[0].low and first["edges"][-1] == bins[0].high
    assert first["counts"][0] == 0.0 and len(first["counts"]) == BINS
    assert (first["n"], first["missing"]) == (103.0, 3.0)
    assert first["mean"] == pytest.approx(bins[0].low + 0.5 * bins[0].width)
    assert first["std"] == pytest.approx(bins[0].width * math.sqrt(0.3 - 0.25))
    json.dumps(doc, allow_nan=False)
    # With each site's noise known, the document states the noise of every summed count:
    # what a site's drift check needs to tell noise from drift.
    noised = reference_document(run_id=12, study={"name": TASK, "hash": "sha256:ab"},
                                epsilon=0.3, delta=1e-6, sites=3, task=TASK, total=total,
                                site_noise_std=2.0)
    assert noised["privacy"]["noise_std"] == pytest.approx(2.0 * math.sqrt(3))
    with pytest.raises(ValueError, match="expected"):
        reference_document(run_id=1, study={}, epsilon=0.3, delta=1e-6, sites=1, task=TASK,
                           total=np.zeros((2, 2)))


# --- charge before reading, egress -------------------------------------------------------


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    fed = write_demo_federation(task=TASK, out_dir=tmp_path_factory.mktemp("fed"), n_sites=2)
    site = fed.sites[0]
    return load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path))


def test_a_release_over_budget_is_refused_before_any_row_is_read(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    read: list[int] = []
    audit: list[tuple[str, dict[str, Any]]] = []

    def rows() -> np.ndarray:
        read.append(1)
        raise AssertionError("a row was read")

    with pytest.raises(StatisticsRefusal) as info:
        release_statistics(ledger=ledger, config=config(), features=rows,
                           caps=Caps(project=0.1), replies_dir=tmp_path,
                           audit=lambda a, d: audit.append((a, d)), task=TASK)
    assert info.value.code == SiteErrorCode.REFUSED_BUDGET
    assert "privacy budget exceeded: this statistics release would bring the run's" \
        in info.value.reason and "over its budget of 0.1000" in info.value.reason
    assert read == [] and audit == []
    assert [e for e in ledger.entries() if e.purpose == "statistics"] == []


def test_a_release_is_charged_noised_kept_and_never_drawn_twice(
        tmp_path: Path, site_data: SiteData) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    audit: list[str] = []
    kwargs: dict[str, Any] = {
        "ledger": ledger, "config": config(), "features": lambda: site_data.train_x,
        "caps": Caps(project=10.0), "replies_dir": tmp_path,
        "audit": lambda a, d: audit.append(a), "task": TASK}
    reply, arrays = release_statistics(**kwargs)
    entry = next(e for e in ledger.entries() if e.purpose == "statistics")
    assert entry.state == "charged" and entry.mechanism == statistics_mechanism(
        task=TASK, epsilon=0.3, delta=1e-5)
    assert reply["metrics"]["epsilon-spent"] == pytest.approx(ledger.epsilon_spent("run-s"))
    exact = exact_sums(site_data.train_x, feature_bins(TASK))
    values = arrays[STATISTICS_ARRAY]
    assert values.shape == exact.shape and not np.array_equal(values, exact)
    # The difference is noise of the charged standard deviation.
    assert np.std(values - exact) == pytest.approx(entry.mechanism.noise_std, rel=0.15)
    again, arrays_again = release_statistics(**kwargs)
    assert again == reply
    np.testing.assert_array_equal(arrays_again[STATISTICS_ARRAY], values)
    assert audit == ["statistics-reserved", "statistics-released", "statistics-replayed"]
    assert len(ledger.entries()) == 1
    # The egress guard passes it against the ledger's charge.
    report = check_statistics_reply(reply=reply, arrays=arrays, shape=expected_shape(TASK),
                                    charged_noise_std=entry.mechanism.noise_std)
    assert report.array_shapes == {STATISTICS_ARRAY: list(expected_shape(TASK))}


def _clean() -> tuple[dict[str, Any], dict[str, Any]]:
    values = noised(np.abs(np.random.default_rng(1).normal(20, 5, size=(30, BINS + 4))),
                    noise_std=100.0)
    return ({"metrics": {"statistics-noise-std": 100.0, "epsilon-spent": 0.3}},
            {STATISTICS_ARRAY: values})


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r, a: a.__setitem__(STATISTICS_ARRAY, np.round(a[STATISTICS_ARRAY])),
     "whole-number counts: exact, un-noised counts never leave"),
    (lambda r, a: a.__setitem__("exact", np.ones(3)), "carries one array 'statistics'"),
    (lambda r, a: r["metrics"].__setitem__("n-rows", 412.0), "carries exactly"),
    (lambda r, a: r.__setitem__("fingerprint", {"n-rows": "412"}), "not on the statistics"),
    (lambda r, a: r["metrics"].__setitem__("statistics-noise-std", 1.0),
     "differs from the release charged"),
    (lambda r, a: a.__setitem__(STATISTICS_ARRAY, a[STATISTICS_ARRAY][:3]),
     "has shape [3, 14], expected [30, 14]"),
    (lambda r, a: a.__setitem__(STATISTICS_ARRAY, a[STATISTICS_ARRAY].astype(np.float32)),
     "not a float64"),
])
def test_the_egress_guard_refuses_anything_but_the_noised_release(
        change: Any, problem: str) -> None:
    reply, arrays = _clean()
    check_statistics_reply(reply=reply, arrays=arrays, shape=(30, BINS + 4),
                           charged_noise_std=100.0)
    change(reply, arrays)
    with pytest.raises(EgressViolation, match=problem.replace("[", r"\[").replace("]", r"\]")):
        check_statistics_reply(reply=reply, arrays=arrays, shape=(30, BINS + 4),
                               charged_noise_std=100.0)


def test_nothing_leaves_without_a_charged_release() -> None:
    reply, arrays = _clean()
    with pytest.raises(EgressViolation, match="no statistics release is charged"):
        check_statistics_reply(reply=reply, arrays=arrays, shape=(30, BINS + 4),
                               charged_noise_std=None)


# --- one budget: the noise search, and an independent recomputation --------------------


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _independent_epsilon(ledger_path: Path, run_id: str, delta: float) -> float:
    """The run's epsilon from the ledger's stored rows, with dp-accounting's own accountant
    (none of privacy.accounting or privacy.mechanisms)."""
    import sqlite3

    with sqlite3.connect(ledger_path) as db:
        rows = db.execute("SELECT mechanism FROM entries WHERE run_id = ?", (run_id,)).fetchall()
    events: list[dp_event.DpEvent] = []
    for (text,) in rows:
        m = json.loads(text)
        if m["type"] == "GaussianRelease":
            events.append(dp_event.SelfComposedDpEvent(
                dp_event.GaussianDpEvent(m["noise_std"] / m["l2_sensitivity"]), m["count"]))
        else:
            assert m["type"] == "DpSgd", m
            events.append(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(
                m["sample_rate"], dp_event.GaussianDpEvent(m["noise_multiplier"])), m["steps"]))
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def test_training_gets_what_the_statistics_leave_and_the_ledger_recomputes_the_figure(
        tmp_path: Path, site_data: SiteData, one_torch_thread: None) -> None:
    ledger_path = tmp_path / "privacy-ledger.sqlite"
    trainer = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                          ledger=PrivacyLedger(ledger_path), replies_dir=tmp_path / "replies")
    header = {"kind": "statistics", "config": config()}
    reply, arrays = trainer.handle(header, {})
    assert "error" not in reply, reply
    assert set(arrays) == {STATISTICS_ARRAY}
    stats_epsilon = reply["metrics"]["epsilon-spent"]
    assert 0.29 <= stats_epsilon <= 0.3
    model = model_arrays(build_model(TASK, seed=0))
    metrics: dict[str, float] = {}
    for number in (1, 2, 3):
        reply, out = trainer.handle(
            {"kind": "train", "config": config(**{CFG.ROUND: number, CFG.TRAIN: True})}, model)
        assert "error" not in reply, reply
        metrics, model = reply["metrics"], out
    reported = metrics["epsilon-spent"]
    # One budget: statistics plus training, within it and using nearly all of it.
    assert 2.9 <= reported <= 3.0
    # The training noise is larger than for a run without statistics.
    q = metrics["noise-multiplier"]
    rate = sample_rate_for(n_examples=len(site_data.train_y), batch_size=32)
    alone = noise_multiplier_after(prior=[], epsilon=3.0, delta=1e-5, sample_rate=rate,
                                   total_epochs=3)
    assert q > alone
    independent = _independent_epsilon(ledger_path, "run-s", 1e-5)
    assert independent == pytest.approx(reported, rel=0.01)
    # The same question again is answered with the kept release: no second draw.
    again, again_arrays = trainer.handle(header, {})
    assert again["metrics"]["epsilon-spent"] == stats_epsilon
    np.testing.assert_array_equal(again_arrays[STATISTICS_ARRAY], arrays[STATISTICS_ARRAY])
    assert len([e for e in PrivacyLedger(ledger_path).entries()
                if e.purpose == "statistics"]) == 1


def test_statistics_after_training_started_are_refused(
        tmp_path: Path, site_data: SiteData, one_torch_thread: None) -> None:
    trainer = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                          ledger=PrivacyLedger(tmp_path / "l.sqlite"),
                          replies_dir=tmp_path / "replies")
    plain = config(**{CFG.STATISTICS: False, CFG.ROUND: 1, CFG.TRAIN: True})
    reply, _ = trainer.handle({"kind": "train", "config": plain},
                              model_arrays(build_model(TASK, seed=0)))
    assert "error" not in reply, reply
    reply, out = trainer.handle({"kind": "statistics", "config": config()}, {})
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_POLICY and out == {}
    assert "trains at this site already" in reply["error"]["reason"]
    reply, _ = trainer.handle({"kind": "statistics",
                               "config": config(**{CFG.STATISTICS: False})}, {})
    assert reply["error"]["code"] == SiteErrorCode.BAD_TASK


def test_the_cli_table_shows_each_feature_of_the_stored_document() -> None:
    from typer.testing import CliRunner

    from coordinator.run_statistics_cli import add_statistics_command

    total = np.zeros(expected_shape(TASK))
    total[:, :BINS] = 41.6
    total[:, BINS:] = (416.0, 2.4, 208.0, 110.0)
    doc = reference_document(run_id=4, study={"name": TASK, "hash": "sha256:ab"},
                             epsilon=0.3, delta=1e-5, sites=2, task=TASK, total=total)
    answer = {"run_id": 4, "sites": ["hospital-a", "hospital-b"],
              "failed": {"hospital-c": "offline"}, "reference": doc}
    calls: list[str] = []

    class Client:
        def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            calls.append(f"{method} {path}")
            return answer

    import typer

    app = typer.Typer()

    @app.callback()
    def _group() -> None:   # a group, as in fedward-coordinator (one command alone is the app)
        pass

    add_statistics_command(app, lambda api, token, home: Client())
    out = CliRunner().invoke(app, ["statistics", "4"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert calls == ["GET /runs/4/statistics"]
    assert "statistics of 2 site(s), epsilon 0.3 per site" in out.output
    assert "not included: hospital-c: offline" in out.output
    assert "mean_radius" in out.output and "418.4" in out.output
    as_json = CliRunner().invoke(app, ["statistics", "4", "--json"])
    assert json.loads(as_json.output) == answer


def test_the_runs_dashboard_page_shows_its_statistics(tmp_path: Path) -> None:
    import re

    from fastapi.testclient import TestClient

    from coordinator.api import create_app
    from coordinator.db import make_engine, run_migrations
    from coordinator.portal import COOKIE_NAME
    from coordinator.run_statistics import store_statistics
    from coordinator.settings import Settings

    from release_support import PASSWORD, make_user, seed_run

    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    try:
        run_id = seed_run(engine, home, rounds=1)
        plain = seed_run(engine, home, rounds=1)
        total = np.zeros(expected_shape(TASK))
        total[:, :BINS] = 41.6
        total[:, BINS:] = (416.0, 2.4, 208.0, 110.0)
        doc = reference_document(run_id=run_id, study={"name": TASK, "hash": "sha256:ab"},
                                 epsilon=0.3, delta=1e-5, sites=2, task=TASK, total=total)
        store_statistics(engine, run_id=run_id, reference=doc, sites=["hospital-a", "h-b"],
                         failed={"hospital-c": "offline"}, seconds=1.5)
        make_user(engine, "ml_engineer", "eng")
        client = TestClient(create_app(settings=Settings(home=home), engine=engine))
        r = client.post("/portal/login", data={"name": "eng", "password": PASSWORD},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        assert re.search(rf"{COOKIE_NAME}=", r.headers["set-cookie"])
        page = client.get(f"/portal/runs/{run_id}").text
        assert "<h2>Statistics</h2>" in page and 'id="statistics"' in page
        assert "Not included: hospital-c (offline)" in page
        assert "<td>mean_radius</td><td>418</td><td>2</td>" in page
        assert "<h2>Statistics</h2>" not in client.get(f"/portal/runs/{plain}").text
    finally:
        engine.dispose()


def test_admission_plans_the_statistics_with_the_rounds(
        tmp_path: Path, site_data: SiteData) -> None:
    trainer = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                          ledger=PrivacyLedger(tmp_path / "l.sqlite"),
                          replies_dir=tmp_path / "replies", epsilon_cap=2.0)
    reply, _ = trainer.handle({"kind": "admission", "config": config()}, {})
    code, reason = reply["error"]["code"], reply["error"]["reason"]
    assert code == SiteErrorCode.REFUSED_BUDGET
    assert "its statistics release and its 3 round(s) x 1 local epoch(s)" in reason
    ok = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                     ledger=PrivacyLedger(tmp_path / "l2.sqlite"),
                     replies_dir=tmp_path / "replies2")
    assert ok.handle({"kind": "admission", "config": config()}, {})[0] == {
        "status": {"status": "accepted"}, REPLY_VERSIONS: local_versions()}
    # Nothing was charged or read for either answer.
    assert PrivacyLedger(tmp_path / "l2.sqlite").entries() == []
