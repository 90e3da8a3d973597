"""A study of the ML team's own, trained end to end with real Flower: coordinator, SuperLink
and two site agents as processes on 127.0.0.1. The study (tests/fixtures/heart_study.yaml)
is not a shipped task; the two hospitals keep their files with their own column names,
codes and units, each with its mapping. Register, approve at both sites, a statistics
phase and 2 rounds with DP-SGD (cholesterol imputed from the DP statistics inside the
model), propose and approve a release, verify the bundle and serve one record."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedward.study import spec_from_text

from federation import BIN, Federation, Site, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STUDY = Path(__file__).parent / "fixtures" / "heart_study.yaml"
CP = ["typical angina", "atypical angina", "non-anginal", "asymptomatic"]
SLOPE = ["downsloping", "flat", "upsloping"]


def _patients(n: int, seed: int) -> list[dict[str, Any]]:
    """Patients in the study's terms, the label drawn from a known risk model."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        age, male = int(rng.integers(30, 78)), bool(rng.random() < 0.6)
        cp, hr = int(rng.integers(0, 4)), int(rng.integers(90, 200))
        logit = 0.07 * (age - 55) + 2.0 * (cp == 3) + 0.8 * male - 0.04 * (hr - 145)
        out.append({"age": age, "male": male, "cp": cp, "hr": hr,
                    "bp": int(rng.integers(100, 180)), "chol_mg": int(rng.integers(150, 400)),
                    "fbs": bool(rng.random() < 0.2), "slope": int(rng.integers(0, 3)),
                    "sick": bool(rng.random() < 1 / (1 + math.exp(-logit)))})
    return out


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _hospital_a(work: Path) -> tuple[Path, Path]:
    """The UCI file's own names and text codes; cholesterol in mg/dL, 0 when not measured."""
    rows = [{"id": i, "age": p["age"], "sex": "Male" if p["male"] else "Female",
             "cp": CP[p["cp"]], "trestbps": p["bp"], "chol": 0 if i % 9 == 0 else p["chol_mg"],
             "fbs": "TRUE" if p["fbs"] else "FALSE", "thalch": p["hr"],
             "slope": SLOPE[p["slope"]], "num": (1 + i % 3) if p["sick"] else 0}
            for i, p in enumerate(_patients(160, seed=1))]
    mapping = {
        "mapping_version": 1, "study": "heart_disease",
        "features": [
            {"feature": "age", "column": "age"},
            {"feature": "sex", "column": "sex", "codes": {"Male": "male", "Female": "female"}},
            {"feature": "chest_pain", "column": "cp",
             "codes": {"typical angina": "typical", "atypical angina": "atypical",
                       "non-anginal": "non_anginal", "asymptomatic": "asymptomatic"}},
            {"feature": "resting_bp", "column": "trestbps"},
            {"feature": "cholesterol", "column": "chol", "unit": "mg/dL",
             "substance": "cholesterol", "missing_codes": ["0"]},
            {"feature": "fasting_sugar_high", "column": "fbs"},
            {"feature": "max_heart_rate", "column": "thalch"},
            {"feature": "st_slope", "column": "slope"},
        ],
        "label": {"column": "num", "codes": {"0": "absent", "1": "present", "2": "present",
                                             "3": "present"}},
    }
    (work / "map-a.json").write_text(json.dumps(mapping))
    return _write(work / "cardio-a.csv", rows), work / "map-a.json"


def _hospital_b(work: Path) -> tuple[Path, Path]:
    """Other names, other codes, cholesterol already in mmol/L, blood pressure sometimes
    not recorded (an empty cell: the study's missing-indicator rule)."""
    rows = [{"PAT_AGE": p["age"], "GENDER": "M" if p["male"] else "F",
             "ANGINA_TYPE": str(p["cp"] + 1), "SYS_BP": "" if i % 7 == 0 else p["bp"],
             "CHOL_MMOL": round(p["chol_mg"] / 38.67, 2), "GLUC_HIGH": "Y" if p["fbs"] else "N",
             "HR_PEAK": p["hr"], "ST_SLOPE": "DFU"[p["slope"]],
             "OUTCOME": "pos" if p["sick"] else "neg"}
            for i, p in enumerate(_patients(160, seed=2))]
    mapping = {
        "mapping_version": 1, "study": "heart_disease",
        "features": [
            {"feature": "age", "column": "PAT_AGE"},
            {"feature": "sex", "column": "GENDER", "codes": {"M": "male", "F": "female"}},
            {"feature": "chest_pain", "column": "ANGINA_TYPE",
             "codes": {"1": "typical", "2": "atypical", "3": "non_anginal",
                       "4": "asymptomatic"}},
            {"feature": "resting_bp", "column": "SYS_BP"},
            {"feature": "cholesterol", "column": "CHOL_MMOL"},
            {"feature": "fasting_sugar_high", "column": "GLUC_HIGH"},
            {"feature": "max_heart_rate", "column": "HR_PEAK"},
            {"feature": "st_slope", "column": "ST_SLOPE",
             "codes": {"D": "downsloping", "F": "flat", "U": "upsloping"}},
        ],
        "label": {"column": "OUTCOME", "codes": {"neg": "absent", "pos": "present"}},
    }
    (work / "map-b.json").write_text(json.dumps(mapping))
    return _write(work / "cardio-b.csv", rows), work / "map-b.json"


def _add_study_site(fed: Federation, name: str, data: Path, mapping: Path,
                    study: Path) -> Path:
    root = fed.work / "sites" / name
    site_cli = str(BIN / "fedward-site")
    out = run_cli([site_cli, "init", "--dir", str(root), "--name", name, "--superlink",
                   fed.superlink, "--ca-cert", str(fed.home / "pki" / "ca.pem"), "--data",
                   str(data), "--study", str(study), "--mapping", str(mapping),
                   "--reconnect-backoff", "5", "--project", "test"])
    assert "for the studies approved for it (none yet" in " ".join(out.stdout.split())
    checked = run_cli([site_cli, "mapping", "check", "--dir", str(root)], check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    run_cli([site_cli, "keygen", "--dir", str(root)])
    fed.coord_cli("add-site", name, "--node-key", str(root / "keys" / "node_key.pub"))
    fed.sites[name] = Site(name=name, root=root)
    # The site's IT reviews the spec the ML team sent and approves it by its hash.
    run_cli([site_cli, "policy", "approve-study", str(study), "--project", "test", "--dir",
             str(root), "--by", f"it-{name}"])
    return root


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
        for name, files in (("cardio-a", _hospital_a(work)), ("cardio-b", _hospital_b(work))):
            _add_study_site(fed, name, *files, study=study)
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
        # A missing value where the study does not impute: refused, naming the column.
        record[7] = None
        refused = served.post("/predict", json={"instances": [record]})
        assert refused.status_code == 422 and "resting_bp is missing" in refused.text
