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


class PositionalBacklogTests(SynchronousTestCase):
    def test_a_positional_backlog_is_kept(self):
        # tcp:PORT:INTERFACE:BACKLOG; tcp6:PORT:BACKLOG
        for given in ("tcp:80:127.0.0.1:5", "tcp6:80:5", "unix:/run/g.sock:666:5"):
            self.assertEqual(with_default_backlog(given), given)
        reactor = MemoryReactorClock()
        server_endpoint(reactor, "tcp:0:127.0.0.1:5").listen(object())
        self.assertEqual(reactor.tcpServers[0][2:], (5, "127.0.0.1"))
