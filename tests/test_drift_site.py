"""The site's drift check: PSI, the two-sample test, the report that leaves, bad input.

Real pieces throughout: a real ONNX model in a release bundle signed with a real release
key, reference statistics summed from DP-noised per-site histograms
(:mod:`drift_support`), the site's data loader, its privacy ledger and audit log.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from drift_support import dp_reference, make_release, release_key
from scipy.special import softmax
from scipy.stats import chi2_contingency
from sklearn.metrics import roc_auc_score

from fedward.drift_psi import PSI_FLOOR, psi
from fedward.drift_wire import report_problems
from site_agent.config import SiteConfig
from site_agent.data_schema import load_schema
from site_agent.datasets import read_labeled_csv, write_demo_federation
from site_agent.drift import DriftCheckError, DriftResult, disclose, run_check
from site_agent.drift_policy import DriftDisclosure, DriftSchedule
from site_agent.drift_rows import recent_data
from site_agent.drift_stats import SCORE_BINS, auc_from_histograms, chi_square, row_bucket
from site_agent.egress import EgressViolation, check_drift_report
from site_agent.policy import SitePolicy

# torch's ONNX exporter (a real model goes into the test release) warns at import.
pytestmark = [pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")]

TASK = "breast_cancer_mlp"
RELEASE = "test-run1-round1-c1"


# --- the statistics ----------------------------------------------------------------------


def test_psi_matches_the_formula_worked_by_hand() -> None:
    # a = (0.5, 0.3, 0.2), e = (0.4, 0.4, 0.2): 0.1 ln(1.25) - 0.1 ln(0.75) + 0 = 0.05108
    expected = 0.1 * math.log(0.5 / 0.4) + (-0.1) * math.log(0.3 / 0.4)
    assert psi(np.array([50.0, 30, 20]), np.array([400.0, 400, 200])) == \
        pytest.approx(expected, abs=1e-12)
    assert psi(np.array([10.0, 20, 30]), np.array([1.0, 2, 3])) == pytest.approx(0.0)
    # PSI is symmetric in its two distributions.
    a, b = np.array([5.0, 1, 9, 3]), np.array([2.0, 7, 4, 4])
    assert psi(a, b) == pytest.approx(psi(b, a))


def test_an_empty_bin_is_floored_not_infinite() -> None:
    value = psi(np.array([0.0, 50, 50]), np.array([10.0, 45, 45]))
    a = np.array([PSI_FLOOR, 0.5, 0.5])
    a = a / a.sum()
    e = np.array([0.1, 0.45, 0.45])
    assert math.isfinite(value)
    assert value == pytest.approx(float(np.sum((a - e) * np.log(a / e))), rel=1e-9)


def test_the_chi_square_test_is_pearsons_test_of_the_two_by_b_table() -> None:
    obs, ref = np.array([30.0, 45, 25, 0]), np.array([120.0, 150, 130, 0])
    stat, dof, p = chi_square(obs, ref)
    expected = chi2_contingency(np.stack([obs[:3], ref[:3]]), correction=False)
    assert stat == pytest.approx(expected.statistic)
    assert dof == expected.dof == 2
    assert p == pytest.approx(expected.pvalue)
    # Noise on the site's counts widens the denominator: the same counts read as less drift.
    noised_stat, _, noised_p = chi_square(obs, ref, noise_std=5.0)
    assert noised_stat < stat and noised_p > p
    assert chi_square(np.zeros(3), ref[:3]) == (0.0, 0, 1.0)


def test_auc_of_binned_scores_and_row_buckets() -> None:
    assert auc_from_histograms(np.array([5.0, 0, 0]), np.array([0.0, 0, 5])) == 1.0
    assert auc_from_histograms(np.array([5.0, 0]), np.array([5.0, 0])) == 0.5
    assert auc_from_histograms(np.array([0.0, 0]), np.array([1.0, 0])) is None
    assert [row_bucket(n) for n in (-3.2, 49.4, 49.6, 275, 5000)] == \
        ["<50", "<50", "50-99", "250-499", "5000+"]


# --- a real release at a site ------------------------------------------------------------


@dataclass
class SiteSetup:
    root: Path
    bundle: Path
    bare_bundle: Path
    public_key: Path
    csv: Path
    schema: Path
    others: list[Path]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteSetup]:
    work = tmp_path_factory.mktemp("drift")
    fed = write_demo_federation(task=TASK, out_dir=work / "data", n_sites=3, seed=0)
    xs = [read_labeled_csv(csv_path=s.csv_path, task=TASK)[0] for s in fed.sites]
    private, public = release_key(work / "keys")
    bundle = make_release(work, release_id=RELEASE, reference=dp_reference(xs),
                          private_key=private)
    bare = make_release(work, release_id="test-run1-round1-c2", reference=None,
                        private_key=private)
    root = work / "site"
    site = fed.sites[0]
    SiteConfig(name="site-a", superlink="127.0.0.1:9", ca_cert="ca.pem",
               data_path=str(site.csv_path), schema_path=str(site.schema_path),
               drift={"release": str(bundle), "public_key": str(public),
                      "data": str(site.csv_path)}).save(root)
    SitePolicy.starter(project="test", task=TASK, epsilon_cap=50.0).save(root / "policy.json")
    yield SiteSetup(root=root, bundle=bundle, bare_bundle=bare, public_key=public,
                    csv=site.csv_path, schema=site.schema_path,
                    others=[s.csv_path for s in fed.sites[1:]])


def test_a_check_of_a_real_release_scores_every_feature_and_the_model(setup: SiteSetup
                                                                       ) -> None:
    result = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=setup.csv,
                       schema=load_schema(setup.schema))
    assert len(result.names) == 30 and result.n_rows > 100
    table = {row["feature"]: row for row in result.table()}
    assert all(0 <= row["p_value"] <= 1 and row["psi"] >= 0 for row in table.values())
    # Accuracy is the bundle's ONNX model on the labelled rows, computed independently.
    from export.parity import load_onnx_bytes

    x, y = read_labeled_csv(csv_path=setup.csv, task=TASK)
    logits = load_onnx_bytes((setup.bundle / "model.onnx").read_bytes())(x)
    assert result.accuracy == pytest.approx(float((logits.argmax(axis=1) == y).mean()))
    # The AUC at the site is the exact AUC of the model's class-1 probability, as
    # scikit-learn computes it (the product uses privacy.roc_auc's numpy version).
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=1)[:, 1]
    assert result.auc == pytest.approx(float(roc_auc_score(y, probs)), abs=1e-12)
    assert len(np.unique(probs)) > len(probs) // 2   # scores to rank, not one tie
    # What leaves is computed from the class score histograms (SCORE_BINS equal bins of that
    # probability, the counts noise is added to), ties within a bin as half: unnoised, it
    # is scikit-learn's AUC of the bin index, to the report's six digits; and it differs
    # from the exact AUC by at most half the share of (positive, negative) pairs that
    # share a bin, the only pairs whose order binning hides.
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    bins = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, SCORE_BINS - 1)
    binned = float(roc_auc_score(y, bins))
    report, _ = disclose(result, DriftDisclosure(disclosure="unnoised"))
    assert report["auc"] == pytest.approx(binned, rel=1e-5)
    same_bin = sum(int(np.sum((bins == b) & (y == 0))) * int(np.sum((bins == b) & (y == 1)))
                   for b in range(SCORE_BINS))
    assert abs(binned - result.auc) <= 0.5 * same_bin / float(np.sum(y == 0) * np.sum(y == 1))


def test_a_shifted_feature_drifts_and_the_others_do_not(setup: SiteSetup,
                                                        tmp_path: Path) -> None:
    header, *lines = setup.csv.read_text().splitlines()
    column = header.split(",").index("worst_area")
    x, _ = read_labeled_csv(csv_path=setup.csv, task=TASK)
    shift = 0.8 * float(x[:, column].std())
    rows = []
    for line in lines:
        cells = line.split(",")
        cells[column] = repr(float(cells[column]) + shift)
        rows.append(",".join(cells))
    shifted = tmp_path / "shifted.csv"
    shifted.write_text("\n".join([header, *rows]) + "\n")
    schema = load_schema(setup.schema)
    before = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=setup.csv,
                       schema=schema).scores
    after = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=shifted,
                      schema=schema).scores
    assert after["worst_area"].psi > 4 * before["worst_area"].psi
    assert after["worst_area"].p_value < before["worst_area"].p_value
    assert after["mean_texture"] == before["mean_texture"]


def test_a_folder_of_new_rows_and_an_unlabelled_file(setup: SiteSetup, tmp_path: Path) -> None:
    folder = tmp_path / "recent"
    folder.mkdir()
    for i, path in enumerate(setup.others):
        shutil.copy(path, folder / f"part-{i}.csv")
    schema = load_schema(setup.schema)
    both = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=folder,
                     schema=schema)
    assert both.n_rows == sum(len(read_labeled_csv(csv_path=p, task=TASK)[1])
                              for p in setup.others)
    header, *lines = setup.csv.read_text().splitlines()
    keep = [i for i, c in enumerate(header.split(",")) if c != schema.label_name]
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join(",".join(line.split(",")[i] for i in keep)
                                    for line in [header, *lines]) + "\n")
    result = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=unlabelled,
                       schema=schema)
    assert result.accuracy is None and result.correct is None and result.auc is None
    assert len(result.names) == 30
    # A labelled batch of one class (the loader refuses it for training): input drift only.
    label_at = header.split(",").index(schema.label_name)
    one = [ln for ln in lines if ln.split(",")[label_at] == lines[0].split(",")[label_at]]
    single = tmp_path / "one-class.csv"
    single.write_text("\n".join([header, *one]) + "\n")
    same = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=single,
                     schema=schema)
    assert same.n_rows == len(one) and same.accuracy is None


@pytest.mark.parametrize("case", ["no-reference", "empty-file", "empty-folder", "garbage",
                                  "missing", "tampered", "few-rows", "bad-cells"])
def test_bad_input_fails_the_check_with_its_kind_and_reason(setup: SiteSetup, tmp_path: Path,
                                                            case: str) -> None:
    schema = load_schema(setup.schema)
    bundle, data = setup.bundle, setup.csv
    expected = {"no-reference": ("no-reference-statistics", "relaunch with statistics on"),
                "empty-file": ("data-empty", "is empty"),
                "empty-folder": ("data-empty", "holds no .csv"),
                "garbage": ("data-unreadable", "garbage.csv"),
                "missing": ("data-unreadable", "does not exist"),
                "tampered": ("bundle-unverified", "does not verify"),
                "few-rows": ("data-empty", "too-few-rows"),
                "bad-cells": ("data-unreadable", "wrong-type")}[case]
    header, *lines = setup.csv.read_text().splitlines()
    if case == "no-reference":
        bundle = setup.bare_bundle
    elif case == "empty-file":
        data = tmp_path / "empty.csv"
        data.write_text("")
    elif case == "empty-folder":
        data = tmp_path / "none"
        data.mkdir()
    elif case == "garbage":
        data = tmp_path / "garbage.csv"
        data.write_bytes(b"\x00\xffnot,a,csv\n1,2\n")
    elif case == "missing":
        data = tmp_path / "nothing-here.csv"
    elif case == "few-rows":
        data = tmp_path / "few.csv"
        data.write_text("\n".join([header, *lines[:3]]) + "\n")
    elif case == "bad-cells":
        data = tmp_path / "cells.csv"
        data.write_text("\n".join([header, *lines[:40],
                                   ",".join(["abc"] * len(header.split(",")))]) + "\n")
    else:
        bundle = tmp_path / "tampered"
        shutil.copytree(setup.bundle, bundle)
        doc = json.loads((bundle / "reference_statistics.json").read_text())
        doc["features"][0]["counts"][0] += 1.0
        (bundle / "reference_statistics.json").write_text(json.dumps(doc))
    with pytest.raises(DriftCheckError) as info:
        run_check(bundle_dir=bundle, public_key=setup.public_key, data=data, schema=schema)
    assert info.value.kind == expected[0]
    assert expected[1] in str(info.value)


# --- what leaves -------------------------------------------------------------------------


def test_the_noised_report_holds_scores_only_and_passes_the_egress_guard(setup: SiteSetup
                                                                         ) -> None:
    result = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=setup.csv,
                       schema=load_schema(setup.schema))
    report, mechanism = disclose(result, DriftDisclosure(), rng=np.random.default_rng(1),
                                 epsilon=0.5)
    assert mechanism is not None and mechanism.TYPE == "GaussianRelease"
    # 30 feature histograms, the row count, the correct count, one score bin: 33 touched.
    assert mechanism.l2_sensitivity == pytest.approx(math.sqrt(33))
    assert check_drift_report(report, features=result.names) < 16 * 1024
    assert report["privacy"] == {"treatment": "gaussian", "noise_multiplier": 1.0,
                                 "epsilon": 0.5, "delta": 1e-6}
    assert set(report["features"]["mean_radius"]) == {"psi", "chi2", "dof", "p_value"}
    text = json.dumps(report)
    assert str(result.n_rows) not in report["rows"]   # a bucket, not the count
    assert "counts" not in text and "edges" not in text
    unnoised, none = disclose(result, DriftDisclosure(disclosure="unnoised"))
    assert none is None
    assert unnoised["features"]["mean_radius"]["psi"] == pytest.approx(
        result.scores["mean_radius"].psi, rel=1e-5)


def test_the_egress_guard_refuses_an_extra_field_a_foreign_feature_or_a_bad_value(
        setup: SiteSetup) -> None:
    result = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=setup.csv,
                       schema=load_schema(setup.schema))
    report, _ = disclose(result, DriftDisclosure(), epsilon=0.5)
    check_drift_report(report, features=result.names)
    for change, problem in (
            ({"histogram": [1, 2, 3]}, "not on the allow-list"),
            ({"rows": 275}, "rows must be one of the buckets"),
            ({"accuracy": 1.5}, "accuracy must be null or in [0, 1]"),
            ({"release_id": "x/../y"}, "release_id is not in its fixed format"),
            ({"features": {**report["features"], "patient_name": report["features"][
                "mean_radius"]}}, "is not a feature of the release"),
            ({"features": {"mean_radius": {**report["features"]["mean_radius"],
                                           "raw": 14.2}}}, "expected exactly")):
        with pytest.raises(EgressViolation) as info:
            check_drift_report({**report, **change}, features=result.names)
        assert problem in str(info.value), change
    assert report_problems({**report, "status": "failed"}) != []


def test_a_check_is_charged_to_the_ledger_before_it_is_queued(setup: SiteSetup) -> None:
    from privacy import PrivacyLedger
    from site_agent.audit import read_entries
    from site_agent.drift_runner import check_and_queue, pending

    schedule = DriftSchedule.from_raw(SiteConfig.load(setup.root).drift)
    assert schedule is not None
    outcome = check_and_queue(setup.root, schedule)
    assert outcome.error is None
    queued = pending(setup.root)
    assert [p.stem for p in queued] == [outcome.report["report_id"]]
    ledger = PrivacyLedger(setup.root / "privacy-ledger.sqlite")
    entries = [e for e in ledger.entries() if e.purpose == "drift"]
    assert [(e.run_id, e.key, e.state) for e in entries] == [
        (f"drift:{RELEASE}", outcome.report["report_id"], "charged")]
    assert outcome.report["privacy"]["epsilon"] == pytest.approx(
        ledger.epsilon_spent(f"drift:{RELEASE}"))
    entries_, _ = read_entries(setup.root / "audit.log")
    assert entries_[-1].action == "drift-check"
    # A project cap too small for one more check: the check fails as budget-exceeded, and
    # the report that leaves names only that.
    original = (setup.root / "policy.json").read_text()
    policy = json.loads(original)
    policy["projects"]["test"]["epsilon_cap"] = outcome.report["privacy"]["epsilon"] * 1.01
    (setup.root / "policy.json").write_text(json.dumps(policy))
    try:
        refused = check_and_queue(setup.root, schedule)
    finally:
        (setup.root / "policy.json").write_text(original)
    assert refused.error is not None and refused.error.kind == "budget-exceeded"
    assert set(refused.report) == {"format", "version", "report_id", "release_id",
                                   "checked_at", "status", "failure"}
    assert len([e for e in PrivacyLedger(setup.root / "privacy-ledger.sqlite").entries()
                if e.purpose == "drift"]) == 1


def _drift_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "drift"}


def test_the_schedule_repeats_its_check_and_a_failed_check_does_not_stop_it(
        setup: SiteSetup, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from site_agent.audit import read_entries
    from site_agent.drift_policy import MIN_INTERVAL_S
    from site_agent.drift_runner import SEND_EVERY_S, DriftScheduler

    root = tmp_path / "site"
    recent = tmp_path / "recent.csv"
    shutil.copy(setup.csv, recent)
    schedule = _connector_site(setup, root, str(recent))
    # Unnoised: no ledger charge, so that no check fails for want of budget here.
    policy = SitePolicy.load(root / "policy.json")
    replace(policy, drift=DriftDisclosure(disclosure="unnoised")).save(root / "policy.json")
    interval = 90.0   # allowed (>= MIN_INTERVAL_S), and not a multiple of SEND_EVERY_S
    assert interval >= MIN_INTERVAL_S and interval % SEND_EVERY_S
    schedule = replace(schedule, interval_s=interval)
    config = (root / "site.json").read_text()

    def statuses() -> list[str]:
        entries, _ = read_entries(root / "audit.log")
        return [str(e.detail["status"]) for e in entries if e.action == "drift-check"]

    # A faster clock: each wait of the schedule takes 10 ms. Schedule time 180 s reads no
    # recent data (the check fails, audited), 360 s an unreadable site.json (the check
    # cannot run at all: an exception in the loop); each is repaired at the next check.
    clock = {"now": 0.0}
    done_by: list[tuple[float, int]] = []   # (schedule time, checks audited by its end)
    waits: list[float] = []

    def wait(stop: threading.Event, seconds: float) -> bool:
        done_by.append((clock["now"], len(statuses())))
        waits.append(seconds)
        clock["now"] += seconds
        now = clock["now"]
        if now == 2 * interval:
            recent.rename(tmp_path / "gone.csv")
        elif now == 3 * interval:
            (tmp_path / "gone.csv").rename(recent)
        elif now == 4 * interval:
            (root / "site.json").write_text("{not json")
        elif now == 5 * interval:
            (root / "site.json").write_text(config)
        return stop.wait(0.01)

    caplog.set_level(logging.INFO, logger="fedward.site.drift")
    before = _drift_threads()
    scheduler = DriftScheduler(root, schedule, wait=wait)
    scheduler.start()
    try:
        deadline = time.monotonic() + 120
        while clock["now"] < 6 * interval and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        started = time.monotonic()
        scheduler.stop()
        stopped_in = time.monotonic() - started
    assert clock["now"] >= 6 * interval, "the schedule did not reach 540 s in 120 s"
    assert stopped_in < 5 and _drift_threads() == before
    # A check at start, then one every interval (the queue is looked at every minute in
    # between: waits of 60 s and 30 s).
    assert waits[:12] == [SEND_EVERY_S, interval - SEND_EVERY_S] * 6
    checked_at = [t for (t, n), (_, m) in zip(done_by, [(0.0, 0), *done_by], strict=False)
                  if n > m]
    assert checked_at[:5] == [0.0, 90.0, 180.0, 270.0, 450.0]
    assert statuses()[:5] == ["ok", "ok", "failed", "ok", "ok"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("drift check failed (data-unreadable)") for m in messages)
    assert "drift check could not run" in messages
    # The real clock: a stop in the middle of a wait ends the schedule at once.
    scheduler = DriftScheduler(root, schedule)
    count = len(statuses())
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while len(statuses()) == count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(statuses()) == count + 1, "no check at the start of the schedule"
        time.sleep(0.2)   # into its wait of a minute
    finally:
        started = time.monotonic()
        scheduler.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 5 and _drift_threads() == before


def test_the_drift_settings_are_checked_with_every_problem_at_once() -> None:
    from site_agent.config import ConfigError
    from site_agent.policy import PolicyError

    base = {"name": "site-a", "superlink": "127.0.0.1:9", "ca_cert": "ca.pem",
            "data_path": "d.csv", "schema_path": "s.json"}
    assert SiteConfig.from_dict(base).drift is None   # off by default
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_dict({**base, "drift": {"release": "", "public_key": "k.pem",
                                                "data": "new/", "interval_s": 5,
                                                "cron": "daily"}})
    text = str(info.value)
    assert "'release' is required" in text and "interval_s must be null" in text
    assert "unknown keys ['cron']" in text
    policy = SitePolicy.starter(project="test", task=TASK).to_dict()
    assert "drift" not in policy and SitePolicy.from_dict(policy).drift == DriftDisclosure()
    with pytest.raises(PolicyError) as perr:
        SitePolicy.from_dict({**policy, "drift": {"disclosure": "raw", "noise_multiplier": 0}})
    assert "disclosure must be one of" in str(perr.value)
    assert "noise_multiplier must be a number > 0" in str(perr.value)
    unnoised = SitePolicy.from_dict({**policy, "drift": {"disclosure": "unnoised"}})
    assert unnoised.drift.disclosure == "unnoised"
    assert unnoised.to_dict()["drift"]["disclosure"] == "unnoised"


def test_the_command_shows_every_figure_at_the_site_and_fails_with_the_reason(
        setup: SiteSetup, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "fedward-site")
    ran = subprocess.run([cli, "drift", "check", "--dir", str(setup.root), "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert len(out["local"]["features"]) == 30 and out["error"] is None
    assert out["report"]["status"] == "ok"
    table = subprocess.run([cli, "drift", "check", "--dir", str(setup.root), "--data",
                            str(tmp_path)], capture_output=True, text=True, timeout=120,
                           check=False, env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 3
    assert "drift check failed (data-empty)" in table.stderr
    assert "holds no .csv file" in table.stderr
    assert "drift-check-failed (data-empty)" in table.stdout
    shown = subprocess.run([cli, "drift", "show", "--dir", str(setup.root)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"failure": "data-empty"' in shown and tmp_path.name not in shown
    listed = subprocess.run([cli, "drift", "show", "--dir", str(setup.root), "--json"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    # The same queue, one JSON list, oldest first: this test's two checks come last (the
    # site's folder is shared by the module's tests, which queue reports of their own).
    reports = json.loads(listed)
    assert len(reports) >= 2 and reports[-2]["status"] == "ok"
    assert reports[-2]["report_id"] == out["report"]["report_id"]
    assert '"failure": "data-empty"' in json.dumps(reports[-1]) and tmp_path.name not in listed


# --- recent rows from a data connector ----------------------------------------------------

SECRET = "Drift-pw-NEVER-shown-0815"


def _typed_rows(csv_path: Path) -> tuple[list[str], list[list[float | int]]]:
    """The CSV file's header and its rows as numbers (the label as an int)."""
    import csv

    with csv_path.open(encoding="utf-8", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    label = header.index("diagnosis")
    return header, [[int(v) if i == label else float(v) for i, v in enumerate(r)]
                    for r in rows]


def _sqlite(path: Path, table: str, header: list[str], rows: list[list[Any]]) -> Path:
    import sqlite3

    con = sqlite3.connect(path)
    columns = ", ".join(f'"{h}"' for h in header)
    con.execute(f"CREATE TABLE {table} ({columns})")
    con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' for _ in header)})",  # noqa: S608
                    rows)
    con.commit()
    con.close()
    return path


def _parquet(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
    return path


def _same_scores(got: DriftResult, expected: DriftResult) -> None:
    assert got.n_rows == expected.n_rows and got.names == expected.names
    assert got.scores == expected.scores
    assert all(np.array_equal(a, b) for a, b in zip(got.observed, expected.observed,
                                                     strict=True))
    assert got.correct == expected.correct and got.accuracy == expected.accuracy
    assert (got.auc is None) == (expected.auc is None)
    if got.auc is not None:
        assert got.auc == pytest.approx(expected.auc, rel=1e-12)


def test_a_sqlite_query_or_a_parquet_file_scores_as_the_same_rows_in_csv(
        setup: SiteSetup, tmp_path: Path) -> None:
    schema = load_schema(setup.schema)
    header, rows = _typed_rows(setup.csv)
    _sqlite(tmp_path / "recent.sqlite", "recent", header, rows)
    _parquet(tmp_path / "recent.parquet", header, rows)
    expected = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=setup.csv,
                         schema=schema)
    assert expected.source == "csv" and expected.accuracy is not None
    for block in ({"connector": "sql", "url": "sqlite:///recent.sqlite",
                   "query": "SELECT * FROM recent ORDER BY diagnosis"},
                  {"connector": "parquet", "path": "recent.parquet"}):
        got = run_check(bundle_dir=setup.bundle, public_key=setup.public_key,
                        data=recent_data(block, root=tmp_path, schema=schema))
        assert got.source == block["connector"]
        _same_scores(got, expected)
    # A query without the label column: the same input drift, no model figures.
    features = ", ".join(f'"{h}"' for h in header if h != "diagnosis")
    unlabelled = run_check(bundle_dir=setup.bundle, public_key=setup.public_key,
                           data=recent_data({"connector": "sql",
                                             "url": "sqlite:///recent.sqlite",
                                             "query": f"SELECT {features} FROM recent"},  # noqa: S608
                                            root=tmp_path, schema=schema))
    assert unlabelled.scores == expected.scores and unlabelled.accuracy is None


def _connector_site(setup: SiteSetup, root: Path, recent: Any, **config: Any
                    ) -> DriftSchedule:
    """A site of its own (its own ledger and outbox) whose drift section reads ``recent``."""
    SiteConfig(name="site-b", superlink="127.0.0.1:9", ca_cert="ca.pem",
               **{"data_path": str(setup.csv), "schema_path": str(setup.schema), **config},
               drift={"release": str(setup.bundle), "public_key": str(setup.public_key),
                      "data": recent}).save(root)
    SitePolicy.starter(project="test", task=TASK, epsilon_cap=50.0).save(root / "policy.json")
    schedule = DriftSchedule.from_raw(SiteConfig.load(root).drift)
    assert schedule is not None
    return schedule


def _no_secret_at(root: Path, *texts: str) -> None:
    """The secret is in no file of the site (audit log, outbox, ledger) and no text; only
    in the settings, where a test below writes it."""
    leaks = [p for p in root.rglob("*") if p.is_file() and p.name != "site.json"
             and SECRET.encode() in p.read_bytes()]
    assert leaks == [] and not [t for t in texts if SECRET in t]


def test_a_study_site_maps_its_local_codes_from_a_query_before_the_check(
        setup: SiteSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from site_agent.audit import read_entries
    from site_agent.drift_runner import check_and_queue

    caplog.set_level(logging.DEBUG)
    header, rows = _typed_rows(setup.csv)
    # The hospital's own table: its column names, and the diagnosis as M/B text.
    local = [f"ehr_{h}" for h in header]
    label = header.index("diagnosis")
    coded = [[("M" if v == 0 else "B") if i == label else v for i, v in enumerate(r)]
             for r in rows]
    _sqlite(tmp_path / "ehr.sqlite", "ehr_recent", local, coded)
    mapping = {"mapping_version": 1, "study": TASK,
               "features": [{"feature": h, "column": f"ehr_{h}"} for h in header
                            if h != "diagnosis"],
               "label": {"column": "ehr_diagnosis", "codes": {"M": "malignant",
                                                              "B": "benign"}}}
    (tmp_path / "mapping.json").write_text(json.dumps(mapping))
    monkeypatch.setenv("FEDWARD_TEST_DRIFT_DB_PASSWORD", SECRET)
    block = {"connector": "sql", "url": f"sqlite:///{tmp_path}/ehr.sqlite",
             "password_env": "FEDWARD_TEST_DRIFT_DB_PASSWORD",
             "query": "SELECT * FROM ehr_recent"}
    root = tmp_path / "site"
    # The training data is read through the same mapping; the drift check reads its rows so.
    schedule = _connector_site(setup, root, block, data_path="", schema_path="", data=block,
                               study=TASK, mapping=str(tmp_path / "mapping.json"))
    outcome = check_and_queue(root, schedule)
    assert outcome.error is None and outcome.result is not None
    expected = run_check(bundle_dir=setup.bundle, public_key=setup.public_key, data=setup.csv,
                         schema=load_schema(setup.schema))
    _same_scores(outcome.result, expected)
    entries, _ = read_entries(root / "audit.log")
    assert entries[-1].action == "drift-check" and entries[-1].detail["source"] == "sql"
    _no_secret_at(root, caplog.text, json.dumps(outcome.report))


@pytest.mark.parametrize("case", ["no-rows", "missing-column", "query-fails", "no-database",
                                  "unreachable", "password-unset"])
def test_a_connector_that_fails_fails_the_check_with_its_kind_and_no_secret(
        setup: SiteSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, case: str) -> None:
    from site_agent.audit import read_entries
    from site_agent.drift_runner import check_and_queue

    caplog.set_level(logging.DEBUG)
    header, rows = _typed_rows(setup.csv)
    db = _sqlite(tmp_path / "recent.sqlite", "recent", header, rows)
    monkeypatch.setenv("FEDWARD_TEST_DRIFT_DB_PASSWORD", SECRET)
    sqlite = {"connector": "sql", "url": f"sqlite:///{db}",
              "password_env": "FEDWARD_TEST_DRIFT_DB_PASSWORD"}
    block, kind, reason = {
        "no-rows": ({**sqlite, "query": "SELECT * FROM recent WHERE 1 = 0"}, "data-empty",
                    "the query result has 0 data row(s)"),
        "missing-column": ({**sqlite, "query": "SELECT mean_radius, diagnosis FROM recent"},
                           "data-unreadable", "column 'mean_texture' is missing"),
        "query-fails": ({**sqlite, "query": "SELECT * FROM no_such_table"},
                        "data-unreadable", "the database refused the query"),
        "no-database": ({**sqlite, "url": "sqlite:///gone.sqlite", "query": "SELECT 1"},
                        "data-unreadable", "gone.sqlite does not exist"),
        # A closed port, the password in the URL itself (the worst case): never shown.
        "unreachable": ({"connector": "sql", "query": "SELECT * FROM recent",
                         "url": f"postgresql+psycopg2://reader:{SECRET}@127.0.0.1:1/ehr"},
                        "data-unreadable", "cannot connect to sql query on "
                        "postgresql+psycopg2://reader:***@127.0.0.1:1/ehr"),
        "password-unset": ({**sqlite, "password_env": "FEDWARD_TEST_UNSET_PASSWORD",
                            "query": "SELECT * FROM recent"}, "data-unreadable",
                           "FEDWARD_TEST_UNSET_PASSWORD (password_env) is not set"),
    }[case]
    monkeypatch.delenv("FEDWARD_TEST_UNSET_PASSWORD", raising=False)
    root = tmp_path / "site"
    outcome = check_and_queue(root, _connector_site(setup, root, block))
    assert outcome.error is not None and outcome.error.kind == kind
    assert reason in str(outcome.error)
    assert outcome.report["status"] == "failed" and outcome.report["failure"] == kind
    assert set(outcome.report) == {"format", "version", "report_id", "release_id",
                                   "checked_at", "status", "failure"}
    entries, _ = read_entries(root / "audit.log")
    assert entries[-1].detail["source"] == "sql" and entries[-1].detail["failure"] == kind
    # No value of the data either: the first row's cells appear in no message.
    shown = str(outcome.error) + json.dumps(entries[-1].detail) + caplog.text
    assert not [v for v in rows[0][:5] if repr(v) in shown]
    _no_secret_at(root, shown, json.dumps(outcome.report))


def test_a_connector_block_as_recent_data_is_validated_as_the_training_data_is(
        setup: SiteSetup, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from site_agent.config import ConfigError
    from site_agent.drift_cli import drift_app

    base = {"name": "site-a", "superlink": "127.0.0.1:9", "ca_cert": "ca.pem",
            "data_path": "d.csv", "schema_path": "s.json"}
    bad = {"connector": "sql", "url": f"mysql://reader:{SECRET}@db/ehr",
           "query": "DELETE FROM recent", "password_file": "pw", "password_env": "PW",
           "cron": "daily"}
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_dict({**base, "drift": {"release": "r", "public_key": "k.pem",
                                                "data": bad, "interval_s": 5}})
    text = str(info.value)
    for problem in ("drift: data: url: backend 'mysql' is not supported",
                    "drift: data: query: the query starts with 'DELETE'",
                    "drift: data: password_env: give 'password_file' or 'password_env', "
                    "not both", "drift: data: cron: Extra inputs are not permitted",
                    "interval_s must be null"):
        assert problem in text
    assert SECRET not in text
    with pytest.raises(ConfigError, match="no data connector named 'odbc'"):
        SiteConfig.from_dict({**base, "drift": {"release": "r", "public_key": "k.pem",
                                                "data": {"connector": "odbc"}}})
    # On demand, --data-config names the block; the output names the source by its kind.
    header, rows = _typed_rows(setup.csv)
    _sqlite(tmp_path / "recent.sqlite", "recent", header, rows)
    good = tmp_path / "recent.json"
    good.write_text(json.dumps({"connector": "sql", "url": f"sqlite:///{tmp_path}/recent.sqlite",
                                "query": "SELECT * FROM recent"}))
    root = tmp_path / "site"
    _connector_site(setup, root, str(setup.csv))
    ran = CliRunner().invoke(drift_app, ["check", "--dir", str(root), "--data-config",
                                         str(good), "--json"])
    assert ran.exit_code == 0, ran.output
    out = json.loads(ran.stdout)
    assert out["source"] == "sql" and out["error"] is None
    assert len(out["local"]["features"]) == 30 and str(tmp_path) not in json.dumps(
        out["report"])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    refused = CliRunner().invoke(drift_app, ["check", "--dir", str(root), "--data-config",
                                             str(tmp_path / "bad.json")])
    assert refused.exit_code == 2 and "query starts with 'DELETE'" in refused.output
    assert SECRET not in refused.output
