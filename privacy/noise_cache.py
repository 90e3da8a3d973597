"""A noise-multiplier answer kept on disk, so that a restarted site does not search again.

The search for a run's noise multiplier (:func:`privacy.dp.noise_multiplier_for_run`)
costs a few tenths of a CPU-second on a small site host, and the same question comes back at
every run with the same plan and after every restart. Its answer is a pure function of
``(accountant, epsilon, delta, sample_rate, steps)``, so the site keeps it in a JSON file.

The file is a hint, never trusted: an answer read from it is used only when the ledger's
own accountant puts the run at or below its epsilon with that noise (so a wrong or
tampered entry can never spend more privacy than planned) and puts it above its epsilon
with 2% less noise (so a stale or inflated entry cannot quietly cost utility). Anything
else, an unreadable file included, is a miss and the search runs as before.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Final

from fedward.files import atomic_write

__all__ = ["NoiseCache"]

log = logging.getLogger(__name__)

_FORMAT: Final = "fedward-noise-cache/1"
_MAX_ENTRIES: Final = 256
# A cached noise multiplier this much smaller must fail the budget, or the entry is not the
# search's answer (the search lands within 0.01 of epsilon, far less than 2% of the noise).
_MINIMALITY: Final = 0.98


def _key(accountant: str, epsilon: float, delta: float, sample_rate: float,
         steps: int) -> str:
    return f"{accountant}|{epsilon!r}|{delta!r}|{sample_rate!r}|{steps}"


class NoiseCache:
    """Noise multipliers by run plan, in one JSON file (written atomically, mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.info("noise cache %s unreadable (%s); searching again", self.path, err)
            return {}
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            return {}
        entries = raw.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {str(k): float(v) for k, v in entries.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and v > 0}

    def get(self, accountant: str, epsilon: float, delta: float, sample_rate: float,
            steps: int) -> float | None:
        """The stored noise multiplier for this plan if the ledger's accountant confirms
        it (see the module's docstring), else ``None``."""
        from privacy.accounting import compose_mechanisms
        from privacy.mechanisms import DpSgd

        with self._lock:
            sigma = self._read().get(_key(accountant, epsilon, delta, sample_rate, steps))
        if sigma is None:
            return None

        def spent(noise: float) -> float:
            return compose_mechanisms([DpSgd(noise, sample_rate, steps)], delta=delta).epsilon

        try:
            if spent(sigma) <= epsilon < spent(sigma * _MINIMALITY):
                return sigma
        except ValueError:
            pass
        log.warning("noise cache %s holds %.6g for a plan the ledger does not confirm; "
                    "searching again", self.path, sigma)
        return None

    def put(self, accountant: str, epsilon: float, delta: float, sample_rate: float,
            steps: int, sigma: float) -> None:
        """Store an answer; a file that cannot be written is logged and otherwise ignored
        (the cache only saves time)."""
        with self._lock:
            entries = self._read()
            entries.pop(_key(accountant, epsilon, delta, sample_rate, steps), None)
            entries[_key(accountant, epsilon, delta, sample_rate, steps)] = sigma
            kept = dict(list(entries.items())[-_MAX_ENTRIES:])
            try:
                atomic_write(self.path, json.dumps({"format": _FORMAT, "entries": kept},
                                                   indent=0, sort_keys=False))
            except OSError as err:
                log.info("noise cache %s not written (%s)", self.path, err)
