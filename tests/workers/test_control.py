"""
The control channel: counters across it, a worker reporting ready, a
connection handed over, and a worker stopping when its supervisor is gone.
"""

import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcpgreet import greeting
from tcpgreet.server import GreetFactory
from tcpgreet.stats import Stats, total
from tcpgreet.workers.control import (
    ControlService,
    SupervisorChannel,
    WorkerChannel,
    adopt_channel,
    stats_from_response,
    stats_response,
)

from ..test_server import finish, open_connection


def some_stats(seed=1):
    stats = Stats()
    stats.accepted, stats.greeted, stats.lost, stats.bytes_sent = 5 * seed, 4 * seed, seed, 99
    stats.reloads, stats.reload_failures = 2, 1
    stats.rejected = {"max-per-ip": 3 * seed}
    stats.aborted = {"timeout": seed}
    stats.durations.observe(0.0002)
    stats.durations.observe(3.0)
    return stats


def as_dict(stats):
    return {**vars(stats), "durations": (stats.durations.counts, stats.durations.sum)}


class StatsTests(SynchronousTestCase):
    def test_round_trip(self):
        stats = some_stats()
        again, open_connections = stats_from_response(stats_response(stats, 7))
        self.assertEqual(as_dict(again), as_dict(stats))
        self.assertEqual(open_connections, 7)

    def test_sum(self):
        summed = total([some_stats(1), some_stats(2), Stats()])
        self.assertEqual((summed.accepted, summed.greeted, summed.lost, summed.bytes_sent),
                         (15, 12, 3, 198))
        self.assertEqual((summed.rejected, summed.aborted),
                         ({"max-per-ip": 9}, {"timeout": 3}))
        self.assertEqual(summed.durations.count, 4)
        self.assertAlmostEqual(summed.durations.sum, 2 * 3.0002)
        self.assertEqual(some_stats(1).accepted, 5)  # the parts are left alone


class ChannelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.factory = GreetFactory(greeting.from_text("hi"), quiet=True,
                                    reactor=MemoryReactorClock())
        self.ready = []
        self.lost = []
        self.worker, self.supervisor, self.pump = connectedServerAndClient(
            lambda: SupervisorChannel(lambda: self.ready.append(True)),
            lambda: WorkerChannel(self.factory, lambda: self.lost.append(True),
                                  lambda listener, fd: None),
            clock=self.clock)

    def test_stats_over_the_channel(self):
        for _ in range(3):
            protocol, transport = open_connection(self.factory)
            transport.flushed()
            finish(protocol)
        open_connection(self.factory)  # still open
        answers = []
        self.supervisor.stats(1.0, self.clock).addBoth(answers.append)
        self.pump.flush()
        [(stats, open_connections)] = answers
        self.assertEqual((stats.accepted, stats.greeted, open_connections), (4, 3, 1))

    def test_a_worker_that_does_not_answer_in_time(self):
        answers = []
        self.supervisor.stats(1.0, self.clock).addBoth(answers.append)
        self.clock.advance(1.0)  # nothing pumped: the worker is busy
        [failure] = answers
        self.assertEqual(failure.type.__name__, "TimeoutError")
        self.pump.flush()  # the late answer is dropped quietly

    def test_ready(self):
        from tcpgreet.workers.control import Ready

        self.worker.callRemote(Ready)
        self.pump.flush()
        self.assertEqual(self.ready, [True])

    def test_the_worker_hears_of_the_end(self):
        self.supervisor.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.lost, [True])


class HandOverTests(TestCase):
    @defer.inlineCallbacks
    def test_a_connection_handed_over_arrives_whole(self):
        # Over a real UNIX socket pair: descriptors travel beside the box.
        supervisor_end, worker_end = socket.socketpair()
        adopted = []
        worker = WorkerChannel(None, lambda: None,
                               lambda listener, fd: adopted.append((listener, fd)))
        supervisor = SupervisorChannel(lambda: None)
        adopt_channel(reactor, worker_end.fileno(), worker)
        adopt_channel(reactor, supervisor_end.fileno(), supervisor)
        worker_end.close()
        supervisor_end.close()
        self.addCleanup(lambda: supervisor.transport and supervisor.transport.loseConnection())
        self.addCleanup(lambda: worker.transport and worker.transport.loseConnection())
        client, accepted = socket.socketpair()
        self.addCleanup(client.close)
        with accepted:
            yield supervisor.adopt(3, accepted.fileno())
        [(listener, fd)] = adopted
        self.assertEqual(listener, 3)
        with socket.socket(fileno=fd) as theirs:  # the same connection, in other hands
            theirs.sendall(b"hello")
            self.assertEqual(client.recv(5), b"hello")


class WorkerReactor(MemoryReactorClock):
    """Connects an adopted stream at once, as the real reactor does; counts stops."""

    stopped = 0

    def adoptStreamConnection(self, fileDescriptor, addressFamily, factory):
        super().adoptStreamConnection(fileDescriptor, addressFamily, factory)
        protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def stop(self):
        self.stopped += 1


class ControlServiceTests(SynchronousTestCase):
    def start(self):
        here, there = socket.socketpair()
        self.addCleanup(here.close)
        fd = there.detach()
        reactor = WorkerReactor()
        factory = GreetFactory(greeting.from_text("hi"), quiet=True, reactor=reactor)
        service = ControlService(fd, factory, reactor)
        service.startService()
        [(_, family, _)] = reactor.adoptedStreamConnections
        self.assertEqual(family, socket.AF_UNIX)
        with self.assertRaises(OSError):  # the reactor has a copy; ours is closed
            os.fstat(fd)
        self.assertIn(b"Ready", reactor.transport.value())  # once it serves
        return reactor, service

    def test_supervisor_gone_stops_the_worker(self):
        reactor, service = self.start()
        service.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(reactor.stopped, 1)

    def test_stopping_closes_the_channel_without_stopping_twice(self):
        reactor, service = self.start()
        service.stopService()
        self.assertTrue(reactor.transport.disconnecting)
        service.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(reactor.stopped, 0)
