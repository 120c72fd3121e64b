"""
The load generator in Python, for machines without a C compiler.

It does what C{loadgen.c} does, with the same arguments and the same JSON
line on standard output, so the benchmark can use either.  It is much less
able: its own CPU runs out at a fraction of the C version's rate, so against
a fast server greetings/s and latency measure this program more than the
server.  Server CPU per greeting still compares servers fairly.

usage: python pyloadgen.py HOST PORT CONCURRENCY SECONDS [-e HEX] [-t MS] [-c]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import math
import os
import select
import socket
import struct
import sys
import time
from collections import OrderedDict

DEFAULT_GREETING = b"Thank you for connecting\r\n"
ERROR_KINDS = ("refused", "reset", "timeout", "short", "wrong", "addrnotavail", "other")
# See loadgen.c: an abortive close leaves no TIME_WAIT state behind.
ABORTIVE_LINGER = struct.pack("ii", 1, 0)
EPOLL_EVENTS = select.EPOLLIN | select.EPOLLRDHUP


def error_kind(number: int) -> str:
    """The report's name for a socket error number."""
    if number == errno.ECONNREFUSED:
        return "refused"
    if number in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if number == errno.ETIMEDOUT:
        return "timeout"
    if number in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
        return "addrnotavail"
    return "other"


class Run:
    """One timed run: C{concurrency} connections in flight until the deadline."""

    def __init__(self, address: tuple, family: int, concurrency: int, expected: bytes,
                 timeout: float, abortive_close: bool) -> None:
        self.address = address
        self.family = family
        self.concurrency = concurrency
        self.expected = expected
        self.timeout = timeout
        self.abortive_close = abortive_close
        self.epoll = select.epoll()
        # fd -> (socket, start time, bytes so far), in start order: with one
        # time limit for all, the first entry is always the next to expire.
        self.in_flight: OrderedDict[int, tuple[socket.socket, float, bytes]] = OrderedDict()
        self.latencies: list[float] = []
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.other_error: str | None = None  # the last error of kind "other"
        self.started = 0

    def kind_of(self, number: int) -> str:
        kind = error_kind(number)
        if kind == "other":
            self.other_error = os.strerror(number)
        return kind

    def start(self) -> None:
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
        except OSError as e:  # out of descriptors or memory: the slot waits a pass
            self.errors[self.kind_of(e.errno or 0)] += 1
            return
        self.started += 1
        sock.setblocking(False)
        if self.abortive_close:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE_LINGER)
        started = time.monotonic()
        result = sock.connect_ex(self.address)
        if result not in (0, errno.EINPROGRESS):
            sock.close()
            self.errors[self.kind_of(result)] += 1
            return
        fd = sock.fileno()
        self.in_flight[fd] = (sock, started, b"")
        self.epoll.register(fd, EPOLL_EVENTS)

    def finish(self, fd: int, kind: str | None, now: float) -> None:
        sock, started, _ = self.in_flight.pop(fd)
        sock.close()  # also leaves the epoll set
        if kind is None:
            self.latencies.append(now - started)
        else:
            self.errors[kind] += 1

    def on_event(self, fd: int, events: int, now: float) -> None:
        sock, started, received = self.in_flight[fd]
        if events & select.EPOLLERR:
            number = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.finish(fd, self.kind_of(number or errno.ECONNRESET), now)
            return
        room = len(self.expected) + 1 - len(received)  # one byte too many is wrong
        try:
            data = sock.recv(room)
        except BlockingIOError:
            return
        except OSError as e:
            self.finish(fd, self.kind_of(e.errno or 0), now)
            return
        received += data
        if len(received) > len(self.expected):
            self.finish(fd, "wrong", now)
        elif not data or (events & select.EPOLLRDHUP and len(data) < room):
            # EOF, or (as in loadgen.c) the FIN queued behind a short read
            self.finish(fd, self.verdict(received), now)
        else:
            self.in_flight[fd] = (sock, started, received)

    def verdict(self, received: bytes) -> str | None:
        """The error kind of a whole reply, or None for the expected greeting."""
        if len(received) < len(self.expected):
            return "short"
        return None if received == self.expected else "wrong"

    def run(self, seconds: float) -> dict:
        begin = now = time.monotonic()
        deadline = begin + seconds
        while now < deadline:
            # One try per free slot and pass: a start that fails at once
            # (no local port free, say) is retried on the next pass.
            for _ in range(self.concurrency - len(self.in_flight)):
                self.start()
            wait = deadline - now
            if self.in_flight:
                first = next(iter(self.in_flight.values()))
                wait = min(wait, first[1] + self.timeout - now)
            if len(self.in_flight) < self.concurrency:
                wait = min(wait, 0.001)  # a failed start is retried soon, not in a loop
            events = self.epoll.poll(max(0.0, min(wait, 0.1)))
            now = time.monotonic()
            for fd, mask in events:
                if fd in self.in_flight:
                    self.on_event(fd, mask, now)
            while self.in_flight:
                fd, (_, started, _) = next(iter(self.in_flight.items()))
                if started + self.timeout > now:
                    break
                self.finish(fd, "timeout", now)
        abandoned = len(self.in_flight)
        for sock, _, _ in self.in_flight.values():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE_LINGER)
            sock.close()
        self.in_flight.clear()
        return self.summary(now - begin, abandoned)

    def summary(self, elapsed: float, abandoned: int) -> dict:
        latencies = sorted(self.latencies)

        def percentile_ms(fraction: float) -> float:
            if not latencies:
                return 0.0
            rank = max(1, math.ceil(fraction * len(latencies)))
            return latencies[rank - 1] * 1000

        summary = {
            "loadgen": "python", "greeted": len(latencies), "errors": self.errors,
            "errors_total": sum(self.errors.values()), "seconds": elapsed,
            "started": self.started, "abandoned": abandoned,
            "concurrency": self.concurrency,
            "close": "abort" if self.abortive_close else "normal",
            "p50_ms": percentile_ms(0.5), "p90_ms": percentile_ms(0.9),
            "p99_ms": percentile_ms(0.99), "max_ms": percentile_ms(1.0),
        }
        if self.other_error:
            summary["other_error"] = self.other_error
        return summary


def loopback_address(host: str, port: int) -> tuple[int, tuple]:
    """The socket family and address of a numeric loopback C{host}, or exit."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        sys.exit(f"pyloadgen: {host} is not a numeric loopback address "
                 "(127.0.0.0/8 or ::1); refusing")
    if address.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyloadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("-e", dest="expected_hex", default=DEFAULT_GREETING.hex())
    parser.add_argument("-t", dest="timeout_ms", type=int, default=5000)
    parser.add_argument("-c", dest="normal_close", action="store_true")
    args = parser.parse_args(argv)
    family, address = loopback_address(args.host, args.port)
    run = Run(address, family, args.concurrency, bytes.fromhex(args.expected_hex),
              args.timeout_ms / 1000, not args.normal_close)
    print(json.dumps(run.run(args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
