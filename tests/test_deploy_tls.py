"""
TLS end to end: the real twistd behind an C{ssl:} endpoint, the real
C{openssl s_client} in front of it, certificates made by the test.

The client verifies the server (C{-verify_return_error} against the file a
real client would trust), so a listener that served the wrong certificate or
left out the intermediate fails these tests instead of passing with a
warning.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from . import confine, tls
from .helpers import (
    assert_fails_in_one_line,
    fetch,
    require_tool,
    run_twistd,
    run_twistd_with,
    start_server,
)
from .tls import s_client

DEFAULT = b"Thank you for connecting\r\n"


def ssl_listener(files: tls.ServerFiles, *, chain: bool = True) -> str:
    description = f"ssl:0:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"
    if chain and files.chain is not None:
        description += f":extraCertChain={files.chain}"
    return description


def temporary_directory(testcase) -> Path:
    directory = tempfile.mkdtemp(prefix="tcpgreet-tls-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return Path(directory)


class TLSGreetingTests(SynchronousTestCase):
    def setUp(self):
        require_tool(self, "openssl")
        self.directory = temporary_directory(self)

    def assertGreetedOverTLS(self, listener: str, trust: Path, greeting: bytes = DEFAULT):
        server = start_server(self, "--listen", listener)
        result = s_client(self, server.port, trust)
        self.assertEqual((result.returncode, result.stdout), (0, greeting),
                         result.stderr.decode(errors="replace"))
        server.wait_for(rf"127\.0\.0\.1 port \d+: greeted over TLS, {len(greeting)} bytes")
        return server

    def test_self_signed_certificate(self):
        files = tls.self_signed(self.directory)
        self.assertGreetedOverTLS(ssl_listener(files), files.trust)

    def test_certificate_chain_with_extra_cert_chain(self):
        files = tls.chained(self.directory)
        self.assertGreetedOverTLS(ssl_listener(files), files.trust)

    def test_without_the_intermediate_the_client_cannot_verify(self):
        # The other side of the test above: it passes because the server
        # sends the intermediate, not because s_client accepts anything.
        files = tls.chained(self.directory)
        server = start_server(self, "--listen", ssl_listener(files, chain=False))
        result = s_client(self, server.port, files.trust)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stdout, b"")
        self.assertIn(b"unable to get local issuer certificate", result.stderr)

    def test_key_and_certificate_in_one_file(self):
        # certKey defaults to privateKey, so one file holding both is enough.
        files = tls.self_signed(self.directory)
        both = tls.combined(files, self.directory / "both.pem")
        self.assertGreetedOverTLS(f"ssl:0:interface=127.0.0.1:privateKey={both}",
                                  files.trust)

    def test_template_sees_the_tls_client(self):
        files = tls.self_signed(self.directory)
        server = start_server(self, "--listen", ssl_listener(files),
                              "--greeting", "hello {peer_host}")
        result = s_client(self, server.port, files.trust)
        self.assertEqual(result.stdout, b"hello 127.0.0.1\r\n")

    def test_plaintext_client_gets_no_greeting(self):
        files = tls.self_signed(self.directory)
        server = start_server(self, "--listen", ssl_listener(files))
        received = fetch(server.host, server.port, send=b"HELLO\r\n")
        self.assertNotIn(b"Thank you", received)
        # Nothing of the greeting was sent, in clear or not; the reason is
        # OpenSSL's, in words.
        server.wait_for(r"127\.0\.0\.1 port \d+: lost \(TLS handshake failed: "
                        r"wrong version number\) after 0 of 26 bytes, [\d.]+ ms$")
        server.stop()
        self.assertNotIn("Traceback", server.log)
        # Nor is the line noise of Twisted's own ports left.
        self.assertNotIn("starting on", server.log)

    def test_a_client_that_distrusts_the_certificate(self):
        files = tls.self_signed(self.directory)
        stranger = tls.self_signed(temporary_directory(self))
        server = start_server(self, "--listen", ssl_listener(files))
        result = s_client(self, server.port, stranger.trust)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stdout, b"")
        server.wait_for(r"127\.0\.0\.1 port \d+: lost \(TLS handshake failed: "
                        r"tlsv1 alert unknown ca\) after 0 of 26 bytes")

    def test_a_client_that_leaves_without_close_notify_was_greeted(self):
        # Python's ssl, like many TLS clients, closes the socket without
        # TLS's close_notify once it has read what it wanted.
        files = tls.self_signed(self.directory)
        server = start_server(self, "--listen", ssl_listener(files))
        context = ssl.create_default_context(cafile=str(files.trust))
        with socket.create_connection((server.host, server.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as secure:
            received = b""
            while not received.endswith(b"\r\n"):
                received += secure.recv(100)
        self.assertEqual(received, DEFAULT)
        server.wait_for(r"127\.0\.0\.1 port \d+: greeted over TLS, 26 bytes")
        server.stop()
        self.assertNotIn("lost", server.log)

    def test_connection_event_says_tls(self):
        # assertGreetedOverTLS checks the text line; the event's field too.
        files = tls.self_signed(self.directory)
        server = start_server(self, "--listen", ssl_listener(files),
                              twistd_args=("--logger", "tcpgreet.logs.json_observer"))
        result = s_client(self, server.port, files.trust)
        self.assertEqual(result.stdout, DEFAULT)
        record = json.loads(server.wait_for(r'"outcome": "greeted"').string)
        self.assertEqual((record["outcome"], record["tls"]), ("greeted", True))



class TLSStartupErrorTests(SynchronousTestCase):
    """
    A TLS file that cannot be used ends twistd with one line that names the
    file and the reason (the project's rule for an operator's mistake).
    """

    def setUp(self):
        self.directory = temporary_directory(self)
        self.files = tls.self_signed(self.directory)

    def assertRefused(self, listener: str, culprit, reason: str, preexec_fn=None) -> str:
        """
        Twistd refuses C{listener}: one line, no traceback, and the line
        (leaving out the quoted endpoint string, which names every file)
        names C{culprit} (or one of several) and matches C{reason}.
        """
        if preexec_fn is None:
            result = run_twistd("--listen", listener)
        else:
            result = run_twistd_with(preexec_fn, "--listen", listener)
        line = assert_fails_in_one_line(self, result, r"^tcpgreet: ")
        beyond_endpoint = line.replace(repr(listener), "")
        culprits = culprit if isinstance(culprit, tuple) else (culprit,)
        self.assertTrue(any(str(path) in beyond_endpoint for path in culprits),
                        f"{line!r} names none of {culprits}")
        self.assertRegex(beyond_endpoint, reason)
        return line

    def listener(self, key: Path | str | None = None, cert: Path | str | None = None,
                 chain: Path | str | None = None) -> str:
        description = (f"ssl:0:interface=127.0.0.1:privateKey={key or self.files.key}"
                       f":certKey={cert or self.files.cert}")
        return description + (f":extraCertChain={chain}" if chain else "")

    def garbage(self, name: str = "garbage.pem") -> Path:
        path = self.directory / name
        path.write_text("this is not PEM\n")
        return path

    def test_missing_key(self):
        self.assertRefused(self.listener(key="/nonexistent/key.pem"), "/nonexistent/key.pem",
                           r"No such file or directory")

    def test_missing_certificate(self):
        self.assertRefused(self.listener(cert="/nonexistent/cert.pem"),
                           "/nonexistent/cert.pem", r"No such file or directory")

    def test_missing_chain(self):
        self.assertRefused(self.listener(chain="/nonexistent/chain.pem"),
                           "/nonexistent/chain.pem", r"No such file or directory")

    def test_unreadable_key(self):
        # Root reads any file; the child runs as a root that cannot, like the
        # service under the hardened unit (CapabilityBoundingSet=).
        self.files.key.chmod(0)
        self.assertRefused(self.listener(), self.files.key, r"Permission denied",
                           preexec_fn=confine.respect_file_permissions)

    def test_key_is_a_directory(self):
        self.assertRefused(self.listener(key=self.directory), self.directory,
                           r"Is a directory")

    def test_garbage_chain(self):
        garbage = self.garbage()
        self.assertRefused(self.listener(chain=garbage), garbage, r"valid certificates")

    def test_garbage_key(self):
        garbage = self.garbage()
        self.assertRefused(self.listener(key=garbage), garbage, r"(?i)key|PEM")


    def test_garbage_certificate(self):
        garbage = self.garbage()
        self.assertRefused(self.listener(cert=garbage), garbage, r"(?i)certificate|PEM")


    def test_key_without_a_certificate(self):
        # certKey defaults to privateKey: a key file alone has no certificate.
        self.assertRefused(f"ssl:0:interface=127.0.0.1:privateKey={self.files.key}",
                           self.files.key, r"(?i)certificate")


    def test_key_does_not_match_certificate(self):
        other = tls.self_signed(temporary_directory(self))
        self.assertRefused(self.listener(key=other.key), (other.key, self.files.cert),
                           r"(?i)match")

