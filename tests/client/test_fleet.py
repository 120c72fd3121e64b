"""
Many targets in one client process, against real servers on loopback:
tcpgreet servers, closed ports and silent listeners on 127.0.0.0/8, from
a --targets-file of 2,000 and of 20,000 lines; what each target's result
says, the exit status, and what the client costs (peak memory, CPU per
probe).
"""

import json
import random
import re
import resource
import signal
import socket
import subprocess
from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from ..clientprocess import CLIENT, ClientProcess, SocketServer, run, run_measured, sends
from ..helpers import NEUTRAL_CWD, Server, temporary_file

# Addresses of their own for each kind of target, all on loopback.
SERVER_ADDRESSES = ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"]
CLOSED_ADDRESSES = [f"127.0.2.{n}" for n in range(1, 11)]
SILENT_ADDRESSES = ["127.0.3.1", "127.0.3.2", "127.0.3.3", "127.0.3.4"]
# "listening on tcp:0:interface=127.0.1.1 (127.0.1.1:34985), ..."
ADDRESS = re.compile(r"\((127\.[\d.]+):(\d+)\)")
# The deadline only has to end the silent targets' wait. tcpgreet answers
# within a millisecond, but on a busy machine a process stalls now and then
# and every probe in flight waits with it: probes of tcpgreet have taken
# 1.4 s with two fleets and two CPU hogs on two cores. So the deadline
# leaves more than three times that.
TIMEOUT = "5"
# Each silent target holds its place for the whole deadline: enough places
# that they leave most of them to the others.
PARALLEL = "500"
# tcpgreet closes after its greeting: wait for that, so that a slow close on
# a busy machine cannot end a banner by silence instead.
IDLE = "0"
# What a probe of each kind must say, as a single probe of it says it.
ESSENCE = ("ok", "state", "error", "stage", "bytes", "banner", "ended_by")


def records(output: bytes) -> list[dict]:
    return [json.loads(line) for line in output.decode("ascii").splitlines()]


def essence(record: dict) -> tuple:
    return tuple(record[key] for key in ESSENCE)


class Loopback:
    """
    The fleet's far side: two tcpgreet servers listening on four addresses
    each, ports bound but not listening (refused), and listeners that
    never accept (silent: the connection is made, no banner comes).
    """

    def __init__(self, testcase) -> None:
        self.assertEqual = testcase.assertEqual
        self.servers: list[tuple[str, int]] = []
        for _ in range(2):
            server = Server(*[arg for address in SERVER_ADDRESSES
                              for arg in ("--listen", f"tcp:0:interface={address}")], "--quiet")
            testcase.addCleanup(server.stop)
            line = server.wait_for(r"listening on ", 15).string
            found = [(host, int(port)) for host, port in ADDRESS.findall(line)]
            self.assertEqual(len(found), len(SERVER_ADDRESSES), line)
            self.servers.extend(found)
        self.closed = [self._socket(testcase, address, listen=False)
                       for address in CLOSED_ADDRESSES]
        self.silent = [self._socket(testcase, address, listen=True)
                       for address in SILENT_ADDRESSES]

    def _socket(self, testcase, address: str, listen: bool) -> tuple[str, int]:
        s = socket.socket()
        testcase.addCleanup(s.close)
        s.bind((address, 0))
        if listen:
            s.listen(4096)  # room for every probe that can be in flight
        return s.getsockname()

    def targets(self, count: int, seed: int = 14) -> list[tuple[str, str, int]]:
        """C{count} (kind, address, port), in a shuffled mix of the three kinds."""
        chooser = random.Random(seed)
        # Few silent ones: each holds its place in flight for the whole timeout.
        kinds = (["server"] * 32) + (["closed"] * 7) + ["silent"]
        pools = {"server": self.servers, "closed": self.closed, "silent": self.silent}
        chosen = []
        for _ in range(count):
            kind = chooser.choice(kinds)
            address, port = chooser.choice(pools[kind])
            chosen.append((kind, address, port))
        return chosen


def targets_file(testcase, targets) -> str:
    lines = ["# a fleet on loopback"]
    for number, (_kind, address, port) in enumerate(targets):
        # Every form a line may take.
        lines.append(f"{address}:{port}" if number % 2 else f"  {address} {port}  # {number}")
    return temporary_file(testcase, ("\n".join(lines) + "\n").encode())


class FleetTests(SynchronousTestCase):
    def setUp(self):
        self.loopback = Loopback(self)
        self.expected: dict[str, tuple] = {}  # kind: what a single probe of one says

    def probe_fleet(self, count: int):
        targets = self.loopback.targets(count)
        path = targets_file(self, targets)
        finished = run_measured("--json", "--timeout", TIMEOUT, "--idle", IDLE, "--parallel",
                                PARALLEL, "--targets-file", path, timeout=300)
        return targets, finished

    def single(self, address: str, port: int) -> dict:
        result = run("--json", "--timeout", TIMEOUT, "--idle", IDLE, address, str(port))
        return records(result.stdout)[0]

    def check_every_target(self, targets, finished) -> None:
        self.assertEqual(finished.returncode, 2, "the worst: CRITICAL")
        self.assertEqual(finished.stderr, b"")
        found = records(finished.stdout)
        probes = [r for r in found if r["type"] == "probe"]
        summaries = [r for r in found if r["type"] == "summary"]
        wanted = Counter((address, port) for _, address, port in targets)
        self.assertEqual(Counter((p["target"], p["port"]) for p in probes), wanted)
        self.assertEqual(Counter((s["target"], s["port"]) for s in summaries), wanted)
        # Each kind as a probe of its own says it (one of each, in a process
        # of its own, once for both fleets), for every target of that kind.
        kinds = {(address, port): kind for kind, address, port in targets}
        expected = self.expected
        for kind, address, port in targets:
            if kind not in expected:
                expected[kind] = essence(self.single(address, port))
        self.assertEqual(set(expected), {"server", "closed", "silent"})
        self.assertEqual(expected["server"][:4], (True, "OK", None, None))
        self.assertEqual(expected["closed"][:4], (False, "CRITICAL", "connection refused",
                                                  "connect"))
        self.assertEqual(expected["silent"][:4], (False, "CRITICAL", "timed out waiting for a "
                                                  "banner (does the server wait for the client? "
                                                  "try --send or --tls)", "read"))
        seen = Counter()
        for probe in probes:
            kind = kinds[(probe["target"], probe["port"])]
            self.assertEqual(essence(probe), expected[kind], probe)
            self.assertEqual(probe["address"], probe["target"])
            seen[kind] += 1
        self.assertEqual(sum(seen.values()), len(targets))

    def test_two_thousand_then_twenty_thousand(self):
        small_targets, small = self.probe_fleet(2000)
        self.check_every_target(small_targets, small)
        large_targets, large = self.probe_fleet(20000)
        self.check_every_target(large_targets, large)
        # Memory follows the probes in flight, not the length of the file:
        # ten times the targets, much the same peak.
        self.assertLess(large.peak_kb - small.peak_kb, 8 * 1024,
                        f"peak RSS {small.peak_kb} kB for 2,000 targets, {large.peak_kb} kB "
                        "for 20,000")
        # CPU per probe: what the large fleet's 18,000 more probes cost, so
        # that the client's start-up (some 300 ms, more on a busy machine: a
        # sixth or more of the budget of 2,000 probes) and its other
        # fixed costs cancel out; and over the large fleet, start-up included.
        figures = f"{small.cpu:.2f} s of CPU for 2,000 probes, {large.cpu:.2f} s for 20,000"
        self.assertLessEqual((large.cpu - small.cpu) / (20000 - 2000), 0.001, figures)
        self.assertLessEqual(large.cpu / 20000, 0.001, figures)


class TargetsTests(SynchronousTestCase):
    """Targets on the command line and in files, their mistakes, the output forms."""

    def setUp(self):
        self.server = SocketServer(self, sends(b"220 ready\r\n"), connections=200)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.closed = s.getsockname()[1]

    def test_several_targets_on_the_command_line(self):
        good = f"127.0.0.1:{self.server.port}"
        result = run("--plugin", good, f"127.0.0.1:{self.closed}")
        self.assertEqual(result.returncode, 2)
        lines = sorted(result.lines)
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines[0], f"TCP CRITICAL - connection refused on 127.0.0.1 port "
                                   f"{self.closed}")
        self.assertRegex(lines[1], rf"^TCP OK - \d\.\d{{3}} second response time on 127\.0\.0\.1 "
                                   rf"port {self.server.port} \[220 ready\]\|time=")

    def test_text_lines_and_the_tally(self):
        result = run(f"127.0.0.1:{self.server.port}", f"127.0.0.1:{self.closed}")
        self.assertEqual(result.returncode, 2)
        lines = result.lines
        self.assertEqual(len(lines), 4, lines)
        self.assertIn(f"127.0.0.1 port {self.closed} seq=1: CRITICAL failed at connect: "
                      "connection refused after", "\n".join(lines))
        self.assertEqual(lines[2:], ["", "--- 2 targets: 1 OK, 1 CRITICAL ---"])

    def test_a_bad_line_is_unknown_and_the_rest_go_on(self):
        path = temporary_file(self, f"# first\n127.0.0.1 {self.server.port}\n"
                                    f"127.0.0.1 no-such-service\n\n"
                                    f"127.0.0.1:{self.server.port}  # again\n".encode())
        result = run("--json", "--targets-file", path)
        self.assertEqual(result.returncode, 3, "UNKNOWN is the worst")
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: {path} line 3: bad port 'no-such-service': not a "
                         "number or a known TCP service name\n")
        self.assertEqual([r["state"] for r in records(result.stdout) if r["type"] == "probe"],
                         ["OK", "OK"])

    def test_standard_input(self):
        process = subprocess.run([*CLIENT, "--plugin", "--targets-file", "-"], timeout=30,
                                 input=f"127.0.0.1:{self.server.port}\n".encode(),
                                 capture_output=True, cwd=NEUTRAL_CWD)
        self.assertEqual(process.returncode, 0, process.stderr)
        self.assertIn(b"[220 ready]", process.stdout)

    def test_count_gives_each_target_its_summary(self):
        result = run("-c", "2", "-i", "0.05", f"127.0.0.1:{self.server.port}",
                     f"127.0.0.1:{self.closed}")
        text = result.stdout.decode()
        for port, tally in ((self.server.port, "2 probes, 2 ok, 0 failed, 0% loss, state OK"),
                            (self.closed, "2 probes, 0 ok, 2 failed, 100% loss, "
                                          "state CRITICAL")):
            self.assertIn(f"--- 127.0.0.1 port {port} probe statistics ---\n{tally}\n", text)

    def test_ctrl_c_gives_every_target_its_summary(self):
        client = ClientProcess(self, "--json", "-c", "0", "-i", "0.1",
                               f"127.0.0.1:{self.server.port}", f"127.0.0.1:{self.closed}")
        for _ in range(4):
            self.assertEqual(json.loads(client.read_line())["type"], "probe")
        client.signal(signal.SIGINT)
        returncode, rest, stderr = client.finish()
        summaries = [json.loads(line) for line in rest if '"summary"' in line]
        self.assertEqual((returncode, stderr), (2, ""))
        self.assertEqual(sorted((s["port"], s["state"], s["interrupted"]) for s in summaries),
                         sorted([(self.server.port, "OK", True),
                                 (self.closed, "CRITICAL", True)]))

    def test_mistakes(self):
        for args, message in [
            (["--targets-file", "/nonexistent/targets"],
             "--targets-file /nonexistent/targets: cannot read: No such file or directory "
             "(see --help)"),
            (["--targets-file", temporary_file(self, b"# nothing\n")],
             None),
            (["--proxy-source", "192.0.2.1:4", "localhost"],
             "--proxy-source needs --proxy-protocol v1 or v2 (a LOCAL header names no "
             "client) (see --help)"),
            (["--parallel", "0", "a.example", "b.example"],
             "--parallel '0': not 1 or more (see --help)"),
        ]:
            result = run(*args)
            self.assertEqual((result.returncode, result.stdout), (3, b""), args)
            if message is None:
                self.assertEqual(result.stderr.decode().count("\n"), 1)
                self.assertIn("no targets in", result.stderr.decode())
            else:
                self.assertEqual(result.stderr.decode(), f"tcpgreet-client: {message}\n")

    def test_too_few_descriptors(self):
        # A hard limit below what --parallel needs: the client probes as
        # many at once as it can, says so once, and every target is probed.
        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

        lines = f"127.0.0.1:{self.server.port}\n" * 3
        path = temporary_file(self, lines.encode())
        process = subprocess.run([*CLIENT, "--json", "--parallel", "1000", "--targets-file",
                                  path], timeout=30, capture_output=True, cwd=NEUTRAL_CWD,
                                 stdin=subprocess.DEVNULL, preexec_fn=low_limit)
        self.assertEqual(process.returncode, 0, process.stderr)
        self.assertEqual(process.stderr.decode(),
                         "tcpgreet-client: --parallel 1000 needs 1064 open files and the limit "
                         "is 128 (ulimit -n): probing 64 at once\n")
        self.assertEqual(len(records(process.stdout)), 6)

    def test_a_soft_limit_is_raised(self):
        def low_soft_limit():
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1064:
            self.skipTest(f"hard limit on open files is {hard}")
        path = temporary_file(self, f"127.0.0.1:{self.server.port}\n".encode())
        process = subprocess.run([*CLIENT, "--plugin", "--parallel", "1000", "--targets-file",
                                  path], timeout=30, capture_output=True, cwd=NEUTRAL_CWD,
                                 stdin=subprocess.DEVNULL, preexec_fn=low_soft_limit)
        self.assertEqual((process.returncode, process.stderr), (0, b""))

