"""
Scale, measured against a real twistd with the benchmark's load generator
(the C one, built with the system compiler; the Python one without): no
error and no stalled connect at concurrency 200, and no memory that grows
with the number of connections served.  Bounded in time, loopback only.
"""

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import cpus
from bench import loadgen as load_generators

from .helpers import start_server
from .load import rss_kib

GREETING = b"Thank you for connecting\r\n"
MiB = 1024


class ScaleTests(SynchronousTestCase):
    def setUp(self):
        scratch = Path(tempfile.mkdtemp(prefix="tcpgreet-scale-"))
        self.generator = load_generators.choose("auto", scratch, lambda note: None)
        self.placement = cpus.plan(1)
        self.server = start_server(self, "--listen", "tcp:0:interface=127.0.0.1", "--quiet")

    def load(self, concurrency, seconds):
        return self.generator.run(self.server.port, concurrency, seconds, expected=GREETING,
                                  placement=self.placement)

    def test_concurrency_200_for_10_seconds(self):
        result = self.load(200, 10)
        self.assertGreater(result.greeted, 10000)
        self.assertEqual(result.errors, dict.fromkeys(result.errors, 0))
        # A connect that waits for a SYN retransmit takes a second or more:
        # the backlog overflowed.
        self.assertLess(result.max_ms, 1000)

    def serve(self, connections):
        """Keep serving at concurrency 50 until C{connections} are greeted."""
        greeted = 0
        for _ in range(200):  # bounded: 200 runs of a second at the most
            result = self.load(50, 1)
            self.assertEqual(sum(result.errors.values()), 0, result.errors)
            greeted += result.greeted
            if greeted >= connections:
                return greeted
        self.fail(f"only {greeted} connections in 200 s")

    def test_memory_does_not_grow_with_connections(self):
        pid = self.server.process.pid
        served = self.serve(10_000)
        after_10k = rss_kib(pid)
        served += self.serve(200_000 - served)
        after_200k = rss_kib(pid)
        self.assertGreaterEqual(served, 200_000)
        self.assertLess(after_200k - after_10k, 10 * MiB,
                        f"RSS {after_10k} KiB after 10,000, {after_200k} KiB after "
                        f"{served:,} connections")
