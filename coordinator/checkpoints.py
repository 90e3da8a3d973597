"""Global-model checkpoints: safetensors files under the coordinator's data directory.

safetensors holds raw tensors and a JSON header only, so loading a checkpoint can never
execute code (unlike pickle-based ``torch.save``). Files are written atomically and
verified against the SHA-256 recorded in the database before use.

A server optimiser's state (``coordinator.aggregation``: momentum, Adam moments) is saved
beside the round's checkpoint in a second safetensors file, ``server-state-round-NNNN``.
The model checkpoint's header names that file's SHA-256, so the digest the database holds
for the checkpoint also vouches for the state: a resumed run continues the optimiser only
from the state written with the model it resumes from. Model-only readers (releases,
exports, the demo) see the checkpoint's tensors as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from fedward.files import atomic_write, file_sha256

__all__ = [
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "load_server_state",
    "save_checkpoint",
    "server_state_path",
]

# Keys of the checkpoint header's metadata that point at the server optimiser's state.
_STATE_SHA256: Final = "fedward.server-state.sha256"
_STATE_STRATEGY: Final = "fedward.server-state.aggregation"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not match its recorded digest."""


def checkpoint_path(run_id: int, round_number: int) -> Path:
    """Path of a checkpoint relative to the coordinator's data directory."""
    return Path("checkpoints") / f"run-{run_id}" / f"round-{round_number:04d}.safetensors"


def server_state_path(run_id: int, round_number: int) -> Path:
    """Path of a round's server-optimiser state, relative to the data directory."""
    return checkpoint_path(run_id, round_number).with_name(
        f"server-state-round-{round_number:04d}.safetensors")


def _write(path: Path, arrays: dict[str, np.ndarray],
           metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file durably and atomically (fedward.files.atomic_write)."""
    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                            metadata=metadata), mode=0o644)


def save_checkpoint(
    home: Path, run_id: int, round_number: int, arrays: dict[str, np.ndarray], *,
    server_state: dict[str, np.ndarray] | None = None, aggregation: str = "",
) -> tuple[Path, str]:
    """Write the global model after a round; returns (relative path, sha256).

    Args:
        home: the coordinator's data directory.
        run_id: the run.
        round_number: the round just aggregated.
        arrays: the new global model.
        server_state: the aggregation's state after this round (see
            ``Aggregator.state_dict``); written first, to its own file, and named by its
            SHA-256 in the checkpoint's header. None or empty: a model-only checkpoint.
        aggregation: the strategy the state belongs to (checked on resume).
    """
    rel = checkpoint_path(run_id, round_number)
    metadata = None
    if server_state:
        state_path = home / server_state_path(run_id, round_number)
        _write(state_path, server_state, {_STATE_STRATEGY: aggregation})
        metadata = {_STATE_SHA256: file_sha256(state_path), _STATE_STRATEGY: aggregation}
    _write(home / rel, arrays, metadata)
    return rel, file_sha256(home / rel)


def load_checkpoint(path: Path, *, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read a checkpoint, refusing it if its digest differs from the recorded one."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise CheckpointError(f"checkpoint {path} does not match its recorded SHA-256")
    return dict(load_file(str(path)))


def load_server_state(
    path: Path, *, expected_sha256: str | None = None, aggregation: str,
) -> dict[str, np.ndarray] | None:
    """The server-optimiser state saved with the checkpoint at ``path``, or None if none was.

    Args:
        path: the model checkpoint (not the state file).
        expected_sha256: the checkpoint's digest recorded in the database.
        aggregation: the run's strategy; the state must have been written by it.

    Raises:
        CheckpointError: if the checkpoint or its state file is missing or altered, or the
            state belongs to another strategy.
    """
    load_checkpoint(path, expected_sha256=expected_sha256)
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
    sha = meta.get(_STATE_SHA256)
    if sha is None:
        return None
    if meta.get(_STATE_STRATEGY) != aggregation:
        raise CheckpointError(
            f"checkpoint {path} holds the state of aggregation "
            f"{meta.get(_STATE_STRATEGY)!r}, but the run uses {aggregation!r}")
    number = path.stem.rpartition("-")[2]
    state_path = path.with_name(f"server-state-round-{number}.safetensors")
    if not state_path.exists():
        raise CheckpointError(f"the server optimiser state {state_path} of checkpoint {path} "
                              "is missing")
    if file_sha256(state_path) != sha:
        raise CheckpointError(f"the server optimiser state {state_path} does not match the "
                              f"SHA-256 its checkpoint {path} records")
    return dict(load_file(str(state_path)))
