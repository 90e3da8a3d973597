"""The privacy side of a site's tasks: which caps bound a run, whether its whole plan fits
the site's budgets, a tuning trial's charge, and accounting warmed in the background.

A run that cannot finish within the site's remaining budgets (run, project and site-wide,
see :mod:`privacy.budget`) is refused before it trains anything
(``SiteErrorCode.REFUSED_BUDGET``), with the figures. Only the number of training rows is
read here. The run's DP-SGD noise multiplier comes from the warm trainer (``run_sigma``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fedward.tasks import TaskRef
from fedward.wire import CFG, SiteErrorCode
from privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    PlanCheck,
    PlanExceededError,
    PrivacyLedger,
    check_plan,
    check_run_plan,
    expected_steps,
    sample_rate_for,
)
from privacy.mechanisms import CoveredTrial, DpSgd, Mechanism
from site_agent import tuning
from site_agent.admission import Admission
from site_agent.data import SiteData
from site_agent.statistics import pending_statistics, run_statistics_mechanisms
from site_agent.task_errors import AuditFn, RunTerms, TaskError, bad_task

__all__ = [
    "CapPair",
    "RunSigma",
    "check_run_budget",
    "open_trial",
    "sampling",
    "search_terms",
    "task_caps",
    "warm_first_round",
    "warm_in_background",
]

log = logging.getLogger("fedward.site.trainer")

# (the project's cap, the site-wide cap); None: no cap of that kind.
CapPair = tuple[float | None, float | None]


class RunSigma(Protocol):
    """The run's DP-SGD noise multiplier (``WarmTrainer._run_sigma``)."""

    def __call__(self, config: dict[str, Any], *, epsilon: float, delta: float,
                 sample_rate: float, total_epochs: int) -> float: ...


def task_caps(epsilon_cap: float | None, admission: Admission | None) -> CapPair:
    """(the project's cap, the site-wide cap) for a task the gate let through.

    The project's is the smaller of the policy's and the agent's own (``--epsilon-cap``);
    it also bounds one run. The site-wide cap comes from the policy alone.
    """
    cap = epsilon_cap
    if admission is None:
        return cap, None
    cap = admission.epsilon_cap if cap is None else min(cap, admission.epsilon_cap)
    return cap, admission.site_epsilon_cap


def sampling(data: SiteData, *, batch: int, epochs: int) -> tuple[float, int]:
    """The round's Poisson sample rate and DP-SGD steps on this site's training rows."""
    n_train = len(data.train_y)
    return (sample_rate_for(n_examples=n_train, batch_size=batch),
            expected_steps(n_examples=n_train, batch_size=batch, epochs=epochs))


def warm_in_background(lock: threading.Lock, what: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` (privacy accounting for a coming round) in the background.

    The noise-multiplier search and the ledger's compositions are cached (``privacy``);
    computing them while the site waits for the round takes them off the round's
    critical path. At most one warm-up at a time (``lock``: a task waits for it instead of
    computing the same thing twice); failures only cost the cache.
    """
    if not lock.acquire(blocking=False):
        return

    def work() -> None:
        started = time.perf_counter()
        try:
            fn()
            log.debug("warmed %s in %.2f s", what, time.perf_counter() - started)
        except Exception as err:
            log.debug("warming %s failed: %s", what, err)
        finally:
            lock.release()

    threading.Thread(target=work, name="privacy-warm-up", daemon=True).start()


def warm_first_round(config: dict[str, Any], *, ledger: PrivacyLedger,
                     data: SiteData | None, run_sigma: RunSigma,
                     warm_lock: threading.Lock) -> None:
    """While a run waits for a local approval: its noise multiplier and its first
    round's accounting, in the background, so that the admission answer after the
    approval does not have to compute them."""
    run_id = str(config.get(CFG.RUN_ID))
    try:
        if data is None or ledger.get_run(run_id) is not None:
            return
    except LedgerCorruptError:
        return  # refused, with the reason, once the approval lets it be asked
    try:
        project = str(config[CFG.PROJECT])
        epsilon, delta = float(config[CFG.EPSILON]), float(config[CFG.DELTA])
        rounds, epochs = int(config[CFG.TOTAL_ROUNDS]), int(config[CFG.LOCAL_EPOCHS])
        batch = int(config[CFG.BATCH])
    except (KeyError, TypeError, ValueError):
        return
    q, steps = sampling(data, batch=batch, epochs=epochs)

    def first() -> None:
        sigma = run_sigma(config, epsilon=epsilon, delta=delta, sample_rate=q,
                          total_epochs=rounds * epochs)
        ledger.warm_first_round(run_id=run_id, project=project, delta=delta,
                                step=(sigma, q, steps))

    warm_in_background(warm_lock, "the first round", first)


def check_run_budget(config: dict[str, Any], *, ledger: PrivacyLedger, data: SiteData,
                     caps: CapPair, run_sigma: RunSigma,
                     statistics_task: Callable[[], TaskRef],
                     model_shapes: Callable[[], dict[str, tuple[int, ...]]],
                     warm_lock: threading.Lock, round_number: int, warm: bool = False
                     ) -> PlanCheck | None:
    """Check the run's whole remaining plan against every budget of the site.

    The rounds the run still has to train here, at the noise multiplier it will use,
    composed with everything the site has spent: refused with the figures when they do
    not fit any cap, so that a run never trains rounds it cannot finish. Reads only the
    number of training rows; writes nothing. None when there is no round left to train.

    With ``warm`` (the admission answer), every epsilon the run's first round will
    compute is computed now, so that round 1 costs no more than a later round.

    Raises:
        TaskError: ``REFUSED_BUDGET`` with the figures; ``BAD_TASK`` for a malformed
            task.
    """
    run = RunTerms.of(config)
    run_id, project, total_rounds = run.run_id, run.project, run.total_rounds
    epsilon, delta, local_epochs = run.epsilon, run.delta, run.local_epochs
    try:
        q, steps = sampling(data, batch=run.batch, epochs=local_epochs)
    except (KeyError, TypeError, ValueError) as err:
        raise bad_task(err) from None
    if search_terms(config) is not None:
        return _check_search(config, ledger=ledger, n_train=len(data.train_y), caps=caps,
                             project=project, epsilon=epsilon, delta=delta)
    if config.get(CFG.SECURE) is True:
        return _check_secure_plan(config, ledger=ledger, caps=caps, model_shapes=model_shapes,
                                  run_id=run_id, project=project, epsilon=epsilon,
                                  delta=delta, total_rounds=total_rounds,
                                  pending=tuple(pending_statistics(ledger, config,
                                                                   statistics_task())))
    with warm_lock:
        pass  # a search for this run still running in the background: use its result
    entry = ledger.get_run(run_id)
    if entry is not None and entry.noise_multiplier is not None \
            and entry.sample_rate is not None:
        sigma, q, delta = entry.noise_multiplier, entry.sample_rate, entry.delta
        epsilon = entry.epsilon_budget
        rounds_left = total_rounds - len(entry.rounds)
    else:
        if entry is not None:  # opened by an earlier disclosure (statistics): its terms
            epsilon, delta = entry.epsilon_budget, entry.delta
        try:
            sigma = run_sigma(config, epsilon=epsilon, delta=delta, sample_rate=q,
                              total_epochs=total_rounds * local_epochs)
        except ValueError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET,
                            f"refused-budget: {err}") from None
        rounds_left = total_rounds - max(round_number, 1) + 1
    if rounds_left < 1:
        return None
    cap, site_cap = caps
    try:
        check = check_run_plan(
            ledger, run_id=run_id, project=project, delta=delta,
            noise_multiplier=sigma, sample_rate=q, rounds=rounds_left,
            local_epochs=local_epochs, steps=steps * rounds_left, run_budget=epsilon,
            cap=cap, site_cap=site_cap,
            before=pending_statistics(ledger, config, statistics_task()))
    except PlanExceededError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    # A secure run trains without DP-SGD noise (site_agent.secagg_site): nothing to warm.
    if warm and (entry is None or entry.noise_multiplier is None) \
            and config.get(CFG.SECURE) is not True:
        ledger.warm_first_round(run_id=run_id, project=project, delta=delta,
                                step=(sigma, q, steps))
    return check


def _check_secure_plan(config: dict[str, Any], *, ledger: PrivacyLedger, caps: CapPair,
                       model_shapes: Callable[[], dict[str, tuple[int, ...]]],
                       run_id: str, project: str, epsilon: float, delta: float,
                       total_rounds: int, pending: tuple[Mechanism, ...]
                       ) -> PlanCheck | None:
    """:func:`check_run_budget` for a run with secure aggregation: its rounds still to train
    as :class:`~privacy.mechanisms.DistributedSkellam` entries at the noise this site
    will add (privacy.distributed), sized for what the run's statistics release leaves
    (charged, or ``pending``: :func:`~site_agent.statistics.statistics_prior`), against
    every budget."""
    from privacy.distributed import DistributedPlan, mechanism, noise_multiplier_for

    try:
        threshold = int(config.get(CFG.SECAGG_THRESHOLD, 2))
    except (TypeError, ValueError) as err:
        raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}") from None
    entry = ledger.get_run(run_id)
    rounds_left = total_rounds - (len(entry.rounds) if entry is not None else 0)
    if rounds_left < 1:
        return None
    dim = sum(math.prod(s) for s in model_shapes().values())
    try:
        z = noise_multiplier_for(epsilon=epsilon, delta=delta, rounds=total_rounds,
                                 dim=dim, threshold=threshold,
                                 prior=(*run_statistics_mechanisms(ledger, run_id), *pending))
    except ValueError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    plan = DistributedPlan(clip=1.0, dim=dim, threshold=threshold, noise_multiplier=z)
    cap, site_cap = caps
    try:
        return check_plan(
            ledger, run_id=run_id, project=project, delta=delta,
            plan=[*pending, mechanism(plan, rounds_left)], run_budget=epsilon, cap=cap,
            site_cap=site_cap,
            summary=(f"{rounds_left} secure-aggregation round(s) at threshold {threshold}"
                     + (" after the run's statistics" if pending else "")))
    except PlanExceededError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None


# -- tuning trials (site_agent.tuning) --------------------------------------------------

def search_terms(config: dict[str, Any]) -> tuning.SearchTerms | None:
    """The tuning search a trial's run belongs to (None: not a trial)."""
    try:
        return tuning.search_terms(config)
    except ValueError as err:
        raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None


def _check_search(config: dict[str, Any], *, ledger: PrivacyLedger, n_train: int,
                  caps: CapPair, project: str, epsilon: float, delta: float
                  ) -> PlanCheck | None:
    """The plan of a tuning trial's run: its search's one charge, unless made already."""
    terms = search_terms(config)
    assert terms is not None
    cap, site_cap = caps
    try:
        return tuning.check_search(ledger, terms, project=project, epsilon=epsilon,
                                   delta=delta, n_train=n_train, cap=cap,
                                   site_cap=site_cap)
    except PlanExceededError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    except ValueError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None


def open_trial(config: dict[str, Any], terms: tuning.SearchTerms, *, ledger: PrivacyLedger,
               n_train: int, caps: CapPair, audit: AuditFn
               ) -> CoveredTrial:
    """Charge the trial's search (once per search) and open the trial's run in the
    ledger at the search's noise; returns the round's covered mechanism."""
    run_id, project = str(config[CFG.RUN_ID]), str(config[CFG.PROJECT])
    epsilon, delta = float(config[CFG.EPSILON]), float(config[CFG.DELTA])
    cap, site_cap = caps

    def record(epsilon_after: float) -> None:
        audit("tuning-charged", {"run": run_id, "search": terms.search_id,
                                 "epsilon_after": epsilon_after})

    try:
        chosen = tuning.charge_search(
            ledger, terms, project=project, epsilon=epsilon, delta=delta,
            n_train=n_train, cap=cap, site_cap=site_cap, on_charge=record)
        covered = tuning.trial_round(chosen, terms, n_train=n_train,
                                     batch=int(config[CFG.BATCH]),
                                     local_epochs=int(config[CFG.LOCAL_EPOCHS]))
        trial = covered.trial
        assert isinstance(trial, DpSgd)
        ledger.open_run(run_id=run_id, project=project, epsilon_budget=epsilon,
                        delta=delta, noise_multiplier=trial.noise_multiplier,
                        sample_rate=trial.sample_rate)
    except BudgetExceededError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    except ValueError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    return covered
