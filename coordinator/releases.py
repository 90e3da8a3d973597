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
    within :data:`~coordinator.release_site_gates.PARITY_TOLERANCES`. Without an evaluator
    the gate fails: a parity figure the coordinator made up would be worse than none. A
    site measures only a model it evaluated in the run, runs its own export of it (refusing
    artefacts that differ from it), measures each format of a model once, and reports
    coarse bounds (agreement rounded down to 1/20, largest difference rounded up to a power
    of ten).
``privacy_statement``
    Every participating site reported its cumulative epsilon, within the run's budget, and
    the run's delta is recorded.

A candidate that passes every gate awaits review; a reviewer (or admin) who is not the
proposer approves or rejects it with a reason. Approval writes the signed bundle
(:func:`export.bundle.write_bundle`, OpenSSF model-signing format) to
``home/releases/<release-id>/`` with the coordinator's release key, created at first use
under ``home/release-key/`` (the private key never leaves it). An admin can revoke a release;
the revocation list is public and signed with the release key at each request
(:func:`~coordinator.release_store.signed_revocation_list`). Every step is in the audit log.

Transactions: functions that take a ``Session`` work inside the caller's transaction (the
caller commits). Functions that take an ``Engine`` export, talk to sites or write bundles,
which takes seconds, and open their own short transactions; call them with no transaction
open on the same SQLite database (it has one writer at a time).

This module holds the candidate state machine (propose, evaluate, reject, approve); around
it: :mod:`coordinator.release_gates` (project thresholds, the participation gate and gate
progress), :mod:`coordinator.release_site_gates` (the metrics, parity and privacy gates),
:mod:`coordinator.release_packaging` (the candidate's exported artefacts and its signed
bundle), :mod:`coordinator.release_errors` (the refusals and their HTTP status),
:mod:`coordinator.release_lineage` (what made a version), :mod:`coordinator.model_card`,
:mod:`coordinator.release_chart` (the training curve) and :mod:`coordinator.release_store`
(the release key, bundles, lookup and revocation).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlmodel import Session, select

from coordinator import release_gates, release_site_gates, run_statistics
from coordinator.audit import append_event
from coordinator.checkpoints import CheckpointError, load_checkpoint
from coordinator.db import session_scope
from coordinator.mlflow_outbox import note_release_approved
from coordinator.model_card import model_card
from coordinator.models import (
    ProjectGates,
    Release,
    ReleaseCandidate,
    User,
    utcnow,
)
from coordinator.release_errors import Conflict, Forbidden, NotFound
from coordinator.release_gates import gate
from coordinator.release_lineage import build_lineage
from coordinator.release_packaging import (
    ExportFailed,
    artefact_files,
    export_artefacts,
    staging_dir,
    write_release_bundle,
)
from coordinator.release_queries import checkpoint_row, metrics_by_round, run_and_project
from coordinator.release_store import RELEASES_DIR, release_id_for
from coordinator.study_registry import run_study_bytes, run_task
from export.bundle_format import FORMATS, SIGNATURE_FILE, ArtefactFormat
from fedward.files import file_sha256
from fedward.tasks import TaskRef

__all__ = [
    "SiteParity",
    "approve_candidate",
    "evaluate_candidate",
    "propose_candidate",
    "reject_candidate",
]

log = logging.getLogger(__name__)


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


# --- small helpers -----------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _candidate(session: Session, candidate_id: int) -> ReleaseCandidate:
    row = session.get(ReleaseCandidate, candidate_id)
    if row is None:
        raise NotFound(f"candidate {candidate_id} not found")
    return row


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
    run, project = run_and_project(session, run_id)
    ckpt = checkpoint_row(session, run_id, round_number)
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
        run, project = run_and_project(session, cand.run_id)
        # A run of a study: the model of the spec it pinned (its registered copy).
        task, run_id, round_number = run_task(session, run), cand.run_id, cand.round_number
        gates_row = session.exec(select(ProjectGates)
                                 .where(ProjectGates.project_id == project.id)).first()
        thresholds = {} if gates_row is None else dict(json.loads(gates_row.thresholds_json))
    staging, staging_rel = staging_dir(home, candidate_id)
    lineage: dict[str, Any] = {}
    try:
        lineage = build_lineage(engine, home=home, run_id=run_id, round_number=round_number)
        gates = _run_gates(home=home, lineage=lineage, task=task, thresholds=thresholds,
                           staging=staging, candidate_id=candidate_id, site_parity=site_parity,
                           on_gate=lambda done: release_gates.record_partial_gates(
                               engine, candidate_id, _json_safe(done)))
    except Exception as exc:  # record any failure as a failed gate; never leave "evaluating"
        log.exception("evaluating candidate %s failed", candidate_id)
        gates = [gate("evaluation", False, f"evaluating the candidate failed: "
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


def _run_gates(*, home: Path, lineage: Mapping[str, Any], task: TaskRef,
               thresholds: Mapping[str, float], staging: Path, candidate_id: int,
               site_parity: SiteParity | None,
               on_gate: Callable[[list[dict[str, Any]]], None] = lambda _done: None
               ) -> list[dict[str, Any]]:
    """Run every gate in :data:`release_gates.GATE_ORDER`; ``on_gate`` hears of each result."""
    participants: list[str] = list(lineage["participating_sites"])
    version = lineage["version"]
    gates: list[dict[str, Any]] = []

    def add(result: dict[str, Any]) -> None:
        gates.append(result)
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
        artefacts = export_artefacts(task=task, arrays=arrays, out_dir=staging)
        add(gate("export", True, f"exported {', '.join(FORMATS)}",
                 {"files": artefact_files(staging)}))
    except (CheckpointError, ExportFailed) as err:
        shutil.rmtree(staging, ignore_errors=True)
        add(gate("export", False, f"no exporter supports this model: {err}"
                 if isinstance(err, ExportFailed) else str(err), {}))
    add(release_site_gates.metrics_gate(thresholds, lineage["evaluation"], participants))
    if not artefacts:
        add(gate("export_parity", False, "not measured: the export failed", {}))
    elif site_parity is None:
        add(gate("export_parity", False, "no site parity evaluator configured", {}))
    else:
        try:
            results = site_parity.evaluate(run_id=int(lineage["run"]["id"]),
                                           candidate_id=candidate_id,
                                           artefacts={f: p for f, p in artefacts.items()})
        except Exception as exc:  # the sites' boundary can fail in many ways; say how
            add(gate("export_parity", False, f"the sites could not measure parity: "
                     f"{type(exc).__name__}: {exc}", {}))
        else:
            add(release_site_gates.parity_gate(results, participants))
    add(release_site_gates.privacy_gate(lineage["privacy"], participants))
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
        run, project = run_and_project(session, cand.run_id)
        release_id = release_id_for(project.name, cand.run_id, cand.round_number, candidate_id)
        staging_rel = cand.staging_path
        approved_at = utcnow()
        card = model_card(release_id=release_id, cand=cand, run=run, project=project,
                           approver=user.name, reason=reason,
                           approved_at=approved_at.isoformat(),
                           task=run_task(session, run))
        metrics = metrics_by_round(session, cand.run_id)
        final_round = int(json.loads(run.config_json).get("rounds", 0))
        # A run with a statistics phase: its summed DP statistics ship with the model.
        reference = run_statistics.reference_bytes(session, cand.run_id)
        # A run of a study: the spec ships too, so fedward-serve takes records by name.
        study = run_study_bytes(session, run)
    out, fingerprint = write_release_bundle(
        home=home, candidate_id=candidate_id, staging_rel=staging_rel, release_id=release_id,
        card=card, metrics=metrics, round_number=cand.round_number, final_round=final_round,
        reference=reference, study=study)
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
                              bundle_path=f"{RELEASES_DIR}/{release_id}",
                              key_fingerprint=fingerprint, created_by=user.name)
            session.add(release)
            session.flush()
            append_event(session, actor=user.name, action="candidate.approved",
                         subject=f"candidate:{candidate_id}",
                         detail={"reason": reason, "release_id": release_id})
            append_event(session, actor=user.name, action="release.created",
                         subject=f"release:{release_id}",
                         detail={"candidate_id": candidate_id, "key_fingerprint": fingerprint,
                                 "signature_sha256": file_sha256(out / SIGNATURE_FILE)})
            note_release_approved(session, release)
            return release
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
