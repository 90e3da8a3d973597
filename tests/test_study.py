"""Study specs: validation (every problem at once), the content hash, the shipped examples,
the coordinator's registry over REST, runs that pin a study version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import Engine
from sqlmodel import Session, select
from torch import nn

from coordinator.models import AuditEvent, Run, Study
from fedward.models import BUILTIN_FAMILIES, build, model_arrays
from fedward.models.digits import DigitsCNN
from fedward.models.tabular import TabularMLP
from fedward.run_config import RunPlan
from fedward.study import StudyError, load_spec, parse_spec, spec_from_text
from fedward.tasks import BREAST_CANCER_RANGES, TASKS, example_spec_path
from fedward.wire import CFG

from api_support import TestClient, api, setup_registered_sites
from study_support import readmission, register

BC = example_spec_path("breast_cancer_mlp")


def _bn_model(n_features: int = 7) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.fixture
def bn_plugin(monkeypatch: pytest.MonkeyPatch) -> str:
    """A model family DP-SGD cannot train (BatchNorm), registered in code for the test."""
    monkeypatch.setitem(BUILTIN_FAMILIES, "bn_net", _bn_model)
    return "bn_net"


# --- the spec --------------------------------------------------------------------------


def test_a_mixed_study_validates_and_encodes_its_features() -> None:
    spec = parse_spec(readmission())
    assert [c for c, _, _ in spec.input_columns()] == [
        "age", "sex=female", "sex=male", "sex__missing", "smoker", "nyha"]
    assert spec.input_columns()[0] == ("age", 18.0, 110.0)
    assert spec.input_columns()[-1] == ("nyha", 0.0, 3.0)
    family, params = spec.model_family()
    model = build(family, params, seed=0)
    assert model(torch.zeros(3, 6)).shape == (3, 2)
    assert [tuple(p.shape) for p in model.parameters()] == [(16, 6), (16,), (8, 16), (8,),
                                                           (2, 8), (2,)]
    logistic = parse_spec(readmission(model={"family": "logistic_regression"}))
    lr_model = build(*logistic.model_family(), seed=0)
    assert [tuple(p.shape) for p in lr_model.parameters()] == [(2, 6), (2,)]


def test_bad_spec_reports_every_problem_at_once_with_paths(bn_plugin: str) -> None:
    doc = readmission(model={"family": "plugin", "name": bn_plugin,
                             "params": {"n_features": 7}})
    doc["features"] = [*doc["features"],
                       {"name": "ward", "type": "text"},
                       {"name": "site", "type": "categorical", "levels": ["a", "b", "a"]},
                       {"name": "readmitted_30d", "type": "boolean"}]
    with pytest.raises(StudyError) as caught:
        parse_spec(doc, source="readmission.yaml")
    assert caught.value.problems == [
        "features.4: unknown type 'text' (known: numeric, categorical, boolean, ordinal)",
        "features.5.levels: levels listed more than once: a",
        "label.name: 'readmitted_30d' is also a feature; a study cannot learn a value from "
        "itself",
        "model: layer '1' (BatchNorm1d) cannot be trained with DP-SGD: BatchNorm cannot "
        "support training with differential privacy. " + caught.value.problems[3].split(
            "differential privacy. ", 1)[1],
    ]
    assert str(caught.value).startswith(
        "readmission.yaml is not a valid study spec (4 problem(s)):\n  - features.4: ")


def test_empty_features_and_model_mismatches_are_all_reported() -> None:
    with pytest.raises(StudyError) as caught:
        parse_spec(readmission(features=[], model={"family": "mlp", "height": 8},
                               label={"name": "y", "kind": "binary", "classes": ["a", "b",
                                                                                 "c"]}))
    assert caught.value.problems == [
        "features: List should have at least 1 item after validation, not 0",
        "label.classes: a binary label has 2 classes, not 3",
    ]
    with pytest.raises(StudyError) as caught:
        parse_spec(readmission(model={"family": "cnn", "height": 8, "width": 8}))
    assert caught.value.problems == [
        "model.family: the cnn family reads numeric pixel features only"]
    with pytest.raises(StudyError) as caught:
        parse_spec(readmission(model={"family": "mlp", "hidden": [4], "width": 3}))
    assert caught.value.problems == ["model.width: the mlp family does not take it"]


def test_unknown_plugin_is_named_with_the_known_families() -> None:
    with pytest.raises(StudyError) as caught:
        parse_spec(readmission(model={"family": "plugin", "name": "no_such_net"}))
    (problem,) = caught.value.problems
    assert problem.startswith("model: unknown model family 'no_such_net'; known families: ")
    assert "tabular_mlp" in problem


def test_content_hash_ignores_form_and_follows_meaning(tmp_path: Path) -> None:
    spec = load_spec(BC)
    as_json = tmp_path / "bc.json"
    raw = spec.model_dump(mode="json")
    # Another key order, no comments, JSON instead of YAML: the same study.
    as_json.write_text(json.dumps(dict(reversed(list(raw.items()))), indent=1))
    assert load_spec(as_json).content_hash() == spec.content_hash()
    text = BC.read_text()
    assert spec_from_text("# reviewed\n" + text).content_hash() == spec.content_hash()
    changed = spec_from_text(text.replace("lr: 1.0", "lr: 0.5"))
    assert changed.content_hash() != spec.content_hash()
    # The validated spec is hashed, defaults filled in: leaving a default out is the same.
    without = {k: v for k, v in readmission().items() if k != "metrics"}
    assert parse_spec(without).content_hash() == parse_spec(readmission()).content_hash()


def test_shipped_example_studies_build_the_same_models_as_before() -> None:
    for name in ("breast_cancer_mlp", "digits_cnn"):
        load_spec(example_spec_path(name))  # with the DP-SGD check
    bc, digits = TASKS["breast_cancer_mlp"], TASKS["digits_cnn"]
    assert (bc.label_column, bc.n_classes, bc.class_names) == (
        "diagnosis", 2, ("malignant", "benign"))
    assert (bc.default_lr, bc.default_batch_size) == (1.0, 32)
    assert len(bc.feature_columns) == 30 and BREAST_CANCER_RANGES["mean_radius"] == (
        6.981, 28.11)
    assert (digits.label_column, digits.n_classes, len(digits.feature_columns)) == (
        "digit", 10, 64)
    assert (digits.default_lr, digits.default_batch_size) == (0.003, 64)
    # The models the tasks were hard-coded to before, with the same initial weights.
    lows = [r[0] for r in BREAST_CANCER_RANGES.values()]
    highs = [r[1] for r in BREAST_CANCER_RANGES.values()]
    torch.manual_seed(0)
    before = {"breast_cancer_mlp": TabularMLP(lows, highs, hidden=8, n_classes=2)}
    torch.manual_seed(0)
    before["digits_cnn"] = DigitsCNN(n_classes=10)
    for name, old in before.items():
        new = TASKS[name].build(seed=0)
        old_arrays, new_arrays = model_arrays(old), model_arrays(new)
        assert list(old_arrays) == list(new_arrays)
        for key, value in old_arrays.items():
            np.testing.assert_array_equal(value, new_arrays[key])
        x = torch.rand(4, TASKS[name].n_features) * 16
        torch.testing.assert_close(old(x), new(x))


# --- the registry over REST --------------------------------------------------------------


def test_register_is_idempotent_and_a_changed_spec_gets_the_next_version(
    client: TestClient, token_for: Callable[..., dict[str, str]],
    engine: Engine,
) -> None:
    eng = token_for("ml_engineer")
    text = BC.read_text()
    first = register(client, eng, text=text, source="breast_cancer_mlp.yaml")
    assert first.status_code == 201, first.text
    digest = load_spec(BC).content_hash()
    assert {k: first.json()[k] for k in ("ref", "version", "hash", "created", "n_features",
                                         "classes")} == {
        "ref": "breast_cancer_mlp@1", "version": 1, "hash": digest, "created": True,
        "n_features": 30, "classes": ["malignant", "benign"]}
    # The same content again, as a JSON object this time: the same version, nothing new.
    again = register(client, eng, spec=load_spec(BC).model_dump(mode="json"))
    assert again.status_code == 200 and again.json()["ref"] == "breast_cancer_mlp@1"
    assert again.json()["created"] is False
    changed = register(client, eng, text=text.replace("lr: 1.0", "lr: 0.5"))
    assert changed.status_code == 201 and changed.json()["ref"] == "breast_cancer_mlp@2"
    assert changed.json()["hash"] != digest

    listing = client.get(api("/studies"), headers=token_for("clinician")).json()
    assert [(s["ref"], s["registered_by"]) for s in listing] == [
        ("breast_cancer_mlp@1", "ml_engineer-0"), ("breast_cancer_mlp@2", "ml_engineer-0")]
    newest = client.get(api("/studies/breast_cancer_mlp"), headers=eng).json()
    assert newest["version"] == 2 and newest["spec"]["training"]["lr"] == 0.5
    v1 = client.get(api("/studies/breast_cancer_mlp@1"), headers=eng).json()
    assert v1["hash"] == digest and v1["spec"] == load_spec(BC).model_dump(mode="json")
    missing = client.get(api("/studies/breast_cancer_mlp@7"), headers=eng)
    assert missing.status_code == 404
    assert missing.json()["detail"] == "study 'breast_cancer_mlp' has no version 7 " \
                                       "(versions: 1, 2)"
    # A malformed reference: the API's usual 422 shape (a list of located problems).
    bad = client.get(api("/studies/0"), headers=eng)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["path", "ref"]
    assert "is not a study reference" in bad.json()["detail"][0]["msg"]
    with Session(engine) as session:
        events = session.exec(select(AuditEvent).where(
            AuditEvent.action == "study.registered")).all()
        assert [e.subject for e in events] == ["study:breast_cancer_mlp@1",
                                               "study:breast_cancer_mlp@2"]


def test_a_bad_spec_is_refused_with_every_problem_and_nothing_is_registered(
    client: TestClient, token_for: Callable[..., dict[str, str]],
    engine: Engine, bn_plugin: str,
) -> None:
    doc = readmission(model={"family": "plugin", "name": bn_plugin})
    doc["features"][0]["type"] = "number"
    doc["features"][1]["levels"] = ["male", "male"]
    doc["label"]["name"] = "age"
    r = register(client, token_for("admin"), spec=doc)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert locs == [["body", "spec", "features", "0"], ["body", "spec", "features", "1",
                                                         "levels"],
                    ["body", "spec", "label", "name"], ["body", "spec", "model"]]
    assert "layer '1' (BatchNorm1d)" in r.json()["message"]
    with Session(engine) as session:
        assert session.exec(select(Study)).all() == []
    # Reviewers and clinicians read studies but may not register them, like launching.
    for role in ("reviewer", "clinician"):
        r = register(client, token_for(role), text=BC.read_text())
        assert r.status_code == 403, r.text
    assert client.get(api("/studies")).status_code == 401


def test_a_run_of_a_study_pins_its_version_hash_and_training_defaults(
    client: TestClient, token_for: Callable[..., dict[str, str]],
    engine: Engine,
) -> None:
    eng = token_for("ml_engineer")
    setup_registered_sites(client, eng, ["site-a", "site-b"])
    assert client.post(api("/projects"), json={"name": "oncology"},
                       headers=eng).status_code == 201
    text = BC.read_text()
    register(client, eng, text=text)
    v2 = register(client, eng, text=text.replace("lr: 1.0", "lr: 0.5").replace(
        "local_epochs: 1", "local_epochs: 3")).json()
    body = {"project": "oncology", "study": "breast_cancer_mlp", "rounds": 2, "epsilon": 3.0}
    r = client.post(api("/runs"), json=body, headers=eng)
    assert r.status_code == 201, r.text
    with Session(engine) as session:
        run = session.get(Run, r.json()["id"])
        assert run is not None and run.task == "breast_cancer_mlp"
        config = json.loads(run.config_json)
    assert (config["study"], config["study_hash"]) == ("breast_cancer_mlp@2", v2["hash"])
    assert (config["lr"], config["local_epochs"], config["batch_size"]) == (0.5, 3, 32)
    # What a site is asked at admission and in each round carries the pinned study.
    plan = RunPlan(**config, run_id=1, project="oncology", task=run.task)
    task_config = plan.task_config(0, train=False)
    assert (task_config[CFG.STUDY], task_config[CFG.STUDY_HASH]) == (
        "breast_cancer_mlp@2", v2["hash"])
    # A setting given explicitly wins over the study's default.
    r = client.post(api("/runs"), json={**body, "study": "breast_cancer_mlp@1",
                                        "local_epochs": 2}, headers=eng)
    with Session(engine) as session:
        second = session.get(Run, r.json()["id"])
        assert second is not None
        config = json.loads(second.config_json)
    assert (config["study"], config["local_epochs"], config["lr"]) == (
        "breast_cancer_mlp@1", 2, 1.0)
    # A run of a plain task carries no study at all. (The two runs above end first: a
    # project holds at most two runs at once.)
    with Session(engine) as session:
        for done in session.exec(select(Run)).all():
            done.status = "completed"
            session.add(done)
        session.commit()
    r = client.post(api("/runs"), json={**body, "study": None, "task": "breast_cancer_mlp"},
                    headers=eng)
    with Session(engine) as session:
        plain = session.get(Run, r.json()["id"])
        assert plain is not None
        assert "study-hash" not in RunPlan(**json.loads(plain.config_json), run_id=3,
                                           project="oncology", task=plain.task
                                           ).task_config(1, train=True)


def test_runs_naming_no_such_or_an_untrainable_study_are_refused(
    client: TestClient, token_for: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng = token_for("ml_engineer")
    setup_registered_sites(client, eng, ["site-a"])
    client.post(api("/projects"), json={"name": "oncology"}, headers=eng)
    body = {"project": "oncology", "rounds": 2, "epsilon": 3.0}

    def refusal(**extra: Any) -> str:
        r = client.post(api("/runs"), json={**body, **extra}, headers=eng)
        assert r.status_code == 422, r.text
        return str(r.json()["message"])

    assert refusal(study="breast_cancer_mlp@1") == (
        "study: no study named 'breast_cancer_mlp' is registered (registered: none); "
        "register it with `fedward-coordinator study register FILE`")
    assert "not both" in refusal(study="breast_cancer_mlp", task="breast_cancer_mlp")
    assert "NAME@VERSION" in refusal(study="Bad Name@x")
    # A study of its own with a built-in model family trains: the run is its own task.
    register(client, eng, spec=readmission())
    r = client.post(api("/runs"), json={**body, "study": "readmission@1"}, headers=eng)
    assert r.status_code == 201, r.text
    assert (r.json()["task"], r.json()["config"]["lr"]) == ("readmission", 0.5)
    # A study of its own takes a statistics phase too (its bins come from its spec).
    r = client.post(api("/runs"), json={**body, "study": "readmission@1",
                                        "statistics": True}, headers=eng)
    assert r.status_code == 201, r.text
    assert r.json()["config"]["statistics"] is True
    # A plugin model trains only as an installed distribution, which the run pins (a
    # family added in code has none to pin); nor does a shipped task's name with another
    # model.
    monkeypatch.setitem(BUILTIN_FAMILIES, "tiny_net", lambda: nn.Linear(6, 2))
    register(client, eng, spec=readmission(name="readmission-plugin",
                                           model={"family": "plugin", "name": "tiny_net"}))
    assert refusal(study="readmission-plugin@1") == (
        "study: study readmission-plugin@1: no installed distribution provides the model "
        "plugin 'tiny_net' (entry point group 'fedward.models'); install the ML team's "
        "package here")
    register(client, eng, text=BC.read_text().replace("hidden: [8]", "hidden: [16]"))
    assert "takes the name of the shipped task breast_cancer_mlp but changes its " \
        "features, label or model; give the study a name of its own" in refusal(
            study="breast_cancer_mlp@1")


def test_the_model_card_names_the_pinned_study_and_the_class_names() -> None:
    from coordinator.model_card import model_card
    from coordinator.models import Project, ReleaseCandidate

    digest = load_spec(BC).content_hash()
    privacy = {"per_site": {"site-a": {"epsilon_spent": 2.5, "delta": 1e-5}},
               "max_grad_norm": 1.0, "epsilon_budget_per_site": 3.0, "delta": 1e-5}
    cand = ReleaseCandidate(id=1, run_id=1, round_number=2, checkpoint_sha256="0" * 64,
                            intended_use="research", proposed_by="eng",
                            lineage_json=json.dumps({"privacy": privacy, "evaluation": {}}))
    config = {"study": "breast_cancer_mlp@2", "study_hash": digest}

    def card(run_config: dict[str, Any]) -> dict[str, Any]:
        run = Run(id=1, project_id=1, task="breast_cancer_mlp", launched_by="eng",
                  config_json=json.dumps(run_config))
        return model_card(release_id="r1", cand=cand, run=run,
                           project=Project(id=1, name="oncology"), approver="rev",
                           reason="ok", approved_at="2026-12-06T00:00:00+00:00")

    with_study = card(config)
    assert with_study["study"] == {"ref": "breast_cancer_mlp@2", "sha256": digest,
                                   "name": "breast_cancer_mlp",
                                   "classes": ["malignant", "benign"]}
    assert with_study["input"]["classes"] == ["malignant", "benign"]
    assert "study" not in card({})
    # A run that pinned a model plugin names its distribution, version and RECORD hash.
    pin = {"model_plugin": "fedward-example-model", "model_plugin_version": "0.1.0",
           "model_plugin_sha256": "a" * 64}
    assert card({**config, **pin})["model_plugin"] == {
        "distribution": "fedward-example-model", "version": "0.1.0", "sha256": "a" * 64}
    assert "model_plugin" not in with_study
