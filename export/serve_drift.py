"""``fedward-serve``'s drift gauges: the inputs it answered lately against the release's reference.

A release bundle may ship ``reference_statistics.json``: the study's federated, DP-noised
histogram of every input feature (:mod:`fedward.reference`), the reference the sites'
drift checks compare their recent data with. The service keeps, per feature, the counts of
the last ``window`` rows it answered, binned on exactly those edges (:class:`DriftWindow`:
a ring of each row's bin per feature, preallocated, ``window x features`` small integers,
so memory is bounded and a request only adds its rows' bins), and when ``/metrics`` is
scraped scores each feature's counts against the reference with the PSI of the site's
checks (:func:`fedward.drift_psi.psi`, the reference's DP noise raising its floor):

* ``fedward_serve_drift_psi{feature=...}``: a feature's PSI, shown once the window holds
  :data:`MIN_ROWS` values of it (fewer make a PSI that is mostly sampling noise); above
  :data:`fedward.drift_psi.PSI_ALARM` (0.25, the coordinator's drift alarm) the inputs of
  that feature no longer look like the study's.
* ``fedward_serve_drift_window_rows``: the rows in the window.

A release without reference statistics (trained without the statistics phase), or whose
reference is unusable, gets no drift gauges; :func:`drift_for` says why in one line for the
startup log and ``/health``. Labels are feature names; no input value is kept beyond its
bin, logged or exported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from export.bundle_format import BundleError
from export.bundle_verify import VerifiedBundle
from fedward.drift_psi import PSI_ALARM, bin_index, noise_floor, psi
from fedward.reference import Reference, parse_reference
from fedward.statistics import REFERENCE_FILE

__all__ = ["DEFAULT_WINDOW", "DRIFT_METRIC_NAMES", "MAX_WINDOW", "MIN_ROWS", "DriftCollector",
           "DriftWindow", "drift_for"]

DEFAULT_WINDOW: Final = 1000    # answered rows kept (their bins only)
MIN_ROWS: Final = 200           # a feature's values in the window before its PSI is shown
MAX_WINDOW: Final = 100_000     # bounds memory: window x features x 2 bytes
PSI_NAME: Final = "fedward_serve_drift_psi"
ROWS_NAME: Final = "fedward_serve_drift_window_rows"
DRIFT_METRIC_NAMES: Final = frozenset({PSI_NAME, ROWS_NAME})


class DriftWindow:
    """Per feature, the bin counts of the last ``size`` answered rows, and their PSI.

    Args:
        release_id: The release whose reference this is.
        reference: Its reference statistics.
        columns: The model's input columns, in input order.
        size: Rows kept (at least :data:`MIN_ROWS`, at most :data:`MAX_WINDOW`).

    Raises:
        ValueError: ``size`` is out of bounds, or a reference feature is not an input.
    """

    def __init__(self, *, release_id: str, reference: Reference, columns: Sequence[str],
                 size: int = DEFAULT_WINDOW) -> None:
        if not MIN_ROWS <= size <= MAX_WINDOW:
            raise ValueError(f"the drift window must hold {MIN_ROWS} to {MAX_WINDOW} rows, "
                             f"not {size}")
        missing = [f.name for f in reference.features if f.name not in columns]
        if missing:
            raise ValueError(f"its feature(s) {', '.join(missing[:5])} are not inputs of the "
                             "model")
        self.release_id = release_id
        self.size = size
        self.names = tuple(f.name for f in reference.features)
        self._cols = [list(columns).index(n) for n in self.names]
        self._edges = [f.edges for f in reference.features]
        self._bins = [len(f.counts) for f in reference.features]
        width = max(self._bins)
        self._reference = np.zeros((len(self.names), width))
        for j, f in enumerate(reference.features):
            self._reference[j, :len(f.counts)] = f.counts
        self._ref_noise = reference.noise_std or 0.0
        self._offsets = np.arange(len(self.names), dtype=np.int64) * width
        # Each kept row's bin per feature (-1: missing, or a slot not yet filled); bins are
        # at most fedward.reference.MAX_BINS, so int16 holds them.
        self._slots = np.full((size, len(self.names)), -1, dtype=np.int16)
        self._counts = np.zeros((len(self.names), width), dtype=np.int64)
        self._next = 0
        self._rows = 0
        self._lock = threading.Lock()

    def _tally(self, bins: np.ndarray) -> np.ndarray:
        flat = (bins.astype(np.int64) + self._offsets)[bins >= 0]
        return np.bincount(flat, minlength=self._counts.size).reshape(self._counts.shape)

    def add(self, x: np.ndarray) -> None:
        """Count answered rows into the window, dropping its oldest rows.

        Args:
            x: The rows, shape ``(n, inputs)`` (NaN: a missing value, not counted).
        """
        rows = x[-self.size:]    # only the last ``size`` rows can stay
        if not len(rows):
            return
        bins = np.stack([bin_index(rows[:, c], e) for c, e in zip(self._cols, self._edges,
                                                                    strict=True)], axis=1)
        with self._lock:
            at = (self._next + np.arange(len(rows))) % self.size
            self._counts -= self._tally(self._slots[at])
            self._counts += self._tally(bins)
            self._slots[at] = bins
            self._next = int(at[-1] + 1) % self.size
            self._rows = min(self.size, self._rows + len(rows))

    def scores(self) -> tuple[int, dict[str, float]]:
        """The rows in the window, and the PSI of each feature with :data:`MIN_ROWS` values.

        Returns:
            ``(rows, {feature: psi})``.
        """
        with self._lock:
            rows, counts = self._rows, self._counts.copy()
        found = {}
        for j, name in enumerate(self.names):
            observed, ref = counts[j, :self._bins[j]], self._reference[j, :self._bins[j]]
            if observed.sum() >= MIN_ROWS:
                found[name] = psi(observed, ref, floor=noise_floor(
                    observed, ref, ref_noise_std=self._ref_noise))
        return rows, found


def drift_for(bundle: VerifiedBundle, columns: Sequence[str], size: int
              ) -> tuple[DriftWindow | None, str]:
    """The drift window of a verified release, or None; and one line saying which and why.

    Never raises for the reference's sake: a release without (usable) reference statistics
    is served all the same, without drift gauges.
    """
    if REFERENCE_FILE not in bundle.files:
        return None, (f"drift not scored: release {bundle.release_id} has no {REFERENCE_FILE} "
                      "(trained without the statistics phase)")
    try:
        reference = parse_reference(bundle.read_verified(REFERENCE_FILE))
        window = DriftWindow(release_id=bundle.release_id, reference=reference,
                             columns=columns, size=size)
    except (BundleError, ValueError) as err:
        return None, f"drift not scored: the release's {REFERENCE_FILE} is not usable: {err}"
    return window, (f"drift scored: the last {size} answered rows against the release's "
                    f"reference statistics ({len(window.names)} features; a PSI from "
                    f"{MIN_ROWS} rows; above {PSI_ALARM:g} a feature has drifted)")


class DriftCollector(Collector):
    """The drift gauges, computed at each scrape from the window being served (if any)."""

    def __init__(self, window: Callable[[], DriftWindow | None]) -> None:
        self._window = window

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        window = self._window()
        if window is None:
            return
        rows, scores = window.scores()
        psi_family, rows_family = self._families()
        rows_family.add_metric([], float(rows))
        for name, value in scores.items():
            psi_family.add_metric([name], value)
        yield psi_family
        yield rows_family

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily(PSI_NAME, "Population stability index of the recently "
                                  "answered inputs against the release's reference, by "
                                  f"feature (above {PSI_ALARM:g}: drifted).",
                                  labels=["feature"]),
                GaugeMetricFamily(ROWS_NAME, "Answered rows in the drift window."))
