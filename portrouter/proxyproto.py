"""
The PROXY protocol (SPEC section 12; HAProxy's proxy-protocol.txt), both ways.

Receiving: a listener with ``proxy_protocol`` answers through a
L{ProxyGate}. A connection from a trusted address is read until its v1 or
v2 header is whole (Twisted's own parsers, within ``header_timeout``), then
handed, with what followed the header, to what the listener serves, as if
it had come from the header's source: the kernel connection stays the same
(so TCP routes still splice) and its peer address is the client's
everywhere (X-Forwarded-For, logs, ``max_connections``, headers sent on).
Twisted's transports read headers with L{HeaderReader}, except an HTTP
listener's, whose channels read theirs first themselves (L{HeaderFirst}); a
direct TCP route reads them off the raw socket (L{portrouter.tcp}); all
frame them with L{read_header}, the one place that decides what a header is.
A connection from any other address is served as a direct client, and a
header from it is refused, never believed: HTTP listeners answer it with
400 (their parser meets ``PROXY ...`` where a request line must be), TLS
listeners close (it is no ClientHello), and TCP routes watch the first
bytes (L{portrouter.tcp}) and close.

Sending: L{portrouter.proxyheader.header} builds the v1 or v2 header a
backend connection (or, v2, each datagram) starts with; a received v2
header that is the same bytes goes on as it came (L{Found.as_sent}).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, NamedTuple, Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet import protocol

# Twisted's parsers: the package exports only proxyEndpoint, which requires
# a header from every peer; a gate must choose by address first.
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from portrouter.interfaces import IReactor
from portrouter.model import ProxyProtocol
from portrouter.proxyheader import V2_SIGNATURE, V2_TCP4, might_be_header
from portrouter.relay import FirstBytes, FirstBytesDeadlines, Phase, claim_peer, hand_over

TRUST_CACHE = 1024  # answers of ProxyGate.trusts kept
V1_MAX = 107  # a v1 header's longest line, CRLF included (proxy-protocol.txt)
SHAPES_KEPT = 1024  # v2 header shapes Twisted accepted, kept (read_header)

# A v2 header's address sizes by its family and protocol byte (TCP or UDP
# over IPv4 or IPv6): Twisted's V2Parser.ADDRESSFORMATS lays each out as
# source, destination, source port, destination port.
_V2_ADDRESS = {0x11: 4, 0x12: 4, 0x21: 16, 0x22: 16}

class Reading(Protocol):
    """A connection still reading its PROXY header (L{header_so_far}: Twisted's transports', the direct TCP path's)."""

    buffer: bytes  # what came so far

    def refuse(self, why: str, *, abort: bool = ...) -> None: ...

    def timed_out(self, timeout: float) -> None: ...


class HeaderRefused(Exception):
    """A trusted connection's first bytes are no PROXY header to believe; the message says why, quoting them."""


class Found(NamedTuple):
    """A whole PROXY header at the start of a connection's first bytes."""

    source: tuple[str, int] | None  # None: LOCAL (v2) or UNKNOWN (v1), the proxy speaks for itself
    # The address the client connected to (the balancer's), to be named as
    # such in headers sent on, as HAProxy and Traefik do; None with source.
    destination: tuple[str, int] | None
    size: int  # the header's bytes; what follows is the client's
    # The header itself when a v2 header sent on for the same client and
    # destination is the same bytes (it begins with V2_TCP4, the usual case):
    # sent on as it came, not built again. Else None.
    as_sent: bytes | None = None


def read_header(buffer: bytes) -> Found | None:
    """
    The PROXY header C{buffer} (a trusted connection's first bytes) starts
    with, or L{None} while more bytes are needed to tell; L{HeaderRefused}
    when it is none. Framing only (v1: a line of at most 107 bytes; v2: its
    length field): the header itself is parsed by Twisted. Every reader of
    headers on a stream (Twisted's transports, the direct TCP path) asks
    here, so both refuse the same bytes with the same words.
    """
    parse: Any
    end = -2  # v1: where its line ends
    shape = b""  # v2: the header but for its source address and port
    if buffer.startswith(V2_TCP4) and len(buffer) >= _TCP4_SIZE:
        # What a balancer sends for a TCP client over IPv4: the shape's
        # fields taken apart in one call (a tenth of a small HTTP request's
        # time went into reading the header the general way).
        packed_source, packed_destination, port, destination_port = _TCP4.unpack_from(buffer, 16)
        to = _tcp4_destinations.get((packed_destination, destination_port))
        if to is not None:
            # A NamedTuple's own constructor is a Python call: 0.1 us of this path's 0.9.
            return tuple.__new__(Found, ((socket.inet_ntoa(packed_source), port), to, _TCP4_SIZE,
                                         buffer[:_TCP4_SIZE]))
    if buffer.startswith(V2_SIGNATURE):
        if len(buffer) < 16:
            return None  # the fixed part says how long the rest is
        size = 16 + int.from_bytes(buffer[14:16], "big")
        if len(buffer) < size:
            return None
        parse, whole = V2Parser.parse, buffer[:size]
        n = _V2_ADDRESS.get(whole[13])
        if n is not None:
            shape = whole[:16] + whole[16 + n:16 + 2 * n] + whole[16 + 2 * n + 2:]
            to = _v2_shapes.get(shape)
            if to is not None:
                return Found(_v2_source(whole, n), to, size)
    elif buffer.startswith(b"PROXY "):
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) < V1_MAX:
                return None
            raise HeaderRefused(f"a PROXY header Twisted's parser refuses (InvalidProxyHeader): {buffer[:64]!r}")
        parse, whole, size = V1Parser.parse, buffer[:end], end + 2
    elif might_be_header(buffer):
        return None
    else:
        raise HeaderRefused(f"no PROXY header from a trusted address: the connection began with {buffer[:24]!r}")
    try:
        info = parse(whole)
    except (InvalidProxyHeader, ValueError) as e:
        # ValueError: Twisted's v1 parser reads the ports with int() outside
        # its own error conversion ("PROXY TCP4    " raises it).
        raise HeaderRefused(f"a PROXY header Twisted's parser refuses ({type(e).__name__}): {buffer[:64]!r}") from None
    source, destination = info.source, info.destination
    if not isinstance(source, (IPv4Address, IPv6Address)) or not isinstance(destination, (IPv4Address, IPv6Address)):
        return Found(None, None, size)  # LOCAL or UNKNOWN (Twisted names both ends alike)
    if size != end + 2 and isinstance(source, IPv4Address):
        # v2 (the usual case): Twisted's parser wrote four octets and an
        # unsigned short, nothing to check (v1 text may be anything).
        checked: tuple[str, int] | None = (source.host, source.port)
        to = (destination.host, destination.port)
    else:
        checked, to = _checked(source.host, source.port), _checked(destination.host, destination.port)
    if checked is None:
        raise HeaderRefused(f"a PROXY header whose source is no address and port: {whole[:64]!r}")
    if to is None:
        raise HeaderRefused(f"a PROXY header whose destination is no address and port: {whole[:64]!r}")
    if shape:
        # Twisted accepted a header naming an address: any other header that
        # differs from it only in its source fields is accepted alike, names
        # the address and port those bytes hold (_v2_source), and the same
        # destination: the shape holds it.
        if len(_v2_shapes) >= SHAPES_KEPT:
            _v2_shapes.clear()
            _tcp4_destinations.clear()
        _v2_shapes[shape] = to
        if whole[:16] == V2_TCP4:
            _tcp4_destinations[_TCP4.unpack_from(whole, 16)[1::2]] = to
    return Found(checked, to, size, whole if whole.startswith(V2_TCP4) else None)


# The shapes of v2 headers Twisted accepted (read_header). Twisted's parser
# costs 13 us a header (its address text is built byte by byte), as much as
# the rest of a direct TCP connection's Python work; a balancer sends one
# shape per listener, so Twisted reads the first header of each and the
# others take their source from the bytes Twisted read it from. By shape:
# the destination Twisted read (the shape holds its bytes).
_v2_shapes: dict[bytes, tuple[str, int]] = {}

# The most common shape, a TCP client over IPv4 with no TLVs, known by its
# first 16 bytes (V2_TCP4), then source, destination, source port,
# destination port; its destinations that Twisted accepted a header to are
# kept here as well: (address bytes, port), and that destination as Twisted
# read it.
_TCP4 = struct.Struct("!4s4sHH")
_TCP4_SIZE = 16 + _TCP4.size
_tcp4_destinations: dict[tuple[bytes, int], tuple[str, int]] = {}


def header_so_far(reader: Reading, data: bytes) -> Found | None:
    """
    C{data}, come after what C{reader} had of its PROXY header (its
    C{buffer}, which then holds both): the header once whole; L{None} while
    it is not, or once refused (C{reader} is told why).
    """
    buffer = reader.buffer = reader.buffer + data if reader.buffer else data
    return header_or_refuse(reader, buffer)


def header_or_refuse(reader: Reading, buffer: bytes) -> Found | None:
    """The PROXY header C{buffer} starts with; L{None} while it is not whole, or once C{reader} is refused."""
    try:
        return read_header(buffer)
    except HeaderRefused as e:
        reader.refuse(str(e))
        return None


def _v2_source(whole: bytes, n: int) -> tuple[str, int]:
    """
    The source of a v2 header with C{n}-byte addresses, as Twisted's parser
    and L{_checked} name it: IPv4 dotted, IPv6 compressed.
    """
    packed = whole[16:16 + n]
    host = socket.inet_ntoa(packed) if n == 4 else ipaddress.IPv6Address(packed).compressed
    return host, int.from_bytes(whole[16 + 2 * n:16 + 2 * n + 2], "big")


def address_of(peer: tuple[str, int]) -> IPv4Address | IPv6Address:
    """A header's source as Twisted's transports name a peer."""
    return IPv6Address("TCP", *peer) if ":" in peer[0] else IPv4Address("TCP", *peer)


class _HeaderBytes(FirstBytes):
    """A trusted connection's first bytes, until its PROXY header is whole."""

    what = "PROXY header"
    where = "proxy protocol"

    def __init__(self, gate: ProxyGate, addr: IAddress):
        super().__init__(gate.reading, gate.setting.header_timeout, addr)
        self.gate = gate

    def header(self) -> Found | None:
        """The header, once whole: then the connection is handed on; L{None} while it is not, or refused."""
        found = header_or_refuse(self, self.buffer)
        if found is not None:
            self.handed()
        return found

    def refused(self) -> None:
        self.gate.refused += 1


class HeaderReader(_HeaderBytes):
    """A connection from a trusted address, through Twisted's transport, until its PROXY header has been read."""

    def examine(self, data: bytes) -> None:
        found = self.header()
        if found is None:
            return
        peer = found.source
        source = self.addr if peer is None else address_of(peer)
        rest = self.buffer[found.size:]
        inner = self.gate.inner
        if hasattr(inner, "inbound"):
            # A TCP route: what followed the header is its backend's first bytes.
            answer, rest = inner.inbound(source, rest), b""
        else:
            answer = inner.buildProtocol(source)
        if answer is None:
            self.transport.loseConnection()
            return
        hand_over(self.transport, answer, rest, peer=peer, destination=found.destination, received=found.as_sent)


class HeaderFirst(_HeaderBytes):
    """
    The PROXY header of a connection whose protocol reads it first itself
    (an HTTP channel: L{portrouter.web.Channel}), giving it the bytes it is
    told (C{dataReceived}) until the header is whole: then C{source} is the
    client it names (L{None}: the balancer's own) and C{rest} what followed.
    The protocol tells it when header_timeout is over, and refuses it at stop.
    No protocol is built and handed over from, as with L{HeaderReader}: that
    cost an HTTP connection 10% of its rate. Every connection of a trusted
    balancer's comes through here, so the steps of L{FirstBytes} are taken
    in one call, and what the channel asks (C{waiting}, C{whole}) is kept
    as plain attributes rather than worked out from the phase.
    """

    source: tuple[str, int] | None = None
    rest = b""
    waiting = True  # the header is not whole yet, nor refused
    whole = False  # the header was read: the connection now says it came from C{source}

    def __init__(self, gate: ProxyGate, transport: Any, addr: IAddress):
        # What FirstBytes and _HeaderBytes set, without their calls. Its
        # protocol keeps its deadline (timed_out at header_timeout) and
        # closes it at stop: the gate's deadlines, added to and taken from
        # for every connection, cost an HTTP connection 2% of its rate.
        self.reading = gate.reading
        self.timeout = gate.setting.header_timeout
        self.addr = addr
        self.phase = Phase.READING
        self.buffer = b""
        self.gate = gate
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self.phase is not Phase.READING:
            return
        # header_so_far and _done, in place (three calls of a request's few hundred).
        buffer = self.buffer = self.buffer + data if self.buffer else data
        try:
            found = read_header(buffer)
        except HeaderRefused as e:
            self.refuse(str(e))
            return
        if found is None:
            return
        self.phase = Phase.HANDED
        self.waiting, self.whole = False, True
        self.source, self.rest = found.source, buffer[found.size:]
        if found.source is not None:
            claim_peer(self.transport, found.source, found.destination, found.as_sent)

    def _done(self, phase: Phase) -> None:
        # Never in the gate's deadlines (its protocol keeps the deadline): none to leave.
        self.phase = phase
        self.waiting = False
        self.whole = phase is Phase.HANDED


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


def datagram_header(data: bytes) -> Found | None:
    """
    The v2 header at the start of a datagram (its source L{None} for LOCAL:
    the sender speaks for itself); L{None} when the datagram starts with no
    valid one (v1 is for streams only).
    """
    if not data.startswith(V2_SIGNATURE):
        return None
    try:
        return read_header(data)
    except HeaderRefused:
        return None


class ProxyGate(protocol.Factory):
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
        self.reading = FirstBytesDeadlines(reactor)  # each timed out at header_timeout, and closed at shutdown
        self.trusted: dict[str, bool] = {}  # by host: setting.trusts(host)
        self.refused = 0
        self.closed = False  # the router stopped: no header is read any more

    def trusts(self, host: str) -> bool:
        """
        Whether a connection from C{host} must start with a header. Asked per
        connection, of the few addresses of a listener's balancers, so the
        answers are kept (a bounded few: a flood of untrusted clients only
        empties the cache).
        """
        known = self.trusted.get(host)
        if known is None:
            if len(self.trusted) >= TRUST_CACHE:
                self.trusted.clear()
            known = self.trusted[host] = self.setting.trusts(host)
        return known

    def buildProtocol(self, addr: IAddress) -> protocol.Protocol | None:  # type: ignore[override]
        host = getattr(addr, "host", None)
        if host is not None and self.trusts(host):
            reads_header = getattr(self.inner, "reads_header", None)  # an HTTP listener's channels read it themselves
            if reads_header is not None:
                return reads_header(self, addr)  # type: ignore[no-any-return]
            return HeaderReader(self, addr)
        guarded = getattr(self.inner, "guarded", None)  # a TCP route watches for forged headers
        if guarded is not None:
            return guarded(addr)  # type: ignore[no-any-return]
        return self.inner.buildProtocol(addr)  # type: ignore[no-any-return]

    def header_first(self, transport: Any, addr: IAddress) -> HeaderFirst:
        """The reader of a trusted client's header for a protocol that reads it itself (L{HeaderFirst})."""
        return HeaderFirst(self, transport, addr)

    def close_reading(self) -> None:
        """
        The router stops: every connection in the gate's deadlines is closed,
        and a direct TCP route's clients not yet looked at are closed when
        they are (L{portrouter.tcp}). HTTP channels close theirs when drained.
        """
        self.closed = True
        for reader in list(self.reading):
            reader.refuse("portrouter is stopping", abort=True)
