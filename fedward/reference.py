"""Reading a release's reference statistics (``reference_statistics.json``), checked.

:func:`fedward.statistics.reference_document` writes the file (the study's federated,
DP-noised histogram of every input feature, on edges fixed by the study's plausible
ranges); :func:`parse_reference` reads it back for whoever compares recent inputs with it:
the site's drift check (:mod:`site_agent.drift`) and ``fedward-serve``'s drift gauges
(:mod:`export.serve_drift`). Every problem is a ``ValueError`` saying what is wrong.

Only numpy and the standard library: ``fedward-serve`` runs with the base dependencies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from fedward.statistics import REFERENCE_FORMAT, REFERENCE_VERSION

__all__ = ["MAX_BINS", "Reference", "ReferenceFeature", "parse_reference"]

MAX_BINS: Final = 1000


@dataclass(frozen=True)
class ReferenceFeature:
    """One feature's reference histogram (DP-noised sums over the sites)."""

    name: str
    edges: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Reference:
    """The release's reference statistics."""

    run_id: Any
    features: tuple[ReferenceFeature, ...]
    sites: int = 1
    noise_std: float | None = None   # per bin of the summed counts, when the file states it


def parse_reference(data: bytes) -> Reference:
    """The reference statistics in ``data`` (the file's bytes), checked.

    Raises:
        ValueError: Not JSON, another format or version, no features, or a feature
            without ``B + 1`` increasing finite edges and ``B`` finite, non-negative
            counts that are not all zero; the message says which.
    """
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != REFERENCE_FORMAT \
            or doc.get("version") != REFERENCE_VERSION:
        raise ValueError(f"expected format {REFERENCE_FORMAT!r} version {REFERENCE_VERSION}")
    raw = doc.get("features")
    if not isinstance(raw, list) or not raw:
        raise ValueError("it lists no features")
    features = []
    for i, f in enumerate(raw):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"feature {i} has no name")
        try:
            edges = np.asarray(f["edges"], dtype=np.float64)
            counts = np.asarray(f["counts"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"feature {f['name']!r} has no numeric edges and counts") \
                from None
        if not (edges.ndim == 1 and counts.ndim == 1 and 1 <= len(counts) <= MAX_BINS
                and len(edges) == len(counts) + 1 and np.all(np.isfinite(edges))
                and np.all(np.diff(edges) > 0) and np.all(np.isfinite(counts))
                and np.all(counts >= 0) and counts.sum() > 0):
            raise ValueError(f"feature {f['name']!r} needs B+1 increasing edges and B "
                             "finite, non-negative counts that are not all zero")
        features.append(ReferenceFeature(name=f["name"], edges=edges, counts=counts))
    found = doc.get("privacy")
    privacy: dict[str, Any] = found if isinstance(found, dict) else {}
    sites = privacy.get("sites")
    std = privacy.get("noise_std")
    return Reference(
        run_id=doc.get("run_id"), features=tuple(features),
        sites=sites if isinstance(sites, int) and not isinstance(sites, bool) and sites > 0
        else 1,
        noise_std=float(std) if isinstance(std, int | float) and not isinstance(std, bool)
        and math.isfinite(std) and std >= 0 else None)
