"""
What a probe costs the client: C{python -m bench.probecost}, from the
repository root, with tcpgreet installed.

A probe started cold pays for Python and Twisted starting up; a probe in
a fleet (one C{--targets-file}, one process) pays only for itself.  This
measures both as the client's user + system CPU time, against one
tcpgreet server on loopback, beside the floor a cold start cannot go
under: C{python -c "from twisted.internet import reactor, protocol"}.
Medians of interleaved runs, after one run of each that is not measured,
with Python free to cache bytecode, as in a client installed by pip (with
PYTHONDONTWRITEBYTECODE set, an editable install compiles tcpgreet's
modules again at every start, and measures that).  The figures are CPU,
not wall time, so they hold up on a busy machine better than timings would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BenchError

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
LISTENING = re.compile(r"listening on .*?\(127\.0\.0\.1:(\d+)\)")
TWISTED_FLOOR = "from twisted.internet import reactor, protocol"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


ENVIRONMENT = {name: value for name, value in os.environ.items()
               if name != "PYTHONDONTWRITEBYTECODE"}


def cpu_of(command: list[str]) -> float:
    """The CPU seconds C{command} takes, run to its end; it must succeed."""
    before = _children_cpu()
    result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL,
                            timeout=300, cwd=tempfile.gettempdir(), env=ENVIRONMENT)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command[:6])} ... exited {result.returncode}: "
                         f"{result.stderr.decode(errors='replace').strip()[-300:]}")
    return _children_cpu() - before


def start_server(python: str) -> tuple[subprocess.Popen, int]:
    twistd = str(Path(python).with_name("twistd"))
    server = subprocess.Popen(
        [twistd if os.path.exists(twistd) else "twistd", "-n", "--pidfile=", "tcpgreet",
         "--quiet", "--listen", f"tcp:0:interface={HOST}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        cwd=tempfile.gettempdir())
    for line in server.stdout:  # twistd logs to standard output; the port is in a line
        match = LISTENING.search(line)
        if match:
            return server, int(match.group(1))
    server.wait(START_TIMEOUT)
    raise BenchError(f"tcpgreet did not start (exit status {server.returncode})")


def measure(python: str, runs: int, targets: int) -> dict:
    server, port = start_server(python)
    try:
        client = [python, "-m", "tcpgreet.client"]
        floor, cold = [], []
        cpu_of([python, "-c", TWISTED_FLOOR])  # not measured: bytecode written, caches warm
        cpu_of([*client, HOST, str(port)])
        for _ in range(runs):  # interleaved, so a busy moment hurts both alike
            floor.append(cpu_of([python, "-c", TWISTED_FLOOR]))
            cold.append(cpu_of([*client, HOST, str(port)]))
        with tempfile.NamedTemporaryFile("w", suffix=".targets") as listing:
            listing.write(f"{HOST}:{port}\n" * targets)
            listing.flush()
            fleet = cpu_of([*client, "--plugin", "--targets-file", listing.name])
    finally:
        server.terminate()
        server.wait(START_TIMEOUT)
    return {"runs": runs, "targets": targets,
            "twisted_import_ms": statistics.median(floor) * 1000,
            "cold_probe_ms": statistics.median(cold) * 1000,
            "fleet_ms_per_probe": fleet / targets * 1000}


def table(figures: dict) -> str:
    floor = figures["twisted_import_ms"]
    rows = [
        (f"python -c '{TWISTED_FLOOR}'", floor),
        ("tcpgreet-client HOST PORT: one probe, cold", figures["cold_probe_ms"]),
        (f"tcpgreet-client --targets-file: {figures['targets']} probes, per probe",
         figures["fleet_ms_per_probe"]),
    ]
    lines = [f"client CPU (user + system), medians of {figures['runs']} cold starts",
             f"  {'what':<66} {'CPU ms':>9} {'(x)':>8}"]
    lines += [f"  {what:<66} {ms:>9.3f} {ms / floor:>7.4f}x" for what, ms in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.probecost",
        description="The client's CPU for one probe started cold and for a probe in a "
                    "fleet, beside the CPU of importing Twisted's reactor.")
    parser.add_argument("--runs", type=int, default=10, help="cold starts of each (default 10)")
    parser.add_argument("--targets", type=int, default=2000,
                        help="probes in the fleet run (default 2000)")
    parser.add_argument("--json", action="store_true", help="JSON instead of the table")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.targets < 1:
        parser.error("--runs and --targets must be 1 or more")
    try:
        figures = measure(sys.executable, args.runs, args.targets)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(figures) + "\n" if args.json else table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
