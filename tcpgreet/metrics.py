"""
Prometheus metrics at C{/metrics}, with C{prometheus_client}.

The server counts in plain integers on its factory (L{tcpgreet.stats}),
whether or not metrics are served; a collector turns them into metric
families only when C{/metrics} is scraped, so serving metrics costs the
hot path nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tcpgreet.service import listen, listening_address
from tcpgreet.stats import Stats

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        PlatformCollector,
        ProcessCollector,
        generate_latest,
    )
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # pragma: no cover - exercised by the missing-extra test
    generate_latest = None  # type: ignore[assignment]  # the extra is missing: said at start

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = Logger()

MISSING = ("--metrics needs prometheus_client, which is not installed: install "
           "tcpgreet's metrics extra (pip install '.[metrics]' in tcpgreet's folder) "
           "or pip install prometheus_client")


class MetricsUnavailableError(RuntimeError):
    """prometheus_client is not installed."""


def _reasons(name: str, documentation: str, table: dict[str, int],
             reasons: tuple[str, ...]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    # Known reasons appear from the start at 0, so rate() sees the first one.
    for reason in sorted(set(reasons) | set(table)):
        family.add_metric([reason], table.get(reason, 0))
    return family


class GreetCollector:
    """
    Metric families read from L{Stats} at scrape time.

    @param stats: returns the current counters (of one process, or summed
        over several).
    @param gauges: returns the gauges: C{open} (connections now) and
        C{listeners}; with workers, also C{workers} (running now) and
        C{worker_restarts} (a counter).
    """

    REJECT_REASONS = ("max-connections", "max-per-ip", "rate-per-ip", "proxy-header",
                      "untrusted-proxy")
    ABORT_REASONS = ("timeout", "drain")

    def __init__(self, stats: Callable[[], Stats],
                 gauges: Callable[[], dict[str, int]]) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        gauges = self._gauges()
        yield CounterMetricFamily("tcpgreet_connections_accepted",
                                  "Connections admitted past every limit.", stats.accepted)
        yield CounterMetricFamily("tcpgreet_connections_greeted",
                                  "Connections whose greeting was written whole.",
                                  stats.greeted)
        yield _reasons("tcpgreet_connections_rejected",
                       "Connections refused without a greeting, by reason.",
                       stats.rejected, self.REJECT_REASONS)
        yield _reasons("tcpgreet_connections_aborted",
                       "Connections the server cut short, by reason.",
                       stats.aborted, self.ABORT_REASONS)
        yield CounterMetricFamily("tcpgreet_connections_lost",
                                  "Connections the client ended before its greeting "
                                  "was written.", stats.lost)
        yield GaugeMetricFamily("tcpgreet_connections_open", "Connections open now.",
                                gauges["open"])
        yield CounterMetricFamily("tcpgreet_greeting_bytes",
                                  "Greeting bytes written to greeted connections.",
                                  stats.bytes_sent)
        durations = stats.durations
        cumulative, buckets = 0, []
        for bound, count in zip((*durations.bounds, float("inf")), durations.counts,
                                strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily("tcpgreet_greeting_duration_seconds",
                                    "Seconds from accept to close of greeted connections.",
                                    buckets=buckets, sum_value=durations.sum)
        yield CounterMetricFamily("tcpgreet_reloads", "Greeting file reloads.",
                                  stats.reloads)
        yield CounterMetricFamily("tcpgreet_reload_failures",
                                  "Greeting file reloads that failed (the old greeting "
                                  "stayed).", stats.reload_failures)
        yield GaugeMetricFamily("tcpgreet_listeners", "Listening endpoints.",
                                gauges["listeners"])
        if "workers" in gauges:
            yield GaugeMetricFamily("tcpgreet_workers", "Worker processes running.",
                                    gauges["workers"])
            yield CounterMetricFamily("tcpgreet_worker_restarts",
                                      "Workers restarted after they exited unasked.",
                                      gauges["worker_restarts"])


def metrics_site(collector: GreetCollector,
                 refresh: Callable[[], Deferred[object]] | None = None) -> Site:
    """
    A web site that serves the collector (and process metrics) at /metrics.
    With C{refresh}, each scrape first waits for the Deferred it returns:
    the time to fetch figures that live in other processes.
    """
    if generate_latest is None:
        raise MetricsUnavailableError(MISSING)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry, refresh))
    site = _QuietSite(root)
    site.noisy = False
    return site


class MetricsPage(Resource):
    """
    The exposition, rendered on the reactor's thread: the counters it reads
    are changed by the reactor, so reading them from a thread pool (as
    C{prometheus_client}'s Twisted resource does) could see them mid-update.
    With C{refresh}, rendered once the Deferred it returns has fired.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry,
                 refresh: Callable[[], Deferred[object]] | None = None) -> None:
        super().__init__()
        self._registry = registry
        self._refresh = refresh

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        if self._refresh is None:
            return generate_latest(self._registry)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def render(_: object) -> None:
            if not gone:  # the client may have given up meanwhile
                request.write(generate_latest(self._registry))
                request.finish()

        # A refresh never fails: figures that cannot be had stay as they were.
        self._refresh().addCallback(render)
        return NOT_DONE_YET


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        """A scrape every few seconds is not news: no access log."""


class MetricsService(service.Service):
    """Serve Prometheus metrics on an endpoint of their own."""

    name = "metrics"

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, site: Site) -> None:
        self.description = description
        self.endpoint = endpoint
        self.site = site
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = listen(self.description, self.endpoint, self.site)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()
        if self.port is not None:  # listen raises rather than leave it unset
            log.info("metrics at http://{address}/metrics ({description})",
                     address=listening_address(self.port), description=self.description)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)
