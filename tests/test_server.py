"""
GreetProtocol and GreetFactory, driven through StringTransport.
"""

import io

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import greeting, logs, server
from tcpgreet.greeting import Clock
from tcpgreet.limits import ConnectionLimits
from tcpgreet.server import (
    CHUNK,
    LINGER,
    GreetFactory,
    GreetProtocol,
    peer_host_port,
    was_greeted,
)

from .certificates import make_certificate
from .test_logs import RunningClock

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
        factory = GreetFactory(greeting.from_text("Thank you for connecting"), quiet=True,
                               reactor=MemoryReactorClock())
        protocol, transport = connect(factory)
        self.assertIsInstance(protocol, GreetProtocol)
        self.assertEqual(transport.value(), b"Thank you for connecting\r\n")
        self.assertTrue(transport.disconnecting)

    def test_client_bytes_are_discarded(self):
        factory = GreetFactory(greeting.from_text("hi"), quiet=True, reactor=MemoryReactorClock())
        protocol, transport = connect(factory)
        protocol.dataReceived(b"x" * 100000)
        self.assertEqual(transport.value(), b"hi\r\n")
        self.assertFalse(hasattr(protocol, "buffer"))

    def test_template_sees_the_peer_and_counts_connections(self):
        factory = GreetFactory(
            greeting.from_text("hi {peer_host}:{peer_port} #{connection}"), quiet=True,
            reactor=MemoryReactorClock())
        _, first = connect(factory)
        _, second = connect(factory, IPv6Address("TCP", "2001:db8::1", 5))
        self.assertEqual(first.value(), b"hi 192.0.2.7:40001 #1\r\n")
        self.assertEqual(second.value(), b"hi 2001:db8::1:5 #2\r\n")

    def test_hostname_and_time(self):
        clock = Clock(now=lambda: 0.0)
        clock.hostname = "greeter"
        factory = GreetFactory(greeting.from_text("{hostname} {time}"), quiet=True,
                               clock=clock, reactor=MemoryReactorClock())
        _, transport = connect(factory)
        self.assertEqual(transport.value(), b"greeter 1970-01-01T00:00:00Z\r\n")

    def test_a_swapped_greeting_applies_to_the_next_connection(self):
        factory = GreetFactory(greeting.from_text("old"), quiet=True, reactor=MemoryReactorClock())
        _, before = connect(factory)
        factory.greeting = greeting.from_text("new")
        _, after = connect(factory)
        self.assertEqual((before.value(), after.value()), (b"old\r\n", b"new\r\n"))


class LogTests(SynchronousTestCase):
    def test_one_structured_line_per_greeted_connection(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"), reactor=MemoryReactorClock())
        protocol, _ = connect(factory)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = log.events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual((event["peer"], event["port"], event["outcome"], event["bytes"]),
                         ("192.0.2.7", 40001, "greeted", 7))
        self.assertGreaterEqual(event["duration_ms"], 0)
        self.assertIsNone(event["reason"])

    def test_a_greeted_line_is_the_event_twisteds_logger_would_build(self):
        # Built in one step for speed (_greeted_event), and still Twisted's
        # event, key for key and in its order, over TLS or not.
        ours_events, expected = [], []
        twisted_log = Logger(namespace=server.log.namespace, observer=expected.append)
        for tls, format in ((False, server._GREETED), (True, server._GREETED_TLS)):
            ours_events.append(server._greeted_event("::1", 5, 26, 0.0012345, tls))
            twisted_log.info(format, peer="::1", port=5, outcome="greeted", bytes=26,
                             duration_ms=1.234, reason=None, tls=tls)
        for ours, theirs in zip(ours_events, expected, strict=True):
            self.assertIs(ours.pop("log_logger"), server.log)
            theirs.pop("log_logger")
            self.assertLess(abs(ours.pop("log_time") - theirs.pop("log_time")), 60)
            self.assertEqual(list(ours.items()), list(theirs.items()))

    def test_durations_are_rounded_to_the_nearest_microsecond(self):
        for seconds in (0.0, 4e-7, 6e-7, 0.0012345, 0.1, 1.9999996, 299.9999994,
                        86400.0004):
            event = server._greeted_event("::1", 5, 26, seconds, False)
            self.assertEqual(event["duration_ms"], round(seconds * 1000, 3), seconds)
        # A tie goes to the even microsecond (round(ms, 3) would follow the
        # binary value of ms, which is not the tie).
        for seconds, ms in ((5e-7, 0.0), (1.5e-6, 0.002), (2.5e-6, 0.002)):
            event = server._greeted_event("::1", 5, 26, seconds, False)
            self.assertEqual(event["duration_ms"], ms, seconds)

    def test_the_duration_is_the_reactors_time(self):
        # From connectionMade to connectionLost, as the reactor's clock
        # tells it: a test's clock drives it, the wall clock does not.
        log = CapturedLog(self)
        clock = MemoryReactorClock()
        clock.advance(1000)
        factory = GreetFactory(greeting.from_text("hello"), reactor=clock)
        protocol, transport = open_connection(factory)
        clock.advance(1.25)
        transport.flushed()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = log.events
        self.assertEqual((event["outcome"], event["duration_ms"]), ("greeted", 1250.0))
        self.assertEqual(factory.stats.durations.sum, 1.25)

    def test_a_lost_connection_is_logged_with_the_reason(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"), reactor=MemoryReactorClock())
        protocol, _ = open_connection(factory)  # reset before the greeting was out
        protocol.connectionLost(Failure(error.ConnectionLost("reset by peer")))
        [event] = log.events
        self.assertEqual(event["outcome"], "lost")
        self.assertIn("reset by peer", event["reason"])

    def test_quiet_logs_nothing(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"), quiet=True,
                               reactor=MemoryReactorClock())
        protocol, _ = connect(factory)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(log.events, [])


class TLSOutcomeTests(SynchronousTestCase):
    def test_a_tls_client_that_leaves_without_close_notify_was_greeted(self):
        # TLS cannot half-close: the protocol closes once the greeting is
        # handed over, and many clients then drop the connection without
        # TLS's close_notify, which Twisted reports as a lost connection.
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"), reactor=MemoryReactorClock())
        protocol, transport = connect(factory)  # a transport that cannot half-close
        transport.transport = StringTransport()  # the TCP beneath, all sent
        self.assertTrue(transport.disconnecting)
        protocol.handshakeCompleted()
        protocol.connectionLost(Failure(error.ConnectionLost("non-clean TLS close")))
        [event] = log.events
        self.assertEqual(event["outcome"], "greeted")
        self.assertEqual(factory.stats.greeted, 1)

    def test_a_client_that_never_finished_the_handshake_was_not_greeted(self):
        log = CapturedLog(self)
        factory = GreetFactory(greeting.from_text("hello"), reactor=MemoryReactorClock())
        protocol, transport = connect(factory)
        transport.transport = StringTransport()
        protocol.connectionLost(Failure(error.ConnectionLost("wrong version number")))
        [event] = log.events
        self.assertEqual(event["outcome"], "lost")


class TLSHandshakeFailureTests(SynchronousTestCase):
    """
    A real TLS layer (Twisted's, on OpenSSL) in front of the factory: a
    connection whose handshake never completed was sent nothing, and its
    line says why in words, not in OpenSSL's tuples.
    """

    def setUp(self):
        self.log = CapturedLog(self)
        self.clock = MemoryReactorClock()
        self.factory = GreetFactory(greeting.from_text("hello"), timeout=3, reactor=self.clock)
        certificate = make_certificate(["localhost"])
        options = PrivateCertificate.loadPEM(
            certificate.key_pem + certificate.certificate_pem).options()
        self.tls = TLSMemoryBIOFactory(options, False, self.factory).buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.tls.makeConnection(self.transport)
        # Twisted hands pyOpenSSL the key and certificate objects pyOpenSSL
        # now deprecates: not this test's business.
        self.addCleanup(self.flushWarnings)

    def assertLine(self, text, outcome, reason):
        [event] = self.log.events
        self.assertEqual(formatEvent(event), text)
        self.assertEqual((event["outcome"], event["reason"], event["bytes"], event["length"],
                          event["tls"]), (outcome, reason, 0, 7, True))
        stats = self.factory.stats
        self.assertEqual((stats.greeted, stats.bytes_sent, self.factory.limits.open), (0, 0, 0))
        return stats

    def test_a_plain_client_is_told_nothing_and_the_line_says_why(self):
        self.tls.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertNotIn(b"hello", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        self.tls.connectionLost(Failure(error.ConnectionDone()))
        stats = self.assertLine(
            "192.0.2.7 port 40001: lost (TLS handshake failed: http request) after 0 of 7 "
            f"bytes, {self.log.events[0]['duration_ms']} ms",
            "lost", "TLS handshake failed: http request")
        self.assertEqual(stats.lost, 1)

    def test_a_client_that_leaves_before_the_handshake(self):
        self.tls.connectionLost(Failure(error.ConnectionDone()))
        stats = self.assertLine(
            "192.0.2.7 port 40001: lost (TLS handshake failed: connection closed) after 0 of "
            f"7 bytes, {self.log.events[0]['duration_ms']} ms",
            "lost", "TLS handshake failed: connection closed")
        self.assertEqual(stats.lost, 1)

    def test_a_client_that_never_starts_the_handshake_times_out_with_nothing_sent(self):
        self.clock.advance(3)
        self.assertTrue(self.transport.disconnected)
        self.tls.connectionLost(Failure(error.ConnectionAborted()))
        stats = self.assertLine(
            "192.0.2.7 port 40001: aborted over TLS (timeout) after 0 of 7 bytes, "
            f"{self.log.events[0]['duration_ms']} ms",
            "aborted", "timeout")
        self.assertEqual((stats.aborted, stats.lost), ({"timeout": 1}, 0))


class AddressTests(SynchronousTestCase):
    def test_ip_addresses(self):
        self.assertEqual(peer_host_port(PEER), ("192.0.2.7", 40001))

    def test_unix_peer_has_no_port(self):
        self.assertEqual(peer_host_port(UNIXAddress(None)), ("unix", 0))
        self.assertEqual(peer_host_port(UNIXAddress(b"/run/x")), ("/run/x", 0))


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that can half-close, and that, like a real one, tells
    its half-closeable protocol when the write side is closed (here: when the
    test says the bytes went out).
    """

    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True

    def flushed(self):
        """The test's stand-in for the reactor writing everything out."""
        self.protocol.writeConnectionLost()

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def open_connection(factory, peer=PEER):
    protocol = factory.buildProtocol(peer)
    transport = HalfCloseTransport(peerAddress=peer)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def finish(protocol, reason=error.ConnectionDone):
    protocol.connectionLost(Failure(reason()))


class CloseTests(SynchronousTestCase):
    """The half-close: FIN after the greeting, and when to close fully."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = GreetFactory(greeting.from_text("hello"), quiet=True,
                                    reactor=self.reactor, timeout=10)

    def test_half_closes_after_the_greeting(self):
        _, transport = open_connection(self.factory)
        self.assertEqual(transport.value(), b"hello\r\n")
        self.assertTrue(transport.writeClosed)
        self.assertFalse(transport.disconnecting)

    def test_a_silent_client_served_at_once_is_closed_at_once(self):
        protocol, transport = open_connection(self.factory)
        # The reactor-less path: writeConnectionLost before the factory
        # gave the connection a deadline.
        protocol.waited = False
        protocol.writeConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_a_client_that_spoke_is_waited_for(self):
        protocol, transport = open_connection(self.factory)
        protocol.dataReceived(b"QUIT\r\n")
        transport.flushed()
        self.assertFalse(transport.disconnecting)
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_a_connection_that_needed_the_reactor_lingers_briefly(self):
        protocol, transport = open_connection(self.factory)
        self.assertIn(protocol, self.factory.waiting)
        transport.flushed()
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(LINGER - 0.01)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.02)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(getattr(transport, "aborted", False))
        finish(protocol)
        self.assertEqual(self.factory.stats.greeted, 1)

    def test_client_eof_before_the_greeting_is_out(self):
        protocol, transport = open_connection(self.factory)
        protocol.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        transport.flushed()
        self.assertTrue(transport.disconnecting)


class TimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = GreetFactory(greeting.from_text("hello"), reactor=self.reactor,
                                    timeout=2)
        self.log = CapturedLog(self)

    def test_undelivered_greeting_is_aborted_after_the_timeout(self):
        protocol, transport = open_connection(self.factory)
        self.reactor.advance(1.99)
        self.assertFalse(getattr(transport, "aborted", False))
        self.reactor.advance(0.02)
        self.assertTrue(transport.aborted)
        finish(protocol, error.ConnectionAborted)
        [event] = self.log.events
        self.assertEqual((event["outcome"], event["reason"]), ("aborted", "timeout"))
        self.assertEqual(self.factory.stats.aborted, {"timeout": 1})
        self.assertEqual(self.factory.waiting, set())

    def test_timer_is_cancelled_when_the_connection_ends(self):
        protocol, transport = open_connection(self.factory)
        transport.flushed()
        finish(protocol)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_client_that_resets_is_lost(self):
        protocol, _ = open_connection(self.factory)
        finish(protocol, error.ConnectionLost)
        [event] = self.log.events
        self.assertEqual(event["outcome"], "lost")
        self.assertEqual(self.factory.stats.lost, 1)
        self.assertEqual(self.factory.limits.open, 0)


class LongGreetingTests(SynchronousTestCase):
    def test_a_byte_stream_gets_it_whole_without_a_copy(self):
        factory = GreetFactory(greeting.from_text("x" * (3 * CHUNK)), quiet=True,
                               reactor=MemoryReactorClock())
        written = []
        transport = HalfCloseTransport()
        transport.write = written.append
        protocol = factory.buildProtocol(PEER)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        [data] = written
        self.assertIs(data, factory.greeting.static)

    def test_written_to_tls_a_chunk_at_a_time(self):
        text = "x" * (3 * CHUNK)
        factory = GreetFactory(greeting.from_text(text), quiet=True,
                               reactor=MemoryReactorClock())
        protocol = factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)  # cannot half-close, like TLS
        protocol.makeConnection(transport)
        producer = transport.producer
        self.assertIsNotNone(producer)
        self.assertFalse(transport.streaming)
        self.assertEqual(len(transport.value()), 0)  # StringTransport does not pull
        pulls = 0
        while transport.producer is not None:
            pulls += 1
            before = len(transport.value())
            producer.resumeProducing()
            self.assertLessEqual(len(transport.value()) - before, CHUNK)
        self.assertEqual(pulls, 4)
        self.assertEqual(transport.value(), (text + "\r\n").encode())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.written, len(text) + 2)


class LimitTests(SynchronousTestCase):
    def test_refused_connections_get_no_protocol_and_are_counted(self):
        factory = GreetFactory(greeting.from_text("hi"), quiet=True,
                               limits=ConnectionLimits(max_connections=1),
                               reactor=MemoryReactorClock())
        first, _ = open_connection(factory)
        self.assertIsNone(factory.buildProtocol(PEER))
        self.assertEqual(factory.stats.rejected, {"max-connections": 1})
        finish(first)
        self.assertIsNotNone(factory.buildProtocol(PEER))

    def test_rejections_are_logged_at_most_once_a_second(self):
        reactor = MemoryReactorClock()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = GreetFactory(greeting.from_text("hi"), quiet=True,
                               limits=ConnectionLimits(max_connections=1), reactor=reactor)
        open_connection(factory)
        for _ in range(1000):
            factory.buildProtocol(PEER)
        reactor.advance(1.0)
        for _ in range(500):
            factory.buildProtocol(PEER)
        reactor.advance(1.0)
        reactor.advance(1.0)
        refusals = [e for e in events if "refused" in e.get("log_format", "")]
        self.assertEqual([e["count"] for e in refusals], [1, 999, 500])
        self.assertEqual(refusals[0]["limit"], "--max-connections")
        self.assertEqual(factory.stats.rejected, {"max-connections": 1500})


class StatsTests(SynchronousTestCase):
    def test_whoever_waits_for_idle_finds_the_last_connection_counted_and_logged(self):
        factory = GreetFactory(greeting.from_text("hello"), reactor=MemoryReactorClock())
        log = CapturedLog(self)
        protocol, transport = open_connection(factory)
        transport.flushed()
        seen = []
        factory.when_idle().addCallback(
            lambda _: seen.append((factory.stats.greeted, len(log.events))))
        finish(protocol)
        self.assertEqual(seen, [(1, 1)])

    def test_greeted_connections_are_counted(self):
        factory = GreetFactory(greeting.from_text("hello"), quiet=True,
                               reactor=MemoryReactorClock())
        for _ in range(3):
            protocol, transport = open_connection(factory)
            transport.flushed()
            finish(protocol)
        stats = factory.stats
        self.assertEqual((stats.accepted, stats.greeted, stats.bytes_sent), (3, 3, 21))
        self.assertEqual(stats.durations.count, 3)


class WasGreetedTests(SynchronousTestCase):
    """The one test of whether a connection got its greeting."""

    def protocol(self, **state):
        protocol = GreetProtocol()
        protocol.length = protocol.written = 5
        for name, value in state.items():
            setattr(protocol, name, value)
        return protocol

    def test_a_fin_after_the_greeting(self):
        lost = Failure(error.ConnectionLost())
        self.assertTrue(was_greeted(self.protocol(write_done=True), lost, tls=False))

    def test_everything_written_and_a_clean_close(self):
        done = Failure(error.ConnectionDone())
        self.assertTrue(was_greeted(self.protocol(), done, tls=False))
        self.assertFalse(was_greeted(self.protocol(written=4), done, tls=False))
        self.assertFalse(was_greeted(self.protocol(cut_short="timeout"), done, tls=False))

    def test_over_tls_only_after_the_handshake(self):
        done = Failure(error.ConnectionDone())
        self.assertFalse(was_greeted(self.protocol(), done, tls=True))
        self.assertTrue(was_greeted(self.protocol(handshook=True), done, tls=True))


class StaticGreetingTests(SynchronousTestCase):
    """
    When the factory lets its port send the greeting by itself
    (IStaticGreetingFactory), and what it counts for those connections.
    """

    def factory(self, text="hello", quiet=True, **kwargs):
        return GreetFactory(greeting.from_text(text), quiet=quiet,
                            reactor=MemoryReactorClock(), **kwargs)

    def test_a_quiet_static_greeting_is_offered(self):
        self.assertEqual(self.factory().static_greeting(), b"hello\r\n")

    def test_also_when_each_connection_is_logged(self):
        self.assertEqual(self.factory(quiet=False).static_greeting(), b"hello\r\n")

    def test_not_for_a_template(self):
        self.assertIsNone(self.factory("hello {peer_host}").static_greeting())

    def test_not_under_a_per_address_limit(self):
        self.assertIsNone(self.factory(limits=ConnectionLimits(max_per_ip=2)).static_greeting())

    def test_not_without_room_under_max_connections(self):
        factory = self.factory(limits=ConnectionLimits(max_connections=1))
        protocol, _ = connect(factory)
        self.assertIsNone(factory.static_greeting())
        protocol.transport.loseConnection()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(factory.static_greeting(), b"hello\r\n")

    def test_not_when_the_greeting_is_chosen_per_connection(self):
        class Chooser(GreetFactory):
            def greeting_for(self, peer):
                return b"mine\r\n"

        chooser = Chooser(greeting.from_text("hello"), quiet=True, reactor=MemoryReactorClock())
        self.assertIsNone(chooser.static_greeting())
        factory = self.factory()
        factory.greeting_for = lambda peer: b"mine\r\n"
        self.assertIsNone(factory.static_greeting())

    def test_a_reloaded_greeting_is_offered_at_once(self):
        factory = self.factory()
        factory.greeting = greeting.from_text("new")
        self.assertEqual(factory.static_greeting(), b"new\r\n")

    def test_what_the_port_served_is_counted(self):
        factory = self.factory()
        captured = CapturedLog(self)
        factory.static_finished([(("192.0.2.7", 40001), 0.00005),
                                 (("2001:db8::7", 40002, 0, 0), 0.002)])
        self.assertEqual(captured.events, [])  # quiet
        stats = factory.stats
        self.assertEqual((stats.accepted, stats.greeted, stats.lost), (2, 2, 0))
        self.assertEqual(stats.bytes_sent, 2 * len(b"hello\r\n"))
        self.assertEqual(stats.durations.counts[0], 1)  # up to 100 us
        self.assertEqual(stats.durations.count, 2)
        self.assertEqual(factory.connections, 2)

    def test_what_the_port_served_is_logged_as_by_the_protocol(self):
        factory = self.factory(quiet=False)
        captured = CapturedLog(self)
        factory.static_finished([(("192.0.2.7", 40001), 0.0012345)])
        protocol, transport = open_connection(factory)
        transport.flushed()
        finish(protocol)
        events = captured.events
        self.assertEqual(len(events), 2)
        self.assertEqual(formatEvent(events[0]),
                         "192.0.2.7 port 40001: greeted, 7 bytes in 1.234 ms")
        fields = ("log_format", "log_level", "log_namespace", "peer", "port", "outcome",
                  "bytes", "reason", "tls")
        self.assertEqual(*[{key: line[key] for key in fields} for line in events])

    def test_what_the_port_served_is_written_when_it_is_logged(self):
        # The pass is over when static_finished is called: its lines are
        # written then, not at the end of the reactor's turn.
        clock = RunningClock()
        out = io.StringIO()
        observer = logs.text_observer(out, clock)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.factory(quiet=False).static_finished([(("192.0.2.7", 40001), 0.001),
                                                   (("192.0.2.8", 40002), 0.002)])
        lines = out.getvalue().splitlines()
        self.assertEqual([line.split("] ", 1)[1] for line in lines],
                         ["192.0.2.7 port 40001: greeted, 7 bytes in 1.0 ms",
                          "192.0.2.8 port 40002: greeted, 7 bytes in 2.0 ms"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_resumed_protocol_sends_only_the_rest(self):
        factory = self.factory()
        protocol = factory.resume_protocol(PEER, 3)
        transport = HalfCloseTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"lo\r\n")
        self.assertEqual(protocol.written, len(b"hello\r\n"))
        self.assertEqual(factory.limits.open, 1)
