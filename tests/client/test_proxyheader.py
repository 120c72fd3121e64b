"""
The PROXY protocol header from the probe: its bytes, its place on the wire
(first, below TLS), and what servers make of it: tcpgreet's own
C{haproxy:} listener, whose greeting names the claimed client, and a real
HAProxy with C{bind ... accept-proxy}.
"""

import json
import shutil
import struct
import tempfile
from ipaddress import ip_address
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.client.proxyheader import LOCAL, SIGNATURE, ProxyHeaderSender, version_1, version_2

from .. import tls
from ..clientprocess import run
from ..haproxy import start_haproxy
from ..helpers import start_server

GREETING = "hello {peer_host} {peer_port}"


class HeaderTests(SynchronousTestCase):
    def test_version_1(self):
        self.assertEqual(version_1(("192.0.2.7", 4242), ("127.0.0.1", 27679)),
                         b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 27679\r\n")
        self.assertEqual(version_1(("2001:db8::7", 1), ("::1", 2)),
                         b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n")

    def test_version_2(self):
        header = version_2(("192.0.2.7", 4242), ("127.0.0.1", 27679))
        self.assertEqual(header[:12], SIGNATURE)
        self.assertEqual(header[12:16], b"\x21\x11\x00\x0c", "v2 PROXY, TCP over IPv4, 12 bytes")
        self.assertEqual(header[16:], bytes([192, 0, 2, 7, 127, 0, 0, 1])
                         + struct.pack("!HH", 4242, 27679))
        header = version_2(("2001:db8::7", 1), ("::1", 2))
        self.assertEqual((header[12:16], len(header)), (b"\x21\x21\x00\x24", 16 + 36))

    def test_local(self):
        self.assertEqual(LOCAL, SIGNATURE + b"\x20\x00\x00\x00")

    def test_families_mixed(self):
        # One header holds one family: IPv4 beside IPv6 is IPv4-mapped.
        line = version_1(("192.0.2.7", 1), ("::1", 2))
        self.assertRegex(line, rb"^PROXY TCP6 ::ffff:(192\.0\.2\.7|c000:207) ::1 1 2\r\n$")
        self.assertEqual(version_2(("192.0.2.7", 1), ("::1", 2))[13], 0x21)

    def test_the_header_comes_first(self):
        class Talker(Protocol):
            def connectionMade(self):
                self.transport.write(b"EHLO\r\n")

        sender = ProxyHeaderSender(Factory.forProtocol(Talker), "v1", None)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.5", 40000),
                                    peerAddress=IPv4Address("TCP", "127.0.0.1", 25))
        sender.buildProtocol(None).makeConnection(transport)
        self.assertEqual(transport.value(),
                         b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\nEHLO\r\n",
                         "by default the probe's own end is the client")


class TcpgreetListenerTests(SynchronousTestCase):
    """Against C{twistd tcpgreet --listen haproxy:...}: the greeting names the claimed client."""

    def setUp(self):
        server = start_server(self, "--listen", "haproxy:tcp:0:interface=127.0.0.1", "--quiet",
                              "--greeting", GREETING)
        self.target = [server.host, str(server.port)]

    def banner(self, *args):
        result = run("--json", *args, *self.target)
        probe = json.loads(result.stdout.splitlines()[0])
        self.assertEqual((result.returncode, probe["state"]), (0, "OK"), result)
        return probe["banner"]

    def test_versions_name_the_source(self):
        self.assertEqual(self.banner("--proxy-protocol", "v1", "--proxy-source",
                                     "192.0.2.7:4242"), "hello 192.0.2.7 4242\r\n")
        # The server writes IPv6 addresses in full: compare them as addresses.
        _, host, port = self.banner("--proxy-protocol", "v2", "--proxy-source",
                                    "[2001:db8::7]:4243").split()
        self.assertEqual((ip_address(host), port), (ip_address("2001:db8::7"), "4243"))

    def test_default_source_and_local(self):
        for version in ("v1", "v2", "v2-local"):
            self.assertRegex(self.banner("--proxy-protocol", version),
                             r"^hello 127\.0\.0\.1 \d+\r\n$", version)

    def test_without_a_header(self):
        result = run("--timeout", "10", *self.target)
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"failed at read: closed without a banner", result.stderr)


class UnderTLSTests(SynchronousTestCase):
    """With --tls the header goes first, in clear, then the handshake (C{haproxy:ssl:})."""

    def test_header_then_tls(self):
        directory = Path(tempfile.mkdtemp(prefix="tcpgreet-client-proxy-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        files = tls.self_signed(directory)
        server = start_server(self, "--quiet", "--greeting", GREETING, "--listen",
                              f"haproxy:ssl:0:interface=127.0.0.1:privateKey={files.key}"
                              f":certKey={files.cert}")
        result = run("--json", "--tls", "--ca", str(files.trust), "--proxy-protocol", "v2",
                     "--proxy-source", "192.0.2.9:99", "localhost", str(server.port))
        probe = json.loads(result.stdout.splitlines()[0])
        self.assertEqual((result.returncode, probe["banner"], probe["tls_version"] is not None),
                         (0, "hello 192.0.2.9 99\r\n", True))


class HAProxyTests(SynchronousTestCase):
    """
    A real HAProxy that demands a header (C{bind ... accept-proxy}) and
    relays to tcpgreet with one of its own: the greeting names the client
    the probe's header claimed, and HAProxy's log line does too.
    """

    def setUp(self):
        server = start_server(self, "--listen", "haproxy:tcp:0:interface=127.0.0.1", "--quiet",
                              "--greeting", GREETING)
        self.proxy = start_haproxy(self, [f"{server.host}:{server.port} send-proxy-v2"],
                                   bind="accept-proxy")
        self.target = [self.proxy.host, str(self.proxy.port)]

    def test_each_version(self):
        for version, source, claimed in [("v1", "192.0.2.7:4242", "192.0.2.7 4242"),
                                         ("v2", "198.51.100.9:5353", "198.51.100.9 5353")]:
            result = run("--proxy-protocol", version, "--proxy-source", source, *self.target)
            self.assertEqual((result.returncode, result.stdout.decode(), result.stderr),
                             (0, f"hello {claimed}\n", b""), version)
            self.proxy.wait_for(source.replace(".", r"\."))

    def test_local_is_the_connection_itself(self):
        result = run("--proxy-protocol", "v2-local", *self.target)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.decode(), r"^hello 127\.0\.0\.1 \d+\n$")

    def test_no_header_no_banner(self):
        result = run(*self.target)
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"failed at read: ", result.stderr)
