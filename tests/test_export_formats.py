"""Tests of export.onnx_export and export.parity: ONNX, ONNX Runtime INT8, OpenVINO IR."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from opacus import GradSampleModule
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn
from torch.nn import functional as F

from export.bundle_format import ArtefactFormat
from export.onnx_export import (
    UnsupportedModelError,
    export_onnx,
    export_onnx_int8,
    export_openvino,
)
from export.parity import ParityReport, load_session, parity_report
from fedward.tasks import build_model, get_task

# torch 2.13's ONNX exporter deep-copies a pytree spec and trips its own deprecation shim;
# harmless, and not ours to fix. Everything else stays an error.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)

TASK_NAMES = ("breast_cancer_mlp", "digits_cnn")


def _features(task: str) -> np.ndarray:
    loader = load_breast_cancer if task == "breast_cancer_mlp" else load_digits
    return np.asarray(loader().data, dtype=np.float32)


@dataclass
class Exported:
    """One model and its artefacts in every format."""

    task: str
    model: nn.Module
    onnx: Path
    openvino: Path
    features: np.ndarray


@pytest.fixture(scope="module", params=TASK_NAMES)
def exported(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Exported:
    task: str = request.param
    model = build_model(task, seed=0)
    out = tmp_path_factory.mktemp(task)
    onnx_path = export_onnx(model=model, task=task, out_dir=out)
    xml = export_openvino(onnx_path=onnx_path, out_dir=out)
    return Exported(task=task, model=model, onnx=onnx_path, openvino=xml,
                    features=_features(task))


@pytest.fixture(scope="module")
def trained_mlp() -> tuple[nn.Module, np.ndarray]:
    """A breast-cancer MLP trained for a moment, so that its classes are not all one."""
    data = load_breast_cancer()
    x = torch.from_numpy(np.asarray(data.data, dtype=np.float32))
    y = torch.from_numpy(np.asarray(data.target, dtype=np.int64))
    model = build_model("breast_cancer_mlp", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x.numpy()


def test_onnx_is_one_self_contained_file_that_passes_the_full_check(exported: Exported) -> None:
    assert sorted(p.name for p in exported.onnx.parent.glob("model.onnx*")) == ["model.onnx"]
    onnx.checker.check_model(str(exported.onnx), full_check=True)
    proto = onnx.load(str(exported.onnx))
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in proto.graph.initializer)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("features", "logits")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == get_task(exported.task).n_features
    # No build-machine file paths inside a release artefact.
    assert not any(p.key == "pkg.torch.onnx.stack_trace"
                   for n in proto.graph.node for p in n.metadata_props)
    assert {p.key: p.value for p in proto.metadata_props}["fedward.task"] == exported.task


@pytest.mark.parametrize("batch", [1, 64])
def test_dynamic_batch(exported: Exported, batch: int) -> None:
    spec = get_task(exported.task)
    predict = load_session("onnx", exported.onnx)
    assert predict.n_features == spec.n_features
    x = np.random.default_rng(batch).uniform(0, 16, size=(batch, spec.n_features))
    assert predict(x.astype(np.float32)).shape == (batch, spec.n_classes)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_parity_with_torch(exported: Exported, fmt: ArtefactFormat) -> None:
    path = exported.onnx if fmt == "onnx" else exported.openvino
    report = parity_report(torch_model=exported.model, artefact_path=path, fmt=fmt,
                           features=exported.features)
    assert report.n == len(exported.features)
    assert report.max_abs_diff < 1e-4, report
    assert report.agreement == 1.0
    assert report.passes(max_abs_diff=1e-4, min_agreement=1.0)
    assert set(report.to_dict()) == {"fmt", "max_abs_diff", "agreement", "n"}


def test_openvino_ir_keeps_f32_weights(exported: Exported) -> None:
    xml = exported.openvino.read_text()
    assert exported.openvino.with_suffix(".bin").is_file()
    assert 'element_type="f16"' not in xml


def test_openvino_never_phones_home(exported: Exported, tmp_path: Path) -> None:
    # A fresh process with an empty HOME: OpenVINO's telemetry would write ~/intel.
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        from export.onnx_export import export_openvino
        from export.parity import load_session
        xml = export_openvino(onnx_path=Path({str(exported.onnx)!r}), out_dir=Path("ov"))
        load_session("openvino", xml)(np.zeros((1, {exported.features.shape[1]}), np.float32))
        assert sys.modules.get("openvino_telemetry") is None
    """)
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "intel").exists()


def test_parity_report_restores_train_mode_and_refuses_bad_features(
        exported: Exported) -> None:
    exported.model.train()
    parity_report(torch_model=exported.model, artefact_path=exported.onnx, fmt="onnx",
                  features=exported.features[:5])
    assert exported.model.training
    bad = exported.features[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        parity_report(torch_model=exported.model, artefact_path=exported.onnx, fmt="onnx",
                      features=bad)
    with pytest.raises(ValueError, match="2-D"):
        parity_report(torch_model=exported.model, artefact_path=exported.onnx, fmt="onnx",
                      features=exported.features[0])


def test_a_nan_figure_never_passes() -> None:
    assert not ParityReport("onnx", float("nan"), 1.0, 10).passes(max_abs_diff=1.0,
                                                                  min_agreement=0.0)


@pytest.mark.parametrize("calibrate", [False, True], ids=["dynamic", "static-qdq"])
def test_int8_breast_cancer(trained_mlp: tuple[nn.Module, np.ndarray], calibrate: bool,
                            tmp_path: Path) -> None:
    model, x = trained_mlp
    onnx_path = export_onnx(model=model, task="breast_cancer_mlp", out_dir=tmp_path)
    # Calibration rows stand in for a public reference set: the first 100 rows.
    q = export_onnx_int8(onnx_path=onnx_path, out_dir=tmp_path,
                         calibration=x[:100] if calibrate else None)
    assert q.name == "model.int8.onnx"
    report = parity_report(torch_model=model, artefact_path=q, fmt="onnx-int8", features=x)
    assert report.agreement >= 0.9, report
    if not calibrate:
        # Static QDQ adds quantize/dequantize nodes that outweigh 266 parameters.
        assert q.stat().st_size < onnx_path.stat().st_size


def test_int8_digits_is_much_smaller(tmp_path: Path) -> None:
    model = build_model("digits_cnn", seed=0)
    onnx_path = export_onnx(model=model, task="digits_cnn", out_dir=tmp_path)
    q = export_onnx_int8(onnx_path=onnx_path, out_dir=tmp_path, calibration=None)
    assert q.stat().st_size < 0.7 * onnx_path.stat().st_size
    report = parity_report(torch_model=model, artefact_path=q, fmt="onnx-int8",
                           features=_features("digits_cnn"))
    assert report.agreement >= 0.9


class _Eigen(nn.Module):
    """Uses an operator (linalg_eig) that has no ONNX translation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(30, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = self.lin(x).reshape(-1, 5, 6)[:, :, :5]
        out: torch.Tensor = torch.linalg.eigvals(square).real[:, :2]
        return out


class _NeedsMode(nn.Module):
    """Its forward takes a non-tensor argument as well."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(30, 2)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out if mode == "a" else -out


class _ReturnsTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(30, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


@pytest.mark.parametrize(("factory", "reason_part"), [
    (_Eigen, "the ONNX exporter rejected the model: DispatchError: No ONNX function found "
             "for <OpOverload(op='aten.linalg_eig'"),
    (_NeedsMode, "the model's forward must take one float32 tensor (batch, 30): TypeError:"),
    (_ReturnsTuple, "the model's forward returns tuple, expected one tensor of logits"),
])
def test_unsupported_models_are_refused_with_a_reason(
        factory: Callable[[], nn.Module], reason_part: str, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        export_onnx(model=factory(), task="breast_cancer_mlp", out_dir=tmp_path)
    assert info.value.reason.startswith(reason_part), info.value.reason
    assert not (tmp_path / "model.onnx").exists()


def test_opacus_wrapped_model_exports_as_the_plain_one(tmp_path: Path) -> None:
    plain = build_model("breast_cancer_mlp", seed=0)
    wrapped = GradSampleModule(build_model("breast_cancer_mlp", seed=0))
    assert next(iter(wrapped.state_dict())).startswith("_module.")
    a = onnx.load(str(export_onnx(model=plain, task="breast_cancer_mlp",
                                  out_dir=tmp_path / "plain")))
    b = onnx.load(str(export_onnx(model=wrapped, task="breast_cancer_mlp",
                                  out_dir=tmp_path / "wrapped")))
    assert wrapped.training  # the caller's mode is left alone

    def weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}

    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb) and not any(k.startswith("_module") for k in wb)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
