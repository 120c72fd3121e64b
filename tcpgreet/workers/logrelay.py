"""
One log for the whole service: a worker's log events, re-emitted by the
supervisor.

A worker writes its events as JSON Lines (L{tcpgreet.logs.json_observer})
to a pipe.  The supervisor reads them and emits each one again through its
own loggers, with the original namespace, level and fields, plus the
worker's number (C{worker}) and process id (C{pid}); the text says which
worker spoke.  So C{twistd --logfile} or C{--logger} of the supervisor
governs every line, and a JSON log keeps a connection's fields (C{peer},
C{port}, C{outcome}, C{bytes}, C{duration_ms}, C{reason}) as they were.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from twisted.logger import LogLevel

from tcpgreet.logs import FastLogger

# A line longer than this is cut: the pipe must not make the supervisor
# buffer without bound.
MAX_LINE = 1 << 20

# What twistd and the reactor say in every process (starting up, a port
# starting, shutting down); the supervisor says it once for the service.
_TWISTD_NAMESPACES = ("twisted.scripts.", "twisted.application.app")
_TWISTD_CHATTER = ("Received SIG", "Main loop terminated", "Log opened")
_PORT_STARTING = " starting on "

# Fields json_observer writes besides the event's own (namespace, level and
# message are read separately), and a field name Logger.emit takes for
# itself (legacy events may have one).
_NOT_FIELDS = ("time", "format")

# A line a second per connection goes through here: decode without
# json.loads' detection of the encoding, and find levels by name at once.
_decode = json.JSONDecoder().decode
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}

# The supervisor's loggers, one per namespace the workers use, so that a
# worker's event keeps the namespace it had.
_loggers: dict[str, FastLogger] = {}


def _logger(namespace: str) -> FastLogger:
    logger = _loggers.get(namespace)
    if logger is None:
        logger = _loggers[namespace] = FastLogger(namespace=namespace)
    return logger


class Lines:
    """Split a byte stream into lines, holding at most L{MAX_LINE} bytes."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The lines C{data} completes."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial[:MAX_LINE])
            self._partial = b""
        yield from lines

    def rest(self) -> Iterator[bytes]:
        """What is left at the end of the stream, if anything."""
        rest, self._partial = self._partial, b""
        if rest:
            yield rest


def _escape(text: str) -> str:
    """C{text} as a log format that shows it unchanged."""
    return text.replace("{", "{{").replace("}", "}}")


class LogRelay:
    """Re-emit the log of the worker C{worker} (its process: C{pid})."""

    def __init__(self, worker: int, pid: int) -> None:
        self.worker = worker
        self.pid = pid
        self._prefix = f"[worker {worker}, pid {pid}] "

    def json_line(self, line: bytes) -> None:
        """One line of the worker's standard output: a JSON event, normally."""
        if not line or line.isspace():
            return
        try:
            record = _decode(line.decode("utf-8", "replace"))
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.text_line(line, LogLevel.info)
            return
        # What is left of the record once these are out are the event's fields.
        namespace = str(record.pop("namespace", None) or "tcpgreet.worker")
        level = _LEVELS.get(record.pop("level", None), LogLevel.info)
        message = str(record.pop("message", ""))
        if self._chatter(namespace, level, message):
            return
        for key in _NOT_FIELDS:
            record.pop(key, None)
        if "traceback" in record:
            message += "\n" + str(record["traceback"]).rstrip("\n")
        record["worker"] = self.worker
        record["pid"] = self.pid
        _logger(namespace).emit(level, _escape(self._prefix + message), **record)

    def text_line(self, line: bytes, level: LogLevel = LogLevel.error) -> None:
        """
        A line that is not a JSON event: standard error (a start-up error,
        or what Python prints when it cannot log), or a stray write.
        """
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.strip():
            _logger("tcpgreet.worker").emit(
                level, _escape(self._prefix + text), worker=self.worker, pid=self.pid)

    @staticmethod
    def _chatter(namespace: str, level: LogLevel, message: str) -> bool:
        if level >= LogLevel.warn:
            return False
        return namespace.startswith(_TWISTD_NAMESPACES) or (
            namespace in ("twisted.internet.base", "log_legacy")
            and message.startswith(_TWISTD_CHATTER)) or (
            namespace == "log_legacy" and _PORT_STARTING in message)
