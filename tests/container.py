"""
podman, for tests of the image deploy/Containerfile builds.

No image registry and no package index are reachable from a build here, so
the image is built the way the Containerfile allows for that:

  - the base is made, not pulled: C{debootstrap --variant=minbase
    --include=python3,python3-venv bookworm} from the mirror apt already
    uses, imported as L{BASE_IMAGE}.  It is made once and kept: the image
    in podman's store, the tree it came from under L{CACHE}, so a later run
    (the suite runs three times in CI) only checks that the image exists;
  - the wheels are built on the host (C{pip wheel}, through pip's cache)
    into a copy of the checkout, the build context, and installed from
    there with C{--no-index} (C{--build-arg WHEELS=wheels}).  They are
    built reproducibly (C{SOURCE_DATE_EPOCH}), so an unchanged checkout
    gives the same bytes and podman reuses every layer it built before.

Two traps of podman on these machines: its default OCI runtime, crun, fails
with "cgroups in hybrid mode not supported" (so: C{--runtime runc}), and
its default ulimits fail with "setrlimit ... Operation not permitted" (so:
explicit ones, within this process's hard limits).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest

from .helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
CACHE = Path("/var/cache/tcpgreet-tests")
BASE_IMAGE = "localhost/tcpgreet-base"
IMAGE = "localhost/tcpgreet-test"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Any fixed time will do: what matters is that it does not change.
SOURCE_DATE_EPOCH = "315532800"

DEBOOTSTRAP_TIMEOUT = 900.0
BUILD_TIMEOUT = 600.0

# The labels' build arguments; VERSION is left to the Containerfile's default.
BUILD_ARGS = {"SOURCE": ROOT.as_uri(), "REVISION": "0123456789abcdef"}

_built: list[str] = []


class Podman:
    """The podman program, run with the options these machines need."""

    def __init__(self, path: str) -> None:
        self.path = path

    def command(self, *args: str) -> list[str]:
        return [self.path, "--runtime", "runc", *args]

    def __call__(self, *args: str, timeout: float = 60.0, stdin=subprocess.DEVNULL,
                 check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                timeout=timeout, stdin=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited with {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    @staticmethod
    def ulimits() -> list[str]:
        """Descriptor and process limits within this process's hard ones."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
        nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
        return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def _unavailable(testcase, reason: str):
    """Skip for C{reason}; under TCPGREET_REQUIRE_SYSTEM_TOOLS=1, fail."""
    if os.environ.get("TCPGREET_REQUIRE_SYSTEM_TOOLS") == "1":
        testcase.fail(f"{reason} (TCPGREET_REQUIRE_SYSTEM_TOOLS=1)")
    raise SkipTest(reason)


def podman(testcase) -> Podman:
    """podman, if it can run containers here; else skip (or fail in CI)."""
    program = Podman(require_tool(testcase, "podman"))
    require_tool(testcase, "runc")
    info = program("info", check=False)
    if info.returncode != 0:
        _unavailable(testcase, "podman cannot run here: "
                     + (info.stderr.strip().splitlines() or ["no reason given"])[-1])
    return program


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """
    The Debian mirror apt uses (the URI of a source for the suite itself, in
    the one-line or the deb822 format), or Debian's own if none is found.
    """
    candidates = []
    one_line = sources / "sources.list"
    files = ([one_line] if one_line.exists() else []) + sorted(
        (sources / "sources.list.d").glob("*.list"))
    for path in files:
        for line in path.read_text().splitlines():
            match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match:
                candidates.append((match.group(1), [match.group(2)]))
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and \
                    fields.get("Enabled", "yes").lower() != "no":
                for uri in fields.get("URIs", "").split():
                    candidates.append((uri, fields.get("Suites", "").split()))
    mirrors = [(uri, suites) for uri, suites in candidates
               if uri.startswith(("http://", "https://"))]
    for uri, suites in mirrors:
        if SUITE in suites:
            return uri
    for uri, suites in mirrors:  # the mirror of another release has bookworm too
        if not any(suite.endswith("-security") for suite in suites):
            return uri
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on C{path}: one run makes the base at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def base_image(testcase, program: Podman) -> str:
    """
    L{BASE_IMAGE}: reused if podman has it, else imported from the cached
    tree, else made with debootstrap first (about a minute).
    """
    if program("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    with _locked(CACHE / "lock"):
        if program("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return BASE_IMAGE
        tree = CACHE / f"{SUITE}-minbase"
        if not (tree / ".complete").exists():
            _debootstrap(testcase, tree)
        with subprocess.Popen(["tar", "-C", str(tree), "--exclude", "./.complete", "-c", "."],
                              stdout=subprocess.PIPE) as tar:
            imported = program("import", "-", BASE_IMAGE, stdin=tar.stdout, timeout=300)
        if tar.returncode != 0:
            raise AssertionError(f"tar of {tree} exited with {tar.returncode}")
        assert imported.returncode == 0
    return BASE_IMAGE


def _debootstrap(testcase, tree: Path) -> None:
    debootstrap = require_tool(testcase, "debootstrap")
    if os.geteuid() != 0:
        _unavailable(testcase, "making the base image with debootstrap needs root")
    partial = tree.with_name(tree.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    mirror = apt_mirror()
    log = tree.with_name(tree.name + ".log")
    with open(log, "w") as output:
        status = subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3,python3-venv", SUITE,
             str(partial), mirror], stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=DEBOOTSTRAP_TIMEOUT).returncode
    if status != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise AssertionError(f"debootstrap {SUITE} from {mirror} exited with {status}:\n{tail}")
    # apt's lists and caches are no part of an image.
    for leftover in ("var/lib/apt/lists", "var/cache/apt"):
        for child in (partial / leftover).glob("*"):
            if child.is_file():
                child.unlink()
    (partial / ".complete").touch()
    partial.rename(tree)


def build_context(testcase) -> Path:
    """
    A copy of the checkout (less what .containerignore leaves out) with the
    wheels of tcpgreet and its dependencies in C{wheels/}.
    """
    directory = Path(tempfile.mkdtemp(prefix="tcpgreet-image-"))
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    context = directory / "context"
    ignored = [line.strip().removeprefix("**/")
               for line in (ROOT / ".containerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(*ignored))
    wheels = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(context / "wheels"), f"{context}[metrics]"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    if wheels.returncode != 0:
        raise AssertionError(f"pip wheel exited with {wheels.returncode}:\n{wheels.stderr}")
    return context


def image(testcase, program: Podman, **build_args: str) -> str:
    """
    The id of L{IMAGE}, built from this checkout on L{BASE_IMAGE} (once per
    test process; podman's layer cache makes later builds quick), with
    L{BUILD_ARGS}, or with C{build_args} in place of some of them (built
    afresh at each call).
    """
    if _built and not build_args:
        return _built[0]
    base = base_image(testcase, program)
    context = build_context(testcase)
    arguments = {"BASE": base, "WHEELS": "wheels", **BUILD_ARGS, **build_args}
    # The tag is for whoever looks at podman's store; the tests use the
    # image's id, because another run on this machine may move the tag to
    # its own build at any moment.
    identity = context.parent / "image-id"
    built = program(
        "build", "--format", "docker", *Podman.ulimits(), "-f",
        str(context / "deploy" / "Containerfile"),
        *[f"--build-arg={name}={value}" for name, value in arguments.items()],
        "--iidfile", str(identity), "-t", IMAGE, str(context),
        timeout=BUILD_TIMEOUT, check=False)
    if built.returncode != 0:
        raise AssertionError(f"podman build exited with {built.returncode}:\n"
                             + "\n".join((built.stdout + built.stderr).splitlines()[-40:]))
    built_id = identity.read_text().strip()
    if not build_args:
        _built.append(built_id)
    return built_id


def containerfile(path: Path = CONTAINERFILE) -> list[tuple[str, str]]:
    """
    The instructions of a Containerfile, in order, as (INSTRUCTION, rest),
    with continuation lines joined and comments left out.
    """
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = (pending + line).strip().split(None, 1)
        pending = ""
        instructions.append((words[0].upper(), words[1] if len(words) > 1 else ""))
    return instructions
