"""Run exported artefacts and compare them with the PyTorch model they came from.

:func:`parity_report` is what a *site* runs on its held-out data when the coordinator asks
for an export's parity: it takes raw feature rows, runs both the PyTorch model and the
artefact, and returns only three figures (largest absolute logit difference, agreement of
predicted classes, row count). No prediction, logit or row leaves the function.

:func:`load_session` and :func:`load_onnx_bytes` give a plain ``predict(x) -> logits``
callable per format; the inference service uses the latter. Importing this module does not
import torch: only :func:`parity_report` needs it, and the clinician's inference service
must not pay for it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from export.bundle_format import FORMATS, ArtefactFormat

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "OPENVINO_CONFIG",
    "ParityReport",
    "Predictor",
    "import_openvino",
    "load_onnx_bytes",
    "load_session",
    "parity_report",
]

# OpenVINO computes in bfloat16 by default on CPUs that support it (max diff 0.15-0.28
# against torch on our models); parity and serving must run in f32.
OPENVINO_CONFIG: Final[Mapping[str, str]] = {"INFERENCE_PRECISION_HINT": "f32"}
_BATCH: Final = 4096


def import_openvino() -> Any:
    """Import ``openvino`` with its telemetry off; every Fedward use goes through here.

    ``import openvino`` itself starts Intel's telemetry (``openvino_telemetry``): it writes
    a client id under ``~/intel`` and sends usage events to Google Analytics unless a
    consent file opts out, and ``convert_model`` sends more. The appliance must never
    phone home. OpenVINO falls back to its own no-op stub when ``openvino_telemetry``
    cannot be imported, so we make that import fail for this process. This only works if
    nothing imported ``openvino`` or ``openvino_telemetry`` earlier in the process.

    Returns:
        The ``openvino`` module.
    """
    if "openvino" not in sys.modules:
        # A None entry makes `import openvino_telemetry` raise ImportError.
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


class Predictor(Protocol):
    """A loaded artefact: raw float32 features (batch, n_features) in, logits out."""

    @property
    def n_features(self) -> int | None:
        """Features per row the artefact expects, if its input shape says so."""
        ...

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Return the logits, shape (batch, n_classes), float32."""
        ...


@dataclass(frozen=True)
class ParityReport:
    """How closely an exported artefact reproduces the PyTorch model.

    Attributes:
        fmt: The artefact format.
        max_abs_diff: Largest absolute difference between the two models' logits.
        agreement: Fraction of rows whose predicted class (argmax) is the same.
        n: Number of rows compared.
    """

    fmt: ArtefactFormat
    max_abs_diff: float
    agreement: float
    n: int

    def passes(self, *, max_abs_diff: float, min_agreement: float) -> bool:
        """Whether the report is within tolerance (a NaN figure never passes).

        Args:
            max_abs_diff: Largest logit difference allowed.
            min_agreement: Smallest class agreement allowed.

        Returns:
            True when both figures are finite and within tolerance.
        """
        return (math.isfinite(self.max_abs_diff) and self.max_abs_diff <= max_abs_diff
                and math.isfinite(self.agreement) and self.agreement >= min_agreement)

    def to_dict(self) -> dict[str, str | float | int]:
        """The figures as a JSON-ready dict (what a site sends back)."""
        return {"fmt": self.fmt, "max_abs_diff": self.max_abs_diff,
                "agreement": self.agreement, "n": self.n}


def _as_features(x: np.ndarray, n_features: int | None) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must be 2-D (batch, n_features), got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"expected {n_features} features per row, got {arr.shape[1]}")
    return arr


class _OrtPredictor:
    """ONNX Runtime on CPU, for the fp32 and the INT8 ONNX files."""

    def __init__(self, source: Path | bytes) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: the appliance's logs are read by people
        model = source if isinstance(source, bytes) else str(source)
        self._session: Any = ort.InferenceSession(model, sess_options=opts,
                                                  providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(self._session.get_outputs()) != 1:
            raise ValueError("artefact must have exactly one input and one output")
        self._input = str(inputs[0].name)
        shape = inputs[0].shape
        self._n = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None

    @property
    def n_features(self) -> int | None:
        return self._n

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: _as_features(x, self._n)})
        return np.asarray(out[0], dtype=np.float32)


class _OpenVinoPredictor:
    """OpenVINO on CPU, compiled in f32 (see :data:`OPENVINO_CONFIG`)."""

    def __init__(self, xml: Path) -> None:
        ov = import_openvino()
        core = ov.Core()
        model = core.read_model(str(xml))  # reads the .bin beside the .xml
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError("artefact must have exactly one input and one output")
        dim = model.input(0).get_partial_shape()[1]
        self._n: int | None = int(dim.get_length()) if dim.is_static else None
        self._compiled: Any = core.compile_model(model, "CPU", dict(OPENVINO_CONFIG))

    @property
    def n_features(self) -> int | None:
        return self._n

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # One infer request per call: a compiled model's default request is not
        # thread-safe, and the inference service answers requests from a thread pool.
        request = self._compiled.create_infer_request()
        result = request.infer({0: _as_features(x, self._n)})
        return np.asarray(result[self._compiled.output(0)], dtype=np.float32)


def load_session(fmt: ArtefactFormat, path: Path) -> Predictor:
    """Load an artefact file for inference on CPU.

    Args:
        fmt: ``"onnx"``, ``"onnx-int8"`` or ``"openvino"``.
        path: The ``.onnx`` file, or the OpenVINO ``.xml`` (its ``.bin`` beside it).

    Returns:
        A callable ``predict(x) -> logits``.

    Raises:
        ValueError: Unknown format, or an artefact with other than one input and output.
    """
    if fmt in ("onnx", "onnx-int8"):
        return _OrtPredictor(Path(path))
    if fmt == "openvino":
        return _OpenVinoPredictor(Path(path))
    raise ValueError(f"unknown artefact format {fmt!r}; known: {', '.join(FORMATS)}")


def load_onnx_bytes(data: bytes) -> Predictor:
    """Load an ONNX model from bytes (already digest-checked) for inference on CPU.

    Args:
        data: The content of an ``.onnx`` file with its weights inside.

    Returns:
        A callable ``predict(x) -> logits``.
    """
    return _OrtPredictor(bytes(data))


def parity_report(*, torch_model: nn.Module, artefact_path: Path, fmt: ArtefactFormat,
                  features: np.ndarray) -> ParityReport:
    """Compare an exported artefact with its PyTorch model on raw feature rows.

    Meant to run at a site on its held-out data: only the returned figures may leave.

    Args:
        torch_model: The PyTorch model the artefact was exported from (an Opacus
            ``GradSampleModule`` is unwrapped). Its train/eval mode is restored afterwards.
        artefact_path: The artefact (``.onnx`` file or OpenVINO ``.xml``).
        fmt: The artefact's format.
        features: Raw float features, shape (n, n_features), all finite, n >= 1.

    Returns:
        The parity figures.

    Raises:
        ValueError: Empty, non-2-D or non-finite features, or outputs of different shapes.
    """
    import torch

    x = _as_features(features, None)
    if x.shape[0] == 0:
        raise ValueError("features must have at least one row")
    if not np.isfinite(x).all():
        raise ValueError("features must be finite (no NaN or infinity)")
    model: nn.Module = getattr(torch_model, "_module", torch_model)
    predict = load_session(fmt, artefact_path)
    was_training = model.training
    model.eval()
    diffs: list[float] = []
    same = 0
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], _BATCH):
                chunk = x[start:start + _BATCH]
                ref = model(torch.from_numpy(chunk)).detach().cpu().numpy().astype(np.float32)
                got = predict(chunk)
                if got.shape != ref.shape:
                    raise ValueError(f"artefact returns shape {got.shape}, the PyTorch model "
                                     f"{ref.shape}")
                # np.max, unlike max(), propagates NaN: a NaN output must fail the gate.
                diffs.append(float(np.max(np.abs(got - ref))))
                same += int(np.sum(got.argmax(axis=1) == ref.argmax(axis=1)))
    finally:
        model.train(was_training)
    return ParityReport(fmt=fmt, max_abs_diff=float(np.max(diffs)), agreement=same / x.shape[0],
                        n=int(x.shape[0]))
