"""
Self-signed certificates made in the test, so TLS tests need no files in the
tree and no openssl program.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSigned:
    key_pem: bytes
    certificate_pem: bytes

    def write(self, testcase) -> tuple[str, str]:
        """Write the key and certificate to files the test removes; their paths."""
        directory = tempfile.mkdtemp(prefix="tcpgreet-tls-")
        testcase.addCleanup(os.rmdir, directory)  # runs last: cleanups are LIFO
        paths = []
        for name, data in (("key.pem", self.key_pem), ("cert.pem", self.certificate_pem)):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            testcase.addCleanup(os.remove, path)
            paths.append(path)
        return paths[0], paths[1]


def make_certificate(names: list[str], days: float = 10.0) -> SelfSigned:
    """
    A self-signed certificate for C{names} (DNS names, or IP addresses),
    valid from an hour ago until C{days} from now.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternatives = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return SelfSigned(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        certificate.public_bytes(serialization.Encoding.PEM))
