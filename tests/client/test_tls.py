"""
The client's TLS: against C{twistd tcpgreet --listen ssl:...} with
certificates made in the test, verified with --ca and refused without it;
against a stdlib TLS server for names, expiry and SNI; handshake failures
in one line; and the two mistakes, --tls against a plain server (tcpgreet,
sshd) and a plain probe against a TLS one, told as such.
"""

import json
import shutil
import ssl
import tempfile
import threading
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.client.probe import GreetClientFactory
from tcpgreet.client.tls import TLSClient, UnverifiedTLS, load_ca, looks_like_tls

from .. import tls
from ..certificates import make_certificate
from ..clientprocess import SocketServer, run
from ..helpers import start_server, temporary_file
from ..sshd import start_sshd

GREETING = b"Thank you for connecting\n"


class UnitTests(SynchronousTestCase):
    def test_insecure_still_sends_the_server_name(self):
        connection = UnverifiedTLS("mail.example").clientConnectionForTLS(None)
        self.assertEqual(connection.get_servername(), b"mail.example")

    def test_no_server_name_for_an_address(self):
        for address in ("192.0.2.1", "2001:db8::1"):
            connection = UnverifiedTLS(address).clientConnectionForTLS(None)
            self.assertIsNone(connection.get_servername())

    def test_explain_handshake_failure(self):
        client = TLSClient("mail.example", insecure=True)
        failure = Failure(SSL.Error([("SSL routines", "", "wrong version number")]))
        self.assertEqual(client.explain(failure, None),
                         "TLS handshake failed: wrong version number")
        failure = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        self.assertEqual(client.explain(failure, None), "TLS certificate not trusted: certificate "
                                                        "verify failed (see --ca, --insecure)")

    def test_a_server_that_does_not_speak_tls(self):
        client = TLSClient("mail.example", insecure=True)
        wrong_version = Failure(SSL.Error([("SSL routines", "", "wrong version number")]))
        for received, shown in [
            (b"SSH-2.0-OpenSSH_9.2p1\r\nmore", "'SSH-2.0-OpenSSH_9.2p1'"),
            (b"\x1b[2J" + b"x" * 70, "'\\x1b[2J" + "x" * 53 + "...'"),
        ]:
            self.assertEqual(
                client.explain(wrong_version, None, received, handshake_done=False),
                f"the server did not answer the TLS handshake: is it TLS? (it sent {shown})")
        self.assertEqual(
            client.explain(Failure(error.ConnectionLost()), None, b"hi", handshake_done=False),
            "the server did not answer the TLS handshake: is it TLS? (it sent 'hi')")
        self.assertEqual(
            client.explain(Failure(error.ConnectionLost()), None, b"", handshake_done=False),
            "the server closed the connection without answering the TLS handshake: is it TLS?")

    def test_a_tls_server_that_refuses(self):
        client = TLSClient("mail.example", insecure=True)
        alert = b"\x15\x03\x03\x00\x02\x02\x46"  # protocol_version
        failure = Failure(SSL.Error([("SSL routines", "", "tlsv1 alert protocol version")]))
        self.assertEqual(client.explain(failure, None, alert, handshake_done=False),
                         "TLS handshake failed: tlsv1 alert protocol version")

    def test_looks_like_tls(self):
        for data in (b"\x16", b"\x16\x03", b"\x16\x03\x01\x00", b"\x15\x03\x03",
                     b"\x14\x03\x04"):
            self.assertTrue(looks_like_tls(data), data)
        for data in (b"", b"SSH-2.0", b"\x16\x02", b"\x16\x03\x05", b"\x13\x03\x01", b"220 "):
            self.assertFalse(looks_like_tls(data), data)

    def test_first_bytes_kept_under_tls(self):
        # The real TLS layer over a StringTransport: the client's hello
        # goes out, an SSH banner comes back.
        client = TLSClient("localhost", insecure=True)
        factory = GreetClientFactory(MemoryReactorClock(), tls=client)
        results = []
        factory.deferred.addBoth(results.append)
        layer = client.wrap(factory).buildProtocol(None)
        transport = StringTransport()
        layer.makeConnection(transport)
        self.assertTrue(looks_like_tls(transport.value()), "a ClientHello was sent")
        layer.dataReceived(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
        self.assertTrue(transport.disconnecting)
        layer.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(str(results[0].value), "the server did not answer the TLS handshake: "
                                                "is it TLS? (it sent 'SSH-2.0-OpenSSH_9.2p1 "
                                                "Debian-2')")

    def test_other_failures_are_not_tls(self):
        client = TLSClient("mail.example", insecure=True)
        self.assertIsNone(client.explain(Failure(error.ConnectionLost()), None))

    def test_load_several_certificates(self):
        pem = (make_certificate(["a.example"]).certificate_pem
               + make_certificate(["b.example"]).certificate_pem)
        path = temporary_file(self, b"a comment before\n" + pem, ".pem")
        names = [certificate.original.to_cryptography().subject.rfc4514_string()
                 for certificate in load_ca(path)]
        self.assertEqual(names, ["CN=a.example", "CN=b.example"])


class TwistdTests(SynchronousTestCase):
    """
    The real server on ssl:, with the project's test certificates: a
    self-signed one for localhost and 127.0.0.1, valid for a day, and a
    chain root -> intermediate -> server.
    """

    def setUp(self):
        self.directory = Path(tempfile.mkdtemp(prefix="tcpgreet-client-tls-"))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def serve(self, files, chain=True):
        listener = f"ssl:0:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"
        if chain and files.chain is not None:
            listener += f":extraCertChain={files.chain}"
        return str(start_server(self, "--listen", listener, "--quiet").port)

    def test_verified_with_ca(self):
        files = tls.self_signed(self.directory)
        port = self.serve(files)
        for host in ("localhost", "127.0.0.1"):
            result = run("--tls", "--ca", str(files.trust), host, port)
            self.assertEqual((result.returncode, result.stdout, result.stderr),
                             (0, GREETING, b""), host)

    def test_refused_without_ca(self):
        port = self.serve(tls.self_signed(self.directory))
        result = run("--tls", "localhost", port)
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: localhost port {port}: failed at tls: "
                         "TLS certificate not "
                         "trusted: self-signed certificate (see --ca, --insecure)\n")

    def test_chain_sent_by_the_server(self):
        files = tls.chained(self.directory)
        result = run("--tls", "--ca", str(files.trust), "localhost", self.serve(files))
        self.assertEqual((result.returncode, result.stdout), (0, GREETING))

    def test_chain_not_sent(self):
        files = tls.chained(self.directory)
        port = self.serve(files, chain=False)
        result = run("--tls", "--ca", str(files.trust), "localhost", port)
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: localhost port {port}: failed at tls: "
                         "TLS certificate not "
                         "trusted: unable to get local issuer certificate (see --ca, "
                         "--insecure)\n")

    def test_insecure(self):
        port = self.serve(tls.self_signed(self.directory))
        result = run("--tls", "--insecure", "--json", "127.0.0.1", port)
        probe = json.loads(result.stdout.splitlines()[0])
        self.assertEqual((result.returncode, probe["ok"], probe["banner"]),
                         (0, True, "Thank you for connecting\r\n"))
        self.assertTrue(probe["tls_version"].startswith("TLSv1."))
        self.assertAlmostEqual(probe["cert_days_left"], 1, delta=0.1)
        self.assertLessEqual(probe["connect_ms"], probe["tls_ms"])
        self.assertLessEqual(probe["tls_ms"], probe["total_ms"])

    def test_certificate_expiry(self):
        files = tls.self_signed(self.directory)  # expires in a day
        port = self.serve(files)
        for days, status in (("0.5", 0), ("2,0.5", 1), ("2,1.5", 2)):
            result = run("--tls", "--ca", str(files.trust), "--cert-days", days, "--plugin",
                         "localhost", port)
            self.assertEqual(result.returncode, status, days)
            if status:
                self.assertRegex(result.stdout.decode(),
                                 r" - certificate expires in 1\.0 days \(")


class MismatchTests(SynchronousTestCase):
    """
    --tls against servers that do not speak it, and a plain probe against
    one that does: one line that says what most likely happened.
    """

    def test_tls_against_plain_tcpgreet(self):
        plain = start_server(self, "--listen", "tcp:0:interface=127.0.0.1", "--quiet")
        result = run("--tls", "--insecure", "127.0.0.1", str(plain.port))
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        # tcpgreet closes at once: rarely, its reset to the client's hello
        # comes before its greeting is read.
        self.assertRegex(result.stderr.decode(),
                         rf"^tcpgreet-client: 127\.0\.0\.1 port {plain.port}: failed at tls: "
                         r"the server "
                         r"(did not answer the TLS handshake: is it TLS\? \(it sent 'Thank you "
                         r"for connecting'\)|closed the connection without answering the TLS "
                         r"handshake: is it TLS\?)\n$")

    def test_tls_against_sshd(self):
        sshd = start_sshd(self)
        result = run("--tls", "--insecure", "127.0.0.1", str(sshd.port))
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertRegex(result.stderr.decode(),
                         rf"^tcpgreet-client: 127\.0\.0\.1 port {sshd.port}: failed at tls: "
                         r"the server did not "
                         r"answer the TLS handshake: is it TLS\? \(it sent 'SSH-2\.0-[^']+'\)\n$")

    def test_tls_against_a_server_that_closes(self):
        server = SocketServer(self, lambda connection: connection.recv(1))
        result = run("--tls", "--insecure", *server.target)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: 127.0.0.1 port {server.port}: failed at tls: "
                         "the server closed "
                         "the connection without answering the TLS handshake: is it TLS?\n")

    def test_tls_against_a_silent_server(self):
        answered = threading.Event()
        server = SocketServer(self, lambda connection: answered.wait(30))
        self.addCleanup(answered.set)
        result = run("--tls", "--insecure", "--timeout", "0.5", *server.target)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: 127.0.0.1 port {server.port}: failed at tls: "
                         "timed out in the TLS "
                         "handshake: the server sent nothing (is it TLS?)\n")

    def serve_tls(self):
        files = tls.self_signed(Path(tempfile.mkdtemp(prefix="tcpgreet-client-tls-")))
        self.addCleanup(shutil.rmtree, files.key.parent, ignore_errors=True)
        listener = f"ssl:0:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"
        return start_server(self, "--listen", listener, "--quiet")

    def test_plain_probe_against_tls(self):
        server = self.serve_tls()
        result = run("--timeout", "0.5", "127.0.0.1", str(server.port))
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: 127.0.0.1 port {server.port}: failed at read: "
                         "timed out waiting for a banner (does the server wait for the "
                         "client? try --send or --tls)\n")

    def test_plain_probe_answered_in_tls(self):
        # A handshake record too short to be a hello: the server answers
        # with an alert (decode error), which is not a banner.
        server = self.serve_tls()
        result = run("--json", "--send", "\\x16\\x03\\x01\\x00\\x04\\x01\\x00\\x00\\x00",
                     "127.0.0.1", str(server.port))
        self.assertEqual(result.returncode, 2)
        probe = json.loads(result.stdout.splitlines()[0])
        self.assertEqual((probe["ok"], probe["error"], probe["banner"][:2]),
                         (False, "the server speaks TLS: try --tls", "\x15\x03"))


class TLSServer(SocketServer):
    """A stdlib TLS server in a thread, which records the names clients ask for."""

    def __init__(self, testcase, certificate, greeting=b"220 tls.example ready\r\n"):
        key, cert = certificate.write(testcase)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server_names = []
        context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)

        def greet(connection):
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(greeting)

        super().__init__(testcase, greet)
        self.ca = cert


class StdlibServerTests(SynchronousTestCase):
    def test_server_name_is_sent(self):
        for extra in (["--insecure"], ["--ca"]):
            server = TLSServer(self, make_certificate(["localhost"]))
            args = [*extra, server.ca] if extra == ["--ca"] else extra
            result = run("--tls", *args, "localhost", str(server.port))
            self.assertEqual((result.returncode, server.server_names), (0, ["localhost"]), extra)

    def test_name_mismatch(self):
        server = TLSServer(self, make_certificate(["other.example", "192.0.2.7"]))
        result = run("--tls", "--ca", server.ca, "localhost", str(server.port))
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: localhost port {server.port}: failed at tls: "
                         "TLS certificate is "
                         "not valid for localhost (it names other.example, 192.0.2.7)\n")

    def test_expired_certificate(self):
        expired = make_certificate(["localhost"], days=-0.01)
        server = TLSServer(self, expired)
        result = run("--tls", "--ca", server.ca, "localhost", str(server.port))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.decode(),
                         f"tcpgreet-client: localhost port {server.port}: failed at tls: "
                         "TLS certificate not "
                         "trusted: certificate has expired (see --ca, --insecure)\n")
        server = TLSServer(self, expired)
        result = run("--tls", "--insecure", "--cert-days", "30", "localhost", str(server.port))
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stderr.decode(), r": certificate expired 0\.0 days ago \(")
