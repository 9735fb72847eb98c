"""
A throw-away certificate authority for the TLS tests, made with
C{cryptography}: a CA, and the leaves it issues either as one file holding
the chain and the key (as the certificate store and ``ssl:`` strports read
them: L{CA.issue}) or as a certificate file and a key file (for backends:
L{CA.issue_pair}, L{CA.server_context}), valid, expired, or with a key that
is not the certificate's. A second CA is a stranger nobody trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(name: str) -> x509.GeneralName:
    """A DNS name, or an IP address for a name that is one."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class CA:
    """A self-signed CA in C{directory}; C{path} is its certificate, for clients' trust."""

    def __init__(self, directory: str | Path, common: str = "portrouter test CA"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        self.subject = _name(common)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(self.subject).issuer_name(self.subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = str(self.directory / "ca.crt")
        Path(self.path).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def roots(self) -> Path:
        """A directory holding only the CA, as Twisted's ``tls:...:trustRoots=DIR`` wants it."""
        roots = self.directory / "roots"
        roots.mkdir(exist_ok=True)
        (roots / "ca.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return roots

    def _leaf(self, key: ec.EllipticCurvePrivateKey, names: tuple[str, ...], cn: str | None, san: bool,
              expired: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 10 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn or names[0])).issuer_name(self.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, path: str, *names: str, cn: str | None = None, san: bool = True,
              key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
        """
        Write C{path}: a leaf for C{names} (SAN DNS names; with C{san=False}
        only a CN), the CA, and the leaf's key (C{key} if given: a mismatch).
        """
        leaf_key = _key()
        leaf = self._leaf(leaf_key, names, cn, san)
        with open(path, "wb") as f:
            f.write(leaf.public_bytes(serialization.Encoding.PEM))
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
            f.write(_pem_key(key if key is not None else leaf_key))
        return leaf

    def mismatched(self, path: str, *names: str) -> None:
        """A file whose key is not the certificate's."""
        self.issue(path, *names, key=_key())

    def issue_pair(self, name: str, *, expired: bool = False) -> tuple[str, str]:
        """A leaf for C{name} (a DNS name or an IP address) in two files: (certificate, key)."""
        key = _key()
        cert = self._leaf(key, (name,), None, True, expired)
        stem = self.directory / f"{name}{'-expired' if expired else ''}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        return str(cert_file), str(key_file)

    def server_context(self, name: str, *, expired: bool = False) -> ssl.SSLContext:
        """A standard-library server context presenting a certificate for C{name}."""
        cert_file, key_file = self.issue_pair(name, expired=expired)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        return context


def serial_of(der: bytes) -> int:
    """The serial number of a certificate as a client received it (DER)."""
    return x509.load_der_x509_certificate(der).serial_number
