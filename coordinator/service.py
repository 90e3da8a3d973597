"""The coordinator service: database, SuperLink and REST API in one supervised process."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from coordinator import repository, run_control
from coordinator.api import create_app
from coordinator.db import make_engine
from coordinator.drift import AlarmRule
from coordinator.gateway import GatewayConfig, SiteGateway
from coordinator.home import gateway_cert_paths, init_home
from coordinator.metrics import start_listener
from coordinator.mlflow_outbox import MLFLOW_AUTO_ENV
from coordinator.ports import sites_address
from coordinator.presence import Presence
from coordinator.settings import Settings
from coordinator.superlink import SuperLinkError, SuperLinkProcess
from fedward.files import atomic_write
from fedward.flower.control import FlowerControl

__all__ = ["Coordinator", "FlowerLauncher", "FlowerRegistrar", "init_home"]

log = logging.getLogger("fedward.coordinator")

# A run whose ServerApp has ended (a crash, an OOM kill, a bug) without finishing the run is
# relaunched from its last checkpoint this many times before it is failed.
MAX_SERVERAPP_RELAUNCHES = 2
ORPHAN_CHECK_S = 5.0    # how often the watchdog looks for such runs
ORPHAN_GRACE_S = 10.0   # a run must look orphaned this long (a run exists before its launch)


@dataclass
class FlowerRegistrar:
    """Registers a site's node public key with the SuperLink (the NodeRegistrar port)."""

    control: FlowerControl

    def register(self, public_key: str, name: str) -> str:
        return str(self.control.register_node(public_key=public_key, name=name))

    def unregister(self, node_id: str) -> None:
        self.control.unregister_node(int(node_id))


@dataclass
class FlowerLauncher:
    """Starts a coordinator run as a Flower run of the appliance's app (the RunLauncher port)."""

    control: FlowerControl

    def launch(self, run_id: int) -> str:
        return str(self.control.start_run(fedward_run_id=run_id))

    def launch_evaluation(self, run_id: int, evaluation_id: int) -> str:
        """Start the Flower run that evaluates a checkpoint of ``run_id`` at its sites."""
        return str(self.control.start_run(fedward_run_id=run_id, evaluation=evaluation_id))


class SiteParityError(RuntimeError):
    """The sites could not measure a candidate's export parity."""


@dataclass
class FlowerSiteParity:
    """Measures a release candidate's export parity AT the sites, through Flower.

    The candidate's artefacts and checkpoint go to every site of the run in a query message;
    each site checks them against its own export of a model it evaluated, compares its
    export with the PyTorch model on its own held-out split and returns only coarse figures
    (see ``site_agent.parity_task``). Implements the release workflow's ``SiteParity``
    port.
    """

    control: FlowerControl
    home: Path
    engine: Engine
    timeout_s: float = 300.0

    def evaluate(self, *, run_id: int, candidate_id: int, artefacts: dict[str, Path]
                 ) -> dict[str, dict[str, dict[str, float]]]:
        from sqlmodel import select

        from coordinator.db import session_scope
        from coordinator.models import Checkpoint, ReleaseCandidate
        from coordinator.parity_task import parity_dir

        req_dir = parity_dir(self.home, candidate_id)
        if req_dir.exists():
            shutil.rmtree(req_dir)
        req_dir.mkdir(parents=True)
        files = {}
        for path in artefacts.values():
            for f in ([path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]):
                shutil.copyfile(f, req_dir / f.name)
                files[f.name] = True
        with session_scope(self.engine) as session:
            # The artefacts were exported from the candidate's own checkpoint (any round):
            # the sites compare them with exactly that model.
            cand = session.get(ReleaseCandidate, candidate_id)
            ckpt = None if cand is None else session.exec(select(Checkpoint).where(
                Checkpoint.run_id == run_id,
                Checkpoint.round_number == cand.round_number)).first()
            if cand is None or ckpt is None:
                raise SiteParityError(f"candidate {candidate_id} or its checkpoint of run "
                                      f"{run_id} is missing")
            if ckpt.sha256 != cand.checkpoint_sha256:
                raise SiteParityError(f"the checkpoint of candidate {candidate_id} changed "
                                      "since it was proposed")
            rel, sha = ckpt.path, ckpt.sha256
        atomic_write(req_dir / "request.json", json.dumps({
            "checkpoint": str(self.home / rel), "sha256": sha, "files": sorted(files)}))
        # A site measures each format of a model once (site_agent.parity_task) and refuses
        # a repeat; a later candidate of the same checkpoint with the same artefacts reuses
        # what the sites measured for the earlier one.
        earlier = self._earlier(sha, req_dir, files)
        self.control.start_run(fedward_run_id=run_id, parity_candidate=candidate_id)
        deadline = time.monotonic() + self.timeout_s
        result = req_dir / "result.json"
        while time.monotonic() < deadline:
            if result.exists():
                data = json.loads(result.read_text())
                sites = {**earlier["sites"], **data["sites"]}
                if not sites:
                    raise SiteParityError(f"no site measured parity: {data['failed']}")
                self._remember(sha, req_dir, files, sites)
                return sites
            time.sleep(0.5)
        raise SiteParityError(f"the sites did not report parity within {self.timeout_s:.0f} s")

    def _cache_path(self, checkpoint_sha256: str) -> Path:
        return self.home / "parity" / f"checkpoint-{checkpoint_sha256}.json"

    @staticmethod
    def _digests(req_dir: Path, files: Mapping[str, bool]) -> dict[str, str]:
        """Canonical digests per format: two exports of one checkpoint in one process are
        the same function but not the same bytes (OpenVINO numbers its layer names)."""
        from export.bundle_format import ARTEFACT_FILES
        from export.canonical import canonical_digest

        return {fmt: canonical_digest(fmt, {n: (req_dir / n).read_bytes() for n in names})
                for fmt, names in ARTEFACT_FILES.items() if all(n in files for n in names)}

    def _earlier(self, sha: str, req_dir: Path, files: Mapping[str, bool]) -> dict[str, Any]:
        """Figures the sites reported before for this checkpoint and these artefacts."""
        try:
            cached = json.loads(self._cache_path(sha).read_text())
        except (OSError, ValueError):
            return {"sites": {}}
        if cached.get("artefacts") != self._digests(req_dir, files):
            return {"sites": {}}
        return {"sites": dict(cached.get("sites", {}))}

    def _remember(self, sha: str, req_dir: Path, files: Mapping[str, bool],
                  sites: Mapping[str, Any]) -> None:
        atomic_write(self._cache_path(sha), json.dumps({
            "artefacts": self._digests(req_dir, files), "sites": dict(sites)}, indent=2))


@dataclass
class Coordinator:
    """A running coordinator: SuperLink (in its sandbox), site gateway and REST API."""

    settings: Settings
    superlink_port: int = 0
    engine: Engine = field(init=False)
    superlink: SuperLinkProcess = field(init=False)
    gateway: SiteGateway = field(init=False)
    presence: Presence = field(init=False)
    app: FastAPI = field(init=False)
    _orphan_since: dict[int, float] = field(default_factory=dict, init=False)
    _relaunches: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        pki = init_home(self.settings)
        url = self.settings.effective_database_url
        self.engine = make_engine(url)
        self.presence = Presence(self.engine)
        self.superlink = SuperLinkProcess(
            home=self.settings.home / "superlink",
            pki=pki,
            run_dir=self.settings.home / "run",
            database_url=url,
            port=self.superlink_port,
            mode=self.settings.flower_isolation,
            # Every ServerApp process inherits these; the database URL reaches it in a
            # 0600 file instead (see coordinator.superlink).
            # Whether a completed run is handed to MLflow, not where: the tracking URI may
            # hold a password, and the ServerApp only records the hand-off (the API process's
            # worker, which has the settings, does the export).
            extra_env={"FEDWARD_HOME": str(self.settings.home),
                       **({MLFLOW_AUTO_ENV: "1"} if self.settings.mlflow_tracking_uri else {})},
        )

    def start_superlink(self) -> None:
        """Start the SuperLink (sandboxed), the site gateway (fleet port) and build the API."""
        self.superlink.start()
        control = FlowerControl(address=self.superlink.address, ca_cert=self.superlink.pki.ca_cert)
        registrar = FlowerRegistrar(control)
        cert, key = gateway_cert_paths(self.superlink.pki)
        self.gateway = SiteGateway(
            config=GatewayConfig(host=self.settings.fleet_host, port=self.settings.fleet_port,
                                 pki=self.superlink.pki, cert=cert, key=key,
                                 superlink=self.superlink.address,
                                 drift_rule=AlarmRule(psi=self.settings.drift_psi_alarm,
                                                      alpha=self.settings.drift_alpha)),
            engine=self.engine, registrar=registrar.register, presence=self.presence)
        self.gateway.start()
        self.presence.start()
        self.app = create_app(settings=self.settings, engine=self.engine,
                              launcher=FlowerLauncher(control), registrar=registrar,
                              site_parity=FlowerSiteParity(control, self.settings.home,
                                                          self.engine))
        self.app.state.gateway = self.gateway
        (self.settings.home / "superlink.address").write_text(self.superlink.address + "\n")
        (self.settings.home / "fleet.address").write_text(self.gateway.address + "\n")

    def _control(self) -> FlowerControl:
        return FlowerControl(address=self.superlink.address,
                             ca_cert=self.superlink.pki.ca_cert)

    def _relaunch(self, control: FlowerControl, run_id: int, why: str) -> bool:
        """Start a run again as a new Flower run (it resumes after its last checkpoint)."""
        try:
            flwr_run = control.start_run(fedward_run_id=run_id)
        except Exception as err:
            repository.finish_run(self.engine, run_id, status="failed",
                                  reason=f"{why}; relaunching failed: {err}")
            return False
        repository.note_run_resumed(self.engine, run_id, why=why, flwr_run_id=str(flwr_run))
        log.warning("run %s resumed as Flower run %s (%s)", run_id, flwr_run, why)
        return True

    def resume_interrupted_runs(self, why: str) -> list[int]:
        """Relaunch every run still marked pending or running as a new Flower run.

        A Flower run dies with its SuperLink (or with the coordinator); ours does not: the
        round loop resumes after the run's last checkpoint, and a site asked again for a
        round it already trained answers from its stored reply without spending privacy
        again. Runs that cannot be relaunched are failed with the reason.
        """
        control = self._control()
        return [run_id for run_id in repository.running_run_ids(self.engine)
                if self._relaunch(control, run_id, why)]

    def check_orphaned_runs(self, now: float | None = None) -> None:
        """Notice runs whose ServerApp ended while the run had not (a crash, a kill, a bug).

        Such a run would otherwise show "running" forever. After a grace period (a run is
        committed a moment before its Flower run exists) it is relaunched from its last
        checkpoint, at most :data:`MAX_SERVERAPP_RELAUNCHES` times; then, or if someone
        stopped its Flower run, it is finished with a reason that says what Flower saw.
        """
        now = time.monotonic() if now is None else now
        ours = repository.running_run_ids(self.engine)
        if not ours:
            self._orphan_since.clear()
            return
        control = self._control()
        flower = control.training_runs()
        for run_id in ours:
            state = flower.get(run_id)
            if state is not None and not state.finished:
                self._orphan_since.pop(run_id, None)
                continue
            since = self._orphan_since.setdefault(run_id, now)
            if now - since < ORPHAN_GRACE_S:
                continue
            del self._orphan_since[run_id]
            if state is None:
                what = "no Flower run is executing it"
            else:
                detail = state.details.strip().splitlines()[0][:300] if state.details else ""
                what = (f"Flower run {state.flwr_run_id} ended {state.status}:"
                        f"{state.sub_status}" + (f" ({detail})" if detail else ""))
            if state is not None and state.sub_status == "stopped":
                repository.finish_run(self.engine, run_id, status="stopped",
                                      reason=f"stopped in Flower: {what}")
                continue
            tries = self._relaunches.get(run_id, 0)
            why = f"the run's ServerApp ended before the run did: {what}"
            if tries < MAX_SERVERAPP_RELAUNCHES:
                self._relaunches[run_id] = tries + 1
                log.error("%s; relaunching run %s (%d of %d)", why, run_id, tries + 1,
                          MAX_SERVERAPP_RELAUNCHES)
                self._relaunch(control, run_id, why)
            else:
                repository.finish_run(
                    self.engine, run_id, status="failed",
                    reason=f"{why}; relaunched {tries} times without success (the "
                           "coordinator's superlink/superlink.log and the ServerApp logs in "
                           "the SuperLink database say why)")

    def _watch_superlink(self, stop: threading.Event) -> None:
        """Restart the SuperLink if it dies, then resume the runs that were in flight.

        Also notices runs whose ServerApp died on its own (see check_orphaned_runs).
        """
        last_orphan_check = time.monotonic()
        while not stop.wait(2.0):
            if not self.superlink.alive():
                code = self.superlink.exit_code()
                why = f"the SuperLink exited unexpectedly (code {code})"
                log.error("%s; restarting it on %s", why, self.superlink.address)
                try:
                    self.superlink.start()
                except SuperLinkError as err:
                    log.error("could not restart the SuperLink: %s", err)
                    continue
                self._orphan_since.clear()
                self.resume_interrupted_runs(why)
                continue
            try:  # cancelled runs that no round loop ended in time (coordinator.run_control)
                run_control.enforce_cancellations(self.engine, self._control())
            except Exception as err:  # a SuperLink that is restarting, a busy database
                log.warning("could not check the cancelled runs: %s", err)
            if time.monotonic() - last_orphan_check >= ORPHAN_CHECK_S:
                last_orphan_check = time.monotonic()
                try:
                    self.check_orphaned_runs()
                except Exception as err:  # a SuperLink that is restarting, a busy database
                    log.warning("could not check for runs without a ServerApp: %s", err)

    def serve(self, *, ready: threading.Event | None = None) -> None:
        """Start the SuperLink and serve the API until interrupted; stops both on exit."""
        try:
            self.start_superlink()
        except BaseException:
            # e.g. the gateway could not listen: nothing started may outlive the failure.
            self.superlink.stop()
            raise
        self.resume_interrupted_runs("the coordinator restarted")
        stop_watch = threading.Event()
        threading.Thread(target=self._watch_superlink, args=(stop_watch,), daemon=True,
                         name="superlink-watchdog").start()
        metrics = start_listener(self.settings, self.engine)   # GET /metrics, apart from the API
        config = uvicorn.Config(self.app, host=self.settings.api_host, port=self.settings.api_port,
                                log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        log.info("coordinator API on http://%s:%s (OpenAPI at /docs); site gateway on %s "
                 "(the address sites enroll with); SuperLink in a private namespace, reached "
                 "at %s", self.settings.api_host, self.settings.api_port,
                 self.gateway.address, self.superlink.address)
        port = int(self.gateway.address.rsplit(":", 1)[1])
        log.info("hospitals connect to the site gateway at %s (fedward-site enroll --gateway "
                 "%s); it listens on %s", sites_address(self.settings, port),
                 sites_address(self.settings, port), self.gateway.address)
        if ready is not None:
            ready.set()
        # uvicorn shuts down gracefully on SIGTERM, then restores the handler it found and
        # raises the signal again: with the default handler the process would end right
        # there, before the `finally` below stops the gateway and the SuperLink, leaving
        # Flower's processes to die of their parent's death, after this process has gone.
        # A handler of our own makes that re-raised signal a no-op; before uvicorn installs
        # its own, the same handler asks the server to shut down, so no SIGTERM is lost.
        main = threading.current_thread() is threading.main_thread()  # else: no signals here
        previous = signal.signal(signal.SIGTERM, _shutdown_on_signal(server)) if main else None
        try:
            server.run()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            stop_watch.set()
            if metrics is not None:
                metrics.stop()
            self.gateway.stop()
            self.presence.stop()
            self.superlink.stop()
            self.engine.dispose()


def _shutdown_on_signal(server: uvicorn.Server) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler that asks ``server`` to shut down (and nothing else)."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    return handler


def home_path(value: str | None) -> Path | None:
    """A --home option as a path (None: the settings default)."""
    return None if value is None else Path(value).expanduser().resolve()
