"""
The rate-limited log and the JSON Lines observer.
"""

import io
import json
import sys
import threading
import time

from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import logs
from tcpgreet.logs import (
    BatchingObserver,
    FastLogger,
    RateLimitedLog,
    json_observer,
    text_observer,
)


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


class StoppedReactor:
    """A reactor that is not running: observers write through."""

    running = False

    def addSystemEventTrigger(self, *args):
        pass


class RunningClock(Clock):
    running = True

    def addSystemEventTrigger(self, phase, event, f):
        self.shutdown = f


class JSONObserverTests(SynchronousTestCase):
    def emit(self, *args, **kwargs):
        out = io.StringIO()
        log = Logger(namespace="tcpgreet.server",
                     observer=LogPublisher(json_observer(out, StoppedReactor())))
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

    def test_the_documented_record_exactly(self):
        when = 1764580968.25
        events = [
            {"log_format": "{peer} port {port}", "peer": "::1", "port": 5, "tls": False,
             "reason": None, "duration_ms": 0.125},
            {"log_format": "no fields"},
            {"log_format": 'quotes " and \\ and é and \n', "x": 'a "b"\n', "y": [1, {"z": None}]},
            {"log_format": "odd {v}", "v": object(), "log_namespace": None, "log_level": None},
            {"log_format": "{n}", "n": 1, "log_namespace": 7},
            {"log_text": "legacy", "log_format": "{log_text}", "log_system": "-"},
            {"nothing": "formats this"},
        ]
        for extra in events:
            event = {"log_time": when, "log_namespace": "tcpgreet.server",
                     "log_level": LogLevel.info, **extra}
            record = {"time": "2025-12-01T09:22:48.250Z",
                      "level": getattr(event["log_level"], "name", None),
                      "namespace": event["log_namespace"], "message": formatEvent(event)}
            for key, value in event.items():
                if not key.startswith("log_") and key not in record:
                    record[key] = value
            out = io.StringIO()
            json_observer(out, StoppedReactor())(event)
            self.assertEqual(out.getvalue(),
                             json.dumps(record, default=repr, ensure_ascii=False) + "\n")

    def test_fields_do_not_replace_the_records_own(self):
        record = json.loads(self.emit("said {message}", message="hello", peer="x"))
        self.assertEqual((record["message"], record["peer"]), ("said hello", "x"))

    def test_a_field_that_contains_itself_is_shown(self):
        loop: list = []
        loop.append(loop)
        publisher = LogPublisher()
        out = io.StringIO()
        observer = json_observer(out, StoppedReactor())
        publisher.addObserver(observer)
        log = Logger(namespace="n", observer=publisher)
        log.info("loop {loop}", loop=loop, n=1)
        log.info("still here")
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([(r["message"], r.get("loop")) for r in records],
                         [("loop [[...]]", "[[...]]"), ("still here", None)])
        self.assertEqual(records[0]["n"], "1")

    def test_failures_carry_their_traceback(self):
        out = io.StringIO()
        log = Logger(observer=LogPublisher(json_observer(out, StoppedReactor())))
        try:
            raise ZeroDivisionError("it broke")
        except ZeroDivisionError:
            log.failure("it broke", Failure())
        record = json.loads(out.getvalue())
        self.assertEqual(record["message"].splitlines()[0], "it broke")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["level"], "critical")


class TextObserverTests(SynchronousTestCase):
    """The lines are those twistd's own log file would have."""

    def assertSameAsTwisted(self, event):
        out = io.StringIO()
        text_observer(out, StoppedReactor())(dict(event))
        # Twisted's None: no line.
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(dict(event)) or "")

    def test_like_twistds_log_file(self):
        now = time.time()
        base = {"log_time": now, "log_namespace": "tcpgreet.server",
                "log_level": LogLevel.info}
        self.assertSameAsTwisted({**base, "log_format": "{peer} port {port}: {outcome}",
                                  "peer": "::1", "port": 5, "outcome": "greeted"})
        self.assertSameAsTwisted({**base, "log_format": "{x!r} {y:>4} {{literal}}",
                                  "x": "a", "y": 7})
        self.assertSameAsTwisted({**base, "log_format": "two\nlines"})
        self.assertSameAsTwisted({**base, "log_format": "{log_text}", "log_text": "legacy",
                                  "log_system": "-"})
        self.assertSameAsTwisted({**base, "log_format": "missing {nothing}"})
        self.assertSameAsTwisted({**base, "log_format": "call {f()}", "f": lambda: 42})

    def test_compiled_formats_write_what_format_map_writes(self):
        fields = {"peer": "::1", "port": 5, "a": "q'\"\\", "b": 1.5, "c": None, "ü": "u",
                  "w": 3, "seq": [1, 2]}
        formats = ["{peer} port {port}", "", "plain", "{{x}} {a!r} {b:>10} {c!s:^6}",
                   "{b:.3f} {b:g}%", "'\"\\ {a} }}{{", "{ü}", "{seq[0]}", "{a:{w}}",
                   "{0}", "{}", "{", "}", "{a!x}", "{missing}", "{peer.upper}"]
        for format in formats:
            compiled = logs._compile(format)
            self.assertEqual(self.outcome(compiled, fields), self.outcome(format.format_map,
                                                                          fields), format)
            self.assertSameAsTwisted({"log_time": time.time(), "log_namespace": "n",
                                      "log_level": LogLevel.info, "log_format": format,
                                      **fields})
        # Only plain names are compiled; the rest is format_map itself.
        self.assertNotEqual(logs._compile("{b:g} {a!r}"), "{b:g} {a!r}".format_map)
        self.assertEqual(logs._compile("{seq[0]}"), "{seq[0]}".format_map)

    def test_formats_made_at_run_time_are_not_compiled_without_end(self):
        formats = logs._Formats()
        for i in range(1000):
            self.assertEqual(formats[f"event {i} of {{n}}"]({"n": 1000}), f"event {i} of 1000")
        self.assertEqual(len(formats), 1000)
        self.assertEqual(formats["one more {n}"], "one more {n}".format_map)
        self.assertEqual(len(formats), 1000)
        long = "x" * 1001 + "{n}"
        self.assertEqual(logs._Formats()[long], long.format_map)

    @staticmethod
    def outcome(render, fields):
        try:
            return render(fields)
        except Exception as e:
            return type(e)

    def test_failures_keep_their_traceback(self):
        try:
            raise ValueError("bad")
        except ValueError:
            failure = Failure()
        self.assertSameAsTwisted({"log_time": time.time(), "log_namespace": "x",
                                  "log_level": LogLevel.critical, "log_format": "oops",
                                  "log_failure": failure})

    def test_one_write_per_turn_of_the_event_loop(self):
        out = io.StringIO()
        writes = []
        out.write = writes.append
        clock = RunningClock()
        observer = text_observer(out, clock)
        log = Logger(namespace="n", observer=observer)
        for i in range(100):
            log.info("line {i}", i=i)
        self.assertEqual(writes, [])
        clock.advance(0)
        self.assertEqual(len(writes), 1)
        self.assertEqual(writes[0].count("\n"), 100)
        log.info("at shutdown")
        clock.shutdown()
        self.assertEqual(len(writes), 2)

    def test_a_large_batch_is_written_at_once(self):
        out = io.StringIO()
        observer = text_observer(out, RunningClock())
        log = Logger(namespace="n", observer=observer)
        for _ in range(2000):
            log.info("x" * 100)
        self.assertGreater(len(out.getvalue()), 65536)


class BurstTests(SynchronousTestCase):
    """Lines logged in a burst are written when it ends, with no timer."""

    def observer(self, clock):
        writes = []
        out = io.StringIO()
        out.write = writes.append
        return text_observer(out, clock), writes

    def test_written_when_the_burst_ends(self):
        clock = RunningClock()
        observer, writes = self.observer(clock)
        log = Logger(namespace="n", observer=observer)
        with logs.burst:
            for i in range(3):
                log.info("line {i}", i=i)
            self.assertEqual(writes, [])
        self.assertEqual(len(writes), 1)
        self.assertEqual(writes[0].count("\n"), 3)
        self.assertEqual(clock.getDelayedCalls(), [])  # no call left for the turn's end

    def test_the_outermost_burst_writes(self):
        observer, writes = self.observer(RunningClock())
        with logs.burst:
            with logs.burst:
                observer({"log_format": "inner", "log_time": 0.0})
            self.assertEqual(writes, [])
        self.assertEqual(len(writes), 1)

    def test_lines_before_the_burst_keep_their_call(self):
        clock = RunningClock()
        observer, writes = self.observer(clock)
        observer({"log_format": "before", "log_time": 0.0})
        with logs.burst:
            observer({"log_format": "during", "log_time": 0.0})
        self.assertEqual(writes, [])  # both wait for the turn's end, as before
        clock.advance(0)
        self.assertEqual(len(writes), 1)
        self.assertEqual(writes[0].count("\n"), 2)

    def test_an_observer_that_fails_costs_the_others_nothing(self):
        class Broken(io.StringIO):
            def write(self, text):
                raise RuntimeError("not a write error")

        broken = text_observer(Broken(), RunningClock())
        observer, writes = self.observer(RunningClock())
        with self.assertRaises(RuntimeError), logs.burst:
            broken({"log_format": "lost", "log_time": 0.0})
            observer({"log_format": "kept", "log_time": 0.0})
        self.assertEqual(len(writes), 1)
        self.assertEqual(logs.burst.depth, 0)

    def test_a_line_from_another_thread_does_not_join(self):
        # Only the reactor's thread ends its bursts.
        clock = FromThreadClock()
        out = io.StringIO()
        observer = BatchingObserver(out, lambda event: event["text"], clock)
        self.patch(threadable, "ioThread", threading.get_ident())
        with logs.burst:
            thread = threading.Thread(target=observer, args=({"text": "from a thread\n"},))
            thread.start()
            thread.join(10)
            self.assertEqual(logs.burst.waiting, [])
        self.assertEqual(len(clock.from_threads), 1)


class FastLoggerTests(SynchronousTestCase):
    """FastLogger's events are Twisted's Logger's, field for field."""

    def events(self, logger_class, method: str, *args, **kwargs) -> list[dict]:
        events: list[dict] = []
        logger = logger_class(namespace="tcpgreet.server", source="s",
                              observer=events.append)
        getattr(logger, method)(*args, **kwargs)
        for event in events:
            self.assertIs(event.pop("log_logger"), logger)
            self.assertLess(abs(event.pop("log_time") - time.time()), 60)
        return events

    def test_same_events(self):
        for method, args in (("info", ("{a} b",)), ("emit", (LogLevel.warn, "{a} c")),
                             ("error", ("{a}",)), ("emit", (LogLevel.info,))):
            self.assertEqual(self.events(FastLogger, method, *args, a=1),
                             self.events(Logger, method, *args, a=1), method)

    def test_bad_level_reported_as_twisted_does(self):
        [event] = self.events(FastLogger, "emit", "nonsense", "x")
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertIn("invalidLevel", event)

    def test_namespace_of_the_module_that_makes_it(self):
        self.assertEqual(FastLogger().namespace, __name__)


class BrokenSink(io.StringIO):
    def write(self, text):
        raise OSError(28, "No space left on device")


class FailingSinkTests(SynchronousTestCase):
    def test_a_sink_that_fails_loses_lines_but_loops_nothing(self):
        clock = RunningClock()
        observer = text_observer(BrokenSink(), clock)
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        log = Logger(namespace="n", observer=observer)
        for _ in range(3):
            log.info("lost")
        clock.advance(0)
        self.assertEqual(observer.lost, 3)
        self.assertEqual(clock.getDelayedCalls(), [])  # nothing rescheduled
        log.info("lost too")
        clock.advance(0)
        self.assertEqual(observer.lost, 4)
        self.assertEqual(stderr.getvalue().count("cannot write the log"), 1)
        self.assertIn("No space left on device", stderr.getvalue())


class FromThreadClock(RunningClock):
    """A running reactor that notes what was handed to it from a thread."""

    def __init__(self):
        super().__init__()
        self.from_threads = []

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.append((f, args, kwargs))


class ThreadTests(SynchronousTestCase):
    def test_lines_logged_from_many_threads_are_each_written_once(self):
        out = io.StringIO()
        observer = BatchingObserver(out, lambda event: event["text"], StoppedReactor())
        # Switching threads as often as possible finds the gaps between
        # reading and clearing what is pending, if there are any.
        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
        sys.setswitchinterval(1e-6)

        def log(thread):
            for i in range(20000):
                observer({"text": f"{thread} {i}\n"})

        threads = [threading.Thread(target=log, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 8 * 20000)
        self.assertEqual(set(lines), {f"{n} {i}" for n in range(8) for i in range(20000)})

    def test_a_line_from_another_thread_is_flushed_by_the_reactors(self):
        clock = FromThreadClock()
        out = io.StringIO()
        observer = BatchingObserver(out, lambda event: event["text"], clock)
        self.patch(threadable, "ioThread", threading.get_ident())  # this one runs the loop
        thread = threading.Thread(target=observer, args=({"text": "from a thread\n"},))
        thread.start()
        thread.join(10)
        # Not clock.callLater, which only the reactor's thread may call.
        self.assertEqual(clock.getDelayedCalls(), [])
        [(f, args, kwargs)] = clock.from_threads
        f(*args, **kwargs)
        self.assertEqual(out.getvalue(), "from a thread\n")
        observer({"text": "from the reactor\n"})  # the reactor's own: callLater
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(out.getvalue(), "from a thread\nfrom the reactor\n")


class ReactorTests(SynchronousTestCase):
    """An observer batches on the reactor it is given, and only on that one."""

    def test_without_a_reactor_each_line_is_written_at_once(self):
        out = io.StringIO()
        observer = BatchingObserver(out, lambda event: event["text"], None)
        observer({"text": "one\n"})
        self.assertEqual(out.getvalue(), "one\n")

    def test_named_observers_take_the_reactor_the_service_runs_on(self):
        # What twistd --logger builds, with no argument, after the service.
        self.patch(logs, "_service_reactor", None)
        self.assertIsNone(json_observer(io.StringIO())._reactor)
        clock = RunningClock()
        logs.serve_on(clock)
        for make in (json_observer, text_observer):
            out = io.StringIO()
            observer = make(out)
            observer({"log_format": "batched", "log_time": 0.0})
            self.assertEqual(out.getvalue(), "")  # until the end of the turn
            clock.advance(0)
            self.assertIn("batched", out.getvalue())
