"""
Where a banner ends, against real processes on loopback: a server that
closes without a byte (socat, tcpgreet refusing by a limit, a PROXY-protocol
listener probed without a header), servers that greet and then wait (a
scripted one, and a real OpenSSH sshd), one that waits for a request
(Python's http.server), a banner in pieces, and a timeout after part of
one; in the text, probe-line, --plugin and --json forms.
"""

import json
import re
import socket
import sys

from twisted.trial.unittest import SynchronousTestCase

from ..clientprocess import run, start_talker
from ..helpers import NEUTRAL_CWD, Program, require_tool, start_server
from ..sshd import start_sshd

LOCAL = "tcp:0:interface=127.0.0.1"
# check_tcp's time=, then each stage's time (connect=, firstbyte=, ...).
PERFORMANCE = (r"\|time=\d+\.\d{6}s;;;0\.000000;\d+\.\d{6}"
               r"( [a-z]+=\d+\.\d{6}s;;;0\.000000;\d+\.\d{6})*\n$")
SSH_BANNER = re.compile(rb"^SSH-2\.0-OpenSSH_[^\r\n]+\n$")


def records(finished):
    return [json.loads(line) for line in finished.stdout.decode("ascii").splitlines()]


def pick(record, *keys):
    return {key: record[key] for key in keys}


def start_closing_socat(testcase) -> list[str]:
    """socat accepting on a free loopback port and closing each connection at once."""
    socat = require_tool(testcase, "socat")
    program = Program([socat, "-d", "-d", "TCP-LISTEN:0,bind=127.0.0.1,fork,reuseaddr",
                       "SYSTEM:true"])
    testcase.addCleanup(program.stop)
    port = program.wait_for(r"listening on AF=2 127\.0\.0\.1:(\d+)", timeout=15).group(1)
    return ["127.0.0.1", port]


class EmptyReplyTests(SynchronousTestCase):
    """A server that accepts and closes without a byte has not answered."""

    def test_socat_closing_at_once(self):
        target = start_closing_socat(self)
        where = f"127.0.0.1 port {target[1]}"
        result = run(*target)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (2, b"", f"tcpgreet-client: {where}: failed at read: closed without a "
                                   "banner\n".encode()))

        result = run("--plugin", *target)
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stdout.decode(),
                         rf"^TCP CRITICAL - closed without a banner on {where}{PERFORMANCE}")

        [probe, summary] = records(run("--json", *target))
        self.assertEqual(pick(probe, "ok", "state", "error", "reason", "bytes", "banner"),
                         {"ok": False, "state": "CRITICAL", "error": "closed without a banner",
                          "reason": "closed without a banner", "bytes": 0, "banner": None})
        self.assertIsNotNone(probe["connect_ms"])
        self.assertEqual(pick(summary, "ok", "failed", "exit_status"),
                         {"ok": 0, "failed": 1, "exit_status": 2})

    def test_empty_state(self):
        target = start_closing_socat(self)
        result = run("--plugin", "--empty-state", "warn", *target)
        self.assertEqual(result.returncode, 1)
        self.assertTrue(result.stdout.startswith(b"TCP WARNING - closed without a banner on "),
                        result.stdout)
        finished = run("--json", "--empty-state", "ok", *target)
        [probe, _] = records(finished)
        self.assertEqual((finished.returncode, probe["ok"], probe["state"], probe["reason"]),
                         (0, False, "OK", None), "OK by choice, but no banner was read")

    def test_tcpgreet_refusing_by_rate_counts_as_loss(self):
        # One connection, then a token every 1000 s: every later probe is refused.
        server = start_server(self, "--listen", LOCAL, "--quiet", "--rate-per-ip", "0.001/1")
        result = run("--count", "3", "--interval", "0.05", server.host, str(server.port))
        lines = result.lines
        self.assertEqual((result.returncode, result.stderr), (2, b""))
        self.assertRegex(lines[0], r"seq=1: OK connect .*, 26 bytes: Thank you for connecting$")
        for line, seq in ((lines[1], 2), (lines[2], 3)):
            self.assertRegex(line, rf"^127\.0\.0\.1 port {server.port} seq={seq}: CRITICAL "
                                   r"failed at read: closed without a banner after \d+\.\d{3} ms$")
        self.assertEqual(lines[5], "3 probes, 1 ok, 2 failed, 66.7% loss, state CRITICAL")

    def test_proxy_listener_probed_without_a_header(self):
        # The listener waits a few seconds for the header, then closes.
        server = start_server(self, "--listen", f"haproxy:{LOCAL}", "--quiet")
        finished = run("--json", "--timeout", "20", server.host, str(server.port))
        [probe, _] = records(finished)
        self.assertEqual(finished.returncode, 2)
        self.assertEqual(pick(probe, "ok", "state", "error", "bytes"),
                         {"ok": False, "state": "CRITICAL", "error": "closed without a banner",
                          "bytes": 0})


class SilenceTests(SynchronousTestCase):
    """Servers that greet and then wait: their silence ends the banner."""

    GREETING = "220 mail.example ESMTP ready"

    def test_greets_and_waits(self):
        talker = start_talker(self, f"send:{self.GREETING}\\r\\n", "hold")
        target = [talker.host, str(talker.port)]
        result = run(*target)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, f"{self.GREETING}\n".encode(), b""))
        talker.wait_for(r"^connection 1: client closed$")

        result = run("--plugin", *target)
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout.decode(),
                         rf"^TCP OK - \d+\.\d{{3}} second response time on 127\.0\.0\.1 port "
                         rf"{talker.port} \[{self.GREETING}\]{PERFORMANCE}")

        finished = run("--json", "--count", "2", "--interval", "0.1", *target)
        *probes, summary = records(finished)
        for probe in probes:
            self.assertEqual(pick(probe, "ok", "state", "bytes", "banner", "ended_by"),
                             {"ok": True, "state": "OK", "bytes": 30,
                              "banner": f"{self.GREETING}\r\n", "ended_by": "idle"})
            self.assertLess(probe["total_ms"], 1000, "the total ends with the last byte")
        self.assertEqual((finished.returncode, summary["ok"]), (0, 2))

    def test_a_banner_in_pieces_is_read_whole(self):
        # A pause well below the default --idle of 1 s, as a slow link makes.
        talker = start_talker(self, "send:220-first line\\r\\n", "pause:0.3",
                              "send:220 second line\\r\\n", "hold")
        result = run(talker.host, str(talker.port))
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b"220-first line\n220 second line\n", b""))

    def test_expect_judges_what_the_silence_ended(self):
        talker = start_talker(self, f"send:{self.GREETING}\\r\\n", "hold")
        result = run("--plugin", "--expect", "^SSH-", talker.host, str(talker.port))
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stdout.decode().startswith(
            "TCP CRITICAL - banner does not match '^SSH-'; "), result.stdout)


class PartialBannerTests(SynchronousTestCase):
    """A timeout after the first bytes reports them."""

    def setUp(self):
        self.talker = start_talker(self, "send:220-partial", "hold")
        self.target = [self.talker.host, str(self.talker.port)]
        self.where = f"127.0.0.1 port {self.talker.port}"

    def test_text(self):
        result = run("--idle", "0", "--timeout", "1", *self.target)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (2, b"220-partial\n",
                          f"tcpgreet-client: {self.where}: failed at read: timed out after 11 "
                          "bytes\n".encode()))

    def test_plugin(self):
        result = run("--plugin", "--idle", "0", "--timeout", "1", *self.target)
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stdout.decode(), rf"^TCP CRITICAL - timed out after 11 bytes on "
                                                 rf"{self.where} \[220-partial\]{PERFORMANCE}")

    def test_json(self):
        finished = run("--json", "--idle", "0", "--timeout", "1", *self.target)
        [probe, _] = records(finished)
        self.assertEqual(finished.returncode, 2)
        self.assertEqual(pick(probe, "ok", "state", "error", "bytes", "banner", "ended_by"),
                         {"ok": False, "state": "CRITICAL", "error": "timed out after 11 bytes",
                          "bytes": 11, "banner": "220-partial", "ended_by": None})
        self.assertGreaterEqual(probe["total_ms"], 1000)

    def test_a_trickle_never_falls_silent(self):
        # A byte every 0.2 s, for longer than the timeout: never the 1 s of
        # silence that ends a banner, so the timeout ends it, with what came.
        talker = start_talker(self, "trickle:220-slow and steady..........:0.2", "hold")
        finished = run("--json", "--timeout", "3", talker.host, str(talker.port))
        [probe, _] = records(finished)
        self.assertEqual((finished.returncode, probe["ok"]), (2, False))
        self.assertGreaterEqual(probe["bytes"], 2)
        self.assertEqual(probe["error"], f"timed out after {probe['bytes']} bytes")
        self.assertTrue("220-slow and steady..........".startswith(probe["banner"]), probe)
        self.assertEqual(len(probe["banner"]), probe["bytes"])


class RequestFirstTests(SynchronousTestCase):
    """
    A server that says nothing until the client speaks (Python's
    http.server): no banner, and the line says what to try, --send first.
    """

    def setUp(self):
        server = Program([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1",
                          "--directory", NEUTRAL_CWD, "0"])
        self.addCleanup(server.stop)
        port = server.wait_for(r"^Serving HTTP on 127\.0\.0\.1 port (\d+) ", timeout=15).group(1)
        self.target = ["127.0.0.1", port]

    def test_silence_suggests_send(self):
        result = run("--timeout", "1", *self.target)
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: 127.0.0.1 port {self.target[1]}: failed at read: "
                         "timed out waiting for a banner (does the server wait for the client? "
                         "try --send or --tls)\n")

    def test_a_request_gets_the_answer(self):
        result = run("--send", "GET / HTTP/1.0\\r\\n\\r\\n", "--first-line", *self.target)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertRegex(result.stdout, rb"^HTTP/1\.[01] 200 OK\n$")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, never listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenSSHTests(SynchronousTestCase):
    """The real thing: sshd sends its banner and waits for the client's."""

    def test_default_command_prints_the_banner(self):
        sshd = start_sshd(self)
        target = [sshd.host, str(sshd.port)]
        # The client's own share of the time: a whole probe that ends at once
        # (refused), which imports and starts all that this one does.
        start_up = run("127.0.0.1", str(closed_port())).elapsed
        result = run(*target)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertRegex(result.stdout, SSH_BANNER)
        self.assertLess(result.elapsed, start_up + 2.0, "seconds; no wait for the timeout")

        finished = run("--json", *target)
        [probe, _] = records(finished)
        self.assertEqual((finished.returncode, probe["ok"], probe["ended_by"]), (0, True, "idle"))
        self.assertRegex(probe["banner"].encode().replace(b"\r\n", b"\n"), SSH_BANNER)

        result = run("--plugin", "--expect", "^SSH-2\\.0-", *target)
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout.decode(), r"^TCP OK - \d+\.\d{3} second response time on "
                                                 rf"127\.0\.0\.1 port {sshd.port} "
                                                 rf"\[SSH-2\.0-OpenSSH_[^\]]+\]{PERFORMANCE}")

    def test_first_line_does_not_wait_for_the_silence(self):
        sshd = start_sshd(self)
        [probe, _] = records(run("--json", "--first-line", sshd.host, str(sshd.port)))
        self.assertEqual((probe["ok"], probe["ended_by"]), (True, "newline"))
        self.assertTrue(probe["banner"].startswith("SSH-2.0-OpenSSH_"), probe)
