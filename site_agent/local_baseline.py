"""A site's local-only DP baseline, for an evaluation on demand: was federating worth it?

An evaluation on demand (:mod:`coordinator.evaluation`) may carry ``local-only-evaluation``
(:attr:`fedward.wire.CFG.LOCAL_ONLY`, the evaluation's id): the ML team asks each site, as
well as for the figures of the federated model, for those of the model the hospital would
have had without federating, under the same privacy promise. A site answers only if its
policy says so (``local_baselines: true``; off by default, since it spends budget). Then it:

1. plans the model (:func:`site_agent.baselines.local_only_plan`): the run's task with the
   run's preprocessing, DP-SGD on the site's own training rows at the run's epsilon and
   delta over the run's rounds and local epochs, the run's statistics release included in
   that budget when the run had one (its noise multiplier fills the rest);
2. charges it to the privacy ledger before any row is read: a ledger run
   ``local-only-RUN`` of the run's project with the run's epsilon as its budget, one
   ``baseline`` entry (the DP-SGD; the statistics it reuses were charged by the run),
   checked against the project's and the site's caps. A request that does not fit is
   refused (``refused-budget``, with the figures); so is a second request for the same
   run: a local-only baseline is trained once per run;
3. trains it with noise seeded as a round's is (fresh entropy and the site's secret), marks
   the entry charged, and returns the held-out figures of both models: accuracy, AUC,
   balanced accuracy and Brier score (:func:`site_agent.baselines.classification_metrics`)
   and the epsilon the baseline was charged.

The local model never leaves the site. Like every evaluation figure, the figures are
computed on the held-out rows without noise.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from fedward.wire import CFG, SiteErrorCode
from privacy import BudgetExceededError, PrivacyLedger
from privacy.ledger import Caps
from site_agent.admission import Admission
from site_agent.baselines import held_out_metrics, local_only_plan, train_local_only
from site_agent.noise_seed import round_noise_seed
from site_agent.task_errors import AuditFn, RunTerms, TaskError, bad_task

if TYPE_CHECKING:
    from torch import nn

    from fedward.tasks import TaskSpec
    from site_agent.data import SiteData

__all__ = ["local_only_figures"]


def _ledger_run(run_id: str) -> str:
    """The ledger run that holds a run's local-only baseline at the site."""
    return f"local-only-{run_id}"


def local_only_figures(*, config: dict[str, Any], admission: Admission | None,
                       ledger: PrivacyLedger, caps: Caps, task: TaskSpec, rows: SiteData,
                       federated: nn.Module, noise_secret: bytes, audit: AuditFn
                       ) -> dict[str, float]:
    """Train the site's local-only baseline of the evaluated run and return both models'
    held-out figures (see the module docstring).

    Args:
        config: the evaluation's task configuration (the run's terms and
            ``local-only-evaluation``).
        admission: what the site policy let the task do (None: no gate, no baseline).
        ledger: the site's privacy ledger.
        caps: the project's and the site's caps for the task.
        task: the run's task, with the run's preprocessing.
        rows: the site's rows for that task (its training and held-out splits).
        federated: the received model, already loaded.
        noise_secret: the site's noise secret (``keys/noise.secret``).
        audit: the site's audit log.

    Raises:
        TaskError: ``REFUSED_POLICY`` (the policy does not allow it, or this run's baseline
            was trained already), ``REFUSED_BUDGET`` (it does not fit a cap, with the
            figures) or ``BAD_TASK`` (the configuration lacks a term).
    """
    if admission is None or not admission.local_baselines:
        raise TaskError(SiteErrorCode.REFUSED_POLICY,
                        "refused-policy: this site's policy does not train local-only "
                        "baselines (local_baselines is off; its IT can turn it on in "
                        "policy.json)")
    run = RunTerms.of(config)
    try:
        evaluation = int(config[CFG.LOCAL_ONLY])
        lr, clip = float(config[CFG.LR]), float(config[CFG.CLIP])
        statistics_epsilon = (float(config[CFG.STATISTICS_EPSILON])
                              if config.get(CFG.STATISTICS) is True else None)
    except (KeyError, TypeError, ValueError) as err:
        raise bad_task(err) from None
    name = _ledger_run(run.run_id)
    earlier = [e for e in ledger.entries() if e.run_id == name]
    if earlier:
        raise TaskError(SiteErrorCode.REFUSED_POLICY,
                        f"refused-policy: the local-only baseline of run {run.run_id} was "
                        f"trained at this site already (evaluation {earlier[0].key}); it is "
                        "trained once per run, its budget being the run's")
    # Only the number of training rows is read before the charge.
    prior, plan = local_only_plan(n_features=task.n_features, n_train=len(rows.train_y),
                                  epsilon=run.epsilon, delta=run.delta,
                                  rounds=run.total_rounds, local_epochs=run.local_epochs,
                                  batch_size=run.batch, statistics_epsilon=statistics_epsilon)
    ledger.open_run(run_id=name, project=run.project, epsilon_budget=run.epsilon,
                    delta=run.delta)
    try:
        reservation = ledger.reserve(run_id=name, purpose="baseline", key=str(evaluation),
                                     mechanism=plan, caps=caps)
    except BudgetExceededError as err:
        raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
    seed = round_noise_seed(secret=noise_secret, run_id=name, round_number=evaluation,
                            entropy=secrets.token_bytes(32)) % 2 ** 53
    local = train_local_only(task=task, train_x=rows.train_x, train_y=rows.train_y,
                             epsilon=run.epsilon, delta=run.delta, rounds=run.total_rounds,
                             local_epochs=run.local_epochs, batch_size=run.batch, lr=lr,
                             max_grad_norm=clip, statistics_epsilon=statistics_epsilon,
                             seed=seed, plan=(prior, plan))
    ledger.charge(run_id=name, purpose="baseline", key=str(evaluation))
    assert reservation.run is not None
    epsilon = reservation.run.epsilon
    audit("local-baseline-trained", {
        "run": run.run_id, "evaluation": evaluation, "ledger_run": name,
        "epsilon": round(epsilon, 6), "noise_multiplier": round(plan.noise_multiplier, 6),
        "steps": plan.steps, "statistics_reused": bool(prior)})
    mine = held_out_metrics(local.model, rows.test_x, rows.test_y)
    theirs = held_out_metrics(federated, rows.test_x, rows.test_y)
    return {"eval-balanced-accuracy": theirs["balanced_accuracy"],
            "eval-brier": theirs["brier"],
            "local-only-accuracy": mine["accuracy"], "local-only-auc": mine["auc"],
            "local-only-balanced-accuracy": mine["balanced_accuracy"],
            "local-only-brier": mine["brier"], "local-only-epsilon": epsilon}
