"""
The real client as a subprocess, against the real twistd and against small
servers that misbehave on purpose, on loopback.
"""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from unittest import skipUnless

from twisted.trial.unittest import SynchronousTestCase

from ..clientprocess import (
    CLIENT,
    ClientProcess,
    Finished,
    SocketServer,
    run,
    run_measured,
    sends,
)
from ..helpers import (
    NEUTRAL_CWD,
    Server,
    has_ipv6_loopback,
    require_tool,
    start_server,
    temporary_file,
)

LOCAL = "tcp:0:interface=127.0.0.1"
HOSTILE = b"\x1b]0;pwned\x07\x1b[2J hello \xff\xfe\xc3\r\n"
PROBE_OK = re.compile(r"^127\.0\.0\.1 port \d+ seq=(\d+): OK connect \d+\.\d{3} ms, "
                      r"first byte \d+\.\d{3} ms, total \d+\.\d{3} ms, 26 bytes: "
                      r"Thank you for connecting$")
PROBE_REFUSED = re.compile(r"^127\.0\.0\.1 port \d+ seq=(\d+): CRITICAL failed at connect: "
                           r"connection refused after \d+\.\d{3} ms$")
TIMES = re.compile(r"^(connect|time) min/avg/max/mdev = "
                   r"\d+\.\d{3}/\d+\.\d{3}/\d+\.\d{3}/\d+\.\d{3} ms$")


def records(finished):
    return [json.loads(line) for line in finished.stdout.decode("ascii").splitlines()]


class CountTests(SynchronousTestCase):
    def test_probes_and_summary(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        result = run("--count", "5", "--interval", "0.1", server.host, str(server.port))
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        lines = result.lines
        self.assertEqual(len(lines), 10, lines)
        self.assertEqual([int(PROBE_OK.match(line).group(1)) for line in lines[:5]],
                         [1, 2, 3, 4, 5])
        self.assertEqual(lines[5:8], ["", f"--- 127.0.0.1 port {server.port} probe statistics ---",
                                      "5 probes, 5 ok, 0 failed, 0% loss, state OK"])
        self.assertTrue(all(TIMES.match(line) for line in lines[8:]), lines[8:])
        # Five probes 0.1 s apart take at least 0.4 s.
        self.assertGreaterEqual(result.elapsed, 0.4)

    def test_server_stopped_half_way(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        client = ClientProcess(self, "--count", "5", "--interval", "0.1",
                               server.host, str(server.port))
        lines = [client.read_line(), client.read_line()]
        # Freeze the client while the server stops, so no later probe can
        # race the shutdown: probe 3 may have started (and may end in any
        # way), 4 and 5 cannot have.
        client.signal(signal.SIGSTOP)
        try:
            server.stop()
        finally:
            client.signal(signal.SIGCONT)
        returncode, rest, stderr = client.finish()
        lines += rest
        self.assertEqual((returncode, stderr), (2, ""))
        self.assertTrue(PROBE_OK.match(lines[0]) and PROBE_OK.match(lines[1]), lines)
        self.assertRegex(lines[2], r"^127\.0\.0\.1 port \d+ seq=3: (OK|CRITICAL) ")
        self.assertTrue(PROBE_REFUSED.match(lines[3]) and PROBE_REFUSED.match(lines[4]), lines)
        ok = sum(bool(PROBE_OK.match(line)) for line in lines[:5])
        self.assertEqual(lines[7], f"5 probes, {ok} ok, {5 - ok} failed, "
                                   f"{(5 - ok) * 20}% loss, state CRITICAL")


class ChecksTests(SynchronousTestCase):
    """--expect, thresholds, chosen states, --json and --plugin against twistd."""

    def setUp(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        self.target = [server.host, str(server.port)]
        self.port = server.port

    def test_expect(self):
        result = run("--expect", "^Thank you", *self.target)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b"Thank you for connecting\n", b""))
        result = run("--expect", "^220 ", *self.target)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.decode(), f"tcpgreet-client: 127.0.0.1 port {self.port}: "
                         "failed at expect: "
                         "banner does not match '^220 ': got \"Thank you for connecting\"\n")
        result = run("--expect", "^220 ", "--mismatch-state", "warn", *self.target)
        self.assertEqual(result.returncode, 1)

    def test_thresholds(self):
        for args, status, message in [
            (["--warning", "10", "--critical", "20"], 0, ""),
            (["--warning", "0.000001"], 1, "over --warning 1e-06 s"),
            (["--warning", "0.000001", "--critical", "0.000002"], 2, "over --critical 2e-06 s"),
        ]:
            result = run(*args, *self.target)
            self.assertEqual(result.returncode, status, args)
            self.assertIn(message, result.stderr.decode())
            self.assertEqual(result.stdout, b"Thank you for connecting\n")

    def test_json(self):
        result = run("--json", "--count", "3", "--interval", "0.05", "--warning", "10",
                     *self.target)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        *probes, summary = records(result)
        self.assertEqual([probe["seq"] for probe in probes], [1, 2, 3])
        for probe in probes:
            self.assertEqual(
                {key: probe[key] for key in ("type", "target", "address", "port", "ok", "state",
                                             "error", "bytes", "banner", "truncated")},
                {"type": "probe", "target": "127.0.0.1", "address": "127.0.0.1",
                 "port": self.port, "ok": True, "state": "OK", "error": None, "bytes": 26,
                 "banner": "Thank you for connecting\r\n", "truncated": False})
            self.assertLessEqual(probe["connect_ms"], probe["total_ms"])
        self.assertEqual(
            {key: summary[key] for key in ("type", "probes", "ok", "failed", "loss_pct",
                                           "state", "exit_status", "interrupted")},
            {"type": "summary", "probes": 3, "ok": 3, "failed": 0, "loss_pct": 0.0,
             "state": "OK", "exit_status": 0, "interrupted": False})
        self.assertEqual(summary["total_ms"]["max"], max(p["total_ms"] for p in probes))

    def test_worst_probe_decides(self):
        result = run("--json", "--count", "2", "--interval", "0.05", "--warning", "0.000001",
                     *self.target)
        self.assertEqual(result.returncode, 1)
        self.assertEqual([record["state"] for record in records(result)],
                         ["WARNING", "WARNING", "WARNING"])

    def test_plugin(self):
        result = run("--plugin", "--warning", "1", "--critical", "2", *self.target)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertRegex(result.stdout.decode(),
                         rf"^TCP OK - \d\.\d{{3}} second response time on 127\.0\.0\.1 port "
                         rf"{self.port} \[Thank you for connecting\]\|time=\d\.\d{{6}}s;"
                         r"1\.000000;2\.000000;0\.000000;5\.000000 "
                         r"connect=\d\.\d{6}s;;;0\.000000;5\.000000 "
                         r"firstbyte=\d\.\d{6}s;;;0\.000000;5\.000000\n$")


class RefusedTests(SynchronousTestCase):
    def closed_port(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def test_refused_state(self):
        port = str(self.closed_port())
        for state, status in (("ok", 0), ("warn", 1), ("crit", 2)):
            result = run("--plugin", "--refused-state", state, "127.0.0.1", port)
            self.assertEqual(result.returncode, status, state)
            self.assertEqual(result.stdout.decode(), f"TCP {('OK', 'WARNING', 'CRITICAL')[status]}"
                                                     f" - connection refused on 127.0.0.1 port "
                                                     f"{port}\n")


@skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
class FamilyTests(SynchronousTestCase):
    def test_ipv6(self):
        server = start_server(self, "--listen", r"tcp6:0:interface=\:\:1", "--quiet")
        [probe, _] = records(run("-6", "--json", "::1", str(server.port)))
        self.assertEqual((probe["address"], probe["ok"], probe["banner"]),
                         ("::1", True, "Thank you for connecting\r\n"))


class ResolutionTests(SynchronousTestCase):
    def test_a_name_without_an_address_of_the_family(self):
        # Not a usage mistake, as an address of the other family is: the
        # name's addresses are the name service's answer, and can change.
        # (Not ::1, which glibc also gives as 127.0.0.1 to an IPv4 lookup.)
        hosts = temporary_file(self, b"fd00:1::a only-six.test\n")
        result = run_with_hosts(self, hosts, "-4", "only-six.test", "25")
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (2, 1))
        self.assertRegex(result.stderr.decode(),
                         r"^tcpgreet-client: only-six\.test: failed at resolve: "
                         r"has no IPv4 address$")
        # The name does resolve, to its one IPv6 address.
        result = run_with_hosts(self, hosts, "-6", "--json", "-t", "2", "only-six.test", "25")
        self.assertEqual(records(result)[0]["tried"], ["fd00:1::a"])


def run_with_hosts(testcase, hosts: str, *args: str) -> Finished:
    """
    The client with C{hosts} in place of /etc/hosts, in a mount namespace
    of its own, so that a name has exactly the addresses a test gives it.
    """
    unshare = require_tool(testcase, "unshare")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        testcase.skipTest(f"cannot make a mount namespace: {probe.stderr.decode().strip()}")
    return run_command([unshare, "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                        hosts, *CLIENT, *args])


def run_command(command: list[str]) -> Finished:
    result = subprocess.run(command, capture_output=True, timeout=30,
                            stdin=subprocess.DEVNULL, cwd=NEUTRAL_CWD)
    return Finished(result.returncode, result.stdout, result.stderr, 0.0)


class HostileServerTests(SynchronousTestCase):
    def test_escape_sequences_never_reach_the_terminal(self):
        for form in ([], ["--count", "1"], ["--json"], ["--plugin"], ["--expect", "^220"]):
            server = SocketServer(self, sends(HOSTILE))
            result = run(*form, *server.target)
            for output in (result.stdout, result.stderr):
                self.assertNotIn(b"\x1b", output, form)
                self.assertNotIn(b"\x07", output, form)
            if form == ["--json"]:
                self.assertEqual(records(result)[0]["banner"],
                                 HOSTILE.decode("utf-8", "backslashreplace"))
            else:
                self.assertIn(b"\\x1b]0;pwned\\x07\\x1b[2J hello \\xff\\xfe\\xc3",
                              result.stdout + result.stderr, form)

    def test_raw_passes_the_bytes_through(self):
        server = SocketServer(self, sends(HOSTILE))
        result = run("--raw", *server.target)
        self.assertEqual((result.returncode, result.stdout), (0, HOSTILE))

    def test_endless_stream_stops_at_max_bytes(self):
        sent = []

        def stream(connection):
            chunk = b"y" * 65536
            total = 0
            try:
                while total < 2**31:
                    connection.sendall(chunk)
                    total += len(chunk)
            finally:
                sent.append(total)

        server = SocketServer(self, stream)
        finished, peak = self.run_measured("--json", "--max-bytes", "100000", *server.target)
        probe = records(finished)[0]
        self.assertEqual((finished.returncode, probe["bytes"], probe["truncated"], probe["ok"]),
                         (0, 100000, True, True))
        self.assertTrue(server.handled.wait(10), "the client closed the connection")
        self.assertLess(sent[0], 2**31)
        _, baseline = self.run_measured("--version")
        self.assertLess(peak, baseline + 32 * 1024, "kilobytes of peak memory")

    def run_measured(self, *args):
        """Run the client; its result and peak resident memory in kilobytes."""
        finished = run_measured(*args)
        return finished, finished.peak_kb

    def test_silent_server_times_out_on_time(self):
        server = SocketServer(self, lambda connection: connection.recv(1))
        result = run("--json", "--timeout", "1", *server.target)
        [probe, _] = records(result)
        self.assertEqual((result.returncode, probe["error"], probe["connect_ms"] is not None),
                         (2, "timed out waiting for a banner (does the server wait for the "
                             "client? try --send or --tls)", True))
        self.assertGreaterEqual(probe["total_ms"], 1000)
        self.assertLess(probe["total_ms"], 1500)
        self.assertLess(result.elapsed, 1 + 10, "start-up included, not much later")

    def test_silent_server_in_plain_mode(self):
        server = SocketServer(self, lambda connection: connection.recv(1))
        result = run("-t", "0.5", *server.target)
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: 127.0.0.1 port {server.port}: failed at read: "
                         "timed out waiting for a banner (does the server wait for the "
                         "client? try --send or --tls)\n")

    def test_reset_is_critical(self):
        def reset(connection):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        server = SocketServer(self, reset)
        result = run(*server.target)
        self.assertEqual(result.returncode, 2)
        # The reset may reach the client before Twisted has seen its
        # connection made: then the connection itself failed.
        self.assertRegex(result.stderr.decode(), rf"^tcpgreet-client: 127\.0\.0\.1 port "
                                                 rf"{server.port}: failed at (read|connect): "
                                                 r"connection reset by peer\n$")


class ConversationTests(SynchronousTestCase):
    """Servers that speak first and then wait: --first-line, --send, --source."""

    def test_first_line(self):
        closed = threading.Event()

        def greet_and_wait(connection):
            connection.sendall(b"220 mail.example ESMTP ready\r\n")
            if connection.recv(1) == b"":
                closed.set()

        server = SocketServer(self, greet_and_wait)
        result = run("--first-line", "--json", "--timeout", "20", *server.target)
        [probe, _] = records(result)
        self.assertEqual((result.returncode, probe["banner"], probe["truncated"]),
                         (0, "220 mail.example ESMTP ready\r\n", False))
        self.assertLess(probe["total_ms"], 10000, "did not wait for the timeout")
        self.assertTrue(closed.wait(10), "the client closed the connection")

    def test_send(self):
        def answer(connection):
            line = b""
            while not line.endswith(b"\n"):
                data = connection.recv(100)
                if not data:
                    break
                line += data
            connection.sendall(b"221 got " + line)

        server = SocketServer(self, answer)
        result = run("--send", "QUIT\\r\\n", *server.target)
        self.assertEqual((result.returncode, result.stdout), (0, b"221 got QUIT\n"))

    def test_source_address(self):
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.2", 0))
        except OSError:
            self.skipTest("cannot bind 127.0.0.2 here")
        server = SocketServer(self, sends(b"hi\r\n"))
        result = run("--source", "127.0.0.2", *server.target)
        self.assertEqual((result.returncode, server.peers[0][0]), (0, "127.0.0.2"))

    def test_source_address_not_here(self):
        # A mistake on the command line, not the server's failure: UNKNOWN,
        # whatever the form, and no connection made.
        server = SocketServer(self, sends(b"hi\r\n"))
        for form in ([], ["--json"], ["--plugin"], ["-c", "3"]):
            result = run(*form, "-s", "192.0.2.1", *server.target)
            self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                             (3, b"", "tcpgreet-client: --source 192.0.2.1: not an address "
                                      "of this machine\n"), form)
        self.assertFalse(server.accepted.is_set())


class InterruptTests(SynchronousTestCase):
    def test_ctrl_c_prints_the_summary(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        client = ClientProcess(self, "--count", "0", "--interval", "0.1",
                               server.host, str(server.port))
        lines = [client.read_line(), client.read_line()]
        client.signal(signal.SIGINT)
        returncode, rest, stderr = client.finish()
        lines += rest
        self.assertEqual((returncode, stderr), (0, ""))
        probes = [line for line in lines if PROBE_OK.match(line)]
        self.assertGreaterEqual(len(probes), 2)
        self.assertEqual(lines[len(probes):len(probes) + 3],
                         ["", f"--- 127.0.0.1 port {server.port} probe statistics ---",
                          f"{len(probes)} probes, {len(probes)} ok, 0 failed, 0% loss, "
                          "state OK"])

    def test_sigterm_too(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        client = ClientProcess(self, "--json", "--count", "0", "--interval", "0.1",
                               server.host, str(server.port))
        first = json.loads(client.read_line())
        client.signal(signal.SIGTERM)
        returncode, rest, stderr = client.finish()
        summary = json.loads(rest[-1])
        self.assertEqual((first["ok"], returncode, stderr), (True, 0, ""))
        self.assertEqual((summary["type"], summary["probes"], summary["interrupted"]),
                         ("summary", len(rest), True))

    def test_ctrl_c_during_a_probe(self):
        server = SocketServer(self, lambda connection: connection.recv(1))
        client = ClientProcess(self, "--json", "--count", "0", "--timeout", "30",
                               *server.target)
        self.assertTrue(server.accepted.wait(15), "the client connected")
        client.signal(signal.SIGINT)
        returncode, rest, stderr = client.finish()
        self.assertEqual((returncode, stderr), (3, ""))
        self.assertEqual([json.loads(line)["probes"] for line in rest], [0])
        self.assertTrue(server.handled.wait(10), "the connection was dropped")


class MistakeTests(SynchronousTestCase):
    def test_usage_error_is_unknown(self):
        result = run("--timeout", "soon")
        self.assertEqual((result.returncode, result.stdout), (3, b""))
        self.assertEqual(result.stderr, b"tcpgreet-client: --timeout 'soon': not a number of "
                                        b"seconds (see --help)\n")

    def test_unresolvable_name(self):
        # The resolver of the machine decides: "does not exist" here, or a
        # name server that cannot be reached, which is said after the colon.
        result = run("no-such-host.invalid", "80")
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertRegex(result.stderr.decode(), r"^tcpgreet-client: no-such-host\.invalid: "
                                                 r"failed at resolve: "
                                                 r"name not resolved(: [^\n]+)?\n$")
        result = run("--plugin", "no-such-host.invalid", "80")
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stdout.decode(), r"^TCP CRITICAL - no-such-host\.invalid: "
                                                 r"name not resolved(: [^|\n]+)?\n$")
        [probe, summary] = records(run("--json", "no-such-host.invalid", "80"))
        self.assertRegex(probe["error"], r"^name not resolved(: .+)?$")
        self.assertEqual((probe["ok"], probe["tried"], summary["failed"]), (False, [], 1))

    def test_help(self):
        result = run("--help")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        for option in (b"--count", b"--interval", b"--expect", b"--json", b"--plugin", b"--tls",
                       b"--max-bytes", b"--first-line", b"--raw", b"--cert-days", b"--source",
                       b"-H, --host", b"-p, --port", b"-h, --help"):
            self.assertIn(option, result.stdout)
        short = run("-h")
        self.assertEqual((short.returncode, short.stdout, short.stderr), (0, result.stdout, b""))

    def test_address_of_the_other_family_is_unknown(self):
        for args, message in [(["-4", "::1"], "-4: ::1 is an IPv6 address"),
                              (["-6", "127.0.0.1", "25"], "-6: 127.0.0.1 is an IPv4 address")]:
            result = run(*args)
            self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                             (3, b"", f"tcpgreet-client: {message} (see --help)\n"))

    def test_unknown_service_name(self):
        result = run("127.0.0.1", "no-such-service")
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (3, "tcpgreet-client: bad port 'no-such-service': not a number or a "
                             "known TCP service name (see --help)\n"))


class CommandLineTests(SynchronousTestCase):
    """The target in the forms people type, against the real server."""

    def setUp(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        self.host, self.port = server.host, str(server.port)

    def test_options_after_the_target(self):
        # As README shows it: tcpgreet-client mail.example.net 25 --first-line
        result = run(self.host, self.port, "--first-line", "-e", "^Thank")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b"Thank you for connecting\n", b""))

    def test_check_tcp_style(self):
        for args in (["-H", self.host, "-p", self.port], ["-p", self.port, self.host],
                     [self.host, "-p", self.port]):
            result = run("--plugin", *args)
            self.assertEqual(result.returncode, 0, args)
            self.assertIn(f" on 127.0.0.1 port {self.port} [Thank you for connecting]",
                          result.stdout.decode())
        result = run("-H", self.host, self.host, self.port)
        self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                         (3, b"", "tcpgreet-client: host given twice: --host '127.0.0.1' and "
                                  "'127.0.0.1' (see --help)\n"))


class UnixSocketTests(SynchronousTestCase):
    """unix:PATH against C{twistd tcpgreet --listen unix:PATH}."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="tcpgreet-client-unix-")
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def serve(self):
        path = os.path.join(self.directory, "greet.sock")
        server = Server("--listen", f"unix:{path}", "--quiet")
        self.addCleanup(server.stop)
        server.wait_for(rf"listening on unix:{re.escape(path)} ")
        return path

    def test_banner(self):
        path = self.serve()
        result = run(f"unix:{path}")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b"Thank you for connecting\n", b""))

    def test_the_path_is_the_target(self):
        path = self.serve()
        [probe, summary] = records(run("--json", f"unix:{path}"))
        self.assertEqual(
            {key: probe[key] for key in ("target", "port", "address", "tried", "ok", "banner")},
            {"target": f"unix:{path}", "port": None, "address": path, "tried": [path],
             "ok": True, "banner": "Thank you for connecting\r\n"})
        self.assertEqual((summary["target"], summary["port"], summary["state"]),
                         (f"unix:{path}", None, "OK"))
        result = run("--plugin", "-H", f"unix:{path}")
        self.assertRegex(result.stdout.decode(),
                         rf"^TCP OK - \d\.\d{{3}} second response time on unix:{re.escape(path)} "
                         r"\[Thank you for connecting\]\|time=")
        result = run("-c", "2", "-i", "0.05", f"unix:{path}")
        self.assertEqual((result.returncode, result.lines[0].split(" seq=")[0], result.lines[3]),
                         (0, f"unix:{path}", f"--- unix:{path} probe statistics ---"))

    def test_no_such_socket(self):
        path = os.path.join(self.directory, "missing.sock")
        result = run(f"unix:{path}")
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (2, f"tcpgreet-client: unix:{path}: failed at connect: no such socket\n"))

    def test_refused(self):
        path = os.path.join(self.directory, "nobody.sock")
        with socket.socket(socket.AF_UNIX) as bound_but_not_listening:
            bound_but_not_listening.bind(path)
        result = run("--plugin", f"unix:{path}")
        self.assertEqual((result.returncode, result.stdout.decode()),
                         (2, f"TCP CRITICAL - connection refused on unix:{path}\n"))

    def test_a_path_has_no_port(self):
        result = run("unix:/run/greet.sock", "25")
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (3, "tcpgreet-client: unix:/run/greet.sock is a UNIX socket, which "
                             "has no port: '25' (see --help)\n"))



@skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
class EveryAddressTests(SynchronousTestCase):
    """
    A name with both 127.0.0.1 and ::1 (a hosts file of the test's own), a
    server on the first and the same port refused on the second.
    """

    def setUp(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        self.port = str(server.port)
        self.refusing = socket.socket(socket.AF_INET6)
        self.addCleanup(self.refusing.close)
        try:
            self.refusing.bind(("::1", server.port))  # bound, not listening: refused
        except OSError as e:
            self.skipTest(f"port {server.port} is taken on ::1: {e}")
        self.hosts = temporary_file(self, b"127.0.0.1 dual.test\n::1 dual.test\n")

    def test_two_results_worst_state(self):
        result = run_with_hosts(self, self.hosts, "--all-addresses", "--json", "dual.test",
                                self.port)
        *probes, summary = records(result)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(sorted((p["address"], p["state"], p["stage"]) for p in probes),
                         [("127.0.0.1", "OK", None), ("::1", "CRITICAL", "connect")])
        self.assertEqual((summary["state"], summary["addresses"]["::1"]["state"],
                          summary["addresses"]["127.0.0.1"]["state"]),
                         ("CRITICAL", "CRITICAL", "OK"))
        result = run_with_hosts(self, self.hosts, "--plugin", "--all-addresses", "dual.test",
                                self.port)
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stdout.decode(), r"^TCP CRITICAL - .*connection refused on "
                                                 r"dual\.test port \d+ \(::1\)")

    def test_the_banner_form_names_each_address(self):
        result = run_with_hosts(self, self.hosts, "--all-addresses", "dual.test", self.port)
        self.assertEqual((result.returncode, result.stdout), (2, b"Thank you for connecting\n"))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: dual.test port {self.port} (::1): failed at "
                         "connect: connection refused\n")

    def test_any_address_is_the_best(self):
        result = run_with_hosts(self, self.hosts, "--any-address", "--json", "dual.test",
                                self.port)
        *probes, summary = records(result)
        self.assertEqual((result.returncode, len(probes), summary["state"]), (0, 2, "OK"))

    def test_without_it_ipv6_first_then_the_next(self):
        result = run_with_hosts(self, self.hosts, "--json", "dual.test", self.port)
        [probe, _] = records(result)
        self.assertEqual((result.returncode, probe["tried"], probe["address"], probe["state"]),
                         (0, ["::1", "127.0.0.1"], "127.0.0.1", "OK"))
        self.assertIsNotNone(probe["dns_ms"])


class StageTests(SynchronousTestCase):
    """Each kind of failure names its stage, in JSON and in the text line."""

    def stage(self, *args):
        [probe, _] = records(run("--json", *args))
        text = run(*args).stderr.decode()
        return probe["stage"], probe["error"], text

    def test_every_stage(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        target = [server.host, str(server.port)]
        silent = SocketServer(self, lambda connection: connection.recv(1), connections=2)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = str(s.getsockname()[1])
        for args, stage in [
            (["no-such-host.invalid", "80"], "resolve"),
            (["127.0.0.1", closed], "connect"),
            (["--tls", "--timeout", "2", *target], "tls"),
            (["--timeout", "0.5", *silent.target], "read"),
            (["--expect", "^220", *target], "expect"),
            (["--reject", "^Thank", *target], "reject"),
        ]:
            found, error, text = self.stage(*args)
            self.assertEqual(found, stage, args)
            self.assertIn(f": failed at {stage}: {error}", text, args)

    def test_reject_comes_first_and_expect_repeats(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        target = [server.host, str(server.port)]
        for args, status, error in [
            (["--reject", "^5", "--expect", "^Thank"], 0, None),
            (["--reject", "connecting", "--expect", "^220"], 2,
             "banner matches --reject 'connecting'"),
            (["--expect", "^Thank", "--expect", "you"], 0, None),
            (["--expect", "^Thank", "--expect", "^220"], 2, "banner does not match '^220'"),
            (["--expect-any", "--expect", "^220", "-e", "^Thank"], 0, None),
            (["--expect-any", "--expect", "^220", "-e", "^SSH"], 2,
             "banner matches none of '^220', '^SSH'"),
        ]:
            result = run("--json", *args, *target)
            self.assertEqual((result.returncode, records(result)[0]["error"]), (status, error),
                             args)
