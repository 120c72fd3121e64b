"""
Many targets in one process: the command-line targets and those of a
C{--targets-file}, each a L{ProbeRun} of its own (its C{--count} and
C{--interval}, its summary), at most C{--parallel} of them in flight on the
one reactor, each reported as it ends.

The targets are read as they are needed, so a file of 100,000 lines costs
no more memory than the probes in flight: the price of a fleet is the
probes under way, not the list.  Imported only when there are several
targets.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable, Iterator
from itertools import chain
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.python.failure import Failure

from tcpgreet.client.options import ClientOptions, Target
from tcpgreet.client.outcome import OK, STATE_NAMES, UNKNOWN
from tcpgreet.client.probe import ProbeRun, ProbeSettings
from tcpgreet.client.report import Report

if TYPE_CHECKING:
    from tcpgreet.client.probe import IProbeReactor

# Descriptors kept for what is not a probe: standard streams, the
# reactor's own, a targets file, the name service's files.
RESERVED_DESCRIPTORS = 64
# Resolving a name runs getaddrinfo in a thread; enough threads that
# names do not wait long for one another, few enough to stay cheap.
MOST_RESOLVER_THREADS = 32


class Fleet:
    """
    Probe the C{targets} (each a L{Target}, or a mistake in words to report
    and count as UNKNOWN), at most C{parallel} at once; C{start} makes the
    L{ProbeRun} of a target.  L{run} gives the worst exit status.
    """

    def __init__(self, targets: Iterator[Target | str], start: Callable[[Target], ProbeRun],
                 report: Report, parallel: int) -> None:
        self.targets = targets
        self.start = start
        self.report = report
        self.parallel = parallel
        self.worst = OK
        self.count = 0
        self.states = [0, 0, 0, 0]  # targets ended OK, WARNING, CRITICAL, UNKNOWN
        self.interrupted = False
        self._running: set[ProbeRun] = set()
        self._exhausted = False
        self._filling = False
        self._done: defer.Deferred[int] = defer.Deferred()

    def run(self) -> defer.Deferred[int]:
        self._fill()
        return self._done

    def _fill(self) -> None:
        """Start targets until C{parallel} are in flight or none is left."""
        if self._filling:  # a run that ended at once, from within the loop below
            return
        self._filling = True
        try:
            while (len(self._running) < self.parallel and not self.interrupted
                   and not self.report.closed):
                target = next(self.targets, None)
                if target is None:
                    self._exhausted = True
                    break
                self.count += 1
                if isinstance(target, str):
                    self.report.err.write(f"tcpgreet-client: {target}\n")
                    self._tally(UNKNOWN)
                    continue
                try:
                    probes = self.start(target)
                except ValueError as e:  # a host name TLS cannot use
                    self.report.err.write(f"tcpgreet-client: {target.host}: cannot use TLS: "
                                          f"{e}\n")
                    self._tally(UNKNOWN)
                    continue
                self._running.add(probes)
                defer.ensureDeferred(probes.run()).addBoth(self._ended, probes)
        finally:
            self._filling = False
        stopped = self._exhausted or self.interrupted or self.report.closed
        if stopped and not self._running and not self._done.called:
            self._done.callback(self.worst)

    def _ended(self, status: int | Failure, probes: ProbeRun) -> None:
        self._running.discard(probes)
        if isinstance(status, Failure):
            # A bug, not a result: say so, and let the other targets go on.
            self.report.err.write(f"tcpgreet-client: {probes.settings.host}: "
                                  f"{status.getErrorMessage()}\n")
            status = UNKNOWN
        self._tally(status)
        self._fill()

    def _tally(self, status: int) -> None:
        self.states[status] += 1
        self.worst = max(self.worst, status)

    def interrupt(self) -> defer.Deferred[int] | None:
        """
        Start no more targets and interrupt those in flight (each reports
        its summary); a Deferred that fires once all have.
        """
        if self._done.called:
            return None
        self.interrupted = True
        for probes in list(self._running):
            probes.interrupt()
        if not self._running and not self._done.called:
            self._done.callback(self.worst)
        return self._done


def allow_descriptors(parallel: int, per_probe: int, report: Report) -> int:
    """
    How many probes may be in flight: C{parallel}, once the soft limit on
    open files is raised as far as they need (up to the hard limit); if
    even the hard limit is too low, as many as it allows, and a line on
    standard error that says so.
    """
    need = parallel * per_probe + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need <= soft:
        return parallel
    raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if need <= soft:
        return parallel
    fits = max(1, (soft - RESERVED_DESCRIPTORS) // per_probe)
    report.err.write(f"tcpgreet-client: --parallel {parallel} needs {need} open files and "
                     f"the limit is {soft} (ulimit -n): probing {fits} at once\n")
    return fits


async def run_fleet(reactor: IProbeReactor, options: ClientOptions, report: Report,
                    settings_from: Callable[[ClientOptions, Target], ProbeSettings]) -> int:
    """Probe every target the options name; the worst exit status."""
    per_probe = 2 if options["all-addresses"] else 1
    parallel = allow_descriptors(options["parallel"], per_probe, report)
    reactor.suggestThreadPoolSize(min(parallel, MOST_RESOLVER_THREADS))

    def start(target: Target) -> ProbeRun:
        return ProbeRun(reactor, settings_from(options, target), options.checks, report,
                        options["count"], options["interval"])

    path = options["targets-file"]
    with contextlib.ExitStack() as files:
        targets: Iterator[Target | str] = iter(options.targets)
        if path is not None:
            lines = (sys.stdin if path == "-" else
                     files.enter_context(open(path, encoding="utf-8", errors="replace")))
            targets = chain(targets, options.targets_in(lines, "standard input" if path == "-"
                                                        else path))
        fleet = Fleet(targets, start, report, parallel)
        # Ctrl-C and SIGTERM stop the reactor; its shutdown waits for the summaries.
        reactor.addSystemEventTrigger("before", "shutdown", fleet.interrupt)
        worst = await fleet.run()
    if not fleet.count:
        report.err.write(f"tcpgreet-client: no targets in {path}\n")
        return UNKNOWN
    report.fleet(fleet.count, {STATE_NAMES[state]: number
                               for state, number in enumerate(fleet.states) if number})
    return worst
