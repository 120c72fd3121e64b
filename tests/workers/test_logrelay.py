"""
A worker's log lines, re-emitted by the supervisor as its own events.
"""

import io
import json

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.logs import json_observer
from tcpgreet.workers.logrelay import MAX_LINE, Lines, LogRelay


def as_json(event) -> str:
    """An event as the JSON observer (a worker's, or the supervisor's) writes it."""
    out = io.StringIO()
    json_observer(out, reactor=MemoryReactorClock())(event)  # not running: written at once
    return out.getvalue()


def worker_line(format, namespace="tcpgreet.server", level=LogLevel.info, **fields):
    """What a worker's JSON observer writes for one event."""
    events = []
    Logger(namespace=namespace, observer=events.append).emit(level, format, **fields)
    return as_json(events[0]).rstrip("\n").encode()


class LinesTests(SynchronousTestCase):
    def test_split_across_reads(self):
        lines = Lines()
        self.assertEqual(list(lines.feed(b"one\ntw")), [b"one"])
        self.assertEqual(list(lines.feed(b"o\nthree")), [b"two"])
        self.assertEqual(list(lines.rest()), [b"three"])
        self.assertEqual(list(lines.rest()), [])

    def test_a_line_without_end_is_cut(self):
        lines = Lines()
        out = list(lines.feed(b"x" * (MAX_LINE + 10)))
        self.assertEqual([len(line) for line in out], [MAX_LINE])
        self.assertEqual(list(lines.feed(b"\n")), [b""])


class RelayTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relay = LogRelay(2, 4242)

    def test_a_connection_line_keeps_its_fields(self):
        self.relay.json_line(worker_line(
            "{peer} port {port}: {outcome}, {bytes} bytes in {duration_ms} ms",
            peer="192.0.2.7", port=51324, outcome="greeted", bytes=26, duration_ms=0.041,
            reason=None))
        [event] = self.events
        self.assertEqual(formatEvent(event),
                         "[worker 2, pid 4242] 192.0.2.7 port 51324: greeted, 26 bytes in "
                         "0.041 ms")
        self.assertEqual({key: event[key] for key in ("peer", "port", "outcome", "bytes",
                                                      "duration_ms", "reason", "worker",
                                                      "pid")},
                         {"peer": "192.0.2.7", "port": 51324, "outcome": "greeted",
                          "bytes": 26, "duration_ms": 0.041, "reason": None, "worker": 2,
                          "pid": 4242})
        self.assertEqual((event["log_namespace"], event["log_level"]),
                         ("tcpgreet.server", LogLevel.info))
        # And as the supervisor's own JSON log writes it:
        record = json.loads(as_json(event))
        self.assertEqual((record["peer"], record["pid"], record["namespace"]),
                         ("192.0.2.7", 4242, "tcpgreet.server"))

    def test_braces_in_the_text_stay_as_they_are(self):
        self.relay.json_line(worker_line("reload failed: {error}", level=LogLevel.error,
                                        error="unknown placeholder {nope}"))
        [event] = self.events
        self.assertEqual(formatEvent(event),
                         "[worker 2, pid 4242] reload failed: unknown placeholder {nope}")
        self.assertEqual(event["log_level"], LogLevel.error)

    def test_a_failure_brings_its_traceback(self):
        events = []
        Logger(observer=events.append).failure("it broke", Failure(ZeroDivisionError("no")))
        self.relay.json_line(as_json(events[0]).encode())
        [event] = self.events
        self.assertIn("it broke\nTraceback", formatEvent(event))
        self.assertIn("ZeroDivisionError", formatEvent(event))

    def test_twistd_chatter_is_dropped(self):
        for namespace, text in [
            ("twisted.scripts._twistd_unix.UnixAppLogger", "twistd 26.10.0 starting up."),
            ("twisted.internet.base", "Received SIGTERM, shutting down."),
            ("twisted.internet.base", "Main loop terminated."),
            ("log_legacy", "GreetFactory starting on 40321"),
        ]:
            self.relay.json_line(worker_line(text, namespace=namespace))
        self.assertEqual(self.events, [])
        self.relay.json_line(worker_line("Unhandled error", namespace="log_legacy",
                                        level=LogLevel.critical))
        self.assertEqual(len(self.events), 1)

    def test_standard_error_and_stray_lines(self):
        self.relay.text_line(b"tcpgreet: greeting file /x: No such file or directory")
        self.relay.json_line(b"not json {")
        self.relay.json_line(b"   ")
        self.assertEqual([(formatEvent(e), e["log_level"]) for e in self.events], [
            ("[worker 2, pid 4242] tcpgreet: greeting file /x: No such file or directory",
             LogLevel.error),
            ("[worker 2, pid 4242] not json {", LogLevel.info),
        ])
