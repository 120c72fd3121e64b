"""
End to end: the real twistd, the real client, raw sockets, on loopback.
"""

import json
import os
import re
import signal
import socket
import tempfile
from pathlib import Path
from unittest import skipUnless

from twisted.trial.unittest import SynchronousTestCase

from .helpers import (
    fetch,
    has_ipv6_loopback,
    run_client,
    run_twistd,
    start_server,
    temporary_file,
    twistd,
)

LOCAL = "tcp:0:interface=127.0.0.1"
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
_TWISTD_VERSION = re.compile(r"twistd \S+ \(.*\) starting up")
DEFAULT = b"Thank you for connecting\r\n"


class GreetingTests(SynchronousTestCase):
    def test_default_greeting_exact_bytes_then_eof(self):
        server = start_server(self, "--listen", LOCAL)
        self.assertEqual(fetch(server.host, server.port), DEFAULT)
        server.wait_for(r"127\.0\.0\.1 port \d+: greeted, 26 bytes")

    def test_client_prints_the_greeting(self):
        server = start_server(self, "--listen", LOCAL)
        result = run_client(server.host, str(server.port))
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "Thank you for connecting\n", ""))
        result = run_client(f"{server.host}:{server.port}")
        self.assertEqual((result.returncode, result.stdout), (0, "Thank you for connecting\n"))

    def test_client_against_a_closed_port(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            result = run_client("127.0.0.1", str(port))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr,
                         f"tcpgreet-client: 127.0.0.1 port {port}: failed at connect: "
                         "connection refused\n")

    def test_template_greeting(self):
        server = start_server(self, "--listen", LOCAL,
                              "--greeting", "hi {peer_host}:{peer_port} #{connection}")
        for number in (1, 2):
            with socket.create_connection((server.host, server.port), timeout=5) as s:
                local_port = s.getsockname()[1]
                data = b"".join(iter(lambda s=s: s.recv(4096), b""))
            self.assertEqual(data, f"hi 127.0.0.1:{local_port} #{number}\r\n".encode())

    def test_greeting_file_and_sighup_reload(self):
        path = self.greeting_file(b"first\nline two\n")
        server = start_server(self, "--listen", LOCAL, "--greeting-file", path)
        self.assertEqual(fetch(server.host, server.port), b"first\r\nline two\r\n")
        with open(path, "wb") as f:
            f.write(b"second\n")
        server.signal(signal.SIGHUP)
        server.wait_for(r"reloaded greeting from .*: 8 bytes")
        self.assertEqual(fetch(server.host, server.port), b"second\r\n")
        with open(path, "wb") as f:
            f.write(b"\xff\xfe broken\n")
        server.signal(signal.SIGHUP)
        server.wait_for(r"reload failed, keeping the previous greeting: .*not UTF-8")
        self.assertEqual(fetch(server.host, server.port), b"second\r\n")

    def test_sighup_without_a_file_does_not_kill(self):
        server = start_server(self, "--listen", LOCAL)
        server.signal(signal.SIGHUP)
        server.wait_for("SIGHUP: nothing to reload")
        self.assertEqual(fetch(server.host, server.port), DEFAULT)

    def test_client_data_is_discarded(self):
        server = start_server(self, "--listen", LOCAL)
        self.assertEqual(fetch(server.host, server.port, send=b"HELLO?\r\n" * 10), DEFAULT)

    def test_several_listeners(self):
        server = start_server(self, "--listen", LOCAL, "--listen", LOCAL, "--quiet")
        ports = [int(p) for p in re.findall(r"\(127\.0\.0\.1:(\d+)\)", server.log)]
        self.assertEqual(len(set(ports)), 2)
        for port in ports:
            self.assertEqual(fetch("127.0.0.1", port), DEFAULT)

    def test_quiet_logs_no_connection_lines(self):
        server = start_server(self, "--listen", LOCAL, "--quiet")
        fetch(server.host, server.port)
        server.stop()
        self.assertNotIn("greeted", server.log)

    def test_json_log_lines(self):
        server = start_server(self, "--listen", LOCAL,
                              twistd_args=("--logger", "tcpgreet.logs.json_observer"))
        fetch(server.host, server.port)
        line = server.wait_for(r'"outcome": "greeted"').string
        record = json.loads(line)
        self.assertEqual((record["peer"], record["outcome"], record["bytes"], record["reason"]),
                         ("127.0.0.1", "greeted", 26, None))
        self.assertIsInstance(record["port"], int)
        self.assertIsInstance(record["duration_ms"], float)
        self.assertEqual(record["namespace"], "tcpgreet.server")
        self.assertIn("greeted, 26 bytes in", record["message"])
        server.stop()
        for line in server.lines:  # every line of the log is one JSON object
            json.loads(line)

    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    def test_ipv6(self):
        server = start_server(self, "--listen", r"tcp6:0:interface=\:\:1",
                              "--greeting", "[{peer_host}]")
        self.assertEqual(server.host, "::1")
        self.assertEqual(fetch("::1", server.port), b"[::1]\r\n")
        result = run_client(f"[::1]:{server.port}")
        self.assertEqual((result.returncode, result.stdout), (0, "[::1]\n"))
        result = run_client("::1", str(server.port))
        self.assertEqual((result.returncode, result.stdout), (0, "[::1]\n"))

    def test_default_port_is_27679(self):
        server = start_server(self)
        self.assertEqual(server.port, 27679)
        self.assertEqual(fetch("127.0.0.1", 27679), DEFAULT)

    def greeting_file(self, data):
        return temporary_file(self, data)


class StartupErrorTests(SynchronousTestCase):
    """Each mistake: non-zero exit, one line naming the culprit, no traceback."""

    def assertFails(self, args, expected):
        result = run_twistd(*args)
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertRegex(lines[0], expected)
        return lines[0]

    def test_port_in_use(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            self.assertFails(["--listen", f"tcp:{port}:interface=127.0.0.1"],
                             rf"^tcpgreet: cannot listen on 'tcp:{port}:interface=127\.0\.0\.1': "
                             r"address already in use$")

    def test_a_port_in_use_shows_what_readme_says(self):
        # README's transcript, for another server on port 27679: the log on
        # standard output (-n), ending with the critical event, and the one
        # line on standard error.
        readme = (Path(__file__).parent.parent / "README.rst").read_text()
        transcript = readme.split("    $ twistd -n --pidfile= tcpgreet\n", 1)[1]
        *log, error = [line.strip() for line in transcript.split("\n    $ ", 1)[0].splitlines()]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))
            s.listen(1)
            port = s.getsockname()[1]
            result = run_twistd("--listen", f"tcp:{port}")

        def shown(lines):
            return [_TWISTD_VERSION.sub("twistd VERSION", _TIME.sub("TIME", line))
                    .replace(f"tcp:{port}", "tcp:27679") for line in lines]

        self.assertEqual(result.returncode, 1)
        self.assertEqual(shown(result.stdout.splitlines()), shown(log))
        self.assertEqual(shown(result.stderr.splitlines()), [error])

    def test_invalid_endpoint(self):
        self.assertFails(["--listen", "tpc:80"],
                         r"^tcpgreet: --listen 'tpc:80': unknown endpoint type 'tpc'; "
                         r"use tcp, tcp6, ssl, unix, systemd or haproxy$")

    def test_each_mistake_names_its_culprit(self):
        see = " (see: twistd tcpgreet --help)"
        for args, line in [
            (["--listen", "tcp:abc"], "--listen 'tcp:abc': port 'abc' is not a number"),
            (["--listen", "tcp:99999"],
             "--listen 'tcp:99999': port 99999 is not between 0 and 65535"),
            (["--listen", "tcp"], "--listen 'tcp': the port is missing, e.g. tcp:27679"),
            (["--listen", "tcp:0:backlog=many"],
             "--listen 'tcp:0:backlog=many': backlog 'many' is not a number"),
            (["--listen", "tcp:0:colour=blue"],
             "--listen 'tcp:0:colour=blue': tcp endpoints have no argument 'colour'"),
            (["--listen", "tcp6:0:interface=::1"],
             "--listen 'tcp6:0:interface=::1': 'interface' is given twice "
             r"(escape the colons of an IPv6 address: interface=\:\:1)"),
            (["--listen", "unix:/tmp/g.sock:mode=rw"],
             "--listen 'unix:/tmp/g.sock:mode=rw': mode 'rw' is not an octal number"),
            (["--listen", "systemd:index=0"],
             "--listen 'systemd:index=0': 'domain' is missing (domain=INET or domain=INET6)"),
            (["--listen", "haproxy:"],
             "--listen 'haproxy:': haproxy: needs the endpoint it wraps, e.g. "
             "haproxy:tcp:27679"),
            (["--listen", "haproxy:tcp:x"], "--listen 'haproxy:tcp:x': port 'x' is not a number"),
            (["--metrics", "tcp:abc"], "--metrics 'tcp:abc': port 'abc' is not a number"),
            (["foo"], "unexpected argument 'foo': options start with -, and a value that "
                      "holds spaces needs quotes" + see),
            (["--rate-per-ip", "5/0"], "--rate-per-ip '5/0': BURST must be at least 1" + see),
            (["--rate-per-ip", "5/"], "--rate-per-ip '5/': BURST is missing after the /" + see),
            (["--rate-per-ip", "0/5"], "--rate-per-ip '0/5': R must be more than 0" + see),
            (["--rate-per-ip", "fast"], "--rate-per-ip 'fast': R is not a number" + see),
            (["--max-connections", "1e3"],
             "--max-connections: '1e3' is not a whole number" + see),
            (["--timeout", "inf"], "--timeout: 'inf' is not a finite number" + see),
            (["--workers", "many"], "--workers: 'many' is not a whole number or auto" + see),
            (["--greeting-file="], "--greeting-file: the file name is empty" + see),
        ]:
            self.assertFails(args, "^" + re.escape("tcpgreet: " + line) + "$")

    def test_missing_greeting_file(self):
        self.assertFails(["--greeting-file", "/nonexistent/motd"],
                         r"^tcpgreet: greeting file /nonexistent/motd: No such file or directory")

    def test_unreadable_greeting_file(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        self.assertFails(["--greeting-file", directory],
                         rf"^tcpgreet: greeting file {directory}: Is a directory")

    def test_non_utf8_greeting_file(self):
        path = temporary_file(self, b"\x80abc\n")
        self.assertFails(["--greeting-file", path],
                         rf"^tcpgreet: greeting file {path}: not UTF-8 \(invalid byte 0x80")

    def test_bad_templates(self):
        for template, what in [("{peer_host.__class__}", "attribute or index access"),
                               ("{x[0]}", "attribute or index access"),
                               ("{user}", "unknown placeholder"),
                               ("{peer_port:08}", "format spec")]:
            self.assertFails(["--greeting", template],
                             rf"^tcpgreet: --greeting: (placeholder|unknown placeholder) "
                             rf"{re.escape(template)}.*{what}|{what} {re.escape(template)}")

    def test_greeting_and_greeting_file(self):
        self.assertFails(["--greeting", "a", "--greeting-file", "/etc/hostname"],
                         r"--greeting and --greeting-file exclude each other")

    def test_unknown_option(self):
        self.assertFails(["--greting", "a"], r"^tcpgreet: option --greting not recognized")

    def test_missing_option_value(self):
        self.assertFails(["--listen"], r"^tcpgreet: option --listen requires argument")


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_the_plugin(self):
        result = twistd("--help")
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout, r"\n\s+tcpgreet\s+A TCP greeting")

    def test_plugin_help_shows_every_option(self):
        result = twistd("tcpgreet", "--help")
        self.assertEqual(result.returncode, 0)
        for option in ("--listen=", "--greeting=", "--greeting-file=", "--quiet"):
            self.assertIn(option, result.stdout)
        self.assertNotIn("--worker=", result.stdout)

    def test_version_names_tcpgreet_and_twisted(self):
        result = twistd("tcpgreet", "--version")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertRegex(result.stdout, r"^tcpgreet \d+\.\d+\.\d+ \(Twisted \d+\.\d+\.\d+\S*\)\n$")
