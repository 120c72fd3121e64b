"""
The greeting service itself: a protocol that speaks first and leaves, and the
factory that holds what every connection shares.

The protocol half-closes once its greeting is written: the client reads the
greeting followed by EOF, and the connection is closed fully as soon as the
client has nothing more to say (at once, for a client that never spoke).
Closing outright while the client's bytes lie unread would answer them with
a reset, which can destroy the greeting before the client reads it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IPullProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpgreet.deadlines import Deadlines
from tcpgreet.greeting import Clock, Greeting
from tcpgreet.interfaces import IDirectTransport, IProxiedFactory, IStaticGreetingFactory
from tcpgreet.limits import ConnectionLimits
from tcpgreet.logs import FastLogger, RateLimitedLog, burst
from tcpgreet.stats import Stats

log = FastLogger()

_direct = IDirectTransport.providedBy

DEFAULT_TIMEOUT = 10.0

# A transport that encrypts (TLS) copies what it is given, so a greeting
# longer than this is fed to it a chunk at a time: a client that reads slowly
# then holds one chunk of server memory, not a copy of the greeting.  A plain
# byte stream gets the whole greeting at once and sends it from the one
# shared copy.
CHUNK = 65536

# The send buffer of a connection with a greeting longer than CHUNK.  Left
# to autotuning, the kernel lets each socket buffer megabytes, so a client
# that opens a tiny receive window and never reads would have the server
# copy the whole greeting into kernel memory, for every such connection.
# (Linux doubles the value for its own bookkeeping.)
LONG_GREETING_SEND_BUFFER = 65536

# How long a connection whose greeting is written may wait for the client
# to close its side before the server closes anyway (see writeConnectionLost).
LINGER = 2.0

# The per-connection log line, over TLS or not.
_GREETED = "{peer} port {port}: {outcome}, {bytes} bytes in {duration_ms} ms"
_GREETED_TLS = "{peer} port {port}: {outcome} over TLS, {bytes} bytes in {duration_ms} ms"
_CUT_SHORT = ("{peer} port {port}: {outcome} ({reason}) after {bytes} of {length} bytes, "
              "{duration_ms} ms")
_CUT_SHORT_TLS = ("{peer} port {port}: {outcome} over TLS ({reason}) after {bytes} of "
                  "{length} bytes, {duration_ms} ms")


def _greeted_event(host: str, port: int, length: int, duration: float, tls: bool) -> dict:
    """
    The log event of a greeted connection, on either path: the event
    C{log.info} would build, keys in its order, built in one step.  A
    literal costs half what keywords merged with the C{log_} keys do, and
    this is the one line per connection.

    Its duration is rounded to the nearest microsecond (a tie to the even
    one) through an integer: C{round(ms, 3)}, which gives the same but for
    ties, goes through decimal text at three times the cost.
    """
    return {"peer": host, "port": port, "outcome": "greeted", "bytes": length,
            "duration_ms": round(duration * 1e6) / 1000, "reason": None, "tls": tls,
            "log_logger": log, "log_level": LogLevel.info, "log_namespace": log.namespace,
            "log_source": log.source, "log_format": _GREETED_TLS if tls else _GREETED,
            "log_time": time.time()}


# Why the server cut a connection short.
TIMEOUT = "timeout"
DRAIN = "drain"


def _is_byte_stream(transport: ITransport) -> bool:
    """
    Whether C{transport} is a plain byte stream (TCP, UNIX) that can
    half-close and sends what it is given without copying it.  Look on the
    class: wrappers such as TLS forward unknown attributes to the transport
    beneath them, and half-closing that would cut the TLS stream short.
    """
    return hasattr(type(transport), "loseWriteConnection")


def _limit_send_buffer(transport: ITransport) -> None:
    handle = getattr(transport, "getHandle", None)
    skt = handle() if handle is not None else None
    if isinstance(skt, socket.socket):
        with contextlib.suppress(OSError):
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LONG_GREETING_SEND_BUFFER)


def _unsent(transport: object) -> int | None:
    """What a reactor transport still held (L{None}: cannot tell)."""
    held = getattr(transport, "dataBuffer", None)
    if held is None:
        return None
    offset: int = getattr(transport, "offset", 0)
    return len(held) - offset + getattr(transport, "_tempDataLen", 0)


def _bytes_out(protocol: GreetProtocol, tls: bool) -> int:
    """
    How much of the greeting left the server: what the protocol wrote, less
    what a byte-stream transport still held when the connection ended.
    Over TLS, nothing leaves before the handshake is done: the greeting
    waits for it, never sent in clear.
    """
    if tls and not protocol.handshook:
        return 0
    unsent = _unsent(protocol.transport)
    if unsent is None:
        return protocol.written
    return max(0, protocol.written - unsent)


def tls_reason(reason: Failure, handshook: bool) -> str:
    """
    Why a TLS connection ended, in a few words: OpenSSL's own reasons
    (C{tlsv1 alert unknown ca}, C{http request}) rather than the list of
    tuples an C{SSL.Error} prints as, and whether the handshake failed.
    """
    value = reason.value
    details = value.args[0] if reason.check(SSL.Error) and value is not None and value.args \
        else None
    reasons = [entry[-1] for entry in details if isinstance(entry, tuple) and entry[-1]] \
        if isinstance(details, list) else []
    why = ", ".join(dict.fromkeys(reasons)) or reason.getErrorMessage()
    if not handshook:
        if reason.check(error.ConnectionClosed):
            # Twisted's TLS reports the client's EOF and its reset alike.
            why = "connection closed"
        return f"TLS handshake failed: {why}"
    return f"TLS error: {why}" if reason.check(SSL.Error) else why


def peer_host_port(address: IAddress | None) -> tuple[str, int]:
    """
    The host and port of an address, for templates and logs.  A UNIX socket
    peer has no port; its name (usually empty) stands for the host.
    """
    host: str | None = getattr(address, "host", None)
    if host is not None:
        # An address with a host (IPv4Address, IPv6Address) has a port:
        # read as such, once per connection.
        return host, address.port  # type: ignore[union-attr]
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name or "unix", 0


def was_greeted(protocol: GreetProtocol, reason: Failure, tls: bool) -> bool:
    """
    Whether the connection of C{protocol}, which ended for C{reason}, got
    its whole greeting: the FIN followed the whole greeting (a byte
    stream), or, over TLS (C{tls}), the handshake was done and nothing of
    the greeting was left unsent when the connection ended; many TLS
    clients leave without close_notify, which Twisted reports as a lost
    connection.
    """
    if protocol.write_done:
        return True
    if protocol.written != protocol.length or protocol.cut_short is not None:
        return False
    if tls and not protocol.handshook:
        return False
    if reason.check(error.ConnectionDone) is not None:
        return True
    return (protocol.closing and protocol.handshook
            and not _unsent(getattr(protocol.transport, "transport", None)))


@implementer(IPullProducer)
class _ChunkedGreeting:
    """Write a long greeting one chunk per request of the transport."""

    def __init__(self, protocol: GreetProtocol, greeting: bytes) -> None:
        self._protocol = protocol
        self._greeting = memoryview(greeting)
        self._offset = protocol.written

    def resumeProducing(self) -> None:
        chunk = self._greeting[self._offset:self._offset + CHUNK]
        self._offset += len(chunk)
        protocol = self._protocol
        protocol.transport.write(bytes(chunk))
        protocol.written = self._offset
        if self._offset >= len(self._greeting):
            protocol.transport.unregisterProducer()
            protocol.greeting_written()

    def stopProducing(self) -> None:
        self._greeting = memoryview(b"")


class InProgress(TypingProtocol):
    """
    A connection a drain waits for, and may cut short: a L{GreetProtocol},
    or the PROXY header reader of one (L{tcpgreet.proxy}).
    """

    def cut(self, why: str) -> None:
        """End the connection now, for C{why} (L{TIMEOUT}, L{DRAIN})."""


class IGreetTransport(ITCPTransport, IConsumer):
    """
    A connection's transport as L{GreetProtocol} uses it: a TCP one, which
    takes a producer for a long greeting.  A UNIX or TLS transport offers
    the same but for half-closing, which the protocol asks of the class
    first (L{_is_byte_stream}).
    """


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class GreetProtocol(Protocol):
    """
    Send the greeting as soon as the connection is made, then close; what
    the client sends is dropped unread.

    @ivar peer: the client's address, as the factory admitted it.
    @ivar written: greeting bytes handed to the transport so far, or sent
        by the port before there was a protocol (see
        L{GreetFactory.resume_protocol}).
    @ivar waited: the connection outlived the accept pass, and the factory
        holds it, with a deadline (see L{GreetFactory.connectionWaiting}).
    """

    factory: GreetFactory
    # Set by makeConnection before any method here runs.
    transport: IGreetTransport
    peer: IAddress | None = None
    started = 0.0
    written = 0
    length = 0
    heard = False
    read_done = False
    write_done = False
    closing = False
    handshook = False
    cut_short: str | None = None
    waited = False

    def connectionMade(self) -> None:
        factory = self.factory
        self.started = factory.seconds()
        if self.peer is None:
            self.peer = self.transport.getPeer()
        greeting = factory.greeting_for(self.peer)
        self.length = len(greeting)
        if self.length > CHUNK:
            _limit_send_buffer(self.transport)
        if self.length <= CHUNK or _is_byte_stream(self.transport):
            self.transport.write(greeting[self.written:])  # the same bytes, if none went yet
            self.written = self.length
            self.greeting_written()
        else:
            self.transport.registerProducer(_ChunkedGreeting(self, greeting), False)
        if self.connected and not self.waited and not _direct(self.transport):
            # Still open: the transport cannot finish within this call.  A
            # direct transport finishes after it returns, or hands the
            # connection to the reactor and then says so (through
            # IDirectFactory.connectionWaiting, which sets its deadline).
            factory.connectionWaiting(self)

    def greeting_written(self) -> None:
        """Everything is handed to the transport: close our side after it."""
        # A transport that cannot half-close (TLS) closes outright.
        if _is_byte_stream(self.transport):
            self.transport.loseWriteConnection()
        else:
            self.closing = True
            self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (TLS transports tell their protocol)."""
        self.handshook = True

    def dataReceived(self, data: bytes) -> None:
        """A greeting port has nothing to hear: drop it, buffer nothing."""
        self.heard = True

    def writeConnectionLost(self) -> None:
        # The greeting is out, followed by our FIN.  Closing now is safe
        # only if the client cannot have anything in flight: it said
        # nothing, and we were not away long enough for it to start (the
        # connection was served within the accept pass).  Otherwise wait for
        # its EOF, briefly: a close that meets the client's bytes is answered
        # with a reset, and a reset can destroy a greeting not yet read.
        self.write_done = True
        if self.read_done or (not self.heard and not self.waited):
            self.transport.loseConnection()
        elif self.waited:
            self.factory.connection_lingering(self)

    def readConnectionLost(self) -> None:
        # The client has finished sending; its greeting may still be going.
        self.read_done = True
        if self.write_done:
            self.transport.loseConnection()

    def cut(self, why: str) -> None:
        """
        End the connection for C{why} (L{TIMEOUT}, L{DRAIN}): abort it if
        its greeting is not out yet; if it is, the client has had its time
        to read it, so simply close.
        """
        if not self.connected:
            return
        if self.write_done:
            self.transport.loseConnection()
        else:
            self.cut_short = why
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.factory.connection_finished(self, reason)


if TYPE_CHECKING:
    # Twisted's Factory is generic in its annotations; at run time, only
    # in releases newer than the oldest tcpgreet supports.
    _Factory = Factory[GreetProtocol]
else:
    _Factory = Factory


@implementer(IStaticGreetingFactory, IProxiedFactory)
class GreetFactory(_Factory):
    """
    Configuration and shared state for every L{GreetProtocol}: the greeting,
    limits, counters, and the connections still in progress.

    @ivar greeting: the L{Greeting} sent now; replacing it (on reload) is a
        single reference swap, so every connection gets one greeting whole.
    @ivar connections: the number of the latest connection (C{{connection}}).
    @ivar waiting: connections that outlived the accept pass (each with a
        deadline, C{timeout} seconds after, when it is cut short), and
        connections whose PROXY header is still to come; a drain waits for
        them.  One timer serves every deadline (L{Deadlines}).
    """

    protocol = GreetProtocol
    noisy = False  # one line per connection is ours to write, not Factory's

    def __init__(self, greeting: Greeting, quiet: bool = False,
                 limits: ConnectionLimits | None = None,
                 timeout: float = DEFAULT_TIMEOUT, clock: Clock | None = None,
                 *, reactor: IReactorTime) -> None:
        self.greeting = greeting
        self.quiet = quiet
        self.limits = limits if limits is not None else ConnectionLimits()
        self.timeout = timeout
        self.connections = 0
        self.stats = Stats()
        self.waiting: Deadlines[InProgress] = Deadlines(self._deadline_passed, reactor)
        self._idle: list[Deferred[None]] = []
        self._clock = clock if clock is not None else Clock()
        self._reactor = reactor
        # Bound once: every connection reads the clock twice, and a test's
        # MemoryReactorClock drives the durations logged.
        self.seconds = reactor.seconds
        self._rejections = RateLimitedLog(
            log, "refused {count} connection(s) in {interval:g} s by {limit} "
            "(latest from {peer})", clock=reactor)

    def buildProtocol(self, addr: IAddress | None,
                      reserved: bool = False) -> GreetProtocol | None:
        """
        A protocol for a connection from C{addr}, or L{None} if a limit
        refuses it.  C{reserved}: the connection already holds its place
        under C{--max-connections} (see L{reserve}).
        """
        host = getattr(addr, "host", None)
        limits = self.limits
        if not reserved:
            refused = limits.admit(host)
        elif host is None:
            refused = None
        else:
            refused = limits.admit_address(host)
            if refused is not None:
                limits.cancel()
        if refused is not None:
            self._refused(refused, host)
            return None
        self.stats.accepted += 1
        protocol = GreetProtocol()
        protocol.factory = self
        protocol.peer = addr
        return protocol

    def static_greeting(self) -> bytes | None:
        """
        The greeting as bytes, for a port to send by itself (see
        L{IStaticGreetingFactory}), when a connection needs nothing else:
        no template, no per-address limit, and room under
        C{--max-connections}, which the connection gives back as soon as
        the port has closed it.
        """
        limits = self.limits
        if limits.by_address or limits.open >= limits.max_connections:
            return None
        if getattr(self.greeting_for, "__func__", None) is not GreetFactory.greeting_for:
            # Replaced, to choose each greeting: it must be asked each time.
            return None
        return self.greeting.static

    def static_finished(self, served: list[tuple[tuple[Any, ...], float]]) -> None:
        """
        Count and log connections the port served with L{static_greeting}:
        the same counts and the same line as for a connection served by its
        protocol.
        """
        stats = self.stats
        greeted = len(served)
        length = len(self.greeting)
        stats.accepted += greeted
        stats.greeted += greeted
        stats.bytes_sent += greeted * length
        self.connections += greeted
        observe = stats.durations.observe
        for _address, duration in served:
            observe(duration)
        if self.quiet:
            return
        observer = log.observer
        with burst:  # the pass is over: its lines are written now
            for address, duration in served:
                observer(_greeted_event(address[0], address[1], length, duration, False))

    def resume_protocol(self, addr: IAddress, sent: int) -> GreetProtocol | None:
        """
        The protocol for a connection whose first C{sent} bytes of
        L{static_greeting} the port has sent: it sends the rest, and hears
        out a client that has spoken, as for any connection.
        """
        protocol = self.buildProtocol(addr)
        if protocol is not None:
            protocol.written = sent
        return protocol

    def reserve(self, peer: IAddress) -> bool:
        """
        Hold a place under C{--max-connections} for a connection whose
        client is not known yet (its PROXY header is still to come), so
        that connections cannot pile up unlimited before their header.
        """
        refused = self.limits.reserve()
        if refused is not None:
            self._refused(refused, getattr(peer, "host", None))
            return False
        return True

    def cancel(self) -> None:
        """Give back a place L{reserve} held, for a connection never served."""
        self.limits.cancel()

    def refuse(self, reason: str, host: str | None) -> None:
        """Count a connection refused for C{reason} (a limit, a bad PROXY header)."""
        self.stats.count(self.stats.rejected, reason)

    def _refused(self, limit: str, host: str | None) -> None:
        self.refuse(limit, host)
        self._rejections.note(key=limit, limit=f"--{limit}", peer=host or "unix")

    def greeting_for(self, peer: IAddress) -> bytes:
        """
        The bytes to send to C{peer}.  The override point for a service that
        wants to choose its greeting by itself (like C{wire.QOTD.getQuote}).
        """
        self.connections += 1
        greeting = self.greeting
        if greeting.static is not None:
            return greeting.static
        return greeting.render(lambda name: self._value(name, peer))

    def _value(self, name: str, peer: IAddress) -> object:
        if name == "peer_host":
            return peer_host_port(peer)[0]
        if name == "peer_port":
            return peer_host_port(peer)[1]
        if name == "connection":
            return self.connections
        if name == "time":
            return self._clock.utc_iso()
        return self._clock.hostname

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires when no connection is in progress."""
        if not self.waiting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def connectionWaiting(self, protocol: GreetProtocol) -> None:
        """
        A connection needs the reactor: give it a deadline.  Its protocol
        says so at the end of C{connectionMade}, or, on a direct transport,
        the port (L{IDirectFactory}).
        """
        protocol.waited = True
        self.waiting.expire_after(protocol, self.timeout)

    def connection_lingering(self, protocol: GreetProtocol) -> None:
        """
        The greeting of a connection held here is out, and its client may
        still be talking: wait for its EOF a little longer (L{LINGER}, or
        the timeout if that is shorter), counted from now.
        """
        if self.waiting.deadline_of(protocol) is not None:
            self.waiting.expire_after(protocol, min(LINGER, self.timeout))

    def _deadline_passed(self, protocol: InProgress) -> None:
        protocol.cut(TIMEOUT)

    def done(self, connection: object) -> None:
        """
        C{connection} (a protocol or a wrapper of one) is no longer in
        progress; a drain waiting for the last one is told.
        """
        waiting = self.waiting
        if connection in waiting:
            waiting.discard(connection)
            if not waiting and self._idle:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)

    def connection_finished(self, protocol: GreetProtocol, reason: Failure) -> None:
        """Count, release and log one connection: the one line per connection."""
        stats = self.stats
        duration = self.seconds() - protocol.started
        self.limits.release(getattr(protocol.peer, "host", None))
        # The common case first, without a call: a byte stream whose FIN
        # followed the greeting (see was_greeted).
        tls = False if protocol.write_done else INegotiated.providedBy(protocol.transport)
        if protocol.write_done or was_greeted(protocol, reason, tls):
            outcome, why = "greeted", None
            stats.greeted += 1
            stats.bytes_sent += protocol.length
            stats.durations.observe(duration)
        else:
            if protocol.cut_short is not None:
                outcome = "aborted"
                why = protocol.cut_short
                stats.count(stats.aborted, why)
            else:
                outcome = "lost"
                why = tls_reason(reason, protocol.handshook) if tls else \
                    reason.getErrorMessage()
                stats.lost += 1
        if not self.quiet:
            self._log_finished(protocol, outcome, why, duration, tls)
        if protocol.waited:
            # Last, so that whoever waits for the connections to finish (a
            # drain, see when_idle) finds this one counted and logged.
            self.done(protocol)

    def _log_finished(self, protocol: GreetProtocol, outcome: str, why: str | None,
                      duration: float, tls: bool) -> None:
        host, port = peer_host_port(protocol.peer)
        if why is None:
            log.observer(_greeted_event(host, port, protocol.written, duration, tls))
        else:
            # A handshake that failed says TLS in its reason already: the
            # connection never got to be "over TLS".
            over_tls = tls and (protocol.handshook or outcome == "aborted")
            log.info(_CUT_SHORT_TLS if over_tls else _CUT_SHORT,
                     peer=host, port=port, outcome=outcome, bytes=_bytes_out(protocol, tls),
                     length=protocol.length, duration_ms=round(duration * 1e6) / 1000,
                     reason=why, tls=tls)
