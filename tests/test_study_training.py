"""A study of its own at the units: the model from the spec, the site's copy by hash, and
serving with the study's names and ranges (the whole path: tests/test_study_run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedward.models import array_shapes, model_arrays
from fedward.study import load_spec
from fedward.tasks import UntrainableStudyError, build_model, study_task
from fedward.wire import CFG
from privacy import PrivacyLedger
from site_agent.config import SiteConfig
from site_agent.site_data import open_configured
from site_agent.trainer import WarmTrainer

from study_support import STUDY, hospital_b


def test_a_study_builds_its_own_model_or_its_plugin_and_a_taken_name_does_not() -> None:
    spec = load_spec(STUDY, check_dp=False)
    task = study_task(spec)
    assert (task.name, task.n_features, task.class_names) == (
        "heart_disease", 16, ("absent", "present"))
    assert array_shapes(build_model(task, seed=0)) == {"net.0.weight": (2, 16),
                                                       "net.0.bias": (2,)}
    # A plugin model: the family and params the spec names (installed at each host).
    plugin = study_task(spec.model_copy(update={"model": spec.model.model_copy(
        update={"family": "plugin", "name": "x", "params": {"width": 8}})}))
    assert (plugin.model, dict(plugin.model_params)) == ("x", {"width": 8})
    with pytest.raises(UntrainableStudyError, match="takes the name of the shipped task"):
        study_task(spec.model_copy(update={"name": "breast_cancer_mlp"}))


def _config(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        CFG.RUN_ID: "run-1", CFG.PROJECT: "test", CFG.TASK: "heart_disease", CFG.ROUND: 1,
        CFG.TOTAL_ROUNDS: 2, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
        CFG.CLIP: 1.0, CFG.LR: 0.5, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: True}
    out.update(overrides)
    return out


def test_the_site_trains_its_own_copy_of_the_study_and_refuses_another_hash(
        tmp_path: Path) -> None:
    data, mapping = hospital_b(tmp_path)
    (tmp_path / "heart.yaml").write_text(STUDY.read_text())
    cfg = SiteConfig.from_dict({"name": "cardio-b", "superlink": "h:1", "ca_cert": "c",
                                "data_path": str(data), "study": "heart.yaml",
                                "mapping": str(mapping)})
    configured = open_configured(cfg, tmp_path)
    assert configured.binding is not None
    spec = configured.binding.study
    trainer = WarmTrainer(site_name="cardio-b", task=configured.task,
                          data=configured.load(fingerprint_key=b"k" * 32),
                          ledger=PrivacyLedger(tmp_path / "l.sqlite"),
                          replies_dir=tmp_path / "replies", study=spec)
    arrays = model_arrays(build_model(study_task(spec), seed=0))
    other = "0" * 64
    reply, out = trainer.handle({"kind": "train", "config": _config(
        **{CFG.STUDY: "heart_disease@2", CFG.STUDY_HASH: other})}, arrays)
    assert reply["error"]["reason"] == (
        f"refused-policy: the run trains study heart_disease@2 (sha256 {other}) but this "
        f"site's data is mapped to study heart_disease (sha256 {spec.content_hash()}); the "
        "site's IT approves that version, points site.json's study at it and checks the "
        "mapping (fedward-site mapping check)") and out == {}
    reply, out = trainer.handle({"kind": "train", "config": _config(
        **{CFG.STUDY: "heart_disease@1", CFG.STUDY_HASH: spec.content_hash()})}, arrays)
    assert "error" not in reply, reply
    assert {k: v.shape for k, v in out.items()} == {"net.0.weight": (2, 16),
                                                     "net.0.bias": (2,)}


def test_serving_reads_a_studys_columns_ranges_and_classes_from_the_card() -> None:
    from export.serve_metrics import RangeCheck

    task = study_task(load_spec(STUDY, check_dp=False))
    card = {"task": "heart_disease", "study": {"sha256": "a" * 64},
            "input": {"columns": list(task.feature_columns), "classes": ["absent", "present"],
                      "ranges": [list(r) for r in task.input_ranges]}}
    check = RangeCheck.for_card(card, 16)
    assert check is not None and check.class_names == ("absent", "present")
    assert (check.low[0], check.high[0]) == (18.0, 100.0)
    assert RangeCheck.for_card(card, 15) is None          # a model of another width
    assert RangeCheck.for_card({**card, "study": None}, 16) is None
    assert np.all(RangeCheck.for_card({"task": "breast_cancer_mlp"}, 30).high > 0)  # type: ignore[union-attr]
