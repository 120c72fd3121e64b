"""
The command line: C{python -m bench [options]}, from the repository root.

Progress goes to standard error while it runs; the report (a table, or JSON
with C{--json -}) to standard output.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from bench import BenchError, held, runner, servers

DEFAULTS = runner.Settings()


def _positive(kind: type) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero: {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text}") from None
    if not values or not all(1 <= value <= 10000 for value in values):
        raise argparse.ArgumentTypeError(f"each must be from 1 to 10000: {text}")
    return values


def _server_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in servers.VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown server {', '.join(unknown) or text!r}; "
            f"choose from {', '.join(servers.VARIANTS)}")
    return names


def _workers(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"a number above zero or 'auto': {text}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure tcpgreet, as installed, against minimal Twisted and asyncio "
                    "greeting servers: greetings/s, connect-to-EOF latency, errors and "
                    "server CPU per greeting, as medians of interleaved rounds.",
        epilog="servers: " + "; ".join(f"{v.name} = {v.summary}"
                                       for v in servers.VARIANTS.values()))
    parser.add_argument("--duration", type=_positive(float), default=DEFAULTS.duration,
                        metavar="SECONDS", help="measured time per server and concurrency "
                        f"(default {DEFAULTS.duration:g})")
    parser.add_argument("--warmup", type=float, default=DEFAULTS.warmup, metavar="SECONDS",
                        help=f"load before each measurement, not measured "
                        f"(default {DEFAULTS.warmup:g})")
    parser.add_argument("--rounds", type=_positive(int), default=DEFAULTS.rounds,
                        help=f"rounds over all servers; the report takes medians "
                        f"(default {DEFAULTS.rounds})")
    parser.add_argument("--concurrency", type=_concurrency_list, metavar="C,C,...",
                        default=DEFAULTS.concurrency, help="connections kept in flight "
                        f"(default {','.join(map(str, DEFAULTS.concurrency))})")
    parser.add_argument("--servers", type=_server_list, metavar="NAME,...",
                        default=DEFAULTS.servers, help="servers to measure (default all: "
                        f"{','.join(DEFAULTS.servers)})")
    parser.add_argument("--workers", type=_workers, metavar="N",
                        help="pass --workers N to the tcpgreet servers")
    parser.add_argument("--loadgen", choices=("auto", "c", "python"), default="auto",
                        help="load generator: the C one, built with the system compiler, "
                        "or the less able Python one (default auto: C if it builds)")
    parser.add_argument("--normal-close", action="store_true",
                        help="clients close normally instead of with a reset; each "
                        "connection then leaves TIME_WAIT state on the server side")
    parser.add_argument("--cold-start", type=int, default=DEFAULTS.cold_start, metavar="PAIRS",
                        help="paired runs of one probe (python -m tcpgreet.client) and of "
                        "Twisted's import alone, after the table; 0: none "
                        f"(default {DEFAULTS.cold_start})")
    parser.add_argument("--held", type=_positive(int), metavar="N",
                        help="instead of the table: server memory per held connection, "
                        "with N clients that never read a 300 KB greeting (e.g. 9000)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON to PATH ('-': to standard "
                        "output, instead of the table)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup: must not be negative")
    if args.cold_start < 0:
        parser.error("--cold-start: must not be negative")
    return args


def _stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _held(args: argparse.Namespace, progress: Callable[[str], object]) -> int:
    result = runner.run_held(args.held, progress)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(held.text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = runner.Settings(
        duration=args.duration, warmup=args.warmup, rounds=args.rounds,
        concurrency=args.concurrency, servers=args.servers, workers=args.workers,
        loadgen=args.loadgen, normal_close=args.normal_close, cold_start=args.cold_start)
    # SIGTERM and a closed terminal stop the run the way Ctrl-C does: every
    # process it started is stopped on the way out.
    for signum in runner.STOP_SIGNALS - {signal.SIGINT}:
        signal.signal(signum, _stop_on_signal)

    def progress(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    try:
        if args.held is not None:
            return _held(args, progress)
        report = runner.run(settings, progress)
    except KeyboardInterrupt:
        progress("interrupted; the servers it started are stopped")
        return 130
    except BenchError as e:
        progress(str(e))
        return 1
    if args.json == "-":
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(report.to_text())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as e:
            progress(f"cannot write {args.json}: {e.strerror}")
            return 1
    return 0
