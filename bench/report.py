"""
From measurements to the report: medians over rounds, ratios to the
reference server at the same concurrency, the table and the JSON document.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.loadgen import ERROR_KINDS, Measurement

# (key, table heading): medians over the rounds, except max_ms, the slowest
# connection of any round, so that one stalled connect cannot hide.
FIGURES = (
    ("greetings_per_s", "greetings/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("cpu_us_per_greeting", "CPU us/greeting"),
)


# What tcpgreet aims for, as ratios of CPU per greeting measured in one run:
# (server, over server, at most).  The report says, at each concurrency,
# where each one stands.
TARGETS = (
    ("tcpgreet-as-typed", "tcpgreet-quiet", 1.25),
    ("tcpgreet-log", "tcpgreet-quiet", 1.25),
    ("tcpgreet-log-json", "tcpgreet-quiet", 1.4),
    ("tcpgreet-quiet", "c-epoll", 1.3),
    ("tcpgreet-quiet", "uvloop-minimal", 1.0),
)
# ... at these concurrencies (at C=1 every server mostly waits on the round trip).
TARGET_CONCURRENCY = (50, 200)


@dataclass(frozen=True)
class Sample:
    """One server at one concurrency in one round."""

    round: int
    server: str
    concurrency: int
    measurement: Measurement
    cpu_seconds: float  # the server's, over the measured run

    def figures(self) -> dict[str, float | None]:
        m = self.measurement
        return {
            "greetings_per_s": m.rate, "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
            "max_ms": m.max_ms,
            "cpu_us_per_greeting": (self.cpu_seconds * 1e6 / m.greeted if m.greeted
                                    else None),
        }


@dataclass
class Row:
    """One server at one concurrency, over every round."""

    server: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)

    def figures(self) -> dict[str, float | None]:
        """The table's figures: see L{FIGURES}."""
        per_round = [sample.figures() for sample in self.samples]
        figures: dict[str, float | None] = {}
        for key, _ in FIGURES:
            values = [f[key] for f in per_round if f[key] is not None]
            combine = max if key == "max_ms" else statistics.median
            figures[key] = combine(values) if values else None
        return figures

    def errors(self) -> dict[str, int]:
        """Errors by kind, summed over the rounds: any error at all matters."""
        return {kind: sum(s.measurement.errors[kind] for s in self.samples)
                for kind in ERROR_KINDS}


@dataclass(frozen=True)
class Report:
    """Everything a run found, and what it needs to say about how."""

    rows: list[Row]
    reference: str
    settings: dict[str, object]
    context: dict[str, str]  # software, machine, load generator, CPU placement
    legend: dict[str, str]  # server name -> what it is
    skipped: dict[str, str]  # server name -> why it was not measured
    cold_start: dict[str, object] | None = None  # see bench.coldstart

    def targets(self) -> list[dict[str, object]]:
        """Each of L{TARGETS} whose two servers were measured, at each concurrency."""
        cpu = {(row.server, row.concurrency): row.figures()["cpu_us_per_greeting"]
               for row in self.rows}
        found = []
        for concurrency in sorted({row.concurrency for row in self.rows}):
            if concurrency not in TARGET_CONCURRENCY:
                continue
            for server, over, most in TARGETS:
                mine, theirs = cpu.get((server, concurrency)), cpu.get((over, concurrency))
                if mine is None or not theirs:
                    continue
                ratio = mine / theirs
                found.append({"server": server, "over": over, "concurrency": concurrency,
                              "ratio": ratio, "at_most": most, "met": ratio <= most})
        return found

    def ratios(self, row: Row) -> dict[str, float | None]:
        """Each figure of C{row} over the reference server's, at the same concurrency."""
        reference = next((r for r in self.rows if r.server == self.reference
                          and r.concurrency == row.concurrency), None)
        base = reference.figures() if reference else {}
        return {key: (value / base[key] if value is not None and base.get(key) else None)
                for key, value in row.figures().items()}

    def to_json(self) -> dict[str, object]:
        return {
            "settings": self.settings, "context": self.context, "reference": self.reference,
            "servers": self.legend, "skipped": self.skipped,
            "targets": self.targets(), "cold_start": self.cold_start,
            "results": [{
                "server": row.server, "concurrency": row.concurrency,
                "figures": row.figures(), "ratio": self.ratios(row),
                "errors": row.errors(),
                "rounds": [{
                    "round": s.round, "greeted": s.measurement.greeted,
                    "seconds": s.measurement.seconds,
                    "abandoned": s.measurement.abandoned,
                    "errors": s.measurement.errors, "other_error": s.measurement.other_error,
                    "server_cpu_seconds": s.cpu_seconds,
                    **s.figures()} for s in row.samples],
            } for row in self.rows],
        }

    def to_text(self) -> str:
        lines = [
            f"tcpgreet benchmark: {_count(self.settings['rounds'], 'round')} of "
            f"{self.settings['duration']:g} s per server and concurrency, each after "
            f"{self.settings['warmup']:g} s of warm-up",
            *(f"{key}: {value}" for key, value in self.context.items()),
            "figures: medians over rounds, but max is the slowest connection of any "
            "round and errors are summed",
            (f"(x): the figure over {self.reference}'s at the same concurrency"
             if any(row.server == self.reference for row in self.rows)
             else f"no ratios: {self.reference} was not measured"),
            "",
        ]
        lines += _align(self._table())
        lines += self._error_details()
        lines += self._target_lines()
        if self.cold_start is not None:
            lines += ["", *_cold_start_lines(self.cold_start)]
        lines += ["", "servers:"]
        width = max(map(len, [*self.legend, *self.skipped]), default=0)
        lines += [f"  {name:<{width}}  {text}" for name, text in self.legend.items()]
        lines += [f"  {name:<{width}}  skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines) + "\n"

    def _table(self) -> list[list[str]]:
        table = [["C", "server", *(heading for _, heading in FIGURES[:4]), "errors",
                  FIGURES[4][1]]]
        previous = None
        for row in sorted(self.rows, key=lambda r: r.concurrency):
            if previous is not None and row.concurrency != previous:
                table.append([])
            previous = row.concurrency
            figures, ratios = row.figures(), self.ratios(row)
            cells = [f"{_FORMATS[key](figures[key])} {_ratio(ratios[key])}"
                     if figures[key] is not None else "-" for key, _ in FIGURES]
            table.append([str(row.concurrency), row.server, *cells[:4],
                          str(sum(row.errors().values())), cells[4]])
        return table

    def _error_details(self) -> list[str]:
        details = []
        for row in self.rows:
            errors = {kind: n for kind, n in row.errors().items() if n}
            if errors:
                what = {s.measurement.other_error for s in row.samples} - {None}
                kinds = ", ".join(
                    f"{n} {kind}" + (f" ({'; '.join(sorted(what))})"
                                     if kind == "other" and what else "")
                    for kind, n in errors.items())
                details.append(f"  {row.server} at C={row.concurrency}: {kinds}")
        return ["", "errors:", *details] if details else []


    def _target_lines(self) -> list[str]:
        targets = self.targets()
        if not targets:
            return []
        rows = _align([[f"C={t['concurrency']}", f"{t['server']} / {t['over']}",
                        f"{t['ratio']:.2f}x", f"at most {t['at_most']:.2f}x",
                        "met" if t["met"] else "NOT MET"] for t in targets],
                      left=(1, 4))
        return ["", "targets (CPU us/greeting of one server over another's, this run):",
                *("  " + line for line in rows)]


def _cold_start_lines(cold: dict) -> list[str]:
    return [
        f"cold start ({cold['pairs']} paired runs, medians of wall time):",
        f"  {cold['probe_command']}: {cold['probe_ms']:.0f} ms",
        f"  {cold['twisted_command']}: {cold['twisted_ms']:.0f} ms",
        f"  the probe over Twisted's import alone: {cold['ratio']:.2f}x "
        f"(at most {cold['at_most']:.2f}x: {'met' if cold['met'] else 'NOT MET'})",
    ]


def _count(number: object, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _ms(value: float) -> str:
    """Three significant digits, enough for latency that varies run to run."""
    for limit, decimals in ((1, 3), (10, 2), (100, 1)):
        if value < limit:
            return f"{value:.{decimals}f}"
    return f"{value:.0f}"


_FORMATS = {
    "greetings_per_s": lambda value: f"{value:,.0f}",
    "p50_ms": _ms, "p99_ms": _ms, "max_ms": _ms,
    "cpu_us_per_greeting": lambda value: f"{value:.1f}",
}


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "  -  "


def _align(table: list[list[str]], left: tuple[int, ...] = (1,)) -> list[str]:
    """Server names to the left, numbers to the right, two spaces between."""
    widths = [max(len(row[i]) for row in table if row) for i in range(len(table[0]))]
    lines = []
    for row in table:
        if not row:
            lines.append("")
            continue
        cells = [cell.ljust(width) if i in left else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines
