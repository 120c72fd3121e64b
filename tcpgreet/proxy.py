"""
The PROXY protocol (v1 and v2) for a server that speaks first.

Behind HAProxy (C{send-proxy}, C{send-proxy-v2}) every connection starts with
a header that names the original client.  Twisted's own wrapper (the
C{haproxy:} endpoint) connects the wrapped protocol at once and parses the
header later, which suits protocols that wait for the client: a greeting
server would greet before the header, with the proxy's address in place of
the client's (Twisted issue 12501), and would greet clients that send no
header at all.  This wrapper builds and connects the wrapped protocol only
once the header is parsed, with the original client's address, so the
greeting, the log and the per-address limits all see the client; a
connection whose header is missing, broken or late is dropped without a
greeting.

Whoever sends a header chooses the address the server believes, so with
L{TrustedProxies} a connection from anywhere else is refused as it is
accepted, before any of its bytes are read.  Behind C{haproxy:ssl:} the
header comes in clear and TLS starts after it, as HAProxy sends it
(C{server ... send-proxy-v2 ssl}).

The header parsers are Twisted's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, TypeGuard, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from tcpgreet.interfaces import IProxiedFactory

if TYPE_CHECKING:
    from twisted.protocols.haproxy._info import ProxyInfo
from tcpgreet.logs import RateLimitedLog, Scheduler

log = Logger()

# How long a connection may take to send its PROXY header.
HEADER_TIMEOUT = 3.0

# A v1 header is at most 107 bytes; a v2 header is 16 bytes plus its address
# block and TLVs, a few hundred bytes in practice.
MAX_HEADER = 4096

# The reasons a connection is refused: a missing or bad header, or one
# that came from outside the trusted proxies' networks.
PROXY_HEADER = "proxy-header"
UNTRUSTED_PROXY = "untrusted-proxy"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

# How many addresses' verdicts TrustedProxies keeps (see admits).
REMEMBERED_VERDICTS = 1024


class TrustedProxies:
    """
    The networks whose connections may send a PROXY header, parsed once at
    start; L{admits} is asked once per connection, as it is accepted.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        # An IPv4 client of an IPv6 socket shows as ::ffff:a.b.c.d; it is
        # looked up as the IPv4 address it is, so the networks are too.
        self._networks = tuple(
            ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF,
                                   network.prefixlen - 96))
            if network.version == 6 and network.subnet_of(_IPV4_MAPPED) else network
            for network in self.networks)
        # The verdicts on the latest addresses: the connections of a PROXY
        # listener come from a proxy or two, so parsing each one's address
        # again would be most of the cost of checking it.
        self._verdicts: dict[str, bool] = {}

    def admits(self, peer: IAddress) -> bool:
        """Whether C{peer}, a connection's own address, may send a header."""
        host = getattr(peer, "host", None)
        if host is None:
            return True  # a UNIX socket: who may connect is its file's mode
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._lookup(host)
            if len(self._verdicts) >= REMEMBERED_VERDICTS:
                self._verdicts.clear()  # many addresses: a scan, not the proxies
            self._verdicts[host] = verdict
        return verdict

    def _lookup(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def __str__(self) -> str:
        return ", ".join(str(network) for network in self.networks)


# The address class a header's family calls for, and the IP version it holds.
_VERSIONS = {IPv4Address: 4, IPv6Address: 6}


def _valid(address: IAddress | None) -> bool:
    """
    Whether a header's address is an IP address of its family (a C{TCP4}
    line names IPv4 addresses only, C{TCP6} IPv6 ones) and a port.
    """
    if not isinstance(address, IPv4Address | IPv6Address):
        return False
    try:
        version = ipaddress.ip_address(address.host).version
    except ValueError:
        return False
    return version == _VERSIONS.get(type(address)) and 0 <= address.port <= 65535


def _canonical(info: ProxyInfo) -> ProxyInfo:
    """
    C{info} with its IPv6 addresses in their one canonical text form: a v2
    header carries 16 bytes, which Twisted's parser writes out in full
    (C{2001:db8:0:0:0:0:0:7}), and a v1 header whatever the proxy wrote;
    the greeting, the log and the per-address limits all want the form
    the client's own socket would have given (C{2001:db8::7}).
    """
    source, destination = info.source, info.destination
    if not isinstance(source, IPv6Address) or not isinstance(destination, IPv6Address):
        return info
    return type(info)(info.header,
                      IPv6Address(source.type, ipaddress.ip_address(source.host).compressed,
                                  source.port),
                      IPv6Address(destination.type,
                                  ipaddress.ip_address(destination.host).compressed,
                                  destination.port))


class _V1Parser(V1Parser):
    """
    Twisted's v1 parser, taking also the shortest header there is, C{PROXY
    UNKNOWN}: what HAProxy sends for a client it cannot name (one on a
    UNIX socket, say), which Twisted's parser refuses for having nothing
    after C{UNKNOWN}.
    """

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if line == b"PROXY UNKNOWN":
            # The specification has the receiver ignore whatever follows
            # UNKNOWN; Twisted's parser does, once there is a space to
            # follow it.
            line += b" "
        return super().parse(line)


def _half_closeable(protocol: object) -> TypeGuard[IHalfCloseableProtocol]:
    """
    Whether C{protocol}'s class takes half-closes.  Asked of the class, not
    the object: TLS copies its transport's interfaces onto itself (this
    wrapper's among them), and would hand a half-close straight back.
    """
    return IHalfCloseableProtocol.implementedBy(type(protocol))


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(policies.ProtocolWrapper):
    """
    Read the PROXY header, then connect a protocol built for the client it
    names; until then nothing is sent.
    """

    factory: ProxyHeaderFactory
    # Set by makeConnection before any method here runs.
    transport: ITCPTransport
    # None until the header is read, unlike ProtocolWrapper's, which has
    # its protocol from the start.
    wrappedProtocol: IProtocol | None = None  # type: ignore[assignment]
    # The header once read; False once the connection is refused.
    _info: ProxyInfo | Literal[False] | None = None
    _parser: _V1Parser | V2Parser | None = None
    _timer: IDelayedCall | None = None

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory
        self._buffer = b""

    def makeConnection(self, transport: ITransport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._drop,
                                                   "no header in time")
        self.factory.waiting(self)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._info is not None:
            return  # refused after the header; whatever follows is dropped
        data = self._buffer + data
        if self._parser is None:
            if data.startswith(V1Parser.PROXYSTR):
                self._parser = _V1Parser()
            elif data.startswith(V2Parser.PREFIX) and len(data) >= 16:
                if data[12] & 0xF0 != 0x20:
                    self._drop("unsupported PROXY v2 version")
                    return
                self._parser = V2Parser()
            elif V1Parser.PROXYSTR.startswith(data) or (
                    len(data) < 16 and V2Parser.PREFIX.startswith(data[:12])):
                self._buffer = data  # too early to tell
                return
            else:
                self._drop("not a PROXY header")
                return
        self._buffer = b""
        try:
            info, remaining = self._parser.feed(data)
        except Exception:  # not only InvalidProxyHeader: int() and decode() too
            self._drop("invalid header")
            return
        if info is None:
            if len(self._parser.buffer) > MAX_HEADER:
                self._drop("header too long")
            return
        if info.source is not None:
            if not (_valid(info.source) and _valid(info.destination)):
                self._drop("invalid address")
                return
            info = _canonical(info)
        self._connect(info, remaining)

    def _connect(self, info: ProxyInfo, remaining: bytes | None) -> None:
        self._info = info
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.factory.done(self)
        # A LOCAL (v2) or UNKNOWN (v1) header is the proxy speaking for
        # itself, as in a health check: its own address stands.
        protocol = self.factory.build(self.getPeer())
        if protocol is None:  # refused by a limit, which counted it
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        # A wrapper is its protocol's transport: it provides what the
        # transport beneath it does (see makeConnection).
        protocol.makeConnection(cast(ITransport, self))
        if remaining and self.wrappedProtocol is not None:
            protocol.dataReceived(remaining)

    def cut(self, why: str) -> None:
        """The drain is over and the header never came: close."""
        self._drop(f"no header before the {why}")

    def _drop(self, reason: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._info = self._info or False
        self.factory.refused(self.transport.getPeer(), reason)
        self.transport.loseConnection()

    def getPeer(self) -> IAddress:
        if self._info and self._info.source:
            return self._info.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._info and self._info.destination:
            return self._info.destination
        return self.transport.getHost()

    def loseWriteConnection(self) -> None:
        # Beneath us may be a transport that cannot half-close (TLS, when
        # this wrapper is put inside it).
        if hasattr(type(self.transport), "loseWriteConnection"):
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if _half_closeable(self.wrappedProtocol):
            self.wrappedProtocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if _half_closeable(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._info is None:
            self.factory.refused(self.transport.getPeer(), "closed before the header")
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
        else:
            self.factory.done(self)


class ProxyHeaderFactory(policies.WrappingFactory):
    """
    Wrap every connection in a L{ProxyHeaderProtocol} for C{wrappedFactory}.

    The wrapped factory learns of refused connections through its
    C{refuse(reason, host)} method, if it has one, so they are counted
    with those its own limits refuse.

    @param trusted: the proxies whose connections may send a header;
        L{None}, any connection may.
    """

    protocol = ProxyHeaderProtocol
    noisy = False
    _tls: TLSMemoryBIOFactory | None = None

    wrappedFactory: IProxiedFactory

    def __init__(self, wrappedFactory: IProxiedFactory, clock: Scheduler,
                 trusted: TrustedProxies | None = None) -> None:
        if not IProxiedFactory.providedBy(wrappedFactory):
            raise TypeError(f"{wrappedFactory!r} does not provide IProxiedFactory")
        super().__init__(wrappedFactory)
        self.clock = clock
        self.trusted = trusted
        self._drops = RateLimitedLog(
            log, "dropped {count} connection(s) in {interval:g} s without a valid "
            "PROXY header (latest from {peer}: {reason})", clock=clock)
        self._untrusted = RateLimitedLog(
            log, "refused {count} connection(s) in {interval:g} s from outside "
            "--trusted-proxy (latest from {peer})", clock=clock)

    def tls_after_header(self, contextFactory: IOpenSSLContextFactory) -> None:
        """
        Speak TLS, with C{contextFactory}'s certificate, once the header
        (which comes in clear) is read.
        """
        # TLS asks only callLater of its clock.
        self._tls = TLSMemoryBIOFactory(contextFactory, False,
                                        cast(IProtocolFactory, self.wrappedFactory),
                                        clock=cast(IReactorTime, self.clock))

    # None refuses a connection, as IProtocolFactory allows and the
    # WrappingFactory annotations do not; and a listening port always
    # knows the address.
    def buildProtocol(  # type: ignore[override]
            self, addr: IAddress) -> ProxyHeaderProtocol | None:
        # Before anything else: a connection from outside the trusted
        # networks costs one address lookup, and holds no place under
        # --max-connections.
        trusted = self.trusted
        if trusted is not None and not trusted.admits(addr):
            host = getattr(addr, "host", None)  # admits refuses IP peers only
            self._untrusted.note(peer=host)
            self.wrappedFactory.refuse(UNTRUSTED_PROXY, host)
            return None
        # The connection counts under --max-connections from now, not only
        # once its header is in: silent clients must not pile up unlimited.
        if not self.wrappedFactory.reserve(addr):
            return None
        return self.protocol(self)

    def build(self, client: IAddress) -> IProtocol | None:
        """
        The wrapped factory's protocol for the client the header names
        (inside TLS, with L{tls_after_header}).
        """
        protocol = self.wrappedFactory.buildProtocol(client, reserved=True)
        tls = self._tls
        if protocol is None or tls is None:
            return protocol
        return tls.protocol(tls, protocol)

    def waiting(self, wrapper: ProxyHeaderProtocol) -> None:
        """A header is awaited: the wrapped factory's drain waits for it."""
        self.wrappedFactory.waiting.add(wrapper)

    def done(self, wrapper: ProxyHeaderProtocol) -> None:
        self.wrappedFactory.done(wrapper)

    def refused(self, peer: IAddress, reason: str) -> None:
        host = getattr(peer, "host", "unix")
        self._drops.note(peer=host, reason=reason)
        self.wrappedFactory.refuse(PROXY_HEADER, host)
        self.wrappedFactory.cancel()

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        name = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{name} (PROXY)"


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """
    An endpoint whose connections start with a PROXY header, sent from
    C{trusted} proxies (L{None}: from anywhere).
    """

    def __init__(self, wrapped: IStreamServerEndpoint, clock: Scheduler,
                 trusted: TrustedProxies | None = None) -> None:
        self._wrapped = wrapped
        self._clock = clock
        self.trusted = trusted

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        # ProxyHeaderFactory refuses a factory that does not provide it.
        proxied = cast(IProxiedFactory, factory)
        return self._wrapped.listen(ProxyHeaderFactory(proxied, self._clock, self.trusted))
