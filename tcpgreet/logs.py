"""
Logging helpers: a rate limiter for lines that floods would repeat, a
Logger that builds the per-connection event for less (L{FastLogger}), and
log observers that keep up with a line per connection: tcpgreet's default
under twistd (L{twistd_default}: twistd's destination, lines and rotation),
and two for C{twistd --logger}, which write to standard output:

    twistd -n --logger tcpgreet.logs.text_observer tcpgreet
    twistd -n --logger tcpgreet.logs.json_observer tcpgreet

C{text_observer} writes the lines twistd's own log file has; C{json_observer}
writes one JSON object per event: C{time} (UTC, ISO 8601, milliseconds),
C{level}, C{namespace}, C{message} (the formatted text) and every field of
the event (for a connection: C{peer}, C{port}, C{outcome}, C{bytes},
C{duration_ms}, C{reason}, C{tls}).

Why they exist: twistd's log file observer formats every event through
Twisted's pure-Python formatter, computes the time zone of every timestamp
and flushes after every line, which costs more than serving the connection
the line is about.  These format with an f-string compiled once per
format (the text C{str.format_map} gives), reuse the timestamp of the
current second, and write what one turn of the event loop logged in one
system call, at the end of that turn (or of a L{burst} within it).
"""

from __future__ import annotations

import contextlib
import json
import json.encoder
import os
import signal
import string
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol, cast

from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText, formatEvent
from twisted.python import threadable
from twisted.python.logfile import LogFile
from zope.interface import implementer

# Past this much pending text a batch is written at once.
BATCH_LIMIT = 65536

_LEVELS = frozenset(LogLevel.iterconstants())


class Scheduler(Protocol):
    """
    What a L{RateLimitedLog} needs of its clock: C{IReactorTime}'s
    C{callLater}.  A protocol, so that a facade in front of the reactor
    (which passes calls through) serves as well as the reactor itself.
    """

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object,
                  **kw: object) -> IDelayedCall: ...


class IObserverReactor(IReactorCore, IReactorTime, IReactorFromThreads):
    """
    What a batching observer needs of its reactor: whether it runs, a call
    at the end of this turn (from this thread or another), and a word
    before it stops.
    """


class FastLogger(Logger):
    """
    A L{Logger} for lines logged at every connection: the same events,
    built for less.  Twisted's C{emit} checks the level by listing (and
    sorting) every level at each call, which costs more than building the
    event; this checks it against a set made once, and C{info} builds its
    event in one call instead of two.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            # Twisted says what is wrong with it.
            return super().emit(level, format, **kwargs)
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:  # a list, as Twisted's Logger.trace makes it
            cast(list, kwargs["log_trace"]).append((self, self.observer))
        self.observer(kwargs)

    def info(self, format: str | None = None, **kwargs: object) -> None:
        kwargs.update(log_logger=self, log_level=LogLevel.info, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:  # a list, as Twisted's Logger.trace makes it
            cast(list, kwargs["log_trace"]).append((self, self.observer))
        self.observer(kwargs)


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
                 level: LogLevel = LogLevel.warn, *, clock: Scheduler,
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
        self._clock.callLater(self._interval, self._close, key)

    def _close(self, key: object) -> None:
        count, fields = self._windows.pop(key)
        if count:
            self._emit(count, fields)
            self._windows[key] = [0, fields]
            self._clock.callLater(self._interval, self._close, key)

    def _emit(self, count: int, fields: dict) -> None:
        self._log.emit(self._level, self._format, count=count,
                       interval=self._interval, **fields)


def _compile(format: str) -> Callable[[Mapping], str]:
    """
    C{format.format_map}, as one f-string: for a format whose every field
    is a plain name (C{{peer}}, C{{count!r}}, C{{interval:g}}), the same text
    in half the time, since the string is parsed once here and not at every
    event.  Any other format (an attribute, an index, a nested spec) keeps
    C{format_map} itself.
    """
    constants: dict[str, str] = {}

    def constant(text: str) -> str:
        name = f"_{len(constants)}"
        constants[name] = text
        return "{" + name + "}"

    try:
        parsed = list(string.Formatter().parse(format))
    except ValueError:
        return format.format_map  # says what is wrong at every event, as before
    source = []
    for literal, name, spec, conversion in parsed:
        if literal:
            source.append(constant(literal))
        if name is None:
            continue
        if not name.isidentifier() or "{" in (spec or "") or \
                conversion not in (None, "r", "s", "a"):
            return format.format_map
        # An identifier has no quote in it: its repr is 'name'.
        value = f"e[{name!r}]" + (f"!{conversion}" if conversion else "")
        if spec:
            value += ":" + constant(spec)
        source.append("{" + value + "}")
    defaults = "".join(f", {name}={name}" for name in constants)
    return eval(f'lambda e{defaults}: f"{"".join(source)}"', dict(constants))


class _Formats(dict):
    """An event's format -> L{_compile}'s function for it, compiled once per format."""

    def __missing__(self, format: str) -> Callable[[Mapping], str]:
        # Formats come from code, a few dozen of them.  Past a thousand, or
        # a long one, they are likely text made at run time (a message
        # formatted before it was logged): compiling each would cost more
        # than format_map, and keeping them all, memory.
        if len(self) >= 1000 or len(format) > 1000:
            return format.format_map
        render = self[format] = _compile(format)
        return render


_formats = _Formats()


def _message(event: dict) -> str:
    """
    The event's text.  Format strings come from code and their fields from
    the event, so C{str.format_map} does what Twisted's formatter does, at C
    speed (compiled, see L{_compile}); anything it cannot do (Twisted's
    C{{name()}} calls, a failure's traceback) goes to Twisted.
    """
    format = event.get("log_format")
    if format is not None and "log_failure" not in event and "log_flattened" not in event:
        try:
            return _formats[format](event)
        except Exception:
            pass  # Twisted's formatter will say what is wrong with the event
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


class _SecondCache:
    """Text of a timestamp's whole second, computed once a second."""

    def __init__(self, render: Callable[[int], str], to_microseconds: bool = False) -> None:
        self._render = render
        self._to_microseconds = to_microseconds
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        # Twisted's formatTime goes through datetime.fromtimestamp, which
        # rounds to the microsecond: x.9999996 is shown as second x + 1.
        if when - second >= 0.9999995 and self._to_microseconds and \
                round((when - second) * 1e6) >= 1000000:
            second += 1
        if second != self._second:
            self._second = second
            self._text = self._render(second)
        return self._text


def _local_second(second: int) -> str:
    """Twisted's C{formatTime}: local time with its UTC offset, C{+0000}."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))


def _system(event: Mapping) -> str:
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def _classic_line(local_time: _SecondCache) -> Callable[[dict], str | None]:
    """
    Events as twistd's log file shows them, C{TIME [SYSTEM] TEXT}: the text
    of Twisted's C{formatEventAsClassicLogText}, byte for byte.
    """
    # "[namespace#level] " for each namespace and level seen.
    systems: dict[tuple, str] = {}
    formats = _formats

    def line(event: dict) -> str | None:
        # _message, inlined: this runs for every line.
        format = event.get("log_format")
        text = None
        if format is not None and "log_failure" not in event and \
                "log_flattened" not in event:
            try:
                text = formats[format](event)
            except Exception:
                text = None  # Twisted's formatter will say what is wrong with the event
        if text is None:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not text:
            return None
        when = event.get("log_time")
        stamp = local_time(when) if when is not None else "-"
        if "log_system" in event and event["log_system"] is not None:
            line = f"{stamp} [{_system(event)}] {text}"
        else:
            key = (event.get("log_namespace", "-"), event.get("log_level"))
            try:
                system = systems[key]
            except (KeyError, TypeError):  # new, or not a name and level to keep
                system = f" [{_system(event)}] "
                if len(systems) < 1000 and type(key[0]) is str:
                    systems[key] = system
            line = stamp + system + text
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return line + "\n"

    return line


def _json_encoder() -> Callable[[dict], str]:
    """
    C{json.JSONEncoder(default=repr, ensure_ascii=False).encode}, without
    what that method does again at every call (check the argument, build a
    C encoder and its closures): the C encoder, built once, where there is
    one.  It keeps no memo of the containers it is in, so a field that
    contains itself ends in a RecursionError rather than a ValueError.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has the C encoder
        return json.JSONEncoder(default=repr, ensure_ascii=False).encode
    chunks = make(None, repr, json.encoder.encode_basestring, None, ": ", ", ",
                  False, False, True)
    return lambda record: "".join(chunks(record, 0))


class _FieldNames(dict):
    """Whether an event's key names a field (not one of Twisted's C{log_} keys), once per name."""

    def __missing__(self, key: str) -> bool:
        field = key[:4] != "log_"
        if len(self) < 10000:
            self[key] = field
        return field


def _json_line(utc_time: _SecondCache) -> Callable[[dict], str]:
    encode = _json_encoder()
    quote = json.encoder.encode_basestring
    is_field = _FieldNames()
    # '"level": ..., "namespace": ..., ' for each level and namespace seen.
    heads: dict[tuple, str] = {}

    def record_line(event: dict, when: float, message: str) -> str:
        """The line, built as one record: for failures and odd fields."""
        level = event.get("log_level")
        record = {
            "time": f"{utc_time(when)}.{int(when % 1 * 1000):03d}Z",
            "level": getattr(level, "name", None),
            "namespace": event.get("log_namespace"),
            "message": message,
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if is_field[key] and key not in record:  # the record's own stay
                record[key] = value
        try:
            return encode(record) + "\n"
        except (ValueError, TypeError, RecursionError):
            # A field JSON cannot hold (one that contains itself): its text
            # instead, rather than an observer Twisted would disable.
            return encode({key: value if key in _JSON_OWN else repr(value)
                           for key, value in record.items()}) + "\n"

    def line(event: dict) -> str:
        when = event.get("log_time", 0.0)
        message = _message(event) if "log_format" in event else formatEvent(event)
        fields = {key: value for key, value in event.items() if is_field[key]}
        if "log_failure" in event or not _JSON_OWN.isdisjoint(fields):
            return record_line(event, when, message)
        # The same text as record_line's, from parts: the time, a head kept
        # for each level and namespace, the message, and the fields.
        key = (event.get("log_level"), event.get("log_namespace"))
        try:
            head = heads[key]
        except (KeyError, TypeError):
            head = encode({"level": getattr(key[0], "name", None),
                           "namespace": key[1]})[1:-1] + ", "
            if len(heads) < 1000 and type(key[1]) is str:
                heads[key] = head
        try:
            rest = encode(fields)
        except (ValueError, TypeError, RecursionError):
            return record_line(event, when, message)
        return (f'{{"time": "{utc_time(when)}.{int(when % 1 * 1000):03d}Z", {head}'
                f'"message": {quote(message)}{", " + rest[1:] if fields else "}"}\n')

    return line


_JSON_OWN = frozenset(("time", "level", "namespace", "message", "error", "traceback"))


class PatientLogFile(LogFile):
    """
    twistd's L{LogFile}, except when no descriptor is free to list the
    rotated files: Twisted's C{listLogs} (a C{glob}) then finds none, and
    the rotation renames the current file over the newest rotated one,
    which is lost.  Here the rotation is put off instead, and the next
    write tries again; a process out of descriptors gets them back as its
    connections end.
    """

    def listLogs(self) -> list[int]:
        # os.listdir raises where glob would answer "none".
        prefix = os.path.basename(self.path) + "."
        found = []
        for name in os.listdir(self.directory):
            suffix = name[len(prefix):] if name.startswith(prefix) else ""
            if suffix.isdigit() and int(suffix):
                found.append(int(suffix))
        return sorted(found)

    def write(self, data: str | bytes) -> None:
        """
        C{LogFile.write}, without the lock C{threadable.synchronize} wraps
        it in, which costs more than the write: the one observer that writes
        here (L{BatchingObserver}) holds its own lock already.
        """
        if self.shouldRotate():
            self.flush()
            self.rotate()
        self._file.write(data.encode("utf8") if isinstance(data, str) else data)
        self.size += len(data)

    def rotate(self) -> None:
        try:
            self.listLogs()
        except OSError:
            return  # put off: nothing can be renamed safely now
        super().rotate()


def _write_log_file(log_file: LogFile, lines: list[str]) -> None:
    """
    Write C{lines} to a twistd log file where twistd would have: twistd
    writes a line at a time, and before each one rotates the file if it has
    reached C{rotateLength}.  So a batch is split after the line that
    reaches it, and C{LogFile.write} rotates before the rest.
    """
    text = "".join(lines)
    limit = log_file.rotateLength
    if not limit or log_file.size + len(text) - len(lines[-1]) < limit:
        log_file.write(text)  # no line but perhaps the first starts at the limit
        return
    size = log_file.size
    start = 0
    for index, line in enumerate(lines):
        if size >= limit and index > start:
            log_file.write("".join(lines[start:index]))
            start, size = index, 0  # the next write rotates first
        size += len(line)
    log_file.write("".join(lines[start:]))


class _Burst:
    """
    Lines the reactor's thread logs in one go, such as the connections one
    accept pass served (see C{GreetFactory.static_finished}): a
    L{BatchingObserver} they reach writes them when the burst ends, instead
    of scheduling a call for the end of the turn.  That is earlier than the
    end of the turn, and the C{callLater} it saves costs as much as a line.

    Used as C{with burst:}, in the reactor's thread only; bursts nest, and
    the outermost one writes.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.waiting: list[BatchingObserver] = []

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self.depth -= 1
        if self.depth or not self.waiting:
            return
        waiting, self.waiting = self.waiting, []
        error = None
        for observer in waiting:
            try:
                observer.flush()
            except Exception as e:  # the others still write theirs
                error = error or e
        if error is not None:
            raise error


burst = _Burst()


@implementer(ILogObserver)
class BatchingObserver:
    """
    Render each event to a line and write the lines of one turn of the event
    loop together, flushing when the turn is over (or when a L{burst} of
    them ends, when C{BATCH_LIMIT} bytes are pending, or at once while the
    event loop is not running).

    C{out} is a text stream, or a twistd L{LogFile}, which rotates where
    twistd would rotate it (see L{rotate} for SIGUSR1).

    Thread-safe: Twisted calls observers in the thread that logs, which is
    not always the reactor's (a thread pool's failure, a Deferred's
    unhandled error collected in another thread).  The lines pending and
    their writing are guarded by a lock, and a thread other than the
    reactor's asks for the flush with C{callFromThread}.

    C{reactor} is the event loop whose turns bound a batch; with none
    (L{None}), there is no turn to wait for and each line is written at once.

    @ivar lost: lines that could not be written.
    """

    def __init__(self, out: IO[str] | LogFile, render: Callable[[dict], str | None],
                 reactor: IObserverReactor | None) -> None:
        self._out = out
        self._log_file = out if isinstance(out, LogFile) else None
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
            if self._scheduled:
                if self._size > BATCH_LIMIT:
                    self.flush()
                return
            reactor = self._reactor if self._watching else self._watch()
            if reactor is None or not reactor.running or self._size > BATCH_LIMIT:
                self.flush()
                return
            self._scheduled = True
        # callLater belongs to the reactor's thread (and, before any reactor
        # has registered one, to whoever drives the loop: a test's clock).
        # threadable.isInIOThread, without its two calls to find the thread.
        io_thread = threadable.ioThread
        if io_thread is None or io_thread == threading.get_ident():
            if burst.depth:
                burst.waiting.append(self)
            else:
                reactor.callLater(0, self.flush)
        else:
            reactor.callFromThread(self.flush)

    def flush(self) -> None:
        """Write what is pending now."""
        with self._lock:
            self._scheduled = False
            if not self._pending:
                return
            lines = self._pending
            self._pending = []
            self._size = 0
            try:
                if self._log_file is not None:
                    # Twisted opens its log files unbuffered: written is flushed.
                    _write_log_file(self._log_file, lines)
                else:
                    self._out.write("".join(lines))
                    self._out.flush()
            except (OSError, ValueError) as e:
                # A full disk or a reader that went away must not become a
                # log event of its own (which would bring us right back
                # here): the lines are lost, and standard error hears of it
                # once.
                self.lost += len(lines)
                if not self._failing:
                    self._failing = True
                    with contextlib.suppress(OSError, ValueError):
                        print(f"tcpgreet: cannot write the log ({e}); dropping log lines",
                              file=sys.__stderr__, flush=True)
            else:
                self._failing = False

    def rotate(self) -> None:
        """
        Rotate the log file now, as twistd does on SIGUSR1: what was logged
        before goes to the old file, what comes after to the new one.
        """
        with self._lock:
            self.flush()
            if self._log_file is not None:
                self._log_file.rotate()

    def _watch(self) -> IObserverReactor | None:
        """The reactor, which writes what is pending before the process ends."""
        self._watching = True
        if self._reactor is not None:
            self._reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        return self._reactor


# The reactor the service runs on, for the observers twistd builds by name
# (C{--logger}): twistd calls their factory with no argument, once it has
# the service (see L{serve_on}).
_service_reactor: IObserverReactor | None = None


def serve_on(reactor: IObserverReactor) -> None:
    """
    Give C{reactor} to the observers C{twistd --logger} builds from here
    (L{text_observer}, L{json_observer}).  tcpgreet's twistd service does,
    as it is built, which is before twistd starts logging.
    """
    global _service_reactor
    _service_reactor = reactor


def text_observer(out: IO[str] | LogFile | None = None,
                  reactor: IObserverReactor | None = None) -> BatchingObserver:
    """
    twistd's text log lines, written to the process's real standard output
    (twistd points C{sys.stdout} into the log itself).  What
    C{twistd --logger} takes; without C{reactor}, the one the service runs
    on (L{serve_on}).
    """
    return BatchingObserver(out if out is not None else _real_stdout(),
                            _classic_line(_SecondCache(_local_second, to_microseconds=True)),
                            reactor if reactor is not None else _service_reactor)


def json_observer(out: IO[str] | None = None,
                  reactor: IObserverReactor | None = None) -> BatchingObserver:
    """JSON Lines, written to the process's real standard output (see L{text_observer})."""
    utc_time = _SecondCache(lambda second: time.strftime("%Y-%m-%dT%H:%M:%S",
                                                         time.gmtime(second)))
    return BatchingObserver(out if out is not None else _real_stdout(),
                            _json_line(utc_time),
                            reactor if reactor is not None else _service_reactor)


def _real_stdout() -> IO[str]:
    if sys.__stdout__ is None:  # pragma: no cover - a process started without one
        raise RuntimeError("no standard output to log to")
    return sys.__stdout__


def twistd_default(twistd_options: Mapping[str, object],
                   reactor: IObserverReactor) -> BatchingObserver | None:
    """
    The observer twistd would build from its command line (C{twistd_options}:
    its C{ServerOptions}), with the same destination, lines and rotation,
    but fast: L{text_observer} to standard output under C{-n} or with
    C{--logfile=-}, else to the C{--logfile} path (C{twistd.log} by
    default) as a L{LogFile}, rotated at its size limit and on SIGUSR1.

    L{None} where the choice is not tcpgreet's to make: the user chose an
    observer (C{--logger}, C{--syslog}), or twistd must refuse the command
    line itself (a daemon logging to standard output).
    """
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    path = str(twistd_options.get("logfile") or "")
    foreground = bool(twistd_options.get("nodaemon"))
    if path == "-" or (foreground and not path):
        return text_observer(sys.stdout, reactor) if foreground else None
    observer = text_observer(PatientLogFile.fromFullPath(path or "twistd.log"), reactor)
    # As twistd does: unless someone else already handles SIGUSR1.
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(
            observer.rotate))
    return observer
