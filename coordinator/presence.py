"""Which sites are online: the last contact the site gateway saw from each site.

Every request a site sends through the gateway (its SuperNode polls for tasks every few
seconds, and sends a heartbeat at least every 30 s) passes the gateway's identity check.
The gateway tells :class:`Presence` about each such contact; it is kept in memory at once
and written to the ``site_presence`` table at most once per :data:`WRITE_EVERY_S` per site,
from a background thread, so that a busy fleet never turns into one database write per
request and never waits for the database. ``fedward-coordinator sites``, the REST API's
site listing (and later the dashboard and metrics) read it from the table:
:func:`is_online` says whether a last contact is recent enough to call the site online.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from coordinator.db import session_scope
from coordinator.models import SitePresence, utcnow

__all__ = [
    "ONLINE_WITHIN_S",
    "WRITE_EVERY_S",
    "Presence",
    "is_online",
    "last_seen",
]

log = logging.getLogger("fedward.coordinator.presence")

# A connected SuperNode asks for work every few seconds; a site counts as online while its
# last contact (as written, so at most WRITE_EVERY_S old) is within this window.
WRITE_EVERY_S: Final = 10.0
ONLINE_WITHIN_S: Final = 45.0


def is_online(seen_at: datetime | None, *, now: datetime | None = None) -> bool:
    """True when a site's last contact ``seen_at`` is recent enough to call it online."""
    if seen_at is None:
        return False
    now = now or utcnow()
    if seen_at.tzinfo is None:   # SQLite hands back naive UTC on some paths
        seen_at = seen_at.replace(tzinfo=UTC)
    return now - seen_at <= timedelta(seconds=ONLINE_WITHIN_S)


def last_seen(session: Session) -> dict[str, datetime]:
    """Site name -> last contact the gateway recorded (sites never seen are absent)."""
    return {row.site_name: row.last_seen_at for row in session.exec(select(SitePresence))}


class Presence:
    """Records sites' last contact, in memory at once and in the database throttled.

    Args:
        engine: the coordinator database.
        clock: wall-clock time (UTC), replaceable in tests.
        write_every_s: at most one database write per site per this many seconds.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow,
                 write_every_s: float = WRITE_EVERY_S) -> None:
        self.engine = engine
        self.clock = clock
        self.write_every_s = write_every_s
        self._lock = threading.Lock()
        self._seen: dict[str, datetime] = {}      # last contact, in memory
        self._written: dict[str, datetime] = {}   # what the table holds (as we wrote it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seen(self, site: str) -> None:
        """Note a contact from ``site`` now (cheap: no database access)."""
        with self._lock:
            self._seen[site] = self.clock()

    def snapshot(self) -> Mapping[str, datetime]:
        """Last contact per site as this process saw it (fresher than the table)."""
        with self._lock:
            return dict(self._seen)

    def flush(self, *, force: bool = False) -> int:
        """Write the contacts due (older than ``write_every_s`` in the table); returns how
        many rows were written. A database error is logged and retried at the next flush."""
        with self._lock:
            due = {site: at for site, at in self._seen.items()
                   if force or site not in self._written
                   or (at - self._written[site]).total_seconds() >= self.write_every_s}
        if not due:
            return 0
        try:
            with session_scope(self.engine) as session:
                rows = {r.site_name: r for r in session.exec(
                    select(SitePresence).where(SitePresence.site_name.in_(list(due))))}  # type: ignore[attr-defined]
                for site, at in due.items():
                    row = rows.get(site) or SitePresence(site_name=site, last_seen_at=at)
                    row.last_seen_at = at
                    session.add(row)
        except SQLAlchemyError as err:
            log.warning("could not record sites' last contact (%s); will retry",
                        type(err).__name__)
            return 0
        with self._lock:
            self._written.update(due)
        return len(due)

    def start(self) -> None:
        """Flush in a background thread every ``write_every_s`` until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="site-presence", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after one last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush(force=True)

    def _loop(self) -> None:
        while not self._stop.wait(min(1.0, self.write_every_s)):
            self.flush()
