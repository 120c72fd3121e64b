"""
A small load generator for the fault tests: many short connections kept in
flight at once on non-blocking sockets (asyncio), each read to EOF and
checked, with connect and total times per connection.

Loopback only, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LOOPBACK = ("127.", "::1")


@dataclass
class LoadResult:
    ok: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    connect_times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    unexpected: list[bytes] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())

    def percentile(self, values: list[float], fraction: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def _one(loop, address, check, timeout, result, source=None, rcvbuf=None):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    started = time.monotonic()
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            s.bind((source, 0))
        try:
            await asyncio.wait_for(loop.sock_connect(s, address), timeout)
        except asyncio.TimeoutError:
            result.errors["connect timeout"] += 1
            return
        except ConnectionRefusedError:
            result.errors["refused"] += 1
            return
        connected = time.monotonic()
        result.connect_times.append(connected - started)
        chunks = []
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.errors["read timeout"] += 1
                return
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 65536), remaining)
            except asyncio.TimeoutError:
                result.errors["read timeout"] += 1
                return
            except ConnectionResetError:
                result.errors["reset"] += 1
                if chunks:
                    result.unexpected.append(b"".join(chunks))
                return
            if not data:
                break
            chunks.append(data)
        data = b"".join(chunks)
        if check(data):
            result.ok += 1
            result.latencies.append(time.monotonic() - started)
        else:
            result.errors["wrong greeting"] += 1
            if len(result.unexpected) < 20:
                result.unexpected.append(data)
    except OSError as e:
        result.errors[os.strerror(e.errno) if e.errno else type(e).__name__] += 1
    finally:
        s.close()


def run_load(host: str, port: int, total: int, concurrency: int,
             expected: bytes | Callable[[bytes], bool], timeout: float = 5.0,
             source: str | None = None, rcvbuf: int | None = None,
             deadline: float = 120.0) -> LoadResult:
    """
    Make C{total} connections, C{concurrency} at a time; each must read
    C{expected} (or satisfy it, if it is a predicate) within C{timeout}.
    The whole run is cut off after C{deadline} seconds.
    """
    if not host.startswith(LOOPBACK):
        raise ValueError(f"load tests target loopback only, not {host}")
    check = expected if callable(expected) else expected.__eq__
    result = LoadResult()

    async def main():
        loop = asyncio.get_running_loop()
        remaining = iter(range(total))

        async def worker():
            for _ in remaining:
                await _one(loop, (host, port), check, timeout, result, source, rcvbuf)

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               deadline)
        result.seconds = time.monotonic() - started

    asyncio.run(main())
    return result


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")
