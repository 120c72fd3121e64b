"""
The probe client: argument parsing, banner rendering, and the protocol and
factory driven through StringTransport; plus the real client process against
servers that misbehave on purpose.
"""

import socket
import struct
import threading

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import client
from tcpgreet.client import ClientOptions, GreetClientFactory, ProbeError

from .helpers import run_client


class TargetTests(SynchronousTestCase):
    def test_forms(self):
        cases = {
            (): ("localhost", 27679),
            ("example.org",): ("example.org", 27679),
            ("example.org", "25"): ("example.org", 25),
            ("example.org:2525",): ("example.org", 2525),
            ("[::1]:7",): ("::1", 7),
            ("[::1]",): ("::1", 27679),
            ("[::1]", "8"): ("::1", 8),
            ("::1",): ("::1", 27679),
            ("::1", "9"): ("::1", 9),
        }
        for args, expected in cases.items():
            self.assertEqual(client.parse_target(list(args)), expected, args)

    def test_mistakes(self):
        for args, fragment in [
            (["a", "b", "c"], "too many arguments"),
            (["host", "port"], "bad port 'port'"),
            (["host", "0"], "not in 1..65535"),
            (["host", "65536"], "not in 1..65535"),
            (["host:1", "2"], "port given twice"),
            (["[::1"], "unclosed bracket"),
            (["[::1]x"], "[IPv6]:PORT"),
            ([":80"], "empty host"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                client.parse_target(args)
            self.assertIn(fragment, str(caught.exception))

    def test_options(self):
        options = ClientOptions()
        options.parseOptions(["-t", "0.5", "127.0.0.1", "99"])
        self.assertEqual((options["timeout"], options["host"], options["port"]),
                         (0.5, "127.0.0.1", 99))

    def test_timeout_must_be_positive(self):
        for bad in ("0", "-1", "soon", "inf", "nan"):
            with self.assertRaises(usage.UsageError):
                ClientOptions().parseOptions(["-t", bad])


class RenderTests(SynchronousTestCase):
    def test_crlf_becomes_newline(self):
        self.assertEqual(client.render_banner(b"a\r\nb\r\n"), "a\nb\n")

    def test_control_characters_are_escaped(self):
        rendered = client.render_banner(b"\x1b]0;pwned\x07\x1b[2J\tok\rx\x7f\n")
        self.assertEqual(rendered, "\\x1b]0;pwned\\x07\\x1b[2J\tok\\x0dx\\x7f\n")

    def test_invalid_utf8_is_escaped(self):
        self.assertEqual(client.render_banner(b"caf\xe9 \xc3\xa9"), "caf\\xe9 é")

    def test_unicode_controls_are_escaped(self):
        self.assertEqual(client.render_banner("a\u202eb\u0085".encode()), "a\\u202eb\\x85")


class ProtocolTests(SynchronousTestCase):
    def connect(self, max_bytes=65536):
        factory = GreetClientFactory(MemoryReactorClock(), max_bytes)
        results = []
        factory.deferred.addBoth(results.append)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return factory, protocol, transport, results

    def test_collects_until_eof(self):
        factory, protocol, _, results = self.connect()
        protocol.dataReceived(b"Thank you ")
        protocol.dataReceived(b"for connecting\r\n")
        self.assertEqual(results, [])
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(results, [b"Thank you for connecting\r\n"])
        self.assertFalse(factory.truncated)
        self.assertIsNotNone(factory.connected_at)

    def test_stops_at_max_bytes(self):
        factory, protocol, transport, results = self.connect(max_bytes=10)
        protocol.dataReceived(b"0123456")
        protocol.dataReceived(b"789abcdef")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(results, [b"0123456789"])
        self.assertTrue(factory.truncated)

    def test_reset_is_a_failure(self):
        _, protocol, _, results = self.connect()
        protocol.connectionLost(Failure(error.ConnectionLost()))
        [failure] = results
        self.assertEqual(str(failure.value), "connection reset by peer")

    def test_refused(self):
        factory = GreetClientFactory(MemoryReactorClock())
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.failureResultOf(factory.deferred, ProbeError)


class ProcessTests(SynchronousTestCase):
    """The real client process against servers that misbehave on purpose."""

    def listener(self):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        self.addCleanup(server.close)
        return server, str(server.getsockname()[1])

    def test_silent_server_times_out(self):
        _, port = self.listener()  # the kernel accepts; nobody ever writes
        result = run_client("-t", "0.5", "127.0.0.1", port)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, f"tcpgreet-client: 127.0.0.1 port {port}: timed out\n")

    def test_reset_is_critical(self):
        server, port = self.listener()

        def reset():
            connection, _ = server.accept()
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

        thread = threading.Thread(target=reset, daemon=True)
        thread.start()
        result = run_client("127.0.0.1", port)
        thread.join(10)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr,
                         f"tcpgreet-client: 127.0.0.1 port {port}: connection reset by peer\n")

    def test_usage_error_is_unknown(self):
        result = run_client("--timeout", "soon")
        self.assertEqual(result.returncode, 3)
        self.assertEqual(len(result.stderr.splitlines()), 1)
        self.assertIn("soon", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_unresolvable_name(self):
        result = run_client("no-such-host.invalid", "80")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.splitlines()), 1)
        self.assertTrue(result.stderr.startswith(
            "tcpgreet-client: no-such-host.invalid port 80: cannot resolve"))
