"""
The rate-limited log and the JSON Lines observer.
"""

import io
import json

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.logs import RateLimitedLog, json_observer


class RateLimitedLogTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.clock = Clock()
        self.log = RateLimitedLog(Logger(observer=self.events.append),
                                  "{what} happened {count} time(s)", clock=self.clock)

    def counts(self):
        return [(e["what"], e["count"]) for e in self.events]

    def test_first_at_once_then_a_count_per_interval(self):
        for _ in range(100):
            self.log.note(what="x")
        self.assertEqual(self.counts(), [("x", 1)])
        self.clock.advance(1)
        self.assertEqual(self.counts(), [("x", 1), ("x", 99)])
        self.clock.advance(1)  # quiet second: nothing more
        self.clock.advance(1)
        self.assertEqual(self.counts(), [("x", 1), ("x", 99)])
        self.log.note(what="y")
        self.assertEqual(self.counts()[-1], ("y", 1))

    def test_keys_are_limited_separately(self):
        self.log.note(key=1, what="a")
        self.log.note(key=2, what="b")
        self.log.note(key=1, what="a")
        self.clock.advance(1)
        self.assertEqual(self.counts(), [("a", 1), ("b", 1), ("a", 1)])

    def test_level_is_warn_by_default(self):
        self.log.note(what="x")
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)


class JSONObserverTests(SynchronousTestCase):
    def emit(self, *args, **kwargs):
        out = io.StringIO()
        log = Logger(namespace="tcpgreet.server", observer=LogPublisher(json_observer(out)))
        log.info(*args, **kwargs)
        return out.getvalue()

    def test_one_object_per_line_with_the_fields(self):
        text = self.emit("{peer} port {port}: {outcome}", peer="::1", port=5,
                         outcome="greeted", duration_ms=0.25)
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(text.count("\n"), 1)
        record = json.loads(text)
        self.assertEqual(record["message"], "::1 port 5: greeted")
        self.assertEqual((record["peer"], record["port"], record["outcome"],
                          record["duration_ms"]), ("::1", 5, "greeted", 0.25))
        self.assertEqual((record["level"], record["namespace"]), ("info", "tcpgreet.server"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_unserialisable_values_are_shown_not_fatal(self):
        record = json.loads(self.emit("odd {thing}", thing=object()))
        self.assertTrue(record["thing"].startswith("<object object"))

    def test_failures_carry_their_traceback(self):
        out = io.StringIO()
        log = Logger(observer=LogPublisher(json_observer(out)))
        try:
            raise ZeroDivisionError("it broke")
        except ZeroDivisionError:
            log.failure("it broke", Failure())
        record = json.loads(out.getvalue())
        self.assertEqual(record["message"], "it broke")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["level"], "critical")
