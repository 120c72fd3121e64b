"""
The probe's cold start: the wall time of one C{python -m tcpgreet.client}
run against a greeting server, over the time Python takes to import the
part of Twisted any Twisted client needs.

A monitoring system starts the probe once per check, so its start-up is
most of what it costs; Twisted's import is the floor it cannot go below.
The two commands run in pairs, in alternating order, and the report takes
medians, so a machine that gets busier during the run slows both alike.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench import BenchError
from bench.servers import GREETING, HOST

TWISTED_IMPORT = "from twisted.internet import reactor, protocol"
# What the probe may cost over Twisted's import alone.
AT_MOST = 1.1


@contextlib.contextmanager
def _greeter() -> Iterator[int]:
    """A greeting server on a thread of this process, for the probe to reach."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                connection.sendall(GREETING)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _wall_ms(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, timeout=60, cwd=cwd,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(command)} did not finish in 60 s") from None
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed (status {result.returncode}): "
                         f"{result.stderr.decode(errors='replace').strip()[-300:]}")
    return elapsed


def measure(python: str, pairs: int, cwd: Path) -> dict[str, object]:
    """C{pairs} paired runs of the probe and of Twisted's import, in C{cwd}."""
    with _greeter() as port:
        probe = [python, "-m", "tcpgreet.client", HOST, str(port)]
        twisted = [python, "-c", TWISTED_IMPORT]
        # Once each first: the files they read are then in the page cache
        # for both alike.
        _wall_ms(probe, cwd)
        _wall_ms(twisted, cwd)
        probe_ms, twisted_ms = [], []
        for pair in range(pairs):
            if pair % 2:
                twisted_ms.append(_wall_ms(twisted, cwd))
                probe_ms.append(_wall_ms(probe, cwd))
            else:
                probe_ms.append(_wall_ms(probe, cwd))
                twisted_ms.append(_wall_ms(twisted, cwd))
    probe_median, twisted_median = statistics.median(probe_ms), statistics.median(twisted_ms)
    ratio = probe_median / twisted_median
    return {
        "pairs": pairs,
        "probe_command": f"python -m tcpgreet.client {HOST} PORT",
        "twisted_command": f'python -c "{TWISTED_IMPORT}"',
        "probe_ms": probe_median, "twisted_ms": twisted_median,
        "ratio": ratio, "at_most": AT_MOST, "met": ratio <= AT_MOST,
        "probe_runs_ms": probe_ms, "twisted_runs_ms": twisted_ms,
    }
