"""The federated statistics phase: what both sides agree on, and the reference format.

Before round 1 of a run with ``statistics`` on, every site releases, for each input feature
of the task, a histogram over fixed edges, the number of rows with a value, the number of
missing values, and the clipped sums of the value and of its square, all with Gaussian
noise charged to its privacy ledger (``site_agent.statistics``). The coordinator sums the
sites' noised releases (``coordinator.run_statistics``) and keeps them with the run; a
release of such a run ships them as ``reference_statistics.json`` (:func:`reference_document`).

The histogram edges come from the study's plausible range of each feature (the ``range`` of
a numeric feature in the spec, which is also the model's input scaling; for categorical,
boolean and ordinal inputs the encoded column's range, e.g. [0, 1] for a one-hot level).
Every feature of a study has such a range, so the edges never depend on any site's data.
Values outside the range count in the first or last bin and are clipped to it for the sums.

One release of a site is ONE float64 array of shape ``(features, BINS + 4)``
(:data:`STATISTICS_ARRAY`), columns :data:`COLUMNS`: the ``BINS`` bin counts, then rows
with a value, missing values, the sum of ``u`` and the sum of ``u**2``, where
``u = (clip(x, low, high) - low) / (high - low)`` lies in [0, 1]. Scaling every feature to
[0, 1] gives each coordinate the same sensitivity (1), so one noise scale serves them all
(see :func:`l2_sensitivity`).

This module imports no torch, no flwr and no privacy code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from fedward.tasks import TaskRef

__all__ = [
    "BINS",
    "COLUMNS",
    "DEFAULT_SHARE",
    "MAX_SHARE",
    "REFERENCE_FILE",
    "REFERENCE_FORMAT",
    "REFERENCE_VERSION",
    "STATISTICS_ARRAY",
    "FeatureBins",
    "expected_shape",
    "feature_bins",
    "feature_names",
    "l2_sensitivity",
    "reference_document",
    "study_identity",
]

BINS: Final = 10
# Column names of a release's array, in order (after the BINS bin counts).
COLUMNS: Final = ("present", "missing", "sum", "sumsq")
STATISTICS_ARRAY: Final = "statistics"     # the one array of a site's reply
REFERENCE_FILE: Final = "reference_statistics.json"
REFERENCE_FORMAT: Final = "fedward-reference-statistics"
REFERENCE_VERSION: Final = 1
# The share of a run's epsilon the statistics may spend: 10% unless the run says otherwise,
# and never more than half (the rest is for training).
DEFAULT_SHARE: Final = 0.1
MAX_SHARE: Final = 0.5
# Below this many (noised) rows with a value, a mean and standard deviation are not stated.
_MIN_ROWS_FOR_MOMENTS: Final = 2.0


@dataclass(frozen=True)
class FeatureBins:
    """One input feature's fixed histogram.

    Attributes:
        name: the model input's column name.
        low: the plausible range's low end (the first edge).
        high: its high end (the last edge).
    """

    name: str
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    def edges(self) -> list[float]:
        """The ``BINS + 1`` increasing edges, equally spaced over the range."""
        return [float(e) for e in np.linspace(self.low, self.high, BINS + 1)]


@functools.lru_cache(maxsize=16)
def _spec(task: str) -> Any:
    from fedward.study import load_spec
    from fedward.tasks import EXAMPLE_STUDIES, example_spec_path

    if task not in EXAMPLE_STUDIES:
        raise ValueError(f"task {task!r} has no study spec with plausible ranges "
                         f"(known: {', '.join(EXAMPLE_STUDIES)})")
    return load_spec(example_spec_path(task), check_dp=False)


def feature_bins(task: TaskRef) -> tuple[FeatureBins, ...]:
    """The fixed bins of every input feature of ``task``, in the model's input order.

    ``task`` is a shipped task's name (its example spec's ranges) or a study's task
    (:func:`fedward.tasks.study_task`): its encoded input columns with the ranges its spec
    declares (a numeric feature's plausible range; [0, 1] for a one-hot level or a boolean;
    [0, levels - 1] for an ordinal), so the bins of a study of one's own come from its spec
    alone, like those of the shipped tasks.

    Raises:
        ValueError: the task has no study spec (so no plausible ranges).
    """
    if not isinstance(task, str):
        if len(task.input_ranges) != len(task.feature_columns) or not task.feature_columns:
            raise ValueError(f"task {task.name!r} declares no plausible range per input "
                             "column; only a study's task (a spec) has them")
        return tuple(FeatureBins(name, float(lo), float(hi)) for name, (lo, hi)
                     in zip(task.feature_columns, task.input_ranges, strict=True))
    return tuple(FeatureBins(name, float(lo), float(hi))
                 for name, lo, hi in _spec(task).input_columns())


def study_identity(task: str, study: str | None, study_hash: str | None) -> dict[str, str]:
    """``{"name", "hash"}`` of what a run trains: its pinned study, else the shipped spec."""
    if study is not None and study_hash is not None:
        return {"name": study.split("@", 1)[0], "hash": f"sha256:{study_hash}"}
    return {"name": task, "hash": f"sha256:{_spec(task).content_hash()}"}


def l2_sensitivity(n_features: int) -> float:
    """The most one row changes a site's whole release, in L2 norm: ``2 * sqrt(features)``.

    Neighbouring data sets differ by one row, added or removed (the accountant's
    add-or-remove neighbours). Per feature, that row is either missing (the missing count
    changes by 1: L2 change 1) or has a value ``x`` (its bin's count and the rows with a
    value change by 1 each, the sum by ``u`` and the sum of squares by ``u**2``, where
    ``u`` in [0, 1] is ``x`` clipped to the range and scaled: L2 change squared at most
    ``1 + 1 + 1 + 1 = 4``). A row touches every feature once, so the whole release changes
    by at most ``sqrt(4 * features)``. No other coordinate depends on the row: bins are
    fixed in advance, and clipping keeps an outlier from weighing more than any other row.
    """
    if n_features < 1:
        raise ValueError(f"a release needs at least one feature, got {n_features}")
    return 2.0 * math.sqrt(n_features)


def _feature_entry(bins: FeatureBins, row: np.ndarray) -> dict[str, Any]:
    counts = [max(0.0, float(v)) for v in row[:BINS]]
    present, missing, total, total_sq = (float(v) for v in row[BINS:BINS + 4])
    present_c, missing_c = max(0.0, present), max(0.0, missing)
    mean: float | None = None
    std: float | None = None
    if present_c >= _MIN_ROWS_FOR_MOMENTS:
        # Post-processing of noised sums only: clipped into what the range allows.
        mean_u = min(max(total / present_c, 0.0), 1.0)
        var_u = min(max(total_sq / present_c - mean_u * mean_u, 0.0), 0.25)
        mean = bins.low + bins.width * mean_u
        std = bins.width * math.sqrt(var_u)
    return {"name": bins.name, "edges": bins.edges(), "counts": counts,
            "n": present_c + missing_c, "missing": missing_c, "mean": mean, "std": std}


def reference_document(*, run_id: int, study: Mapping[str, str], epsilon: float,
                       delta: float, sites: int, task: TaskRef,
                       total: np.ndarray, site_noise_std: float | None = None
                       ) -> dict[str, Any]:
    """The reference statistics of a run (format version 1) from the sum of the sites' releases.

    ``counts``, ``n`` and ``missing`` are clipped at 0; ``n`` counts every row (with a value
    or missing); ``mean`` and ``std`` come from the clipped sums (None below 2 rows).

    Args:
        run_id: the run.
        study: ``{"name", "hash"}`` (:func:`study_identity`).
        epsilon: what each site spent on its release.
        delta: the run's delta.
        sites: how many sites' releases are summed.
        task: the task (its features and bins): a shipped task's name or a study's task.
        total: the summed releases, shape ``(features, BINS + 4)``.
        site_noise_std: the Gaussian noise std each site added to every value of its
            release (it depends on the run's settings only); the document then states
            ``privacy.noise_std``, the noise std of each summed count (``sqrt(sites)`` times
            it), which a drift check needs to tell noise from drift.
    """
    bins = feature_bins(task)
    if total.shape != (len(bins), BINS + len(COLUMNS)):
        raise ValueError(f"summed statistics have shape {list(total.shape)}, expected "
                         f"{[len(bins), BINS + len(COLUMNS)]}")
    return {
        "format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "run_id": int(run_id),
        "study": dict(study),
        "privacy": {"mechanism": "gaussian", "epsilon": float(epsilon),
                    "delta": float(delta), "sites": int(sites),
                    **({} if site_noise_std is None else
                       {"noise_std": float(site_noise_std) * math.sqrt(sites)})},
        "features": [_feature_entry(b, total[i]) for i, b in enumerate(bins)],
    }


def expected_shape(task: TaskRef) -> tuple[int, int]:
    """The shape of one site's release for ``task``."""
    return len(feature_bins(task)), BINS + len(COLUMNS)


def feature_names(task: TaskRef) -> Sequence[str]:
    """The task's input features, in release order."""
    return [b.name for b in feature_bins(task)]
