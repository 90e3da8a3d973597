"""The coordinator rides out what a new user and a crash test met, with real processes.

* A site that is enrolled but not running does not hold every round for half its deadline:
  a round waits for it ``offline_grace_s`` at most and names it offline; ``sites`` shows
  which sites are online and when the gateway last heard from each.
* A coordinator down for about 35 s in the middle of a run comes back and the run completes
  with every site, while ``watch`` says the coordinator is unreachable and carries on.
* ``serve`` refuses clashing or busy ports in one line and names the gateway address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import SitePresence
from coordinator.presence import ONLINE_WITHIN_S, Presence, is_online
from fedward.procs import free_port

from federation import BIN, Federation, Site, federation, run_cli
from tests_support import short_tmp, wait_until


def _rounds(fed: Federation, run_id: int) -> list[dict[str, Any]]:
    return list(fed.api("GET", f"/runs/{run_id}/rounds").json())


# -- presence, unit ---------------------------------------------------------------------


def test_presence_writes_each_site_at_most_once_per_interval(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run_migrations(url)
    engine = make_engine(url)
    now = [datetime(2026, 12, 6, 12, 0, tzinfo=UTC)]
    presence = Presence(engine, clock=lambda: now[0], write_every_s=10.0)
    try:
        for _ in range(500):
            presence.seen("hospital-a")
        assert presence.flush() == 1
        now[0] += timedelta(seconds=3)
        presence.seen("hospital-a")
        presence.seen("hospital-b")
        assert presence.flush() == 1            # only b: a was written 3 s ago
        now[0] += timedelta(seconds=8)
        presence.seen("hospital-a")
        assert presence.flush() == 1            # a again, 11 s after its first write
        with session_scope(engine) as session:
            rows = {r.site_name: r.last_seen_at for r in session.exec(
                select(SitePresence))}
        assert set(rows) == {"hospital-a", "hospital-b"}
        assert rows["hospital-a"] == now[0]
        assert is_online(rows["hospital-a"], now=now[0] + timedelta(seconds=ONLINE_WITHIN_S))
        assert not is_online(rows["hospital-b"],
                             now=now[0] + timedelta(seconds=ONLINE_WITHIN_S + 1))
        assert not is_online(None)
    finally:
        engine.dispose()


# -- an enrolled site that never started ------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_site_that_never_started_holds_no_round_and_sites_shows_it_offline() -> None:
    with short_tmp() as work, federation(work, n_sites=3) as fed:
        names = [s["name"] for s in fed.data["sites"]]
        # The first site enrolls and reaches the coordinator through the gateway (as a
        # hospital does), the second on the direct lab route, the third never starts.
        first = fed.data["sites"][0]
        token = json.loads(fed.coord_cli("enroll-token", first["name"], "--json").stdout)
        root = fed.work / "sites" / first["name"]
        run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway",
                 fed.fleet, "--token", token["token"], "--data", first["csv"], "--schema",
                 first["schema"], "--project", "test"])
        fed.sites[first["name"]] = Site(name=first["name"], root=root)
        for s in fed.data["sites"][1:]:
            fed.add_site(s["name"], s["csv"], s["schema"])
        absent = names[2]
        for name in names[:2]:
            fed.start_site(name)
        fed.wait_online(2, timeout=240)   # a loaded 2-core test machine starts agents slowly
        # The deadline is long: a round that waited for the absent site as before (half the
        # deadline) would take at least 30 s; with a 3 s grace it takes a few seconds.
        run_id = fed.launch(task="breast_cancer_mlp", rounds=3, local_epochs=1, epsilon=8.0,
                            min_sites=2, round_deadline_s=60, offline_grace_s=3)
        run = fed.wait_run(run_id, timeout=240)
        assert run["status"] == "completed", run.get("failure_reason")
        rounds = _rounds(fed, run_id)
        assert [r["number"] for r in rounds] == [1, 2, 3]
        for r in rounds:
            assert sorted(r["participating_sites"]) == sorted(names[:2]), r
            (offline,) = r["failed_sites"]
            assert offline["site"] == absent and offline["phase"] == "connect", r
            assert offline["reason"].startswith("site offline"), r
            assert r["seconds"] < 20, r

        # The gateway saw the enrolled site (written at most every 10 s per site). The lab
        # route bypasses the gateway: that site is not seen there.
        def listed_online() -> dict[str, Any] | None:
            by_name = {s["name"]: s for s in json.loads(fed.coord_cli("sites", "--json").stdout)}
            return by_name if by_name[names[0]]["online"] else None

        by_name = wait_until(listed_online, timeout=30, interval=1,
                             what=f"{names[0]} shown online by `sites --json`")
        seen = datetime.fromisoformat(by_name[names[0]]["last_seen_at"])
        assert datetime.now(UTC) - seen < timedelta(seconds=60), seen
        assert by_name[absent]["online"] is False and by_name[absent]["last_seen_at"] is None
        assert fed.api("GET", f"/sites/{names[0]}").json()["online"] is True
        table = fed.coord_cli("sites").stdout
        assert "online" in table and "offline" in table and "never" in table, table

        # A site that stops is shown offline once its last contact is old enough.
        fed.kill_site(names[0])
        wait_until(lambda: not fed.api("GET", f"/sites/{names[0]}").json()["online"],
                   timeout=ONLINE_WITHIN_S + 30, interval=2,
                   what="a killed site shown offline")


# -- a coordinator outage of about 35 s mid-run; `watch` through it ----------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_35_s_coordinator_outage_mid_run_completes_with_every_site_and_watch_waits() -> None:
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        names = []
        for s in fed.data["sites"]:
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
            names.append(s["name"])
        fed.wait_online(2, timeout=240)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=5, local_epochs=1, epsilon=8.0,
                            min_sites=2, round_deadline_s=150)
        watch_log = work / "watch.log"
        with watch_log.open("wb") as fh:
            watcher = subprocess.Popen(
                ["timeout", "-k", "5", "500", str(BIN / "fedward-coordinator"), "watch",
                 str(run_id), "--timeout", "480", "--interval", "1"],
                env={**fed.env, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            fed.wait_round(run_id, 2, timeout=180)
            fed.kill_coordinator()
            killed_at = datetime.now(UTC)
            time.sleep(35)
            assert watcher.poll() is None, watch_log.read_text()[-3000:]
            fed.restart_coordinator()
            run = fed.wait_run(run_id, timeout=400)
            assert run["status"] == "completed", run.get("failure_reason")
            rounds = _rounds(fed, run_id)
            assert [r["number"] for r in rounds] == [1, 2, 3, 4, 5]
            for r in rounds:
                assert sorted(r["participating_sites"]) == sorted(names), r
                assert r["status"] == "completed", r
            assert any(datetime.fromisoformat(r["started_at"]) > killed_at for r in rounds)
            code = watcher.wait(timeout=60)
        finally:
            if watcher.poll() is None:
                os.killpg(watcher.pid, signal.SIGKILL)
                watcher.wait(timeout=10)
        out = watch_log.read_text()
        assert code == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert "is unreachable" in out and "reachable again" in out, out[-3000:]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_watch_says_the_coordinator_is_unreachable_and_goes_on_after_a_restart() -> None:
    with short_tmp() as work, federation(work, n_sites=1) as fed:
        s = fed.data["sites"][0]
        fed.add_site(s["name"], s["csv"], s["schema"])   # registered, never started
        # Nobody can train: the run waits for its site (for the whole long deadline).
        run_id = fed.launch(task="breast_cancer_mlp", rounds=1, epsilon=8.0, min_sites=1,
                            round_deadline_s=900)
        watch_log = work / "watch.log"
        with watch_log.open("wb") as fh:
            watcher = subprocess.Popen(
                ["timeout", "-k", "5", "240", str(BIN / "fedward-coordinator"), "watch",
                 str(run_id), "--timeout", "200", "--interval", "0.5"],
                env={**fed.env, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(5)   # watching (the table is drawn at the end: stdout is no terminal)
            assert watcher.poll() is None, watch_log.read_text()[-3000:]
            fed.kill_coordinator()
            time.sleep(8)
            assert watcher.poll() is None, watch_log.read_text()[-3000:]
            assert "is unreachable" in watch_log.read_text(), watch_log.read_text()[-3000:]
            fed.restart_coordinator()
            deadline = time.monotonic() + 60
            while "reachable again" not in watch_log.read_text():
                assert watcher.poll() is None, watch_log.read_text()[-3000:]
                assert time.monotonic() < deadline, watch_log.read_text()[-3000:]
                time.sleep(0.3)
            assert watcher.poll() is None, watch_log.read_text()[-3000:]
        finally:
            if watcher.poll() is None:
                os.killpg(watcher.pid, signal.SIGKILL)
                watcher.wait(timeout=10)
        out = watch_log.read_text()
        assert "Traceback" not in out, out[-3000:]
        assert out.count("is unreachable") == 1, out[-3000:]   # said once, not per retry


# -- serve's ports ----------------------------------------------------------------------


def _serve(home: Path, *args: str, env: dict[str, str], timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return run_cli(["timeout", "-k", "5", str(int(timeout)), str(BIN / "fedward-coordinator"),
                    "serve", "--home", str(home), *args], env=env, timeout=timeout + 15,
                   check=False)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_serve_names_clashing_or_busy_ports_in_one_line_and_logs_the_gateway() -> None:
    with short_tmp() as work:
        home = work / "coordinator"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FEDWARD_") or k == "FEDWARD_FLOWER_ISOLATION"}
        env["FEDWARD_HOME"] = str(home)
        run_cli([str(BIN / "fedward-coordinator"), "init", "--home", str(home)], env=env)
        api, fleet = free_port(), free_port()

        res = _serve(home, "--port", str(api), "--fleet-port", str(api), env=env)
        assert res.returncode == 1, res
        assert "Traceback" not in res.stderr + res.stdout, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, res.stderr
        assert "--port" in lines[0] and "--fleet-port" in lines[0], lines
        assert f"port {api}" in lines[0], lines

        res = _serve(home, "--port", str(api), "--fleet-port", str(fleet),
                     "--superlink-port", str(fleet),
                     env={**env, "FEDWARD_FLOWER_ISOLATION": "container"})
        assert res.returncode == 1 and "Traceback" not in res.stderr, res
        assert "--fleet-port" in res.stderr and "--superlink-port" in res.stderr, res.stderr

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            res = _serve(home, "--port", str(api), "--fleet-port", str(taken), env=env)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res
        assert f"port {taken}" in res.stderr and "already in use" in res.stderr, res.stderr
        assert "--fleet-port" in res.stderr, res.stderr

        # In its private namespace the SuperLink may use the gateway's port number: the
        # guide's own example starts, and the log names the address hospitals enroll with.
        log = work / "serve.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                ["timeout", "-k", "5", "120", str(BIN / "fedward-coordinator"), "serve",
                 "--home", str(home), "--port", str(api), "--fleet-port", str(fleet),
                 "--superlink-port", str(fleet)],
                env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        want = (f"hospitals connect to the site gateway at 127.0.0.1:{fleet} "
                f"(fedward-site enroll --gateway 127.0.0.1:{fleet})")
        try:
            deadline = time.monotonic() + 90
            while want not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGTERM)   # `timeout` passes it on to serve
            proc.wait(timeout=60)
        text = log.read_text()
        assert want in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
