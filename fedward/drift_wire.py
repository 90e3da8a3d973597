"""The drift report: what a site's drift check sends to the coordinator, in one format.

Both sides check a report with :func:`report_problems`: the site's egress guard before it
leaves (with the release's feature names), the coordinator's gateway before it stores it.
A report holds a handful of scores and nothing else: per feature the population stability
index and the two-sample chi-square statistic with its degrees of freedom and p-value, the
release's accuracy and AUC on the labelled rows, the number of rows as a bucket, the
privacy treatment, and fixed-format identifiers. No data value, row, histogram or count
leaves. A check that failed sends only its failure kind::

    {"format": "fedward-drift-report", "version": 1, "report_id": "<32 hex>",
     "release_id": "oncology-run3-round2-c1", "checked_at": "2026-12-07T01:02:03Z",
     "status": "ok", "rows": "100-249", "labelled": true,
     "privacy": {"treatment": "gaussian", "noise_multiplier": 1.0, "epsilon": 0.9,
                 "delta": 1e-06},
     "features": {"mean radius": {"psi": 0.02, "chi2": 8.1, "dof": 9, "p_value": 0.52}},
     "accuracy": 0.93, "auc": 0.98}

    {"format": "fedward-drift-report", "version": 1, "report_id": "...", "release_id": "...",
     "checked_at": "...", "status": "failed", "failure": "data-empty"}
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any, Final

__all__ = ["FAILURE_KINDS", "MAX_FEATURES", "MAX_REPORT_BYTES", "REPORT_FORMAT",
           "REPORT_VERSION", "ROW_BUCKET_LABELS", "TREATMENTS", "failed_kind",
           "report_problems"]

REPORT_FORMAT: Final = "fedward-drift-report"
REPORT_VERSION: Final = 1
MAX_FEATURES: Final = 128
MAX_REPORT_BYTES: Final = 16 * 1024   # the gateway's small-body cap; 128 features fit
TREATMENTS: Final = ("gaussian", "laplace", "unnoised")
ROW_BUCKET_LABELS: Final = ("<50", "50-99", "100-249", "250-499", "500-999", "1000-4999",
                            "5000+")
# Why a check failed, as a kind (the full reason stays at the site, in its audit log).
FAILURE_KINDS: Final = ("no-reference-statistics", "bad-reference-statistics",
                        "bundle-unverified", "data-unreadable", "data-empty",
                        "model-failed", "budget-exceeded", "policy-invalid")
_COMMON: Final = frozenset({"format", "version", "report_id", "release_id", "checked_at",
                            "status"})
_OK_KEYS: Final = _COMMON | {"rows", "labelled", "privacy", "features", "accuracy", "auc"}
_FAILED_KEYS: Final = _COMMON | {"failure"}
_SCORE_KEYS: Final = frozenset({"psi", "chi2", "dof", "p_value"})
_PRIVACY_KEYS: Final = frozenset({"treatment", "noise_multiplier", "epsilon", "delta"})
_REPORT_ID: Final = re.compile(r"[0-9a-f]{32}")
_RELEASE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHECKED_AT: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# A feature name as studies and tasks spell them: no control characters, no markup.
_FEATURE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _.()/%+-]{0,63}")


def _number(value: object, *, low: float = -math.inf, high: float = math.inf) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def _score_problems(name: str, score: object) -> list[str]:
    if not isinstance(score, Mapping) or set(score) != _SCORE_KEYS:
        return [f"feature {name!r}: expected exactly {sorted(_SCORE_KEYS)}"]
    out = []
    if not _number(score["psi"], low=0.0):
        out.append(f"feature {name!r}: psi must be a finite number >= 0")
    if not _number(score["chi2"], low=0.0):
        out.append(f"feature {name!r}: chi2 must be a finite number >= 0")
    dof = score["dof"]
    if not (isinstance(dof, int) and not isinstance(dof, bool) and 0 <= dof <= 4096):
        out.append(f"feature {name!r}: dof must be a whole number from 0")
    if not _number(score["p_value"], low=0.0, high=1.0):
        out.append(f"feature {name!r}: p_value must be in [0, 1]")
    return out


def _privacy_problems(privacy: object) -> list[str]:
    if not isinstance(privacy, Mapping) or set(privacy) != _PRIVACY_KEYS:
        return [f"privacy: expected exactly {sorted(_PRIVACY_KEYS)}"]
    out = []
    treatment = privacy["treatment"]
    if treatment not in TREATMENTS:
        out.append(f"privacy.treatment must be one of {list(TREATMENTS)}")
    noised = treatment != "unnoised"
    for key in ("noise_multiplier", "epsilon", "delta"):
        value = privacy[key]
        if noised and not _number(value, low=0.0):
            out.append(f"privacy.{key} must be a number >= 0 for a noised report")
        if not noised and value is not None:
            out.append(f"privacy.{key} must be null for an unnoised report")
    return out


def report_problems(doc: object, *,
                    features: Collection[str] | None = None) -> list[str]:
    """Every problem of a drift report (empty: it may leave the site / be stored).

    Args:
        doc: The parsed report.
        features: The only feature names it may name (the release's); None: any name of
            the feature-name format.

    Returns:
        The problems, each a sentence naming the field (never its value).
    """
    if not isinstance(doc, Mapping):
        return ["a drift report is a JSON object"]
    status = doc.get("status")
    if status not in ("ok", "failed"):
        return ["status must be 'ok' or 'failed'"]
    allowed = _OK_KEYS if status == "ok" else _FAILED_KEYS
    problems = []
    extra = sorted(str(k) for k in set(doc) - allowed)
    missing = sorted(allowed - set(doc))
    if extra:
        problems.append(f"fields not on the allow-list of a {status} report: {extra}")
    if missing:
        problems.append(f"fields missing: {missing}")
    if doc.get("format") != REPORT_FORMAT or doc.get("version") != REPORT_VERSION:
        problems.append(f"format must be {REPORT_FORMAT!r} version {REPORT_VERSION}")
    for key, pattern in (("report_id", _REPORT_ID), ("release_id", _RELEASE_ID),
                         ("checked_at", _CHECKED_AT)):
        value = doc.get(key)
        if not (isinstance(value, str) and pattern.fullmatch(value)):
            problems.append(f"{key} is not in its fixed format")
    if status == "failed":
        if doc.get("failure") not in FAILURE_KINDS:
            problems.append(f"failure must be one of {list(FAILURE_KINDS)}")
        return problems
    if doc.get("rows") not in ROW_BUCKET_LABELS:
        problems.append(f"rows must be one of the buckets {list(ROW_BUCKET_LABELS)}")
    if not isinstance(doc.get("labelled"), bool):
        problems.append("labelled must be true or false")
    for key in ("accuracy", "auc"):
        value = doc.get(key)
        if value is not None and not _number(value, low=0.0, high=1.0):
            problems.append(f"{key} must be null or in [0, 1]")
    if "privacy" in doc:
        problems += _privacy_problems(doc["privacy"])
    scores = doc.get("features")
    if not isinstance(scores, Mapping) or not 1 <= len(scores) <= MAX_FEATURES:
        problems.append(f"features must map 1 to {MAX_FEATURES} feature names to scores")
        return problems
    for name, score in scores.items():
        if not (isinstance(name, str) and _FEATURE.fullmatch(name)):
            problems.append("a feature name is not in the feature-name format")
        elif features is not None and name not in features:
            problems.append(f"feature {name!r} is not a feature of the release")
        else:
            problems += _score_problems(name, score)
    return problems


def failed_kind(doc: Mapping[str, Any]) -> str | None:
    """The failure kind of a valid report (None: the check succeeded)."""
    return str(doc["failure"]) if doc.get("status") == "failed" else None
