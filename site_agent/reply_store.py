"""Idempotent replays: the last reply of each run, kept so that a repeated round is answered
from it instead of being trained (and charged to the site's privacy budget) twice.

One JSON file (the header, the round and the digest of the global model it answers) and
one ``.npz`` (the arrays, never pickled) per run, written atomically and readable only by
the agent's account.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedward.files import atomic_write

__all__ = ["ReplyStore"]


# Stored replies name the digest of the global model they answer. Before the one digest of
# the wire (fedward.wire.update_digest) they used this one: a reply stored then (no
# "digest" key in its file) is still found for a repeated round after an upgrade, instead of
# being mistaken for a round trained with another model.
def _legacy_reply_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


_REPLY_DIGEST: Final = "fedward.wire.update_digest"


@dataclass(frozen=True)
class ReplyStore:
    """The stored last replies of a site's runs, in ``replies_dir``."""

    replies_dir: Path

    def _paths(self, run_id: str) -> tuple[Path, Path]:
        safe = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        return self.replies_dir / f"{safe}.json", self.replies_dir / f"{safe}.npz"

    def store(self, run_id: str, round_number: int, incoming: str,
              reply: tuple[dict[str, Any], dict[str, np.ndarray]]) -> None:
        meta_path, arr_path = self._paths(run_id)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **reply[1])
        atomic_write(arr_path, buf.getvalue(), mode=0o600)
        atomic_write(meta_path, json.dumps({"run": run_id, "round": round_number,
                                            "incoming": incoming,
                                            "digest": _REPLY_DIGEST, "header": reply[0]}),
                     mode=0o600)

    def load(self, run_id: str, round_number: int, incoming: str,
             arrays: dict[str, np.ndarray]
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        meta_path, arr_path = self._paths(run_id)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("digest") != _REPLY_DIGEST:   # stored before the one wire digest
            incoming = _legacy_reply_digest(arrays)
        if meta.get("round") != round_number or meta.get("incoming") != incoming:
            return None
        # NEVER allow_pickle: these files live on disk and could have been replaced.
        with np.load(arr_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return dict(meta["header"]), arrays
