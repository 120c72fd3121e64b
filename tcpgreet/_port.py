"""
A TCP listening port for servers that speak first and leave.

Stock Twisted gives every accepted connection a full reactor transport:
non-blocking and close-on-exec flags set with four fcntl calls, a log prefix
formatted, the socket registered with epoll for reading, modified for
writing, unregistered, and a second reactor pass to write and close.  A
greeting that fits in the socket's send buffer needs none of that, so
L{GreetPort} serves the connections of a factory that provides
L{IDirectFactory} within the accept pass, on a L{DirectTransport}: a whole
C{ITCPTransport} that sends at once and, once C{connectionMade} returns,
does what the protocol asked for (close, half-close) as a C{tcp.Server}
would have in the reactor passes that follow.  The moment a connection
needs the reactor after all (a short write, a client that has spoken, a
protocol that registers a producer or stays open), the direct transport
hands the socket to an ordinary L{tcp.Server} and steps aside.  The same
protocol-level tests run against both transports
(tests/test_transport_contract.py) and see the same thing.

A factory whose connections need nothing but the same bytes
(L{IStaticGreetingFactory}) does not even need a protocol for most of
them: the port writes the greeting on the accepted descriptor and closes
it, with the greeting and the FIN in one segment (C{TCP_CORK}), and builds
a protocol only for a connection that needs one (its client has spoken,
the send fell short).

L{GreetPort} also owns the accept loop, so accept errors cannot turn into a
busy loop or a log flood: running out of descriptors sheds the waiting
connections through a reserve descriptor (as Twisted does) and pauses
accepting briefly; each kind of error is logged at most once a second, with
a count.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import errno
import fcntl
import os
import socket
import struct
import sys
import termios
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from twisted.internet import abstract, error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    ILoggingContext,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
    IReadDescriptor,
    ISystemHandle,
    ITLSTransport,
    IWriteDescriptor,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from tcpgreet.interfaces import (
    IAdoptingPort,
    IDirectFactory,
    IDirectTransport,
    IStaticGreetingFactory,
)
from tcpgreet.logs import RateLimitedLog

log = Logger()


class PortReactor(Protocol):
    """
    What a L{GreetPort} needs of its reactor: the part of C{IReactorFDSet}
    that C{tcp.Port} reads through, and C{IReactorTime}'s C{callLater} for
    its pauses and its close.  A protocol, because no one Twisted interface
    has both and no reactor declares an interface that joins them.
    """

    def addReader(self, reader: IReadDescriptor) -> None: ...

    def removeReader(self, reader: IReadDescriptor) -> None: ...

    def removeWriter(self, writer: IWriteDescriptor) -> None: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object,
                  **kw: object) -> IDelayedCall: ...


class ListeningReactor(PortReactor, Protocol):
    """
    The reactor L{GreetReactor} stands in front of: a L{PortReactor} that
    also adopts sockets (C{IReactorSocket}) for the listeners that are not
    TCP.  Whatever else an endpoint asks for is passed through untyped.
    """

    # Any: IReactorSocket wants the socket module's enum and a ServerFactory,
    # the reactors themselves take any family number and protocol factory.
    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any,
                        factory: Any) -> IListeningPort: ...


# An accepting callable: the listening socket's C-level accept, or a
# connection adopted from elsewhere (GreetPort.adoptConnection).
Accept = Callable[[], tuple[int, Any]]


def c_accept(skt: socket.socket) -> Accept:
    """
    C{skt}'s C{_accept}: the C accept, without the enum conversions
    C{socket.accept} does for every connection.
    """
    return skt._accept  # type: ignore[attr-defined]  # _socket.socket's, not in typeshed

# Retry accepting after this long when the system is out of descriptors or
# buffers and shedding did not help: long enough not to spin, short enough
# that nobody notices once resources are back.
ACCEPT_PAUSE = 0.1

# On stop, how many accept passes may go to serving the backlog.
BACKLOG_PASSES = 20

# The most connections one accept pass takes (and greets).  Twisted's own
# batch grows by 20 after every full pass, without limit; under a flood
# that keeps the backlog full, one pass would grow until timers, /metrics,
# a worker's control channel and the drain all waited seconds behind it.
# This many greetings take a few milliseconds, and a pass this long
# already spreads the reactor's own cost over enough connections.
MAX_ACCEPTS_PER_PASS = 128

# The most a DirectTransport tries to send by itself.
DIRECT_WRITE_LIMIT = 65536

# The longest static greeting the port sends by itself (see
# GreetPort._accept_batch).  Far below any send buffer a fresh connection
# starts with, so that the send is all but certain to complete at once.
STATIC_LIMIT = 4096

# How long a send of the static greeting may block (SO_SNDTIMEO, which
# accepted connections inherit from the listening socket).  The port sends
# on the accepted descriptor as it is, in blocking mode: making it
# non-blocking would cost the very system calls the static path saves.  A
# fresh connection has room for a few kilobytes, so the send blocks only
# under kernel memory pressure, and then for this long at most, once per
# accept pass: the rest of that pass takes the protocol's path.  (Linux
# rounds it up to one clock tick.)
STATIC_SEND_TIMEOUT = struct.pack("@ll", 0, 1000)

# Linux's; elsewhere (0) greetings and FINs leave as they may.
_CORK: int = getattr(socket, "TCP_CORK", 0)

_DONTWAIT = socket.MSG_DONTWAIT
_ABORTED = Failure(error.ConnectionAborted())
_LINGER_RESET = struct.pack("ii", 1, 0)
_FIONREAD = termios.FIONREAD
_SHUT_WR = socket.SHUT_WR
_half_closeable = IHalfCloseableProtocol.providedBy


_unread_count = array.array("i", [0])
_write = os.write
_close_fd = os.close
_ioctl = fcntl.ioctl


# Linux reports how many connections a listening socket holds ready to
# accept in TCP_INFO, in the field that is tcpi_unacked for a connected
# socket (ss shows it as Recv-Q).
# Elsewhere the struct differs, or there is none (0: never asked).
_TCP_INFO: int = getattr(socket, "TCP_INFO", 0) if sys.platform.startswith("linux") else 0
_TCP_LISTEN_STATE = 10
_tcp_info_head = struct.Struct("=B7xIIIII")  # tcpi_state ... tcpi_unacked


def _ready_to_accept(skt: socket.socket) -> int | None:
    """How many connections wait in C{skt}'s accept queue (L{None}: unknown)."""
    try:
        info = skt.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _tcp_info_head.size)
    except OSError:
        return None
    state, _rto, _ato, _snd_mss, _rcv_mss, ready = _tcp_info_head.unpack_from(info)
    return ready if state == _TCP_LISTEN_STATE else None


def _sendable(static_greeting: Callable[[], bytes | None] | None) -> bytes | None:
    """
    What the port may send by itself now: the factory's static greeting
    (from C{static_greeting}, if any), if it is short enough.
    """
    if static_greeting is None:
        return None
    greeting = static_greeting()
    return greeting if greeting is not None and len(greeting) <= STATIC_LIMIT else None


def _unread(skt: socket.socket) -> int:
    """How many bytes the client has sent that nobody has read yet."""
    fcntl.ioctl(skt.fileno(), _FIONREAD, _unread_count, True)
    return _unread_count[0]


@implementer(IDirectTransport, ITLSTransport, ISystemHandle, IConsumer, IPushProducer,
             ILoggingContext)
class DirectTransport:
    """
    The transport of a connection served within the accept pass.

    It does what a L{tcp.Server} does, with the reactor's next passes
    replaced by the moment the protocol's callback returns
    (L{serve}): what a L{tcp.Server} would buffer it sends at once (the
    socket is in blocking mode, so each send says C{MSG_DONTWAIT}), and
    C{loseConnection}, C{loseWriteConnection} and C{abortConnection} take
    effect once C{connectionMade} has returned, in the order and with the
    notifications a L{tcp.Server} gives: the FIN goes out before
    C{writeConnectionLost}, and after it C{loseConnection} closes at once.
    It never reads: a client that has spoken by the time the protocol
    half-closes, or a protocol still open when C{connectionMade} returns,
    is handed to a L{tcp.Server} (L{upgrade}), which delivers what the
    client said; so is anything else that needs the reactor (a short
    write, a producer, pausing, TLS).  After a hand-over every method
    forwards to the server.

    @ivar server: the L{tcp.Server} this connection was handed to, if any.
    """

    __slots__ = ("_addr", "_closed", "_disconnecting", "_fatal", "_port", "_serving",
                 "_writable", "_writeDisconnected", "_writeDisconnecting", "protocol",
                 "server", "socket")

    def __init__(self, skt: socket.socket, protocol: IProtocol, addr: tuple[Any, ...],
                 port: GreetPort) -> None:
        self.socket = skt
        self.protocol = protocol
        self._addr = addr
        self._port = port
        self.server: tcp.Server | None = None
        # Whether a write goes to the socket: open, not handed over, no
        # FIN sent, not aborted.
        self._writable = True
        # What the protocol asked for, not done yet (see serve).
        self._disconnecting = False
        self._writeDisconnecting = False
        self._fatal: Failure | None = None  # aborted, or a send failed
        self._writeDisconnected = False  # the FIN is out
        self._closed = False
        # Within the port's serving of this connection, where what the
        # protocol asks for waits until its callback returns.
        self._serving = True

    def serve(self) -> None:
        """
        Make the connection, then do what the protocol asked for in
        C{connectionMade} (close, half-close, or nothing: hand over), as a
        L{tcp.Server} would in the reactor passes after it.
        """
        try:
            self.protocol.makeConnection(self)
        except BaseException:
            # Nothing will settle this connection now; the port aborts it
            # (GreetPort._discard), which must take effect at once.
            self._serving = False
            raise
        if self.server is not None:
            return None
        if self._fatal is not None:
            return self._close(self._fatal)
        if self._disconnecting:
            return self._close(connectionDone)
        if self._writeDisconnecting:
            try:
                spoken = _unread(self.socket)
            except OSError as e:
                return self._close(_lost_failure(e))
            if not spoken:
                # A reactor transport would deliver the client's bytes
                # before the FIN; there are none, so the FIN can go now.
                self._half_close()
                if self._closed or self.server is not None:
                    return None
                if self._fatal is not None:
                    return self._close(self._fatal)
        self.upgrade()
        return None

    def _half_close(self) -> None:
        """Send the FIN, then tell the protocol, as tcp.Server does."""
        self._writable = False
        self._writeDisconnected = True
        try:  # noqa: SIM105 (not a context manager per connection)
            self.socket.shutdown(_SHUT_WR)
        except OSError:
            pass
        # Any: providedBy is no type guard, and a cast would cost a call here.
        protocol: Any = self.protocol
        if not _half_closeable(protocol):
            protocol = IHalfCloseableProtocol(protocol, None)
            if protocol is None:
                return
        try:
            protocol.writeConnectionLost()
        except BaseException:
            failure = Failure()
            log.failure("error in writeConnectionLost of a connection from {peer}", failure,
                        peer=self._addr[0])
            if not self._closed:
                self._close(failure)

    # -- what a protocol calls --------------------------------------------

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError("Data must be bytes")
        if not self._writable:
            # Handed over, or gone: tcp.Server drops what is written once
            # the connection is closed or half-closed.
            if self.server is not None:
                self.server.write(data)
            return
        if not data:
            return
        if len(data) > DIRECT_WRITE_LIMIT:
            # Unlikely to fit in the send buffer; the reactor's transport
            # sends from this very object, where a short write here would
            # have to copy the rest.
            self.upgrade().write(data)
            return
        try:
            sent = self.socket.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._fail(_lost_failure(e))
            return
        if sent < len(data):
            self.upgrade().write(data[sent:])

    def writeSequence(self, data: Iterable[bytes]) -> None:
        data = list(data)
        for chunk in data:
            if not isinstance(chunk, bytes):
                raise TypeError("Data must be bytes")
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Half-close once everything is sent (the FIN comes later)."""
        if self.server is not None:
            self.server.loseWriteConnection()
        elif not self._closed:
            self._writeDisconnecting = True

    def loseConnection(self) -> None:
        """
        Close once everything is sent, as tcp.Server does: at once if the
        FIN is already out, else when C{connectionMade} returns.  Unread
        client bytes are answered with a reset, as by any transport's close;
        a protocol whose client may still be talking half-closes instead
        (L{loseWriteConnection}), as L{GreetProtocol} does.
        """
        if self.server is not None:
            self.server.loseConnection()
        elif self._closed or self._disconnecting:
            pass
        elif self._writeDisconnected:
            self._close(connectionDone)
        else:
            self._disconnecting = True
            if not self._serving:
                self._close(connectionDone)

    def abortConnection(self) -> None:
        if self.server is not None:
            self.server.abortConnection()
        elif not self._closed and self._fatal is not _ABORTED:
            self._fail(_ABORTED)

    def _fail(self, reason: Failure) -> None:
        """End the connection with C{reason}, sending nothing more."""
        self._writable = False
        self._fatal = reason
        if not self._serving:
            self._close(reason)

    def _close(self, reason: Failure) -> None:
        self._closed = True
        self._writable = False
        skt = self.socket
        if reason is _ABORTED:
            with contextlib.suppress(OSError):
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        skt.close()
        protocol = self.protocol
        self.protocol = None  # type: ignore[assignment]  # the cycle broken: nothing reads it now
        protocol.connectionLost(reason)

    # -- handing over to the reactor --------------------------------------

    def upgrade(self) -> tcp.Server:
        """
        Move this connection to an ordinary reactor-driven transport, with
        whatever the protocol asked for and is not done yet, and tell the
        factory (L{IDirectFactory.connectionWaiting}).
        """
        server = self.server
        if server is not None:
            return server
        if self._closed:
            raise error.ConnectionDone("the connection is closed")
        port = self._port
        protocol = self.protocol
        port.sessionno += 1
        self.server = server = port.transport(
            self.getHandle(), protocol, self._addr, port, port.sessionno, port.reactor)
        # IProtocol names no transport; every protocol has one.
        cast(TwistedProtocol, protocol).transport = server
        self._writable = False
        if self._writeDisconnected:
            # The FIN is out: tell the transport its write side is gone (as
            # its own half-close would have) so it neither writes nor
            # shuts down again.
            server._writeDisconnecting = server._writeDisconnected = True
        elif self._writeDisconnecting:
            server.loseWriteConnection()
        if self._fatal is not None:
            server.abortConnection()
        elif self._disconnecting:
            server.loseConnection()
        # Only a direct factory's connections get a DirectTransport.
        cast(IDirectFactory, port.factory).connectionWaiting(protocol)
        return server

    def _handed_over(self) -> tcp.Server | None:
        """The server to forward to, if the connection can still have one."""
        if self.server is not None:
            return self.server
        if self._closed or self._fatal is not None:
            return None
        return self.upgrade()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        server = self._handed_over()
        if server is None:
            producer.stopProducing()  # as a disconnected tcp.Server does
        else:
            server.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.server is not None:
            self.server.unregisterProducer()

    def pauseProducing(self) -> None:
        server = self._handed_over()
        if server is not None:
            server.pauseProducing()

    def resumeProducing(self) -> None:
        server = self._handed_over()
        if server is not None:
            server.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()

    def startTLS(self, contextFactory: IOpenSSLClientConnectionCreator
                 | IOpenSSLServerConnectionCreator, normal: bool = True) -> None:
        server = self._handed_over()
        if server is None:
            raise error.ConnectionDone("the connection is closed")
        server.startTLS(contextFactory, normal)

    # -- what a connection is -------------------------------------------

    @property
    def connected(self) -> bool:
        if self.server is not None:
            return bool(self.server.connected)
        return not self._closed

    @property
    def disconnecting(self) -> bool:
        if self.server is not None:
            return bool(self.server.disconnecting)
        return self._disconnecting or self._closed

    @property
    def disconnected(self) -> bool:
        if self.server is not None:
            return bool(self.server.disconnected)
        return self._closed

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self._port._buildAddr(self._addr)

    def getHost(self) -> IPv4Address | IPv6Address:
        """This connection's own address (not the listener's, which may be 0.0.0.0)."""
        if self.server is not None:
            return self.server.getHost()
        return self._port._buildAddr(_numeric(self.socket.getsockname()))

    def getHandle(self) -> socket.socket:
        if self.server is not None:
            return self.server.getHandle()
        skt = self.socket
        if type(skt) is _socket.socket and not self._closed:
            # The port accepts into the bare C socket (see GreetPort): the
            # standard library's wrapper costs a Python-level __init__ and
            # close per connection.  Whoever asks gets the wrapper.
            self.socket = skt = socket.socket(skt.family, skt.type, 0, skt.detach())
        return skt

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)

    def logPrefix(self) -> str:
        if self.server is not None:
            return self.server.logPrefix()
        protocol = self.protocol
        if ILoggingContext.providedBy(protocol):
            prefix = protocol.logPrefix()
        else:
            prefix = type(protocol).__name__
        return f"{prefix},direct,{self._addr[0]}"


def _lost_failure(e: OSError) -> Failure:
    return Failure(error.ConnectionLost(e.strerror or str(e)))


def _numeric(addr: tuple[Any, ...]) -> tuple[Any, ...]:
    """A socket address with an IPv6 scope kept in its host, as Twisted has it."""
    if len(addr) == 4 and addr[3]:
        host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        return (host, *addr[1:])
    return addr


class _ReserveDescriptor:
    """
    One descriptor kept open so that, when the process runs out, it can be
    given up to accept (and at once close) the connections that are
    waiting, instead of leaving them to time out in the backlog.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    def take(self) -> bool:
        """Hold the reserve; False if even that is not possible now."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Give the reserve up; False if it was not held."""
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        return True


_reserve = _ReserveDescriptor()


@provider(ILogObserver)
def _log_with_reserve_free(event: LogEvent) -> None:
    """
    Log C{event} with the reserve descriptor given up meanwhile.  Accept
    errors are logged while the process is out of descriptors, and an
    observer may need one: twistd's log file lists its directory to rotate,
    and without a descriptor it finds no rotated file to shift and
    overwrites the last one.  (Twisted's own accept path does no better: it
    logs once the reserve is taken back.)
    """
    released = _reserve.release()
    try:
        globalLogPublisher(event)
    finally:
        if released:
            _reserve.take()  # else _resume or the next failure takes it


# Accept errors, logged through _log_with_reserve_free.
_accept_log = Logger(namespace=__name__, observer=_log_with_reserve_free)

_PAUSE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_SKIP_ERRORS = {errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.EINTR}


def bind_address(interface: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and socket address to bind, as Twisted's TCP port has them."""
    if abstract.isIPv6Address(interface):
        # Keeps a scope (fe80::1%eth0), as Twisted does.
        info = socket.getaddrinfo(interface, port, socket.AF_INET6, socket.SOCK_STREAM,
                                  0, socket.AI_NUMERICHOST)
        return socket.AF_INET6, info[0][4]
    return socket.AF_INET, (interface, port)


class HeldServer(tcp.Server):
    """
    A L{tcp.Server} that makes its log prefix (C{logstr}) and C{repr}
    (C{repstr}) when they are asked for, from the parts Twisted makes them
    of, instead of keeping both strings for as long as the connection
    lasts: some 150 bytes of every held connection, for strings that are
    hardly ever read.  Twisted's C{__init__} still sets them; a value it
    would make again is dropped, any other (nobody sets one today) kept.
    """

    def __init__(self, sock: socket.socket, protocol: IProtocol, client: tuple[object, ...],
                 server: tcp.Port, sessionno: int, reactor: IReactorFDSet) -> None:
        # What the strings are made of, as tcp.Server.__init__ takes it:
        # the protocol's prefix now, the listening port's number while it
        # listens (Twisted forgets it once the port closes).
        self._protocol_prefix = self._getLogPrefix(protocol)
        self._protocol_name = protocol.__class__.__name__
        self._port_number = server._realPortNumber if server is not None else None
        super().__init__(sock, protocol, client, server, sessionno, reactor)

    def _made_logstr(self) -> str:
        return f"{self._protocol_prefix},{self.sessionno},{self.hostname}"

    def _made_repstr(self) -> str:
        return f"<{self._protocol_name} #{self.sessionno} on {self._port_number}>"

    # A value set that differs from the one made.  (Not looked up in
    # __dict__: asked for, CPython makes each instance a dict object of its
    # own, some 60 bytes more.)
    _logstr: str | None = None
    _repstr: str | None = None

    @property
    def logstr(self) -> str:
        return self._logstr or self._made_logstr()

    @logstr.setter
    def logstr(self, value: str) -> None:
        if value != self._made_logstr():
            self._logstr = value

    @property
    def repstr(self) -> str:
        return self._repstr or self._made_repstr()

    @repstr.setter
    def repstr(self, value: str) -> None:
        if value != self._made_repstr():
            self._repstr = value


@implementer(IAdoptingPort)
class GreetPort(tcp.Port):
    """
    A L{tcp.Port} that serves connections of a direct-capable factory within
    the accept pass and keeps accepting through resource exhaustion.

    A factory opts in by providing L{IDirectFactory}; its connections get a
    L{DirectTransport}.  Other factories (TLS, PROXY wrappers) get the
    stock transport.

    @ivar ipv6Only: for an IPv6 port, take IPv6 clients only
        (C{IPV6_V6ONLY}), so that an IPv4 port can share its port number
        and serve the IPv4 clients, which then come as the dotted quads
        they are rather than as C{::ffff:} addresses.
    """

    # Made with one; tcp.Port declares it optional, as a class default.
    factory: Factory[Any]
    ipv6Only = False
    transport = HeldServer
    _direct = False
    # What an accepted socket is made into: a DirectTransport works on the
    # bare C socket, and wraps it only when it must (getHandle).
    _accepted_socket: type = socket.socket
    _paused: IDelayedCall | None = None
    # The factory's static_greeting, when the port may send it by itself,
    # and its static_finished.
    _static: Callable[[], bytes | None] | None = None
    _static_finished: Callable[[list[tuple[tuple[Any, ...], float]]], None]
    _socket_kind = (int(socket.AF_INET), int(socket.SOCK_STREAM))
    _address = "a port not listening"  # for log lines: where it listens
    _log_prefix = "GreetPort"
    # Whether the system says how many connections wait (_ready_to_accept).
    _queue_known = False

    def __init__(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                 interface: str = "", reactor: PortReactor | None = None) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        # The reactor tcp.Port settled on (typed as its descriptor set), as
        # the clock it also is (see PortReactor).
        self._clock = cast(IReactorTime, self.reactor)
        self._accept_errors = RateLimitedLog(
            _accept_log, "accept failed: {error} ({count} in the last {interval:g} s); "
            "closed {shed} waiting connection(s); {action}",
            clock=self._clock, sums=("shed",))

    def startListening(self) -> None:
        """
        Twisted's, without its "<factory> starting on <port>" line: the
        service's start-up line says what listens where, once.
        """
        _reserve.take()
        skt, self._preexistingSocket = self._preexistingSocket, None
        if skt is None:
            skt = self._bind()
        else:
            self._shouldShutdown = False  # inherited: others may share it
        self._realPortNumber = skt.getsockname()[1]
        self.factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]  # as tcp.Port: the socket's own
        self.numberAccepts = 100
        self._direct = IDirectFactory.providedBy(self.factory)
        self._accepted_socket = _socket.socket if self._direct else socket.socket
        self._static = None
        if IStaticGreetingFactory.providedBy(self.factory):
            self._prepare_static(skt, cast(IStaticGreetingFactory, self.factory))
        self._socket_kind = (int(skt.family), int(skt.type))
        self._log_prefix = super().logPrefix()
        self._queue_known = bool(_TCP_INFO) and _ready_to_accept(skt) is not None
        if self._queue_known:
            self.numberAccepts = MAX_ACCEPTS_PER_PASS
        host = self.getHost()
        self._address = f"[{host.host}]:{host.port}" if ":" in host.host else \
            f"{host.host}:{host.port}"
        self.startReading()

    def _prepare_static(self, skt: socket.socket, factory: IStaticGreetingFactory) -> None:
        """
        Set the listening socket up for a static factory: options its
        connections inherit, and the static path if they allow it.
        """
        if _CORK:
            # Every connection of a static factory ends with its greeting,
            # so hold what is written until the FIN: the greeting and the
            # FIN then leave in one segment, not two, which halves the
            # kernel's work per connection on both sides.  (Anything held
            # longer goes out after 200 ms all the same.)
            with contextlib.suppress(OSError):
                skt.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
        try:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, STATIC_SEND_TIMEOUT)
        except OSError:
            return  # its sends could block for ever: the protocol's path only
        self._static = factory.static_greeting
        self._static_finished = factory.static_finished

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        if self.ipv6Only and self.addressFamily == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return skt

    def _bind(self) -> socket.socket:
        """A socket bound to this port's address and listening."""
        assert self.port is not None  # None only when made from a descriptor, never bound
        skt = None
        try:
            skt = self.createInternetSocket()
            skt.bind(bind_address(self.interface, self.port)[1])
        except OSError as e:
            if skt is not None:
                skt.close()
            raise error.CannotListenError(self.interface, self.port, e) from None
        skt.listen(self.backlog)
        return skt

    def _logConnectionLostMsg(self) -> None:
        """The service logs what it listens on and when it stops."""

    def logPrefix(self) -> str:
        # The reactor asks for it on every accept pass; tcp.Port formats it
        # each time.
        return self._log_prefix

    def doRead(self) -> None:
        try:
            accepted = self._accept_batch(self.numberAccepts)
        except Exception:
            # An exception that reached the reactor would disconnect this
            # port, and the service would stop accepting for good; as
            # Twisted's own doRead does, log it and keep listening.
            log.failure("error accepting connections on {address}", address=self._address)
            return
        if self._queue_known:
            return  # each pass takes what waits (see _accept_batch)
        # Twisted's heuristic: accept more per pass while the backlog keeps
        # filling them (up to a limit), fewer when it does not.
        if accepted == self.numberAccepts:
            self.numberAccepts = min(accepted + 20, MAX_ACCEPTS_PER_PASS)
        else:
            self.numberAccepts = max(1, accepted)

    def adoptConnection(self, fd: int) -> None:
        """
        Serve the connection at C{fd}, which this port now owns, as if it
        had been accepted here: it reached this port's socket while this
        process was not there to accept it, and its supervisor did.
        """
        family, kind = self._socket_kind
        skt = socket.socket(family, kind, 0, fd)
        try:
            addr = skt.getpeername()
        except OSError:  # its client has reset it already
            skt.close()
            return
        self._accept_batch(1, lambda: (skt.detach(), addr))

    def _accept_batch(self, limit: int, accept: Accept | None = None) -> int:
        """
        Accept and serve up to C{limit} connections (from C{accept}, the
        listening socket's by default); how many were accepted.

        While the factory's greeting is static (L{IStaticGreetingFactory}),
        each connection is sent it straight from the accepted descriptor
        and closed: four system calls (accept, send, the check for unread
        bytes, close) and no objects.  One that needs more (its client has
        spoken, the send fell short) continues with a protocol from
        L{IStaticGreetingFactory.resume_protocol}, as every other
        connection starts with one from C{buildProtocol}.
        """
        static_greeting = self._static
        listening = self.socket
        if accept is None:
            # socket.accept() looks the family and type up through enum
            # conversions for every connection; the listening socket's own
            # numbers, read once, are all a connected socket needs.
            accept = c_accept(listening)
            queue_known = self._queue_known
        else:
            # Accepted elsewhere: without this socket's send timeout, a send
            # could block.
            static_greeting = None
            queue_known = False
        # How many connections are known to wait: at first the one the
        # reactor saw.  When the system can say (_ready_to_accept), the
        # pass asks whenever those are taken, and ends when none wait:
        # an accept that finds none costs the kernel a socket made and
        # destroyed and Python an exception, and another pass of the
        # reactor costs several times more than asking.
        ready = 1 if queue_known else limit
        static = _sendable(static_greeting)
        family, kind = self._socket_kind
        Socket = self._accepted_socket
        factory = self.factory
        direct = self._direct
        build_addr = self._buildAddr
        seconds = self._clock.seconds
        # What the static path served (each client's address and the
        # seconds it took), counted and logged at the end of the pass.
        served: list[tuple[tuple[Any, ...], float]] = []
        accepted = 0
        # The time each connection's service counts from: the accept call.
        mark = seconds()
        try:
            for _ in range(limit):
                if not ready:  # those known to wait are taken: any more?
                    ready = (_ready_to_accept(listening) or 0) if queue_known else 0
                    if not ready:
                        break
                ready -= 1
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _SKIP_ERRORS:
                        continue
                    self._accept_failed(e)
                    break
                accepted += 1
                if len(addr) == 4 and addr[3]:
                    # An IPv6 link-local peer: its scope in the host, as
                    # Twisted has it, for either path.
                    try:
                        addr = _numeric(addr)
                    except OSError:
                        # One connection's failure must not cost the others theirs.
                        log.failure("error setting up a connection from {peer}", peer=addr[0])
                        _close_fd(fd)
                        continue
                sent = -1  # the port sent nothing
                if static is not None:
                    try:
                        sent = _write(fd, static)
                    except OSError:
                        # Timed out, or the client is gone already: the
                        # protocol tries again, and reports what it finds.
                        sent = 0
                    if sent == len(static):
                        try:
                            _ioctl(fd, _FIONREAD, _unread_count, True)
                        except OSError:
                            _unread_count[0] = 1  # let the protocol's path find out
                        if not _unread_count[0]:
                            # Nothing to hear out: the close sends the FIN
                            # after the greeting.
                            _close_fd(fd)
                            now = seconds()
                            served.append((addr, now - mark))
                            mark = now
                            continue
                    else:
                        # The kernel is short of room (or the client went):
                        # the rest of this pass does without the static path.
                        static_greeting = None
                self._serve(Socket(family, kind, 0, fd), addr, sent, factory, direct,
                            build_addr)
                # That connection may have taken the last place under a
                # limit; the factory says again.
                static = _sendable(static_greeting)
                mark = seconds()
        finally:
            if served:
                self._static_finished(served)
        return accepted

    def _serve(self, skt: socket.socket, addr: tuple[Any, ...], sent: int,
               factory: Factory[Any], direct: bool,
               build_addr: Callable[[tuple[Any, ...]], IPv4Address | IPv6Address]) -> None:
        """
        Serve one accepted connection through a protocol; C{sent}: how much
        of the static greeting the port has sent it already (-1: the port
        sent it nothing).
        """
        transport: DirectTransport | tcp.Server | None = None
        try:
            if sent >= 0:
                protocol = cast(IStaticGreetingFactory, factory).resume_protocol(
                    build_addr(addr), sent)
            else:
                protocol = factory.buildProtocol(build_addr(addr))
            if protocol is None:
                skt.close()
                return
            if direct:
                transport = DirectTransport(skt, protocol, addr, self)
                transport.serve()
            else:
                self.sessionno += 1
                transport = self.transport(
                    skt, protocol, addr, self, self.sessionno, self.reactor)
                protocol.makeConnection(transport)
        except Exception:
            # One connection's failure must not cost the others theirs.
            log.failure("error setting up a connection from {peer}", peer=addr[0])
            self._discard(skt, transport)

    def _discard(self, skt: socket.socket, transport: DirectTransport | tcp.Server | None) -> None:
        """
        End a connection whose set-up failed, through its transport if it
        has one (so its protocol hears of it and what it counted is
        released), else by closing the socket.
        """
        if transport is not None and getattr(transport, "connected", False):
            try:
                transport.abortConnection()
                return
            except Exception:
                log.failure("error aborting a connection that failed to start")
        skt.close()

    def _accept_failed(self, e: OSError) -> None:
        if e.errno not in _PAUSE_ERRORS:
            self._accept_errors.note(error=os.strerror(e.errno or 0),
                                    action="continuing", shed=0, key=e.errno)
            return
        shed = 0
        if e.errno in (errno.EMFILE, errno.ENFILE) and _reserve.release():
            # Accept and close what is waiting, so those clients learn now
            # instead of timing out in the backlog.
            try:
                # What waits cannot exceed the backlog.
                for _ in range(self.backlog or 4096):
                    os.close(c_accept(self.socket)()[0])
                    shed += 1
            except OSError:
                pass
            _reserve.take()
        # Serving the backlog on the way out (connectionLost), the port is
        # closing: a pause would outlive it, after loseConnection cancelled
        # the one before.
        closing = self.disconnecting
        self._accept_errors.note(
            error=os.strerror(e.errno or 0), key=e.errno, shed=shed,
            action="the port is closing" if closing
            else f"pausing accepts for {ACCEPT_PAUSE:g} s at a time")
        if not closing:
            self.stopReading()
            self._paused = self._clock.callLater(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        _reserve.take()  # in case taking it back failed while we were out
        if self.connected and not self.disconnecting:
            self.startReading()

    def loseConnection(self, connDone: Failure | None = None) -> Deferred[None] | None:
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
            self._paused = None
        if connDone is None:
            return super().loseConnection()
        return super().loseConnection(connDone)

    stopListening = loseConnection

    def connectionLost(self, reason: Failure) -> None:
        # The kernel has completed the handshake of the connections still in
        # the backlog, and closing the listening socket would reset them:
        # serve them, right before it closes (the drain then covers them).
        try:
            for _ in range(BACKLOG_PASSES):
                if not self._accept_batch(self.numberAccepts + 100):
                    break
        except Exception:
            # The socket must close all the same, or the service's stop
            # would wait for it for ever.
            log.failure("error serving the backlog of {address}", address=self._address)
        super().connectionLost(reason)


def listen(reactor: PortReactor, port: int, factory: IProtocolFactory, backlog: int = 50,
           interface: str = "", ipv6_only: bool = False) -> GreetPort:
    """Like C{reactor.listenTCP}, with a L{GreetPort} (see L{GreetPort.ipv6Only})."""
    p = GreetPort(port, factory, backlog, interface, reactor)
    p.ipv6Only = ipv6_only
    p.startListening()
    return p


def adopt(reactor: PortReactor, fileno: int, family: int,
          factory: IProtocolFactory) -> GreetPort:
    """Like C{reactor.adoptStreamPort}, for an inherited TCP socket."""
    p = GreetPort._fromListeningDescriptor(reactor, fileno, family, factory)
    p.startListening()
    return p


class GreetReactor:
    """
    The reactor as endpoints see it: the same, except that TCP listeners
    (plain, TLS, or inherited from systemd) are L{GreetPort}s.  Every
    endpoint type keeps working; the ones that listen on TCP get the port
    that serves greetings within the accept pass and survives running out
    of descriptors.

    @ivar _ipv6_only: whether the IPv6 TCP listeners it makes take IPv6
        clients only (L{GreetPort.ipv6Only}).
    """

    def __init__(self, reactor: ListeningReactor, ipv6_only: bool = False) -> None:
        self._reactor = reactor
        self._ipv6_only = ipv6_only

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, portNumber: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        return listen(self._reactor, portNumber, factory, backlog, interface,
                      ipv6_only=self._ipv6_only)

    def listenSSL(self, portNumber: int, factory: IProtocolFactory,
                  contextFactory: IOpenSSLServerConnectionCreator, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        # What the reactor's own listenSSL does, on our port.
        from twisted.protocols.tls import TLSMemoryBIOFactory

        listening = self.listenTCP(portNumber, TLSMemoryBIOFactory(contextFactory, False, factory),
                                   backlog, interface)
        cast(tcp.Port, listening)._type = "TLS"  # what every listenTCP here gives
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int,
                        factory: IProtocolFactory) -> IListeningPort:
        actual = socket_family(fileDescriptor)
        if actual != addressFamily and {actual, addressFamily} <= _INET:
            # systemd's ListenStream=PORT is an IPv6 socket that also takes
            # IPv4; read as the family the string names, every address
            # would come out garbled.
            log.warn("inherited socket {fd} is {actual}, not {named}; using {actual}",
                     fd=fileDescriptor, actual=actual.name,
                     named=socket.AddressFamily(addressFamily).name)
            addressFamily = actual
        if addressFamily in _INET:
            return adopt(self._reactor, fileDescriptor, addressFamily, factory)
        return self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)


_INET = {socket.AF_INET, socket.AF_INET6}


def socket_family(fileDescriptor: int) -> socket.AddressFamily:
    """The address family of the socket at C{fileDescriptor}."""
    probe = socket.socket(fileno=os.dup(fileDescriptor))
    try:
        return probe.family
    finally:
        probe.close()
