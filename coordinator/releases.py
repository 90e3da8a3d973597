"""The release workflow: model versions and their lineage, candidates, gates, approval,
signed bundles and revocation.

Every checkpoint of a run is a *model version*. An ML engineer proposes one as a release
*candidate* with its intended use; the coordinator then records automated *gates*:

``export``
    ONNX, ONNX Runtime INT8 and OpenVINO IR artefacts built from the checkpoint into the
    candidate's staging folder (``home/candidates/candidate-<id>/``). A model no exporter
    supports fails here, with the exporter's reason.
``site_participation``
    Enough sites trained the model: at least ``min_sites`` sites (default 2, or every site
    of the run if it has fewer) each took part in at least ``min_round_share`` (default
    half) of the completed rounds up to this version (:mod:`coordinator.release_gates`).
``site_metrics``
    Each participating site's evaluation of this version against the project's minimums
    (``min_site_auc``, ``min_site_accuracy``; none set: passes, "no thresholds set").
``export_parity``
    Figures measured AT the sites by a :class:`SiteParity` evaluator on their held-out data,
    within :data:`PARITY_TOLERANCES`. Without an evaluator the gate fails: a parity figure
    the coordinator made up would be worse than none. A site measures only a model it
    evaluated in the run, runs its own export of it (refusing artefacts that differ from
    it), measures each format of a model once, and reports coarse bounds (agreement rounded
    down to 1/20, largest difference rounded up to a power of ten).
``privacy_statement``
    Every participating site reported its cumulative epsilon, within the run's budget, and
    the run's delta is recorded.

A candidate that passes every gate awaits review; a reviewer (or admin) who is not the
proposer approves or rejects it with a reason. Approval writes the signed bundle
(:func:`export.bundle.write_bundle`, OpenSSF model-signing format) to
``home/releases/<release-id>/`` with the coordinator's release key, created at first use
under ``home/release-key/`` (the private key never leaves it). An admin can revoke a release;
the revocation list is public and signed with the release key at each request
(:func:`signed_revocation_list`). Every step is in the audit log.

Transactions: functions that take a ``Session`` work inside the caller's transaction (the
caller commits). Functions that take an ``Engine`` export, talk to sites or write bundles,
which takes seconds, and open their own short transactions; call them with no transaction
open on the same SQLite database (it has one writer at a time).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol
from xml.sax.saxutils import escape

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator import release_gates, repository, run_statistics
from coordinator.audit import append_event
from coordinator.checkpoints import CheckpointError, load_checkpoint
from coordinator.db import session_scope
from coordinator.mlflow_outbox import note_release_approved
from coordinator.models import (
    Checkpoint,
    Project,
    ProjectGates,
    Release,
    ReleaseCandidate,
    Round,
    Run,
    SiteMetric,
    User,
    utcnow,
)
from export.bundle import (
    ARTEFACT_FILES,
    FORMATS,
    SIGNATURE_FILE,
    ArtefactFormat,
    BundleVerificationError,
    BundleWriteError,
    VerifiedBundle,
    generate_release_key,
    public_key_fingerprint,
    public_key_path,
    verify_bundle,
    write_bundle,
)
from fedward import code_revision
from fedward.statistics import REFERENCE_FILE
from fedward.wire import MEMBERSHIP_KEY

__all__ = [
    "GATE_THRESHOLDS",
    "HELD_OUT_NOT_DP",
    "NOT_COVERED_BY_DP",
    "PARITY_TOLERANCES",
    "TRAINING_CURVE_FILE",
    "Conflict",
    "Forbidden",
    "Gone",
    "IntegrityFailure",
    "InvalidRequest",
    "NotFound",
    "ReleaseError",
    "SiteParity",
    "Tolerance",
    "approve_candidate",
    "build_lineage",
    "bundle_archive",
    "evaluate_candidate",
    "find_release",
    "get_gates",
    "list_releases",
    "propose_candidate",
    "reject_candidate",
    "release_key",
    "release_public_key",
    "release_view",
    "revocation_list",
    "revoke_release",
    "set_gates",
    "signed_revocation_list",
    "training_curve_svg",
    "verified_bundle",
]

log = logging.getLogger(__name__)


# Project gate threshold name -> the evaluation metric it bounds from below.
GATE_THRESHOLDS: Final[Mapping[str, str]] = release_gates.METRIC_THRESHOLDS
TRAINING_CURVE_FILE: Final = "training_curve.svg"
PRIVACY_MECHANISM: Final = "DP-SGD"
# The site agent's ledger accountant (dp-accounting's privacy loss distributions,
# privacy.accounting); sites report only the epsilon.
PRIVACY_ACCOUNTANT: Final = "pld"
FINGERPRINTS_NOT_REPORTED: Final = "not reported: no site sent a data fingerprint for this run"
# What a release card shows that the DP guarantee does not cover (in its privacy statement).
NOT_COVERED_BY_DP: Final = (
    "held-out evaluation metrics per site (loss, accuracy, AUC, rows evaluated), reported "
    "without noise, and the training curve drawn from them",
    "export parity figures per site (coarse: agreement in twentieths, largest difference as "
    "a power of ten), measured on held-out rows without noise",
    "data fingerprints (row counts, schema hash, keyed file digest)",
    "membership-inference audit figures per site (attack AUCs rounded up to a hundredth, "
    "empirical epsilon lower bound rounded down to a tenth), measured on training and "
    "held-out rows without noise",
)
MEMBERSHIP_METHOD: Final = (
    "Each site attacks the candidate with its own rows: members are its training rows, "
    "non-members its held-out rows. Two attacks on per-example loss: a loss threshold, and "
    "the loss calibrated by the held-out losses of the record's class. AUC 0.5 means the "
    "attacker does no better than guessing. The empirical epsilon lower bound is what the "
    "stronger attack proves (threshold chosen on half of the rows, 95% Clopper-Pearson rates "
    "on the other half); it must stay below the epsilon spent, which is an upper bound."
)


def membership_inference_card(per_site: Any) -> dict[str, Any]:
    """The model card's section on measured leakage, from the sites' audits.

    Args:
        per_site: Site -> ``{"auc", "loss_auc", "calibrated_auc", "epsilon_lower_bound",
            "n"}`` as the parity gate's figures hold them, or ``None``.

    Returns:
        ``{"method", "per_site", "max_site_auc", "sites"}`` (``max_site_auc`` is ``None``
        when no site reported an audit).
    """
    sites = {str(k): dict(v) for k, v in (per_site or {}).items() if isinstance(v, Mapping)}
    aucs = [float(v["auc"]) for v in sites.values() if _finite(v.get("auc", math.nan))]
    return {"method": MEMBERSHIP_METHOD, "per_site": sites,
            "max_site_auc": max(aucs) if aucs else None, "sites": len(sites)}
HELD_OUT_NOT_DP: Final = ("Held-out figures each site computed without noise: not covered by "
                          "the differential-privacy guarantee.")
DATA_FINGERPRINT_METHOD: Final = (
    "content-hmac: HMAC-SHA256 of the site's data file under a key only that site holds (so "
    "nobody with a copy of a file can confirm a site holds it; an auditor the site gives its "
    "key recomputes it, see `fedward-site fingerprint --reveal-key`); schema-hash: SHA-256 "
    "of the declared data schema; n-rows, n-train, n-test: row counts")
_EPSILON_METRIC: Final = "epsilon-spent"
_FINGERPRINT_METRIC_PREFIX: Final = "fingerprint-"
# Site metric names (fedward.wire.ALLOWED_REPLY_METRICS) -> evaluation figure names.
_EVAL_METRICS: Final[Mapping[str, str]] = {
    "eval-auc": "auc",
    "eval-accuracy": "accuracy",
    "eval-loss": "loss",
    "num-eval-examples": "n",
}
_RELEASE_KEY_DIR: Final = "release-key"
_RELEASE_KEY_FILE: Final = "release.pem"
_RELEASES_DIR: Final = "releases"
_CANDIDATES_DIR: Final = "candidates"
_key_lock = threading.Lock()


# --- errors ------------------------------------------------------------------------------


class ReleaseError(Exception):
    """A refused release-workflow request; the message is the reason, fit for a person.

    Attributes:
        status_code: The HTTP status the API answers with.
    """

    status_code: ClassVar[int] = 400


class NotFound(ReleaseError):
    """No such run, version, candidate or release."""

    status_code = 404


class Forbidden(ReleaseError):
    """The user may not do this to this object (for example approve their own proposal)."""

    status_code = 403


class Conflict(ReleaseError):
    """The object is not in a state that allows this (approved twice, revoked, ...)."""

    status_code = 409


class Gone(ReleaseError):
    """The release was revoked."""

    status_code = 410


class InvalidRequest(ReleaseError):
    """A request value that cannot be used (an unknown threshold name, ...)."""

    status_code = 422


class IntegrityFailure(ReleaseError):
    """A stored bundle or key fails its checks: the coordinator refuses to serve it."""

    status_code = 500


# --- ports -------------------------------------------------------------------------------


class SiteParity(Protocol):
    """Measures a candidate's exported artefacts against its PyTorch model AT the sites.

    Each site checks that the checkpoint is a global model it evaluated in the run and that
    every artefact is the same function as its own export of it, then runs its own export
    and the PyTorch model on its held-out data and sends back only coarse figures (see
    ``site_agent.parity_task``).
    """

    def evaluate(self, *, run_id: int, candidate_id: int,
                 artefacts: dict[str, Path]) -> dict[str, dict[str, dict[str, float]]]:
        """Measure parity at the run's sites.

        Args:
            run_id: The run whose sites measure it.
            candidate_id: The release candidate.
            artefacts: Format (``onnx``, ``onnx-int8``, ``openvino``) -> its main file
                (the OpenVINO ``.xml`` has its ``.bin`` beside it).

        Returns:
            Site -> format -> ``{"max_abs_diff", "agreement", "n"}``.
        """
        ...


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


# --- small helpers -----------------------------------------------------------------------


def _gate(name: str, passed: bool, reason: str, figures: Any) -> dict[str, Any]:
    return {"name": name, "passed": passed, "reason": reason, "figures": figures}


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


def _run_and_project(session: Session, run_id: int) -> tuple[Run, Project]:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    project = session.get(Project, run.project_id)
    assert project is not None  # foreign key
    return run, project


def _checkpoint(session: Session, run_id: int, round_number: int | None) -> Checkpoint:
    query = select(Checkpoint).where(Checkpoint.run_id == run_id)
    if round_number is None:
        query = query.order_by(col(Checkpoint.round_number).desc()).limit(1)
    else:
        query = query.where(Checkpoint.round_number == round_number)
    row = session.exec(query).first()
    if row is None:
        which = "any round" if round_number is None else f"round {round_number}"
        raise NotFound(f"run {run_id} has no checkpoint for {which}")
    return row


def _candidate(session: Session, candidate_id: int) -> ReleaseCandidate:
    row = session.get(ReleaseCandidate, candidate_id)
    if row is None:
        raise NotFound(f"candidate {candidate_id} not found")
    return row


def _metrics_by_round(session: Session, run_id: int) -> dict[int, dict[str, dict[str, float]]]:
    rows = session.exec(select(SiteMetric).where(SiteMetric.run_id == run_id)).all()
    out: dict[int, dict[str, dict[str, float]]] = {}
    for m in rows:
        out.setdefault(m.round_number, {}).setdefault(m.site_name, {})[m.name] = m.value
    return out


# --- software and lineage ----------------------------------------------------------------


_PACKAGES: Final = ("fedward", "flwr", "torch", "opacus", "onnx", "onnxruntime", "openvino",
                    "model-signing")


@functools.cache
def _software() -> dict[str, Any]:
    """Versions of the packages installed here, the code revision and the Flower app hash."""
    from fedward.flower.fab import app_bundle  # imports flwr: only when needed

    packages: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "packages": packages,
        "code_revision": code_revision(),
        "flower_app_bundle_sha256": app_bundle()[1],
        "note": "installed on the coordinator when this lineage was recorded",
    }


def _evaluation(metrics: Mapping[int, Mapping[str, Mapping[str, float]]], round_number: int,
                final_round: int) -> dict[str, Any]:
    """What the sites measured of the model saved after ``round_number``.

    A site evaluates the global model it receives before it trains, so the model saved
    after round r is evaluated at the start of round r + 1; the model after the last round
    is evaluated once more at the end (``final-*`` metrics).
    """
    sources: list[tuple[int, str, str]] = []
    if round_number == final_round:
        sources.append((round_number, "final-", "final evaluation at each site after the "
                        f"last round ({round_number})"))
    sources.append((round_number + 1, "", f"evaluated at each site at the start of round "
                    f"{round_number + 1}"))
    for at, prefix, source in sources:
        per_site: dict[str, dict[str, float]] = {}
        for site, values in sorted(metrics.get(at, {}).items()):
            figures = {short: values[prefix + name] for name, short in _EVAL_METRICS.items()
                       if prefix + name in values}
            if figures:
                per_site[site] = figures
        if per_site:
            return {"source": source, "per_site": per_site}
    return {"source": "no site reported an evaluation of this version", "per_site": {}}


def _participants(rounds: Sequence[Round]) -> list[str]:
    sites: set[str] = set()
    for r in rounds:
        sites.update(json.loads(r.participating_sites_json))
    return sorted(sites)


def _privacy(config: Mapping[str, Any], metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
             round_number: int, participants: Sequence[str]) -> dict[str, Any]:
    per_site: dict[str, dict[str, Any]] = {}
    for site in participants:
        latest: tuple[int, float] | None = None
        for number in sorted(metrics):
            value = metrics[number].get(site, {}).get(_EPSILON_METRIC)
            if number <= round_number and value is not None:
                latest = (number, value)
        per_site[site] = {
            "epsilon_spent": None if latest is None else latest[1],
            "reported_in_round": None if latest is None else latest[0],
            "delta": config.get("delta"),
        }
    return {
        "mechanism": PRIVACY_MECHANISM,
        "accountant": PRIVACY_ACCOUNTANT,
        "epsilon_budget_per_site": config.get("epsilon"),
        "delta": config.get("delta"),
        "max_grad_norm": config.get("max_grad_norm"),
        "per_site": per_site,
    }


def _fingerprints_from_metrics(metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
                               round_number: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for number in sorted(metrics):
        if number > round_number:
            continue
        for site, values in sorted(metrics[number].items()):
            found = {k.removeprefix(_FINGERPRINT_METRIC_PREFIX): v for k, v in values.items()
                     if k.startswith(_FINGERPRINT_METRIC_PREFIX)}
            if found:
                out.setdefault(site, []).append({"round": number, "fingerprint": found})
    return out


def build_lineage(engine: Engine, *, home: Path, run_id: int, round_number: int
                  ) -> dict[str, Any]:
    """The lineage of one model version, from the database and the checkpoint file.

    Open no transaction on ``engine``'s database around this call (it opens its own).

    Args:
        engine: Coordinator database engine.
        home: The coordinator's data directory (checkpoints are under it).
        run_id: The run.
        round_number: The round whose checkpoint is the version.

    Returns:
        JSON-ready lineage: ``version`` (checkpoint path, digest, parameter shapes),
        ``run`` (config and seed), ``software`` (package versions, code revision, Flower app
        bundle hash), ``rounds`` (sites per round), ``privacy`` (epsilon and delta per
        site), ``evaluation`` (per-site metrics of this version) and ``data_fingerprints``
        (``None`` with ``data_fingerprints_note`` when no site reported one) with
        ``data_fingerprint_method`` (what each fingerprint field is).

    Raises:
        NotFound: No such run or checkpoint.
    """
    with session_scope(engine) as session:
        run, project = _run_and_project(session, run_id)
        ckpt = _checkpoint(session, run_id, round_number)
        rounds = session.exec(select(Round).where(Round.run_id == run_id,
                                                  Round.number <= round_number)
                              .order_by(col(Round.number))).all()
        metrics = _metrics_by_round(session, run_id)
        config: dict[str, Any] = json.loads(run.config_json)
        run_info = {
            "id": run_id, "project": project.name, "task": run.task, "status": run.status,
            "launched_by": run.launched_by, "flwr_run_id": run.flwr_run_id,
            "created_at": run.created_at.isoformat(),
            "started_at": run.started_at.isoformat() if run.started_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "seed": config.get("seed"), "config": config,
        }
        rounds_info = [{"number": r.number, "status": r.status,
                        "participating_sites": json.loads(r.participating_sites_json),
                        "failed_sites": json.loads(r.failed_sites_json),
                        "late_sites": json.loads(r.late_sites_json)} for r in rounds]
        participants = _participants(rounds)
        ckpt_path, ckpt_sha = ckpt.path, ckpt.sha256
    version: dict[str, Any] = {"run_id": run_id, "round": round_number,
                               "checkpoint": {"path": ckpt_path, "sha256": ckpt_sha}}
    try:
        arrays = load_checkpoint(home / ckpt_path, expected_sha256=ckpt_sha)
        version["checkpoint"]["status"] = "ok: matches its recorded SHA-256"
        version["parameters"] = {k: list(v.shape) for k, v in arrays.items()}
        version["n_parameters"] = int(sum(v.size for v in arrays.values()))
    except CheckpointError as err:
        version["checkpoint"]["status"] = f"unusable: {err}"
    fingerprints = {site: [e for e in entries if int(e.get("round", 0)) <= round_number]
                    for site, entries in repository.data_fingerprints(engine, run_id).items()}
    fingerprints = {s: e for s, e in fingerprints.items() if e}
    if not fingerprints:
        fingerprints = _fingerprints_from_metrics(metrics, round_number)
    return {
        "version": version,
        "run": run_info,
        "software": _software(),
        "rounds": rounds_info,
        "participating_sites": participants,
        "privacy": _privacy(config, metrics, round_number, participants),
        "evaluation": _evaluation(metrics, round_number, int(config.get("rounds", 0))),
        "data_fingerprints": fingerprints or None,
        "data_fingerprints_note": None if fingerprints else FINGERPRINTS_NOT_REPORTED,
        "data_fingerprint_method": DATA_FINGERPRINT_METHOD,
    }


# --- project gates -----------------------------------------------------------------------


def get_gates(session: Session, project_name: str) -> dict[str, float | int]:
    """A project's gate thresholds as set (empty: none set, the defaults apply).

    Raises:
        NotFound: No such project.
    """
    project = session.exec(select(Project).where(Project.name == project_name)).first()
    if project is None:
        raise NotFound(f"project {project_name!r} not found")
    row = session.exec(select(ProjectGates).where(ProjectGates.project_id == project.id)).first()
    return {} if row is None else dict(json.loads(row.thresholds_json))


def set_gates(session: Session, *, project_name: str,
              thresholds: Mapping[str, float | int | None], actor: str,
              merge: bool = False) -> dict[str, float | int]:
    """Replace (or, with ``merge``, change) a project's gate thresholds and audit the change
    (the caller commits).

    Args:
        session: Open session.
        project_name: The project.
        thresholds: Names from :data:`GATE_THRESHOLDS` -> minimum in [0, 1], ``min_sites``
            -> a whole number >= 1, ``min_round_share`` -> a share in (0, 1]; ``None`` drops
            the threshold (the default applies again).
        actor: Who sets them.
        merge: Keep the thresholds ``thresholds`` does not name (otherwise they are
            dropped).

    Returns:
        The thresholds now set.

    Raises:
        NotFound: No such project.
        InvalidRequest: An unknown name or a value out of range (every problem at once).
    """
    project = session.exec(select(Project).where(Project.name == project_name)).first()
    if project is None:
        raise NotFound(f"project {project_name!r} not found")
    problems = release_gates.threshold_problems(thresholds)
    if problems:
        raise InvalidRequest("; ".join(problems))
    row = session.exec(select(ProjectGates).where(ProjectGates.project_id == project.id)).first()
    before = {} if row is None else json.loads(row.thresholds_json)
    wanted = {**before, **thresholds} if merge else dict(thresholds)
    clean: dict[str, float | int] = {k: (int(v) if k == "min_sites" else float(v))
                                     for k, v in wanted.items() if v is not None}
    assert project.id is not None
    if row is None:
        row = ProjectGates(project_id=project.id, thresholds_json="{}", updated_by=actor)
    row.thresholds_json = json.dumps(clean, sort_keys=True)
    row.updated_by, row.updated_at = actor, utcnow()
    session.add(row)
    append_event(session, actor=actor, action="project.gates_set",
                 subject=f"project:{project_name}", detail={"before": before, "after": clean})
    return clean


# --- gates -------------------------------------------------------------------------------


def _metrics_gate(all_thresholds: Mapping[str, float], evaluation: Mapping[str, Any],
                  participants: Sequence[str]) -> dict[str, Any]:
    thresholds = {k: v for k, v in all_thresholds.items() if k in GATE_THRESHOLDS}
    per_site: dict[str, dict[str, float]] = evaluation.get("per_site", {})
    figures = {"thresholds": dict(thresholds), "per_site": per_site,
               "source": evaluation.get("source")}
    if not thresholds:
        return _gate("site_metrics", True, "no thresholds set", figures)
    sites = sorted(set(participants) | set(per_site))
    if not sites:
        return _gate("site_metrics", False, "no site reported an evaluation of this version",
                     figures)
    problems = []
    for site in sites:
        for name, minimum in sorted(thresholds.items()):
            metric = GATE_THRESHOLDS[name]
            value = per_site.get(site, {}).get(metric)
            if value is None:
                problems.append(f"{site} reported no {metric}")
            elif not value >= minimum:
                problems.append(f"{site} {metric} {value:.4f} < {minimum:.4f}")
    if problems:
        return _gate("site_metrics", False, "; ".join(problems), figures)
    return _gate("site_metrics", True,
                 f"every site ({', '.join(sites)}) meets "
                 + ", ".join(f"{k} {v:g}" for k, v in sorted(thresholds.items())), figures)


def _privacy_gate(privacy: Mapping[str, Any], participants: Sequence[str]) -> dict[str, Any]:
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
            problems.append(f"{site} reported no {_EPSILON_METRIC}")
        elif not _finite(spent) or (isinstance(budget, int | float) and spent > budget):
            problems.append(f"{site} spent epsilon {spent} over the budget {budget}")
    figures = dict(privacy)
    if problems:
        return _gate("privacy_statement", False, "; ".join(problems), figures)
    return _gate("privacy_statement", True,
                 f"{len(participants)} site(s) within epsilon {budget:g} at delta {delta:g} "
                 f"({PRIVACY_MECHANISM}, {PRIVACY_ACCOUNTANT} accountant)", figures)


def _parity_gate(results: Any, participants: Sequence[str]) -> dict[str, Any]:
    """Check the figures a :class:`SiteParity` returned against :data:`PARITY_TOLERANCES`."""
    tolerances = {f: {"max_abs_diff": t.max_abs_diff, "min_agreement": t.min_agreement}
                  for f, t in PARITY_TOLERANCES.items()}
    if not isinstance(results, Mapping) or not results:
        return _gate("export_parity", False, "no site reported parity figures",
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
        return _gate("export_parity", False, "; ".join(problems), figures_out)
    return _gate("export_parity", True, f"{len(clean)} site(s) within tolerance for "
                 f"{', '.join(FORMATS)}", figures_out)


class _ExportFailed(Exception):
    """The checkpoint could not be turned into artefacts; the message says why."""


def _export_artefacts(*, task: str, arrays: dict[str, Any], out_dir: Path
                      ) -> dict[ArtefactFormat, Path]:
    """Build the model from the checkpoint and export every format into ``out_dir``."""
    from export.onnx_export import (
        UnsupportedModelError,
        export_onnx,
        export_onnx_int8,
        export_openvino,
    )
    from fedward.models import set_model_arrays
    from fedward.tasks import UnknownTaskError, build_model

    try:
        model = build_model(task)
        set_model_arrays(model, arrays)
    except UnknownTaskError as err:
        raise _ExportFailed(str(err.args[0] if err.args else err)) from None
    except ValueError as err:
        raise _ExportFailed(f"the checkpoint does not fit the task's model: {err}") from None
    try:
        onnx_path = export_onnx(model=model, task=task, out_dir=out_dir)
    except UnsupportedModelError as err:
        raise _ExportFailed(err.reason) from None
    # Dynamic INT8 (no calibration rows): the coordinator holds no site data to calibrate on.
    int8 = export_onnx_int8(onnx_path=onnx_path, out_dir=out_dir, calibration=None)
    xml = export_openvino(onnx_path=onnx_path, out_dir=out_dir)
    return {"onnx": onnx_path, "onnx-int8": int8, "openvino": xml}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _artefact_files(staging: Path) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": _sha256(staging / name), "bytes": (staging / name).stat().st_size}
            for fmt in FORMATS for name in ARTEFACT_FILES[fmt] if (staging / name).is_file()}


# --- candidates --------------------------------------------------------------------------


def propose_candidate(session: Session, *, run_id: int, round_number: int | None,
                      intended_use: str, actor: str) -> ReleaseCandidate:
    """Record a model version as a release candidate, status ``evaluating`` (caller commits).

    Then call :func:`evaluate_candidate` with no transaction open.

    Args:
        session: Open session.
        run_id: The run.
        round_number: The checkpoint's round; ``None`` for the run's last checkpoint.
        intended_use: What the model is for, and what not (shown to clinicians).
        actor: The proposer.

    Returns:
        The candidate (flushed, ``id`` set).

    Raises:
        NotFound: No such run or checkpoint.
    """
    run, project = _run_and_project(session, run_id)
    ckpt = _checkpoint(session, run_id, round_number)
    candidate = ReleaseCandidate(run_id=run_id, round_number=ckpt.round_number,
                                 checkpoint_sha256=ckpt.sha256, intended_use=intended_use,
                                 proposed_by=actor)
    session.add(candidate)
    session.flush()
    append_event(session, actor=actor, action="candidate.proposed",
                 subject=f"candidate:{candidate.id}",
                 detail={"project": project.name, "run_id": run_id, "task": run.task,
                         "round": ckpt.round_number, "checkpoint_sha256": ckpt.sha256,
                         "intended_use": intended_use})
    return candidate


def _staging_dir(home: Path, candidate_id: int) -> tuple[Path, str]:
    rel = f"{_CANDIDATES_DIR}/candidate-{candidate_id}"
    return home / rel, rel


def evaluate_candidate(engine: Engine, *, home: Path, candidate_id: int,
                       site_parity: SiteParity | None) -> ReleaseCandidate:
    """Export the candidate, run every gate and record the results.

    The candidate ends ``awaiting_review`` when every gate passed, ``gates_failed``
    otherwise (an unexpected error is recorded as a failed gate too, never left
    ``evaluating``). Open no transaction on the database around this call.

    Args:
        engine: Coordinator database engine.
        home: The coordinator's data directory.
        candidate_id: A candidate in status ``evaluating``.
        site_parity: The sites' parity evaluator, or ``None`` (the parity gate fails).

    Returns:
        The candidate as recorded.

    Raises:
        NotFound: No such candidate.
        Conflict: The candidate is not ``evaluating``.
    """
    with session_scope(engine) as session:
        cand = _candidate(session, candidate_id)
        if cand.status != "evaluating":
            raise Conflict(f"candidate {candidate_id} is {cand.status}, not evaluating")
        run, project = _run_and_project(session, cand.run_id)
        task, run_id, round_number = run.task, cand.run_id, cand.round_number
        gates_row = session.exec(select(ProjectGates)
                                 .where(ProjectGates.project_id == project.id)).first()
        thresholds = {} if gates_row is None else dict(json.loads(gates_row.thresholds_json))
    staging, staging_rel = _staging_dir(home, candidate_id)
    lineage: dict[str, Any] = {}
    try:
        lineage = build_lineage(engine, home=home, run_id=run_id, round_number=round_number)
        gates = _run_gates(home=home, lineage=lineage, task=task, thresholds=thresholds,
                           staging=staging, candidate_id=candidate_id, site_parity=site_parity,
                           on_gate=lambda done: release_gates.record_partial_gates(
                               engine, candidate_id, _json_safe(done)))
    except Exception as exc:  # record any failure as a failed gate; never leave "evaluating"
        log.exception("evaluating candidate %s failed", candidate_id)
        gates = [_gate("evaluation", False, f"evaluating the candidate failed: "
                       f"{type(exc).__name__}: {exc}", {})]
    passed = bool(gates) and all(g["passed"] for g in gates)
    with session_scope(engine) as session:
        cand = _candidate(session, candidate_id)
        cand.status = "awaiting_review" if passed else "gates_failed"
        # A NaN figure fails its gate (the reason says "nan") and is stored as null.
        cand.gates_json = json.dumps(_json_safe(gates), allow_nan=False)
        cand.lineage_json = json.dumps(_json_safe(lineage), sort_keys=True, allow_nan=False)
        cand.staging_path = staging_rel if staging.is_dir() else None
        session.add(cand)
        append_event(session, actor="coordinator", action="candidate.gates_evaluated",
                     subject=f"candidate:{candidate_id}",
                     detail={"status": cand.status,
                             "gates": [{"name": g["name"], "passed": g["passed"],
                                        "reason": g["reason"]} for g in gates]})
        return cand


def _run_gates(*, home: Path, lineage: Mapping[str, Any], task: str,
               thresholds: Mapping[str, float], staging: Path, candidate_id: int,
               site_parity: SiteParity | None,
               on_gate: Callable[[list[dict[str, Any]]], None] = lambda _done: None
               ) -> list[dict[str, Any]]:
    """Run every gate in :data:`release_gates.GATE_ORDER`; ``on_gate`` hears of each result."""
    participants: list[str] = list(lineage["participating_sites"])
    version = lineage["version"]
    gates: list[dict[str, Any]] = []

    def add(gate: dict[str, Any]) -> None:
        gates.append(gate)
        try:
            on_gate(list(gates))
        except Exception:  # progress is a courtesy: it never fails the evaluation
            log.exception("recording the progress of candidate %s failed", candidate_id)

    add(release_gates.participation_gate(lineage, thresholds))
    if staging.exists():  # left over from an earlier attempt: start clean
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    artefacts: dict[ArtefactFormat, Path] = {}
    try:
        arrays = load_checkpoint(home / version["checkpoint"]["path"],
                                 expected_sha256=version["checkpoint"]["sha256"])
        artefacts = _export_artefacts(task=task, arrays=arrays, out_dir=staging)
        add(_gate("export", True, f"exported {', '.join(FORMATS)}",
                  {"files": _artefact_files(staging)}))
    except (CheckpointError, _ExportFailed) as err:
        shutil.rmtree(staging, ignore_errors=True)
        add(_gate("export", False, f"no exporter supports this model: {err}"
                  if isinstance(err, _ExportFailed) else str(err), {}))
    add(_metrics_gate(thresholds, lineage["evaluation"], participants))
    if not artefacts:
        add(_gate("export_parity", False, "not measured: the export failed", {}))
    elif site_parity is None:
        add(_gate("export_parity", False, "no site parity evaluator configured", {}))
    else:
        try:
            results = site_parity.evaluate(run_id=int(lineage["run"]["id"]),
                                           candidate_id=candidate_id,
                                           artefacts={f: p for f, p in artefacts.items()})
        except Exception as exc:  # the sites' boundary can fail in many ways; say how
            add(_gate("export_parity", False, f"the sites could not measure parity: "
                      f"{type(exc).__name__}: {exc}", {}))
        else:
            add(_parity_gate(results, participants))
    add(_privacy_gate(lineage["privacy"], participants))
    return gates


def _decision_checks(session: Session, cand: ReleaseCandidate, user: User, verb: str,
                     allowed: frozenset[str]) -> None:
    if cand.proposed_by == user.name:
        append_event(session, actor=user.name, action=f"candidate.{verb}_refused",
                     subject=f"candidate:{cand.id}", detail={"why": "own proposal"})
        session.commit()  # the refused attempt stays on record
        raise Forbidden(f"you proposed candidate {cand.id}; a second person must {verb} it")
    if cand.status not in allowed:
        why = {
            "approved": "it is already approved",
            "rejected": f"it was rejected by {cand.decided_by}: {cand.decision_reason}",
            "gates_failed": "it failed its gates: " + "; ".join(
                f"{g['name']}: {g['reason']}" for g in json.loads(cand.gates_json)
                if not g["passed"]),
            "evaluating": "its gates are still being evaluated",
        }.get(cand.status, f"its status is {cand.status}")
        raise Conflict(f"candidate {cand.id} cannot be {verb}d: {why}")


def reject_candidate(session: Session, *, candidate_id: int, user: User,
                     reason: str) -> ReleaseCandidate:
    """Reject a candidate with a reason (the caller commits).

    Args:
        session: Open session.
        candidate_id: A candidate awaiting review (or one that failed its gates).
        user: The reviewer; never the proposer.
        reason: Why.

    Returns:
        The candidate, now ``rejected``.

    Raises:
        NotFound: No such candidate.
        Forbidden: The user proposed it (the refusal is audited and committed).
        Conflict: It is approved, rejected or still evaluating.
    """
    cand = _candidate(session, candidate_id)
    _decision_checks(session, cand, user, "reject", frozenset({"awaiting_review",
                                                               "gates_failed"}))
    cand.status, cand.decided_by, cand.decided_at = "rejected", user.name, utcnow()
    cand.decision_reason = reason
    session.add(cand)
    append_event(session, actor=user.name, action="candidate.rejected",
                 subject=f"candidate:{candidate_id}", detail={"reason": reason})
    return cand


# --- release key and bundles -------------------------------------------------------------


def release_key(home: Path) -> tuple[Path, Path]:
    """The coordinator's release signing key, created at first use.

    The key lives in ``home/release-key/`` (folder mode 0700, private key 0600) and never
    leaves it; only the public key is served.

    Args:
        home: The coordinator's data directory.

    Returns:
        Paths of the private and the public key.

    Raises:
        IntegrityFailure: Only one half of the key pair exists.
    """
    folder = home / _RELEASE_KEY_DIR
    private = folder / _RELEASE_KEY_FILE
    public = public_key_path(private)
    with _key_lock:
        if not private.exists() and not public.exists():
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(folder, 0o700)
            try:
                generate_release_key(private)
            except FileExistsError:  # another process made it meanwhile
                pass
            else:
                log.info("release key created in %s", folder)
    if not (private.is_file() and public.is_file()):
        raise IntegrityFailure(f"the release key in {folder} is incomplete (private and "
                               "public key must both exist); restore it from backup")
    return private, public


def release_public_key(home: Path) -> tuple[bytes, str] | None:
    """The release public key (PEM) and its fingerprint, or ``None`` before the first release.

    Args:
        home: The coordinator's data directory.

    Returns:
        ``(pem, fingerprint)`` or ``None``.
    """
    public = public_key_path(home / _RELEASE_KEY_DIR / _RELEASE_KEY_FILE)
    if not public.is_file():
        return None
    pem = public.read_bytes()
    return pem, public_key_fingerprint(pem)


def _real_dir(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a real folder (a symlink could lead out of ``home``)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise IntegrityFailure(f"{what} {path} does not exist") from None
    if stat.S_ISLNK(mode):
        raise IntegrityFailure(f"{what} {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(mode):
        raise IntegrityFailure(f"{what} {path} is not a folder")


def _releases_dir(home: Path) -> Path:
    folder = home / _RELEASES_DIR
    if not folder.exists() and not folder.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
    _real_dir(folder, "the releases folder")
    return folder


def _bundle_dir(home: Path, release: Release) -> Path:
    """The release's bundle folder; refuse a stored path that is not ``releases/<id>``."""
    expected = f"{_RELEASES_DIR}/{release.release_id}"
    if release.bundle_path != expected:
        raise IntegrityFailure(f"release {release.release_id}: stored bundle path "
                               f"{release.bundle_path!r} is not {expected!r}; refusing it")
    _real_dir(home / _RELEASES_DIR, "the releases folder")
    return home / expected


def _release_id(project: str, run_id: int, round_number: int, candidate_id: int) -> str:
    return f"{project}-run{run_id}-round{round_number}-c{candidate_id}"


def _model_card(*, release_id: str, cand: ReleaseCandidate, run: Run, project: Project,
                approver: str, reason: str, approved_at: str) -> dict[str, Any]:
    from export.onnx_export import INPUT_NAME, OUTPUT_NAME
    from fedward.tasks import get_task

    spec = get_task(run.task)
    config: dict[str, Any] = json.loads(run.config_json)
    lineage: dict[str, Any] = json.loads(cand.lineage_json)
    gates: list[dict[str, Any]] = json.loads(cand.gates_json)
    by_name = {g["name"]: g for g in gates}
    participation = by_name.get(release_gates.PARTICIPATION_GATE, {}).get("figures") or {}
    parity_figures: dict[str, Any] = by_name.get("export_parity", {}).get("figures", {}) or {}
    privacy = lineage["privacy"]
    per_site_privacy = {s: {"epsilon": v["epsilon_spent"], "delta": v["delta"]}
                        for s, v in privacy["per_site"].items()}
    statement = (
        f"Trained with {PRIVACY_MECHANISM} at every site (per-sample clipping at "
        f"{privacy['max_grad_norm']}, Gaussian noise); each site's privacy loss is accounted "
        f"with the {PRIVACY_ACCOUNTANT.upper()} accountant and stayed within epsilon "
        f"{privacy['epsilon_budget_per_site']} at delta {privacy['delta']} for the whole run "
        f"up to round {cand.round_number}. No patient record left any site. The guarantee "
        "covers the model's weights. It does not cover the held-out metrics: each site's "
        "evaluation figures (loss, accuracy, AUC, row counts), the training curve drawn from "
        "them and the coarse export parity figures are computed on the site's held-out rows "
        "without noise, and so are the coarse membership-inference audit figures (on its "
        "training and held-out rows). No training loss left any site."
    )
    return {
        "release_id": release_id,
        "project": project.name,
        "task": spec.name,
        "task_description": spec.description,
        "intended_use": cand.intended_use,
        "input": {"name": INPUT_NAME, "columns": list(spec.feature_columns),
                  "output": OUTPUT_NAME, "n_classes": spec.n_classes,
                  "classes": list(spec.class_names),
                  "note": "raw values in this column order; the model scales them itself"},
        # The study version the run pinned (runs of a registry task have none).
        **({"study": {"ref": config["study"], "sha256": config["study_hash"]}}
           if config.get("study_hash") else {}),
        "model_version": {"run_id": cand.run_id, "round": cand.round_number,
                          "checkpoint_sha256": cand.checkpoint_sha256,
                          "candidate_id": cand.id},
        "metrics_per_site": lineage["evaluation"],
        # A candidate gated before the participation gate existed has no such figures.
        **({"contributing_sites": {
            "completed_rounds": participation["rounds"],
            "rounds_per_site": {s: v["rounds"] for s, v in participation["per_site"].items()},
            "contributing": participation["contributing"],
            "min_sites": participation["min_sites"],
            "min_round_share": participation["min_round_share"],
        }} if participation else {}),
        "privacy_statement": {
            "text": statement,
            "mechanism": PRIVACY_MECHANISM,
            "accountant": PRIVACY_ACCOUNTANT,
            "epsilon_budget_per_site": privacy["epsilon_budget_per_site"],
            "delta": privacy["delta"],
            "per_site": per_site_privacy,
            "not_covered": list(NOT_COVERED_BY_DP),
        },
        "export_parity": {k: v for k, v in parity_figures.items() if k != MEMBERSHIP_KEY},
        "membership_inference": membership_inference_card(parity_figures.get(MEMBERSHIP_KEY)),
        "formats": {fmt: list(ARTEFACT_FILES[fmt]) for fmt in FORMATS},
        "gates": gates,
        "approval": {"proposed_by": cand.proposed_by, "proposed_at": cand.created_at.isoformat(),
                     "approved_by": approver, "approved_at": approved_at, "reason": reason},
        "training_curve": TRAINING_CURVE_FILE,
        "lineage": lineage,
    }


def approve_candidate(engine: Engine, *, home: Path, candidate_id: int, user: User,
                      reason: str) -> Release:
    """Approve a candidate: write and sign its bundle, then record the release.

    The bundle is written before the approval is recorded, so a failed write approves
    nothing; if another reviewer decided meanwhile, the fresh bundle is removed again.
    Open no transaction on the database around this call.

    Args:
        engine: Coordinator database engine.
        home: The coordinator's data directory.
        candidate_id: A candidate awaiting review.
        user: The reviewer; never the proposer.
        reason: Why it may be released.

    Returns:
        The new release.

    Raises:
        NotFound: No such candidate.
        Forbidden: The user proposed it (the refusal is audited).
        Conflict: It is not awaiting review, or its bundle folder exists already.
        IntegrityFailure: The staged artefacts, the releases folder or the key are unusable.
    """
    with session_scope(engine) as session:
        cand = _candidate(session, candidate_id)
        _decision_checks(session, cand, user, "approve", frozenset({"awaiting_review"}))
        run, project = _run_and_project(session, cand.run_id)
        release_id = _release_id(project.name, cand.run_id, cand.round_number, candidate_id)
        staging_rel = cand.staging_path
        approved_at = utcnow()
        card = _model_card(release_id=release_id, cand=cand, run=run, project=project,
                           approver=user.name, reason=reason,
                           approved_at=approved_at.isoformat())
        metrics = _metrics_by_round(session, cand.run_id)
        final_round = int(json.loads(run.config_json).get("rounds", 0))
        # A run with a statistics phase: its summed DP statistics ship with the model.
        reference = run_statistics.reference_bytes(session, cand.run_id)
    if staging_rel is None:
        raise IntegrityFailure(f"candidate {candidate_id} has no staged artefacts")
    staging = home / staging_rel
    _real_dir(staging, "the candidate's staging folder")
    files = {name: staging / name for fmt in FORMATS for name in ARTEFACT_FILES[fmt]}
    missing = sorted(n for n, p in files.items() if not p.is_file() or p.is_symlink())
    if missing:
        raise IntegrityFailure(f"candidate {candidate_id}'s staged artefacts are missing or "
                               f"not regular files: {', '.join(missing)}")
    private, public = release_key(home)
    out = _releases_dir(home) / release_id
    if out.exists() or out.is_symlink():
        raise Conflict(f"a bundle already exists at {out}; move it away after checking "
                       "that no release uses it")
    with tempfile.TemporaryDirectory(prefix="fedward-curve-") as tmp:
        curve = Path(tmp) / TRAINING_CURVE_FILE
        curve.write_text(training_curve_svg(metrics=metrics, up_to_round=cand.round_number,
                                            final_round=final_round,
                                            title=f"{release_id}: training curve"),
                         encoding="utf-8")
        extra: dict[str, Path] = {}
        if reference is not None:
            extra[REFERENCE_FILE] = Path(tmp) / REFERENCE_FILE
            extra[REFERENCE_FILE].write_bytes(reference)
        try:
            write_bundle(out_dir=out, files={**files, TRAINING_CURVE_FILE: curve, **extra},
                         model_card=card, private_key=private)
        except BundleWriteError as err:
            if "refusing to overwrite" in str(err):
                raise Conflict(f"could not write the bundle: {err}") from None
            raise IntegrityFailure(f"could not write the bundle: {err}") from None
    fingerprint = public_key_fingerprint(public.read_bytes())
    try:
        with session_scope(engine) as session:
            cand = _candidate(session, candidate_id)
            if cand.status != "awaiting_review":
                raise Conflict(f"candidate {candidate_id} was {cand.status} by "
                               f"{cand.decided_by} meanwhile")
            cand.status, cand.decided_by, cand.decided_at = "approved", user.name, approved_at
            cand.decision_reason = reason
            session.add(cand)
            release = Release(release_id=release_id, candidate_id=candidate_id,
                              bundle_path=f"{_RELEASES_DIR}/{release_id}",
                              key_fingerprint=fingerprint, created_by=user.name)
            session.add(release)
            session.flush()
            append_event(session, actor=user.name, action="candidate.approved",
                         subject=f"candidate:{candidate_id}",
                         detail={"reason": reason, "release_id": release_id})
            append_event(session, actor=user.name, action="release.created",
                         subject=f"release:{release_id}",
                         detail={"candidate_id": candidate_id, "key_fingerprint": fingerprint,
                                 "signature_sha256": _sha256(out / SIGNATURE_FILE)})
            note_release_approved(session, release)
            return release
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def verified_bundle(home: Path, release: Release) -> VerifiedBundle:
    """Verify a release's bundle on the coordinator's disk before it is served.

    Args:
        home: The coordinator's data directory.
        release: The release row.

    Returns:
        The verified bundle.

    Raises:
        IntegrityFailure: A stored path that is not ``releases/<id>``, a symlinked releases
            folder, a missing key or a bundle that fails :func:`export.bundle.verify_bundle`
            (a symlink, an extra or changed file, ...).
    """
    folder = _bundle_dir(home, release)
    key = release_public_key(home)
    if key is None:
        raise IntegrityFailure("the release public key is missing")
    public = public_key_path(home / _RELEASE_KEY_DIR / _RELEASE_KEY_FILE)
    try:
        return verify_bundle(bundle_dir=folder, public_key=public,
                             release_id=release.release_id)
    except BundleVerificationError as err:
        raise IntegrityFailure(f"the bundle of release {release.release_id} on the "
                               f"coordinator fails verification: {err}") from None


def bundle_archive(home: Path, release: Release) -> bytes:
    """The release's bundle as a ``.tar.gz`` with one top folder named after the release.

    The bundle is verified first and every file's bytes are checked again as they are
    archived; the archive is reproducible (fixed times and owners).

    Args:
        home: The coordinator's data directory.
        release: An unrevoked release.

    Returns:
        The archive's bytes.

    Raises:
        Gone: The release is revoked.
        IntegrityFailure: See :func:`verified_bundle`.
    """
    if release.revoked_at is not None:
        raise Gone(f"release {release.release_id} was revoked: {release.revoke_reason}")
    verified = verified_bundle(home, release)
    contents = {name: verified.read_verified(name) for name in sorted(verified.files)}
    sig = (verified.path / SIGNATURE_FILE).read_bytes()
    mtime = int(release.created_at.timestamp())
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(release.release_id)
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(folder)
        for name, data in [*contents.items(), (SIGNATURE_FILE, sig)]:
            info = tarfile.TarInfo(f"{release.release_id}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def revoke_release(session: Session, *, release_id: str, user: User, reason: str) -> Release:
    """Revoke a release (the caller commits); it leaves the portal and the revocation list
    names it.

    Args:
        session: Open session.
        release_id: The release.
        user: The admin revoking it.
        reason: Why (published in the revocation list).

    Returns:
        The release.

    Raises:
        NotFound: No such release.
        Conflict: Already revoked.
    """
    release = find_release(session, release_id)
    if release.revoked_at is not None:
        raise Conflict(f"release {release_id} was already revoked by {release.revoked_by}: "
                       f"{release.revoke_reason}")
    release.revoked_at, release.revoked_by, release.revoke_reason = utcnow(), user.name, reason
    session.add(release)
    append_event(session, actor=user.name, action="release.revoked",
                 subject=f"release:{release_id}", detail={"reason": reason})
    return release


def find_release(session: Session, release_id: str) -> Release:
    """The release called ``release_id``.

    Raises:
        NotFound: No such release.
    """
    release = session.exec(select(Release).where(Release.release_id == release_id)).first()
    if release is None:
        raise NotFound(f"release {release_id!r} not found")
    return release


def list_releases(session: Session, *, include_revoked: bool) -> list[Release]:
    """Releases, newest first; revoked ones only with ``include_revoked``.

    Args:
        session: Open session.
        include_revoked: Also list revoked releases (never for clinicians).

    Returns:
        The release rows.
    """
    query = select(Release).order_by(col(Release.id).desc())
    if not include_revoked:
        query = query.where(col(Release.revoked_at).is_(None))
    return list(session.exec(query).all())


def release_view(session: Session, release: Release) -> dict[str, Any]:
    """What the API and the portal show of a release (its model card is in the bundle).

    Args:
        session: Open session.
        release: The release row.

    Returns:
        JSON-ready fields: ids, project, task, version, intended use, who proposed and
        approved it and why, when, revocation and the signing key's fingerprint.
    """
    cand = session.get(ReleaseCandidate, release.candidate_id)
    assert cand is not None  # foreign key
    run, project = _run_and_project(session, cand.run_id)
    return {
        "release_id": release.release_id,
        "project": project.name,
        "task": run.task,
        "run_id": cand.run_id,
        "round": cand.round_number,
        "candidate_id": cand.id,
        "intended_use": cand.intended_use,
        "proposed_by": cand.proposed_by,
        "approved_by": cand.decided_by,
        "approval_reason": cand.decision_reason,
        "created_at": release.created_at,
        "revoked_at": release.revoked_at,
        "revoked_by": release.revoked_by,
        "revoke_reason": release.revoke_reason,
        "key_fingerprint": release.key_fingerprint,
    }


def revocation_list(session: Session) -> dict[str, Any]:
    """The revoked releases (unsigned: what the signed list is made of, and what staff see).

    Args:
        session: Open session.

    Returns:
        ``{"revoked": [{"release_id", "revoked_at", "reason"}], "generated_at"}``.
    """
    rows = session.exec(select(Release).where(col(Release.revoked_at).is_not(None))
                        .order_by(col(Release.revoked_at))).all()
    return {
        "revoked": [{"release_id": r.release_id,
                     "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                     "reason": r.revoke_reason} for r in rows],
        "generated_at": utcnow().isoformat(),
    }


def signed_revocation_list(session: Session, home: Path) -> dict[str, Any] | None:
    """The public revocation list, signed now with the release key, as ``fedward-verify``
    and ``fedward-serve`` read it (see :mod:`export.revocations`).

    Args:
        session: Open session.
        home: The coordinator's data directory (the release key is under it).

    Returns:
        The signed document, or ``None`` before the first release (no key, nothing to
        revoke).
    """
    from export.revocations import sign_revocations

    if release_public_key(home) is None:
        return None
    private, _public = release_key(home)
    listed = revocation_list(session)
    return sign_revocations(revoked=listed["revoked"], private_key=private,
                            issued_at=utcnow())


# --- training curve ----------------------------------------------------------------------

_PALETTE: Final = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _curves(metrics: Mapping[int, Mapping[str, Mapping[str, float]]], up_to_round: int,
            final_round: int) -> tuple[dict[str, list[tuple[float, float]]],
                                       dict[str, list[tuple[float, float]]]]:
    """Per-site (model after round k, value) points: held-out AUC and held-out loss.

    No training loss is drawn: sites do not send it (it is not covered by DP-SGD's
    accounting), and one sent by an older site agent is ignored.
    """
    auc: dict[str, list[tuple[float, float]]] = {}
    loss: dict[str, list[tuple[float, float]]] = {}
    for number in sorted(metrics):
        for site, values in sorted(metrics[number].items()):
            # Evaluated at the start of round n: the model after round n - 1.
            for name, series in (("eval-auc", auc), ("eval-loss", loss)):
                if name in values and number - 1 <= up_to_round:
                    series.setdefault(site, []).append((number - 1, values[name]))
                if number == final_round == up_to_round and f"final-{name}" in values:
                    series.setdefault(site, []).append((number, values[f"final-{name}"]))
    return auc, loss


def _panel(x0: float, title: str, series: Mapping[str, list[tuple[float, float]]],
           colours: Mapping[str, str], *, fixed_y: tuple[float, float] | None) -> list[str]:
    w, h, top, left, bottom = 330.0, 230.0, 40.0, 45.0, 30.0
    px0, py0, pw, ph = x0 + left, top, w - left - 10, h - bottom
    out = [f'<text x="{x0 + w / 2:.1f}" y="22" text-anchor="middle" font-size="14" '
           f'font-weight="bold">{escape(title)}</text>',
           f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{pw:.1f}" height="{ph:.1f}" '
           'fill="#fafafa" stroke="#999"/>']
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        out.append(f'<text x="{px0 + pw / 2:.1f}" y="{py0 + ph / 2:.1f}" text-anchor="middle" '
                   'font-size="12" fill="#666">no figures reported</text>')
        return out
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    if fixed_y is not None:
        ymin, ymax = fixed_y
    else:
        ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
        pad = (ymax - ymin) * 0.1 or max(abs(ymax) * 0.1, 0.1)
        ymin, ymax = ymin - pad, ymax + pad
    xspan = (xmax - xmin) or 1.0

    def sx(x: float) -> float:
        return px0 + (x - xmin) / xspan * pw if xmax > xmin else px0 + pw / 2

    def sy(y: float) -> float:
        return py0 + ph - (min(max(y, ymin), ymax) - ymin) / (ymax - ymin) * ph

    for i in range(5):
        y = ymin + (ymax - ymin) * i / 4
        out.append(f'<line x1="{px0:.1f}" y1="{sy(y):.1f}" x2="{px0 + pw:.1f}" y2="{sy(y):.1f}" '
                   'stroke="#e0e0e0"/>')
        out.append(f'<text x="{px0 - 4:.1f}" y="{sy(y) + 4:.1f}" text-anchor="end" '
                   f'font-size="10">{y:.2f}</text>')
    for x in sorted({int(p[0]) for p in points}):
        out.append(f'<text x="{sx(x):.1f}" y="{py0 + ph + 14:.1f}" text-anchor="middle" '
                   f'font-size="10">{x}</text>')
    out.append(f'<text x="{px0 + pw / 2:.1f}" y="{py0 + ph + 27:.1f}" text-anchor="middle" '
               'font-size="10" fill="#444">model after round</text>')
    for site, pts in sorted(series.items()):
        good = sorted(p for p in pts if math.isfinite(p[1]))
        if not good:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        colour = colours[site]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                   f'points="{coords}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
                for x, y in good]
    return out


def training_curve_svg(*, metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
                       up_to_round: int, final_round: int, title: str) -> str:
    """Draw per-site held-out AUC and loss by round as a standalone SVG.

    The figures are each site's evaluation of the global model on its held-out split,
    reported without noise: the drawing says that they are not covered by the DP guarantee.

    Args:
        metrics: Round -> site -> metric name -> value, as the sites reported them.
        up_to_round: The version's round: later rounds are left out.
        final_round: The run's planned last round (its ``final-*`` evaluation is drawn when
            the version is that round's model).
        title: Shown at the top; escaped.

    Returns:
        SVG text (no script, no external reference).
    """
    auc, loss = _curves(metrics, up_to_round, final_round)
    sites = sorted(set(auc) | set(loss))
    colours = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(sites)}
    legend_h = 18 * ((len(sites) + 3) // 4)
    height = 320 + legend_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="700" height="{height}" '
             f'viewBox="0 0 700 {height}" font-family="sans-serif" role="img">',
             f"<title>{escape(title)}</title>",
             '<rect width="100%" height="100%" fill="white"/>']
    parts += _panel(10, "Held-out AUC per site", auc, colours, fixed_y=(0.0, 1.0))
    parts += _panel(360, "Held-out loss per site", loss, colours, fixed_y=None)
    for i, site in enumerate(sites):
        x, y = 20 + (i % 4) * 170, 292 + 18 * (i // 4)
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" '
                     f'fill="{colours[site]}"/>')
        parts.append(f'<text x="{x + 17}" y="{y + 1}" font-size="12">{escape(site)}</text>')
    parts.append(f'<text x="20" y="{height - 10}" font-size="11" fill="#444">'
                 f"{escape(HELD_OUT_NOT_DP)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
