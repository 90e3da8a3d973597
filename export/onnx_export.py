"""Export trained models to ONNX, ONNX Runtime INT8 and OpenVINO IR.

Every exporter writes the standard file names of :data:`export.bundle_format.ARTEFACT_FILES`
into ``out_dir`` and returns the main file's path.

* ONNX: torch's dynamo exporter with a dynamic batch dimension. torch writes the weights
  to a separate ``.onnx.data`` file by default; these models are tiny, so
  :func:`export_onnx` keeps ONE self-contained ``model.onnx`` (weights inside), which is
  simpler to sign, ship and load from bytes. The file passes ``onnx.checker``'s full
  check. Per-node source stack traces that torch records are stripped: they hold the
  exporting machine's file paths and make the artefact differ from machine to machine.
* INT8: ``onnxruntime.quantization``; dynamic (weights only) without calibration data,
  static QDQ with it.
* OpenVINO IR: ``openvino.convert_model`` on the ONNX file, saved as an ``.xml``/``.bin``
  pair with f32 weights (``compress_to_fp16=False``). OpenVINO is imported through
  :func:`export.parity.import_openvino`, which keeps its telemetry (usage events sent to
  Google Analytics by default) off: the appliance never phones home.

Known noise: torch 2.13's exporter emits a ``FutureWarning`` ("`isinstance(treespec,
LeafSpec)` is deprecated") from its own pytree code and logs that torchvision is missing;
onnxruntime's quantizer logs "Please consider to run pre-processing before quantization".
All harmless. Tests run with warnings as errors and ignore that one warning by message;
:func:`quiet_exporters` keeps all of it out of a site agent's log, read by hospital IT.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.bundle_format import ARTEFACT_FILES
from export.parity import import_openvino
from fedward.tasks import TaskRef, get_task

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "UnsupportedModelError",
    "export_onnx",
    "export_onnx_int8",
    "export_openvino",
    "quiet_exporters",
    "unwrap_model",
]

INPUT_NAME = "features"  # (batch, n_features) float32, raw values as the sites hold them
OUTPUT_NAME = "logits"   # (batch, n_classes) float32
_STRIPPED_METADATA = frozenset({"pkg.torch.onnx.stack_trace"})


# Loggers of the exporters' progress notes ("torchvision is not installed", "No unused
# functions to remove", ...): nothing anyone running the appliance can act on.
_CHATTY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class _QuantizerNotes(logging.Filter):
    """Drops what onnxruntime's quantizer logs on the root logger (its "consider running
    pre-processing" advice and per-tensor notes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/onnxruntime/quantization/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Keep the exporters' known, harmless notes out of the log while exporting.

    Errors still show; only notes and warnings of the exporters themselves are held back.
    """
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    quantizer = _QuantizerNotes()
    root = logging.getLogger()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    root.addFilter(quantizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is "
                                    "deprecated", category=FutureWarning)
            yield
    finally:
        root.removeFilter(quantizer)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class UnsupportedModelError(ValueError):
    """A model cannot be exported; :attr:`reason` says why, in one line.

    Attributes:
        reason: What the exporter or the pre-export check rejected.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain model inside an Opacus ``GradSampleModule`` (or ``model`` itself).

    Args:
        model: A model, possibly wrapped by Opacus (its state_dict keys then start with
            ``_module.``).

    Returns:
        The wrapped module, which is what gets exported and shipped.
    """
    inner = getattr(model, "_module", model)
    if not isinstance(inner, nn.Module):
        raise UnsupportedModelError(f"not a torch module: {type(inner).__name__}")
    return inner


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line: the part of an exporter error a person can act on."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    lines = str(seen).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(seen).__name__}: {first}"[:500]


def export_onnx(*, model: nn.Module, task: TaskRef, out_dir: Path) -> Path:
    """Export ``model`` to one self-contained ONNX file with a dynamic batch dimension.

    Args:
        model: The trained model (an Opacus wrapper is unwrapped). Its train/eval mode is
            restored afterwards.
        task: The task (its name, or a study's task); fixes the input width
            (``n_features``) and output width.
        out_dir: Folder to write ``model.onnx`` into (created if missing).

    Returns:
        Path of ``model.onnx``.

    Raises:
        UnsupportedModelError: The model's forward does not take one float32 tensor
            (batch, n_features) and return logits (batch, n_classes), the exporter
            rejected it (an operator without an ONNX translation, data-dependent control
            flow), or the result fails ``onnx.checker``'s full check.
        UnknownTaskError: ``task`` is not registered.
    """
    spec = get_task(task)
    inner = unwrap_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ARTEFACT_FILES["onnx"][0]
    # Batch 2, not 1: torch.export specialises a dimension traced at size 1.
    example = torch.zeros((2, spec.n_features), dtype=torch.float32)
    was_training = inner.training
    inner.eval()
    try:
        _check_forward(inner, example, spec.n_classes)
        try:
            program = torch.onnx.export(
                inner,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        except torch.onnx.OnnxExporterError as exc:
            raise UnsupportedModelError(
                f"the ONNX exporter rejected the model: {_root_cause(exc)}"
            ) from exc
    finally:
        inner.train(was_training)
    if program is None:  # only the legacy exporter returns None
        raise UnsupportedModelError("the ONNX exporter returned no program")
    proto = program.model_proto
    _strip_metadata(proto)
    proto.metadata_props.add(key="fedward.task", value=spec.name)
    _check_io(proto, spec.n_features)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        path.unlink(missing_ok=True)
        raise UnsupportedModelError(f"exported model fails the ONNX checker: "
                                    f"{_root_cause(exc)}") from exc
    return path


def _check_forward(model: nn.Module, example: torch.Tensor, n_classes: int) -> None:
    """Run the model once eagerly: a clear reason beats a page of exporter trace."""
    n_features = example.shape[1]
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model's forward must take one float32 tensor (batch, {n_features}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"the model's forward returns {type(out).__name__}, "
                                    "expected one tensor of logits")
    expected = (example.shape[0], n_classes)
    if tuple(out.shape) != expected or out.dtype != torch.float32:
        raise UnsupportedModelError(
            f"the model's forward returns {out.dtype} {tuple(out.shape)}, expected float32 "
            f"logits (batch, {n_classes})"
        )


def _strip_metadata(proto: onnx.ModelProto) -> None:
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    for node in nodes:
        keep = [p for p in node.metadata_props if p.key not in _STRIPPED_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def _check_io(proto: onnx.ModelProto, n_features: int) -> None:
    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedModelError(f"exported graph has {len(inputs)} inputs and "
                                    f"{len(outputs)} outputs, expected one of each")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[0].dim_param or dims[1].dim_value != n_features:
        raise UnsupportedModelError(f"exported input is not (batch, {n_features}) with a "
                                    "dynamic batch")


class _Calibration:
    """Feeds calibration rows to onnxruntime's static quantizer, 64 at a time.

    onnxruntime's ``CalibrationDataReader`` recognises any object with ``get_next`` (its
    ``__subclasshook__``), so no subclassing of that untyped class is needed.
    """

    def __init__(self, input_name: str, rows: np.ndarray) -> None:
        self._batches = iter([{input_name: rows[i:i + 64]} for i in range(0, len(rows), 64)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self) -> _Calibration:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def export_onnx_int8(*, onnx_path: Path, out_dir: Path,
                     calibration: np.ndarray | None) -> Path:
    """Quantize an ONNX model to INT8 with ONNX Runtime.

    Without calibration data the weights are quantized ahead of time and activations at
    run time (dynamic). With it, activations get fixed scales from the calibration rows
    and the model is written in QDQ format (static).

    Calibration data is read at the coordinator, so it must be data the coordinator may
    hold (a public reference set, or synthetic rows within the published feature ranges),
    never site records.

    Args:
        onnx_path: The fp32 ONNX file from :func:`export_onnx`.
        out_dir: Folder to write ``model.int8.onnx`` into (created if missing).
        calibration: Raw feature rows (n, n_features), finite, or None for dynamic.

    Returns:
        Path of ``model.int8.onnx``.

    Raises:
        ValueError: Calibration rows that are empty, not 2-D or not finite.
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / ARTEFACT_FILES["onnx-int8"][0]
    if calibration is None:
        quantize_dynamic(Path(onnx_path), out, weight_type=QuantType.QInt8)
    else:
        rows = np.ascontiguousarray(calibration, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] == 0 or not np.isfinite(rows).all():
            raise ValueError("calibration must be finite rows of shape (n >= 1, n_features)")
        input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
        quantize_static(Path(onnx_path), out, _Calibration(input_name, rows),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    onnx.checker.check_model(str(out), full_check=True)
    return out


def export_openvino(*, onnx_path: Path, out_dir: Path) -> Path:
    """Convert an ONNX model to OpenVINO IR (``model.xml`` + ``model.bin``, f32 weights).

    Run it with ``INFERENCE_PRECISION_HINT: f32`` (see :mod:`export.parity`): OpenVINO
    otherwise computes in bfloat16 on CPUs that support it.

    Args:
        onnx_path: The ONNX file from :func:`export_onnx`.
        out_dir: Folder to write the pair into (created if missing).

    Returns:
        Path of ``model.xml``; ``model.bin`` lies beside it.
    """
    ov = import_openvino()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / ARTEFACT_FILES["openvino"][0]
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml
