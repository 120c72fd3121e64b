"""
Run in a network namespace of its own (see L{tests.helpers.namespace_command}):
give the loopback interface addresses of two IPv6 /64s, start C{twistd
tcpgreet --workers 2 --max-per-ip N} with a greeting too long to go out to
a client that does not read, and hold one connection from each client
address given, in order.  The last line of standard output is a JSON list
of [address, greeted] pairs.  Exit status 77: the namespace cannot be set
up here (no IPv6, say), which the test reads as a reason to skip.

usage: python -m tests.netns_steering N ADDRESS...
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from .helpers import Server, temporary_file

SERVER = "fd00:1::a"
NETWORKS = ("fd00:1::", "fd00:2::")
READY = r"worker \d+ \(pid \d+\) ready"
UNAVAILABLE = 77


class _Cleanups:
    """What L{temporary_file} needs of a test case: somewhere to put its clean-up."""

    def __init__(self) -> None:
        self.calls: list = []

    def addCleanup(self, f, *args) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        for f, args in reversed(self.calls):
            f(*args)


def configure(addresses: list[str]) -> None:
    """Loopback up, with the server's address and every client's."""
    commands = [["ip", "link", "set", "lo", "up"]]
    for address in dict.fromkeys([SERVER, *addresses]):
        commands.append(["ip", "-6", "addr", "add", f"{address}/64", "dev", "lo", "nodad"])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            print(f"{' '.join(command)}: {result.stderr.strip()}", file=sys.stderr)
            raise SystemExit(UNAVAILABLE)


def hold(server: Server, source: str) -> tuple[socket.socket, bool]:
    """A connection from C{source}, and whether the server greeted it."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the greeting stays in progress
    s.bind((source, 0))
    s.connect((server.host, server.port))
    return s, bool(s.recv(1, socket.MSG_PEEK))


def main(arguments: list[str]) -> None:
    limit, addresses = arguments[0], arguments[1:]
    if not all(address.startswith(NETWORKS) for address in addresses):
        raise SystemExit(f"client addresses must be in {NETWORKS}")
    configure(addresses)
    cleanups = _Cleanups()
    held = []
    try:
        greeting = temporary_file(cleanups, b"x" * (1 << 20))
        server = Server("--workers", "2", "--listen", r"tcp6:0:interface=fd00\:1\:\:a",
                        "--max-per-ip", limit, "--greeting-file", greeting)
        cleanups.addCleanup(server.stop)
        server.listening()
        server.wait_for_count(READY, 2)
        results = []
        for address in addresses:
            connection, greeted = hold(server, address)
            held.append(connection)
            results.append([address, greeted])
        print(json.dumps(results), flush=True)
    finally:
        for connection in held:
            connection.close()
        cleanups.run()


if __name__ == "__main__":
    main(sys.argv[1:])
