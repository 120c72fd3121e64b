"""
The PROXY protocol header a probe sends before anything else, so that a
service behind a listener that demands one (HAProxy's C{accept-proxy},
tcpgreet's C{haproxy:}) can be probed directly.  Built from HAProxy's
specification (proxy-protocol.txt): version 1, a line of text; version 2,
a 12-byte signature and a binary block, with the PROXY command naming the
client, or the LOCAL command naming nobody, as HAProxy's own health checks
send it.

Imported only by a probe that asks for a header.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

from twisted.internet.interfaces import IProtocolFactory, ITCPTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

# Version 2 starts with these 12 bytes, which no version 1 line can.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_2 = 0x20
_LOCAL, _PROXY = 0x00, 0x01
_UNSPEC, _TCP4, _TCP6 = 0x00, 0x11, 0x21

# Version 2, LOCAL: the connection is the proxy's own, and carries no address.
LOCAL = SIGNATURE + bytes([_VERSION_2 | _LOCAL, _UNSPEC]) + struct.pack("!H", 0)

Address = IPv4Address | IPv6Address


def _one_family(source: Address, destination: Address) -> tuple[Address, Address]:
    """
    Both addresses in one family, as a header names them: an IPv4 one
    beside an IPv6 one becomes IPv4-mapped IPv6 (C{::ffff:192.0.2.7}).
    """
    if source.version == destination.version:
        return source, destination
    return _as_ipv6(source), _as_ipv6(destination)


def _as_ipv6(address: Address) -> IPv6Address:
    return address if isinstance(address, IPv6Address) else IPv6Address(f"::ffff:{address}")


def version_1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """C{PROXY TCP4 192.0.2.7 127.0.0.1 4242 27679\\r\\n}."""
    client, server = _one_family(ip_address(source[0]), ip_address(destination[0]))
    family = "TCP4" if client.version == 4 else "TCP6"
    return f"PROXY {family} {client} {server} {source[1]} {destination[1]}\r\n".encode("ascii")


def version_2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The binary header, command PROXY, over TCP: addresses, then ports."""
    client, server = _one_family(ip_address(source[0]), ip_address(destination[0]))
    family = _TCP4 if client.version == 4 else _TCP6
    block = client.packed + server.packed + struct.pack("!HH", source[1], destination[1])
    return (SIGNATURE + bytes([_VERSION_2 | _PROXY, family]) + struct.pack("!H", len(block))
            + block)


_BUILDERS = {"v1": version_1, "v2": version_2}


class _SendsHeaderFirst(ProtocolWrapper):
    """Writes the header on the bare connection, then lets the probe (or TLS) begin."""

    # Set before connectionMade, by the factory and by the connection.  A
    # UNIX socket's transport has the same methods; it only ever gets the
    # LOCAL header, which names no address.
    factory: ProxyHeaderSender
    transport: ITCPTransport

    def connectionMade(self) -> None:
        self.transport.write(self.factory.header(self.transport))
        super().connectionMade()


class ProxyHeaderSender(WrappingFactory):
    """
    C{wrapped} (the probe's factory, or TLS around it) behind a PROXY
    header of C{version} (C{v1}, C{v2}, C{v2-local}).  The header names
    C{source} as the client, or by default the probe's own end of the
    connection, and the address connected to as the server.
    """

    protocol = _SendsHeaderFirst
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, version: str,
                 source: tuple[str, int] | None) -> None:
        super().__init__(wrapped)
        self.version = version
        self.source = source

    def header(self, transport: ITCPTransport) -> bytes:
        if self.version == "v2-local":
            return LOCAL
        own, peer = transport.getHost(), transport.getPeer()
        source = self.source or (own.host, own.port)
        return _BUILDERS[self.version](source, (peer.host, peer.port))
