"""
The real client as a subprocess, and small socket servers in threads that
misbehave on purpose (escape sequences, endless streams, silence, resets),
for the client's end-to-end tests.  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .helpers import NEUTRAL_CWD, Program, require_tool, unused_port

CLIENT = [sys.executable, "-m", "tcpgreet.client"]


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



def start_sshd(testcase, attempts: int = 5) -> Program:
    """
    OpenSSH's sshd on 127.0.0.1, with a host key made for the test: a real
    server that speaks first (C{SSH-2.0-...}) and then waits.  sshd cannot
    listen on port 0, so a port that another process takes first is tried
    again with another.  The test's cleanup stops it.
    """
    sshd = require_tool(testcase, "sshd")
    keygen = require_tool(testcase, "ssh-keygen")
    directory = tempfile.mkdtemp(prefix="tcpgreet-sshd-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    key = os.path.join(directory, "host_key")
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", key],
                   check=True, capture_output=True, timeout=30)
    config = os.path.join(directory, "sshd_config")
    with open(config, "w") as f:
        # Only the banner is read: nobody may log in.
        f.write("PidFile none\nUsePAM no\nDenyUsers *\nPubkeyAuthentication no\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
    # sshd refuses to start without its privilege separation directory.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for _ in range(attempts):
        port = unused_port()
        server = Program([sshd, "-D", "-e", "-f", config, "-o", "ListenAddress=127.0.0.1",
                          "-o", f"Port={port}", "-o", f"HostKey={key}"])
        testcase.addCleanup(server.stop)
        try:
            server.wait_for(rf"Server listening on 127\.0\.0\.1 port {port}\.", 15)
        except AssertionError:
            if "Address already in use" in server.log:
                server.stop()
                continue
            raise
        server.host, server.port = "127.0.0.1", port
        return server
    testcase.fail(f"sshd found no free port in {attempts} attempts")
