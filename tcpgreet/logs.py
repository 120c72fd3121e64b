"""
Logging helpers: a rate limiter for lines that floods would repeat, and a
JSON Lines observer for C{twistd --logger}.

    twistd -n --logger tcpgreet.logs.json_observer tcpgreet

writes one JSON object per log event to standard output: C{time} (UTC,
ISO 8601), C{level}, C{namespace}, C{message} (the formatted text) and every
field of the event (for a connection: C{peer}, C{port}, C{outcome},
C{bytes}, C{duration_ms}, C{reason}).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO

from twisted.logger import FileLogObserver, Logger, LogLevel, formatEvent


class RateLimitedLog:
    """
    Log an event that may repeat thousands of times a second at most once
    per C{interval}: the first occurrence at once, later ones as a count
    when the interval is over.  Events with different C{key}s are limited
    separately.

    C{format} may use C{{count}} (occurrences since the last line) and
    C{{interval}}, besides the fields given to L{note}.
    """

    def __init__(self, logger: Logger, format: str, interval: float = 1.0,
                 level: LogLevel = LogLevel.warn, clock=None) -> None:
        self._log = logger
        self._format = format
        self._interval = interval
        self._level = level
        self._clock = clock
        # key -> [occurrences not yet logged, latest fields]
        self._windows: dict[object, list] = {}

    def note(self, key: object = None, **fields: object) -> None:
        window = self._windows.get(key)
        if window is not None:
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


def _json_default(value: object) -> object:
    return repr(value)


def eventAsJSONLine(event: dict) -> str:
    """One log event as one line of JSON, with its fields at the top level."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", 0)))
        + f".{int(event.get('log_time', 0) % 1 * 1000):03d}Z",
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in record:
            record[key] = value
    return json.dumps(record, default=_json_default, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """
    A log observer writing JSON Lines; what C{twistd --logger} takes.  It
    writes to the process's real standard output (twistd redirects
    C{sys.stdout} into the log, which would loop).
    """
    return FileLogObserver(out if out is not None else sys.__stdout__, eventAsJSONLine)
