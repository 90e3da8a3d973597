"""Federated evaluation on demand: a checkpoint evaluated on the sites' current held-out data.

``POST /api/v1/runs/{id}/evaluations`` (``fedward-coordinator evaluate RUN``) evaluates the
final checkpoint of a run that has ended, with ``round`` the checkpoint saved after that
round (of a run still going too: a round's checkpoint exists once the round has
aggregated), or with ``release_id`` the checkpoint of one of its releases. The row keeps the
round and the checkpoint's SHA-256 chosen at the request; the ServerApp sends the sites that
file, and fails the evaluation if it no longer matches. The
request is a row of ``evaluations`` (``pending``), then a Flower run of the appliance's app
that trains nothing (:mod:`coordinator.evaluation_task`): every site of the run gets one
evaluate message with the checkpoint, applies its policy to it as to any task of the run
(a site may refuse: its reason is recorded), evaluates the model on its held-out split and
returns the same allow-listed figures as a round's evaluation (AUC, accuracy, loss, the
held-out row count). With ``local_only`` each site whose policy allows it also trains its
local-only DP baseline at the run's epsilon, charged to its own ledger
(:mod:`site_agent.local_baseline`), and returns both models' accuracy, AUC, balanced
accuracy and Brier score. Otherwise no training, no DP-SGD step, no privacy-ledger
entry: like every per-round evaluation, these figures are computed without noise and are
not covered by the DP guarantee. Results per site are stored on the row and shown on the
run's portal page.

An evaluation still pending or running after the run's round deadline plus
:data:`STALE_AFTER_S` (its ServerApp died, the SuperLink never started it) is failed when
next read, so nothing waits for ever.

The routes (:func:`make_router`) authenticate through :mod:`coordinator.auth`
(``CurrentUser``, ``require_role``), as every route of the API does.
"""

import json
import logging
from datetime import datetime, timedelta
from typing import Final, Protocol

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from coordinator import run_control
from coordinator.api_errors import RESPONSES_401, RESPONSES_403, Responses, field_error
from coordinator.audit import append_event
from coordinator.auth import API_PREFIX, CurrentUser, require_role
from coordinator.db import SessionDep
from coordinator.models import (
    Checkpoint,
    Evaluation,
    Project,
    Release,
    ReleaseCandidate,
    Round,
    Run,
    utcnow,
)
from coordinator.schemas import RequestBody
from fedward.roles import WRITE_ROLES
from fedward.run_config import RunConfig

__all__ = [
    "LIVE",
    "STALE_AFTER_S",
    "EvaluationLauncher",
    "EvaluationPublic",
    "EvaluationRequest",
    "evaluations_of",
    "expire_stale",
    "make_router",
    "request_evaluation",
    "rounds_text",
]

log = logging.getLogger("fedward.coordinator.evaluation")

LIVE: Final = ("pending", "running")
# Beyond the run's round deadline, how long an evaluation may go without a result.
STALE_AFTER_S: Final = 300.0


class EvaluationLauncher(Protocol):
    """Starts the Flower run that carries an evaluation (``coordinator.service``)."""

    def launch_evaluation(self, run_id: int, evaluation_id: int) -> str:
        """Start it; returns the Flower run id."""
        ...


class EvaluationRequest(RequestBody):
    """Body of ``POST /runs/{id}/evaluations``."""

    release_id: str | None = Field(
        default=None, max_length=128,
        description="Evaluate this release of the run (its checkpoint) instead of the run's "
                    "final checkpoint.")
    round: int | None = Field(
        default=None,
        description="Evaluate the checkpoint saved after this round (1 to the run's rounds; "
                    "allowed while the run is still going) instead of the final one. Not "
                    "with release_id.")
    local_only: bool = Field(
        default=False,
        description="Also ask each site for its local-only DP baseline: a model the site "
                    "trains on its own rows alone at the run's epsilon, charged to its "
                    "privacy ledger, once per run; only sites whose policy allows it "
                    "(local_baselines) answer, the others refuse with the reason.")


class EvaluationPublic(BaseModel):
    """An evaluation and, once it ended, each site's figures or why it gave none."""

    id: int
    run_id: int
    release_id: str | None
    round_number: int = Field(description="The round whose checkpoint was evaluated.")
    checkpoint_sha256: str
    requested_by: str
    status: str = Field(description="pending, running, completed or failed.")
    created_at: datetime
    finished_at: datetime | None
    failure_reason: str | None
    local_only: bool = Field(description="Each site was also asked for its local-only DP "
                                         "baseline (local-only-* figures).")
    sites: dict[str, dict[str, float]] = Field(
        description="Site -> its figures on its held-out split (eval-auc, eval-accuracy, "
                    "eval-loss, num-eval-examples; with local_only also eval-balanced-"
                    "accuracy, eval-brier and the baseline's local-only-accuracy, -auc, "
                    "-balanced-accuracy, -brier and -epsilon).")
    means: dict[str, float] = Field(
        description="Each figure's plain mean over the sites that reported it (the held-out "
                    "row count and the baseline's epsilon left out).")
    failed: dict[str, str] = Field(description="Site -> why it gave no figures.")

    @classmethod
    def of(cls, row: Evaluation) -> "EvaluationPublic":
        """Build from the table row."""
        assert row.id is not None
        sites: dict[str, dict[str, float]] = json.loads(row.results_json)
        return cls(id=row.id, run_id=row.run_id, release_id=row.release_id,
                   round_number=row.round_number, checkpoint_sha256=row.checkpoint_sha256,
                   requested_by=row.requested_by, status=row.status,
                   created_at=row.created_at, finished_at=row.finished_at,
                   failure_reason=row.failure_reason, local_only=row.local_only,
                   sites=sites, means=_site_means(sites), failed=json.loads(row.failed_json))


_NOT_AVERAGED: Final = frozenset({"num-eval-examples", "local-only-epsilon"})


def _site_means(sites: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each figure's plain mean over the sites that reported it ("was federating worth
    it?" is read on the mean over sites); counts and epsilons are not averaged."""
    names = sorted({n for figures in sites.values() for n in figures} - _NOT_AVERAGED)
    return {n: sum(v) / len(v) for n in names
            if (v := [f[n] for f in sites.values() if n in f])}


class EvaluationRefused(ValueError):
    """The evaluation cannot be asked for; ``status_code`` and the message say why.

    ``field``: the request body field at fault, for a 422 (answered in FastAPI's shape)."""

    def __init__(self, status_code: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.field = field


def rounds_text(numbers: list[int]) -> str:
    """Round numbers as short ranges: ``"round 2"``, ``"rounds 1-4"``, ``"rounds 1-3, 5"``.

    Args:
        numbers: Round numbers, ascending, at least one.
    """
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"round {text}" if len(numbers) == 1 else f"rounds {text}"


def _what_exists(run: Run, saved: dict[int, str]) -> str:
    """What a refusal names: the rounds of ``run`` that have a checkpoint."""
    if not saved:
        return f"run {run.id} has no checkpoint yet (no round has completed)"
    return f"run {run.id} has checkpoints for {rounds_text(sorted(saved))}"


def _of_release(session: Session, run: Run, release_id: str) -> tuple[int, str]:
    """(round, SHA-256) of the checkpoint of a release of ``run``."""
    found = session.exec(select(Release, ReleaseCandidate).join(
        ReleaseCandidate, col(ReleaseCandidate.id) == col(Release.candidate_id)).where(
        Release.release_id == release_id)).first()
    if found is None:
        raise EvaluationRefused(404, f"release {release_id!r} not found "
                                     "(`fedward-coordinator release list`)")
    _, cand = found
    if cand.run_id != run.id:
        raise EvaluationRefused(409, f"release {release_id} comes from run {cand.run_id}, "
                                     f"not run {run.id}: evaluate it as run "
                                     f"{cand.run_id}'s")
    return cand.round_number, cand.checkpoint_sha256


def _checkpoint(session: Session, run: Run, release_id: str | None,
                round_number: int | None) -> tuple[int, str]:
    """(round, SHA-256) of the checkpoint to evaluate: the release's, the named round's, or
    (neither named) the final one of a run that has ended."""
    if release_id is not None and round_number is not None:
        raise EvaluationRefused(422, f"name a round or a release, not both: release "
                                     f"{release_id} is evaluated at the round it was "
                                     "proposed from; drop the round or the release",
                                field="round")
    if release_id is not None:
        return _of_release(session, run, release_id)
    # A round's checkpoint is written once its round has aggregated. The digest chosen here
    # is stored on the evaluation: should a resumed run write that round again, the
    # ServerApp refuses the changed file rather than send the sites another model.
    saved = dict(session.exec(select(Checkpoint.round_number, Checkpoint.sha256)
                              .where(Checkpoint.run_id == run.id)).all())
    if round_number is None:
        if run.status in LIVE:
            raise EvaluationRefused(409, f"run {run.id} is still {run.status}: its final "
                                         "checkpoint does not exist yet; evaluate it once it "
                                         "has ended, or name a round that has a checkpoint "
                                         "(--round N, API field round): "
                                         + _what_exists(run, saved))
        if not saved:
            raise EvaluationRefused(409, f"run {run.id} has no checkpoint (no round "
                                         "completed): there is no model to evaluate")
        last = max(saved)
        return last, saved[last]
    rounds = RunConfig.model_validate_json(run.config_json).rounds
    if round_number < 1 or round_number > rounds:
        raise EvaluationRefused(422, f"run {run.id} has rounds 1-{rounds}, not round "
                                     f"{round_number}: {_what_exists(run, saved)}",
                                field="round")
    if round_number not in saved:
        state = session.exec(select(Round.status).where(
            Round.run_id == run.id, Round.number == round_number)).first()
        if state is None:
            why = "has not been reached yet" if run.status in LIVE else "was never reached"
        elif state == "running":
            why = "is still running" if run.status in LIVE else "never completed"
        else:
            why = f"ended with status {state}"   # failed or cancelled: nothing aggregated
        raise EvaluationRefused(409, f"round {round_number} of run {run.id} {why}: it has no "
                                     f"checkpoint; {_what_exists(run, saved)}")
    return round_number, saved[round_number]


def request_evaluation(session: Session, run: Run, *, actor: str,
                       release_id: str | None = None,
                       round_number: int | None = None,
                       local_only: bool = False) -> Evaluation:
    """Record an evaluation request in the session's transaction (the caller commits).

    Args:
        session: Open session.
        run: The run whose checkpoint is evaluated.
        actor: Who asks.
        release_id: A release of the run to evaluate instead of its final checkpoint.
        round_number: The round whose checkpoint to evaluate instead (not with
            ``release_id``); the run may still be going.
        local_only: Also ask each site for its local-only DP baseline.

    Returns:
        The new row (``pending``, with its id).

    Raises:
        EvaluationRefused: No such release (404), a release of another run, no round named
            for a run still going, a run without a checkpoint, a round without one, or an
            evaluation of the run already under way (409); a round and a release both
            named, or a round outside the run's rounds (422). Every refusal about a
            checkpoint names the rounds that have one.
    """
    assert run.id is not None
    round_number, sha256 = _checkpoint(session, run, release_id, round_number)
    busy = session.exec(select(Evaluation).where(Evaluation.run_id == run.id,
                                                 col(Evaluation.status).in_(LIVE))).first()
    if busy is not None:
        raise EvaluationRefused(409, f"evaluation {busy.id} of run {run.id} is still "
                                     f"{busy.status}; wait for it (`fedward-coordinator "
                                     f"evaluations {run.id}`)")
    row = Evaluation(run_id=run.id, release_id=release_id, round_number=round_number,
                     checkpoint_sha256=sha256, requested_by=actor, local_only=local_only)
    session.add(row)
    session.flush()
    append_event(session, actor=actor, action="evaluation.requested",
                 subject=f"run:{run.id}", detail={"evaluation": row.id, "round": round_number,
                                                   "checkpoint_sha256": sha256,
                                                   "release": release_id,
                                                   "local_only": local_only})
    return row


def expire_stale(session: Session, run_ids: list[int] | None = None, *,
                 now: datetime | None = None) -> int:
    """Fail the evaluations that should have ended by now (the caller commits).

    Args:
        session: Open session.
        run_ids: Only these runs' evaluations (None: all).
        now: The current time (tests).

    Returns:
        How many were failed.
    """
    now = now or utcnow()
    query = select(Evaluation, Run).join(Run, col(Run.id) == col(Evaluation.run_id)).where(
        col(Evaluation.status).in_(LIVE))
    if run_ids is not None:
        query = query.where(col(Evaluation.run_id).in_(run_ids))
    failed = 0
    for row, run in session.exec(query).all():
        limit = RunConfig.model_validate_json(run.config_json).round_deadline_s + STALE_AFTER_S
        if now - row.created_at > timedelta(seconds=limit):
            row.status, row.finished_at = "failed", now
            row.failure_reason = (f"no result within {limit:.0f} s (the run's round deadline "
                                  f"plus {STALE_AFTER_S:.0f} s): its Flower run "
                                  f"{row.flwr_run_id or '(never started)'} did not finish; "
                                  "see the coordinator's log and ask again")
            session.add(row)
            failed += 1
    return failed


def evaluations_of(session: Session, run_id: int) -> list[Evaluation]:
    """A run's evaluations, newest first (stale ones failed first; the caller commits)."""
    expire_stale(session, [run_id])
    return list(session.exec(select(Evaluation).where(Evaluation.run_id == run_id)
                             .order_by(col(Evaluation.id).desc())).all())


def make_router() -> APIRouter:
    """The evaluation routes, under the API's prefix.

    Returns:
        A router to include in the application.
    """
    router = APIRouter(prefix=API_PREFIX)
    responses: Responses = {
        **RESPONSES_401, **RESPONSES_403,
        404: {"description": "No such run or release"},
        409: {"description": "Nothing to evaluate yet (the answer names the rounds that have "
                             "a checkpoint), or an evaluation is under way"},
        503: {"description": "The coordinator cannot start Flower runs"},
    }

    @router.post("/runs/{run_id}/evaluations", status_code=202, tags=["runs"],
                 responses=responses)
    def evaluate(run_id: int, body: EvaluationRequest, request: Request,
                 session: SessionDep, user: CurrentUser
                 ) -> EvaluationPublic:
        """Evaluate the run's final checkpoint (or a round's, or one of its releases') at
        its sites.

        Accepted at once; every site of the run evaluates the model on its current
        held-out split (no training, no DP-SGD, nothing charged to its privacy budget) or
        refuses it under its policy. Poll ``GET /evaluations/{id}`` for the results.
        """
        require_role(user, WRITE_ROLES)
        run = session.get(Run, run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")
        launcher: EvaluationLauncher | None = getattr(request.app.state, "launcher", None)
        if launcher is None or not hasattr(launcher, "launch_evaluation"):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "this coordinator cannot start Flower runs (no SuperLink)")
        expire_stale(session, [run_id])
        project = session.get(Project, run.project_id)
        assert project is not None
        # An evaluation starts a ServerApp as a run does: it takes a place under the run
        # limits, checked and committed under the launch lock like a launch.
        with run_control.LAUNCH_LOCK:
            run_control.check_run_limits(session, request.app.state.settings, project)
            try:
                row = request_evaluation(session, run, actor=user.name,
                                         release_id=body.release_id, round_number=body.round,
                                         local_only=body.local_only)
            except EvaluationRefused as err:
                if err.field is not None:   # a 422 in FastAPI's shape, with its message
                    field_error(err.field, str(err))
                raise HTTPException(err.status_code, str(err)) from None
            session.commit()
        assert row.id is not None
        try:
            # No transaction is open while the launcher runs: the ServerApp it starts writes.
            flwr_run_id = launcher.launch_evaluation(run_id, row.id)
        except Exception as err:  # the SuperLink's control API
            log.error("could not start evaluation %s: %s", row.id, err)
            row.status, row.finished_at = "failed", utcnow()
            row.failure_reason = f"the SuperLink did not start it ({type(err).__name__})"
            session.add(row)
            session.commit()
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"evaluation {row.id} could not be started: "
                                f"{row.failure_reason}; try again in a minute") from None
        session.refresh(row)
        if row.flwr_run_id is None:   # the ServerApp may have recorded it already
            row.flwr_run_id = str(flwr_run_id)
            session.add(row)
            session.commit()
        return EvaluationPublic.of(row)

    @router.get("/runs/{run_id}/evaluations", tags=["runs"], responses=responses)
    def list_evaluations(run_id: int, session: SessionDep,
                         _user: CurrentUser
                         ) -> list[EvaluationPublic]:
        """The run's evaluations on demand, newest first."""
        if session.get(Run, run_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")
        rows = evaluations_of(session, run_id)
        session.commit()
        return [EvaluationPublic.of(r) for r in rows]

    @router.get("/evaluations/{evaluation_id}", tags=["runs"], responses=responses)
    def get_evaluation(evaluation_id: int, session: SessionDep,
                       _user: CurrentUser) -> EvaluationPublic:
        """One evaluation and its results per site."""
        row = session.get(Evaluation, evaluation_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"evaluation {evaluation_id} not found")
        expire_stale(session, [row.run_id])
        session.commit()
        session.refresh(row)
        return EvaluationPublic.of(row)

    return router
