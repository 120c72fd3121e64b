"""
Deadlines: the held connections of a factory under one reactor timer, on
MemoryReactorClock; and GreetFactory's held connections through them.
"""

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import greeting
from tcpgreet.deadlines import COMPACT_AFTER, Deadlines
from tcpgreet.server import LINGER, GreetFactory
from tcpgreet.service import GreetService

from .test_server import finish, open_connection


class Item:
    """Something to hold, named for the test's messages."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Item({self.name!r})"


class DeadlinesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.expired = []
        self.deadlines = Deadlines(self.expire, self.clock)

    def expire(self, item):
        self.expired.append((item, self.clock.seconds()))

    def held(self, *names, delay=5.0, every=1.0):
        """Items given C{delay}, one each C{every} seconds."""
        items = []
        for name in names:
            item = Item(name)
            self.deadlines.expire_after(item, delay)
            items.append(item)
            self.clock.advance(every)
        return items

    def test_deadlines_pass_in_order_each_at_its_own_time(self):
        a, b, c = self.held("a", "b", "c")  # deadlines at 5, 6, 7; now 3
        self.clock.advance(1.99)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.02)
        self.assertEqual(self.expired, [(a, 5.01)])
        self.clock.advance(0.98)
        self.assertEqual(self.expired, [(a, 5.01)])
        self.clock.advance(0.02)
        self.clock.advance(1.0)
        self.assertEqual([item for item, _ in self.expired], [a, b, c])
        self.assertEqual([when for _, when in self.expired], [5.01, 6.01, 7.01])

    def test_what_is_due_at_once_expires_at_once_in_order(self):
        items = self.held(*"abcdef", every=0.001)
        self.clock.advance(60)
        self.assertEqual([item for item, _ in self.expired], items)

    def test_a_discarded_item_does_not_expire(self):
        a, b, c = self.held("a", "b", "c")
        self.deadlines.discard(a)
        self.deadlines.discard(c)
        self.clock.advance(10)
        self.assertEqual([item for item, _ in self.expired], [b])

    def test_one_timer_at_a_time(self):
        a, b, _ = self.held("a", "b", "c")  # due at 5, 6, 7; now 3
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 5.0)  # the first one's deadline
        self.deadlines.discard(a)  # the timer stays: moving it costs more
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.clock.advance(2)  # nothing due at 5: set for the next
        self.assertEqual(self.expired, [])
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 6.0)
        self.clock.advance(1)
        self.assertEqual(self.expired, [(b, 6.0)])
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 7.0)

    def test_no_timer_once_no_deadline_is_left(self):
        items = self.held("a", "b")
        for item in items:
            self.deadlines.discard(item)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.expired, [])
        # And a new deadline sets one again.
        [c] = self.held("c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual([item for item, _ in self.expired], [c])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_shorter_delay_comes_first_and_moves_the_timer_sooner(self):
        a, b = self.held("a", "b")  # due at 5 and 6; now 2
        self.deadlines.expire_after(b, 1.0)  # due at 3 instead
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 3.0)
        self.assertEqual(self.deadlines.deadline_of(b), 3.0)
        self.clock.advance(1.0)
        self.assertEqual(self.expired, [(b, 3.0)])
        self.clock.advance(2.0)
        self.assertEqual(self.expired, [(b, 3.0), (a, 5.0)])

    def test_a_new_deadline_can_be_later_than_the_old(self):
        [a] = self.held("a", every=4)  # due at 5; now 4
        self.deadlines.expire_after(a, 3.0)  # due at 7 instead, as a reset does
        self.clock.advance(2.5)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.5)
        self.assertEqual(self.expired, [(a, 7.0)])

    def test_an_expired_item_is_held_until_discarded(self):
        [a] = self.held("a")
        self.deadlines.add(Item("undated"))
        self.clock.advance(10)
        self.assertIn(a, self.deadlines)
        self.assertIsNone(self.deadlines.deadline_of(a))
        self.assertEqual(len(self.deadlines), 2)
        self.deadlines.discard(a)
        self.assertNotIn(a, self.deadlines)
        self.assertEqual(len(self.deadlines), 1)

    def test_a_set_of_what_is_in_progress(self):
        a, b = self.held("a", "b")
        c = Item("c")
        self.deadlines.add(c)
        self.deadlines.add(a)  # already held: keeps its deadline
        self.assertEqual(self.deadlines.deadline_of(a), 5.0)
        self.assertEqual(set(self.deadlines), {a, b, c})
        self.assertEqual(self.deadlines, {a, b, c})
        self.assertTrue(self.deadlines)
        for item in self.deadlines:  # leaving while iterated
            self.deadlines.discard(item)
        self.assertEqual(self.deadlines, set())
        self.assertFalse(self.deadlines)

    def test_an_error_in_one_expiry_spares_the_others(self):
        a, b, c = self.held("a", "b", "c", every=0)

        def expire(item):
            if item is a:
                raise RuntimeError("boom")
            self.expired.append(item)

        self.deadlines._expire = expire
        d = self.held("d", every=0, delay=20)[0]
        self.clock.advance(5)
        self.assertEqual(self.expired, [b, c])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(15)
        self.assertEqual(self.expired, [b, c, d])

    def test_an_expiry_may_end_another_due_item(self):
        a, b = self.held("a", "b", every=0)
        self.deadlines._expire = lambda item: (self.expired.append(item),
                                               self.deadlines.discard(b))
        self.clock.advance(5)
        self.assertEqual(self.expired, [a])

    def test_many_removals_keep_the_order(self):
        count = 3 * COMPACT_AFTER
        items = self.held(*map(str, range(count)), delay=100, every=0.01)
        for item in items[::3]:
            self.deadlines.discard(item)
        kept = [item for i, item in enumerate(items) if i % 3]
        for _ in range(200):
            self.clock.advance(1)
        self.assertEqual([item for item, _ in self.expired], kept)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeldConnectionTests(SynchronousTestCase):
    """GreetFactory's held connections, all under the one timer."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = GreetFactory(greeting.from_text("hello"), quiet=True,
                                    reactor=self.reactor, timeout=10)

    def test_each_is_aborted_at_its_own_deadline_under_one_timer(self):
        connections = []
        for _ in range(5):
            connections.append(open_connection(self.factory))
            self.reactor.advance(1)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        # Opened at 0, 1, ..., 4: due at 10, 11, ..., 14; now 5.
        for due, (protocol, transport) in enumerate(connections, start=10):
            self.reactor.advance(due - 0.01 - self.reactor.seconds())
            self.assertFalse(getattr(transport, "aborted", False))
            self.reactor.advance(0.02)
            self.assertTrue(transport.aborted)
            finish(protocol, error.ConnectionAborted)
        self.assertEqual(self.factory.stats.aborted, {"timeout": 5})
        self.assertEqual(self.factory.waiting, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_finished_connection_is_not_aborted(self):
        first, _ = open_connection(self.factory)
        protocol, transport = open_connection(self.factory)
        finish(first, error.ConnectionLost)
        self.assertNotIn(first, self.factory.waiting)
        self.reactor.advance(10)
        self.assertTrue(transport.aborted)
        finish(protocol, error.ConnectionAborted)
        self.assertEqual(self.factory.stats.aborted, {"timeout": 1})
        self.assertEqual(self.factory.stats.lost, 1)

    def test_a_lingering_close_comes_before_older_deadlines(self):
        _, older_transport = open_connection(self.factory)
        self.reactor.advance(5)
        protocol, transport = open_connection(self.factory)
        protocol.dataReceived(b"spoken")
        transport.flushed()  # the greeting is out: LINGER for the client's EOF
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(LINGER - 0.01)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.02)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(getattr(transport, "aborted", False))
        self.assertFalse(older_transport.disconnecting)
        self.reactor.advance(5 - LINGER)
        self.assertTrue(older_transport.aborted)

    def test_a_drain_waits_for_them_and_cuts_what_is_left(self):
        service = GreetService(self.factory, [], reactor=self.reactor, drain_timeout=5)
        service.startService()
        connections = [open_connection(self.factory) for _ in range(3)]
        (done, done_transport), (late, late_transport), (stuck, stuck_transport) = connections
        stopped = service.stopService()
        done_transport.flushed()
        finish(done)
        self.assertNoResult(stopped)
        self.reactor.advance(4.9)
        late_transport.flushed()
        finish(late)
        self.assertNoResult(stopped)
        self.reactor.advance(0.2)
        self.assertTrue(stuck_transport.aborted)
        finish(stuck, error.ConnectionAborted)
        self.successResultOf(stopped)
        self.assertEqual(self.factory.stats.aborted, {"drain": 1})
        self.assertEqual(self.factory.stats.greeted, 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_an_aborted_connection_is_waited_for_until_it_is_gone(self):
        protocol, transport = open_connection(self.factory)
        idle = self.factory.when_idle()
        self.reactor.advance(10)
        self.assertTrue(transport.aborted)
        self.assertNoResult(idle)  # the abort takes effect later
        finish(protocol, error.ConnectionAborted)
        self.successResultOf(idle)

    def test_a_failed_abort_does_not_stop_the_next(self):
        first, first_transport = open_connection(self.factory)
        second, second_transport = open_connection(self.factory)

        def broken():
            raise RuntimeError("cannot abort")

        first_transport.abortConnection = broken
        self.reactor.advance(10)
        self.assertTrue(second_transport.aborted)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        finish(second, error.ConnectionAborted)
        finish(first, error.ConnectionLost)
        self.assertEqual(self.factory.waiting, set())

