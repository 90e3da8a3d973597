"""A candidate's files: its exported artefacts and, on approval, its signed release bundle.

The ``export`` gate builds the model from the checkpoint and exports ONNX, ONNX Runtime
INT8 and OpenVINO IR into the candidate's staging folder (``home/candidates/candidate-<id>/``,
:func:`staging_dir`, :func:`export_artefacts`). Approval packages those staged artefacts,
the training curve and any reference statistics into the bundle signed with the release key
under ``home/releases/<release-id>/`` (:func:`write_release_bundle`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Final

from coordinator.model_card import TRAINING_CURVE_FILE
from coordinator.release_chart import training_curve_svg
from coordinator.release_errors import Conflict, IntegrityFailure
from coordinator.release_store import real_dir, release_key, releases_dir
from export.bundle import write_bundle
from export.bundle_format import ARTEFACT_FILES, FORMATS, ArtefactFormat, BundleWriteError
from export.bundle_keys import public_key_fingerprint
from fedward.files import file_sha256
from fedward.statistics import REFERENCE_FILE
from fedward.study import STUDY_FILE
from fedward.tasks import TaskRef

__all__ = [
    "ExportFailed",
    "artefact_files",
    "export_artefacts",
    "staging_dir",
    "write_release_bundle",
]


_CANDIDATES_DIR: Final = "candidates"


def staging_dir(home: Path, candidate_id: int) -> tuple[Path, str]:
    """A candidate's staging folder: its path, and its path relative to ``home``."""
    rel = f"{_CANDIDATES_DIR}/candidate-{candidate_id}"
    return home / rel, rel


class ExportFailed(Exception):
    """The checkpoint could not be turned into artefacts; the message says why."""


def export_artefacts(*, task: TaskRef, arrays: dict[str, Any], out_dir: Path
                     ) -> dict[ArtefactFormat, Path]:
    """Build the model from the checkpoint and export every format into ``out_dir``."""
    from export.onnx_export import (
        UnsupportedModelError,
        export_onnx,
        export_onnx_int8,
        export_openvino,
    )
    from fedward.models import set_model_arrays
    from fedward.tasks import UnknownTaskError, build_model

    try:
        model = build_model(task)
        set_model_arrays(model, arrays)
    except UnknownTaskError as err:
        raise ExportFailed(str(err.args[0] if err.args else err)) from None
    except ValueError as err:
        raise ExportFailed(f"the checkpoint does not fit the task's model: {err}") from None
    try:
        onnx_path = export_onnx(model=model, task=task, out_dir=out_dir)
    except UnsupportedModelError as err:
        raise ExportFailed(err.reason) from None
    # Dynamic INT8 (no calibration rows): the coordinator holds no site data to calibrate on.
    int8 = export_onnx_int8(onnx_path=onnx_path, out_dir=out_dir, calibration=None)
    xml = export_openvino(onnx_path=onnx_path, out_dir=out_dir)
    return {"onnx": onnx_path, "onnx-int8": int8, "openvino": xml}


def artefact_files(staging: Path) -> dict[str, dict[str, Any]]:
    """The staged artefacts' SHA-256 and size, by file name (the ``export`` gate's figures)."""
    return {name: {"sha256": file_sha256(staging / name),
                   "bytes": (staging / name).stat().st_size}
            for fmt in FORMATS for name in ARTEFACT_FILES[fmt] if (staging / name).is_file()}


def write_release_bundle(*, home: Path, candidate_id: int, staging_rel: str | None,
                         release_id: str, card: dict[str, Any],
                         metrics: dict[int, dict[str, dict[str, float]]], round_number: int,
                         final_round: int, reference: bytes | None,
                         study: bytes | None = None) -> tuple[Path, str]:
    """Write and sign the bundle of an approved candidate from its staged artefacts.

    Args:
        home: The coordinator's data directory.
        candidate_id: The candidate.
        staging_rel: Its staging folder relative to ``home`` (``None``: nothing staged).
        release_id: The release's id, the bundle folder's name.
        card: The model card.
        metrics: The run's metrics by round, for the training curve.
        round_number: The candidate's round (the curve ends there).
        final_round: The run's configured number of rounds.
        reference: The run's reference statistics document, or ``None``.
        study: The canonical spec of the study the run pinned, or ``None``.

    Returns:
        The bundle folder and the release key's fingerprint.

    Raises:
        Conflict: The bundle folder exists already.
        IntegrityFailure: The staged artefacts, the releases folder or the key are unusable.
    """
    if staging_rel is None:
        raise IntegrityFailure(f"candidate {candidate_id} has no staged artefacts")
    staging = home / staging_rel
    real_dir(staging, "the candidate's staging folder")
    files = {name: staging / name for fmt in FORMATS for name in ARTEFACT_FILES[fmt]}
    missing = sorted(n for n, p in files.items() if not p.is_file() or p.is_symlink())
    if missing:
        raise IntegrityFailure(f"candidate {candidate_id}'s staged artefacts are missing or "
                               f"not regular files: {', '.join(missing)}")
    private, public = release_key(home)
    out = releases_dir(home) / release_id
    if out.exists() or out.is_symlink():
        raise Conflict(f"a bundle already exists at {out}; move it away after checking "
                       "that no release uses it")
    with tempfile.TemporaryDirectory(prefix="fedward-curve-") as tmp:
        curve = Path(tmp) / TRAINING_CURVE_FILE
        curve.write_text(training_curve_svg(metrics=metrics, up_to_round=round_number,
                                            final_round=final_round,
                                            title=f"{release_id}: training curve"),
                         encoding="utf-8")
        extra: dict[str, Path] = {}
        if reference is not None:
            extra[REFERENCE_FILE] = Path(tmp) / REFERENCE_FILE
            extra[REFERENCE_FILE].write_bytes(reference)
        if study is not None:
            extra[STUDY_FILE] = Path(tmp) / STUDY_FILE
            extra[STUDY_FILE].write_bytes(study)
        try:
            write_bundle(out_dir=out, files={**files, TRAINING_CURVE_FILE: curve, **extra},
                         model_card=card, private_key=private)
        except BundleWriteError as err:
            if "refusing to overwrite" in str(err):
                raise Conflict(f"could not write the bundle: {err}") from None
            raise IntegrityFailure(f"could not write the bundle: {err}") from None
    fingerprint = public_key_fingerprint(public.read_bytes())
    return out, fingerprint
