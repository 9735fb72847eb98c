"""
TLS for every listener: the certificate store (``tls: {certificates: DIR}``)
chosen by SNI, and the server contexts for ``ssl:`` strports, built the same
way so that the same rules hold on every port:

  - TLS 1.2 and 1.3 only;
  - ALPN: a listener that speaks HTTP (the ingress, http and ws routes)
    offers ``http/1.1``; a client that offers only other protocols (``h2``)
    still gets a handshake, with no protocol chosen; a TCP route negotiates
    nothing and never fails a client for offering ALPN.

Why our own contexts: Twisted's C{CertificateOptions} installs an ALPN select
callback (C{twisted.internet._sslverify.setupForALPN}) that answers C{b""}
when the client's list and the factory's (C{IProtocolNegotiationFactory})
do not overlap, which OpenSSL turns into a fatal C{internal_error} alert: every
client that offers ALPN (curl, browsers) failed on every portrouter listener,
whose factories offer none. pyOpenSSL's C{NO_OVERLAPPING_PROTOCOLS} is the
answer that lets the handshake go on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="portrouter")

HTTP_PROTOCOLS = (b"http/1.1",)
# Mozilla's "intermediate" choice for TLS 1.2 (TLS 1.3 suites are OpenSSL's own).
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    b"DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET | getattr(
    SSL, "OP_NO_RENEGOTIATION", 0)


_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S)


class CertificateError(Exception):
    """A certificate file that cannot be served; the message names the file."""


def _select_protocol(conn: SSL.Connection, offered: Sequence[bytes]) -> Any:
    """
    The first protocol of the listener's factory that the client offers,
    else none at all (not an alert). The factory is looked up per connection,
    so a port that changes hands answers for its current route.
    """
    tls = conn.get_app_data()
    factory = getattr(getattr(tls, "factory", None), "wrappedFactory", None)
    negotiation = IProtocolNegotiationFactory(factory, None)
    if negotiation is not None:
        for protocol in negotiation.acceptableProtocols():
            if protocol in offered:
                return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def server_context(leaf: Any, chain: Sequence[Any], key: Any, dh_file: str | None = None) -> SSL.Context:
    """A server context for one certificate: TLS 1.2+, our ALPN rule, no tickets."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.use_certificate(leaf)
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    if dh_file is not None:
        ctx.load_tmp_dh(dh_file)
    ctx.set_alpn_select_callback(_select_protocol)
    ctx.set_cipher_list(CIPHERS)
    return ctx


# -- the store ---------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """One ``*.pem`` of the store: its names and its context."""

    path: str
    names: tuple[str, ...]
    context: SSL.Context = field(compare=False, repr=False)


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the SAN, else the CN; lower-case, as SNI is compared."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(n.lower().rstrip(".") for n in names)


def load_certificate(path: str) -> Certificate:
    """Read one PEM file holding a chain (leaf first) and the leaf's private key."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CertificateError(f"{path}: cannot read: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{path}: holds no PEM certificate that can be read") from None
    block = _KEY_BLOCK.search(data)
    key = None
    if block is not None:
        try:
            key = load_pem_private_key(block.group(0), password=None)
        except TypeError:
            raise CertificateError(f"{path}: the private key is encrypted; "
                                   "portrouter needs it unencrypted") from None
        except ValueError as e:
            raise CertificateError(f"{path}: the private key cannot be read: {e}") from None
    if key is None:
        raise CertificateError(f"{path}: holds no private key (each file needs its chain and its key)")
    leaf = certs[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise CertificateError(f"{path}: the private key does not match the certificate")
    names = _names(leaf)
    if not names:
        raise CertificateError(f"{path}: the certificate names no host (no DNS name in its SAN, no CN)")
    try:
        context = server_context(leaf, certs[1:], key)
    except SSL.Error as e:
        raise CertificateError(f"{path}: OpenSSL refuses it: {e}") from None
    return Certificate(path, names, context)


class CertificateStore:
    """
    The certificates of one directory, chosen by the name the client asks
    for (SNI): an exact name, then a wildcard one label deep
    (``*.apps.example.com`` for ``a.apps.example.com``), then the default.
    """

    def __init__(self, certificates: Sequence[Certificate], default: Certificate):
        self.certificates = tuple(certificates)
        self.default = default
        self.exact: dict[str, Certificate] = {}
        self.wildcard: dict[str, Certificate] = {}
        for cert in self.certificates:  # in name order: the first file naming a host wins
            for name in cert.names:
                table, key = (self.wildcard, name[2:]) if name.startswith("*.") else (self.exact, name)
                table.setdefault(key, cert)
        # Connections start on the default's context; the SNI callback
        # switches them. Every context has the callback, so any can be the base.
        for cert in self.certificates:
            cert.context.set_tlsext_servername_callback(self._servername)

    @classmethod
    def load(cls, directory: str, default: str | None = None) -> CertificateStore:
        """
        Read every ``*.pem`` of C{directory}; the first file that cannot be
        served raises L{CertificateError} naming it. Without C{default}, the
        first file in name order is the default (as nginx's first server).
        """
        try:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".pem"))
        except OSError as e:
            raise CertificateError(f"{directory}: cannot list: {e.strerror}") from None
        if not files:
            raise CertificateError(f"{directory}: holds no *.pem file")
        certificates = [load_certificate(os.path.join(directory, n)) for n in files]
        chosen = certificates[0]
        if default is not None:
            if default not in files:
                raise CertificateError(f"{directory}: tls.default {default!r} is not a *.pem file there "
                                       f"(there are: {', '.join(files)})")
            chosen = certificates[files.index(default)]
        return cls(certificates, chosen)

    def covers_below(self, domain: str) -> bool:
        """A certificate of the store names every host one label below C{domain} (``*.domain``)."""
        return domain in self.wildcard

    def choose(self, server_name: str | None) -> Certificate:
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self.exact.get(name)
            if found is None and "." in name:
                found = self.wildcard.get(name.split(".", 1)[1])
            if found is not None:
                return found
        return self.default

    def _servername(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        cert = self.choose(raw.decode("ascii", "replace") if raw else None)
        if conn.get_context() is not cert.context:
            conn.set_context(cert.context)

    def connection(self) -> SSL.Connection:
        return SSL.Connection(self.default.context)


@implementer(IOpenSSLServerConnectionCreator)
class StoreTLS:
    """TLS from the router's current store: a reload changes what new connections get."""

    def __init__(self) -> None:
        self.store: CertificateStore | None = None

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        assert self.store is not None, "a tls: true listener without a certificate store"
        return self.store.connection()


@implementer(IOpenSSLServerConnectionCreator)
class ContextTLS:
    """TLS from one context (an ``ssl:`` strport's certificate)."""

    def __init__(self, context: SSL.Context):
        self.context = context

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context)


# Methods named by an ``ssl:`` strport (``sslmethod=``) that may speak 1.2 or later.
_MODERN_METHODS = {"TLS_METHOD", "TLS_SERVER_METHOD", "SSLv23_METHOD", "TLSv1_2_METHOD"}


def strport_tls(endpoint: Any) -> ContextTLS | None:
    """
    For an ``ssl:`` strport, a connection creator with the same key and
    certificate (and chain, DH parameters) under our rules; L{None} for any
    other endpoint.
    """
    options = getattr(endpoint, "_sslContextFactory", None)
    if options is None:
        return None
    method = getattr(options, "method", None)
    if method is not None:
        names = {n for n in dir(SSL) if n.endswith("_METHOD") and getattr(SSL, n) == method}
        if not names & _MODERN_METHODS:
            raise CertificateError(f"sslmethod={sorted(names)[0] if names else method}: "
                                   "portrouter speaks TLS 1.2 and 1.3 only")
    dh = getattr(options, "dhParameters", None)
    dh_file = dh._dhFile.path if dh is not None else None
    try:
        context = server_context(options.certificate.to_cryptography(),
                                 [c.to_cryptography() for c in options.extraCertChain or ()],
                                 options.privateKey.to_cryptography_key(), dh_file)
    except SSL.Error as e:
        raise CertificateError(f"the certificate or key cannot be used: {e}") from None
    return ContextTLS(context)


@implementer(ISSLTransport)
class TLSServerTransport(BufferingTLSTransport):
    """
    Twisted's TLS transport, with two differences:

      - it says that it is one: C{TLSMemoryBIOProtocol} copies the
        interfaces of the TCP connection under it (C{ITLSTransport} among
        them, which only means "can start TLS") but does not provide
        C{ISSLTransport}, which is how a channel knows it is behind TLS;
      - TLS 1.3 half-close: a client's close_notify ends only its direction
        (RFC 8446 6.1), so a half-closeable protocol (a TCP route) is told
        C{readConnectionLost} and may go on writing; our close_notify goes
        when it closes. Twisted answers close_notify at once and closes,
        which TLS 1.2 requires (RFC 5246 7.2.1) and which stays so for 1.2.
    """

    _peer_closed = False  # the client's close_notify came; ours waits for loseConnection

    def _flushReceiveBIO(self) -> None:
        # Twisted's own loop (twisted.protocols.tls), with the half-close.
        while not self._lostTLSConnection and not self._peer_closed:
            try:
                data = self._tlsConnection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                if self._half_close():
                    break
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if reason is not None and reason.check(SSL.ZeroReturnError):
            # The client's close_notify before its handshake was done: a
            # clean close, whose reason is the connection's own (None says
            # so). Twisted's _representsEOF reads the first argument of any
            # error given, which this one has none of, and raised out of the
            # reactor ("Unhandled Error").
            reason = None
        try:
            transport: Any = self.transport
            if (reason is not None and not self._handshakeDone and self._reason is None
                    and reason.check(SSL.Error)
                    and getattr(transport, "connected", False)):
                # A client that speaks no TLS (plain HTTP to an HTTPS port, a
                # PROXY header from an address not trusted to send one) or
                # none we speak (TLS 1.1, no common cipher): one line, as
                # HAProxy logs its handshake failures. A client gone before
                # or during its handshake (a port check: its connection is
                # lost by now; or its close_notify, above) is no error, and
                # says nothing.
                log.info("tls {peer} to port {port}: handshake failed ({why}); closed",
                         peer=_show(transport.getPeer()), port=getattr(transport.getHost(), "port", "-"),
                         why=openssl_reasons(reason.value) or reason.getErrorMessage())
        finally:
            super()._tlsShutdownFinished(reason)  # the connection closes, whatever the line did

    def _half_close(self) -> bool:
        if (self.disconnecting or self._tlsConnection.get_protocol_version_name() != "TLSv1.3"
                or not IHalfCloseableProtocol.providedBy(self.wrappedProtocol)):
            return False
        self._peer_closed = True
        self.wrappedProtocol.readConnectionLost()
        return True


def openssl_reasons(error: BaseException | None) -> str:
    """
    What OpenSSL said, its reasons joined ("wrong version number",
    "unsupported protocol"): pyOpenSSL's Error holds a list of (library,
    function, reason) triples. Empty when it said nothing.
    """
    queue = error.args[0] if error is not None and error.args and isinstance(error.args[0], list) else []
    return "; ".join(str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry and entry[-1])


def _show(address: Any) -> str:
    """A peer as the logs write one (sessions.show_address; this layer is below it)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return "unix"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TLSFactory(TLSMemoryBIOFactory):
    """TLS in front of one of our factories; C{wrappedFactory} may be swapped."""

    protocol = TLSServerTransport

    def __init__(self, creator: Any, isClient: bool, wrappedFactory: Any) -> None:
        super().__init__(creator, isClient, wrappedFactory)
        self.creator = creator


def is_tls(transport: Any) -> bool:
    return ISSLTransport.providedBy(transport)


def tls_handle(transport: Any) -> SSL.Connection | None:
    """The OpenSSL connection under a TLS transport, kept for logging after it closes."""
    if not is_tls(transport):
        return None
    handle = transport.getHandle()
    return handle if isinstance(handle, SSL.Connection) else None


def describe(handle: SSL.Connection | None) -> str:
    """`` tls=TLSv1.3 sni=name`` for a log line; empty for plain connections."""
    if handle is None:
        return ""
    if handle.get_cipher_name() is None:
        return " tls=no-handshake"
    raw = handle.get_servername()
    sni = raw.decode("ascii", "replace") if raw else "-"
    return f" tls={handle.get_protocol_version_name()} sni={sni}"
