"""Unit tests of the site agent: IPC frames, egress guard, warm trainer, config, agent helpers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import site_agent.training_round as trainer_module
from fedward.certs import ensure_ca, issue_server_cert
from fedward.models import array_shapes, model_arrays
from fedward.tasks import build_model
from fedward.wire import CFG, SiteErrorCode
from privacy import PrivacyLedger
from site_agent.config import ConfigError, SiteConfig
from site_agent.data import SiteData, load_site_data
from site_agent.data_schema import load_schema
from site_agent.datasets import write_demo_federation
from site_agent.egress import EgressViolation, check_outgoing
from site_agent.ipc import IPCError, read_frame, request, write_frame
from site_agent.trainer import WarmTrainer
from site_agent.trainer_server import TrainerServer

from tests_support import no_warm_ups_left

with warnings.catch_warnings():
    # flwr imports typer, which touches an alias that Click 8.3+ deprecates: harmless here.
    warnings.filterwarnings("ignore", message=r"'click\.utils\.get_\w+_stream' is deprecated",
                            category=DeprecationWarning)
    from fedward.flower.exit_codes import flower_exit_code
    from site_agent.connect import probe_coordinator

TASK = "breast_cancer_mlp"
REPO = Path(__file__).resolve().parents[1]


# --- ipc ---------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def send_raw_header(sock: socket.socket, header: dict[str, Any]) -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack(">I", len(head)) + head)


def test_frame_round_trip_keeps_header_and_arrays(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    counts = np.array([-3, 0, 2**40], dtype=np.int64)
    big_endian = np.array([1.5, -2.25], dtype=">f4")

    write_frame(a, {"kind": "train", "config": {"round": 2}},
                {"w": weights, "n": counts, "be": big_endian})
    header, arrays = read_frame(b)

    assert header == {"kind": "train", "config": {"round": 2}}
    assert list(arrays) == ["w", "n", "be"]
    np.testing.assert_array_equal(arrays["w"], weights)
    assert arrays["w"].dtype == np.float32 and arrays["w"].shape == (3, 4)
    np.testing.assert_array_equal(arrays["n"], counts)
    assert arrays["n"].dtype == np.int64
    np.testing.assert_array_equal(arrays["be"], [1.5, -2.25])


def test_oversized_header_length_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", (1 << 20) + 1))
    with pytest.raises(IPCError, match=r"header of 1048577 bytes exceeds the 1048576-byte limit"):
        read_frame(b)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "x", "dtype": "O", "shape": [1]}, r"array 'x': dtype object / shape \(1,\) not"),
        ({"name": "x", "dtype": "bool", "shape": [1]}, r"array 'x': dtype bool "),
        ({"name": "x", "dtype": "float32", "shape": [-1]}, r"shape \(-1,\) not allowed"),
        ({"name": "x", "shape": [1]}, r"bad array spec .*'dtype'"),
        ({"name": "x", "dtype": "no-such-type", "shape": [1]}, r"bad array spec"),
        ({"name": "x", "dtype": "float32", "shape": "ab"}, r"bad array spec"),
        ({"name": "x", "dtype": "float32", "shape": [2**40] * 3}, r"exceeds the limit"),
    ],
)
def test_bad_array_spec_is_refused(
    pair: tuple[socket.socket, socket.socket], spec: dict[str, Any], message: str
) -> None:
    a, b = pair
    send_raw_header(a, {"kind": "train", "arrays": [spec]})
    with pytest.raises(IPCError, match=message):
        read_frame(b)


def test_writer_refuses_object_arrays(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    with pytest.raises(IPCError, match=r"array 'x' has dtype object"):
        write_frame(a, {}, {"x": np.array([{"a": 1}], dtype=object)})


def test_truncated_frame_raises(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_raw_header(a, {"arrays": [{"name": "x", "dtype": "float64", "shape": [2]}]})
    a.sendall(b"\x00" * 8)  # one float64 of the two announced
    a.close()
    with pytest.raises(IPCError, match="connection closed mid-frame"):
        read_frame(b)


def test_header_that_is_not_a_json_object_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    head = b"[1, 2]"
    a.sendall(struct.pack(">I", len(head)) + head)
    with pytest.raises(IPCError, match="header must be a JSON object"):
        read_frame(b)


def test_request_to_missing_socket_says_the_agent_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(IPCError, match="is the site agent running"):
        request(tmp_path / "none.sock", {}, {}, timeout=1)


# --- egress ------------------------------------------------------------------------------

SHAPES = {"w": (2, 3), "b": (3,)}


def clean_arrays() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda a, m: a.update(leak=np.zeros(1, np.float32)),
         "arrays not in the task's model: ['leak']"),
        (lambda a, m: a.update(w=np.zeros((3, 2), np.float32)),
         "array 'w' has shape [3, 2], expected [2, 3]"),
        (lambda a, m: a.update(b=np.ones(3, np.float64)),
         "array 'b' is not a float32 numpy array"),
        (lambda a, m: a.pop("b"), "model arrays missing: ['b']"),
        (lambda a, m: m.update({"eval-loss": "0.31"}), "metric 'eval-loss' is not a number"),
        (lambda a, m: m.update({"eval-loss": True}), "metric 'eval-loss' is not a number"),
        # The loss on the training rows is not covered by DP-SGD: it never leaves.
        (lambda a, m: m.update({"train-loss": 0.31}),
         "metric 'train-loss' is not on the allow-list"),
        (lambda a, m: m.update({"patient-age": 54.0}),
         "metric 'patient-age' is not on the allow-list"),
        (lambda a, m: m.update({"eval-auc": math.nan}), "metric 'eval-auc' is not finite"),
        (lambda a, m: m.update({"eval-auc": math.inf}), "metric 'eval-auc' is not finite"),
    ],
)
def test_leaky_result_is_blocked_with_the_exact_problem(
    change: Callable[[dict[str, Any], dict[str, Any]], object], problem: str
) -> None:
    arrays: dict[str, Any] = clean_arrays()
    metrics: dict[str, Any] = {"num-examples": 100.0, "eval-loss": 0.5}
    change(arrays, metrics)
    with pytest.raises(EgressViolation) as info:
        check_outgoing(expected_shapes=SHAPES, arrays=arrays, metrics=metrics)
    assert info.value.problems == [problem]


def test_clean_result_passes_and_the_report_holds_no_values() -> None:
    metrics = {"num-examples": 123.0, "eval-loss": 0.4321, "epsilon-spent": 1.5}
    report = check_outgoing(expected_shapes=SHAPES, arrays=clean_arrays(), metrics=metrics)
    assert report.n_bytes == 6 * 4 + 3 * 4 + 8 * 3
    assert report.array_shapes == {"w": [2, 3], "b": [3]}
    assert report.metric_names == ["epsilon-spent", "eval-loss", "num-examples"]
    text = repr(report)
    assert "0.4321" not in text and "123" not in text


def test_evaluate_only_reply_without_arrays_passes() -> None:
    report = check_outgoing(expected_shapes=SHAPES, arrays={}, metrics={"eval-loss": 0.2})
    assert report.array_shapes == {} and report.n_bytes == 8


# --- warm trainer ------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    fed = write_demo_federation(task=TASK, out_dir=tmp_path_factory.mktemp("fed"), n_sites=2)
    site = fed.sites[0]
    return load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path))


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    return model_arrays(build_model(TASK, seed=0))


def task_config(round_number: int = 1, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        CFG.RUN_ID: "run-1", CFG.PROJECT: "oncology", CFG.TASK: TASK, CFG.ROUND: round_number,
        CFG.TOTAL_ROUNDS: 3, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: 1e-5,
        CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: True,
    }
    config.update(overrides)
    return config


def train_header(round_number: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"kind": "train", "config": task_config(round_number, **overrides)}


class Audit(list[tuple[str, dict[str, Any]]]):
    """Collects (action, detail) pairs; ``actions`` lists the actions in order."""

    def __call__(self, action: str, detail: dict[str, Any]) -> None:
        self.append((action, detail))

    @property
    def actions(self) -> list[str]:
        return [a for a, _ in self]


TrainerFactory = Callable[..., tuple[WarmTrainer, Audit]]


@pytest.fixture
def make_trainer(site_data: SiteData, tmp_path: Path) -> TrainerFactory:
    """A WarmTrainer on this test's site directory; each call is a fresh instance (a restart)."""

    def make(*, epsilon_cap: float | None = None) -> tuple[WarmTrainer, Audit]:
        audit = Audit()
        trainer = WarmTrainer(
            site_name="hospital-a", task=TASK, data=site_data,
            ledger=PrivacyLedger(tmp_path / "privacy-ledger.sqlite"),
            replies_dir=tmp_path / "replies", audit=audit, epsilon_cap=epsilon_cap,
        )
        return trainer, audit

    return make


def error_of(reply: dict[str, Any]) -> tuple[int, str]:
    return reply["error"]["code"], reply["error"]["reason"]


def test_train_task_returns_model_arrays_and_charges_the_ledger(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    trainer, audit = make_trainer()

    reply, out = trainer.handle(train_header(1), global_arrays)

    assert "error" not in reply
    assert {k: v.shape for k, v in out.items()} == array_shapes(build_model(TASK))
    assert all(v.dtype == np.float32 for v in out.values())
    assert any(not np.array_equal(out[k], global_arrays[k]) for k in out)
    metrics = reply["metrics"]
    assert 0 < metrics["epsilon-spent"] <= 3.0
    assert metrics["epsilon-round"] == pytest.approx(metrics["epsilon-spent"])
    assert metrics["num-examples"] == len(trainer.data.train_y)
    assert {"eval-loss", "eval-accuracy", "noise-multiplier"} <= set(metrics)
    assert "train-loss" not in metrics  # not covered by DP: it never leaves the site
    run = PrivacyLedger(tmp_path / "privacy-ledger.sqlite").get_run("run-1")
    assert run is not None and run.rounds[1].status == "charged"
    assert run.rounds[1].epsilon_after == pytest.approx(metrics["epsilon-spent"])
    assert audit.actions == ["round-reserved", "round-trained"]
    assert "epsilon_spent" in audit[-1][1] and "eval-loss" in audit[-1][1]["metrics"]


def test_same_task_again_is_answered_from_the_stored_reply_without_charging(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    trainer, _ = make_trainer()
    first, first_out = trainer.handle(train_header(1), global_arrays)
    ledger_file = tmp_path / "privacy-ledger.sqlite"
    ledger_before = ledger_file.read_bytes()

    restarted, audit = make_trainer()  # the site agent restarted between the two tasks
    again, again_out = restarted.handle(train_header(1), global_arrays)

    assert again == first
    assert again_out.keys() == first_out.keys()
    for name in first_out:
        np.testing.assert_array_equal(again_out[name], first_out[name])
    assert ledger_file.read_bytes() == ledger_before
    assert audit.actions == ["round-replayed"]


def test_a_reply_stored_by_an_older_agent_is_still_found_for_a_repeated_round(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Replies stored before the one wire digest name the global model by the site's old
    digest (names and bytes only); after an upgrade the repeated round must still be
    answered from them, not refused as trained with another model."""
    trainer, _ = make_trainer()
    first, _ = trainer.handle(train_header(1), global_arrays)
    meta_path, meta = next((path, json.loads(path.read_text()))
                           for path in (tmp_path / "replies").glob("*.json")
                           if "incoming" in json.loads(path.read_text()))
    old = hashlib.sha256()
    for name in sorted(global_arrays):
        old.update(name.encode())
        old.update(np.ascontiguousarray(global_arrays[name]).tobytes())
    del meta["digest"]
    meta["incoming"] = old.hexdigest()   # as the older agent wrote it
    meta_path.write_text(json.dumps(meta))

    restarted, audit = make_trainer()
    again, _ = restarted.handle(train_header(1), global_arrays)

    assert again == first
    assert audit.actions == ["round-replayed"]


def test_finished_round_with_another_global_model_is_refused_not_retrained(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    trainer, audit = make_trainer()
    trainer.handle(train_header(1), global_arrays)
    ledger_before = (tmp_path / "privacy-ledger.sqlite").read_bytes()
    other = {k: v + np.float32(0.01) for k, v in global_arrays.items()}

    reply, out = trainer.handle(train_header(1), other)

    code, reason = error_of(reply)
    assert code == SiteErrorCode.REFUSED_POLICY and out == {}
    assert "round 1 of run run-1 was already trained" in reason
    assert (tmp_path / "privacy-ledger.sqlite").read_bytes() == ledger_before
    assert audit.actions[-1] == "task-refused"


def test_restarted_trainer_keeps_accumulating_epsilon(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    first, _ = make_trainer()
    reply1, out1 = first.handle(train_header(1), global_arrays)

    restarted, _ = make_trainer()
    reply2, _ = restarted.handle(train_header(2), out1)

    eps1 = reply1["metrics"]["epsilon-spent"]
    eps2 = reply2["metrics"]["epsilon-spent"]
    assert eps2 > eps1
    # A fresh Opacus engine per round would report only this round's epsilon.
    assert reply2["metrics"]["epsilon-round"] < eps2
    assert eps2 - eps1 == pytest.approx(reply2["metrics"]["epsilon-round"])
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    assert ledger.epsilon_spent("run-1") == pytest.approx(eps2)
    assert len(ledger.history("run-1")) == 2


def test_cap_below_the_round_refuses_with_budget_code_and_leaves_the_ledger(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    first, _ = make_trainer()
    reply1, out1 = first.handle(train_header(1), global_arrays)
    ledger_file = tmp_path / "privacy-ledger.sqlite"
    before = ledger_file.read_bytes()

    capped, audit = make_trainer(epsilon_cap=reply1["metrics"]["epsilon-spent"] * 1.01)
    reply, out = capped.handle(train_header(2), out1)

    code, reason = error_of(reply)
    assert code == SiteErrorCode.REFUSED_BUDGET == 701 and out == {}
    assert reason.startswith("refused-budget: ")
    assert ledger_file.read_bytes() == before
    assert audit.actions == ["task-refused"]


def test_cap_on_a_new_run_refuses_before_any_round_is_charged(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    trainer, _ = make_trainer(epsilon_cap=0.01)
    reply, _ = trainer.handle(train_header(1), global_arrays)
    assert error_of(reply)[0] == SiteErrorCode.REFUSED_BUDGET
    # The run's whole plan was refused before the run was even opened in the ledger.
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    assert ledger.get_run("run-1") is None and ledger.site_epsilon() == 0.0


def test_task_for_another_task_name_is_refused_by_policy(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray]
) -> None:
    trainer, _ = make_trainer()
    reply, out = trainer.handle(train_header(1, **{CFG.TASK: "digits_cnn"}), global_arrays)
    code, reason = error_of(reply)
    assert code == SiteErrorCode.REFUSED_POLICY == 703 and out == {}
    assert "holds data for task 'breast_cancer_mlp', not 'digits_cnn'" in reason


@pytest.mark.parametrize(
    ("header", "arrays_ok", "reason"),
    [
        ({"kind": "train", "config": {k: v for k, v in task_config().items() if k != CFG.LR}},
         True, "bad-task: missing or bad 'learning-rate'"),
        (train_header(1, **{CFG.ROUND: "first"}), True, "bad-task: missing or bad"),
        (train_header(1, **{CFG.TASK: "no-such-task"}), True, "bad-task: "),
        ({"kind": "explode", "config": task_config()}, True, "bad-task: unknown kind 'explode'"),
        ({"kind": "train", "config": "not a dict"}, True, "bad-task: missing or bad"),
        (train_header(1), False, "the global model's arrays do not match the task"),
    ],
)
def test_malformed_task_is_answered_with_bad_task(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path,
    header: dict[str, Any], arrays_ok: bool, reason: str,
) -> None:
    trainer, audit = make_trainer()
    arrays = global_arrays if arrays_ok else {"w": np.zeros(3, np.float32)}
    reply, out = trainer.handle(header, arrays)
    code, got = error_of(reply)
    assert code == SiteErrorCode.BAD_TASK == 707 and out == {}
    assert reason in got
    assert audit.actions == ["task-refused"]
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    run = ledger.get_run("run-1")
    assert run is None or run.history == ()


def test_exception_in_training_leaves_its_type_phase_and_a_scrubbed_message(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    data_dir = tmp_path / "hospital-data"

    def boom(**_: object) -> None:
        raise ValueError(f"could not convert 'Jane Doe' to float: 123.456 in "
                         f"{data_dir / 'patients.csv'} (see /etc/fedward/x.conf)")

    monkeypatch.setattr(trainer_module, "train_dp", boom)
    trainer, audit = make_trainer()
    trainer.data_dir = data_dir
    reply, out = trainer.handle(train_header(1), global_arrays)
    code, reason = error_of(reply)
    assert code == SiteErrorCode.TASK_FAILED == 705 and out == {}
    assert reason == ("task-failed: ValueError during train (phase train): could not convert "
                      "<text> to float: <n> in <hospital-data> (see <path>)")
    for secret in ("123.456", "Jane", "patients.csv", "/etc", str(tmp_path)):
        assert secret not in json.dumps(list(audit)) and secret not in reason
    assert audit[-1] == ("task-failed", {"run": "run-1", "round": 1, "error": "ValueError",
                                         "phase": "train", "reason": reason})


@pytest.mark.parametrize(("target", "phase"), [
    ("_eval_metrics", "evaluate"), ("noise_multiplier_after", "privacy"),
    ("set_model_arrays", "model"), ("model_arrays", "egress")])
def test_a_failure_names_the_phase_it_happened_in(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch, target: str, phase: str,
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("failed")

    trainer, _ = make_trainer()
    if hasattr(trainer_module, target):
        monkeypatch.setattr(trainer_module, target, boom)
    else:
        monkeypatch.setattr(trainer, target, boom)
    fresh = {CFG.RUN_ID: f"run-{phase}", CFG.EPSILON: 2.47}   # nothing cached or opened
    _, reason = error_of(trainer.handle(train_header(1, **fresh), global_arrays)[0])
    assert reason == f"task-failed: RuntimeError during train (phase {phase}): failed"


def test_scrub_keeps_the_shape_of_a_message_and_drops_values_and_paths() -> None:
    from site_agent.diagnostics import MAX_MESSAGE, scrub

    data = Path("/srv/site/data")
    assert scrub("mat1 and mat2 shapes cannot be multiplied (64x30 and 31x16)") == \
        "mat1 and mat2 shapes cannot be multiplied (<n> and <n>)"
    assert scrub("[Errno 2] No such file or directory: '/srv/site/data/a b.csv'",
                 data_dir=data) == "[Errno <n>] No such file or directory: <data>"
    assert scrub("value -1.5e-3 at C:\\x\\y.csv, `rm` and \"x\"") == \
        "value <n> at <path>, <text> and <text>"
    assert scrub("float32 in fc1 failed\nTraceback: 42") == "float32 in fc1 failed"
    assert len(scrub("a " * 500)) == MAX_MESSAGE
    assert scrub("") == ""


def test_leaky_training_output_is_blocked_by_the_egress_guard(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = trainer_module.model_arrays

    def leaky(model: torch.nn.Module) -> dict[str, np.ndarray]:
        return {**real(model), "leak": np.zeros(4, np.float32)}

    monkeypatch.setattr(trainer_module, "model_arrays", leaky)
    trainer, audit = make_trainer()
    reply, out = trainer.handle(train_header(1), global_arrays)
    code, reason = error_of(reply)
    assert code == SiteErrorCode.EGRESS_BLOCKED == 706 and out == {}
    assert "arrays not in the task's model: ['leak']" in reason
    assert audit[-1][0] == "egress-blocked"
    assert audit[-1][1]["problems"] == ["arrays not in the task's model: ['leak']"]


@pytest.mark.parametrize("leak", ["metric", "fingerprint", "reply-part", "evaluate-arrays"])
def test_every_kind_of_leak_is_blocked_where_the_answer_is_handed_back(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch, leak: str,
) -> None:
    trainer, audit = make_trainer()
    kind = "evaluate" if leak == "evaluate-arrays" else "train"
    if leak == "metric":
        real_metrics = trainer_module.finite_metrics
        monkeypatch.setattr(trainer_module, "finite_metrics",
                            lambda m: {**real_metrics(m), "mean-age": 61.0})
        expected = "metric 'mean-age' is not on the allow-list"
    elif leak == "fingerprint":
        real_fp = trainer._fingerprint
        monkeypatch.setattr(trainer, "_fingerprint",
                            lambda: {**real_fp(), "n-rows": "Jane Doe, 1961-02-03"})
        expected = "fingerprint field 'n-rows' is not in its fixed format"
    else:
        real_handle = trainer._handle

        def leaky_handle(header: dict[str, Any], arrays: dict[str, np.ndarray]
                         ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            reply, out = real_handle(header, arrays)
            if leak == "reply-part":
                return {**reply, "notes": "patient 17 is Jane Doe"}, out
            return reply, {"net.0.weight": global_arrays["net.0.weight"]}

        monkeypatch.setattr(trainer, "_handle", leaky_handle)
        expected = ("reply parts not on the allow-list: ['notes']" if leak == "reply-part"
                    else "arrays not in the task's model: ['net.0.weight']")
    header = train_header(1) if kind == "train" else {"kind": "evaluate",
                                                      "config": task_config()}
    reply, out = trainer.handle(header, global_arrays)
    code, reason = error_of(reply)
    assert code == SiteErrorCode.EGRESS_BLOCKED and out == {}
    assert expected in reason
    assert audit[-1][0] == "egress-blocked" and expected in audit[-1][1]["problems"]
    assert "Jane" not in json.dumps(list(audit))


def test_what_left_the_site_in_a_round_includes_its_text_fields(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray],
) -> None:
    trainer, audit = make_trainer()
    reply, out = trainer.handle(train_header(1), global_arrays)
    assert "error" not in reply
    trained = dict(audit)["round-trained"]
    # This site's data was loaded without a fingerprint key: no digest of the file leaves.
    assert trained["text"] == ["fingerprint.n-rows", "fingerprint.n-test",
                               "fingerprint.n-train", "fingerprint.schema-hash"]
    arrays_bytes = sum(a.nbytes for a in out.values())
    text_bytes = sum(len(v) for v in reply["fingerprint"].values())
    assert trained["bytes_out"] == arrays_bytes + 8 * len(reply["metrics"]) + text_bytes


def test_evaluate_task_returns_metrics_only_and_charges_nothing(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    trainer, audit = make_trainer()
    reply, out = trainer.handle({"kind": "evaluate", "config": task_config()}, global_arrays)
    assert out == {}
    assert reply["metrics"]["num-eval-examples"] == len(trainer.data.test_y)
    assert 0.0 <= reply["metrics"]["eval-accuracy"] <= 1.0
    assert audit.actions == ["evaluated"]
    assert not (tmp_path / "privacy-ledger.sqlite").exists()


@pytest.fixture
def short_socket_dir() -> Iterator[Path]:
    """AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_trainer_server_answers_over_a_unix_socket(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], short_socket_dir: Path
) -> None:
    trainer, _ = make_trainer()
    sock_path = short_socket_dir / "run" / "trainer.sock"
    server = TrainerServer(path=sock_path, trainer=trainer)
    server.start()
    try:
        assert sock_path.stat().st_mode & 0o777 == 0o600
        assert sock_path.parent.stat().st_mode & 0o777 == 0o700
        reply, out = request(sock_path, {"kind": "evaluate", "config": task_config()},
                             global_arrays, timeout=30)
        assert out == {} and reply["metrics"]["num-eval-examples"] > 0
        reply, out = request(sock_path, {"kind": "nope", "config": {}}, {}, timeout=30)
        assert reply["error"]["code"] == SiteErrorCode.BAD_TASK and out == {}
    finally:
        server.stop()
    assert not sock_path.exists()


# --- config ------------------------------------------------------------------------------


def valid_config() -> dict[str, Any]:
    return {"name": "hospital-a", "superlink": "coord.example:9092", "ca_cert": "ca.pem",
            "data_path": "data.csv", "schema_path": "schema.json"}


def test_config_reports_every_problem_at_once() -> None:
    raw = {**valid_config(), "name": "Hospital_A", "superlink": "coord.example",
           "colour": "blue", "torch_threads": 0}
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_dict(raw, source="site.json")
    text = str(info.value)
    assert text.startswith("site.json is invalid:")
    assert "unknown keys ['colour']" in text
    assert "name 'Hospital_A' must be 3-40 characters" in text
    assert "superlink 'coord.example' must be host:port" in text
    assert "torch_threads must be an integer from 1 to 64" in text
    assert text.count("\n  - ") == 4


def test_the_task_content_wait_is_bounded_and_written_only_when_set(tmp_path: Path) -> None:
    for bad in (0, 7201, True, "30"):
        with pytest.raises(ConfigError, match="task_content_wait_s must be a number of "
                                              "seconds from 1 to 7200"):
            SiteConfig.from_dict({**valid_config(), "task_content_wait_s": bad})
    default = SiteConfig.from_dict(valid_config())
    assert default.task_content_wait_s == 30.0
    default.save(tmp_path / "a")
    assert "task_content_wait_s" not in (tmp_path / "a" / "site.json").read_text()
    slow = SiteConfig.from_dict({**valid_config(), "task_content_wait_s": 120})
    slow.save(tmp_path / "b")
    assert SiteConfig.load(tmp_path / "b").task_content_wait_s == 120.0


def test_config_requires_its_paths() -> None:
    with pytest.raises(ConfigError, match="'ca_cert' is required"):
        SiteConfig.from_dict({k: v for k, v in valid_config().items() if k != "ca_cert"})


def test_config_save_and_load_round_trip(tmp_path: Path) -> None:
    config = SiteConfig.from_dict({**valid_config(), "torch_threads": 2,
                                   "reconnect_backoff_s": 70})
    path = config.save(tmp_path / "site")
    assert path == tmp_path / "site" / "site.json"
    assert SiteConfig.load(tmp_path / "site") == config
    assert config.resolve(tmp_path, "data.csv") == tmp_path / "data.csv"
    assert config.resolve(tmp_path, "/abs/data.csv") == Path("/abs/data.csv")


def test_config_load_explains_a_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `fedward-site init"):
        SiteConfig.load(tmp_path)
    (tmp_path / "site.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        SiteConfig.load(tmp_path)


# --- agent helpers -----------------------------------------------------------------------


def test_flower_exit_code_reads_the_code_logged_after_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_bytes(b"old run\nExit Code: 302\n")
    offset = log.stat().st_size
    with log.open("ab") as fh:
        fh.write(b"INFO starting\nERROR refused\nExit Code: 305\nbye\n")

    assert flower_exit_code(log, 1, since=offset) == 305
    assert flower_exit_code(log, 1) == 305  # the last one wins
    log.write_bytes(b"old run\nExit Code: 302\nnothing new\n")
    assert flower_exit_code(log, 1, since=offset) == 1
    assert flower_exit_code(tmp_path / "missing.log", 9) == 9


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(trusted CA cert, server cert, server key, unrelated CA cert)."""
    files = ensure_ca(tmp_path_factory.mktemp("pki"))
    issue_server_cert(files)
    other = ensure_ca(tmp_path_factory.mktemp("other-pki"))
    return files.ca_cert, files.server_cert, files.server_key, other.ca_cert


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_of_a_closed_port_says_not_reachable(two_cas: tuple[Path, ...]) -> None:
    address = f"127.0.0.1:{free_port()}"
    problem = probe_coordinator(address, two_cas[0], timeout=2)
    assert problem is not None
    assert problem.startswith(f"the coordinator at {address} is not reachable")


def test_probe_with_an_unreadable_ca_says_so(tmp_path: Path) -> None:
    problem = probe_coordinator("127.0.0.1:1", tmp_path / "no-ca.pem")
    assert problem is not None and "cannot read the coordinator CA certificate" in problem


def test_probe_accepts_a_trusted_server_and_names_an_untrusted_one(
    two_cas: tuple[Path, Path, Path, Path],
) -> None:
    ca, cert, key, other_ca = two_cas
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the test failed before connecting; its assertion says why
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the untrusting client aborts the handshake

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        assert probe_coordinator(f"127.0.0.1:{port}", ca, timeout=5) is None
        problem = probe_coordinator(f"127.0.0.1:{port}", other_ca, timeout=5)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert problem is not None
    assert "presented a certificate the site's CA does not trust" in problem


# --- clientapp ---------------------------------------------------------------------------


def test_clientapp_import_does_not_import_torch() -> None:
    code = ("import sys, site_agent.clientapp\n"
            "heavy = sorted(m for m in ('torch', 'opacus', 'sklearn') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_a_site_runs_only_the_appliances_own_app_bundle() -> None:
    import io
    import zipfile

    from flwr.supercore.fab import Fab

    from fedward.flower.fab import UnknownBundleError, app_bundle, check_bundle

    own, digest = app_bundle()
    check_bundle(Fab(digest, own, {}))  # the appliance's own bundle passes

    def rewritten(old: str, new: str) -> Fab:
        src = zipfile.ZipFile(io.BytesIO(own))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == "pyproject.toml":
                    data = data.replace(old.encode(), new.encode())
                dst.writestr(item, data)
        return Fab("x", out.getvalue(), {})

    with pytest.raises(UnknownBundleError, match="runs only code installed"):
        check_bundle(rewritten("site_agent.clientapp:app", "evil.module:app"))
    with pytest.raises(UnknownBundleError, match="runs only code installed"):
        check_bundle(rewritten('publisher = "fedward"', 'publisher = "someone"'))
    with pytest.raises(UnknownBundleError, match="unreadable app bundle"):
        check_bundle(Fab("x", b"not a zip", {}))


def test_the_relay_routes_an_admission_question_to_the_trainer_without_arrays(
    make_trainer: TrainerFactory, short_socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedward.wire import ADMISSION_MESSAGE_TYPE, MSG, REPLY_CONFIG, TASK_CONFIG
    from site_agent.clientapp import SOCKET_KEY
    from site_agent.clientapp import app as relay

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 4242)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    trainer, audit = make_trainer()  # no site gate: every run is accepted
    sock_path = short_socket_dir / "run" / "trainer.sock"
    server = TrainerServer(path=sock_path, trainer=trainer)
    server.start()
    try:
        question = Message(content=RecordDict({TASK_CONFIG: ConfigRecord(
            {k: v for k, v in task_config(0).items()})}), dst_node_id=7,
            message_type=ADMISSION_MESSAGE_TYPE)
        question.metadata.__dict__["_message_id"] = "m-1"
        context = Context(run_id=4242, node_id=7, node_config={SOCKET_KEY: str(sock_path)},
                          state=RecordDict(), run_config={})
        reply = relay(question, context)
    finally:
        server.stop()
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == "m-1"
    assert dict(reply.content.config_records[REPLY_CONFIG]) == {MSG.STATUS: MSG.ACCEPTED}
    assert not reply.content.array_records
    assert audit.actions == ["admission-accepted"]


def test_the_relay_unpacks_a_packed_model_and_packs_the_reply_in_its_order(
    make_trainer: TrainerFactory, short_socket_dir: Path, monkeypatch: pytest.MonkeyPatch,
    global_arrays: dict[str, np.ndarray],
) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedward.wire import (
        CFG,
        PACKED,
        REPLY_ARRAYS,
        TASK_ARRAYS,
        TASK_CONFIG,
        pack_arrays,
        parse_layout,
        unpack_arrays,
    )
    from site_agent.clientapp import SOCKET_KEY
    from site_agent.clientapp import app as relay

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 4242)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    trainer, audit = make_trainer()
    # Reverse the model's own order: the reply must follow the task's layout, not the model's.
    ordered = dict(reversed(list(global_arrays.items())))
    flat, layout = pack_arrays(ordered)
    sock_path = short_socket_dir / "run" / "trainer.sock"
    server = TrainerServer(path=sock_path, trainer=trainer)
    server.start()
    try:
        task = Message(content=RecordDict({
            TASK_ARRAYS: ArrayRecord({PACKED: Array(flat)}),
            TASK_CONFIG: ConfigRecord({**task_config(1), CFG.LAYOUT: layout})}),
            dst_node_id=7, message_type=MessageType.TRAIN)
        task.metadata.__dict__["_message_id"] = "m-2"
        context = Context(run_id=4242, node_id=7, node_config={SOCKET_KEY: str(sock_path)},
                          state=RecordDict(), run_config={})
        reply = relay(task, context)
    finally:
        server.stop()
    assert not reply.has_error(), reply.error
    record = reply.content.array_records[REPLY_ARRAYS]
    assert list(record) == [PACKED]
    out = unpack_arrays(record[PACKED].numpy(), parse_layout(layout))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ordered.items()}
    assert any(not np.array_equal(out[k], ordered[k]) for k in out)   # it trained
    assert audit.actions == ["round-reserved", "round-trained"]


def _idle(trainer: WarmTrainer) -> None:
    """Wait for the trainer's background privacy warm-up to finish."""
    assert trainer._warm_lock.acquire(timeout=120)
    trainer._warm_lock.release()


def test_after_a_round_the_next_rounds_accounting_is_ready_before_it_comes(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray]
) -> None:
    from privacy.accounting import _pld_epsilon

    no_warm_ups_left()
    trainer, _ = make_trainer()
    # A budget no other test uses (nothing cached before), and round 2 the last one, so
    # that no warm-up for a round 3 runs while round 2's misses are counted.
    fresh = {CFG.EPSILON: 2.718, CFG.TOTAL_ROUNDS: 2}
    reply, out = trainer.handle(train_header(1, **fresh), global_arrays)
    assert "error" not in reply
    _idle(trainer)
    misses = _pld_epsilon.cache_info().misses
    reply, _ = trainer.handle(train_header(2, **fresh), out)
    assert "error" not in reply
    assert _pld_epsilon.cache_info().misses == misses   # round 2 computed no new epsilon


def test_an_accepted_admission_starts_the_runs_noise_search_ahead_of_round_one(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray]
) -> None:
    from privacy.accounting import _pld_epsilon
    from privacy.dp import _search_noise_ledger as _search_noise

    no_warm_ups_left()
    trainer, _ = make_trainer()
    # One round: no warm-up for a round 2 runs while round 1's misses are counted.
    fresh = {CFG.EPSILON: 2.903, CFG.RUN_ID: "run-admitted", CFG.TOTAL_ROUNDS: 1}
    reply, _ = trainer.handle({"kind": "admission", "config": task_config(0, **fresh)}, {})
    assert "error" not in reply
    _idle(trainer)
    searches, epsilons = _search_noise.cache_info().misses, _pld_epsilon.cache_info().misses
    reply, _ = trainer.handle(train_header(1, **fresh), global_arrays)
    assert "error" not in reply
    assert _search_noise.cache_info().misses == searches
    assert _pld_epsilon.cache_info().misses == epsilons


def test_the_warm_executor_asks_for_tasks_less_often_once_idle() -> None:
    from site_agent.warm_executor import WarmExecutor

    executor = WarmExecutor(runtime_address="unix:/nonexistent", app=None,  # type: ignore[arg-type]
                            poll_s=0.05, idle_poll_s=0.5, idle_after_s=30.0)
    start = executor.active_at
    assert executor.wait_after_empty_ask(start + 1.0) == 0.05
    assert executor.wait_after_empty_ask(start + 29.0) == 0.05
    assert executor.wait_after_empty_ask(start + 31.0) == 0.5
    executor.active_at = start + 40.0  # a task was taken or finished
    assert executor.wait_after_empty_ask(start + 41.0) == 0.05


def test_a_second_agent_is_refused_before_its_slow_imports(tmp_path: Path) -> None:
    from site_agent.config import SitePaths
    from site_agent.site_lock import LOCKED_EXIT, hold_site_lock

    fd = hold_site_lock(SitePaths(tmp_path))     # the "first agent": this test process
    try:
        code = ("import sys\nfrom typer.testing import CliRunner\n"
                "from site_agent.cli import app\n"
                f"r = CliRunner().invoke(app, ['start', '--dir', {str(tmp_path)!r}])\n"
                "print(r.exit_code, 'torch' in sys.modules, 'flwr' in sys.modules)\n"
                "print(r.output)")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, check=False)
    finally:
        os.close(fd)
    first, _, output = res.stdout.partition("\n")
    # Refused with the holder's PID, before torch or Flower was imported.
    assert first == f"{LOCKED_EXIT} False False", res.stdout + res.stderr
    assert f"another site agent (pid {os.getpid()}) is already running" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.lock"]
