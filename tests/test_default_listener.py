"""
The default listener, with no --listen: one port on every IPv4 and every
IPv6 address, as two sockets (the IPv6 one IPv6-only), so that each client
is seen, templated, logged and limited as the address of its own family.

A real twistd serves it, on a port of the test's choosing
(L{helpers.default_command}); and once on 27679 itself, when nothing else
holds that port here.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import time
import urllib.request

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import confine
from .helpers import (
    Server,
    assert_fails_in_one_line,
    default_command,
    fetch,
    has_ipv6_loopback,
    run_default,
    unused_dual_port,
)
from .workers.test_e2e import READY

DEFAULT = b"Thank you for connecting\r\n"
ATTEMPTS = 5


def start_default(testcase, *args: str, preexec_fn=None) -> Server:
    """Start twistd's tcpgreet with no --listen, on a free port; wait until it listens."""
    for _ in range(ATTEMPTS):
        server = Server(command=default_command(unused_dual_port(), *args),
                        preexec_fn=preexec_fn)
        testcase.addCleanup(server.stop)
        try:
            return server.listening()
        except AssertionError as e:  # the port was taken meanwhile: another one
            if "address already in use" not in str(e):
                raise
    testcase.fail(f"no free port for the default listener in {ATTEMPTS} attempts")


def listeners_text(port: int) -> str:
    return f"listening on tcp:{port} (0.0.0.0:{port}), tcp6:{port} ([::]:{port}, IPv6 only)"


# struct tcp_info, up to tcpi_unacked: the segments the peer has not acknowledged.
_TCP_INFO_HEAD = struct.Struct("=B7xIIIII")


def _unacknowledged(skt: socket.socket) -> int:
    info = skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    return _TCP_INFO_HEAD.unpack_from(info)[-1]


def hold(testcase, server: Server, source: str, port: int) -> socket.socket:
    """
    A connection that has said something, so the server waits for its end.

    Its bytes must reach the server before the server greets it: a server
    that finds nothing to hear closes at once.  So the server is stopped
    while the client connects and speaks, until the server's kernel has
    acknowledged the bytes; on a busy machine the client could otherwise be
    slower than the greeting.
    """
    held = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
    testcase.addCleanup(held.close)
    held.settimeout(10)
    held.bind((source, 0))
    server.process.send_signal(signal.SIGSTOP)
    try:
        held.connect((source, port))
        held.sendall(b"hold\r\n")
        deadline = time.monotonic() + 10
        while _unacknowledged(held):
            if time.monotonic() > deadline:
                testcase.fail("the server's kernel never acknowledged the held client's bytes")
            time.sleep(0.001)  # polling the condition above, with its deadline
    finally:
        server.process.send_signal(signal.SIGCONT)
    held.recv(100)
    return held


class DefaultListenerTests(SynchronousTestCase):
    def setUp(self):
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback")

    def test_each_family_is_served_as_itself(self):
        server = start_default(self, "--greeting", "{peer_host}", "--max-per-ip", "1",
                               "--timeout", "30", "--metrics", "tcp:0:interface=127.0.0.1")
        port = server.port
        self.assertIn(listeners_text(port) + "; ", server.startup_line)
        metrics = server.wait_for(r"metrics at (http://[\d.:]+/metrics)").group(1)
        self.assertEqual(fetch("127.0.0.1", port), b"127.0.0.1\r\n")
        self.assertEqual(fetch("::1", port), b"::1\r\n")
        server.wait_for(r"\] 127\.0\.0\.1 port \d+: greeted, 11 bytes")
        server.wait_for(r"\] ::1 port \d+: greeted, 5 bytes")
        # --max-per-ip counts the IPv4 client under its own address, apart
        # from the IPv6 one.
        hold(self, server, "127.0.0.1", port)
        self.assertEqual(fetch("127.0.0.1", port), b"")
        server.wait_for(r"by --max-per-ip \(latest from 127\.0\.0\.1\)")
        self.assertEqual(fetch("::1", port), b"::1\r\n")
        with urllib.request.urlopen(metrics, timeout=10) as response:
            self.assertRegex(response.read().decode(), r"(?m)^tcpgreet_listeners 2\.0$")
        server.stop()
        self.assertNotIn("::ffff:", server.log)
        self.assertNotIn("Traceback", server.log)

    def test_workers_serve_both_families_each_steered(self):
        server = start_default(self, "--greeting", "{peer_host}", "--workers", "2",
                               "--max-per-ip", "1")
        port = server.port
        self.assertIn(listeners_text(port) + " with 2 workers; ",
                      server.startup_line)
        server.wait_for_count(READY, 2)
        # Steered by address mod 2 (IPv6 by its /64): 127.0.0.1 to worker 2,
        # 127.0.0.2 and ::1 (of ::/64) to worker 1.
        for source, worker in (("127.0.0.1", 2), ("::1", 1), ("127.0.0.2", 1)):
            host = "::1" if ":" in source else "127.0.0.1"
            self.assertEqual(fetch(host, port, source=source), f"{source}\r\n".encode())
            line = server.wait_for(rf"\] {re.escape(source)} port \d+: greeted").string
            self.assertIn(f"[worker {worker}, pid ", line)
        self.assertEqual(len(re.findall(r"\[worker \d, pid \d+\] \S+ port \d+: greeted",
                                        server.log)), 3)

    def test_without_ipv6_it_listens_on_ipv4_alone_and_says_so(self):
        if not confine.can_deny_ipv6():
            raise SkipTest("no seccomp filter for this machine's system calls")
        for workers in ((), ("--workers", "2")):
            server = start_default(self, *workers, preexec_fn=confine.without_ipv6)
            port = server.port
            # Said before the start-up line, which start_default waited for.
            self.assertIsNotNone(server.logged(
                r"no IPv6 here \(address family not supported by protocol\): "
                rf"the default listens on IPv4 alone, tcp:{port}$"), server.log)
            self.assertIn(f"listening on tcp:{port} (0.0.0.0:{port})" +
                          (" with 2 workers; " if workers else "; "), server.startup_line)
            self.assertEqual(fetch("127.0.0.1", port), DEFAULT)
            with self.assertRaises(ConnectionRefusedError):
                fetch("::1", port)
            server.stop()
            self.assertNotIn("Traceback", server.log)

    def test_a_port_in_use_on_either_family_is_one_line(self):
        for family, kind in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
            for workers in ((), ("--workers", "2")):
                port = unused_dual_port()
                with socket.socket(family) as taken:
                    if family == socket.AF_INET6:
                        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    taken.bind(("", port))
                    taken.listen()
                    result = run_default(port, *workers)
                assert_fails_in_one_line(
                    self, result,
                    rf"^tcpgreet: cannot listen on '{kind}:{port}': address already in use$")


def port_27679_is_free() -> str | None:
    """Why the real default cannot run here, or L{None}."""
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(("", 27679))
            except OSError as e:
                return f"port 27679 is not free here on {family.name}: {e.strerror}"
    return None


class RealDefaultTests(SynchronousTestCase):
    def test_twistd_tcpgreet_alone_greets_ipv4_and_ipv6_on_27679(self):
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback")
        busy = port_27679_is_free()
        if busy:
            raise SkipTest(busy)
        server = Server()
        self.addCleanup(server.stop)
        try:
            server.listening()
        except AssertionError as e:
            if "address already in use" in str(e):
                raise SkipTest("port 27679 was taken meanwhile") from None
            raise
        self.assertIn(listeners_text(27679), server.startup_line)
        self.assertEqual(fetch("127.0.0.1", 27679), DEFAULT)
        self.assertEqual(fetch("::1", 27679), DEFAULT)
        server.wait_for(r"\] 127\.0\.0\.1 port \d+: greeted, 26 bytes")
        server.wait_for(r"\] ::1 port \d+: greeted, 26 bytes")
