"""
One benchmark run: rounds of every server at every concurrency, interleaved.

Absolute figures on a shared machine swing from one minute to the next, so
each round measures every server once, one after another (in an order that
rotates from round to round), and the report takes medians over rounds.  A
server is started fresh for each round and stopped before the next one
starts: only one server runs at a time.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import BenchError, coldstart, cpus, held, loadgen, procfs, servers
from bench.report import Report, Row, Sample

# The signals that end a run; see bench.cli.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@dataclass(frozen=True)
class Settings:
    duration: float = 5.0
    warmup: float = 1.0
    rounds: int = 3
    concurrency: tuple[int, ...] = (1, 50, 200)
    servers: tuple[str, ...] = tuple(servers.VARIANTS)
    workers: str | None = None
    loadgen: str = "auto"  # "auto", "c" or "python"
    normal_close: bool = False
    timeout_ms: int = 5000  # per connection, connect to EOF
    cold_start: int = 10  # pairs of runs; see bench.coldstart


def run(settings: Settings, progress: Callable[[str], object]) -> Report:
    """Measure, reporting progress in lines through C{progress}."""
    with tempfile.TemporaryDirectory(prefix="tcpgreet-bench-") as scratch_name:
        scratch = Path(scratch_name)
        generator = loadgen.choose(settings.loadgen, scratch, progress)
        greetserver, no_greetserver = (loadgen.build_greetserver(scratch)
                                       if "c-epoll" in settings.servers else (None, None))
        if no_greetserver:
            progress(f"c-epoll skipped: {no_greetserver}")
        placement = cpus.plan(_server_processes(settings.workers))
        # This process sleeps while a measurement runs, but it starts the
        # load generator and reads /proc: keep it off the server's CPU.
        placement.pin_load()
        progress(f"load generator: {generator.description}")
        progress(f"CPUs: {placement.note}")
        launch = servers.Launch(twistd=None, python=sys.executable, scratch=scratch,
                                workers=settings.workers, take_port=servers.Ports().take,
                                greetserver=greetserver)
        variants, skipped, launch = _select(settings, scratch, launch)
        samples: list[Sample] = []
        for round_number in range(1, settings.rounds + 1):
            shift = (round_number - 1) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                with _running(variant, launch, placement) as server:
                    for concurrency in settings.concurrency:
                        sample = _measure(server, concurrency, round_number, generator,
                                          placement, settings)
                        samples.append(sample)
                        progress(_progress_line(sample, settings.rounds))
        cold_start = None
        if settings.cold_start:
            progress(f"cold start: {settings.cold_start} paired runs")
            cold_start = coldstart.measure(sys.executable, settings.cold_start, scratch)
        return Report(
            rows=_rows(samples, settings, variants), reference=servers.REFERENCE,
            cold_start=cold_start,
            settings=asdict(settings),
            context={**_context(sys.executable, scratch),
                     "load generator": generator.description, "CPUs": placement.note},
            legend={v.name: v.summary for v in variants}, skipped=skipped)


def run_held(connections: int, progress: Callable[[str], object]) -> dict[str, object]:
    """L{held.measure} on a fresh tcpgreet, in a scratch directory of its own."""
    with tempfile.TemporaryDirectory(prefix="tcpgreet-bench-") as scratch_name:
        launch = servers.Launch(twistd=servers.find_twistd(), python=sys.executable,
                                scratch=Path(scratch_name), workers=None,
                                take_port=servers.Ports().take)
        placement = cpus.plan(1)
        placement.pin_load()
        result = held.measure(launch, connections, placement, progress)
        return {**result, **_context(sys.executable, launch.scratch)}


def _select(settings: Settings, scratch: Path, launch: servers.Launch
            ) -> tuple[list[servers.Variant], dict[str, str], servers.Launch]:
    """The variants to measure, those skipped and why, and the launch with twistd."""
    chosen = [variant for name, variant in servers.VARIANTS.items()
              if name in settings.servers]  # always in the same order, for the table
    twistd = None
    skipped: dict[str, str] = {}
    for variant in chosen:
        why = variant.unavailable(launch) if variant.unavailable is not None else None
        if why is not None:
            skipped[variant.name] = why
    if any(variant.is_tcpgreet for variant in chosen):
        twistd = servers.find_twistd()
        offered = servers.tcpgreet_options(twistd, scratch)
        if settings.workers is not None and "--workers" not in offered:
            raise BenchError("--workers was given, but this tcpgreet has no --workers option")
        for variant in chosen:
            if variant.needs_option and variant.needs_option not in offered:
                skipped[variant.name] = f"this tcpgreet has no {variant.needs_option} option"
    variants = [variant for variant in chosen if variant.name not in skipped]
    if not variants:
        raise BenchError("no server left to measure")
    return variants, skipped, dataclasses.replace(launch, twistd=twistd)


def _server_processes(workers: str | None) -> int | None:
    if workers is None:
        return 1
    return None if workers == "auto" else int(workers)


@contextmanager
def _running(variant: servers.Variant, launch: servers.Launch,
             placement: cpus.Placement) -> Iterator[servers.Server]:
    server = servers.start(variant, launch, placement)
    try:
        yield server
    finally:
        # A second Ctrl-C (or SIGTERM) must not cut the clean-up short and
        # leave the server running in its own session: it waits until then.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            server.stop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _measure(server: servers.Server, concurrency: int, round_number: int,
             generator: loadgen.LoadGenerator, placement: cpus.Placement,
             settings: Settings) -> Sample:
    def load(seconds: float) -> loadgen.Measurement:
        return generator.run(server.port, concurrency, seconds, expected=servers.GREETING,
                             placement=placement, timeout_ms=settings.timeout_ms,
                             normal_close=settings.normal_close)

    if settings.warmup > 0:
        load(settings.warmup)
    # The warm-up is a run of its own, so the CPU window below holds the
    # measured run exactly, not a warm-up with a different cost.
    before = procfs.tree_cpu_seconds(server.pid)
    measurement = load(settings.duration)
    cpu_seconds = procfs.tree_cpu_seconds(server.pid) - before
    server.check_running()
    server.remove_rotated_logs()
    return Sample(round_number, server.variant.name, concurrency, measurement, cpu_seconds)


def _progress_line(sample: Sample, rounds: int) -> str:
    figures = sample.figures()
    cpu = figures["cpu_us_per_greeting"]
    errors = sample.measurement.error_total
    return (f"round {sample.round}/{rounds}  {sample.server:<16} C={sample.concurrency:<4} "
            f"{figures['greetings_per_s']:>9,.0f} greetings/s  "
            f"{'-' if cpu is None else f'{cpu:.1f}'} us CPU/greeting  "
            f"p99 {figures['p99_ms']:.2f} ms  {errors} error{'' if errors == 1 else 's'}")


def _rows(samples: list[Sample], settings: Settings,
          variants: list[servers.Variant]) -> list[Row]:
    rows = {(v.name, c): Row(v.name, c) for c in settings.concurrency for v in variants}
    for sample in samples:
        rows[sample.server, sample.concurrency].samples.append(sample)
    return list(rows.values())


def _context(python: str, scratch: Path) -> dict[str, str]:
    """Software and machine, so a table can be reproduced and compared."""
    versions = subprocess.run(
        [python, "-c", "import platform, twisted\n"
         "try:\n    import tcpgreet; v = tcpgreet.__version__\n"
         "except ImportError:\n    v = 'not installed'\n"
         "print(f'tcpgreet {v}, Twisted {twisted.__version__}, "
         "{platform.python_implementation()} {platform.python_version()}')"],
        capture_output=True, text=True, timeout=60, cwd=scratch, stdin=subprocess.DEVNULL)
    software = versions.stdout.strip() or versions.stderr.strip()[-200:]
    return {"software": software,
            "machine": f"{_cpu_model()} x{os.cpu_count()}, {platform.system()} "
                       f"{platform.release()}"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"
