"""
Prometheus metrics: the collector against the factory's counters, and a
real scrape of a real twistd before and after N connections.
"""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from tcpgreet import greeting, metrics
from tcpgreet.server import GreetFactory
from tcpgreet.stats import Stats

from .helpers import fetch, start_server
from .test_server import finish, open_connection


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def samples(text: str) -> dict:
    """Every sample of an exposition, as {(name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class CollectorTests(SynchronousTestCase):
    def setUp(self):
        self.factory = GreetFactory(greeting.from_text("hello"), quiet=True,
                                    reactor=MemoryReactorClock())
        collector = metrics.GreetCollector(
            lambda: self.factory.stats,
            lambda: {"open": self.factory.limits.open, "listeners": 2})
        self.collector = collector

    def read(self):
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(self.collector)
        return samples(generate_latest(registry).decode())

    def test_counts(self):
        for _ in range(3):
            protocol, transport = open_connection(self.factory)
            transport.flushed()
            finish(protocol)
        open_connection(self.factory)  # held open
        self.factory.refuse("max-per-ip", "192.0.2.1")
        got = self.read()
        self.assertEqual(got[("tcpgreet_connections_accepted_total", ())], 4)
        self.assertEqual(got[("tcpgreet_connections_greeted_total", ())], 3)
        self.assertEqual(got[("tcpgreet_greeting_bytes_total", ())], 21)
        self.assertEqual(got[("tcpgreet_connections_open", ())], 1)
        self.assertEqual(got[("tcpgreet_listeners", ())], 2)
        self.assertEqual(got[("tcpgreet_connections_rejected_total",
                              (("reason", "max-per-ip"),))], 1)
        self.assertEqual(got[("tcpgreet_connections_rejected_total",
                              (("reason", "max-connections"),))], 0)
        self.assertEqual(got[("tcpgreet_connections_rejected_total",
                              (("reason", "untrusted-proxy"),))], 0)
        self.assertEqual(got[("tcpgreet_connections_aborted_total",
                              (("reason", "timeout"),))], 0)
        self.assertEqual(got[("tcpgreet_greeting_duration_seconds_count", ())], 3)
        self.assertEqual(got[("tcpgreet_greeting_duration_seconds_bucket",
                              (("le", "+Inf"),))], 3)


class ScrapeTests(SynchronousTestCase):
    def test_counters_move_by_exactly_n(self):
        server = start_server(self, "--listen", "tcp:0:interface=127.0.0.1",
                              "--metrics", "tcp:0:interface=127.0.0.1", "--quiet")
        address = server.wait_for(r"metrics at http://([\d.]+:\d+)/metrics").group(1)
        url = f"http://{address}/metrics"
        before = samples(scrape_text(url))
        n = 37
        for _ in range(n):
            self.assertEqual(fetch(server.host, server.port), b"Thank you for connecting\r\n")
        after = samples(scrape_text(url))
        for name in ("tcpgreet_connections_accepted_total",
                     "tcpgreet_connections_greeted_total",
                     "tcpgreet_greeting_duration_seconds_count"):
            self.assertEqual(after[(name, ())] - before[(name, ())], n, name)
        self.assertEqual(after[("tcpgreet_greeting_bytes_total", ())]
                         - before[("tcpgreet_greeting_bytes_total", ())], 26 * n)
        self.assertEqual(after[("tcpgreet_connections_open", ())], 0)
        self.assertEqual(after[("tcpgreet_listeners", ())], 1)
        self.assertIn(("process_open_fds", ()), after)
        # The metrics site's port is quiet at start, as the greeting ports are.
        self.assertNotRegex(server.log, r"starting on \d+")


class RefreshTests(SynchronousTestCase):
    """With workers, a scrape first fetches their counters: the page waits."""

    def setUp(self):
        from prometheus_client import CollectorRegistry

        self.stats = Stats()
        self.refreshing = []
        registry = CollectorRegistry()
        registry.register(metrics.GreetCollector(
            lambda: self.stats, lambda: {"open": 0, "listeners": 1}))
        self.page = metrics.MetricsPage(registry, refresh=self.refresh)

    def refresh(self):
        d = Deferred()
        self.refreshing.append(d)
        return d

    def test_rendered_once_refreshed(self):
        request = DummyRequest([b""])
        self.assertEqual(self.page.render(request), NOT_DONE_YET)
        self.assertEqual(request.written, [])
        self.stats.accepted = 5  # what the refresh brought in
        self.refreshing.pop().callback(None)
        self.assertEqual(request.finished, 1)
        self.assertEqual(samples(b"".join(request.written).decode())[
            ("tcpgreet_connections_accepted_total", ())], 5)

    def test_a_client_gone_meanwhile_gets_nothing(self):
        request = DummyRequest([b""])
        self.page.render(request)
        request.processingFailed(Failure(ConnectionDone()))
        self.refreshing.pop().callback(None)
        self.assertEqual(request.written, [])
