"""
The real client as a subprocess, small socket servers in threads that
misbehave on purpose (escape sequences, endless streams, silence, resets),
and scripted servers in processes of their own (L{start_talker}), for the
client's end-to-end tests.  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .helpers import NEUTRAL_CWD, Program

CLIENT = [sys.executable, "-m", "tcpgreet.client"]
TALKER = str(Path(__file__).with_name("talker.py"))


def _reset_sigint() -> None:
    # A child inherits an ignored SIGINT (a test run started with "&" in a
    # script); the client rightly keeps it ignored, so restore the default
    # for tests that press Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed: float

    @property
    def lines(self) -> list[str]:
        return self.stdout.decode("utf-8", "backslashreplace").splitlines()


def run(*args: str, timeout: float = 30.0) -> Finished:
    """Run the client to completion; its output as bytes, and how long it took."""
    started = time.monotonic()
    result = subprocess.run([*CLIENT, *args], capture_output=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, cwd=NEUTRAL_CWD)
    return Finished(result.returncode, result.stdout, result.stderr,
                    time.monotonic() - started)


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: bytes
    stderr: bytes
    peak_kb: int  # the client's peak resident memory
    cpu: float  # the client's user + system CPU seconds


# A fresh parent has no other children, so RUSAGE_CHILDREN is the client's.
_MEASURE = """\
import resource, subprocess, sys
result = subprocess.run(sys.argv[2:], capture_output=True, stdin=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as figures:
    figures.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.stdout.buffer.write(result.stdout)
sys.stderr.buffer.write(result.stderr)
sys.exit(result.returncode)
"""


def run_measured(*args: str, timeout: float = 60.0) -> Measured:
    """Run the client to completion; its output, peak memory and CPU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".figures") as figures:
        result = subprocess.run([sys.executable, "-c", _MEASURE, figures.name, *CLIENT, *args],
                                capture_output=True, timeout=timeout, cwd=NEUTRAL_CWD,
                                stdin=subprocess.DEVNULL)
        peak, cpu = figures.read().split()
    return Measured(result.returncode, result.stdout, result.stderr, int(peak), float(cpu))


class ClientProcess:
    """The client running in the background; its output read line by line."""

    def __init__(self, testcase, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CLIENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, cwd=NEUTRAL_CWD, preexec_fn=_reset_sigint)
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        testcase.addCleanup(self._kill)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read_line(self, timeout: float = 15.0) -> str:
        """The next line of output; fails after C{timeout} or at EOF."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout}s") from None
        if line is None:
            raise AssertionError("the client ended before the line expected")
        return line.decode("utf-8", "backslashreplace").rstrip("\n")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 15.0) -> tuple[int, list[str], str]:
        """Wait for the exit: the status, the output lines not yet read, stderr."""
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        rest = []
        while (line := self._lines.get(timeout=timeout)) is not None:
            rest.append(line.decode("utf-8", "backslashreplace").rstrip("\n"))
        return returncode, rest, self.process.stderr.read().decode("utf-8", "backslashreplace")

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


class SocketServer:
    """
    A listening socket on loopback; each of the first C{connections}
    connections is handed to C{handler(connection)} in a thread.  The test's
    cleanup closes it.
    """

    def __init__(self, testcase, handler: Callable[[socket.socket], None],
                 host: str = "127.0.0.1", connections: int = 1) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(30)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.handler = handler
        self.connections = connections
        self.peers: list[tuple] = []
        self.accepted = threading.Event()
        self.handled = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        testcase.addCleanup(self.close)

    def _serve(self) -> None:
        for _ in range(self.connections):
            try:
                connection, peer = self.listener.accept()
            except OSError:
                return
            self.peers.append(peer)
            self.accepted.set()
            # An OSError is the client going away, which some tests want.
            with connection, contextlib.suppress(OSError):
                connection.settimeout(30)
                self.handler(connection)
        self.handled.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept
        self.listener.close()
        self._thread.join(10)

    @property
    def target(self) -> list[str]:
        return [self.host, str(self.port)]


def sends(data: bytes) -> Callable[[socket.socket], None]:
    """A handler that sends C{data} and closes."""
    return lambda connection: connection.sendall(data)



def start_talker(testcase, *steps: str) -> Program:
    """
    A server process playing C{steps} to each connection (see
    C{tests/talker.py}); its C{host} and C{port} are set, and each
    connection's end is a log line (C{connection 1: client closed}).
    """
    talker = Program([sys.executable, TALKER, *steps])
    testcase.addCleanup(talker.stop)
    return talker.listening()
