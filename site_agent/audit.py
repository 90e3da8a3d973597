"""The site's local audit log: append-only, one JSON object a line, hash-chained.

Hospital IT reads it to know what the site agent did on their behalf: every run seen,
approved, denied, refused or executed, and what left the site each round (bytes, array
shapes, metric names: sizes and names, never values), with the epsilon spent.

Entry format (``audit.log`` in the site's data directory, UTF-8, one entry per line)::

    {"action":"run-seen","at":"2025-01-31T09:12:03.123456+00:00",
     "detail":{"project":"oncology","run":"7",...},"hash":"<sha256 hex>",
     "prev_hash":"000...000","seq":1,"v":2}

``prev_hash`` is the previous entry's ``hash`` (64 zeros for the first); ``hash`` is
SHA-256 of ``prev_hash`` followed by the RFC 8785 canonical JSON of the entry without its
two hashes (:mod:`fedward.hashchain`, the same chain as the coordinator's audit table).
``seq`` counts from 1 with no gaps. Entries written before format version 2 have no ``v``
and keep verifying in the form they were written in (the canonical JSON of the entry with
``prev_hash`` and without ``hash``, sorted keys, ASCII); an entry without ``v`` after one
with it breaks the chain. Editing, deleting, inserting or reordering an entry
breaks the chain at that entry, and :func:`verify_log` names it. The chain proves
consistency, not authorship: someone who can rewrite the whole file can recompute it, so
``fedward-site audit verify`` prints the head hash for IT to record elsewhere (a ticket, a
SIEM) and compare later; that also catches entries cut from the end.

Appends are serialised by a thread lock and an advisory ``flock`` on the file (the agent
and the CLI write to the same log), written with one ``write`` in ``O_APPEND`` mode and
fsynced. A crash in the middle of a write can leave a torn last line (no final newline):
:func:`verify_log` reports it, and the next append moves the torn bytes to
``audit.log.torn`` and records that in the chain (``audit-log-repaired``) before going on,
so the evidence is kept and the chain stays verifiable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fedward.files import fsync_dir
from fedward.hashchain import (
    CURRENT_VERSION,
    GENESIS_HASH,
    SITE_FORMAT,
    VERSION_KEY,
    LinkProblem,
    canonical_json,
    normalise,
)

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditLog",
    "AuditLogError",
    "LogVerdict",
    "entry_hash",
    "inspect_log",
    "read_entries",
    "verify_log",
]

_FIELDS: Final = frozenset({"seq", "at", "action", "detail", "prev_hash", "hash"})
_TAIL_CHUNK: Final = 64 * 1024


class AuditLogError(Exception):
    """The audit log cannot be appended to; the message says what to do.

    The site agent refuses tasks while its audit log cannot be written: nothing may leave
    the site without a record.
    """


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the audit log.

    Attributes:
        seq: position in the log, from 1, without gaps.
        at: when it was written, ISO 8601 in UTC.
        action: what happened (``run-seen``, ``round-trained``, ...).
        detail: names, sizes, ids and reasons; never data values.
        prev_hash: the previous entry's hash (:data:`GENESIS_HASH` for the first).
        hash: the entry's hash (see the module docstring).
        version: the chain format version it was written in (1: before RFC 8785).
    """

    seq: int
    at: str
    action: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str
    version: int = CURRENT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The entry as written to the log."""
        out = {"seq": self.seq, "at": self.at, "action": self.action,
               "detail": dict(self.detail), "prev_hash": self.prev_hash, "hash": self.hash}
        if self.version != 1:
            out[VERSION_KEY] = self.version
        return out


@dataclass(frozen=True)
class LogVerdict:
    """What :func:`inspect_log` found.

    Attributes:
        n_entries: entries that verified, from the first up to the first broken one.
        broken_seq: the position (1-based) of the first broken entry; None if intact.
        why: why that entry is broken (None if intact).
        head_hash: the hash of the last intact entry (:data:`GENESIS_HASH` if none).
    """

    n_entries: int
    broken_seq: int | None
    why: str | None
    head_hash: str

    @property
    def intact(self) -> bool:
        """True when every entry verified."""
        return self.broken_seq is None


def entry_hash(*, seq: int, at: str, action: str, detail: Mapping[str, Any],
               prev_hash: str, version: int = CURRENT_VERSION) -> str:
    """The hash an entry with these fields must carry (in format ``version``)."""
    body = {"seq": seq, "at": at, "action": action, "detail": dict(detail)}
    return SITE_FORMAT.entry_hash(prev_hash=prev_hash, body=body, version=version)


# What the log says about an entry that does not verify (the sequence was checked first).
_PROBLEMS: Final = {
    LinkProblem.UNKNOWN_VERSION: "its format version is not one this agent knows",
    LinkProblem.DOWNGRADE: ("it is in the old format after entries in the new one (an entry "
                            "was inserted or moved)"),
    LinkProblem.NOT_JSON: "it holds a value that is not valid JSON (NaN or infinity)",
    LinkProblem.HASH_MISMATCH: "its content does not match its hash (the entry was edited)",
}


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without their newline) and the torn remainder (b"" if none)."""
    if not data:
        return [], b""
    parts = data.split(b"\n")
    return parts[:-1], parts[-1]


def _check_line(raw: bytes, seq: int, prev_hash: str, previous_version: int
                ) -> tuple[AuditEntry | None, str | None]:
    """Parse and check one complete line: (entry, None) or (None, why it is broken)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not a valid JSON line"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    version = obj.get(VERSION_KEY, 1)
    fields = _FIELDS | {VERSION_KEY} if VERSION_KEY in obj else _FIELDS
    if set(obj) != fields:
        missing = sorted(fields - set(obj))
        extra = sorted(set(obj) - fields)
        return None, f"wrong fields (missing {missing}, unexpected {extra})"
    if not isinstance(version, int) or isinstance(version, bool) or (
            VERSION_KEY in obj and version == 1):
        return None, _PROBLEMS[LinkProblem.UNKNOWN_VERSION]
    if (not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool)
            or not isinstance(obj["at"], str) or not isinstance(obj["action"], str)
            or not isinstance(obj["detail"], dict) or not isinstance(obj["prev_hash"], str)
            or not isinstance(obj["hash"], str)):
        return None, "a field has the wrong type"
    if obj["seq"] != seq:
        return None, (f"sequence number is {obj['seq']}, expected {seq} (an entry was "
                      "deleted, inserted or moved)")
    problem = SITE_FORMAT.check_link(
        expected_prev=prev_hash, prev_hash=obj["prev_hash"], stored_hash=obj["hash"],
        body={"seq": obj["seq"], "at": obj["at"], "action": obj["action"],
              "detail": obj["detail"]},
        version=version, previous_version=previous_version)
    if problem is LinkProblem.BROKEN_LINK:
        return None, (f"it does not chain to entry {seq - 1} (an entry before it was "
                      "changed, deleted or moved)")
    if problem is not None:
        return None, _PROBLEMS[problem]
    return AuditEntry(seq=obj["seq"], at=obj["at"], action=obj["action"],
                      detail=obj["detail"], prev_hash=obj["prev_hash"], hash=obj["hash"],
                      version=version), None


def _walk(data: bytes) -> tuple[list[AuditEntry], LogVerdict]:
    lines, torn = _split_lines(data)
    entries: list[AuditEntry] = []
    prev, version = GENESIS_HASH, 1
    for i, raw in enumerate(lines, start=1):
        entry, why = _check_line(raw, i, prev, version)
        if entry is None:
            return entries, LogVerdict(n_entries=len(entries), broken_seq=i, why=why,
                                       head_hash=prev)
        entries.append(entry)
        prev, version = entry.hash, entry.version
    if torn:
        return entries, LogVerdict(
            n_entries=len(entries), broken_seq=len(lines) + 1,
            why=(f"incomplete last line of {len(torn)} bytes (a write was cut short, e.g. "
                 "by a crash or a full disk); the agent's next append moves it to "
                 "audit.log.torn and records that"),
            head_hash=prev)
    return entries, LogVerdict(n_entries=len(entries), broken_seq=None, why=None,
                               head_hash=prev)


def inspect_log(path: Path) -> LogVerdict:
    """Check the whole chain of the log at ``path``; a missing file is an empty, intact log."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        data = b""
    return _walk(data)[1]


def verify_log(path: Path) -> int | None:
    """The seq (1-based position) of the first broken entry of the log, or None if intact."""
    return inspect_log(path).broken_seq


def read_entries(path: Path) -> tuple[list[AuditEntry], LogVerdict]:
    """The entries that verify (up to the first broken one) and the verdict on the log."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        data = b""
    return _walk(data)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class AuditLog:
    """The site's audit log at ``path``; safe to share between threads and processes.

    Args:
        path: the log file (normally ``audit.log`` in the site's data directory). It is
            created with mode 0600 on the first append.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            created = not self._path.exists()
            fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if created:
                        fsync_dir(self._path.parent)
                    yield fd
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def append(self, action: str, detail: Mapping[str, Any]) -> AuditEntry:
        """Append one entry, fsynced, chained to the last one; returns it.

        Args:
            action: what happened, a short kebab-case word.
            detail: JSON-serialisable names, ids, sizes and reasons; never data values.

        Raises:
            AuditLogError: if the log's last entry cannot be read (the chain cannot go on),
                or the disk refuses the write.
            TypeError: if ``detail`` is not JSON-serialisable (a programming error).
        """
        if not action:
            raise ValueError("an audit action must be a non-empty string")
        body_detail = normalise(dict(detail))  # a copy, checked serialisable
        try:
            with self._locked() as fd:
                seq, prev = self._tail(fd)
                entry = self._write(fd, seq + 1, prev, action, body_detail)
        except OSError as err:
            raise AuditLogError(
                f"cannot write the audit log {self._path} ({err}); the site refuses tasks "
                "until it can: check the disk and the file's permissions"
            ) from None
        return entry

    def __call__(self, action: str, detail: Mapping[str, Any]) -> None:
        """Append, for use as the warm trainer's ``audit`` callback."""
        self.append(action, detail)

    def _write(self, fd: int, seq: int, prev: str, action: str,
               detail: dict[str, Any]) -> AuditEntry:
        at = _now()
        digest = entry_hash(seq=seq, at=at, action=action, detail=detail, prev_hash=prev)
        entry = AuditEntry(seq=seq, at=at, action=action, detail=detail, prev_hash=prev,
                           hash=digest)
        line = canonical_json(entry.to_dict()) + b"\n"
        # One write in O_APPEND mode: a concurrent reader never sees half an entry unless
        # the machine crashes mid-write (then verify names the torn line).
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
        return entry

    def _tail(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last entry; repairs a torn last line first."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS_HASH
        start = size
        chunk = b""
        # Read backwards until the chunk holds the last complete line whole: two newlines
        # (the one ending it and the one before it), or the start of the file.
        while True:
            start = max(0, start - _TAIL_CHUNK)
            chunk = os.pread(fd, size - start, start)
            if start == 0 or chunk.count(b"\n") >= 2:
                break
        if chunk.endswith(b"\n"):
            return self._last_of(chunk)
        cut = chunk.rfind(b"\n")
        torn = chunk[cut + 1:]
        self._set_aside(torn)
        os.ftruncate(fd, start + cut + 1)
        os.fsync(fd)
        last_seq, last_hash = self._last_of(chunk[:cut + 1])
        entry = self._write(fd, last_seq + 1, last_hash, "audit-log-repaired", {
            "torn_bytes": len(torn),
            "torn_sha256": hashlib.sha256(torn).hexdigest(),
            "moved_to": self._torn_path.name,
        })
        return entry.seq, entry.hash

    @property
    def _torn_path(self) -> Path:
        return self._path.with_name(self._path.name + ".torn")

    def _set_aside(self, torn: bytes) -> None:
        fd = os.open(self._torn_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, torn + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _last_of(self, chunk: bytes) -> tuple[int, str]:
        """(seq, hash) of the last complete line of ``chunk`` (which ends with a newline)."""
        lines = chunk.rstrip(b"\n").split(b"\n")
        last = lines[-1] if lines else b""
        if not last:
            return 0, GENESIS_HASH
        try:
            obj = json.loads(last.decode("utf-8"))
            seq, digest = obj["seq"], obj["hash"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise AuditLogError(
                f"the last entry of the audit log {self._path} cannot be read, so the chain "
                "cannot go on; run `fedward-site audit verify` and restore the file from "
                "backup (keep the damaged copy as evidence)"
            ) from None
        if not (isinstance(seq, int) and isinstance(digest, str)):
            raise AuditLogError(
                f"the last entry of the audit log {self._path} is malformed; run "
                "`fedward-site audit verify` and restore the file from backup"
            )
        return seq, digest
