"""
Helpers for end-to-end tests: the real twistd and the real client as
subprocesses on loopback, and raw sockets where exact bytes matter.

Every wait has a timeout and every process is stopped by the test's cleanup.
Servers listen on port 0 and the tests learn the port from the start-up log
line, so no test races another process for a "free" port.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
# Subprocesses run outside the source tree, so they use tcpgreet as
# installed (twistd puts its working directory on sys.path).
NEUTRAL_CWD = tempfile.mkdtemp(prefix="tcpgreet-tests-")
TWISTD = str(BIN / "twistd") if (BIN / "twistd").exists() else "twistd"

# "listening on tcp:0:interface=127.0.0.1 (127.0.0.1:40321)" -> 40321
_LISTENING = re.compile(r"listening on .*?\((?:\[([^\]]+)\]|([^():\s]+)):(\d+)\)")


def twistd_command(*args: str, twistd_args: tuple[str, ...] = ()) -> list[str]:
    return [TWISTD, "-n", "--pidfile=", *twistd_args, "tcpgreet", *args]


# twistd, with the port of the default listener (no --listen) set first:
# the default itself, on a port of the test's choosing rather than 27679,
# which another program may hold.
_DEFAULT_ON = """\
import sys
import tcpgreet.tap
tcpgreet.tap.DEFAULT_PORT = int(sys.argv[1])
sys.argv[:] = ["twistd", *sys.argv[2:]]
from twisted.scripts.twistd import run
run()
"""


def default_command(port: int, *args: str) -> list[str]:
    """C{twistd -n --pidfile= tcpgreet ARGS}, whose default listener is on C{port}."""
    return [sys.executable, "-c", _DEFAULT_ON, str(port), *twistd_command(*args)[1:]]


def run_default(port: int, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """L{run_twistd}, with the default listener on C{port} (L{default_command})."""
    return subprocess.run(default_command(port, *args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=_env(None),
                          cwd=NEUTRAL_CWD)


def unused_dual_port() -> int:
    """
    A port nothing listens on right now on any IPv4 or IPv6 address, for
    the default listener.  Another process may take it meanwhile: callers
    retry on "address already in use".
    """
    while True:
        with socket.socket() as ipv4, socket.socket(socket.AF_INET6) as ipv6:
            ipv4.bind(("", 0))
            port = ipv4.getsockname()[1]
            ipv6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                ipv6.bind(("::", port))
            except OSError:
                continue
            return port


class Server:
    """
    One C{twistd -n tcpgreet} subprocess.  Its log (standard output) is read
    by a thread into a queue, so a test can wait for a line with a timeout
    while keeping everything it has seen in L{lines}.
    """

    def __init__(self, *args: str, env: dict | None = None, preexec_fn=None,
                 twistd_args: tuple[str, ...] = (), command: list[str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        # Lines before this index have been matched by wait_for, or passed
        # over on the way to a match: the next wait_for looks past them.
        self._cursor = 0
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            command or twistd_command(*args, twistd_args=twistd_args), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_env(env),
            preexec_fn=preexec_fn, cwd=NEUTRAL_CWD)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port: int | None = None
        self.host: str | None = None

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """
        Wait for the next log line matching C{pattern}, one that comes after
        every line an earlier C{wait_for} matched, so that waiting for an
        event twice waits for two events; fail after C{timeout}.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.lines):
                line = self.lines[self._cursor]
                self._cursor += 1
                match = regex.search(line)
                if match:
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no log line matching {pattern!r} within {timeout}s; log:\n"
                    + "\n".join(self.lines[-40:]) + self._stderr_if_dead())
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"server exited (status {self.process.wait()}) before a line "
                    f"matching {pattern!r}; log:\n" + "\n".join(self.lines[-40:])
                    + self._stderr_if_dead())
            self.lines.append(line)

    def logged(self, pattern: str) -> re.Match | None:
        """The first line read so far that matches C{pattern}, waiting for none."""
        self._drain()
        regex = re.compile(pattern)
        return next(filter(None, map(regex.search, self.lines)), None)

    def wait_for_count(self, pattern: str, count: int, timeout: float = 10.0) -> int:
        """Wait until C{count} log lines match C{pattern}; fail after C{timeout}."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = sum(1 for line in self.lines if regex.search(line))
        while seen < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{seen} of {count} log lines matching {pattern!r} "
                                     f"within {timeout}s")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"server exited with {seen} of {count} lines matching "
                                     f"{pattern!r}")
            self.lines.append(line)
            if regex.search(line):
                seen += 1
        return seen

    def _stderr_if_dead(self) -> str:
        if self.process.poll() is None:
            return ""
        return "\nstderr:\n" + self.process.stderr.read()

    def listening(self, timeout: float = 15.0) -> Server:
        """Wait until the server says where it listens; return self."""
        self.startup_line = self.wait_for(r"listening on ", timeout).string
        match = _LISTENING.search(self.startup_line)
        assert match, "start-up line without an address"
        self.host = match.group(1) or match.group(2)
        if self.host in ("0.0.0.0", "::"):
            self.host = "127.0.0.1" if self.host == "0.0.0.0" else "::1"
        self.port = int(match.group(3))
        return self

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._reader.join(timeout)
        self._drain()
        for stream in (self.process.stdout, self.process.stderr):
            if stream and not stream.closed:
                stream.close()
        return self.process.returncode

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    @property
    def log(self) -> str:
        self._drain()
        return "\n".join(self.lines)


def start_server(testcase, *args: str, env: dict | None = None, preexec_fn=None,
                 twistd_args: tuple[str, ...] = ()) -> Server:
    """Start a server, have the test stop it, and wait until it listens."""
    server = Server(*args, env=env, preexec_fn=preexec_fn, twistd_args=twistd_args)
    testcase.addCleanup(server.stop)
    return server.listening()


def run_twistd(*args: str, timeout: float = 30.0,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run C{twistd -n --pidfile= tcpgreet ARGS} to completion (start-up errors)."""
    return twistd(*twistd_command(*args)[1:], timeout=timeout, env=env)


def twistd(*args: str, timeout: float = 30.0, env: dict | None = None,
           cwd: str = NEUTRAL_CWD) -> subprocess.CompletedProcess:
    """Run C{twistd ARGS} to completion."""
    return subprocess.run([TWISTD, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=_env(env),
                          cwd=cwd)


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """
    Poll C{condition} every C{interval} seconds until it returns something
    true, for at most C{timeout} seconds.  Only for states that nothing
    announces, such as a port that serves again after a flood: where an
    event exists (a log line, a process exit, a thread's signal), wait on
    it instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling: there is no event to wait on


def run_client(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run C{python -m tcpgreet.client} to completion."""
    return subprocess.run([sys.executable, "-m", "tcpgreet.client", *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=_env(None), cwd=NEUTRAL_CWD)


def temporary_file(testcase, data: bytes = b"", suffix: str = "") -> str:
    """A file holding C{data}, removed when the test is over; its path."""
    fd, path = tempfile.mkstemp(suffix=suffix)
    testcase.addCleanup(os.remove, path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def fetch(host: str, port: int, timeout: float = 5.0, send: bytes = b"",
          source: str | None = None, rcvbuf: int | None = None) -> bytes:
    """Connect with a raw socket, optionally send, read to EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        if send:
            s.sendall(send)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    env.pop("LISTEN_FDNAMES", None)
    if extra:
        env.update(extra)
    return env


def namespace_command(testcase) -> list[str]:
    """
    The command that runs a program in network and process namespaces of
    its own, where it may give itself addresses (C{ip addr add}) that touch
    nothing outside, and where every process it starts dies with it.
    Missing programs skip the test, or fail it under
    TCPGREET_REQUIRE_SYSTEM_TOOLS=1; a machine that does not permit new
    namespaces (a container without the privilege) skips it.
    """
    from twisted.trial.unittest import SkipTest

    unshare = require_tool(testcase, "unshare")
    require_tool(testcase, "ip")
    # As root, or as anyone through a user namespace of their own.
    for user in ([], ["--user", "--map-root-user"]):
        command = [unshare, *user, "--net", "--pid", "--fork", "--kill-child"]
        if subprocess.run([*command, "true"], capture_output=True,
                          timeout=30).returncode == 0:
            return command
    raise SkipTest("unshare --net is not permitted here")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def require_tool(testcase, program: str) -> str:
    """
    The path of a system program the test needs.  Missing, the test is
    skipped, except under TCPGREET_REQUIRE_SYSTEM_TOOLS=1 (CI), where a
    missing program is a failure: CI must not pass by skipping.
    """
    import shutil

    from twisted.trial.unittest import SkipTest

    path = shutil.which(program)
    if path:
        return path
    if os.environ.get("TCPGREET_REQUIRE_SYSTEM_TOOLS") == "1":
        testcase.fail(f"{program} is required (TCPGREET_REQUIRE_SYSTEM_TOOLS=1) but missing")
    raise SkipTest(f"{program} not installed")


class Program(Server):
    """
    A program other than twistd itself: HAProxy, or a wrapper such as
    C{systemd-socket-activate} that ends by exec'ing twistd.  Its standard
    error is merged into the log, so its own messages ("Listening on ...",
    a one-line start-up error) can be waited for like any log line.
    """

    def __init__(self, command: list[str], env: dict | None = None,
                 pass_fds: tuple[int, ...] = (), preexec_fn=None) -> None:
        self.args = tuple(command)
        self.lines = []
        self._cursor = 0
        self._queue = queue.Queue()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, env=_env(env), pass_fds=pass_fds,
            preexec_fn=preexec_fn, cwd=NEUTRAL_CWD)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = None
        self.host = None

    def _stderr_if_dead(self) -> str:
        return ""  # already in the log

    def exit_status(self, timeout: float = 30.0) -> int:
        """Wait for the program to end by itself; its status."""
        status = self.process.wait(timeout)
        self._reader.join(timeout)
        self._drain()
        return status


def unused_port(host: str = "127.0.0.1") -> int:
    """
    A port nothing listens on right now, for the few programs that cannot
    listen on port 0 and report the port they got.  Another process may take
    it before the program binds it: callers retry on "address in use".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_twistd_with(preexec_fn, *args: str,
                    timeout: float = 30.0) -> subprocess.CompletedProcess:
    """L{run_twistd}, with C{preexec_fn} run in the child before twistd starts."""
    return subprocess.run(twistd_command(*args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=_env(None),
                          cwd=NEUTRAL_CWD, preexec_fn=preexec_fn)


def assert_fails_in_one_line(testcase, result: subprocess.CompletedProcess,
                             pattern: str) -> str:
    """
    The project's rule for a mistake an operator can make: a non-zero exit,
    no traceback, and one line on standard error matching C{pattern}.
    """
    testcase.assertNotIn("Traceback", result.stdout + result.stderr)
    testcase.assertNotEqual(result.returncode, 0)
    lines = result.stderr.splitlines()
    testcase.assertEqual(len(lines), 1, result.stderr)
    testcase.assertRegex(lines[0], pattern)
    return lines[0]


def process_gone(pid: int) -> bool:
    """Whether process C{pid} has exited (a zombie not yet reaped counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_for_exit(pid: int, timeout: float, what: str = "") -> None:
    """
    Wait until process C{pid}, which need not be a child of this one, has
    exited: its pidfd becomes readable then.  Fail after C{timeout}.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not readable:
        raise AssertionError(f"process {pid} {what or ''} still running after {timeout}s")


def processes_with_argument(marker: str) -> list[int]:
    """
    The processes with C{marker} in their command line, and their children:
    how a test finds a daemon it started (twistd without C{-n} leaves the
    test's process group) and the workers of that daemon.
    """
    found: list[int] = []
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if marker.encode() in command:
            found.append(int(entry))
    return found + [pid for pid, parent in parents.items() if parent in found]


def kill_processes_with_argument(marker: str) -> None:
    """SIGKILL what L{processes_with_argument} finds: a test's cleanup."""
    for pid in processes_with_argument(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
