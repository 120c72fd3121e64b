"""
One contract, two transports.  The same protocol-level tests run against a
L{DirectTransport} (a L{GreetPort} serving an L{IDirectFactory}) and against
Twisted's own C{tcp.Server} (C{reactor.listenTCP}), on real loopback
sockets with the real reactor, and must see the same thing: the same
events, in the same order, and the same bytes at the client.

Each protocol notes what happens to it, and what its calls returned, on
its factory; the client is a plain blocking socket in a thread.  Where the
client speaks first, the listening socket defers each accept until the
client's bytes are in (C{TCP_DEFER_ACCEPT}), so the accept pass always finds
them there.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    ILoggingContext,
    IPullProducer,
    IPushProducer,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import DefaultOpenSSLContextFactory
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpgreet import _port as port
from tcpgreet.interfaces import IDirectFactory

from . import tls
from .helpers import has_ipv6_loopback

TIMEOUT = 10

HELLO = b"hello\r\n"

# The tcpi_state values (include/net/tcp_states.h) of a connection whose
# FIN is still to come: ESTABLISHED, CLOSE_WAIT (the client's FIN is in).
_FIN_OWED_STATES = {1, 8}


def fin_sent(transport) -> bool:
    """Whether the kernel has sent (or queued) our FIN on this connection."""
    info = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] not in _FIN_OWED_STATES


class Noting(Protocol):
    """
    A protocol that notes its events on its factory.  Subclasses script
    what it does in L{made} (called from connectionMade) and the other
    hooks.
    """

    def note(self, *event) -> None:
        self.factory.events.append(event[0] if len(event) == 1 else event)

    def connectionMade(self) -> None:
        self.note("made")
        self.made()
        self.note("returned")

    def made(self) -> None:
        """What the protocol does when connected."""

    def dataReceived(self, data: bytes) -> None:
        events = self.factory.events
        if events and isinstance(events[-1], tuple) and events[-1][0] == "data":
            events[-1] = ("data", events[-1][1] + data)  # one event per message
        else:
            self.note("data", data)
        self.heard(data)

    def heard(self, data: bytes) -> None:
        """What the protocol does with what it hears."""

    def connectionLost(self, reason) -> None:
        self.note("lost", reason.type.__name__)
        self.factory.finished.callback(self.factory.events)


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Noting):
    def writeConnectionLost(self) -> None:
        self.note("writeConnectionLost", "FIN sent" if fin_sent(self.transport) else "no FIN")
        self.writeClosed()

    def writeClosed(self) -> None:
        """What the protocol does once its FIN is out."""

    def readConnectionLost(self) -> None:
        self.note("readConnectionLost")
        self.readClosed()

    def readClosed(self) -> None:
        """What the protocol does once the client has finished sending."""
        self.transport.loseConnection()


@implementer(IDirectFactory)
class NotingFactory(Factory):
    """
    Builds one scripted protocol and keeps its events.  It provides
    IDirectFactory, which a GreetPort heeds and reactor.listenTCP ignores.
    """

    def __init__(self, protocol: type[Noting]) -> None:
        self.protocol = protocol
        self.events: list = []
        self.finished = defer.Deferred()
        self.handedOver = 0

    def connectionWaiting(self, protocol) -> None:
        self.handedOver += 1


# -- the client's side, run in a thread ---------------------------------


def connect(address: tuple, rcvbuf: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(address)
    return s


def read_to_eof(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_then_goodbye(address: tuple, goodbye: bytes = b"and goodbye") -> tuple[bytes, bytes]:
    """Read to EOF, then send C{goodbye} and EOF; what came before and after."""
    with connect(address) as s:
        greeting = read_to_eof(s)
        s.sendall(goodbye)
        s.shutdown(socket.SHUT_WR)
        return greeting, read_to_eof(s)


def speak_then_read(address: tuple, said: bytes = b"hi there", eof: bool = False) -> bytes:
    """Send C{said} (and EOF) at once, then read to EOF."""
    with connect(address) as s:
        s.sendall(said)
        if eof:
            s.shutdown(socket.SHUT_WR)
        return read_to_eof(s)


def speak_read_then_close(address: tuple, said: bytes) -> bytes:
    with connect(address) as s:
        s.sendall(said)
        greeting = read_to_eof(s)
        s.shutdown(socket.SHUT_WR)
        return greeting


def read_until_reset(address: tuple) -> str:
    try:
        # The reset may come before connect() even returns.
        with connect(address) as s:
            read_to_eof(s)
    except ConnectionResetError:
        return "reset"
    return "EOF"


class TransportContract:
    """
    The tests.  A subclass says how to listen (L{listen}) and what a
    hand-over to the reactor means for it (L{assertHandedOver}).
    """

    def listen(self, factory: NotingFactory, interface: str):
        raise NotImplementedError

    def assertHandedOver(self, factory: NotingFactory, times: int) -> None:
        raise NotImplementedError

    def serve(self, protocol: type[Noting], interface: str = "127.0.0.1",
              clientSpeaksFirst: bool = False) -> tuple[NotingFactory, tuple]:
        factory = NotingFactory(protocol)
        factory.finished.addTimeout(TIMEOUT, reactor)
        listening = self.listen(factory, interface)
        self.addCleanup(listening.stopListening)
        if clientSpeaksFirst:
            # Each connection becomes acceptable only once its first bytes
            # are in, so the server's accept pass finds them there.
            if not hasattr(socket, "TCP_DEFER_ACCEPT"):
                raise SkipTest("needs TCP_DEFER_ACCEPT (Linux)")
            listening.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, TIMEOUT)
        host = "127.0.0.1" if interface == "0.0.0.0" else interface
        return factory, (host, listening.getHost().port)

    # -- closing --------------------------------------------------------

    @defer.inlineCallbacks
    def test_write_then_loseConnection(self):
        class WriteAndClose(Noting):
            def made(self):
                self.transport.write(HELLO)
                self.transport.loseConnection()

        factory, address = self.serve(WriteAndClose)
        received = yield threads.deferToThread(lambda: read_to_eof(connect(address)))
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, ["made", "returned", ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 0)

    @defer.inlineCallbacks
    def test_what_is_written_after_loseConnection_in_the_same_call_still_goes(self):
        class CloseThenWrite(Noting):
            def made(self):
                self.transport.write(b"hel")
                self.transport.loseConnection()
                self.transport.write(b"lo\r\n")

        factory, address = self.serve(CloseThenWrite)
        received = yield threads.deferToThread(lambda: read_to_eof(connect(address)))
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, ["made", "returned", ("lost", "ConnectionDone")])

    @defer.inlineCallbacks
    def test_abortConnection(self):
        class WriteAndAbort(Noting):
            def made(self):
                self.transport.write(HELLO)
                self.transport.abortConnection()
                self.transport.write(b"never sent")

        factory, address = self.serve(WriteAndAbort)
        ending = yield threads.deferToThread(read_until_reset, address)
        events = yield factory.finished
        self.assertEqual(ending, "reset")
        self.assertEqual(events, ["made", "returned", ("lost", "ConnectionAborted")])
        self.assertHandedOver(factory, 0)

    @defer.inlineCallbacks
    def test_closing_from_dataReceived_of_a_client_that_spoke_first(self):
        class CloseWhenSpokenTo(Noting):
            def made(self):
                self.transport.write(HELLO)
                self.transport.loseWriteConnection()

            def heard(self, data):
                self.transport.loseConnection()

        factory, address = self.serve(CloseWhenSpokenTo, clientSpeaksFirst=True)
        received = yield threads.deferToThread(speak_then_read, address)
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, ["made", "returned", ("data", b"hi there"),
                                  ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    # -- half-closing (IHalfCloseableProtocol) ---------------------------

    @defer.inlineCallbacks
    def test_half_close_then_the_clients_bytes_and_eof(self):
        class HalfCloseAndListen(HalfCloseable):
            def made(self):
                self.transport.write(HELLO)
                self.transport.loseWriteConnection()

            def writeClosed(self):
                self.transport.write(b"too late")  # dropped: the FIN is out

        factory, address = self.serve(HalfCloseAndListen)
        greeting, after = yield threads.deferToThread(read_then_goodbye, address)
        events = yield factory.finished
        self.assertEqual((greeting, after), (HELLO, b""))
        self.assertEqual(events, [
            "made", "returned", ("writeConnectionLost", "FIN sent"),
            ("data", b"and goodbye"), "readConnectionLost", ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    @defer.inlineCallbacks
    def test_half_close_to_a_client_that_spoke_first(self):
        class HalfClose(HalfCloseable):
            def made(self):
                self.transport.write(HELLO)
                self.transport.loseWriteConnection()

        factory, address = self.serve(HalfClose, clientSpeaksFirst=True)
        received = yield threads.deferToThread(speak_read_then_close, address, b"hi there")
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, [
            "made", "returned", ("data", b"hi there"), ("writeConnectionLost", "FIN sent"),
            "readConnectionLost", ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    @defer.inlineCallbacks
    def test_an_error_in_writeConnectionLost_ends_the_connection(self):
        class Broken(HalfCloseable):
            def made(self):
                self.transport.write(HELLO)
                self.transport.loseWriteConnection()

            def writeClosed(self):
                raise RuntimeError("broken")

        factory, address = self.serve(Broken)
        received = yield threads.deferToThread(lambda: read_to_eof(connect(address)))
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, [
            "made", "returned", ("writeConnectionLost", "FIN sent"), ("lost", "RuntimeError")])
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "broken")

    @defer.inlineCallbacks
    def test_the_client_finishes_first(self):
        class HalfCloseWhenTheClientHas(HalfCloseable):
            def made(self):
                self.transport.write(HELLO)

            def readClosed(self):
                self.transport.loseWriteConnection()

            def writeClosed(self):
                self.transport.loseConnection()

        factory, address = self.serve(HalfCloseWhenTheClientHas, clientSpeaksFirst=True)
        received = yield threads.deferToThread(speak_then_read, address, b"bye", True)
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, [
            "made", "returned", ("data", b"bye"), "readConnectionLost",
            ("writeConnectionLost", "FIN sent"), ("lost", "ConnectionDone")])

    @defer.inlineCallbacks
    def test_a_partial_write_after_loseWriteConnection_is_sent_whole_before_the_fin(self):
        tail = bytes(range(256)) * 256  # more than the send buffer and the window

        class HalfCloseThenWriteMore(HalfCloseable):
            def made(self):
                self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                self.transport.write(HELLO)
                self.transport.loseWriteConnection()
                self.transport.write(tail)

        factory, address = self.serve(HalfCloseThenWriteMore)

        def client():
            with connect(address, rcvbuf=4096) as s:
                return read_to_eof(s)

        received = yield threads.deferToThread(client)
        events = yield factory.finished
        self.assertEqual(len(received), len(HELLO + tail))
        self.assertEqual(received, HELLO + tail)
        self.assertEqual(events, [
            "made", "returned", ("writeConnectionLost", "FIN sent"), "readConnectionLost",
            ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    # -- what a connection is ---------------------------------------------

    @defer.inlineCallbacks
    def checkAddresses(self, interface: str, address_type):
        class SayWhere(Noting):
            def made(self):
                self.note("host", self.transport.getHost())
                self.note("peer", self.transport.getPeer())
                self.transport.write(HELLO)
                self.transport.loseConnection()

        factory, address = self.serve(SayWhere, interface=interface)

        def client():
            with connect(address) as s:
                return s.getpeername(), s.getsockname(), read_to_eof(s)

        server_end, client_end, received = yield threads.deferToThread(client)
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, [
            "made", ("host", address_type("TCP", *server_end[:2])),
            ("peer", address_type("TCP", *client_end[:2])), "returned",
            ("lost", "ConnectionDone")])

    def test_getHost_is_the_connections_address_and_getPeer_the_clients(self):
        # Listening on every interface (for the one connection, from
        # 127.0.0.1) is what makes the connection's own address differ from
        # the listener's, 0.0.0.0.
        return self.checkAddresses("0.0.0.0", IPv4Address)

    def test_getHost_and_getPeer_over_ipv6(self):
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback")
        return self.checkAddresses("::1", IPv6Address)

    @defer.inlineCallbacks
    def test_the_interfaces_of_a_tcp_transport(self):
        interfaces = (ITCPTransport, ITLSTransport, ISystemHandle, IConsumer, IPushProducer,
                      ILoggingContext)

        class Introspect(Noting):
            def made(self):
                for interface in interfaces:
                    self.note(interface.__name__, verifyObject(interface, self.transport))
                self.note("logPrefix", type(self.transport.logPrefix()).__name__)
                try:
                    self.transport.write("text")
                except TypeError:
                    self.note("no str")
                try:
                    self.transport.writeSequence([b"ok", "text"])
                except TypeError:
                    self.note("no str in a sequence")
                self.transport.loseConnection()

        factory, address = self.serve(Introspect)
        received = yield threads.deferToThread(lambda: read_to_eof(connect(address)))
        events = yield factory.finished
        self.assertEqual(received, b"")
        self.assertEqual(events, [
            "made", *((i.__name__, True) for i in interfaces), ("logPrefix", "str"),
            "no str", "no str in a sequence", "returned", ("lost", "ConnectionDone")])

    @defer.inlineCallbacks
    def test_startTLS(self):
        directory = Path(tempfile.mkdtemp(prefix="tcpgreet-contract-tls-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        files = tls.self_signed(directory)
        options = DefaultOpenSSLContextFactory(str(files.key), str(files.cert))

        class StartTLS(Noting):
            def made(self):
                self.transport.startTLS(options)
                self.transport.write(HELLO)
                self.transport.loseConnection()

        factory, address = self.serve(StartTLS)

        def client():
            context = ssl.create_default_context(cafile=str(files.trust))
            with context.wrap_socket(connect(address),
                                     server_hostname=tls.SERVER_NAME) as s:
                received = read_to_eof(s)
                s.unwrap()  # close_notify in answer to the server's
                return received

        received = yield threads.deferToThread(client)
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, ["made", "returned", ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    # -- producers and the reactor ----------------------------------------

    @defer.inlineCallbacks
    def test_a_pull_producer(self):
        chunks = [b"one ", b"two ", b"three\r\n"]

        @implementer(IPullProducer)
        class Chunks:
            def __init__(self, protocol):
                self.protocol = protocol
                self.left = list(chunks)

            def resumeProducing(self):
                transport = self.protocol.transport
                chunk = self.left.pop(0)
                self.protocol.note("resumeProducing", chunk)
                transport.write(chunk)
                if not self.left:
                    transport.unregisterProducer()
                    transport.loseConnection()

            def stopProducing(self):
                self.protocol.note("stopProducing")

        class Produce(Noting):
            def made(self):
                self.transport.registerProducer(Chunks(self), False)

        factory, address = self.serve(Produce)
        received = yield threads.deferToThread(lambda: read_to_eof(connect(address)))
        events = yield factory.finished
        self.assertEqual(received, b"".join(chunks))
        self.assertEqual(events, [
            "made", ("resumeProducing", b"one "), "returned", ("resumeProducing", b"two "),
            ("resumeProducing", b"three\r\n"), ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    @defer.inlineCallbacks
    def test_a_push_producer_is_stopped_when_the_connection_ends(self):
        @implementer(IPushProducer)
        class Push:
            def __init__(self, protocol):
                self.protocol = protocol

            def pauseProducing(self):
                self.protocol.note("pauseProducing")

            def resumeProducing(self):
                self.protocol.note("resumeProducing")

            def stopProducing(self):
                self.protocol.note("stopProducing")

        class Produce(Noting):
            def made(self):
                self.transport.registerProducer(Push(self), True)
                self.transport.write(HELLO)
                self.transport.loseConnection()

        factory, address = self.serve(Produce)
        received = yield threads.deferToThread(lambda: read_to_eof(connect(address)))
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, ["made", "returned", "stopProducing",
                                  ("lost", "ConnectionDone")])

    @defer.inlineCallbacks
    def test_a_paused_transport_delivers_nothing_until_resumed(self):
        class Paused(HalfCloseable):
            def made(self):
                self.transport.pauseProducing()
                self.transport.write(HELLO)
                self.transport.loseWriteConnection()

            def writeClosed(self):
                self.transport.resumeProducing()

        factory, address = self.serve(Paused, clientSpeaksFirst=True)
        received = yield threads.deferToThread(speak_read_then_close, address, b"early")
        events = yield factory.finished
        self.assertEqual(received, HELLO)
        self.assertEqual(events, [
            "made", "returned", ("writeConnectionLost", "FIN sent"), ("data", b"early"),
            "readConnectionLost", ("lost", "ConnectionDone")])

    @defer.inlineCallbacks
    def test_a_protocol_that_stays_open(self):
        class Echo(Noting):
            def heard(self, data):
                self.transport.write(data)

        factory, address = self.serve(Echo)

        def client():
            with connect(address) as s:
                s.sendall(b"ping")
                echoed = s.recv(100)
                s.shutdown(socket.SHUT_WR)
                return echoed, read_to_eof(s)

        echoed = yield threads.deferToThread(client)
        events = yield factory.finished
        self.assertEqual(echoed, (b"ping", b""))
        self.assertEqual(events, ["made", "returned", ("data", b"ping"),
                                  ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    # -- writes that do not fit -------------------------------------------

    @defer.inlineCallbacks
    def checkBigWrite(self, size: int, sndbuf: int | None):
        data = bytes(range(256)) * (size // 256)

        class WriteBig(Noting):
            def made(self):
                if sndbuf:
                    self.transport.getHandle().setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                self.transport.writeSequence([data[:100], data[100:]])
                self.transport.loseConnection()

        factory, address = self.serve(WriteBig)

        def client():
            with connect(address, rcvbuf=4096) as s:
                return read_to_eof(s)

        received = yield threads.deferToThread(client)
        events = yield factory.finished
        self.assertEqual(len(received), len(data))
        self.assertEqual(received, data)
        self.assertEqual(events, ["made", "returned", ("lost", "ConnectionDone")])
        self.assertHandedOver(factory, 1)

    def test_a_write_far_bigger_than_the_send_buffer(self):
        return self.checkBigWrite(4 * 1024 * 1024, None)

    def test_a_write_that_is_sent_only_in_part(self):
        return self.checkBigWrite(60 * 1024, 4096)


class DirectTransportTests(TransportContract, TestCase):
    """The contract, on a DirectTransport."""

    def listen(self, factory, interface):
        listening = port.listen(reactor, 0, factory, interface=interface)
        self.assertTrue(listening._direct)
        return listening

    def assertHandedOver(self, factory, times):
        self.assertEqual(factory.handedOver, times)


class ReactorTransportTests(TransportContract, TestCase):
    """The contract, on Twisted's tcp.Server: the reference."""

    def listen(self, factory, interface):
        return reactor.listenTCP(0, factory, interface=interface)

    def assertHandedOver(self, factory, times):
        self.assertEqual(factory.handedOver, 0)  # the reactor's from the start
