"""The site agent's Prometheus metrics, for the hospital's own monitoring.

Served by :class:`fedward.metrics_http.MetricsListener` when ``FEDWARD_SITE_METRICS`` asks
for it (``on``: 127.0.0.1:8602, or ``host:port``; off by default, so that the agent listens
on no TCP port unless its operator wants metrics; an address
other than loopback needs ``FEDWARD_SITE_METRICS_TOKEN_FILE``). Figures:

* per project, from the privacy ledger and the site policy: rounds trained, epsilon spent,
  the policy's cap and what is left of it;
* the data check (passed or failed), whether the route to the coordinator (the tunnel, or
  the direct connection) is up, and when the coordinator last answered.

Labels are project names only: never a token, a key, a path inside the site's data folder
or a data value. The ledger is read at scrape time, at most every ``cache_s`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedward.metrics_http import (
    MetricsListener,
    MetricsListenerError,
    parse_address,
    read_token,
)
from privacy import PrivacyLedger
from site_agent.policy import SitePolicy

__all__ = ["DEFAULT_ADDRESS", "METRIC_NAMES", "SiteMetrics", "SiteState", "start_listener"]

log = logging.getLogger("fedward.site.metrics")

DEFAULT_ADDRESS: Final = "127.0.0.1:8602"
METRIC_NAMES: Final = frozenset({
    "fedward_agent_rounds_trained", "fedward_agent_epsilon_spent",
    "fedward_agent_epsilon_budget", "fedward_agent_epsilon_left",
    "fedward_agent_data_check_passed", "fedward_agent_route_up",
    "fedward_agent_last_coordinator_contact_timestamp_seconds",
})


@dataclass
class SiteState:
    """What the agent knows about itself right now (set by the agent as it goes)."""

    data_check_passed: bool = False
    route_up: bool = False
    last_contact: float | None = None

    def contact(self) -> None:
        """The coordinator just answered."""
        self.last_contact = time.time()


@dataclass(eq=False)   # registries key collectors by identity
class SiteMetrics(Collector):
    """The site's figures, read at scrape time.

    Attributes:
        ledger: The site's privacy ledger file.
        policy: The site policy file.
        state: The agent's live state.
        cache_s: Reuse the ledger's figures for this long.
    """

    ledger: Path
    policy: Path
    state: SiteState
    cache_s: float = 10.0
    _cached: tuple[float, list[Metric]] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                try:
                    self._cached = (now, self._budget())
                except Exception as err:  # unreadable ledger or policy: the agent says why
                    log.warning("metrics: cannot read the privacy ledger or policy: %s",
                                type(err).__name__)
                    self._cached = (now, [])
            yield from self._cached[1]
        s = self.state
        yield GaugeMetricFamily("fedward_agent_data_check_passed",
                                "1 if the site's data passed its checks at start, else 0.",
                                value=float(s.data_check_passed))
        yield GaugeMetricFamily("fedward_agent_route_up", "1 while the SuperNode runs over "
                                "a route to the coordinator (tunnel or direct), else 0.",
                                value=float(s.route_up))
        last = GaugeMetricFamily("fedward_agent_last_coordinator_contact_timestamp_seconds",
                                 "When the coordinator last answered this agent.")
        if s.last_contact is not None:
            last.add_metric([], s.last_contact)
        yield last

    def _budget(self) -> list[Metric]:
        ledger = PrivacyLedger(self.ledger)
        try:
            caps = {name: p.epsilon_cap for name, p in SitePolicy.load(self.policy)
                    .projects.items()}
        except Exception:   # no or bad policy: the site refuses runs; still show the spend
            caps = {}
        runs = ledger.all_runs()
        projects = sorted(caps.keys() | {r.project for r in runs.values()})
        rounds = GaugeMetricFamily("fedward_agent_rounds_trained",
                                   "DP-SGD rounds trained to the end, per project.",
                                   labels=["project"])
        spent = GaugeMetricFamily("fedward_agent_epsilon_spent", "Epsilon spent at this "
                                  "site by the project's runs, composed.", labels=["project"])
        budget = GaugeMetricFamily("fedward_agent_epsilon_budget", "The site policy's "
                                   "epsilon cap for the project.", labels=["project"])
        left = GaugeMetricFamily("fedward_agent_epsilon_left", "Epsilon the project may "
                                 "still spend at this site.", labels=["project"])
        for project in projects:
            done = sum(1 for r in runs.values() if r.project == project
                       for rec in r.rounds.values() if rec.status == "charged")
            rounds.add_metric([project], float(done))
            eps = ledger.project_epsilon(project)
            spent.add_metric([project], eps)
            if project in caps:
                budget.add_metric([project], caps[project])
                left.add_metric([project], max(caps[project] - eps, 0.0))
        return [rounds, spent, budget, left]


def start_listener(*, ledger: Path, policy: Path, state: SiteState) -> MetricsListener | None:
    """Serve the site's metrics as ``FEDWARD_SITE_METRICS`` says; None if off or failed.

    A listener that cannot start is logged and the agent runs on: training does not
    depend on monitoring.
    """
    # Off unless asked for: by default the agent listens on no TCP port at all (the
    # operator's guide promises it; a local account cannot even read these figures).
    where = os.environ.get("FEDWARD_SITE_METRICS", "off").strip()
    if where.lower() == "off":
        return None
    if where.lower() == "on":
        where = DEFAULT_ADDRESS
    try:
        host, port = parse_address(where)
        token_file = os.environ.get("FEDWARD_SITE_METRICS_TOKEN_FILE")
        registry = CollectorRegistry()
        registry.register(SiteMetrics(ledger=ledger, policy=policy, state=state))
        listener = MetricsListener(registry=registry, host=host, port=port,
                                   token=read_token(Path(token_file)) if token_file else None)
        listener.start()
    except MetricsListenerError as err:
        log.error("%s; the agent runs without metrics (FEDWARD_SITE_METRICS=host:port or off)",
                  err)
        return None
    log.info("Prometheus metrics on http://%s/metrics", listener.address)
    return listener
