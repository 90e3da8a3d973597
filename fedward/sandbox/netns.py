"""A private network and PID namespace for the Flower processes of either host.

Flower 1.42 listens on TCP only, and its control and runtime APIs have no authentication:
whoever reaches the SuperLink's port can start a run whose ServerApp runs as the
coordinator, and whoever reaches a SuperNode's runtime API can answer for the site. On a
shared loopback that is every local account. So each Flower process tree (the SuperLink
with its SuperExec and ServerApps; a site's SuperNode) runs in a *sandbox*: a network
namespace of its own, whose 127.0.0.1 no other process shares, and a PID namespace whose
processes the kernel kills all at once when the sandbox ends. The sandbox reaches, and is
reached from, the appliance only through the relays it is given (:mod:`fedward.sandbox.relay`):
Unix sockets in directories of mode 0700.

``python -m fedward.sandbox.netns --relay LISTEN=TARGET ... -- COMMAND...`` is the sandbox: as root
it unshares the network and PID namespaces; otherwise it first enters a user namespace
that maps only its own user (unprivileged user namespaces must be allowed). It brings up
loopback, starts the relays, runs COMMAND and exits with COMMAND's exit code. SIGTERM ends
COMMAND and everything it started (graceful first); if the process that started the
sandbox dies, even by SIGKILL, every process inside dies at once.

``FEDWARD_FLOWER_ISOLATION=container`` skips the namespaces, for a container whose own
network namespace holds nothing but this service (the relays are kept, so everything else
is the same).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fedward.procs import descendants, die_with_parent
from fedward.sandbox.relay import Endpoint, RelayError, RelayThread

if TYPE_CHECKING:
    import psutil

__all__ = [
    "EXIT_NO_SANDBOX",
    "ISOLATION_ENV",
    "ISOLATION_MODES",
    "IsolationError",
    "Sandbox",
    "isolation_mode",
    "sandbox_failure",
]

ISOLATION_ENV = "FEDWARD_FLOWER_ISOLATION"
ISOLATION_MODES = ("namespace", "container")
EXIT_NO_SANDBOX = 78    # EX_CONFIG: the sandbox could not be made; its log line says why
_FAILURE_PREFIX = "fedward-sandbox: "

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
STOP_GRACE_S = 5.0

_HOW_TO_ALLOW = (
    "The Flower processes need a private network namespace, so that no other local account "
    "can reach their unauthenticated APIs. Run the service as root (CAP_SYS_ADMIN), or allow "
    "unprivileged user namespaces: `sysctl user.max_user_namespaces` must be above 0; on "
    "Ubuntu 23.10 and later also `sysctl kernel.apparmor_restrict_unprivileged_userns=0` "
    "(or an AppArmor profile that allows userns for the venv's python); in a systemd unit, "
    "RestrictNamespaces= must allow `user net pid`. In a container whose network namespace "
    "holds only this service (the appliance's images), set "
    f"{ISOLATION_ENV}=container instead.")


class IsolationError(RuntimeError):
    """The sandbox could not be made; the message names what is missing and what to do."""


def isolation_mode(value: str | None = None) -> str:
    """The isolation mode: ``value`` or ``$FEDWARD_FLOWER_ISOLATION``, default ``namespace``."""
    mode = (value if value is not None else os.environ.get(ISOLATION_ENV, "")).strip()
    mode = mode or "namespace"
    if mode not in ISOLATION_MODES:
        raise IsolationError(f"{ISOLATION_ENV}={mode!r} is not one of {list(ISOLATION_MODES)}")
    return mode


def sandbox_failure(log_path: Path, since: int = 0) -> str | None:
    """The reason a sandbox gave for not starting, read from its log after ``since``."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    lines = [ln[len(_FAILURE_PREFIX):] for ln in text.splitlines()
             if ln.startswith(_FAILURE_PREFIX)]
    return lines[-1] if lines else None


@dataclass
class Sandbox:
    """Starts and stops one sandboxed command (the parent's side).

    Args:
        command: the program to run inside, with its arguments.
        relays: (listen, target) endpoint specs; a ``unix:`` listener is served from inside
            (the outside connects in), a ``tcp:`` listener inside connects out.
        mode: ``namespace`` or ``container`` (see the module docstring).
    """

    command: list[str]
    relays: list[tuple[str, str]]
    mode: str = "namespace"
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def argv(self) -> list[str]:
        for spec in (spec for pair in self.relays for spec in pair):
            Endpoint.parse(spec)   # a bad endpoint fails here, with the reason
        out = [sys.executable, "-m", "fedward.sandbox.netns", "--mode", self.mode]
        for listen, target in self.relays:
            out += ["--relay", f"{listen}={target}"]
        return [*out, "--", *self.command]

    def start(self, *, env: dict[str, str], stdout: IO[bytes], new_session: bool = False
              ) -> subprocess.Popen[bytes]:
        self._proc = subprocess.Popen(
            self.argv(), env=env, stdout=stdout, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=new_session,
            preexec_fn=die_with_parent)
        return self._proc

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def stop(self, *, timeout: float = STOP_GRACE_S + 5.0) -> None:
        """End the command and everything it started; returns when all of it is gone.

        "Gone" is checked on every process of the tree, not only on the sandbox's own: the
        namespace's init may be reaped while the kernel is still tearing down the
        processes it killed on its way out, and a process that outlived its parent is no
        longer the parent's to wait for. Bounded: after ``timeout`` seconds (and as long
        again for the tree) whatever is left is killed and waited for a last few seconds.
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        tree = _Tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        tree.update()     # anything started while the signal was on its way
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree.update()
            proc.kill()       # its first process dies with it, and the namespace with that
            proc.wait(timeout=5)
            # Container mode has no PID namespace that the kernel empties: sweep.
            tree.kill()
        tree.wait_gone(timeout=timeout)


class _Tree:
    """The processes under a PID, as seen when last updated (psutil handles, so a PID the
    kernel hands to a new process after one of them ends is never mistaken for it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.procs: dict[int, psutil.Process] = {}
        self.update()

    def update(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self.procs.setdefault(child.pid, child)

    def _alive(self) -> list[psutil.Process]:
        import psutil

        out = []
        for p in self.procs.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def kill(self) -> None:
        import psutil

        for p in self._alive():
            try:
                p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def wait_gone(self, *, timeout: float) -> None:
        """Until none is left (zombies count as gone: they run nothing and hold nothing)."""
        deadline = time.monotonic() + timeout
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._alive():
            self.kill()
            end = time.monotonic() + 5.0
            while self._alive() and time.monotonic() < end:
                time.sleep(0.05)


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the sandbox process -------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pdeathsig_kill() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter_namespaces() -> str:
    """Unshare network and PID namespaces (and a user namespace when not root)."""
    uid, gid = os.geteuid(), os.getegid()
    problems = []
    if uid == 0:
        try:
            _unshare(_CLONE_NEWNET | _CLONE_NEWPID)
            return "root"
        except OSError as err:   # root without CAP_SYS_ADMIN (a container): try a user ns
            problems.append(f"unshare(net, pid) as root: {err.strerror}")
    try:
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWPID)
    except OSError as err:
        problems.append(f"unshare(user, net, pid): {err.strerror}")
        raise IsolationError("cannot create a private network namespace ("
                             + "; ".join(problems) + "). " + _HOW_TO_ALLOW) from None
    # Map only our own ids, to themselves: files keep their owner, no other id exists inside.
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    return "user"


def _loopback_up() -> None:
    """``ip link set lo up``, done with an ioctl while this process holds the capability."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


class _Init:
    """The sandbox's first process: runs the relays and the command, reaps, ends all."""

    def __init__(self, command: list[str], pairs: list[tuple[Endpoint, Endpoint]], *,
                 pid_namespace: bool, parent_gone: int | None) -> None:
        self.command = command
        self.pairs = pairs
        self.pid_namespace = pid_namespace
        self.parent_gone = parent_gone
        self.stopping_since: float | None = None

    def _signal_all(self, sig: int) -> None:
        if self.pid_namespace:
            _kill_quietly(-1, sig)    # in our own PID namespace: everyone but us
        else:
            for pid in descendants(os.getpid()):
                _kill_quietly(pid, sig)

    def _on_term(self, signum: int, _frame: object) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self._signal_all(signal.SIGTERM)

    def run(self) -> int:
        relays = RelayThread(self.pairs, name="sandbox-relays")
        try:
            relays.start()
        except (OSError, RelayError) as err:
            print(f"{_FAILURE_PREFIX}cannot open a relay: {err}", flush=True)
            return EXIT_NO_SANDBOX
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_term)
        # Without a PID namespace (container mode) nothing else ends the command when this
        # process is killed: it gets the parent-death signal, so a killed coordinator or
        # agent leaves no Flower process behind. (With relay threads running, the child
        # runs only a prctl through the already loaded libc: no import, no dlopen.)
        child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                 preexec_fn=None if self.pid_namespace else _pdeathsig_kill)
        code: int | None = None
        while True:
            # Reap everything: orphans of the command are re-parented to us.
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid, status = 0, 0
                if pid == 0:
                    break
                if pid == child.pid:
                    code = os.waitstatus_to_exitcode(status)
                    child.returncode = code     # Popen must not wait for it again
            if code is not None:
                # Gone: from now on a connection to a relay is refused, not half-served.
                relays.stop()
                break
            if self.stopping_since is not None and \
                    time.monotonic() - self.stopping_since > STOP_GRACE_S:
                self._signal_all(signal.SIGKILL)
            watch = [] if self.parent_gone is None else [self.parent_gone]
            for fd in select.select(watch, [], [], 0.1)[0]:
                if not os.read(fd, 1):
                    self._signal_all(signal.SIGKILL)   # the sandbox's parent died
                    return 137
        # The command ended: whatever it left behind ends too (gracefully first).
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    time.sleep(0.05)
            except ChildProcessError:
                break
        self._signal_all(signal.SIGKILL)
        return code if code >= 0 else 128 - code


def _run_in_namespaces(command: list[str], pairs: list[tuple[Endpoint, Endpoint]]) -> int:
    read_end, write_end = os.pipe()
    _enter_namespaces()
    # Entering a user namespace may clear the parent-death signal: set it again.
    die_with_parent()
    pid = os.fork()
    if pid == 0:   # PID 1 of the new namespace
        os.close(write_end)
        code = 70
        try:
            die_with_parent()
            _loopback_up()
            code = _Init(command, pairs, pid_namespace=True, parent_gone=read_end).run()
        except BaseException as err:   # report, then end the namespace
            print(f"{_FAILURE_PREFIX}{type(err).__name__}: {err}", flush=True)
        finally:
            os._exit(code)
    os.close(read_end)

    def forward(signum: int, _frame: object) -> None:
        _kill_quietly(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedward.sandbox.netns")
    parser.add_argument("--mode", choices=ISOLATION_MODES, default="namespace")
    parser.add_argument("--relay", action="append", default=[], metavar="LISTEN=TARGET")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    os.umask(0o077)
    try:
        pairs = []
        for spec in args.relay:
            listen, sep, target = spec.partition("=")
            if not sep:
                raise RelayError(f"{spec!r}: expected LISTEN=TARGET")
            pairs.append((Endpoint.parse(listen), Endpoint.parse(target)))
        if args.mode == "container":
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            return _Init(command, pairs, pid_namespace=False, parent_gone=None).run()
        return _run_in_namespaces(command, pairs)
    except (IsolationError, RelayError) as err:
        print(f"{_FAILURE_PREFIX}{err}", flush=True)
        return EXIT_NO_SANDBOX
    except OSError as err:
        print(f"{_FAILURE_PREFIX}{err} ({errno.errorcode.get(err.errno or 0, '?')}). "
              f"{_HOW_TO_ALLOW}", flush=True)
        return EXIT_NO_SANDBOX


if __name__ == "__main__":
    sys.exit(main())
