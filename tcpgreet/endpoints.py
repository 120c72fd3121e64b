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

import ast
import errno
import os
import re
import socket
from typing import Any, NamedTuple, Protocol, cast

from OpenSSL.crypto import Error as CryptoError
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger

from tcpgreet._port import GreetReactor
from tcpgreet.logs import Scheduler
from tcpgreet.proxy import ProxyHeaderEndpoint, ProxyHeaderFactory, TrustedProxies

DEFAULT_BACKLOG = 1024

log = Logger()

# The positional arguments of Twisted's own endpoint types, in order, so
# that an error can name the argument at fault; the ones with a backlog
# argument get our default; and the wrappers, whose remaining arguments
# describe another endpoint.
_POSITIONAL = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index"),
}
_BACKLOG_TYPES = frozenset(kind for kind, names in _POSITIONAL.items() if "backlog" in names)
_PORT_TYPES = frozenset(kind for kind, names in _POSITIONAL.items() if names[0] == "port")
_WRAPPER_TYPES = frozenset({"haproxy"})
_KNOWN = "use tcp, tcp6, ssl, unix, systemd or haproxy"


class EndpointError(ValueError):
    """
    An endpoint string that cannot be used.  The message names the option
    that gave it, the string and what is wrong with it (L{reason}).
    """

    def __init__(self, option: str, description: str, reason: str) -> None:
        super().__init__(f"{option} {description!r}: {reason}")
        self.reason = reason


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
    named, positional = _arguments(parts[kind + 1:])
    if "backlog" in named or len(positional) > _POSITIONAL[parts[kind]].index("backlog"):
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


def _arguments(parts: list[str]) -> tuple[dict[str, str], list[str]]:
    """An endpoint's arguments after its type: by name (C{name=value}), and in order."""
    named, positional = {}, []
    for part in parts:
        name, equals, value = part.partition("=")
        if equals:
            named[name] = value
        else:
            positional.append(part)
    return named, positional


class TCPListening(Protocol):
    """
    C{listenTCP} as reactors take it: any protocol factory.  (Twisted's
    C{IReactorTCP} annotation asks for a C{ServerFactory}, which a
    C{WrappingFactory} such as the PROXY header reader is not.)
    """

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort: ...


# What server_endpoint needs of the reactor it parses an endpoint for, or
# of the facade in front of one (which passes the rest through): timers,
# for a haproxy: listener's header deadline.  What an endpoint type
# listens with (listenTCP, listenUNIX, adoptStreamPort, ...), Twisted's
# endpoint parser asks for untyped.
EndpointReactor = Scheduler


class HeaderBeforeTLSReactor:
    """
    The reactor as the C{ssl:} endpoint under C{haproxy:} sees it: TLS
    goes inside the PROXY wrapper rather than around it, since HAProxy
    (C{server ... send-proxy-v2 ssl}) sends the header in clear, before
    the TLS handshake.  Whatever listens beneath (a port, a held or an
    inherited socket) listens on plain TCP.
    """

    def __init__(self, reactor: TCPListening) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenSSL(self, portNumber: int, factory: ProxyHeaderFactory,
                  contextFactory: IOpenSSLContextFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        factory.tls_after_header(contextFactory)
        return self._reactor.listenTCP(portNumber, factory, backlog, interface)


def server_endpoint(reactor: EndpointReactor, description: str,
                    trusted_proxies: TrustedProxies | None = None,
                    ipv6_only: bool = False,
                    option: str = "--listen") -> IStreamServerEndpoint:
    """
    Parse C{description}, given with C{option}, into an endpoint, raising
    L{EndpointError} with one line that names both and what is wrong.  A
    C{haproxy:} endpoint takes PROXY headers from C{trusted_proxies} only
    (L{None}: from anywhere).  C{ipv6_only}: its IPv6 TCP socket takes IPv6
    clients only, when C{reactor} is a real one (a facade of one's own
    binds as it was made to).
    """
    parts = split_description(description)
    if isinstance(reactor, PosixReactorBase):  # not a test's fake reactor
        reactor = GreetReactor(reactor, ipv6_only=ipv6_only)
    if parts[0] == "haproxy":
        # Our own PROXY wrapper, not Twisted's: see tcpgreet.proxy.
        inner = description[len("haproxy:"):]
        if len(parts) == 1 or not inner:
            raise EndpointError(option, description,
                                "haproxy: needs the endpoint it wraps, e.g. haproxy:tcp:27679")
        # Under ssl:, what listens beneath is a GreetReactor, a facade of
        # the workers' or a test's reactor: each listens on TCP.
        beneath = HeaderBeforeTLSReactor(cast(TCPListening, reactor)) \
            if parts[1] == "ssl" else reactor
        try:
            return ProxyHeaderEndpoint(server_endpoint(beneath, inner, ipv6_only=ipv6_only),
                                       clock=reactor, trusted=trusted_proxies)
        except EndpointError as e:
            raise EndpointError(option, description, e.reason) from None
    problem = _check_port(parts)
    if problem:
        raise EndpointError(option, description, problem)
    try:
        return serverFromString(reactor, with_default_backlog(description))
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        reason = _reason(e, parts)
        if parts[0] == "ssl" and "privateKey=" not in description:
            reason += " (privateKey= defaults to server.pem)"
        raise EndpointError(option, description, reason) from None
    except (CryptoError, VerifyError) as e:
        raise EndpointError(option, description, _tls_reason(e, parts)) from None


def _check_port(parts: list[str]) -> str | None:
    """What is wrong with the port of a TCP endpoint, if anything."""
    if parts[0] not in _PORT_TYPES:
        return None
    named, positional = _arguments(parts[1:])
    port = named.get("port", positional[0] if positional else None)
    if port is None:
        return f"the port is missing, e.g. {parts[0]}:27679"
    try:
        number = int(port)
    except ValueError:
        return f"port {port!r} is not a number"
    if not 0 <= number <= 65535:
        return f"port {number} is not between 0 and 65535"
    return None


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


_NOT_AN_INT = re.compile(r"invalid literal for int\(\) with base (\d+): (.*)")
_UNKNOWN_TYPE = re.compile(r"Unknown endpoint type: '(.*)'")
_UNKNOWN_KEYWORD = re.compile(r".*got an unexpected keyword argument '(\w+)'")
_TWICE = re.compile(r".*got multiple values for argument '(\w+)'")
_MISSING = re.compile(r".*missing \d+ required positional arguments?: '(\w+)'")
_TOO_MANY = re.compile(r".*takes .* positional arguments? but \d+ (were|was) given")


def _reason(e: Exception, parts: list[str]) -> str:
    """
    What is wrong, in the terms of the endpoint string: Twisted's parsers
    are plain functions, so a bad argument surfaces as the C{int()} or the
    call that failed on it.
    """
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
    text = str(e)
    ipv6_hint = (r" (escape the colons of an IPv6 address: interface=\:\:1)"
                 if "interface=" in ":".join(parts) else "")
    if match := _UNKNOWN_TYPE.fullmatch(text):
        kind = match.group(1)
        return (f"unknown endpoint type {kind!r}; {_KNOWN}" if kind
                else f"no endpoint type; {_KNOWN}, e.g. tcp:27679")
    if match := _NOT_AN_INT.fullmatch(text):
        value = ast.literal_eval(match.group(2))
        noun = "an octal number" if match.group(1) == "8" else "a number"
        return f"{_argument_with(parts, value)} {value!r} is not {noun}"
    if match := _UNKNOWN_KEYWORD.fullmatch(text):
        return f"{parts[0]} endpoints have no argument {match.group(1)!r}"
    if match := _TWICE.fullmatch(text):
        name = match.group(1)
        return f"{name!r} is given twice" + (ipv6_hint if name == "interface" else "")
    if match := _MISSING.fullmatch(text):
        name = match.group(1)
        hint = " (domain=INET or domain=INET6)" if name == "domain" else ""
        return f"{name!r} is missing{hint}"
    if _TOO_MANY.fullmatch(text):
        return "too many arguments" + ipv6_hint
    if isinstance(e, TypeError):
        return text.split("() ", 1)[-1]
    return text or type(e).__name__


def _argument_with(parts: list[str], value: str) -> str:
    """The name of the argument of the endpoint C{parts} whose value is C{value}."""
    named, positional = _arguments(parts[1:])
    for name, given in named.items():
        if given == value:
            return name
    names = _POSITIONAL.get(parts[0], ())
    for index, given in enumerate(positional):
        if given == value and index < len(names):
            return names[index]
    return "argument"
