"""The warm trainer: the one process at a site that reads patient data.

It lives inside the long-lived site agent, keeps torch imported and the site's data
loaded, and serves one task at a time over a Unix socket to the thin ClientApp relay.
Each task first passes the site gate (the site policy and local approvals, see
:mod:`site_agent.policy`) before any data is touched. An admission question (the
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
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from fedward.agent_versions import REPLY_VERSIONS, local_versions
from fedward.files import atomic_write
from fedward.models import array_shapes, model_arrays, set_model_arrays
from fedward.plugins import PluginPin
from fedward.preprocessing import (
    Preprocessing,
    PreprocessingError,
    fill_missing,
    imputed_features,
)
from fedward.statistics import expected_shape
from fedward.study import StudySpec
from fedward.tasks import TaskRef, TaskSpec, UntrainableStudyError, get_task, study_task
from fedward.wire import (
    CANCEL_BY,
    CANCEL_REASON,
    CFG,
    MSG,
    SECAGG_STAGE,
    SiteErrorCode,
    update_digest,
)
from privacy import (
    BudgetExceededError,
    Caps,
    GaussianRelease,
    LedgerCorruptError,
    PlanCheck,
    PlanExceededError,
    PrivacyLedger,
    UnknownMechanismError,
    check_plan,
    check_run_plan,
    evaluate,
    expected_steps,
    sample_rate_for,
    train_dp,
)
from privacy.mechanisms import CoveredTrial, DpSgd
from privacy.membership import audit_membership
from privacy.release import noise_multiplier_after
from privacy.tuning import NotCoveredError
from site_agent import tuning
from site_agent.admission import (
    Admission,
    PendingApproval,
    PolicyRefusal,
    SiteGate,
    check_rounds_per_day,
)
from site_agent.approvals import ApprovalsError
from site_agent.audit import AuditLogError
from site_agent.data import SiteData
from site_agent.diagnostics import failure_reason
from site_agent.egress import (
    EgressViolation,
    check_outgoing,
    check_reply,
    check_statistics_reply,
)
from site_agent.ipc import IPCError, read_frame, write_frame
from site_agent.parity_task import (
    ParityBook,
    ParityRefused,
    ParityTaskError,
    measure_parity,
    model_digest,
    split_arrays,
)
from site_agent.secagg_site import SecAggRefused, SecAggSessions, check_egress
from site_agent.statistics import (
    StatisticsRefusal,
    pending_statistics,
    release_statistics,
    run_statistics_mechanisms,
)

__all__ = ["TaskError", "TrainerServer", "WarmTrainer", "round_noise_seed"]

log = logging.getLogger("fedward.site.trainer")

AuditFn = Callable[[str, dict[str, Any]], None]


class TaskError(Exception):
    """A task the site refuses or cannot carry out; ``code`` is a SiteErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


def _ledger_refusal(err: LedgerCorruptError) -> TaskError:
    """The refusal a site answers while its privacy ledger cannot be trusted.

    An entry with an unknown mechanism is named (its number and type: nothing about the
    data); other damage is only reported as such (the full text, with paths, stays in the
    site's log).
    """
    log.error("task refused: %s", err)
    if isinstance(err, UnknownMechanismError):
        named = "; ".join(f"entry {i} records mechanism type {kind!r}"
                          for i, _run, _purpose, kind in err.unknown)
        detail = (f"its privacy ledger holds an entry this version cannot account ({named}), "
                  "and nothing is left out of its budget")
    else:
        detail = "its privacy ledger cannot be read"
    return TaskError(SiteErrorCode.REFUSED_POLICY,
                     f"refused-policy: the site refuses to train: {detail}; its IT runs "
                     "`fedward-site doctor` and `fedward-site ledger show`")


# Stored replies name the digest of the global model they answer. Before the one digest of
# the wire (fedward.wire.update_digest) they used this one: a reply stored then (no
# "digest" key in its file) is still found for a repeated round after an upgrade, instead of
# being mistaken for a round trained with another model.
def _legacy_reply_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


_REPLY_DIGEST: Final = "fedward.wire.update_digest"
# The delta a membership audit reads its epsilon bound against when a task names none.
DEFAULT_AUDIT_DELTA: Final = 1e-5


def _finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def round_noise_seed(*, secret: bytes, run_id: str, round_number: int, entropy: bytes) -> int:
    """The 63-bit seed of one round's DP noise and Poisson sampling at a site.

    HMAC-SHA256 under the site's noise secret of the run, the round and ``entropy``, which
    the trainer draws fresh from the operating system (``secrets.token_bytes(32)``) for
    every round and never stores. The seed is therefore unknown to the coordinator (nothing
    it chose decides it) and to anyone holding a copy of the site's secret (a backup, a
    stolen disk image): noise that could be regenerated could be subtracted from the
    update. The secret still keeps the seed out of reach should the operating system's
    entropy ever be weak (a cloned virtual machine). The price, chosen on purpose: a round
    cannot be re-trained to the same result; a repeated round is answered from its stored
    reply instead (``WarmTrainer``).

    The seed drives PyTorch's generator (not a cryptographic one; Opacus's secure_mode,
    which would draw every sample from a CSPRNG, needs torchcsprng, unmaintained since
    2021). An observer sees only noised sums of clipped gradients, never the generator's
    raw output.

    Args:
        secret: the site's noise secret (``site_agent.keys.ensure_noise_secret``); may be
            empty (tools that embed the trainer), the entropy then decides alone.
        run_id: the run.
        round_number: the round.
        entropy: at least 16 fresh random bytes (fixed bytes only in benchmarks that must
            repeat a run).

    Raises:
        ValueError: if ``entropy`` is shorter than 16 bytes.
    """
    if len(entropy) < 16:
        raise ValueError(f"a round's noise seed needs at least 16 bytes of entropy, got "
                         f"{len(entropy)}")
    message = f"{run_id}/{round_number}/".encode() + entropy
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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
            (:func:`round_noise_seed`). Nothing the coordinator chose goes into the seed,
            or it could regenerate the noise and remove it; and the seed is never stored,
            so not even a copy of this secret reproduces a round's noise.
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
    # run id -> the last admission answer written to the audit log (code, reason): the
    # coordinator asks a waiting site again every few seconds; only changes are recorded.
    _admission_answers: dict[str, tuple[int | None, str | None]] = field(
        default_factory=dict, init=False, repr=False)
    # Runs whose cancellation is in the audit log already (the message may come twice).
    _cancelled_runs: set[str] = field(default_factory=set, init=False, repr=False)
    # Held while privacy accounting for a coming round is computed in the background
    # (see _warm); a task waits for it instead of computing the same thing twice.
    _warm_lock: threading.Lock = field(default_factory=threading.Lock, init=False,
                                       repr=False)
    # Secure-aggregation rounds in progress: this site's keys between the stage messages.
    _secagg: SecAggSessions = field(default_factory=SecAggSessions, init=False, repr=False)

    def _warm(self, what: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` (privacy accounting for a coming round) in the background.

        The noise-multiplier search and PRV compositions are cached in ``privacy.dp``;
        computing them while the site waits for the round takes them off the round's
        critical path. At most one warm-up at a time; failures only cost the cache.
        """
        if not self._warm_lock.acquire(blocking=False):
            return

        def work() -> None:
            started = time.perf_counter()
            try:
                fn()
                log.debug("warmed %s in %.2f s", what, time.perf_counter() - started)
            except Exception as err:
                log.debug("warming %s failed: %s", what, err)
            finally:
                self._warm_lock.release()

        threading.Thread(target=work, name="privacy-warm-up", daemon=True).start()

    def _sampling(self, *, batch: int, epochs: int) -> tuple[float, int]:
        """The round's Poisson sample rate and DP-SGD steps on this site's training rows."""
        assert self.data is not None
        n_train = len(self.data.train_y)
        return (sample_rate_for(n_examples=n_train, batch_size=batch),
                expected_steps(n_examples=n_train, batch_size=batch, epochs=epochs))

    def _warm_first_round(self, config: dict[str, Any]) -> None:
        """While a run waits for a local approval: its noise multiplier and its first
        round's accounting, in the background, so that the admission answer after the
        approval does not have to compute them."""
        run_id = str(config.get(CFG.RUN_ID))
        try:
            if self.data is None or self.ledger.get_run(run_id) is not None:
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
        q, steps = self._sampling(batch=batch, epochs=epochs)

        def first() -> None:
            sigma = self._run_sigma(config, epsilon=epsilon, delta=delta, sample_rate=q,
                                    total_epochs=rounds * epochs)
            self.ledger.warm_first_round(run_id=run_id, project=project, delta=delta,
                                         step=(sigma, q, steps))

        self._warm("the first round", first)

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
        """The egress guard on a whole answer: only model-shaped arrays (train answers),
        allow-listed metrics and the fixed-format text parts leave."""
        kind = str(header.get("kind", ""))
        try:
            if kind == "statistics":
                self._check_statistics_egress(header, reply, out)
            elif kind == "secagg":
                config = header.get("config") if isinstance(header.get("config"), dict) else {}
                assert isinstance(config, dict)
                dim = sum(math.prod(s) for s in self._model_shapes().values())
                problems = check_egress(config, reply, out, dim)
                if problems:
                    raise EgressViolation(problems)
            else:
                check_reply(reply=reply, arrays=out,
                            expected_shapes=self._model_shapes() if kind == "train" else {})
        except EgressViolation as err:
            config = header.get("config") if isinstance(header.get("config"), dict) else {}
            assert isinstance(config, dict)
            self.audit("egress-blocked", {"run": str(config.get(CFG.RUN_ID, "?")),
                                          "round": config.get(CFG.ROUND), "kind": kind,
                                          "problems": err.problems})
            log.error("blocked an outgoing answer: %s", err)
            return {"error": {"code": SiteErrorCode.EGRESS_BLOCKED, "reason": str(err)}}, {}
        return reply, out

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
            round_number = 0  # for the audit only: _train refuses the task as malformed
        if kind == "admission":
            return self._admission(config, run_id)
        if kind == "cancel":
            return self._cancelled(config, run_id)
        try:
            if kind not in ("train", "evaluate", "parity", "statistics", "secagg"):
                raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: unknown kind {kind!r}")
            # The site's policy comes first: a run it does not accept learns nothing else
            # about the site, and no data is touched.
            admission = self._admit(config)
            self._at("data")
            if self.data is None or self.data_failure is not None:
                raise TaskError(SiteErrorCode.REFUSED_DATA, self._data_failure_reason())
            if kind == "train":
                return self._train(config, arrays, admission)
            if kind == "statistics":
                return self._statistics(config, admission)
            if kind == "secagg":
                return self._secure_round(config, arrays, admission)
            if kind == "parity":
                return self._parity(config, arrays)
            return self._evaluate_only(config, arrays)
        except (TaskError, LedgerCorruptError) as caught:
            err = caught if isinstance(caught, TaskError) else _ledger_refusal(caught)
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
        cap, site_cap = self._caps(admission)
        assert self.data is not None
        if config.get(SECAGG_STAGE) == "mask" and self.ledger.get_run(
                str(config.get(CFG.RUN_ID))) is None:
            # The run's first round here: its whole plan must fit before any of it trains.
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
                train_xy=(self.data.train_x, self.data.train_y))
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
            admission = self._admit(config)
            self._at("privacy")
            try:
                self._check_plan(config, admission, round_number=0, warm=True)
            except LedgerCorruptError as err:
                raise _ledger_refusal(err) from None
        except TaskError as err:
            code, reason = err.code, err.reason
        if self._admission_answers.get(run_id) != (code, reason):
            if code is None:
                self.audit("admission-accepted", {"run": run_id})
            else:
                self.audit("task-refused", {"run": run_id, "round": 0, "kind": "admission",
                                            "code": code, "reason": reason})
            self._admission_answers[run_id] = (code, reason)
        if code == SiteErrorCode.PENDING_APPROVAL:
            self._warm_first_round(config)
        if code is not None:
            return {"error": {"code": code, "reason": reason}}, {}
        # The agent's Fedward and Flower versions ride with an acceptance (fixed format,
        # checked by the egress guard), so the coordinator shows what each site runs.
        return {"status": {MSG.STATUS: MSG.ACCEPTED}, REPLY_VERSIONS: local_versions()}, {}

    def _cancelled(self, config: dict[str, Any], run_id: str
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Record that the coordinator cancelled a run; answer with an empty reply.

        No data is touched and nothing leaves: the answer only tells the coordinator the
        message arrived. The entry is written once per run (a repeated message adds none).
        """
        if run_id not in self._cancelled_runs:
            self.audit("run-cancelled", {
                "run": run_id, "project": str(config.get(CFG.PROJECT, "?")),
                "by": str(config.get(CANCEL_BY, "?"))[:64],
                "reason": str(config.get(CANCEL_REASON, ""))[:500]})
            self._cancelled_runs.add(run_id)
            self._admission_answers.pop(run_id, None)
        return {}, {}

    def _admit(self, config: dict[str, Any]) -> Admission | None:
        """Apply the site gate; None when the trainer runs without one."""
        if self.gate is None:
            return None
        try:
            run_id = str(config[CFG.RUN_ID])
            project = str(config[CFG.PROJECT])
            task = str(config[CFG.TASK])
            total_rounds = int(config[CFG.TOTAL_ROUNDS])
        except (KeyError, TypeError, ValueError) as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}") from None
        plugin = self._plugin_needed(config)
        try:
            study_hash = config.get(CFG.STUDY_HASH)
            return self.gate.admit(
                run_id=run_id, project=project, task=task, total_rounds=total_rounds,
                study=None if study_hash is None else str(config.get(CFG.STUDY, "")),
                study_hash=None if study_hash is None else str(study_hash), plugin=plugin)
        except PendingApproval as err:
            raise TaskError(SiteErrorCode.PENDING_APPROVAL, err.reason) from None
        except PolicyRefusal as err:
            raise TaskError(SiteErrorCode.REFUSED_POLICY, err.reason) from None
        except ApprovalsError as err:
            log.error("task refused: %s", err)
            raise TaskError(
                SiteErrorCode.REFUSED_POLICY,
                "refused-policy: the site cannot read its approvals file; its IT restores it "
                "(the site agent's log says how)") from None

    def _plugin_needed(self, config: dict[str, Any]) -> tuple[PluginPin, str | None] | None:
        """The model plugin a run pins, with the entry point this site's study names when
        the run trains that study (else None: the gate checks the distribution alone).

        Raises:
            TaskError: a malformed pin; a run of this site's plugin study that pins none.
        """
        try:
            pin = PluginPin.from_config(config, (CFG.MODEL_PLUGIN, CFG.MODEL_PLUGIN_VERSION,
                                                 CFG.MODEL_PLUGIN_SHA256))
        except ValueError as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
        own = self.study
        ours = own is not None and config.get(CFG.STUDY_HASH) == own.content_hash()
        entry = own.model.name if ours and own is not None and own.model.family == "plugin" \
            else None
        if pin is None and entry is not None:
            raise TaskError(
                SiteErrorCode.REFUSED_POLICY,
                f"refused-policy: the run trains a study whose model is the plugin {entry!r} "
                "but pins no plugin distribution; the coordinator must be upgraded")
        return None if pin is None else (pin, entry)

    def _caps(self, admission: Admission | None) -> tuple[float | None, float | None]:
        """(the project's cap, the site-wide cap) for a task the gate let through.

        The project's is the smaller of the policy's and the agent's own (``--epsilon-cap``);
        it also bounds one run. The site-wide cap comes from the policy alone.
        """
        cap = self.epsilon_cap
        if admission is None:
            return cap, None
        cap = admission.epsilon_cap if cap is None else min(cap, admission.epsilon_cap)
        return cap, admission.site_epsilon_cap

    def _check_plan(self, config: dict[str, Any], admission: Admission | None, *,
                    round_number: int, warm: bool = False) -> PlanCheck | None:
        """Check the run's whole remaining plan against every budget of the site.

        The rounds the run still has to train here, at the noise multiplier it will use,
        composed with everything the site has spent: refused with the figures when they do
        not fit any cap, so that a run never trains rounds it cannot finish. Reads only the
        number of training rows; writes nothing. None when there is nothing to check (no
        data loaded: every task is refused for that anyway; no round left to train).

        With ``warm`` (the admission answer), every epsilon the run's first round will
        compute is computed now, so that round 1 costs no more than a later round.

        Raises:
            TaskError: ``REFUSED_BUDGET`` with the figures; ``BAD_TASK`` for a malformed
                task.
        """
        if self.data is None or self.data_failure is not None:
            return None
        try:
            run_id = str(config[CFG.RUN_ID])
            project = str(config[CFG.PROJECT])
            total_rounds = int(config[CFG.TOTAL_ROUNDS])
            local_epochs = int(config[CFG.LOCAL_EPOCHS])
            epsilon = float(config[CFG.EPSILON])
            delta = float(config[CFG.DELTA])
            batch = int(config[CFG.BATCH])
            q, steps = self._sampling(batch=batch, epochs=local_epochs)
        except (KeyError, TypeError, ValueError) as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}") from None
        if self._search_terms(config) is not None:
            return self._check_search(config, admission, project=project, epsilon=epsilon,
                                      delta=delta)
        if config.get(CFG.SECURE) is True:
            return self._check_secure_plan(config, admission, run_id=run_id, project=project,
                                           epsilon=epsilon, delta=delta,
                                           total_rounds=total_rounds)
        with self._warm_lock:
            pass  # a search for this run still running in the background: use its result
        entry = self.ledger.get_run(run_id)
        if entry is not None and entry.noise_multiplier is not None \
                and entry.sample_rate is not None:
            sigma, q, delta = entry.noise_multiplier, entry.sample_rate, entry.delta
            epsilon = entry.epsilon_budget
            rounds_left = total_rounds - len(entry.rounds)
        else:
            if entry is not None:  # opened by an earlier disclosure (statistics): its terms
                epsilon, delta = entry.epsilon_budget, entry.delta
            try:
                sigma = self._run_sigma(config, epsilon=epsilon, delta=delta, sample_rate=q,
                                        total_epochs=total_rounds * local_epochs)
            except ValueError as err:
                raise TaskError(SiteErrorCode.REFUSED_BUDGET,
                                f"refused-budget: {err}") from None
            rounds_left = total_rounds - max(round_number, 1) + 1
        if rounds_left < 1:
            return None
        cap, site_cap = self._caps(admission)
        try:
            check = check_run_plan(
                self.ledger, run_id=run_id, project=project, delta=delta,
                noise_multiplier=sigma, sample_rate=q, rounds=rounds_left,
                local_epochs=local_epochs, steps=steps * rounds_left, run_budget=epsilon,
                cap=cap, site_cap=site_cap,
                before=pending_statistics(self.ledger, config, self._statistics_task()))
        except PlanExceededError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        # A secure run trains without DP-SGD noise (site_agent.secagg_site): nothing to warm.
        if warm and (entry is None or entry.noise_multiplier is None) \
                and config.get(CFG.SECURE) is not True:
            self.ledger.warm_first_round(run_id=run_id, project=project, delta=delta,
                                         step=(sigma, q, steps))
        return check

    def _check_secure_plan(self, config: dict[str, Any], admission: Admission | None, *,
                           run_id: str, project: str, epsilon: float, delta: float,
                           total_rounds: int) -> PlanCheck | None:
        """:meth:`_check_plan` for a run with secure aggregation: its rounds still to train
        as :class:`~privacy.mechanisms.DistributedSkellam` entries at the noise this site
        will add (privacy.distributed), against every budget."""
        from privacy.distributed import DistributedPlan, mechanism, noise_multiplier_for

        try:
            threshold = int(config.get(CFG.SECAGG_THRESHOLD, 2))
        except (TypeError, ValueError) as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}") from None
        entry = self.ledger.get_run(run_id)
        rounds_left = total_rounds - (len(entry.rounds) if entry is not None else 0)
        if rounds_left < 1:
            return None
        dim = sum(math.prod(s) for s in self._model_shapes().values())
        try:
            z = noise_multiplier_for(epsilon=epsilon, delta=delta, rounds=total_rounds,
                                     dim=dim, threshold=threshold)
        except ValueError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        plan = DistributedPlan(clip=1.0, dim=dim, threshold=threshold, noise_multiplier=z)
        cap, site_cap = self._caps(admission)
        try:
            return check_plan(
                self.ledger, run_id=run_id, project=project, delta=delta,
                plan=[mechanism(plan, rounds_left)], run_budget=epsilon, cap=cap,
                site_cap=site_cap,
                summary=f"{rounds_left} secure-aggregation round(s) at threshold {threshold}")
        except PlanExceededError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None

    def _run_sigma(self, config: dict[str, Any], *, epsilon: float, delta: float,
                   sample_rate: float, total_epochs: int) -> float:
        """The run's DP-SGD noise multiplier, for what its budget leaves after its other
        disclosures here (its statistics release, charged or still planned)."""
        run_id = str(config.get(CFG.RUN_ID))
        prior = [*run_statistics_mechanisms(self.ledger, run_id),
                 *pending_statistics(self.ledger, config, self._statistics_task())]
        return noise_multiplier_after(prior=prior, epsilon=epsilon, delta=delta,
                                      sample_rate=sample_rate, total_epochs=total_epochs)

    def _statistics(self, config: dict[str, Any], admission: Admission | None
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Release the run's DP statistics (site_agent.statistics): charged before any row
        is read, noised, kept for a repeated question."""
        assert self.data is not None
        data = self.data
        self._at("privacy")
        cap, site_cap = self._caps(admission)
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

    def _check_statistics_egress(self, header: dict[str, Any], reply: dict[str, Any],
                                 out: dict[str, np.ndarray]) -> None:
        """The egress guard on a statistics answer, against the release the ledger charged."""
        config = header.get("config") if isinstance(header.get("config"), dict) else {}
        assert isinstance(config, dict)
        charged = [m for m in run_statistics_mechanisms(
            self.ledger, str(config.get(CFG.RUN_ID))) if isinstance(m, GaussianRelease)]
        check_statistics_reply(reply=reply, arrays=out,
                               shape=expected_shape(self._statistics_task()),
                               charged_noise_std=charged[0].noise_std if charged else None)
    # -- tuning trials (site_agent.tuning) ----------------------------------------------

    def _search_terms(self, config: dict[str, Any]) -> tuning.SearchTerms | None:
        try:
            return tuning.search_terms(config)
        except ValueError as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None

    def _check_search(self, config: dict[str, Any], admission: Admission | None, *,
                      project: str, epsilon: float, delta: float) -> PlanCheck | None:
        """The plan of a tuning trial's run: its search's one charge, unless made already."""
        terms = self._search_terms(config)
        assert terms is not None and self.data is not None
        cap, site_cap = self._caps(admission)
        try:
            return tuning.check_search(self.ledger, terms, project=project, epsilon=epsilon,
                                       delta=delta, n_train=len(self.data.train_y), cap=cap,
                                       site_cap=site_cap)
        except PlanExceededError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        except ValueError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None

    def _open_trial(self, config: dict[str, Any], terms: tuning.SearchTerms,
                    admission: Admission | None) -> CoveredTrial:
        """Charge the trial's search (once per search) and open the trial's run in the
        ledger at the search's noise; returns the round's covered mechanism."""
        assert self.data is not None
        run_id, project = str(config[CFG.RUN_ID]), str(config[CFG.PROJECT])
        epsilon, delta = float(config[CFG.EPSILON]), float(config[CFG.DELTA])
        cap, site_cap = self._caps(admission)
        n_train = len(self.data.train_y)

        def record(epsilon_after: float) -> None:
            self.audit("tuning-charged", {"run": run_id, "search": terms.search_id,
                                          "epsilon_after": epsilon_after})

        try:
            chosen = tuning.charge_search(
                self.ledger, terms, project=project, epsilon=epsilon, delta=delta,
                n_train=n_train, cap=cap, site_cap=site_cap, on_charge=record)
            covered = tuning.trial_round(chosen, terms, n_train=n_train,
                                         batch=int(config[CFG.BATCH]),
                                         local_epochs=int(config[CFG.LOCAL_EPOCHS]))
            trial = covered.trial
            assert isinstance(trial, DpSgd)
            self.ledger.open_run(run_id=run_id, project=project, epsilon_budget=epsilon,
                                 delta=delta, noise_multiplier=trial.noise_multiplier,
                                 sample_rate=trial.sample_rate)
        except BudgetExceededError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        except ValueError as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        return covered

    def _data_failure_reason(self) -> str:
        # Kinds, counts and declared column names only (DataReport.summary_for_coordinator).
        summary = self.data_failure or {}
        parts = [
            f"{p['kind']} x{p['count']}" + (f" ({', '.join(p['columns'])})" if p.get("columns")
                                            else "")
            for p in summary.get("problems", [])
        ]
        return ("refused-data-check: the site's data failed its checks: "
                + ("; ".join(parts) or "no data loaded")
                + "; the site's IT runs `fedward-site check` to see and fix them")

    # -- tasks -----------------------------------------------------------------------

    def _own_task(self) -> TaskSpec:
        """The task this site trains: its study's (own copy), else the registry task."""
        return get_task(self.task) if self.study is None else study_task(self.study)

    def _statistics_task(self) -> TaskRef:
        """What the statistics phase bins: this site's study's task, else the task's name."""
        if self.study is None:
            return self.task
        try:
            return study_task(self.study)
        except UntrainableStudyError:
            return self.task  # not trained here: its runs are refused before any release

    def _preprocessing_for(self, config: dict[str, Any], *, statistics: bool
                           ) -> Preprocessing | None:
        """The run's imputation and scaling (composed by the coordinator from its DP
        statistics), checked against this site's spec; None when the run has none.

        Raises:
            TaskError: ``bad-task`` when it does not fit the study, or when the site's rows
                have missing values the study imputes and the run brings no values for
                them (not for the statistics release itself, which comes before them).
        """
        assert self.study is not None and self.data is not None
        text = config.get(CFG.PREPROCESSING)
        if isinstance(text, str):
            try:
                return Preprocessing.from_json(text, self.study)
            except PreprocessingError as err:
                raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
        if statistics:
            return None
        if np.isnan(self.data.train_x).any() or np.isnan(self.data.test_x).any():
            raise TaskError(
                SiteErrorCode.BAD_TASK,
                "bad-task: this site's rows have missing values in features the study "
                f"imputes ({', '.join(imputed_features(self.study))}) and the run brings no "
                "imputation values; they come from the run's statistics phase: the ML team "
                "launches the run with --statistics")
        return None

    def _study_task_for(self, config: dict[str, Any], *, statistics: bool = False
                        ) -> TaskSpec:
        """The model of a run of this site's study, from the site's own copy of the spec,
        with the run's preprocessing (``statistics``: for the statistics release, which
        comes before it).

        Raises:
            TaskError: ``refused-policy`` when the run pins another spec than this copy;
                ``bad-task`` when its preprocessing does not fit or is missing.
        """
        assert self.study is not None
        own = self.study.content_hash()
        pinned = config.get(CFG.STUDY_HASH)
        if pinned != own:
            ref = str(config.get(CFG.STUDY, "")) or str(config.get(CFG.TASK, "?"))
            raise TaskError(
                SiteErrorCode.REFUSED_POLICY,
                f"refused-policy: the run trains study {ref} (sha256 {pinned or 'none'}) but "
                f"this site's data is mapped to study {self.study.name} (sha256 {own}); the "
                "site's IT approves that version, points site.json's study at it and "
                "checks the mapping (fedward-site mapping check)")
        preprocessing = self._preprocessing_for(config, statistics=statistics)
        try:
            task = study_task(self.study, preprocessing)
        except UntrainableStudyError as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: {err}") from None
        fill = task.model_params.get("fill")
        if isinstance(fill, list) and self.data is not None:
            # DP-SGD and the evaluation check their input for NaN: hand them the rows as
            # the model's own imputation step sees them (the same values).
            self._rows_view = replace(
                self.data, train_x=fill_missing(self.data.train_x, fill),
                test_x=fill_missing(self.data.test_x, fill))
        return task

    def _rows(self) -> SiteData:
        """The site's rows for the task being handled (imputed where the run imputes)."""
        assert self.data is not None
        return self._rows_view if self._rows_view is not None else self.data

    def _model_for(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                   ) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]:
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
        model = task.build(seed=0)
        shapes = array_shapes(model)
        try:
            set_model_arrays(model, {k: np.array(v, dtype=np.float32) for k, v in arrays.items()})
        except ValueError:
            raise TaskError(SiteErrorCode.BAD_TASK,
                            "bad-task: the global model's arrays do not match the task") from None
        return model, shapes

    def _eval_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        assert self.data is not None
        rows = self._rows()
        result = evaluate(model=model, features=rows.test_x, labels=rows.test_y)
        return {
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
            "eval-auc": result.auc,
            "num-eval-examples": float(result.n),
        }

    def _noise_seed(self, run_id: str, round_number: int) -> int:
        """The seed of a round's DP noise and sampling: fresh, secret to this site, kept
        nowhere (see :func:`round_noise_seed`)."""
        return round_noise_seed(secret=self.noise_secret, run_id=run_id,
                                round_number=round_number, entropy=secrets.token_bytes(32))

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

    def _parity_book(self) -> ParityBook:
        return ParityBook(self.replies_dir / "parity-book.json")

    def _remember_model(self, run_id: str, arrays: dict[str, np.ndarray]) -> None:
        """Note a global model this site evaluated: the only models it measures parity of."""
        try:
            self._parity_book().remember_model(run_id, model_digest(arrays))
        except (OSError, ValueError) as err:  # parity of this model will be refused
            log.warning("could not note the global model in the parity book: %s", err)

    def _parity(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Measure a candidate's export parity on the held-out split (site_agent.parity_task:
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
        run_id = str(config.get(CFG.RUN_ID))
        try:
            # The run's task: for a study, with the run's imputation and scaling, as the
            # candidate's exports were built.
            task = (self._study_task_for(config)
                    if self.study is not None and config.get(CFG.STUDY_HASH) is not None
                    else self._own_task())
            outcome = measure_parity(task=task, run_id=run_id,
                                     model_arrays=model_arrays_in, files=files,
                                     features=self._rows().test_x,
                                     workdir=self.replies_dir.parent / "run",
                                     book=self._parity_book())
        except ParityRefused as err:
            self.audit("parity-refused", {"run": run_id, **err.detail})
            raise TaskError(SiteErrorCode.REFUSED_POLICY, f"refused-policy: {err}") from None
        metrics = _finite_metrics(outcome.metrics)
        metrics.update(self._membership_audit(run_id, config, _model))
        report = check_outgoing(expected_shapes=shapes, arrays={}, metrics=metrics)
        self.audit("parity-measured", {"run": run_id, "model": outcome.model,
                                       "formats": outcome.formats, "files": sorted(files),
                                       "bytes_out": report.n_bytes,
                                       "metrics": report.metric_names})
        return {"metrics": metrics}, {}

    def _membership_audit(self, run_id: str, config: dict[str, Any],
                          model: torch.nn.Module) -> dict[str, float]:
        """Membership-inference audit of a candidate this site evaluated (privacy.membership):
        the site's training rows against its held-out rows; only coarse figures leave."""
        assert self.data is not None
        try:
            delta = float(config.get(CFG.DELTA, DEFAULT_AUDIT_DELTA))
            rows = self._rows()
            audit = audit_membership(model=model, train_x=rows.train_x,
                                     train_y=rows.train_y, test_x=rows.test_x,
                                     test_y=rows.test_y, delta=delta)
        except ValueError as err:  # too few rows, or a model giving NaN: no figures
            self.audit("membership-audit-skipped", {"run": run_id, "reason": str(err)})
            return {}
        figures = audit.coarse()
        self.audit("membership-audited", {"run": run_id, **figures})
        return figures

    def _evaluate_only(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._at("model")
        model, shapes = self._model_for(config, arrays)
        self._at("evaluate")
        metrics = _finite_metrics(self._eval_metrics(model))
        self._remember_model(str(config.get(CFG.RUN_ID)), arrays)
        report = check_outgoing(expected_shapes=shapes, arrays={}, metrics=metrics)
        self.audit("evaluated", {"run": str(config.get(CFG.RUN_ID)),
                                 "round": int(config.get(CFG.ROUND, 0)),
                                 "bytes_out": report.n_bytes, "metrics": report.metric_names})
        return {"metrics": metrics}, {}

    def _train(self, config: dict[str, Any], arrays: dict[str, np.ndarray],
               admission: Admission | None = None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        try:
            run_id = str(config[CFG.RUN_ID])
            project = str(config[CFG.PROJECT])
            round_number = int(config[CFG.ROUND])
            total_rounds = int(config[CFG.TOTAL_ROUNDS])
            local_epochs = int(config[CFG.LOCAL_EPOCHS])
            epsilon = float(config[CFG.EPSILON])
            delta = float(config[CFG.DELTA])
            clip = float(config[CFG.CLIP])
            lr = float(config[CFG.LR])
            batch = int(config[CFG.BATCH])
        except (KeyError, TypeError, ValueError) as err:
            raise TaskError(SiteErrorCode.BAD_TASK, f"bad-task: missing or bad {err}") from None
        incoming = update_digest(arrays)
        replay = self._load_reply(run_id, round_number, incoming, arrays)
        if replay is not None:
            self.audit("round-replayed", {"run": run_id, "round": round_number})
            return replay
        known = self.ledger.get_run(run_id)
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
        cap, site_cap = self._caps(admission)
        if admission is not None:
            try:
                check_rounds_per_day(self.ledger, limit=admission.max_rounds_per_day,
                                     run_id=run_id, round_number=round_number)
            except PolicyRefusal as err:
                raise TaskError(SiteErrorCode.REFUSED_POLICY, err.reason) from None

        self._at("model")
        model, shapes = self._model_for(config, arrays)

        assert self.data is not None
        self._at("privacy")
        # Only the number of training rows is read before the budget check.
        n_train = len(self.data.train_y)
        q, steps = self._sampling(batch=batch, epochs=local_epochs)
        with self._warm_lock:
            pass  # a warm-up for this round still running: wait, then use its results
        entry = self.ledger.get_run(run_id)
        terms = self._search_terms(config)
        covered: CoveredTrial | None = None
        if terms is not None:
            # A tuning trial: its search's one charge covers it (privacy.tuning).
            covered = self._open_trial(config, terms, admission)
            assert isinstance(covered.trial, DpSgd)
            sigma = covered.trial.noise_multiplier
        elif entry is None or entry.noise_multiplier is None:
            # The run's first round here (its admission may have been answered by an
            # earlier agent, or not asked at all): its whole plan must fit before any of it
            # trains, as at admission. A run that disclosed statistics first keeps the
            # budget and delta it was opened with.
            if entry is not None:
                epsilon, delta = entry.epsilon_budget, entry.delta
            self._check_plan(config, admission, round_number=round_number)
            sigma = self._run_sigma(config, epsilon=epsilon, delta=delta, sample_rate=q,
                                    total_epochs=total_rounds * local_epochs)
            self.ledger.open_run(run_id=run_id, project=project, epsilon_budget=epsilon,
                                 delta=delta, noise_multiplier=sigma, sample_rate=q)
        else:
            sigma = entry.noise_multiplier
        prior = self.ledger.history(run_id)
        spent_before = self.ledger.epsilon_spent(run_id)

        def record(epsilon_after: float) -> None:
            # Written inside the reservation, after its checks and before the charge: a
            # crash in between leaves this entry without a charge, never a charge without
            # its entry; an audit log that cannot be written charges nothing.
            self.audit("round-reserved", {"run": run_id, "round": round_number,
                                          "epsilon_after": epsilon_after})

        try:
            # Write-ahead: the round is charged before the data is touched (evaluation of the
            # received model included), so a refused round reads nothing.
            if covered is not None:
                self.ledger.reserve(run_id=run_id, purpose="round", key=str(round_number),
                                    mechanism=covered, caps=Caps(project=cap, site=site_cap),
                                    on_charge=record)
            else:
                self.ledger.reserve_round(run_id=run_id, round_number=round_number,
                                          steps=steps, cap=cap, site_cap=site_cap,
                                          on_charge=record)
        except (BudgetExceededError, NotCoveredError) as err:
            raise TaskError(SiteErrorCode.REFUSED_BUDGET, f"refused-budget: {err}") from None
        self._at("evaluate")
        metrics = self._eval_metrics(model)
        self._remember_model(run_id, arrays)
        self._at("train")
        model.train()
        result = train_dp(
            model=model,
            features=self._rows().train_x,
            labels=self.data.train_y,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            batch_size=batch,
            epochs=local_epochs,
            lr=lr,
            seed=self._noise_seed(run_id, round_number),
            history=prior,
            grad_sample_mode=self.grad_sample_mode,
        )
        spent = self.ledger.complete_round(run_id=run_id, round_number=round_number)
        if terms is not None:  # a trial adds nothing: what it stands for is its search's
            spent = spent_before = self.ledger.epsilon_spent(terms.ledger_run)
        # No training loss leaves the site: it is a statistic of the training rows that
        # DP-SGD's accounting does not cover (one round's loss singled out an outlier record).
        metrics.update({
            "num-examples": float(n_train),
            "epsilon-spent": spent,
            "epsilon-round": max(0.0, spent - spent_before),
            "noise-multiplier": sigma,
            "train-seconds": result.seconds,
        })
        self._at("egress")
        metrics = _finite_metrics(metrics)
        out = model_arrays(model)
        answer = {"metrics": metrics, "fingerprint": self._fingerprint()}
        report = check_reply(reply=answer, arrays=out, expected_shapes=shapes)
        self.audit("round-trained", {
            "run": run_id, "round": round_number, "epsilon_spent": spent,
            "bytes_out": report.n_bytes, "array_shapes": report.array_shapes,
            "metrics": report.metric_names, "text": report.text_fields,
        })
        reply = (answer, out)
        self._store_reply(run_id, round_number, incoming, reply)
        if round_number < total_rounds:
            self._warm(f"round {round_number + 1}",
                       lambda: self.ledger.warm_next_round(run_id=run_id, steps=steps))
        return reply

    # -- idempotent replays ------------------------------------------------------------

    def _reply_paths(self, run_id: str) -> tuple[Path, Path]:
        safe = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        return self.replies_dir / f"{safe}.json", self.replies_dir / f"{safe}.npz"

    def _store_reply(self, run_id: str, round_number: int, incoming: str,
                     reply: tuple[dict[str, Any], dict[str, np.ndarray]]) -> None:
        meta_path, arr_path = self._reply_paths(run_id)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **reply[1])
        atomic_write(arr_path, buf.getvalue(), mode=0o600)
        atomic_write(meta_path, json.dumps({"run": run_id, "round": round_number,
                                            "incoming": incoming,
                                            "digest": _REPLY_DIGEST, "header": reply[0]}),
                     mode=0o600)

    def _load_reply(self, run_id: str, round_number: int, incoming: str,
                    arrays: dict[str, np.ndarray]
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        meta_path, arr_path = self._reply_paths(run_id)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("digest") != _REPLY_DIGEST:   # stored before the one wire digest
            incoming = _legacy_reply_digest(arrays)
        if meta.get("round") != round_number or meta.get("incoming") != incoming:
            return None
        # NEVER allow_pickle: these files live on disk and could have been replaced.
        with np.load(arr_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return dict(meta["header"]), arrays


class TrainerServer:
    """Serves a :class:`WarmTrainer` on a Unix socket, one task at a time."""

    def __init__(self, *, path: Path, trainer: WarmTrainer) -> None:
        self.path = path
        self.trainer = trainer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="trainer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(600)
            try:
                header, arrays = read_frame(conn)
                with self._lock:
                    t0 = time.perf_counter()
                    reply, out = self.trainer.handle(header, arrays)
                    log.info("task %s handled in %.3f s", header.get("kind"),
                             time.perf_counter() - t0)
                write_frame(conn, reply, out)
            except (IPCError, OSError) as err:
                log.warning("trainer connection dropped: %s", err)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.path.exists():
            self.path.unlink()
