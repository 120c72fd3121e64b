"""
The load generator: built from C{loadgen.c} with the system C compiler when
there is one (cached by a hash of its source), else C{pyloadgen.py}; and one
timed run of it against a port, parsed into a L{Measurement}.  The C
greeting server the report measures as its floor (C{greetserver.c}) is
built the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import BenchError
from bench.cpus import Placement

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "loadgen.c"
PYTHON_SOURCE = HERE / "pyloadgen.py"
GREETSERVER_SOURCE = HERE / "greetserver.c"
CFLAGS = ("-O2", "-Wall")
ERROR_KINDS = ("refused", "reset", "timeout", "short", "wrong", "addrnotavail", "other")


@dataclass(frozen=True)
class Measurement:
    """What the load generator saw in one run."""

    greeted: int
    errors: dict[str, int]
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    abandoned: int
    other_error: str | None = None  # what the last error of kind "other" was

    @property
    def rate(self) -> float:
        return self.greeted / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


@dataclass(frozen=True)
class LoadGenerator:
    """A load generator program, as a command line to which run() adds arguments."""

    command: tuple[str, ...]
    description: str

    def run(self, port: int, concurrency: int, seconds: float, *, expected: bytes,
            placement: Placement, timeout_ms: int = 5000,
            normal_close: bool = False) -> Measurement:
        """Keep C{concurrency} connections to 127.0.0.1:C{port} going for C{seconds}."""
        arguments = [*self.command, "127.0.0.1", str(port), str(concurrency), f"{seconds}",
                     "-e", expected.hex(), "-t", str(timeout_ms)]
        if normal_close:
            arguments.append("-c")
        # It ends on its own after `seconds`; the margin covers start-up and
        # a machine too busy to schedule it.
        limit = seconds + 30
        try:
            result = subprocess.run(arguments, capture_output=True, text=True, timeout=limit,
                                    stdin=subprocess.DEVNULL, preexec_fn=placement.pin_load)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the load generator did not finish within {limit:.0f} s") from None
        if result.returncode != 0:
            raise BenchError(f"the load generator failed (status {result.returncode}): "
                             f"{result.stderr.strip()}")
        return _parse(result.stdout)


def _parse(output: str) -> Measurement:
    try:
        data = json.loads(output.strip().splitlines()[-1])
        return Measurement(
            greeted=int(data["greeted"]),
            errors={kind: int(data["errors"].get(kind, 0)) for kind in ERROR_KINDS},
            seconds=float(data["seconds"]), p50_ms=float(data["p50_ms"]),
            p99_ms=float(data["p99_ms"]), max_ms=float(data["max_ms"]),
            abandoned=int(data["abandoned"]), other_error=data.get("other_error"))
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"unreadable load generator output ({e}): {output[:200]!r}") from None


def choose(kind: str, scratch: Path, warn: Callable[[str], object]) -> LoadGenerator:
    """
    The load generator to use: C{kind} is "c", "python" or "auto" (C when a
    compiler can build it, else Python, saying why through C{warn}).
    C{scratch} holds the binary when the cache directory cannot.
    """
    fallback = LoadGenerator(
        (sys.executable, str(PYTHON_SOURCE)),
        "the Python fallback (pyloadgen.py), less able than the C one: its own CPU "
        "caps greetings/s and adds to latency; server CPU per greeting still "
        "compares servers")
    if kind == "python":
        return fallback
    compiler = find_compiler()
    if compiler is None:
        if kind == "c":
            raise BenchError("no C compiler found (set CC, or install cc/gcc/clang)")
        warn("no C compiler found (cc, gcc, clang or $CC); using the Python load generator")
        return fallback
    try:
        binary = build(compiler, scratch)
    except BenchError as e:
        if kind == "c":
            raise
        warn(f"{e}; using the Python load generator")
        return fallback
    return LoadGenerator((str(binary),), f"C epoll (loadgen.c, built with {compiler})")


def find_compiler() -> str | None:
    """$CC when set (and only it: the operator chose it), else cc, gcc or clang."""
    chosen = os.environ.get("CC")
    for candidate in [chosen] if chosen else ["cc", "gcc", "clang"]:
        if found := shutil.which(candidate):
            return found
    return None


def build(compiler: str, scratch: Path, source_path: Path = C_SOURCE) -> Path:
    """Compile C{source_path}, or reuse the binary built from the same source before."""
    source = source_path.read_bytes()
    key = hashlib.sha256(b"\0".join(
        [source, compiler.encode(), " ".join(CFLAGS).encode(), platform.machine().encode()]
    )).hexdigest()[:16]
    directory = _cache_directory() or scratch
    stem = source_path.stem
    binary = directory / f"{stem}-{key}"
    if binary.exists():
        return binary
    # Built under a temporary name and renamed: two runs at once never see
    # a half-written binary.
    fd, partial = tempfile.mkstemp(prefix=f"{stem}-", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *CFLAGS, "-o", partial, str(source_path)],
                                capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"{compiler} could not build {source_path.name}: "
                             f"{result.stderr.strip()[-500:]}")
        os.replace(partial, binary)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{compiler} took over 120 s to build {source_path.name}") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    return binary


def build_greetserver(scratch: Path) -> tuple[Path | None, str | None]:
    """The C greeting server's binary, or L{None} and why it cannot be had."""
    compiler = find_compiler()
    if compiler is None:
        return None, "no C compiler found (cc, gcc, clang or $CC) to build greetserver.c"
    try:
        return build(compiler, scratch, GREETSERVER_SOURCE), None
    except BenchError as e:
        return None, str(e)


def _cache_directory() -> Path | None:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    directory = Path(base) / "tcpgreet-bench"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory if os.access(directory, os.W_OK) else None
