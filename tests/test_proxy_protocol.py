"""
The PROXY protocol (SPEC section 12, issue 17) over loopback: headers
received from trusted addresses on the ingress and on TCP routes (v1 and
v2, written as HAProxy writes them, parsed back with Twisted's parsers),
refused from others, timed out when slow; headers sent to TCP, HTTP and UDP
backends. The tests with haproxy and nginx as the peers are in
C{tests/test_proxy_peers.py}.
"""

from __future__ import annotations

import _socket
import hashlib
import ipaddress
import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from portrouter.config import ConfigError, load, parse
from portrouter.front import Front
from portrouter.metrics import registry_for, render
from portrouter.proxyheader import V2_SIGNATURE, header
from portrouter import proxyheader, proxyproto, relay, tcp
from portrouter.proxyproto import HeaderFirst, HeaderRefused, read_header
from portrouter.router import RouterService
from tests.httpbackend import Backend
from tests.support import (
    LOOPBACK, MiB, ClockedReactor, RawWebSocket, ThreadServer, UDPEcho, free_port, in_thread, kernel_sockets,
    read_until, send_all_and_hash, start_router, stop_clocked, wait_for,
)
from tests.pki import CA
from tests.test_hostnames import DOMAIN, ca, front_port, read_to_the_end, store  # noqa: F401 (ca, store: fixtures)
from tests.test_tls import PKI, client_context, store_config
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)

CLIENT_V4 = ("203.0.113.7", 40001)
CLIENT_V6 = ("2001:db8::7", 40002)


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


def ingress_config(tmp_path: Path, trusted: list[str], projects: list[dict[str, Any]], **top: Any) -> Any:
    return parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": trusted}, "projects": projects, **top,
    })


def exchange(port: int, data: bytes) -> bytes:
    """
    Send C{data} on a fresh connection, half-close, read until the server
    closes (a reset too: a refusal that leaves bytes unread makes one).
    """
    got = b""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def headers_read(gate: Any) -> list[bytes]:
    """What each channel of an HTTP listener still reading its PROXY header has read of it."""
    return [c.header.buffer for c in gate.inner.channels if c.header is not None]


def get(path: str, host: str = "x") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def seen_headers(reply: bytes) -> dict[str, str]:
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    return dict(json.loads(reply.partition(b"\r\n\r\n")[2])["headers"])


# -- receiving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version, client", [("v1", CLIENT_V4), ("v2", CLIENT_V4), ("v2", CLIENT_V6)])
@pytest_twisted.ensureDeferred
async def test_the_ingress_believes_a_trusted_header(tmp_path: Path, backend: Backend, logged: list[str],
                                                     version: str, client: tuple[str, int]) -> None:
    router = await start_router(config=ingress_config(tmp_path, ["127.0.0.1"], [
        {"name": "k1", "backend": backend.address}]))
    port = router.port_of()
    try:
        proxy_header = header(version, client, (LOOPBACK, port))
        seen = seen_headers(await in_thread(exchange, port, proxy_header + get("/k1/headers")))
        assert seen["X-Forwarded-For"] == client[0]
        assert seen["X-Real-IP"] == client[0]
        await log_line(logged, rf"^{client[0].replace('.', '[.]')} GET /k1/headers 200 ")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_a_trusted_address_without_a_header_is_closed(tmp_path: Path, backend: Backend,
                                                            logged: list[str]) -> None:
    router = await start_router(config=ingress_config(tmp_path, ["127.0.0.0/8"], [
        {"name": "k1", "backend": backend.address}]))
    try:
        assert await in_thread(exchange, router.port_of(), get("/k1/headers")) == b""
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: no PROXY header from a trusted address: "
                               r"the connection began with b'GET /k1/headers HTTP/1\.1'; closed")
        bad = b"PROXY TCP4 1.2.3.4 nonsense\r\n" + get("/k1/")
        assert await in_thread(exchange, router.port_of(), bad) == b""
        await log_line(logged, r"a PROXY header Twisted's parser refuses \(\w+\): b'PROXY TCP4 1\.2\.3\.4 nonsense")
        assert not backend.stats.seen
        gate = router.ingress.port.factory  # type: ignore[union-attr,attr-defined]
        assert gate.refused == 2
        await wait_for(lambda: headers_read(gate) == [], 15, "the refused channels to close")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_an_http_client_gone_before_its_header_and_one_reading_at_stop(tmp_path: Path, backend: Backend,
                                                                            logged: list[str]) -> None:
    # An HTTP listener's channels read the header themselves (HeaderFirst):
    # the same lines as every other reader, their deadline the channel's.
    router = await start_router(config=ingress_config(tmp_path, ["127.0.0.1"], [
        {"name": "k1", "backend": backend.address}]))
    port = router.port_of()
    gate = router.ingress.port.factory  # type: ignore[union-attr,attr-defined]
    try:
        assert await in_thread(exchange, port, b"PROXY TCP4 1.2") == b""
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: closed by the client before its PROXY header "
                               r"was whole \(14 bytes came\)")
        assert headers_read(gate) == []
        in_pieces = header("v1", CLIENT_V4, (LOOPBACK, port)) + get("/k1/headers")

        def one_byte_at_a_time() -> bytes:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for byte in in_pieces:
                    sock.sendall(bytes([byte]))
                return read_to_the_end(sock)

        assert seen_headers(await in_thread(one_byte_at_a_time))["X-Forwarded-For"] == CLIENT_V4[0]
        sock = socket.create_connection((LOOPBACK, port), timeout=30)
        sock.sendall(b"PROXY ")
        await wait_for(lambda: headers_read(gate) == [b"PROXY "], 15, "the channel to read the start")
        assert [type(c.header) for c in gate.inner.channels] == [HeaderFirst]  # the channel's own: no protocol
    finally:
        await router.stopService()
    with sock:
        await wait_for(lambda: headers_read(gate) == [], 15, "the channel to close")
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: portrouter is stopping; closed")
        assert await in_thread(read_to_the_end, sock) == b""
    assert len(backend.stats.seen) == 1  # the one whose header came in pieces


@pytest_twisted.ensureDeferred
async def test_an_untrusted_address_is_a_direct_client_and_its_header_is_refused(
        tmp_path: Path, backend: Backend) -> None:
    router = await start_router(config=ingress_config(tmp_path, ["10.0.0.0/8"], [
        {"name": "k1", "backend": backend.address}]))
    port = router.port_of()
    try:
        assert seen_headers(await in_thread(exchange, port, get("/k1/headers")))["X-Real-IP"] == LOOPBACK
        forged = header("v1", CLIENT_V4, (LOOPBACK, port)) + get("/k1/headers")
        reply = await in_thread(exchange, port, forged)
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert b"a PROXY protocol header from an address not trusted to send one" in reply
        assert len(backend.stats.seen) == 1
    finally:
        await router.stopService()


def first_bytes(conn: socket.socket) -> bytes:
    """A TCP backend that reports everything it got, then closes."""
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    conn.sendall(b"got:" + got)
    return got


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("direct", [True, False])
async def test_a_tcp_route_receives_and_sends_headers(tmp_path: Path, logged: list[str], direct: bool) -> None:
    """
    A trusted header's source and destination (the balancer's address) go
    on in the header sent to the backend, as HAProxy sends them on, whether
    the route relays itself (a backend by address) or through Twisted's
    transports (one by name); an untrusted client's forged header closes
    its connection.
    """
    server = ThreadServer(first_bytes)
    trusted, untrusted = free_port(), free_port()
    backend = server.address if direct else server.address.replace(LOOPBACK, "localhost")
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [
            {"name": "ssh", "backend": backend, "send_proxy": "v2",
             "listen": {"port": trusted, "protocol": "tcp", "proxy_protocol": {"trusted": ["127.0.0.1"]}}},
            {"name": "git", "backend": server.address, "send_proxy": "v1",
             "listen": {"port": untrusted, "protocol": "tcp", "proxy_protocol": {"trusted": ["10.0.0.0/8"]}}},
        ]}))
    try:
        assert is_direct(router) == direct
        balancer = ("192.0.2.1", 22)
        reply = await in_thread(exchange, trusted, header("v1", CLIENT_V4, balancer) + b"hello")
        info, rest = V2Parser().feed(reply[len(b"got:"):])
        assert info is not None and (info.source.host, info.source.port) == CLIENT_V4  # type: ignore[union-attr]
        assert (info.destination.host, info.destination.port) == balancer  # type: ignore[union-attr]
        assert rest == b"hello"
        await log_line(logged, r"tcp ssh 203\.0\.113\.7:40001: client closed; 5 bytes in, \d+ bytes out")

        reply = await in_thread(exchange, untrusted, b"direct")
        info, rest = V1Parser().feed(reply[len(b"got:"):])
        assert info is not None and info.source.host == LOOPBACK and rest == b"direct"  # type: ignore[union-attr]
        assert await in_thread(exchange, untrusted, header("v1", CLIENT_V4, (LOOPBACK, untrusted)) + b"x") == b""
        await log_line(logged, r"tcp git 127\.0\.0\.1:\d+: a PROXY header from an untrusted address; closed")
        await wait_for(lambda: len(server.results) == 3, 15, "the backend to see three connections")
        assert server.results[2].startswith(b"PROXY TCP4 127.0.0.1 ")  # ours; nothing of the forgery
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_header_is_closed_after_header_timeout(tmp_path: Path, logged: list[str]) -> None:
    clock = Clock()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"], "header_timeout": 5},
    }), using=ClockedReactor(clock))
    try:
        with socket.create_connection((LOOPBACK, router.port_of()), timeout=30) as sock:
            sock.sendall(b"PROXY TCP4 203.0")
            gate = router.ingress.port.factory  # type: ignore[union-attr,attr-defined]
            await wait_for(lambda: headers_read(gate) == [b"PROXY TCP4 203.0"], 15, "the channel to read the start")
            clock.advance(4.9)
            assert headers_read(gate)
            clock.advance(0.1)
            await wait_for(lambda: headers_read(gate) == [], 15, "the channel to close")
            assert await in_thread(read_to_the_end, sock) == b""  # aborted: a reset
        await log_line(logged, r"no whole PROXY header within 5 s \(16 bytes came\); closed")
    finally:
        await stop_clocked(router, clock)


# -- sending -----------------------------------------------------------------------------------


def requests_on_one_connection(port: int, requests: list[bytes], preface: bytes = b"",
                               tls: ssl.SSLContext | None = None) -> list[bytes]:
    """
    Each request in turn on one client connection (after C{preface}, a PROXY
    header; then over C{tls}, if given); the response bodies (Content-Length
    framed).
    """
    bodies = []
    with socket.create_connection((LOOPBACK, port), timeout=30) as raw:
        raw.sendall(preface)
        sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="localhost")
        for request in requests:
            sock.sendall(request)
            reply = b""
            while True:
                head, sep, body = reply.partition(b"\r\n\r\n")
                if sep and len(body) == int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError(f"closed after {reply!r}")
                reply += chunk
            bodies.append(body)
    return bodies


class ProxyHTTPBackend:
    """
    An HTTP backend behind send_proxy: each connection's header (a v1 line,
    or a v2 header's bytes), and its requests answered with it.
    """

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        self.server = ThreadServer(self.serve)

    def serve(self, conn: socket.socket) -> None:
        first = read_until(conn, b"\r\n")
        if first is None:
            return
        line, data = first
        if not line:
            # v2, whose signature begins with CRLF (a v1 line is never empty): its length field says the rest.
            data = b"\r\n" + data
            while len(data) < 16 or len(data) < 16 + int.from_bytes(data[14:16], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            size = 16 + int.from_bytes(data[14:16], "big")
            line, data = data[:size], data[size:]
        self.headers.append(line)
        while True:
            request = read_until(conn, b"\r\n\r\n", data)
            if request is None:
                return
            data = request[1]
            body = line
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest_twisted.ensureDeferred
async def test_a_tls_ingress_reads_the_header_before_the_handshake(tmp_path: Path) -> None:
    """
    On a TLS listener the balancer's header comes first, then the client's
    ClientHello (HAProxy's send-proxy in front of a TLS port): the handshake
    and the request after it are the client's, and the header sent on (from
    under the TLS transport) names the client and the balancer's address.
    """
    pki = PKI(tmp_path)
    backend = ProxyHTTPBackend()
    data = store_config(pki, {"name": "k1", "backend": backend.server.address, "send_proxy": "v1"})
    router = await start_router(config=parse({**data, "proxy_protocol": {"trusted": [LOOPBACK]}}))
    try:
        request = b"GET /k1/ HTTP/1.1\r\nHost: x\r\n\r\n"
        bodies = await in_thread(requests_on_one_connection, router.port_of(), [request],
                                 header("v2", CLIENT_V4, ("192.0.2.1", 443)), client_context(pki.cafile))
        assert bodies == [b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443"]
    finally:
        await router.stopService()
        backend.server.close()


@pytest_twisted.ensureDeferred
async def test_a_tls_ingress_closes_on_a_header_from_an_untrusted_address(tmp_path: Path, logged: list[str]) -> None:
    """
    A header from an address not trusted to send one is no ClientHello:
    closed, with a line in the log, and the backend never asked.
    """
    pki = PKI(tmp_path)
    backend = ProxyHTTPBackend()
    data = store_config(pki, {"name": "k1", "backend": backend.server.address, "send_proxy": "v1"})
    router = await start_router(config=parse({**data, "proxy_protocol": {"trusted": ["10.0.0.0/8"]}}))
    try:
        request = b"GET /k1/ HTTP/1.1\r\nHost: x\r\n\r\n"
        with pytest.raises((ssl.SSLError, OSError)):  # the handshake is answered with a close
            await in_thread(requests_on_one_connection, router.port_of(), [request],
                            header("v2", CLIENT_V4, ("192.0.2.1", 443)), client_context(pki.cafile))
        assert not backend.headers
        await log_line(logged, r"tls 127\.0\.0\.1:\d+ to port %d: handshake failed \(wrong version number\); closed"
                       % router.port_of())
        # The same client without a header is served, and named as itself.
        done = await in_thread(requests_on_one_connection, router.port_of(), [request], b"", client_context(pki.cafile))
        assert done[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    finally:
        await router.stopService()
        backend.server.close()


@pytest_twisted.ensureDeferred
async def test_http_backend_connections_carry_one_clients_header(tmp_path: Path) -> None:
    """
    Two requests on one client connection share one backend connection;
    another client gets its own. Each header names the client and the
    address it connected to, the balancer's, as the balancer's header named
    them (HAProxy sends them on so): an IPv4 one mapped for an IPv6 client.
    """
    backend = ProxyHTTPBackend()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"]},
        "projects": [{"name": "k1", "backend": backend.server.address, "send_proxy": "v1"}],
    }))
    port = router.port_of()
    try:
        def two_requests(client: tuple[str, int]) -> list[bytes]:
            request = b"GET /k1/ HTTP/1.1\r\nHost: x\r\n\r\n"
            return requests_on_one_connection(port, [request] * 2, header("v2", client, ("192.0.2.1", 443)))

        first = await in_thread(two_requests, CLIENT_V4)
        second = await in_thread(two_requests, CLIENT_V6)
        assert first == [first[0]] * 2
        assert first[0] == b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443"
        assert second[0] == b"PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 40002 443"
        assert second == [second[0]] * 2
        assert len(backend.headers) == 2  # one backend connection per client connection
    finally:
        await router.stopService()
        backend.server.close()


@pytest_twisted.ensureDeferred
async def test_an_http_route_sends_on_a_v2_tcp4_header_as_it_came_and_builds_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A v2 header for a TCP client over IPv4 with no TLVs is, byte for byte,
    the v2 header sent on for it: it goes on as it came, none built. One
    with a TLV goes on without it; one for an IPv6 client, and a v1 one,
    are built anew.
    """
    built: list[tuple[Any, ...]] = []

    def building(*args: Any) -> bytes:
        built.append(args)
        return header(*args)

    monkeypatch.setattr(proxyheader, "header", building)
    backend = ProxyHTTPBackend()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"]},
        "projects": [{"name": "k1", "backend": backend.server.address, "send_proxy": "v2"}],
    }))
    port, balancer = router.port_of(), ("192.0.2.1", 443)
    v4, v6 = header("v2", CLIENT_V4, balancer), header("v2", CLIENT_V6, balancer)
    with_tlv = v4[:14] + b"\x00\x11" + v4[16:] + b"\x01\x00\x02h2"  # PP2_TYPE_ALPN "h2", counted by the length
    try:
        for came, sent, builds in [(v4, v4, 0), (with_tlv, v4, 1), (header("v1", CLIENT_V4, balancer), v4, 1),
                                   (v6, v6, 1)]:
            request = b"GET /k1/ HTTP/1.1\r\nHost: x\r\n\r\n"
            built.clear()
            assert await in_thread(requests_on_one_connection, port, [request], came) == [sent]
            assert len(built) == builds, came
    finally:
        await router.stopService()
        backend.server.close()


@pytest.mark.parametrize("behind", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_udp_route_sends_a_v2_header_with_each_datagram(tmp_path: Path, behind: bool) -> None:
    """
    Each datagram to the backend starts with a header naming its client and
    the address it was sent to: this listener, or, behind a balancer that
    sends headers (C{behind}), the client and destination its header named;
    the same client through another of the balancer's addresses is another
    session, which names that one.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    seen: list[tuple[str, int, str, int, bytes]] = []

    def serve() -> None:
        sock.settimeout(30)
        for _ in range(4 if behind else 3):
            data, peer = sock.recvfrom(65535)
            info, rest = V2Parser().feed(data)
            assert info is not None
            seen.append((info.source.host, info.source.port,  # type: ignore[union-attr]
                         info.destination.host, info.destination.port, rest))  # type: ignore[union-attr]
            sock.sendto(b"re:" + rest, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    udp_port = free_port(socket.SOCK_DGRAM)
    listen: dict[str, Any] = {"port": udp_port, "protocol": "udp", "interface": LOOPBACK}
    if behind:
        listen["proxy_protocol"] = {"trusted": [LOOPBACK]}
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "dns", "backend": f"{LOOPBACK}:{sock.getsockname()[1]}", "send_proxy": "v2",
                      "listen": listen}],
    }))
    balancer = ("192.0.2.1", 53)
    try:
        def client() -> tuple[int, list[bytes]]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(30)
                replies = []
                for payload in (b"a", b"", b"c" * 1000):
                    c.sendto(header("v2", CLIENT_V4, balancer, "udp") + payload if behind else payload,
                             (LOOPBACK, udp_port))
                    replies.append(c.recvfrom(65535)[0])
                return c.getsockname()[1], replies

        own_port, replies = await in_thread(client)
        assert replies == [b"re:a", b"re:", b"re:" + b"c" * 1000]
        named = (*CLIENT_V4, *balancer) if behind else (LOOPBACK, own_port, LOOPBACK, udp_port)
        assert seen == [(*named, b"a"), (*named, b""), (*named, b"c" * 1000)]
        route = router.listeners["dns"].factory
        assert len(route.sessions) == 1
        if behind:
            other = ("192.0.2.2", 53)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(30)
                c.sendto(header("v2", CLIENT_V4, other, "udp") + b"d", (LOOPBACK, udp_port))
                assert (await in_thread(c.recvfrom, 65535))[0] == b"re:d"
            assert seen[-1] == (*CLIENT_V4, *other, b"d")
            assert len(route.sessions) == 2
    finally:
        await router.stopService()
        sock.close()


def header_line_then_echo(conn: socket.socket) -> None:
    """A TCP service behind send_proxy v1: its header line back, then an echo."""
    first = read_until(conn, b"\r\n")
    if first is None:
        return
    line, rest = first
    conn.sendall(line + b"|" + rest)
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


@pytest_twisted.ensureDeferred
async def test_ws_routes_and_service_ports_send_on_the_balancers_client_and_address(tmp_path: Path) -> None:
    """
    A ws route (behind its own listener's proxy_protocol) and a service port
    (behind the ingress's), each with send_proxy, their clients behind a
    balancer's header: the service's connection starts with a header naming
    the client and the address it connected to, as the balancer named them.
    """
    service = ThreadServer(header_line_then_echo)
    token = tmp_path / "token"
    token.write_text("a-token-for-the-balancers-clients\n")
    ws_port = free_port()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": [LOOPBACK]},
        # The client is 203.0.113.7 now, no loopback client: the service port asks for credentials.
        "auth": {"tokens": [{"token_file": str(token), "admin": True, "projects": ["*"]}]},
        "projects": [
            {"name": "k1", "host": LOOPBACK, "services": [
                {"name": "echo", "protocol": "tcp", "port": service.port, "send_proxy": "v1"}]},
            {"name": "wsr", "backend": service.address, "send_proxy": "v1", "listen": {
                "port": ws_port, "protocol": "ws", "interface": LOOPBACK,
                "proxy_protocol": {"trusted": [LOOPBACK]}}},
        ]}))
    ingress = router.port_of()

    def through(port: int, target: str, balancer: tuple[str, int]) -> bytes:
        raw = RawWebSocket(port)
        try:
            raw.sock.sendall(header("v2", CLIENT_V4, balancer))
            status, _, _ = raw.request(target, {"Authorization": "Bearer a-token-for-the-balancers-clients"})
            assert status == 101, status
            raw.send(b"hello")
            return raw.receive(len(b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443|hello"))
        finally:
            raw.close()

    try:
        got = await in_thread(through, ws_port, "/", ("192.0.2.1", 443))
        assert got == b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443|hello"
        got = await in_thread(through, ingress, "/stream/session/k1/tcpproxy?app=echo", ("192.0.2.1", 443))
        assert got == b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443|hello"
    finally:
        await router.stopService()
        service.close()


@pytest.mark.parametrize("version, expected", [("v1", b"PROXY UNKNOWN"),
                                               ("v2", V2_SIGNATURE + b"\x20\x00\x00\x00")])
@pytest_twisted.ensureDeferred
async def test_a_client_with_no_address_to_name_gets_unknown_or_local(tmp_path: Path, version: str,
                                                                      expected: bytes) -> None:
    """A client of a UNIX socket ingress: v1 says UNKNOWN, v2 LOCAL, as HAProxy sends them."""
    backend = ProxyHTTPBackend()
    path = str(tmp_path / "ingress.sock")
    router = await start_router(config=parse({
        "ingress": f"unix:{path}", "state": str(tmp_path / "state"),
        "projects": [{"name": "k1", "backend": backend.server.address, "send_proxy": version}]}))

    def get_over_unix() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(get("/k1/"))
            return read_to_the_end(sock)

    try:
        reply = await in_thread(get_over_unix)
        assert reply.startswith(b"HTTP/1.1 200") and reply.partition(b"\r\n\r\n")[2] == expected, reply
    finally:
        await router.stopService()
        backend.server.close()


@pytest.mark.parametrize("behind", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_udp_service_port_sends_a_udp_v2_header_with_each_datagram(tmp_path: Path, behind: bool) -> None:
    """
    A UDP service port (udpproxy) with send_proxy: each datagram to the
    service starts with a v2 header for UDP over IPv4 naming the client and
    the address it connected to: the ingress's, or behind a balancer
    (C{behind}), the client and the balancer's address its header named.
    That header was for TCP, so it is not what goes on: one for UDP is built.
    """
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.bind((LOOPBACK, 0))
    service.settimeout(30)
    token = tmp_path / "token"
    token.write_text("a-token-for-the-balancers-clients\n")
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": [LOOPBACK]} if behind else None,
        "auth": {"tokens": [{"token_file": str(token), "admin": True, "projects": ["*"]}]},
        "projects": [{"name": "k1", "host": LOOPBACK, "services": [
            {"name": "dns", "protocol": "udp", "port": service.getsockname()[1], "send_proxy": "v2"}]}]}))
    ingress, balancer = router.port_of(), ("192.0.2.1", 443)

    def one_datagram() -> tuple[bytes, tuple[str, int]]:
        raw = RawWebSocket(ingress)
        try:
            if behind:
                raw.sock.sendall(header("v2", CLIENT_V4, balancer))
            status, _, _ = raw.request("/stream/kernel/k1/udpproxy?app=dns",
                                       {"Authorization": "Bearer a-token-for-the-balancers-clients"})
            assert status == 101, status
            raw.send(b"hello")
            data, _ = service.recvfrom(65535)
            return data, raw.sock.getsockname()
        finally:
            raw.close()

    try:
        data, client = await in_thread(one_datagram)
        client_and_address = (CLIENT_V4, balancer) if behind else (client, (LOOPBACK, ingress))
        assert data == header("v2", *client_and_address, "udp") + b"hello"
        assert data[13] == 0x12  # UDP over IPv4
    finally:
        await router.stopService()
        service.close()


@pytest_twisted.ensureDeferred
async def test_a_hostname_route_behind_the_tls_front_sends_on_the_balancers_client_and_address(
        tmp_path: Path, ca: CA, store: Path) -> None:
    """
    The TLS front behind a balancer (the top-level proxy_protocol): the
    header, then the ClientHello naming a TCP service port; the service's
    connection starts with a header naming the client and the balancer's
    address, from under the TLS that the front terminated.
    """
    service = ThreadServer(header_line_then_echo)
    data = {
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "tls": {"certificates": str(store)},
        "hostnames": {"domains": [DOMAIN], "listen": f"tcp:0:interface={LOOPBACK}"},
        "proxy_protocol": {"trusted": [LOOPBACK]},
        "projects": [{"name": "k1", "services": [
            {"name": "sshd", "protocol": "tcp", "port": service.port, "send_proxy": "v1"}]}],
    }
    router = await start_router(config=parse(data))

    def through(port: int, name: str) -> bytes:
        ctx = ssl.create_default_context(cafile=ca.path)
        with socket.create_connection((LOOPBACK, port), timeout=30) as raw:
            raw.sendall(header("v2", CLIENT_V4, ("192.0.2.1", 443)))
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(b"hello")
                want = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443|hello"
                got = b""
                while len(got) < len(want) and (chunk := tls.recv(65536)):
                    got += chunk
                return got

    try:
        got = await in_thread(through, front_port(router), f"k1-{service.port}.{DOMAIN}")
        assert got == b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443|hello"
    finally:
        await router.stopService()
        service.close()


# -- configuration and the table -------------------------------------------------------------


@pytest.mark.parametrize("project, message", [
    ({"name": "u", "backend": "127.0.0.1:53", "send_proxy": "v1", "listen": {"port": 5353, "protocol": "udp"}},
     "projects[0].send_proxy: 'v1' cannot go with UDP (a text header has no datagram form): use 'v2'"),
    ({"name": "t", "backend": "tcp:127.0.0.1:1", "send_proxy": "v3"},
     "projects[0].send_proxy: 'v3' is not a PROXY protocol version (v1 or v2)"),
    ({"name": "t", "backend": "tcp:127.0.0.1:1",
      "listen": {"port": 7000, "protocol": "tcp", "proxy_protocol": {"trusted": ["10.0.0.0/33"]}}},
     "projects[0].listen.proxy_protocol.trusted[0]: '10.0.0.0/33' is not an IP address or network (10.0.0.0/8)"),
    ({"name": "t", "services": [{"name": "dns", "protocol": "udp", "port": 53, "send_proxy": "v1"}]},
     "projects[0].services[0].send_proxy: 'v1' cannot go with UDP"),
])
def test_config_errors(project: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"projects": [project]})
    assert message in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_the_table_shows_both_settings(tmp_path: Path, backend: Backend) -> None:
    """Both settings in the table; a header_timeout not given is the header_timeout limit."""
    tcp_port = free_port()
    router = await start_router(config=ingress_config(tmp_path, ["127.0.0.1", "10.0.0.0/8"], [
        {"name": "k1", "backend": backend.address, "send_proxy": "v2"},
        {"name": "db", "backend": backend.address,
         "listen": {"port": tcp_port, "protocol": "tcp", "proxy_protocol": {"trusted": ["192.0.2.0/24"]}}},
    ], defaults={"header_timeout": 7}))
    port = router.port_of()
    try:
        reply = await in_thread(exchange, port, header("v1", CLIENT_V4, (LOOPBACK, port)) + get("/_api/routes"))
        assert reply.startswith(b"HTTP/1.1 403"), reply[:100]  # the API sees the proxied client: not loopback
        reply = await in_thread(exchange, port, header("v1", ("127.0.0.1", 9), (LOOPBACK, port)) + get("/_api/routes"))
        rows = {r["project"]: r for r in json.loads(reply.partition(b"\r\n\r\n")[2])["routes"]}
        assert rows[None]["proxy_protocol"] == {"trusted": ["127.0.0.1/32", "10.0.0.0/8"], "header_timeout": 7.0}
        assert rows["k1"]["send_proxy"] == "v2"
        assert rows["db"]["proxy_protocol"] == {"trusted": ["192.0.2.0/24"], "header_timeout": 7.0}
        text = await in_thread(exchange, port, header("v1", ("127.0.0.1", 9), (LOOPBACK, port))
                               + get("/_api/routes?format=text"))
        assert b"(send PROXY v2)" in text and b"(PROXY from 192.0.2.0/24)" in text
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_a_udp_route_receives_v2_headers_from_trusted_senders(tmp_path: Path, logged: list[str]) -> None:
    """
    Each datagram of a trusted sender starts with a v2 header, whose source
    is the session's client; replies go back to the sender. A datagram
    without one from it, or with one from anyone else, is dropped.
    """
    echo = UDPEcho()
    trusted_port, untrusted_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [
            {"name": "game", "backend": echo.address, "listen": {
                "port": trusted_port, "protocol": "udp", "interface": LOOPBACK,
                "proxy_protocol": {"trusted": ["127.0.0.1"]}}},
            {"name": "open", "backend": echo.address, "listen": {
                "port": untrusted_port, "protocol": "udp", "interface": LOOPBACK,
                "proxy_protocol": {"trusted": ["10.0.0.0/8"]}}},
        ]}))
    routes = {name: router.listeners[name].factory for name in ("game", "open")}
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(30)
    try:
        def exchange_udp(port: int, datagram: bytes) -> bytes:
            c.sendto(datagram, (LOOPBACK, port))
            return c.recvfrom(65535)[0]

        async def dropped(route: str, port: int, datagram: bytes) -> None:
            before = routes[route].proxy_refused
            c.sendto(datagram, (LOOPBACK, port))
            await wait_for(lambda: routes[route].proxy_refused == before + 1, 15, f"{route} to drop {datagram!r}")

        to_game = (LOOPBACK, trusted_port)
        assert await in_thread(exchange_udp, trusted_port, header("v2", CLIENT_V4, to_game, "udp") + b"one") == b"one"
        assert await in_thread(exchange_udp, trusted_port, header("v2", CLIENT_V6, to_game, "udp") + b"two") == b"two"
        await dropped("game", trusted_port, b"no header")
        assert await in_thread(exchange_udp, untrusted_port, b"plain") == b"plain"
        await dropped("open", untrusted_port, header("v2", CLIENT_V4, (LOOPBACK, untrusted_port), "udp") + b"forged")
        assert echo.received == 3  # nothing dropped reached the backend
        shown = render(registry_for(router))
        for name in ("game", "open"):
            assert b'portrouter_proxy_headers_refused_total{listener="%s"} 1.0' % name.encode() in shown
        assert {s[:2] for s in routes["game"].sessions} == {CLIENT_V4, CLIENT_V6}
        await log_line(logged, r"udp game 127\.0\.0\.1:\d+: a datagram without a valid PROXY v2 header from a "
                               r"trusted address; dropped \(1 so far\)")
        await dropped("game", trusted_port, b"another without one")
        # Counted, but not logged again within 10 s: a flood leaves the log readable.
        assert sum("a datagram without a valid PROXY v2 header" in line for line in logged) == 1
        await log_line(logged, r"udp open 127\.0\.0\.1:\d+: a PROXY header from an untrusted address; dropped")
    finally:
        c.close()
        await router.stopService()
        echo.close()


# -- the review's findings, each a test that failed before its mend -----------------------------


@pytest_twisted.ensureDeferred
async def test_a_kept_backend_connection_serves_only_its_own_project(tmp_path: Path) -> None:
    a, b = ProxyHTTPBackend(), ProxyHTTPBackend()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "a", "backend": a.server.address, "send_proxy": "v1"},
                     {"name": "b", "backend": b.server.address, "send_proxy": "v1"}],
    }))
    try:
        requests = [b"GET /%s/ HTTP/1.1\r\nHost: x\r\n\r\n" % name for name in (b"a", b"b", b"a")]
        await in_thread(requests_on_one_connection, router.port_of(), requests)
        assert (len(a.headers), len(b.headers)) == (2, 1)  # a's kept one was closed when the client moved on
    finally:
        await router.stopService()
        a.server.close()
        b.server.close()


class UpgradingBackend:
    """Behind send_proxy: answers 200, or 101 to an upgrade; says which connections closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.server = ThreadServer(self.serve)

    def serve(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n" not in data:
            data += conn.recv(65536)
        _, _, data = data.partition(b"\r\n")  # the PROXY header
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    self.closed.append("plain")
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            if b"Upgrade" in head:
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
                while conn.recv(65536):
                    pass
                self.closed.append("upgraded")
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest_twisted.ensureDeferred
async def test_a_kept_backend_connection_closes_when_its_client_upgrades_and_leaves(tmp_path: Path) -> None:
    backend = UpgradingBackend()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "k1", "backend": backend.server.address, "send_proxy": "v1"}]}))
    try:
        def client() -> None:
            with socket.create_connection((LOOPBACK, router.port_of()), timeout=30) as sock:
                sock.sendall(b"GET /k1/ HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while not got.endswith(b"ok"):
                    got += sock.recv(65536)
                sock.sendall(b"GET /k1/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
                got = b""
                while b"\r\n\r\n" not in got:
                    got += sock.recv(65536)
                assert got.startswith(b"HTTP/1.1 101"), got

        await in_thread(client)
        await wait_for(lambda: sorted(backend.closed) == ["plain", "upgraded"], 15, "both backend connections to close")
    finally:
        await router.stopService()
        backend.server.close()


@pytest.mark.parametrize("forged, end", [
    (b"PROXY TCP4 notanip 127.0.0.1 1 2\r\n", "source"),
    (b"PROXY TCP4 1.2.3.4 127.0.0.1 99999 2\r\n", "source"),
    (b"PROXY TCP4 1.2.3.4 not.an.ip 1 2\r\n", "destination"),
    (b"PROXY TCP4 1.2.3.4 127.0.0.1 1 65536\r\n", "destination"),
])
@pytest_twisted.ensureDeferred
async def test_a_header_whose_source_is_no_address_is_refused(tmp_path: Path, logged: list[str],
                                                              forged: bytes, end: str) -> None:
    """
    Twisted's v1 parser checks neither the addresses nor the ports; nothing
    may escape into the log as a traceback. The destination is named in
    headers sent on, so it is held to the same.
    """
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port, send_proxy="v2"))
    try:
        assert await in_thread(exchange, port, forged + b"x") == b""
        await log_line(logged, f"a PROXY header whose {end} is no address and port: b'PROXY TCP4 ")
        assert not router.sessions.live and not any("Traceback" in line for line in logged)
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_forged_header_in_pieces_is_refused_too(tmp_path: Path, logged: list[str]) -> None:
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "git", "backend": server.address, "listen": {
            "port": port, "protocol": "tcp", "proxy_protocol": {"trusted": ["10.0.0.0/8"]}}}]}))
    try:
        def in_pieces(pieces: list[bytes]) -> bytes:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                for piece in pieces:
                    sock.sendall(piece)
                    # Each piece its own read at the router: the next goes once this one is read.
                    read_by_the_router(port, sock.getsockname()[1], len(piece))
                sock.shutdown(socket.SHUT_WR)
                return read_to_the_end(sock)

        forged = header("v1", CLIENT_V4, (LOOPBACK, port))
        assert await in_thread(in_pieces, [forged[:3], forged[3:] + b"x"]) == b""
        await log_line(logged, r"tcp git 127\.0\.0\.1:\d+: a PROXY header from an untrusted address; closed")
        # A client whose first bytes only look like the start of one is served, once they say otherwise.
        assert await in_thread(in_pieces, [b"PRO", b"MPT\r\n"]) == b"got:PROMPT\r\n"
    finally:
        await router.stopService()
        server.close()


def read_by_the_router(port: int, client_port: int, size: int) -> None:
    """Poll until the router's side of the connection has read what came (its receive queue empty)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sockets = [s for s in kernel_sockets() if s.port == port and s.remote_port == client_port]
        if sockets and sockets[0].rx_queue == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the router did not read {size} bytes in 30 s")


@pytest_twisted.ensureDeferred
async def test_a_reload_applies_the_top_level_proxy_protocol(tmp_path: Path, backend: Backend) -> None:
    """A revoked address is not believed one connection longer."""
    path = tmp_path / "routes.yaml"

    def write(trusted: list[str]) -> None:
        path.write_text(json.dumps({"ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
                                    "proxy_protocol": {"trusted": trusted},
                                    "projects": [{"name": "k1", "backend": backend.address}]}))

    write(["127.0.0.1"])
    router = RouterService(load(str(path)), reactor, Front, lambda: load(str(path)))
    router.privilegedStartService()
    router.startService()
    try:
        port = router.port_of()
        forged = header("v1", CLIENT_V4, (LOOPBACK, port)) + get("/k1/headers")
        assert seen_headers(await in_thread(exchange, port, forged))["X-Real-IP"] == CLIENT_V4[0]
        write(["10.0.0.0/8"])
        await router.reload()
        assert (await in_thread(exchange, port, forged)).startswith(b"HTTP/1.1 400 ")
        assert seen_headers(await in_thread(exchange, port, get("/k1/headers")))["X-Real-IP"] == LOOPBACK
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_an_ipv4_balancer_on_a_dual_stack_listener_is_trusted(tmp_path: Path, backend: Backend) -> None:
    router = await start_router(config=parse({
        "ingress": "tcp6:0:interface=\\:\\:", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"]},
        "projects": [{"name": "k1", "backend": backend.address}]}))
    port = router.port_of()
    try:
        reply = await in_thread(exchange, port, header("v1", CLIENT_V4, (LOOPBACK, port)) + get("/k1/headers"))
        assert seen_headers(reply)["X-Real-IP"] == CLIENT_V4[0]
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_an_http_service_port_by_hostname_sends_the_services_own_header(tmp_path: Path) -> None:
    """The service's send_proxy, not its project's, as its tunnels and TLS-front relays do."""
    backend = ProxyHTTPBackend()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "hostnames": {"domains": ["apps.test"]},
        "projects": [{"name": "k1", "send_proxy": "v2", "services": [
            {"name": "web", "protocol": "http", "port": backend.server.port, "send_proxy": "v1"}]}],
    }))
    try:
        request = b"GET / HTTP/1.1\r\nHost: k1-%d.apps.test\r\n\r\n" % backend.server.port
        bodies = await in_thread(requests_on_one_connection, router.port_of(), [request])
        assert bodies[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    finally:
        await router.stopService()
        backend.server.close()


# -- the direct TCP path: trusted clients read without a Twisted transport ----------------------


def direct_route(tmp_path: Path, server: ThreadServer, port: int, send_proxy: str = "v1", **setting: Any) -> Any:
    return parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "ssh", "backend": server.address, "send_proxy": send_proxy, "listen": {
            "port": port, "protocol": "tcp", "proxy_protocol": {"trusted": ["127.0.0.1"], **setting}}}]})


def is_direct(router: RouterService) -> bool:
    """The route's trusted clients take the direct path (the backend is an IP address)."""
    return router.listeners["ssh"].factory.direct is not None  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_a_trusted_clients_bulk_is_spliced_after_its_header(tmp_path: Path, logged: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The kernel connection stays the client's behind its header, so a bulk
    transfer through the direct path is spliced as a direct client's is,
    and arrives whole after the header sent on.
    """
    spliced = [0]
    splice = relay._SPLICE
    assert splice is not None

    def counting(*args: Any, **kwargs: Any) -> int:
        n: int = splice(*args, **kwargs)
        spliced[0] += n
        return n

    monkeypatch.setattr(relay, "_SPLICE", counting)
    size = 16 * MiB

    def sink(conn: socket.socket) -> bytes:
        head = read_until(conn, b"\r\n")  # the v1 header sent on
        assert head is not None
        digest, total = hashlib.sha256(head[1]), len(head[1])
        while data := conn.recv(MiB):
            digest.update(data)
            total += len(data)
        conn.sendall(b"%d %s" % (total, digest.hexdigest().encode()))
        return head[0]

    server = ThreadServer(sink)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port))
    assert is_direct(router)
    try:
        def send() -> tuple[str, bytes]:
            with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
                sock.sendall(header("v2", CLIENT_V4, (LOOPBACK, port)))
                sent = send_all_and_hash(sock, 3, size)
                sock.shutdown(socket.SHUT_WR)
                return sent, read_to_the_end(sock)

        sent, reply = await in_thread(send)
        assert reply == b"%d %s" % (size, sent.encode())
        assert spliced[0] >= size // 2, spliced  # bulk, through a pipe: twice per byte spliced
        await wait_for(lambda: server.results, 30, "the backend's header")
        assert server.results[0] == b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 %d" % port
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_header_in_single_bytes_reaches_the_direct_path(tmp_path: Path, logged: list[str]) -> None:
    """
    The header waited for byte by byte (a reader and a timer of its own),
    then the client's bytes after it: counted as the client's, the header not.
    """
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port))
    assert is_direct(router)
    try:
        def in_single_bytes(data: bytes) -> bytes:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                for i in range(len(data)):
                    sock.sendall(data[i:i + 1])
                    read_by_the_router(port, sock.getsockname()[1], 1)
                sock.sendall(b"after")
                sock.shutdown(socket.SHUT_WR)
                return read_to_the_end(sock)

        reply = await in_thread(in_single_bytes, header("v2", CLIENT_V6, (LOOPBACK, port)))
        info, rest = V1Parser().feed(reply[len(b"got:"):])
        assert info is not None and (info.source.host, info.source.port) == CLIENT_V6  # type: ignore[union-attr]
        assert rest == b"after"
        await log_line(logged, r"tcp ssh \[2001:db8::7\]:40002: client closed; 5 bytes in, \d+ bytes out")
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["whole", "in single bytes", "with a TLV", "as v1"])
async def test_the_direct_path_sends_on_a_v2_header_as_it_came_when_it_is_the_one_it_would_send(
        tmp_path: Path, logged: list[str], monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """
    A v2 header for a TCP client over IPv4 names the same client and
    balancer, byte for byte, as the v2 header a route sends on: it goes on
    as it came (none is built), read at the first look or waited for. One
    with a TLV goes on without it (portrouter sends none), and a v1 one as
    v2: those are built.
    """
    built: list[tuple[Any, ...]] = []

    def building(*args: Any) -> bytes:
        built.append(args)
        return header(*args)

    monkeypatch.setattr(tcp, "header", building)
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port, send_proxy="v2"))
    assert is_direct(router)
    balancer = ("192.0.2.1", 2222)
    sent = header("v2", CLIENT_V4, balancer)
    came = {"whole": sent, "in single bytes": sent, "as v1": header("v1", CLIENT_V4, balancer),
            # PP2_TYPE_ALPN, "h2": the length field counts it.
            "with a TLV": sent[:14] + b"\x00\x11" + sent[16:] + b"\x01\x00\x02h2"}[how]
    try:
        def send(data: bytes) -> bytes:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                if how == "in single bytes":
                    for i in range(len(data)):
                        sock.sendall(data[i:i + 1])
                        read_by_the_router(port, sock.getsockname()[1], 1)
                else:
                    sock.sendall(data)
                sock.sendall(b"after")
                sock.shutdown(socket.SHUT_WR)
                return read_to_the_end(sock)

        assert await in_thread(send, came) == b"got:" + sent + b"after"
        assert len(built) == (0 if how in ("whole", "in single bytes") else 1)
        await log_line(logged, r"tcp ssh 203\.0\.113\.7:40001: client closed; 5 bytes in, \d+ bytes out")
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_header_on_the_direct_path_is_reset_at_header_timeout(tmp_path: Path,
                                                                           logged: list[str]) -> None:
    clock = Clock()
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port, header_timeout=5),
                                using=ClockedReactor(clock))
    assert is_direct(router)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
            sock.sendall(b"PROXY TCP4 203.0")
            gate = router.listeners["ssh"].port.factory  # type: ignore[attr-defined]
            await wait_for(lambda: gate.inner.arrived, 15, "the route to accept it")
            clock.advance(0)  # the turn after the accept: the first look, and the wait begins
            assert len(gate.reading) == 1
            clock.advance(4.9)
            assert gate.reading
            clock.advance(0.1)
            assert not gate.reading
            assert await in_thread(read_to_the_end, sock) == b""  # a reset
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: no whole PROXY header within 5 s "
                               r"\(16 bytes came\); closed")
        assert not server.results and not router.sessions.live
    finally:
        await stop_clocked(router, clock)
        server.close()


@pytest.mark.parametrize("start, message", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", r"no PROXY header from a trusted address: the connection began with b'SSH-2\.0"),
    (b"PROXY TCP4 " + b"1" * 120, r"a PROXY header Twisted's parser refuses \(InvalidProxyHeader\): b'PROXY TCP4 111"),
    (b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
     r"a PROXY header Twisted's parser refuses \(InvalidNetworkProtocol\): b'PROXY TCP9"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", r"a PROXY header whose source is no address and port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", r"a PROXY header whose destination is no address and port"),
    (b"PROXY TCP4    \r\n", r"a PROXY header Twisted's parser refuses \(ValueError\): b'PROXY TCP4    "),
])
@pytest_twisted.ensureDeferred
async def test_the_direct_path_refuses_what_the_transport_path_refuses(
        tmp_path: Path, logged: list[str], start: bytes, message: str) -> None:
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port))
    assert is_direct(router)
    gate = router.listeners["ssh"].port.factory  # type: ignore[attr-defined]
    try:
        assert await in_thread(exchange, port, start) == b""
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: " + message)
        assert gate.refused == 1 and not gate.reading and not server.results and not router.sessions.live
        assert b'portrouter_proxy_headers_refused_total{listener="ssh"} 1.0' in render(registry_for(router))
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_client_gone_before_its_header_and_one_reading_at_stop(tmp_path: Path,
                                                                       logged: list[str]) -> None:
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port))
    gate = router.listeners["ssh"].port.factory  # type: ignore[attr-defined]
    try:
        assert await in_thread(exchange, port, b"PROXY TCP4 1.2") == b""
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: closed by the client before its PROXY header "
                               r"was whole \(14 bytes came\); closed")
        assert not gate.reading
        sock = socket.create_connection((LOOPBACK, port), timeout=30)
        sock.sendall(b"PROXY ")
        await wait_for(lambda: len(gate.reading) == 1, 15, "the route to read the start")
    finally:
        await router.stopService()
        server.close()
    assert not gate.reading
    await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: portrouter is stopping; closed")
    assert await in_thread(read_to_the_end, sock) == b""
    sock.close()
    assert not server.results


@pytest_twisted.ensureDeferred
async def test_a_client_accepted_in_the_turn_the_router_stops_is_closed_once(tmp_path: Path,
                                                                            logged: list[str]) -> None:
    """
    A trusted client of the direct path is first looked at after the
    reactor's turn (TCPRoute.look_later). One accepted in the turn its
    listener stops reading headers is refused with the others, and not
    looked at afterwards.
    """
    server = ThreadServer(first_bytes)
    port = free_port()
    router = await start_router(config=direct_route(tmp_path, server, port))
    gate = router.listeners["ssh"].port.factory  # type: ignore[attr-defined]
    route = gate.inner
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(header("v2", CLIENT_V6, (LOOPBACK, port)) + b"early")
        route.look_later(gate, _socket.socket(fileno=ours.detach()), (LOOPBACK, 40009))
        assert route.arrived and not gate.reading  # not waiting yet: first looked at after the round
        gate.close_reading()
        await wait_for(lambda: not route.arrived, 15, "the turn's clients to be looked at")
        assert not gate.reading
        with pytest.raises(ConnectionResetError):  # closed as the others are: reset
            theirs.recv(100)
        stopped = [line for line in logged if "127.0.0.1:40009" in line]
        assert stopped == ["proxy protocol 127.0.0.1:40009: portrouter is stopping; closed"]
    finally:
        theirs.close()
        await router.stopService()
        server.close()
    assert not server.results


# -- framing: one state machine for every stream reader ------------------------------------------

addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: a.compressed))


@given(version=st.sampled_from(["v1", "v2"]), source=addresses, port=st.integers(0, 65535),
       after=st.binary(max_size=40))
@settings(max_examples=300, deadline=None)
def test_read_header_frames_what_haproxy_writes(version: str, source: str, port: int, after: bytes) -> None:
    """
    Every prefix of a header needs more; the whole one names its source and
    destination (as Twisted's own incremental parser reads them) and leaves
    what follows.
    """
    to = ("192.0.2.1" if ":" not in source else "2001:db8::1", 443)
    sent = header(version, (source, port), to)
    for cut in range(len(sent)):
        assert read_header(sent[:cut]) is None
    found = read_header(sent + after)
    assert found is not None and found.size == len(sent)
    info, rest = (V1Parser() if version == "v1" else V2Parser()).feed(sent + after)
    assert info is not None and rest == after
    assert found.source == (ipaddress.ip_address(info.source.host).compressed, port)  # type: ignore[union-attr]
    assert found.destination == to == (ipaddress.ip_address(info.destination.host).compressed,  # type: ignore[union-attr]
                                       info.destination.port)  # type: ignore[union-attr]


@given(st.binary(max_size=200))
@example(b"TCP4    \r\n")  # Twisted's v1 parser raised ValueError on it, not its own error (found by this test)
@settings(max_examples=500, deadline=None)
def test_read_header_answers_anything_with_more_found_or_refused(data: bytes) -> None:
    for start in (data, b"PROXY " + data, V2_SIGNATURE + data):
        try:
            found = read_header(start)
        except HeaderRefused as e:
            assert str(e)
        else:
            assert found is None or 0 < found.size <= len(start)


def _outcome(data: bytes) -> object:
    """What read_header answers for C{data}: its Found, None, or the words of its refusal."""
    try:
        return read_header(data)
    except HeaderRefused as e:
        return f"refused: {e}"


@given(command=st.sampled_from([0x21, 0x20, 0x22, 0x11]),
       family=st.sampled_from([0x11, 0x12, 0x21, 0x22, 0x10, 0x13, 0x31, 0x00]),
       sources=st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 65535)), min_size=2, max_size=3),
       destination=st.binary(min_size=16, max_size=16), port=st.integers(0, 65535),
       tlvs=st.binary(max_size=12), length=st.integers(-6, 6), after=st.binary(max_size=8))
@example(command=0x21, family=0x21, destination=bytes(16), port=443, tlvs=b"", length=0, after=b"",
         sources=[(ipaddress.IPv6Address(f"::ffff:10.0.0.{i}").packed, 1000 + i) for i in (1, 2)])  # IPv4-mapped
@example(command=0x21, family=0x11, destination=bytes(16), port=443, tlvs=b"", length=0, after=b"GET",
         sources=[(bytes([10, 0, 0, i]) + bytes(12), 1000 + i) for i in (1, 2, 3)])  # TCP4: read by its destination
@example(command=0x21, family=0x11, destination=bytes(16), port=443, tlvs=b"\0\0\0", length=-3, after=b"",
         sources=[(bytes([10, 0, 0, i]) + bytes(12), 1000 + i) for i in (1, 2)])  # TCP4, then 3 bytes of data
@settings(max_examples=500, deadline=None)
def test_a_v2_header_of_a_known_shape_reads_as_twisted_reads_it(
        command: int, family: int, sources: list[tuple[bytes, int]], destination: bytes, port: int,
        tlvs: bytes, length: int, after: bytes) -> None:
    """
    Headers that differ only in their source address and port, one after
    another: each answer (found, needing more, refused) is the one Twisted's
    parser gives the header alone, with no shape known before it.
    """
    n = {1: 4, 2: 16}.get(family >> 4, 4)
    headers = []
    for source, source_port in sources:
        body = source[:n] + destination[:n] + struct.pack("!HH", source_port, port) + tlvs
        size = max(0, len(body) + length)
        headers.append(V2_SIGNATURE + bytes((command, family)) + struct.pack("!H", size) + body + after)
    alone = []
    for data in headers:
        forget_shapes()
        alone.append(_outcome(data))
    forget_shapes()
    assert [_outcome(data) for data in headers] == alone
    if isinstance(alone[0], proxyproto.Found) and alone[0].source is not None and family in (0x11, 0x12, 0x21, 0x22):
        assert len(proxyproto._v2_shapes) == 1  # the later ones were read by their shape
        # A TCP client over IPv4 with no TLVs: read by its destination, kept apart.
        # (TLV bytes the length field leaves out are data after the header.)
        tcp4 = command == 0x21 and family == 0x11 and len(tlvs) + length == 0
        named = alone[0].destination
        assert proxyproto._tcp4_destinations == ({(destination[:4], port): named} if tcp4 else {})


def forget_shapes() -> None:
    """No v2 header read before: the next is Twisted's to judge."""
    proxyproto._v2_shapes.clear()
    proxyproto._tcp4_destinations.clear()


def test_a_known_shape_names_the_destination_its_bytes_hold() -> None:
    """
    IPv6, UDP and headers with TLVs are read by their shape, which holds
    the destination: each header names its own, whichever shapes are known.
    """
    forget_shapes()
    for transport in ("tcp", "udp"):
        for to in (("2001:db8::1", 443), ("2001:db8::2", 8443), ("2001:db8::1", 443)):
            for client in (("2001:db8::7", 40001), ("2001:db8::8", 40002)):
                sent = header("v2", client, to, transport)
                found = read_header(sent)
                assert found is not None and (found.source, found.destination) == (client, to), (transport, to)
        tlv = header("v2", ("198.51.100.9", 5), ("192.0.2.3", 53), transport)
        with_tlv = tlv[:14] + struct.pack("!H", int.from_bytes(tlv[14:16], "big") + 3) + tlv[16:] + b"\x04\x00\x00"
        for client in (("198.51.100.9", 5), ("198.51.100.10", 6)):
            found = read_header(with_tlv[:16] + socket.inet_aton(client[0]) + with_tlv[20:24]
                                + struct.pack("!H", client[1]) + with_tlv[26:])
            assert found is not None and (found.source, found.destination) == (client, ("192.0.2.3", 53))
    forget_shapes()


def test_a_tcp4_header_to_a_destination_twisted_accepted_is_read_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Once Twisted's parser has accepted a TCP4 header to a destination, the
    next to it, from another client, is taken apart without Twisted (the
    struct path) and names its own source; one to another destination still
    goes to Twisted.
    """
    forget_shapes()
    first = header("v2", ("203.0.113.7", 40001), ("192.0.2.1", 443))
    assert read_header(first + b"GET") == proxyproto.Found(("203.0.113.7", 40001), ("192.0.2.1", 443), 28, first)

    def parsed(data: bytes) -> Any:
        raise AssertionError("Twisted's parser asked again")

    monkeypatch.setattr(V2Parser, "parse", staticmethod(parsed))
    monkeypatch.setattr(proxyproto, "_v2_source", lambda whole, n: parsed(whole))  # nor the shapes' path
    second = header("v2", ("198.51.100.9", 5), ("192.0.2.1", 443))
    assert read_header(second) == proxyproto.Found(("198.51.100.9", 5), ("192.0.2.1", 443), 28, second)
    with pytest.raises(AssertionError, match="asked again"):
        read_header(header("v2", ("198.51.100.9", 5), ("192.0.2.2", 443)))
    forget_shapes()
