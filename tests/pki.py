"""
A test CA and the certificates it signs, made with C{cryptography}: each
leaf file holds its chain (leaf, then the CA) and its key, as the store reads.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """A self-signed CA; C{path} is its certificate, for clients' trust."""

    def __init__(self, directory: str, name: str = "portrouter test CA"):
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = os.path.join(directory, "ca.crt")
        with open(self.path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, path: str, *names: str, cn: str | None = None, san: bool = True,
              key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
        """
        Write C{path}: a leaf for C{names} (SAN DNS names; with C{san=False}
        only a CN), the CA, and the leaf's key (C{key} if given: a mismatch).
        """
        leaf_key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or names[0])]))
            .issuer_name(self.cert.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        leaf = builder.sign(self.key, hashes.SHA256())
        with open(path, "wb") as f:
            f.write(leaf.public_bytes(serialization.Encoding.PEM))
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
            f.write(_pem_key(key if key is not None else leaf_key))
        return leaf

    def mismatched(self, path: str, *names: str) -> None:
        """A file whose key is not the certificate's."""
        self.issue(path, *names, key=_key())


def serial_of(pem_or_der: bytes) -> int:
    """The serial number of a certificate as a client received it (DER)."""
    return x509.load_der_x509_certificate(pem_or_der).serial_number
