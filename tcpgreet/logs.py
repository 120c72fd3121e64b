"""
Logging helpers: a rate limiter for lines that floods would repeat, and two
log observers for C{twistd --logger} that can keep up with a line per
connection.

    twistd -n --logger tcpgreet.logs.text_observer tcpgreet
    twistd -n --logger tcpgreet.logs.json_observer tcpgreet

Both write to standard output.  C{text_observer} writes the lines twistd's
own log file has; C{json_observer} writes one JSON object per event: C{time}
(UTC, ISO 8601, milliseconds), C{level}, C{namespace}, C{message} (the
formatted text) and every field of the event (for a connection: C{peer},
C{port}, C{outcome}, C{bytes}, C{duration_ms}, C{reason}, C{tls}).

Why they exist: twistd's log file observer formats every event through
Twisted's pure-Python formatter, computes the time zone of every timestamp
and flushes after every line, which costs more than serving the connection
the line is about.  These format with C{str.format_map}, reuse the
timestamp of the current second, and write what one turn of the event loop
logged in one system call.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText, formatEvent
from twisted.python import threadable
from zope.interface import implementer

# Past this much pending text a batch is written at once.
BATCH_LIMIT = 65536


class RateLimitedLog:
    """
    Log an event that may repeat thousands of times a second at most once
    per C{interval}: the first occurrence at once, later ones as a count
    when the interval is over.  Events with different C{key}s are limited
    separately.

    C{format} may use C{{count}} (occurrences since the last line) and
    C{{interval}}, besides the fields given to L{note}: the latest value of
    each, except the fields named in C{sums}, which are added up.
    """

    def __init__(self, logger: Logger, format: str, interval: float = 1.0,
                 level: LogLevel = LogLevel.warn, clock=None,
                 sums: tuple[str, ...] = ()) -> None:
        self._log = logger
        self._format = format
        self._interval = interval
        self._level = level
        self._clock = clock
        self._sums = sums
        # key -> [occurrences not yet logged, fields to log]
        self._windows: dict[object, list] = {}

    def note(self, key: object = None, **fields: object) -> None:
        window = self._windows.get(key)
        if window is not None:
            if window[0]:
                for name in self._sums:
                    fields[name] += window[1][name]
            window[0] += 1
            window[1] = fields
            return
        self._emit(1, fields)
        self._windows[key] = [0, fields]
        self._reactor().callLater(self._interval, self._close, key)

    def _close(self, key: object) -> None:
        count, fields = self._windows.pop(key)
        if count:
            self._emit(count, fields)
            self._windows[key] = [0, fields]
            self._reactor().callLater(self._interval, self._close, key)

    def _emit(self, count: int, fields: dict) -> None:
        self._log.emit(self._level, self._format, count=count,
                       interval=self._interval, **fields)

    def _reactor(self):
        if self._clock is None:
            from twisted.internet import reactor
            self._clock = reactor
        return self._clock


def _message(event: dict) -> str:
    """
    The event's text.  Format strings come from code and their fields from
    the event, so C{str.format_map} does what Twisted's formatter does, at C
    speed; anything it cannot do (Twisted's C{{name()}} calls, a failure's
    traceback) goes to Twisted.
    """
    format = event.get("log_format")
    if format is not None and "log_failure" not in event:
        try:
            return format.format_map(event)
        except Exception:
            pass  # Twisted's formatter will say what is wrong with the event
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


class _SecondCache:
    """Text of a timestamp's whole second, computed once a second."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self._second = None
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = self._render(second)
        return self._text


def _classic_line(local_time: _SecondCache) -> Callable[[dict], str | None]:
    """Events as twistd's log file shows them: C{TIME [SYSTEM] TEXT}."""

    def line(event: dict) -> str | None:
        text = _message(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        when = event.get("log_time")
        stamp = local_time(when) if when is not None else "-"
        return f"{stamp} [{system}] {text.replace(chr(10), chr(10) + chr(9))}\n"

    return line


def _json_line(utc_time: _SecondCache) -> Callable[[dict], str]:
    # One encoder for every line: json.dumps with options builds a new one
    # per call.
    encode = json.JSONEncoder(default=repr, ensure_ascii=False).encode

    def line(event: dict) -> str:
        when = event.get("log_time", 0.0)
        record = {
            "time": f"{utc_time(when)}.{int(when % 1 * 1000):03d}Z",
            "level": getattr(event.get("log_level"), "name", None),
            "namespace": event.get("log_namespace"),
            "message": _message(event) if "log_format" in event else formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if key[:4] != "log_" and key not in record:
                record[key] = value
        return encode(record) + "\n"

    return line


@implementer(ILogObserver)
class BatchingObserver:
    """
    Render each event to a line and write the lines of one turn of the event
    loop together, flushing when the turn is over (or when C{BATCH_LIMIT}
    bytes are pending, or at once while the event loop is not running).

    Thread-safe: Twisted calls observers in the thread that logs, which is
    not always the reactor's (a thread pool's failure, a Deferred's
    unhandled error collected in another thread).  The lines pending and
    their writing are guarded by a lock, and a thread other than the
    reactor's asks for the flush with C{callFromThread}.

    @ivar lost: lines that could not be written.
    """

    def __init__(self, out: IO[str], render: Callable[[dict], str | None],
                 reactor=None) -> None:
        self._out = out
        self._render = render
        self._reactor = reactor
        # Reentrant: a stream that logged as it wrote must not deadlock.
        self._lock = threading.RLock()
        self._pending: list[str] = []
        self._size = 0
        self._scheduled = False
        self._watching = False
        self._failing = False
        self.lost = 0

    def __call__(self, event: dict) -> None:
        text = self._render(event)
        if not text:
            return
        with self._lock:
            self._pending.append(text)
            self._size += len(text)
            reactor = self._reactor_()
            if not reactor.running or self._size > BATCH_LIMIT:
                self.flush()
                return
            if self._scheduled:
                return
            self._scheduled = True
        # callLater belongs to the reactor's thread (and, before any reactor
        # has registered one, to whoever drives the loop: a test's clock).
        if threadable.ioThread is None or threadable.isInIOThread():
            reactor.callLater(0, self.flush)
        else:
            reactor.callFromThread(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            if not self._pending:
                return
            text = "".join(self._pending)
            lines = len(self._pending)
            self._pending.clear()
            self._size = 0
            try:
                self._out.write(text)
                self._out.flush()
            except (OSError, ValueError) as e:
                # A full disk or a reader that went away must not become a
                # log event of its own (which would bring us right back
                # here): the lines are lost, and standard error hears of it
                # once.
                self.lost += lines
                if not self._failing:
                    self._failing = True
                    with contextlib.suppress(OSError, ValueError):
                        print(f"tcpgreet: cannot write the log ({e}); dropping log lines",
                              file=sys.__stderr__, flush=True)
            else:
                self._failing = False

    def _reactor_(self):
        if not self._watching:
            self._watching = True
            if self._reactor is None:
                from twisted.internet import reactor
                self._reactor = reactor
            # What is pending when the event loop ends is written before
            # the process does.
            self._reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        return self._reactor


def text_observer(out: IO[str] | None = None, reactor=None) -> BatchingObserver:
    """
    twistd's text log lines, written to the process's real standard output
    (twistd points C{sys.stdout} into the log itself).  What
    C{twistd --logger} takes.
    """
    local_time = _SecondCache(lambda second: time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                           time.localtime(second)))
    return BatchingObserver(out if out is not None else sys.__stdout__,
                            _classic_line(local_time), reactor)


def json_observer(out: IO[str] | None = None, reactor=None) -> BatchingObserver:
    """JSON Lines, written to the process's real standard output."""
    utc_time = _SecondCache(lambda second: time.strftime("%Y-%m-%dT%H:%M:%S",
                                                         time.gmtime(second)))
    return BatchingObserver(out if out is not None else sys.__stdout__,
                            _json_line(utc_time), reactor)
