"""The warm trainer: the one process at a site that reads patient data.

It lives inside the long-lived site agent, keeps torch imported and the site's data
loaded, and serves one task at a time over a Unix socket to the thin ClientApp relay.
Each task first passes the site gate (the site policy and local approvals, see
:mod:`site_agent.admission`) before any data is touched. An admission question (the
coordinator asks it before a run's first round) is answered from the gate (accepted,
pending approval: ``SiteErrorCode.PENDING_APPROVAL``, or refused) and from the run's whole
plan checked against the site's remaining budgets (run, project and site-wide, see
:mod:`privacy.budget`): a run that cannot finish within them is refused before it trains
anything (``SiteErrorCode.REFUSED_BUDGET``), with the figures. No data is read for it. Each
training task then: check the privacy budget (write-ahead in the ledger, under the smaller
of the project's policy cap and the agent's own cap, and the site-wide cap), evaluate the
received global model on the site's held-out split, train with DP-SGD, pass the result
through the egress guard, and answer.
Every step is written to the site's audit log; a task whose record cannot be written is
refused. A repeated task for a round that already trained is answered from the stored
reply, so a resumed run never spends the site's privacy twice.

The task's steps live beside it: the site gate (:mod:`site_agent.run_admission`), the
privacy budget (:mod:`site_agent.run_budget`), the model a task trains
(:mod:`site_agent.task_models`), the training round (:mod:`site_agent.training_round`),
a candidate's checks (:mod:`site_agent.candidate_checks`), the egress guard on every answer
(:mod:`site_agent.answer_egress`) and the stored replies (:mod:`site_agent.reply_store`);
:mod:`site_agent.trainer_server` serves the trainer on its socket.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedward.agent_versions import REPLY_VERSIONS, local_versions
from fedward.models import array_shapes
from fedward.study import StudySpec
from fedward.tasks import TaskRef, TaskSpec, get_task
from fedward.wire import CFG, MSG, SECAGG_STAGE, SiteErrorCode
from privacy import Caps, LedgerCorruptError, PlanCheck, PrivacyLedger
from site_agent.admission import Admission, SiteGate
from site_agent.answer_egress import finite_metrics, guard_answer
from site_agent.audit import AuditLogError
from site_agent.candidate_checks import measure_candidate, remember_model
from site_agent.data import SiteData
from site_agent.diagnostics import failure_reason
from site_agent.egress import EgressViolation, check_outgoing
from site_agent.local_baseline import local_only_figures
from site_agent.parity_task import ParityTaskError, split_arrays
from site_agent.run_admission import AdmissionAnswers, admit
from site_agent.run_budget import check_run_budget, task_caps, warm_first_round
from site_agent.secagg_site import SecAggRefused, SecAggSessions
from site_agent.statistics import StatisticsRefusal, release_statistics, statistics_prior
from site_agent.task_errors import AuditFn, TaskError, data_failure_reason, ledger_refusal
from site_agent.task_models import own_task, statistics_task, study_task_for
from site_agent.training_round import eval_metrics, load_global_model, run_sigma, train_round

__all__ = ["WarmTrainer"]

log = logging.getLogger("fedward.site.trainer")


@dataclass
class WarmTrainer:
    """Carries out tasks for one site.

    Args:
        site_name: the site's name (for logs and the audit trail).
        task: the registry task the site's data schema declares.
        data: the site's checked, split data (None when it failed its checks).
        ledger: the site's privacy ledger.
        replies_dir: where the last reply of each run is kept for idempotent replays.
        audit: called with (action, detail) for every task seen; details carry no values.
            If it raises :class:`~site_agent.audit.AuditLogError` the task is refused.
        epsilon_cap: the agent's own cap (``fedward-site start --epsilon-cap``); the smaller
            of it and the project's policy cap bounds the run and the project (None: the
            policy's cap, or the run's budget alone without a gate).
        grad_sample_mode: Opacus per-sample gradient mode (``auto``: the fastest mode that
            is valid for the model, see ``privacy.training.pick_grad_sample_mode``).
        data_failure: when the data failed its checks, the summary that may leave the site
            (kinds and counts); every task is then refused with it, before any training.
        noise_secret: a secret only this site holds, mixed into the seed of each round's
            DP noise and Poisson sampling together with fresh operating-system entropy
            (:func:`~site_agent.noise_seed.round_noise_seed`). Nothing the coordinator
            chose goes into the seed, or it could regenerate the noise and remove it; and
            the seed is never stored, so not even a copy of this secret reproduces a
            round's noise.
        gate: the site policy and local approvals, applied to every task before any data
            is touched. The site agent always installs one; None (no policy at all) is only
            for tests and tools that embed the trainer.
        data_dir: the folder of the site's data file: a failure's message names paths in it
            by the folder's name only (``site_agent.diagnostics``).
    """

    site_name: str
    task: str
    data: SiteData | None
    ledger: PrivacyLedger
    replies_dir: Path
    audit: AuditFn = field(default=lambda action, detail: None)
    epsilon_cap: float | None = None
    grad_sample_mode: str = "auto"
    data_failure: dict[str, Any] | None = None
    gate: SiteGate | None = None
    noise_secret: bytes = b""
    data_dir: Path | None = None
    # The site's own copy of its study spec (site.json ``study``; None: a registry task).
    # A run of a study is trained only when it pins this copy's content hash, and the model
    # is built from it: nothing about the model is taken from the message.
    study: StudySpec | None = None
    # Where the task being handled is (policy, data, model, privacy, evaluate, train, egress):
    # a failure names it. Tasks are handled one at a time (TrainerServer's lock).
    _phase: str = field(default="policy", init=False, repr=False)
    _shapes: dict[str, tuple[int, ...]] | None = field(default=None, init=False, repr=False)
    # The rows of the task being handled with the run's imputation applied (a study whose
    # rows have values to impute; _rows): the model imputes the same inside itself.
    _rows_view: SiteData | None = field(default=None, init=False, repr=False)
    # The admission answers already in the audit log, and the runs seen cancelled.
    _answers: AdmissionAnswers = field(default_factory=AdmissionAnswers, init=False,
                                       repr=False)
    # Held while privacy accounting for a coming round is computed in the background
    # (run_budget.warm_in_background); a task waits for it instead of computing the same
    # thing twice.
    _warm_lock: threading.Lock = field(default_factory=threading.Lock, init=False,
                                       repr=False)
    # Secure-aggregation rounds in progress: this site's keys between the stage messages.
    _secagg: SecAggSessions = field(default_factory=SecAggSessions, init=False, repr=False)

    def handle(self, header: dict[str, Any], arrays: dict[str, np.ndarray]
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Answer one task frame; refusals and failures become error answers.

        Every answer passes the egress guard here, at the one point where it is handed back,
        whatever produced it.
        """
        self._rows_view = None   # set by _study_task_for for this task only
        try:
            reply, out = self._handle(header, arrays)
            return self._hand_back(header, reply, out)
        except AuditLogError as err:
            # Nothing leaves the site without a record: fail closed.
            log.error("task refused: %s", err)
            return {"error": {
                "code": SiteErrorCode.REFUSED_POLICY,
                "reason": ("refused-policy: the site cannot write its audit log; its IT runs "
                           "`fedward-site audit verify` and `fedward-site doctor`"),
            }}, {}

    def _model_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = array_shapes(self._own_task().build(seed=0))
        return self._shapes

    def _hand_back(self, header: dict[str, Any], reply: dict[str, Any],
                   out: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The egress guard on a whole answer (site_agent.answer_egress)."""
        return guard_answer(header, reply, out, ledger=self.ledger,
                            model_shapes=self._model_shapes,
                            statistics_task=self._statistics_task, audit=self.audit)

    def _at(self, phase: str) -> None:
        self._phase = phase

    def _handle(self, header: dict[str, Any], arrays: dict[str, np.ndarray]
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        kind = str(header.get("kind", ""))
        self._at("policy")
        config = header.get("config") if isinstance(header.get("config"), dict) else {}
        assert isinstance(config, dict)
        run_id = str(config.get(CFG.RUN_ID, "?"))
        try:
            round_number = int(config.get(CFG.ROUND, 0) or 0)
        except (TypeError, ValueError):
            round_number = 0  # for the audit only: train_round refuses the task as malformed
        if kind == "admission":
            return self._admission(config, run_id)
        if kind == "cancel":
            return self._answers.cancelled(
                config, run_id, audit=self.audit,
                approvals=None if self.gate is None else self.gate.approvals)
        try:
            if kind not in ("train", "evaluate", "parity", "statistics", "secagg"):
                raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: unknown kind {kind!r}")
            # The site's policy comes first: a run it does not accept learns nothing else
            # about the site, and no data is touched.
            admission = admit(config, gate=self.gate, study=self.study)
            self._at("data")
            if self.data is None or self.data_failure is not None:
                raise TaskError(SiteErrorCode.REFUSED_DATA,
                                data_failure_reason(self.data_failure))
            if kind == "train":
                return train_round(self, config, arrays, admission)
            if kind == "statistics":
                return self._statistics(config, admission)
            if kind == "secagg":
                return self._secure_round(config, arrays, admission)
            if kind == "parity":
                return self._parity(config, arrays)
            return self._evaluate_only(config, arrays, admission)
        except (TaskError, LedgerCorruptError) as caught:
            err = caught if isinstance(caught, TaskError) else ledger_refusal(caught)
            self.audit("task-refused", {"run": run_id, "round": round_number,
                                        "code": err.code, "reason": err.reason})
            return {"error": {"code": err.code, "reason": err.reason}}, {}
        except EgressViolation as err:
            self.audit("egress-blocked", {"run": run_id, "round": round_number,
                                          "problems": err.problems})
            return {"error": {"code": SiteErrorCode.EGRESS_BLOCKED, "reason": str(err)}}, {}
        except AuditLogError:
            raise  # handle() refuses the task: nothing happens here without its record
        except Exception as err:
            log.exception("task failed")
            # Exception text can quote data values: what leaves is the type, the phase and a
            # scrubbed message (no quoted text, numbers or paths); the full text stays here.
            reason = failure_reason(err, kind=kind, phase=self._phase, data_dir=self.data_dir)
            self.audit("task-failed", {"run": run_id, "round": round_number,
                                       "error": type(err).__name__, "phase": self._phase,
                                       "reason": reason})
            return {"error": {"code": SiteErrorCode.TASK_FAILED, "reason": reason}}, {}

    def _secure_round(self, config: dict[str, Any], arrays: dict[str, np.ndarray],
                      admission: Admission | None
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One stage of a secure-aggregation round (site_agent.secagg_site)."""
        if config.get(CFG.TUNING_SEARCH) is not None:
            raise TaskError(SiteErrorCode.REFUSED_POLICY, "refused-policy: a tuning trial "
                            "cannot use secure aggregation in this version")
        cap, site_cap = task_caps(self.epsilon_cap, admission)
        assert self.data is not None
        known = self.ledger.get_run(str(config.get(CFG.RUN_ID)))
        if config.get(SECAGG_STAGE) == "mask" and (known is None or not known.trains):
            # The run's first round here (its statistics may have opened it in the ledger):
            # its whole plan must fit before any of it trains.
            self._at("privacy")
            self._check_plan(config, admission, round_number=int(config.get(CFG.ROUND, 1)))
        self._at("train")

        def build(received: dict[str, np.ndarray]) -> torch.nn.Module:
            self._at("model")
            model, _shapes = self._model_for(config, received)
            self._at("train")
            return model

        try:
            return self._secagg.handle(
                config, arrays, ledger=self.ledger, caps=Caps(project=cap, site=site_cap),
                audit=self.audit, build=build, evaluate=self._eval_metrics,
                train_xy=(self.data.train_x, self.data.train_y),
                prior=lambda: statistics_prior(self.ledger, config, self._statistics_task()))
        except SecAggRefused as err:
            raise TaskError(err.code, err.reason) from None

    def _admission(self, config: dict[str, Any], run_id: str
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Answer "does this site accept the run?" from the site gate alone.

        The same gate as every task (so the approvals book records the run as seen, pending
        or refused exactly as a first task would), but no data is touched, nothing is
        charged and nothing but the answer leaves. The answer goes to the audit log when it
        differs from the last one given for the run (the coordinator asks a waiting site
        again every few seconds).
        """
        code: int | None = None
        reason: str | None = None
        try:
            admission = admit(config, gate=self.gate, study=self.study)
            self._at("privacy")
            try:
                self._check_plan(config, admission, round_number=0, warm=True)
            except LedgerCorruptError as err:
                raise ledger_refusal(err) from None
        except TaskError as err:
            code, reason = err.code, err.reason
        self._answers.record(run_id, code, reason, audit=self.audit)
        if code == SiteErrorCode.PENDING_APPROVAL:
            warm_first_round(config, ledger=self.ledger, data=self.data,
                             run_sigma=self._run_sigma, warm_lock=self._warm_lock)
        if code is not None:
            return {"error": {"code": code, "reason": reason}}, {}
        # The agent's Fedward and Flower versions ride with an acceptance (fixed format,
        # checked by the egress guard), so the coordinator shows what each site runs.
        return {"status": {MSG.STATUS: MSG.ACCEPTED}, REPLY_VERSIONS: local_versions()}, {}

    def _check_plan(self, config: dict[str, Any], admission: Admission | None, *,
                    round_number: int, warm: bool = False) -> PlanCheck | None:
        """Check the run's whole remaining plan against every budget of the site
        (:func:`site_agent.run_budget.check_run_budget`); None when there is nothing to
        check (no data loaded: every task is refused for that anyway; no round left).

        Raises:
            TaskError: ``REFUSED_BUDGET`` with the figures; ``BAD_TASK`` for a malformed
                task.
        """
        if self.data is None or self.data_failure is not None:
            return None
        return check_run_budget(
            config, ledger=self.ledger, data=self.data,
            caps=task_caps(self.epsilon_cap, admission), run_sigma=self._run_sigma,
            statistics_task=self._statistics_task, model_shapes=self._model_shapes,
            warm_lock=self._warm_lock, round_number=round_number, warm=warm)

    def _run_sigma(self, config: dict[str, Any], *, epsilon: float, delta: float,
                   sample_rate: float, total_epochs: int) -> float:
        """The run's DP-SGD noise multiplier (site_agent.training_round.run_sigma)."""
        return run_sigma(config, ledger=self.ledger, statistics_task=self._statistics_task,
                         epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                         total_epochs=total_epochs)

    def _statistics(self, config: dict[str, Any], admission: Admission | None
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Release the run's DP statistics (site_agent.statistics): charged before any row
        is read, noised, kept for a repeated question."""
        assert self.data is not None
        data = self.data
        self._at("privacy")
        cap, site_cap = task_caps(self.epsilon_cap, admission)
        # A run of this site's study: its features and bins come from the site's own copy
        # of the spec, which must be the version the run pins.
        task = (self._study_task_for(config, statistics=True)
                if self.study is not None and config.get(CFG.STUDY_HASH) is not None
                else self.task)
        try:
            return release_statistics(
                ledger=self.ledger, config=config, features=lambda: data.train_x,
                caps=Caps(project=cap, site=site_cap), replies_dir=self.replies_dir,
                audit=self.audit, task=task)
        except StatisticsRefusal as err:
            raise TaskError(err.code, err.reason) from None

    # -- tasks (site_agent.task_models) -------------------------------------------------

    def _own_task(self) -> TaskSpec:
        """The task this site trains: its study's (own copy), else the registry task."""
        return own_task(self.task, self.study)

    def _statistics_task(self) -> TaskRef:
        """What the statistics phase bins: this site's study's task, else the task's name."""
        return statistics_task(self.task, self.study)

    def _study_task_for(self, config: dict[str, Any], *, statistics: bool = False
                        ) -> TaskSpec:
        """The model of a run of this site's study (site_agent.task_models.study_task_for);
        the rows it imputes are the task's rows from now on (:meth:`_rows`)."""
        assert self.study is not None
        task, rows = study_task_for(config, study=self.study, data=self.data,
                                    statistics=statistics)
        if rows is not None:
            self._rows_view = rows
        return task

    def _rows(self) -> SiteData:
        """The site's rows for the task being handled (imputed where the run imputes)."""
        assert self.data is not None
        return self._rows_view if self._rows_view is not None else self.data

    def _model_for(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                   ) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]:
        return load_global_model(self._task_for(config), arrays)

    def _task_for(self, config: dict[str, Any]) -> TaskSpec:
        """The task a run trains here, checked against the site's own."""
        task_name = str(config.get(CFG.TASK, ""))
        try:
            # A run of a study: the site's own copy, by the pinned hash. A run of a registry
            # task (no study pinned) trains that task's shipped model, as before studies.
            task = (self._study_task_for(config)
                    if self.study is not None and config.get(CFG.STUDY_HASH) is not None
                    else get_task(task_name))
        except KeyError as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
        if task.name != self.task:
            raise TaskError(
                SiteErrorCode.REFUSED_POLICY,
                f"refused-policy: this site holds data for task {self.task!r}, "
                f"not {task.name!r}",
            )
        return task

    def _eval_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        assert self.data is not None
        return eval_metrics(model, self._rows())

    def _fingerprint(self) -> dict[str, str]:
        """Hashes and counts of the site's data: what lineage records, never values. The
        file's digest leaves only keyed (HMAC under the site's key), never its plain SHA-256."""
        assert self.data is not None
        fp = self.data.fingerprint
        out = {"schema-hash": fp.schema_hash, "n-rows": str(fp.n_rows),
               "n-train": str(fp.n_train), "n-test": str(fp.n_test)}
        if fp.content_hmac is not None:
            out["content-hmac"] = fp.content_hmac
        return out

    def _parity(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Measure a candidate's export parity on the held-out split (site_agent.candidate_checks:
        only a model this site evaluated, only artefacts equal to the site's own export, each
        format once, coarse figures)."""
        assert self.data is not None
        try:
            model_arrays_in, files = split_arrays(arrays)
        except ParityTaskError as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
        self._at("model")
        _model, shapes = self._model_for(config, model_arrays_in)
        self._at("parity")
        # The run's task: for a study, with the run's imputation and scaling, as the
        # candidate's exports were built.
        task = (self._study_task_for(config)
                if self.study is not None and config.get(CFG.STUDY_HASH) is not None
                else self._own_task())
        return measure_candidate(config, task=task, model=_model, shapes=shapes,
                                 model_arrays=model_arrays_in, files=files, rows=self._rows(),
                                 replies_dir=self.replies_dir, audit=self.audit)

    def _evaluate_only(self, config: dict[str, Any], arrays: dict[str, np.ndarray],
                       admission: Admission | None
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._at("model")
        task = self._task_for(config)
        model, shapes = load_global_model(task, arrays)
        self._at("evaluate")
        metrics = finite_metrics(self._eval_metrics(model))
        if config.get(CFG.LOCAL_ONLY) is not None:
            # An evaluation on demand that asks for the site's local-only DP baseline.
            self._at("privacy")
            cap, site_cap = task_caps(self.epsilon_cap, admission)
            metrics.update(finite_metrics(local_only_figures(
                config=config, admission=admission, ledger=self.ledger,
                caps=Caps(project=cap, site=site_cap), task=task, rows=self._rows(),
                federated=model, noise_secret=self.noise_secret, audit=self.audit)))
        remember_model(self.replies_dir, str(config.get(CFG.RUN_ID)), arrays)
        report = check_outgoing(expected_shapes=shapes, arrays={}, metrics=metrics)
        self.audit("evaluated", {"run": str(config.get(CFG.RUN_ID)),
                                 "round": int(config.get(CFG.ROUND, 0)),
                                 "bytes_out": report.n_bytes, "metrics": report.metric_names})
        return {"metrics": metrics}, {}
