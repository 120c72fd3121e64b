"""
The servers under test: their command lines, and starting, watching and
stopping one of them.

Each server runs in its own session, so a Ctrl-C at the terminal reaches the
benchmark, which stops it in order, rather than reaching the server first;
stopping ends with a SIGKILL to the whole session, so no worker outlives it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import BenchError
from bench.cpus import Placement

# What every server sends: tcpgreet's default greeting.
GREETING = b"Thank you for connecting\r\n"
HOST = "127.0.0.1"
BASELINES = Path(__file__).resolve().parent / "baselines"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# How often a starting server is asked whether it is serving yet.
POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class Launch:
    """What every server of a run is started with."""

    twistd: str | None  # None when no tcpgreet variant is measured
    python: str
    scratch: Path  # each server gets a directory of its own in here
    workers: str | None  # passed on to tcpgreet as --workers, when given
    take_port: Callable[[], int]
    greetserver: Path | None = None  # the C floor, when it could be built


@dataclass(frozen=True)
class Variant:
    """One server to measure, by name."""

    name: str
    summary: str
    # (launch, port, the server's own directory) -> command line
    command: Callable[[Launch, int, Path], list[str]]
    is_tcpgreet: bool = False
    # a tcpgreet option this variant needs; absent from --help, it is skipped
    needs_option: str | None = None
    # why this variant cannot run here (launch -> reason), if it may not
    unavailable: Callable[[Launch], str | None] | None = None


def _listen(port: int) -> str:
    return f"tcp:{port}:interface={HOST}"


def _tcpgreet(launch: Launch, port: int, *options: str,
              twistd_options: tuple[str, ...] = ()) -> list[str]:
    command = [launch.twistd, "-n", "--pidfile=", *twistd_options, "tcpgreet",
               "--listen", _listen(port), *options]
    if launch.workers is not None:
        command += ["--workers", launch.workers]
    return command


def _baseline(script: str) -> Callable[[Launch, int, Path], list[str]]:
    return lambda launch, port, directory: [launch.python, str(BASELINES / script),
                                            str(port)]


def _python_lacks(module: str) -> Callable[[Launch], str | None]:
    def check(launch: Launch) -> str | None:
        found = subprocess.run([launch.python, "-c", f"import {module}"],
                               capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        return None if found.returncode == 0 else \
            f"{module} is not installed (pip install {module})"
    return check


def _no_greetserver(launch: Launch) -> str | None:
    return None if launch.greetserver is not None else \
        "greetserver.c could not be built (no C compiler?)"


VARIANTS = {variant.name: variant for variant in [
    Variant("tcpgreet-quiet", "twistd -n tcpgreet --quiet",
            lambda launch, port, directory: _tcpgreet(launch, port, "--quiet"),
            is_tcpgreet=True),
    # The command as a user types it, its standard output (the log) a file.
    Variant("tcpgreet-as-typed",
            "twistd -n tcpgreet (a log line per connection, to standard output: a file)",
            lambda launch, port, directory: _tcpgreet(launch, port), is_tcpgreet=True),
    # A real file, as an operator would have: twistd rotates its log file,
    # so /dev/null (which it would rename away when run as root) will not do.
    Variant("tcpgreet-log", "twistd -n --logfile=FILE tcpgreet (a log line per connection)",
            lambda launch, port, directory: _tcpgreet(
                launch, port, twistd_options=(f"--logfile={directory / 'tcpgreet.log'}",)),
            is_tcpgreet=True),
    # tcpgreet's own observers write standard output, which is a file here.
    Variant("tcpgreet-log-text",
            "twistd -n --logger tcpgreet.logs.text_observer tcpgreet (the same lines)",
            lambda launch, port, directory: _tcpgreet(
                launch, port, twistd_options=("--logger", "tcpgreet.logs.text_observer")),
            is_tcpgreet=True),
    Variant("tcpgreet-log-json",
            "twistd -n --logger tcpgreet.logs.json_observer tcpgreet (JSON Lines)",
            lambda launch, port, directory: _tcpgreet(
                launch, port, twistd_options=("--logger", "tcpgreet.logs.json_observer")),
            is_tcpgreet=True),
    Variant("tcpgreet-metrics", "twistd -n tcpgreet --quiet --metrics tcp:PORT",
            lambda launch, port, directory: _tcpgreet(
                launch, port, "--quiet", "--metrics", _listen(launch.take_port())),
            is_tcpgreet=True, needs_option="--metrics"),
    Variant("twisted-minimal",
            "bench/baselines/twisted_minimal.py: connectionMade writes, then "
            "loseConnection; epoll reactor, backlog 1024 as tcpgreet's",
            _baseline("twisted_minimal.py")),
    Variant("asyncio-minimal",
            "bench/baselines/asyncio_minimal.py: stdlib asyncio Protocol, "
            "backlog 1024 as tcpgreet's",
            _baseline("asyncio_minimal.py")),
    Variant("uvloop-minimal",
            "bench/baselines/uvloop_minimal.py: the same Protocol on uvloop",
            _baseline("uvloop_minimal.py"), unavailable=_python_lacks("uvloop")),
    Variant("c-epoll",
            "bench/greetserver.c: C, one epoll set; accept4 until EAGAIN, write, close",
            lambda launch, port, directory: [str(launch.greetserver), str(port)],
            unavailable=_no_greetserver),
]}
REFERENCE = "twisted-minimal"


def find_twistd() -> str:
    """The twistd of the Python running the benchmark, else the one on PATH."""
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if found is None:
        raise BenchError("twistd not found: install tcpgreet (pip install .) "
                         "into the environment whose python runs the benchmark")
    return found


def tcpgreet_options(twistd: str, directory: Path) -> frozenset[str]:
    """The long options the installed tcpgreet offers, from its --help."""
    try:
        result = subprocess.run([twistd, "tcpgreet", "--help"], capture_output=True,
                                text=True, timeout=60, cwd=directory,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("'twistd tcpgreet --help' did not finish in 60 s") from None
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise BenchError("'twistd tcpgreet --help' failed (is tcpgreet installed "
                         f"where twistd runs?): {' '.join(reason)}")
    # Only where an option is defined ("  -q, --quiet  ..." or "      --help"),
    # not where another option's description happens to mention one.
    return frozenset(re.findall(r"^ +(?:-\w, )?(--[a-z][a-z0-9-]*)", result.stdout, re.M))


class Ports:
    """
    Distinct free loopback ports, one per server started, taken just below
    the kernel's ephemeral range: there neither the load generator's own
    outgoing connections nor other programs listening on port 0 can take
    one between our check and the server's bind.
    """

    def __init__(self) -> None:
        low = _ephemeral_low()
        self._candidates = list(range(max(1024, low - 10000), low))
        random.shuffle(self._candidates)  # two runs at once rarely collide

    def take(self) -> int:
        while self._candidates:
            port = self._candidates.pop()
            with socket.socket() as probe:
                try:
                    probe.bind((HOST, port))
                except OSError:
                    continue
            return port
        raise BenchError("no free loopback port left below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class Server:
    """One running server process, started by L{start}."""

    def __init__(self, variant: Variant, launch: Launch, port: int,
                 placement: Placement) -> None:
        self.variant = variant
        self.port = port
        self.directory = launch.scratch / f"{variant.name}-{port}"
        self.directory.mkdir()
        self.output = self.directory / "output"
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith("LISTEN_")}  # no inherited sockets
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                variant.command(launch, port, self.directory), stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, cwd=self.directory, env=environment,
                start_new_session=True, preexec_fn=placement.pin_server)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_serving(self, timeout: float = START_TIMEOUT,
                           greeting: bytes = GREETING) -> None:
        """Poll the port until it greets with the right bytes; fail if the server exits."""
        deadline = time.monotonic() + timeout
        while True:
            reply = _fetch(self.port)
            if reply == greeting:
                return
            if reply is not None:
                raise BenchError(f"{self.variant.name}: port {self.port} answered "
                                 f"{reply[:60]!r}, not the greeting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.variant.name}: not serving on port {self.port} "
                                 f"after {timeout:.0f} s{self.tail()}")
            try:
                self.process.wait(min(POLL_INTERVAL, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise ServerExitedError(self)

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise ServerExitedError(self)

    def remove_rotated_logs(self) -> None:
        """
        Delete the log files twistd has rotated away: it renames every one
        of them again at each rotation, so letting them pile up would make
        logging dearer the longer a run goes on.
        """
        for path in self.directory.glob("*.log.*"):
            if path.suffix[1:].isdigit():
                path.unlink(missing_ok=True)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, a bounded wait, then SIGKILL to the whole session."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # nothing left: the usual case
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers: workers, say
        self.process.wait(timeout)

    def tail(self, lines: int = 15) -> str:
        """The end of the server's output, indented, for an error message."""
        try:
            text = self.output.read_text(errors="replace").rstrip()
        except OSError:
            return ""
        if not text:
            return ""
        return "; its output ends:\n" + "\n".join(
            "    " + line for line in text.splitlines()[-lines:])


class ServerExitedError(BenchError):
    def __init__(self, server: Server) -> None:
        self.in_use = b"address already in use" in server.output.read_bytes().lower()
        super().__init__(f"{server.variant.name} exited with status "
                         f"{server.process.returncode}{server.tail()}")


def _fetch(port: int) -> bytes | None:
    """What the port sends before EOF; None while nothing listens or answers."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as connection:
            chunks = []
            while chunk := connection.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:  # refused, reset, timed out: not serving yet
        return None


def start(variant: Variant, launch: Launch, placement: Placement,
          attempts: int = 3) -> Server:
    """
    Start C{variant} on a fresh port and wait until it serves.  A port taken
    by someone else after our check only costs another attempt.
    """
    attempt = 1
    while True:
        port = launch.take_port()
        server = Server(variant, launch, port, placement)
        try:
            server.wait_until_serving()
            return server
        except ServerExitedError as e:
            server.stop()
            if not e.in_use or attempt == attempts:
                raise
            attempt += 1
        except BaseException:
            server.stop()
            raise
