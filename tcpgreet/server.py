"""
The greeting service itself: a protocol that speaks first and leaves, and the
factory that holds what every connection shares.
"""

from __future__ import annotations

import time

from twisted.internet import error
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcpgreet.greeting import Clock, Greeting

log = Logger()


def peer_host_port(address: IAddress) -> tuple[str, int]:
    """
    The host and port of an address, for templates and logs.  A UNIX socket
    peer has no port; its name (usually empty) stands for the host.
    """
    host = getattr(address, "host", None)
    if host is not None:
        return host, address.port
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name or "unix", 0


class GreetProtocol(Protocol):
    """
    Send the greeting as soon as the connection is made and close once it is
    written; anything the client sends is dropped unread.
    """

    _started = 0.0
    _greeting = b""

    def connectionMade(self) -> None:
        factory = self.factory
        if not factory.quiet:
            self._started = time.monotonic()
        self._greeting = factory.greetingFor(self.transport.getPeer())
        self.transport.write(self._greeting)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """A greeting port has nothing to hear: drop it, buffer nothing."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connectionFinished(self, reason)


class GreetFactory(Factory):
    """
    Configuration and shared state for every L{GreetProtocol}: the greeting,
    the connection counter behind C{{connection}}, and the log switch.

    @ivar greeting: the L{Greeting} sent now; replacing it (on reload) is a
        single reference swap, so every connection gets one greeting whole.
    @ivar connections: connections greeted so far (the last C{{connection}}).
    """

    protocol = GreetProtocol
    noisy = False  # one line per connection is ours to write, not Factory's

    def __init__(self, greeting: Greeting, quiet: bool = False,
                 clock: Clock | None = None) -> None:
        self.greeting = greeting
        self.quiet = quiet
        self.connections = 0
        self._clock = clock if clock is not None else Clock()

    def greetingFor(self, peer: IAddress) -> bytes:
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

    def connectionFinished(self, protocol: GreetProtocol, reason: Failure) -> None:
        """Log how one connection ended: the one line per connection."""
        if self.quiet:
            return
        greeted = reason.check(error.ConnectionDone) is not None
        host, port = peer_host_port(protocol.transport.getPeer())
        log.info(
            "{peer} port {port}: {outcome}, {bytes} bytes in {duration_ms} ms"
            "{reason_text}",
            peer=host, port=port,
            outcome="greeted" if greeted else "lost",
            bytes=len(protocol._greeting) if greeted else 0,
            duration_ms=round((time.monotonic() - protocol._started) * 1000, 3),
            reason=None if greeted else reason.getErrorMessage(),
            reason_text="" if greeted else f" ({reason.getErrorMessage()})",
        )
