"""Running drift checks at a site: charge, guard, audit, queue, send.

:func:`check_and_queue` runs one check (:mod:`site_agent.drift`) and turns its outcome into
a report in the site's outbox (``drift-outbox/<report id>.json``, 0600): for a check that
ran, the ledger reservation comes first (write-ahead, purpose ``drift``, under the ledger
run ``drift:<release>`` of the release's project, within the project's and the site's
caps), then the noise, the egress guard and the audit entry; a check that failed queues a
``failed`` report that names only the failure's kind. :func:`send_pending` posts the queued
reports to the coordinator's gateway (``POST /fedward/drift``) with the site's own client
certificate, directly (not through the tunnel, which other local processes of the agent's
user could reach), and deletes each only once the coordinator has stored it: an
unreachable coordinator loses nothing, the next attempt sends it. :class:`DriftScheduler`
does both on the schedule of the site's configuration, inside the agent.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np

from fedward.files import atomic_write
from site_agent.audit import AuditLog
from site_agent.config import SiteConfig, SitePaths
from site_agent.drift import DriftCheckError, DriftResult, disclose, failed_report, run_check
from site_agent.drift_policy import DriftSchedule
from site_agent.egress import EgressViolation, check_drift_report

__all__ = ["OUTBOX", "CheckOutcome", "DriftScheduler", "check_and_queue", "pending",
           "send_pending", "source_kind"]

log = logging.getLogger("fedward.site.drift")

OUTBOX: Final = "drift-outbox"
SEND_EVERY_S: Final = 60.0
_RELEASE_NAME: Final = "unknown-release"


@dataclass(frozen=True)
class CheckOutcome:
    """What one check did.

    Attributes:
        report: The report queued (what will leave).
        result: The whole result (None when the check failed).
        error: Why the check failed (None when it ran).
    """

    report: dict[str, Any]
    result: DriftResult | None
    error: DriftCheckError | None


def _outbox(root: Path) -> Path:
    box = root / OUTBOX
    box.mkdir(mode=0o700, exist_ok=True)
    return box


def pending(root: Path) -> list[Path]:
    """The reports waiting to be sent, oldest first."""
    box = root / OUTBOX
    return sorted(box.glob("*.json"), key=lambda p: p.stat().st_mtime_ns) \
        if box.is_dir() else []


def _charge(root: Path, result: DriftResult, report_id: str,
            rng: np.random.Generator | None) -> dict[str, Any]:
    """Reserve the release in the ledger (noised choices), then draw the noise."""
    from privacy import BudgetExceededError, Caps, PrivacyLedger
    from site_agent.policy import PolicyError, SitePolicy

    paths = SitePaths(root)
    try:
        policy = SitePolicy.load(paths.policy)
    except PolicyError as err:
        raise DriftCheckError("policy-invalid", str(err)) from None
    choice = policy.drift
    from site_agent.drift import mechanism_for

    mechanism = mechanism_for(result, choice)
    if mechanism is None:
        return disclose(result, choice)[0]
    project = policy.projects.get(result.project)
    if project is None:
        raise DriftCheckError("policy-invalid", f"the release's project {result.project!r} "
                              "is not in this site's policy: its drift reports have no "
                              "budget to be charged to (add the project, or allow the "
                              "unnoised disclosure in the policy's drift section)")
    ledger = PrivacyLedger(paths.ledger)
    run_id = f"drift:{result.release_id}"
    if ledger.get_run(run_id) is None:
        ledger.open_run(run_id=run_id, project=result.project,
                        epsilon_budget=project.epsilon_cap, delta=choice.delta)
    try:
        reservation = ledger.reserve(
            run_id=run_id, purpose="drift", key=report_id, mechanism=mechanism,
            caps=Caps(project=project.epsilon_cap, site=policy.site_epsilon_cap))
    except BudgetExceededError as err:
        raise DriftCheckError("budget-exceeded", f"the drift report was not disclosed: "
                              f"{err}") from None
    spent = None if reservation.run is None else reservation.run.epsilon
    report, _ = disclose(result, choice, rng=rng, epsilon=spent)
    report["report_id"] = report_id
    ledger.charge(run_id=run_id, purpose="drift", key=report_id)
    return report


def _statistics_noise(root: Path, run_id: Any) -> float | None:
    """The noise std this site added to its statistics release in ``run_id`` (None: it
    released none there), from its privacy ledger."""
    from privacy import PrivacyLedger
    from privacy.mechanisms import GaussianRelease

    path = SitePaths(root).ledger
    if not path.exists():
        return None
    for entry in PrivacyLedger(path).entries():
        if entry.run_id == str(run_id) and entry.purpose == "statistics" \
                and isinstance(entry.mechanism, GaussianRelease):
            return float(entry.mechanism.noise_std)
    return None


def check_and_queue(root: Path, schedule: DriftSchedule, *,
                    rng: np.random.Generator | None = None) -> CheckOutcome:
    """Run one check and queue its report (see the module docstring).

    Args:
        root: The site's data directory.
        schedule: What to check (release, key, recent data: a path or a connector block).
        rng: Noise source (tests); a fresh OS-seeded one by default.

    Returns:
        The outcome; a failed check is an outcome too, never an exception.
    """
    config = SiteConfig.load(root)
    audit = AuditLog(SitePaths(root).audit_log)
    release_dir = config.resolve(root, schedule.release)
    release_name = release_dir.name if release_dir.name else _RELEASE_NAME
    result: DriftResult | None = None
    try:
        from export.revocations import load_revocations
        from site_agent.config import ConfigError
        from site_agent.data_schema import SchemaError
        from site_agent.drift_rows import recent_data
        from site_agent.site_data import open_configured

        try:
            # The schema, or the study and the mapping, the site's training data is read
            # through: the recent rows are read the same way.
            configured = open_configured(config, root)
        except (ConfigError, SchemaError, OSError) as err:
            raise DriftCheckError("data-unreadable", f"the site's schema or study "
                                  f"mapping: {err}") from None
        data = recent_data(schedule.data, root=root, schema=configured.schema,
                           binding=configured.binding)
        key = config.resolve(root, schedule.public_key)
        revoked: frozenset[str] = frozenset()
        if schedule.revocations is not None:
            try:
                revoked = load_revocations(config.resolve(root, schedule.revocations),
                                           public_key=key).revoked
            except Exception as err:  # fail closed: an unreadable list verifies nothing
                raise DriftCheckError("bundle-unverified", str(err)) from None
        result = run_check(bundle_dir=release_dir, public_key=key,
                           data=data, revoked=revoked,
                           site_noise_std=lambda run: _statistics_noise(root, run))
        report_id = failed_report(result.release_id, "data-empty")["report_id"]
        report = _charge(root, result, report_id, rng)
        check_drift_report(report, features=result.names)
        error = None
    except DriftCheckError as err:
        error = err
        report = failed_report(result.release_id if result else release_name, err.kind)
        if check_drift_report_ok(report) is False:
            report["release_id"] = _RELEASE_NAME
    except EgressViolation as err:   # a bug, not the data: nothing leaves, the site knows
        error = DriftCheckError("model-failed", str(err))
        report = failed_report(result.release_id if result else release_name, error.kind)
    # The audit entry first: a report is queued to leave only once it is recorded (an
    # audit log that cannot be written raises AuditLogError and nothing is queued).
    audit.append("drift-check", {
        "release": report["release_id"], "report": report["report_id"],
        "source": source_kind(schedule), "status": report["status"],
        **({"failure": report["failure"], "reason": str(error)[:2000]} if error else {
            "rows": report["rows"], "features": len(report["features"]),
            "treatment": report["privacy"]["treatment"],
            "epsilon": report["privacy"]["epsilon"]})})
    atomic_write(_outbox(root) / f"{report['report_id']}.json",
                 json.dumps(report, allow_nan=False) + "\n", mode=0o600)
    return CheckOutcome(report=report, result=result, error=error)


def source_kind(schedule: DriftSchedule) -> str:
    """How outputs name the recent data's source: its connector's kind (``csv`` for a file
    or folder), never its path, query or password."""
    if isinstance(schedule.data, dict):
        return str(schedule.data.get("connector"))
    return "csv"


def check_drift_report_ok(report: dict[str, Any]) -> bool:
    """Whether a failed report passes the egress guard as is (a folder name that is not a
    release id format is replaced by ``unknown-release``)."""
    try:
        check_drift_report(report, features=())
    except EgressViolation:
        return False
    return True


def send_pending(root: Path, *, timeout: float = 15.0) -> tuple[int, int, str | None]:
    """Post every queued report to the coordinator; delete each one it stored.

    Returns:
        ``(sent, left, why)``: reports stored, reports still queued, and why sending
        stopped (None when all went).
    """
    from site_agent.enroll import EnrollmentFiles

    files = EnrollmentFiles(root)
    queued = pending(root)
    if not queued:
        return 0, 0, None
    if not files.enrolled:
        return 0, len(queued), ("this site is not enrolled: reports wait until it is "
                                "(`fedward-site enroll`)")
    gateway = SiteConfig.load(root).superlink   # the gateway, as for renewal
    ctx = ssl.create_default_context(cafile=str(files.coordinator_ca))
    ctx.load_cert_chain(str(files.site_cert), str(files.site_key))
    audit = AuditLog(files.audit_log)
    sent = 0
    with httpx.Client(verify=ctx, timeout=timeout) as client:
        for path in queued:
            body = path.read_bytes()
            try:
                resp = client.post(f"https://{gateway}/fedward/drift", content=body,
                                   headers={"content-type": "application/json"})
            except httpx.HTTPError as err:
                return sent, len(queued) - sent, (f"the coordinator at {gateway} is not "
                                                  f"reachable ({err}); kept for later")
            if resp.status_code >= 500 or resp.status_code == 429:
                return sent, len(queued) - sent, (f"the coordinator answered "
                                                  f"{resp.status_code}; kept for later")
            report_id = path.stem
            if resp.status_code == 200:
                audit.append("drift-report-sent", {"report": report_id, "bytes": len(body)})
                path.unlink()
                sent += 1
                continue
            # Refused for good (a malformed report, a revoked certificate): keep it aside,
            # never resend it, and say why in the audit log.
            refused = _outbox(root) / "refused"
            refused.mkdir(mode=0o700, exist_ok=True)
            path.rename(refused / path.name)
            audit.append("drift-report-refused", {"report": report_id,
                                                  "status": resp.status_code,
                                                  "reason": resp.text[:500]})
            return sent, len(queued) - sent - 1, (f"the coordinator refused report "
                                                  f"{report_id} ({resp.status_code}: "
                                                  f"{resp.text[:300]})")
    return sent, 0, None


class DriftScheduler:
    """The agent's drift schedule: a check every ``interval_s``, queued reports sent every
    :data:`SEND_EVERY_S` seconds (and right after each check)."""

    def __init__(self, root: Path, schedule: DriftSchedule, *,
                 wait: Callable[[threading.Event, float], bool] = threading.Event.wait
                 ) -> None:
        """The schedule of the site at ``root``; :meth:`start` runs it.

        Args:
            root: The site's data directory.
            schedule: What to check; its ``interval_s`` is set.
            wait: How the loop waits ``seconds`` of the schedule, given the stop event:
                True once the agent stops. Default: the event's own wait, in real seconds
                (tests pass a faster clock, to see the schedule without waiting for it).
        """
        assert schedule.interval_s is not None
        self.root = root
        self.schedule = schedule
        self._wait = wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drift", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        assert self.schedule.interval_s is not None
        next_check = 0.0
        elapsed = 0.0
        while not self._stop.is_set():
            if elapsed >= next_check:
                try:
                    outcome = check_and_queue(self.root, self.schedule)
                    if outcome.error is not None:
                        log.warning("drift check failed (%s): %s", outcome.error.kind,
                                    outcome.error)
                    else:
                        log.info("drift check of %s queued (report %s)",
                                 outcome.report["release_id"], outcome.report["report_id"])
                except Exception:   # the agent trains on; the next check may succeed
                    log.exception("drift check could not run")
                next_check = elapsed + self.schedule.interval_s
            try:
                sent, left, why = send_pending(self.root)
                if sent or why:
                    log.info("drift reports: %d sent, %d queued%s", sent, left,
                             f" ({why})" if why else "")
            except Exception:
                log.exception("drift reports could not be sent; kept for later")
            wait = min(SEND_EVERY_S, max(1.0, next_check - elapsed))
            if self._wait(self._stop, wait):
                return
            elapsed += wait
