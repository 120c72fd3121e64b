"""
How the probe client shows its results, in one of four forms: the banner
itself (the tutorial's client), a line per probe with a summary like ping's,
JSON Lines, or the one-line monitoring-plugin form with performance data.

What a server sends is shown escaped, so a hostile server cannot drive the
user's terminal, unless C{--raw} asks for the bytes as they came.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import IO, Any, BinaryIO

from tcpgreet.client.outcome import (
    STATE_NAMES,
    Checks,
    ProbeResult,
    RunningStats,
    Summary,
    Verdict,
)


def render_banner(data: bytes) -> str:
    """
    The banner as text for a terminal: CRLF line endings become newlines,
    invalid UTF-8 and every control character but tab and newline are shown
    as escapes.
    """
    return _escape(data.replace(b"\r\n", b"\n").decode("utf-8", "backslashreplace"), "\t\n")


def render_line(data: bytes, raw: bool = False) -> str:
    """The first line of C{data}, for a report that is one line per probe."""
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if raw:
        return line.decode("utf-8", "surrogateescape")
    return _escape(line.decode("utf-8", "backslashreplace"), "\t")


def _escape(text: str, keep: str) -> str:
    return "".join(c if c.isprintable() or c in keep else _escape_character(c) for c in text)


def _escape_character(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def iso_time(epoch: float) -> str:
    """UTC, ISO 8601, to the millisecond: sortable and unambiguous in logs."""
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def percent(value: float) -> str:
    """C{0}, C{40}, C{33.3}: as short as it can be without lying."""
    return f"{value:.1f}".removesuffix(".0")


def target(host: str, port: int | None, address: str | None = None) -> str:
    """
    C{localhost port 27679 (127.0.0.1)}: the name as given, the address that
    answered; a UNIX socket as given, C{unix:/run/greet.sock}.
    """
    if port is None:
        return host
    where = f"{host} port {port}"
    return f"{where} ({address})" if address and address != host else where


def problem(verdict: Verdict) -> str | None:
    """
    Why a probe is not OK, naming the stage that failed (C{failed at
    connect: connection refused}); C{None} when there is nothing to say.
    """
    text = verdict.reason or verdict.error
    if text and not verdict.ok and verdict.stage:
        return f"failed at {verdict.stage}: {text}"
    return text


def culprit(result: ProbeResult) -> str:
    """What a failure is about: the name alone when it did not resolve, else the target."""
    return result.host if result.name_failed else target(result.host, result.port)


class Output:
    """
    A binary stream that writes text as UTF-8 (raw banner bytes, decoded
    with C{surrogateescape}, come out unchanged) and flushes every line, so
    a reader sees each probe as it happens.  When the reader goes away
    (C{| head -1}) it stops quietly instead of raising at every write and
    again when Python exits.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.closed = False

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text.encode("utf-8", "surrogateescape"))
            self.stream.flush()
        except BrokenPipeError:
            self.closed = True
            discard_the_rest(self.stream)


def discard_the_rest(stream: IO[Any]) -> None:
    """
    Point C{stream} at /dev/null once its reader has gone, so that Python's
    flush at exit does not complain about the broken pipe.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class Report:
    """
    Where results go: L{probe} is called after each probe, L{finish} once at
    the end (also after an interruption).  Subclasses choose the form.
    """

    def __init__(self, out: BinaryIO, err: BinaryIO, *, raw: bool = False,
                 timestamps: bool = False) -> None:
        self.out = Output(out)
        self.err = Output(err)
        self.raw = raw
        self.timestamps = timestamps

    @property
    def closed(self) -> bool:
        """Whether the reader of the results has gone away."""
        return self.out.closed

    def probe(self, seq: int, result: ProbeResult, verdict: Verdict) -> None:
        """Report one probe."""

    def finish(self, summary: Summary, interrupted: bool) -> None:
        """Report the end of the run (of one target's probes, in a fleet)."""

    def fleet(self, targets: int, states: dict[str, int]) -> None:
        """Report the end of a fleet: C{targets} probed, how many ended in each state."""

    def line(self, data: bytes) -> str:
        return render_line(data, self.raw)


class BannerReport(Report):
    """
    The tutorial's client: what the server sent on standard output, and a
    problem, if any, as one line on standard error naming the target (and,
    with C{addresses}, for C{--all-addresses}, the address).
    """

    def __init__(self, out: BinaryIO, err: BinaryIO, *, raw: bool = False,
                 timestamps: bool = False, addresses: bool = False) -> None:
        super().__init__(out, err, raw=raw, timestamps=timestamps)
        self.addresses = addresses

    def probe(self, seq: int, result: ProbeResult, verdict: Verdict) -> None:
        where = culprit(result)
        if self.addresses and not result.name_failed:
            where = target(result.host, result.port, result.address)
        if result.banner:  # also what came before a timeout or a reset
            self.out.write(self._banner(result.banner))
        said = problem(verdict)
        if said and result.error is None and not verdict.ok:
            said += f': got "{self.line(result.banner or b"")}"'
        if said:
            self.err.write(f"tcpgreet-client: {where}: {said}\n")
        if result.truncated:
            self.err.write(f"tcpgreet-client: {where}: banner truncated at "
                           f"{len(result.banner or b'')} bytes (--max-bytes)\n")

    def _banner(self, data: bytes) -> str:
        if self.raw:
            return data.decode("utf-8", "surrogateescape")
        text = render_banner(data)
        return text if not text or text.endswith("\n") else text + "\n"

    def finish(self, summary: Summary, interrupted: bool) -> None:
        if interrupted and not summary.probes:
            self.err.write(f"tcpgreet-client: {target(summary.host, summary.port)}: "
                           "interrupted\n")


class LinesReport(Report):
    """
    A line per probe and, at the end of each target's probes, a summary
    like ping's (unless C{summaries} is false: a fleet probed once each).
    """

    def __init__(self, out: BinaryIO, err: BinaryIO, *, raw: bool = False,
                 timestamps: bool = False, summaries: bool = True) -> None:
        super().__init__(out, err, raw=raw, timestamps=timestamps)
        self.summaries = summaries

    def probe(self, seq: int, result: ProbeResult, verdict: Verdict) -> None:
        stamp = f"[{iso_time(result.started)}] " if self.timestamps else ""
        where = target(result.host, result.port, result.address)
        self.out.write(f"{stamp}{where} seq={seq}: {STATE_NAMES[verdict.state]} "
                       f"{self._details(result, verdict)}\n")

    def _details(self, result: ProbeResult, verdict: Verdict) -> str:
        if result.error is not None and not result.banner:
            return f"{problem(verdict)} after {milliseconds(result.total)}"
        # A banner, or what came of one before a timeout or a reset.
        banner = result.banner or b""
        times = []
        if result.resolve is not None:
            times.append(f"dns {milliseconds(result.resolve)}")
        times.append(f"connect {milliseconds(result.connect or 0.0)}")
        if result.handshake is not None:
            times.append(f"TLS {milliseconds(result.handshake)}")
        if result.first_byte is not None:
            times.append(f"first byte {milliseconds(result.first_byte)}")
        times.append(f"total {milliseconds(result.total)}")
        times.append(f"{len(banner)} bytes" + (" (truncated)" if result.truncated else ""))
        details = ", ".join(times)
        said = problem(verdict)
        if said:
            details += f"; {said}"
        return details + (f": {self.line(banner)}" if banner else "")

    def finish(self, summary: Summary, interrupted: bool) -> None:
        if not self.summaries and not interrupted:
            return
        lines = [
            "",
            f"--- {target(summary.host, summary.port)} probe statistics ---",
            _tally(summary),
        ]
        for address, tally in (summary.addresses or {}).items():
            lines.append(f"  {address or 'the name'}: {_tally(tally)}")
        for name, stats in (("dns", summary.dns), ("connect", summary.connect),
                            ("time", summary.time)):
            if stats.count:
                lines.append(f"{name} min/avg/max/mdev = {stats.min * 1000:.3f}/"
                             f"{stats.mean * 1000:.3f}/{stats.max * 1000:.3f}/"
                             f"{stats.stdev * 1000:.3f} ms")
        self.out.write("\n".join(lines) + "\n")


    def fleet(self, targets: int, states: dict[str, int]) -> None:
        counts = ", ".join(f"{number} {state}" for state, number in states.items())
        self.out.write(f"\n--- {targets} target{'' if targets == 1 else 's'}: {counts} ---\n")


def _tally(summary: Summary) -> str:
    return (f"{summary.probes} probe{'' if summary.probes == 1 else 's'}, "
            f"{summary.ok} ok, {summary.failed} failed, "
            f"{percent(summary.loss)}% loss, state {STATE_NAMES[summary.exit_status]}")


class JsonReport(Report):
    """One JSON object per probe and one for the summary: JSON Lines, nothing else."""

    def probe(self, seq: int, result: ProbeResult, verdict: Verdict) -> None:
        tls = result.tls
        self._write({
            "type": "probe",
            "seq": seq,
            "time": iso_time(result.started),
            "target": result.host,
            "port": result.port,
            "address": result.address,
            "tried": list(result.tried),
            "ok": verdict.ok,
            "state": STATE_NAMES[verdict.state],
            "error": verdict.error,
            "stage": verdict.stage,
            "reason": verdict.reason,
            "dns_ms": _ms(result.resolve),
            "connect_ms": _ms(result.connect),
            "tls_ms": _ms(result.handshake),
            "firstbyte_ms": _ms(result.first_byte),
            "time_ms": _ms(result.time),
            "total_ms": _ms(result.total),
            "bytes": len(result.banner or b""),
            "banner": (None if result.banner is None
                       else result.banner.decode("utf-8", "backslashreplace")),
            "truncated": result.truncated,
            "ended_by": result.ended_by,
            "tls_version": tls.version if tls else None,
            "tls_cipher": tls.cipher if tls else None,
            "cert_not_after": iso_time(tls.not_after.timestamp()) if tls else None,
            "cert_days_left": (round((tls.not_after.timestamp() - result.started) / 86400, 3)
                               if tls else None),
        })

    def finish(self, summary: Summary, interrupted: bool) -> None:
        state = summary.exit_status
        self._write({
            "type": "summary",
            "target": summary.host,
            "port": summary.port,
            "probes": summary.probes,
            "ok": summary.ok,
            "failed": summary.failed,
            "loss_pct": round(summary.loss, 3),
            "dns_ms": _stats(summary.dns),
            "connect_ms": _stats(summary.connect),
            "time_ms": _stats(summary.time),
            "total_ms": _stats(summary.total),
            "addresses": (None if summary.addresses is None else {
                address: {"probes": tally.probes, "ok": tally.ok, "failed": tally.failed,
                          "loss_pct": round(tally.loss, 3),
                          "state": STATE_NAMES[tally.exit_status]}
                for address, tally in summary.addresses.items()}),
            "state": STATE_NAMES[state],
            "exit_status": state,
            "interrupted": interrupted,
        })

    def _write(self, record: dict) -> None:
        # ensure_ascii: even a viewer that is a terminal gets no control or
        # bidirectional characters from a server's banner.
        self.out.write(json.dumps(record, ensure_ascii=True) + "\n")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _stats(stats: RunningStats) -> dict | None:
    if not stats.count:
        return None
    # mdev is ping's name for the population standard deviation: the same figure.
    return {"min": _ms(stats.min), "avg": _ms(stats.mean), "max": _ms(stats.max),
            "stdev": _ms(stats.stdev), "mdev": _ms(stats.stdev)}


class PluginReport(Report):
    """
    The monitoring-plugin line, as check_tcp prints it: C{TCP OK - 0.002
    second response time on HOST port PORT [banner]|time=0.002000s;W;C;0;TIMEOUT}.
    """

    def __init__(self, out: BinaryIO, err: BinaryIO, *, checks: Checks, timeout: float,
                 raw: bool = False, timestamps: bool = False) -> None:
        super().__init__(out, err, raw=raw, timestamps=timestamps)
        self.checks = checks
        self.timeout = timeout

    def finish(self, summary: Summary, interrupted: bool) -> None:
        state = summary.exit_status
        text = self._text(summary, target(summary.host, summary.port))
        # A "|" in a banner or a pattern would start the performance data.
        text = text.replace("|", "\\x7c")
        self.out.write(f"TCP {STATE_NAMES[state]} - {text}{self._performance(summary)}\n")

    def _text(self, summary: Summary, where: str) -> str:
        if summary.addresses and len(summary.addresses) > 1:
            # --all-addresses: each address in turn, for the name's one line.
            return "; ".join(self._text(tally, target(summary.host, summary.port, address))
                             for address, tally in summary.addresses.items())
        if summary.worst is None:
            return f"interrupted before a probe of {where} completed"
        result, verdict = summary.worst
        if summary.probes == 1 and result.name_failed:
            return f"{result.host}: {result.error}"
        if summary.probes == 1 and result.error is not None:
            received = f" [{self.line(result.banner)}]" if result.banner else ""
            return f"{result.error} on {where}{received}"
        if summary.probes == 1:
            text = f"{result.time:.3f} second response time on {where}"
        else:
            text = (f"{summary.ok} of {summary.probes} probes ok, "
                    f"{percent(summary.loss)}% loss")
            if summary.time.count:
                text += f", max {summary.time.max:.3f} second response time"
            text += f" on {where}"
        if result.banner and result.error is None:
            text += f" [{self.line(result.banner)}]"
        said = verdict.reason or verdict.error
        return f"{said}; {text}" if said else text

    def _performance(self, summary: Summary) -> str:
        """
        check_tcp's C{time=} (the slowest probe, without name resolution:
        what the thresholds judge), then each stage's slowest: C{dns=},
        C{connect=}, C{tls=}, C{firstbyte=}, where there is one.
        """
        if not summary.time.count and not summary.dns.count:
            return ""
        warning, critical = (f"{value:f}" if value is not None else ""
                             for value in (self.checks.warning, self.checks.critical))
        data = []
        if summary.time.count:
            data.append(f"time={summary.time.max:f}s;{warning};{critical};0.000000;"
                        f"{self.timeout:f}")
        for name, stats in (("dns", summary.dns), ("connect", summary.connect),
                            ("tls", summary.handshake), ("firstbyte", summary.first_byte)):
            if stats.count:
                data.append(f"{name}={stats.max:f}s;;;0.000000;{self.timeout:f}")
        if summary.probes > 1:
            data.append(f"loss={percent(summary.loss)}%;;;0;100")
        return "|" + " ".join(data)
