"""Other local accounts on either host cannot reach Flower, and Flower leaves nothing behind.

A real coordinator and two real sites (one on the direct lab route, one enrolled, through
its tunnel) run a training run. As an unprivileged local account (``nobody``), every TCP
port that the coordinator's or a site's processes listen on is tried, on 127.0.0.1 as that
account sees it, and every Unix socket they listen on: only the REST API and the site
gateway, which are public by design, may answer. The ServerApp's runtime task token, which
any account can read in its command line, leads nowhere. The site's directory is private to
its account, and a second agent on it is refused without breaking the first. Then the
process trees: after a SIGKILL of the coordinator and after a normal stop, none of the
processes it started (SuperLink, SuperExec, ServerApp) is left, on a coordinator whose
database is PostgreSQL: the database password is in no Flower process's environment or
command line, before the kill and after the restart, while the ServerApp still records
rounds in PostgreSQL.
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
from pathlib import Path
from typing import Any

import pytest

from fedward.procs import descendants

from federation import BIN, Federation, Site, federation, run_cli
from tests_support import short_tmp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROBE_USER = "nobody"


def _python_for_anyone() -> str:
    """An interpreter ``nobody`` may run: the test's own if every folder above it is open
    to others (not a virtualenv under /root), else the system's. The probes need only the
    standard library."""
    exe = Path(os.path.realpath(sys.executable))
    if all(os.stat(p).st_mode & 0o001 for p in exe.parents) and os.stat(exe).st_mode & 0o001:
        return str(exe)
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "/usr/bin/python3"


SYSTEM_PYTHON = _python_for_anyone()

_PROBE = r"""
import errno, json, socket, sys
out = {}
for kind, where in json.loads(sys.argv[1]):
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(where if kind == "unix" else ("127.0.0.1", where))
        out[f"{kind}:{where}"] = "connected"
    except OSError as err:
        out[f"{kind}:{where}"] = errno.errorcode.get(err.errno or 0, str(err))
    finally:
        s.close()
print(json.dumps(out))
"""


def _needs_a_probe_account() -> None:
    missing = [t for t in ("runuser", "unshare", "nsenter", SYSTEM_PYTHON)
               if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"this test needs root and {missing or 'runuser, unshare, nsenter'}: "
                    "apt-get install util-linux python3", pytrace=False)


def _as_probe(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", PROBE_USER, "--", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _probe(targets: list[tuple[str, Any]]) -> dict[str, str]:
    res = _as_probe([SYSTEM_PYTHON, "-c", _PROBE, json.dumps(targets)])
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _listeners(pids: set[int]) -> tuple[set[tuple[str, int]], set[str]]:
    """What these processes listen on: ({(network namespace, TCP port)}, {Unix socket paths}),
    each read from the process's own view (/proc/PID/net), so namespaces count too."""
    tcp: set[tuple[str, int]] = set()
    unix: set[str] = set()
    for pid in pids:
        inodes = _socket_inodes(pid)
        try:
            ns = _netns(pid)
            tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
            unix_table = Path(f"/proc/{pid}/net/unix").read_text()
        except OSError:
            continue   # the process ended meanwhile
        for table in tables:
            for line in table.splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:   # 0A: LISTEN
                    tcp.add((ns, int(f[1].rsplit(":", 1)[1], 16)))
        for line in unix_table.splitlines()[1:]:
            f = line.split()
            # Flags 00010000: accepting connections; a bound path is the 8th column.
            if len(f) >= 8 and f[6] in inodes and f[3] == "00010000":
                unix.add(f[7])
    return tcp, unix


def _tree(proc: subprocess.Popen[bytes] | None) -> set[int]:
    assert proc is not None
    return {proc.pid, *descendants(proc.pid)}


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _serverapps(pids: set[int]) -> list[int]:
    return [p for p in pids if any(a.endswith("flwr-serverapp") for a in _cmdline(p)[:2])]


def _wait_rounds(fed: Federation, run_id: int, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in fed.api("GET", f"/runs/{run_id}/rounds").json()
                if r["status"] == "completed"]
        if len(done) >= n:
            return
        run = fed.api("GET", f"/runs/{run_id}").json()
        assert run["status"] in ("pending", "running"), run
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} rounds of run {run_id} within {timeout} s")


def _enroll_site(fed: Federation, s: dict[str, Any]) -> Site:
    token = json.loads(fed.coord_cli("enroll-token", s["name"], "--json").stdout)["token"]
    root = fed.work / "sites" / s["name"]
    run_cli([str(BIN / "fedward-site"), "enroll", "--dir", str(root), "--gateway", fed.fleet,
             "--token", token, "--data", s["csv"], "--schema", s["schema"],
             "--project", "test"])
    site = Site(name=s["name"], root=root)
    fed.sites[s["name"]] = site
    return site


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[Federation, int]]:
    """A federation in the middle of a long run: a direct site and an enrolled site."""
    _needs_a_probe_account()
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        direct, enrolled = fed.data["sites"]
        site = fed.add_site(direct["name"], direct["csv"], direct["schema"])
        # A directory from before this change: open to every local account.
        site.root.chmod(0o755)
        (site.root / "site.json").chmod(0o644)
        fed.start_site(direct["name"])
        _enroll_site(fed, enrolled)
        fed.start_site(enrolled["name"])
        fed.wait_online(2, timeout=90)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=60, local_epochs=1, epsilon=8.0,
                            min_sites=2, round_deadline_s=60)
        _wait_rounds(fed, run_id, 1)
        yield fed, run_id


def test_no_other_local_account_reaches_a_flower_api_or_the_tunnel(
        running: tuple[Federation, int]) -> None:
    fed, _ = running
    coordinator = _tree(fed.coordinator)
    sites = {name: _tree(s.proc) for name, s in fed.sites.items()}
    everyone = coordinator.union(*sites.values())
    tcp, unix = _listeners(everyone)
    host_ns = _netns(os.getpid())
    public = {int(fed.fleet.rpartition(":")[2]), fed.api_port}
    # The coordinator's Prometheus listener is read-only figures on loopback, by design
    # readable by local accounts (docs/ml-team-guide.md, "Coordinator metrics").
    metrics = fed.home / "metrics.address"
    if metrics.exists():
        public.add(int(metrics.read_text().strip().rpartition(":")[2]))
    serverapp = _serverapps(coordinator)
    assert serverapp, "expected the run's ServerApp"
    argv = _cmdline(serverapp[0])
    token_address = argv[argv.index("--runtime-api-address") + 1]
    assert "--token" in argv   # readable by every account, as Flower writes it

    targets: list[tuple[str, Any]] = [("tcp", port) for _, port in sorted(tcp)]
    targets.append(("tcp", int(token_address.rpartition(":")[2])))
    targets += [("unix", path) for path in sorted(unix)]
    seen = _probe(targets)
    for kind, where in targets:
        key = f"{kind}:{where}"
        if kind == "tcp" and where in public:
            assert seen[key] == "connected", (key, seen)   # the probe can connect at all
        elif kind == "tcp":
            assert seen[key] == "ECONNREFUSED", (key, seen)
        else:
            assert seen[key] == "EACCES", (key, seen)

    # Not vacuous: the SuperLink and both SuperNodes listen, in namespaces of their own,
    # and every socket that leads to them was tried.
    assert len({ns for ns, _ in tcp if ns != host_ns}) >= 3, tcp
    assert {p for ns, p in tcp if ns == host_ns} == public, tcp
    expected_sockets = {str(fed.home / "run" / "superlink.sock")} | {
        str(s.root / "run" / n) for s in fed.sites.values()
        for n in ("supernode.sock", "trainer.sock")} | {
        str(fed.sites[fed.data["sites"][1]["name"]].root / "run" / "tunnel.sock")}
    assert expected_sockets <= unix, unix

    # Nor can the account step into a namespace to reach them from inside.
    for pid in (fed.coordinator.pid, *serverapp):
        res = _as_probe(["nsenter", f"--net=/proc/{pid}/ns/net", "true"])
        if _netns(pid) != host_ns:
            assert res.returncode != 0, res


def test_the_site_directory_is_private_to_the_agents_account(
        running: tuple[Federation, int]) -> None:
    fed, _ = running
    for site in fed.sites.values():
        for dirpath, dirnames, filenames in os.walk(site.root):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                mode = os.lstat(name).st_mode
                if not os.path.islink(name):
                    assert mode & 0o077 == 0, f"{name} is {oct(mode & 0o777)}"
        assert list((site.root / "replies").iterdir()), "expected stored replies"


def test_a_second_agent_on_the_same_directory_is_refused_and_the_first_goes_on(
        running: tuple[Federation, int]) -> None:
    fed, run_id = running
    site = fed.sites[fed.data["sites"][0]["name"]]
    sockets = sorted((site.root / "run").iterdir())
    res = run_cli(["timeout", "-k", "5", "60", str(BIN / "fedward-site"), "start", "--dir",
                   str(site.root)], check=False, timeout=90)
    assert res.returncode == 6, res
    assert "another site agent (pid " in res.stderr, res.stderr
    assert f"is already running on {site.root}" in res.stderr, res.stderr
    assert sorted((site.root / "run").iterdir()) == sockets
    before = len(fed.api("GET", f"/runs/{run_id}/rounds").json())
    _wait_rounds(fed, run_id, before + 1)
    last = [r for r in fed.api("GET", f"/runs/{run_id}/rounds").json()
            if r["status"] == "completed"][-1]
    assert site.name in last["participating_sites"], last


def _coordinator_python(fed: Federation) -> int:
    """PID of ``fedward-coordinator serve`` itself (the harness wraps it in ``timeout``)."""
    children = [p for p in descendants(fed.coordinator.pid)
                if any(a.endswith("fedward-coordinator") for a in _cmdline(p)[:2])]
    assert len(children) == 1, children
    return children[0]


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _describe(pids: set[int]) -> dict[int, str]:
    """What each PID is: command line, or (mid-exit, its memory gone) name, state, parent."""
    out = {}
    for pid in pids:
        try:
            _, _, tail = Path(f"/proc/{pid}/stat").read_text().partition(" (")
            comm, _, rest = tail.rpartition(") ")
            state, ppid = rest.split()[:2]
        except (OSError, ValueError):
            continue
        out[pid] = f"{' '.join(_cmdline(pid)[:2]).strip() or comm} state={state} ppid={ppid}"
    return out


def _no_flower_process_holds(secret: str, pids: set[int]) -> None:
    for pid in pids:
        for what in ("environ", "cmdline"):
            try:
                data = Path(f"/proc/{pid}/{what}").read_bytes()
            except OSError:
                continue
            assert secret.encode() not in data, (pid, what, _cmdline(pid)[:2])


def test_no_flower_process_gets_the_database_password_or_outlives_a_sigkill_or_a_stop(
        ) -> None:
    # One federation for both checks (each used to start its own): a coordinator on
    # PostgreSQL whose URL holds a password, with a run in flight.
    from pg import postgres_server

    secret = "wt-Secret-7f3a"
    with postgres_server() as url, short_tmp() as work:
        url = url.replace("fedward@", f"fedward:{secret}@")
        with federation(work, n_sites=1, extra_env={"FEDWARD_DATABASE_URL": url}) as fed:
            s = fed.data["sites"][0]
            fed.add_site(s["name"], s["csv"], s["schema"])
            fed.start_site(s["name"])
            fed.wait_online(1)
            run_id = fed.launch(task="breast_cancer_mlp", rounds=40, local_epochs=1,
                                epsilon=8.0, min_sites=1, round_deadline_s=60)
            # Rounds recorded: the ServerApp reached PostgreSQL from its namespace, and no
            # Flower process holds the password (it reads it from a 0600 file).
            _wait_rounds(fed, run_id, 1)
            coordinator = _coordinator_python(fed)
            started = set(descendants(coordinator))
            assert _serverapps(started), "expected the run's ServerApp"
            _no_flower_process_holds(secret, started)
            url_file = fed.home / "run" / "serverapp-database.url"
            assert url_file.stat().st_mode & 0o777 == 0o600
            assert secret in url_file.read_text()

            # A SIGKILL of the coordinator leaves none of its Flower processes behind.
            os.kill(coordinator, signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while _alive(started) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = _describe(_alive(started))
            assert not left, f"alive 2 s after the coordinator was killed: {left}"
            fed.coordinator.wait(timeout=10)

            # Restarted, it resumes the run; a normal stop then ends everything it started.
            fed.restart_coordinator()
            deadline = time.monotonic() + 90
            while not _serverapps(set(descendants(fed.coordinator.pid))):
                assert time.monotonic() < deadline, "the run was not resumed"
                time.sleep(0.3)
            coordinator = _coordinator_python(fed)
            started = set(descendants(coordinator))
            _no_flower_process_holds(secret, started)
            before = _describe(started)
            os.kill(coordinator, signal.SIGTERM)
            code = fed.coordinator.wait(timeout=30)
            left = _describe(_alive(started))
            assert not left, (f"alive after the coordinator stopped: {left}; before the stop: "
                              f"{before}; coordinator log:\n"
                              + (work / "coordinator.log").read_text()[-4000:])
            # 0, not killed by the signal: the coordinator stopped its Flower processes
            # itself rather than leaving them to die of their parent's death after it had
            # gone.
            assert code == 0, f"the coordinator exited {code} on SIGTERM"


def test_a_sandbox_that_cannot_have_namespaces_says_what_to_allow() -> None:
    _needs_a_probe_account()
    # In a user namespace with no id mapping, the process's id has no mapping in its
    # parent namespace, so the kernel refuses it a new one: like a host that forbids them.
    res = subprocess.run(
        ["unshare", "--user", "--", sys.executable, "-m", "fedward.sandbox.netns", "--", "true"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 78, res
    assert "cannot create a private network namespace" in res.stdout
    for hint in ("CAP_SYS_ADMIN", "user.max_user_namespaces", "RestrictNamespaces",
                 "FEDWARD_FLOWER_ISOLATION=container"):
        assert hint in res.stdout, hint


def test_an_unprivileged_account_gets_a_sandbox_of_its_own() -> None:
    """The non-root path (a user namespace), end to end: loopback inside, relay outside."""
    _needs_a_probe_account()
    with short_tmp() as work:
        work.chmod(0o755)
        run = work / "run"
        run.mkdir(mode=0o700)
        os.chown(run, 65534, 65534)
        sock = run / "s.sock"
        # The sandbox's modules, where ``nobody`` can read them (the checkout may not be).
        package = work / "pkg" / "fedward"
        (package / "sandbox").mkdir(parents=True)
        source = Path(__file__).resolve().parents[1] / "fedward"
        for name in ("__init__.py", "procs.py", "sandbox/__init__.py", "sandbox/netns.py",
                     "sandbox/relay.py"):
            shutil.copyfile(source / name, package / name)
        for folder in (work / "pkg", package, package / "sandbox"):
            folder.chmod(0o755)
        root = str(work / "pkg")
        # Answers two connections with the first uid of its user namespace's map, then ends.
        server = ("import socket\ns=socket.create_server(('127.0.0.1',8123))\n"
                  "for _ in range(2):\n"
                  "    c,_=s.accept()\n"
                  "    c.sendall(open('/proc/self/uid_map').read().split()[0].encode())\n"
                  "    c.close()\n")
        proc = subprocess.Popen(
            ["runuser", "-u", PROBE_USER, "--", "env", f"PYTHONPATH={root}", SYSTEM_PYTHON,
             "-m", "fedward.sandbox.netns", "--relay", f"unix:{sock}=tcp:127.0.0.1:8123", "--",
             SYSTEM_PYTHON, "-c", server], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        client = ("import socket,sys,time\n"
                  "for _ in range(100):\n"
                  "    s=socket.socket(socket.AF_UNIX)\n"
                  "    s.connect(sys.argv[1])\n"
                  "    d=s.recv(100)\n"
                  "    if d:\n"
                  "        print(d.decode())\n"
                  "        break\n"
                  "    time.sleep(0.1)\n")
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert sock.stat().st_uid == 65534 and sock.stat().st_mode & 0o777 == 0o600
            got = _as_probe([SYSTEM_PYTHON, "-c", client, str(sock)])
            assert got.stdout.strip() == "65534", got     # mapped to itself, not to root
            # The server still listens, on a 127.0.0.1 that is not the host's.
            assert _probe([("tcp", 8123)])["tcp:8123"] == "ECONNREFUSED"
            got = _as_probe([SYSTEM_PYTHON, "-c", client, str(sock)])
            assert got.stdout.strip() == "65534", got
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def test_the_serverapp_reaches_each_kind_of_database_the_right_way(tmp_path: Path) -> None:
    from coordinator.superlink import database_route

    run = tmp_path / "run"
    sock = f"unix:{run / 'database.sock'}"
    # Files and Unix sockets work in any network namespace: nothing to relay.
    for url in (f"sqlite:///{tmp_path}/c.db",
                "postgresql+psycopg2://fw:pw@/fedward?host=/var/run/postgresql"):
        assert database_route(url, run, mode="namespace") == (url, [], [])
    # Loopback over TCP: the namespace's own 127.0.0.1, same port, through the relay.
    url, inside, outside = database_route(
        "postgresql+psycopg2://fw:pw@localhost:5433/fedward", run, mode="namespace")
    assert url == "postgresql+psycopg2://fw:pw@127.0.0.1:5433/fedward"
    assert inside == [("tcp:127.0.0.1:5433", sock)]
    assert outside == [(sock, "tcp:localhost:5433")]
    # A server elsewhere keeps its name (TLS checks it) and is dialled at the relay.
    url, inside, outside = database_route(
        "postgresql+psycopg2://fw:pw@db.example.org/fedward?sslmode=verify-full", run,
        mode="namespace")
    assert url == ("postgresql+psycopg2://fw:pw@db.example.org/fedward?hostaddr=127.0.0.1"
                   "&sslmode=verify-full")
    assert inside == [("tcp:127.0.0.1:5432", sock)]
    assert outside == [(sock, "tcp:db.example.org:5432")]
    # In a container the ServerApp shares the coordinator's network.
    remote = "postgresql+psycopg2://fw:pw@db.example.org/fedward"
    assert database_route(remote, run, mode="container") == (remote, [], [])


def test_container_mode_keeps_the_relays_and_still_ends_the_whole_tree() -> None:
    """The images' mode: no namespaces, the same sockets, nothing left after a stop."""
    from fedward.procs import free_port
    from fedward.sandbox.netns import Sandbox

    port = free_port()
    with short_tmp() as work:
        pidfile = work / "grandchild.pid"
        # A server that first starts a detached grandchild (as Flower's SuperExec does).
        program = (
            "import socket,subprocess,sys\n"
            "g=subprocess.Popen([sys.executable,'-c','import time; time.sleep(300)'],"
            "start_new_session=True)\n"
            f"open('{pidfile}','w').write(str(g.pid))\n"
            f"s=socket.create_server(('127.0.0.1',{port}))\n"
            "while True:\n"
            "    c,_=s.accept(); c.sendall(b'hello'); c.close()\n")
        sandbox = Sandbox(command=[sys.executable, "-c", program], mode="container",
                          relays=[(f"unix:{work / 's.sock'}", f"tcp:127.0.0.1:{port}")])
        with (work / "log").open("ab") as log:
            proc = sandbox.start(env=dict(os.environ), stdout=log)
        try:
            deadline = time.monotonic() + 30
            got = b""
            while not got:
                assert proc.poll() is None, (work / "log").read_text()
                assert time.monotonic() < deadline, (work / "log").read_text()
                time.sleep(0.1)
                if pidfile.exists() and (work / "s.sock").exists():
                    import socket
                    with socket.socket(socket.AF_UNIX) as c:
                        c.connect(str(work / "s.sock"))
                        got = c.recv(16)
            assert got == b"hello"
            grandchild = int(pidfile.read_text())
            assert _alive({grandchild})
        finally:
            sandbox.stop()
        assert proc.returncode is not None
        assert not _alive({grandchild}), "the detached grandchild outlived the stop"


def test_a_sandbox_that_cannot_start_names_the_reason_to_the_coordinator() -> None:
    from coordinator.superlink import SuperLinkError, SuperLinkProcess
    from fedward.certs import ensure_ca, issue_server_cert

    with short_tmp() as work:
        pki = ensure_ca(work / "pki")
        issue_server_cert(pki)
        run = work / "run"
        run.mkdir()
        (run / "superlink.sock").write_text("not a socket")
        link = SuperLinkProcess(home=work / "superlink", pki=pki, run_dir=run,
                                database_url=f"sqlite:///{work / 'c.db'}")
        with pytest.raises(SuperLinkError, match=r"superlink\.sock exists and is not a "
                                                 r"socket; move it away"):
            link.start(timeout=30)
        assert not link.alive()
        assert (run / "superlink.sock").read_text() == "not a socket"   # left alone


def test_a_coordinator_without_root_trains_with_its_superlink_in_a_user_namespace() -> None:
    """The systemd unit's case: the coordinator's account is not root, so the sandbox makes
    a user namespace first. Here the coordinator runs as uid 1000 of a user namespace of the
    test's making (``nobody`` could not read this checkout's interpreter); the sandbox then
    takes the unprivileged path, with the real SuperLink, SuperExec and ServerApp."""
    _needs_a_probe_account()
    wrap = ("unshare", "--user", "--map-user=1000", "--map-group=1000", "--")
    with short_tmp() as work, federation(work, n_sites=1, wrap=wrap) as fed:
        s = fed.data["sites"][0]
        fed.add_site(s["name"], s["csv"], s["schema"])
        fed.start_site(s["name"])
        fed.wait_online(1)
        run_id = fed.launch(task="breast_cancer_mlp", rounds=2, local_epochs=1, epsilon=8.0,
                            min_sites=1, round_deadline_s=60)
        assert fed.wait_run(run_id)["status"] == "completed"
        coordinator = _coordinator_python(fed)
        superlink = [p for p in descendants(coordinator)
                     if _cmdline(p)[1:3] == ["-m", "fedward.flower.superlink"]]
        assert len(superlink) == 1
        # Its own user and network namespaces, nested in the coordinator's.
        for ns in ("user", "net"):
            assert os.readlink(f"/proc/{superlink[0]}/ns/{ns}") != \
                os.readlink(f"/proc/{coordinator}/ns/{ns}"), ns
        assert Path(f"/proc/{superlink[0]}/uid_map").read_text().split()[0] == "1000"
