"""
--workers end to end: a real twistd supervising real worker processes, on
loopback.  Which worker served a connection is read from the log, where
every line of a worker names it and its process id.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .. import confine, netns_steering
from ..haproxy import start_haproxy
from ..helpers import (
    TWISTD,
    Server,
    assert_fails_in_one_line,
    fetch,
    has_ipv6_loopback,
    namespace_command,
    process_gone,
    run_twistd,
    start_server,
    twistd_command,
    wait_for_exit,
    wait_until,
)
from ..test_deploy_haproxy import FORGED, sent_to
from ..test_deploy_systemd import (
    DEPLOY,
    FIRST_GREETING_TIMEOUT,
    LOOPBACK,
    socket_activate,
    unit_settings,
)
from ..test_faults import MiB, greeting_file

ROOT = Path(__file__).resolve().parent.parent.parent
LOCAL = "tcp:0:interface=127.0.0.1"
DEFAULT = b"Thank you for connecting\r\n"
READY = r"worker (\d+) \(pid (\d+)\) ready"
GREETED = r"\[worker (\d+), pid (\d+)\] ([\d.]+) port (\d+): greeted, (\d+) bytes in [\d.]+ ms"


def start_workers(testcase, *args: str, workers: int = 2, **kwargs):
    """Start C{twistd tcpgreet --workers N ARGS}; wait until every worker serves."""
    server = start_server(testcase, "--workers", str(workers), *args, **kwargs)
    server.wait_for_count(READY, workers)
    return server


def ready_pids(server) -> dict[int, int]:
    """The process of each worker, by number, as they last reported ready."""
    return {int(number): int(pid) for number, pid in re.findall(READY, server.log)}


def greeted(server, count: int) -> list[tuple[int, int, str]]:
    """Wait for C{count} connection lines; (worker, pid, peer) of each."""
    server.wait_for_count(GREETED, count)
    return [(int(m[1]), int(m[2]), m[3])
            for m in (re.search(GREETED, line) for line in server.lines) if m]


def fetch_from(source: str, server) -> bytes:
    return fetch(server.host, server.port, source=source)


def long_greeting(testcase) -> str:
    """A greeting file too long to go out while its client does not read."""
    return greeting_file(testcase, MiB)[0]


def hold(testcase, server, source: str = "127.0.0.1") -> socket.socket | None:
    """
    A connection kept open by not reading its (long) greeting; None if the
    server refused it.
    """
    s = socket.socket()
    testcase.addCleanup(s.close)
    s.settimeout(10)
    # A small window: the greeting stays in progress until we read.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((source, 0))
    s.connect((server.host, server.port))
    return s if s.recv(1, socket.MSG_PEEK) else None


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class ServingTests(SynchronousTestCase):
    def test_both_workers_greet(self):
        server = start_workers(self, "--listen", LOCAL)
        self.assertRegex(server.log, r"listening on tcp:0:interface=127\.0\.0\.1 "
                                     r"\(127\.0\.0\.1:\d+\) with 2 workers; .*"
                                     r"max-connections 10000 \(5000 a worker\)")
        pids = ready_pids(server)
        self.assertEqual(sorted(pids), [1, 2])
        for _ in range(40):  # the kernel spreads them by a hash of the ports
            self.assertEqual(fetch(server.host, server.port), DEFAULT)
        lines = greeted(server, 40)
        self.assertEqual({(worker, pid) for worker, pid, _ in lines}, set(pids.items()))
        self.assertEqual({peer for _, _, peer in lines}, {"127.0.0.1"})
        self.assertEqual(server.log.count("listening on"), 1)  # the supervisor's only
        server.stop()
        self.assertNotIn("Traceback", server.log)

    def test_json_log_keeps_the_connection_fields(self):
        server = start_workers(self, "--listen", LOCAL,
                               twistd_args=("--logger", "tcpgreet.logs.json_observer"))
        for _ in range(10):
            fetch(server.host, server.port)
        server.wait_for_count(r'"outcome": "greeted"', 10)
        records = [json.loads(line) for line in server.lines]  # every line is JSON
        connections = [r for r in records if r.get("outcome") == "greeted"]
        pids = set(ready_pids_json(records).values())
        for record in connections:
            self.assertEqual((record["peer"], record["bytes"], record["reason"],
                              record["namespace"]), ("127.0.0.1", 26, None, "tcpgreet.server"))
            self.assertIsInstance(record["port"], int)
            self.assertIsInstance(record["duration_ms"], float)
            self.assertIn(record["pid"], pids)
            self.assertIn(record["worker"], (1, 2))
            self.assertTrue(record["message"].startswith(
                f"[worker {record['worker']}, pid {record['pid']}] 127.0.0.1 port "))

    def test_greeting_template_counts_per_worker(self):
        server = start_workers(self, "--listen", LOCAL, "--greeting", "#{connection}",
                               "--max-per-ip", "100")  # steered: one address, one worker
        for source, expected in [("127.0.0.2", b"#1\r\n"), ("127.0.0.3", b"#1\r\n"),
                                 ("127.0.0.2", b"#2\r\n"), ("127.0.0.3", b"#2\r\n")]:
            self.assertEqual(fetch_from(source, server), expected)


def ready_pids_json(records) -> dict[int, int]:
    return {r["worker"]: r["pid"] for r in records if r.get("message", "").endswith("ready")
            and "pid" in r}


class SupervisionTests(SynchronousTestCase):
    def test_a_killed_worker_is_replaced(self):
        server = start_workers(self, "--listen", LOCAL, "--quiet")
        old = ready_pids(server)[1]
        os.kill(old, signal.SIGKILL)
        server.wait_for(rf"worker 1 \(pid {old}\) was killed by signal 9 \(SIGKILL\)"
                        r".*; restarting it")
        server.wait_for_count(READY, 3)
        new = ready_pids(server)[1]
        self.assertNotEqual(new, old)
        wait_for_exit(old, 10, "(the killed worker)")
        for _ in range(30):
            self.assertEqual(fetch(server.host, server.port), DEFAULT)
        server.stop()
        self.assertNotIn("Traceback", server.log)

    def test_a_worker_that_cannot_start_is_retried_ever_later(self):
        path, text = greeting_file(self, 100)
        with open(path, "rb") as f:
            content = f.read()
        server = start_workers(self, "--listen", LOCAL, "--greeting-file", path)
        os.remove(path)
        os.kill(ready_pids(server)[1], signal.SIGKILL)
        # Its replacement fails at start, saying why in one line; the next
        # one is started a little later, and so on.
        server.wait_for(rf"\[worker 1, pid \d+\] tcpgreet: greeting file {re.escape(path)}: "
                        r"No such file or directory")
        server.wait_for(r"worker 1 \(pid \d+\) exited with status 1 before serving for 1 s "
                        r"\(2 time\(s\) in a row\); restarting it in 1 s")
        self.assertRegex(server.log, r"\(1 time\(s\) in a row\); restarting it in 0\.5 s")
        with open(path, "wb") as f:
            f.write(content)
        server.wait_for_count(READY, 3, timeout=15)
        self.assertEqual(fetch(server.host, server.port), text)
        server.stop()
        self.assertNotIn("Traceback", server.log)

    def test_no_connection_waits_for_a_worker_that_is_down(self):
        path, text = greeting_file(self, 100)
        # Steered: every connection from 127.0.0.2 reaches worker 1's socket.
        server = start_workers(self, "--listen", LOCAL, "--greeting-file", path,
                               "--max-per-ip", "100")
        take_away(self, path)  # its replacements fail at start: it stays down a while
        old = ready_pids(server)[1]
        os.kill(old, signal.SIGKILL)
        server.wait_for(rf"worker 1 \(pid {old}\) was killed by signal 9")
        for _ in range(5):
            self.assertEqual(fetch_from("127.0.0.2", server), text)
        self.assertEqual([worker for worker, _, _ in greeted(server, 5)], [2] * 5)
        self.assertIn("restarting it in", server.log)  # it was down all along
        os.rename(path + ".away", path)
        server.wait_for_count(READY, 3, timeout=20)
        server.wait_for(r"worker 1 serves again; the others served 5 of its connection\(s\)")
        self.assertEqual(fetch_from("127.0.0.2", server), text)
        self.assertEqual(greeted(server, 6)[-1][0], 1)  # its own again
        server.stop()
        self.assertNotIn("Traceback", server.log)

    def test_unsteered_connections_skip_a_worker_that_is_down(self):
        path, text = greeting_file(self, 100)
        server = start_workers(self, "--listen", LOCAL, "--greeting-file", path, "--quiet")
        take_away(self, path)
        old = ready_pids(server)[2]
        os.kill(old, signal.SIGKILL)
        server.wait_for(rf"worker 2 \(pid {old}\) was killed by signal 9")
        # The kernel's hash puts about half of them in worker 2's queue.
        for _ in range(20):
            self.assertEqual(fetch(server.host, server.port), text)
        server.stop()
        self.assertNotIn("Traceback", server.log)

    def test_sigterm_drains_every_worker(self):
        path, expected = greeting_file(self, MiB)
        # Per-address steering makes it certain which worker gets which client.
        server = start_workers(self, "--listen", LOCAL, "--greeting-file", path, "--quiet",
                               "--max-per-ip", "100", "--drain-timeout", "10")
        slow = [hold(self, server, source) for source in ("127.0.0.2", "127.0.0.3") * 3]
        self.assertNotIn(None, slow)
        server.signal(signal.SIGTERM)
        server.wait_for_count(r"\[worker \d, pid \d+\] draining 3 connection\(s\)", 2)
        # A second stop signal during the drain is noted, as in one process.
        for signum in (signal.SIGTERM, signal.SIGINT):
            server.signal(signum)
            server.wait_for(rf"{signal.Signals(signum).name} while stopping: "
                            r"still waiting for 2 worker\(s\)")
        refused = wait_until(lambda: connect_refused(server), 10, "the port to close")
        self.assertTrue(refused)
        for s in slow:
            s.settimeout(10)
            self.assertEqual(b"".join(iter(lambda s=s: s.recv(MiB), b"")), expected)
        status = server.process.wait(10)
        self.assertEqual(status, -signal.SIGTERM)  # twistd re-raises the signal
        server.stop()
        self.assertNotIn("Traceback", server.log)
        self.assertIn("all workers stopped", server.log)
        self.assertEqual(server.log.count("drained 3 connection(s)"), 2)
        for pid in ready_pids(server).values():
            self.assertTrue(process_gone(pid))

    def test_no_worker_outlives_a_killed_supervisor(self):
        server = start_workers(self, "--listen", LOCAL)
        pids = ready_pids(server).values()
        server.signal(signal.SIGKILL)
        for pid in pids:
            wait_for_exit(pid, 10, "(a worker of the killed supervisor)")

    def test_sighup_reaches_every_worker(self):
        path, _ = greeting_file(self, 100)
        server = start_workers(self, "--listen", LOCAL, "--greeting-file", path)
        with open(path, "wb") as f:
            f.write(b"second\n")
        server.signal(signal.SIGHUP)
        server.wait_for("SIGHUP: passing it on to 2 worker")
        server.wait_for_count(r"reloaded greeting from .*: 8 bytes", 2)
        reloaded = re.findall(r"\[worker \d, pid (\d+)\] reloaded greeting", server.log)
        self.assertEqual(sorted(map(int, reloaded)), sorted(ready_pids(server).values()))
        for _ in range(20):
            self.assertEqual(fetch(server.host, server.port), b"second\r\n")


def take_away(testcase, path: str) -> None:
    """Make C{path} unreadable as PATH.away, until put back (or the test ends)."""
    away = path + ".away"
    os.rename(path, away)
    testcase.addCleanup(lambda: os.path.exists(away) and os.rename(away, path))


def connect_refused(server) -> bool:
    try:
        fetch(server.host, server.port, timeout=1)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


class LimitTests(SynchronousTestCase):
    def test_rate_per_ip_is_exact_across_workers(self):
        server = start_workers(self, "--listen", LOCAL, "--rate-per-ip", "0.01/1")
        sources = [f"127.0.0.{last}" for last in range(2, 10)]
        for source in sources:
            # One a hundred seconds: the second and third from the same
            # address are refused, whichever ports they come from.
            self.assertEqual([fetch_from(source, server) for _ in range(3)],
                             [DEFAULT, b"", b""], source)
        # The kernel steered each address to worker (address mod 2) + 1.
        pids = ready_pids(server)
        for worker, pid, peer in greeted(server, len(sources)):
            last = int(peer.rsplit(".", 1)[1])
            self.assertEqual((worker, pid), ((0x7F000000 + last) % 2 + 1,
                                             pids[(0x7F000000 + last) % 2 + 1]), peer)

    def test_max_per_ip_is_exact_across_workers(self):
        server = start_workers(self, "--listen", LOCAL, "--max-per-ip", "1",
                               "--greeting-file", long_greeting(self))
        for last in range(2, 6):
            source = f"127.0.0.{last}"
            self.assertIsNotNone(hold(self, server, source))
            self.assertIsNone(hold(self, server, source), source)
        server.wait_for(r"refused \d+ connection\(s\) .* by --max-per-ip")

    def test_max_per_ip_counts_an_ipv6_64_across_workers(self):
        # In a network namespace of the test's own, with addresses of two
        # /64s: all the addresses of one /64 count as one client, so that
        # with --max-per-ip 2 two of their connections are served in all,
        # whichever addresses they come from (steered by their last 32
        # bits, they would be spread over both workers: 2 each); another
        # /64 is counted apart.
        command = namespace_command(self)
        same_64 = [f"fd00:1::{last:x}" for last in range(1, 9)]
        other_64 = ["fd00:2::1"] * 3
        result = subprocess.run(
            [*command, sys.executable, "-m", "tests.netns_steering", "2", *same_64, *other_64],
            cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if result.returncode == netns_steering.UNAVAILABLE:
            raise SkipTest(f"no IPv6 in a network namespace: {result.stderr.strip()}")
        self.assertEqual(result.returncode, 0, result.stderr)
        greeted = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(greeted, [[address, index < 2] for index, address in enumerate(same_64)]
                         + [[address, index < 2] for index, address in enumerate(other_64)])

    def test_max_connections_is_shared_out(self):
        server = start_workers(self, "--listen", LOCAL, "--max-connections", "2",
                               "--greeting-file", long_greeting(self))
        self.assertIn("max-connections 2 (1 a worker)", server.log)
        held = [hold(self, server) for _ in range(8)]
        served = [s for s in held if s is not None]
        # One each: 2 when the kernel's hash gave both workers some of the 8.
        self.assertIn(len(served), (1, 2))
        server.wait_for(r"refused \d+ connection\(s\) .* by --max-connections")


class ListenerTests(SynchronousTestCase):
    def test_systemd_socket_shared_by_the_workers(self):
        program, [port] = socket_activate(
            self, twistd_command("--listen", "systemd:domain=INET:name=tcpgreet",
                                 "--workers", "2"),
            fdnames=["tcpgreet"])
        # Made before tcpgreet runs: it waits in the socket's queue.
        self.assertEqual(fetch("127.0.0.1", port, timeout=FIRST_GREETING_TIMEOUT), DEFAULT)
        program.wait_for(rf"listening on systemd:domain=INET:name=tcpgreet "
                         rf"\(127\.0\.0\.1:{port}\) with 2 workers")
        program.wait_for_count(READY, 2)
        for _ in range(10):
            self.assertEqual(fetch("127.0.0.1", port), DEFAULT)
        program.wait_for_count(GREETED, 11)
        program.stop()
        self.assertNotIn("Traceback", program.log)

    def test_the_systemd_unit_with_workers(self):
        # deploy/tcpgreet.service's command with --workers, confined as the
        # unit confines it (no privileges, no new ones, no writable and
        # executable memory), reloaded as "systemctl reload" does.
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback, which the socket unit binds")
        service = unit_settings(DEPLOY / "tcpgreet.service")
        socket_unit = unit_settings(DEPLOY / "tcpgreet.socket")
        [name] = socket_unit["Socket.FileDescriptorName"]
        hosts = [LOOPBACK[listen.rsplit(":", 1)[0]]
                 for listen in socket_unit["Socket.ListenStream"]]
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        greeting = os.path.join(directory, "greeting.txt")
        with open(greeting, "w") as f:
            f.write("first\n")
        command = [TWISTD] + [greeting if argument.startswith("/etc/") else argument
                              for argument in shlex.split(service["Service.ExecStart"][0])[1:]]
        program, ports = socket_activate(self, [*command, "--workers", "2"],
                                         fdnames=[name] * len(hosts), hosts=hosts,
                                         preexec_fn=confine.like_the_unit)
        self.assertEqual(fetch(hosts[0], ports[0], timeout=FIRST_GREETING_TIMEOUT),
                         b"first\r\n")
        program.wait_for_count(READY, 2)
        with open(greeting, "w") as f:
            f.write("second\n")
        program.signal(signal.SIGHUP)
        program.wait_for_count(r"\[worker \d, pid \d+\] reloaded greeting", 2)
        for host, port in zip(hosts, ports, strict=True):
            self.assertEqual(fetch(host, port), b"second\r\n")
        program.stop()
        self.assertIn("all workers stopped", program.log)
        self.assertNotIn("Traceback", program.log)

    def test_behind_haproxy(self):
        # Per-address limits on: still not steered, since every connection
        # comes from HAProxy; the workers share them.
        server = start_workers(self, "--listen", "haproxy:tcp:0:interface=127.0.0.1",
                               "--greeting", "{peer_host}", "--max-per-ip", "100")
        proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2"])
        for _ in range(30):
            with socket.create_connection((proxy.host, proxy.port), 10,
                                          source_address=("127.0.0.2", 0)) as s:
                self.assertEqual(b"".join(iter(lambda s=s: s.recv(4096), b"")),
                                 b"127.0.0.2\r\n")
        lines = greeted(server, 30)
        self.assertEqual({peer for _, _, peer in lines}, {"127.0.0.2"})
        self.assertEqual({worker for worker, _, _ in lines}, {1, 2})

    def test_every_worker_refuses_untrusted_proxies(self):
        # Each worker checks its own connections, with the options the
        # supervisor passed on: whichever worker the kernel picks, a client
        # outside --trusted-proxy is refused and one inside names anyone.
        server = start_workers(self, "--listen", "haproxy:tcp:0:interface=127.0.0.1",
                               "--greeting", "{peer_host}", "--trusted-proxy", "127.0.0.2")
        self.assertIn("proxy headers trusted from 127.0.0.2/32", server.log)
        for _ in range(20):
            self.assertEqual(sent_to("127.0.0.1", server.host, server.port, FORGED), b"")
            self.assertEqual(sent_to("127.0.0.2", server.host, server.port, FORGED),
                             b"203.0.113.9\r\n")
        lines = greeted(server, 20)
        self.assertEqual({peer for _, _, peer in lines}, {"203.0.113.9"})
        self.assertEqual({worker for worker, _, _ in lines}, {1, 2})
        for worker in (1, 2):  # in whichever order their lines came
            server.wait_for_count(rf"\[worker {worker}, pid \d+\] refused \d+ connection\(s\) "
                                  r".* from outside --trusted-proxy \(latest from 127\.0\.0\.1\)",
                                  1)

    def test_unix_socket_shared_by_the_workers(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "greet.sock")
        server = Server("--listen", f"unix:{path}", "--workers", "2", "--greeting", "over unix")
        self.addCleanup(server.stop)
        server.wait_for(rf"listening on unix:{re.escape(path)} \({re.escape(path)}\) with 2")
        server.wait_for_count(READY, 2)
        for _ in range(5):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(path)
                self.assertEqual(b"".join(iter(lambda s=s: s.recv(4096), b"")),
                                 b"over unix\r\n")
        server.stop()
        self.assertFalse(os.path.exists(path))
        self.assertNotIn("Traceback", server.log)


class MetricsTests(SynchronousTestCase):
    def test_totals_are_the_connections_made(self):
        server = start_workers(self, "--listen", LOCAL, "--quiet",
                               "--metrics", "tcp:0:interface=127.0.0.1")
        url = "http://{}/metrics".format(
            server.wait_for(r"metrics at http://([\d.]+:\d+)/metrics").group(1))
        n = 40
        for _ in range(n):
            self.assertEqual(fetch(server.host, server.port), DEFAULT)
        got = scrape(url)
        for name in ("tcpgreet_connections_accepted_total",
                     "tcpgreet_connections_greeted_total",
                     "tcpgreet_greeting_duration_seconds_count"):
            self.assertEqual(got[(name, ())], n, name)
        self.assertEqual(got[("tcpgreet_greeting_bytes_total", ())], 26 * n)
        self.assertEqual(got[("tcpgreet_connections_open", ())], 0)
        self.assertEqual(got[("tcpgreet_workers", ())], 2)
        self.assertEqual(got[("tcpgreet_listeners", ())], 1)
        # A worker dies: what it had counted stays in the totals.
        os.kill(ready_pids(server)[2], signal.SIGKILL)
        server.wait_for_count(READY, 3)
        got = scrape(url)
        self.assertEqual(got[("tcpgreet_connections_greeted_total", ())], n)
        self.assertEqual(got[("tcpgreet_worker_restarts_total", ())], 1)
        for _ in range(10):
            fetch(server.host, server.port)
        self.assertEqual(scrape(url)[("tcpgreet_connections_greeted_total", ())], n + 10)


class StartupErrorTests(SynchronousTestCase):
    def test_port_in_use(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            result = run_twistd("--listen", f"tcp:{port}:interface=127.0.0.1",
                                "--workers", "2")
        assert_fails_in_one_line(
            self, result, rf"^tcpgreet: cannot listen on 'tcp:{port}:interface=127\.0\.0\.1':"
                          r" address already in use$")

    def test_bad_worker_count(self):
        assert_fails_in_one_line(self, run_twistd("--workers", "none"),
                                 r"^tcpgreet: --workers: 'none' is not a whole number")
