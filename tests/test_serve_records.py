"""fedward-serve takes records of named fields, as the release's study defines them.

The release here is built as the coordinator builds one for a run of a study: the model
with its DP preprocessing inside, exported to ONNX, the card's input section from
``coordinator.model_card``, and the study's canonical spec shipped as ``study.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.model_card import input_section
from export.bundle import write_bundle
from export.bundle_keys import generate_release_key, public_key_path
from export.onnx_export import export_onnx
from export.revocations import RevocationSource
from export.serve import create_app
from fedward.preprocessing import compose
from fedward.study import STUDY_FILE, StudySpec, parse_spec
from fedward.study_encoding import RecordError, encode_values, record_values
from fedward.tasks import study_task

from api_support import TestClient
from study_support import IMPUTED_SPEC as SPEC
from study_support import imputed_reference as reference

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)

SKIP = RevocationSource(unsafe_skip=True)
RELEASE = "rel-study"
# age impute-mean, chol impute-median, sex categorical impute-mode, fbs boolean
# impute-mode, slope ordinal impute-mode, bp numeric with a missing-indicator; plus one
# required (drop-row) feature, so that a missing field can be refused.
FEATURES = [*SPEC["features"],
            {"name": "cp", "type": "categorical",
             "levels": ["typical angina", "atypical angina", "non-anginal", "asymptomatic"]}]
PATIENT: dict[str, Any] = {"age": 63, "chol": 233.0, "sex": "male", "fbs": True,
                           "slope": "down", "bp": 145, "cp": "typical angina"}


@pytest.fixture(scope="module")
def spec() -> StudySpec:
    return parse_spec({**SPEC, "features": FEATURES}, check_dp=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    private = tmp_path_factory.mktemp("keys") / "release.pem"
    generate_release_key(private)
    return private, public_key_path(private)


def _bundle(out: Path, spec: StudySpec, keys: tuple[Path, Path], *,
            study_bytes: bytes | None) -> Path:
    ref = reference()
    ref["features"] += [{"name": f"cp={lv}", "edges": [], "counts": [50.0] + [0.0] * 9,
                         "n": 50.0, "missing": 0.0, "mean": None, "std": None}
                        for lv in FEATURES[-1]["levels"]]
    task = study_task(spec, compose(spec, ref))
    onnx = export_onnx(model=task.build(seed=0), task=task, out_dir=out / "onnx")
    card = {"release_id": RELEASE, "task": spec.name,
            "input": input_section(task, study=True),
            "study": {"ref": f"{spec.name}@1", "sha256": spec.content_hash(),
                      "name": spec.name, "classes": list(task.class_names)}}
    files = {"model.onnx": onnx}
    if study_bytes is not None:
        (out / STUDY_FILE).write_bytes(study_bytes)
        files[STUDY_FILE] = out / STUDY_FILE
    return write_bundle(out_dir=out / RELEASE, files=files, model_card=card,
                        private_key=keys[0])


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, spec: StudySpec,
           keys: tuple[Path, Path]) -> TestClient:
    bundle = _bundle(tmp_path_factory.mktemp("study"), spec, keys,
                     study_bytes=spec.canonical())
    return TestClient(create_app(bundle_dir=bundle, public_key=keys[1], revocations=SKIP))


def _encoded(spec: StudySpec, record: dict[str, Any]) -> list[float | None]:
    x, _ = encode_values(spec, record_values(spec, [record]))
    return [None if np.isnan(v) else float(v) for v in x[0]]


def test_a_record_by_name_gets_the_same_answer_as_its_encoded_row(
        client: TestClient, spec: StudySpec) -> None:
    health = client.get("/health").json()
    assert health["records"] == "records by name: the fields of study imputed"
    by_name = client.post("/predict", json={"records": [PATIENT]})
    assert by_name.status_code == 200, by_name.text
    row = _encoded(spec, PATIENT)
    # Columns: age, chol, sex=female, sex=male, fbs, slope, bp, bp__missing, cp=... (4).
    assert row == [63.0, 233.0, 0.0, 1.0, 1.0, 0.0, 145.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    by_row = client.post("/predict", json={"instances": [row]}).json()
    got = by_name.json()
    assert got["predictions"] == by_row["predictions"]
    assert np.allclose(got["probabilities"], by_row["probabilities"], atol=1e-6)
    assert got["class_names"] == ["no", "yes"]
    assert got["classes"] == [["no", "yes"][got["predictions"][0]]]
    assert got["release_id"] == RELEASE


def test_missing_fields_are_imputed_or_flagged_as_the_study_says(
        client: TestClient, spec: StudySpec) -> None:
    # Left out or null: age, chol, sex, fbs, slope are imputed inside the model; bp gets
    # its missing-indicator.
    sparse = {"cp": "asymptomatic", "age": None}
    got = client.post("/predict", json={"records": [sparse, PATIENT]})
    assert got.status_code == 200, got.text
    row = _encoded(spec, sparse)
    assert row[:7] == [None] * 6 + [50.0] and row[7] == 1.0
    by_row = client.post("/predict", json={"instances": [row]}).json()
    assert np.allclose(got.json()["probabilities"][0], by_row["probabilities"][0], atol=1e-6)


def test_every_problem_of_every_record_at_once_and_no_value_echoed(
        client: TestClient) -> None:
    bad = [{**PATIENT, "sex": "Male", "agee": 70},
           {k: v for k, v in PATIENT.items() if k != "cp"} | {"fbs": "yes", "disease": "no"},
           {**PATIENT, "age": "sixty", "slope": 2}]
    r = client.post("/predict", json={"records": bad})
    assert r.status_code == 422
    detail = r.json()["detail"]
    for line in ("record 0: 'agee' is not a field of study imputed",
                 "record 0: sex is not one of its levels: female, male (exact text)",
                 "record 1: 'disease' is the label the model predicts, not an input",
                 "record 1: cp is required: this model cannot answer without it",
                 "record 1: fbs must be true or false",
                 "record 2: age must be a number in years",
                 "record 2: slope must be one of its levels as text: down, flat, up",
                 "The study's fields are: age, chol, sex, fbs, slope, bp, cp"):
        assert line in detail, (line, detail)
    assert "Male" not in detail and "sixty" not in detail and "70" not in detail
    # Counted as a refusal, like every other.
    assert 'fedward_serve_refusals_total{reason="record"}' in client.get("/metrics").text


@pytest.mark.parametrize(("body", "needle"), [
    ({"records": [PATIENT], "instances": [[1.0]]}, "not both or neither"),
    ({}, "not both or neither"),
    ({"records": []}, "at least 1 item"),
    ({"records": [{"age": float("inf")}]}, "finite number"),
])
def test_malformed_requests_get_422(client: TestClient, body: dict[str, Any],
                                    needle: str) -> None:
    r = client.post("/predict", content=json.dumps(body, allow_nan=True),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert needle in json.dumps(r.json()), r.json()


def test_a_study_release_without_its_spec_takes_instances_only(
        tmp_path: Path, spec: StudySpec, keys: tuple[Path, Path]) -> None:
    bundle = _bundle(tmp_path, spec, keys, study_bytes=None)
    c = TestClient(create_app(bundle_dir=bundle, public_key=keys[1], revocations=SKIP))
    r = c.post("/predict", json={"records": [PATIENT]})
    assert r.status_code == 422
    assert r.json()["detail"] == ("this release takes instances only: records by name: not "
                                  "for this release (it has no study.json; send instances "
                                  "in the card's column order)")
    # A spec that is not the study the signed card names is not used either.
    other = parse_spec({**SPEC, "features": FEATURES, "description": "changed"},
                       check_dp=False)
    bundle = _bundle(tmp_path / "other", spec, keys, study_bytes=other.canonical())
    c = TestClient(create_app(bundle_dir=bundle, public_key=keys[1], revocations=SKIP))
    assert "is not the study its model card names" in c.get("/health").json()["records"]
    assert c.post("/predict", json={"records": [PATIENT]}).status_code == 422


def test_record_values_alone_lists_problems_and_counts_the_rest(spec: StudySpec) -> None:
    with pytest.raises(RecordError) as info:
        record_values(spec, [{"cp": 1}] * 30)
    assert len(info.value.problems) == 30
    assert str(info.value).endswith("; ... and 10 more")


def test_a_builtin_task_release_takes_its_columns_by_name(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from sklearn.datasets import load_breast_cancer

    from fedward.tasks import build_model, get_task

    task = get_task("breast_cancer_mlp")
    onnx = export_onnx(model=build_model(task.name, seed=0), task=task.name,
                       out_dir=tmp_path / "onnx")
    bundle = write_bundle(out_dir=tmp_path / RELEASE, files={"model.onnx": onnx},
                          model_card={"release_id": RELEASE, "task": task.name,
                                      "input": input_section(task, study=False)},
                          private_key=keys[0])
    c = TestClient(create_app(bundle_dir=bundle, public_key=keys[1], revocations=SKIP))
    assert c.get("/health").json()["records"] == "records by name: the model's input columns"
    rows = load_breast_cancer().data[:3]
    records = [dict(zip(task.feature_columns, map(float, row), strict=True)) for row in rows]
    by_name = c.post("/predict", json={"records": records}).json()
    by_row = c.post("/predict", json={"instances": rows.tolist()}).json()
    assert by_name["probabilities"] == by_row["probabilities"]
    assert by_name["class_names"] == ["malignant", "benign"]
    partial = {k: v for k, v in records[0].items() if k != "mean_radius"} | {"radius": 1.0}
    r = c.post("/predict", json={"records": [partial]})
    assert r.status_code == 422
    assert "record 0: 'radius' is not an input of this model" in r.json()["detail"]
    assert "record 0: mean_radius is required" in r.json()["detail"]
