"""The site's egress guard: what may leave the site, checked on every outgoing result.

It runs inside the site agent at the point where a result is handed back to the relay
(:func:`check_reply`, called by the trainer on every answer whatever produced it), so it
holds whatever the training code does. Only parameter arrays with exactly the shapes of the
task's model and scalar metrics from the allow-list pass (export parity figures only on
their coarse grid, see :func:`fedward.wire.coarse_agreement`), plus three fixed kinds of text
that never carry data values: the data fingerprint (the schema's SHA-256, a keyed HMAC of
the data file and row counts, in fixed formats), the admission answer "accepted" with the
agent's Fedward and Flower versions (:mod:`fedward.agent_versions`' fixed format), and an
error reply's code and reason (written by the site agent itself). A statistics answer
(:func:`check_statistics_reply`) carries one array of noised values instead, only when the
privacy ledger holds the charged release it was noised for. Anything else blocks the whole
message. Drift reports, which leave by their own path, pass :func:`check_drift_report`
(scores from an allow-list only).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedward.agent_versions import REPLY_VERSIONS, VersionFormatError, parse_versions
from fedward.drift_wire import MAX_REPORT_BYTES, report_problems
from fedward.wire import ALLOWED_REPLY_METRICS, FINGERPRINT_KEYS, MSG, is_coarse_parity_figure

__all__ = ["EgressReport", "EgressViolation", "check_drift_report", "check_outgoing",
           "check_reply", "check_statistics_reply"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COUNT = re.compile(r"[0-9]{1,12}")
# The exact format of each fingerprint field: nothing free-form can ride in it.
_FINGERPRINT_FORMATS: dict[str, re.Pattern[str]] = {
    "schema-hash": _HEX64, "content-hmac": _HEX64,
    "n-rows": _COUNT, "n-train": _COUNT, "n-test": _COUNT,
}
assert set(_FINGERPRINT_FORMATS) == FINGERPRINT_KEYS
_MAX_REASON = 4000


class EgressViolation(Exception):
    """The outgoing message carried something the site does not let out."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("egress blocked: " + "; ".join(problems))


@dataclass(frozen=True)
class EgressReport:
    """What left the site: for the audit log (sizes and names, never values)."""

    n_bytes: int
    array_shapes: dict[str, list[int]]
    metric_names: list[str]
    text_fields: list[str] = field(default_factory=list)   # e.g. "fingerprint.n-rows"


def check_outgoing(
    *,
    expected_shapes: Mapping[str, tuple[int, ...]],
    arrays: Mapping[str, object],
    metrics: Mapping[str, object],
) -> EgressReport:
    """Check an outgoing result; return what leaves or raise :class:`EgressViolation`.

    Args:
        expected_shapes: the task model's array names and shapes.
        arrays: the arrays about to leave (empty for an evaluate-only reply).
        metrics: the scalar metrics about to leave.
    """
    problems: list[str] = []
    if arrays:
        extra = sorted(set(arrays) - set(expected_shapes))
        missing = sorted(set(expected_shapes) - set(arrays))
        if extra:
            problems.append(f"arrays not in the task's model: {extra}")
        if missing:
            problems.append(f"model arrays missing: {missing}")
        for name, arr in arrays.items():
            if name not in expected_shapes:
                continue
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                problems.append(f"array {name!r} is not a float32 numpy array")
            elif tuple(arr.shape) != tuple(expected_shapes[name]):
                problems.append(
                    f"array {name!r} has shape {list(arr.shape)}, "
                    f"expected {list(expected_shapes[name])}"
                )
    for key, value in metrics.items():
        if key not in ALLOWED_REPLY_METRICS:
            problems.append(f"metric {key!r} is not on the allow-list")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"metric {key!r} is not a number")
        elif not math.isfinite(float(value)):
            problems.append(f"metric {key!r} is not finite")
        elif not is_coarse_parity_figure(key, float(value)):
            # A precise parity figure is a channel out of the held-out rows.
            problems.append(f"parity figure {key!r} is not on its coarse grid")
    if problems:
        raise EgressViolation(problems)
    n_bytes = sum(int(a.nbytes) for a in arrays.values() if isinstance(a, np.ndarray))
    return EgressReport(
        n_bytes=n_bytes + 8 * len(metrics),
        array_shapes={k: list(v.shape) for k, v in arrays.items() if isinstance(v, np.ndarray)},
        metric_names=sorted(metrics),
    )


def _text_problems(reply: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    """Problems with the reply's text parts, the text fields that leave, and their bytes."""
    problems: list[str] = []
    fields: list[str] = []
    n_bytes = 0
    unknown = sorted(set(reply) - {"metrics", "fingerprint", "status", "error",
                                   REPLY_VERSIONS})
    if unknown:
        problems.append(f"reply parts not on the allow-list: {unknown}")
    fingerprint = reply.get("fingerprint")
    if fingerprint is not None:
        if not isinstance(fingerprint, Mapping):
            problems.append("the fingerprint is not a mapping")
        else:
            for key, value in fingerprint.items():
                pattern = _FINGERPRINT_FORMATS.get(str(key))
                if pattern is None:
                    problems.append(f"fingerprint field {key!r} is not on the allow-list")
                elif not isinstance(value, str) or not pattern.fullmatch(value):
                    problems.append(f"fingerprint field {key!r} is not in its fixed format")
                else:
                    fields.append(f"fingerprint.{key}")
                    n_bytes += len(value)
    if REPLY_VERSIONS in reply:
        try:
            versions = parse_versions(reply[REPLY_VERSIONS])
        except VersionFormatError as err:
            problems.append(f"the versions part is not in its fixed format: {err}")
        else:
            fields.append(REPLY_VERSIONS)
            n_bytes += sum(len(v) for v in versions.values())
    status = reply.get("status")
    if status is not None:
        if not isinstance(status, Mapping) or dict(status) != {MSG.STATUS: MSG.ACCEPTED}:
            problems.append("the status part may only say that the run is accepted")
        else:
            fields.append("status")
    error = reply.get("error")
    if error is not None:
        if (not isinstance(error, Mapping) or set(error) != {"code", "reason"}
                or isinstance(error["code"], bool) or not isinstance(error["code"], int)
                or not isinstance(error["reason"], str) or len(error["reason"]) > _MAX_REASON):
            problems.append("an error reply carries only a code and a short reason")
        else:
            fields.append("error")
            n_bytes += len(error["reason"])
    return problems, fields, n_bytes


def check_reply(*, reply: Mapping[str, Any], arrays: Mapping[str, object],
                expected_shapes: Mapping[str, tuple[int, ...]]) -> EgressReport:
    """Check a whole answer at the point it is handed back; raise :class:`EgressViolation`.

    Args:
        reply: the answer's header (``metrics``, ``fingerprint``, ``status`` or ``error``).
        arrays: the arrays about to leave.
        expected_shapes: the task model's array names and shapes.
    """
    problems, fields, text_bytes = _text_problems(reply)
    metrics = reply.get("metrics", {})
    if not isinstance(metrics, Mapping):
        problems.append("the metrics part is not a mapping")
        metrics = {}
    if "error" in reply and (arrays or metrics):
        problems.append("an error reply carries nothing else")
    try:
        report = check_outgoing(expected_shapes=expected_shapes, arrays=arrays, metrics=metrics)
    except EgressViolation as err:
        problems = [*err.problems, *problems]
        report = None
    if problems or report is None:
        raise EgressViolation(problems)
    return EgressReport(n_bytes=report.n_bytes + text_bytes, array_shapes=report.array_shapes,
                        metric_names=report.metric_names, text_fields=sorted(fields))


# The figures a statistics answer carries besides its array: facts of the mechanism.
_STATISTICS_METRICS: frozenset[str] = frozenset({"statistics-noise-std", "epsilon-spent"})


def check_statistics_reply(*, reply: Mapping[str, Any], arrays: Mapping[str, object],
                           shape: tuple[int, int], charged_noise_std: float | None
                           ) -> EgressReport:
    """Check a statistics answer (``fedward.wire.STATISTICS_ACTION``); raise
    :class:`EgressViolation` unless only noised values leave.

    What passes: exactly one float64 array named ``fedward.statistics.STATISTICS_ARRAY`` of
    ``shape``, all finite, and the metrics ``statistics-noise-std`` (equal to the noise of
    the release the ledger charged for the run) and ``epsilon-spent``; or an error reply.
    Refused: no charged release for the run (nothing noised can leave without one), a noise
    figure other than the charged one, any other array, metric or part, and counts that are
    whole numbers (Gaussian noise makes every count fractional with probability one: whole
    numbers are exact counts).

    Args:
        reply: the answer's header.
        arrays: the arrays about to leave.
        shape: the release's shape for the task, ``(features, bins + 4)``.
        charged_noise_std: the noise std of the run's statistics entry in the ledger (read
            by the caller from the ledger, not from the answer); None if there is none.
    """
    from fedward.statistics import BINS, STATISTICS_ARRAY

    if "error" in reply:
        return check_reply(reply=reply, arrays=arrays, expected_shapes={})
    problems: list[str] = []
    unknown = sorted(set(reply) - {"metrics"})
    if unknown:
        problems.append(f"reply parts not on the statistics allow-list: {unknown}")
    metrics = reply.get("metrics", {})
    if not isinstance(metrics, Mapping):
        problems.append("the metrics part is not a mapping")
        metrics = {}
    extra = sorted(set(metrics) - _STATISTICS_METRICS)
    if extra or set(metrics) != _STATISTICS_METRICS:
        problems.append(f"a statistics answer carries exactly {sorted(_STATISTICS_METRICS)}; "
                        f"got {sorted(metrics)}")
    for key in sorted(set(metrics) & _STATISTICS_METRICS):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(float(value)):
            problems.append(f"metric {key!r} is not a finite number")
    if charged_noise_std is None:
        problems.append("no statistics release is charged in the privacy ledger for this run: "
                        "un-noised statistics never leave")
    elif metrics.get("statistics-noise-std") != charged_noise_std:
        problems.append("the noise figure differs from the release charged in the ledger")
    if set(arrays) != {STATISTICS_ARRAY}:
        problems.append(f"a statistics answer carries one array {STATISTICS_ARRAY!r}; got "
                        f"{sorted(arrays)}")
    values = arrays.get(STATISTICS_ARRAY)
    if values is not None:
        if not isinstance(values, np.ndarray) or values.dtype != np.float64:
            problems.append("the statistics array is not a float64 numpy array")
        elif tuple(values.shape) != tuple(shape):
            problems.append(f"the statistics array has shape {list(values.shape)}, expected "
                            f"{list(shape)}")
        elif not np.isfinite(values).all():
            problems.append("the statistics array holds values that are not finite")
        else:
            counts = values[:, :BINS + 2]   # bins, rows with a value, missing
            if np.any(counts == np.round(counts)):
                problems.append("the statistics array holds whole-number counts: exact, "
                                "un-noised counts never leave")
    if problems:
        raise EgressViolation(problems)
    assert isinstance(values, np.ndarray)
    return EgressReport(n_bytes=int(values.nbytes) + 8 * len(metrics),
                        array_shapes={STATISTICS_ARRAY: list(values.shape)},
                        metric_names=sorted(metrics))
def check_drift_report(report: Mapping[str, Any], *, features: Collection[str]) -> int:
    """Check a drift report before it leaves the site; return its size in bytes.

    Only the fields of :mod:`fedward.drift_wire` pass, each in its fixed format: scores per
    feature of the release (PSI, chi-square, degrees of freedom, p-value), accuracy, AUC,
    the row count as a bucket, the privacy treatment and fixed-format identifiers. Any
    other field, a feature the release does not have, or a value out of its range blocks
    the whole report.

    Args:
        report: The report about to leave.
        features: The release's feature names.

    Raises:
        EgressViolation: With every problem.
    """
    problems = report_problems(report, features=features)
    if problems:
        raise EgressViolation(problems)
    size = len(json.dumps(report, allow_nan=False).encode())
    if size > MAX_REPORT_BYTES:
        raise EgressViolation([f"the drift report is {size} bytes, over {MAX_REPORT_BYTES}"])
    return size
