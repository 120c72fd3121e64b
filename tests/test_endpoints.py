"""
Endpoint strings: the backlog default, one-line errors, and IPv6-only
listeners beside IPv4 ones.
"""

import errno
import socket
from unittest import skipUnless

from twisted.internet import defer, reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcpgreet import endpoints, greeting
from tcpgreet.endpoints import (
    EndpointError,
    ipv6_unavailable,
    server_endpoint,
    with_default_backlog,
)
from tcpgreet.server import GreetFactory

from .helpers import fetch, has_ipv6_loopback


class BacklogTests(SynchronousTestCase):
    def test_backlog_is_added_where_it_applies(self):
        cases = {
            "tcp:27679": "tcp:27679:backlog=1024",
            "tcp6:27679:interface=\\:\\:1": "tcp6:27679:interface=\\:\\:1:backlog=1024",
            "ssl:443:privateKey=k.pem": "ssl:443:privateKey=k.pem:backlog=1024",
            "unix:/run/g.sock": "unix:/run/g.sock:backlog=1024",
            "haproxy:tcp:80": "haproxy:tcp:80:backlog=1024",
        }
        for given, expected in cases.items():
            self.assertEqual(with_default_backlog(given), expected)

    def test_a_backlog_in_the_string_wins(self):
        for given in ("tcp:80:backlog=5", "haproxy:tcp:80:backlog=64",
                      "tcp:80:interface=127.0.0.1:backlog=3"):
            self.assertEqual(with_default_backlog(given), given)

    def test_types_without_a_backlog_are_left_alone(self):
        for given in ("systemd:domain=INET:index=0", "stdio:",
                      "haproxy:systemd:domain=INET:index=0"):
            self.assertEqual(with_default_backlog(given), given)

    def test_escaped_colons_do_not_split(self):
        self.assertEqual(with_default_backlog("unix:/tmp/a\\:b"), "unix:/tmp/a\\:b:backlog=1024")

    def test_the_backlog_reaches_the_listener(self):
        reactor = MemoryReactorClock()
        server_endpoint(reactor, "tcp:0").listen(object())
        self.assertEqual(reactor.tcpServers[0][2], 1024)


class ErrorTests(SynchronousTestCase):
    def assertError(self, description, expected):
        with self.assertRaises(EndpointError) as caught:
            server_endpoint(MemoryReactorClock(), description)
        self.assertEqual(str(caught.exception), f"listen endpoint {description!r}: {expected}")

    def test_unknown_type(self):
        self.assertError("tpc:80", "Unknown endpoint type: 'tpc'")

    def test_missing_port(self):
        self.assertError("tcp", "missing 1 required positional argument: 'port'")

    def test_unknown_keyword(self):
        self.assertError("tcp:80:colour=blue", "got an unexpected keyword argument 'colour'")

    def test_unescaped_ipv6_interface(self):
        self.assertError("tcp6:80:interface=::1",
                         "got multiple values for argument 'interface' "
                         "(escape the colons of an IPv6 address: interface=\\:\\:1)")

    def test_missing_key_file(self):
        self.assertError("ssl:443:privateKey=/nonexistent/key.pem",
                         "No such file or directory (/nonexistent/key.pem)")

    def test_no_inherited_socket(self):
        self.assertError("systemd:domain=INET:index=0", "no inherited socket at that index")


class IPv6OnlyTests(TestCase):
    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    @defer.inlineCallbacks
    def test_beside_ipv4_on_the_same_port_each_family_gets_its_own_clients(self):
        factory = GreetFactory(greeting.from_text("{peer_host}"), quiet=True)
        ipv4 = yield server_endpoint(reactor, "tcp:0").listen(factory)
        self.addCleanup(ipv4.stopListening)
        number = ipv4.getHost().port
        ipv6 = yield server_endpoint(reactor, f"tcp6:{number}", ipv6_only=True).listen(factory)
        self.addCleanup(ipv6.stopListening)
        self.assertEqual(ipv6.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)
        for host in ("127.0.0.1", "::1"):
            data = yield threads.deferToThread(fetch, host, number)
            self.assertEqual(data, f"{host}\r\n".encode())

    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    @defer.inlineCallbacks
    def test_as_given_an_ipv6_string_stays_as_twisted_binds_it(self):
        # tcp6 on every address takes IPv4 clients too, unless the system
        # says otherwise (net.ipv6.bindv6only): what a fresh socket has.
        listening = yield server_endpoint(reactor, "tcp6:0").listen(
            GreetFactory(greeting.from_text("x"), quiet=True))
        self.addCleanup(listening.stopListening)
        with socket.socket(socket.AF_INET6) as fresh:
            expected = fresh.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        self.assertEqual(
            listening.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), expected)


class IPv6AvailabilityTests(SynchronousTestCase):
    def without(self, code):
        def refuse(*args, **kwargs):
            raise OSError(code, "refused")
        self.patch(endpoints.socket, "socket", refuse)

    def test_a_kernel_or_process_without_ipv6(self):
        self.without(errno.EAFNOSUPPORT)
        self.assertEqual(ipv6_unavailable(), "address family not supported by protocol")
        self.without(errno.EADDRNOTAVAIL)
        self.assertEqual(ipv6_unavailable(), "cannot assign requested address")

    def test_other_failures_are_the_listeners_to_report(self):
        self.without(errno.EMFILE)
        self.assertIsNone(ipv6_unavailable())
