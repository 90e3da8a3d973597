"""The long-lived site agent: warm trainer plus a supervised Flower SuperNode.

It loads and checks the site's data once (refusing to train on bad data), serves the warm
trainer on a Unix socket inside the data directory, and keeps one ``flower-supernode``
connected outbound to the coordinator, restarting it with the back-off Flower needs. The
SuperNode runs in a private network namespace (:mod:`fedward.sandbox.netns`): its runtime API, which
has no authentication, is reachable only through a Unix socket in the site's 0700 ``run/``
directory, and it reaches the coordinator only through the route it is given. The agent's
only TCP listener is its Prometheus metrics on 127.0.0.1 (:mod:`site_agent.metrics`).
One agent per site directory: a second one is refused (a lock held while the agent runs).
Every task passes the site gate (the policy file and local approvals, re-read for every
task) and is written to the local audit log.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

from fedward.flower.env import flower_env
from fedward.flower.exit_codes import (
    FATAL_EXIT_CODES,
    NODE_CONNECTION_REFUSED,
    SUPERNODE_EXIT_HELP,
    flower_exit_code,
)
from fedward.flower.fleet import deactivate_node, refused_as_still_active, refused_as_unknown
from fedward.flower.wake import WAKE_ENV, WakeListener
from fedward.procs import free_port
from fedward.sandbox.netns import (
    EXIT_NO_SANDBOX,
    IsolationError,
    Sandbox,
    isolation_mode,
    sandbox_failure,
)
from fedward.sandbox.relay import Endpoint, RelayThread, unix_path
from fedward.tasks import TaskRef
from privacy import PrivacyLedger
from site_agent import clientapp as clientapp_module
from site_agent.admission import SiteGate
from site_agent.approvals import ApprovalBook
from site_agent.audit import AuditLog, AuditLogError
from site_agent.config import SiteConfig, SitePaths
from site_agent.connect import Route, open_route, probe_coordinator
from site_agent.data import SiteData
from site_agent.data_report import DataCheckError
from site_agent.drift_policy import DriftSchedule
from site_agent.drift_runner import DriftScheduler
from site_agent.enroll import report_versions_at_start
from site_agent.keys import FINGERPRINT_KEY_FILE, ensure_fingerprint_key, ensure_noise_secret
from site_agent.metrics import SiteState
from site_agent.metrics import start_listener as start_metrics
from site_agent.policy import PolicyError, PolicyMissingError
from site_agent.site_data import open_configured
from site_agent.site_lock import LOCKED_EXIT, AgentLockError, hold_site_lock
from site_agent.supernode_watch import SupernodeWatch
from site_agent.trainer import WarmTrainer
from site_agent.trainer_server import TrainerServer
from site_agent.warm_executor import WarmExecutor

__all__ = ["AgentLockError", "SiteAgent", "hold_site_lock", "restrict_site_dir"]

log = logging.getLogger("fedward.site.agent")

# What _run_supernode returns when the agent stopped a SuperNode that took no more tasks
# (not a Flower exit code: those are 100 and above, process statuses below 100).
STUCK_RESTART: Final = -1000


def _start_drift(root: Path, config: SiteConfig) -> DriftScheduler | None:
    """The scheduled drift check of the site's configuration (off unless configured)."""
    schedule = DriftSchedule.from_raw(config.drift)
    if schedule is None or schedule.interval_s is None:
        return None
    scheduler = DriftScheduler(root, schedule)
    scheduler.start()
    log.info("drift check of %s every %.0f s (reports go to the coordinator's gateway)",
             schedule.release, schedule.interval_s)
    return scheduler


def restrict_site_dir(root: Path) -> list[Path]:
    """Make the site directory private to the agent's user: directories 0700, files 0600.

    The directory holds patients' derived data (replies, logs), keys and the audit log;
    other local accounts have no business reading any of it. Symbolic links are left as
    they are (what they point to belongs to someone else). Returns what was tightened.
    """
    tightened = []
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                continue
            if not (st.st_mode & 0o077) or os.path.islink(entry) or st.st_uid != os.geteuid():
                continue
            os.chmod(entry, 0o700 if os.path.isdir(entry) else st.st_mode & 0o700)
            tightened.append(Path(entry))
    return tightened


def _warm_up(task: TaskRef) -> None:
    """Run one DP step on synthetic numbers so that round 1 does not pay for lazy imports.

    torch imports its compiler stack on the first optimizer step and Opacus builds its
    hooks on first use: about 1.5 s that would otherwise land inside the first round.
    """
    import numpy as np

    from fedward.tasks import build_model, get_task
    from privacy import train_dp

    spec = get_task(task)
    rng = np.random.default_rng(0)
    x = rng.random((16, spec.n_features), dtype=np.float32)
    y = (np.arange(16) % spec.n_classes).astype(np.int64)
    train_dp(model=build_model(task, seed=0), features=x, labels=y, noise_multiplier=1.0,
             max_grad_norm=1.0, batch_size=8, epochs=1, lr=0.1, seed=0)


def _refusal_help(log_path: Path, since: int, stale: int | None) -> str:
    """What a refused SuperNode (exit code 305) means, from what the SuperLink said."""
    if stale is not None:
        return ("the coordinator refused this site's node, which it accepted before: it "
                "still counts the previous connection as active (after a crash it forgets "
                "it within about a minute; the agent retries after its back-off), or the "
                "site was removed (then run `fedward-site doctor`)")
    if refused_as_unknown(log_path, since=since):
        return ("the coordinator does not know this site's node key: ask the ML team to "
                "run `fedward-coordinator add-site NAME --node-key node_key.pub`")
    return SUPERNODE_EXIT_HELP[NODE_CONNECTION_REFUSED]


def _audit_or_log(audit: AuditLog, action: str, detail: dict[str, object]) -> None:
    """Record an agent event; a log that cannot be written is reported, not fatal here.

    The trainer refuses every task while the log cannot be written, so the agent keeps
    running (and the coordinator keeps hearing why) instead of exiting.
    """
    try:
        audit.append(action, detail)
    except AuditLogError as err:
        log.error("%s", err)


def _report_policy(gate: SiteGate, paths: SitePaths) -> str:
    """Log the state of the site policy at start; returns ``ok``, ``missing`` or ``invalid``."""
    try:
        policy = gate.current_policy()
    except PolicyMissingError as err:
        log.error("%s", err)
        return "missing"
    except PolicyError as err:
        log.error("%s\nrun `fedward-site policy check --dir %s`", err, paths.root)
        return "invalid"
    log.info("site policy %s: projects %s, approval %s, max rounds per day %s", paths.policy,
             ", ".join(sorted(policy.projects)) or "none",
             "required" if policy.require_approval else "not required",
             policy.max_rounds_per_day or "unlimited")
    return "ok"


@dataclass
class SiteAgent:
    """One site's agent process."""

    root: Path
    epsilon_cap: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _sandbox: Sandbox | None = field(default=None, init=False)
    _audit: AuditLog | None = field(default=None, init=False)
    _state: SiteState = field(default_factory=SiteState, init=False)   # for metrics

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self, lock_fd: int | None = None) -> int:
        """Run until SIGTERM/SIGINT; returns a process exit code.

        Args:
            lock_fd: The site directory's agent lock, already taken by the caller
                (``fedward-site start`` takes it before its slow imports, so a second
                agent is refused at once); None: take it here.
        """
        paths = SitePaths(self.root)
        # Before anything that creates or removes a file: a second agent changes nothing.
        if lock_fd is None:
            try:
                lock_fd = hold_site_lock(paths)
            except AgentLockError as err:
                log.error("%s", err)
                return LOCKED_EXIT
        try:
            config = SiteConfig.load(self.root)
            return self._run_locked(paths, config)
        finally:
            os.close(lock_fd)

    def _run_locked(self, paths: SitePaths, config: SiteConfig) -> int:
        try:
            isolation_mode()
        except IsolationError as err:
            log.error("%s", err)
            return 5
        os.umask(0o077)   # everything the agent and its children write: 0600 / 0700
        tightened = restrict_site_dir(self.root)
        if tightened:
            log.warning("made %d files and folders of %s readable by this account only "
                        "(they were open to other local accounts), e.g. %s", len(tightened),
                        self.root, tightened[0])
        # The connector and the schema, or the study and the hospital's mapping to it
        # (site_agent.site_data); a site.json of earlier versions reads its CSV as before.
        configured = open_configured(config, self.root)
        study_task = configured.study_task()   # ConfigError: a study it cannot train
        data: SiteData | None = None
        data_failure: dict[str, object] | None = None
        try:
            data = configured.load(fingerprint_key=ensure_fingerprint_key(
                paths.keys / FINGERPRINT_KEY_FILE))
        except DataCheckError as err:
            # No training on bad data. The agent still connects so that the coordinator can
            # show the ML team that this site failed its data check (kinds and counts only).
            log.error("the site's data failed its checks; every run will be refused until "
                      "they are fixed (run `fedward-site check`):\n%s", err)
            data_failure = err.report.summary_for_coordinator()
        if not paths.node_key.exists():
            if paths.site_cert.exists():
                # An enrolled site: a new key would be one the coordinator does not know.
                log.error("no node key at %s: restore keys/ from this site's backup, or "
                          "re-enroll with a new token from the coordinator team "
                          "(`fedward-site enroll`)", paths.node_key)
            else:
                log.error("no node key at %s; run `fedward-site keygen --dir %s`",
                          paths.node_key, self.root)
            return 4
        audit = self._audit = AuditLog(paths.audit_log)
        gate = SiteGate(site_name=config.name, policy_path=paths.policy,
                        approvals=ApprovalBook(paths.approvals), audit=audit)
        policy_state = _report_policy(gate, paths)
        _audit_or_log(audit, "agent-started", {
            "site": config.name, "task": configured.task, "policy": policy_state,
            "data_check": "passed" if data_failure is None else "failed",
            "epsilon_cap": self.epsilon_cap,
        })
        import torch

        from privacy.dp import use_noise_cache

        use_noise_cache(paths.noise_cache)
        torch.set_num_threads(config.torch_threads)
        if data is not None:
            _warm_up(study_task or configured.task)
        trainer = WarmTrainer(
            site_name=config.name, task=configured.task, data=data,
            ledger=PrivacyLedger(paths.ledger), replies_dir=paths.replies, audit=audit,
            epsilon_cap=self.epsilon_cap, data_failure=data_failure, gate=gate,
            noise_secret=ensure_noise_secret(paths.keys / "noise.secret"),
            data_dir=configured.connector.data_dir,
            study=None if configured.binding is None else configured.binding.study,
        )
        server = TrainerServer(path=paths.socket, trainer=trainer)
        server.start()
        self._state.data_check_passed = data is not None
        metrics = start_metrics(ledger=paths.ledger, policy=paths.policy, state=self._state)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if data is not None:
            log.info("site %s ready: %d training rows, %d held out; trainer at %s",
                     config.name, len(data.train_y), len(data.test_y), paths.socket)
        drift = _start_drift(self.root, config)
        try:
            return self._supervise(config, paths)
        finally:
            if drift is not None:
                drift.stop()
            if self._sandbox is not None:
                self._sandbox.stop()
            server.stop()
            if metrics is not None:
                metrics.stop()
            _audit_or_log(audit, "agent-stopped", {"site": config.name})

    def _record(self, action: str, detail: dict[str, Any]) -> None:
        self._state.contact()   # a task from the coordinator
        if self._audit is not None:
            _audit_or_log(self._audit, action, detail)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def _supervise(self, config: SiteConfig, paths: SitePaths) -> int:
        ca = config.resolve(self.root, config.ca_cert)
        paths.logs.mkdir(parents=True, exist_ok=True)
        # An enrolled site dials its local tunnel, which adds mutual TLS to the gateway.
        route = open_route(root=self.root, superlink=config.superlink, ca_cert=ca)
        if route.via_gateway:
            log.info("enrolled: the SuperNode reaches the gateway %s through the tunnel on %s",
                     config.superlink, route.upstream)
            threading.Thread(target=report_versions_at_start,
                             args=(self.root, config.superlink, self._stop),
                             name="version-report", daemon=True).start()
        try:
            return self._supervise_route(config, paths, ca, route)
        finally:
            route.close()

    def _supervise_route(self, config: SiteConfig, paths: SitePaths, ca: Path,
                         route: Route) -> int:
        log_path = paths.logs / "supernode.log"
        rejoined = False
        while not self._stop.is_set():
            problem = probe_coordinator(config.superlink, ca)
            if problem is not None:
                log.warning("%s; retrying in 5 s", problem)
                self._stop.wait(5.0)
                continue
            self._state.contact()
            since = log_path.stat().st_size if log_path.exists() else 0
            code = self._run_supernode(config, paths, route)
            if self._stop.is_set():
                break
            if code == STUCK_RESTART:   # stopped cleanly by the agent: back at once
                continue
            help_text = SUPERNODE_EXIT_HELP.get(code, "see the SuperNode log")
            if code == NODE_CONNECTION_REFUSED:
                stale = refused_as_still_active(log_path, since=since)
                if stale is not None and not rejoined and self._end_stale_session(
                        route, paths, stale):
                    rejoined = True   # once: a second refusal waits for the back-off
                    continue
                help_text = _refusal_help(log_path, since, stale)
            rejoined = False
            if code in FATAL_EXIT_CODES:   # a restart cannot fix these
                log.error("SuperNode exited with code %s: %s; the agent stops (log: %s)",
                          code, help_text, paths.logs / "supernode.log")
                return 5
            log.warning("SuperNode exited with code %s: %s; restarting in %.0f s (log: %s)",
                        code, help_text, config.reconnect_backoff_s,
                        paths.logs / "supernode.log")
            self._stop.wait(config.reconnect_backoff_s)
        return 0

    def _end_stale_session(self, route: Route, paths: SitePaths, node_id: int) -> bool:
        """Mark this site's node offline after the SuperLink refused it as still online
        (the agent's previous run ended without saying goodbye); True if that worked."""
        try:
            deactivate_node(upstream=route.upstream, root_certificates=route.root_certificates,
                            node_key=paths.node_key, node_id=node_id)
        except Exception as err:
            log.debug("could not end the node's previous session: %s", err)
            return False
        log.info("the coordinator still counted this site's previous connection as active "
                 "(the agent did not stop cleanly last time); ended it, rejoining now")
        self._record("stale-session-ended", {"node_id": str(node_id)})
        return True

    def _run_supernode(self, config: SiteConfig, paths: SitePaths, route: Route) -> int:
        paths.flwr_home.mkdir(parents=True, exist_ok=True)
        # Inside the SuperNode's namespace: its runtime API, and a port that leads to the
        # coordinator (the tunnel, or the SuperLink). Both are its own 127.0.0.1.
        runtime_port, upstream_port = free_port(), free_port()
        upstream = unix_path(route.upstream)
        outside: RelayThread | None = None
        if upstream is None:   # host:port: the agent dials it on the SuperNode's behalf
            upstream = paths.upstream_socket
            outside = RelayThread([(Endpoint(path=upstream),
                                    Endpoint.parse(f"tcp:{route.upstream}"))],
                                  name="upstream-relay")
            outside.start()
        cmd = [
            # Flower's SuperNode with a shorter idle poll (see fedward.flower.supernode).
            sys.executable, "-m", "fedward.flower.supernode",
            "--root-certificates", str(route.root_certificates),
            "--superlink", f"127.0.0.1:{upstream_port}",
            "--auth-supernode-private-key", str(paths.node_key),
            "--node-config", f'{clientapp_module.SOCKET_KEY}="{paths.socket}"',
            # The SuperNode's runtime API for the ClientApp tasks, in its namespace only.
            "--host", "127.0.0.1",
            "--port", str(runtime_port),
            # The agent, not Flower's SuperExec, runs the ClientApp tasks (see
            # site_agent.warm_executor): in this process ("warm", no process per message)
            # or one process per task ("subprocess", as stock Flower). Either way the run's
            # app bundle is checked first: sites run only code installed with the agent.
            "--isolation", "process",
        ]
        sandbox = self._sandbox = Sandbox(command=cmd, mode=isolation_mode(), relays=[
            (f"unix:{paths.supernode_socket}", f"tcp:127.0.0.1:{runtime_port}"),
            (f"tcp:127.0.0.1:{upstream_port}", f"unix:{upstream}"),
        ])
        executor = WarmExecutor(runtime_address=f"unix:{paths.supernode_socket}",
                                app=clientapp_module.app,
                                per_task_process=config.executor == "subprocess",
                                content_wait_s=config.task_content_wait_s,
                                wake=WakeListener(paths.wake_socket),
                                audit=self._record)
        threading.Thread(target=executor.run, name="task-executor", daemon=True).start()
        log_fh: IO[bytes]
        log_path = paths.logs / "supernode.log"
        start_offset = log_path.stat().st_size if log_path.exists() else 0
        try:
            with open(log_path, "ab") as log_fh:
                proc = sandbox.start(env={**flower_env(str(paths.flwr_home)),
                                          WAKE_ENV: str(paths.wake_socket)}, stdout=log_fh)
                log.info("SuperNode started (pid %s) towards %s", proc.pid, config.superlink)
                self._state.route_up = True
                watch = SupernodeWatch(log_path, start_offset)
                while not self._stop.is_set():
                    watch.poll()
                    if (outage := watch.outage_ended()) is not None:
                        # One line for hospital IT; Flower's detail is in supernode.log.
                        log.warning("the coordinator was unreachable for %.0f s; the site "
                                    "has caught up (connected again, it takes part in the "
                                    "coming rounds)", outage)
                        self._record("coordinator-unreachable", {"seconds": round(outage)})
                    stuck = watch.stuck_for(executor_active_at=executor.active_at,
                                            executor_busy=executor.busy)
                    if stuck is not None:
                        log.warning("the SuperNode has waited %.0f s for the reply to a "
                                    "message no task is working on; restarting it", stuck)
                        self._record("supernode-restarted", {"reason": "stuck",
                                                             "seconds": round(stuck)})
                        sandbox.stop()   # a clean stop: it leaves the coordinator at once
                        self._sandbox = None
                        return STUCK_RESTART
                    code = proc.poll()
                    if code is not None:
                        self._sandbox = None
                        if code == EXIT_NO_SANDBOX:
                            log.error("%s", sandbox_failure(log_path, start_offset))
                            return code
                        return flower_exit_code(log_path, code, since=start_offset)
                    time.sleep(0.5)
                sandbox.stop()
                self._sandbox = None
        finally:
            self._state.route_up = False
            executor.stop.set()
            if outside is not None:
                outside.stop()
        return 0
