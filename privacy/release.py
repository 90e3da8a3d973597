"""Noise for a statistics release, and DP-SGD noise for what a run has left after it.

Both are found with the ledger's own accountant (:func:`privacy.accounting.compose_mechanisms`,
dp-accounting's PLD), so what is charged is what was planned:

* :func:`gaussian_noise_multiplier`: the smallest noise (standard deviation over the L2
  sensitivity) whose one Gaussian release the ledger puts at or below an epsilon.
* :func:`noise_multiplier_after`: the DP-SGD noise multiplier of a run that has already
  disclosed (or will disclose) other mechanisms out of the same budget (its statistics):
  the smallest whose rounds, composed with those mechanisms, stay within the run's epsilon.
  With nothing else in the run it is :func:`privacy.dp.noise_multiplier_for_run` unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from privacy.accounting import compose_mechanisms
from privacy.dp import noise_multiplier_for_run, planned_steps
from privacy.mechanisms import DpSgd, GaussianRelease, Mechanism

__all__ = ["gaussian_noise_multiplier", "noise_multiplier_after", "statistics_release"]

# Bisection steps: the noise is found to a relative width of about 2**-30 of its bracket.
_BISECT: Final = 40
_TRAIN_BISECT: Final = 14


@functools.lru_cache(maxsize=128)
def gaussian_noise_multiplier(*, epsilon: float, delta: float) -> float:
    """The smallest noise multiplier z whose one Gaussian release (std = z x sensitivity)
    the ledger's accountant puts at or below ``epsilon`` at ``delta``.

    Raises:
        ValueError: epsilon not > 0 or delta not in (0, 1).
    """
    if not (isinstance(epsilon, int | float) and 0 < epsilon < float("inf")):
        raise ValueError(f"epsilon must be > 0; got {epsilon!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")

    def fits(z: float) -> bool:
        return compose_mechanisms([GaussianRelease(z, 1.0, 1)], delta=delta).epsilon <= epsilon

    low, high = 1e-3, 1.0
    while not fits(high):
        low, high = high, high * 2
        if high > 1e7:
            raise ValueError(f"no Gaussian noise reaches epsilon {epsilon} at delta {delta}")
    for _ in range(_BISECT):
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def statistics_release(*, n_features: int, epsilon: float, delta: float) -> GaussianRelease:
    """The Gaussian release of a statistics phase over ``n_features`` features that costs
    ``epsilon`` at ``delta``: what each site charges and adds, and what the coordinator
    states as the reference's noise. It depends on the run's settings only, never on data.
    """
    from fedward.statistics import l2_sensitivity

    sensitivity = l2_sensitivity(n_features)
    z = gaussian_noise_multiplier(epsilon=float(epsilon), delta=float(delta))
    return GaussianRelease(noise_std=z * sensitivity, l2_sensitivity=sensitivity, count=1)


def noise_multiplier_after(*, prior: Sequence[Mechanism], epsilon: float, delta: float,
                           sample_rate: float, total_epochs: int) -> float:
    """The DP-SGD noise multiplier of a run whose budget also pays for ``prior``.

    The smallest sigma (to about 0.1%) such that the ledger composes ``prior`` with every
    planned round (``DpSgd(sigma, sample_rate, planned steps)``) at or below ``epsilon``:
    the run's statistics and its training share one budget, and training gets what the
    statistics leave. Without ``prior`` this is :func:`noise_multiplier_for_run`.

    Args:
        prior: the run's other mechanisms (charged already, or planned before round 1).
        epsilon: the run's whole epsilon budget at this site.
        delta: the run's delta.
        sample_rate: Poisson sampling rate per step.
        total_epochs: all local epochs of the run (rounds x local epochs).

    Raises:
        ValueError: nothing is left for training, or an argument is out of range.
    """
    sigma_all = noise_multiplier_for_run(epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                                         total_epochs=total_epochs)
    if not prior:
        return sigma_all
    return _after(tuple(prior), float(epsilon), float(delta), float(sample_rate),
                  int(total_epochs), sigma_all)


@functools.lru_cache(maxsize=128)
def _after(prior: tuple[Mechanism, ...], epsilon: float, delta: float, sample_rate: float,
           total_epochs: int, sigma_all: float) -> float:
    before = compose_mechanisms(prior, delta=delta).epsilon
    if before >= epsilon:
        raise ValueError(f"the run's other disclosures already take epsilon {before:.4f} of "
                         f"its budget {epsilon:g}: nothing is left for training")
    steps = planned_steps(sample_rate=sample_rate, epochs=total_epochs)

    def fits(sigma: float) -> bool:
        return compose_mechanisms([*prior, DpSgd(sigma, sample_rate, steps)],
                                  delta=delta).epsilon <= epsilon

    # The whole budget's sigma is too small now; find a larger one that fits, then bisect.
    low, high = sigma_all, sigma_all * 1.25
    while not fits(high):
        low, high = high, high * 1.5
        if high > 1e4:
            raise ValueError(f"no noise multiplier keeps the run within epsilon {epsilon:g} "
                             f"after {before:.4f} of it went to its other disclosures")
    for _ in range(_TRAIN_BISECT):
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high
