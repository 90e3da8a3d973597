"""The gates that judge what the sites reported about a version.

``site_metrics``
    Each participating site's evaluation of the version against the project's minimums
    (``min_site_auc``, ``min_site_accuracy``; none set: passes, "no thresholds set").
``export_parity``
    The figures the sites measured on the candidate's exported artefacts (a
    :class:`coordinator.releases.SiteParity` evaluator), within :data:`PARITY_TOLERANCES`;
    a NaN figure fails.
``privacy_statement``
    Every participating site reported its cumulative epsilon, within the run's budget, and
    the run's delta is recorded.

Each is a pure function of the figures; :func:`coordinator.releases.evaluate_candidate`
runs them in :data:`coordinator.release_gates.GATE_ORDER`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coordinator.model_card import finite
from coordinator.release_gates import METRIC_THRESHOLDS, gate
from coordinator.release_lineage import EPSILON_METRIC, PRIVACY_ACCOUNTANT, PRIVACY_MECHANISM
from export.bundle_format import FORMATS, ArtefactFormat
from fedward.wire import MEMBERSHIP_KEY

__all__ = [
    "PARITY_TOLERANCES",
    "Tolerance",
    "metrics_gate",
    "parity_gate",
    "privacy_gate",
]


@dataclass(frozen=True)
class Tolerance:
    """How close an artefact must come to its PyTorch model at every site.

    Attributes:
        max_abs_diff: Largest logit difference allowed (``None``: only recorded).
        min_agreement: Smallest fraction of rows with the same predicted class.
    """

    max_abs_diff: float | None
    min_agreement: float


PARITY_TOLERANCES: Final[Mapping[ArtefactFormat, Tolerance]] = {
    "onnx": Tolerance(max_abs_diff=1e-4, min_agreement=1.0),
    # INT8 changes the logits by design; the predicted class is what must hold.
    "onnx-int8": Tolerance(max_abs_diff=None, min_agreement=0.95),
    "openvino": Tolerance(max_abs_diff=1e-4, min_agreement=1.0),
}


def metrics_gate(all_thresholds: Mapping[str, float], evaluation: Mapping[str, Any],
                 participants: Sequence[str]) -> dict[str, Any]:
    """The ``site_metrics`` gate: each site's evaluation against the project's minimums."""
    thresholds = {k: v for k, v in all_thresholds.items() if k in METRIC_THRESHOLDS}
    per_site: dict[str, dict[str, float]] = evaluation.get("per_site", {})
    figures = {"thresholds": dict(thresholds), "per_site": per_site,
               "source": evaluation.get("source")}
    if not thresholds:
        return gate("site_metrics", True, "no thresholds set", figures)
    sites = sorted(set(participants) | set(per_site))
    if not sites:
        return gate("site_metrics", False, "no site reported an evaluation of this version",
                    figures)
    problems = []
    for site in sites:
        for name, minimum in sorted(thresholds.items()):
            metric = METRIC_THRESHOLDS[name]
            value = per_site.get(site, {}).get(metric)
            if value is None:
                problems.append(f"{site} reported no {metric}")
            elif not value >= minimum:
                problems.append(f"{site} {metric} {value:.4f} < {minimum:.4f}")
    if problems:
        return gate("site_metrics", False, "; ".join(problems), figures)
    return gate("site_metrics", True,
                f"every site ({', '.join(sites)}) meets "
                + ", ".join(f"{k} {v:g}" for k, v in sorted(thresholds.items())), figures)


def privacy_gate(privacy: Mapping[str, Any], participants: Sequence[str]) -> dict[str, Any]:
    """The ``privacy_statement`` gate: every site's epsilon within the run's budget."""
    budget = privacy.get("epsilon_budget_per_site")
    delta = privacy.get("delta")
    per_site: Mapping[str, Mapping[str, Any]] = privacy.get("per_site", {})
    problems = []
    if not participants:
        problems.append("no site took part in a completed round up to this version")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        problems.append(f"the run's delta is not recorded (got {delta!r})")
    if not (isinstance(budget, int | float) and budget > 0):
        problems.append(f"the run's epsilon budget is not recorded (got {budget!r})")
    for site in participants:
        spent = per_site.get(site, {}).get("epsilon_spent")
        if spent is None:
            problems.append(f"{site} reported no {EPSILON_METRIC}")
        elif not finite(spent) or (isinstance(budget, int | float) and spent > budget):
            problems.append(f"{site} spent epsilon {spent} over the budget {budget}")
    figures = dict(privacy)
    if problems:
        return gate("privacy_statement", False, "; ".join(problems), figures)
    return gate("privacy_statement", True,
                f"{len(participants)} site(s) within epsilon {budget:g} at delta {delta:g} "
                f"({PRIVACY_MECHANISM}, {PRIVACY_ACCOUNTANT} accountant)", figures)


def parity_gate(results: Any, participants: Sequence[str]) -> dict[str, Any]:
    """Check the figures a :class:`~coordinator.releases.SiteParity` returned against
    :data:`PARITY_TOLERANCES`."""
    tolerances = {f: {"max_abs_diff": t.max_abs_diff, "min_agreement": t.min_agreement}
                  for f, t in PARITY_TOLERANCES.items()}
    if not isinstance(results, Mapping) or not results:
        return gate("export_parity", False, "no site reported parity figures",
                    {"tolerances": tolerances, "per_site": {}})
    problems = []
    clean: dict[str, dict[str, dict[str, float]]] = {}
    missing_sites = sorted(set(participants) - set(results))
    if missing_sites:
        problems.append(f"no parity figures from {', '.join(missing_sites)}")
    for site, by_format in sorted(results.items()):
        if not isinstance(by_format, Mapping):
            problems.append(f"{site}: malformed figures")
            continue
        for fmt in FORMATS:
            figures = by_format.get(fmt)
            if not isinstance(figures, Mapping):
                problems.append(f"{site} reported no {fmt} parity")
                continue
            try:
                diff = float(figures["max_abs_diff"])
                agreement = float(figures["agreement"])
                n = float(figures["n"])
            except (KeyError, TypeError, ValueError):
                problems.append(f"{site} {fmt}: malformed figures")
                continue
            clean.setdefault(str(site), {})[fmt] = {"max_abs_diff": diff,
                                                    "agreement": agreement, "n": n}
            tol = PARITY_TOLERANCES[fmt]
            # `not x <= y` rather than `x > y`: a NaN figure must fail.
            if not (math.isfinite(n) and n >= 1):
                problems.append(f"{site} {fmt}: compared {n} rows")
            if tol.max_abs_diff is not None and not diff <= tol.max_abs_diff:
                problems.append(f"{site} {fmt} max_abs_diff {diff:.3g} > {tol.max_abs_diff:g}")
            if not agreement >= tol.min_agreement:
                problems.append(f"{site} {fmt} agreement {agreement:.4f} < "
                                f"{tol.min_agreement:g}")
    figures_out: dict[str, Any] = {"tolerances": tolerances, "per_site": clean}
    audits = {str(site): dict(v[MEMBERSHIP_KEY]) for site, v in sorted(results.items())
              if isinstance(v, Mapping) and isinstance(v.get(MEMBERSHIP_KEY), Mapping)}
    if audits:
        # Not a gate: what the card shows beside the epsilon (membership_inference_card).
        figures_out[MEMBERSHIP_KEY] = audits
    if problems:
        return gate("export_parity", False, "; ".join(problems), figures_out)
    return gate("export_parity", True, f"{len(clean)} site(s) within tolerance for "
                f"{', '.join(FORMATS)}", figures_out)

