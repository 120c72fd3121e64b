"""
tcpgreet's own log observer as twistd's default: where twistd would write,
what twistd would write, rotated when twistd would rotate, and nothing
lost; and C{--logger} and C{--syslog} still choose.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from twisted.application import app
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, formatEventAsClassicLogText
from twisted.python import logfile
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions, UnixApplicationRunner, UnixAppLogger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcpgreet import logs
from tests import helpers

# twistd's classic line for a greeted connection.
GREETED_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[tcpgreet\.server#info\] "
    r"127\.0\.0\.1 port (\d+): greeted, 26 bytes in \d+(?:\.\d+)? ms$")
# The same, written by the supervisor for one of its workers.
WORKER_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[tcpgreet\.server#info\] "
    r"\[worker [12], pid \d+\] 127\.0\.0\.1 port (\d+): greeted, 26 bytes in [\d.]+ ms$")
LISTENING = re.compile(r"listening on .*?\(127\.0\.0\.1:(\d+)\)")


class RunningReactor:
    """Enough of a running reactor for a batching observer: turns on demand."""

    running = True

    def __init__(self) -> None:
        self.calls: list = []
        self.shutdown: list = []

    def callLater(self, delay, f, *args):
        self.calls.append((f, args))

    def callFromThread(self, f, *args):
        self.calls.append((f, args))

    def addSystemEventTrigger(self, phase, event, f):
        self.shutdown.append(f)

    def endTurn(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def _events(when: float) -> list[dict]:
    """Events of every shape the log sees, at C{when}."""
    try:
        raise ValueError("no good")
    except ValueError:
        failure = Failure()
    base = {"log_time": when, "log_namespace": "tcpgreet.server", "log_level": LogLevel.info}
    return [
        {**base, "log_format": "{peer} port {port}: {outcome}, {bytes} bytes in "
                               "{duration_ms} ms", "peer": "127.0.0.1", "port": 40000,
         "outcome": "greeted", "bytes": 26, "duration_ms": 0.143},
        {**base, "log_format": "two\nlines {x!r:>8}", "x": "é"},
        {**base, "log_format": "called: {f()}", "f": lambda: "yes"},
        {**base, "log_format": "broken {missing}"},
        {**base, "log_format": b"bytes {x}", "x": 1},
        {**base, "log_format": "failed: {why}", "why": "because", "log_failure": failure},
        {**base, "log_format": None},
        {**base, "log_format": "legacy", "log_system": "-"},
        {**base, "log_format": "a system", "log_system": 5},
        {"log_format": "no time, no level"},
        {**base, "log_format": "", "log_namespace": "empty"},
    ]


class ClassicLineTests(SynchronousTestCase):
    """The text observer's lines are twistd's, byte for byte, in any time zone."""

    def inTimeZone(self, zone: str) -> None:
        previous = os.environ.get("TZ")
        os.environ["TZ"] = zone
        time.tzset()

        def restore():
            if previous is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = previous
            time.tzset()

        self.addCleanup(restore)

    def assertLikeTwistd(self, when: float) -> None:
        for event in _events(when):
            out = []
            observer = logs.text_observer(_Lines(out), _StoppedReactor())
            observer(dict(event))
            expected = formatEventAsClassicLogText(dict(event))
            self.assertEqual("".join(out), expected or "", event)

    def test_utc(self):
        self.inTimeZone("UTC")
        self.assertLikeTwistd(1764580968.25)

    def test_zones_with_offsets(self):
        for zone in ("IST-5:30", "NST+3:30", "CET-1CEST,M3.5.0,M10.5.0/3"):
            self.inTimeZone(zone)
            self.assertLikeTwistd(1764580968.25)
            self.assertLikeTwistd(1751371200.5)  # summer time, where there is one

    def test_end_of_a_second(self):
        # Twisted rounds to the microsecond: this is the next second for it.
        self.inTimeZone("UTC")
        self.assertLikeTwistd(1764580968.9999996)
        self.assertLikeTwistd(1764580968.9999994)


class _Lines:
    def __init__(self, out: list) -> None:
        self.write = out.append

    def flush(self) -> None:
        pass


class _StoppedReactor:
    running = False

    def addSystemEventTrigger(self, *args):
        pass


class RotationTests(SynchronousTestCase):
    """A log file rotates where, and when, twistd's own observer rotates it."""

    def test_same_files_as_twistd(self):
        self.same_files_as_twistd(logfile.LogFile)

    def test_same_files_as_twistd_from_the_default_log_file(self):
        self.same_files_as_twistd(logs.PatientLogFile)

    def same_files_as_twistd(self, log_file_class):
        ours, theirs = tempfile.mkdtemp(), tempfile.mkdtemp()
        reactor = RunningReactor()
        ours_file = log_file_class("t.log", ours)
        observer = logs.text_observer(ours_file, reactor)
        twistds_file = logfile.LogFile("t.log", theirs)
        from twisted.logger import textFileLogObserver
        twistds = textFileLogObserver(twistds_file)
        self.assertEqual(twistds_file.rotateLength, 1_000_000)
        count = 0
        # Over two size rotations and one asked for (SIGUSR1), in turns of
        # varied sizes, so that rotations fall inside batches.
        for turn in range(1900):
            for _ in range(turn % 37):
                count += 1
                event = {"log_time": 1764580968.0 + count / 1000,
                         "log_namespace": "tcpgreet.server", "log_level": LogLevel.info,
                         "log_format": "127.0.0.1 port {port}: greeted, 26 bytes in 0.1 ms",
                         "port": count}
                observer(dict(event))
                twistds(dict(event))
            if turn == 500:
                observer.rotate()
                twistds_file.rotate()
            reactor.endTurn()
            # On disk at the end of the turn, nothing left in a buffer.
            self.assertEqual(os.path.getsize(ours_file.path), ours_file.size)
        self.assertEqual(sorted(os.listdir(ours)), ["t.log", "t.log.1", "t.log.2", "t.log.3"])
        self.assertEqual(sorted(os.listdir(ours)), sorted(os.listdir(theirs)))
        ports = []
        for name in os.listdir(ours):
            mine = Path(ours, name).read_bytes()
            self.assertEqual(mine, Path(theirs, name).read_bytes(), name)
            ports += [int(p) for p in re.findall(rb"port (\d+):", mine)]
        self.assertEqual(sorted(ports), list(range(1, count + 1)))


def _options(argv: list[str]) -> ServerOptions:
    config = ServerOptions()
    config.parseOptions(argv)
    return config


def _application(argv: list[str]):
    """
    What twistd builds from C{argv}: its options and the application.  Only
    for foreground command lines: for a daemon, tcpgreet's service prepares
    the launcher's wait for the daemon it is about to fork, which has no
    place in a test's process.
    """
    config = _options(argv)
    assert config["nodaemon"], argv
    return config, UnixApplicationRunner(config).createOrGetApplication()


class ChoiceTests(SynchronousTestCase):
    """Which observer twistd ends up with, for each command line."""

    def setUp(self):
        # A --logfile observer takes SIGUSR1, as twistd's does.
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.directory = tempfile.mkdtemp()
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)

    def observer(self, *argv: str):
        _, application = _application([*argv, "tcpgreet", "--listen",
                                       "tcp:0:interface=127.0.0.1"])
        return application.getComponent(ILogObserver)

    def test_foreground_writes_standard_output(self):
        import sys
        for argv in (["-n"], ["-n", "--logfile=-"]):
            observer = self.observer(*argv)
            self.assertIsInstance(observer, logs.BatchingObserver)
            self.assertIs(observer._out, sys.stdout)
            self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_log_file(self):
        path = os.path.join(self.directory, "server.log")
        observer = self.observer("-n", f"--logfile={path}")
        self.assertIsInstance(observer._out, logfile.LogFile)
        self.assertEqual(observer._out.path, path)
        self.assertEqual(observer._out.rotateLength, 1_000_000)
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_daemon_writes_twistd_log(self):
        config = _options(["tcpgreet"])
        observer = logs.twistd_default(config, MemoryReactorClock())
        self.assertEqual(observer._out.path, os.path.join(self.directory, "twistd.log"))
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_sigusr1_taken_already(self):
        def mine(signum, frame):
            pass

        signal.signal(signal.SIGUSR1, mine)
        self.observer("-n", "--logfile=x.log")
        self.assertIs(signal.getsignal(signal.SIGUSR1), mine)

    def test_supervisor_of_workers(self):
        _, application = _application(["-n", "--logfile=y.log", "tcpgreet", "--workers", "2"])
        self.assertIsInstance(application.getComponent(ILogObserver), logs.BatchingObserver)

    def test_logger_wins(self):
        self.assertIsNone(self.observer("-n", "--logger", "tcpgreet.logs.json_observer"))

    def test_logger_batches_on_the_reactor_of_the_service(self):
        # twistd builds a --logger observer with no argument, after the
        # service: the observer runs on the reactor the service was given.
        self.patch(logs, "_service_reactor", None)
        config = _options(["-n", "--logger", "tcpgreet.logs.json_observer", "tcpgreet",
                           "--listen", "tcp:0:interface=127.0.0.1"])
        UnixApplicationRunner(config).createOrGetApplication()
        observer = config["logger"]()  # what twistd's logger calls, next
        self.assertIsInstance(observer, logs.BatchingObserver)
        self.assertIs(observer._reactor, reactor)

    def test_syslog_wins(self):
        config, application = _application(["-n", "--syslog", "--prefix", "greet",
                                            "tcpgreet"])
        self.assertIsNone(application.getComponent(ILogObserver))
        from twisted.python import syslog
        chosen = UnixAppLogger(config)._getLogObserver()
        self.assertIsInstance(chosen.__self__, syslog.SyslogObserver)
        self.assertFalse(os.path.exists("twistd.log"))

    def test_daemon_to_standard_output_is_twistds_to_refuse(self):
        config = _options(["--logfile=-", "tcpgreet"])
        self.assertIsNone(logs.twistd_default(config, MemoryReactorClock()))
        with self.assertRaises(SystemExit):
            UnixAppLogger(config)._getLogObserver()

    def test_twistd_takes_it(self):
        config, application = _application(["-n", "--logfile=x.log", "tcpgreet"])
        chosen = []

        class Beginner:
            def beginLoggingTo(self, observers):
                chosen.extend(observers)

        logger = UnixAppLogger(config)
        original = app.logger.globalLogBeginner
        app.logger.globalLogBeginner = Beginner()
        try:
            logger.start(application)
        finally:
            app.logger.globalLogBeginner = original
        self.assertEqual(chosen, [application.getComponent(ILogObserver)])


def _wait_for_line(path: Path, pattern: re.Pattern, timeout: float = 20.0) -> re.Match:
    def found():
        try:
            return pattern.search(path.read_text(errors="replace"))
        except FileNotFoundError:
            return None

    return helpers.wait_until(found, timeout, f"{pattern.pattern!r} in {path}")


def _greet(port: int) -> int:
    """One connection, read to EOF; the client's port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        local = s.getsockname()[1]
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b"Thank you for connecting\r\n", data
    return local


def _greeted_ports(*paths: Path) -> collections.Counter:
    ports = collections.Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            match = GREETED_LINE.match(line)
            if match:
                ports[int(match.group(1))] += 1
            elif "tcpgreet.server#" in line:
                raise AssertionError(f"not twistd's line: {line!r}")
    return ports


class EndToEndTests(TestCase):
    """The real twistd, as typed."""

    def setUp(self):
        self.directory = Path(tempfile.mkdtemp(prefix="tcpgreet-log-"))

    def start(self, *twistd_args: str, args: tuple[str, ...] = ()) -> subprocess.Popen:
        process = subprocess.Popen(
            [helpers.TWISTD, "-n", "--pidfile=", *twistd_args, "tcpgreet",
             "--listen", "tcp:0:interface=127.0.0.1", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=self.directory)

        def stop():
            if process.poll() is None:
                process.kill()
            process.wait(10)
            process.stderr.close()

        self.addCleanup(stop)
        return process

    def test_standard_output(self):
        # A port of its own: the default one may be taken by anything else
        # on the machine, and the log is the subject here, not the port.
        server = helpers.start_server(self, "--listen", "tcp:0:interface=127.0.0.1")
        _greet(server.port)
        line = server.wait_for(r"greeted").string
        self.assertRegex(line, GREETED_LINE)
        self.assertEqual(server.stop(), -signal.SIGTERM)
        for line in server.lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")

    def test_rotation_by_size_and_sigusr1(self):
        log = self.directory / "server.log"
        process = self.start(f"--logfile={log}")
        port = int(_wait_for_line(log, LISTENING).group(1))
        greeted = collections.Counter()
        # A connection line is about 90 bytes: over 1,000,000 bytes of them.
        while not (self.directory / "server.log.1").exists():
            greeted[_greet(port)] += 1
            self.assertLess(sum(greeted.values()), 20000, "no rotation by size")
        for _ in range(300):
            greeted[_greet(port)] += 1
        process.send_signal(signal.SIGUSR1)
        helpers.wait_until(lambda: (self.directory / "server.log.2").exists(), 20,
                           "the rotation SIGUSR1 asks for")
        for _ in range(300):
            greeted[_greet(port)] += 1
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), -signal.SIGTERM)
        files = [self.directory / name for name in ("server.log.2", "server.log.1",
                                                    "server.log")]
        self.assertEqual(_greeted_ports(*files), greeted)
        # Rotated by size right after the line that reached 1,000,000 bytes.
        first = files[0].read_text()
        self.assertGreaterEqual(len(first), 1_000_000)
        self.assertLess(len(first) - len(first.splitlines(True)[-1]), 1_000_000)

    def test_every_line_of_a_sigterm_under_load(self):
        log = self.directory / "server.log"
        process = self.start(f"--logfile={log}", args=("--drain-timeout", "10"))
        port = int(_wait_for_line(log, LISTENING).group(1))
        greeted: collections.Counter = collections.Counter()
        lock = threading.Lock()
        stop = threading.Event()
        started = threading.Semaphore(0)

        def load():
            started.release()
            while not stop.is_set():
                try:
                    local = _greet(port)
                except (OSError, AssertionError):
                    return  # the server has stopped listening
                with lock:
                    greeted[local] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        for _ in threads:
            started.acquire()
        helpers.wait_until(lambda: sum(greeted.values()) >= 500, 30, "load")
        process.send_signal(signal.SIGTERM)
        status = process.wait(30)
        stop.set()
        for thread in threads:
            thread.join(30)
        self.assertEqual(status, -signal.SIGTERM)
        logged = _greeted_ports(log)
        self.assertEqual(greeted - logged, collections.Counter())
        self.assertIn("Server Shut Down.", log.read_text())

    def test_workers_lines_once_each(self):
        log = self.directory / "server.log"
        process = self.start(f"--logfile={log}", args=("--workers", "2"))
        port = int(_wait_for_line(log, LISTENING).group(1))
        for worker in (1, 2):
            _wait_for_line(log, re.compile(rf"worker {worker} \(pid \d+\) ready"))
        greeted = collections.Counter(_greet(port) for _ in range(200))
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), -signal.SIGTERM)
        relayed = collections.Counter()
        for line in log.read_text().splitlines():
            match = WORKER_LINE.match(line)
            if match:
                relayed[int(match.group(1))] += 1
        self.assertEqual(relayed, greeted)

    def test_daemon_writes_twistd_log(self):
        pidfile = self.directory / "twistd.pid"
        result = subprocess.run(
            [helpers.TWISTD, f"--pidfile={pidfile}", "tcpgreet",
             "--listen", "tcp:0:interface=127.0.0.1"],
            cwd=self.directory, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = int(pidfile.read_text())

        def stop():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            helpers.wait_for_exit(pid, 30, "(the daemon)")

        self.addCleanup(stop)
        log = self.directory / "twistd.log"
        port = int(_wait_for_line(log, LISTENING).group(1))
        local = _greet(port)
        _wait_for_line(log, re.compile(rf"port {local}: greeted"))
        self.assertEqual(_greeted_ports(log), {local: 1})

    def test_daemon_start_up_error_in_the_log(self):
        pidfile = self.directory / "twistd.pid"

        def stop_daemon():
            # It exits by itself; this is for one that would not.
            if pidfile.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)

        self.addCleanup(stop_daemon)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            launcher = subprocess.Popen(
                [helpers.TWISTD, f"--pidfile={pidfile}", "tcpgreet",
                 "--listen", f"tcp:{port}:interface=127.0.0.1"],
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            self.addCleanup(launcher.wait, 10)
            self.addCleanup(launcher.kill)
            _wait_for_line(self.directory / "twistd.log",
                           re.compile(rf"\[tcpgreet\.service#critical\] cannot listen on "
                                      rf"'tcp:{port}:interface=127\.0\.0\.1'"))
