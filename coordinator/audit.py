"""The coordinator's audit log: an append-only, hash-chained table.

Each entry stores its predecessor's hash (the first one stores :data:`GENESIS_HASH`) and
its own, computed by :mod:`fedward.hashchain` over ``{at, actor, action, subject, detail}``
(RFC 8785 canonical JSON; entries written before version 2 of the format keep the form they
were written in, which ``hash_version`` records). Changing, deleting or reordering any
entry breaks the chain at that entry or the next, which :func:`verify_chain` reports by id.
(Deleting the newest entries is not detectable from the table alone; anchor the latest hash
elsewhere for that.)

Keeping the chain linear with several writers (the API process and the ServerApp process):

* PostgreSQL: :func:`append_event` takes a transaction-scoped advisory lock
  (``pg_advisory_xact_lock``) before reading the last hash. It also works on an empty table,
  where ``SELECT ... FOR UPDATE`` on the last row would have nothing to lock.
* SQLite: engines from :func:`coordinator.db.make_engine` start every transaction with
  ``BEGIN IMMEDIATE``, so the transaction that reads the last hash already holds the
  database's only write lock. A session on any other SQLite engine is not safe here.
* Both: ``prev_hash`` is unique in the schema, so a fork is refused by the database even if
  the locking above were bypassed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import text
from sqlmodel import Session, col, select

from coordinator.models import AuditEvent, utcnow
from fedward.hashchain import (
    COORDINATOR_FORMAT,
    CURRENT_VERSION,
    GENESIS_HASH,
    canonical_json,
    normalise,
)

__all__ = ["AUDIT_LOCK_KEY", "GENESIS_HASH", "append_event", "event_hash", "verify_chain"]

# Arbitrary constant identifying "the audit chain" among PostgreSQL advisory locks.
AUDIT_LOCK_KEY: Final = 0x46_45_44_41_55_44_31  # "FEDAUD1"


def event_hash(
    *, prev_hash: str, at: datetime, actor: str, action: str, subject: str,
    detail: dict[str, Any], version: int = CURRENT_VERSION,
) -> str:
    """The hash of one audit entry.

    Args:
        prev_hash: Hash of the previous entry (:data:`GENESIS_HASH` for the first).
        at: When it happened (timezone-aware; hashed as its UTC ISO 8601 form).
        actor: Who did it (user name, or a component such as ``serverapp``).
        action: What was done, dotted (``run.created``).
        subject: What it was done to (``run:12``).
        detail: JSON-serialisable details.
        version: The chain format version the entry was written in.

    Returns:
        The SHA-256 hex digest.
    """
    return COORDINATOR_FORMAT.entry_hash(prev_hash=prev_hash, body=_body(
        at=at, actor=actor, action=action, subject=subject, detail=detail), version=version)


def _body(*, at: datetime, actor: str, action: str, subject: str,
          detail: dict[str, Any]) -> dict[str, Any]:
    return {"at": _iso(at), "actor": actor, "action": action, "subject": subject,
            "detail": detail}


def _iso(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return at.astimezone(UTC).isoformat()


def _lock_chain(session: Session) -> None:
    """Serialise appenders (see the module docstring for the SQLite case)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK_KEY})


def append_event(
    session: Session, *, actor: str, action: str, subject: str, detail: dict[str, Any]
) -> AuditEvent:
    """Append one entry to the audit log, in the session's current transaction.

    The caller commits (with the change the entry records, so both or neither persist).
    Until then other appenders wait: keep the rest of the transaction short.

    Args:
        session: Session on an engine from :func:`coordinator.db.make_engine`.
        actor: Who did it (user name, or a component such as ``serverapp``).
        action: What was done, dotted (``run.created``).
        subject: What it was done to (``run:12``).
        detail: JSON-serialisable details (no NaN or infinity).

    Returns:
        The new entry, flushed (its ``id`` is set).
    """
    _lock_chain(session)
    last = session.exec(
        select(AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)
    ).first()
    prev_hash = last if last is not None else GENESIS_HASH
    at = utcnow()
    stored = normalise(detail)  # what is hashed is exactly what is stored
    event = AuditEvent(
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        detail_json=canonical_json(stored).decode("utf-8"),
        prev_hash=prev_hash,
        hash=event_hash(
            prev_hash=prev_hash, at=at, actor=actor, action=action, subject=subject,
            detail=stored,
        ),
        hash_version=CURRENT_VERSION,
    )
    session.add(event)
    session.flush()
    return event


def verify_chain(session: Session) -> int | None:
    """Check the whole audit log.

    Args:
        session: Any session on the coordinator database.

    Returns:
        The id of the first entry whose stored hash, predecessor link or detail does not
        check out, or ``None`` if the chain is intact.
    """
    expected_prev, previous_version = GENESIS_HASH, 1
    rows = session.exec(
        select(AuditEvent).order_by(col(AuditEvent.id)).execution_options(yield_per=500)
    )
    for event in rows:
        assert event.id is not None
        try:
            detail = json.loads(event.detail_json)
        except ValueError:
            return event.id
        if not isinstance(detail, dict):
            return event.id
        problem = COORDINATOR_FORMAT.check_link(
            expected_prev=expected_prev, prev_hash=event.prev_hash, stored_hash=event.hash,
            body=_body(at=event.at, actor=event.actor, action=event.action,
                       subject=event.subject, detail=detail),
            version=event.hash_version, previous_version=previous_version)
        if problem is not None:
            return event.id
        expected_prev, previous_version = event.hash, event.hash_version
    return None
