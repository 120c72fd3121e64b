"""
TLS for the probe client: which certificates to trust, the connection
creator to hand to C{connectSSL}, what the handshake established, and a
failed handshake told in one line an operator can act on.
"""

from __future__ import annotations

import re
import ssl as stdlib_ssl

import idna
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import error, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

# looks_like_tls and speaks_tls live with the outcome, so that a plain probe,
# which asks them of every banner, need not import OpenSSL.
from tcpgreet.client.options import is_address
from tcpgreet.client.outcome import TLSInfo, looks_like_tls, speaks_tls  # noqa: F401
from tcpgreet.client.report import render_line

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_ca(path: str) -> tuple[ssl.Certificate, ...]:
    """
    The certificates in the PEM file C{path}; raises C{ValueError} saying
    why it cannot be used.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror}") from None
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ValueError("no PEM certificate in it")
    try:
        return tuple(ssl.Certificate.loadPEM(block) for block in blocks)
    except (crypto.Error, ValueError):
        raise ValueError("holds a certificate that cannot be parsed") from None


class TLSClient:
    """
    How to speak TLS to C{host}: verify its certificate against C{ca} (or
    the system's trust store when C{ca} is C{None}), or not at all when
    C{insecure}.  The server name (SNI) is C{host} unless it is an address.
    """

    def __init__(self, host: str, ca: tuple[ssl.Certificate, ...] | None = None,
                 insecure: bool = False) -> None:
        self.host = host
        self.ca = ca
        self.insecure = insecure
        self.creator: IOpenSSLClientConnectionCreator
        if insecure:
            self.creator = UnverifiedTLS(host)
        else:
            trust = ssl.trustRootFromCertificates(list(ca)) if ca else ssl.platformTrust()
            self.creator = ssl.optionsForClientTLS(host, trust)

    def wrap(self, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
        """
        C{factory} over TLS, for C{connectTCP}: what C{connectSSL} does,
        keeping the first bytes the server sends (L{FirstBytesTLS}).
        """
        return FirstBytesTLSFactory(self.creator, True, factory)

    def explain(self, reason: Failure, connection: SSL.Connection | None,
                received: bytes = b"", handshake_done: bool = True) -> str | None:
        """
        A TLS failure in one line, naming the certificate problem when there
        is one, or saying that the server does not seem to speak TLS when
        the handshake did not complete; C{None} when C{reason} is not about
        TLS.  C{received} is the first bytes the server sent, as they came.
        """
        if not handshake_done:
            if received and not looks_like_tls(received):
                # OpenSSL would say "wrong version number": the server
                # answered, but not in TLS.
                return ("the server did not answer the TLS handshake: is it TLS? "
                        f"(it sent {quoted(received)})")
            if not received and reason.check(error.ConnectionLost, error.ConnectionDone):
                return ("the server closed the connection without answering the TLS "
                        "handshake: is it TLS?")
        if reason.check(VerificationError):
            # The handshake was cut short: the chain is there, the peer
            # certificate is not.
            chain = connection.get_peer_cert_chain() if connection is not None else None
            names = _names(chain[0].to_cryptography() if chain else None)
            return f"TLS certificate is not valid for {self.host}" + (
                f" (it names {names})" if names else "")
        failed = reason.value
        if not isinstance(failed, SSL.Error):
            return None
        reasons = _openssl_reasons(failed)
        if "certificate verify failed" in reasons:
            why = self._why_untrusted(connection) or "certificate verify failed"
            return f"TLS certificate not trusted: {why} (see --ca, --insecure)"
        return f"TLS handshake failed: {', '.join(reasons) or reason.getErrorMessage()}"

    def _why_untrusted(self, connection: SSL.Connection | None) -> str | None:
        """
        OpenSSL's reason ("self-signed certificate", "certificate has
        expired"), found by verifying the server's chain again, because a
        failed handshake reports only "certificate verify failed".
        """
        chain = connection.get_peer_cert_chain() if connection is not None else None
        if not chain:
            return None
        store = crypto.X509Store()
        if self.ca:
            for certificate in self.ca:
                store.add_cert(certificate.original)
        else:
            paths = stdlib_ssl.get_default_verify_paths()
            if paths.cafile or paths.capath:
                store.load_locations(paths.cafile, paths.capath)
        try:
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            return str(e)
        return None


def handshake_info(connection: SSL.Connection) -> TLSInfo:
    """What a completed handshake established."""
    certificate = connection.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        # A completed handshake authenticates the server by its certificate:
        # OpenSSL offers no anonymous cipher suite by default.
        raise SSL.Error("the server sent no certificate")
    return TLSInfo(
        version=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name() or "",
        not_after=certificate.not_valid_after_utc)


class FirstBytesTLS(TLSMemoryBIOProtocol):
    """
    TLS that keeps the first bytes the server sent, as they came: when the
    handshake fails, they tell a server that does not speak TLS (a banner,
    C{SSH-2.0-...}) from one that does.
    """

    received = b""
    kept = 80

    def dataReceived(self, data: bytes) -> None:
        if len(self.received) < self.kept:
            self.received += data[:self.kept - len(self.received)]
        super().dataReceived(data)


class FirstBytesTLSFactory(TLSMemoryBIOFactory):
    protocol = FirstBytesTLS


def quoted(data: bytes, limit: int = 60) -> str:
    """The first line of what a server sent, escaped, cut short, in quotes."""
    line = render_line(data)
    return f"'{line}'" if len(line) <= limit else f"'{line[:limit]}...'"


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """
    C{--insecure}: TLS that accepts any certificate but still sends the
    server name, so a server with several certificates shows the one it
    would show a real client (C{optionsForClientTLS} always verifies).
    """

    def __init__(self, host: str) -> None:
        self._context = ssl.CertificateOptions().getContext()
        self.server_name = None if is_address(host) else idna.encode(host, uts46=True)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self.server_name is not None:
            connection.set_tlsext_host_name(self.server_name)
        return connection


def _openssl_reasons(error: SSL.Error) -> list[str]:
    # SSL.Error carries [(library, function, reason), ...].
    details = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return [entry[-1] for entry in details if isinstance(entry, tuple) and entry[-1]]


def _names(certificate: x509.Certificate | None) -> str:
    """The DNS names and addresses a certificate is for, comma-separated."""
    if certificate is None:
        return ""
    try:
        alternatives = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    names = alternatives.get_values_for_type(x509.DNSName)
    names += [str(address) for address in alternatives.get_values_for_type(x509.IPAddress)]
    return ", ".join(names)
