"""
/healthz and /readyz on the --metrics endpoint: the pages, what "ready"
means for a greeter and for a supervisor of workers, and real HTTP
requests to a real twistd, before and during a drain.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from types import SimpleNamespace

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tcpgreet import health, tap

from .helpers import start_server
from .test_faults import MiB, greeting_file
from .workers.test_e2e import LOCAL, hold, start_workers


def probe(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """GET C{url}: the status and the body, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def metrics_base(server) -> str:
    """The http://HOST:PORT of a server's --metrics endpoint, from its log."""
    address = server.wait_for(r"metrics at http://([\d.]+:\d+)/metrics").group(1)
    return f"http://{address}"


def render(resource, request: DummyRequest) -> tuple[int, bytes]:
    body = resource.render(request)
    return request.responseCode or 200, body


class PageTests(SynchronousTestCase):
    def test_healthz(self):
        request = DummyRequest([b""])
        self.assertEqual(render(health.HealthPage(), request), (200, b"ok\n"))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Cache-Control"),
                         [b"no-store"])

    def test_readyz_says_why_not(self):
        reasons = [None, "stopping"]
        page = health.ReadyPage(lambda: reasons[0])
        self.assertEqual(render(page, DummyRequest([b""])), (200, b"ready\n"))
        reasons.pop(0)
        request = DummyRequest([b""])
        self.assertEqual(render(page, request), (503, b"not ready: stopping\n"))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Content-Type"),
                         [b"text/plain; charset=utf-8"])


class ReadinessTests(SynchronousTestCase):
    """What ready means, on services makeService built on a fake reactor."""

    def make(self, *args):
        top = tap.makeService(tap_options(*args), reactor=MemoryReactorClock())
        return top, next(iter(top))

    def test_greeter_ready_while_every_listener_listens(self):
        top, greeter = self.make("--listen", "tcp:1", "--listen", "tcp:2")
        top.privilegedStartService()
        top.startService()
        self.assertIsNone(health.greeter_unready(greeter))
        # A listener gone: not ready (it cannot happen while running today,
        # but it is what ready means).
        greeter.ports.pop()
        self.assertEqual(health.greeter_unready(greeter), "1 of 2 listener(s) not listening")
        top.stopService()
        self.assertEqual(health.greeter_unready(greeter), "stopping")

    def test_supervisor_ready_once_every_worker_is(self):
        _, supervisor = self.make("--workers", "2", "--listen", "tcp:0:interface=127.0.0.1")
        supervisor.privilegedStartService()
        for port in supervisor.ports:
            self.addCleanup(port.stopListening)
        # Running and listening, without starting real processes.
        supervisor.running = 1
        self.assertEqual(health.supervisor_unready(supervisor), "0 of 2 workers ready")
        # What the supervisor knows of each worker: when it said it was
        # ready, and whether it has exited since.
        first, second = (SimpleNamespace(served_since=None, exited=False) for _ in "12")
        supervisor.workers = {1: first, 2: second}
        first.served_since = 10.0
        self.assertEqual(health.supervisor_unready(supervisor), "1 of 2 workers ready")
        second.served_since = 11.0
        self.assertIsNone(health.supervisor_unready(supervisor))
        second.exited = True  # until its replacement is ready
        self.assertEqual(health.supervisor_unready(supervisor), "1 of 2 workers ready")
        supervisor.running = 0
        self.assertEqual(health.supervisor_unready(supervisor), "stopping")


def tap_options(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class Recording(Service):
    def __init__(self, name: str, stops: list, stopped: Deferred | None = None) -> None:
        self.name = name
        self._stops = stops
        self._stopped = stopped

    def stopService(self):
        super().stopService()
        self._stops.append(self.name)
        return self._stopped if self._stopped is not None else succeed(None)


class MetricsLastTests(SynchronousTestCase):
    def test_metrics_stop_once_the_rest_has_stopped(self):
        stops: list[str] = []
        draining = Deferred()
        top = health.MetricsLast()
        Recording("greeter", stops, draining).setServiceParent(top)
        Recording("metrics", stops).setServiceParent(top)
        Recording("control", stops).setServiceParent(top)
        done = top.stopService()
        self.assertEqual(stops, ["control", "greeter"])
        self.assertNoResult(done)
        draining.callback(None)
        self.assertEqual(stops, ["control", "greeter", "metrics"])
        self.successResultOf(done)

    def test_without_metrics_it_is_a_multiservice(self):
        stops: list[str] = []
        top = health.MetricsLast()
        Recording("greeter", stops).setServiceParent(top)
        self.successResultOf(top.stopService())
        self.assertEqual(stops, ["greeter"])

    def test_makeservice_builds_one(self):
        top = tap.makeService(tap_options("--metrics", "tcp:9127"),
                              reactor=MemoryReactorClock())
        self.assertIsInstance(top, health.MetricsLast)


class EndToEndTests(SynchronousTestCase):
    """A real twistd, asked over HTTP."""

    def test_ready_then_unready_for_the_whole_drain(self):
        path, expected = greeting_file(self, MiB)
        server = start_server(self, "--listen", LOCAL, "--greeting-file", path,
                              "--metrics", LOCAL, "--drain-timeout", "30")
        base = metrics_base(server)
        self.assertEqual(probe(f"{base}/healthz"), (200, "ok\n"))
        self.assertEqual(probe(f"{base}/readyz"), (200, "ready\n"))
        slow = hold(self, server)
        self.assertIsNotNone(slow)
        server.signal(signal.SIGTERM)
        server.wait_for(r"draining 1 connection")
        # The drain lasts as long as the client does not read: the metrics
        # endpoint is still up, and says so.
        self.assertEqual(probe(f"{base}/readyz"), (503, "not ready: stopping\n"))
        self.assertEqual(probe(f"{base}/healthz"), (200, "ok\n"))
        self.assertEqual(probe(f"{base}/metrics")[0], 200)
        self.assertEqual(b"".join(iter(lambda: slow.recv(MiB), b"")), expected)
        self.assertIn(server.process.wait(10), (0, -signal.SIGTERM))
        server.stop()
        self.assertIn("drained 1 connection", server.log)
        self.assertNotIn("Traceback", server.log)

    def test_an_unknown_path_is_not_found(self):
        server = start_server(self, "--listen", LOCAL, "--metrics", LOCAL)
        base = metrics_base(server)
        self.assertEqual(probe(f"{base}/readyz/x")[0], 404)
        self.assertEqual(probe(f"{base}/health")[0], 404)

    def test_workers_ready_once_all_are_then_unready_for_the_drain(self):
        path, expected = greeting_file(self, MiB)
        server = start_workers(self, "--listen", LOCAL, "--greeting-file", path,
                               "--metrics", LOCAL, "--drain-timeout", "30")
        base = metrics_base(server)
        # Both workers said they were ready; the supervisor knows it by then.
        self.assertEqual(probe(f"{base}/readyz"), (200, "ready\n"))
        slow = hold(self, server)
        self.assertIsNotNone(slow)
        server.signal(signal.SIGTERM)
        server.wait_for(r"\[worker \d, pid \d+\] draining 1 connection")
        self.assertEqual(probe(f"{base}/readyz"), (503, "not ready: stopping\n"))
        self.assertEqual(probe(f"{base}/healthz"), (200, "ok\n"))
        self.assertEqual(b"".join(iter(lambda: slow.recv(MiB), b"")), expected)
        self.assertEqual(server.process.wait(15), -signal.SIGTERM)
        server.stop()
        self.assertNotIn("Traceback", server.log)
