"""
Running the greeting service: listening on every endpoint, reloading the
greeting on SIGHUP, and failing at start with one line instead of a traceback.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcpgreet import __version__, greeting
from tcpgreet.interfaces import IAdoptingPort
from tcpgreet.proxy import ProxyHeaderEndpoint
from tcpgreet.server import DRAIN, GreetFactory
from tcpgreet.startup import fail

log = Logger()

# What signal.signal returns and takes.
_Handler = Callable[[int, FrameType | None], Any] | int | None

DEFAULT_DRAIN_TIMEOUT = 5.0


class IServiceReactor(IReactorTime, IReactorFromThreads):
    """
    What the greeting service needs of its reactor: timers (the drain's
    deadline), and a way in from a signal handler (C{callFromThread}).
    """


def startup_format(workers: int = 1, proxied: bool = False) -> str:
    """
    The format of the start-up line; with workers, it has their number
    (C{{workers}}) and each one's share of the connections (C{{per_worker}});
    with PROXY listeners, whom their headers are taken from
    (C{{trusted_proxies}}).
    """
    several = workers > 1
    return ("tcpgreet {version} listening on {listeners}"
            + (" with {workers} workers" if several else "")
            + "; greeting from {source} ({size}); "
            "max-connections {max_connections}"
            + (" ({per_worker} a worker)" if several else "")
            + ", max-per-ip {max_per_ip}, rate-per-ip {rate_per_ip}, "
            + ("proxy headers trusted from {trusted_proxies}, " if proxied else "")
            + "timeout {timeout:g} s, drain-timeout {drain_timeout:g} s, "
            "{descriptors} descriptors")


def listen(description: str, endpoint: IStreamServerEndpoint,
           factory: IProtocolFactory) -> IListeningPort:
    """
    Listen on C{endpoint} now, or end the process with one line naming
    C{description} and the reason.
    """
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:  # pragma: no cover - no built-in endpoint does this
        raise fail(f"cannot listen on {description!r}: the endpoint did not start at once")
    if isinstance(outcome[0], Failure):
        message = f"cannot listen on {description!r}: {_listen_reason(outcome[0])}"
        log.critical("{message}", message=message)
        raise fail(message)
    return outcome[0]


def raise_descriptor_limit() -> int:
    """
    Raise the soft limit on open descriptors to the hard limit, so that
    C{--max-connections} can be reached; return the limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warn("cannot raise the descriptor limit from {soft} to {hard}: {error}",
                     soft=soft, hard=hard, error=str(e))
    return soft


class GreetService(service.Service):
    """
    Listen on every endpoint with one factory, re-read the greeting file on
    SIGHUP, and on stop, stop accepting everywhere at once and let the
    greetings in progress finish (for up to C{drain_timeout} seconds).

    @ivar ports: the listening ports, once listening.
    @ivar announce: whether to log the start-up line (a worker's supervisor
        logs it for the whole service).
    """

    name = "greeter"

    def __init__(self, factory: GreetFactory,
                 endpoints: list[tuple[str, IStreamServerEndpoint]],
                 greeting_file: str | None = None, *, reactor: IServiceReactor,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, announce: bool = True) -> None:
        self.factory = factory
        self.announce = announce
        self.endpoints = endpoints
        self.greeting_file = greeting_file
        self.drain_timeout = drain_timeout
        self.ports: list[IListeningPort] = []
        self.descriptors: int | None = None
        self._reactor = reactor
        self._previous_sighup: _Handler = None

    def privilegedStartService(self) -> None:
        # Listening happens here so that a privileged port can be bound
        # before twistd drops privileges, as strports services do.
        super().privilegedStartService()
        self.descriptors = raise_descriptor_limit()
        wanted = self.connections_per_process()
        if self.announce and wanted + 64 > self.descriptors:
            log.warn("--max-connections {wanted} is more than the {limit} descriptors "
                     "this process may open can carry; raise the limit (ulimit -Hn, "
                     "LimitNOFILE=) or expect descriptors to run out first",
                     wanted=wanted, limit=self.descriptors)
        self.ports = [listen(description, endpoint, self.factory)
                      for description, endpoint in self.endpoints]

    def connections_per_process(self) -> int:
        """The most connections one process of this service holds open."""
        return self.factory.limits.max_connections

    def adopt_connection(self, listener: int, fd: int) -> None:
        """
        Serve the connection at C{fd} as one accepted by the port of
        listener C{listener} (its index in the endpoints): a worker's
        supervisor accepted it for this worker.  A port that no longer
        listens, or cannot adopt, closes it.
        """
        port = self.ports[listener] if 0 <= listener < len(self.ports) else None
        if not IAdoptingPort.providedBy(port):
            os.close(fd)
            return
        port.adoptConnection(fd)

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        # SIGHUP's default action ends the process; a server asked to reload
        # must never die of it, whether or not it has a file to re-read.
        self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        if self.announce:
            self.log_startup()

    def log_startup(self) -> None:
        """The start-up line: what listens where, the greeting, every limit."""
        fields = self.startup_fields()
        log.info(startup_format(proxied="trusted_proxies" in fields), **fields)

    def startup_fields(self) -> dict[str, object]:
        """The fields of the start-up line."""
        factory = self.factory
        limits = factory.limits
        rate = limits.rate
        proxies = [endpoint for _, endpoint in self.endpoints
                   if isinstance(endpoint, ProxyHeaderEndpoint)]
        # Anyone who may send a header chooses the address that the limits
        # and the log see: the line says who that is.
        trust = {}
        if proxies:
            trusted = proxies[0].trusted  # one --trusted-proxy for them all
            trust["trusted_proxies"] = "any address" if trusted is None else str(trusted)
        return {
            "version": __version__,
            "listeners": ", ".join(
                f"{description} ({_listening_at(port)})"
                for (description, _), port in zip(self.endpoints, self.ports, strict=True)),
            "source": self.greeting_file or "--greeting",
            "size": (f"{len(factory.greeting)} bytes" if factory.greeting.static is not None
                     else f"a template of {len(factory.greeting)} characters"),
            "max_connections": limits.max_connections,
            "max_per_ip": limits.max_per_ip or "off",
            "rate_per_ip": f"{rate.rate:g}/{rate.burst:g}" if rate is not None else "off",
            "timeout": factory.timeout,
            "drain_timeout": self.drain_timeout,
            "descriptors": self.descriptors,
            **trust,
        }

    def stopService(self) -> Deferred[object]:
        super().stopService()
        # Until the drain is over, a second SIGTERM or SIGINT is only noted
        # (Twisted's handler would stop the stopping reactor again, and
        # raise), and SIGHUP still reloads rather than killing the process.
        previous: dict[int, _Handler] = {
            signum: signal.signal(signum, self._stop_signalled)
            for signum in (signal.SIGTERM, signal.SIGINT)}
        # Every listener stops accepting now, in this same call, before any
        # of them has finished closing; a closing port serves its backlog
        # first, so the drain starts once they are all closed.
        ports, self.ports = self.ports, []
        closed = DeferredList([maybeDeferred(port.stopListening) for port in ports],
                              consumeErrors=True)
        drained = closed.addCallback(
            self._ports_closed, [description for description, _ in self.endpoints]
        ).addCallback(lambda _: self.drain())
        return drained.addBoth(self._restore_signals, previous)

    def _ports_closed(self, results: Sequence[tuple[bool, object]],
                      descriptions: list[str]) -> None:
        """
        Say now which listener failed to stop (not later, as an unhandled
        error, when its Deferred is collected); the drain goes on regardless.
        """
        for description, (stopped, result) in zip(descriptions, results, strict=False):
            if not stopped and isinstance(result, Failure):
                log.failure("cannot stop listening on {listener!r}", result,
                            listener=description)

    def _restore_signals(self, result: object, previous: dict[int, _Handler]) -> object:
        if self._previous_sighup is not None:
            previous[signal.SIGHUP] = self._previous_sighup
            self._previous_sighup = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return result

    def _stop_signalled(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.signalled_while_stopping,
                                     signal.Signals(signum).name)

    def signalled_while_stopping(self, name: str) -> None:
        """Say what a stop signal that came during the drain waits for."""
        log.info("{signal} while stopping: still draining {count} connection(s)",
                 signal=name, count=len(self.factory.waiting))

    def drain(self) -> Deferred[None]:
        """
        Let the greetings in progress finish; abort what is left after
        C{drain_timeout} seconds.
        """
        factory = self.factory
        if not factory.waiting:
            return succeed(None)
        count = len(factory.waiting)
        log.info("draining {count} connection(s) for up to {timeout:g} s",
                 count=count, timeout=self.drain_timeout)
        idle = factory.when_idle()
        timer = self._reactor.callLater(self.drain_timeout, self._abort_remaining)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()
                log.info("drained {count} connection(s)", count=count)
            return result

        return idle.addCallback(done)

    def _abort_remaining(self) -> None:
        remaining = list(self.factory.waiting)
        log.warn("drain timeout: aborting {count} connection(s) still in progress",
                 count=len(remaining))
        for protocol in remaining:
            protocol.cut(DRAIN)

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor
        # was doing; hand the work to the reactor instead of doing it here.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Re-read the greeting file.  On success the new greeting replaces the
        old in one step; on failure the old one stays and the log says why.
        """
        if self.greeting_file is None:
            log.info("SIGHUP: nothing to reload, the greeting was given with --greeting")
            return False
        stats = self.factory.stats
        try:
            fresh = greeting.from_file(self.greeting_file)
        except greeting.GreetingError as e:
            stats.reload_failures += 1
            log.error("reload failed, keeping the previous greeting: {error}",
                      error=str(e))
            return False
        stats.reloads += 1
        self.factory.greeting = fresh
        log.info("reloaded greeting from {path}: {size} bytes",
                 path=self.greeting_file, size=len(fresh))
        return True


def _listen_reason(failure: Failure) -> str:
    e = failure.value
    socket_error = getattr(e, "socketError", None)
    if socket_error is not None:
        e = socket_error
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


def _listening_at(port: IListeningPort) -> str:
    """
    Where a listener listens, for the start-up line.  On every IPv6
    address (C{[::]}), a socket takes IPv4 clients too unless it is
    IPv6-only (the default's IPv6 half, or one systemd bound so): then it
    says so.
    """
    where = listening_address(port)
    skt = getattr(port, "socket", None)
    if isinstance(skt, socket.socket) and skt.family == socket.AF_INET6 and \
            skt.getsockname()[0] == "::" and \
            skt.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        where += ", IPv6 only"
    return where


def listening_address(port: IListeningPort) -> str:
    """Where C{port} listens, as a log line shows it: C{host:port}, C{[v6]:port}, a path."""
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        return f"{host.host}:{host.port}" if ":" not in host.host else \
            f"[{host.host}]:{host.port}"
    name = getattr(host, "name", host)
    return os.fsdecode(name) if isinstance(name, bytes) else str(name)
