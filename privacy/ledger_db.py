"""The privacy ledger's SQLite file: schema, transactions, decoding, and the JSON migration.

:class:`privacy.ledger.PrivacyLedger` is the interface; this module is its storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from fedward.files import FileLock
from privacy.accounting import compose_mechanisms
from privacy.ledger_migrate import LegacyFormatError, LegacyRun, read_legacy_ledger
from privacy.ledger_types import (
    PURPOSES,
    Entry,
    EntryState,
    Purpose,
    RoundRecord,
    RunLedger,
    Snapshot,
)
from privacy.mechanisms import (
    DpSgd,
    Mechanism,
    MechanismFormatError,
    UnknownMechanismType,
    decode_mechanism,
)

__all__ = [
    "PURPOSES",
    "SCHEMA_VERSION",
    "EntryState",
    "LedgerCorruptError",
    "Purpose",
    "UnknownMechanismError",
    "UnknownRunError",
]

SCHEMA_VERSION: Final = 1

# STRICT tables: SQLite refuses a value of the wrong type instead of storing it.
_SCHEMA: Final = (
    """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT""",
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY CHECK (length(run_id) > 0),
        project TEXT NOT NULL,
        epsilon_budget REAL NOT NULL CHECK (epsilon_budget > 0),
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        noise_multiplier REAL CHECK (noise_multiplier > 0),
        sample_rate REAL CHECK (sample_rate > 0 AND sample_rate <= 1),
        opened_at TEXT NOT NULL) STRICT""",
    """CREATE TABLE entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES runs (run_id),
        project TEXT NOT NULL,
        purpose TEXT NOT NULL,
        key TEXT NOT NULL,
        round INTEGER,
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        mechanism TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('reserved', 'charged')),
        epsilon_after REAL NOT NULL,
        reserved_at TEXT NOT NULL,
        charged_at TEXT,
        UNIQUE (run_id, purpose, key)) STRICT""",
)


def now() -> str:
    """The current time, ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat()


class LedgerCorruptError(Exception):
    """The ledger exists but cannot be trusted; nothing was read from it or written."""

    def __init__(self, path: Path, problems: list[str], *, advice: str | None = None) -> None:
        self.path = path
        self.problems = problems
        super().__init__(
            f"privacy ledger {path} is unreadable or damaged: {'; '.join(problems)}. "
            f"Training is blocked until it is fixed. " + (advice or (
                "Restore the file from the site's backup (then restart the site agent); "
                "do NOT delete it or reset it, since that would forget epsilon that has "
                "already been spent.")))


class UnknownMechanismError(LedgerCorruptError):
    """An entry records a mechanism this version cannot account (a newer one wrote it).

    Attributes:
        unknown: ``(entry id, run id, purpose, type name)`` of each such entry.
    """

    def __init__(self, path: Path, unknown: list[tuple[int, str, str, object]]) -> None:
        self.unknown = unknown
        names = [f"entry {i} (run {run!r}, {purpose}) records mechanism type {kind!r}"
                 for i, run, purpose, kind in unknown]
        super().__init__(path, names, advice=(
            "This version of Fedward cannot account it, so the site refuses to train rather "
            "than leave it out. Run the Fedward version that wrote it (upgrade the site "
            "agent); do NOT delete the entry, since that would forget epsilon already "
            "spent."))


class UnknownRunError(LookupError):
    """The ledger has no row for this run id (it was never opened with ``open_run``)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened and closed explicitly below.
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    con.execute("PRAGMA busy_timeout = 30000")
    con.execute("PRAGMA foreign_keys = ON")
    # Every commit reaches the disk before a reservation is reported (power loss included).
    con.execute("PRAGMA synchronous = FULL")
    return con


def _mechanism_text(mechanism: Mechanism) -> str:
    return json.dumps(mechanism.to_dict(), sort_keys=True, allow_nan=False)


class _Tx:
    """One write transaction (``BEGIN IMMEDIATE``) and the ledger as it read at its start."""

    def __init__(self, con: sqlite3.Connection, snapshot: Snapshot) -> None:
        self.con = con
        self.snapshot = snapshot

    def insert(self, *, run: RunLedger, purpose: Purpose, key: str, mechanism: Mechanism,
               epsilon_after: float) -> Entry:
        at = now()
        number = int(key) if purpose == "round" else None
        cur = self.con.execute(
            "INSERT INTO entries (run_id, project, purpose, key, round, delta, mechanism,"
            " state, epsilon_after, reserved_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?)",
            (run.run_id, run.project, purpose, key, number, run.delta,
             _mechanism_text(mechanism), float(epsilon_after), at))
        assert cur.lastrowid is not None
        return Entry(id=cur.lastrowid, run_id=run.run_id, project=run.project,
                     purpose=purpose, key=key, round=number, delta=run.delta,
                     mechanism=mechanism, state="reserved",
                     epsilon_after=float(epsilon_after), reserved_at=at, charged_at=None)

    def mark_charged(self, entry: Entry) -> Entry:
        if entry.state == "charged":
            return entry
        at = now()
        self.con.execute("UPDATE entries SET state = 'charged', charged_at = ? WHERE id = ?",
                         (at, entry.id))
        return Entry(**{**entry.__dict__, "state": "charged", "charged_at": at})


class _Store:
    """The SQLite file of one ledger and the JSON ledger it may migrate from."""

    def __init__(self, path: Path, legacy: Path) -> None:
        self.path = path
        self.legacy = legacy
        # Creation and migration only: every other change is a SQLite transaction.
        self._lock = FileLock(path.with_name(path.name + ".lock"))

    # -- reading -------------------------------------------------------------------------

    def read(self) -> Snapshot:
        if not self._ready(create=False):
            return Snapshot(runs=MappingProxyType({}), entries=())
        with self._guard():
            con = _connect(self.path)
            try:
                con.execute("BEGIN")
                snap = self._decode(con)
                con.execute("COMMIT")
                return snap
            finally:
                con.close()

    def raw(self) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """(meta, every entry row as stored), nothing decoded: what an operator reads when
        an entry cannot be accounted."""
        if not self._ready(create=False):
            return {}, []
        with self._guard():
            con = _connect(self.path)
            con.row_factory = sqlite3.Row
            try:
                con.execute("BEGIN")
                meta = {str(r["key"]): str(r["value"]) for r in con.execute("SELECT * FROM meta")}
                rows = [dict(r) for r in con.execute("SELECT * FROM entries ORDER BY id")]
                con.execute("COMMIT")
                return meta, rows
            finally:
                con.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite's own errors as :class:`LedgerCorruptError`, except a busy database."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise
            raise LedgerCorruptError(self.path, [f"not a readable Fedward ledger ({exc})"]
                                     ) from exc
        except sqlite3.DatabaseError as exc:
            raise LedgerCorruptError(self.path, [f"not a readable SQLite file ({exc})"]
                                     ) from exc

    def _decode(self, con: sqlite3.Connection) -> Snapshot:
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise LedgerCorruptError(self.path, [
                f"schema version is {None if version is None else version[0]!r}, this "
                f"version of Fedward reads {SCHEMA_VERSION} (a newer version wrote it?)"])
        problems: list[str] = []
        unknown: list[tuple[int, str, str, object]] = []
        entries: list[Entry] = []
        runs_rows = {r[0]: r for r in con.execute(
            "SELECT run_id, project, epsilon_budget, delta, noise_multiplier, sample_rate "
            "FROM runs ORDER BY run_id")}
        for row in con.execute(
                "SELECT id, run_id, project, purpose, key, round, delta, mechanism, state, "
                "epsilon_after, reserved_at, charged_at FROM entries ORDER BY id"):
            entry_id, run_id, project, purpose, key, number, delta = row[:7]
            where = f"entry {entry_id} (run {run_id!r})"
            try:
                doc = json.loads(row[7])
                if not isinstance(doc, dict):
                    raise MechanismFormatError("the mechanism is not a JSON object")
                mechanism = decode_mechanism(doc)
            except UnknownMechanismType as exc:
                unknown.append((entry_id, run_id, purpose, exc.type_name))
                continue
            except (ValueError, TypeError) as exc:
                problems.append(f"{where}: {exc}")
                continue
            if purpose not in PURPOSES:
                problems.append(f"{where}: purpose {purpose!r} is unknown")
            elif (purpose == "round") != (number is not None) or (
                    number is not None and key != str(number)):
                problems.append(f"{where}: round {number!r} does not match key {key!r}")
            if run_id in runs_rows and runs_rows[run_id][1] != project:
                problems.append(f"{where}: project {project!r} is not its run's")
            entries.append(Entry(id=entry_id, run_id=run_id, project=project,
                                 purpose=purpose, key=key, round=number, delta=delta,
                                 mechanism=mechanism, state=row[8], epsilon_after=row[9],
                                 reserved_at=row[10], charged_at=row[11]))
        if unknown and not problems:
            raise UnknownMechanismError(self.path, unknown)
        if problems or unknown:
            raise LedgerCorruptError(self.path, problems + [
                f"entry {i} (run {r!r}) records unknown mechanism type {k!r}"
                for i, r, _, k in unknown])
        runs: dict[str, RunLedger] = {}
        for run_id, row in runs_rows.items():
            own = tuple(e for e in entries if e.run_id == run_id)
            rounds = {e.round: RoundRecord(
                round_number=e.round, status=e.state, epsilon_after=e.epsilon_after,
                steps=e.mechanism.steps if isinstance(e.mechanism, DpSgd) else 0, at=e.at)
                for e in sorted(own, key=lambda e: e.round or 0) if e.round is not None}
            runs[run_id] = RunLedger(run_id=run_id, project=row[1], epsilon_budget=row[2],
                                     delta=row[3], noise_multiplier=row[4],
                                     sample_rate=row[5], entries=own,
                                     rounds=MappingProxyType(rounds))
        return Snapshot(runs=MappingProxyType(runs), entries=tuple(entries))

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Tx]:
        """One write transaction; it commits when the block ends, else rolls back."""
        self._ready(create=True)
        with self._guard():
            con = _connect(self.path)
            try:
                con.execute("BEGIN IMMEDIATE")
                yield _Tx(con, self._decode(con))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            finally:
                con.close()

    def open_run(self, *, run_id: str, project: str, epsilon_budget: float, delta: float,
                 noise_multiplier: float | None, sample_rate: float | None) -> None:
        with self.writing() as tx:
            existing = tx.snapshot.runs.get(run_id)
            if existing is None:
                tx.con.execute(
                    "INSERT INTO runs (run_id, project, epsilon_budget, delta, "
                    "noise_multiplier, sample_rate, opened_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run_id, project, epsilon_budget, delta, noise_multiplier, sample_rate,
                     now()))
                return
            wanted: dict[str, Any] = {"project": project, "epsilon_budget": epsilon_budget,
                                      "delta": delta}
            if noise_multiplier is not None and existing.noise_multiplier is not None:
                wanted.update(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            differ = [f"{k}: ledger has {getattr(existing, k)!r}, got {v!r}"
                      for k, v in wanted.items() if getattr(existing, k) != v]
            if differ:
                raise ValueError(
                    f"run {run_id!r} is already in the privacy ledger with other parameters "
                    f"({'; '.join(differ)}); a run's noise and budget are fixed when it "
                    f"starts: launch a new run instead")
            if noise_multiplier is not None and existing.noise_multiplier is None:
                # The run disclosed statistics before its first round: its noise now.
                tx.con.execute("UPDATE runs SET noise_multiplier = ?, sample_rate = ? "
                               "WHERE run_id = ?", (noise_multiplier, sample_rate, run_id))

    # -- creation and migration ----------------------------------------------------------

    def _ready(self, *, create: bool) -> bool:
        """Whether the SQLite file exists, after migrating the JSON ledger if there is one
        (and creating an empty ledger if ``create``)."""
        if self.path.exists() and not self.legacy.exists():
            return True
        if not self.path.exists() and not self.legacy.exists() and not create:
            return False
        with self._lock:
            if self.legacy.exists():
                if self.path.exists():
                    self._retire_legacy()
                else:
                    self._migrate()
            elif not self.path.exists():
                self._build([])
        return True

    def _retire_legacy(self) -> None:
        """Both files exist: a migration was interrupted before the JSON was renamed, or an
        older Fedward wrote a JSON ledger after the migration."""
        digest = hashlib.sha256(self.legacy.read_bytes()).hexdigest()
        with self._guard():
            con = _connect(self.path)
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'migrated_from_sha256'"
                                  ).fetchone()
            finally:
                con.close()
        if row is None or row[0] != digest:
            raise LedgerCorruptError(self.legacy, [
                f"it is not the JSON ledger that {self.path.name} was migrated from (an older "
                f"Fedward agent wrote it after the migration?)"], advice=(
                f"Its epsilon is not in {self.path.name}, so the site refuses to train. Stop "
                f"every older site agent, then ask Fedward support to merge the two; do NOT "
                f"delete either file."))
        self._backup_legacy()

    def _backup_legacy(self) -> None:
        backup = self.legacy.with_name(self.legacy.name + ".migrated")
        n = 1
        while backup.exists():
            n += 1
            backup = self.legacy.with_name(f"{self.legacy.name}.migrated-{n}")
        os.replace(self.legacy, backup)
        _fsync_dir(self.legacy.parent)

    def _migrate(self) -> None:
        raw = self.legacy.read_bytes()
        try:
            runs = read_legacy_ledger(self.legacy)
        except LegacyFormatError as exc:
            raise LedgerCorruptError(self.legacy, exc.problems, advice=(
                f"It could not be migrated to {self.path.name}; nothing was changed and "
                f"the site refuses to train. Restore the JSON file from the site's backup "
                f"and restart the site agent; do NOT delete it, since that would forget "
                f"epsilon that has already been spent.")) from exc
        self._build(runs, meta={"migrated_from": self.legacy.name,
                                "migrated_from_sha256": hashlib.sha256(raw).hexdigest(),
                                "migrated_at": now()})
        self._backup_legacy()

    def _build(self, runs: list[LegacyRun], meta: dict[str, str] | None = None) -> None:
        """Write a complete ledger beside the final path and rename it into place: no
        reader ever sees a half-made file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            con = _connect(tmp)
            try:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    con.execute(statement)
                rows = {"schema_version": str(SCHEMA_VERSION), "created_at": now(),
                        **(meta or {})}
                con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(rows.items()))
                for run in runs:
                    _insert_legacy_run(con, run)
                con.execute("COMMIT")
            finally:
                con.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def _insert_legacy_run(con: sqlite3.Connection, run: LegacyRun) -> None:
    opened = min((r.at for r in run.rounds), default=now())
    con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.project, run.epsilon_budget, run.delta,
                 run.noise_multiplier, run.sample_rate, opened))
    charged: list[Mechanism] = []
    for r in run.rounds:
        charged.append(r.mechanism)
        # The run's figure after each round, composed again here: the stored figures were
        # Opacus PRV epsilons; every figure of this ledger comes from its own accountant.
        after = compose_mechanisms(charged, delta=run.delta).epsilon
        con.execute(
            "INSERT INTO entries (run_id, project, purpose, key, round, delta, mechanism, "
            "state, epsilon_after, reserved_at, charged_at) "
            "VALUES (?, ?, 'round', ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.project, str(r.number), r.number, run.delta,
             _mechanism_text(r.mechanism), "charged" if r.done else "reserved", after,
             r.at, r.at if r.done else None))
