"""Global-model checkpoints: safetensors files under the coordinator's data directory.

safetensors holds raw tensors and a JSON header only, so loading a checkpoint can never
execute code (unlike pickle-based ``torch.save``). Files are written atomically and
verified against the SHA-256 recorded in the database before use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from fedward.files import atomic_write

__all__ = ["CheckpointError", "checkpoint_path", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not match its recorded digest."""


def checkpoint_path(run_id: int, round_number: int) -> Path:
    """Path of a checkpoint relative to the coordinator's data directory."""
    return Path("checkpoints") / f"run-{run_id}" / f"round-{round_number:04d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    home: Path, run_id: int, round_number: int, arrays: dict[str, np.ndarray]
) -> tuple[Path, str]:
    """Write the global model after a round; returns (relative path, sha256)."""
    rel = checkpoint_path(run_id, round_number)
    path = home / rel
    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
                 mode=0o644)
    return rel, _sha256(path)


def load_checkpoint(path: Path, *, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read a checkpoint, refusing it if its digest differs from the recorded one."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing")
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise CheckpointError(f"checkpoint {path} does not match its recorded SHA-256")
    return dict(load_file(str(path)))
