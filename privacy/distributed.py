"""Distributed DP for secure aggregation: clip, quantise and add a share of Skellam noise.

Under secure aggregation the coordinator learns only the sum of the sites' updates, so no
one adds noise after summing: each site adds its *share*. Skellam noise (the difference of
two Poisson variables) is integer-valued, and the sum of independent Skellam variables is
again Skellam with the summed variance, so the noise of the sum is known exactly whatever
the number of contributing sites (Agarwal, Kale and Kairouz, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS 2021).

A site's round, in integers:

1. ``delta = trained - global``, clipped to L2 norm ``clip`` (the site-level bound);
2. scaled by ``scale`` and stochastically rounded to integers (:func:`quantise`);
3. plus Skellam noise of variance ``variance / threshold`` per coordinate (:func:`skellam`).

The privacy unit is one patient at one site: whatever local training does with a patient,
the site's rounded vector stays inside the ball of radius ``scale * clip + sqrt(d)``
(rounding moves each coordinate by less than 1), so a patient changes it by at most
``l2 = 2 (scale * clip + sqrt(d))`` in L2 norm and ``l1 = min(l2**2, sqrt(d) l2)`` in L1
norm (integer vectors). Nothing is assumed about the training; no sampling amplification
is claimed.

Dropouts: a share is sized for ``threshold`` sites, the fewest the protocol ever unmasks.
If more survive, the sum carries more noise than planned; the privacy figure is the
worst case, ``threshold`` survivors (:class:`privacy.mechanisms.DistributedSkellam`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from privacy.mechanisms import DistributedSkellam, Mechanism, gaussian_equivalent_std

__all__ = [
    "MODULUS_BITS",
    "SCALE_UNITS",
    "DistributedPlan",
    "dequantise",
    "from_field",
    "gaussian_equivalent_std",
    "mechanism",
    "noise_multiplier_for",
    "quantise",
    "skellam",
    "skellam_rdp",
    "to_field",
]

MODULUS_BITS: Final = 32
"""Arithmetic of the masked sum is modulo ``2**MODULUS_BITS``."""
SCALE_UNITS: Final = 2 ** 14
"""The clipping norm maps to this many integer units: fine enough that rounding is noise-
free in effect (error below 1/SCALE_UNITS of the clip per coordinate), coarse enough that
the sum of 100 sites plus 8 standard deviations of noise stays well inside the field."""
_MODULUS: Final = 1 << MODULUS_BITS


@dataclass(frozen=True)
class DistributedPlan:
    """The numbers both sides agree on for one secure round.

    Attributes:
        clip: the L2 bound of a site's model update (float units).
        dim: the number of model parameters.
        threshold: the fewest sites whose sum is ever unmasked.
        noise_multiplier: noise std of the sum (at ``threshold`` sites) over ``l2``.
    """

    clip: float
    dim: int
    threshold: int
    noise_multiplier: float

    @property
    def scale(self) -> float:
        """Integer units per float unit."""
        return SCALE_UNITS / self.clip

    @property
    def l2(self) -> float:
        """L2 sensitivity of one site's integer vector to one patient."""
        return 2.0 * (SCALE_UNITS + math.sqrt(self.dim))

    @property
    def l1(self) -> float:
        """L1 sensitivity (integer vectors: never above ``l2**2``)."""
        return min(self.l2 ** 2, math.sqrt(self.dim) * self.l2)

    @property
    def variance(self) -> float:
        """Skellam variance per coordinate of the sum of ``threshold`` shares."""
        return (self.noise_multiplier * self.l2) ** 2

    @property
    def share_variance(self) -> float:
        """Skellam variance per coordinate that each site adds."""
        return self.variance / self.threshold


def quantise(update: np.ndarray, *, clip: float, scale: float,
             rng: np.random.Generator) -> np.ndarray:
    """Clip ``update`` (flat float vector) to L2 norm ``clip``, scale, round stochastically.

    Stochastic rounding is unbiased: the expected integer is the scaled value.

    Returns:
        int64 vector.
    """
    flat = np.asarray(update, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise ValueError("the update contains NaN or Inf")
    if norm > clip:
        flat = flat * (clip / norm)
    scaled = flat * scale
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return (low + up).astype(np.int64)


def dequantise(total: np.ndarray, *, scale: float) -> np.ndarray:
    """Signed integer sum back to float units (float64)."""
    return np.asarray(total, dtype=np.float64) / scale


def skellam(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Skellam noise of the given variance per coordinate: ``Poisson(v/2) - Poisson(v/2)``."""
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be > 0, got {variance!r}")
    half = variance / 2.0
    return (rng.poisson(half, size) - rng.poisson(half, size)).astype(np.int64)


def to_field(vector: np.ndarray) -> np.ndarray:
    """Signed integers to their residues modulo ``2**MODULUS_BITS`` (int64 in [0, 2**32))."""
    return np.mod(np.asarray(vector, dtype=np.int64), _MODULUS)


def from_field(residues: np.ndarray) -> np.ndarray:
    """Residues back to signed integers in ``[-2**31, 2**31)``."""
    r = np.mod(np.asarray(residues, dtype=np.int64), _MODULUS)
    return np.where(r >= _MODULUS // 2, r - _MODULUS, r)


def skellam_rdp(alpha: float, *, variance: float, l1: float, l2: float) -> float:
    """Renyi DP of order ``alpha`` > 1 of the multivariate Skellam mechanism (Agarwal et
    al. 2021, Theorem 3.5): ``alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) /
    (16 mu^2), 3 l1 / (4 mu))``."""
    mu = variance
    return (alpha * l2 ** 2 / (2 * mu)
            + min(((2 * alpha - 1) * l2 ** 2 + 6 * l1) / (16 * mu ** 2), 3 * l1 / (4 * mu)))


def mechanism(plan: DistributedPlan, count: int = 1) -> DistributedSkellam:
    """The ledger's record of ``count`` rounds under ``plan`` (worst case: threshold sites)."""
    return DistributedSkellam(plan.variance, plan.l2, plan.l1, count)


@functools.lru_cache(maxsize=32)
def noise_multiplier_for(*, epsilon: float, delta: float, rounds: int, dim: int,
                         threshold: int, prior: tuple[Mechanism, ...] = ()) -> float:
    """The smallest noise multiplier (to 0.1%) at which ``rounds`` secure rounds, composed
    with the run's ``prior`` disclosures (its statistics release, charged or planned), fit
    ``epsilon`` at ``delta`` by the ledger's own accountant: the rounds get what the
    statistics leave.

    Raises:
        ValueError: the prior disclosures leave nothing, or no noise up to 10^4 times the
            sensitivity fits.
    """
    from privacy.accounting import compose_mechanisms

    if prior:
        before = compose_mechanisms(list(prior), delta=delta).epsilon
        if before >= epsilon:
            raise ValueError(f"the run's other disclosures already take epsilon {before:.4f} "
                             f"of its budget {epsilon:g}: nothing is left for training")

    def fits(z: float) -> bool:
        plan = DistributedPlan(clip=1.0, dim=dim, threshold=threshold, noise_multiplier=z)
        return compose_mechanisms([*prior, mechanism(plan, rounds)],
                                  delta=delta).epsilon <= epsilon

    low, high = 0.01, 1e4
    if not fits(high):
        raise ValueError(f"epsilon {epsilon:g} is too small for {rounds} secure rounds"
                         + (" after the run's statistics" if prior else ""))
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high
