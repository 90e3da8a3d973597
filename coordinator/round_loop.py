"""The appliance's round loop over the site agents (run by :mod:`coordinator.server_app`).

Stock strategies wait forever for ``min_available_nodes`` and drop stragglers silently.
This loop gives every round a deadline and a minimum number of sites, names every site that
failed or was late and why, checkpoints the global model after every round, records each
round in the coordinator database as it happens, and resumes a run from its last
checkpoint. It sends one message per site per round (the site evaluates the received global
model and then trains) and pulls replies on its own short loop instead of the Grid's 3 s poll.

Its collaborators: the admission before round 1 (:mod:`coordinator.admission`), the
cancellation (:mod:`coordinator.cancellation`), the checks on each reply
(:mod:`coordinator.update_checks`) and the secure rounds (:mod:`coordinator.secure_rounds`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine

from coordinator import repository, round_records, run_audit, run_statistics
from coordinator.admission import APPROVAL_POLL_S, Admission
from coordinator.aggregation import (
    AggregationError,
    Aggregator,
    SiteUpdate,
    make_aggregator,
)
from coordinator.cancellation import CANCEL_POLL_S, CancelWatch
from coordinator.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_server_state,
    save_checkpoint,
)
from coordinator.round_exchange import RECONNECT_WINDOW_S, RoundExchange, online_site_nodes
from coordinator.run_errors import RunCancelled, RunFailed
from coordinator.update_checks import accept_reply, duplicate_failure, reply_fingerprint
from fedward.run_config import RunPlan
from fedward.wire import REPLY_METRICS, SiteErrorCode, update_digest

__all__ = ["RoundLoop"]

log = logging.getLogger("fedward.coordinator.rounds")

_ONLINE_POLL_S = 0.5
_PENDING_LABEL: Final = SiteErrorCode.NAMES[SiteErrorCode.PENDING_APPROVAL]
_SITE_CODES: Final = frozenset(SiteErrorCode.NAMES.values())


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
        cancel_poll_s: how often the run's row is read for a cancel request.
    """

    grid: Grid
    engine: Engine
    home: Path
    plan: RunPlan
    initial: Callable[[], dict[str, np.ndarray]]
    clock: Callable[[], float] = field(default=time.monotonic)
    approval_poll_s: float = APPROVAL_POLL_S
    cancel_poll_s: float = CANCEL_POLL_S
    # Notices a cancel request and ends the run once one came (coordinator.cancellation).
    _cancel: CancelWatch = field(init=False, repr=False)
    # The round in progress and when it started, while one is (a cancel ends it).
    _current: tuple[int, float] | None = field(default=None, init=False, repr=False)
    # The admission before round 1, with its record (coordinator.admission).
    _admission: Admission = field(init=False, repr=False)
    # Digest of every update received in this run -> (first round, site), for replays.
    _seen: dict[str, tuple[int, str]] = field(default_factory=dict, init=False, repr=False)
    # The run's aggregation strategy (coordinator.aggregation), with its state.
    _aggregator: Aggregator | None = field(default=None, init=False, repr=False)
    # Each round's message exchange with the sites (coordinator.round_exchange).
    _exchange: RoundExchange = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cancel = CancelWatch(grid=self.grid, engine=self.engine, run_id=self.plan.run_id,
                                   site_nodes=self._site_nodes, clock=self.clock,
                                   poll_s=self.cancel_poll_s)
        self._admission = Admission(grid=self.grid, engine=self.engine, plan=self.plan,
                                    check_cancel=self._cancel.check,
                                    site_nodes=self._site_nodes, clock=self.clock,
                                    approval_poll_s=self.approval_poll_s)
        self._exchange = RoundExchange(grid=self.grid, run_id=self.plan.run_id,
                                       site_nodes=self._site_nodes,
                                       check_cancel=self._cancel.check, clock=self.clock)

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
                self._exchange.reconnect_until = self.clock() + RECONNECT_WINDOW_S
                log.info("run %s resumed: sites get up to %.0f s to reconnect", plan.run_id,
                         RECONNECT_WINDOW_S)
            self._load_seen()
            self._admission.admit(fresh=start_round == 1)
            if plan.statistics and start_round == 1:
                self._statistics()
            expected = {k: tuple(v.shape) for k, v in arrays.items()}
            for number in range(start_round, plan.rounds + 1):
                arrays = self._round(number, arrays, expected)
            if plan.final_evaluate:
                self._cancel.check(now=True)
                self._final_evaluate(arrays)
        except RunFailed as err:
            log.error("run %s failed: %s", plan.run_id, err)
            repository.finish_run(self.engine, plan.run_id, status="failed", reason=str(err))
            return
        except RunCancelled as cancel:
            self._cancel.end(cancel, plan=self.plan, current=self._current)
            return
        repository.finish_run(self.engine, plan.run_id, status="completed", reason=None)

    def _statistics(self) -> None:
        """The statistics phase (coordinator.run_statistics): before round 1, every
        admitted online site releases its DP statistics; they are summed and kept."""
        refused = set(dict(self._admission.detail.get("refused") or {}))
        nodes = {n: s for n, s in self._site_nodes().items() if s not in refused}
        try:
            run_statistics.statistics_phase(grid=self.grid, engine=self.engine,
                                            plan=self.plan, nodes=nodes,
                                            check_cancel=self._cancel.check, clock=self.clock)
        except run_statistics.StatisticsFailed as err:
            raise RunFailed(str(err)) from None
        # A run of a study: the imputation and scaling composed from the statistics go to
        # every site with each later message (fedward.preprocessing).
        self.plan = self.plan.model_copy(update={
            "preprocessing": run_statistics.preprocessing_json(self.engine, self.plan)})

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
        return online_site_nodes(self.grid, self.engine, self.plan.sites)

    # -- rounds ------------------------------------------------------------------------

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
        grace = (half if self._exchange.reconnecting()
                 else min(max(0.0, plan.offline_grace_s), half))
        nodes = self._site_nodes()
        while len(nodes) < len(plan.sites) and self.clock() < deadline:
            if len(nodes) >= plan.min_sites and self.clock() >= t0 + grace:
                break  # enough sites; an offline one does not hold the round longer
            self._cancel.check()
            time.sleep(_ONLINE_POLL_S)
            nodes = self._site_nodes()
        return nodes, self.clock() - t0

    def _round(self, number: int, arrays: dict[str, np.ndarray],
               expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        plan = self.plan
        t0 = self.clock()
        deadline = t0 + plan.round_deadline_s
        self._cancel.check(now=True)
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
        replies, late, doubled = self._exchange.run(nodes, arrays, number, plan=plan,
                                                    train=True, deadline=deadline)
        sound: dict[str, tuple[dict[str, np.ndarray], dict[str, float], str]] = {}
        received: dict[str, str] = {}
        for site, reply in sorted(replies.items()):
            if site in doubled:
                failed.append(duplicate_failure(
                    site, f"the site answered round {number}'s task more than once; none of "
                          "its answers is used"))
                continue
            outcome = accept_reply(site, reply, expected, arrays, plan=plan,
                                   layout=self._exchange.layout)
            if isinstance(outcome, dict):
                failed.append(outcome)
                continue
            update, metrics = outcome
            digest = update_digest(update)
            received[site] = digest
            earlier = self._seen.get(digest)
            if earlier is not None and earlier[0] < number:
                who = "it" if earlier[1] == site else earlier[1]
                failed.append(duplicate_failure(
                    site, f"byte-identical to the update {who} sent in round {earlier[0]} "
                          "(a replay)"))
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
                failed.append(duplicate_failure(site, "byte-identical to the update of "
                                                      f"{', '.join(twins)} in this round"))
                continue
            round_records.record_site_metrics(self.engine, plan.run_id, number, site, metrics)
            fingerprint = reply_fingerprint(replies[site])
            if fingerprint:
                run_audit.record_data_fingerprint(self.engine, plan.run_id, number, site,
                                                  fingerprint)
            updates.append(SiteUpdate(site, update, metrics.get("num-examples", 1.0)))
            participating.append(site)
        for site, digest in received.items():
            self._seen.setdefault(digest, (number, site))
        for site in late:
            if site in self._exchange.lost:
                failed.append({"site": site, "phase": "connect",
                               "reason": "site offline: it did not reconnect to the restarted "
                                         f"coordinator within the {plan.round_deadline_s:.0f}"
                                         " s round deadline"})
                continue
            failed.append({"site": site, "phase": "train",
                           "reason": f"late: no reply within the {plan.round_deadline_s:.0f} s "
                                     "round deadline"})
        late = [s for s in late if s not in self._exchange.lost]
        # A site that answered (trained, refused, sent a rejected update) no longer waits.
        answered = set(participating) | {
            f["site"] for f in failed if f["phase"] == "validate"
            or (f.get("code") in _SITE_CODES and f.get("code") != _PENDING_LABEL)}
        self._admission.note_waiting({f["site"]: f["reason"] for f in failed
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
                           check_cancel=self._cancel.check, clock=self.clock)
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
        replies, _late, _doubled = self._exchange.run(nodes, arrays, plan.rounds, plan=plan,
                                                      train=False, deadline=deadline)
        for site, reply in replies.items():
            if reply.has_error() or REPLY_METRICS not in reply.content.metric_records:
                continue
            metrics = {f"final-{k}": float(v) for k, v in reply.content[REPLY_METRICS].items()
                       if isinstance(v, int | float) and math.isfinite(float(v))}
            round_records.record_site_metrics(self.engine, plan.run_id, plan.rounds, site, metrics)
