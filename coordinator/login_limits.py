"""How often, and how many at once, password logins are tried.

A password check costs an argon2id hash on purpose (64 MiB, about 50 ms here): enough that
guessing is slow, and enough that a flood of logins is a lever on the whole coordinator
(its CPU, its memory, and the site gateway that shares the process). So:

* each submitted user name and each client address may fail only so many logins in a
  window; past that, logins from it (or for that name) are refused with 429 and a
  ``Retry-After`` until the oldest failure leaves the window. A login that succeeds does not
  count against either;
* at most :attr:`LoginLimits.concurrent` password checks run at once, the rest wait a
  moment and are then refused with 429 (busy), so memory and CPU stay bounded however many
  addresses a flood comes from.

The counts live in memory: a restart forgets them, which only ever favours a legitimate
user. User names are kept only in memory, never logged.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["LoginLimiter", "LoginLimits", "LoginThrottled"]


@dataclass(frozen=True)
class LoginLimits:
    """The login rate limits.

    Attributes:
        failures_per_user: Failed logins one user name may have in ``window_s``.
        failures_per_address: Failed logins one client address may have in ``window_s``.
        window_s: The window, in seconds.
        concurrent: Password checks at once, all clients together.
        busy_wait_s: How long a login waits for a free check before it is refused (429).
        max_tracked: Names and addresses remembered at most (the oldest go first).
    """

    failures_per_user: int = 5
    failures_per_address: int = 20
    window_s: float = 300.0
    concurrent: int = 2
    busy_wait_s: float = 5.0
    max_tracked: int = 10_000


class LoginThrottled(Exception):
    """A login refused before its password was checked; say when to try again."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(f"{reason}; try again in {self.retry_after_s} s")


class LoginLimiter:
    """Counts failed logins per user name and per address; bounds checks at once.

    Thread-safe: FastAPI runs the login routes in a thread pool.
    """

    def __init__(self, limits: LoginLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or LoginLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._checks = threading.BoundedSemaphore(self.limits.concurrent)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[str, str]:
        return f"user:{name.lower()}", f"addr:{address}"

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and now - times[0] >= self.limits.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def check(self, *, name: str, address: str) -> None:
        """Refuse (raise :class:`LoginThrottled`) a login the limits do not allow now."""
        lim = self.limits
        now = self._clock()
        user_key, addr_key = self._keys(name, address)
        with self._lock:
            for key, limit, who in ((addr_key, lim.failures_per_address, "this address"),
                                    (user_key, lim.failures_per_user, "this user name")):
                times = self._recent(key, now)
                if len(times) >= limit:
                    wait = times[0] + lim.window_s - now
                    raise LoginThrottled(
                        f"too many failed logins from {who} ({len(times)} in the last "
                        f"{lim.window_s / 60:.0f} min)", wait)

    def failed(self, *, name: str, address: str) -> None:
        """Count a failed login against its user name and address."""
        now = self._clock()
        with self._lock:
            for key in self._keys(name, address):
                times = self._failures.setdefault(key, deque())
                times.append(now)
                self._failures.move_to_end(key)
            while len(self._failures) > self.limits.max_tracked:
                self._failures.popitem(last=False)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the password checks allowed at once (429 when none frees up)."""
        if not self._checks.acquire(timeout=self.limits.busy_wait_s):
            raise LoginThrottled("the coordinator is busy checking other logins",
                                 self.limits.busy_wait_s)
        try:
            yield
        finally:
            self._checks.release()
