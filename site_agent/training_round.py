"""One training round at a site: the ``train`` task of the warm trainer.

The received global model is loaded into the task's model (:func:`load_global_model`); the
round is charged write-ahead in the privacy ledger before any row is read, at the run's
DP-SGD noise multiplier (:func:`run_sigma`); the model is evaluated on the held-out split
(:func:`eval_metrics`), trained with DP-SGD under a fresh secret seed
(:func:`~site_agent.noise_seed.round_noise_seed`), and the update leaves through the
egress guard, stored for a repeated round (:func:`train_round`). The round reaches the
trainer's state through :class:`RoundHost` (``site_agent.trainer.WarmTrainer``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedward.models import array_shapes, model_arrays, set_model_arrays
from fedward.tasks import TaskRef, TaskSpec
from fedward.wire import CFG, SiteErrorCode, update_digest
from privacy import (
    BudgetExceededError,
    Caps,
    PlanCheck,
    PrivacyLedger,
    evaluate,
    train_dp,
)
from privacy.mechanisms import CoveredTrial, DpSgd
from privacy.release import noise_multiplier_after
from privacy.tuning import NotCoveredError
from site_agent.admission import Admission, PolicyRefusal, check_rounds_per_day
from site_agent.answer_egress import finite_metrics
from site_agent.candidate_checks import remember_model
from site_agent.data import SiteData
from site_agent.egress import check_reply
from site_agent.noise_seed import round_noise_seed
from site_agent.reply_store import ReplyStore
from site_agent.run_budget import (
    open_trial,
    sampling,
    search_terms,
    task_caps,
    warm_in_background,
)
from site_agent.statistics import statistics_prior
from site_agent.task_errors import AuditFn, RunTerms, TaskError, bad_task

__all__ = ["RoundHost", "eval_metrics", "load_global_model", "run_sigma", "train_round"]


class RoundHost(Protocol):
    """What a training round uses of the warm trainer (``site_agent.trainer.WarmTrainer``):
    its settings, the task's phase and rows, and the steps it shares with other tasks."""

    data: SiteData | None
    ledger: PrivacyLedger
    replies_dir: Path
    epsilon_cap: float | None
    grad_sample_mode: str
    noise_secret: bytes
    _warm_lock: threading.Lock

    @property
    def audit(self) -> AuditFn: ...

    def _at(self, phase: str) -> None: ...

    def _model_for(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                   ) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]: ...

    def _check_plan(self, config: dict[str, Any], admission: Admission | None, *,
                    round_number: int, warm: bool = False) -> PlanCheck | None: ...

    def _run_sigma(self, config: dict[str, Any], *, epsilon: float, delta: float,
                   sample_rate: float, total_epochs: int) -> float: ...

    def _eval_metrics(self, model: torch.nn.Module) -> dict[str, float]: ...

    def _rows(self) -> SiteData: ...

    def _fingerprint(self) -> dict[str, str]: ...


def load_global_model(task: TaskSpec, arrays: dict[str, np.ndarray]
                      ) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]:
    """The task's model holding the received global model's arrays, and its shapes."""
    model = task.build(seed=0)
    shapes = array_shapes(model)
    try:
        set_model_arrays(model, {k: np.array(v, dtype=np.float32) for k, v in arrays.items()})
    except ValueError:
        raise TaskError(SiteErrorCode.BAD_TASK,
                        "bad-task: the global model's arrays do not match the task") from None
    return model, shapes


def eval_metrics(model: torch.nn.Module, rows: SiteData) -> dict[str, float]:
    """The model's metrics on the site's held-out split."""
    model.eval()
    result = evaluate(model=model, features=rows.test_x, labels=rows.test_y)
    return {
        "eval-loss": result.loss,
        "eval-accuracy": result.accuracy,
        "eval-auc": result.auc,
        "num-eval-examples": float(result.n),
    }


def run_sigma(config: dict[str, Any], *, ledger: PrivacyLedger,
              statistics_task: Callable[[], TaskRef], epsilon: float, delta: float,
              sample_rate: float, total_epochs: int) -> float:
    """The run's DP-SGD noise multiplier, for what its budget leaves after its other
    disclosures here (its statistics release, charged or still planned)."""
    return noise_multiplier_after(prior=statistics_prior(ledger, config, statistics_task()),
                                  epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                                  total_epochs=total_epochs)


def _noise_seed(secret: bytes, run_id: str, round_number: int) -> int:
    """The seed of a round's DP noise and sampling: fresh, secret to this site, kept
    nowhere (see :func:`~site_agent.noise_seed.round_noise_seed`)."""
    return round_noise_seed(secret=secret, run_id=run_id,
                            round_number=round_number, entropy=secrets.token_bytes(32))


def train_round(site: RoundHost, config: dict[str, Any], arrays: dict[str, np.ndarray],
                admission: Admission | None = None
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one round of a run on the site's data and answer with the update.

    A round already answered for the same global model is answered from its stored reply;
    a round already charged with another model is refused. Otherwise: the run's plan is
    checked (its first round here), the round is charged write-ahead in the ledger before
    any row is read, the received model is evaluated on the held-out split, trained with
    DP-SGD, and the answer passes the egress guard and is stored for a replay.
    """
    run = RunTerms.of(config)
    run_id, project, total_rounds = run.run_id, run.project, run.total_rounds
    epsilon, delta, local_epochs, batch = run.epsilon, run.delta, run.local_epochs, run.batch
    try:
        round_number = int(config[CFG.ROUND])
        clip = float(config[CFG.CLIP])
        lr = float(config[CFG.LR])
    except (KeyError, TypeError, ValueError) as err:
        raise bad_task(err) from None
    incoming = update_digest(arrays)
    replay = ReplyStore(site.replies_dir).load(run_id, round_number, incoming, arrays)
    if replay is not None:
        site.audit("round-replayed", {"run": run_id, "round": round_number})
        return replay
    known = site.ledger.get_run(run_id)
    done = known.rounds.get(round_number) if known is not None else None
    if done is not None and done.status == "charged":
        # reserve_round would not charge an already charged round again: training it a
        # second time (another global model, or an older round) would release a second
        # result for one charge.
        raise TaskError(
            SiteErrorCode.REFUSED_POLICY,
            f"refused-policy: round {round_number} of run {run_id} was already trained "
            "and answered with another global model; a site trains each round once",
        )
    cap, site_cap = task_caps(site.epsilon_cap, admission)
    if admission is not None:
        try:
            check_rounds_per_day(site.ledger, limit=admission.max_rounds_per_day,
                                 run_id=run_id, round_number=round_number)
        except PolicyRefusal as err:
            raise TaskError(SiteErrorCode.REFUSED_POLICY, err.reason) from None

    site._at("model")
    model, shapes = site._model_for(config, arrays)

    assert site.data is not None
    site._at("privacy")
    # Only the number of training rows is read before the budget check.
    n_train = len(site.data.train_y)
    q, steps = sampling(site.data, batch=batch, epochs=local_epochs)
    with site._warm_lock:
        pass  # a warm-up for this round still running: wait, then use its results
    entry = site.ledger.get_run(run_id)
    terms = search_terms(config)
    covered: CoveredTrial | None = None
    if terms is not None:
        # A tuning trial: its search's one charge covers it (privacy.tuning).
        covered = open_trial(config, terms, ledger=site.ledger, n_train=n_train,
                             caps=(cap, site_cap), audit=site.audit)
        assert isinstance(covered.trial, DpSgd)
        sigma = covered.trial.noise_multiplier
    elif entry is None or entry.noise_multiplier is None:
        # The run's first round here (its admission may have been answered by an
        # earlier agent, or not asked at all): its whole plan must fit before any of it
        # trains, as at admission. A run that disclosed statistics first keeps the
        # budget and delta it was opened with.
        if entry is not None:
            epsilon, delta = entry.epsilon_budget, entry.delta
        site._check_plan(config, admission, round_number=round_number)
        sigma = site._run_sigma(config, epsilon=epsilon, delta=delta, sample_rate=q,
                                total_epochs=total_rounds * local_epochs)
        site.ledger.open_run(run_id=run_id, project=project, epsilon_budget=epsilon,
                             delta=delta, noise_multiplier=sigma, sample_rate=q)
    else:
        sigma = entry.noise_multiplier
    prior = site.ledger.history(run_id)
    spent_before = site.ledger.epsilon_spent(run_id)

    def record(epsilon_after: float) -> None:
        # Written inside the reservation, after its checks and before the charge: a
        # crash in between leaves this entry without a charge, never a charge without
        # its entry; an audit log that cannot be written charges nothing.
        site.audit("round-reserved", {"run": run_id, "round": round_number,
                                      "epsilon_after": epsilon_after})

    try:
        # Write-ahead: the round is charged before the data is touched (evaluation of the
        # received model included), so a refused round reads nothing.
        if covered is not None:
            site.ledger.reserve(run_id=run_id, purpose="round", key=str(round_number),
                                mechanism=covered, caps=Caps(project=cap, site=site_cap),
                                on_charge=record)
        else:
            site.ledger.reserve_round(run_id=run_id, round_number=round_number,
                                      steps=steps, cap=cap, site_cap=site_cap,
                                      on_charge=record)
    except (BudgetExceededError, NotCoveredError) as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    site._at("evaluate")
    metrics = site._eval_metrics(model)
    remember_model(site.replies_dir, run_id, arrays)
    site._at("train")
    model.train()
    result = train_dp(
        model=model,
        features=site._rows().train_x,
        labels=site.data.train_y,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        batch_size=batch,
        epochs=local_epochs,
        lr=lr,
        seed=_noise_seed(site.noise_secret, run_id, round_number),
        history=prior,
        grad_sample_mode=site.grad_sample_mode,
    )
    spent = site.ledger.complete_round(run_id=run_id, round_number=round_number)
    if terms is not None:  # a trial adds nothing: what it stands for is its search's
        spent = spent_before = site.ledger.epsilon_spent(terms.ledger_run)
    # No training loss leaves the site: it is a statistic of the training rows that
    # DP-SGD's accounting does not cover (one round's loss singled out an outlier record).
    metrics.update({
        "num-examples": float(n_train),
        "epsilon-spent": spent,
        "epsilon-round": max(0.0, spent - spent_before),
        "noise-multiplier": sigma,
        "train-seconds": result.seconds,
    })
    site._at("egress")
    metrics = finite_metrics(metrics)
    out = model_arrays(model)
    answer = {"metrics": metrics, "fingerprint": site._fingerprint()}
    report = check_reply(reply=answer, arrays=out, expected_shapes=shapes)
    site.audit("round-trained", {
        "run": run_id, "round": round_number, "epsilon_spent": spent,
        "bytes_out": report.n_bytes, "array_shapes": report.array_shapes,
        "metrics": report.metric_names, "text": report.text_fields,
    })
    reply = (answer, out)
    ReplyStore(site.replies_dir).store(run_id, round_number, incoming, reply)
    if round_number < total_rounds:
        warm_in_background(site._warm_lock, f"round {round_number + 1}",
                           lambda: site.ledger.warm_next_round(run_id=run_id, steps=steps))
    return reply

