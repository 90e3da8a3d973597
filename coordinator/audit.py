"""The coordinator's audit log: an append-only, hash-chained table.

Each entry's hash is ``sha256(prev_hash + canonical_json({at, actor, action, subject,
detail}))``, and each entry stores its predecessor's hash (the first one stores
:data:`GENESIS_HASH`). Changing, deleting or reordering any entry breaks the chain at that
entry or the next, which :func:`verify_chain` reports by id. (Deleting the newest entries
is not detectable from the table alone; anchor the latest hash elsewhere for that.)

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

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import text
from sqlmodel import Session, col, select

from coordinator.models import AuditEvent, utcnow

__all__ = ["AUDIT_LOCK_KEY", "GENESIS_HASH", "append_event", "event_hash", "verify_chain"]

GENESIS_HASH: Final = "0" * 64
# Arbitrary constant identifying "the audit chain" among PostgreSQL advisory locks.
AUDIT_LOCK_KEY: Final = 0x46_45_44_41_55_44_31  # "FEDAUD1"


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def event_hash(
    *, prev_hash: str, at: datetime, actor: str, action: str, subject: str,
    detail: dict[str, Any],
) -> str:
    """The hash of one audit entry.

    Args:
        prev_hash: Hash of the previous entry (:data:`GENESIS_HASH` for the first).
        at: When it happened (timezone-aware; hashed as its UTC ISO 8601 form).
        actor: Who did it (user name, or a component such as ``serverapp``).
        action: What was done, dotted (``run.created``).
        subject: What it was done to (``run:12``).
        detail: JSON-serialisable details.

    Returns:
        The SHA-256 hex digest.
    """
    body = _canonical(
        {
            "at": _iso(at),
            "actor": actor,
            "action": action,
            "subject": subject,
            "detail": detail,
        }
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


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
    detail_json = _canonical(detail)
    event = AuditEvent(
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        detail_json=detail_json,
        prev_hash=prev_hash,
        hash=event_hash(
            prev_hash=prev_hash, at=at, actor=actor, action=action, subject=subject,
            detail=json.loads(detail_json),
        ),
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
    expected_prev = GENESIS_HASH
    rows = session.exec(
        select(AuditEvent).order_by(col(AuditEvent.id)).execution_options(yield_per=500)
    )
    for event in rows:
        assert event.id is not None
        if event.prev_hash != expected_prev:
            return event.id
        try:
            detail = json.loads(event.detail_json)
        except ValueError:
            return event.id
        if not isinstance(detail, dict):
            return event.id
        recomputed = event_hash(
            prev_hash=event.prev_hash, at=event.at, actor=event.actor, action=event.action,
            subject=event.subject, detail=detail,
        )
        if recomputed != event.hash:
            return event.id
        expected_prev = event.hash
    return None
