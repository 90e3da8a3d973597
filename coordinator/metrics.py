"""The coordinator's Prometheus metrics.

Two kinds of figures:

* counted as things happen in this process: API request latency (by method, route template
  and status class: never a raw path, which could carry a name or an id), gateway
  connections, gateway refusals by kind, and each site's last contact through the gateway;
* read from the database at scrape time (:class:`DatabaseCollector`): runs by state, the
  round duration histogram and site failures by phase (rounds are recorded by the ServerApp
  processes, not here), sites by status and online, certificate expiry, and the drift alarm
  and PSI per site, release and feature (:mod:`coordinator.drift`). These survive a
  restart and agree with the API. A background thread re-reads them every ``cache_s``
  seconds (5), so a scrape never waits on the database, however busy the API keeps it.

They are served on a listener of their own (:mod:`fedward.metrics_http`, loopback by
default), never on the API port: a Prometheus server needs no API token to read them.
Label values are fixed names (states, phases, refusal kinds, route templates) and site
names; never a token, a secret, a path or a data value.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, case, func
from sqlmodel import Session, col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.gateway_limits import RefusalLog
from coordinator.models import RUN_STATUSES, Round, Run, Site, SiteCertificate
from coordinator.settings import Settings
from fedward.files import atomic_write
from fedward.metrics_http import MetricsListener, MetricsListenerError, read_token

__all__ = [
    "API_LATENCY",
    "DEFAULT_ONLINE_WINDOW_S",
    "GATEWAY_CONNECTIONS",
    "GATEWAY_REFUSALS",
    "METRIC_NAMES",
    "ROUND_BUCKETS",
    "ApiMetrics",
    "CountingRefusalLog",
    "DatabaseCollector",
    "build_registry",
    "note_site_contact",
    "site_contacts",
    "start_listener",
]

log = logging.getLogger("fedward.coordinator.metrics")

# A SuperNode polls the gateway every few seconds while connected; two minutes of silence
# means it is gone (Flower itself keeps a dropped node "active" for about a minute).
DEFAULT_ONLINE_WINDOW_S: Final = 120.0
ROUND_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_API_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# In-process figures: one set per process, registered in every registry built here.
API_LATENCY: Final = Histogram(
    "fedward_api_request_duration_seconds",
    "Time to answer a REST API request, by method, route template and status class.",
    ["method", "route", "status"], buckets=_API_BUCKETS, registry=None)
GATEWAY_CONNECTIONS: Final = Counter(
    "fedward_gateway_connections", "TCP connections accepted by the site gateway.",
    registry=None)
GATEWAY_REFUSALS: Final = Counter(
    "fedward_gateway_refusals", "Requests and connections the site gateway refused, by kind "
    "(tls-handshake, connection-limit, path, no-certificate, ...).", ["reason"], registry=None)

_contacts: dict[str, float] = {}
_contacts_lock = threading.Lock()


def note_site_contact(site: str | None, *, now: float | None = None) -> None:
    """Record that ``site`` was just served by the gateway (its certificate verified)."""
    if site:
        with _contacts_lock:
            _contacts[site] = time.time() if now is None else now


def site_contacts() -> dict[str, float]:
    """Site name -> time of its last contact through the gateway (Unix seconds)."""
    with _contacts_lock:
        return dict(_contacts)


class CountingRefusalLog(RefusalLog):
    """The gateway's refusal log, also counting each refusal by kind for Prometheus."""

    def refused(self, *, address: str, site: str | None, kind: str, reason: str) -> None:
        GATEWAY_REFUSALS.labels(reason=kind).inc()
        super().refused(address=address, site=site, kind=kind, reason=reason)


class ApiMetrics:
    """ASGI middleware timing every HTTP request into :data:`API_LATENCY`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            API_LATENCY.labels(method=scope.get("method", "?"), route=route,
                               status=f"{status // 100}xx").observe(time.perf_counter() - t0)


@dataclass(eq=False)   # registries key collectors by identity
class DatabaseCollector(Collector):
    """Figures read from the coordinator database (every ``cache_s`` seconds, or at every
    scrape when ``cache_s`` is 0).

    Attributes:
        engine: The coordinator database.
        online_window_s: A site counts as online if the gateway served it this recently.
        cache_s: Re-read the database this often in a background thread, and serve the
            last reading (0: read at every scrape, in the scrape).
    """

    engine: Engine
    online_window_s: float = DEFAULT_ONLINE_WINDOW_S
    cache_s: float = 5.0
    _cached: tuple[float, list[Metric]] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def collect(self) -> Iterator[Metric]:
        # With a cache, a background thread re-reads the database every cache_s seconds and
        # a scrape only renders the last reading: Prometheus scrapes less often than the
        # cache lasts, so reading on demand would put the database on every scrape's path.
        with self._lock:
            if self._cached is None or self.cache_s <= 0:
                self._refresh()
                if self.cache_s > 0:
                    threading.Thread(target=self._keep_fresh, name="metrics-db",
                                     daemon=True).start()
            cached = self._cached
        if cached is not None:
            yield from cached[1]

    def _refresh(self) -> None:
        try:
            self._cached = (time.monotonic(), self._read())
        except Exception as err:  # a busy or restarting database: say so, keep the last
            log.warning("metrics: cannot read the database: %s", err)

    def _keep_fresh(self) -> None:
        while True:
            time.sleep(self.cache_s)
            reading = None
            try:
                reading = (time.monotonic(), self._read())
            except Exception as err:
                log.warning("metrics: cannot read the database: %s", err)
            if reading is not None:
                with self._lock:
                    self._cached = reading

    def _read(self) -> list[Metric]:
        with Session(self.engine) as session:
            return [self._runs(session), self._rounds(session), self._failures(session),
                    *self._sites(session), *self._drift(session)]

    @staticmethod
    def _runs(session: Session) -> Metric:
        counts = dict(session.exec(select(Run.status, func.count()).group_by(Run.status)).all())
        runs = GaugeMetricFamily("fedward_runs", "Runs by state.", labels=["state"])
        for state in sorted(RUN_STATUSES | set(counts)):
            runs.add_metric([state], float(counts.get(state, 0)))
        return runs

    @staticmethod
    def _rounds(session: Session) -> Metric:
        seconds = col(Round.seconds)
        done = col(Round.finished_at).is_not(None) & seconds.is_not(None)
        columns: list[Any] = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
        columns += [func.coalesce(func.sum(case((seconds <= b, 1), else_=0)), 0)
                    for b in ROUND_BUCKETS]
        row = session.exec(select(*columns).where(done)).one()
        total, total_s, below = int(row[0]), float(row[1]), [int(v) for v in row[2:]]
        hist = HistogramMetricFamily(
            "fedward_round_duration_seconds", "Duration of finished rounds (every run).")
        hist.add_metric([], [(repr(b), float(n)) for b, n in zip(ROUND_BUCKETS, below,
                                                                 strict=True)]
                        + [("+Inf", float(total))], sum_value=total_s)
        return hist

    @staticmethod
    def _failures(session: Session) -> Metric:
        by_phase: dict[str, int] = {}
        rows = session.exec(select(Round.failed_sites_json)
                            .where(col(Round.failed_sites_json) != "[]")).all()
        for raw in rows:
            try:
                entries = json.loads(raw)
            except ValueError:
                continue
            for entry in entries if isinstance(entries, list) else []:
                phase = entry.get("phase") if isinstance(entry, dict) else None
                phase = phase if isinstance(phase, str) and phase.isascii() else "unknown"
                by_phase[phase[:32]] = by_phase.get(phase[:32], 0) + 1
        failures = CounterMetricFamily("fedward_site_failures",
                                       "Site failures in rounds, by phase.", labels=["phase"])
        for phase, n in sorted(by_phase.items()):
            failures.add_metric([phase], float(n))
        return failures

    @staticmethod
    def _drift(session: Session) -> list[Metric]:
        return _drift_metrics(session)

    def _sites(self, session: Session) -> list[Metric]:
        sites = session.exec(select(Site.name, Site.status)).all()
        by_status = GaugeMetricFamily("fedward_sites", "Sites by status.", labels=["status"])
        counts: dict[str, int] = {}
        for _, status in sites:
            counts[status] = counts.get(status, 0) + 1
        for status in sorted(counts | {"added": 0, "registered": 0, "revoked": 0}):
            by_status.add_metric([status], float(counts.get(status, 0)))
        contacts = site_contacts()
        cutoff = time.time() - self.online_window_s
        online = GaugeMetricFamily(
            "fedward_site_online", "1 if a registered site reached the gateway within the "
            "online window, else 0.", labels=["site"])
        last = GaugeMetricFamily(
            "fedward_site_last_contact_timestamp_seconds",
            "When the gateway last served the site (since this coordinator started).",
            labels=["site"])
        n_online = 0
        for name, status in sorted(sites):
            if status != "registered":
                continue
            seen = contacts.get(name)
            is_online = seen is not None and seen >= cutoff
            n_online += is_online
            online.add_metric([name], 1.0 if is_online else 0.0)
            if seen is not None:
                last.add_metric([name], seen)
        total_online = GaugeMetricFamily("fedward_sites_online",
                                         "Registered sites online now.", value=n_online)
        expiry = GaugeMetricFamily(
            "fedward_site_certificate_expiry_timestamp_seconds",
            "When each site's current certificate expires.", labels=["site"])
        current = session.exec(
            select(Site.name, func.max(SiteCertificate.not_after))
            .join(SiteCertificate, col(SiteCertificate.site_id) == col(Site.id))
            .where(col(SiteCertificate.revoked_at).is_(None),
                   col(SiteCertificate.superseded_by).is_(None),
                   col(Site.status) != "revoked")
            .group_by(Site.name)).all()
        for name, not_after in sorted(current):
            if not_after is not None:
                expiry.add_metric([name], _timestamp(not_after))
        return [by_status, total_online, online, last, expiry]


def _drift_metrics(session: Session) -> list[Metric]:
    """Per site, release and feature of each pair's newest drift report: 1 if the feature
    is in alarm, and its PSI (a score computed at the site, never a data value)."""
    from coordinator.drift import latest_reports

    alarm = GaugeMetricFamily(
        "fedward_drift_alarm", "1 when the feature is in drift alarm in the newest drift "
        "report of the site and release, else 0.", labels=["site", "release", "feature"])
    score = GaugeMetricFamily(
        "fedward_drift_psi", "Population stability index of the feature in the newest drift "
        "report of the site and release.", labels=["site", "release", "feature"])
    for row in latest_reports(session):
        alarmed = set(json.loads(row.alarm_features_json))
        for feature, figures in sorted(json.loads(row.features_json).items()):
            labels = [row.site_name, row.release_id, feature]
            alarm.add_metric(labels, 1.0 if feature in alarmed else 0.0)
            score.add_metric(labels, float(figures["psi"]))
    return [alarm, score]


def _timestamp(value: Any) -> float:
    """A database time as Unix seconds (SQLite's aggregate returns the stored text)."""
    if isinstance(value, str):
        from datetime import UTC, datetime

        parsed = datetime.fromisoformat(value)
        value = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return float(value.timestamp())


def build_registry(engine: Engine, *, online_window_s: float = DEFAULT_ONLINE_WINDOW_S,
                   cache_s: float = 5.0) -> CollectorRegistry:
    """A registry with every coordinator metric, the database ones read from ``engine``.

    Args:
        engine: The coordinator database.
        online_window_s: See :class:`DatabaseCollector`.
        cache_s: See :class:`DatabaseCollector`.

    Returns:
        The registry to serve (:class:`fedward.metrics_http.MetricsListener`).
    """
    registry = CollectorRegistry()
    for metric in (API_LATENCY, GATEWAY_CONNECTIONS, GATEWAY_REFUSALS):
        registry.register(metric)
    registry.register(DatabaseCollector(engine=engine, online_window_s=online_window_s,
                                        cache_s=cache_s))
    return registry


# How often the coordinator's process hands the GIL from a busy thread to a waiting one
# (Python's default: every 5 ms). A scrape hands it over a few times (accept, read, write),
# each time waiting behind the API's worker threads when the API is loaded; 1 ms keeps the
# scrape's p99 under load low without costing the API throughput (bench/metrics_scrape.py
# measures both settings in one run). `fedward-coordinator serve` sets it for its process.
SWITCH_INTERVAL_S: Final = 0.001

# Every metric family the coordinator exports (the alert rules and the dashboard may use
# only these; tests/test_metrics.py checks both against a real scrape).
METRIC_NAMES: Final = frozenset({
    "fedward_api_request_duration_seconds", "fedward_gateway_connections_total",
    "fedward_gateway_refusals_total", "fedward_runs", "fedward_round_duration_seconds",
    "fedward_site_failures_total", "fedward_sites", "fedward_sites_online",
    "fedward_site_online", "fedward_site_last_contact_timestamp_seconds",
    "fedward_site_certificate_expiry_timestamp_seconds", "fedward_drift_alarm",
    "fedward_drift_psi",
})


def start_listener(settings: Settings, engine: Engine) -> MetricsListener | None:
    """Serve the coordinator's metrics as configured; None when switched off or failed.

    A listener that cannot start (port taken, a non-loopback address without a token)
    is logged as an error and the coordinator runs on without metrics: scraping is
    secondary to training. The address bound is written to ``<home>/metrics.address``.

    Args:
        settings: ``metrics_host``, ``metrics_port`` (-1: off) and ``metrics_token_file``.
        engine: The coordinator database.

    Returns:
        The running listener, or None.
    """
    if settings.metrics_port < 0:
        return None
    try:
        token = (None if settings.metrics_token_file is None
                 else read_token(settings.metrics_token_file))
        listener = MetricsListener(registry=build_registry(engine), host=settings.metrics_host,
                                   port=settings.metrics_port, token=token)
        listener.start()
    except MetricsListenerError as err:
        log.error("%s; the coordinator runs without /metrics (settings: FEDWARD_METRICS_HOST, "
                  "FEDWARD_METRICS_PORT, FEDWARD_METRICS_TOKEN_FILE)", err)
        return None
    atomic_write(settings.home / "metrics.address", listener.address + "\n")
    log.info("Prometheus metrics on http://%s/metrics", listener.address)
    return listener
