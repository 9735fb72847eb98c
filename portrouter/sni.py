"""
The server name (SNI) and ALPN list of a TLS ClientHello, read without
terminating TLS (RFC 8446 4.1.2, RFC 6066 3, RFC 7301), as the TLS front
needs them to choose before anyone answers.

Only what is needed is parsed, and every length is checked against what
encloses it: a hostile hello can make L{read_hello} refuse, never read past
its bytes or hold more than C{limit} of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_ALPN = 0x0010
# What the front reads at most before it must choose: TLS caps a record at
# 16 KiB, and real ClientHellos (post-quantum key shares included) fit one.
MAX_HELLO = 16384
# Real clients send their hello in one record, or a few; the front reads its
# buffer again whenever bytes come, so a hello in thousands is refused.
MAX_RECORDS = 32

# A fatal unrecognized_name alert (RFC 6066 3, RFC 8446 6), sent as TLS 1.0
# records are for the first flight: any client version reads it.
UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112])

_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?\Z")


class BadHello(Exception):
    """Bytes that are not a ClientHello this port can read; the message quotes them."""


@dataclass(frozen=True)
class Hello:
    """What the front chooses by: the name asked for (lower-case), the protocols offered."""

    server_name: str | None
    alpn: tuple[bytes, ...]
    size: int  # bytes of records the hello took, for the log


def _quote(data: bytes) -> str:
    return repr(data[:24]) + ("..." if len(data) > 24 else "")


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data = data
        self.at = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise BadHello(f"a malformed ClientHello: {self.what} is cut short")
        piece = self.data[self.at:self.at + n]
        self.at += n
        return piece

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        size = self.number(length_size)
        if size > self.left:
            raise BadHello(f"a malformed ClientHello: {what} is cut short")
        return _Reader(self.take(size), what)

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _records(data: bytes, limit: int) -> tuple[bytes, int] | None:
    """
    The handshake bytes of the leading records, once they hold the whole
    first handshake message: (message, bytes of records used); L{None} while
    more is needed. The message's type and length are checked as soon as
    they arrive, so a hello too long to read is refused before it is sent.
    """
    if data[:1] and data[0] != HANDSHAKE:
        raise BadHello(f"not a TLS handshake: the connection began with {_quote(data)}")
    payload = b""
    at = 0
    records = 0
    while len(data) - at >= 5:
        records += 1
        if records > MAX_RECORDS:
            raise BadHello(f"a ClientHello split over more than {MAX_RECORDS} records")
        kind, major, length = data[at], data[at + 1], int.from_bytes(data[at + 3:at + 5], "big")
        if kind != HANDSHAKE:
            raise BadHello(f"a record of type {kind} inside the ClientHello (only handshake records may carry it)")
        if major != 3:
            raise BadHello(f"TLS record version {major}.{data[at + 2]}: not TLS 1.x")
        if length == 0 or length > 16384:
            raise BadHello(f"a TLS record of {length} bytes (1 to 16384 may be)")
        chunk = data[at + 5:at + 5 + length]
        payload += chunk
        if len(payload) >= 4:
            if payload[0] != CLIENT_HELLO:
                raise BadHello(f"handshake message type {payload[0]} where a ClientHello (1) must come first")
            size = int.from_bytes(payload[1:4], "big")
            if size > limit:
                raise BadHello(f"a ClientHello of {size} bytes, longer than the {limit} this port reads")
            if len(payload) >= 4 + size:
                return payload[4:4 + size], at + 5 + length
        if len(chunk) < length:
            return None
        at += 5 + length
    return None


def read_hello(data: bytes, limit: int = MAX_HELLO) -> Hello | None:
    """
    The ClientHello at the start of C{data}, or L{None} while it is not all
    there; L{BadHello} for anything else.
    """
    found = _records(data, limit)
    if found is None:
        return None
    message, used = found
    hello = _Reader(message, "the ClientHello")
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1, "the session id")
    suites = hello.vector(2, "the cipher suites")
    if suites.left == 0 or suites.left % 2:
        raise BadHello(f"a malformed ClientHello: {suites.left} bytes of cipher suites")
    hello.vector(1, "the compression methods")
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    if hello.left:
        extensions = hello.vector(2, "the extensions")
        seen: set[int] = set()
        while extensions.left:
            kind = extensions.number(2)
            body = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                raise BadHello(f"extension {kind} twice in the ClientHello (RFC 8446 4.2)")
            seen.add(kind)
            if kind == _SERVER_NAME:
                server_name = _server_name(body)
            elif kind == _ALPN:
                alpn = _protocols(body)
    return Hello(server_name, alpn, used)


def _server_name(body: _Reader) -> str | None:
    names = body.vector(2, "the server name list")
    found = None
    while names.left:
        kind = names.number(1)
        name = names.vector(2, "a server name").data
        if kind != 0:
            continue  # only host_name (0) is defined; others are skipped, as OpenSSL does
        if found is not None:
            raise BadHello("two host names in one server_name extension (RFC 6066 3)")
        try:
            text = name.decode("ascii").lower()
        except UnicodeDecodeError:
            text = ""
        if not _HOSTNAME.match(text) or len(text) > 253:
            raise BadHello(f"the server name {_quote(name)} is not a host name")
        found = text.rstrip(".")
    return found


def _protocols(body: _Reader) -> tuple[bytes, ...]:
    protocols = body.vector(2, "the ALPN list")
    offered = []
    while protocols.left:
        offered.append(protocols.vector(1, "an ALPN protocol").data)
    return tuple(offered)
