"""
The probe client on a fake reactor: the protocol and factory through
StringTransport, one probe (addresses in turn, deadlines, cancellation) and
a run of probes (count, interval, interruption) on MemoryReactorClock.
"""

import errno
import socket

from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.client import probe as probing
from tcpgreet.client import source_problem
from tcpgreet.client.outcome import CRITICAL, OK, UNKNOWN, WARNING, Checks, ProbeResult
from tcpgreet.client.probe import (
    GOODBYE_TIMEOUT,
    GreetClientFactory,
    ProbeError,
    ProbeRun,
    ProbeSettings,
    probe,
)
from tcpgreet.client.report import Report

GREETING = b"Thank you for connecting\r\n"


def connect(factory, clock=None, after=0.0):
    """Connect C{factory}'s protocol to a StringTransport, C{after} seconds on."""
    if clock is not None:
        clock.advance(after)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class ProtocolTests(SynchronousTestCase):
    def attempt(self, max_bytes=65536, **settings):
        factory = GreetClientFactory(MemoryReactorClock(), max_bytes, **settings)
        results = []
        factory.deferred.addBoth(results.append)
        protocol, transport = connect(factory)
        return factory, protocol, transport, results

    def test_collects_until_eof(self):
        factory, protocol, _, results = self.attempt()
        protocol.dataReceived(b"Thank you ")
        protocol.dataReceived(b"for connecting\r\n")
        self.assertEqual(results, [])
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(results, [GREETING])
        self.assertFalse(factory.truncated)
        self.assertIsNotNone(factory.connected_at)

    def test_stops_at_max_bytes(self):
        factory, protocol, transport, results = self.attempt(max_bytes=10)
        protocol.dataReceived(b"0123456")
        protocol.dataReceived(b"789abcdef")
        self.assertTrue(transport.disconnected, "the connection is aborted, not closed")
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(results, [b"0123456789"])
        self.assertTrue(factory.truncated)

    def test_exactly_max_bytes_is_not_truncated(self):
        factory, protocol, transport, results = self.attempt(max_bytes=10)
        protocol.dataReceived(b"0123456789")
        self.assertFalse(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((results, factory.truncated), ([b"0123456789"], False))

    def test_memory_is_bounded_whatever_the_server_sends(self):
        _, protocol, _, results = self.attempt(max_bytes=1000)
        chunk = b"x" * 65536
        for _ in range(100):
            protocol.dataReceived(chunk)
        self.assertEqual(sum(map(len, protocol._chunks)), 1000)
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(results, [b"x" * 1000])

    def test_first_line(self):
        factory, protocol, transport, results = self.attempt(first_line=True)
        protocol.dataReceived(b"22")
        protocol.dataReceived(b"0 mail.example ESMTP\r")
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"\n250 more\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "closed politely, not aborted")
        protocol.dataReceived(b"ignored")
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(results, [b"220 mail.example ESMTP\r\n"])
        self.assertFalse(factory.truncated)

    def test_first_line_longer_than_max_bytes(self):
        factory, protocol, _, results = self.attempt(max_bytes=4, first_line=True)
        protocol.dataReceived(b"220 hello\r\n")
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual((results, factory.truncated), ([b"220 "], True))

    def test_close_without_a_byte_is_a_failure(self):
        factory, protocol, _, results = self.attempt()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        [failure] = results
        self.assertEqual((str(failure.value), failure.value.empty, failure.value.refused),
                         ("closed without a banner", True, False))
        self.assertEqual(factory.ended_by, None)

    def test_silence_after_the_first_bytes_ends_the_banner(self):
        clock = MemoryReactorClock()
        factory = GreetClientFactory(clock, idle=1.0)
        results = []
        factory.deferred.addBoth(results.append)
        protocol, transport = connect(factory)
        clock.advance(30)
        self.assertFalse(transport.disconnecting, "no idle rule before the first byte")
        protocol.dataReceived(b"SSH-2.0-")
        clock.advance(0.75)
        protocol.dataReceived(b"OpenSSH_9.2\r\n")
        clock.advance(0.75)
        self.assertFalse(transport.disconnecting, "a gap shorter than --idle is no end")
        clock.advance(0.25)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "closed politely, not aborted")
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(results, [b"SSH-2.0-OpenSSH_9.2\r\n"])
        self.assertEqual((factory.ended_by, factory.ended_at, factory.truncated),
                         ("idle", 30.75, False), "the banner ended with its last byte")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_idle_rule_waits_for_the_close(self):
        clock = MemoryReactorClock()
        factory = GreetClientFactory(clock, idle=None)
        protocol, _ = connect(factory)
        protocol.dataReceived(b"220 ")
        self.assertEqual(clock.getDelayedCalls(), [])
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((self.successResultOf(factory.deferred), factory.ended_by),
                         (b"220 ", "close"))

    def test_first_line_ends_at_silence_too(self):
        clock = MemoryReactorClock()
        factory = GreetClientFactory(clock, first_line=True, idle=0.5)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"login: ")
        clock.advance(0.5)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((self.successResultOf(factory.deferred), factory.ended_by),
                         (b"login: ", "idle"))

    def test_newline_and_max_bytes_stop_the_idle_timer(self):
        for settings, data, ended_by in (({"first_line": True}, b"220 hi\r\n", "newline"),
                                         ({"max_bytes": 2}, b"220", "max-bytes")):
            clock = MemoryReactorClock()
            factory = GreetClientFactory(clock, idle=1.0, **settings)
            protocol, _ = connect(factory)
            protocol.dataReceived(data)
            clock.advance(1.0)
            self.assertEqual(factory.ended_by, ended_by)

    def test_the_result_does_not_wait_for_the_goodbye(self):
        clock = MemoryReactorClock()
        factory = GreetClientFactory(clock, idle=1.0)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"* OK IMAP4rev1 ready\r\n")
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(factory.deferred), b"* OK IMAP4rev1 ready\r\n")
        self.assertTrue(transport.disconnecting and not transport.disconnected)
        # A TLS server that never answers close_notify: the close is cut short.
        clock.advance(GOODBYE_TIMEOUT)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_reports_what_came(self):
        factory, protocol, transport, results = self.attempt()
        protocol.dataReceived(b"220-first")
        factory.give_up()
        self.assertTrue(transport.disconnected)
        [failure] = results
        self.assertEqual((str(failure.value), factory.banner),
                         ("timed out after 9 bytes", b"220-first"))
        protocol.connectionLost(Failure(error.ConnectionAborted()))

    def test_the_deadline_before_connecting(self):
        factory = GreetClientFactory(MemoryReactorClock())
        factory.give_up()
        self.assertEqual(str(self.failureResultOf(factory.deferred).value), "timed out")

    def test_send(self):
        _, _, transport, _ = self.attempt(send=b"QUIT\r\n")
        self.assertEqual(transport.value(), b"QUIT\r\n")

    def test_nothing_sent_by_default(self):
        _, _, transport, _ = self.attempt()
        self.assertEqual(transport.value(), b"")

    def test_reset_is_a_failure(self):
        factory, protocol, _, results = self.attempt()
        protocol.dataReceived(b"partial")
        protocol.connectionLost(Failure(error.ConnectionLost()))
        [failure] = results
        self.assertEqual(str(failure.value), "connection reset by peer")
        self.assertEqual(factory.banner, b"partial")

    def test_tls_close_without_close_notify_after_a_banner_is_the_end(self):
        factory, protocol, _, results = self.attempt(tls=FakeTLS())
        factory.handshake_at = 0.0  # as handshakeCompleted would
        protocol.dataReceived(b"220 ready\r\n")
        protocol.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(results, [b"220 ready\r\n"])

    def test_tls_close_without_a_banner_is_a_failure(self):
        factory, protocol, transport, results = self.attempt(tls=FakeTLS())
        factory.handshake_at = 0.0
        transport.getHandle = lambda: None  # as TLSMemoryBIOProtocol has
        transport.received = b""  # as FirstBytesTLS has
        protocol.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(str(results[0].value), "connection reset by peer")

    def test_a_tls_answer_to_a_plain_probe(self):
        # A TLS server's alert (decode error) for bytes it cannot take for
        # a handshake: not a banner.
        for reason in (error.ConnectionDone(), error.ConnectionLost()):
            factory, protocol, _, results = self.attempt(send=b"\x16\x03\x01\x00\x01\x00")
            protocol.dataReceived(b"\x15\x03\x03\x00\x02\x02\x32")
            protocol.connectionLost(Failure(reason))
            self.assertEqual(str(results[0].value), "the server speaks TLS: try --tls")
            self.assertEqual(factory.banner, b"\x15\x03\x03\x00\x02\x02\x32")

    def test_a_banner_that_only_starts_like_tls(self):
        _, protocol, _, results = self.attempt()
        protocol.dataReceived(b"\x16\x02 not a TLS record\r\n")
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(results, [b"\x16\x02 not a TLS record\r\n"])

    def test_silence_until_the_deadline(self):
        for send, tls, message in [
            (b"", None, "timed out waiting for a banner (does the server wait for the "
                        "client? try --send or --tls)"),
            # A TLS server would have answered what was sent, or closed.
            (b"QUIT\r\n", None, "timed out waiting for a banner"),
            (b"", FakeTLS(), "timed out in the TLS handshake: the server sent nothing "
                             "(is it TLS?)"),
        ]:
            factory, _, transport, results = self.attempt(send=send, tls=tls)
            transport.received = b""  # as FirstBytesTLS has
            factory.give_up()
            self.assertEqual(str(results[0].value), message)
            self.assertTrue(transport.disconnected)

    def test_part_of_a_banner_until_the_deadline(self):
        factory, protocol, _, results = self.attempt()
        protocol.dataReceived(b"220 ")
        factory.give_up()
        self.assertEqual(str(results[0].value), "timed out after 4 bytes")
        self.assertEqual(factory.banner, b"220 ")

    def test_no_such_socket(self):
        factory = GreetClientFactory(MemoryReactorClock())
        factory.clientConnectionFailed(None, Failure(
            error.getConnectError((errno.ENOENT, "No such file or directory"))))
        self.assertEqual(str(self.failureResultOf(factory.deferred, ProbeError).value),
                         "no such socket")

    def test_refused(self):
        factory = GreetClientFactory(MemoryReactorClock())
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        failure = self.failureResultOf(factory.deferred, ProbeError)
        self.assertEqual((str(failure.value), failure.value.refused),
                         ("connection refused", True))

    def test_bind_failure(self):
        factory = GreetClientFactory(MemoryReactorClock())
        factory.clientConnectionFailed(None, Failure(
            error.ConnectBindError(99, "Cannot assign requested address")))
        failure = self.failureResultOf(factory.deferred, ProbeError)
        self.assertEqual(str(failure.value),
                         "cannot bind to the source address: cannot assign requested address")

    def test_cancel_drops_the_connection(self):
        factory, _, transport, _ = self.attempt()
        factory.deferred.cancel()
        self.assertTrue(transport.disconnected)


class FakeResolver:
    """Resolves every name to C{addresses}, or fails, or never answers."""

    def __init__(self, addresses=("127.0.0.1",), failure=None, hang=False):
        self.addresses = list(addresses)
        self.failure = failure
        self.hang = hang
        self.calls = []

    async def __call__(self, reactor, host, port, family):
        self.calls.append((host, port, family))
        if self.hang:
            await defer.Deferred()
        if self.failure is not None:
            raise self.failure
        return self.addresses


class ProbeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()

    def start(self, resolver, **settings):
        settings = ProbeSettings(host=settings.pop("host", "mail.example"),
                                 port=settings.pop("port", 25), **settings)
        return defer.ensureDeferred(probe(self.clock, settings, resolver))

    def attempt(self, number):
        host, _port, factory, _timeout, _bind = self.clock.tcpClients[number]
        return host, factory

    def test_reads_a_banner(self):
        resolving = defer.Deferred()

        async def resolver(reactor, host, port, family):
            calls.append((host, port, family))
            return await resolving

        calls = []
        result = self.start(resolver, first_line=True, send=b"QUIT\r\n")
        self.clock.advance(0.25)
        resolving.callback(["192.0.2.1"])
        _, factory = self.attempt(0)
        self.assertEqual((factory.first_line, factory.send), (True, b"QUIT\r\n"))
        protocol, _ = connect(factory, self.clock, after=0.125)
        self.clock.advance(0.5)
        protocol.dataReceived(GREETING)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(result), ProbeResult(
            host="mail.example", port=25, started=0.0, total=0.875, address="192.0.2.1",
            tried=("192.0.2.1",), resolve=0.25, connect=0.125, first_byte=0.625,
            banner=GREETING, ended_by="newline"),
            "connect and first byte count from the attempt, total from the start")
        self.assertEqual(calls, [("mail.example", 25, socket.AF_UNSPEC)])

    def test_addresses_are_tried_in_order(self):
        result = self.start(FakeResolver(["::1", "127.0.0.1"]))
        host, factory = self.attempt(0)
        self.assertEqual(host, "::1")
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        host, factory = self.attempt(1)
        self.assertEqual(host, "127.0.0.1")
        protocol, _ = connect(factory)
        protocol.dataReceived(GREETING)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        result = self.successResultOf(result)
        self.assertEqual((result.address, result.tried, result.banner, result.error),
                         ("127.0.0.1", ("::1", "127.0.0.1"), GREETING, None))

    def test_every_address_fails(self):
        result = self.start(FakeResolver(["::1", "127.0.0.1"]))
        for number in (0, 1):
            self.attempt(number)[1].clientConnectionFailed(
                None, Failure(error.ConnectionRefusedError()))
        result = self.successResultOf(result)
        self.assertEqual((result.address, result.error, result.refused, result.connect),
                         ("127.0.0.1", "connection refused (tried ::1, 127.0.0.1)", True, None))

    def test_a_server_that_answered_is_not_retried_elsewhere(self):
        result = self.start(FakeResolver(["::1", "127.0.0.1"]), timeout=2.0, idle=None)
        # Connected within the attempt delay, before a second attempt starts.
        protocol, transport = connect(self.attempt(0)[1], self.clock, after=0.125)
        protocol.dataReceived(b"220 ")
        self.clock.advance(1.875)
        self.assertTrue(transport.disconnected)
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.total, result.banner, len(self.clock.tcpClients)),
                         ("timed out after 4 bytes", 2.0, b"220 ", 1))
        protocol.connectionLost(Failure(error.ConnectionAborted()))

    def test_a_trickle_is_cut_by_the_deadline(self):
        result = self.start(FakeResolver(["192.0.2.1"]), timeout=2.0, idle=1.0)
        protocol, _ = connect(self.attempt(0)[1])
        for _ in range(4):
            protocol.dataReceived(b"x")
            self.clock.advance(0.5)
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.banner, result.ended_by),
                         ("timed out after 4 bytes", b"xxxx", None))
        protocol.connectionLost(Failure(error.ConnectionAborted()))

    def test_silence_ends_the_probe(self):
        result = self.start(FakeResolver(["192.0.2.1"]), timeout=5.0, idle=1.0)
        factory = self.attempt(0)[1]
        protocol, transport = connect(factory, self.clock, after=0.25)
        self.clock.advance(0.25)
        protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.banner, result.ended_by, result.total),
                         (None, b"SSH-2.0-OpenSSH_9.2\r\n", "idle", 0.5),
                         "the total runs to the banner's last byte, not the silence")

    def test_empty_reply(self):
        result = self.start(FakeResolver(["192.0.2.1"]))
        protocol, _ = connect(self.attempt(0)[1], self.clock, after=0.25)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.empty, result.refused, result.banner,
                          result.connect),
                         ("closed without a banner", True, False, None, 0.25))

    def test_timeout_while_connecting(self):
        result = self.start(FakeResolver(["192.0.2.1"]), timeout=3.0)
        self.assertEqual(self.clock.tcpClients[0][3], 3.0)
        self.clock.advance(3.0)
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.total), ("timed out", 3.0))
        self.assertTrue(self.clock.connectors[0].stoppedConnecting)

    def test_timeout_counts_from_the_start(self):
        resolving = defer.Deferred()

        async def slow_resolver(reactor, host, port, family):
            return await resolving

        result = self.start(slow_resolver, timeout=3.0)
        self.clock.advance(2.0)
        resolving.callback(["192.0.2.1"])
        self.assertEqual(self.clock.tcpClients[0][3], 1.0, "only the time left")
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(result).total, 3.0)

    def test_resolver_failure(self):
        result = self.start(FakeResolver(failure=ProbeError("name not resolved")))
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.tried, result.name_failed),
                         ("name not resolved", (), True))

    def test_resolver_that_never_answers(self):
        result = self.start(FakeResolver(hang=True), timeout=2.0)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(result).error, "timed out resolving the name")

    def test_family_and_source(self):
        resolver = FakeResolver(["192.0.2.1"])
        self.start(resolver, family=socket.AF_INET, source="192.0.2.9")
        self.assertEqual(resolver.calls[0][2], socket.AF_INET)
        self.assertEqual(self.clock.tcpClients[0][4], ("192.0.2.9", 0))

    def test_tls_connects_through_the_wrapping(self):
        tls = FakeTLS()
        self.start(FakeResolver(["192.0.2.1"]), tls=tls)
        host, port, wrapping, _timeout, _bind = self.clock.tcpClients[0]
        self.assertIsInstance(wrapping, WrappingFactory)
        self.assertEqual((host, port, wrapping.wrappedFactory.tls), ("192.0.2.1", 25, tls))

    def test_unix_socket(self):
        resolver = FakeResolver()
        result = self.start(resolver, host="unix:/run/greet.sock", port=None,
                            unix="/run/greet.sock", timeout=2.0)
        self.assertEqual((resolver.calls, self.clock.tcpClients), ([], []))
        path, factory, timeout, _check_pid = self.clock.unixClients[0]
        self.assertEqual((path, timeout), ("/run/greet.sock", 2.0))
        protocol, _ = connect(factory, self.clock, after=0.5)
        protocol.dataReceived(GREETING)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(result), ProbeResult(
            host="unix:/run/greet.sock", port=None, started=0.0, total=0.5,
            address="/run/greet.sock", tried=("/run/greet.sock",), connect=0.5,
            first_byte=0.5, banner=GREETING, ended_by="close"))

    def test_unix_socket_times_out(self):
        result = self.start(FakeResolver(), host="unix:/run/greet.sock", port=None,
                            unix="/run/greet.sock", timeout=2.0)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(result).error, "timed out")
        self.assertTrue(self.clock.connectors[0].stoppedConnecting)

    def test_cancel_drops_the_attempt(self):
        result = self.start(FakeResolver(["192.0.2.1"]))
        _, transport = connect(self.attempt(0)[1])
        result.cancel()
        self.failureResultOf(result, defer.CancelledError)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")


def unresolvable(code, text):
    return socket.gaierror(code, text)


NONAME = unresolvable(socket.EAI_NONAME, "Name or service not known")
ADDRESSES = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 25)),
             (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 25, 0, 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 25))]


class ResolveTests(SynchronousTestCase):
    """What the resolver's answers become: addresses, or a failure in words."""

    def resolve(self, answers, host="mail.example", family=socket.AF_UNSPEC):
        """L{probing.resolve} with getaddrinfo answering from C{answers[family]}."""
        self.asked = []

        def getaddrinfo(reactor, host, port, family):
            self.asked.append(family)
            answer = answers[family]
            return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

        self.patch(probing, "_getaddrinfo", getaddrinfo)
        resolving = defer.ensureDeferred(probing.resolve(None, host, 25, family))
        if isinstance(answers.get(family), Exception):
            return str(self.failureResultOf(resolving, ProbeError).value)
        return self.successResultOf(resolving)

    def test_addresses_in_order_without_duplicates(self):
        self.assertEqual(self.resolve({socket.AF_UNSPEC: ADDRESSES}),
                         ["192.0.2.1", "2001:db8::1"])

    def test_failures_in_words(self):
        for answer, message in [
            (NONAME, "name not resolved"),
            (unresolvable(socket.EAI_NODATA, "No address associated with hostname"),
             "has no address"),
            (unresolvable(socket.EAI_AGAIN, "Temporary failure in name resolution"),
             "name not resolved: temporary failure in name resolution"),
        ]:
            self.assertEqual(self.resolve({socket.AF_UNSPEC: answer}), message)

    def test_a_name_with_the_other_family_only(self):
        answers = {socket.AF_INET6: NONAME, socket.AF_UNSPEC: ADDRESSES[:1]}
        self.assertEqual(self.resolve(answers, family=socket.AF_INET6), "has no IPv6 address")
        self.assertEqual(self.asked, [socket.AF_INET6, socket.AF_UNSPEC])
        answers = {socket.AF_INET: unresolvable(socket.EAI_ADDRFAMILY, "Address family for "
                                                "hostname not supported"),
                   socket.AF_UNSPEC: ADDRESSES[1:2]}
        self.assertEqual(self.resolve(answers, host="::1", family=socket.AF_INET),
                         "is not an IPv4 address")

    def test_a_name_that_does_not_exist_in_any_family(self):
        answers = {socket.AF_INET: NONAME, socket.AF_UNSPEC: NONAME}
        self.assertEqual(self.resolve(answers, family=socket.AF_INET), "name not resolved")


class FakeTLS:
    def wrap(self, factory):
        return WrappingFactory(factory)

    def explain(self, reason, connection, received=b"", handshake_done=True):
        return None


class SourceTests(SynchronousTestCase):
    def test_an_address_of_this_machine(self):
        self.assertIsNone(source_problem("127.0.0.1"))

    def test_an_address_of_another(self):
        # 192.0.2.0/24 is for documentation (RFC 5737): no machine has it.
        self.assertEqual(source_problem("192.0.2.1"), "not an address of this machine")


class RecordingReport(Report):
    def __init__(self):
        super().__init__(None, None)
        self.probes = []
        self.finished = []

    def probe(self, seq, result, verdict):
        self.probes.append((seq, result, verdict))

    def finish(self, summary, interrupted):
        self.finished.append((summary, interrupted))


class ScriptedProbes:
    """A probe function whose probes end when the test says, with what it says."""

    def __init__(self, clock):
        self.clock = clock
        self.starts = []
        self.pending = None

    async def __call__(self, reactor, settings):
        self.starts.append(self.clock.seconds())
        self.pending = defer.Deferred()
        return await self.pending

    def end(self, after, total=None, **facts):
        self.clock.advance(after)
        pending, self.pending = self.pending, None
        pending.callback(ProbeResult(host="mail.example", port=25, started=self.starts[-1],
                                     total=after if total is None else total,
                                     connect=0.001, banner=GREETING, **facts))


class ProbeRunTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.probes = ScriptedProbes(self.clock)
        self.report = RecordingReport()

    def start(self, count, interval=1.0, checks=None):
        self.run = ProbeRun(self.clock, ProbeSettings("mail.example", 25), checks or Checks(),
                            self.report,
                            count, interval, probe=self.probes)
        return defer.ensureDeferred(self.run.run())

    def test_one_probe(self):
        status = self.start(1)
        self.probes.end(0.25)
        self.assertEqual(self.successResultOf(status), OK)
        self.assertEqual([seq for seq, _, _ in self.report.probes], [1])
        [(summary, interrupted)] = self.report.finished
        self.assertEqual((summary.probes, interrupted), (1, False))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interval_is_from_start_to_start(self):
        status = self.start(3, interval=1.0)
        self.probes.end(0.25)
        self.clock.advance(0.75)
        self.probes.end(0.5)
        self.clock.advance(0.5)
        self.probes.end(0.125)
        self.assertEqual(self.probes.starts, [0.0, 1.0, 2.0])
        self.assertEqual(self.successResultOf(status), OK)
        self.assertEqual([seq for seq, _, _ in self.report.probes], [1, 2, 3])

    def test_a_slow_probe_is_followed_at_once(self):
        self.start(2, interval=1.0)
        self.probes.end(1.5)
        self.assertEqual(self.probes.starts, [0.0, 1.5])

    def test_worst_probe_decides(self):
        status = self.start(3, interval=1.0, checks=Checks(warning=0.5, critical=2.0))
        for total in (0.1, 0.75, 0.1):
            self.probes.end(total)
            self.clock.advance(1.0 - total)
        self.assertEqual(self.successResultOf(status), WARNING)
        self.assertEqual([verdict.state for _, _, verdict in self.report.probes],
                         [OK, WARNING, OK])

    def test_a_failed_probe_is_critical(self):
        status = self.start(2, interval=1.0)
        self.probes.end(0.1, error="connection refused", refused=True)
        self.clock.advance(0.9)
        self.probes.end(0.1)
        self.assertEqual(self.successResultOf(status), CRITICAL)
        self.assertEqual(self.report.finished[0][0].failed, 1)

    def test_until_interrupted_between_probes(self):
        status = self.start(0, interval=1.0)
        for _ in range(5):
            self.probes.end(0.25)
            self.clock.advance(0.75)
        self.probes.end(0.25)
        self.assertNoResult(status)
        finished = self.run.interrupt()
        self.assertEqual(self.successResultOf(status), OK)
        self.successResultOf(finished)
        [(summary, interrupted)] = self.report.finished
        self.assertEqual((summary.probes, interrupted), (6, True))
        self.assertEqual(self.clock.getDelayedCalls(), [], "the pause is cancelled")

    def test_interrupted_during_a_probe(self):
        status = self.start(0)
        self.probes.end(0.25)
        self.clock.advance(0.75)
        pending = self.probes.pending
        self.run.interrupt()
        self.assertTrue(pending.called, "the probe under way is cancelled")
        self.assertEqual(self.successResultOf(status), OK)
        self.assertEqual(self.report.finished[0][0].probes, 1, "the dropped probe is not counted")

    def test_interrupted_before_the_first_probe_ends(self):
        status = self.start(1)
        self.run.interrupt()
        self.assertEqual(self.successResultOf(status), UNKNOWN)
        self.assertEqual(self.report.finished[0][1], True)

    def test_interrupt_after_the_end_does_nothing(self):
        status = self.start(1)
        self.probes.end(0.25)
        self.successResultOf(status)
        self.assertIsNone(self.run.interrupt())
        self.assertEqual(len(self.report.finished), 1)

    def test_stops_when_the_reader_goes_away(self):
        status = self.start(0)
        self.report.out.closed = True
        self.probes.end(0.25)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(status), OK)
        self.assertEqual(len(self.probes.starts), 1)


class HappyEyeballsTests(SynchronousTestCase):
    def test_families_alternate_ipv6_first(self):
        self.assertEqual(probing.happy_eyeballs(["192.0.2.1", "192.0.2.2", "2001:db8::1",
                                                 "2001:db8::2", "2001:db8::3"]),
                         ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2",
                          "2001:db8::3"])
        self.assertEqual(probing.happy_eyeballs(["192.0.2.1"]), ["192.0.2.1"])


class StageFactsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()

    def test_an_address_is_not_resolved(self):
        resolver = FakeResolver()
        defer.ensureDeferred(probe(self.clock, ProbeSettings("192.0.2.1", 25), resolver))
        self.assertEqual((resolver.calls, self.clock.tcpClients[0][0]), ([], "192.0.2.1"))

    def test_the_stage_of_each_failure(self):
        result = defer.ensureDeferred(probe(self.clock, ProbeSettings("mail.example", 25),
                                            FakeResolver(failure=ProbeError("name not resolved"))))
        self.assertEqual(self.successResultOf(result).stage, "resolve")
        settings = ProbeSettings("192.0.2.1", 25, tls=FakeTLS())
        result = defer.ensureDeferred(probe(self.clock, settings, FakeResolver()))
        factory = self.clock.tcpClients[0][2].wrappedFactory
        protocol, transport = connect(factory)
        transport.received = b""  # as FirstBytesTLS has
        transport.getHandle = lambda: None
        protocol.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.successResultOf(result).stage, "tls", "no handshake yet")

    def test_every_address(self):
        settings = ProbeSettings("mail.example", 25, all_addresses=True)
        results = defer.ensureDeferred(probing.probe_all(self.clock, settings,
                                                         FakeResolver(["127.0.0.1", "::1"])))
        self.clock.advance(0.25)
        hosts = [client[0] for client in self.clock.tcpClients]
        self.assertEqual(hosts, ["::1", "127.0.0.1"], "both at once, IPv6 first")
        self.clock.tcpClients[0][2].clientConnectionFailed(
            None, Failure(error.ConnectionRefusedError()))
        protocol, _ = connect(self.clock.tcpClients[1][2])
        protocol.dataReceived(GREETING)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        refused, read = self.successResultOf(results)
        self.assertEqual((refused.address, refused.stage, refused.refused, refused.resolve),
                         ("::1", "connect", True, 0.0))
        self.assertEqual((read.address, read.banner, read.error), ("127.0.0.1", GREETING, None))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_proxy_header_wraps_the_connection(self):
        defer.ensureDeferred(probe(self.clock, ProbeSettings("192.0.2.1", 25, proxy="v2-local"),
                                   FakeResolver()))
        wrapping = self.clock.tcpClients[0][2]
        transport = StringTransport()
        wrapping.buildProtocol(None).makeConnection(transport)
        self.assertEqual(transport.value(), b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")


class RaceTests(SynchronousTestCase):
    """Happy eyeballs: the next address beside a slow one, the first connection wins."""

    def setUp(self):
        self.clock = MemoryReactorClock()

    def start(self, addresses, timeout=5.0):
        settings = ProbeSettings("mail.example", 25, timeout=timeout, idle=None)
        return defer.ensureDeferred(probe(self.clock, settings, FakeResolver(addresses)))

    def test_a_slow_address_gets_company_after_the_delay(self):
        result = self.start(["2001:db8::1", "192.0.2.1"])
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.clock.advance(probing.CONNECTION_ATTEMPT_DELAY)
        self.assertEqual([c[0] for c in self.clock.tcpClients], ["2001:db8::1", "192.0.2.1"])
        protocol, _ = connect(self.clock.tcpClients[1][2], self.clock, after=0.125)
        self.assertTrue(self.clock.connectors[0].stoppedConnecting, "the loser is dropped")
        protocol.dataReceived(GREETING)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        result = self.successResultOf(result)
        self.assertEqual((result.address, result.tried, result.banner, result.connect),
                         ("192.0.2.1", ("2001:db8::1", "192.0.2.1"), GREETING, 0.125))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failure_starts_the_next_at_once(self):
        self.start(["2001:db8::1", "192.0.2.1", "2001:db8::2"])
        self.clock.tcpClients[0][2].clientConnectionFailed(
            None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(len(self.clock.tcpClients), 2)

    def test_none_connects_before_the_deadline(self):
        result = self.start(["2001:db8::1", "192.0.2.1"], timeout=1.0)
        self.clock.advance(probing.CONNECTION_ATTEMPT_DELAY)
        self.clock.advance(1.0 - probing.CONNECTION_ATTEMPT_DELAY)
        result = self.successResultOf(result)
        self.assertEqual((result.error, result.tried, result.stage),
                         ("timed out (tried 2001:db8::1, 192.0.2.1)",
                          ("2001:db8::1", "192.0.2.1"), "connect"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_while_racing(self):
        result = self.start(["2001:db8::1", "192.0.2.1"])
        self.clock.advance(probing.CONNECTION_ATTEMPT_DELAY)
        result.cancel()
        self.failureResultOf(result, defer.CancelledError)
        self.assertTrue(all(c.stoppedConnecting for c in self.clock.connectors))
        self.assertEqual(self.clock.getDelayedCalls(), [])
