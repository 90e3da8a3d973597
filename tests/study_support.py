"""Study specs for the tests: a small mixed-type study written as an ML team would
(``readmission``), registering one over REST, and the heart-disease study of
``tests/fixtures/heart_study.yaml`` with two hospitals' files, each in its own column names,
codes and units, with its mapping, and a site of a running federation set up for it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedward.statistics import BINS

from api_support import TestClient, api
from federation import BIN, Federation, Site, run_cli


def readmission(**overrides: Any) -> dict[str, Any]:
    """A small mixed-type study, as an ML team would write it."""
    doc: dict[str, Any] = {
        "spec_version": 1, "name": "readmission",
        "features": [
            {"name": "age", "type": "numeric", "unit": "years", "range": [18, 110],
             "missing": "impute-median"},
            {"name": "sex", "type": "categorical", "levels": ["female", "male"],
             "missing": "indicator"},
            {"name": "smoker", "type": "boolean", "missing": "impute-mode"},
            {"name": "nyha", "type": "ordinal", "levels": ["I", "II", "III", "IV"]},
        ],
        "label": {"name": "readmitted_30d", "kind": "binary", "classes": ["no", "yes"]},
        "model": {"family": "mlp", "hidden": [16, 8]},
        "training": {"lr": 0.5, "batch_size": 32, "local_epochs": 2, "max_grad_norm": 1.0},
        "metrics": ["accuracy", "auc"],
    }
    doc.update(overrides)
    return doc


def register(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post(api("/studies"), json=body, headers=headers)


# --- the heart-disease study ---------------------------------------------------------------


STUDY = Path(__file__).parent / "fixtures" / "heart_study.yaml"
CP = ["typical angina", "atypical angina", "non-anginal", "asymptomatic"]
SLOPE = ["downsloping", "flat", "upsloping"]


def patients(n: int, seed: int) -> list[dict[str, Any]]:
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


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def hospital_a(work: Path) -> tuple[Path, Path]:
    """The UCI file's own names and text codes; cholesterol in mg/dL, 0 when not measured."""
    rows = [{"id": i, "age": p["age"], "sex": "Male" if p["male"] else "Female",
             "cp": CP[p["cp"]], "trestbps": p["bp"], "chol": 0 if i % 9 == 0 else p["chol_mg"],
             "fbs": "TRUE" if p["fbs"] else "FALSE", "thalch": p["hr"],
             "slope": SLOPE[p["slope"]], "num": (1 + i % 3) if p["sick"] else 0}
            for i, p in enumerate(patients(160, seed=1))]
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
    return write_csv(work / "cardio-a.csv", rows), work / "map-a.json"


def hospital_b(work: Path) -> tuple[Path, Path]:
    """Other names, other codes, cholesterol already in mmol/L, blood pressure sometimes
    not recorded (an empty cell: the study's missing-indicator rule)."""
    rows = [{"PAT_AGE": p["age"], "GENDER": "M" if p["male"] else "F",
             "ANGINA_TYPE": str(p["cp"] + 1), "SYS_BP": "" if i % 7 == 0 else p["bp"],
             "CHOL_MMOL": round(p["chol_mg"] / 38.67, 2), "GLUC_HIGH": "Y" if p["fbs"] else "N",
             "HR_PEAK": p["hr"], "ST_SLOPE": "DFU"[p["slope"]],
             "OUTCOME": "pos" if p["sick"] else "neg"}
            for i, p in enumerate(patients(160, seed=2))]
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
    return write_csv(work / "cardio-b.csv", rows), work / "map-b.json"


def add_study_site(fed: Federation, name: str, data: Path, mapping: Path,
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


# A study whose every feature's missing value is imputed or flagged, and the DP reference
# statistics of a run of it, as the statistics phase makes them (the preprocessing tests and
# fedward-serve's records by name).
IMPUTED_SPEC: dict[str, Any] = {
    "spec_version": 1, "name": "imputed",
    "features": [
        {"name": "age", "type": "numeric", "unit": "years", "range": [20, 100],
         "missing": "impute-mean"},
        {"name": "chol", "type": "numeric", "unit": "mg/dL", "range": [100, 600],
         "missing": "impute-median"},
        {"name": "sex", "type": "categorical", "levels": ["female", "male"],
         "missing": "impute-mode"},
        {"name": "fbs", "type": "boolean", "missing": "impute-mode"},
        {"name": "slope", "type": "ordinal", "levels": ["down", "flat", "up"],
         "missing": "impute-mode"},
        {"name": "bp", "type": "numeric", "range": [50, 250], "missing": "indicator"},
    ],
    "label": {"name": "disease", "kind": "binary", "classes": ["no", "yes"]},
    "model": {"family": "logistic_regression"},
    "training": {"lr": 0.1, "batch_size": 16},
}


def reference_entry(name: str, counts: list[float], mean: float | None = None,
           std: float | None = None) -> dict[str, Any]:
    return {"name": name, "edges": [], "counts": counts, "n": sum(counts), "missing": 3.0,
            "mean": mean, "std": std}


def flat_counts(*bins: tuple[int, float]) -> list[float]:
    out = [0.0] * BINS
    for i, v in bins:
        out[i] = v
    return out


def imputed_reference(**overrides: dict[str, Any]) -> dict[str, Any]:
    entries = {
        "age": reference_entry("age", flat_counts((4, 50.0)), mean=57.3, std=9.0),
        # Noised counts, one below zero (clipped at 0): half of the 100 lies halfway into
        # the fourth bin (width 50): 100 + 3.5 * 50 = 275.
        "chol": reference_entry("chol", flat_counts((2, 40.0), (3, 20.0), (5, 40.0), (7, -6.0))),
        "sex=female": reference_entry("sex=female", flat_counts((0, 70.0), (9, 29.5))),
        "sex=male": reference_entry("sex=male", flat_counts((0, 31.0), (9, 70.2))),
        "fbs": reference_entry("fbs", flat_counts((0, 80.1), (9, 21.0))),
        "slope": reference_entry("slope", flat_counts((0, 10.0), (5, 60.0), (9, 30.0))),
        "bp": reference_entry("bp", flat_counts((5, 100.0)), mean=140.0, std=0.5),
        "bp__missing": reference_entry("bp__missing", flat_counts((0, 100.0))),
    }
    entries.update(overrides)
    return {"format": "fedward-reference-statistics", "version": 1,
            "features": list(entries.values())}
