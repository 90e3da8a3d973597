"""The coordinator service: database, SuperLink and REST API in one supervised process."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from coordinator import repository
from coordinator.api import create_app
from coordinator.db import make_engine, run_migrations
from coordinator.flower_control import FlowerControl
from coordinator.pki import CAFiles, ensure_ca, issue_server_cert
from coordinator.settings import Settings
from coordinator.superlink import SuperLinkError, SuperLinkProcess

__all__ = ["Coordinator", "FlowerLauncher", "FlowerRegistrar", "init_home"]

log = logging.getLogger("fedward.coordinator")


def init_home(settings: Settings) -> CAFiles:
    """Create the data directory, the site CA, the SuperLink certificate and the schema."""
    settings.home.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.home, 0o700)
    pki = ensure_ca(settings.home / "pki")
    if not pki.server_cert.exists():
        issue_server_cert(pki)
    run_migrations(settings.effective_database_url)
    return pki


@dataclass
class FlowerRegistrar:
    """Registers a site's node public key with the SuperLink (the NodeRegistrar port)."""

    control: FlowerControl

    def register(self, public_key: str, name: str) -> str:
        return str(self.control.register_node(public_key=public_key, name=name))


@dataclass
class FlowerLauncher:
    """Starts a coordinator run as a Flower run of the appliance's app (the RunLauncher port)."""

    control: FlowerControl

    def launch(self, run_id: int) -> str:
        return str(self.control.start_run(fedward_run_id=run_id))


@dataclass
class Coordinator:
    """A running coordinator: SuperLink on loopback plus the REST API."""

    settings: Settings
    superlink_port: int = 0
    engine: Engine = field(init=False)
    superlink: SuperLinkProcess = field(init=False)
    app: FastAPI = field(init=False)

    def __post_init__(self) -> None:
        pki = init_home(self.settings)
        url = self.settings.effective_database_url
        self.engine = make_engine(url)
        self.superlink = SuperLinkProcess(
            home=self.settings.home / "superlink",
            pki=pki,
            port=self.superlink_port,
            # Every ServerApp process inherits these: it records rounds in our database.
            extra_env={"FEDWARD_HOME": str(self.settings.home), "FEDWARD_DATABASE_URL": url},
        )

    def start_superlink(self) -> None:
        self.superlink.start()
        control = FlowerControl(address=self.superlink.address, ca_cert=self.superlink.pki.ca_cert)
        self.app = create_app(settings=self.settings, engine=self.engine,
                              launcher=FlowerLauncher(control),
                              registrar=FlowerRegistrar(control))
        (self.settings.home / "superlink.address").write_text(self.superlink.address + "\n")

    def _watch_superlink(self, stop: threading.Event) -> None:
        """Restart the SuperLink if it dies; runs that were in flight are failed with why."""
        while not stop.wait(2.0):
            if self.superlink.alive():
                continue
            code = self.superlink.exit_code()
            reason = (f"the SuperLink exited unexpectedly (code {code}); the run can be "
                      "relaunched, it resumes after its last checkpoint")
            log.error("%s; restarting it on %s", reason, self.superlink.address)
            for run_id in repository.running_run_ids(self.engine):
                repository.finish_run(self.engine, run_id, status="failed", reason=reason)
            try:
                self.superlink.start()
            except SuperLinkError as err:
                log.error("could not restart the SuperLink: %s", err)

    def serve(self, *, ready: threading.Event | None = None) -> None:
        """Start the SuperLink and serve the API until interrupted; stops both on exit."""
        self.start_superlink()
        stop_watch = threading.Event()
        threading.Thread(target=self._watch_superlink, args=(stop_watch,), daemon=True,
                         name="superlink-watchdog").start()
        config = uvicorn.Config(self.app, host=self.settings.api_host, port=self.settings.api_port,
                                log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        log.info("coordinator API on http://%s:%s (OpenAPI at /docs); SuperLink on %s",
                 self.settings.api_host, self.settings.api_port, self.superlink.address)
        if ready is not None:
            ready.set()
        try:
            server.run()
        finally:
            stop_watch.set()
            self.superlink.stop()
            self.engine.dispose()


def home_path(value: str | None) -> Path | None:
    """A --home option as a path (None: the settings default)."""
    return None if value is None else Path(value).expanduser().resolve()
