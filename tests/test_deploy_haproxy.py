"""
tcpgreet behind the real HAProxy: plain TCP relaying, the PROXY protocol
(v1 and v2) carrying the original client's address, --trusted-proxy, TLS
after the header, health checks, load balancing over several instances,
and deploy/haproxy.cfg itself.

Clients connect from 127.0.0.2 (every 127/8 address is loopback on Linux),
so the original client and HAProxy (127.0.0.1) can be told apart.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from . import tls
from .haproxy import start_haproxy
from .helpers import (
    assert_fails_in_one_line,
    fetch,
    require_tool,
    run_twistd,
    start_server,
)
from .test_metrics import samples, scrape_text

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = b"Thank you for connecting\r\n"
CLIENT = "127.0.0.2"
PLAIN = "tcp:0:interface=127.0.0.1"
PROXIED = "haproxy:tcp:0:interface=127.0.0.1"
# What deploy/haproxy.cfg checks: a TCP check that reads a whole greeting
# line, through the PROXY listener with a v2 header (LOCAL command).
GREETING_CHECK = "option tcp-check\n    tcp-check expect rstring \\r\\n"


# A header a client writes for itself, claiming an address not its own.
FORGED = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 27679\r\n"


def greeted_from(source: str, host: str, port: int, timeout: float = 10.0) -> tuple[bytes, int]:
    """Connect from C{source}, read to EOF; what was read and our own port."""
    with socket.create_connection((host, port), timeout, source_address=(source, 0)) as s:
        local_port = s.getsockname()[1]
        return b"".join(iter(lambda: s.recv(65536), b"")), local_port


def sent_to(source: str, host: str, port: int, header: bytes, timeout: float = 10.0) -> bytes:
    """
    Connect from C{source}, send C{header}, read to EOF: what came back.  A
    connection refused as it is accepted may be reset rather than closed
    (its header lay unread): that too is nothing.
    """
    with socket.create_connection((host, port), timeout, source_address=(source, 0)) as s:
        try:
            s.sendall(header)
            return b"".join(iter(lambda: s.recv(65536), b""))
        except (ConnectionResetError, BrokenPipeError):
            return b""


def temporary_directory(testcase) -> Path:
    directory = tempfile.mkdtemp(prefix="tcpgreet-haproxy-test-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return Path(directory)


class PlainRelayTests(SynchronousTestCase):
    def test_mode_tcp_relays_the_greeting(self):
        server = start_server(self, "--listen", PLAIN, "--greeting", "{peer_host}")
        proxy = start_haproxy(self, [f"{server.host}:{server.port}"])
        data, local_port = greeted_from(CLIENT, proxy.host, proxy.port)
        # Without the PROXY protocol tcpgreet sees HAProxy, not the client:
        # this is what send-proxy-v2 is for.
        self.assertEqual(data, b"127.0.0.1\r\n")
        proxy.wait_for(rf"^{re.escape(CLIENT)}:{local_port} .* greet greet/greet1 ")
        server.wait_for(r"127\.0\.0\.1 port \d+: greeted")


class ProxyProtocolTests(SynchronousTestCase):
    """
    Through C{send-proxy} (v1) and C{send-proxy-v2}, tcpgreet's C{haproxy:}
    listener must see the original client: in C{{peer_host}}, C{{peer_port}}
    and in its log line.
    """

    def assertSeesTheClient(self, send_proxy: str):
        server = start_server(self, "--listen", PROXIED,
                              "--greeting", "{peer_host} {peer_port}")
        proxy = start_haproxy(self, [f"{server.host}:{server.port} {send_proxy}"])
        data, local_port = greeted_from(CLIENT, proxy.host, proxy.port)
        self.assertEqual(data, f"{CLIENT} {local_port}\r\n".encode())
        line = server.wait_for(r"port \d+: greeted").string
        self.assertRegex(line, rf"{re.escape(CLIENT)} port {local_port}: greeted")

    def test_send_proxy_v1(self):
        self.assertSeesTheClient("send-proxy")


    def test_send_proxy_v2(self):
        self.assertSeesTheClient("send-proxy-v2")



    def test_per_address_limit_counts_the_client_not_haproxy(self):
        server = start_server(self, "--listen", PROXIED, "--max-per-ip", "1",
                              "--timeout", "30")
        proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2"])
        # A client from 127.0.0.2 that says something and stays: the server
        # waits for its EOF, so it holds the one connection 127.0.0.2 may have.
        with socket.create_connection((proxy.host, proxy.port), 10,
                                      source_address=(CLIENT, 0)) as held:
            held.sendall(b"hello\r\n")
            self.assertEqual(held.recv(100), DEFAULT)
            self.assertEqual(greeted_from(CLIENT, proxy.host, proxy.port)[0], b"")
            server.wait_for(r"refused 1 connection\(s\) .* by --max-per-ip "
                            rf"\(latest from {re.escape(CLIENT)}\)")
            # All of them come from HAProxy's 127.0.0.1, yet another client
            # is its own address.
            self.assertEqual(greeted_from("127.0.0.3", proxy.host, proxy.port)[0], DEFAULT)


class TrustedProxyTests(SynchronousTestCase):
    """
    --trusted-proxy: HAProxy, on 127.0.0.1, may name the client; a client
    on 127.0.0.2 that reaches the PROXY listener itself and sends its own
    header is refused, unless its own network is trusted too.
    """

    def test_only_the_trusted_proxy_may_name_the_client(self):
        server = start_server(self, "--listen", PROXIED, "--trusted-proxy", "127.0.0.1",
                              "--greeting", "{peer_host}",
                              "--metrics", "tcp:0:interface=127.0.0.1")
        self.assertIn("proxy headers trusted from 127.0.0.1/32, timeout", server.log)
        url = "http://{}/metrics".format(
            server.wait_for(r"metrics at http://([\d.]+:\d+)/metrics").group(1))
        rejected = ("tcpgreet_connections_rejected_total", (("reason", "untrusted-proxy"),))
        self.assertEqual(samples(scrape_text(url))[rejected], 0)
        proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2"])
        self.assertEqual(greeted_from(CLIENT, proxy.host, proxy.port)[0], b"127.0.0.2\r\n")
        self.assertEqual(sent_to(CLIENT, server.host, server.port, FORGED), b"")
        server.wait_for(r"refused 1 connection\(s\) in 1 s from outside --trusted-proxy "
                        rf"\(latest from {re.escape(CLIENT)}\)")
        self.assertEqual(samples(scrape_text(url))[rejected], 1)
        server.stop()
        self.assertNotIn("203.0.113.9", server.log)
        self.assertNotIn("Traceback", server.log)

    def test_a_trusted_network_may_name_any_client(self):
        server = start_server(self, "--listen", PROXIED, "--trusted-proxy", "127.0.0.0/8",
                              "--greeting", "{peer_host}")
        self.assertEqual(sent_to(CLIENT, server.host, server.port, FORGED),
                         b"203.0.113.9\r\n")
        server.wait_for(r"203\.0\.113\.9 port 40000: greeted")

    def test_health_checks_of_a_trusted_proxy(self):
        # A v2 LOCAL header: greeted with the connection's own address.
        server = start_server(self, "--listen", PROXIED, "--trusted-proxy", "127.0.0.1")
        proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2 check "
                                     "inter 200ms"], backend=f"    {GREETING_CHECK}")
        proxy.wait_for_check("greet1", "L7OK")
        server.wait_for(r"127\.0\.0\.1 port \d+: greeted")
        self.assertNotIn("PROXY header", server.log)

    def assertClientWithoutAnAddress(self, send_proxy: str):
        # A client of HAProxy's UNIX socket has no address HAProxy can put
        # in a header: v1 says UNKNOWN, v2 LOCAL.  The greeting and the log
        # name the connection's own peer, HAProxy.
        server = start_server(self, "--listen", PROXIED, "--trusted-proxy", "127.0.0.1",
                              "--greeting", "{peer_host}")
        path = temporary_directory(self) / "haproxy.sock"
        start_haproxy(self, [f"{server.host}:{server.port} {send_proxy}"],
                      backend=f"    bind unix@{path}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            self.assertEqual(b"".join(iter(lambda: s.recv(65536), b"")), b"127.0.0.1\r\n")
        server.wait_for(r"127\.0\.0\.1 port \d+: greeted")
        self.assertNotIn("PROXY header", server.log)

    def test_unknown_client_v1(self):
        self.assertClientWithoutAnAddress("send-proxy")

    def test_unknown_client_v2(self):
        self.assertClientWithoutAnAddress("send-proxy-v2")

    def test_bad_network_is_one_line(self):
        assert_fails_in_one_line(
            self, run_twistd("--listen", PROXIED, "--trusted-proxy", "10.0.0.0/40"),
            r"^tcpgreet: --trusted-proxy: '10\.0\.0\.0/40' is not an IP address or network")

    def test_trusted_proxy_without_a_proxy_listener_is_one_line(self):
        assert_fails_in_one_line(
            self, run_twistd("--listen", PLAIN, "--trusted-proxy", "127.0.0.1"),
            r"^tcpgreet: --trusted-proxy applies to haproxy: listeners, and no --listen is one")


class TLSAfterHeaderTests(SynchronousTestCase):
    """
    C{haproxy:ssl:}: HAProxy (C{send-proxy-v2 ssl}) sends the header in
    clear, then starts TLS.
    """

    def setUp(self):
        self.files = tls.self_signed(temporary_directory(self))
        self.listener = (f"haproxy:ssl:0:interface=127.0.0.1:privateKey={self.files.key}"
                         f":certKey={self.files.cert}")

    def test_haproxy_send_proxy_v2_ssl(self):
        server = start_server(self, "--listen", self.listener, "--trusted-proxy", "127.0.0.1",
                              "--greeting", "{peer_host}")
        proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2 ssl "
                                     f"verify required ca-file {self.files.trust}"])
        data, local_port = greeted_from(CLIENT, proxy.host, proxy.port)
        self.assertEqual(data, b"127.0.0.2\r\n")
        server.wait_for(rf"{re.escape(CLIENT)} port {local_port}: greeted over TLS, 11 bytes")

    def test_a_client_gone_without_close_notify_was_greeted(self):
        # It read the greeting and the server's close_notify, and closed the
        # TCP connection without a close_notify of its own.
        server = start_server(self, "--listen", self.listener)
        context = ssl.create_default_context(cafile=str(self.files.trust))
        with socket.create_connection((server.host, server.port), 10) as raw:
            raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 27679\r\n")
            with context.wrap_socket(raw, server_hostname=tls.SERVER_NAME) as s:
                self.assertEqual(b"".join(iter(lambda: s.recv(65536), b"")), DEFAULT)
                os.close(s.detach())  # no unwrap(): no close_notify
        server.wait_for(r"192\.0\.2\.7 port 40001: greeted over TLS, 26 bytes")
        server.stop()
        self.assertNotIn("lost", server.log)


class DirectClientTests(SynchronousTestCase):
    """
    A client that reaches a PROXY listener directly and sends no header, or a
    broken one, gets no greeting; the server logs it and no traceback.
    """

    def assertNotGreeted(self, send: bytes, reason: str):
        server = start_server(self, "--listen", PROXIED)
        self.assertEqual(fetch(server.host, server.port, send=send), b"")
        server.wait_for(r"dropped 1 connection\(s\) .* without a valid PROXY header "
                        rf"\(latest from 127\.0\.0\.1: {reason}\)")
        server.stop()
        self.assertNotIn("greeted", server.log)
        self.assertNotIn("Traceback", server.log)

    def test_no_header(self):
        self.assertNotGreeted(b"", "no header in time")


    def test_broken_header(self):
        self.assertNotGreeted(b"PROXY TCP4 not-an-address\r\n", "invalid header")

    def test_header_with_a_bad_port(self):
        self.assertNotGreeted(b"PROXY TCP4 192.0.2.1 127.0.0.1 http 80\r\n", "invalid header")

    def test_something_else_entirely(self):
        self.assertNotGreeted(b"GET / HTTP/1.0\r\n\r\n", "not a PROXY header")

    def test_tcp4_header_naming_an_ipv6_address(self):
        self.assertNotGreeted(b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n", "invalid address")

    def test_unknown_is_the_connection_itself(self):
        # No --trusted-proxy: anyone may send a header, and the line says so.
        server = start_server(self, "--listen", PROXIED, "--greeting", "{peer_host}")
        self.assertIn("proxy headers trusted from any address, timeout", server.log)
        self.assertEqual(fetch(server.host, server.port, send=b"PROXY UNKNOWN\r\n"),
                         b"127.0.0.1\r\n")



class HealthCheckTests(SynchronousTestCase):
    """
    The two ways to health-check a PROXY listener: checks that send the
    header too (what deploy/haproxy.cfg does), or checks to a plain listener
    beside it.  Either way the check reads a whole greeting line, so a
    server that accepts connections but cannot greet is taken out.
    """

    def assertHealthy(self, server_line: str):
        proxy = start_haproxy(self, [f"{server_line} check inter 200ms"],
                              backend=f"    {GREETING_CHECK}")
        proxy.wait_for_check("greet1", "L7OK")
        self.assertEqual(fetch(proxy.host, proxy.port), DEFAULT)

    def test_check_through_the_proxy_listener(self):
        # With send-proxy-v2 and no "port", HAProxy sends the header on its
        # checks too: a v2 LOCAL command, which has no client address.
        server = start_server(self, "--listen", PROXIED)
        self.assertHealthy(f"{server.host}:{server.port} send-proxy-v2")

    def test_check_on_a_plain_listener_beside(self):
        server = start_server(self, "--listen", PROXIED, "--listen", PLAIN)
        proxied, plain = [int(port) for port in
                          re.findall(r"\(127\.0\.0\.1:(\d+)\)", server.log)]
        self.assertHealthy(f"127.0.0.1:{proxied} send-proxy-v2 port {plain}")

    def test_check_without_the_header_fails_on_the_proxy_listener(self):
        # "port" set: HAProxy sends no header on its checks, even to the PROXY
        # listener itself, which must then not greet them.
        server = start_server(self, "--listen", PROXIED)
        proxy = start_haproxy(
            self, [f"{server.host}:{server.port} send-proxy-v2 check port {server.port} "
                   "inter 200ms"],
            backend=f"    timeout check 1s\n    {GREETING_CHECK}")
        self.assertNotEqual(proxy.wait_for_check("greet1")["check_status"], "L7OK")


    def test_a_server_that_does_not_greet_fails_its_check(self):
        # The control for the two above: a port that accepts and says nothing.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            proxy = start_haproxy(
                self, [f"127.0.0.1:{silent.getsockname()[1]} check inter 200ms"],
                backend="    timeout check 300ms\n"
                        f"    {GREETING_CHECK}")
            proxy.wait_for_check("greet1", "L7TOUT")


class ScaleOutTests(SynchronousTestCase):
    def test_round_robin_over_instances(self):
        servers = [start_server(self, "--listen", PROXIED, "--greeting", f"instance {n}")
                   for n in (1, 2, 3)]
        proxy = start_haproxy(
            self, [f"{s.host}:{s.port} send-proxy-v2" for s in servers],
            backend="    balance roundrobin")
        seen = {fetch(proxy.host, proxy.port) for _ in range(6)}
        self.assertEqual(seen, {b"instance 1\r\n", b"instance 2\r\n", b"instance 3\r\n"})


class DeployConfigTests(SynchronousTestCase):
    def test_deploy_haproxy_cfg_is_valid(self):
        haproxy = require_tool(self, "haproxy")
        result = subprocess.run([haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # A warning is HAProxy telling us the example teaches something wrong.
        self.assertNotIn("WARNING", result.stdout + result.stderr)
