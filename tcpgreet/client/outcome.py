"""
What a probe's outcome means to monitoring: the facts of one probe
(L{ProbeResult}), what the user asks of it (L{Checks}), the state it earns
(L{judge}), and the running tally over many probes (L{Summary}).

Nothing here does I/O, so every rule is tested without a network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

# The monitoring-plugin states, which are also the exit statuses.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


@dataclass(frozen=True)
class TLSInfo:
    """What the TLS handshake established."""

    version: str
    cipher: str
    not_after: datetime


# Where a probe can fail, in the order a probe passes them: the name, the
# connection, the TLS handshake, reading the banner; then the checks of the
# banner that was read.
RESOLVE, CONNECT, TLS, READ = "resolve", "connect", "tls", "read"
REJECT, EXPECT = "reject", "expect"


@dataclass(frozen=True)
class ProbeResult:
    """
    The facts of one probe, in seconds.  C{started} is since the epoch;
    C{total} runs from there (name resolution included) to the end of the
    banner (its last byte, when silence ended it); C{resolve} is the time
    the name took (C{None} when the target is an address or a UNIX
    socket); C{connect}, C{handshake} (TLS) and C{first_byte} run from the
    start of the connection attempt to the address that answered.
    C{ended_by} says what ended the banner: the server closing
    (C{"close"}), its silence (C{"idle"}), the first newline
    (C{"newline"}) or C{--max-bytes}.  C{error} is set when no banner could
    be read, and C{stage} then says where it failed; C{banner} may then
    hold what came before.  C{refused} and C{empty} (closed without a byte)
    mark the failures that have a state of their own; no address C{tried}
    means the name was the problem.
    """

    host: str
    port: int | None  # None for a UNIX socket, whose path is the host
    started: float
    total: float
    address: str | None = None
    tried: tuple[str, ...] = ()
    resolve: float | None = None
    connect: float | None = None
    handshake: float | None = None
    first_byte: float | None = None
    tls: TLSInfo | None = None
    banner: bytes | None = None
    truncated: bool = False
    ended_by: str | None = None
    error: str | None = None
    stage: str | None = None
    refused: bool = False
    empty: bool = False

    @property
    def name_failed(self) -> bool:
        """Whether the probe failed before an address was tried: the name's fault."""
        return self.error is not None and not self.tried

    @property
    def time(self) -> float:
        """
        The probe without name resolution: what C{--warning} and
        C{--critical} judge, since a slow name service is not a slow server.
        """
        return self.total - (self.resolve or 0.0)

    @property
    def failed_at(self) -> str | None:
        """The stage where the probe failed, or C{None} if it read a banner."""
        if self.error is None:
            return None
        if self.stage is not None:
            return self.stage
        if self.name_failed:
            return RESOLVE
        return CONNECT if self.connect is None else READ


@dataclass(frozen=True)
class Checks:
    """
    What the user expects of every probe; C{None} or empty means "not
    checked".  Every C{expect} pattern must match the banner (one is
    enough with C{expect_any}); no C{reject} pattern may.
    """

    expect: tuple[re.Pattern[str], ...] = ()
    warning: float | None = None
    critical: float | None = None
    refused_state: int = CRITICAL
    empty_state: int = CRITICAL
    mismatch_state: int = CRITICAL
    cert_warning_days: float | None = None
    cert_critical_days: float | None = None
    reject: tuple[re.Pattern[str], ...] = ()
    expect_any: bool = False

    def __post_init__(self) -> None:
        # One pattern is a tuple of one; None is none.
        for name in ("expect", "reject"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, ())
            elif isinstance(value, re.Pattern):
                object.__setattr__(self, name, (value,))


@dataclass(frozen=True)
class Verdict:
    """
    The state a probe earns.  C{ok} is false when no banner was read (an
    empty one included), it matched C{--reject} or it did not match
    C{--expect} (C{error} says why, and C{stage} where), whatever state
    C{--refused-state} or C{--empty-state} chose; C{reason} says why the
    state is not OK, and is C{None} when it is.
    """

    state: int
    ok: bool
    error: str | None = None
    reason: str | None = None
    stage: str | None = None


def banner_text(banner: bytes) -> str:
    """
    The banner as C{--expect} sees it: UTF-8 with invalid bytes as C{\\xNN}
    escapes, CRLF as newline (so C{$} matches at a line's end).
    """
    return banner.replace(b"\r\n", b"\n").decode("utf-8", "backslashreplace")


def judge(result: ProbeResult, checks: Checks, now: float) -> Verdict:
    """The state C{result} earns under C{checks}, at time C{now}."""
    if result.error is not None:
        state = (checks.refused_state if result.refused else
                 checks.empty_state if result.empty else CRITICAL)
        return Verdict(state, False, result.error, result.error if state != OK else None,
                       result.failed_at)
    problems: list[tuple[int, str]] = []
    error = stage = None
    if checks.reject or checks.expect:
        text = banner_text(result.banner or b"")
        error, stage = _rejected(text, checks) or _unexpected(text, checks) or (None, None)
        if error is not None:
            problems.append((CRITICAL if stage == REJECT else checks.mismatch_state, error))
    problems.extend(_slowness(result.time, checks))
    if result.tls is not None:
        problems.extend(_expiry(result.tls.not_after, now, checks))
    state = max((state for state, _ in problems), default=OK)
    reasons = "; ".join(reason for state, reason in problems if state != OK)
    return Verdict(state, error is None, error, reasons or None, stage)


def _rejected(text: str, checks: Checks) -> tuple[str, str] | None:
    """A banner that says it is the wrong one (C{--reject '^5'}): checked first."""
    for pattern in checks.reject:
        if pattern.search(text):
            return f"banner matches --reject {pattern.pattern!r}", REJECT
    return None


def _unexpected(text: str, checks: Checks) -> tuple[str, str] | None:
    if not checks.expect:
        return None
    missed = [pattern for pattern in checks.expect if not pattern.search(text)]
    if not missed or (checks.expect_any and len(missed) < len(checks.expect)):
        return None
    if checks.expect_any and len(missed) > 1:
        patterns = ", ".join(repr(pattern.pattern) for pattern in missed)
        return f"banner matches none of {patterns}", EXPECT
    return f"banner does not match {missed[0].pattern!r}", EXPECT


def _slowness(time: float, checks: Checks) -> list[tuple[int, str]]:
    for state, limit, option in ((CRITICAL, checks.critical, "--critical"),
                                 (WARNING, checks.warning, "--warning")):
        if limit is not None and time > limit:
            return [(state, f"response time {time:.3f} s over {option} {limit:g} s")]
    return []


def _expiry(not_after: datetime, now: float, checks: Checks) -> list[tuple[int, str]]:
    days = (not_after.timestamp() - now) / 86400
    when = not_after.strftime("%Y-%m-%d %H:%M UTC")
    for state, limit in ((CRITICAL, checks.cert_critical_days),
                         (WARNING, checks.cert_warning_days)):
        if limit is not None and days <= limit:
            if days < 0:
                return [(state, f"certificate expired {-days:.1f} days ago ({when})")]
            return [(state, f"certificate expires in {days:.1f} days ({when})")]
    return []


def looks_like_tls(data: bytes) -> bool:
    """
    Whether C{data} starts as a TLS record does: a content type (20 to 24:
    change cipher spec, alert, handshake, application data, heartbeat), then
    version 3.x.  Of a shorter C{data}, whether it could.
    """
    return (bool(data) and 20 <= data[0] <= 24 and data[1:2] in (b"", b"\x03")
            and data[2:3] <= b"\x04")


def speaks_tls(banner: bytes) -> bool:
    """
    Whether a plain probe's C{banner} is a TLS alert or handshake record:
    a TLS server answering bytes it could not take for a handshake.
    """
    return len(banner) >= 3 and banner[0] in (21, 22) and looks_like_tls(banner)



class RunningStats:
    """
    Minimum, maximum, mean and (population, as ping's mdev) standard
    deviation in constant memory, by Welford's method: C{--count 0} may run
    for months.
    """

    def __init__(self) -> None:
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self._squares = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        delta = value - self.mean
        self.mean += delta / self.count
        self._squares += delta * (value - self.mean)

    @property
    def stdev(self) -> float:
        return math.sqrt(self._squares / self.count) if self.count else 0.0


class Summary:
    """
    The tally of a run of probes of one target.  The worst probe decides the
    state; C{worst} is the latest probe that earned it, for a one-line report.
    With C{by_address} (C{--all-addresses}) each address the name has keeps
    a tally of its own, and the name's state is the worst of theirs, or the
    best with C{best} (C{--any-address}).
    """

    def __init__(self, host: str, port: int | None, by_address: bool = False,
                 best: bool = False) -> None:
        self.host = host
        self.port = port
        self.probes = 0
        self.ok = 0
        self._state = OK
        self.dns = RunningStats()
        self.connect = RunningStats()
        self.handshake = RunningStats()
        self.first_byte = RunningStats()
        self.time = RunningStats()
        self.total = RunningStats()
        self.worst: tuple[ProbeResult, Verdict] | None = None
        self.addresses: dict[str, Summary] | None = {} if by_address else None
        self.best = best

    def add(self, result: ProbeResult, verdict: Verdict) -> None:
        self.probes += 1
        self.ok += verdict.ok
        if result.resolve is not None:
            self.dns.add(result.resolve)
        if result.connect is not None:
            self.connect.add(result.connect)
            self.time.add(result.time)
            self.total.add(result.total)
        if result.handshake is not None:
            self.handshake.add(result.handshake)
        if result.first_byte is not None:
            self.first_byte.add(result.first_byte)
        if self.worst is None or verdict.state >= self._state:
            self.worst = (result, verdict)
        self._state = max(self._state, verdict.state)
        if self.addresses is not None:
            address = result.address or ""  # "": the name itself failed
            if address not in self.addresses:
                self.addresses[address] = Summary(self.host, self.port)
            self.addresses[address].add(result, verdict)

    @property
    def state(self) -> int:
        if self.addresses:
            states = [summary.state for summary in self.addresses.values()]
            return min(states) if self.best else max(states)
        return self._state

    @property
    def failed(self) -> int:
        return self.probes - self.ok

    @property
    def loss(self) -> float:
        """Failed probes, in per cent."""
        return 100.0 * self.failed / self.probes if self.probes else 0.0

    @property
    def exit_status(self) -> int:
        """The state earned; UNKNOWN when not one probe completed."""
        return self.state if self.probes else UNKNOWN
