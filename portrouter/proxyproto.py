"""
The PROXY protocol (SPEC section 12; HAProxy's proxy-protocol.txt), both ways.

Receiving: a listener with ``proxy_protocol`` answers through a
L{ProxyGate}. A connection from a trusted address is read until its v1 or
v2 header is whole (Twisted's own parsers, within ``header_timeout``), then
handed, with what followed the header, to what the listener serves, as if
it had come from the header's source: the kernel connection stays the same
(so TCP routes still splice) and its peer address is the client's
everywhere (X-Forwarded-For, logs, ``max_connections``, headers sent on).
A connection from any other address is served as a direct client, and a
header from it is refused, never believed: HTTP listeners answer it with
400 (their parser meets ``PROXY ...`` where a request line must be), TLS
listeners close (it is no ClientHello), and TCP routes watch the first
bytes (L{portrouter.tcp}) and close.

Sending: L{portrouter.proxyheader.header} builds the v1 or v2 header a
backend connection (or, v2, each datagram) starts with.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

# Twisted's parsers: the package exports only proxyEndpoint, which requires
# a header from every peer; a gate must choose by address first.
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from portrouter.interfaces import IReactor
from portrouter.model import ProxyProtocol
from portrouter.proxyheader import V2_SIGNATURE
from portrouter.relay import FirstBytes, hand_over

log = Logger(namespace="portrouter.proxy")

class HeaderReader(FirstBytes):
    """A connection from a trusted address, until its PROXY header has been read."""

    what = "PROXY header"
    where = "proxy protocol"

    def __init__(self, gate: ProxyGate, addr: IAddress):
        super().__init__(gate.reading, gate.reactor, gate.setting.header_timeout, addr)
        self.gate = gate
        self.parser: V1Parser | V2Parser | None = None

    def examine(self, data: bytes) -> None:
        if self.parser is None:
            data = self.buffer
            if data.startswith(V2_SIGNATURE[:len(data)]) and len(data) < 16:
                return  # v2 maybe: its parser wants the fixed 16 bytes at once
            if data.startswith(V2_SIGNATURE):
                self.parser = V2Parser()
            elif data.startswith(b"PROXY "[:len(data)]) and len(data) < 6:
                return
            elif data.startswith(b"PROXY "):
                self.parser = V1Parser()
            else:
                self.refuse(f"no PROXY header from a trusted address: the connection began with {data[:24]!r}")
                return
        try:
            info, rest = self.parser.feed(data)
        except InvalidProxyHeader as e:
            kind = type(e).__name__
            self.refuse(f"a PROXY header Twisted's parser refuses ({kind}): {self.buffer[:64]!r}")
            return
        if info is None:
            return
        # LOCAL (v2) and UNKNOWN (v1): the proxy speaks for itself, and is the peer.
        source = info.source if isinstance(info.source, (IPv4Address, IPv6Address)) else None
        peer = None
        if source is not None:
            checked = _checked(source.host, source.port)
            if checked is None:
                self.refuse(f"a PROXY header whose source is no address and port: {info.header[:64]!r}")
                return
            peer = checked
            source = type(source)("TCP", *checked)
        self.handed()
        inner = self.gate.inner
        rest = rest or b""
        if hasattr(inner, "inbound"):
            # A TCP route: what followed the header is its backend's first bytes.
            protocol, rest = inner.inbound(source or self.addr, rest), b""
        else:
            protocol = inner.buildProtocol(source or self.addr)
        if protocol is None:
            self.transport.loseConnection()
            return
        hand_over(self.transport, protocol, rest, peer=peer)

    def refused(self) -> None:
        self.gate.refused += 1


def _checked(host: str, port: int) -> tuple[str, int] | None:
    """
    A header's source as everyone writes it (Twisted's v2 parser writes
    IPv6 long: 2001:db8:0:0:0:0:0:7), or L{None} when it is none: Twisted's
    v1 parser checks neither the address nor the port's range.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not 0 <= port <= 65535:
        return None
    return address.compressed, port


def datagram_source(data: bytes) -> tuple[tuple[str, int] | None, int] | None:
    """
    The v2 header at the start of a datagram: the source it names (L{None}
    for LOCAL: the sender speaks for itself) and its size; L{None} when the
    datagram starts with no valid one.
    """
    if len(data) < 16 or not data.startswith(V2_SIGNATURE):
        return None
    size = 16 + int.from_bytes(data[14:16], "big")
    if len(data) < size:
        return None
    try:
        info = V2Parser.parse(data[:size])
    except InvalidProxyHeader:
        return None
    source = info.source
    if not isinstance(source, (IPv4Address, IPv6Address)):
        return None, size
    checked = _checked(source.host, source.port)
    return None if checked is None else (checked, size)


class ProxyGate(Factory):
    """
    What a listener with ``proxy_protocol`` answers with: C{inner} (its
    route, under TLS if it has it) for every connection, behind a PROXY
    header from a trusted address.
    """

    noisy = False

    def __init__(self, inner: Any, setting: ProxyProtocol, reactor: IReactor):
        self.inner = inner
        self.setting = setting
        self.reactor = reactor
        self.reading: set[FirstBytes] = set()
        self.refused = 0

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        host = getattr(addr, "host", None)
        if host is not None and self.setting.trusts(host):
            return HeaderReader(self, addr)
        guarded = getattr(self.inner, "guarded", None)  # a TCP route watches for forged headers
        if guarded is not None:
            return guarded(addr)  # type: ignore[no-any-return]
        return self.inner.buildProtocol(addr)  # type: ignore[no-any-return]

    def close_reading(self) -> None:
        for reader in list(self.reading):
            reader.refuse("portrouter is stopping", abort=True)
