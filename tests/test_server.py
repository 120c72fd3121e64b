"""
GreetProtocol and GreetFactory, driven through StringTransport.
"""

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import greeting
from tcpgreet.greeting import Clock
from tcpgreet.server import GreetFactory, GreetProtocol, peer_host_port

PEER = IPv4Address("TCP", "192.0.2.7", 40001)


def connect(factory, peer=PEER):
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


class CapturedLog:
    """Collect the events tcpgreet.server logs while a test runs."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event):
        if event.get("log_namespace") == "tcpgreet.server":
            self.events.append(event)


class ProtocolTests(SynchronousTestCase):
    def test_default_greeting_then_close(self):
        factory = GreetFactory(greeting.from_text("Thank you for connecting"), quiet=True)
        protocol, transport = connect(factory)
        self.assertIsInstance(protocol, GreetProtocol)
        self.assertEqual(transport.value(), b"Thank you for connecting\r\n")
        self.assertTrue(transport.disconnecting)

    def test_client_bytes_are_discarded(self):
        factory = GreetFactory(greeting.from_text("hi"), quiet=True)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"x" * 100000)
        self.assertEqual(transport.value(), b"hi\r\n")
        self.assertFalse(hasattr(protocol, "buffer"))

    def test_template_sees_the_peer_and_counts_connections(self):
        factory = GreetFactory(
            greeting.from_text("hi {peer_host}:{peer_port} #{connection}"), quiet=True)
        _, first = connect(factory)
        _, second = connect(factory, IPv6Address("TCP", "2001:db8::1", 5))
        self.assertEqual(first.value(), b"hi 192.0.2.7:40001 #1\r\n")
        self.assertEqual(second.value(), b"hi 2001:db8::1:5 #2\r\n")

    def test_hostname_and_time(self):
        clock = Clock(now=lambda: 0.0)
        clock.hostname = "greeter"
        factory = GreetFactory(greeting.from_text("{hostname} {time}"), quiet=True,
                               clock=clock)
        _, transport = connect(factory)
        self.assertEqual(transport.value(), b"greeter 1970-01-01T00:00:00Z\r\n")

    def test_a_swapped_greeting_applies_to_the_next_connection(self):
        factory = GreetFactory(greeting.from_text("old"), quiet=True)
        _, before = connect(factory)
        factory.greeting = greeting.from_text("new")
        _, after = connect(factory)
        self.assertEqual((before.value(), after.value()), (b"old\r\n", b"new\r\n"))


class LogTests(SynchronousTestCase):
    def test_one_structured_line_per_greeted_connection(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"))
        protocol, _ = connect(factory)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = log.events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual((event["peer"], event["port"], event["outcome"], event["bytes"]),
                         ("192.0.2.7", 40001, "greeted", 7))
        self.assertGreaterEqual(event["duration_ms"], 0)
        self.assertIsNone(event["reason"])

    def test_a_lost_connection_is_logged_with_the_reason(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"))
        protocol, _ = connect(factory)
        protocol.connectionLost(Failure(error.ConnectionLost("reset by peer")))
        [event] = log.events
        self.assertEqual(event["outcome"], "lost")
        self.assertIn("reset by peer", event["reason"])

    def test_quiet_logs_nothing(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"), quiet=True)
        protocol, _ = connect(factory)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(log.events, [])


class AddressTests(SynchronousTestCase):
    def test_ip_addresses(self):
        self.assertEqual(peer_host_port(PEER), ("192.0.2.7", 40001))

    def test_unix_peer_has_no_port(self):
        self.assertEqual(peer_host_port(UNIXAddress(None)), ("unix", 0))
        self.assertEqual(peer_host_port(UNIXAddress(b"/run/x")), ("/run/x", 0))
