"""
From measurements to the report: medians over rounds, ratios to the
reference server at the same concurrency, the table and the JSON document.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.loadgen import ERROR_KINDS, Measurement

# (key, table heading); every one is a median over the rounds.
FIGURES = (
    ("greetings_per_s", "greetings/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("cpu_us_per_greeting", "CPU us/greeting"),
)


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

    def medians(self) -> dict[str, float | None]:
        figures = [sample.figures() for sample in self.samples]
        medians: dict[str, float | None] = {}
        for key, _ in FIGURES:
            values = [f[key] for f in figures if f[key] is not None]
            medians[key] = statistics.median(values) if values else None
        return medians

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

    def ratios(self, row: Row) -> dict[str, float | None]:
        """Each median of C{row} over the reference server's, at the same concurrency."""
        reference = next((r for r in self.rows if r.server == self.reference
                          and r.concurrency == row.concurrency), None)
        base = reference.medians() if reference else {}
        return {key: (value / base[key] if value is not None and base.get(key) else None)
                for key, value in row.medians().items()}

    def to_json(self) -> dict[str, object]:
        return {
            "settings": self.settings, "context": self.context, "reference": self.reference,
            "servers": self.legend, "skipped": self.skipped,
            "results": [{
                "server": row.server, "concurrency": row.concurrency,
                "median": row.medians(), "ratio": self.ratios(row),
                "errors": row.errors(),
                "rounds": [{
                    "round": s.round, "greeted": s.measurement.greeted,
                    "seconds": s.measurement.seconds,
                    "abandoned": s.measurement.abandoned,
                    "errors": s.measurement.errors, "server_cpu_seconds": s.cpu_seconds,
                    **s.figures()} for s in row.samples],
            } for row in self.rows],
        }

    def to_text(self) -> str:
        lines = [
            f"tcpgreet benchmark: medians of {self.settings['rounds']} round(s) of "
            f"{self.settings['duration']} s per server and concurrency, after "
            f"{self.settings['warmup']} s of warm-up",
            *(f"{key}: {value}" for key, value in self.context.items()),
            (f"(x): the figure over {self.reference}'s at the same concurrency"
             if any(row.server == self.reference for row in self.rows)
             else f"no ratios: {self.reference} was not measured")
            + "; errors are summed over rounds",
            "",
        ]
        lines += _align(self._table())
        lines += self._error_details()
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
            medians, ratios = row.medians(), self.ratios(row)
            cells = [f"{_FORMATS[key](medians[key])} {_ratio(ratios[key])}"
                     if medians[key] is not None else "-" for key, _ in FIGURES]
            table.append([str(row.concurrency), row.server, *cells[:4],
                          str(sum(row.errors().values())), cells[4]])
        return table

    def _error_details(self) -> list[str]:
        details = []
        for row in self.rows:
            errors = {kind: n for kind, n in row.errors().items() if n}
            if errors:
                kinds = ", ".join(f"{n} {kind}" for kind, n in errors.items())
                details.append(f"  {row.server} at C={row.concurrency}: {kinds}")
        return ["", "errors:", *details] if details else []


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


def _align(table: list[list[str]]) -> list[str]:
    """Server names to the left, numbers to the right, two spaces between."""
    widths = [max(len(row[i]) for row in table if row) for i in range(len(table[0]))]
    lines = []
    for row in table:
        if not row:
            lines.append("")
            continue
        cells = [cell.ljust(width) if i == 1 else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines
