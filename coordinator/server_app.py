"""The appliance's Flower ServerApp: our own round loop over the site agents.

Stock strategies wait forever for ``min_available_nodes`` and drop stragglers silently.
This loop gives every round a deadline and a minimum number of sites, names every site that
failed or was late and why, checkpoints the global model after every round, records each
round in the coordinator database as it happens, and resumes a run from its last
checkpoint. It sends one message per site per round (the site evaluates the received global
model and then trains) and pulls replies on its own short loop instead of the Grid's 3 s poll.

The SuperLink starts this module in a ``flwr-serverapp`` process; it inherits
``FEDWARD_HOME`` and ``FEDWARD_DATABASE_URL_FILE`` from the coordinator.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from sqlalchemy.engine import Engine

from coordinator import repository, round_records, run_audit, run_statistics, site_versions
from coordinator.aggregation import (
    AggregationError,
    Aggregator,
    SiteUpdate,
    aggregate,
    make_aggregator,
)
from coordinator.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_server_state,
    save_checkpoint,
)
from coordinator.models import utcnow
from fedward.agent_versions import REPLY_VERSIONS
from fedward.files import atomic_write
from fedward.flower.serverapp import (
    EXPIRED_ERROR_CODES,
    NODE_UNAVAILABLE_CODE,
    shorten_object_pulls,
)
from fedward.run_config import RunPlan
from fedward.wire import (
    ADMISSION_MESSAGE_TYPE,
    CANCEL_BY,
    CANCEL_MESSAGE_TYPE,
    CANCEL_REASON,
    CFG,
    FINGERPRINT_KEYS,
    MEMBERSHIP_FIGURES,
    MEMBERSHIP_KEY,
    MSG,
    PACKED,
    REPLY_ARRAYS,
    REPLY_CONFIG,
    REPLY_FINGERPRINT,
    REPLY_METRICS,
    TASK_ARRAYS,
    TASK_CONFIG,
    SiteErrorCode,
    pack_arrays,
    parse_layout,
    unpack_arrays,
    update_digest,
)

__all__ = [
    "APPROVAL_POLL_S",
    "CANCEL_POLL_S",
    "NORM_BOUND_FACTOR",
    "RoundLoop",
    "RunCancelled",
    "aggregate",
    "app",
    "dp_update_norm_bound",
    "update_norm",
    "validate_update",
]

log = logging.getLogger("fedward.coordinator.rounds")

_POLL_S = 0.1
_ONLINE_POLL_S = 0.5
# How often a site that answered "pending-approval" is asked again during admission.
APPROVAL_POLL_S: Final = 3.0
# After a coordinator restart the SuperLink still holds each node's heartbeat deadline from
# before the outage: a site that was up all along can be declared "Node Unavailable" until
# it reconnects and sends a heartbeat (Flower: 2 x 30 s, plus the site's reconnect back-off).
# For this long after a resumed run starts, such a site is waited for (within each round's
# deadline) and sent its task again once it is back, instead of being counted as failed.
RECONNECT_WINDOW_S: Final = 150.0
# How often the round loop looks for a cancel request (one short read of the run's row).
CANCEL_POLL_S: Final = 1.0
# The longest the round loop waits for the sites to acknowledge a cancellation (at most the
# run's round deadline): a site busy with the round's task answers once it is done.
CANCEL_NOTIFY_MAX_S: Final = 60.0
# The DP norm bound (dp_update_norm_bound) is a high-probability worst case: every clipped
# per-sample gradient pointing the same way, Poisson batches and Gaussian noise 8 standard
# deviations above their means. Honest updates of the real trainer measured at 0.04-0.55 of
# it (breast_cancer_mlp and digits_cnn, epsilon 1-50, clip 0.1-5, 2-8 sites; see
# docs/ml-team-guide.md). This factor on top keeps float rounding, a changed Opacus detail or
# an unusual dataset from ever rejecting an honest site; the same updates scaled by 100 were
# 9-28 times the bound at the default settings (1.8 times with a clip of 5, where clipping
# hardly binds and the worst case is loose).
NORM_BOUND_FACTOR: Final = 2.0
_TAIL: Final = 8.0
_PENDING_LABEL: Final = SiteErrorCode.NAMES[SiteErrorCode.PENDING_APPROVAL]
_SITE_CODES: Final = frozenset(SiteErrorCode.NAMES.values())
# Where a site's error reply says it stopped: its refusals by code; a task that raised says
# its phase itself ("task-failed: ValueError during train (phase evaluate): ...").
_PHASE_OF_CODE: Final = {
    SiteErrorCode.PENDING_APPROVAL: "admission",
    SiteErrorCode.REFUSED_POLICY: "policy",
    SiteErrorCode.REFUSED_BUDGET: "budget",
    SiteErrorCode.REFUSED_DATA: "data",
    SiteErrorCode.EGRESS_BLOCKED: "egress",
    SiteErrorCode.BAD_TASK: "task",
    SiteErrorCode.TRAINER_UNAVAILABLE: "agent",
    SiteErrorCode.TASK_FAILED: "train",
}
_PHASE_IN_REASON: Final = re.compile(r"\(phase ([a-z][a-z-]{0,31})\)")


def failure_phase(code: int, reason: str) -> str:
    """The phase a site's error reply names, or the one its code implies (``engine`` for
    Flower's own errors, e.g. a node that went away)."""
    if code == SiteErrorCode.TASK_FAILED and (found := _PHASE_IN_REASON.search(reason)):
        return found.group(1)
    return _PHASE_OF_CODE.get(code, "engine")


class RunFailed(Exception):
    """The run cannot go on; the message is the reason recorded for the ML team."""


class RunCancelled(Exception):
    """Someone cancelled the run (``POST /runs/{id}/cancel``): who and why."""

    def __init__(self, by: str, reason: str) -> None:
        super().__init__(f"cancelled by {by}: {reason}")
        self.by = by
        self.reason = reason


def validate_update(
    arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], *,
    reference: dict[str, np.ndarray] | None = None, max_norm: float | None = None,
) -> str | None:
    """Why a site's update must be rejected before aggregation, or None if it is sound.

    Args:
        arrays: the model arrays the site sent back.
        expected: the model's array names and shapes.
        reference: the global model the site was sent this round; with ``max_norm``, the
            update's change to it (:func:`update_norm`) may be at most ``max_norm``.
        max_norm: the norm bound (see :func:`dp_update_norm_bound`).
    """
    if set(arrays) != set(expected):
        return (f"update arrays {sorted(arrays)} do not match the model's "
                f"{sorted(expected)}")
    for name, arr in arrays.items():
        if arr.dtype != np.float32:
            return f"array {name!r} has dtype {arr.dtype}, expected float32"
        if tuple(arr.shape) != tuple(expected[name]):
            return f"array {name!r} has shape {list(arr.shape)}, expected {list(expected[name])}"
        if not np.all(np.isfinite(arr)):
            return f"array {name!r} contains NaN or Inf"
    if reference is not None and max_norm is not None:
        norm = update_norm(arrays, reference)
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the change from ``reference`` to ``arrays`` over all arrays (float64)."""
    total = 0.0
    for name, arr in arrays.items():
        diff = arr.astype(np.float64) - reference[name].astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def dp_update_norm_bound(
    *, n_examples: int, batch_size: int, local_epochs: int, lr: float, max_grad_norm: float,
    noise_multiplier: float, n_params: int, factor: float = NORM_BOUND_FACTOR,
) -> float:
    """The largest L2 norm an honest DP-SGD round can move a site's model, times ``factor``.

    The site trains with Opacus's DP-SGD and plain SGD (see :func:`privacy.train_dp`):
    Poisson batches at rate ``q = 1 / ceil(n / batch)`` over ``T = local_epochs / q``
    steps, and each step moves the parameters by ``lr / B * (sum of the batch's clipped
    per-sample gradients + N(0, (sigma * C)^2 I))`` with ``B = int(n * q)`` (Opacus's
    expected batch size). Over the round, by the triangle inequality::

        ||delta|| <= lr / B * (C * S + sigma * C * ||sum of T standard normals in R^d||)

    where ``S`` is the number of examples sampled over all steps (Binomial, mean
    ``n * local_epochs``). The bound takes ``S <= mean + 8 sqrt(mean) + 8`` (at most
    ``n * T``) and the noise norm ``<= sqrt(d * T) + 8``: exceeded with a probability far
    below 1e-12, and only when every clipped gradient points the same way, which real
    training never comes close to.

    Args:
        n_examples: the site's training examples (its ``num-examples`` metric).
        batch_size: the run's expected batch size.
        local_epochs: local epochs per round.
        lr: the run's learning rate.
        max_grad_norm: the per-sample clipping bound C.
        noise_multiplier: sigma (the site's ``noise-multiplier`` metric; 0 when absent).
        n_params: the number of values in the model (d).
        factor: safety factor on top (:data:`NORM_BOUND_FACTOR`).

    Returns:
        The bound on the update's L2 norm.
    """
    n = max(1, int(n_examples))
    steps_per_epoch = math.ceil(n / max(1, int(batch_size)))
    steps = max(1, int(local_epochs)) * steps_per_epoch
    expected_batch = max(1, int(n * (1 / steps_per_epoch)))  # as Opacus computes it
    mean = float(n * max(1, int(local_epochs)))
    sampled = min(float(n * steps), mean + _TAIL * math.sqrt(mean) + _TAIL)
    noise = max(0.0, noise_multiplier) * max_grad_norm * (math.sqrt(n_params * steps) + _TAIL)
    return factor * lr / expected_batch * (max_grad_norm * sampled + noise)


SiteState = Literal["accepted", "waiting", "refused", "unanswered"]


@dataclass
class _Answer:
    """A site's last answer to the admission question."""

    state: SiteState
    reason: str = ""
    since: str = ""  # ISO 8601 (UTC): when the site started waiting


def _approve_hint(site: str, run_id: int) -> str:
    return f"{site}: its IT runs `fedward-site approve {run_id}`"


@dataclass
class RoundLoop:
    """Runs one coordinator run on a Flower Grid.

    Args:
        grid: the Flower Grid of this run.
        engine: the coordinator database.
        home: the coordinator data directory (checkpoints live under it).
        plan: the run's plan.
        initial: builds the initial global model arrays (and their shapes) for the task.
        clock: monotonic seconds (deadlines).
        approval_poll_s: how often a site waiting for approval is asked again.
    """

    grid: Grid
    engine: Engine
    home: Path
    plan: RunPlan
    initial: Callable[[], dict[str, np.ndarray]]
    clock: Callable[[], float] = field(default=time.monotonic)
    approval_poll_s: float = APPROVAL_POLL_S
    cancel_poll_s: float = CANCEL_POLL_S
    # When the run's row is next read for a cancel request (clock seconds).
    _next_cancel_check: float = field(default=-math.inf, init=False, repr=False)
    # The round in progress and when it started, while one is (a cancel ends it).
    _current: tuple[int, float] | None = field(default=None, init=False, repr=False)
    # The admission state as last recorded (see run_audit.record_admission).
    _admission: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    # Digest of every update received in this run -> (first round, site), for replays.
    _seen: dict[str, tuple[int, str]] = field(default_factory=dict, init=False, repr=False)
    # The array layout of the packed model last sent (see fedward.wire.PACKED).
    _layout: list[tuple[str, tuple[int, ...]]] = field(default_factory=list, init=False,
                                                      repr=False)
    # The run's aggregation strategy (coordinator.aggregation), with its state.
    _aggregator: Aggregator | None = field(default=None, init=False, repr=False)
    # Monotonic time until which a resumed run waits for its sites to reconnect (0: fresh).
    _reconnect_until: float = field(default=0.0, init=False, repr=False)
    # Sites the last exchange lost to "Node Unavailable" and never got back by the deadline.
    _lost: set[str] = field(default_factory=set, init=False, repr=False)

    def run(self) -> None:
        plan = self.plan
        try:
            try:
                self._aggregator = make_aggregator(plan.aggregation, plan.aggregation_options)
            except AggregationError as err:
                raise RunFailed(f"cannot aggregate: {err}") from None
            start_round, arrays = self._resume_point()
            if start_round > 1 or run_audit.admission_record(self.engine,
                                                             plan.run_id) is not None:
                # This ServerApp resumes a run (the coordinator or its SuperLink restarted):
                # its sites may still be reconnecting.
                self._reconnect_until = self.clock() + RECONNECT_WINDOW_S
                log.info("run %s resumed: sites get up to %.0f s to reconnect", plan.run_id,
                         RECONNECT_WINDOW_S)
            self._load_seen()
            self._admit(fresh=start_round == 1)
            if plan.statistics and start_round == 1:
                self._statistics()
            expected = {k: tuple(v.shape) for k, v in arrays.items()}
            for number in range(start_round, plan.rounds + 1):
                arrays = self._round(number, arrays, expected)
            if plan.final_evaluate:
                self._check_cancel(now=True)
                self._final_evaluate(arrays)
        except RunFailed as err:
            log.error("run %s failed: %s", plan.run_id, err)
            repository.finish_run(self.engine, plan.run_id, status="failed", reason=str(err))
            return
        except RunCancelled as cancel:
            self._end_cancelled(cancel)
            return
        repository.finish_run(self.engine, plan.run_id, status="completed", reason=None)

    def _statistics(self) -> None:
        """The statistics phase (coordinator.run_statistics): before round 1, every
        admitted online site releases its DP statistics; they are summed and kept."""
        refused = set(dict(self._admission.get("refused") or {}))
        nodes = {n: s for n, s in self._site_nodes().items() if s not in refused}
        try:
            run_statistics.statistics_phase(grid=self.grid, engine=self.engine,
                                            plan=self.plan, nodes=nodes,
                                            check_cancel=self._check_cancel, clock=self.clock)
        except run_statistics.StatisticsFailed as err:
            raise RunFailed(str(err)) from None
        # A run of a study: the imputation and scaling composed from the statistics go to
        # every site with each later message (fedward.preprocessing).
        self.plan = self.plan.model_copy(update={
            "preprocessing": run_statistics.preprocessing_json(self.engine, self.plan)})

    # -- cancellation ------------------------------------------------------------------

    def _check_cancel(self, *, now: bool = False) -> None:
        """Raise :class:`RunCancelled` once someone asked to cancel the run.

        Reads the run's row at most every :attr:`cancel_poll_s` seconds (always with
        ``now``); called from every loop that waits (admission, sites coming online,
        replies), so a cancel is noticed within about a second wherever the run is.
        """
        clock = self.clock()
        if not now and clock < self._next_cancel_check:
            return
        self._next_cancel_check = clock + self.cancel_poll_s
        request = repository.cancel_request(self.engine, self.plan.run_id)
        if request is not None:
            raise RunCancelled(*request)

    def _end_cancelled(self, cancel: RunCancelled) -> None:
        """End a cancelled run: its round, the sites told (and audited), then the run."""
        plan = self.plan
        log.warning("run %s %s", plan.run_id, cancel)
        if self._current is not None:
            number, t0 = self._current
            round_records.finish_round(self.engine, plan.run_id, number, status="cancelled",
                                       participating=[], failed=[], late=[],
                                       seconds=self.clock() - t0)
            self._current = None
        told, not_told = self._tell_sites(cancel)
        repository.note_cancel_delivered(self.engine, plan.run_id, told=told,
                                         not_told=not_told)
        repository.finish_run(self.engine, plan.run_id, status="cancelled", reason=str(cancel))

    def _tell_sites(self, cancel: RunCancelled) -> tuple[list[str], dict[str, str]]:
        """Send every online site of the run the cancellation; wait (bounded) for acks.

        Returns:
            The sites that acknowledged it, and the others with why not.
        """
        plan = self.plan
        wait = max(1.0, min(plan.round_deadline_s, CANCEL_NOTIFY_MAX_S))
        not_told: dict[str, str] = {}
        told: list[str] = []
        try:
            nodes = self._site_nodes()
            for site in sorted(set(plan.sites) - set(nodes.values())):
                not_told[site] = "offline"
            config = ConfigRecord({**plan.task_config(0, train=False),
                                   CANCEL_BY: cancel.by[:64], CANCEL_REASON: cancel.reason[:500]})
            msgs = [Message(content=RecordDict({TASK_CONFIG: config}), dst_node_id=node_id,
                            message_type=CANCEL_MESSAGE_TYPE,
                            group_id=f"run-{plan.run_id}-cancel", ttl=wait)
                    for node_id in nodes]
            ids = list(self.grid.push_messages(msgs))
            pending = {mid: nodes[m.metadata.dst_node_id]
                       for mid, m in zip(ids, msgs, strict=True) if mid}
            deadline = self.clock() + wait
            while pending and self.clock() < deadline:
                for reply in self.grid.pull_messages(list(pending)):
                    answered = pending.pop(reply.metadata.reply_to_message_id, None)
                    if answered is None:
                        continue
                    if reply.has_error():
                        not_told[answered] = (reply.error.reason or "error").splitlines()[0][:300]
                    else:
                        told.append(answered)
                if pending:
                    time.sleep(_POLL_S)
            for site in pending.values():
                not_told[site] = f"no answer within {wait:.0f} s"
        except Exception as err:  # the run ends cancelled whatever the Grid does
            log.error("run %s: could not tell every site of the cancellation: %s",
                      plan.run_id, err)
            for site in plan.sites:
                if site not in told:
                    not_told.setdefault(site, f"not told: {str(err)[:200]}")
        return sorted(told), dict(sorted(not_told.items()))

    # -- pieces ------------------------------------------------------------------------

    def _resume_point(self) -> tuple[int, dict[str, np.ndarray]]:
        last = round_records.last_checkpoint(self.engine, self.plan.run_id)
        if last is None:
            return 1, self.initial()
        number, rel_path, sha = last
        arrays = load_checkpoint(self.home / rel_path, expected_sha256=sha)
        self._resume_aggregator(self.home / rel_path, sha, number)
        log.info("run %s resumes after round %s from its checkpoint", self.plan.run_id, number)
        return number + 1, arrays

    def _resume_aggregator(self, path: Path, sha: str, number: int) -> None:
        """Continue a server optimiser from the state saved with the checkpoint.

        Without that state the optimiser would restart from zero mid-run: the run fails
        instead (relaunching cannot bring the state back).
        """
        agg = self._aggregator
        assert agg is not None
        try:
            state = load_server_state(path, expected_sha256=sha,
                                      aggregation=self.plan.aggregation)
            if state is None and agg.stateful:
                raise CheckpointError(f"checkpoint {path} has no {self.plan.aggregation} "
                                      "state")
            agg.load_state_dict(state or {})
        except (CheckpointError, AggregationError) as err:
            raise RunFailed(f"cannot resume after round {number}: {err}; the server "
                            "optimiser cannot continue where it stopped (launch the run "
                            "again)") from None

    def _load_seen(self) -> None:
        """Digests of the updates earlier attempts of this run received (a resumed run)."""
        for number, by_site in sorted(round_records.update_digests(self.engine,
                                                                   self.plan.run_id).items()):
            for site, digest in sorted(by_site.items()):
                self._seen.setdefault(digest, (number, site))

    def _site_nodes(self) -> dict[int, str]:
        """Online nodes of this run's sites: node id -> site name."""
        by_node = repository.site_names_by_node_id(self.engine)
        wanted = set(self.plan.sites)
        online = set(self.grid.get_node_ids())
        return {int(n): s for n, s in by_node.items() if s in wanted and int(n) in online}

    # -- admission ---------------------------------------------------------------------

    def _admit(self, *, fresh: bool) -> None:
        """Ask every online site whether its policy accepts the run, before round 1.

        Nothing is trained or charged: the site answers from its policy check alone. A site
        that waits for a local approval is asked again every :attr:`approval_poll_s`
        seconds until it accepts or refuses, or the run's ``approval_wait_s`` has passed
        since the admission began (a relaunched run keeps the original limit). Offline
        sites, and sites whose agent gives no answer, are left to the round loop, as
        before. Every round still asks every site of the run: a site approved after the
        limit joins from its next round.

        Raises:
            RunFailed: fewer than ``min_sites`` sites can still take part.
        """
        plan = self.plan
        prior = run_audit.admission_record(self.engine, plan.run_id)
        if prior is not None and prior[1].get("state") == "admitted":
            self._admission = dict(prior[1])
            return
        if not fresh:
            return  # a run resumed after round 1 was admitted by an older coordinator
        now = utcnow()
        started, deadline = now, now + timedelta(seconds=max(0.0, plan.approval_wait_s))
        answers: dict[str, _Answer] = {}
        if prior is not None and prior[1].get("state") == "waiting":
            # Relaunched during the admission: keep its clock and who waits since when.
            started = _parse_time(prior[1].get("started"), now)
            deadline = _parse_time(prior[1].get("deadline"), deadline)
            for site, info in dict(prior[1].get("waiting") or {}).items():
                answers[site] = _Answer("waiting", str(info.get("reason", "")),
                                        str(info.get("since", "")))
        self._admission = {"state": "waiting", "started": started.isoformat(),
                           "deadline": deadline.isoformat()}
        limit = self.clock() + max(0.0, (deadline - now).total_seconds())
        ask_timeout = max(1.0, plan.round_deadline_s)
        asked: set[str] = set()  # asked at least once by this process
        outstanding: dict[str, tuple[str, float]] = {}  # message id -> (site, sent at)
        next_ask: dict[str, float] = {}
        recorded: dict[str, str] = {}
        recorded_waiting = False
        t0 = self.clock()
        while True:
            self._check_cancel()
            now_s = self.clock()
            past_limit = now_s >= limit
            nodes = self._site_nodes()
            busy = {site for site, _ in outstanding.values()}
            # Every online site is asked once (also past the limit: a relaunched run learns
            # what its sites say now); a waiting one again until the limit.
            to_ask = {node: site for node, site in nodes.items() if site not in busy and (
                site not in asked or (not past_limit and answers[site].state == "waiting"
                                      and now_s >= next_ask.get(site, 0.0)))}
            if to_ask:
                for mid, site in self._ask(to_ask, ttl=ask_timeout).items():
                    outstanding[mid] = (site, now_s)
                    asked.add(site)
            if outstanding:
                for reply in self.grid.pull_messages(list(outstanding)):
                    entry = outstanding.pop(reply.metadata.reply_to_message_id, None)
                    if entry is None:
                        continue
                    site = entry[0]
                    answers[site] = _admission_answer(reply, answers.get(site))
                    _note_versions(self.engine, site, reply)
                    if answers[site].state == "waiting":
                        next_ask[site] = self.clock() + self.approval_poll_s
            for mid, (site, sent) in list(outstanding.items()):
                if self.clock() - sent > ask_timeout:
                    del outstanding[mid]
                    if site not in answers or answers[site].state != "waiting":
                        answers[site] = _Answer(
                            "unanswered", f"no answer within {ask_timeout:.0f} s")
            online = set(nodes.values())
            waiting = {s for s, a in answers.items() if a.state == "waiting"}
            # While someone waits, every change of who answered what is recorded, so the
            # run's view stays current; the set emptying is recorded once more.
            seen: dict[str, str] = {s: a.state for s, a in answers.items()}
            if seen != recorded and (waiting or recorded_waiting):
                self._record_admission("run.waiting", "waiting", answers, online)
                recorded, recorded_waiting = seen, bool(waiting)
            blocking = waiting & online
            possible = [s for s in plan.sites
                        if s not in answers or answers[s].state != "refused"]
            if len(possible) < plan.min_sites:
                break  # refusals leave too few sites, whatever the others answer
            if not outstanding and (not blocking or past_limit):
                break
            # Pull answers every 0.1 s; otherwise sleep until the next question is due
            # (at most 0.5 s, to notice sites coming online).
            wake = min((next_ask.get(s, now_s) for s in blocking),
                       default=now_s + _ONLINE_POLL_S)
            time.sleep(_POLL_S if outstanding
                       else min(_ONLINE_POLL_S, max(_POLL_S, wake - self.clock())))
        online = set(self._site_nodes().values())
        usable = [s for s in plan.sites if s not in answers
                  or answers[s].state in ("accepted", "unanswered")]
        if len(usable) < plan.min_sites:
            reason = self._not_admitted_reason(answers, waited_s=self.clock() - t0)
            self._record_admission("run.not_admitted", "not-admitted", answers, online,
                                   reason=reason)
            raise RunFailed(reason)
        self._record_admission("run.admitted", "admitted", answers, online,
                               waited_s=round(self.clock() - t0, 3))
        log.info("run %s admitted: %s", plan.run_id, self._admission)

    def _ask(self, nodes: dict[int, str], *, ttl: float) -> dict[str, str]:
        """Push one admission question per node; returns message id -> site."""
        msgs = [Message(
            content=RecordDict({TASK_CONFIG: ConfigRecord(self.plan.task_config(0, train=False))}),
            dst_node_id=node_id, message_type=ADMISSION_MESSAGE_TYPE,
            group_id=f"run-{self.plan.run_id}-admission", ttl=ttl,
        ) for node_id in nodes]
        ids = list(self.grid.push_messages(msgs))
        return {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
                if mid}

    def _record_admission(self, action: str, state: str, answers: dict[str, _Answer],
                          online: set[str], **extra: Any) -> None:
        detail: dict[str, Any] = {
            "state": state,
            "started": self._admission.get("started"),
            "deadline": self._admission.get("deadline"),
            "accepted": sorted(s for s, a in answers.items() if a.state == "accepted"),
            "waiting": {s: {"since": a.since, "reason": a.reason}
                        for s, a in sorted(answers.items()) if a.state == "waiting"},
            "refused": {s: a.reason for s, a in sorted(answers.items())
                        if a.state == "refused"},
            "unanswered": {s: a.reason for s, a in sorted(answers.items())
                           if a.state == "unanswered"},
            "offline": sorted(s for s in self.plan.sites
                              if s not in answers and s not in online),
            **extra,
        }
        run_audit.record_admission(self.engine, self.plan.run_id, action=action,
                                   detail=detail)
        self._admission = detail

    def _not_admitted_reason(self, answers: dict[str, _Answer], *, waited_s: float) -> str:
        plan = self.plan
        accepted = [s for s, a in sorted(answers.items()) if a.state == "accepted"]
        waiting = [s for s, a in sorted(answers.items()) if a.state == "waiting"]
        refused = [(s, a.reason) for s, a in sorted(answers.items()) if a.state == "refused"]
        parts = [f"not admitted: {len(accepted)} of {len(plan.sites)} sites accepted the run "
                 f"after {waited_s:.0f} s (approval wait {plan.approval_wait_s:g} s); it "
                 f"needs at least {plan.min_sites}"]
        if waiting:
            parts.append("still waiting for approval at "
                         + "; ".join(_approve_hint(s, plan.run_id) for s in waiting))
        if refused:
            parts.append("refused by " + "; ".join(f"{s} ({why})" for s, why in refused))
        return "; ".join(parts)

    def _note_waiting(self, waiting: dict[str, str], done: set[str]) -> None:
        """Keep the run's waiting list true once training runs (train replies say it).

        Args:
            waiting: sites whose train task answered "pending-approval" -> the reason.
            done: sites that answered otherwise (they no longer wait).
        """
        if not self._admission:
            return
        current: dict[str, Any] = dict(self._admission.get("waiting") or {})
        changed = False
        for site in sorted(set(waiting) - set(current)):
            current[site] = {"since": utcnow().isoformat(), "reason": waiting[site]}
            changed = True
        for site in sorted(done & set(current)):
            del current[site]
            changed = True
        if changed:
            detail = {**self._admission, "waiting": current}
            run_audit.record_admission(self.engine, self.plan.run_id, action="run.waiting",
                                       detail=detail)
            self._admission = detail

    # -- rounds ------------------------------------------------------------------------

    def _reconnecting(self) -> bool:
        """True while a resumed run still gives its sites time to reconnect."""
        return self.clock() < self._reconnect_until

    def _wait_for_sites(self, deadline: float) -> tuple[dict[int, str], float]:
        """The run's online sites, after waiting for the offline ones; and how long it waited.

        A site offline when the round starts holds it for the run's ``offline_grace_s`` at
        most (never more than half the deadline); a resumed run that is still giving its
        sites time to reconnect waits up to half the deadline. With fewer than
        ``min_sites`` online it waits until the deadline (the round cannot start anyway).
        """
        plan = self.plan
        t0 = self.clock()
        half = 0.5 * plan.round_deadline_s
        grace = half if self._reconnecting() else min(max(0.0, plan.offline_grace_s), half)
        nodes = self._site_nodes()
        while len(nodes) < len(plan.sites) and self.clock() < deadline:
            if len(nodes) >= plan.min_sites and self.clock() >= t0 + grace:
                break  # enough sites; an offline one does not hold the round longer
            self._check_cancel()
            time.sleep(_ONLINE_POLL_S)
            nodes = self._site_nodes()
        return nodes, self.clock() - t0

    def _task_message(self, node_id: int, flat: np.ndarray, config: ConfigRecord,
                      number: int, *, train: bool, ttl: float) -> Message:
        content = RecordDict({
            TASK_ARRAYS: ArrayRecord({PACKED: Array(flat)}),
            TASK_CONFIG: config,
        })
        return Message(
            content=content, dst_node_id=node_id,
            message_type=MessageType.TRAIN if train else MessageType.EVALUATE,
            group_id=f"run-{self.plan.run_id}-round-{number}", ttl=ttl,
        )

    def _resend_to_reconnected(self, lost: dict[str, float], flat: np.ndarray,
                               config: ConfigRecord, number: int, *, train: bool,
                               deadline: float) -> dict[str, str]:
        """Send the task again to lost sites that are online again: message id -> site."""
        back = {node: site for node, site in self._site_nodes().items() if site in lost}
        if not back:
            return {}
        ttl = max(1.0, deadline - self.clock())
        msgs = [self._task_message(node, flat, config, number, train=train, ttl=ttl)
                for node in back]
        out: dict[str, str] = {}
        for mid, m in zip(self.grid.push_messages(msgs), msgs, strict=True):
            if mid:
                site = back[m.metadata.dst_node_id]
                out[mid] = site
                log.info("round %s: %s reconnected after %.1f s; its task is sent again",
                         number, site, self.clock() - lost.pop(site))
        return out

    def _exchange(self, nodes: dict[int, str], arrays: dict[str, np.ndarray],
                  number: int, *, train: bool, deadline: float
                  ) -> tuple[dict[str, Message], list[str], set[str]]:
        """Send one message per site and collect replies until all are in or the deadline.

        Returns the replies by site, the sites that did not answer in time, and the sites
        that answered one message more than once (neither answer is trusted).
        """
        ttl = max(1.0, deadline - self.clock())
        flat, layout = pack_arrays(arrays)
        # Replies are packed in the order of the layout sent: unpack them with it.
        self._layout = parse_layout(layout)
        config = ConfigRecord(self.plan.task_config(number, train=train))
        config[CFG.LAYOUT] = layout
        msgs = [self._task_message(node_id, flat, config, number, train=train, ttl=ttl)
                for node_id in nodes]
        t_push = self.clock()
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
                   if mid}
        answered: dict[str, str] = {}
        doubled: set[str] = set()
        replies: dict[str, Message] = {}
        lost: dict[str, float] = {}   # site -> when the SuperLink called it unavailable
        while (pending or lost) and self.clock() < deadline:
            self._check_cancel()
            if lost:
                pending.update(self._resend_to_reconnected(lost, flat, config, number,
                                                           train=train, deadline=deadline))
            for reply in self.grid.pull_messages(list(pending)) if pending else []:
                mid = reply.metadata.reply_to_message_id
                if reply.has_error() and reply.error.code in EXPIRED_ERROR_CODES:
                    # The SuperLink's own answer that the message (or its reply) expired:
                    # messages live until the deadline, so this is "no answer in time",
                    # and the site is named late when the deadline passes.
                    continue
                if reply.has_error() and reply.error.code == NODE_UNAVAILABLE_CODE and \
                        mid in pending and self._reconnecting():
                    # Most likely our own outage: the site's heartbeat deadline passed while
                    # the coordinator was down. Wait for it to reconnect, then ask again.
                    gone = pending.pop(mid)
                    lost[gone] = self.clock()
                    log.warning("round %s: %s is unavailable to the restarted coordinator; "
                                "waiting for it to reconnect", number, gone)
                    continue
                if mid in answered:
                    doubled.add(answered[mid])
                    continue
                site = pending.pop(mid, None)
                if site is not None:
                    answered[mid] = site
                    replies[site] = reply
                    log.info("round %s: reply from %s after %.2f s", number, site,
                             self.clock() - t_push)
            if pending or lost:
                time.sleep(_POLL_S)
        self._lost = set(lost)
        return replies, sorted({*pending.values(), *lost}), doubled

    def _round(self, number: int, arrays: dict[str, np.ndarray],
               expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        plan = self.plan
        t0 = self.clock()
        deadline = t0 + plan.round_deadline_s
        self._check_cancel(now=True)
        round_records.start_round(self.engine, plan.run_id, number)
        self._current = (number, t0)
        nodes, waited = self._wait_for_sites(deadline)
        offline = sorted(set(plan.sites) - set(nodes.values()))
        failed: list[dict[str, str]] = [
            {"site": s, "phase": "connect", "reason": "site offline (not connected to the "
             f"coordinator; waited {waited:.1f} s)"} for s in offline
        ]
        if offline and len(nodes) >= plan.min_sites:
            log.info("round %s goes on without %s (offline; waited %.1f s)", number,
                     ", ".join(offline), waited)
        if len(nodes) < plan.min_sites:
            self._fail_round(number, t0, [], failed, [])
            raise RunFailed(
                f"round {number}: only {len(nodes)} of {len(plan.sites)} sites online after "
                f"{plan.round_deadline_s:.0f} s (offline: {', '.join(offline) or 'none'}); "
                f"the run needs at least {plan.min_sites}"
            )
        if plan.secure_aggregation:
            return self._secure_round(number, arrays, nodes, failed, t0, deadline)
        replies, late, doubled = self._exchange(nodes, arrays, number, train=True,
                                                deadline=deadline)
        sound: dict[str, tuple[dict[str, np.ndarray], dict[str, float], str]] = {}
        received: dict[str, str] = {}
        for site, reply in sorted(replies.items()):
            if site in doubled:
                failed.append(_duplicate(site, f"the site answered round {number}'s task more "
                                               "than once; none of its answers is used"))
                continue
            outcome = self._accept(site, reply, expected, arrays)
            if isinstance(outcome, dict):
                failed.append(outcome)
                continue
            update, metrics = outcome
            digest = update_digest(update)
            received[site] = digest
            earlier = self._seen.get(digest)
            if earlier is not None and earlier[0] < number:
                who = "it" if earlier[1] == site else earlier[1]
                failed.append(_duplicate(site, f"byte-identical to the update {who} sent in "
                                               f"round {earlier[0]} (a replay)"))
                continue
            sound[site] = (update, metrics, digest)
        by_digest: dict[str, list[str]] = {}
        for site, (_u, _m, digest) in sound.items():
            by_digest.setdefault(digest, []).append(site)
        updates: list[SiteUpdate] = []
        participating: list[str] = []
        for site, (update, metrics, digest) in sorted(sound.items()):
            twins = [s for s in by_digest[digest] if s != site]
            if twins:
                failed.append(_duplicate(site, "byte-identical to the update of "
                                               f"{', '.join(twins)} in this round"))
                continue
            round_records.record_site_metrics(self.engine, plan.run_id, number, site, metrics)
            fingerprint = _fingerprint(replies[site])
            if fingerprint:
                run_audit.record_data_fingerprint(self.engine, plan.run_id, number, site,
                                                  fingerprint)
            updates.append(SiteUpdate(site, update, metrics.get("num-examples", 1.0)))
            participating.append(site)
        for site, digest in received.items():
            self._seen.setdefault(digest, (number, site))
        for site in late:
            if site in self._lost:
                failed.append({"site": site, "phase": "connect",
                               "reason": "site offline: it did not reconnect to the restarted "
                                         f"coordinator within the {plan.round_deadline_s:.0f}"
                                         " s round deadline"})
                continue
            failed.append({"site": site, "phase": "train",
                           "reason": f"late: no reply within the {plan.round_deadline_s:.0f} s "
                                     "round deadline"})
        late = [s for s in late if s not in self._lost]
        # A site that answered (trained, refused, sent a rejected update) no longer waits.
        answered = set(participating) | {
            f["site"] for f in failed if f["phase"] == "validate"
            or (f.get("code") in _SITE_CODES and f.get("code") != _PENDING_LABEL)}
        self._note_waiting({f["site"]: f["reason"] for f in failed
                            if f.get("code") == _PENDING_LABEL}, answered)
        if len(updates) < plan.min_sites:
            self._fail_round(number, t0, participating, failed, late, received)
            names = "; ".join(f"{f['site']}: {f['reason']}" for f in failed) or "none"
            raise RunFailed(
                f"round {number}: {len(updates)} usable updates, the run needs at least "
                f"{plan.min_sites} (failed or late: {names})"
            )
        assert self._aggregator is not None
        new = self._aggregator.aggregate(arrays, updates)
        rel = save_checkpoint(self.home, plan.run_id, number, new,
                              server_state=self._aggregator.state_dict(),
                              aggregation=plan.aggregation)
        # The round is recorded as completed before its checkpoint: a crash in between
        # resumes from the previous checkpoint and runs this round again (its row is reset,
        # the sites answer from their stored replies), instead of leaving a round that has
        # a checkpoint but is still "running".
        round_records.finish_round(self.engine, plan.run_id, number, status="completed",
                                   participating=participating, failed=failed, late=late,
                                   seconds=self.clock() - t0, update_digests=received)
        self._current = None
        round_records.record_checkpoint(self.engine, plan.run_id, number, str(rel[0]), rel[1])
        log.info("round %s done in %.2f s with %s", number, self.clock() - t0, participating)
        return new

    def _secure_round(self, number: int, arrays: dict[str, np.ndarray],
                      nodes: dict[int, str], failed: list[dict[str, str]], t0: float,
                      deadline: float) -> dict[str, np.ndarray]:
        """A round of a run with secure aggregation (coordinator.secure_rounds): only the
        sum of the sites' updates is ever unmasked here, so no per-update check runs."""
        from coordinator.secure_rounds import secure_round

        plan = self.plan
        out = secure_round(grid=self.grid, engine=self.engine, plan=plan, number=number,
                           arrays=arrays, nodes=nodes, deadline=deadline,
                           check_cancel=self._check_cancel, clock=self.clock)
        failed = [*failed, *out.failed]
        for site, metrics in out.metrics.items():
            round_records.record_site_metrics(self.engine, plan.run_id, number, site, metrics)
        if out.arrays is None:
            self._fail_round(number, t0, [], failed, out.late, out.digests)
            raise RunFailed(out.reason or f"round {number}: secure aggregation failed")
        assert self._aggregator is not None
        rel = save_checkpoint(self.home, plan.run_id, number, out.arrays,
                              server_state=self._aggregator.state_dict(),
                              aggregation=plan.aggregation)
        round_records.finish_round(self.engine, plan.run_id, number, status="completed",
                                participating=out.participating, failed=failed,
                                late=out.late, seconds=self.clock() - t0,
                                update_digests=out.digests)
        self._current = None
        round_records.record_checkpoint(self.engine, plan.run_id, number, str(rel[0]), rel[1])
        log.info("secure round %s done in %.2f s with %s", number, self.clock() - t0,
                 out.participating)
        return out.arrays

    def _norm_bound(self, metrics: dict[str, float], n_params: int
                    ) -> tuple[float, str] | str:
        """The norm bound for one site's update and how it was set, or why none can be."""
        plan = self.plan
        if plan.max_update_norm is not None:
            return plan.max_update_norm, "the run's max_update_norm"
        n = metrics.get("num-examples")
        if n is None or not math.isfinite(n) or n < 1:
            return ("the reply does not say how many examples the site trained on "
                    "(num-examples), so the update's norm cannot be bounded")
        sigma = metrics.get("noise-multiplier", 0.0)
        sigma = sigma if math.isfinite(sigma) and sigma > 0 else 0.0
        bound = dp_update_norm_bound(
            n_examples=int(n), batch_size=plan.batch_size, local_epochs=plan.local_epochs,
            lr=plan.lr, max_grad_norm=plan.max_grad_norm, noise_multiplier=sigma,
            n_params=n_params)
        return bound, (f"{NORM_BOUND_FACTOR:g} x the most DP-SGD can move the model with "
                       f"{int(n)} examples, noise multiplier {sigma:.3g}")

    def _accept(self, site: str, reply: Message, expected: dict[str, tuple[int, ...]],
                reference: dict[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, float]] | dict[str, str]:
        if reply.has_error():
            code = reply.error.code
            label = SiteErrorCode.NAMES.get(code, f"flower-error-{code}")
            reason = reply.error.reason or label
            # An engine error (e.g. the node went offline) comes from the SuperLink, not from
            # the site: keep only its first line; it can hold a stack trace.
            first = reason.splitlines()[0][:500] if reason.strip() else label
            return {"site": site, "phase": failure_phase(code, first), "reason": first,
                    "code": label}
        try:
            update = {k: v.numpy() for k, v in reply.content.array_records[REPLY_ARRAYS].items()}
            if set(update) == {PACKED}:
                update = unpack_arrays(update[PACKED], self._layout)
            metrics = {k: float(v) for k, v in reply.content[REPLY_METRICS].items()
                       if isinstance(v, int | float)}
        except (KeyError, TypeError, ValueError) as err:
            return {"site": site, "phase": "validate", "reason": f"malformed reply: {err}",
                    "code": "rejected-update"}
        bound = self._norm_bound(metrics, sum(math.prod(s) for s in expected.values()))
        problem: str | None
        if isinstance(bound, str):
            problem = validate_update(update, expected) or bound
        else:
            problem = validate_update(update, expected, reference=reference, max_norm=bound[0])
            if problem is not None and problem.startswith("update norm"):
                problem = f"{problem} ({bound[1]})"
        if problem is not None:
            return {"site": site, "phase": "validate", "reason": f"update rejected: {problem}",
                    "code": "rejected-update"}
        return update, metrics

    def _fail_round(self, number: int, t0: float, participating: list[str],
                    failed: list[dict[str, str]], late: list[str],
                    received: dict[str, str] | None = None) -> None:
        self._current = None
        round_records.finish_round(self.engine, self.plan.run_id, number, status="failed",
                                   participating=participating, failed=failed, late=late,
                                   seconds=self.clock() - t0, update_digests=received)

    def _final_evaluate(self, arrays: dict[str, np.ndarray]) -> None:
        """Each site evaluates the final global model on its held-out split."""
        plan = self.plan
        deadline = self.clock() + plan.round_deadline_s
        nodes = self._site_nodes()
        if not nodes:
            return
        replies, _late, _doubled = self._exchange(nodes, arrays, plan.rounds, train=False,
                                                  deadline=deadline)
        for site, reply in replies.items():
            if reply.has_error() or REPLY_METRICS not in reply.content.metric_records:
                continue
            metrics = {f"final-{k}": float(v) for k, v in reply.content[REPLY_METRICS].items()
                       if isinstance(v, int | float) and math.isfinite(float(v))}
            round_records.record_site_metrics(self.engine, plan.run_id, plan.rounds, site, metrics)


def _admission_answer(reply: Message, before: _Answer | None) -> _Answer:
    """A site's answer to the admission question (see fedward.wire.ADMISSION_ACTION)."""
    if reply.has_error():
        code = reply.error.code
        label = SiteErrorCode.NAMES.get(code, f"flower-error-{code}")
        reason = (reply.error.reason or label).splitlines()[0][:500]
        if code == SiteErrorCode.PENDING_APPROVAL:
            since = before.since if before is not None and before.state == "waiting" else ""
            return _Answer("waiting", reason, since or utcnow().isoformat())
        if code in (SiteErrorCode.REFUSED_POLICY, SiteErrorCode.REFUSED_BUDGET):
            # A budget refusal names the run's needs and the site's spent and caps: the
            # reason is recorded as the site sent it (run view, watch, not-admitted reason).
            return _Answer("refused", reason)
        # An older site agent without the admission handler, a trainer that is down, an
        # engine error: no answer; the round loop treats the site as before.
        return _Answer("unanswered", reason)
    status = None
    if REPLY_CONFIG in reply.content.config_records:
        status = reply.content.config_records[REPLY_CONFIG].get(MSG.STATUS)
    if status == MSG.ACCEPTED:
        return _Answer("accepted")
    return _Answer("unanswered", f"unexpected admission answer {str(status)[:40]!r}")


def _parse_time(raw: object, default: datetime) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(raw))
    except ValueError:
        return default
    return parsed if parsed.tzinfo is not None else default


def _duplicate(site: str, why: str) -> dict[str, str]:
    return {"site": site, "phase": "validate", "reason": f"duplicate update rejected: {why}",
            "code": "duplicate-update"}


def parity_dir(home: Path, candidate_id: int) -> Path:
    """Where a parity request for a release candidate and its results live."""
    return home / "parity" / f"candidate-{candidate_id}"


def run_parity(*, grid: Grid, engine: Engine, plan: RunPlan, request_dir: Path,
               clock: Callable[[], float] = time.monotonic) -> None:
    """Send each site of the run the candidate's artefacts; collect only the figures.

    A site answers only for a checkpoint it evaluated in the run and artefacts equal to its
    own export, once per format (``site_agent.parity_task``); a refusal is recorded as that
    site's failure with its reason.

    Reads ``request.json`` (checkpoint path, artefact files) from ``request_dir`` and writes
    ``result.json`` there atomically: per site, per format, max_abs_diff, agreement and n,
    plus the sites that failed and why.
    """
    from coordinator.checkpoints import load_checkpoint

    request = json.loads((request_dir / "request.json").read_text())
    arrays = load_checkpoint(Path(request["checkpoint"]), expected_sha256=request.get("sha256"))
    payload: dict[str, np.ndarray] = dict(arrays)
    for name in request["files"]:
        data = (request_dir / name).read_bytes()
        payload[f"artefact/{name}"] = np.frombuffer(data, dtype=np.uint8)
    by_node = repository.site_names_by_node_id(engine)
    online = set(grid.get_node_ids())
    nodes = {int(n): s for n, s in by_node.items() if s in plan.sites and int(n) in online}
    deadline = clock() + plan.round_deadline_s
    msgs = []
    for node_id in nodes:
        msgs.append(Message(
            content=RecordDict({
                TASK_ARRAYS: ArrayRecord({k: Array(v) for k, v in payload.items()}),
                TASK_CONFIG: ConfigRecord(plan.task_config(plan.rounds, train=False)),
            }),
            dst_node_id=node_id, message_type=MessageType.QUERY,
            group_id=f"run-{plan.run_id}-parity", ttl=plan.round_deadline_s,
        ))
    ids = list(grid.push_messages(msgs))
    pending = {mid: nodes[m.metadata.dst_node_id] for mid, m in zip(ids, msgs, strict=True)
               if mid}
    results: dict[str, dict[str, dict[str, float]]] = {}
    failed: dict[str, str] = {s: "offline" for s in plan.sites if s not in nodes.values()}
    while pending and clock() < deadline:
        for reply in grid.pull_messages(list(pending)):
            site = pending.pop(reply.metadata.reply_to_message_id, None)
            if site is None:
                continue
            if reply.has_error():
                failed[site] = (reply.error.reason or "error").splitlines()[0][:300]
                continue
            metrics = {k: float(v) for k, v in
                       reply.content.metric_records[REPLY_METRICS].items()
                       if isinstance(v, int | float)}
            results[site] = _parity_by_format(metrics)
        if pending:
            time.sleep(_POLL_S)
    for site in pending.values():
        failed[site] = f"late: no reply within {plan.round_deadline_s:.0f} s"
    atomic_write(request_dir / "result.json",
                 json.dumps({"sites": results, "failed": failed}, indent=2))


def _parity_by_format(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    n = metrics.get("parity-n", 0.0)
    for fmt in ("onnx", "onnx-int8", "openvino"):
        diff = metrics.get(f"parity-{fmt}-max-abs-diff")
        agree = metrics.get(f"parity-{fmt}-agreement")
        if diff is not None and agree is not None:
            out[fmt] = {"max_abs_diff": diff, "agreement": agree, "n": n}
    audit = {key: metrics[name] for key, name in MEMBERSHIP_FIGURES.items() if name in metrics}
    if audit:
        # The site's membership-inference audit of the same candidate (model card).
        out[MEMBERSHIP_KEY] = audit
    return out


def _note_versions(engine: Engine, site: str, reply: Message) -> None:
    """Keep the Fedward and Flower versions an accepting site sent with its answer."""
    if not reply.has_error() and REPLY_VERSIONS in reply.content.config_records:
        site_versions.note_reply_versions(
            engine, site, dict(reply.content.config_records[REPLY_VERSIONS]))


def _fingerprint(reply: Message) -> dict[str, str]:
    """The site's data fingerprint in a reply (hashes and counts only), if it sent one."""
    if REPLY_FINGERPRINT not in reply.content.config_records:
        return {}
    raw = reply.content.config_records[REPLY_FINGERPRINT]
    return {k: str(v) for k, v in raw.items() if k in FINGERPRINT_KEYS}


def _evaluation(grid: Grid, engine: Engine, home: Path, plan: RunPlan,
                context: Context) -> bool:
    """Carry out an evaluation on demand if this Flower run is one (it trains nothing)."""
    from coordinator.evaluation_task import EVALUATION_KEY, run_evaluation

    evaluation = int(str(context.run_config.get(EVALUATION_KEY, "0")))
    if evaluation:
        run_evaluation(grid=grid, engine=engine, home=home, plan=plan,
                       evaluation_id=evaluation, flwr_run_id=str(context.run_id))
    return bool(evaluation)


def load_plan(engine: Engine, run_id: int) -> RunPlan:
    """Read a run's plan from the database (with its preprocessing, once composed)."""
    plan = RunPlan.model_validate(repository.run_config(engine, run_id))
    return plan.model_copy(update={
        "preprocessing": run_statistics.preprocessing_json(engine, plan)})


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point the SuperLink calls for every run of the appliance's app."""
    from coordinator.db import make_engine
    from coordinator.study_registry import plan_task
    from fedward.models import model_arrays
    from fedward.tasks import build_model

    logging.basicConfig(level=logging.INFO, force=True,   # Opacus configures it on import
                        format="%(asctime)s %(name)s %(message)s")
    # httpx logs every request at INFO, the 0.1 s reply pulls included; Flower uploads each
    # line to the SuperLink's database: noise that costs round time (benchmark 1).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A reply pulled while its objects are still being uploaded waits 1 s in Flower before
    # the first retry; a short, bounded back-off instead.
    shorten_object_pulls()
    run_id = int(str(context.run_config["fedward-run-id"]))
    home = Path(os.environ["FEDWARD_HOME"])
    # The URL may hold a password: it comes in a 0600 file, never in the environment.
    engine = make_engine(Path(os.environ["FEDWARD_DATABASE_URL_FILE"]).read_text().strip())
    plan = load_plan(engine, run_id)
    candidate = int(str(context.run_config.get("fedward-parity-candidate", "0")))
    if candidate:
        # Not a training run: the sites measure a release candidate's export parity.
        run_parity(grid=grid, engine=engine, plan=plan, request_dir=parity_dir(home, candidate))
        return
    if _evaluation(grid, engine, home, plan, context):
        return
    repository.mark_run_started(engine, run_id, str(context.run_id))

    def initial() -> dict[str, np.ndarray]:
        # A run of a study: the model its registered spec (pinned by hash) describes.
        return model_arrays(build_model(plan_task(engine, plan), seed=plan.seed))

    RoundLoop(grid=grid, engine=engine, home=home, plan=plan, initial=initial).run()
