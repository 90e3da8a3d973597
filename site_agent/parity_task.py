"""Export parity, measured at the site on its own held-out data, on artefacts it made itself.

The coordinator asks each site whether a release candidate's exported artefacts (ONNX, ONNX
Runtime INT8, OpenVINO IR) behave like the candidate's PyTorch model. Running whatever the
coordinator sends would hand it a program over the held-out rows: a crafted ONNX graph
turned the old parity figures into a read-out of patient cells. So a site:

1. measures only a model it already received in the same run, as a round's global model or
   the final one, and evaluated (:class:`ParityBook`); the held-out metrics of that model
   have left the site already;
2. exports that model itself, with the exporters installed at the site, and refuses the
   task when an artefact it was sent is not the same function as its own export (compared
   in a canonical form that ignores only exporter versions, debug names and paths:
   :func:`export.canonical.canonical_digest`); the refusal is written to the site's audit log;
3. runs only its OWN export on its rows, never the bytes it was sent;
4. measures each format of a model at most once (recorded before any row is read);
5. returns only coarse figures: the class agreement rounded down to a multiple of 1/20 and
   the largest logit difference rounded up to a power of ten
   (:func:`fedward.wire.coarse_agreement`, :func:`fedward.wire.coarse_max_abs_diff`), which
   the egress guard enforces.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle_format import ARTEFACT_FILES, FORMATS, ArtefactFormat
from export.canonical import canonical_digest, describe_difference
from fedward.files import atomic_write
from fedward.tasks import TaskRef
from fedward.wire import coarse_agreement, coarse_max_abs_diff

__all__ = [
    "ARTEFACT_PREFIX",
    "ParityBook",
    "ParityOutcome",
    "ParityRefused",
    "ParityTaskError",
    "measure_parity",
    "model_digest",
    "split_arrays",
]

ARTEFACT_PREFIX = "artefact/"
_ALLOWED_FILES = {name: fmt for fmt, names in ARTEFACT_FILES.items() for name in names}


class ParityTaskError(ValueError):
    """The parity task was malformed."""


class ParityRefused(Exception):
    """The site will not measure this parity task; :attr:`detail` goes to its audit log.

    Attributes:
        detail: Digests, formats and the reason (no data values).
    """

    def __init__(self, reason: str, detail: Mapping[str, Any]) -> None:
        super().__init__(reason)
        self.detail = {"reason": reason, **detail}


@dataclass(frozen=True)
class ParityOutcome:
    """What a measured parity task produced.

    Attributes:
        metrics: The coarse figures that may leave the site.
        model: :func:`model_digest` of the model measured.
        formats: The formats measured.
    """

    metrics: dict[str, float]
    model: str
    formats: list[str]


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over a model's arrays (names, shapes and float32 bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name], dtype=np.float32)
        h.update(json.dumps([name, list(arr.shape)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class ParityBook:
    """The site's record of the global models it evaluated and the parity it measured.

    A small JSON file (mode 0600, replaced atomically), read and written by the trainer,
    which handles one task at a time. A site that loses it measures no parity for models it
    received before (fail closed), nothing else.

    Args:
        path: The book's file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"models": {}, "measured": {}}
        if not isinstance(raw, dict):
            raise ValueError(f"{self.path} is not a parity book; move it away")
        raw.setdefault("models", {})
        raw.setdefault("measured", {})
        return raw

    def _save(self, book: Mapping[str, Any]) -> None:
        atomic_write(self.path, json.dumps(book, sort_keys=True), mode=0o600)

    def remember_model(self, run_id: str, digest: str) -> None:
        """Record that this site evaluated the global model ``digest`` in run ``run_id``."""
        book = self._load()
        models = book["models"].setdefault(run_id, [])
        if digest not in models:
            models.append(digest)
            self._save(book)

    def knows_model(self, run_id: str, digest: str) -> bool:
        """Whether the site evaluated the model ``digest`` in run ``run_id``."""
        return digest in self._load()["models"].get(run_id, [])

    def measured(self, digest: str) -> set[str]:
        """The formats already measured for the model ``digest``."""
        return set(self._load()["measured"].get(digest, []))

    def claim(self, digest: str, formats: list[str]) -> None:
        """Record ``formats`` of ``digest`` as measured (before any row is read)."""
        book = self._load()
        done = set(book["measured"].get(digest, []))
        book["measured"][digest] = sorted(done | set(formats))
        self._save(book)


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


def _exporter_versions() -> str:
    import importlib.metadata

    found = []
    for name in ("torch", "onnx", "onnxruntime", "openvino"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def _export_own(task: TaskRef, model: Any, out_dir: Path, formats: list[ArtefactFormat]
                ) -> dict[ArtefactFormat, Path]:
    """The site's own export of ``model``, as the coordinator's release gates make it."""
    from export.onnx_export import (
        export_onnx,
        export_onnx_int8,
        export_openvino,
        quiet_exporters,
    )

    with quiet_exporters():
        onnx_path = export_onnx(model=model, task=task, out_dir=out_dir)
        paths: dict[ArtefactFormat, Path] = {"onnx": onnx_path}
        if "onnx-int8" in formats:
            # Dynamic INT8, as the coordinator quantizes (it holds no rows to calibrate on).
            paths["onnx-int8"] = export_onnx_int8(onnx_path=onnx_path, out_dir=out_dir,
                                                  calibration=None)
        if "openvino" in formats:
            paths["openvino"] = export_openvino(onnx_path=onnx_path, out_dir=out_dir)
    return paths


# --- the task ----------------------------------------------------------------------------


def measure_parity(*, task: TaskRef, run_id: str, model_arrays: dict[str, np.ndarray],
                   files: Mapping[str, bytes], features: np.ndarray, workdir: Path,
                   book: ParityBook) -> ParityOutcome:
    """Measure the parity of a candidate's artefacts, or refuse (see the module docstring).

    Args:
        task: The site's task (the model is built from the site's own registry, or from
            its own approved copy of the run's study spec).
        run_id: The run the candidate comes from.
        model_arrays: The candidate's arrays.
        files: The artefact files the coordinator sent (name -> content).
        features: The site's held-out features.
        workdir: A folder for the site's own export (a temporary folder inside is removed).
        book: The site's parity book.

    Returns:
        The coarse figures and what was measured.

    Raises:
        ParityRefused: The model is not one the site evaluated in the run, a format was
            measured before, or an artefact is not the same function as the site's export.
        ValueError: The arrays do not fit the task's model.
    """
    from export.parity import parity_report
    from fedward.models import set_model_arrays
    from fedward.tasks import build_model

    digest = model_digest(model_arrays)
    formats = [f for f in FORMATS if all(n in files for n in ARTEFACT_FILES[f])]
    detail: dict[str, Any] = {"model": digest, "formats": list(formats)}
    if not formats:
        raise ParityRefused("no complete artefact was sent", detail)
    if not book.knows_model(run_id, digest):
        raise ParityRefused(
            f"this site measures parity only for a global model it received and evaluated in "
            f"run {run_id}; model {digest[:16]} is not one of them", detail)
    again = sorted(book.measured(digest) & set(formats))
    if again:
        raise ParityRefused(
            f"parity of model {digest[:16]} was measured here already for {', '.join(again)}; "
            "a site measures each format of a model once", detail)
    model = build_model(task, seed=0)
    # A copy: arrays that came over the socket are read-only views torch warns about.
    set_model_arrays(model, {k: np.array(v, dtype=np.float32) for k, v in model_arrays.items()})
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="parity-", dir=workdir))
    try:
        own = _export_own(task, model, tmp, formats)
        mismatched: dict[str, str] = {}
        for fmt in formats:
            theirs = {n: files[n] for n in ARTEFACT_FILES[fmt]}
            ours = {n: (tmp / n).read_bytes() for n in ARTEFACT_FILES[fmt]}
            try:
                same = canonical_digest(fmt, theirs) == canonical_digest(fmt, ours)
                why = "" if same else describe_difference(fmt, theirs, ours)
            except ValueError as err:
                same, why = False, str(err)
            if not same:
                mismatched[fmt] = why
                detail[f"sha256-{fmt}"] = hashlib.sha256(
                    b"".join(theirs[n] for n in sorted(theirs))).hexdigest()
        if mismatched:
            reasons = "; ".join(f"{fmt}: {why}" for fmt, why in mismatched.items())
            raise ParityRefused(
                "an artefact sent is not the model's export as this site makes it "
                f"({reasons}; site exporters: {_exporter_versions()}); nothing was run on "
                "the site's data", detail)
        book.claim(digest, list(formats))
        metrics: dict[str, float] = {"parity-n": float(len(features))}
        for fmt in formats:
            report = parity_report(torch_model=model, artefact_path=own[fmt], fmt=fmt,
                                   features=features)
            metrics[f"parity-{fmt}-max-abs-diff"] = coarse_max_abs_diff(report.max_abs_diff)
            metrics[f"parity-{fmt}-agreement"] = coarse_agreement(report.agreement)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ParityOutcome(metrics=metrics, model=digest, formats=list(formats))
