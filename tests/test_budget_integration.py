"""A site's privacy budget in real runs: coordinator, SuperLink and site agents as processes.

A run too large for a site's remaining budget is refused at admission with the figures,
before any round, so nothing is charged anywhere; a run that fits trains, and the site's
`status` shows what it spent, composed, and what is left.
"""

from __future__ import annotations

import json

import pytest

from privacy import PrivacyLedger
from site_agent.audit import read_entries

from federation import BIN, edit_site_policy, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_a_run_too_large_for_a_sites_budget_is_refused_at_admission_and_charges_nothing(
) -> None:
    with short_tmp() as work, federation(work, n_sites=3) as fed:
        sites = [s["name"] for s in fed.data["sites"]]
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
        free, site_capped, project_capped = sites
        # hospital-b: a site-wide cap of 1.2 over all its projects; hospital-c: a cap of 1.5
        # for the project. A run of epsilon 3 over 10 rounds would train round 1 at
        # hospital-b (0.99) and rounds 1 and 2 at hospital-c (0.94, 1.31) before the round
        # that crosses the cap: that spend would buy nothing.
        edit_site_policy(fed.sites[site_capped], site_epsilon_cap=1.2)
        edit_site_policy(fed.sites[project_capped], projects={
            "test": {"epsilon_cap": 1.5, "tasks": ["breast_cancer_mlp"]}})
        for name in sites:
            fed.start_site(name)
        fed.wait_online(3)

        too_large = fed.launch(task="breast_cancer_mlp", rounds=10, local_epochs=1,
                               epsilon=3.0, min_sites=2, round_deadline_s=60)
        run = fed.wait_run(too_large)

        # Refused up front: not one round, with each site's figures for the ML team.
        assert run["status"] == "failed", run
        reason = run["failure_reason"]
        assert reason.startswith("not admitted: 1 of 3 sites accepted the run"), reason
        assert f"refused by {site_capped} (refused-budget: run {too_large} needs epsilon" in \
            reason
        assert "the site-wide epsilon (all projects composed) would go from 0.000 spent to" \
            in reason
        assert "over its cap of 1.200 (1.200 left)" in reason
        refused = {r["site"]: r["reason"] for r in run["admission"]["refused"]}
        assert set(refused) == {site_capped, project_capped}
        assert "this site allows one run of project test" in refused[project_capped]
        assert "project test's epsilon at this site would go from 0.000 spent to" in \
            refused[project_capped]
        assert fed.api("GET", f"/runs/{too_large}/rounds").json() == []
        for name in sites:
            root = fed.sites[name].root
            assert PrivacyLedger(root / "privacy-ledger.sqlite").site_epsilon() == 0.0
            entries, verdict = read_entries(root / "audit.log")
            assert verdict.intact
            mine = [e for e in entries if e.detail.get("run") == str(too_large)]
            assert not [e for e in mine if e.action in ("round-reserved", "round-trained")]
            if name != free:
                (refusal,) = [e for e in mine if e.action == "task-refused"]
                assert refusal.detail["kind"] == "admission" and refusal.detail["code"] == 701
                assert refusal.detail["reason"] == refused[name]

        # A run that fits every site's remaining budget trains, and each site's figures
        # say what it spent, composed, and what is left.
        fits = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=0.8,
                          min_sites=3, round_deadline_s=60)
        run = fed.wait_run(fits)
        assert run["status"] == "completed", run
        root = fed.sites[project_capped].root
        ledger = PrivacyLedger(root / "privacy-ledger.sqlite")
        spent = ledger.project_epsilon("test")
        assert 0 < spent <= 0.8
        status = json.loads(run_cli([str(BIN / "fedward-site"), "status", "--dir", str(root),
                                     "--json"]).stdout)
        assert status["projects"] == [{"scope": "project", "name": "test", "spent": spent,
                                       "cap": 1.5, "left": 1.5 - spent, "accountant": "pld"}]
        assert status["site_budget"]["spent"] == spent
        # Every charge in every site's ledger has its audit entry.
        for name in sites:
            site_root = fed.sites[name].root
            charges = {(run_id, n) for run_id, r in
                       PrivacyLedger(site_root / "privacy-ledger.sqlite").all_runs().items()
                       for n in r.rounds}
            assert charges == {(str(fits), 1), (str(fits), 2)}
            entries, _ = read_entries(site_root / "audit.log")
            audited = {(str(e.detail["run"]), int(e.detail["round"])) for e in entries
                       if e.action == "round-reserved"}
            assert charges <= audited
