"""
The PROXY-protocol wrapper, driven through StringTransport: nothing is sent
before the header is parsed, the wrapped protocol sees the original client,
a missing, broken or late header gets no greeting, and with trusted proxies
a connection from elsewhere is refused before it is read.
"""

import ipaddress
import socket
import ssl
import struct

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tcpgreet import greeting, interfaces, proxy
from tcpgreet.limits import ConnectionLimits
from tcpgreet.server import GreetFactory

from .certificates import make_certificate

HAPROXY = IPv4Address("TCP", "127.0.0.1", 50000)
V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 27679\r\n"


def v2(command=0x1, source="192.0.2.8", source_port=40002, tlvs=b""):
    """A v2 header: PROXY (1) or LOCAL (0), TCP over IPv4."""
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + \
        struct.pack("!HH", source_port, 27679) + tlvs
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, 0x11]) +
            struct.pack("!H", len(addresses)) + addresses)


# What HAProxy sends for a client it cannot name (one on a UNIX socket):
# v1 UNKNOWN, and v2 LOCAL with an unspecified family and no addresses.
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_LOCAL_UNSPEC = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def trusting(*networks):
    return proxy.TrustedProxies(ipaddress.ip_network(n) for n in networks)


class HalfCloseTransport(StringTransport):
    def loseWriteConnection(self):
        self.writeClosed = True


class ContractTests(SynchronousTestCase):
    """What the header reader needs of the factory it wraps is an interface."""

    def test_the_greeting_factory_provides_it(self):
        factory = GreetFactory(greeting.from_text("hi"), quiet=True, reactor=MemoryReactorClock())
        self.assertTrue(verifyObject(interfaces.IProxiedFactory, factory))

    def test_a_factory_that_does_not_is_refused_at_once(self):
        with self.assertRaisesRegex(TypeError, "does not provide IProxiedFactory"):
            proxy.ProxyHeaderFactory(Factory.forProtocol(lambda: None), MemoryReactorClock())


class ProxyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.greeter = GreetFactory(greeting.from_text("hi {peer_host}:{peer_port}"),
                                    quiet=True, reactor=self.clock,
                                    limits=ConnectionLimits(max_per_ip=1))
        self.factory = proxy.ProxyHeaderFactory(self.greeter, self.clock)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, peer=HAPROXY):
        wrapper = self.factory.buildProtocol(peer)
        transport = HalfCloseTransport(peerAddress=peer)
        wrapper.makeConnection(transport)
        return wrapper, transport

    def untrusted_lines(self):
        return [formatEvent(e) for e in self.events
                if "--trusted-proxy" in e.get("log_format", "")]

    def test_nothing_is_sent_before_the_header(self):
        wrapper, transport = self.connect()
        self.assertEqual(transport.value(), b"")
        self.assertIsNone(wrapper.wrappedProtocol)
        self.assertEqual(self.greeter.stats.accepted, 0)

    def test_v1_header_names_the_client(self):
        wrapper, transport = self.connect()
        wrapper.dataReceived(V1)
        self.assertEqual(transport.value(), b"hi 192.0.2.7:40001\r\n")
        self.assertEqual(wrapper.getPeer(), IPv4Address("TCP", "192.0.2.7", 40001))
        self.assertTrue(transport.writeClosed)  # half-closed through the wrapper

    def test_v2_header_in_pieces(self):
        wrapper, transport = self.connect()
        header = v2(tlvs=b"\x04\x00\x02ok")
        for i in range(len(header)):
            wrapper.dataReceived(header[i:i + 1])
        self.assertEqual(transport.value(), b"hi 192.0.2.8:40002\r\n")

    def test_local_command_is_the_proxy_itself(self):
        # What HAProxy sends on its health checks.
        wrapper, transport = self.connect()
        wrapper.dataReceived(v2(command=0x0))
        self.assertEqual(transport.value(), b"hi 127.0.0.1:50000\r\n")

    def test_unknown_v1_and_local_v2_are_the_proxy_itself(self):
        # The shortest v1 header, and HAProxy's v2 for a client on a UNIX
        # socket: the connection's own address stands, from the proxy.
        for header in (V1_UNKNOWN, b"PROXY UNKNOWN ::1 ::1 1 2\r\n", V2_LOCAL_UNSPEC):
            wrapper, transport = self.connect()
            wrapper.dataReceived(header)
            self.assertEqual(transport.value(), b"hi 127.0.0.1:50000\r\n", header)
            self.assertEqual(wrapper.getPeer(), HAPROXY)
            wrapper.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.greeter.stats.rejected, {})

    def test_ipv6_clients_are_named_as_their_sockets_would_name_them(self):
        # A v2 header carries the 16 bytes; v1 whatever the proxy wrote.
        addresses = (socket.inet_pton(socket.AF_INET6, "2001:db8::7") +
                     socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", 40003, 27679))
        v2_tcp6 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x21" + struct.pack("!H", len(addresses))
                   + addresses)
        v1_long = b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 0:0:0:0:0:0:0:1 40003 27679\r\n"
        for header in (v2_tcp6, v1_long):
            wrapper, transport = self.connect()
            wrapper.dataReceived(header)
            self.assertEqual(transport.value(), b"hi 2001:db8::7:40003\r\n", header)
            self.assertEqual(wrapper.getPeer(), IPv6Address("TCP", "2001:db8::7", 40003))
            self.assertEqual(wrapper.getHost(), IPv6Address("TCP", "::1", 27679))
            wrapper.connectionLost(Failure(error.ConnectionDone()))

    def test_an_address_of_the_other_family_is_dropped(self):
        # TCP4 names IPv4 addresses only, TCP6 IPv6 ones: either way round
        # the header is a lie about its own format.
        for header in (b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",
                       b"PROXY TCP4 192.0.2.7 ::1 1 2\r\n",
                       b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n"):
            wrapper, transport = self.connect()
            wrapper.dataReceived(header)
            self.assertEqual(transport.value(), b"", header)
            self.assertTrue(transport.disconnecting, header)
        reasons = [e["reason"] for e in self.events if "PROXY header" in e.get("log_format", "")]
        self.assertEqual(reasons, ["invalid address"])  # then rate-limited
        self.assertEqual(self.greeter.stats.rejected, {"proxy-header": 3})
        wrapper, transport = self.connect()
        wrapper.dataReceived(b"PROXY TCP6 2001:db8::7 ::1 40001 27679\r\n")
        self.assertEqual(transport.value(), b"hi 2001:db8::7:40001\r\n")

    def test_bytes_after_the_header_reach_the_protocol(self):
        wrapper, _ = self.connect()
        wrapper.dataReceived(V1 + b"QUIT\r\n")
        self.assertTrue(wrapper.wrappedProtocol.heard)

    def assertDropped(self, wrapper, transport, reason):
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(wrapper.wrappedProtocol)
        self.assertEqual(self.greeter.stats.rejected, {"proxy-header": 1})
        [event] = [e for e in self.events if "PROXY header" in e.get("log_format", "")]
        self.assertEqual((event["peer"], event["reason"]), ("127.0.0.1", reason))
        wrapper.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.greeter.stats.rejected, {"proxy-header": 1})  # counted once

    def test_no_header(self):
        wrapper, transport = self.connect()
        wrapper.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertDropped(wrapper, transport, "not a PROXY header")

    def test_broken_header(self):
        wrapper, transport = self.connect()
        wrapper.dataReceived(b"PROXY TCP4 not-an-address\r\n")
        self.assertDropped(wrapper, transport, "invalid header")

    def test_endless_header(self):
        wrapper, transport = self.connect()
        wrapper.dataReceived(b"PROXY " + b"x" * 200)
        self.assertDropped(wrapper, transport, "invalid header")

    def test_oversized_v2_header(self):
        wrapper, transport = self.connect()
        header = v2()
        claims_60000_bytes = header[:14] + struct.pack("!H", 60000) + header[16:]
        wrapper.dataReceived(claims_60000_bytes + b"\0" * proxy.MAX_HEADER)
        self.assertDropped(wrapper, transport, "header too long")

    def test_silence_is_dropped_after_the_header_timeout(self):
        wrapper, transport = self.connect()
        self.clock.advance(proxy.HEADER_TIMEOUT - 0.01)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.02)
        self.assertDropped(wrapper, transport, "no header in time")

    def test_closed_before_the_header(self):
        wrapper, _ = self.connect()
        wrapper.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.greeter.stats.rejected, {"proxy-header": 1})
        self.assertFalse(wrapper._timer.active())

    def test_malformed_headers_are_dropped_cleanly(self):
        for header in [b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 80\r\n",
                       b"PROXY TCP4 \xff\xfe 5.6.7.8 1 80\r\n",
                       b"PROXY TCP4 not-an-ip 5.6.7.8 1 80\r\n"]:
            wrapper, transport = self.connect()
            wrapper.dataReceived(header)  # raises nothing
            self.assertEqual(transport.value(), b"")
            self.assertTrue(transport.disconnecting, header)
        reasons = [e["reason"] for e in self.events if "PROXY header" in e.get("log_format", "")]
        self.assertEqual(reasons, ["invalid header"])  # then rate-limited
        self.assertEqual(self.greeter.stats.rejected, {"proxy-header": 3})
        self.assertEqual(self.greeter.limits.open, 0)

    def test_a_source_that_is_not_an_address_is_dropped(self):
        self.assertFalse(proxy._valid(IPv4Address("TCP", "not-an-ip", 1)))
        self.assertFalse(proxy._valid(IPv4Address("TCP", "192.0.2.1", 99999999)))
        self.assertTrue(proxy._valid(IPv4Address("TCP", "192.0.2.1", 40000)))

    def test_waiting_for_headers_counts_toward_max_connections(self):
        self.greeter.limits.max_connections = 2
        first, _ = self.connect()
        second, _ = self.connect()
        self.assertIsNone(self.factory.buildProtocol(HAPROXY))
        self.assertEqual(self.greeter.stats.rejected, {"max-connections": 1})
        self.assertEqual(self.greeter.limits.open, 2)
        first.dataReceived(V1)  # served: still one place each
        self.assertEqual(self.greeter.limits.open, 2)
        second.connectionLost(Failure(error.ConnectionDone()))  # gone before its header
        self.assertEqual(self.greeter.limits.open, 1)

    def test_a_drain_waits_for_headers_in_progress(self):
        wrapper, _ = self.connect()
        self.assertIn(wrapper, self.greeter.waiting)
        idle = self.greeter.when_idle()
        self.assertNoResult(idle)
        wrapper.dataReceived(V1)
        # Handed over: now the greeting protocol is what the drain waits for.
        self.assertNotIn(wrapper, self.greeter.waiting)
        self.assertIn(wrapper.wrappedProtocol, self.greeter.waiting)
        wrapper.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(idle)

    def test_the_drain_ends_a_header_that_never_comes(self):
        wrapper, transport = self.connect()
        wrapper.cut("drain")
        self.assertTrue(transport.disconnecting)
        wrapper.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.greeter.waiting, set())
        self.assertEqual(self.greeter.limits.open, 0)

    def test_tls_beneath_is_closed_not_half_closed(self):
        wrapper = self.factory.buildProtocol(HAPROXY)
        transport = StringTransport(peerAddress=HAPROXY)  # no half-close, like TLS
        wrapper.makeConnection(transport)
        wrapper.dataReceived(V1)
        self.assertEqual(transport.value(), b"hi 192.0.2.7:40001\r\n")
        self.assertTrue(transport.disconnecting)

    def test_limits_see_the_client_not_the_proxy(self):
        first, _ = self.connect()
        first.dataReceived(V1)
        second, second_transport = self.connect()
        second.dataReceived(V1.replace(b"192.0.2.7", b"192.0.2.9"))
        self.assertEqual(second_transport.value(), b"hi 192.0.2.9:40001\r\n")
        third, third_transport = self.connect()
        third.dataReceived(V1)  # 192.0.2.7 again, with max-per-ip 1
        self.assertEqual(third_transport.value(), b"")
        self.assertTrue(third_transport.disconnecting)
        self.assertEqual(self.greeter.stats.rejected, {"max-per-ip": 1})


class TrustedProxyTests(SynchronousTestCase):
    """
    With trusted proxies, a connection from anywhere else is refused as it
    is accepted: no header read, no greeting, counted, logged at most once
    a second.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.greeter = GreetFactory(greeting.from_text("hi {peer_host}"), quiet=True,
                                    reactor=self.clock)
        self.factory = proxy.ProxyHeaderFactory(self.greeter, self.clock,
                                                trusting("127.0.0.1/32", "2001:db8::/32"))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def untrusted_lines(self):
        return [formatEvent(e) for e in self.events
                if "--trusted-proxy" in e.get("log_format", "")]

    def greeting_for(self, peer, header=V1):
        wrapper = self.factory.buildProtocol(peer)
        self.assertIsNotNone(wrapper, peer)
        transport = HalfCloseTransport(peerAddress=peer)
        wrapper.makeConnection(transport)
        wrapper.dataReceived(header)
        return transport.value()

    def test_a_trusted_proxy_names_the_client(self):
        self.assertEqual(self.greeting_for(HAPROXY), b"hi 192.0.2.7\r\n")
        self.assertEqual(self.greeting_for(IPv6Address("TCP", "2001:db8::1", 1)),
                         b"hi 192.0.2.7\r\n")
        self.assertEqual(self.greeter.stats.rejected, {})
        self.assertEqual(self.untrusted_lines(), [])

    def test_anyone_else_is_refused_before_a_byte_is_read(self):
        self.greeter.limits.max_connections = 1
        for port in range(40000, 40005):
            self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", port)))
        self.assertIsNone(self.factory.buildProtocol(IPv6Address("TCP", "2001:db9::1", 1)))
        self.assertEqual(self.greeter.stats.rejected, {"untrusted-proxy": 6})
        self.assertEqual(self.greeter.stats.accepted, 0)
        self.assertEqual(self.greeter.limits.open, 0)  # no place held
        self.assertEqual(self.greeting_for(HAPROXY), b"hi 192.0.2.7\r\n")  # the one place

    def test_refusals_are_logged_at_most_once_a_second(self):
        for port in range(40000, 40005):
            self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", port))
        self.assertEqual(self.untrusted_lines(), [
            "refused 1 connection(s) in 1 s from outside --trusted-proxy "
            "(latest from 127.0.0.2)"])
        self.clock.advance(1)
        self.assertEqual(self.untrusted_lines()[1:], [
            "refused 4 connection(s) in 1 s from outside --trusted-proxy "
            "(latest from 127.0.0.2)"])
        self.clock.advance(1)
        self.assertEqual(len(self.untrusted_lines()), 2)  # quiet again

    def test_ipv4_clients_of_an_ipv6_socket(self):
        mapped = IPv6Address("TCP", "::ffff:127.0.0.1", 50000)
        self.assertEqual(self.greeting_for(mapped), b"hi 192.0.2.7\r\n")
        self.assertIsNone(self.factory.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.2", 1)))
        # A mapped network given as trusted means its IPv4 addresses.
        self.assertTrue(trusting("::ffff:10.0.0.0/104").admits(IPv4Address("TCP", "10.1.2.3", 1)))
        self.assertTrue(trusting("::ffff:10.0.0.0/104").admits(
            IPv6Address("TCP", "::ffff:10.1.2.3", 1)))
        self.assertFalse(trusting("10.0.0.0/8").admits(IPv6Address("TCP", "::a01:203", 1)))

    def test_unknown_and_local_from_a_trusted_proxy(self):
        self.assertEqual(self.greeting_for(HAPROXY, V1_UNKNOWN), b"hi 127.0.0.1\r\n")
        self.assertEqual(self.greeting_for(HAPROXY, v2(command=0x0)), b"hi 127.0.0.1\r\n")
        self.assertEqual(self.greeting_for(HAPROXY, V2_LOCAL_UNSPEC), b"hi 127.0.0.1\r\n")
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1)))

    def test_a_unix_socket_is_guarded_by_its_file_mode(self):
        self.assertTrue(trusting("127.0.0.1").admits(UNIXAddress(b"/run/greet.sock")))
        self.assertTrue(trusting("127.0.0.1").admits(UNIXAddress(None)))

    def test_verdicts_are_remembered_for_a_bounded_number_of_addresses(self):
        trusted = trusting("10.0.0.0/8")
        for n in range(3 * proxy.REMEMBERED_VERDICTS):
            inside = IPv4Address("TCP", f"10.0.{n // 256}.{n % 256}", 1)
            outside = IPv4Address("TCP", f"192.0.{n // 256}.{n % 256}", 1)
            self.assertEqual((trusted.admits(inside), trusted.admits(outside)), (True, False))
            self.assertLessEqual(len(trusted._verdicts), proxy.REMEMBERED_VERDICTS)
        self.assertFalse(trusted.admits(IPv4Address("TCP", "not an address", 1)))

    def test_the_networks_read_as_given(self):
        self.assertEqual(str(trusting("127.0.0.1", "10.0.0.0/8", "2001:db8::/32")),
                         "127.0.0.1/32, 10.0.0.0/8, 2001:db8::/32")


def pump(wrapper, transport, client, incoming, outgoing, clock):
    """Move bytes between the wrapper and an in-memory TLS client until
    neither has more to say; what the client read."""
    received = b""
    for _ in range(20):
        clock.advance(0)  # TLS gathers small writes for one turn
        data = transport.value()
        transport.clear()
        if data:
            incoming.write(data)
        try:
            while chunk := client.read(65536):
                received += chunk
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        sent = outgoing.read()
        if sent:
            wrapper.dataReceived(sent)
        elif not data:
            return received
    raise AssertionError("TLS exchange did not settle")


class TLSAfterHeaderTests(SynchronousTestCase):
    """
    C{haproxy:ssl:}: the header comes in clear, TLS after it, as HAProxy
    sends them (C{send-proxy-v2 ssl}).
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.greeter = GreetFactory(greeting.from_text("hi {peer_host}"), quiet=True,
                                    reactor=self.clock)
        self.factory = proxy.ProxyHeaderFactory(self.greeter, self.clock)
        certificate = make_certificate(["localhost"])
        self.factory.tls_after_header(PrivateCertificate.loadPEM(
            (certificate.key_pem + certificate.certificate_pem).decode()).options())
        context = ssl.create_default_context(cadata=certificate.certificate_pem.decode())
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = context.wrap_bio(self.incoming, self.outgoing,
                                       server_hostname="localhost")

    def test_header_in_clear_then_the_handshake(self):
        wrapper = self.factory.buildProtocol(HAPROXY)
        transport = HalfCloseTransport(peerAddress=HAPROXY)
        wrapper.makeConnection(transport)
        with self.assertRaises(ssl.SSLWantReadError):
            self.client.do_handshake()  # the ClientHello, now in outgoing
        wrapper.dataReceived(V1 + self.outgoing.read())
        received = pump(wrapper, transport, self.client, self.incoming, self.outgoing,
                        self.clock)
        self.assertEqual(received, b"hi 192.0.2.7\r\n")
        self.assertEqual(wrapper.wrappedProtocol.wrappedProtocol.peer,
                         IPv4Address("TCP", "192.0.2.7", 40001))
        # The client read its greeting and the server's close_notify, and
        # closes TCP without a close_notify of its own, as many do: it was
        # greeted all the same.
        wrapper.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        wrapper.connectionLost(Failure(error.ConnectionDone()))
        stats = self.greeter.stats
        self.assertEqual((stats.greeted, stats.lost, stats.rejected), (1, 0, {}))
