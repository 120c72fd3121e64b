"""
Probing: connect, read what the server says, and time it.

An attempt at one address is a L{GreetClientFactory} run on the reactor;
L{probe} tries the host's addresses in turn and returns a L{ProbeResult};
L{ProbeRun} repeats probes, judges each and hands it to a report.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error, task
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHandshakeListener,
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpgreet.client.options import (
    DEFAULT_IDLE,
    DEFAULT_MAX_BYTES,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    is_address,
)
from tcpgreet.client.outcome import (
    CONNECT,
    READ,
    RESOLVE,
    TLS,
    Checks,
    ProbeResult,
    Summary,
    judge,
    speaks_tls,
)
from tcpgreet.client.report import (
    Report,
)

if TYPE_CHECKING:  # TLS is imported only by the probes that speak it
    from tcpgreet.client.outcome import TLSInfo
    from tcpgreet.client.tls import FirstBytesTLS, TLSClient


class IProbeReactor(IReactorTime, IReactorTCP, IReactorUNIX, IReactorThreads, IReactorCore):
    """
    What a probe run needs of its reactor: a clock, TCP and UNIX
    connections, threads for the resolver, and shutdown triggers.  (No
    reactor declares it: any that provides all of these interfaces, as
    every posix reactor does, is one.)
    """

_T = TypeVar("_T")


class Connection(TypingProtocol):
    """
    What a probe needs of its transport.  TCP's, a UNIX socket's, the TLS
    layer's and the PROXY header sender's (which forwards) all abort, but
    only the first two are an C{ITCPTransport}, the one interface that says
    so: the others are an C{ITransport} that has C{abortConnection} too.
    """

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...


# The name resolver a probe uses: host, port and family to addresses.
Resolver = Callable[[IProbeReactor, str, "int | None", int], Coroutine[Any, Any, list[str]]]

# Seconds a connection we closed after its banner gets to finish closing.
GOODBYE_TIMEOUT = 2.0


class ProbeError(Exception):
    """
    A failed attempt; the message is the reason, fit to print.  C{refused}
    and C{empty} mark the failures whose state the user may choose.
    """

    def __init__(self, message: str, refused: bool = False, empty: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.empty = empty


@dataclass(frozen=True)
class ProbeSettings:
    """
    How to probe: everything one probe needs, and nothing about reporting.
    C{idle} is the silence after the first bytes that ends the banner;
    C{None} waits for the server to close.  A UNIX socket has C{unix} for
    its path and no port.
    """

    host: str
    port: int | None = DEFAULT_PORT
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    first_line: bool = False
    send: bytes = b""
    family: int = socket.AF_UNSPEC
    source: str | None = None
    tls: TLSClient | None = None
    idle: float | None = DEFAULT_IDLE
    unix: str | None = None
    proxy: str | None = None
    proxy_source: tuple[str, int] | None = None
    all_addresses: bool = False
    best_address: bool = False


@implementer(IHandshakeListener)
class GreetClientProtocol(Protocol, TimeoutMixin):
    """
    Collect what the server sends until it closes the connection or, once it
    has said something, falls silent for C{factory.idle} seconds (SMTP, SSH,
    FTP greet and then wait for the client), keeping at most
    C{factory.max_bytes}: a server that never stops talking must not grow
    the client's memory.  With C{factory.first_line}, stop at the first
    newline.
    """

    # Both set before connectionMade: by the factory, by the connection.
    factory: GreetClientFactory
    transport: ITransport

    def connectionMade(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._stopped = False
        self._last_byte_at: float | None = None
        self.factory.connected(cast(Connection, self.transport))
        if self.factory.send:
            self.transport.write(self.factory.send)

    def callLater(self, period: float, call: Callable[[], object]) -> IDelayedCall:
        # The idle timer runs on the factory's reactor, a fake one in tests.
        return self.factory.clock.callLater(period, call)

    def handshakeCompleted(self) -> None:
        # Only the TLS layer (see TLSClient.wrap) completes handshakes.
        self.factory.handshake_completed(cast("FirstBytesTLS", self.transport))

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        room = self.factory.max_bytes - self._size
        if self.factory.first_line:
            newline = data.find(b"\n", 0, room)
            if newline >= 0:
                self._keep(data[:newline + 1])
                # Politely: a server that waits for us should see a close,
                # and a TLS one its close_notify.
                self.transport.loseConnection()
                self._stop("newline")
                return
        if len(data) > room:
            self._keep(data[:room])
            cast(Connection, self.transport).abortConnection()
            self._stop("max-bytes")
            return
        self._keep(data)
        if self.factory.idle is not None:
            self.setTimeout(self.factory.idle)  # started by the first bytes, reset by each

    def timeoutConnection(self) -> None:
        """The server spoke and has said nothing since: its banner is over."""
        self.transport.loseConnection()
        self._stop("idle", at=self._last_byte_at)

    def received(self) -> bytes:
        """What the server has sent so far (at most C{max_bytes} of it)."""
        return b"".join(self._chunks)

    def _keep(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._last_byte_at = self.factory.clock.seconds()
        if self.factory.first_byte_at is None:
            self.factory.first_byte_at = self._last_byte_at

    def _stop(self, ended_by: str, at: float | None = None) -> None:
        self._stopped = True
        self.setTimeout(None)
        self.factory.stopped_reading(self.received(), ended_by, at)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self.factory.finished(self.received(), reason)


if TYPE_CHECKING:
    # Twisted's ClientFactory is generic in its annotations; at run time,
    # only in releases newer than the oldest tcpgreet supports.
    _ClientFactory = ClientFactory[GreetClientProtocol]
else:
    _ClientFactory = ClientFactory


class GreetClientFactory(_ClientFactory):
    """
    One attempt at one address: L{deferred} fires with the banner, or fails
    with L{ProbeError}; the times and facts of the attempt stay here.
    Cancelling L{deferred} drops the attempt.
    """

    protocol = GreetClientProtocol
    noisy = False

    def __init__(self, clock: IReactorTime, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 first_line: bool = False, send: bytes = b"", tls: TLSClient | None = None,
                 idle: float | None = None) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.first_line = first_line
        self.send = send
        self.tls = tls
        self.idle = idle
        self.deferred: defer.Deferred[bytes] = defer.Deferred(self._cancel)
        self.started_at = clock.seconds()
        self.connected_at: float | None = None
        self.handshake_at: float | None = None
        self.first_byte_at: float | None = None
        self.ended_at: float | None = None
        self.tls_info: TLSInfo | None = None
        self.tls_failed = False
        self.ended_by: str | None = None
        self.stopped = False
        self.banner = b""
        self.connector: IConnector | None = None
        self.address: str | None = None
        self.transport: Connection | None = None
        self.reader: GreetClientProtocol | None = None
        # Told when the connection is made: the race of a name's addresses.
        self.on_connected: Callable[[GreetClientFactory], None] | None = None
        self._goodbye: IDelayedCall | None = None

    @property
    def truncated(self) -> bool:
        return self.ended_by == "max-bytes"

    def buildProtocol(self, addr: IAddress | None) -> GreetClientProtocol | None:
        self.reader = super().buildProtocol(addr)
        return self.reader

    def connected(self, transport: Connection) -> None:
        self.connected_at = self.clock.seconds()
        self.transport = transport
        if self.on_connected is not None:
            self.on_connected(self)

    def handshake_completed(self, transport: FirstBytesTLS) -> None:
        from tcpgreet.client.tls import handshake_info

        self.handshake_at = self.clock.seconds()
        self.tls_info = handshake_info(transport.getHandle())

    def stopped_reading(self, banner: bytes, ended_by: str, at: float | None = None) -> None:
        """
        We have the banner we want, ended at C{at} (by default now).  What
        follows is only the goodbye, which the result does not wait for: a
        TLS server may take its time to answer our close_notify, or never
        do, so the connection gets L{GOODBYE_TIMEOUT} to close.
        """
        self.ended_at = self.clock.seconds() if at is None else at
        self.stopped = True
        self.ended_by = ended_by
        self.banner = banner
        if not self.deferred.called:
            self._goodbye = self.clock.callLater(GOODBYE_TIMEOUT, self._drop)
            if self.tls is None and speaks_tls(banner):
                self.deferred.errback(ProbeError("the server speaks TLS: try --tls"))
            else:
                self.deferred.callback(banner)

    def finished(self, banner: bytes, reason: Failure) -> None:
        if self._goodbye is not None and self._goodbye.active():
            self._goodbye.cancel()
        if self.ended_at is None:
            self.ended_at = self.clock.seconds()
        self.banner = banner
        if self.deferred.called:
            return
        if self.tls is None and speaks_tls(banner):
            self.deferred.errback(ProbeError("the server speaks TLS: try --tls"))
            return
        if reason.check(error.ConnectionDone) or self._tls_ended(banner, reason):
            if not banner:
                # A refusal by a limit, a proxy listener without its header,
                # a server that is not up yet: none of them said hello.
                self.deferred.errback(ProbeError("closed without a banner", empty=True))
                return
            self.ended_by = "close"
            self.deferred.callback(banner)
        else:
            self.deferred.errback(ProbeError(self._explain(reason)))

    def _tls_ended(self, banner: bytes, reason: Failure) -> bool:
        """
        Whether a TLS server closed after its banner without close_notify.
        Many do; Twisted reports it as ConnectionLost, as it does a reset,
        and the banner came in authenticated records, so it counts as EOF.
        """
        return (self.tls is not None and self.handshake_at is not None and bool(banner)
                and reason.check(error.ConnectionLost) is not None)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.deferred.called:
            refused = reason.check(error.ConnectionRefusedError) is not None
            self.deferred.errback(ProbeError(describe(reason), refused=refused))

    def give_up(self) -> None:
        """
        The deadline: stop connecting, or drop the connection, reporting
        what the server had sent by then.
        """
        if not self.deferred.called:
            self.banner = self.reader.received() if self.reader is not None else b""
            self.ended_at = self.clock.seconds()
            self.deferred.errback(ProbeError(self._timed_out()))
        self._drop()

    def _timed_out(self) -> str:
        """What the deadline cut short, with what it most likely means."""
        if self.banner:
            return f"timed out after {len(self.banner)} byte{'s' if len(self.banner) > 1 else ''}"
        if self.transport is None or self.reader is None:
            return "timed out"
        if self.tls is not None and self.handshake_at is None:
            received = self._tls_layer().received
            if not received:
                return "timed out in the TLS handshake: the server sent nothing (is it TLS?)"
            return (self.tls.explain(Failure(error.TimeoutError()), None, received,
                                     handshake_done=False)
                    or "timed out in the TLS handshake")
        if self.tls is None and not self.send:
            # A server that waits for a request (HTTP) says nothing, as does
            # a TLS server waiting for the client's hello, or a stuck one.
            return ("timed out waiting for a banner (does the server wait for the client? "
                    "try --send or --tls)")
        return "timed out waiting for a banner"

    def _cancel(self, deferred: defer.Deferred[bytes]) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.reader is not None:
            self.reader.setTimeout(None)  # the silence no longer matters
        if self.transport is not None:
            self.transport.abortConnection()
        elif self.connector is not None:
            with contextlib.suppress(error.NotConnectingError):
                self.connector.stopConnecting()

    def _explain(self, reason: Failure) -> str:
        if self.tls is not None and self.transport is not None:
            tls_layer = self._tls_layer()
            message = self.tls.explain(reason, tls_layer.getHandle(), tls_layer.received,
                                       handshake_done=self.handshake_at is not None)
            if message is not None:
                # Some Twisted versions call handshakeCompleted before the
                # certificate's name is checked: the failure is TLS's all the same.
                self.tls_failed = True
                return message
        return describe(reason)

    def _tls_layer(self) -> FirstBytesTLS:
        # With --tls, the protocol's transport is the TLS layer TLSClient.wrap made.
        return cast("FirstBytesTLS", self.transport)


def describe(reason: Failure) -> str:
    """A short, lower-case reason for a failed connection."""
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(error.TimeoutError, error.UserError):
        return "timed out"
    if reason.check(error.ConnectionLost):
        return "connection reset by peer"
    value = reason.value
    if isinstance(value, error.ConnectError) and value.osError == errno.ENOENT:
        return "no such socket"  # only a unix: path can be missing
    if isinstance(value, error.ConnectError):
        # ConnectError(errno, strerror): the strerror is the useful part.
        detail = value.args[0] if value.args and value.args[0] else value.MESSAGE
        if isinstance(value, error.ConnectBindError):
            return f"cannot bind to the source address: {_lower(str(detail))}"
        return _lower(str(detail))
    return _lower(reason.getErrorMessage())


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


_FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
# What the resolver answers for a name without addresses (of one family).
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
               getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME)}


async def resolve(reactor: IReactorThreads, host: str, port: int | None,
                  family: int = socket.AF_UNSPEC) -> list[str]:
    """
    The addresses C{host} resolves to, in the order the resolver gives them
    (which honours /etc/gai.conf), without duplicates.
    """
    try:
        infos = await _getaddrinfo(reactor, host, port, family)
    except socket.gaierror as e:
        raise ProbeError(await _unresolved(reactor, host, port, family, e)) from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


def _getaddrinfo(reactor: IReactorThreads, host: str, port: int | None,
                 family: int) -> defer.Deferred[list[Any]]:
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo,
                             host, port, family, socket.SOCK_STREAM)


async def _unresolved(reactor: IReactorThreads, host: str, port: int | None, family: int,
                      failure: socket.gaierror) -> str:
    """
    Why C{host} has no address, in words, for a line that starts with the
    name: "name not resolved", not the C library's "Name or service not known".
    """
    if failure.errno in _NO_ADDRESS and family != socket.AF_UNSPEC:
        # With -4 or -6 the resolver says the same of a name that does not
        # exist and of one that has only addresses of the other family.
        try:
            await _getaddrinfo(reactor, host, port, socket.AF_UNSPEC)
        except socket.gaierror:
            pass
        else:
            kind = _FAMILY_NAMES[family]
            return f"is not an {kind} address" if is_address(host) else f"has no {kind} address"
    if failure.errno == socket.EAI_NONAME:
        return "name not resolved"
    if failure.errno in _NO_ADDRESS:
        return "has no address"
    return f"name not resolved: {_lower(failure.strerror or str(failure))}"


def happy_eyeballs(addresses: list[str]) -> list[str]:
    """
    C{addresses} in the order RFC 8305 tries them: the families alternate,
    IPv6 first, each in the resolver's order, so that a broken family costs
    one attempt before the other is tried, not all of its addresses.
    """
    six = [address for address in addresses if ":" in address]
    four = [address for address in addresses if ":" not in address]
    ordered: list[str] = []
    for pair in zip(six, four, strict=False):
        ordered.extend(pair)
    shorter = min(len(six), len(four))
    return ordered + six[shorter:] + four[shorter:]


async def _addresses(reactor: IProbeReactor, settings: ProbeSettings, resolver: Resolver,
                     deadline: float) -> tuple[list[str], float | None]:
    """
    The addresses to try and the time the name took (C{None} when there was
    no name: an address, a UNIX socket); or a failed result's facts.
    """
    if settings.unix is not None:
        return [settings.unix], None
    if is_address(settings.host):
        # Nothing to resolve: no thread, no name-service time.
        return [settings.host], None
    began = reactor.seconds()
    resolving = defer.ensureDeferred(
        resolver(reactor, settings.host, settings.port, settings.family))
    resolving.addTimeout(deadline - began, reactor)
    try:
        addresses = await resolving
    except defer.TimeoutError:
        raise ProbeError("timed out resolving the name") from None
    return happy_eyeballs(addresses), reactor.seconds() - began


async def probe(reactor: IProbeReactor, settings: ProbeSettings,
                resolver: Resolver = resolve) -> ProbeResult:
    """
    One probe of C{settings.host}: its addresses are tried in turn (see
    L{happy_eyeballs}) until one connects; C{settings.timeout} bounds
    everything (resolving, connecting, TLS, reading).  Failures are
    results, not exceptions.
    """
    started = reactor.seconds()
    deadline = started + settings.timeout

    def result(**facts: Any) -> ProbeResult:
        facts.setdefault("total", reactor.seconds() - started)
        return ProbeResult(host=settings.host, port=settings.port, started=started, **facts)

    try:
        addresses, resolved = await _addresses(reactor, settings, resolver, deadline)
    except ProbeError as e:
        return result(error=str(e), stage=RESOLVE)

    race = _Race(reactor, settings, addresses, deadline)
    attempt = await race.run()
    tried = tuple(race.tried)
    if attempt is None:
        failure = race.failure
        if len(tried) > 1:
            failure = ProbeError(f"{failure} (tried {', '.join(tried)})", failure.refused)
        return result(address=tried[-1] if tried else None, tried=tried, resolve=resolved,
                      error=str(failure), stage=CONNECT, refused=failure.refused)
    try:
        banner = await race.outcome
    except ProbeError as e:
        # The server answered and then failed: another address would be
        # another server, not a retry of this one.
        return result(address=attempt.address, tried=tried, resolve=resolved,
                      error=str(e), stage=_stage(attempt), empty=e.empty,
                      banner=attempt.banner or None, **_facts(attempt))
    assert attempt.ended_at is not None  # set before the attempt's Deferred fires
    return result(address=attempt.address, tried=tried, resolve=resolved, banner=banner,
                  total=attempt.ended_at - started, **_facts(attempt))


# RFC 8305's Connection Attempt Delay: how long an attempt has to connect
# before the next address is tried beside it.
CONNECTION_ATTEMPT_DELAY = 0.25


class _Race:
    """
    Connection attempts at a name's addresses, as happy eyeballs makes
    them (RFC 8305): the next address is tried when an attempt fails, or
    when it has not connected within L{CONNECTION_ATTEMPT_DELAY}, so an
    address that drops packets costs a quarter of a second, not the whole
    timeout.  The first attempt to connect wins and the others are
    dropped; L{outcome} then gives the winner's banner, or its failure.
    """

    def __init__(self, reactor: IProbeReactor, settings: ProbeSettings, addresses: list[str],
                 deadline: float) -> None:
        self.reactor = reactor
        self.settings = settings
        self.pending = list(addresses)
        self.deadline = deadline
        self.tried: list[str] = []
        self.failure = ProbeError("has no address")
        self.winner: GreetClientFactory | None = None
        self.outcome: defer.Deferred[bytes] = defer.Deferred(self._drop_winner)
        self._running: list[GreetClientFactory] = []
        self._next_timer: IDelayedCall | None = None
        self._cancelled = False
        self._won: defer.Deferred[GreetClientFactory | None] = defer.Deferred(self._give_up)

    def run(self) -> defer.Deferred[GreetClientFactory | None]:
        """The attempt that connected, or C{None} when none did (see L{failure})."""
        self._start_next()
        return self._won

    def _start_next(self) -> None:
        if self._next_timer is not None and self._next_timer.active():
            self._next_timer.cancel()
        remaining = self.deadline - self.reactor.seconds()
        if self.pending and remaining <= 0:
            self.failure = ProbeError("timed out")
            self.pending.clear()
        if not self.pending:
            if not self._running and not self._won.called and not self._cancelled:
                self._won.callback(None)
            return
        address = self.pending.pop(0)
        self.tried.append(address)
        attempt = _attempt(self.reactor, self.settings, address, remaining)
        attempt.address = address
        attempt.on_connected = self._connected
        self._running.append(attempt)
        attempt.deferred.addBoth(self._ended, attempt)
        if self.pending:
            self._next_timer = self.reactor.callLater(CONNECTION_ATTEMPT_DELAY,
                                                      self._start_next)

    def _connected(self, attempt: GreetClientFactory) -> None:
        self.winner = attempt
        self.pending.clear()
        if self._next_timer is not None and self._next_timer.active():
            self._next_timer.cancel()
        for other in list(self._running):  # each cancel removes one
            if other is not attempt:
                other.deferred.cancel()
        self._won.callback(attempt)

    def _ended(self, outcome: bytes | Failure, attempt: GreetClientFactory) -> None:
        self._running.remove(attempt)
        if attempt is self.winner:
            if isinstance(outcome, Failure):
                self.outcome.errback(outcome)
            else:
                self.outcome.callback(outcome)
            return
        if self.winner is None and isinstance(outcome, Failure):
            if isinstance(outcome.value, ProbeError):
                self.failure = outcome.value
            self._start_next()
        # Else a loser, dropped: its end is of no interest.

    def _give_up(self, deferred: defer.Deferred[GreetClientFactory | None]) -> None:
        """The probe is cancelled before a connection: drop every attempt."""
        self._cancelled = True  # Deferred.cancel gives the CancelledError
        self.pending.clear()
        if self._next_timer is not None and self._next_timer.active():
            self._next_timer.cancel()
        for attempt in list(self._running):
            attempt.deferred.cancel()

    def _drop_winner(self, deferred: defer.Deferred[bytes]) -> None:
        if self.winner is not None:
            self.winner.deferred.cancel()


async def probe_all(reactor: IProbeReactor, settings: ProbeSettings,
                    resolver: Resolver = resolve) -> list[ProbeResult]:
    """
    C{--all-addresses}: one attempt at every address the name has, at once,
    each its own result (of the same name, resolved once); a name that does
    not resolve is one failed result.
    """
    started = reactor.seconds()
    deadline = started + settings.timeout
    try:
        addresses, resolved = await _addresses(reactor, settings, resolver, deadline)
    except ProbeError as e:
        return [ProbeResult(host=settings.host, port=settings.port, started=started,
                            total=reactor.seconds() - started, error=str(e), stage=RESOLVE)]

    async def one(address: str) -> ProbeResult:
        attempt = _attempt(reactor, settings, address, deadline - reactor.seconds())
        facts: dict[str, Any] = {"host": settings.host, "port": settings.port, "started": started,
                 "address": address, "tried": (address,), "resolve": resolved}
        try:
            banner = await attempt.deferred
        except ProbeError as e:
            connected = attempt.connected_at is not None
            return ProbeResult(total=reactor.seconds() - started, error=str(e),
                               stage=_stage(attempt), empty=e.empty, refused=e.refused,
                               banner=attempt.banner or None,
                               **(_facts(attempt) if connected else {}), **facts)
        assert attempt.ended_at is not None  # set before the attempt's Deferred fires
        return ProbeResult(total=attempt.ended_at - started, banner=banner,
                           **_facts(attempt), **facts)

    attempts = [defer.ensureDeferred(one(address)) for address in addresses]
    try:
        return list(await defer.gatherResults(attempts, consumeErrors=True))
    except defer.CancelledError:
        for attempt in attempts:
            attempt.cancel()
        raise


def _attempt(reactor: IProbeReactor, settings: ProbeSettings, address: str,
             remaining: float) -> GreetClientFactory:
    """One connection attempt at C{address}, given up after C{remaining} seconds."""
    attempt = GreetClientFactory(reactor, settings.max_bytes, first_line=settings.first_line,
                                 send=settings.send, tls=settings.tls, idle=settings.idle)
    attempt.connector = _connect(reactor, settings, address, attempt, remaining)
    timer = reactor.callLater(remaining, attempt.give_up)

    def stop_timer(outcome: _T) -> _T:
        if timer.active():
            timer.cancel()
        return outcome

    attempt.deferred.addBoth(stop_timer)
    return attempt


def _stage(attempt: GreetClientFactory) -> str:
    """Where a failed attempt stopped."""
    if attempt.connected_at is None:
        return CONNECT
    if attempt.tls is not None and (attempt.handshake_at is None or attempt.tls_failed):
        return TLS
    return READ


def _connect(reactor: IProbeReactor, settings: ProbeSettings, address: str,
             factory: GreetClientFactory, timeout: float) -> IConnector:
    # The probe's factory, with what goes beneath it on the wire.
    outermost: ClientFactory[Any] = factory
    if settings.unix is not None:
        if settings.proxy is not None:
            from tcpgreet.client.proxyheader import ProxyHeaderSender

            outermost = ProxyHeaderSender(factory, settings.proxy, None)
        return reactor.connectUNIX(address, outermost, timeout=timeout)
    assert settings.port is not None  # only a UNIX socket has none
    bind = (settings.source, 0) if settings.source else None
    if settings.tls is not None:
        outermost = settings.tls.wrap(factory)
    if settings.proxy is not None:
        # Below TLS: the header is the first thing on the wire.
        from tcpgreet.client.proxyheader import ProxyHeaderSender

        outermost = ProxyHeaderSender(outermost, settings.proxy, settings.proxy_source)
    return reactor.connectTCP(address, settings.port, outermost, timeout=timeout,
                              bindAddress=bind)


def _facts(attempt: GreetClientFactory) -> dict[str, Any]:
    # Connect and handshake times count from the start of the attempt that
    # answered: they measure that address, not the name service or the
    # addresses that failed before it.  The total is the whole probe's.
    return {
        "connect": _since(attempt.connected_at, attempt.started_at),
        "handshake": _since(attempt.handshake_at, attempt.started_at),
        "first_byte": _since(attempt.first_byte_at, attempt.started_at),
        "tls": attempt.tls_info,
        "truncated": attempt.truncated,
        "ended_by": attempt.ended_by,
    }


# One probe of the settings' target, or of each of its addresses.
Probe = Callable[[IProbeReactor, ProbeSettings],
                 Coroutine[Any, Any, "ProbeResult | list[ProbeResult]"]]


def _since(moment: float | None, start: float) -> float | None:
    """The seconds from C{start} to C{moment}, if it came."""
    return None if moment is None else moment - start


class ProbeRun:
    """
    Probe C{count} times (0: until interrupted), C{interval} seconds from the
    start of one probe to the start of the next; judge each, report each,
    then report the summary.  L{interrupt} ends the run early, summary and
    all.
    """

    probe_one = staticmethod(probe)
    probe_all = staticmethod(probe_all)

    def __init__(self, reactor: IProbeReactor, settings: ProbeSettings, checks: Checks,
                 report: Report, count: int = 1, interval: float = 1.0,
                 probe: Probe | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.checks = checks
        self.report = report
        self.count = count
        self.interval = interval
        if probe is None:
            probe = self.probe_all if settings.all_addresses else self.probe_one
        self.probe: Probe = probe
        self.summary = Summary(settings.host, settings.port, by_address=settings.all_addresses,
                               best=settings.best_address)
        self.interrupted = False
        self.finished: defer.Deferred[None] = defer.Deferred()
        self._waiting: defer.Deferred[Any] | None = None

    async def run(self) -> int:
        """Run the probes; the exit status they earned."""
        seq = 0
        try:
            while not self.interrupted and not self.report.closed:
                seq += 1
                started = self.reactor.seconds()
                outcome = await self._unless_interrupted(
                    defer.ensureDeferred(self.probe(self.reactor, self.settings)))
                if outcome is None:
                    break
                for result in outcome if isinstance(outcome, list) else (outcome,):
                    verdict = judge(result, self.checks, self.reactor.seconds())
                    self.summary.add(result, verdict)
                    self.report.probe(seq, result, verdict)
                if seq == self.count:
                    break
                pause = self.interval - (self.reactor.seconds() - started)
                if pause > 0:
                    await self._unless_interrupted(task.deferLater(self.reactor, pause))
            self.report.finish(self.summary, self.interrupted)
        finally:
            self.finished.callback(None)
        return self.summary.exit_status

    async def _unless_interrupted(self, waiting: defer.Deferred[_T]) -> _T | None:
        """What C{waiting} gives, or C{None} once L{interrupt} cancels it."""
        self._waiting = waiting
        try:
            return await waiting
        except defer.CancelledError:
            if not self.interrupted:
                raise
            return None
        finally:
            self._waiting = None

    def interrupt(self) -> defer.Deferred[None] | None:
        """
        Stop probing (a probe under way is dropped, not counted); a
        Deferred that fires once the summary is out.
        """
        if self.finished.called:
            return None
        self.interrupted = True
        if self._waiting is not None:
            self._waiting.cancel()
        return self.finished
