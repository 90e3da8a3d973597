"""Small helpers shared by tests."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A short temporary folder: AF_UNIX socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    try:
        yield path
    finally:
        if not os.environ.get("FEDWARD_TEST_KEEP"):  # set it to keep logs for a post-mortem
            shutil.rmtree(path, ignore_errors=True)


def wait_until(condition: Callable[[], T], *, timeout: float, what: str,
               interval: float = 0.2) -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    Fails the test naming ``what`` after ``timeout`` seconds (bounded, like every loop in a
    test). An assertion raised by ``condition`` ends the wait at once: a check that sees the
    awaited thing can no longer happen (a process died, a run failed) should say so there.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def no_warm_ups_left() -> None:
    """Wait for privacy warm-ups that earlier tests' trainers left running.

    The accountant's cache is shared by the whole test process: one finishing during a test
    that counts cache misses would count as that test's miss.
    """
    for thread in threading.enumerate():
        if thread.name == "privacy-warm-up":
            thread.join(timeout=120)
            assert not thread.is_alive(), "a privacy warm-up ran past two minutes"


@contextmanager
def served_app(app: Any, *, name: str) -> Iterator[int]:
    """Serve an ASGI app with a real uvicorn on a free 127.0.0.1 port; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, ws="none", log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=name)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def node_key(folder: Path) -> tuple[Path, str]:
    """A new site node key pair: the private key file (OpenSSH format, mode 0600, as the
    SuperNode reads it) in ``folder``, and the public key's OpenSSH text."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path = folder / "node_key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return path, public
