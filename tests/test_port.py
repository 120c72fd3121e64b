"""
GreetPort and DirectTransport: greetings served within the accept pass, the
hand-over to the reactor, and accept errors that neither spin nor flood.
"""

import _socket
import errno
import socket

from twisted.internet import defer, reactor, tcp, threads
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    ILoggingContext,
    IPushProducer,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpgreet import greeting, port
from tcpgreet.port import IDirectFactory
from tcpgreet.server import GreetFactory

from .helpers import fetch


def blocking_fetch(address, send=b"", rcvbuf=None, timeout=10):
    """Read to EOF with a plain blocking socket (run in a thread)."""
    return fetch(*address, timeout=timeout, send=send, rcvbuf=rcvbuf)


class CountingServer(tcp.Server):
    created = 0

    def __init__(self, *args):
        CountingServer.created += 1
        super().__init__(*args)


class DirectPathTests(TestCase):
    def listen(self, text, **kwargs):
        factory = GreetFactory(greeting.from_text(text), quiet=True, **kwargs)
        listening = port.listen(reactor, 0, factory, interface="127.0.0.1")
        listening.transport = CountingServer
        CountingServer.created = 0
        self.addCleanup(listening.stopListening)
        self.listening = listening
        return factory, ("127.0.0.1", listening.getHost().port)

    @defer.inlineCallbacks
    def test_short_greeting_needs_no_reactor_transport(self):
        factory, address = self.listen("hello")
        for _ in range(5):
            data = yield threads.deferToThread(blocking_fetch, address)
            self.assertEqual(data, b"hello\r\n")
        self.assertEqual(CountingServer.created, 0)
        self.assertEqual((factory.stats.greeted, factory.limits.open), (5, 0))

    @defer.inlineCallbacks
    def test_a_client_that_speaks_first_still_gets_everything(self):
        factory, address = self.listen("hello")
        # The kernel offers each connection to accept() only once its first
        # bytes are in, so the accept pass always finds the client has
        # spoken, and the connection is handed to the reactor to hear it.
        self.listening.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)
        data = yield threads.deferToThread(blocking_fetch, address, b"x" * 100000)
        self.assertEqual(data, b"hello\r\n")
        yield factory.whenIdle()
        self.assertEqual(CountingServer.created, 1)
        self.assertEqual(factory.stats.greeted, 1)

    @defer.inlineCallbacks
    def test_long_greeting_is_handed_to_the_reactor(self):
        text = "0123456789abcdef" * 150000
        factory, address = self.listen(text)
        data = yield threads.deferToThread(blocking_fetch, address, b"", 4096)
        self.assertEqual(data, text.encode() + b"\r\n")
        self.assertEqual(CountingServer.created, 1)
        yield factory.whenIdle()
        self.assertEqual(factory.stats.greeted, 1)


@implementer(IHalfCloseableProtocol)
class HalfCloseAndListen(Protocol):
    """Says hello, closes its write side, then listens until the client is done."""

    def connectionMade(self):
        self.heard = b""
        self.transport.write(b"hello\r\n")
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        self.factory.writeClosed = True

    def dataReceived(self, data):
        self.heard += data

    def readConnectionLost(self):
        self.factory.heard.callback(self.heard)
        self.transport.loseConnection()


@implementer(IDirectFactory)
class HalfCloseFactory(Factory):
    protocol = HalfCloseAndListen

    def __init__(self):
        self.heard = defer.Deferred()
        self.writeClosed = False
        self.waiting = []

    def connectionWaiting(self, protocol):
        self.waiting.append(protocol)


class HandOverTests(TestCase):
    @defer.inlineCallbacks
    def test_a_protocol_that_stays_after_half_closing_gets_its_fin_and_keeps_reading(self):
        factory = HalfCloseFactory()
        listening = port.listen(reactor, 0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        address = ("127.0.0.1", listening.getHost().port)

        def client():
            with socket.create_connection(address, timeout=10) as s:
                greeting = b"".join(iter(lambda: s.recv(100), b""))  # EOF: the FIN came
                s.sendall(b"and goodbye")
                s.shutdown(socket.SHUT_WR)
                return greeting, s.recv(100)

        greeting, after = yield threads.deferToThread(client)
        self.assertEqual(greeting, b"hello\r\n")
        self.assertEqual(after, b"")
        self.assertTrue(factory.writeClosed)
        heard = yield factory.heard
        self.assertEqual(heard, b"and goodbye")
        self.assertEqual(len(factory.waiting), 1)  # handed to the reactor, and told


class DirectFactoryTests(TestCase):
    def test_the_greeting_factory_promises_what_a_direct_factory_must(self):
        verifyObject(port.IDirectFactory, GreetFactory(greeting.from_text("hi")))

    def test_only_a_factory_that_provides_the_interface_is_served_directly(self):
        class Undeclared(Factory):
            directTransport = True  # an attribute promises nothing
            protocol = Protocol

        served = []
        for factory in (Undeclared(), HalfCloseFactory(),
                        GreetFactory(greeting.from_text("hi"))):
            listening = port.listen(reactor, 0, factory, interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            served.append((listening._direct, listening._acceptedSocket))
        self.assertEqual(served, [(False, socket.socket), (True, _socket.socket),
                                  (True, _socket.socket)])

    def test_whoever_asks_for_the_handle_gets_a_standard_socket(self):
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        bare = _socket.socket(left.family, left.type, 0, left.detach())
        listening = port.GreetPort(0, HalfCloseFactory(), reactor=MemoryReactorClock())
        transport = port.DirectTransport(bare, Protocol(), ("127.0.0.1", 1), listening)
        handle = transport.getHandle()
        self.addCleanup(handle.close)
        self.assertIsInstance(handle, socket.socket)
        self.assertIs(transport.getHandle(), handle)
        handle.sendall(b"still the same connection")
        self.assertEqual(right.recv(100), b"still the same connection")

    def test_a_direct_transport_declares_what_it_is(self):
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        listening = port.GreetPort(0, HalfCloseFactory(), reactor=MemoryReactorClock())
        transport = port.DirectTransport(left, Protocol(), ("127.0.0.1", 1), listening)
        self.addCleanup(transport.getHandle().close)
        for interface in (port.IDirectTransport, ITCPTransport, ITLSTransport, ISystemHandle,
                          IConsumer, IPushProducer, ILoggingContext):
            self.assertTrue(verifyObject(interface, transport), interface)


class BrokenGreeting(TestCase):
    @defer.inlineCallbacks
    def test_a_protocol_that_raises_is_cut_off_and_counted_out(self):
        factory = GreetFactory(greeting.from_text("hi"), quiet=True)
        calls = []

        def greetingFor(peer):
            calls.append(peer)
            if len(calls) == 1:
                raise RuntimeError("broken")
            return b"hi\r\n"

        factory.greetingFor = greetingFor
        listening = port.listen(reactor, 0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        address = ("127.0.0.1", listening.getHost().port)
        with self.assertRaises(ConnectionResetError):  # aborted, not left hanging
            yield threads.deferToThread(blocking_fetch, address)
        second = yield threads.deferToThread(blocking_fetch, address)
        self.assertEqual(second, b"hi\r\n")
        self.assertEqual(factory.limits.open, 0)
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "broken")


class FakeListeningSocket:
    """
    A listening socket whose accept fails with C{errno}, except that with
    the reserve descriptor given up it yields C{waiting} connections.
    """

    family = socket.AF_UNIX
    type = socket.SOCK_STREAM

    def __init__(self, code, waiting=()):
        self.code = code
        self.calls = 0
        self.waiting = list(waiting)

    def _accept(self):
        self.calls += 1
        if port._reserve._fd is None and self.waiting:
            return self.waiting.pop().detach(), ("127.0.0.1", 1)
        if port._reserve._fd is None:
            raise BlockingIOError(errno.EAGAIN, "no more")
        raise OSError(self.code, "fake")

    def fileno(self):
        return -1


class AcceptErrorTests(SynchronousTestCase):
    def make(self, code, waiting=()):
        reserve = port._ReserveDescriptor()
        reserve.take()
        self.addCleanup(reserve.release)
        self.patch(port, "_reserve", reserve)
        clock = MemoryReactorClock()
        listening = port.GreetPort(0, GreetFactory(greeting.from_text("hi")), reactor=clock)
        listening.socket = FakeListeningSocket(code, waiting)
        listening.connected = True
        listening.numberAccepts = 100
        listening.startReading()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return clock, listening, events

    def test_out_of_descriptors_pauses_accepting_instead_of_spinning(self):
        clock, listening, events = self.make(errno.EMFILE)
        listening.doRead()
        self.assertNotIn(listening, clock.getReaders())
        self.assertEqual(listening.socket.calls, 2)  # the failure, then EAGAIN
        self.assertIsNotNone(port._reserve._fd)  # taken back
        clock.advance(port.ACCEPT_PAUSE)
        self.assertIn(listening, clock.getReaders())
        failures = [e for e in events if "accept failed" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)
        self.assertIn("pausing accepts", failures[0]["action"])

    def test_waiting_connections_are_shed_through_the_reserve(self):
        pairs = [socket.socketpair() for _ in range(3)]
        _, listening, events = self.make(errno.EMFILE, [a for a, _ in pairs])
        listening.doRead()
        for _, client in pairs:
            self.assertEqual(client.recv(10), b"")  # closed, without a greeting
            client.close()
        [failure] = [e for e in events if "accept failed" in e.get("log_format", "")]
        self.assertEqual(failure["shed"], 3)

    def test_the_summary_adds_up_what_was_shed(self):
        clock, listening, events = self.make(errno.EMFILE)
        for batch in (1, 2, 3):  # three episodes within one second
            pairs = [socket.socketpair() for _ in range(batch)]
            self.addCleanup(lambda pairs=pairs: [b.close() for _, b in pairs])
            listening.socket.waiting = [a for a, _ in pairs]
            listening.doRead()
            clock.advance(port.ACCEPT_PAUSE)
        clock.advance(1)
        failures = [e for e in events if "accept failed" in e.get("log_format", "")]
        self.assertEqual([(e["count"], e["shed"]) for e in failures], [(1, 1), (2, 5)])

    def test_accept_errors_are_logged_at_most_once_a_second(self):
        clock, listening, events = self.make(errno.ENOBUFS)
        for _ in range(10):
            for _ in range(100):
                listening.doRead()
            clock.advance(0.1)
        failures = [e for e in events if "accept failed" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)
        clock.advance(1)
        failures = [e for e in events if "accept failed" in e.get("log_format", "")]
        self.assertEqual([e["count"] for e in failures], [1, 999])
        self.assertIn("No buffer space", failures[0]["error"])

    def test_transient_errors_skip_to_the_next_connection(self):
        clock, listening, _ = self.make(errno.ECONNABORTED)
        listening.doRead()
        self.assertEqual(listening.socket.calls, 100)
        self.assertIn(listening, clock.getReaders())
