"""
Admission control: how many connections may be open at once, in all and per
client address, and how fast one address may open new ones.

Twisted's C{policies.LimitConnectionsByPeer} would be the obvious tool for
the per-address part, but it registers connections under C{addr[0]} and
unregisters them under C{getPeer()[1]}, and address objects are not
indexable, so it cannot work; the per-address tables here are keyed on the
host string and kept bounded, because a flood of distinct (spoofed or
IPv6-rotated) addresses must not grow the server's memory without limit.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

MAX_CONNECTIONS = "max-connections"
MAX_PER_IP = "max-per-ip"
RATE_PER_IP = "rate-per-ip"

# The most addresses the rate limiter remembers.  Past it the longest-idle
# address is forgotten even if its bucket is not yet full again, which at
# worst forgives that address a little.
MAX_TRACKED = 65536


class TokenBuckets:
    """
    One token bucket per address: C{rate} tokens a second up to C{burst};
    a new connection takes a token.

    Buckets are kept in least-recently-used order.  A bucket that has filled
    up again is the same as no bucket at all, so it is dropped; each call
    checks the oldest one, which keeps the table down to the addresses seen
    within about C{burst / rate} seconds, and never above C{max_tracked}.
    """

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_tracked = max_tracked
        # host -> (tokens, time of last update); dict order is LRU order.
        self._buckets: dict[str, tuple[float, float]] = {}

    # Not __len__: a limiter that remembers no address yet would then be
    # false, and "if limits.rate:" would read a limit in force as none.
    @property
    def tracked(self) -> int:
        """How many addresses the table remembers now."""
        return len(self._buckets)

    def take(self, host: str) -> bool:
        """Take a token for C{host}; False if its bucket is empty."""
        now = self._clock()
        buckets = self._buckets
        entry = buckets.pop(host, None)
        if entry is None:
            tokens = self.burst
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        buckets[host] = (tokens, now)
        self._forget_oldest(now)
        return allowed

    def _forget_oldest(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(2):  # two per call: the table shrinks while it is used
            oldest = next(iter(buckets))
            tokens, then = buckets[oldest]
            if len(buckets) > self._max_tracked or \
                    tokens + (now - then) * self.rate >= self.burst:
                del buckets[oldest]
                if not buckets:
                    return
            else:
                return


class ConnectionLimits:
    """
    Decide whether a new connection from C{host} may be served, and keep
    count of what is open.

    @ivar open: connections admitted and not yet released.
    """

    def __init__(self, max_connections: int = 10000, max_per_ip: int = 0,
                 rate: TokenBuckets | None = None) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.rate = rate
        self.open = 0
        # address_key(host) -> open connections; only those with some.
        self.per_ip: dict[str, int] = {}
        # Whether a connection's address matters to admitting it.
        self.by_address = bool(max_per_ip) or rate is not None

    def admit(self, host: str | None) -> str | None:
        """
        Count a new connection in, or say which limit refuses it (one of
        L{MAX_CONNECTIONS}, L{MAX_PER_IP}, L{RATE_PER_IP}).  C{host} is
        L{None} for connections without an address (UNIX sockets), which
        only the total limit applies to.
        """
        refused = self.reserve()
        if refused is None and host is not None:
            refused = self.admit_address(host)
            if refused is not None:
                self.open -= 1
        return refused

    def reserve(self) -> str | None:
        """
        Count a connection in under the total limit only, before its client
        is known (a PROXY header still to come); L{admit_address} follows,
        or L{cancel}.
        """
        if self.open >= self.max_connections:
            return MAX_CONNECTIONS
        self.open += 1
        return None

    def admit_address(self, host: str) -> str | None:
        """Count a reserved connection in under the per-address limits."""
        if self.by_address:
            key = address_key(host)
            if self.max_per_ip and self.per_ip.get(key, 0) >= self.max_per_ip:
                return MAX_PER_IP
            if self.rate is not None and not self.rate.take(key):
                return RATE_PER_IP
            self.per_ip[key] = self.per_ip.get(key, 0) + 1
        return None

    def cancel(self) -> None:
        """Give back a reservation whose connection never got an address."""
        self.open -= 1

    def release(self, host: str | None) -> None:
        """Count a connection admitted for C{host} out again."""
        self.open -= 1
        if self.by_address and host is not None:
            key = address_key(host)
            left = self.per_ip[key] - 1
            if left:
                self.per_ip[key] = left
            else:
                del self.per_ip[key]


def address_key(host: str) -> str:
    """
    The addresses that count as one client: an IPv4 address, or an IPv6
    /64 (a host is given a whole /64 and may use any address in it, so
    keying on the address alone would let it walk around the limits).
    """
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"
