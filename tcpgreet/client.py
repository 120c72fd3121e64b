"""
The probe client: connect, read what the server says up to EOF, print it.

    python -m tcpgreet.client [options] [HOST [PORT]]

Exit status follows the monitoring-plugin convention: 0 OK, 2 CRITICAL (refused,
timed out, reset, name not resolved), 3 UNKNOWN (bad usage).  A failure is one
line on standard error naming the target and the reason.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet import defer, error, task
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage
from twisted.python.failure import Failure

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 27679
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_BYTES = 65536

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


class ProbeError(Exception):
    """A probe that failed; the message is the reason, fit to print."""


class GreetClientProtocol(Protocol):
    """
    Collect what the server sends until it closes the connection, keeping at
    most C{factory.max_bytes}: a server that never stops talking must not
    grow the client's memory without bound.
    """

    def connectionMade(self) -> None:
        self.factory.connected(self)
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        room = self.factory.max_bytes - self._size
        if len(data) >= room:
            self._chunks.append(data[:room])
            self._size += room
            self.factory.truncated = True
            self.transport.abortConnection()
            return
        self._chunks.append(data)
        self._size += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.finished(b"".join(self._chunks), reason)


class GreetClientFactory(ClientFactory):
    """
    One probe of one address: fires L{deferred} with the banner bytes, or
    fails with L{ProbeError}; C{connected_at} and C{truncated} say how it went.
    """

    protocol = GreetClientProtocol
    noisy = False

    def __init__(self, clock, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.deferred: defer.Deferred[bytes] = defer.Deferred()
        self.started_at = clock.seconds()
        self.connected_at: float | None = None
        self.truncated = False
        self.transport = None

    def connected(self, protocol: GreetClientProtocol) -> None:
        self.connected_at = self.clock.seconds()
        self.transport = protocol.transport

    def finished(self, banner: bytes, reason: Failure) -> None:
        if self.deferred.called:
            return
        if self.truncated or reason.check(error.ConnectionDone):
            self.deferred.callback(banner)
        else:
            self.deferred.errback(ProbeError(describe(reason)))

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(ProbeError(describe(reason)))

    def abort(self, why: str) -> None:
        """Give up now: stop connecting or drop the connection."""
        if self.deferred.called:
            return
        self.deferred.errback(ProbeError(why))
        if self.transport is not None:
            self.transport.abortConnection()


def describe(reason: Failure) -> str:
    """A short, lower-case reason for a failed connection."""
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(error.TimeoutError, error.UserError):
        return "timed out"
    if reason.check(error.ConnectionLost):
        return "connection reset by peer"
    value = reason.value
    socket_error = getattr(value, "osError", None) or value
    strerror = getattr(socket_error, "strerror", None)
    if strerror:
        return strerror[:1].lower() + strerror[1:]
    text = reason.getErrorMessage()
    return text[:1].lower() + text[1:]


async def resolve(reactor, host: str, port: int) -> list[str]:
    """
    The addresses C{host} resolves to, in the order the resolver gives them
    (which honours /etc/gai.conf), without duplicates.
    """
    try:
        infos = await deferToThreadPool(
            reactor, reactor.getThreadPool(), socket.getaddrinfo,
            host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ProbeError(f"cannot resolve: {e.strerror}") from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


async def probe(reactor, host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
                max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """
    Read one banner from C{host}:C{port}, trying each of the host's
    addresses in turn; C{timeout} bounds everything (resolving, connecting,
    reading).  Raises L{ProbeError} with the reason of the last failure.
    """
    deadline = reactor.seconds() + timeout
    resolving = defer.ensureDeferred(resolve(reactor, host, port))
    resolving.addTimeout(timeout, reactor)
    try:
        addresses = await resolving
    except defer.TimeoutError:
        raise ProbeError("timed out resolving the name") from None
    last = ProbeError("no address to connect to")
    for address in addresses:
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            raise ProbeError("timed out")
        factory = GreetClientFactory(reactor, max_bytes)
        connector = reactor.connectTCP(address, port, factory, timeout=remaining)
        timer = reactor.callLater(remaining, _give_up, factory, connector)
        try:
            return await factory.deferred
        except ProbeError as e:
            last = e
            if factory.connected_at is not None:
                # The server answered and then failed: another address
                # would be another server, not a retry of this one.
                raise
        finally:
            if timer.active():
                timer.cancel()
    raise last


def _give_up(factory: GreetClientFactory, connector) -> None:
    if factory.connected_at is None:
        connector.stopConnecting()
    factory.abort("timed out")


def parse_target(args: list[str]) -> tuple[str, int]:
    """
    C{[HOST [PORT]]}, C{HOST:PORT} or C{[IPv6]:PORT} as a (host, port) pair;
    raises C{usage.UsageError} naming what is wrong.
    """
    if len(args) > 2:
        raise usage.UsageError(f"too many arguments: {' '.join(args)}")
    if not args:
        return DEFAULT_HOST, DEFAULT_PORT
    host, port_text = args[0], (args[1] if len(args) == 2 else None)
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise usage.UsageError(f"unclosed bracket in host {host!r}")
        rest = host[end + 1:]
        host = host[1:end]
        if rest:
            if not rest.startswith(":") or port_text is not None:
                raise usage.UsageError(f"bad target {args[0]!r}; use [IPv6]:PORT")
            port_text = rest[1:]
    elif host.count(":") == 1:
        if port_text is not None:
            raise usage.UsageError(f"port given twice: {args[0]!r} and {port_text!r}")
        host, port_text = host.split(":")
    if not host:
        raise usage.UsageError(f"empty host in {args[0]!r}")
    return host, DEFAULT_PORT if port_text is None else parse_port(port_text)


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise usage.UsageError(f"bad port {text!r}: not a number") from None
    if not 0 < port < 65536:
        raise usage.UsageError(f"bad port {text!r}: not in 1..65535")
    return port


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return value


class ClientOptions(usage.Options):
    synopsis = "[options] [HOST [PORT]]  (also HOST:PORT, [IPv6]:PORT)"
    longdesc = (
        "Connect to a TCP greeting (banner) server, print what it sends up to "
        "EOF. Exit status: 0 OK, 2 CRITICAL (refused, timed out, reset, name "
        "not resolved), 3 UNKNOWN (bad usage)."
    )
    optParameters = [
        ["timeout", "t", DEFAULT_TIMEOUT,
         "Seconds allowed for the whole probe: resolving, connecting, reading.",
         positive_seconds],
    ]

    def parseArgs(self, *args: str) -> None:
        self["host"], self["port"] = parse_target(list(args))

    def opt_version(self) -> None:
        """Print the version and exit."""
        from tcpgreet import __version__
        print(f"tcpgreet-client {__version__}")
        sys.exit(0)


def render_banner(data: bytes) -> str:
    """
    The banner as text for a terminal: CRLF line endings become newlines,
    invalid UTF-8 and every control character but tab and newline are shown
    as escapes, so a hostile server cannot drive the terminal.
    """
    text = data.replace(b"\r\n", b"\n").decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() or c in "\t\n" else
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


async def run(reactor, options: ClientOptions) -> int:
    host, port = options["host"], options["port"]
    try:
        banner = await probe(reactor, host, port, options["timeout"])
    except ProbeError as e:
        print(f"tcpgreet-client: {_target(host, port)}: {e}", file=sys.stderr)
        return CRITICAL
    text = render_banner(banner)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    sys.stdout.flush()
    return OK


def _target(host: str, port: int) -> str:
    return f"{host} port {port}"


def main(argv: list[str] | None = None) -> None:
    options = ClientOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"tcpgreet-client: {e} (see --help)", file=sys.stderr)
        sys.exit(UNKNOWN)
    task.react(_react, [options])


async def _react(reactor, options: ClientOptions) -> None:
    # task.react exits with the code of a SystemExit raised from main.
    raise SystemExit(await run(reactor, options))


if __name__ == "__main__":
    main()
