"""
Server memory per held connection: C{python -m bench --held N}.

N clients connect with a 4 KiB receive buffer and never read a greeting of
300 KB, so every connection stays open, its greeting unsent, until the
server's C{--timeout} (300 s here) would abort it.  The figure is the
growth of the server's resident memory (VmRSS) from before the clients
came to once they are all held, divided by N: what an operator must
budget for each client that connects and then stalls.  (Socket buffers are
the kernel's, not the process's, and are not in it.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from bench import BenchError
from bench.cpus import Placement
from bench.servers import HOST, Launch, Server, Variant, _fetch, _listen

RECEIVE_BUFFER = 4096
GREETING_LINES = 3000  # of 99 characters and a newline: 300,000 bytes
TIMEOUT = 300
# Connections opened before the server must have caught up: well inside
# the listen backlog of 1024.
STEP = 256
# A held connection's memory, at most, that tcpgreet aims for.
AT_MOST = 1536


def _descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def _open_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise BenchError(f"no open file limit for process {pid}")


def _raise_own_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"--held needs {needed} descriptors and the hard limit is {hard}: "
                         "raise it (ulimit -Hn) or hold fewer connections")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _wait(condition: Callable[[], bool], timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        server.check_running()
        if time.monotonic() > deadline:
            raise BenchError(f"--held: {what} within {timeout:.0f} s{server.tail()}")
        time.sleep(0.05)


def measure(launch: Launch, connections: int, placement: Placement,
            progress: Callable[[str], object]) -> dict[str, object]:
    """Hold C{connections} stalled clients on tcpgreet; its memory per connection."""
    own_limit = _raise_own_limit(connections + 64)
    greeting_file = launch.scratch / "held-greeting.txt"
    greeting_file.write_text(("x" * 99 + "\n") * GREETING_LINES)
    max_connections = max(10000, connections + 64)
    variant = Variant(
        "tcpgreet-held", "twistd -n tcpgreet with a 300 KB greeting, --timeout 300",
        lambda launch, port, directory: [
            launch.twistd, "-n", "--pidfile=", "tcpgreet", "--listen", _listen(port),
            "--greeting-file", str(greeting_file), "--timeout", str(TIMEOUT),
            "--max-connections", str(max_connections)],
        is_tcpgreet=True)
    server = Server(variant, launch, launch.take_port(), placement)
    clients: list[socket.socket] = []
    try:
        expected = None

        def serving() -> bool:
            nonlocal expected
            reply = _fetch(server.port)
            if reply is not None and len(reply) >= GREETING_LINES * 100:
                expected = reply
            return expected is not None

        _wait(serving, 30, "the server did not serve its 300 KB greeting", server)
        server.wait_until_serving(greeting=expected)  # and once more, warm
        server_limit = _open_file_limit(server.pid)
        if server_limit < connections + 64:
            raise BenchError(f"--held: the server may open only {server_limit} descriptors, "
                             f"too few for {connections} connections (ulimit -Hn)")
        base_descriptors = _descriptors(server.pid)
        rss_before = _rss(server.pid)
        started = time.monotonic()
        for count in range(1, connections + 1):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            client.setblocking(False)
            clients.append(client)
            status = client.connect_ex((HOST, server.port))
            if status not in (0, errno.EINPROGRESS):
                # Else the wait below would only say that fewer arrived.
                raise BenchError(f"--held: connection {count} of {connections} failed at "
                                 f"once: {os.strerror(status)}{server.tail()}")
            if count % STEP == 0 or count == connections:
                want = count if count == connections else count - STEP
                _wait(lambda want=want: _descriptors(server.pid) - base_descriptors >= want,
                      60, f"the server did not accept {want} connections", server)
        arrival_seconds = time.monotonic() - started
        # Each client has the start of its greeting, and no more room for it.
        sample = clients[len(clients) // 2]
        sample.setblocking(True)
        sample.settimeout(10)
        if not sample.recv(1, socket.MSG_PEEK):
            raise BenchError("--held: a held client had no greeting")
        # The server's memory settles once every connection has written
        # what its socket takes; read it until it stops growing.
        rss_after = _rss(server.pid)
        for _ in range(100):
            time.sleep(0.1)
            latest = _rss(server.pid)
            if latest <= rss_after:
                break
            rss_after = latest
        server.check_running()
        per_connection = (rss_after - rss_before) / connections
        progress(f"--held: {connections} connections held; server RSS "
                 f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, "
                 f"{per_connection:,.0f} bytes each")
        return {
            "connections": connections, "greeting_bytes": len(expected),
            "receive_buffer": RECEIVE_BUFFER, "timeout": TIMEOUT,
            "arrival_seconds": arrival_seconds,
            "rss_before": rss_before, "rss_after": rss_after,
            "bytes_per_connection": per_connection, "at_most": AT_MOST,
            "met": per_connection <= AT_MOST,
            "descriptor_limits": {"bench": own_limit, "server": server_limit},
        }
    finally:
        for client in clients:
            # A reset: the server need not finish anything for them.
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        server.stop()


def text(result: dict[str, object]) -> str:
    """The figure and what it was measured with, for the terminal."""
    return (
        f"held connections: {result['connections']:,} clients with a "
        f"{result['receive_buffer']} B receive buffer that never read a "
        f"{result['greeting_bytes']:,} B greeting (--timeout {result['timeout']}), "
        f"connected in {result['arrival_seconds']:.1f} s\n"
        f"server RSS: {result['rss_before'] / 2**20:.1f} MiB before, "
        f"{result['rss_after'] / 2**20:.1f} MiB held\n"
        f"per held connection: {result['bytes_per_connection']:,.0f} B "
        f"(at most {result['at_most']:,} B: {'met' if result['met'] else 'NOT MET'})\n"
        f"descriptor limits: bench {result['descriptor_limits']['bench']}, "
        f"server {result['descriptor_limits']['server']}\n")
