"""Population stability index on binned counts: the one PSI of every drift score.

The site's drift check (:mod:`site_agent.drift_stats`) and ``fedward-serve``'s window of
answered inputs (:mod:`export.serve_drift`) both bin values on the edges of a release's
reference statistics (:mod:`fedward.reference`) and score the counts with :func:`psi`, so
a PSI means the same thing wherever it is shown.

``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`` over the proportions ``a`` (observed) and
``e`` (reference). An empty bin would make the logarithm infinite, so every proportion is
first raised to at least :data:`PSI_FLOOR` (1e-4, i.e. 0.01 %) and the proportions
renormalised (for noised counts, to at least two noise standard deviations' share of the
rows, :func:`noise_floor`). Values outside the edges count in the first or last bin;
missing (non-finite) values in none.

Only numpy: ``fedward-serve`` runs on a clinician's machine with the base dependencies.
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = ["PSI_ALARM", "PSI_FLOOR", "bin_counts", "bin_index", "noise_floor", "psi"]

PSI_FLOOR: Final = 1e-4
# Above this PSI a feature has shifted enough to worry about: the coordinator's default
# drift alarm (FEDWARD_DRIFT_PSI_ALARM) and the threshold fedward-serve's docs give.
PSI_ALARM: Final = 0.25


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value on ``edges``; outside values go to the end bins.

    Args:
        values: One feature's values (NaN: missing).
        edges: ``B + 1`` increasing bin edges.

    Returns:
        One index in ``0 .. B-1`` per value (int64), ``-1`` for a missing (non-finite) one.
    """
    v = np.asarray(values, dtype=np.float64)
    inner = np.asarray(edges, dtype=np.float64)[1:-1]
    idx = np.searchsorted(inner, v, side="right")   # 0..B-1, clamped by construction
    idx[~np.isfinite(v)] = -1
    return idx.astype(np.int64)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Count finite values in the bins of ``edges``; outside values go to the end bins.

    Args:
        values: One feature's values (NaN: missing, not counted).
        edges: ``B + 1`` increasing bin edges.

    Returns:
        ``B`` counts (float64).
    """
    idx = bin_index(values, edges)
    return np.bincount(idx[idx >= 0], minlength=len(edges) - 1).astype(np.float64)


def _proportions(counts: np.ndarray, floor: float) -> np.ndarray:
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = c.sum()
    p = c / total if total > 0 else np.full(len(c), 1.0 / len(c))
    p = np.maximum(p, floor)
    return np.asarray(p / p.sum())


def psi(observed: np.ndarray, reference: np.ndarray, *, floor: float = PSI_FLOOR) -> float:
    """Population stability index of ``observed`` counts against ``reference`` counts.

    Args:
        observed: The observed counts per bin (may be noised; negatives count as 0).
        reference: The reference counts on the same bins.
        floor: The least proportion of a bin on either side (:data:`PSI_FLOOR`).

    Returns:
        The PSI (0: the same distribution; above :data:`PSI_ALARM`, 0.25, is read as a
        large shift).
    """
    a, e = _proportions(observed, floor), _proportions(reference, floor)
    return float(np.sum((a - e) * np.log(a / e)))


def noise_floor(observed: np.ndarray, reference: np.ndarray, *, noise_std: float = 0.0,
                ref_noise_std: float = 0.0) -> float:
    """The PSI floor for noised counts: at least two noise standard deviations' share.

    Noise in a bin that is empty on the other side would otherwise read as a shift (a
    noised count of 6 against a floor of 0.01 % weighs as much as a real one).

    Args:
        observed: The observed counts per bin.
        reference: The reference counts on the same bins.
        noise_std: Standard deviation of the noise on each observed count (0: exact).
        ref_noise_std: The same for the reference's counts (its DP noise, summed over the
            sites that released it).

    Returns:
        The floor to pass to :func:`psi` (:data:`PSI_FLOOR` without noise).
    """
    floor = PSI_FLOOR
    for counts, std in ((observed, noise_std), (reference, ref_noise_std)):
        n = float(np.clip(np.asarray(counts, dtype=np.float64), 0.0, None).sum())
        if std > 0 and n > 0:
            floor = max(floor, 2.0 * std / n)
    return floor
