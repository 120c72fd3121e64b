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
        self.assertEqual(str(caught.exception), f"--listen {description!r}: {expected}")
        self.assertEqual(caught.exception.reason, expected)

    def test_the_option_is_named(self):
        with self.assertRaises(EndpointError) as caught:
            server_endpoint(MemoryReactorClock(), "tcp:x", option="--metrics")
        self.assertEqual(str(caught.exception), "--metrics 'tcp:x': port 'x' is not a number")

    def test_unknown_type(self):
        self.assertError("tpc:80", "unknown endpoint type 'tpc'; "
                                   "use tcp, tcp6, ssl, unix, systemd or haproxy")
        self.assertError("", "no endpoint type; use tcp, tcp6, ssl, unix, systemd or haproxy, "
                             "e.g. tcp:27679")

    def test_bad_port(self):
        for description, expected in [
            ("tcp", "the port is missing, e.g. tcp:27679"),
            ("tcp6:", "port '' is not a number"),
            ("tcp:http", "port 'http' is not a number"),
            ("tcp:port=http", "port 'http' is not a number"),
            ("ssl:65536:privateKey=k.pem", "port 65536 is not between 0 and 65535"),
            ("tcp:-1", "port -1 is not between 0 and 65535"),
        ]:
            self.assertError(description, expected)

    def test_an_argument_that_is_no_number_is_named(self):
        for description, expected in [
            ("tcp:80:backlog=lots", "backlog 'lots' is not a number"),
            ("tcp6:80:lots", "backlog 'lots' is not a number"),  # tcp6: port, backlog
            ("unix:/run/g.sock:mode=rw", "mode 'rw' is not an octal number"),
            ("systemd:domain=INET:index=first", "index 'first' is not a number"),
        ]:
            self.assertError(description, expected)

    def test_unknown_keyword(self):
        self.assertError("tcp:80:colour=blue", "tcp endpoints have no argument 'colour'")

    def test_missing_argument(self):
        self.assertError("systemd:index=0", "'domain' is missing (domain=INET or domain=INET6)")

    def test_too_many_arguments(self):
        self.assertError("tcp:80:127.0.0.1:5:6", "too many arguments")

    def test_unescaped_ipv6_interface(self):
        self.assertError("tcp6:80:interface=::1",
                         "'interface' is given twice "
                         "(escape the colons of an IPv6 address: interface=\\:\\:1)")
        self.assertError("tcp:80:interface=127.0.0.1:port=81", "'port' is given twice")

    def test_haproxy_without_an_endpoint(self):
        for description in ("haproxy", "haproxy:"):
            self.assertError(description,
                             "haproxy: needs the endpoint it wraps, e.g. haproxy:tcp:27679")

    def test_haproxy_names_the_whole_string(self):
        self.assertError("haproxy:tcp:x", "port 'x' is not a number")

    def test_missing_key_file(self):
        self.assertError("ssl:443:privateKey=/nonexistent/key.pem",
                         "No such file or directory (/nonexistent/key.pem)")

    def test_no_inherited_socket(self):
        self.assertError("systemd:domain=INET:index=0", "no inherited socket at that index")


class IPv6OnlyTests(TestCase):
    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    @defer.inlineCallbacks
    def test_beside_ipv4_on_the_same_port_each_family_gets_its_own_clients(self):
        factory = GreetFactory(greeting.from_text("{peer_host}"), quiet=True, reactor=reactor)
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
            GreetFactory(greeting.from_text("x"), quiet=True, reactor=reactor))
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


class PositionalBacklogTests(SynchronousTestCase):
    def test_a_positional_backlog_is_kept(self):
        # tcp:PORT:INTERFACE:BACKLOG; tcp6:PORT:BACKLOG
        for given in ("tcp:80:127.0.0.1:5", "tcp6:80:5", "unix:/run/g.sock:666:5"):
            self.assertEqual(with_default_backlog(given), given)
        reactor = MemoryReactorClock()
        server_endpoint(reactor, "tcp:0:127.0.0.1:5").listen(object())
        self.assertEqual(reactor.tcpServers[0][2:], (5, "127.0.0.1"))
