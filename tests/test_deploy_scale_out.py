"""
README's "Scaling out" as it runs: two tcpgreet instances behind one real
HAProxy that sends the PROXY v2 header and takes turns, as
deploy/haproxy.cfg does.  Both serve, their counts add up to the
connections made, and each one's --max-per-ip counts the real client.
"""

from __future__ import annotations

import re
import socket

from twisted.trial.unittest import SynchronousTestCase

from .haproxy import start_haproxy
from .helpers import start_server
from .test_health import metrics_base
from .workers.test_e2e import scrape

PROXIED = "haproxy:tcp:0:interface=127.0.0.1"
LOCAL = "tcp:0:interface=127.0.0.1"
# Every 127/8 address is loopback: clients HAProxy (127.0.0.1) relays.
LIMITED = "127.0.0.2"
# Where HAProxy's connections to the instances come from.
HAPROXY = "127.0.0.1"
GREETED = "tcpgreet_connections_greeted_total"
REFUSED = ("tcpgreet_connections_rejected_total", (("reason", "max-per-ip"),))
# Enough tries for round-robin to reach both instances several times over.
TRIES = 10


def connect(proxy, source: str) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), 10, source_address=(source, 0))


def read_all(s: socket.socket) -> bytes:
    return b"".join(iter(lambda: s.recv(65536), b""))


def others(count: int) -> list[str]:
    """
    Client addresses, one per connection: an instance may still hold a
    client's previous connection when its next one arrives (it waits for
    the end of the stream), which --max-per-ip 1 would refuse.
    """
    return [f"127.0.1.{n}" for n in range(1, count + 1)]


class ScaleOutTests(SynchronousTestCase):
    def setUp(self):
        # Each instance names itself and the client it sees, and, as README
        # has it, takes PROXY headers from HAProxy's address alone.
        self.instances = [
            start_server(self, "--listen", PROXIED, "--trusted-proxy", HAPROXY,
                         "--greeting", f"{n} {{peer_host}}",
                         "--max-per-ip", "1", "--timeout", "30", "--metrics", LOCAL)
            for n in (1, 2)]
        self.metrics = [f"{metrics_base(server)}/metrics" for server in self.instances]
        self.proxy = start_haproxy(
            self, [f"{s.host}:{s.port} send-proxy-v2" for s in self.instances],
            backend="    balance roundrobin")

    def counts(self, sample) -> list[float]:
        return [scrape(url)[sample] for url in self.metrics]

    def test_both_serve_and_the_counts_add_up(self):
        n = 20
        served = {1: 0, 2: 0}
        for source in others(n):
            with connect(self.proxy, source) as s:
                greeting = read_all(s)
            match = re.fullmatch(rb"([12]) (\S+)\r\n", greeting)
            self.assertIsNotNone(match, greeting)
            self.assertEqual(match[2].decode(), source)  # the client, not HAProxy
            served[int(match[1])] += 1
        self.assertGreater(min(served.values()), 0, served)
        counted = self.counts((GREETED, ()))
        self.assertEqual(sum(counted), n)
        self.assertEqual(counted, [served[1], served[2]])

    def test_max_per_ip_sees_the_real_client_through_either_instance(self):
        # A client that has sent something and stays open keeps its
        # connection: the instance waits for its end of the stream.
        held: dict[int, socket.socket] = {}
        for _ in range(TRIES):
            if len(held) == 2:
                break
            s = connect(self.proxy, LIMITED)
            self.addCleanup(s.close)
            s.sendall(b"hello\r\n")
            greeting = s.recv(100)
            if greeting:
                self.assertRegex(greeting, rb"^[12] 127\.0\.0\.2\r\n$")
                held[int(greeting[:1])] = s
        self.assertEqual(sorted(held), [1, 2], "one connection held on each instance")
        # Now 127.0.0.2 is at its limit on both: refused whichever it reaches.
        for _ in range(TRIES):
            with connect(self.proxy, LIMITED) as s:
                self.assertEqual(read_all(s), b"")
            if min(self.counts(REFUSED)) >= 1:
                break
        self.assertTrue(all(count >= 1 for count in self.counts(REFUSED)),
                        self.counts(REFUSED))
        for server in self.instances:
            server.wait_for(r"refused \d+ connection\(s\) .* by --max-per-ip "
                            rf"\(latest from {re.escape(LIMITED)}\)")
        # All of these came from HAProxy's 127.0.0.1, yet other clients are
        # their own addresses, on both instances.
        seen = set()
        for source in others(TRIES):
            with connect(self.proxy, source) as s:
                greeting = read_all(s)
            self.assertEqual(greeting[1:], f" {source}\r\n".encode())
            seen.add(greeting[:1])
            if len(seen) == 2:
                break
        self.assertEqual(seen, {b"1", b"2"})
