"""
TLS for tests: certificates made on the fly with C{cryptography} (which
C{twisted[tls]} brings), a self-signed one and a chain root CA ->
intermediate CA -> server certificate, the shape a public CA hands out; and
the real C{openssl s_client} to connect with.

Keys are P-256: as good as RSA for these tests and generated in microseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .helpers import require_tool

SERVER_NAME = "localhost"


@dataclass
class ServerFiles:
    """PEM files for a TLS listener, and the file a client must trust."""

    key: Path
    cert: Path
    trust: Path
    chain: Path | None = None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName(SERVER_NAME),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, *objects) -> Path:
    with path.open("wb") as f:
        for obj in objects:
            if isinstance(obj, x509.Certificate):
                f.write(obj.public_bytes(serialization.Encoding.PEM))
            else:
                f.write(obj.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return path


def self_signed(directory: Path) -> ServerFiles:
    """A certificate for localhost and 127.0.0.1 that vouches for itself."""
    key = _key()
    cert = _certificate(SERVER_NAME, key, SERVER_NAME, key, ca=False)
    cert_path = _write(directory / "cert.pem", cert)
    return ServerFiles(key=_write(directory / "key.pem", key), cert=cert_path,
                       trust=cert_path)


def chained(directory: Path) -> ServerFiles:
    """
    A server certificate signed by an intermediate CA signed by a root CA.
    Clients trust only the root, so the server must send the intermediate.
    """
    root_key, intermediate_key, key = _key(), _key(), _key()
    root = _certificate("tcpgreet test root CA", root_key,
                        "tcpgreet test root CA", root_key, ca=True)
    intermediate = _certificate("tcpgreet test intermediate CA", intermediate_key,
                                "tcpgreet test root CA", root_key, ca=True)
    cert = _certificate(SERVER_NAME, key, "tcpgreet test intermediate CA",
                        intermediate_key, ca=False)
    return ServerFiles(key=_write(directory / "key.pem", key),
                       cert=_write(directory / "cert.pem", cert),
                       chain=_write(directory / "chain.pem", intermediate),
                       trust=_write(directory / "root.pem", root))


def combined(files: ServerFiles, path: Path) -> Path:
    """Key and certificate in one file, as many tools store them."""
    path.write_bytes(files.key.read_bytes() + files.cert.read_bytes())
    return path


def s_client(testcase, port: int, trust: Path) -> subprocess.CompletedProcess:
    """
    C{openssl s_client -quiet}: the handshake, verified against C{trust} and
    the name C{localhost}, then everything the server sends, to EOF.
    """
    openssl = require_tool(testcase, "openssl")
    return subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
         "-servername", SERVER_NAME, "-verify_hostname", SERVER_NAME,
         "-CAfile", str(trust), "-verify_return_error"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
