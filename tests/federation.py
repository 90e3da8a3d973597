"""Test harness: a real coordinator and real site agents as processes on 127.0.0.1.

Everything runs through the same command-line tools an operator uses: the coordinator and
the site agents as processes, the per-site set-up commands (``fedward-site init`` and
``keygen``, ``fedward-coordinator add-site``) in this process (:func:`run_cli_in_process`).
Every process gets a bounded lifetime (``timeout``) and is stopped by its PID at teardown;
nothing else is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedward.procs import descendants, free_port

from tests_support import wait_until

BIN = Path(sys.executable).parent
LIFETIME_S = 600


def run_cli(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv[:3]} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def run_cli_in_process(argv: list[str], *, env: dict[str, str] | None = None
                       ) -> subprocess.CompletedProcess[str]:
    """``argv`` (``fedward-site`` or ``fedward-coordinator`` and its arguments) run by the
    same Typer application in this process, with ``env`` as the environment; fails like
    :func:`run_cli` with ``check``.

    For the set-up steps every federation repeats per site (``fedward-site init`` and
    ``keygen``, ``fedward-coordinator add-site``): each started a Python process that spent
    most of its 0.2-0.9 CPU-seconds importing. The commands' code, the files they write and
    the coordinator's API they call are the same; the tests of the installed commands
    themselves (the guides, the walkthrough, enrollment) still run them as processes.
    """
    from typer.testing import CliRunner

    program = Path(argv[0]).name
    if program == "fedward-site":
        from site_agent.cli import app
    elif program == "fedward-coordinator":
        from coordinator.cli import app
    else:
        raise ValueError(f"no in-process application for {program}")
    wanted = dict(os.environ if env is None else env)
    overlay: dict[str, str | None] = {k: v for k, v in wanted.items() if os.environ.get(k) != v}
    overlay.update({k: None for k in os.environ if k not in wanted})
    result = CliRunner().invoke(app, argv[1:], env=overlay, catch_exceptions=False)
    if result.exit_code != 0:
        raise AssertionError(f"{argv[:3]} exited {result.exit_code}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


@dataclass
class Site:
    name: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Federation:
    """A running coordinator plus site agents."""

    work: Path
    home: Path
    env: dict[str, str]
    api_port: int
    coordinator: subprocess.Popen[bytes]
    sites: dict[str, Site] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # A command the coordinator runs under (e.g. ``unshare --user ...``): empty for none.
    wrap: tuple[str, ...] = ()

    @property
    def superlink(self) -> str:
        """The SuperLink as the coordinator's host reaches it: ``unix:/.../superlink.sock``."""
        return (self.home / "superlink.address").read_text().strip()

    @property
    def fleet(self) -> str:
        """host:port of the site gateway (the one port sites connect to)."""
        return (self.home / "fleet.address").read_text().strip()

    @property
    def token(self) -> str:
        return (self.home / "admin.token").read_text().strip()

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = httpx.request(method, f"http://127.0.0.1:{self.api_port}/api/v1{path}", json=body,
                          headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        return r

    def enrollment_token(self, site: str) -> str:
        """A one-time enrollment token for ``site`` (added first if it is new)."""
        r = self.api("POST", "/sites", {"name": site})
        assert r.status_code in (201, 409), r.text
        r = self.api("POST", f"/sites/{site}/enrollment-token")
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def audit_events(self) -> list[dict[str, Any]]:
        """The coordinator's whole audit log, read through the API, oldest first."""
        by_id: dict[int, dict[str, Any]] = {}
        while True:
            r = self.api("GET", f"/audit?limit=500&offset={len(by_id)}")
            assert r.status_code == 200, r.text
            page = r.json()
            by_id.update({int(e["id"]): e for e in page["items"]})
            if not page["items"] or len(by_id) >= page["total"]:
                return [by_id[i] for i in sorted(by_id)]

    def site_audit(self, name: str) -> list[Any]:
        """A site's own audit log (``site_agent.audit.AuditEntry``s), oldest first.

        Asserts first that ``fedward-site audit verify`` finds the hash chain intact.
        """
        from site_agent.audit import read_entries

        root = self.sites[name].root
        verify = run_cli([str(BIN / "fedward-site"), "audit", "verify", "--dir", str(root)])
        assert "audit log intact" in verify.stdout, verify.stdout
        entries, verdict = read_entries(root / "audit.log")
        assert verdict.intact, verdict
        return entries

    def coord_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli([str(BIN / "fedward-coordinator"), *args], env=self.env, check=check)

    def add_site(self, name: str, csv: str, schema: str, *, register: bool = True,
                 superlink: str | None = None, content_wait_s: float = 30.0) -> Site:
        root = self.work / "sites" / name
        site_cli = str(BIN / "fedward-site")
        run_cli_in_process([site_cli, "init", "--dir", str(root), "--name", name,
                            "--superlink", superlink or self.superlink,
                            "--ca-cert", str(self.home / "pki" / "ca.pem"),
                            "--data", csv, "--schema", schema, "--reconnect-backoff", "5",
                            "--task-content-wait", str(content_wait_s),
                            # The starter site policy accepts the project that launch() uses.
                            "--project", "test"])
        run_cli_in_process([site_cli, "keygen", "--dir", str(root)])
        if register:
            run_cli_in_process([str(BIN / "fedward-coordinator"), "add-site", name,
                                "--node-key", str(root / "keys" / "node_key.pub")],
                               env=self.env)
        site = Site(name=name, root=root)
        self.sites[name] = site
        return site

    def start_site(self, name: str, *extra: str) -> Site:
        site = self.sites[name]
        site.log = self.work / f"site-{name}.log"
        with site.log.open("ab") as fh:
            site.proc = subprocess.Popen(
                ["timeout", "-k", "5", str(LIFETIME_S), str(BIN / "fedward-site"), "start",
                 "--dir", str(site.root), *extra],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._procs.append(site.proc)
        return site

    def join_all_sites(self) -> list[str]:
        """Add every site of the data split, start it, and wait until all are online."""
        names = []
        for s in self.data["sites"]:
            self.add_site(s["name"], s["csv"], s["schema"])
            self.start_site(s["name"])
            names.append(s["name"])
        self.wait_online(len(names))
        return names

    def kill_site(self, name: str) -> None:
        """SIGKILL a site agent and everything it started: the site drops off the network."""
        proc = self.sites[name].proc
        assert proc is not None
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)

    def wait_online(self, n: int, timeout: float = 60) -> None:
        from fedward.flower.control import FlowerControl

        control = FlowerControl(address=self.superlink, ca_cert=self.home / "pki" / "ca.pem")

        def online() -> bool:
            try:
                return len(control.online_node_ids()) >= n
            except httpx.HTTPError:
                return False  # the SuperLink is (re)starting

        wait_until(online, timeout=timeout, what=f"{n} sites online", interval=0.5)

    def launch(self, **body: Any) -> int:
        if self.api("GET", "/projects").json() == []:
            assert self.api("POST", "/projects", {"name": "test"}).status_code == 201
        r = self.api("POST", "/runs", {"project": "test", **body})
        assert r.status_code in (200, 201), r.text
        return int(r.json()["id"])

    def wait_run(self, run_id: int, timeout: float = 240) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            run = self.api("GET", f"/runs/{run_id}").json()
            ended = run["status"] in ("completed", "failed", "stopped", "cancelled")
            return dict(run) if ended else None

        # Each look is two HTTP requests' work for the coordinator: once a second is enough
        # for a state that, once reached, stays.
        return wait_until(ended, timeout=timeout, what=f"run {run_id} ended", interval=1.0)

    def wait_admission(self, run_id: int, timeout: float = 120) -> dict[str, Any]:
        """The run once its admission has been answered while it waits for a site's
        approval (or once it ended)."""
        def answered() -> dict[str, Any] | None:
            run = dict(self.api("GET", f"/runs/{run_id}").json())
            accepted = (run.get("admission") or {}).get("accepted")
            waiting = run.get("waiting_for_approval") and accepted
            return run if waiting or run["status"] in ("completed", "failed", "stopped") \
                else None

        return wait_until(answered, timeout=timeout,
                          what=f"run {run_id} waiting for a site's approval", interval=0.5)

    def wait_round(self, run_id: int, number: int, timeout: float = 120,
                   interval: float = 0.5) -> None:
        """Until round ``number`` of the run is completed; fails at once if the run ended."""
        def completed() -> bool:
            rounds = self.api("GET", f"/runs/{run_id}/rounds").json()
            if any(r["number"] == number and r["status"] == "completed" for r in rounds):
                return True
            run = self.api("GET", f"/runs/{run_id}").json()
            assert run["status"] in ("pending", "running"), \
                f"run {run_id} ended before round {number} completed: {run}"
            return False

        wait_until(completed, timeout=timeout, what=f"round {number} of run {run_id} completed",
                   interval=interval)

    def _start_coordinator(self, *, timeout: float = 60) -> subprocess.Popen[bytes]:
        log = (self.work / "coordinator.log").open("ab")
        proc = subprocess.Popen(
            ["timeout", "-k", "5", str(LIFETIME_S), *self.wrap,
             str(BIN / "fedward-coordinator"), "serve",
             "--home", str(self.home)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.api_port}/api/v1/health",
                             timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (self.work / "coordinator.log").read_text()[-3000:]
            time.sleep(0.2)
        for pid in [proc.pid, *descendants(proc.pid)]:   # leave nothing running behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        raise AssertionError(f"coordinator did not come up within {timeout} s")

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator and everything it started."""
        for pid in [self.coordinator.pid, *descendants(self.coordinator.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.coordinator.wait(timeout=10)

    def restart_coordinator(self, *, timeout: float = 60) -> None:
        self.coordinator = self._start_coordinator(timeout=timeout)

    def stop(self) -> None:
        for proc in [*self._procs, self.coordinator]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self._procs, self.coordinator]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=5)


def demo_data(out: Path, *, task: str, n_sites: int) -> dict[str, Any]:
    """``fedward-site demo-data``'s split into ``out``, and its answer (paths into ``out``).

    The split is the same every time (seeded), so the session makes each (task, sites) split
    once, in the folder the tests share (``FEDWARD_CACHE_DIR``, see ``conftest.py``), and
    copies it: about 2.5 CPU-seconds saved per federation.
    """
    argv = [str(BIN / "fedward-site"), "demo-data", "--task", task, "--sites", str(n_sites)]
    shared = os.environ.get("FEDWARD_CACHE_DIR")
    if not shared:
        return dict(json.loads(run_cli([*argv, "--out", str(out)]).stdout))
    made = Path(shared) / f"demo-data-{task}-{n_sites}"
    if not (made / "answer.json").exists():
        tmp = made.with_name(f"{made.name}.{os.getpid()}")
        answer = run_cli([*argv, "--out", str(tmp)]).stdout.replace(str(tmp), str(made))
        (tmp / "answer.json").write_text(answer)
        try:
            tmp.rename(made)   # atomic: another worker may have made it meanwhile
        except OSError:
            shutil.rmtree(tmp)
    shutil.copytree(made, out)
    return dict(json.loads((out / "answer.json").read_text().replace(str(made), str(out))))


@contextmanager
def federation(work: Path, *, n_sites: int = 3, task: str = "breast_cancer_mlp",
               wrap: tuple[str, ...] = (),
               extra_env: dict[str, str] | None = None) -> Iterator[Federation]:
    """Demo data for ``n_sites`` and a serving coordinator; sites are added by the test."""
    data = demo_data(work / "data", task=task, n_sites=n_sites)
    home = work / "coordinator"
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FEDWARD_DATABASE_URL"}
    env.update(FEDWARD_HOME=str(home), FEDWARD_API_PORT=str(api_port),
               FEDWARD_FLEET_PORT=str(free_port()), FEDWARD_METRICS_PORT="0",
               **(extra_env or {}))
    run_cli([str(BIN / "fedward-coordinator"), "init", "--home", str(home)], env=env)
    log = (work / "coordinator.log").open("ab")
    coord = subprocess.Popen(
        ["timeout", "-k", "5", str(LIFETIME_S), *wrap, str(BIN / "fedward-coordinator"),
         "serve", "--home", str(home)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True)
    fed = Federation(work=work, home=home, env=env, api_port=api_port, coordinator=coord,
                     data=data, wrap=wrap)
    try:
        # A loaded test machine may take over a minute to start a coordinator; going on
        # without one only fails later with a confusing error.
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/api/v1/health",
                             timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert coord.poll() is None, (work / "coordinator.log").read_text()
            assert time.monotonic() < deadline, "the coordinator did not come up in 180 s"
            time.sleep(0.2)
        yield fed
    finally:
        fed.stop()
        log.close()


def edit_site_policy(site: Site, **changes: Any) -> dict[str, Any]:
    """Rewrite a site's policy.json with ``changes`` (as hospital IT would); returns it."""
    path = site.root / "policy.json"
    policy = dict(json.loads(path.read_text()))
    policy.update(changes)
    path.write_text(json.dumps(policy, indent=2) + "\n")
    return policy
