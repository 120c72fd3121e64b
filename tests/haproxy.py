"""
The real HAProxy in front of tcpgreet, for tests of the PROXY protocol, of
health checks and of load balancing.

L{start_haproxy} writes a configuration into a temporary directory, starts
C{haproxy -db} (foreground, logging each connection to standard output) and
returns once HAProxy answers on its runtime API socket; the test's cleanup
stops it.  The listening socket is made by the test on a port the kernel
picks and handed to HAProxy as C{bind fd@N}, so no test races another
process for a "free" port and a connection made before HAProxy is ready
simply waits in the listen queue.

Example, a PROXY v2 relay to one tcpgreet::

    server = start_server(self, "--listen", "haproxy:tcp:0:interface=127.0.0.1")
    proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2"])
    fetch(proxy.host, proxy.port, source="127.0.0.2")
"""

from __future__ import annotations

import csv
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .helpers import Program, require_tool

STARTUP_TIMEOUT = 15.0
# Between two looks at the runtime API while waiting: short, since every
# wait here is bounded by a deadline.
POLL_INTERVAL = 0.02

CONFIG = """\
global
    log stdout format raw local0 info
    stats socket {api} level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 10s
    timeout server 10s
    timeout check 5s

listen greet
    bind fd@{fd}{bind}
{backend}
{servers}
"""


class HAProxy:
    """
    One running HAProxy: clients connect to C{host:port}; its servers are
    C{greet1}, C{greet2}, ... in the order given.
    """

    host = "127.0.0.1"

    def __init__(self, program: Program, port: int, api: Path, config: str) -> None:
        self.program = program
        self.port = port
        self.api = api
        self.config = config

    @property
    def log(self) -> str:
        return self.program.log

    def wait_for(self, pattern: str, timeout: float = 10.0):
        """Wait for a line of HAProxy's log (one per connection with tcplog)."""
        return self.program.wait_for(pattern, timeout)

    def command(self, text: str, timeout: float = 5.0) -> str:
        """One command on the runtime API socket (C{show stat}, ...); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.api))
            s.sendall(text.encode() + b"\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    def server_stats(self, server: str) -> dict[str, str]:
        """The C{show stat} row of one server: C{status}, C{check_status}, ..."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(text.splitlines()):
            if row["pxname"] == "greet" and row["svname"] == server:
                return row
        raise AssertionError(f"no server {server!r} in:\n{text}")

    def wait_for_check(self, server: str, check_status: str | None = None,
                       timeout: float = 15.0) -> dict[str, str]:
        """
        Wait until a health check of C{server} has ended (in C{check_status},
        such as C{L7OK} or C{L7TOUT}, if given); its stats row.
        """
        deadline = time.monotonic() + timeout
        while True:
            row = self.server_stats(server)
            status = row["check_status"]
            # "INI": none yet; a leading "*": one under way.
            ended = status not in ("", "INI") and not status.startswith("*")
            if ended and check_status in (None, status):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{server}: health check is {status!r} "
                    f"({row['check_desc'] or row['last_chk']!r}), not "
                    f"{check_status or 'ended'!r} after {timeout}s; HAProxy log:\n{self.log}")
            time.sleep(POLL_INTERVAL)

    def stop(self) -> int:
        return self.program.stop()


def start_haproxy(testcase, servers: list[str], backend: str = "", bind: str = "") -> HAProxy:
    """
    Start HAProxy in C{mode tcp} relaying to C{servers} (each an address and
    HAProxy server options, as in C{"127.0.0.1:4000 send-proxy-v2 check"});
    C{backend} holds extra lines for the proxy section (C{option tcp-check},
    C{balance}, ...) and C{bind} options for the listener (C{accept-proxy}).
    Skips (or, under TCPGREET_REQUIRE_SYSTEM_TOOLS=1,
    fails) when HAProxy is not installed.
    """
    haproxy = require_tool(testcase, "haproxy")
    directory = Path(tempfile.mkdtemp(prefix="tcpgreet-haproxy-"))
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind((HAProxy.host, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        api = directory / "api.sock"
        config = CONFIG.format(
            api=api, fd=listener.fileno(), backend=backend, bind=f" {bind}" if bind else "",
            servers="\n".join(f"    server greet{number} {server}"
                              for number, server in enumerate(servers, start=1)))
        path = directory / "haproxy.cfg"
        path.write_text(config)
        program = Program([haproxy, "-db", "-f", str(path)], pass_fds=(listener.fileno(),))
        testcase.addCleanup(program.stop)
    proxy = HAProxy(program, port, api, config)
    _wait_until_serving(proxy)
    return proxy


def _wait_until_serving(proxy: HAProxy) -> None:
    """
    Wait until the runtime API answers: by then HAProxy has read its
    configuration and serves the listener.  A configuration it refuses ends
    the process, and the test fails with HAProxy's own message.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proxy.program.process.poll() is not None:
            proxy.program.exit_status()
            raise AssertionError(f"haproxy exited at start; its log:\n{proxy.log}\n"
                                 f"configuration:\n{proxy.config}")
        try:
            if "Name: HAProxy" in proxy.command("show info"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"haproxy not serving after {STARTUP_TIMEOUT}s; "
                                 f"its log:\n{proxy.log}")
        time.sleep(POLL_INTERVAL)
