"""Admission: before round 1, ask every online site of a run whether it takes part.

Nothing is trained or charged: each site answers from its policy check alone (accepted,
waiting for its IT's approval, refused, or no answer from an older agent). A waiting site is
asked again until it decides or the run's ``approval_wait_s`` has passed; the run fails here
when refusals or waits leave fewer than ``min_sites`` sites. Every change is recorded in the
audit log (``run.waiting``, ``run.admitted``, ``run.not_admitted``; see
:func:`coordinator.run_audit.record_admission`), which the run's view shows. Once training
runs, the round loop (:mod:`coordinator.round_loop`) keeps the waiting list true through
:meth:`Admission.note_waiting`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from sqlalchemy.engine import Engine

from coordinator import run_audit, site_versions
from coordinator.models import utcnow
from coordinator.run_errors import RunFailed
from fedward.agent_versions import REPLY_VERSIONS
from fedward.run_config import RunPlan
from fedward.wire import (
    ADMISSION_MESSAGE_TYPE,
    MSG,
    REPLY_CONFIG,
    TASK_CONFIG,
    SiteErrorCode,
)

__all__ = ["APPROVAL_POLL_S", "Admission", "SiteState"]

log = logging.getLogger("fedward.coordinator.rounds")

_POLL_S = 0.1
_ONLINE_POLL_S = 0.5
# How often a site that answered "pending-approval" is asked again during admission.
APPROVAL_POLL_S: Final = 3.0


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
class Admission:
    """The admission of one run, and its record once made.

    Args:
        grid: the Flower Grid of this run.
        engine: the coordinator database.
        plan: the run's plan.
        check_cancel: raises :class:`~coordinator.run_errors.RunCancelled` once someone
            asked to cancel the run (called while the admission waits).
        site_nodes: the online nodes of the run's sites (node id -> site name).
        clock: monotonic seconds (deadlines).
        approval_poll_s: how often a site waiting for approval is asked again.
    """

    grid: Grid
    engine: Engine
    plan: RunPlan
    check_cancel: Callable[[], None]
    site_nodes: Callable[[], dict[int, str]]
    clock: Callable[[], float] = field(default=time.monotonic)
    approval_poll_s: float = APPROVAL_POLL_S
    # The admission state as last recorded (see run_audit.record_admission).
    detail: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def admit(self, *, fresh: bool) -> None:
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
            self.detail = dict(prior[1])
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
        self.detail = {"state": "waiting", "started": started.isoformat(),
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
            self.check_cancel()
            now_s = self.clock()
            past_limit = now_s >= limit
            nodes = self.site_nodes()
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
                self._record("run.waiting", "waiting", answers, online)
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
        online = set(self.site_nodes().values())
        usable = [s for s in plan.sites if s not in answers
                  or answers[s].state in ("accepted", "unanswered")]
        if len(usable) < plan.min_sites:
            reason = self._not_admitted_reason(answers, waited_s=self.clock() - t0)
            self._record("run.not_admitted", "not-admitted", answers, online,
                                   reason=reason)
            raise RunFailed(reason)
        self._record("run.admitted", "admitted", answers, online,
                               waited_s=round(self.clock() - t0, 3))
        log.info("run %s admitted: %s", plan.run_id, self.detail)

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

    def _record(self, action: str, state: str, answers: dict[str, _Answer],
                          online: set[str], **extra: Any) -> None:
        detail: dict[str, Any] = {
            "state": state,
            "started": self.detail.get("started"),
            "deadline": self.detail.get("deadline"),
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
        self.detail = detail

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

    def note_waiting(self, waiting: dict[str, str], done: set[str]) -> None:
        """Keep the run's waiting list true once training runs (train replies say it).

        Args:
            waiting: sites whose train task answered "pending-approval" -> the reason.
            done: sites that answered otherwise (they no longer wait).
        """
        if not self.detail:
            return
        current: dict[str, Any] = dict(self.detail.get("waiting") or {})
        changed = False
        for site in sorted(set(waiting) - set(current)):
            current[site] = {"since": utcnow().isoformat(), "reason": waiting[site]}
            changed = True
        for site in sorted(done & set(current)):
            del current[site]
            changed = True
        if changed:
            detail = {**self.detail, "waiting": current}
            run_audit.record_admission(self.engine, self.plan.run_id, action="run.waiting",
                                       detail=detail)
            self.detail = detail


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


def _note_versions(engine: Engine, site: str, reply: Message) -> None:
    """Keep the Fedward and Flower versions an accepting site sent with its answer."""
    if not reply.has_error() and REPLY_VERSIONS in reply.content.config_records:
        site_versions.note_reply_versions(
            engine, site, dict(reply.content.config_records[REPLY_VERSIONS]))
