"""Federated hyperparameter tuning under the sites' privacy budgets.

A search (``POST /api/v1/tunings``, ``fedward-coordinator tune start``) proposes settings
with Optuna's TPE sampler (seeded) and tries each as a short real federated run of the
run machinery (same sites, few rounds), scored on the mean of the sites' held-out AUC of
the trial's final model. The number of trials is drawn once, before the first trial, from
fresh operating-system entropy (Poisson or geometric, the mean the user sets): random
stopping, which is what lets the sites account the whole search as one selection
(:mod:`privacy.tuning`). Each trial's run carries the search's terms; each site charges the
search once, at its first trial, and refuses the search at the first trial's admission if
it would exceed a budget, so a search that does not fit is refused before any trial trains,
with each refusing site's figures. The best trial is a recorded run: ``launch --from`` it
trains the configuration again (an ordinary run, charged as one), and its model is what the
search releases.

Tables ``tunings`` and ``tuning_trials`` (migration 0013); the Optuna study itself lives in
memory while the search runs (one thread per search, in the coordinator's process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator import run_control
from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import (
    RUN_FINAL_STATUSES,
    Project,
    Run,
    Site,
    SiteMetric,
    Tuning,
    TuningTrial,
    utcnow,
)
from coordinator.repository import record_run_outcome
from coordinator.settings import Settings
from fedward.run_config import RunConfig, SiteName
from privacy.tuning import SearchTerms

__all__ = ["UNSAFE_TRIALS_ENV", "TuningCreate", "TuningError", "draw_trials", "start_tuning"]

log = logging.getLogger(__name__)

UNSAFE_TRIALS_ENV: Final = "FEDWARD_UNSAFE_TUNING_TRIALS"
"""Fixes the number of trials (tests and benchmarks only): then the number is not random and
the sites' accounting of the search as a random-stopping selection does not hold."""

SCORE_METRIC: Final = "final-eval-auc"
ACTOR: Final = "tuning"
_POLL_S: Final = 0.5
_LIVE: dict[int, threading.Thread] = {}


class TuningError(ValueError):
    """A tuning request that cannot start (the message says what to change)."""


class TuningCreate(BaseModel):
    """Body of ``POST /tunings``: what to tune, the search's privacy, and the search space.

    ``epsilon`` is the whole search's epsilon at each site (every trial and the selection of
    the best, composed with RDP); each site charges it once, before its first trial.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    project: str = Field(min_length=1, max_length=64)
    task: str = Field(description="A task of the registry (fedward.tasks.TASKS).")
    epsilon: float = Field(gt=0, le=100, description="The whole search's epsilon per site.")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    mean_trials: float = Field(default=4.0, gt=0, le=20,
                               description="Mean of the random number of trials.")
    distribution: Literal["geometric", "poisson"] = Field(
        default="geometric",
        description="Of the number of trials: geometric (at least one) or Poisson.")
    rounds: int = Field(default=2, ge=1, le=20, description="Federated rounds per trial.")
    sites: list[SiteName] | None = Field(default=None, min_length=1)
    seed: int = Field(default=0, ge=0, le=2**32 - 1,
                      description="Seed of the TPE sampler and of each trial's model.")
    lr: list[float] = Field(default=[0.01, 0.5], min_length=2, max_length=2,
                            description="Learning rate range [low, high] (log-uniform).")
    max_grad_norm: list[float] = Field(default=[0.3, 3.0], min_length=2, max_length=2,
                                       description="Clipping norm range [low, high].")
    max_local_epochs: int = Field(default=2, ge=1, le=10)
    batch_sizes: list[int] = Field(default=[16, 32, 64], min_length=1, max_length=8)
    round_deadline_s: float = Field(default=120.0, ge=5, le=3600)

    @model_validator(mode="after")
    def _ranges(self) -> TuningCreate:
        problems = [f"{name}: give [low, high] with 0 < low <= high, got {list(pair)}"
                    for name, pair in (("lr", self.lr), ("max_grad_norm", self.max_grad_norm))
                    if not 0 < pair[0] <= pair[1]]
        if self.distribution == "geometric" and self.mean_trials < 1:
            problems.append(f"a geometric number of trials has a mean of at least 1, got "
                            f"{self.mean_trials:g} (or use distribution poisson)")
        if any(not 1 <= b <= 4096 for b in self.batch_sizes):
            problems.append(f"batch_sizes must lie in [1, 4096], got {self.batch_sizes}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def shape(self) -> float:
        """dp-accounting's shape of the trial-count distribution."""
        return math.inf if self.distribution == "poisson" else 1.0


def draw_trials(mean: float, distribution: str) -> int:
    """The number of trials, from fresh entropy: never from anything the requester chose
    (a chosen count would void the random-stopping accounting)."""
    fixed = os.environ.get(UNSAFE_TRIALS_ENV)
    if fixed:
        return int(fixed)
    rng = np.random.default_rng(secrets.randbits(128))
    if distribution == "poisson":
        return int(rng.poisson(mean))
    return int(rng.geometric(1.0 / mean)) if mean > 1 else 1


def _sites(session: Session, wanted: list[str] | None) -> list[str]:
    registered = list(session.exec(select(Site.name).where(Site.status == "registered")
                                   .order_by(col(Site.name))).all())
    if wanted is None:
        return registered
    missing = [s for s in wanted if s not in registered]
    if missing:
        raise TuningError(f"sites not registered: {', '.join(missing)}")
    return list(wanted)


def start_tuning(engine: Engine, body: TuningCreate, *, actor: str,
                 launch: Callable[[int], str], settings: Settings | None = None) -> int:
    """Record a search and start it in the background; returns its id.

    Raises:
        TuningError: an unknown project or task, or no registered site.
    """
    from fedward.tasks import TASKS

    if body.task not in TASKS:
        raise TuningError(f"unknown task {body.task!r} (known: {', '.join(sorted(TASKS))})")
    with session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == body.project)).first()
        if project is None or project.id is None:
            raise TuningError(f"unknown project {body.project!r}: create it first")
        sites = _sites(session, body.sites)
        if not sites:
            raise TuningError("no registered site to tune on")
        planned = draw_trials(body.mean_trials, body.distribution)
        tuning = Tuning(project_id=project.id, task=body.task, created_by=actor,
                        request_json=body.model_dump_json(), trials_planned=planned)
        session.add(tuning)
        session.flush()
        assert tuning.id is not None
        terms = SearchTerms(search_id=tuning.id, mean=body.mean_trials, shape=body.shape,
                            rounds=body.rounds, max_local_epochs=body.max_local_epochs,
                            min_batch_size=min(body.batch_sizes),
                            max_batch_size=max(body.batch_sizes))
        tuning.terms_json = terms.to_wire()
        fixed = bool(os.environ.get(UNSAFE_TRIALS_ENV))
        append_event(session, actor=actor, action="tuning.created",
                     subject=f"tuning:{tuning.id}",
                     detail={"project": body.project, "task": body.task,
                             "request": body.model_dump(mode="json"), "sites": sites,
                             "terms": terms.to_wire(), "trials_fixed_unsafe": fixed})
        tuning_id = tuning.id
    search = _Search(engine, tuning_id, body, terms, sites, planned, launch, settings)
    thread = threading.Thread(target=search.run, name=f"tuning-{tuning_id}", daemon=True)
    _LIVE[tuning_id] = thread
    thread.start()
    return tuning_id


def is_live(tuning_id: int) -> bool:
    """Whether this process is running the search (False after a coordinator restart)."""
    thread = _LIVE.get(tuning_id)
    return thread is not None and thread.is_alive()


class _Search:
    """One search, run in its own thread: ask Optuna, run the trial, tell Optuna."""

    def __init__(self, engine: Engine, tuning_id: int, body: TuningCreate, terms: SearchTerms,
                 sites: list[str], planned: int, launch: Callable[[int], str],
                 settings: Settings | None) -> None:
        self.engine, self.id, self.body, self.terms = engine, tuning_id, body, terms
        self.sites, self.planned, self.launch = sites, planned, launch
        self.settings = settings

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # a thread has no caller: the row says why it stopped
            log.exception("tuning %s failed", self.id)
            self._finish("failed", f"the search stopped: {type(err).__name__}: {err}")

    def _run(self) -> None:
        import optuna
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        b = self.body
        space = {"lr": FloatDistribution(b.lr[0], b.lr[1], log=True),
                 "max_grad_norm": FloatDistribution(b.max_grad_norm[0], b.max_grad_norm[1],
                                                    log=True),
                 "local_epochs": IntDistribution(1, b.max_local_epochs),
                 "batch_size": CategoricalDistribution(sorted(set(b.batch_sizes)))}
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=b.seed))
        for number in range(self.planned):
            trial = study.ask(space)
            params = dict(trial.params)
            run_id, row_id = self._launch_trial(number, params)
            outcome, detail = self._wait(run_id)
            if outcome == "completed" and detail is not None:
                study.tell(trial, detail)
                self._trial_done(row_id, "completed", detail)
                continue
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self._trial_done(row_id, "failed", None)
            if number == 0 and str(outcome).startswith("not admitted"):
                self._finish("refused", self._refusal(run_id, str(outcome)))
                return
            if number == 0:  # the first trial cannot run: neither will the next ones
                self._finish("failed", f"the first trial (run {run_id}) failed: {outcome}")
                return
        self._finish("completed", None)

    def _launch_trial(self, number: int, params: dict[str, Any]) -> tuple[int, int]:
        b = self.body
        config = RunConfig(rounds=b.rounds, local_epochs=int(params["local_epochs"]),
                           epsilon=b.epsilon, delta=b.delta, min_sites=len(self.sites),
                           round_deadline_s=b.round_deadline_s, approval_wait_s=0.0,
                           lr=float(params["lr"]), batch_size=int(params["batch_size"]),
                           max_grad_norm=float(params["max_grad_norm"]), seed=b.seed,
                           sites=self.sites, tuning_search=self.terms.to_wire())
        with session_scope(self.engine) as session:
            project = session.exec(select(Project).where(Project.name == b.project)).one()
            assert project.id is not None
            with run_control.LAUNCH_LOCK:  # the coordinator's run limits hold for trials
                if self.settings is not None:
                    run_control.check_run_limits(session, self.settings, project)
                run = Run(project_id=project.id, task=b.task, launched_by=ACTOR,
                          config_json=config.model_dump_json())
                session.add(run)
                session.flush()
                assert run.id is not None
                row = TuningTrial(tuning_id=self.id, number=number, run_id=run.id,
                                  params_json=json.dumps(params))
                session.add(row)
                append_event(session, actor=ACTOR, action="run.created",
                             subject=f"run:{run.id}",
                             detail={"project": b.project, "task": b.task,
                                     "tuning": self.id, "trial": number,
                                     "config": config.model_dump()})
                session.flush()
                assert row.id is not None
                run_id, row_id = run.id, row.id
                session.commit()
        try:
            flwr_run_id = self.launch(run_id)
        except Exception as err:  # the Flower boundary fails in many ways: record why
            with session_scope(self.engine) as session:
                failed = session.get(Run, run_id)
                assert failed is not None
                if failed.status not in RUN_FINAL_STATUSES:
                    record_run_outcome(session, failed, status="failed", actor=ACTOR,
                                       reason=f"launch failed: {type(err).__name__}: {err}")
            return run_id, row_id
        with session_scope(self.engine) as session:
            launched = session.get(Run, run_id)
            if launched is not None and launched.flwr_run_id is None:
                launched.flwr_run_id = str(flwr_run_id)
                session.add(launched)
        return run_id, row_id

    def _wait(self, run_id: int) -> tuple[str, float | None]:
        """(outcome, score): ``completed`` with the mean held-out AUC, or the failure."""
        b = self.body
        limit = time.monotonic() + b.rounds * (b.round_deadline_s + 30) + 300
        while time.monotonic() < limit:
            with session_scope(self.engine) as session:
                run = session.get(Run, run_id)
                assert run is not None
                if run.status in RUN_FINAL_STATUSES:
                    if run.status != "completed":
                        return run.failure_reason or run.status, None
                    values = session.exec(select(SiteMetric.value).where(
                        SiteMetric.run_id == run_id, SiteMetric.name == SCORE_METRIC)).all()
                    finite = [v for v in values if math.isfinite(v)]
                    if not finite:
                        return "no site reported a held-out AUC", None
                    return "completed", float(sum(finite) / len(finite))
            time.sleep(_POLL_S)
        return f"run {run_id} did not finish in time", None

    def _refusal(self, run_id: int, reason: str) -> str:
        from coordinator.run_audit import admission_record

        record = admission_record(self.engine, run_id)
        detail = record[1] if record is not None else {}
        kind = "geometric" if self.body.distribution == "geometric" else "Poisson"
        parts = [f"refused before any trial: the search costs epsilon {self.body.epsilon:g} "
                 f"(delta {self.body.delta:g}) at each site (RDP, the best of a {kind} number "
                 f"of trials of mean {self.body.mean_trials:g}, {self.body.rounds} round(s) "
                 f"each), asked through the first trial's admission"]
        for site, why in sorted((detail.get("refused") or {}).items()):
            parts.append(f"{site} refused: {why}")
        for site in detail.get("accepted") or []:
            parts.append(f"{site} accepted (its remaining budgets cover the search)")
        for site, why in sorted((detail.get("unanswered") or {}).items()):
            parts.append(f"{site} did not answer: {why}")
        heard = {*(detail.get("refused") or {}), *(detail.get("accepted") or []),
                 *(detail.get("unanswered") or {})}
        for site in self.sites:
            if site not in heard:  # the admission ends at the refusal that decides it
                parts.append(f"{site} was not asked to the end (the refusal decided)")
        if len(parts) == 1:
            parts.append(reason)
        return "; ".join(parts) + (". Nothing was charged at any site; a smaller epsilon or "
                                   "the sites' IT raising their caps may let it run")

    def _trial_done(self, row_id: int, status: str, score: float | None) -> None:
        with session_scope(self.engine) as session:
            row = session.get(TuningTrial, row_id)
            assert row is not None
            row.status, row.score = status, score
            session.add(row)

    def _finish(self, status: str, reason: str | None) -> None:
        with session_scope(self.engine) as session:
            tuning = session.get(Tuning, self.id)
            assert tuning is not None
            best = session.exec(
                select(TuningTrial).where(TuningTrial.tuning_id == self.id,
                                          TuningTrial.status == "completed")
                .order_by(col(TuningTrial.score).desc(), col(TuningTrial.number))).first()
            if best is not None and status == "completed":
                tuning.best_run_id, tuning.best_score = best.run_id, best.score
            elif status == "completed":
                reason = ("no trial completed" if self.planned else
                          "the random number of trials drawn was 0 (Poisson): the search "
                          "released nothing")
            tuning.status, tuning.reason, tuning.finished_at = status, reason, utcnow()
            session.add(tuning)
            append_event(session, actor=ACTOR, action=f"tuning.{status}",
                         subject=f"tuning:{self.id}",
                         detail={"best_run": tuning.best_run_id,
                                 "best_score": tuning.best_score, "reason": reason})
