"""
The contracts between tcpgreet's parts, as zope interfaces.

A factory declares what it promises (L{IDirectFactory}, L{IProxiedFactory});
the part that relies on the promise checks the declaration, never probes
for methods one by one.  Tests hold each implementation to its interface
with C{verifyObject}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, ITCPTransport
from zope.interface import Attribute, Interface


class IDirectFactory(IProtocolFactory):
    """
    A factory whose connections a L{tcpgreet._port.GreetPort} may serve within the accept
    pass, on a L{tcpgreet._port.DirectTransport}.

    Providing it promises that the factory's protocols need nothing of
    their transport but C{ITCPTransport} (and the other interfaces a
    L{tcpgreet._port.DirectTransport} declares): no reactor-transport internals, no
    reliance on being registered with the reactor.  In exchange the port
    says when a connection needs the reactor (L{connectionWaiting}), which
    a protocol cannot know when its C{connectionMade} returns, because what
    it asked for then takes effect only afterwards.
    """

    # Any: it is a protocol this factory built, of the class it builds.
    def connectionWaiting(protocol: Any) -> None:  # noqa: N805 (zope: no self)
        """
        The connection of C{protocol}, served on a L{tcpgreet._port.DirectTransport}, now
        needs the reactor (it was handed to a C{tcp.Server}), and may stay
        open for as long as the client takes: give it a deadline if it
        wants one.  Not called for connections finished in the accept pass.
        """


class IStaticGreetingFactory(IDirectFactory):
    """
    A direct factory whose connections, in the plain case, need nothing but
    the same few bytes sent: no protocol, no log line, no per-client
    decision.  A L{tcpgreet._port.GreetPort} then sends them itself right
    after accept and closes, and builds a protocol only for a connection
    that needs more: one whose client has spoken, or whose send fell short
    (L{resume_protocol}).

    Providing it also promises that every connection ends once its
    greeting is out: the port holds back what its connections write until
    they close their side (C{TCP_CORK}, where there is one), so that the
    greeting and the FIN leave together.
    """

    def static_greeting() -> bytes | None:
        """
        What connections get now, if they need nothing else (L{None}: they
        need their protocol: a template, a limit that must look at each).
        Asked at the start of each accept pass, and again after any
        connection the pass serves through a protocol, which may have taken
        the last place under a limit.
        """

    def static_finished(served: list[tuple[tuple[Any, ...], float]]) -> None:  # noqa: N805
        """
        Count (and log) the connections an accept pass served with
        L{static_greeting}, whole: each client's socket address (numeric,
        an IPv6 scope in the host, as Twisted has it), with the seconds
        from accept to close.
        """

    def resume_protocol(addr: IAddress, sent: int) -> IProtocol | None:  # noqa: N805
        """
        The protocol for a connection from C{addr} that already has the
        first C{sent} bytes of L{static_greeting}, and needs the rest (or
        its client has spoken, and needs to be heard out); as
        C{buildProtocol}, L{None} if a limit refuses it.
        """


class IDirectTransport(ITCPTransport):
    """
    An C{ITCPTransport} of a connection that the reactor has not seen yet:
    the port's, until the connection is finished or handed over (see
    L{IDirectFactory.connectionWaiting}).
    """

    server = Attribute("The tcp.Server the connection was handed to, or None.")


class IAdoptingPort(Interface):
    """A listening port that can serve a connection accepted elsewhere."""

    def adoptConnection(fd: int) -> None:  # noqa: N805 (zope: no self)
        """Serve the connected socket at C{fd}, which the port now owns."""


class IProxiedFactory(Interface):
    """
    What the PROXY header reader needs of the factory it wraps: to hold a
    place for a connection before its client is known, to give it back or
    count a refusal, and to be told what is in progress, so that a drain
    waits for connections whose header is still to come.
    """

    waiting = Attribute("The set of connections in progress, which a drain waits for.")

    def reserve(peer: IAddress) -> bool:  # noqa: N805 (zope: no self)
        """Hold a place under the limits for C{peer}'s connection, or refuse."""

    def cancel() -> None:
        """Give back a place L{reserve} held, for a connection never served."""

    def refuse(reason: str, host: str | None) -> None:  # noqa: N805
        """Count a connection refused for C{reason}."""

    def done(connection: object) -> None:  # noqa: N805
        """C{connection} (here: its header reader) is no longer in progress."""

    def buildProtocol(addr: IAddress, reserved: bool = False) -> IProtocol | None:  # noqa: N805
        """The protocol for the client the header names, its place held already."""
