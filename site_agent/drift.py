"""The site's drift check of a released model: its recent data against the release.

:func:`run_check` verifies the release bundle (the existing bundle verification, against
the release key and, where given, the revocation list), reads the reference statistics
shipped inside it (``reference_statistics.json``: the study's federated DP histograms,
never one site's raw statistics), reads the site's recent rows as its training data is read
(:mod:`site_agent.drift_rows`: a CSV file, every ``*.csv`` in a folder, or a data
connector; through the site's schema or its study mapping), and computes per feature
the PSI and the two-sample chi-square test against the reference
(:mod:`site_agent.drift_stats`), and, where the rows carry labels, the release's accuracy
and AUC with its ONNX model under ONNX Runtime. The whole result stays at the site
(:meth:`DriftResult.table`).

:func:`disclose` turns a result into the report that may leave (:mod:`fedward.drift_wire`):
scores only, computed from counts noised as the site's policy says (or exact, where the
policy explicitly allows an unnoised disclosure), with the mechanism to charge to the
ledger. Every failure is a :class:`DriftCheckError` with a kind and a reason; nothing here
crashes on bad data.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle_format import SERVING_FILE, BundleError
from export.bundle_verify import VerifiedBundle, verify_bundle
from fedward.drift_psi import bin_counts
from fedward.drift_wire import REPORT_FORMAT, REPORT_VERSION
from fedward.reference import Reference, ReferenceFeature, parse_reference
from fedward.statistics import REFERENCE_FILE
from privacy.mechanisms import GaussianRelease, LaplaceRelease, Mechanism
from privacy.roc_auc import binary_auc
from site_agent.data_schema import DataSchema
from site_agent.drift_errors import DriftCheckError
from site_agent.drift_policy import DriftDisclosure
from site_agent.drift_rows import RecentData, read_recent, recent_data
from site_agent.drift_stats import (
    SCORE_BINS,
    FeatureScore,
    auc_from_histograms,
    feature_score,
    row_bucket,
)

__all__ = ["REFERENCE_FILE", "DriftCheckError", "DriftResult", "Reference",
           "ReferenceFeature", "disclose", "failed_report", "load_reference", "run_check"]


def _bad(reason: str) -> DriftCheckError:
    return DriftCheckError("bad-reference-statistics", f"{REFERENCE_FILE} in the release "
                           f"is not usable: {reason}; ask the ML team for a release whose "
                           "statistics phase completed")


def load_reference(bundle: VerifiedBundle) -> Reference:
    """The reference statistics of a verified bundle, checked (every problem raises).

    Raises:
        DriftCheckError: ``no-reference-statistics`` when the bundle has none,
            ``bad-reference-statistics`` when they are malformed.
    """
    if REFERENCE_FILE not in bundle.files:
        raise DriftCheckError("no-reference-statistics", f"release {bundle.release_id} was "
                              "trained without the statistics phase (its bundle has no "
                              f"{REFERENCE_FILE}); relaunch with statistics on")
    try:
        return parse_reference(bundle.read_verified(REFERENCE_FILE))
    except BundleError as err:
        raise _bad(f"changed since verification ({err})") from None
    except ValueError as err:
        raise _bad(str(err)) from None


@dataclass(frozen=True)
class DriftResult:
    """The whole result of one check (stays at the site; :func:`disclose` picks what leaves).

    Attributes:
        release_id: The release checked.
        project: The release's project.
        names: The features compared, in the reference's order.
        observed: Each feature's counts on the reference bins.
        reference: Each feature's reference counts.
        scores: Each feature's exact scores.
        n_rows: Rows read.
        correct: Correct predictions (None: the rows carry no labels).
        score_hist: Per class (0, 1), counts of P(class 1) on :data:`SCORE_BINS` bins
            (None: no labels or not a two-class task).
        accuracy: Exact accuracy on the labelled rows.
        auc: Exact AUC on the labelled rows (two-class tasks).
        ref_noise_std: The reference counts' noise std taken into account (0: none known).
        source: The kind of connector the rows were read through (``csv``, ``sql``...).
    """

    release_id: str
    project: str
    names: tuple[str, ...]
    observed: tuple[np.ndarray, ...]
    reference: tuple[np.ndarray, ...]
    scores: Mapping[str, FeatureScore]
    n_rows: int
    correct: int | None
    score_hist: np.ndarray | None
    accuracy: float | None
    auc: float | None
    ref_noise_std: float = 0.0
    source: str = "csv"

    def table(self) -> list[dict[str, Any]]:
        """Per feature, every figure, for the site's own screen."""
        return [{"feature": name, "psi": s.psi, "chi2": s.chi2, "dof": s.dof,
                 "p_value": s.p_value, "rows": int(obs.sum())}
                for name, obs in zip(self.names, self.observed, strict=True)
                for s in [self.scores[name]]]


def _model_figures(bundle: VerifiedBundle, x: np.ndarray, y: np.ndarray
                   ) -> tuple[int, np.ndarray | None, float, float | None]:
    """Correct predictions, class score histograms, accuracy, AUC of the bundle's model."""
    from export.parity import load_onnx_bytes

    try:
        predictor = load_onnx_bytes(bundle.read_verified(SERVING_FILE))
        logits = np.asarray(predictor(x), dtype=np.float64)
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise DriftCheckError("model-failed", f"the release's {SERVING_FILE} could not "
                              f"score the recent rows: {err}") from None
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    correct = int((probs.argmax(axis=1) == y).sum())
    if probs.shape[1] != 2:
        return correct, None, correct / len(y), None
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    hist = np.stack([bin_counts(probs[y == c, 1], edges) for c in (0, 1)])
    auc = float(binary_auc(y, probs[:, 1])) if len(set(y.tolist())) == 2 else None
    return correct, hist, correct / len(y), auc


def run_check(*, bundle_dir: Path, public_key: Path, data: Path | RecentData,
              schema: DataSchema | None = None, revoked: frozenset[str] = frozenset(),
              site_noise_std: Callable[[Any], float | None] | None = None) -> DriftResult:
    """Check the site's recent data against a release (see the module docstring).

    Args:
        bundle_dir: The release bundle folder.
        public_key: The release public key.
        data: The recent rows (:func:`site_agent.drift_rows.recent_data`), or a CSV file
            of them or a folder of such files, in ``schema``.
        schema: The site's data schema, with a path as ``data``.
        revoked: Revoked release ids (from the coordinator's signed revocation list).
        site_noise_std: Given the reference's run id, the noise std one site added to its
            statistics release in that run (this site's ledger knows its own), when the
            reference file does not state the summed noise; the sum's is then
            ``sqrt(sites)`` times it.

    Returns:
        The whole result.

    Raises:
        DriftCheckError: With the failure's kind and reason.
    """
    try:
        bundle = verify_bundle(bundle_dir=bundle_dir, public_key=public_key, revoked=revoked)
    except (BundleError, OSError, ValueError) as err:
        raise DriftCheckError("bundle-unverified", f"the release bundle {bundle_dir} does "
                              f"not verify: {err}") from None
    reference = load_reference(bundle)
    ref_std = reference.noise_std
    if ref_std is None and site_noise_std is not None:
        own = site_noise_std(reference.run_id)
        ref_std = None if own is None else own * math.sqrt(reference.sites)
    ref_std = ref_std or 0.0
    if not isinstance(data, RecentData):
        assert schema is not None
        data = recent_data(data, root=Path.cwd(), schema=schema)
    columns = list(bundle.model_card.get("input", {}).get("columns", data.columns))
    x, y = read_recent(data)
    names, observed, ref, scores = [], [], [], {}
    for feature in reference.features:
        if feature.name not in columns:
            raise _bad(f"feature {feature.name!r} is not an input of the release")
        counts = bin_counts(x[:, columns.index(feature.name)], feature.edges)
        names.append(feature.name)
        observed.append(counts)
        ref.append(feature.counts)
        scores[feature.name] = feature_score(counts, feature.counts, ref_noise_std=ref_std)
    correct, hist, accuracy, auc = (None, None, None, None) if y is None else \
        _model_figures(bundle, x, y)
    return DriftResult(
        release_id=bundle.release_id, project=str(bundle.model_card.get("project", "")),
        names=tuple(names), observed=tuple(observed), reference=tuple(ref), scores=scores,
        n_rows=len(x), correct=correct, score_hist=hist, accuracy=accuracy, auc=auc,
        ref_noise_std=ref_std, source=data.kind)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(release_id: str, status: str) -> dict[str, Any]:
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION,
            "report_id": uuid.uuid4().hex, "release_id": release_id, "checked_at": _now(),
            "status": status}


def failed_report(release_id: str, kind: str) -> dict[str, Any]:
    """The report of a check that failed: its kind and nothing else."""
    return {**_header(release_id, "failed"), "failure": kind}


def mechanism_for(result: DriftResult, choice: DriftDisclosure) -> Mechanism | None:
    """What releasing ``result``'s counts under ``choice`` costs (None: unnoised).

    One person (row) added or removed changes each feature's histogram in one bin by one,
    the row count by one and, with labels, the correct count and one score bin by one.
    """
    touched = len(result.names) + 1 + (2 if result.score_hist is not None else
                                       1 if result.correct is not None else 0)
    if choice.disclosure == "gaussian":
        l2 = math.sqrt(touched)
        return GaussianRelease(noise_std=choice.noise_multiplier * l2, l2_sensitivity=l2,
                               count=1)
    if choice.disclosure == "laplace":
        return LaplaceRelease(scale=choice.noise_multiplier * touched,
                              l1_sensitivity=float(touched), count=1)
    return None


def disclose(result: DriftResult, choice: DriftDisclosure, *,
             rng: np.random.Generator | None = None,
             epsilon: float | None = None) -> tuple[dict[str, Any], Mechanism | None]:
    """The report that may leave, and the mechanism its counts were released through.

    Args:
        result: The check's whole result.
        choice: The site policy's disclosure choice.
        rng: Noise source (a fresh, OS-seeded one by default).
        epsilon: The ledger's epsilon of this one release, stated in the report.

    Returns:
        ``(report, mechanism)``; the mechanism is None for an unnoised disclosure.
    """
    mechanism = mechanism_for(result, choice)
    rng = rng or np.random.default_rng()
    std = 0.0

    def noised(counts: np.ndarray) -> np.ndarray:
        if isinstance(mechanism, GaussianRelease):
            return np.asarray(counts + rng.normal(0.0, mechanism.noise_std, counts.shape))
        if isinstance(mechanism, LaplaceRelease):
            return np.asarray(counts + rng.laplace(0.0, mechanism.scale, counts.shape))
        return counts

    if isinstance(mechanism, GaussianRelease):
        std = mechanism.noise_std
    elif isinstance(mechanism, LaplaceRelease):
        std = mechanism.scale * math.sqrt(2.0)
    features = {}
    for name, obs, ref in zip(result.names, result.observed, result.reference, strict=True):
        s = feature_score(noised(obs), ref, noise_std=std,
                          ref_noise_std=result.ref_noise_std)
        features[name] = {"psi": _short(s.psi), "chi2": _short(s.chi2), "dof": s.dof,
                          "p_value": _short(s.p_value)}
    n = float(noised(np.array([float(result.n_rows)]))[0])
    accuracy = auc = None
    if result.correct is not None:
        correct = float(noised(np.array([float(result.correct)]))[0])
        accuracy = _short(min(1.0, max(0.0, correct / max(n, 1.0))))
    if result.score_hist is not None:
        found = auc_from_histograms(noised(result.score_hist[0]),
                                    noised(result.score_hist[1]))
        auc = None if found is None else _short(found)
    report = {**_header(result.release_id, "ok"), "rows": row_bucket(n),
              "labelled": result.correct is not None,
              "privacy": {"treatment": choice.disclosure,
                          "noise_multiplier": None if mechanism is None
                          else choice.noise_multiplier,
                          "epsilon": None if mechanism is None else epsilon,
                          "delta": None if mechanism is None else choice.delta},
              "features": features, "accuracy": accuracy, "auc": auc}
    return report, mechanism


def _short(value: float) -> float:
    """Six significant digits: the report stays small and says nothing finer."""
    return float(f"{value:.6g}")

