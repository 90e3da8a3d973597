"""The statistics phase end to end with real processes: Flower rounds, ledgers, a signed release.

Two enrolled sites, a run with statistics on: before round 1 each site charges its ledger,
releases noised statistics over Flower, the coordinator sums and stores them, training
spends what is left of the same budget, and the release's signed bundle carries
``reference_statistics.json``, which ``fedward-verify`` verifies with the rest.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from export.bundle_verify import verify_bundle
from fedward.statistics import BINS, REFERENCE_FILE, feature_names
from privacy import PrivacyLedger
from site_agent.statistics import statistics_mechanism

from federation import BIN, federation
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

TASK = "breast_cancer_mlp"


def test_a_run_with_statistics_stores_them_and_its_release_ships_them() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        sites = sorted(fed.join_all_sites())
        run_id = fed.launch(task=TASK, rounds=2, local_epochs=1, epsilon=3.0, min_sites=2,
                            round_deadline_s=60, statistics=True)
        run = fed.wait_run(run_id)
        assert run["status"] == "completed", run

        r = fed.api("GET", f"/runs/{run_id}/statistics")
        assert r.status_code == 200, r.text
        stats = r.json()
        assert stats["sites"] == sites and stats["failed"] == {}
        reference = stats["reference"]
        assert reference["format"] == "fedward-reference-statistics"
        assert reference["version"] == 1 and reference["run_id"] == run_id
        assert reference["study"]["name"] == TASK
        assert reference["study"]["hash"].startswith("sha256:")
        # The noise of each summed count: the sites' charged mechanism, summed over 2 sites.
        site_noise = statistics_mechanism(task=TASK, epsilon=0.3, delta=1e-5).noise_std
        assert reference["privacy"] == {"mechanism": "gaussian", "epsilon": 0.3,
                                        "delta": 1e-5, "sites": 2,
                                        "noise_std": pytest.approx(site_noise * 2 ** 0.5)}
        assert [f["name"] for f in reference["features"]] == list(feature_names(TASK))
        for feature in reference["features"]:
            assert len(feature["edges"]) == BINS + 1 and len(feature["counts"]) == BINS
            assert all(c >= 0 for c in feature["counts"])
        # Noised totals are near the real number of training rows (about 2 x 213).
        rows = [f["n"] for f in reference["features"]]
        assert 100 < sorted(rows)[len(rows) // 2] < 800

        # The CLI shows the same document.
        out = fed.coord_cli("statistics", str(run_id), "--json")
        assert json.loads(out.stdout)["reference"] == reference
        # A run without statistics has none (404 with the reason).
        none = fed.api("GET", "/runs/999/statistics")
        assert none.status_code == 404

        for name in sites:
            root = fed.sites[name].root
            entries = PrivacyLedger(root / "privacy-ledger.sqlite").entries()
            mine = [e for e in entries if e.run_id == str(run_id)]
            # Charged before the rounds, in the same run's ledger.
            assert [e.purpose for e in mine] == ["statistics", "round", "round"]
            assert all(e.state == "charged" for e in mine)
            assert mine[-1].epsilon_after <= 3.0
            actions = [e.action for e in fed.site_audit(name)]
            assert actions.index("statistics-reserved") < actions.index("statistics-released") \
                < actions.index("round-reserved")

        metrics = fed.api("GET", f"/runs/{run_id}/metrics").json()["rounds"][-1]["sites"]
        for name in sites:
            assert 2.5 < metrics[name]["epsilon-spent"] <= 3.0   # statistics + training

        # Propose, approve: the bundle carries the reference statistics and verifies.
        api = f"http://127.0.0.1:{fed.api_port}/api/v1"

        def user(name: str, role: str) -> httpx.Client:
            r = fed.api("POST", "/users", {"name": name, "role": role})
            assert r.status_code == 201, r.text
            return httpx.Client(base_url=api, timeout=60,
                                headers={"Authorization": f"Bearer {r.json()['token']}"})

        with user("ml", "ml_engineer") as ml, user("rev", "reviewer") as reviewer:
            r = ml.post("/candidates", params={"wait": "false"},
                        json={"run_id": run_id, "intended_use": "integration test"})
            assert r.status_code == 202, r.text
            cand = r.json()
            deadline = time.monotonic() + 300
            while cand["status"] == "evaluating" and time.monotonic() < deadline:
                time.sleep(1)
                cand = ml.get(f"/candidates/{cand['id']}").json()
            assert cand["status"] == "awaiting_review", cand["gates"]
            r = reviewer.post(f"/candidates/{cand['id']}/approve", json={"reason": "gates pass"})
            assert r.status_code == 201, r.text
            release_id = r.json()["release_id"]
            revocations = work / "revocations.json"
            revocations.write_text(ml.get("/revocations").text)
        bundle = fed.home / "releases" / release_id
        shipped = json.loads((bundle / REFERENCE_FILE).read_text())
        assert shipped == reference
        verified = subprocess.run(
            [str(BIN / "fedward-verify"), str(bundle), "--public-key",
             str(fed.home / "release-key" / "release.pub.pem"), "--revocations",
             str(revocations)], capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert f"verified: release {release_id}" in verified.stdout
        # Listed in the signed manifest like every other file of the bundle.
        listed = verify_bundle(bundle_dir=bundle, release_id=release_id,
                               public_key=fed.home / "release-key" / "release.pub.pem")
        assert REFERENCE_FILE in listed.files
