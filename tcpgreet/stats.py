"""
What the server counts: plain integers on the factory, cheap enough to keep
on the hot path whether or not anybody reads them; the metrics endpoint reads
them when it is scraped.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds, in seconds, of the greeting-duration histogram: from a
# greeting written within the accept pass to one a slow reader drags out.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-on-read histogram: C{counts[i]} is observations in bucket i."""

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        """Add the observations of C{other}, a histogram with the same bounds."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets do not add up")
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts,
                                                              strict=True)]
        self.sum += other.sum


class Stats:
    """
    Connection counters of one server process.

    @ivar accepted: connections admitted (past every limit).
    @ivar greeted: connections whose greeting was written whole.
    @ivar rejected: refused connections, by reason: a limit, a missing or bad
        PROXY header, a PROXY listener's client outside --trusted-proxy.
    @ivar aborted: connections cut short by the server, by reason.
    @ivar lost: connections the client ended before its greeting was written.
    @ivar bytes_sent: greeting bytes written to greeted connections.
    @ivar durations: seconds from accept to close of greeted connections.
    """

    # The plain counters, as opposed to the tables by reason and the histogram.
    COUNTERS = ("accepted", "greeted", "lost", "bytes_sent", "reloads", "reload_failures")

    def __init__(self) -> None:
        self.accepted = 0
        self.greeted = 0
        self.rejected: dict[str, int] = {}
        self.aborted: dict[str, int] = {}
        self.lost = 0
        self.bytes_sent = 0
        self.durations = Histogram()
        self.reloads = 0
        self.reload_failures = 0

    def count(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1

    def add(self, other: Stats) -> None:
        """Add the counts of C{other}: the totals of several processes."""
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.rejected, other.rejected), (self.aborted, other.aborted)):
            for reason, count in theirs.items():
                mine[reason] = mine.get(reason, 0) + count
        self.durations.add(other.durations)


def total(parts: list[Stats]) -> Stats:
    """The sum of C{parts}, as a new L{Stats}."""
    summed = Stats()
    for part in parts:
        summed.add(part)
    return summed
