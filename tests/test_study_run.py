"""A study of the ML team's own, trained end to end with real Flower: coordinator, SuperLink
and two site agents as processes on 127.0.0.1. The study (tests/fixtures/heart_study.yaml)
is not a shipped task; the two hospitals keep their files with their own column names,
codes and units, each with its mapping. Register, approve at both sites, a statistics
phase and 2 rounds with DP-SGD (cholesterol imputed from the DP statistics inside the
model), propose and approve a release, verify the bundle and serve one record."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from fedward.study import spec_from_text

from federation import federation
from study_support import STUDY, add_study_site, hospital_a, hospital_b
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

def test_a_study_of_its_own_trains_releases_and_serves_across_two_hospitals() -> None:
    from coordinator.release_store import release_key
    from export.bundle_verify import verify_bundle
    from export.revocations import RevocationSource
    from export.serve import create_app

    # Cholesterol is imputed (hospital A leaves it unmeasured as 0): the value comes from
    # the run's DP statistics and is built into the model.
    text = STUDY.read_text().replace("range: [2.0, 15.0], missing: indicator}",
                                     "range: [2.0, 15.0], missing: impute-mean}")
    spec = spec_from_text(text, check_dp=False)
    assert spec.features[4].missing == "impute-mean"
    digest = spec.content_hash()
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        deadline = time.monotonic() + 180
        while not (fed.home / "superlink.address").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        study = work / "heart.yaml"
        study.write_text(text)   # the copy the ML team sent both hospitals
        for name, files in (("cardio-a", hospital_a(work)), ("cardio-b", hospital_b(work))):
            add_study_site(fed, name, *files, study=study)
            fed.start_site(name)
        # The first registration loads torch and Opacus into the API process (DP check).
        first = httpx.post(f"http://127.0.0.1:{fed.api_port}/api/v1/studies",
                           json={"text": study.read_text(), "source": study.name},
                           headers={"Authorization": f"Bearer {fed.token}"}, timeout=300)
        assert first.status_code == 201, first.text
        assert (first.json()["ref"], first.json()["hash"]) == ("heart_disease@1", digest)
        fed.wait_online(2)
        launched = fed.coord_cli("launch", "--project", "test", "--study", "heart_disease@1",
                                 "--epsilon", "3", "--rounds", "2", "--min-sites", "2",
                                 "--round-deadline", "60", "--statistics", "--json")
        run_id = int(json.loads(launched.stdout)["id"])
        done = fed.wait_run(run_id, timeout=300)
        assert done["status"] == "completed", done
        assert (done["task"], done["config"]["study_hash"]) == ("heart_disease", digest)
        rounds = fed.api("GET", f"/runs/{run_id}/rounds").json()
        assert [sorted(r["participating_sites"]) for r in rounds] == [
            ["cardio-a", "cardio-b"]] * 2
        for name in ("cardio-a", "cardio-b"):
            seen = [e.detail for e in fed.site_audit(name) if e.action == "run-seen"]
            assert seen and seen[0]["study_hash"] == digest, seen
        # The statistics phase ran over the study's own encoded columns and ranges.
        stats = fed.api("GET", f"/runs/{run_id}/statistics").json()
        assert sorted(stats["sites"]) == ["cardio-a", "cardio-b"], stats
        features = {f["name"]: f for f in stats["reference"]["features"]}
        assert list(features)[:3] == ["age", "sex=female", "sex=male"]
        assert features["cholesterol"]["edges"][::10] == [2.0, 15.0]
        assert stats["reference"]["study"] == {"name": "heart_disease",
                                               "hash": f"sha256:{digest}"}

        api = f"http://127.0.0.1:{fed.api_port}/api/v1"

        def user(name: str, role: str) -> httpx.Client:
            r = fed.api("POST", "/users", {"name": name, "role": role})
            assert r.status_code == 201, r.text
            return httpx.Client(base_url=api, timeout=60,
                                headers={"Authorization": f"Bearer {r.json()['token']}"})

        with user("ml", "ml_engineer") as ml, user("rev", "reviewer") as reviewer:
            r = ml.post("/candidates", params={"wait": "false"},
                        json={"run_id": run_id, "intended_use": "integration test only"})
            assert r.status_code == 202, r.text
            cand = r.json()
            deadline = time.monotonic() + 300
            while cand["status"] == "evaluating" and time.monotonic() < deadline:
                time.sleep(1)
                cand = ml.get(f"/candidates/{cand['id']}").json()
            gates = {g["name"]: g for g in cand["gates"]}
            assert cand["status"] == "awaiting_review", {
                n: g["reason"] for n, g in gates.items() if not g["passed"]}
            # Each site measured parity of its own export, built from its own spec copy.
            per_site = gates["export_parity"]["figures"]["per_site"]
            assert sorted(per_site) == ["cardio-a", "cardio-b"]
            assert all(f["onnx"]["agreement"] == 1.0 for f in per_site.values())
            r = reviewer.post(f"/candidates/{cand['id']}/approve", json={"reason": "gates pass"})
            assert r.status_code == 201, r.text
            release_id = r.json()["release_id"]

        bundle = fed.home / "releases" / release_id
        public = release_key(fed.home)[1]
        verified = verify_bundle(bundle_dir=bundle, public_key=public)
        card = verified.model_card
        assert card["study"] == {"ref": "heart_disease@1", "sha256": digest,
                                 "name": "heart_disease", "classes": ["absent", "present"]}
        assert card["input"]["classes"] == ["absent", "present"]
        assert card["input"]["columns"][:3] == ["age", "sex=female", "sex=male"]
        assert len(card["input"]["ranges"]) == 15
        assert card["input"]["imputed"] == ["cholesterol"]
        assert (bundle / "reference_statistics.json").is_file()

        app = create_app(bundle_dir=bundle, public_key=public,
                         revocations=RevocationSource(unsafe_skip=True))
        # One encoded record (the columns the card lists), age outside the study's range,
        # cholesterol not measured: the model imputes it.
        record: list[float | None] = [150, 0, 1, 0, 0, 0, 1, 130, 0, None, 0, 0, 150, 1, 0]
        served = TestClient(app)
        answer = served.post("/predict", json={"instances": [record]}).json()
        assert answer["classes"][0] in ("absent", "present"), answer
        assert len(answer["warnings"]) == 1 and "age" in answer["warnings"][0], answer
        # The run's reference statistics bin every input column: fedward-serve scores drift.
        assert served.get("/health").json()["drift"].startswith(
            "drift scored: the last 1000 answered rows against the release's reference "
            "statistics (15 features;")
        assert "fedward_serve_drift_window_rows 1.0" in served.get("/metrics").text
        # A missing value where the study does not impute: refused, naming the column.
        record[7] = None
        refused = served.post("/predict", json={"instances": [record]})
        assert refused.status_code == 422 and "resting_bp is missing" in refused.text
