"""Export parity at a site: only the site's own export of a model it knows, once, coarsely.

The attack these tests replay: the coordinator sends, as an "export artefact", an ONNX graph
that computes the real model plus a column of the input, so that the parity figure a site
returns (largest logit difference on its held-out rows) is a patient value.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from export.bundle_format import ARTEFACT_FILES, FORMATS
from export.onnx_export import export_onnx, export_onnx_int8, export_openvino
from export.parity import parity_report
from fedward.models import model_arrays
from fedward.tasks import build_model
from fedward.wire import (
    CFG,
    PARITY_DIFF_CEILINGS,
    SiteErrorCode,
    coarse_agreement,
    coarse_max_abs_diff,
    is_coarse_parity_figure,
)
from privacy import PrivacyLedger
from site_agent.audit import AuditLog, read_entries
from site_agent.data import SiteData, load_site_data
from site_agent.data_schema import load_schema
from site_agent.datasets import write_demo_federation
from site_agent.egress import EgressViolation, check_outgoing
from site_agent.parity_task import ARTEFACT_PREFIX, ParityBook, canonical_digest, model_digest
from site_agent.trainer import WarmTrainer

pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

TASK = "breast_cancer_mlp"
LEAKED_COLUMN = 3


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    fed = write_demo_federation(task=TASK, out_dir=tmp_path_factory.mktemp("fed"), n_sites=2)
    site = fed.sites[0]
    return load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path))


@dataclass(frozen=True)
class Candidate:
    arrays: dict[str, np.ndarray]
    files: dict[str, bytes]     # the coordinator's genuine export, by file name
    folder: Path


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Candidate:
    """A global model and its artefacts, exported as the coordinator's release gates do."""
    out = tmp_path_factory.mktemp("coordinator-export")
    model = build_model(TASK, seed=11)
    onnx_path = export_onnx(model=model, task=TASK, out_dir=out)
    export_onnx_int8(onnx_path=onnx_path, out_dir=out, calibration=None)
    export_openvino(onnx_path=onnx_path, out_dir=out)
    files = {n: (out / n).read_bytes() for f in FORMATS for n in ARTEFACT_FILES[f]}
    return Candidate(arrays=model_arrays(model), files=files, folder=out)


def crafted_readout_graph(genuine_onnx: bytes, column: int) -> bytes:
    """What an attacker sends: the real model's logits plus input column ``column``.

    The artefact then differs from the PyTorch model by exactly that patient value on every
    row, so "largest absolute logit difference" reads back the column's largest value.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(genuine_onnx)
    graph = proto.graph
    out_name = graph.output[0].name
    inner = out_name + "_genuine"
    for node in graph.node:
        node.output[:] = [inner if o == out_name else o for o in node.output]
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([column], np.int64), "leak_start"),
        onnx.numpy_helper.from_array(np.array([column + 1], np.int64), "leak_end"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "leak_axis"),
    ])
    graph.node.extend([
        helper.make_node("Slice", [graph.input[0].name, "leak_start", "leak_end", "leak_axis"],
                         ["leak_cell"]),
        helper.make_node("Add", [inner, "leak_cell"], [out_name]),
    ])
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


Trainer = tuple[WarmTrainer, Path]


@pytest.fixture
def trainer(site_data: SiteData, tmp_path: Path) -> Trainer:
    """A site's warm trainer writing a real, hash-chained audit log."""
    log = tmp_path / "audit.log"
    return WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                       ledger=PrivacyLedger(tmp_path / "privacy-ledger.sqlite"),
                       replies_dir=tmp_path / "replies", audit=AuditLog(log)), log


def config(run_id: str = "run-1") -> dict[str, Any]:
    return {CFG.RUN_ID: run_id, CFG.PROJECT: "oncology", CFG.TASK: TASK, CFG.ROUND: 3,
            CFG.TOTAL_ROUNDS: 3, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
            CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: False}


def parity_task(arrays: dict[str, np.ndarray], files: dict[str, bytes]
                ) -> dict[str, np.ndarray]:
    return {**arrays, **{ARTEFACT_PREFIX + n: np.frombuffer(d, dtype=np.uint8)
                         for n, d in files.items()}}


def audit_actions(log: Path) -> list[tuple[str, dict[str, Any]]]:
    entries, verdict = read_entries(log)
    assert verdict.broken_seq is None, verdict
    return [(e.action, dict(e.detail)) for e in entries]


def evaluate(trainer: WarmTrainer, arrays: dict[str, np.ndarray], run_id: str = "run-1") -> None:
    """The site evaluates a global model of the run (as in a round or the final evaluation)."""
    reply, _ = trainer.handle({"kind": "evaluate", "config": config(run_id)}, arrays)
    assert "error" not in reply, reply


def test_the_crafted_graph_reads_out_patient_values_when_run(
        candidate: Candidate, site_data: SiteData, tmp_path: Path) -> None:
    """The attack is real: run as the old parity task ran it, the figure is a patient value."""
    crafted = tmp_path / "model.onnx"
    crafted.write_bytes(crafted_readout_graph(candidate.files["model.onnx"], LEAKED_COLUMN))
    model = build_model(TASK, seed=11)
    report = parity_report(torch_model=model, artefact_path=crafted, fmt="onnx",
                           features=site_data.test_x)
    largest = float(np.max(np.abs(site_data.test_x[:, LEAKED_COLUMN])))
    assert report.max_abs_diff == pytest.approx(largest, rel=1e-5)


def test_a_crafted_graph_is_refused_audited_and_never_run(
        trainer: Trainer, candidate: Candidate) -> None:
    site, log = trainer
    evaluate(site, candidate.arrays)
    crafted = {**candidate.files,
               "model.onnx": crafted_readout_graph(candidate.files["model.onnx"],
                                                   LEAKED_COLUMN)}

    reply, out = site.handle({"kind": "parity", "config": config()},
                             parity_task(candidate.arrays, crafted))

    assert out == {}
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_POLICY
    reason = reply["error"]["reason"]
    assert "not the model's export as this site makes it" in reason
    assert "onnx: its graph has 7 operators" in reason and "nothing was run" in reason
    refused = [d for a, d in audit_actions(log) if a == "parity-refused"]
    assert len(refused) == 1
    assert refused[0]["model"] == model_digest(candidate.arrays)
    assert refused[0]["formats"] == list(FORMATS)
    assert "sha256-onnx" in refused[0] and "sha256-openvino" not in refused[0]
    # Nothing was measured, so the genuine artefacts can still be measured.
    assert ParityBook(site.replies_dir / "parity-book.json").measured(
        model_digest(candidate.arrays)) == set()


def test_genuine_parity_is_measured_once_with_coarse_figures(
        trainer: Trainer, candidate: Candidate, caplog: pytest.LogCaptureFixture) -> None:
    site, log = trainer
    evaluate(site, candidate.arrays)
    task = parity_task(candidate.arrays, candidate.files)

    with caplog.at_level(logging.INFO):
        reply, _ = site.handle({"kind": "parity", "config": config()}, task)

    # The exporters' chatter stays out of the site's log (hospital IT reads it).
    assert [r.getMessage()[:60] for r in caplog.records
            if not r.name.startswith("fedward")] == []

    assert "error" not in reply, reply
    metrics = reply["metrics"]
    assert metrics["parity-n"] == len(site.data.test_y)  # type: ignore[union-attr]
    for fmt in FORMATS:
        diff, agreement = (metrics[f"parity-{fmt}-max-abs-diff"],
                           metrics[f"parity-{fmt}-agreement"])
        assert diff == 0.0 or diff in PARITY_DIFF_CEILINGS
        assert agreement * 20 == round(agreement * 20)
    assert metrics["parity-onnx-agreement"] == 1.0
    assert metrics["parity-onnx-max-abs-diff"] <= 1e-4
    assert metrics["parity-openvino-max-abs-diff"] <= 1e-4
    assert metrics["parity-onnx-int8-agreement"] >= 0.95
    measured = [d for a, d in audit_actions(log) if a == "parity-measured"]
    assert measured[0]["formats"] == list(FORMATS)

    again, _ = site.handle({"kind": "parity", "config": config()}, task)
    assert again["error"]["code"] == SiteErrorCode.REFUSED_POLICY
    assert "was measured here already for onnx, onnx-int8, openvino" in again["error"]["reason"]
    assert [a for a, _ in audit_actions(log)][-2:] == ["parity-refused", "task-refused"]


def test_the_parity_reply_carries_the_sites_coarse_membership_audit(
        trainer: Trainer, candidate: Candidate) -> None:
    site, log = trainer
    evaluate(site, candidate.arrays)
    reply, _ = site.handle({"kind": "parity", "config": config()},
                           parity_task(candidate.arrays, candidate.files))
    assert "error" not in reply, reply
    metrics = reply["metrics"]
    n_test = len(site.data.test_y)  # type: ignore[union-attr]
    assert metrics["mia-n"] == min(n_test, len(site.data.train_y))  # type: ignore[union-attr]
    for name in ("mia-auc", "mia-loss-auc", "mia-calibrated-auc"):
        assert 0.0 <= metrics[name] <= 1.0 and metrics[name] * 100 == round(metrics[name] * 100)
    assert metrics["mia-auc"] == max(metrics["mia-loss-auc"], metrics["mia-calibrated-auc"])
    assert metrics["mia-epsilon-lb"] * 10 == round(metrics["mia-epsilon-lb"] * 10)
    audited = [d for a, d in audit_actions(log) if a == "membership-audited"]
    assert audited and audited[0]["mia-auc"] == metrics["mia-auc"]
    # The egress guard lets only the coarse grid through.
    assert not is_coarse_parity_figure("mia-auc", 0.6234)
    assert not is_coarse_parity_figure("mia-epsilon-lb", 0.37)


def test_parity_of_a_model_the_site_never_evaluated_is_refused(
        trainer: Trainer, candidate: Candidate) -> None:
    site, log = trainer
    evaluate(site, candidate.arrays, run_id="run-2")   # another run's model
    reply, _ = site.handle({"kind": "parity", "config": config("run-1")},
                           parity_task(candidate.arrays, candidate.files))
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_POLICY
    assert "only for a global model it received and evaluated in run run-1" in \
        reply["error"]["reason"]
    assert "parity-refused" in [a for a, _ in audit_actions(log)]


def test_an_openvino_ir_exported_twice_in_one_process_is_the_same_function(
        candidate: Candidate, tmp_path: Path) -> None:
    # OpenVINO names layers from a process-wide counter: the bytes differ, the function not.
    again = export_openvino(onnx_path=candidate.folder / "model.onnx", out_dir=tmp_path)
    ours = {"model.xml": again.read_bytes(), "model.bin": again.with_suffix(".bin").read_bytes()}
    theirs = {n: candidate.files[n] for n in ARTEFACT_FILES["openvino"]}
    assert ours["model.xml"] != theirs["model.xml"]
    assert canonical_digest("openvino", ours) == canonical_digest("openvino", theirs)
    weights = bytearray(ours["model.bin"])
    weights[-1] ^= 1
    assert canonical_digest("openvino", {**ours, "model.bin": bytes(weights)}) != \
        canonical_digest("openvino", theirs)
    with pytest.raises(ValueError, match="never declares a DTD"):
        canonical_digest("openvino", {**ours, "model.xml": (
            b'<?xml version="1.0"?><!DOCTYPE net [<!ENTITY a "b">]><net>&a;</net>')})


@pytest.mark.parametrize(("value", "coarse"), [
    (1.0, 1.0), (0.999, 0.95), (0.95, 0.95), (19 / 20, 0.95), (0.9499, 0.9), (0.0, 0.0),
])
def test_agreement_is_rounded_down_to_twentieths(value: float, coarse: float) -> None:
    assert coarse_agreement(value) == coarse


@pytest.mark.parametrize(("value", "coarse"), [
    (0.0, 0.0), (3.2e-9, 1e-7), (1.5e-5, 1e-4), (1e-4, 1e-4), (1.01e-4, 1e-3),
    (12.5, 100.0), (5000.0, 1000.0),
])
def test_max_abs_diff_is_rounded_up_to_a_power_of_ten(value: float, coarse: float) -> None:
    assert coarse_max_abs_diff(value) == coarse


def test_the_egress_guard_blocks_a_precise_parity_figure() -> None:
    with pytest.raises(EgressViolation, match="'parity-onnx-max-abs-diff' is not on its coarse"):
        check_outgoing(expected_shapes={}, arrays={},
                       metrics={"parity-onnx-max-abs-diff": 17.3125})
    with pytest.raises(EgressViolation, match="'parity-onnx-agreement' is not on its coarse"):
        check_outgoing(expected_shapes={}, arrays={}, metrics={"parity-onnx-agreement": 0.973})
    report = check_outgoing(expected_shapes={}, arrays={}, metrics={
        "parity-onnx-max-abs-diff": 1e-5, "parity-onnx-agreement": 0.95, "parity-n": 143.0})
    assert report.metric_names == ["parity-n", "parity-onnx-agreement",
                                   "parity-onnx-max-abs-diff"]


def test_the_parity_book_is_private_to_the_site(tmp_path: Path) -> None:
    book = ParityBook(tmp_path / "replies" / "parity-book.json")
    book.remember_model("run-1", "ab" * 32)
    book.claim("ab" * 32, ["onnx"])
    assert (book.path.stat().st_mode & 0o777) == 0o600
    assert json.loads(book.path.read_text()) == {"measured": {"ab" * 32: ["onnx"]},
                                                 "models": {"run-1": ["ab" * 32]}}
    assert book.knows_model("run-1", "ab" * 32) and not book.knows_model("run-2", "ab" * 32)
