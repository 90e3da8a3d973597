"""One real federated hyperparameter search: coordinator, SuperLink and two site agents as
processes, two trials of one round each, then a search a site cannot afford, refused before
any trial with the figures.
"""

from __future__ import annotations

import json
import time

import pytest

from privacy import PrivacyLedger

from federation import BIN, edit_site_policy, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]


def test_a_search_of_two_trials_charges_each_site_once_and_records_the_best_run() -> None:
    # Two trials exactly (the count is otherwise random: the unsafe setting is for tests).
    with short_tmp() as work, federation(work, n_sites=2, extra_env={
            "FEDWARD_UNSAFE_TUNING_TRIALS": "2"}) as fed:
        names = [s["name"] for s in fed.data["sites"]]
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
        # The second site's IT allows this project an epsilon of 4 in all.
        edit_site_policy(fed.sites[names[1]], projects={
            "test": {"epsilon_cap": 4.0, "tasks": ["breast_cancer_mlp"]}})
        for name in names:
            fed.start_site(name)
        fed.wait_online(2)
        assert fed.api("POST", "/projects", {"name": "test"}).status_code == 201

        out = run_cli([str(BIN / "fedward-coordinator"), "tune", "start", "--project", "test",
                       "--task", "breast_cancer_mlp", "--epsilon", "3", "--mean-trials", "2",
                       "--rounds", "1", "--batch-size", "32", "--batch-size", "64",
                       "--max-local-epochs", "1", "--seed", "1", "--wait", "--json"],
                      env=fed.env, timeout=360)
        tuning = json.loads(out.stdout.strip().splitlines()[-1])

        assert tuning["status"] == "completed", tuning
        trials = tuning["trials"]
        assert [t["number"] for t in trials] == [0, 1]
        for trial in trials:
            # The score is the mean of the sites' held-out AUC of the trial's final model.
            assert trial["status"] == "completed", trial
            metrics = fed.api("GET", f"/runs/{trial['run_id']}/metrics").json()["rounds"]
            aucs = [m["final-eval-auc"] for r in metrics for m in r["sites"].values()
                    if "final-eval-auc" in m]
            assert len(aucs) == 2
            assert trial["score"] == pytest.approx(sum(aucs) / 2)
        best = max(trials, key=lambda t: t["score"])
        assert tuning["best_run_id"] == best["run_id"]
        assert tuning["best_params"] == best["params"]
        # Every trial is a real, recorded run of the same sites, one round each.
        for trial in trials:
            run = fed.api("GET", f"/runs/{trial['run_id']}").json()
            assert run["status"] == "completed" and run["rounds_completed"] == 1
            assert run["config"]["lr"] == pytest.approx(trial["params"]["lr"])
            assert json.loads(run["config"]["tuning_search"])["search_id"] == tuning["id"]
        # Each site charged the search once, before its first trial; the trials' rounds
        # are recorded as covered and add nothing.
        for name in names:
            ledger = PrivacyLedger(fed.sites[name].root / "privacy-ledger.sqlite")
            entries = ledger.entries()
            (search,) = [e for e in entries if e.purpose == "tuning"]
            assert search.run_id == f"tuning-{tuning['id']}"
            assert search.mechanism.TYPE == "TuningSelection"
            covered = sorted((e.run_id, e.mechanism.TYPE) for e in entries
                             if e.purpose == "round")
            assert covered == sorted((str(t["run_id"]), "CoveredTrial") for t in trials)
            assert entries.index(search) < min(entries.index(e) for e in entries
                                               if e.purpose == "round")
            assert 2.9 <= ledger.project_epsilon("test") <= 3.0

        # A second search of epsilon 3 does not fit the second site's cap of 4: refused at
        # the first trial's admission, before any trial trains, with the figures.
        r = fed.api("POST", "/tunings", {
            "project": "test", "task": "breast_cancer_mlp", "epsilon": 3.0,
            "mean_trials": 2.0, "rounds": 1, "batch_sizes": [32], "max_local_epochs": 1})
        assert r.status_code == 201, r.text
        second = r.json()["id"]
        for _ in range(240):
            refused = fed.api("GET", f"/tunings/{second}").json()
            if refused["status"] != "running":
                break
            time.sleep(0.5)
        assert refused["status"] == "refused", refused
        reason = refused["reason"]
        assert reason.startswith("refused before any trial: the search costs epsilon 3 "
                                 "(delta 1e-05) at each site (RDP"), reason
        assert f"{names[1]} refused: refused-budget: run tuning-{second} needs epsilon" in reason
        assert "over its cap of 4.000" in reason and "left)" in reason
        assert (f"{names[0]} accepted (its remaining budgets cover the search)" in reason
                or f"{names[0]} was not asked to the end (the refusal decided)" in reason)
        assert [t["status"] for t in refused["trials"]] == ["failed"]
        assert fed.api("GET", f"/runs/{refused['trials'][0]['run_id']}/rounds").json() == []
        for name in names:
            ledger = PrivacyLedger(fed.sites[name].root / "privacy-ledger.sqlite")
            assert [e.run_id for e in ledger.entries() if e.purpose == "tuning"] == [
                f"tuning-{tuning['id']}"]
