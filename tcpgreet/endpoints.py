"""
Endpoint description strings, with the defaults a greeting port needs.

Every address tcpgreet listens on is a Twisted server endpoint string, so
``tcp:``, ``tcp6:``, ``ssl:``, ``unix:``, ``systemd:`` and ``haproxy:`` all
work.  The one default we change is the listen backlog: Twisted's 50
overflows within milliseconds under a burst of short connections (clients
then stall in SYN retransmits for a second or more), so a listener gets at
least L{DEFAULT_BACKLOG} unless its string sets one.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import NamedTuple

from OpenSSL.crypto import Error as CryptoError
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger

from tcpgreet import port
from tcpgreet.proxy import ProxyHeaderEndpoint, ProxyHeaderFactory, TrustedProxies

DEFAULT_BACKLOG = 1024

log = Logger()

# Endpoint types that take a backlog argument, and the wrappers whose
# remaining arguments describe another endpoint.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_WRAPPER_TYPES = frozenset({"haproxy"})


class EndpointError(ValueError):
    """An endpoint string that cannot be used; the message names it."""


def split_description(description: str) -> list[str]:
    """Split on the colons that are not escaped with a backslash."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def proxied(description: str) -> bool:
    """Whether C{description} reads a PROXY header (C{haproxy:...})."""
    return split_description(description)[0] in _WRAPPER_TYPES


def with_default_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    Return C{description} with C{backlog=} added when its endpoint type takes
    a backlog and the string does not set one.
    """
    parts = split_description(description)
    kind = 0
    while kind < len(parts) - 1 and parts[kind] in _WRAPPER_TYPES:
        kind += 1
    if parts[kind] not in _BACKLOG_TYPES:
        return description
    if any(part.startswith("backlog=") for part in parts[kind + 1:]):
        return description
    return f"{description}:backlog={backlog}"


class Listener(NamedTuple):
    """
    One thing to listen on: an endpoint string and, for the IPv6 half of
    the default listener, that its socket takes IPv6 clients only (the
    IPv4 half serves the IPv4 clients on the same port).
    """

    description: str
    ipv6_only: bool = False


# What a machine without IPv6 (or a process not allowed it) answers.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


def ipv6_unavailable() -> str | None:
    """
    Why this process cannot listen on IPv6 at all (the kernel has no IPv6,
    or the process may not use it: systemd's RestrictAddressFamilies=), or
    L{None} if it can.  Any other failure is left to the listener itself
    to report.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(("::", 0))
    except OSError as e:
        if e.errno in _NO_IPV6:
            return os.strerror(e.errno).lower()
    return None


class GreetReactor:
    """
    The reactor as endpoints see it: the same, except that TCP listeners
    (plain, TLS, or inherited from systemd) are L{port.GreetPort}s.  Every
    endpoint type keeps working; the ones that listen on TCP get the port
    that serves greetings within the accept pass and survives running out
    of descriptors.

    @ivar _ipv6_only: whether the IPv6 TCP listeners it makes take IPv6
        clients only (L{port.GreetPort.ipv6Only}).
    """

    def __init__(self, reactor, ipv6_only: bool = False) -> None:
        self._reactor = reactor
        self._ipv6_only = ipv6_only

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def listenTCP(self, portNumber: int, factory, backlog: int = 50, interface: str = ""):
        return port.listen(self._reactor, portNumber, factory, backlog, interface,
                           ipv6_only=self._ipv6_only)

    def listenSSL(self, portNumber: int, factory, contextFactory, backlog: int = 50,
                  interface: str = ""):
        # What the reactor's own listenSSL does, on our port.
        from twisted.protocols.tls import TLSMemoryBIOFactory

        listening = self.listenTCP(portNumber, TLSMemoryBIOFactory(contextFactory, False, factory),
                                   backlog, interface)
        listening._type = "TLS"
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory):
        actual = socket_family(fileDescriptor)
        if actual != addressFamily and {actual, addressFamily} <= _INET:
            # systemd's ListenStream=PORT is an IPv6 socket that also takes
            # IPv4; read as the family the string names, every address
            # would come out garbled.
            log.warn("inherited socket {fd} is {actual}, not {named}; using {actual}",
                     fd=fileDescriptor, actual=actual.name, named=addressFamily.name)
            addressFamily = actual
        if addressFamily in _INET:
            return port.adopt(self._reactor, fileDescriptor, addressFamily, factory)
        return self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)


_INET = {socket.AF_INET, socket.AF_INET6}


class HeaderBeforeTLSReactor:
    """
    The reactor as the C{ssl:} endpoint under C{haproxy:} sees it: TLS
    goes inside the PROXY wrapper rather than around it, since HAProxy
    (C{server ... send-proxy-v2 ssl}) sends the header in clear, before
    the TLS handshake.  Whatever listens beneath (a port, a held or an
    inherited socket) listens on plain TCP.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def listenSSL(self, portNumber: int, factory: ProxyHeaderFactory, contextFactory,
                  backlog: int = 50, interface: str = ""):
        factory.tlsAfterHeader(contextFactory)
        return self._reactor.listenTCP(portNumber, factory, backlog, interface)


def socket_family(fileDescriptor: int) -> socket.AddressFamily:
    """The address family of the socket at C{fileDescriptor}."""
    probe = socket.socket(fileno=os.dup(fileDescriptor))
    try:
        return probe.family
    finally:
        probe.close()


def server_endpoint(reactor, description: str,
                    trusted_proxies: TrustedProxies | None = None,
                    ipv6_only: bool = False) -> IStreamServerEndpoint:
    """
    Parse C{description} into an endpoint, raising L{EndpointError} with one
    line that names the string and what is wrong with it.  A C{haproxy:}
    endpoint takes PROXY headers from C{trusted_proxies} only (L{None}:
    from anywhere).  C{ipv6_only}: its IPv6 TCP socket takes IPv6 clients
    only, when C{reactor} is a real one (a facade of one's own binds as it
    was made to).
    """
    parts = split_description(description)
    if isinstance(reactor, PosixReactorBase):  # not a test's fake reactor
        reactor = GreetReactor(reactor, ipv6_only=ipv6_only)
    if parts[0] == "haproxy" and len(parts) > 1:
        # Our own PROXY wrapper, not Twisted's: see tcpgreet.proxy.
        inner = description[len("haproxy:"):]
        beneath = HeaderBeforeTLSReactor(reactor) if parts[1] == "ssl" else reactor
        try:
            return ProxyHeaderEndpoint(server_endpoint(beneath, inner, ipv6_only=ipv6_only),
                                       clock=reactor, trusted=trusted_proxies)
        except EndpointError as e:
            raise EndpointError(f"listen endpoint {description!r}: "
                                f"{str(e).split(': ', 1)[1]}") from None
    try:
        return serverFromString(reactor, with_default_backlog(description))
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        reason = _reason(e)
        if parts[0] == "ssl" and "privateKey=" not in description:
            reason += " (privateKey= defaults to server.pem)"
        raise EndpointError(f"listen endpoint {description!r}: {reason}") from None
    except (CryptoError, VerifyError) as e:
        raise EndpointError(f"listen endpoint {description!r}: "
                            f"{_tls_reason(e, parts)}") from None


def _tls_reason(e: Exception, parts: list[str]) -> str:
    """Which of the key and certificate files is unusable, and why."""
    options = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    key = options.get("privateKey", "server.pem").replace("\\:", ":")
    cert = options.get("certKey", key).replace("\\:", ":")
    if isinstance(e, VerifyError):
        return f"the private key in {key} does not match the certificate in {cert}"
    text = str(e)
    if "no start line" in text:
        return f"no PEM certificate in {cert}" + (
            " (certKey= names the certificate file)" if cert == key else "")
    return f"no usable PEM private key in {key}"


def _inherited_listener() -> bool:
    """
    Whether descriptor 3, where systemd passes the first socket, is a
    listening socket.  (Twisted removes LISTEN_FDS and its kin from the
    environment when it reads them, so they cannot be asked afterwards.)
    """
    try:
        probe = socket.socket(fileno=os.dup(3))
    except OSError:
        return False
    try:
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        probe.close()


def _reason(e: Exception) -> str:
    if isinstance(e, (IndexError, KeyError)) and _inherited_listener():
        return ("no inherited socket found, yet descriptor 3 is a listening socket: "
                "Twisted adopts inherited sockets only when LISTEN_FDNAMES is set as "
                "well as LISTEN_FDS (a systemd unit always sets it; give "
                "systemd-socket-activate --fdname=NAME)")
    if isinstance(e, KeyError):
        return f"no such inherited socket {e}"
    if isinstance(e, IndexError):
        return "no inherited socket at that index"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    if isinstance(e, TypeError):
        # Twisted's parsers are plain functions: a bad keyword or a missing
        # argument surfaces as the TypeError of the call.
        text = str(e).split("() ", 1)[-1]
        if "'interface'" in text:
            text += r" (escape the colons of an IPv6 address: interface=\:\:1)"
        return text
    return str(e) or type(e).__name__
