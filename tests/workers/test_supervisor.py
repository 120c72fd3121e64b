"""
The supervisor's logic with a fake clock and fake processes: restarts and
their backoff, stopping, SIGHUP, and counters that never go back.
"""

import os
import signal
import socket

from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import greeting
from tcpgreet.endpoints import server_endpoint
from tcpgreet.limits import ConnectionLimits
from tcpgreet.server import GreetFactory
from tcpgreet.stats import Stats
from tcpgreet.workers.arguments import per_worker
from tcpgreet.workers.handover import WorkerSocketBinder
from tcpgreet.workers.reuseport import steering_key
from tcpgreet.workers.supervisor import (
    KILL_MARGIN,
    RestartBackoff,
    StandIn,
    WorkerSupervisor,
    exit_description,
)


class BackoffTests(SynchronousTestCase):
    def test_young_deaths_wait_longer_and_longer_up_to_a_cap(self):
        backoff = RestartBackoff(young=1.0, first=0.5, cap=4.0)
        self.assertEqual([backoff.delay(None) for _ in range(6)], [0.5, 1, 2, 4, 4, 4])
        self.assertEqual(backoff.delay(0.3), 4)  # served, but not for long

    def test_a_worker_that_served_a_while_restarts_at_once(self):
        backoff = RestartBackoff(young=1.0, first=0.5, cap=4.0)
        backoff.delay(None)
        backoff.delay(None)
        self.assertEqual(backoff.delay(60.0), 0)
        self.assertEqual(backoff.delay(None), 0.5)  # counting starts over


class DescriptionTests(SynchronousTestCase):
    def test_exits(self):
        self.assertEqual(exit_description(Failure(ProcessDone(0))), "exited with status 0")
        self.assertEqual(exit_description(Failure(ProcessTerminated(exitCode=3))),
                         "exited with status 3")
        self.assertEqual(exit_description(Failure(ProcessTerminated(signal=9))),
                         "was killed by signal 9 (SIGKILL)")

    def test_share_of_max_connections(self):
        self.assertEqual([per_worker(10000, 2), per_worker(10, 3), per_worker(2, 2)],
                         [5000, 3, 1])


class FakeProcess:
    """What spawnProcess returns, recording signals."""

    pid = 1000

    def __init__(self, protocol):
        FakeProcess.pid += 1
        self.pid = FakeProcess.pid
        self.protocol = protocol
        self.signals = []
        self.stdin_closed = False
        self.gone = False

    def signalProcess(self, name):
        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def closeStdin(self):
        self.stdin_closed = True

    def end(self, **how):
        """The process exits (exitCode= or signal=)."""
        self.gone = True
        self.protocol.processEnded(Failure(ProcessTerminated(**how)))


class ProcessReactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None):
        process = FakeProcess(protocol)
        self.spawned.append((process, args, env, childFDs))
        protocol.makeConnection(process)
        return process

    def callFromThread(self, f, *args, **kwargs):
        # What a signal handler uses: run on the next turn of the loop.
        self.callLater(0, f, *args, **kwargs)


def stop_supervisor(supervisor, reactor):
    """Stop C{supervisor}, if running, and end the fake workers it waits for."""
    if supervisor.running:
        supervisor.stopService()
        for process, *_ in reactor.spawned:
            if not process.gone:
                process.end(signal=signal.SIGTERM)


class SupervisorTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        factory = GreetFactory(greeting.from_text("hi"), quiet=True, reactor=self.reactor,
                               limits=ConnectionLimits(max_connections=100))
        self.supervisor = WorkerSupervisor(factory, [], 2, ["--quiet"], reactor=self.reactor,
                                           drain_timeout=3, executable="/usr/bin/python3")
        self.supervisor.startService()
        self.addCleanup(self.stop)

    def stop(self):
        stop_supervisor(self.supervisor, self.reactor)

    def lines(self):
        return [formatEvent(event) for event in self.events]

    def process(self, number):
        return self.supervisor.workers[number].process

    def test_starts_each_worker_with_its_descriptors(self):
        self.assertEqual(len(self.reactor.spawned), 2)
        for number, (process, args, env, child_fds) in enumerate(self.reactor.spawned, 1):
            self.assertEqual(args[:4], ["/usr/bin/python3", "-m", "tcpgreet.workers", "--quiet"])
            self.assertEqual(args[4:], ["--worker", str(number), "--worker-control", "3",
                                        "--worker-fds", ""])
            self.assertEqual(sorted(child_fds), [0, 1, 2, 3])
            self.assertNotIn("LISTEN_PID", env)
            self.assertTrue(process.stdin_closed)
        self.assertIn("with 2 workers", self.lines()[0])
        self.assertIn("max-connections 100 (50 a worker)", self.lines()[0])

    def test_a_worker_that_served_for_a_while_is_restarted_at_once(self):
        self.supervisor.workers[1].channel.ready()
        self.reactor.advance(30)
        old = self.process(1)
        old.end(signal=signal.SIGKILL)
        self.assertEqual(len(self.reactor.spawned), 2)  # on the next reactor turn
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertIsNot(self.process(1), old)
        self.assertIn(f"worker 1 (pid {old.pid}) was killed by signal 9 (SIGKILL); "
                      "restarting it", self.lines())
        self.assertEqual(self.supervisor.restarts, 1)

    def test_a_worker_that_keeps_dying_young_is_restarted_ever_later(self):
        starts = []
        for _ in range(5):
            self.process(1).end(exitCode=1)
            before = len(self.reactor.spawned)
            waited = 0.0
            while len(self.reactor.spawned) == before:
                self.reactor.advance(0.25)
                waited += 0.25
            starts.append(waited)
        self.assertEqual(starts, [0.5, 1.0, 2.0, 4.0, 8.0])
        self.assertIn("restarting it in 8 s", self.lines()[-1])
        self.assertIn("exited with status 1 before serving for 1 s (5 time(s) in a row)",
                      self.lines()[-1])

    def test_sighup_reaches_every_worker_once_it_serves(self):
        self.supervisor.workers[1].channel.ready()
        self.supervisor.reload()
        self.assertEqual((self.process(1).signals, self.process(2).signals), (["HUP"], []))
        self.supervisor.workers[2].channel.ready()
        self.assertEqual(self.process(2).signals, ["HUP"])

    def test_stop_terms_every_worker_and_kills_what_outlives_the_drain(self):
        first, second = self.process(1), self.process(2)
        stopped = []
        self.supervisor.stopService().addCallback(stopped.append)
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        first.end(signal=signal.SIGTERM)
        self.reactor.advance(3 + KILL_MARGIN - 0.1)
        self.assertEqual((second.signals, stopped), (["TERM"], []))
        self.reactor.advance(0.1)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        second.end(signal=signal.SIGKILL)
        self.assertEqual(len(stopped), 1)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)  # nothing restarted
        self.assertIn("still running 8 s after SIGTERM: killing it", "\n".join(self.lines()))

    def test_stop_signals_during_the_drain_are_noted_not_ignored(self):
        self.supervisor.stopService()
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            self.assertTrue(callable(handler), f"{signum!r} handler: {handler!r}")
            handler(signum, None)
        self.reactor.advance(0)
        for name in ("SIGTERM", "SIGINT"):
            self.assertIn(f"{name} while stopping: still waiting for 2 worker(s)",
                          self.lines())
        self.assertEqual([self.process(n).signals for n in (1, 2)], [["TERM"], ["TERM"]])

    def test_stop_cancels_a_pending_restart(self):
        self.process(1).end(exitCode=1)  # restart due in 0.5 s
        self.supervisor.stopService()
        self.process(2).end(signal=signal.SIGTERM)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_counters_keep_what_exited_workers_said(self):
        def said(number, accepted, open_connections=0):
            stats = Stats()
            stats.accepted = stats.greeted = accepted
            self.supervisor._answered(self.supervisor.workers[number],
                                      (stats, open_connections))

        said(1, 10, open_connections=2)
        said(2, 5)
        self.supervisor._sum()
        self.assertEqual((self.supervisor.totals.accepted, self.supervisor.open_connections),
                         (15, 2))
        self.process(1).end(signal=signal.SIGKILL)
        self.reactor.advance(1)  # worker 1 starts again, from zero
        self.supervisor._sum()
        self.assertEqual((self.supervisor.totals.accepted, self.supervisor.open_connections),
                         (15, 0))
        said(1, 4)
        self.supervisor._sum()
        self.assertEqual(self.supervisor.totals.greeted, 19)


class StandInTests(SynchronousTestCase):
    """
    A worker that is down: the supervisor accepts from its sockets and hands
    each connection to a worker that serves, until the worker serves again.
    """

    def setUp(self):
        self.reactor = ProcessReactor()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        factory = GreetFactory(greeting.from_text("hi"), quiet=True, reactor=self.reactor)
        description = "tcp:0:interface=127.0.0.1"
        endpoint = server_endpoint(WorkerSocketBinder(self.reactor, 2, steer=True), description)
        self.supervisor = WorkerSupervisor(factory, [(description, endpoint)], 2, [],
                                           reactor=self.reactor)
        self.supervisor.privilegedStartService()
        self.supervisor.startService()
        self.addCleanup(self.stop)
        self.handed = {1: [], 2: []}
        for number in (1, 2):
            self.serve(number)

    def serve(self, number):
        """Worker C{number} is ready, and records what it is handed."""
        worker = self.supervisor.workers[number]
        worker.channel.makeConnection(StringTransport())
        worker.channel.ready()

        def adopt(listener, fd, handed=self.handed[number]):
            with socket.socket(fileno=os.dup(fd)) as connection:
                handed.append((listener, connection.getpeername()[0]))
            return succeed(None)

        worker.channel.adopt = adopt

    def stop(self):
        stop_supervisor(self.supervisor, self.reactor)

    def stand_ins(self):
        return [r for r in self.reactor.getReaders() if isinstance(r, StandIn)]

    def test_only_while_the_worker_is_down(self):
        self.assertEqual(self.stand_ins(), [])
        self.supervisor.workers[1].process.end(signal=signal.SIGKILL)
        [stand_in] = self.stand_ins()
        self.assertEqual(stand_in.fileno(), self.supervisor.ports[0].socket_for(0).fileno())
        self.reactor.advance(1)  # its replacement starts...
        self.assertEqual(len(self.stand_ins()), 1)  # ...but does not serve yet
        self.serve(1)
        self.assertEqual(self.stand_ins(), [])

    def test_stopping_stops_standing_in(self):
        self.supervisor.workers[2].process.end(signal=signal.SIGKILL)
        self.assertEqual(len(self.stand_ins()), 1)
        self.stop()
        self.assertEqual(self.stand_ins(), [])
        self.assertFalse([e for e in self.events if "serves again;" in formatEvent(e)])

    def connect(self, source):
        host, port = self.supervisor.ports[0].sockets[0].getsockname()
        client = socket.create_connection((host, port), timeout=10,
                                          source_address=(source, 0))
        self.addCleanup(client.close)
        return client

    def test_a_client_is_handed_to_one_live_worker(self):
        self.supervisor.workers[1].process.end(signal=signal.SIGKILL)
        # 127.0.0.2 is steered to worker 1's socket (index 0): 0x7F000002 % 2.
        self.assertEqual(steering_key("127.0.0.2") % 2, 0)
        for _ in range(3):
            self.connect("127.0.0.2")
        [stand_in] = self.stand_ins()
        stand_in.doRead()
        self.assertEqual(self.handed, {1: [], 2: [(0, "127.0.0.2")] * 3})
        self.assertEqual(stand_in.handed, 3)
        self.reactor.advance(1)  # its replacement starts
        self.serve(1)
        self.assertIn("worker 1 serves again; the others served 3 of its connection(s) "
                      "meanwhile", [formatEvent(e) for e in self.events])

    def test_with_no_worker_serving_a_client_learns_at_once(self):
        for number in (1, 2):
            self.supervisor.workers[number].process.end(signal=signal.SIGKILL)
        client = self.connect("127.0.0.2")
        stand_in = next(s for s in self.stand_ins()
                        if s.fileno() == self.supervisor.ports[0].socket_for(0).fileno())
        stand_in.doRead()
        self.assertEqual(client.recv(10), b"")  # closed, not left waiting
        self.assertIn("closed 1 connection(s) in the last 1 s: no worker is serving",
                      [formatEvent(e) for e in self.events])

