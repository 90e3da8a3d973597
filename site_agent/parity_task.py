"""Export parity, measured at the site on its own held-out data.

The coordinator sends the candidate's exported artefacts (ONNX, ONNX Runtime INT8, OpenVINO
IR: data files, never code) with the model's arrays. The site runs both the PyTorch model
and each artefact on its held-out split and returns only the figures: the largest absolute
difference of the logits and the share of rows whose predicted class agrees.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from export.bundle import ARTEFACT_FILES
from export.parity import parity_report
from export.tasks import build_model, set_model_arrays

__all__ = ["ARTEFACT_PREFIX", "ParityTaskError", "evaluate_parity", "split_arrays"]

ARTEFACT_PREFIX = "artefact/"
_ALLOWED_FILES = {name: fmt for fmt, names in ARTEFACT_FILES.items() for name in names}


class ParityTaskError(ValueError):
    """The parity task was malformed."""


def split_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """Separate the model's arrays from artefact files sent as uint8 arrays."""
    model: dict[str, np.ndarray] = {}
    files: dict[str, bytes] = {}
    for name, arr in arrays.items():
        if name.startswith(ARTEFACT_PREFIX):
            filename = name[len(ARTEFACT_PREFIX):]
            if filename not in _ALLOWED_FILES or arr.dtype != np.uint8 or arr.ndim != 1:
                raise ParityTaskError(f"unexpected artefact {filename!r}")
            files[filename] = arr.tobytes()
        else:
            model[name] = arr
    return model, files


def evaluate_parity(*, task: str, model_arrays: dict[str, np.ndarray],
                    files: dict[str, bytes], features: np.ndarray, workdir: Path
                    ) -> dict[str, float]:
    """Parity figures of every complete format in ``files`` against the PyTorch model."""
    model = build_model(task, seed=0)
    set_model_arrays(model, {k: np.asarray(v, dtype=np.float32) for k, v in model_arrays.items()})
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="parity-", dir=workdir))
    metrics: dict[str, float] = {"parity-n": float(len(features))}
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for fmt, names in ARTEFACT_FILES.items():
            if not all(n in files for n in names):
                continue
            report = parity_report(torch_model=model, artefact_path=tmp / names[0], fmt=fmt,
                                   features=features)
            metrics[f"parity-{fmt}-max-abs-diff"] = float(report.max_abs_diff)
            metrics[f"parity-{fmt}-agreement"] = float(report.agreement)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics
