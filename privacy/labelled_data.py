"""A labelled set (features, class numbers) checked and turned into tensors.

Shared by training (:mod:`privacy.training`) and evaluation (:mod:`privacy.evaluation`), so
both refuse malformed data with the same message.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["labelled_tensors"]


def labelled_tensors(features: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert a labelled set; every problem is reported at once."""
    x = np.asarray(features)
    y = np.asarray(labels)
    problems: list[str] = []
    if x.ndim != 2:
        problems.append(f"features must be 2-D (examples x columns), got shape {x.shape}")
    if y.ndim != 1:
        problems.append(f"labels must be 1-D, got shape {y.shape}")
    if not problems and len(x) != len(y):
        problems.append(f"{len(x)} feature rows but {len(y)} labels")
    if not problems and len(y) == 0:
        problems.append("no examples")
    if x.size and not np.issubdtype(x.dtype, np.number):
        problems.append(f"features must be numeric, got dtype {x.dtype}")
    elif x.size and not np.all(np.isfinite(x)):
        problems.append("features contain NaN or infinite values")
    if y.size:
        if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
            problems.append(f"labels must be class numbers, got dtype {y.dtype}")
        elif not (np.all(np.isfinite(y)) and np.all(y == np.round(y)) and np.all(y >= 0)):
            problems.append("labels must be non-negative integers")
    if problems:
        raise ValueError("cannot use this data: " + "; ".join(problems))
    return (
        torch.from_numpy(x.astype(np.float32, copy=True)),
        torch.from_numpy(y.astype(np.int64, copy=True)),
    )
