"""
The connections a factory holds, each with its deadline, under one timer.

A reactor timer per connection (C{callLater}) costs some 500 bytes for as
long as the connection is held: the DelayedCall, its arguments and its
place in the reactor's heap.  But every connection of a factory waits the
same C{--timeout}, so they reach their deadlines in the order they were
given them: kept in insertion order (a dict), the first one is always the
next due, and one timer, set for the earliest deadline, does the work of
all of theirs.  A connection that finishes leaves at once (a dict deletion)
and so lets go of what it holds; one that gets a shorter delay (a lingering
close) joins the connections with that delay, in their own order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableSet
from operator import itemgetter
from typing import Generic, TypeVar, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

Item = TypeVar("Item")

_deadline = itemgetter(0)

# Removals that may pile up in the groups before they are rebuilt.
COMPACT_AFTER = 1024


class Deadlines(MutableSet[Item], Generic[Item]):
    """
    A set of connections in progress, some of them with a deadline.

    C{add} holds an item with no deadline of this set's; L{expire_after}
    gives it one, replacing any it had.  When an item's deadline passes,
    C{expire} is called with it, and the item stays in the set, without a
    deadline, until it is discarded: what C{expire} does to it (an abort)
    takes effect later, and whoever waits for the set to empty (a drain)
    waits for that too.

    Items that get the same delay are kept together, in the order they got
    it, so the first of each group is its earliest; there are as many
    groups as different delays (a factory has two: its timeout, and the
    linger after a greeting).  One reactor timer at a time is set, for the
    earliest deadline of all; it is not moved when the item it was set for
    leaves, only cancelled when no deadline is left.

    @ivar clock: the reactor that tells the time and keeps the timer.
    """

    def __init__(self, expire: Callable[[Item], object], clock: IReactorTime) -> None:
        self.clock = clock
        self._expire = expire
        self._undated: dict[Item, None] = {}
        # delay -> {item: deadline}, each in order of deadlines.
        self._groups: dict[float, dict[Item, float]] = {}
        self._dated = 0
        # Removals since the groups were last rebuilt: a dict keeps the
        # place of a deleted entry until it grows, and the earliest entry
        # is found by skipping every one deleted before it.
        self._removed = 0
        self._timer: IDelayedCall | None = None
        self._timer_for = 0.0  # the deadline the timer is set for

    # -- the set --------------------------------------------------------

    def __contains__(self, item: object) -> bool:
        if item in self._undated:
            return True
        return any(item in group for group in self._groups.values())

    def __len__(self) -> int:
        return len(self._undated) + self._dated

    def __bool__(self) -> bool:
        return bool(self._dated or self._undated)

    def __iter__(self) -> Iterator[Item]:
        # A copy: whoever iterates (a drain cutting every connection) makes
        # items leave on the way.
        items = list(self._undated)
        for group in self._groups.values():
            items.extend(group)
        return iter(items)

    def add(self, item: Item) -> None:
        """Hold C{item}; one that has a deadline keeps it."""
        if item not in self:
            self._undated[item] = None

    def discard(self, item: object) -> None:
        # Whoever is done with a connection may ask about any object.
        key = cast(Item, item)
        if self._undated.pop(key, _ABSENT) is not _ABSENT:
            return
        for group in self._groups.values():
            if group.pop(key, _ABSENT) is not _ABSENT:
                self._dated -= 1
                self._removed += 1
                if not self._dated:
                    self._no_deadlines()
                return

    # -- deadlines ------------------------------------------------------

    def expire_after(self, item: Item, delay: float) -> None:
        """
        Hold C{item} with a deadline C{delay} seconds from now, instead of
        the one it had, if any.
        """
        clock = self.clock
        self.discard(item)
        deadline = clock.seconds() + delay
        group = self._groups.get(delay)
        if group is None:
            group = self._groups[delay] = {}
        group[item] = deadline
        self._dated += 1
        timer = self._timer
        if timer is None:
            self._timer = clock.callLater(delay, self._fire)
            self._timer_for = deadline
        elif deadline < self._timer_for:
            timer.reset(delay)
            self._timer_for = deadline

    def deadline_of(self, item: Item) -> float | None:
        """When C{item} expires (in the clock's seconds), or L{None}: never."""
        for group in self._groups.values():
            deadline = group.get(item)
            if deadline is not None:
                return deadline
        return None

    def _fire(self) -> None:
        self._timer = None
        clock = self.clock
        # Everything due by the deadline the timer was set for is due, even
        # if the clock, rounding, says a hair less.
        now = max(clock.seconds(), self._timer_for)
        due: list[tuple[float, Item]] = []
        undated = self._undated
        for group in self._groups.values():
            first = len(due)
            for item, deadline in group.items():
                if deadline > now:
                    break
                due.append((deadline, item))
            for _, item in due[first:]:
                del group[item]
                undated[item] = None
        self._dated -= len(due)
        self._removed += len(due)
        due.sort(key=_deadline)
        try:
            for _, item in due:
                if item not in self._undated:
                    continue  # discarded by an earlier one's expiry
                try:
                    self._expire(item)
                except Exception:
                    log.failure("error ending {item!r} at its deadline", item=item)
        finally:
            self._rearm()

    def _rearm(self) -> None:
        """Set the timer for the earliest deadline left, if it is not already."""
        if self._removed > COMPACT_AFTER and self._removed > self._dated:
            # Rebuilt, the groups hold their entries and no more: the cost,
            # one copy of what is left, is paid by as many removals.
            self._groups = {delay: dict(group) for delay, group in self._groups.items()}
            self._removed = 0
        heads = [next(iter(group.values())) for group in self._groups.values() if group]
        if not heads:
            self._no_deadlines()
            return
        earliest = min(heads)
        clock = self.clock
        delay = max(0.0, earliest - clock.seconds())
        if self._timer is None:
            self._timer = clock.callLater(delay, self._fire)
            self._timer_for = earliest
        elif earliest < self._timer_for:
            self._timer.reset(delay)
            self._timer_for = earliest

    def _no_deadlines(self) -> None:
        """No deadline is left: no timer, and no groups full of holes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._groups = {}
        self._removed = 0


_ABSENT = object()
