"""
A TCP listening port for servers that speak first and leave.

Stock Twisted gives every accepted connection a full reactor transport:
non-blocking and close-on-exec flags set with four fcntl calls, a log prefix
formatted, the socket registered with epoll for reading, modified for
writing, unregistered, and a second reactor pass to write and close.  A
greeting that fits in the socket's send buffer needs none of that, so
L{GreetPort} hands such connections a L{DirectTransport} that writes at once
and closes at once, inside the accept pass.  The moment a connection needs
the reactor after all (a short write, a client that has spoken, a protocol
that registers a producer or stays open), the direct transport hands the
socket to an ordinary L{tcp.Server} and steps aside, so protocols see normal
Twisted semantics either way.

L{GreetPort} also owns the accept loop, so accept errors cannot turn into a
busy loop or a log flood: running out of descriptors sheds the waiting
connections through a reserve descriptor (as Twisted does) and pauses
accepting briefly; each kind of error is logged at most once a second, with
a count.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios

from twisted.internet import error, tcp
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from tcpgreet.logs import RateLimitedLog
from tcpgreet.reuseport import bind_address

log = Logger()

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

_DONTWAIT = socket.MSG_DONTWAIT
_ABORTED = Failure(error.ConnectionAborted())
_LINGER_RESET = struct.pack("ii", 1, 0)
_FIONREAD = termios.FIONREAD


_unread_count = array.array("i", [0])


def _unread(skt: socket.socket) -> int:
    """How many bytes the client has sent that nobody has read yet."""
    fcntl.ioctl(skt.fileno(), _FIONREAD, _unread_count, True)
    return _unread_count[0]


class DirectTransport:
    """
    The transport of a connection served within the accept pass.

    Writes go straight to the socket (it is in blocking mode, so each send
    says C{MSG_DONTWAIT}); closing closes the socket at once.  Anything that
    needs the reactor calls L{upgrade}, which moves the socket, the protocol
    and whatever is left to an ordinary L{tcp.Server}.

    @ivar server: the L{tcp.Server} this connection was upgraded to, if any.
    """

    __slots__ = ("_addr", "_halfClosed", "_port", "connected", "disconnected",
                 "disconnecting", "protocol", "server", "socket")

    def __init__(self, skt: socket.socket, protocol, addr: tuple, port: GreetPort) -> None:
        self.socket = skt
        self.protocol = protocol
        self._addr = addr
        self._port = port
        self.server: tcp.Server | None = None
        self._halfClosed = False
        self.connected = True
        self.disconnecting = False
        self.disconnected = False

    # -- the fast path --------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.server is not None:
            return self.server.write(data)
        if not self.connected or not data:
            return None
        if len(data) > DIRECT_WRITE_LIMIT:
            # Unlikely to fit in the send buffer; the reactor's transport
            # sends from this very object, where a short write here would
            # have to copy the rest.
            return self.upgrade().write(data)
        try:
            sent = self.socket.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            return self._lost(e)
        if sent < len(data):
            self.upgrade().write(data[sent:])
        return None

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """
        Half-close.  With everything written and nothing unread from the
        client, the FIN can follow the greeting straight away and the
        protocol hears of it at once; otherwise the reactor takes over.
        """
        if self.server is not None:
            return self.server.loseWriteConnection()
        if not self.connected:
            return None
        try:
            if _unread(self.socket):
                return self._handOver().loseWriteConnection()
        except OSError as e:
            return self._lost(e)
        # The FIN is owed, not yet sent: a protocol that closes in
        # writeConnectionLost (ours does) gets it from close() without a
        # shutdown call; one that stays open gets the shutdown on upgrade.
        self._halfClosed = True
        writeConnectionLost = getattr(self.protocol, "writeConnectionLost", None)
        if writeConnectionLost is not None:
            writeConnectionLost()
        return None

    def loseConnection(self) -> None:
        """
        Close now: everything written is already in the kernel.  Like a
        reactor transport's close, this answers unread client bytes with a
        reset; a protocol whose client may still be talking half-closes
        instead (L{loseWriteConnection}), as L{GreetProtocol} does.
        """
        if self.server is not None:
            return self.server.loseConnection()
        if not self.connected:
            return None
        return self._close(connectionDone)

    def abortConnection(self) -> None:
        if self.server is not None:
            return self.server.abortConnection()
        if not self.connected:
            return None
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return self._close(_ABORTED)

    def _lost(self, e: OSError) -> None:
        self._close(Failure(error.ConnectionLost(e.strerror or str(e))))

    def _close(self, reason: Failure) -> None:
        self.connected = False
        self.disconnecting = True
        self.disconnected = True
        self.socket.close()
        protocol, self.protocol = self.protocol, None
        protocol.connectionLost(reason)

    # -- handing over to the reactor --------------------------------------

    def _handOver(self) -> tcp.Server:
        """
        The client has spoken: deliver what it said, as any transport would,
        and let the reactor take the connection from here.
        """
        data = self.socket.recv(65536, _DONTWAIT)
        if data:
            self.protocol.dataReceived(data)
        return self.upgrade()

    def upgrade(self) -> tcp.Server:
        """Move this connection to an ordinary reactor-driven transport."""
        if self.server is None:
            port = self._port
            port.sessionno += 1
            self.server = server = port.transport(
                self.socket, self.protocol, self._addr, port, port.sessionno, port.reactor)
            self.protocol.transport = server
            if self._halfClosed:
                # Pay the half-close owed since loseWriteConnection, and
                # tell the transport its write side is gone (as its own
                # loseWriteConnection would have) so it neither writes nor
                # shuts down again.
                with contextlib.suppress(OSError):
                    self.socket.shutdown(socket.SHUT_WR)
                server._writeDisconnecting = server._writeDisconnected = True
        return self.server

    def registerProducer(self, producer, streaming: bool) -> None:
        self.upgrade().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.upgrade().unregisterProducer()

    def pauseProducing(self) -> None:
        self.upgrade().pauseProducing()

    def resumeProducing(self) -> None:
        self.upgrade().resumeProducing()

    def stopProducing(self) -> None:
        self.upgrade().stopProducing()

    # -- what a connection is -------------------------------------------

    def getPeer(self):
        return self._port._buildAddr(self._addr)

    def getHost(self):
        return self._port.getHost()

    def getHandle(self) -> socket.socket:
        return self.socket

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)

    def logPrefix(self) -> str:
        return self._port.logPrefix()


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


def _log_with_reserve_free(event: dict) -> None:
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


class IAdoptingPort(Interface):
    """A listening port that can serve a connection accepted elsewhere."""

    def adoptConnection(fd: int) -> None:  # noqa: N805 (zope: no self)
        """Serve the connected socket at C{fd}, which the port now owns."""


@implementer(IAdoptingPort)
class GreetPort(tcp.Port):
    """
    A L{tcp.Port} that serves connections of a direct-capable factory within
    the accept pass and keeps accepting through resource exhaustion.

    A factory opts in with a true C{directTransport} attribute: its
    protocols must write, close, and otherwise treat the transport as any
    C{ITCPTransport}; anything they do that needs the reactor upgrades the
    connection.  Other factories (TLS, PROXY wrappers) get the stock
    transport.

    @ivar ipv6Only: for an IPv6 port, take IPv6 clients only
        (C{IPV6_V6ONLY}), so that an IPv4 port can share its port number
        and serve the IPv4 clients, which then come as the dotted quads
        they are rather than as C{::ffff:} addresses.
    """

    ipv6Only = False
    _direct = False
    _paused = None
    _socketKind = (int(socket.AF_INET), int(socket.SOCK_STREAM))
    _address = "a port not listening"  # for log lines: where it listens

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._acceptErrors = RateLimitedLog(
            _accept_log, "accept failed: {error} ({count} in the last {interval:g} s); "
            "closed {shed} waiting connection(s); {action}",
            clock=self.reactor, sums=("shed",))

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
        self.fileno = skt.fileno
        self.numberAccepts = 100
        self._direct = bool(getattr(self.factory, "directTransport", False))
        self._socketKind = (int(skt.family), int(skt.type))
        host = self.getHost()
        self._address = f"[{host.host}]:{host.port}" if ":" in host.host else \
            f"{host.host}:{host.port}"
        self.startReading()

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        if self.ipv6Only and self.addressFamily == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return skt

    def _bind(self) -> socket.socket:
        """A socket bound to this port's address and listening."""
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

    def doRead(self) -> None:
        try:
            accepted = self._acceptBatch(self.numberAccepts)
        except Exception:
            # An exception that reached the reactor would disconnect this
            # port, and the service would stop accepting for good; as
            # Twisted's own doRead does, log it and keep listening.
            log.failure("error accepting connections on {address}", address=self._address)
            return
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
        family, kind = self._socketKind
        skt = socket.socket(family, kind, 0, fd)
        try:
            addr = skt.getpeername()
        except OSError:  # its client has reset it already
            skt.close()
            return
        self._acceptBatch(1, lambda: (skt.detach(), addr))

    def _acceptBatch(self, limit: int, accept=None) -> int:
        """
        Accept and serve up to C{limit} connections (from C{accept}, the
        listening socket's by default); how many were accepted.
        """
        # socket.accept() looks the family and type up through enum
        # conversions for every connection; the listening socket's own
        # numbers, read once, are all a connected socket needs.
        if accept is None:
            accept = self.socket._accept
        family, kind = self._socketKind
        Socket = socket.socket
        factory = self.factory
        direct = self._direct
        buildAddr = self._buildAddr
        accepted = 0
        for _ in range(limit):
            try:
                fd, addr = accept()
                skt = Socket(family, kind, 0, fd)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _SKIP_ERRORS:
                    continue
                self._acceptFailed(e)
                break
            accepted += 1
            transport = None
            try:
                if len(addr) == 4 and addr[3]:
                    # An IPv6 link-local peer: keep its scope in the host.
                    host = socket.getnameinfo(addr,
                                              socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = factory.buildProtocol(buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                if direct:
                    transport = DirectTransport(skt, protocol, addr, self)
                    protocol.makeConnection(transport)
                    if transport.connected and transport.server is None:
                        transport.upgrade()
                else:
                    self.sessionno += 1
                    transport = self.transport(
                        skt, protocol, addr, self, self.sessionno, self.reactor)
                    protocol.makeConnection(transport)
            except Exception:
                # One connection's failure must not cost the others theirs.
                log.failure("error setting up a connection from {peer}", peer=addr[0])
                self._discard(skt, transport)
        return accepted

    def _discard(self, skt: socket.socket, transport) -> None:
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

    def _acceptFailed(self, e: OSError) -> None:
        if e.errno not in _PAUSE_ERRORS:
            self._acceptErrors.note(error=os.strerror(e.errno or 0),
                                    action="continuing", shed=0, key=e.errno)
            return
        shed = 0
        if e.errno in (errno.EMFILE, errno.ENFILE) and _reserve.release():
            # Accept and close what is waiting, so those clients learn now
            # instead of timing out in the backlog.
            try:
                # What waits cannot exceed the backlog.
                for _ in range(self.backlog or 4096):
                    os.close(self.socket._accept()[0])
                    shed += 1
            except OSError:
                pass
            _reserve.take()
        # Serving the backlog on the way out (connectionLost), the port is
        # closing: a pause would outlive it, after loseConnection cancelled
        # the one before.
        closing = self.disconnecting
        self._acceptErrors.note(
            error=os.strerror(e.errno or 0), key=e.errno, shed=shed,
            action="the port is closing" if closing
            else f"pausing accepts for {ACCEPT_PAUSE:g} s at a time")
        if not closing:
            self.stopReading()
            self._paused = self.reactor.callLater(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        _reserve.take()  # in case taking it back failed while we were out
        if self.connected and not self.disconnecting:
            self.startReading()

    def loseConnection(self, connDone=None):
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
            self._paused = None
        if connDone is None:
            return super().loseConnection()
        return super().loseConnection(connDone)

    stopListening = loseConnection

    def connectionLost(self, reason) -> None:
        # The kernel has completed the handshake of the connections still in
        # the backlog, and closing the listening socket would reset them:
        # serve them, right before it closes (the drain then covers them).
        try:
            for _ in range(BACKLOG_PASSES):
                if not self._acceptBatch(self.numberAccepts + 100):
                    break
        except Exception:
            # The socket must close all the same, or the service's stop
            # would wait for it for ever.
            log.failure("error serving the backlog of {address}", address=self._address)
        super().connectionLost(reason)


def listen(reactor, port: int, factory: IProtocolFactory, backlog: int = 50,
           interface: str = "", ipv6_only: bool = False) -> GreetPort:
    """Like C{reactor.listenTCP}, with a L{GreetPort} (see L{GreetPort.ipv6Only})."""
    p = GreetPort(port, factory, backlog, interface, reactor)
    p.ipv6Only = ipv6_only
    p.startListening()
    return p


def adopt(reactor, fileno: int, family: int, factory: IProtocolFactory) -> GreetPort:
    """Like C{reactor.adoptStreamPort}, for an inherited TCP socket."""
    p = GreetPort._fromListeningDescriptor(reactor, fileno, family, factory)
    p.startListening()
    return p
