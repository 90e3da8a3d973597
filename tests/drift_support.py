"""Test aids for drift checks: DP reference statistics and a real signed release bundle.

:func:`dp_reference` builds ``reference_statistics.json`` (the shared format, version 1) the
way the federated statistics phase does: each site bins its own rows on edges fixed in
advance (the study's declared range of each feature, 10 equal bins), adds Gaussian noise
to its histogram, and only the noised histograms are summed (never one site's raw counts);
the sum is clipped at 0. :func:`make_release` exports a real model of the task to ONNX and
writes a signed bundle with the release key, with or without the reference file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import write_bundle
from export.bundle_keys import generate_release_key, public_key_path
from fedward.tasks import get_task, plausible_ranges

BINS = 10


def task_edges(task: str) -> dict[str, np.ndarray]:
    """Per feature, 10 equal bins over the study's declared range (for breast cancer: the
    published minimum to maximum of each feature)."""
    from fedward.tasks import BREAST_CANCER_RANGES

    ranges = BREAST_CANCER_RANGES if task == "breast_cancer_mlp" else plausible_ranges(task)
    return {name: np.linspace(lo, hi, BINS + 1) for name, (lo, hi) in ranges.items()}


def dp_reference(sites: Sequence[np.ndarray], *, task: str = "breast_cancer_mlp",
                 noise_std: float = 2.0, seed: int = 0, run_id: int = 1,
                 epsilon: float = 1.0) -> dict[str, Any]:
    """The reference statistics of ``sites`` (each an (n, features) array in the task's
    column order), from DP-noised per-site histograms only."""
    from fedward.drift_psi import bin_counts

    rng = np.random.default_rng(seed)
    columns = list(get_task(task).feature_columns)
    edges = task_edges(task)
    features = []
    for j, name in enumerate(columns):
        total = np.zeros(BINS)
        n = 0.0
        for x in sites:
            total += bin_counts(x[:, j], edges[name]) + rng.normal(0.0, noise_std, BINS)
            n += len(x) + rng.normal(0.0, noise_std)
        features.append({"name": name, "edges": edges[name].tolist(),
                         "counts": np.clip(total, 0.0, None).tolist(), "n": max(n, 0.0),
                         "missing": 0.0, "mean": None, "std": None})
    return {"format": "fedward-reference-statistics", "version": 1, "run_id": run_id,
            "study": {"name": task, "hash": "sha256:" + "0" * 64},
            "privacy": {"mechanism": "gaussian", "epsilon": epsilon, "delta": 1e-6,
                        "sites": len(sites)},
            "features": features}


def release_key(folder: Path) -> tuple[Path, Path]:
    """A release key pair in ``folder``: (private, public)."""
    private = folder / "release.key"
    if not private.exists():
        folder.mkdir(parents=True, exist_ok=True)
        generate_release_key(private)
    return private, public_key_path(private)


def make_release(work: Path, *, release_id: str, reference: dict[str, Any] | None,
                 private_key: Path, task: str = "breast_cancer_mlp",
                 project: str = "test", seed: int = 0) -> Path:
    """A signed release bundle of a real (untrained) model of ``task``."""
    from export.onnx_export import export_onnx
    from fedward.tasks import build_model

    spec = get_task(task)
    out = work / f"export-{release_id}"
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model=build_model(task, seed=seed), task=task, out_dir=out)
    files = {p.name: p for p in out.iterdir() if p.name.startswith(onnx_path.name)}
    if reference is not None:
        ref = out / "reference_statistics.json"
        ref.write_text(json.dumps(reference))
        files["reference_statistics.json"] = ref
    card = {"release_id": release_id, "project": project, "task": task,
            "input": {"name": "features", "columns": list(spec.feature_columns),
                      "n_classes": spec.n_classes, "classes": list(spec.class_names)}}
    return write_bundle(out_dir=work / "releases" / release_id, files=files,
                        model_card=card, private_key=private_key)
