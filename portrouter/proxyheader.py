"""
PROXY protocol headers as bytes (HAProxy's proxy-protocol.txt): telling a
first chunk that begins with one, and building the one a backend connection
(or, v2, each datagram) starts with. Reading them is Twisted's
(L{portrouter.proxyproto}).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # Twisted's V2Parser.PREFIX
_V2_PROXY = 0x21  # version 2, command PROXY
_FAMILY = {("tcp", 4): 0x11, ("tcp", 6): 0x21, ("udp", 4): 0x12, ("udp", 6): 0x22}

# How a v2 header for a TCP client over IPv4 with no TLVs begins (signature,
# PROXY command, TCP4, 12 address bytes): what a balancer sends most. Such a
# header received is, byte for byte, the v2 header a route sends on for the
# same client and destination (L{header}), which need not be built again.
V2_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c"


def looks_like_header(data: bytes) -> bool:
    """Whether C{data}, a connection's first bytes, begins with a PROXY header (either version)."""
    return data.startswith(b"PROXY ") or data.startswith(V2_SIGNATURE)


def might_be_header(data: bytes) -> bool:
    """C{data} is too short to tell: it is the start of a header's signature."""
    return len(data) < len(V2_SIGNATURE) and (V2_SIGNATURE.startswith(data) or b"PROXY ".startswith(data))


def local_header(version: str) -> bytes:
    """The header for a client with no address to name (a UNIX socket's): UNKNOWN (v1), LOCAL (v2)."""
    return b"PROXY UNKNOWN\r\n" if version == "v1" else V2_SIGNATURE + b"\x20\x00\x00\x00"


def header(version: str, source: tuple[str, int], destination: tuple[str, int], transport: str = "tcp") -> bytes:
    """
    The PROXY header saying that C{source} connected to C{destination}. An
    address family mix (an IPv4 client on an IPv6 listener) maps the IPv4
    address into IPv6, as the kernel shows it on a dual-stack socket.
    """
    src_host, dst_host = source[0], destination[0]
    if ":" not in src_host and ":" not in dst_host:
        # Two IPv4 addresses, the usual case, without ipaddress (a fifth of
        # the header's cost): they come from the kernel or a parsed header,
        # so inet_pton only confirms what they are.
        try:
            packed = socket.inet_pton(socket.AF_INET, src_host) + socket.inet_pton(socket.AF_INET, dst_host)
        except OSError:
            pass
        else:
            if version == "v1":
                return b"PROXY TCP4 %s %s %d %d\r\n" % (src_host.encode(), dst_host.encode(),
                                                          source[1], destination[1])
            return V2_SIGNATURE + bytes((_V2_PROXY, _FAMILY[(transport, 4)])) + b"\x00\x0c" + packed + \
                struct.pack("!HH", source[1], destination[1])
    src, dst = ipaddress.ip_address(src_host), ipaddress.ip_address(dst_host)
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    if version == "v1":
        # As HAProxy writes them (inet_ntop): an IPv4-mapped address dotted,
        # ::ffff:127.0.0.1, however it came (Python 3.11 writes ::ffff:7f00:1).
        family = socket.AF_INET if src.version == 4 else socket.AF_INET6
        texts = [socket.inet_ntop(family, a.packed).encode() for a in (src, dst)]
        return b"PROXY TCP%d %s %s %d %d\r\n" % (src.version, texts[0], texts[1], source[1], destination[1])
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes((_V2_PROXY, _FAMILY[(transport, src.version)])) + struct.pack(
        "!H", len(addresses)) + addresses


def header_for(version: str, transport: Any, kind: str = "tcp") -> bytes:
    """
    The header for a client connected over C{transport}: its address and the
    listener's, or, behind a balancer's PROXY header, the destination that
    named (C{proxied_to}, L{portrouter.relay.claim_peer}), and for a v2 TCP
    header that header itself when it is the same bytes (C{proxied_header});
    for a client with no address to name (UNIX), L{local_header}.
    """
    # Claimed from a header, both ends are at hand: no address objects made
    # and no getsockname (a sending route behind a balancer asks per
    # backend connection). A TLS transport finds its connection's (Twisted's
    # __getattr__).
    to = getattr(transport, "proxied_to", None)
    if to is not None:
        received: bytes | None = transport.proxied_header  # set with proxied_to: the header, when V2_TCP4
        if received is not None and version == "v2" and kind == "tcp":
            return received  # byte for byte the one built below
        return header(version, transport.client, to, kind)
    peer, host = transport.getPeer(), transport.getHost()
    if not (hasattr(peer, "port") and hasattr(host, "port")):
        return local_header(version)
    return header(version, (peer.host, peer.port), (host.host, host.port), kind)
