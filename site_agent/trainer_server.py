"""The warm trainer's Unix socket: :class:`TrainerServer` serves a
:class:`~site_agent.trainer.WarmTrainer` to the ClientApp relay, one task at a time.

The socket's folder is the agent's alone (0700) and the socket itself 0600; each
connection carries one framed task (``site_agent.ipc``) and its answer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from site_agent.ipc import IPCError, read_frame, write_frame
from site_agent.trainer import WarmTrainer

__all__ = ["TrainerServer"]

log = logging.getLogger("fedward.site.trainer")


class TrainerServer:
    """Serves a :class:`WarmTrainer` on a Unix socket, one task at a time."""

    def __init__(self, *, path: Path, trainer: WarmTrainer) -> None:
        self.path = path
        self.trainer = trainer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="trainer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(600)
            try:
                header, arrays = read_frame(conn)
                with self._lock:
                    t0 = time.perf_counter()
                    reply, out = self.trainer.handle(header, arrays)
                    log.info("task %s handled in %.3f s", header.get("kind"),
                             time.perf_counter() - t0)
                write_frame(conn, reply, out)
            except (IPCError, OSError) as err:
                log.warning("trainer connection dropped: %s", err)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.path.exists():
            self.path.unlink()
