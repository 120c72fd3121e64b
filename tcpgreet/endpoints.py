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

import socket

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase

from tcpgreet import port

DEFAULT_BACKLOG = 1024

# Endpoint types that take a backlog argument, and the wrappers whose
# remaining arguments describe another endpoint.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_WRAPPER_TYPES = frozenset({"haproxy"})


class EndpointError(ValueError):
    """An endpoint string that cannot be used; the message names it."""


def _split(description: str) -> list[str]:
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


def with_default_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    Return C{description} with C{backlog=} added when its endpoint type takes
    a backlog and the string does not set one.
    """
    parts = _split(description)
    kind = 0
    while kind < len(parts) - 1 and parts[kind] in _WRAPPER_TYPES:
        kind += 1
    if parts[kind] not in _BACKLOG_TYPES:
        return description
    if any(part.startswith("backlog=") for part in parts[kind + 1:]):
        return description
    return f"{description}:backlog={backlog}"


class GreetReactor:
    """
    The reactor as endpoints see it: the same, except that TCP listeners
    (plain, TLS, or inherited from systemd) are L{port.GreetPort}s.  Every
    endpoint type keeps working; the ones that listen on TCP get the port
    that serves greetings within the accept pass and survives running out
    of descriptors.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def listenTCP(self, portNumber: int, factory, backlog: int = 50, interface: str = ""):
        return port.listen(self._reactor, portNumber, factory, backlog, interface)

    def listenSSL(self, portNumber: int, factory, contextFactory, backlog: int = 50,
                  interface: str = ""):
        # What the reactor's own listenSSL does, on our port.
        from twisted.protocols.tls import TLSMemoryBIOFactory

        listening = self.listenTCP(portNumber, TLSMemoryBIOFactory(contextFactory, False, factory),
                                   backlog, interface)
        listening._type = "TLS"
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory):
        if addressFamily in (socket.AF_INET, socket.AF_INET6):
            return port.adopt(self._reactor, fileDescriptor, addressFamily, factory)
        return self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)


def server_endpoint(reactor, description: str) -> IStreamServerEndpoint:
    """
    Parse C{description} into an endpoint, raising L{EndpointError} with one
    line that names the string and what is wrong with it.
    """
    if isinstance(reactor, PosixReactorBase):  # not a test's fake reactor
        reactor = GreetReactor(reactor)
    try:
        return serverFromString(reactor, with_default_backlog(description))
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        raise EndpointError(f"listen endpoint {description!r}: {_reason(e)}") from None


def _reason(e: Exception) -> str:
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
