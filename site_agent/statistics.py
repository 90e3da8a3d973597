"""The site's side of the statistics phase: a DP release of its data's statistics.

Before round 1 of a run with ``statistics`` on, the coordinator asks each site for the
statistics of its training rows (:data:`fedward.wire.STATISTICS_ACTION`). The site:

1. works out the release's Gaussian mechanism from the run's settings alone (the share of
   epsilon it may spend, the run's delta, the task's number of input features): no row is
   read for it (:func:`statistics_mechanism`);
2. reserves it in its privacy ledger, under the run's budget (the smaller of it and the
   project's cap), the project's cap and the site-wide cap; refused, with the figures,
   if any would be exceeded, and then no row is read (:class:`StatisticsRefusal`);
3. computes per feature (:mod:`fedward.statistics`) the histogram over fixed bins, the
   rows with a value, the missing values and the clipped sums of ``u`` and ``u**2``
   (:func:`exact_sums`), adds Gaussian noise of the charged standard deviation to every
   coordinate (:func:`noised`), marks the entry charged, and keeps the noised answer, so
   that a repeated question is answered with the same numbers (a fresh draw would be a
   second release for one charge);
4. hands the answer to the egress guard (``site_agent.egress.check_statistics_reply``),
   which lets out only the one array of noised values and two figures of the mechanism.

Sensitivity (see :func:`fedward.statistics.l2_sensitivity`): one row, added or removed,
changes per feature either the missing count by 1, or one bin count, the rows with a value,
the clipped sum and the clipped sum of squares by at most 1 each (values are clipped to the
feature's plausible range and scaled to [0, 1]); over ``F`` features the release moves by
at most ``2 * sqrt(F)`` in L2 norm. Gaussian noise of standard deviation ``z * 2 * sqrt(F)``
on every coordinate, with ``z`` found by the ledger's own accountant for the share of
epsilon (:func:`privacy.release.gaussian_noise_multiplier`), is then exactly the charged
:class:`~privacy.mechanisms.GaussianRelease`. Noise is drawn with numpy's PCG64 from fresh
operating-system entropy (never stored, never chosen by the coordinator).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from fedward.files import atomic_write
from fedward.statistics import (
    BINS,
    COLUMNS,
    STATISTICS_ARRAY,
    FeatureBins,
    feature_bins,
)
from fedward.wire import CFG, SiteErrorCode
from privacy import BudgetExceededError, Caps, GaussianRelease, Mechanism, PrivacyLedger
from privacy.release import statistics_release

if TYPE_CHECKING:
    from fedward.tasks import TaskRef

__all__ = [
    "PURPOSE",
    "RELEASE_KEY",
    "StatisticsRefusal",
    "exact_sums",
    "noised",
    "pending_statistics",
    "release_statistics",
    "run_statistics_mechanisms",
    "statistics_mechanism",
    "statistics_prior",
]

PURPOSE: Final = "statistics"
RELEASE_KEY: Final = "release"   # one statistics release per run


class StatisticsRefusal(Exception):
    """The site does not release statistics for this task; ``code`` is a SiteErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


def statistics_mechanism(*, task: TaskRef, epsilon: float, delta: float
                         ) -> GaussianRelease:
    """The Gaussian release of ``task``'s statistics that costs ``epsilon`` at ``delta``.

    Depends on the run's settings and the task only (a shipped task's name, or a study's
    task: :func:`fedward.statistics.feature_bins`), never on the data.
    """
    return statistics_release(n_features=len(feature_bins(task)), epsilon=epsilon,
                              delta=delta)


def _wanted(config: Mapping[str, Any]) -> tuple[float, float, str] | None:
    """(share, delta, task) when the run has a statistics phase; None otherwise."""
    if config.get(CFG.STATISTICS) is not True:
        return None
    try:
        share = float(config[CFG.STATISTICS_EPSILON])
        delta = float(config[CFG.DELTA])
        task = str(config[CFG.TASK])
    except (KeyError, TypeError, ValueError):
        return None
    if not (share > 0 and 0 < delta < 1):
        return None
    return share, delta, task


def run_statistics_mechanisms(ledger: PrivacyLedger, run_id: str) -> list[Mechanism]:
    """The statistics mechanisms already reserved for ``run_id`` (empty if none)."""
    run = ledger.get_run(run_id)
    if run is None:
        return []
    return [e.mechanism for e in run.entries if e.purpose == PURPOSE]


def pending_statistics(ledger: PrivacyLedger, config: Mapping[str, Any],
                       task: TaskRef | None = None) -> list[Mechanism]:
    """The run's statistics release, when it has one planned that this site has not made.

    Admission and a first round plan for it, so that training gets what it leaves. A run
    that trains at a site before the site released (it was offline for the phase) still
    plans for it: a little more noise than needed, never less.

    Args:
        ledger: the site's privacy ledger.
        config: the task message's configuration.
        task: the site's task when it is a study's (its spec gives the features); None:
            the shipped task the configuration names.
    """
    wanted = _wanted(config)
    run_id = str(config.get(CFG.RUN_ID))
    if wanted is None or run_statistics_mechanisms(ledger, run_id):
        return []
    run = ledger.get_run(run_id)
    if run is not None and run.trains:
        return []  # trains already: no statistics release any more (release_statistics)
    share, delta, named = wanted
    return [statistics_mechanism(task=named if task is None else task, epsilon=share,
                                 delta=delta)]


def statistics_prior(ledger: PrivacyLedger, config: Mapping[str, Any],
                     task: TaskRef | None = None) -> tuple[Mechanism, ...]:
    """What a run's rounds share its budget with at this site: its statistics release,
    charged, or planned while no round was reserved (:func:`pending_statistics`). The noise
    of its rounds is sized for what that leaves."""
    return (*run_statistics_mechanisms(ledger, str(config.get(CFG.RUN_ID))),
            *pending_statistics(ledger, config, task))


def _unit(x: np.ndarray, bins: FeatureBins) -> np.ndarray:
    """Values clipped to the plausible range and scaled to [0, 1]."""
    out: np.ndarray = (np.clip(x, bins.low, bins.high) - bins.low) / bins.width
    return out


def exact_sums(features: np.ndarray, bins: Sequence[FeatureBins]) -> np.ndarray:
    """The exact (un-noised) release of ``features``: shape ``(F, BINS + 4)``, float64.

    NEVER let this leave the site: :func:`noised` is what may. NaN is a missing value;
    values outside the range fall in the first or last bin and are clipped for the sums.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(bins):
        raise ValueError(f"features have shape {list(x.shape)}; expected (rows, {len(bins)})")
    out = np.zeros((len(bins), BINS + len(COLUMNS)), dtype=np.float64)
    for j, b in enumerate(bins):
        column = x[:, j]
        present = column[~np.isnan(column)]
        u = _unit(present, b)
        index = np.minimum((u * BINS).astype(np.int64), BINS - 1)
        out[j, :BINS] = np.bincount(index, minlength=BINS)
        out[j, BINS:] = (present.size, column.size - present.size, u.sum(), (u * u).sum())
    return out


def noised(exact: np.ndarray, *, noise_std: float,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """``exact`` plus independent Gaussian noise of ``noise_std`` on every coordinate."""
    if not noise_std > 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std!r}")
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    out: np.ndarray = exact + rng.normal(0.0, noise_std, size=exact.shape)
    return out


@dataclass(frozen=True)
class _Stored:
    arrays: np.ndarray
    epsilon_after: float
    noise_std: float


def _store_path(replies_dir: Path, run_id: str) -> Path:
    import hashlib

    return replies_dir / f"{hashlib.sha256(run_id.encode()).hexdigest()[:16]}-statistics.json"


def _load(path: Path) -> _Stored | None:
    try:
        doc = json.loads(path.read_text())
        return _Stored(np.asarray(doc["values"], dtype=np.float64),
                       float(doc["epsilon_after"]), float(doc["noise_std"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def release_statistics(*, ledger: PrivacyLedger, config: Mapping[str, Any],
                       features: Callable[[], np.ndarray], caps: Caps, replies_dir: Path,
                       audit: Callable[[str, dict[str, Any]], None], task: TaskRef
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Charge, compute and noise the run's statistics release (see the module docstring).

    Args:
        ledger: the site's privacy ledger.
        config: the task message's configuration.
        features: returns the training rows' features; called only once charged.
        caps: the site's caps for the run's project and the site.
        replies_dir: where the noised answer is kept for a repeated question.
        audit: the site's audit log writer.
        task: the task the site holds data for: a shipped task's name, or its study's
            task (:func:`fedward.tasks.study_task`, built from the site's own copy of the
            spec), whose spec gives the features and their bins.

    Returns:
        The answer (metrics) and its one array, for the egress guard.

    Raises:
        StatisticsRefusal: the run has no statistics phase, trains already, or a budget
            would be exceeded (then nothing was read and nothing charged).
    """
    wanted = _wanted(config)
    if wanted is None:
        raise StatisticsRefusal(SiteErrorCode.BAD_TASK,
                                "bad-task: this run has no statistics phase (statistics "
                                "off, or its epsilon share missing)")
    share, delta, config_task = wanted
    task_name = task if isinstance(task, str) else task.name
    if config_task != task_name:
        raise StatisticsRefusal(SiteErrorCode.REFUSED_POLICY,
                                f"refused-policy: this site holds data for task "
                                f"{task_name!r}, not {config_task!r}")
    try:
        run_id = str(config[CFG.RUN_ID])
        project = str(config[CFG.PROJECT])
        epsilon = float(config[CFG.EPSILON])
    except (KeyError, TypeError, ValueError) as err:
        raise StatisticsRefusal(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}"
                                ) from None
    path = _store_path(replies_dir, run_id)
    stored = _load(path)
    if stored is not None:
        audit("statistics-replayed", {"run": run_id})
        return _answer(stored)
    run = ledger.get_run(run_id)
    if run is None:
        ledger.open_run(run_id=run_id, project=project, epsilon_budget=epsilon, delta=delta)
    elif run.trains:
        raise StatisticsRefusal(
            SiteErrorCode.REFUSED_POLICY,
            f"refused-policy: run {run_id} trains at this site already; its statistics come "
            "before its first round, never after (its noise was planned without them)")
    else:
        delta = run.delta
    mechanism = statistics_mechanism(task=task, epsilon=share, delta=delta)

    def record(epsilon_after: float) -> None:
        # Inside the reservation, after its checks and before the commit (as for rounds).
        audit("statistics-reserved", {"run": run_id, "epsilon_after": epsilon_after,
                                      "mechanism": mechanism.to_dict()})

    try:
        reservation = ledger.reserve(run_id=run_id, purpose=PURPOSE, key=RELEASE_KEY,
                                     mechanism=mechanism, caps=caps, on_charge=record)
    except BudgetExceededError as err:
        raise StatisticsRefusal(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}"
                                ) from None
    # Charged (write-ahead): only now is a row read.
    values = noised(exact_sums(features(), feature_bins(task)), noise_std=mechanism.noise_std)
    entry = ledger.charge(run_id=run_id, purpose=PURPOSE, key=RELEASE_KEY)
    stored = _Stored(values, entry.epsilon_after, mechanism.noise_std)
    atomic_write(path, json.dumps({"run": run_id, "values": values.tolist(),
                                   "epsilon_after": stored.epsilon_after,
                                   "noise_std": stored.noise_std}).encode(), mode=0o600)
    audit("statistics-released", {"run": run_id, "epsilon_after": entry.epsilon_after,
                                  "new": reservation.new, "features": int(values.shape[0]),
                                  "noise_std": mechanism.noise_std})
    return _answer(stored)


def _answer(stored: _Stored) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return ({"metrics": {"statistics-noise-std": stored.noise_std,
                         "epsilon-spent": stored.epsilon_after}},
            {STATISTICS_ARRAY: stored.arrays})
