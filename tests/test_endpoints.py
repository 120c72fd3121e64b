"""
Endpoint strings: the backlog default and one-line errors.
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.endpoints import EndpointError, server_endpoint, with_default_backlog


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
