"""
tcpgreet scraped by a real Prometheus (Debian's package): the counts it
reads back through its query API are the connections made, and promtool
finds nothing to complain about in the page.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .helpers import Program, fetch, require_tool, start_server, unused_port, wait_until
from .test_health import metrics_base, probe

LOCAL = "tcp:0:interface=127.0.0.1"
DEFAULT = b"Thank you for connecting\r\n"
STARTUP_TIMEOUT = 30.0
# Scrapes come every second: a few of them, on a busy machine.
SCRAPE_TIMEOUT = 30.0

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: tcpgreet
    static_configs:
      - targets: ["{target}"]
"""


def api(base: str, path: str, **query: str):
    """The C{data} of a Prometheus API answer (which must be a success)."""
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


class Prometheus:
    def __init__(self, program: Program, base: str) -> None:
        self.program = program
        self.base = base

    def targets(self) -> list[dict]:
        return api(self.base, "targets")["activeTargets"]

    def value(self, query: str) -> float | None:
        """The value of an instant query with one result, or None if none."""
        result = api(self.base, "query", query=query)["result"]
        if not result:
            return None
        [sample] = result
        return float(sample["value"][1])


def start_prometheus(testcase, target: str) -> Prometheus:
    """
    Prometheus scraping C{target} (HOST:PORT) every second, with a storage
    of its own; once it answers that it is ready.
    """
    prometheus = require_tool(testcase, "prometheus")
    directory = Path(tempfile.mkdtemp(prefix="tcpgreet-prometheus-"))
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    config = directory / "prometheus.yml"
    config.write_text(CONFIG.format(target=target))
    # Prometheus cannot listen on port 0 and say where: take a free port,
    # and another if something takes it first.
    for _ in range(5):
        port = unused_port()
        program = Program([prometheus, f"--config.file={config}",
                           f"--storage.tsdb.path={directory / 'data'}",
                           f"--web.listen-address=127.0.0.1:{port}"])
        testcase.addCleanup(program.stop)
        try:
            program.wait_for(r"Server is ready to receive web requests|address already in use",
                             STARTUP_TIMEOUT)
        except AssertionError:
            program.stop()
            raise
        if "address already in use" not in program.log:
            break
        program.stop()
    else:
        raise AssertionError("no free port for Prometheus in 5 tries")
    return Prometheus(program, f"http://127.0.0.1:{port}")


class PrometheusTests(SynchronousTestCase):
    def test_reads_back_the_connections_made(self):
        server = start_server(self, "--listen", LOCAL, "--metrics", LOCAL, "--quiet")
        base = metrics_base(server)
        target = base.removeprefix("http://")
        prometheus = start_prometheus(self, target)
        [up] = wait_until(
            lambda: [t for t in prometheus.targets() if t["health"] == "up"],
            SCRAPE_TIMEOUT, "the first good scrape")
        self.assertEqual(up["labels"]["instance"], target)
        wait_until(lambda: prometheus.value("tcpgreet_connections_greeted_total") is not None,
                   SCRAPE_TIMEOUT, "the first sample stored")
        self.assertEqual(prometheus.value("tcpgreet_connections_greeted_total"), 0)
        n = 25
        for _ in range(n):
            self.assertEqual(fetch(server.host, server.port), DEFAULT)
        greeted = wait_until(
            lambda: (prometheus.value("tcpgreet_connections_greeted_total") or 0) >= n
            and prometheus.value("tcpgreet_connections_greeted_total"),
            SCRAPE_TIMEOUT, f"Prometheus to see {n} greetings")
        self.assertEqual(greeted, n)
        self.assertEqual(prometheus.value("tcpgreet_connections_accepted_total"), n)
        self.assertEqual(prometheus.value("tcpgreet_greeting_duration_seconds_count"), n)
        self.assertEqual(prometheus.value("tcpgreet_connections_open"), 0)
        self.assertEqual(prometheus.value(
            'tcpgreet_connections_rejected_total{reason="max-per-ip"}'), 0)
        self.assertEqual(prometheus.value("up"), 1)
        # Prometheus does not scrape the health endpoints, but a Kubernetes
        # probe would hit them beside it: they answer whatever it does.
        self.assertEqual(probe(f"{base}/readyz"), (200, "ready\n"))


class PromtoolTests(SynchronousTestCase):
    def check(self, page: bytes) -> subprocess.CompletedProcess:
        promtool = require_tool(self, "promtool")
        return subprocess.run([promtool, "check", "metrics"], input=page,
                              capture_output=True, timeout=30)

    def test_nothing_to_complain_about(self):
        server = start_server(self, "--listen", LOCAL, "--metrics", LOCAL, "--quiet")
        fetch(server.host, server.port)
        status, page = probe(f"{metrics_base(server)}/metrics")
        self.assertEqual(status, 200)
        result = self.check(page.encode())
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))

    def test_it_would_complain(self):
        # The control: how promtool reports a problem.
        result = self.check(b"# HELP foo A count.\n# TYPE foo counter\nfoo 1\n")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b'should have "_total" suffix', result.stdout + result.stderr)
