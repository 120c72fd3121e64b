"""
The supervisor of C{--workers N}: N worker processes serve the listeners it
holds, and it keeps them running.

The supervisor binds every listener itself (L{tcpgreet.workers.handover}), before
twistd drops privileges, and serves no connection.  It starts each worker
with C{reactor.spawnProcess}, handing it its listening sockets, a control
channel (L{tcpgreet.workers.control}) and a pipe for its log (L{tcpgreet.workers.logrelay}).
A worker that exits unasked is restarted at once, or after a growing delay
if it keeps dying young (L{RestartBackoff}); until its replacement serves,
the supervisor accepts from its sockets and hands each connection to a
live worker (L{StandIn}).  SIGHUP is passed on to every
worker; SIGTERM and SIGINT stop them all, each with its own graceful drain,
and SIGKILL whatever is still running once the drain should be over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorCore,
    IReactorFDSet,
    IReactorProcess,
    IReactorSocket,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpgreet._port import PortReactor, c_accept
from tcpgreet.logs import RateLimitedLog
from tcpgreet.server import GreetFactory
from tcpgreet.service import (
    DEFAULT_DRAIN_TIMEOUT,
    GreetService,
    IServiceReactor,
    startup_format,
)
from tcpgreet.stats import Stats, total
from tcpgreet.workers.arguments import WorkerRole, per_worker, role_arguments
from tcpgreet.workers.control import SupervisorChannel, adopt_channel
from tcpgreet.workers.handover import HeldListener, handover
from tcpgreet.workers.logrelay import Lines, LogRelay
from tcpgreet.workers.reuseport import steering_key

# The namespace the log has always given these lines, whatever the module.
log = Logger(namespace="tcpgreet.workers")

# A worker that dies before it serves, or within this many seconds of it,
# died young; one that keeps doing so is restarted ever more slowly.
YOUNG = 1.0
FIRST_DELAY = 0.5
MAX_DELAY = 30.0

# After SIGTERM, a worker drains for up to --drain-timeout; past that and
# this margin, it is killed.
KILL_MARGIN = 5.0

_T = TypeVar("_T")

# How long a scrape of /metrics waits for a worker's counters.
STATS_TIMEOUT = 1.0

# A stand-in accepts at most this many connections a reactor pass, and
# after running out of descriptors, waits this long before it tries again.
STAND_IN_BATCH = 64
STAND_IN_PAUSE = 0.1

# The environment variables systemd passes sockets with: a worker gets its
# own (see tcpgreet.workers.__main__).
_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ISupervisorReactor(IReactorCore, IServiceReactor, IReactorProcess, IReactorSocket,
                         IReactorFDSet):
    """
    What a L{WorkerSupervisor} needs of its reactor: a greeting service's
    (it runs, keeps time, takes calls from signal handlers), and to spawn
    its workers, talk to them over adopted sockets, and read the sockets it
    stands in on.  (No reactor declares it: any that provides all of these
    interfaces is one.)
    """


class RestartBackoff:
    """
    How long to wait before restarting a worker that exited unasked: not at
    all after one that served for a while; after one that died young, a
    delay that doubles with each young death in a row, up to a cap.
    """

    def __init__(self, young: float = YOUNG, first: float = FIRST_DELAY,
                 cap: float = MAX_DELAY) -> None:
        self.young = young
        self.first = first
        self.cap = cap
        self.young_deaths = 0

    def delay(self, served_for: float | None) -> float:
        """
        The delay before the next start, after a worker that served for
        C{served_for} seconds (L{None}: it never served).
        """
        if served_for is not None and served_for >= self.young:
            self.young_deaths = 0
            return 0.0
        self.young_deaths += 1
        return min(self.cap, self.first * 2 ** (self.young_deaths - 1))


def exit_description(reason: Failure) -> str:
    """How a process ended, for a log line: "exited with status 1"..."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {value.signal} ({name})"
    if isinstance(value, (ProcessDone, ProcessTerminated)):
        return f"exited with status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


class Worker:
    """
    One worker process, from its start to its exit.

    @ivar number: which worker it is, from 1; a restarted worker keeps it.
    @ivar stats: its counters, as it last reported them.
    @ivar ended: fires once the process has exited and its pipes are closed.
    """

    def __init__(self, number: int) -> None:
        self.number = number
        self.pid: int | None = None
        # Both set once the process is spawned, before the supervisor counts
        # the worker among its workers.
        self.process: IProcessTransport
        self.channel: SupervisorChannel
        self.served_since: float | None = None
        self.stats = Stats()
        self.open = 0
        self.reload_pending = False
        self.exited = False
        self.ended: Deferred[None] = Deferred()

    def signal(self, name: str) -> None:
        """Send signal C{name} ("TERM", "HUP", "KILL"), unless it is gone already."""
        with contextlib.suppress(ProcessExitedAlready):
            self.process.signalProcess(name)


class WorkerProcess(ProcessProtocol):
    """A worker as the reactor sees it: its log on two pipes, then its exit."""

    # Set when the process starts, before anything comes from its pipes.
    transport: IProcessTransport
    relay: LogRelay

    def __init__(self, worker: Worker, ended: Callable[[Worker, Failure], None]) -> None:
        self.worker = worker
        self._ended = ended
        self._lines = {1: Lines(), 2: Lines()}

    def connectionMade(self) -> None:
        self.relay = LogRelay(self.worker.number, self.transport.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._relay(childFD, self._lines[childFD].feed(data))

    def childConnectionLost(self, childFD: int) -> None:
        if childFD in self._lines:
            self._relay(childFD, self._lines[childFD].rest())

    def _relay(self, childFD: int, lines: Iterable[bytes]) -> None:
        # Standard output carries JSON events, standard error plain text.
        emit = self.relay.json_line if childFD == 1 else self.relay.text_line
        for line in lines:
            emit(line)

    def processEnded(self, reason: Failure) -> None:
        self._ended(self.worker, reason)


@implementer(IReadDescriptor)
class StandIn:
    """
    Accepts, for a worker that is down, from its socket of one listener,
    and gives each connection to the supervisor to hand to a live worker.

    In a reuseport group the kernel keeps putting a share of the new
    connections (with steering: every connection of the same clients) in
    the queue of each socket, whether or not a process accepts from it;
    without a stand-in they would wait there through the restart backoff,
    up to L{MAX_DELAY} seconds, connected and never greeted.

    @ivar listener: the index of the listener the socket is for.
    @ivar steered: whether the kernel steers clients among its group.
    @ivar handed: connections handed to a live worker so far.
    """

    def __init__(self, reactor: PortReactor,
                 hand_over: Callable[[StandIn, socket.socket, tuple[Any, ...]], None],
                 listener: int, skt: socket.socket, steered: bool) -> None:
        self._reactor = reactor
        self._hand_over = hand_over
        self.listener = listener
        self._socket = skt
        self.steered = steered
        self._paused: IDelayedCall | None = None
        self.handed = 0

    def start(self) -> None:
        self._paused = None
        self._reactor.addReader(self)

    def stop(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        self._reactor.removeReader(self)

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "stand-in"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor let go of the socket; the supervisor still holds it."""

    def doRead(self) -> None:
        accept = c_accept(self._socket)
        for _ in range(STAND_IN_BATCH):
            try:
                fd, address = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
                    continue
                # Out of descriptors or memory: do not spin on a socket
                # that stays readable.
                log.warn("cannot accept for a worker that is down: {error}; "
                         "trying again in {pause:g} s", error=os.strerror(e.errno or 0),
                         pause=STAND_IN_PAUSE)
                self._reactor.removeReader(self)
                self._paused = self._reactor.callLater(STAND_IN_PAUSE, self.start)
                return
            self._hand_over(self, socket.socket(fileno=fd), address)


class WorkerSupervisor(GreetService):
    """
    A greeting service whose connections are served by worker processes.

    It listens as L{GreetService} does, on endpoints whose listening only
    binds (L{tcpgreet.workers.handover.WorkerSocketBinder}); its drain is the workers'
    drain, its reload theirs.  Its factory describes what each worker runs
    and serves no connection itself.

    @ivar workers: the running workers, by number.
    @ivar restarts: how many times a worker was restarted.
    @ivar totals: the counters of every worker, past ones included, as of
        the last L{gather}.
    @ivar open_connections: connections open in all workers, as of then.
    """

    name = "supervisor"
    _reactor: ISupervisorReactor

    def __init__(self, factory: GreetFactory,
                 endpoints: list[tuple[str, IStreamServerEndpoint]], count: int,
                 arguments: list[str], greeting_file: str | None = None, *,
                 reactor: ISupervisorReactor,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 executable: str = sys.executable) -> None:
        super().__init__(factory, endpoints, greeting_file=greeting_file, reactor=reactor,
                         drain_timeout=drain_timeout)
        self.count = count
        self.arguments = arguments
        self.executable = executable
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self.totals = Stats()
        self.open_connections = 0
        self._retired = Stats()
        self._backoff = {number: RestartBackoff() for number in range(1, count + 1)}
        self._restarting: dict[int, IDelayedCall] = {}  # by worker number
        self._stand_ins: dict[int, list[StandIn]] = {}  # by number, for workers down
        self._unsteered = 0  # the next live worker an unsteered connection goes to
        self._shutting_down = False
        self._nobody_serves = RateLimitedLog(
            log, "closed {count} connection(s) in the last {interval:g} s: "
            "no worker is serving", level=LogLevel.error, clock=reactor)

    # -- starting ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.count + 1):
            self._start(number)

    def log_startup(self) -> None:
        fields = self.startup_fields()
        log.info(startup_format(self.count, proxied="trusted_proxies" in fields), **fields,
                 workers=self.count, per_worker=self.connections_per_process())

    def connections_per_process(self) -> int:
        return per_worker(self.factory.limits.max_connections, self.count)

    def _start(self, number: int) -> None:
        """Start worker C{number}; on failure, try again later."""
        self._restarting.pop(number, None)
        reactor = self._reactor
        worker = Worker(number)
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with here, there:
            plan = handover(
                # Its endpoints listen through a HoldingReactor: each port is held.
                [(description, cast(HeldListener, port)) for (description, _), port
                 in zip(self.endpoints, self.ports, strict=True)],
                number - 1, there.fileno())
            role = WorkerRole(number, plan.control_fd, tuple(plan.listen_fds))
            arguments = [self.executable, "-m", "tcpgreet.workers", *self.arguments,
                         *role_arguments(role)]
            try:
                worker.process = reactor.spawnProcess(
                    WorkerProcess(worker, self._ended), self.executable, arguments,
                    env=self._environment(plan.environment),
                    childFDs={0: "w", 1: "r", 2: "r", **plan.child_fds})
            except OSError as e:  # fork failed: out of memory or processes
                log.error("cannot start worker {worker}: {error}", worker=number,
                          error=e.strerror or str(e))
                self._restart_later(number, self._backoff[number].delay(None))
                return
            worker.process.closeStdin()
            worker.pid = worker.process.pid
            worker.channel = SupervisorChannel(partial(self._ready, worker))
            adopt_channel(reactor, here.fileno(), worker.channel)
        self.workers[number] = worker

    @staticmethod
    def _environment(systemd: dict[str, str]) -> dict[str, str]:
        environment = {key: value for key, value in os.environ.items()
                       if key not in _SYSTEMD_VARIABLES}
        environment.update(systemd)
        # The log pipe carries UTF-8 JSON, whatever the locale.
        environment["PYTHONIOENCODING"] = "utf-8:backslashreplace"
        return environment

    def _ready(self, worker: Worker) -> None:
        worker.served_since = self._reactor.seconds()
        log.info("worker {worker} (pid {pid}) ready", worker=worker.number, pid=worker.pid)
        self._stand_down(worker.number)
        if worker.reload_pending:
            worker.reload_pending = False
            worker.signal("HUP")

    # -- exits and restarts ------------------------------------------------

    def _ended(self, worker: Worker, reason: Failure) -> None:
        worker.exited = True
        self._retired.add(worker.stats)
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        how = exit_description(reason)
        if self._shutting_down:
            if not (reason.check(ProcessDone) or
                    getattr(reason.value, "signal", None) == signal.SIGTERM):
                log.warn("worker {worker} (pid {pid}) {how} while stopping",
                         worker=worker.number, pid=worker.pid, how=how)
        else:
            now = self._reactor.seconds()
            served = None if worker.served_since is None else now - worker.served_since
            delay = self._backoff[worker.number].delay(served)
            self.restarts += 1
            if delay:
                log.error("worker {worker} (pid {pid}) {how} before serving for {young:g} s "
                          "({young_deaths} time(s) in a row); restarting it in {delay:g} s",
                          worker=worker.number, pid=worker.pid, how=how, delay=delay,
                          young=self._backoff[worker.number].young,
                          young_deaths=self._backoff[worker.number].young_deaths)
            else:
                log.warn("worker {worker} (pid {pid}) {how}; restarting it",
                         worker=worker.number, pid=worker.pid, how=how, delay=delay)
            self._restart_later(worker.number, delay)
            self._stand_in(worker.number)
        worker.ended.callback(None)

    # -- standing in for a worker that is down -------------------------------

    def _stand_in(self, number: int) -> None:
        """Accept from worker C{number}'s own sockets until it serves again."""
        if number in self._stand_ins:
            return
        stand_ins = [StandIn(self._reactor, self.hand_over, index,
                            held.socket_for(number - 1), held.steered)
                    for index, held in enumerate(self.ports)
                    if isinstance(held, HeldListener) and not held.shared]
        if not stand_ins:
            return
        self._stand_ins[number] = stand_ins
        log.info("until worker {worker} serves again, the others serve the connections "
                 "that reach its sockets", worker=number)
        for stand_in in stand_ins:
            stand_in.start()

    def _stand_down(self, number: int, back: bool = True) -> None:
        """Stop standing in for worker C{number}: it is C{back}, or all stop."""
        stand_ins = self._stand_ins.pop(number, [])
        for stand_in in stand_ins:
            stand_in.stop()
        if stand_ins and back:
            log.info("worker {worker} serves again; the others served {handed} of its "
                     "connection(s) meanwhile", worker=number,
                     handed=sum(stand_in.handed for stand_in in stand_ins))

    def hand_over(self, stand_in: StandIn, connection: socket.socket, address: tuple) -> None:
        """
        Give C{connection}, accepted by C{stand_in}, to a live worker: on a
        steered listener, the same worker for every connection of a client
        (while the same workers are live), so that per-address limits stay
        exact; else each to the next.  With no live worker it is closed, so
        that its client learns now instead of waiting.
        """
        live = [worker for _, worker in sorted(self.workers.items())
                if worker.served_since is not None and worker.channel.transport is not None]
        if not live:
            connection.close()
            self._nobody_serves.note()
            return
        if stand_in.steered:
            target = live[steering_key(address[0]) % len(live)]
        else:
            target = live[self._unsteered % len(live)]
            self._unsteered += 1
        stand_in.handed += 1
        # The descriptor must stay open until the worker has its copy.
        handed = target.channel.adopt(stand_in.listener, connection.fileno())
        handed.addBoth(lambda _: connection.close())

    def _restart_later(self, number: int, delay: float) -> None:
        if self._shutting_down:
            return
        self._restarting[number] = self._reactor.callLater(delay, self._start, number)

    # -- signals -----------------------------------------------------------

    def reload(self) -> bool:
        """
        Pass SIGHUP on to every worker: each re-reads the greeting file.  A
        worker still starting gets it once it serves; one not started yet
        reads the file when it starts.
        """
        workers = list(self.workers.values())
        log.info("SIGHUP: passing it on to {count} worker(s)", count=len(workers))
        for worker in workers:
            if worker.served_since is None:
                worker.reload_pending = True
            else:
                worker.signal("HUP")
        return True

    def stopService(self) -> Deferred:
        self._shutting_down = True
        for call in self._restarting.values():
            call.cancel()
        self._restarting.clear()
        for number in list(self._stand_ins):  # before their sockets close
            self._stand_down(number, back=False)
        return super().stopService()

    def drain(self) -> Deferred:
        """
        Stop every worker with SIGTERM (each drains its own connections),
        wait for all to exit, and kill those still running after the drain
        timeout and a margin.
        """
        workers = list(self.workers.values())
        if not workers:
            return succeed(None)
        log.info("stopping {count} worker(s), each draining for up to {timeout:g} s",
                 count=len(workers), timeout=self.drain_timeout)
        for worker in workers:
            worker.signal("TERM")
        reactor = self._reactor
        deadline = self.drain_timeout + KILL_MARGIN
        killer = reactor.callLater(deadline, self._kill_remaining, deadline)

        def stopped(result: _T) -> _T:
            if killer.active():
                killer.cancel()
            log.info("all workers stopped")
            return result

        return DeferredList([worker.ended for worker in workers]).addCallback(stopped)

    def signalled_while_stopping(self, name: str) -> None:
        log.info("{signal} while stopping: still waiting for {count} worker(s)",
                 signal=name, count=len(self.workers))

    def _kill_remaining(self, after: float) -> None:
        for worker in list(self.workers.values()):
            log.warn("worker {worker} (pid {pid}) still running {seconds:g} s after SIGTERM: "
                     "killing it", worker=worker.number, pid=worker.pid, seconds=after)
            worker.signal("KILL")

    # -- counters ----------------------------------------------------------

    def gather(self) -> Deferred:
        """
        Ask every worker for its counters and update L{totals} and
        L{open_connections}.  A worker that does not answer within
        L{STATS_TIMEOUT} counts with what it said last; the last word of a
        worker that exited stays in the totals, so no counter goes back.
        """
        asked = []
        for worker in list(self.workers.values()):
            answer = worker.channel.stats(STATS_TIMEOUT, self._reactor)
            asked.append(answer.addCallbacks(partial(self._answered, worker),
                                             lambda failure: None))
        return DeferredList(asked).addCallback(lambda _: self._sum())

    def _answered(self, worker: Worker, answer: tuple[Stats, int]) -> None:
        if not worker.exited:  # else its last word is in the retired totals already
            worker.stats, worker.open = answer

    def _sum(self) -> None:
        workers = list(self.workers.values())
        self.totals = total([self._retired, *(worker.stats for worker in workers)])
        self.open_connections = sum(worker.open for worker in workers)
