"""What one client may hold at the site gateway, and how its refusals are logged.

The gateway counts every connection from the moment it is accepted, before the TLS
handshake: a client that never finishes its handshake holds a socket as surely as one that
idles afterwards. Until a client certificate is verified a connection counts against its
source address; once verified it counts against its site instead. The connections without a
certificate (enrollment) together may take only part of the total, so the rest stays free
for verified sites whatever a few hosts open.

Every refusal is logged with its reason and the client's address (and site, when known);
the log itself is rate-limited so that a flood of refusals cannot fill the disk.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ConnectionLimits", "LimitSettings", "RefusalLog", "Slot"]


@dataclass(frozen=True)
class LimitSettings:
    """How many connections the gateway holds, in all and per holder.

    Attributes:
        max_connections: Connections at once, all clients together.
        max_per_address: Connections from one source address in a TLS handshake, and
            (counted apart) connections from it without a client certificate.
        max_per_site: Connections of one verified site.
        reserved_for_sites: Connections that only verified sites may take; ``None`` means a
            quarter of ``max_connections``.
    """

    max_connections: int = 512
    max_per_address: int = 32
    max_per_site: int = 64
    reserved_for_sites: int | None = None

    @property
    def anonymous_cap(self) -> int:
        """The most anonymous connections at once, all addresses together."""
        reserved = (self.max_connections // 4 if self.reserved_for_sites is None
                    else self.reserved_for_sites)
        return max(0, self.max_connections - reserved)


@dataclass
class Slot:
    """One connection's place in the counts (see :class:`ConnectionLimits`)."""

    address: str
    state: str = "handshake"      # handshake, anonymous or site
    site: str | None = None


class ConnectionLimits:
    """Counts the connections being served; used only from the gateway's event loop.

    A connection is first *handshaking* (at most ``max_per_address`` per source address),
    then either verified (counted against its site) or anonymous (at most
    ``max_per_address`` per address, and :attr:`LimitSettings.anonymous_cap` all addresses
    together). Handshakes and idle anonymous connections are counted apart, and the
    anonymous cap applies once a site's certificate is known: a site connecting while
    others, even on its own address, hold every anonymous slot still gets in.
    """

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.handshaking: Counter[str] = Counter()   # by address
        self.anonymous: Counter[str] = Counter()     # by address
        self.sites: Counter[str] = Counter()         # verified, by site

    @property
    def total(self) -> int:
        """Connections held now."""
        return sum(self.handshaking.values()) + sum(self.anonymous.values()) + sum(
            self.sites.values())

    def admit(self, address: str) -> Slot | str:
        """Count a new connection from ``address``, before its TLS handshake.

        Returns:
            Its :class:`Slot` (pass it to :meth:`verified` or :meth:`anonymous_ok` after the
            handshake, and to :meth:`release` at the end), or why it is refused.
        """
        s = self.settings
        if self.total >= s.max_connections:
            return f"the gateway holds its maximum of {s.max_connections} connections"
        if self.handshaking[address] >= s.max_per_address:
            return (f"this address has {s.max_per_address} TLS handshakes under way, the "
                    "most it may")
        self.handshaking[address] += 1
        return Slot(address=address)

    def verified(self, slot: Slot, site: str) -> str | None:
        """Count a connection whose certificate names ``site`` against that site.

        Returns:
            ``None`` when the site has room, else why not.
        """
        if self.sites[site] >= self.settings.max_per_site:
            return (f"site {site!r} holds its maximum of {self.settings.max_per_site} "
                    "connections")
        self._leave(slot)
        slot.state, slot.site = "site", site
        self.sites[site] += 1
        return None

    def anonymous_ok(self, slot: Slot) -> str | None:
        """Let a connection without a client certificate stay, if the caps allow.

        Returns:
            ``None`` when it may stay, else why not.
        """
        s = self.settings
        if sum(self.anonymous.values()) >= s.anonymous_cap:
            return (f"{s.anonymous_cap} connections without a verified site certificate are "
                    "open; the rest are kept for enrolled sites")
        if self.anonymous[slot.address] >= s.max_per_address:
            return (f"this address holds its maximum of {s.max_per_address} connections "
                    "without a verified site certificate")
        self._leave(slot)
        slot.state = "anonymous"
        self.anonymous[slot.address] += 1
        return None

    def release(self, slot: Slot) -> None:
        """Free the slot of a connection that ends."""
        self._leave(slot)
        slot.state = "closed"

    def _leave(self, slot: Slot) -> None:
        counter, key = {"handshake": (self.handshaking, slot.address),
                        "anonymous": (self.anonymous, slot.address),
                        "site": (self.sites, slot.site or "")}.get(slot.state, (None, ""))
        if counter is not None:
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


class RefusalLog:
    """Log each refusal, at most ``per_window`` lines per ``window_s`` seconds.

    Refusals past the budget are counted; the next line logged after the window rolls over
    says how many were left out, by reason, so a flood shows up as one line, not millions.
    """

    def __init__(self, logger: logging.Logger, *, per_window: int = 60, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.per_window = per_window
        self.window_s = window_s
        self.clock = clock
        self._window_start = clock()
        self._logged = 0
        self._skipped: Counter[str] = Counter()

    def refused(self, *, address: str, site: str | None, kind: str, reason: str) -> None:
        """Record one refusal.

        Args:
            address: The client's source address.
            site: The site named in its verified certificate, if any.
            kind: A short, fixed name of the reason (``tls-handshake``, ``no-certificate``,
                ...), used to summarise the lines left out.
            reason: What was refused and why, for people. Never a secret.
        """
        now = self.clock()
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged >= self.per_window:
            self._skipped[kind] += 1
            return
        self._logged += 1
        who = address if site is None else f"{address} (site {site})"
        self.logger.warning("gateway refused %s [%s]: %s", who, kind, reason)

    def flush(self) -> None:
        """Log how many refusals were left out since the last summary, if any."""
        if not self._skipped:
            return
        total = sum(self._skipped.values())
        kinds = ", ".join(f"{k} {n}" for k, n in self._skipped.most_common())
        self.logger.warning("gateway: %d more refusals were not logged (at most %d lines per "
                            "%.0f s): %s", total, self.per_window, self.window_s, kinds)
        self._skipped.clear()
