"""
GreetService: reload and the graceful drain on stop.
"""

import gc
import signal
import socket

from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import greeting
from tcpgreet.endpoints import server_endpoint
from tcpgreet.server import GreetFactory
from tcpgreet.service import GreetService

from .helpers import temporary_file
from .test_server import open_connection


class DrainTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = GreetFactory(greeting.from_text("hi"), quiet=True,
                                    reactor=self.reactor, timeout=60)
        self.service = GreetService(
            self.factory, [("tcp:1", server_endpoint(self.reactor, "tcp:1")),
                           ("tcp:2", server_endpoint(self.reactor, "tcp:2"))],
            reactor=self.reactor, drain_timeout=5)
        self.service.privilegedStartService()
        self.service.startService()

    def test_stop_closes_every_listener_at_once(self):
        # Each port takes its time to close; both must have been told to
        # stop accepting before either has finished.
        stopping = []
        for listening in self.service.ports:
            closed = Deferred()
            stopping.append(closed)
            self.patch(listening, "stopListening", lambda closed=closed: closed)
        stopped = self.service.stopService()
        self.assertEqual(len(stopping), 2)
        self.assertNoResult(stopped)
        for closed in stopping:
            closed.callback(None)
        self.successResultOf(stopped)

    def test_a_listener_that_fails_to_stop_is_reported_and_the_drain_goes_on(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        first = self.service.ports[0]
        self.patch(first, "stopListening", lambda: fail(RuntimeError("cannot close")))
        protocol, transport = open_connection(self.factory)
        stopped = self.service.stopService()
        self.assertNoResult(stopped)  # draining all the same
        transport.flushed()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(stopped)
        [failure] = self.flushLoggedErrors(RuntimeError)
        [event] = [e for e in events if e.get("log_failure") is failure]
        self.assertEqual(formatEvent(event), "cannot stop listening on 'tcp:1'")
        # Said once, now: not again as an unhandled error when collected.
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])

    def test_stop_waits_for_greetings_in_progress(self):
        connections = [open_connection(self.factory) for _ in range(3)]
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        for protocol, transport in connections:
            transport.flushed()
            self.assertNoResult(stopped)
            self.reactor.advance(0.1)
            protocol.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(stopped)
        self.assertEqual(self.factory.stats.greeted, 3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_signals_while_draining(self):
        protocol, transport = open_connection(self.factory)
        stopped = self.service.stopService()
        # A second SIGTERM is noted, not obeyed; SIGHUP still reloads.
        self.assertEqual(signal.getsignal(signal.SIGTERM), self.service._stop_signalled)
        self.assertEqual(signal.getsignal(signal.SIGINT), self.service._stop_signalled)
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.service._sighup)
        transport.flushed()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(stopped)
        self.assertNotEqual(signal.getsignal(signal.SIGTERM), self.service._stop_signalled)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), self.service._sighup)

    def test_what_is_left_after_the_drain_timeout_is_aborted(self):
        protocol, transport = open_connection(self.factory)
        stopped = self.service.stopService()
        self.reactor.advance(4.9)
        self.assertFalse(getattr(transport, "aborted", False))
        self.reactor.advance(0.2)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(stopped)
        self.assertEqual(self.factory.stats.aborted, {"drain": 1})

    def test_a_connection_handed_to_a_port_that_cannot_take_it_is_closed(self):
        for listener in (0, 7):  # a port of another kind; no such port
            ours, theirs = socket.socketpair()
            self.addCleanup(theirs.close)
            self.service.adopt_connection(listener, ours.detach())
            self.assertEqual(theirs.recv(10), b"")

    def test_nothing_in_progress_stops_at_once(self):
        self.successResultOf(self.service.stopService())


class ReloadTests(SynchronousTestCase):
    def test_reload_swaps_the_greeting_or_keeps_it(self):
        path = temporary_file(self, b"one\n")
        reactor = MemoryReactorClock()
        factory = GreetFactory(greeting.from_file(path), quiet=True, reactor=reactor)
        service = GreetService(factory, [], greeting_file=path, reactor=reactor)
        with open(path, "wb") as f:
            f.write(b"two\n")
        self.assertTrue(service.reload())
        self.assertEqual(factory.greeting.static, b"two\r\n")
        with open(path, "wb") as f:
            f.write(b"{bad}\n")
        self.assertFalse(service.reload())
        self.assertEqual(factory.greeting.static, b"two\r\n")
        self.assertEqual((factory.stats.reloads, factory.stats.reload_failures), (1, 1))

    def test_reload_without_a_file_is_harmless(self):
        reactor = MemoryReactorClock()
        factory = GreetFactory(greeting.from_text("x"), quiet=True, reactor=reactor)
        self.assertFalse(GreetService(factory, [], reactor=reactor).reload())
