"""
The control channel between the supervisor and each of its workers: AMP
over a socket pair, one end of which the worker inherits.

A worker says when it serves (L{Ready}); the supervisor asks each worker for
its counters when C{/metrics} is scraped (L{GetStats}), and hands it the
connections that reached another worker's socket while that worker was down
(L{Adopt}).  The channel also
tells a worker that its supervisor is gone: when it closes unasked, the
worker stops, so no worker outlives a supervisor killed outright.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.application import service
from twisted.internet import fdesc
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorSocket, IReactorTime, ITransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from tcpgreet.server import GreetFactory
from tcpgreet.stats import Stats

if TYPE_CHECKING:
    from tcpgreet.service import GreetService

# The namespace the log has always given these lines, whatever the module.
log = Logger(namespace="tcpgreet.control")



class IChannelReactor(IReactorCore, IReactorSocket):
    """
    What a worker's end of the channel needs of its reactor: to adopt the
    socket it inherits, and to stop when the supervisor is gone.  (No
    reactor declares it: any that provides both interfaces is one.)
    """


_BY_REASON = amp.AmpList([(b"reason", amp.Unicode()), (b"count", amp.Integer())])


class GetStats(amp.Command):
    """The supervisor asks a worker for its counters and open connections."""

    arguments = []
    response = [
        *((name.encode(), amp.Integer()) for name in Stats.COUNTERS),
        (b"rejected", _BY_REASON),
        (b"aborted", _BY_REASON),
        (b"durations", amp.ListOf(amp.Integer())),
        (b"durations_sum", amp.Float()),
        (b"open", amp.Integer()),
    ]


class Ready(amp.Command):
    """
    A worker tells its supervisor it serves: its listeners adopted, its
    signal handlers in place.
    """

    arguments = []
    response = []


class Adopt(amp.Command):
    """
    The supervisor hands a worker a connection to serve as if it had
    accepted it on C{listener} (the index of its C{--listen}); the worker
    owns the descriptor from then on.
    """

    arguments = [(b"listener", amp.Integer()), (b"connection", amp.Descriptor())]
    response = []


def stats_response(stats: Stats, open_connections: int) -> dict[str, Any]:
    """L{GetStats}'s answer for C{stats}."""
    return {
        **{name: getattr(stats, name) for name in Stats.COUNTERS},
        "rejected": [{"reason": r, "count": c} for r, c in stats.rejected.items()],
        "aborted": [{"reason": r, "count": c} for r, c in stats.aborted.items()],
        "durations": list(stats.durations.counts),
        "durations_sum": stats.durations.sum,
        "open": open_connections,
    }


def stats_from_response(response: dict[str, Any]) -> tuple[Stats, int]:
    """The L{Stats} and open connections of a L{GetStats} answer."""
    stats = Stats()
    for name in Stats.COUNTERS:
        setattr(stats, name, response[name])
    stats.rejected = {row["reason"]: row["count"] for row in response["rejected"]}
    stats.aborted = {row["reason"]: row["count"] for row in response["aborted"]}
    if len(response["durations"]) != len(stats.durations.counts):
        raise ValueError("the worker's histogram has other buckets")
    stats.durations.counts = list(response["durations"])
    stats.durations.sum = response["durations_sum"]
    return stats, response["open"]


def adopt_channel(reactor: IReactorSocket, fileDescriptor: int, protocol: amp.AMP) -> None:
    """
    Run C{protocol} over the connected socket at C{fileDescriptor}, which
    the caller may close afterwards (the reactor keeps a copy).
    """
    fdesc.setNonBlocking(fileDescriptor)
    # Twisted's annotation wants a ServerFactory; any IProtocolFactory serves.
    reactor.adoptStreamConnection(fileDescriptor, socket.AF_UNIX,
                                  Factory.forProtocol(lambda: protocol))  # type: ignore[arg-type]


class _Channel(amp.AMP):
    """
    AMP without its log line for every connection made and lost: a control
    channel is internal, and its end is the business of its owner, which
    logs what matters (a worker's exit, a supervisor gone).
    """

    def makeConnection(self, transport: ITransport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class SupervisorChannel(_Channel):
    """The supervisor's end of one worker's channel."""

    def __init__(self, ready: Callable[[], None]) -> None:
        super().__init__()
        self._ready = ready

    @Ready.responder
    def ready(self) -> dict[str, Any]:
        self._ready()
        return {}

    def stats(self, timeout: float, clock: IReactorTime) -> Deferred[tuple[Stats, int]]:
        """
        The worker's L{Stats} and open connections; fails if it does not
        answer within C{timeout} seconds.
        """
        asked = self.callRemote(GetStats)
        asked.addTimeout(timeout, clock)
        return asked.addCallback(stats_from_response)

    def adopt(self, listener: int, connection: int) -> Deferred[dict[str, Any]]:
        """
        Hand the worker C{connection} (a descriptor), accepted on its
        socket of C{listener}; the descriptor must stay open until the
        answer, by which time the worker holds its own copy.
        """
        return self.callRemote(Adopt, listener=listener, connection=connection)


class WorkerChannel(_Channel):
    """
    A worker's end of its channel: answers with the factory's counters, and
    gives each connection handed over to C{adopt}.
    """

    def __init__(self, factory: GreetFactory, lost: Callable[[], None],
                 adopt: Callable[[int, int], None]) -> None:
        super().__init__()
        self._factory = factory
        self._lost = lost
        self._adopt = adopt

    @GetStats.responder
    def stats(self) -> dict[str, Any]:
        return stats_response(self._factory.stats, self._factory.limits.open)

    @Adopt.responder
    def adopt(self, listener: int, connection: int) -> dict[str, Any]:
        self._adopt(listener, connection)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._lost()


class ControlService(service.Service):
    """
    A worker's side of the channel: report ready once every other service
    has started, answer the supervisor, and stop when the supervisor is gone.
    """

    name = "control"
    # Set by setServiceParent, before the channel can ask for anything.
    parent: service.IServiceCollection

    def __init__(self, fileDescriptor: int, factory: GreetFactory,
                 reactor: IChannelReactor) -> None:
        self.fileDescriptor = fileDescriptor
        self.channel = WorkerChannel(factory, self._supervisor_gone, self._adopt)
        self._reactor = reactor
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        adopt_channel(self._reactor, self.fileDescriptor, self.channel)
        os.close(self.fileDescriptor)
        # A failure here is the channel closing, which _supervisor_gone handles.
        self.channel.callRemote(Ready).addErrback(lambda _: None)

    def stopService(self) -> None:
        super().stopService()
        self._stopping = True
        if self.channel.transport is not None:
            self.channel.transport.loseConnection()

    def _adopt(self, listener: int, connection: int) -> None:
        # The greeting service beside this one serves it (tcpgreet.tap).
        greeter = cast("GreetService", self.parent.getServiceNamed("greeter"))
        greeter.adopt_connection(listener, connection)

    def _supervisor_gone(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.warn("the supervisor has gone away: stopping")
        self._reactor.stop()
