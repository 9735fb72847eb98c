"""
Hostile HTTP clients, byte for byte over loopback: request smuggling through
upgrades, CONNECT, ambiguous hosts, broken framing. The backend logs every
request line per connection, so "no request the proxy did not parse reaches
a backend" is checked on what the backend saw, not on what the proxy says.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.httpbackend import Backend, raw_request
from portrouter.config import parse
from portrouter.model import Auth, Config, Token
from portrouter.web import Fixed
from tests.support import LOOPBACK, ThreadServer, in_thread, start_router
from tests.test_http import backend, router_for  # noqa: F401 (backend: a fixture)
from tests.test_http_unit import connect_backend, make

ROUTED = "real-ip=127.0.0.1 prefix=/web"  # what every request the ingress routed carries


Response = tuple[int, dict[str, str], bytes]


def read_responses(sock: socket.socket, count: int, bodiless: frozenset[int] = frozenset()
                   ) -> tuple[list[Response], bytes]:
    """
    C{count} responses off a socket (Content-Length framed, as the proxy
    frames what the test backend sends; those numbered in C{bodiless}
    answer a HEAD), or fewer if the connection closes; and the bytes read
    past them (after a 101: the new protocol's).
    """
    buf = b""
    out: list[Response] = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return out, buf
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(lines[0].split()[1])
        length = int(headers.get("content-length", "0")) if status != 101 and len(out) not in bodiless else 0
        while len(buf) < length:
            data = sock.recv(65536)
            if not data:
                return out, buf
            buf += data
        out.append((status, headers, buf[:length]))
        buf = buf[length:]
    return out, buf


def exchange(port: int, data: bytes, count: int) -> list[Response]:
    """One C{sendall} of C{data} (pipelined requests), then C{count} responses."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(data)
        return read_responses(sock, count)[0]


def lines(backend: Backend) -> list[str]:
    return [line for conn in backend.stats.lines for line in conn]


UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest_twisted.ensureDeferred
async def test_pool_poisoning_through_an_upgrade_is_impossible(backend: Backend) -> None:
    """
    Finding 1: the bytes after an upgrade request were written after an
    earlier request's head on a pooled connection, whose next user got the
    answer to the smuggled request.
    """
    router, ingress, _ = await router_for(backend.address)
    try:
        attack = (
            b"GET /web/victim/first HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /web/victim/second HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\n"
            b"GET /web/slow-smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        replies = await in_thread(exchange, ingress, attack, 3)
        # The backend did not switch: the bytes after the upgrade request are
        # the next request, parsed and routed by the proxy like any other.
        assert [(s, b) for s, _, b in replies] == [
            (200, b"backend saw GET /victim/first\n"),
            (200, b"backend saw GET /victim/second\n"),
            (200, b"backend saw GET /slow-smuggled\n"),
        ]
        # The next client, on whatever pooled connection, gets its own answer.
        for i in range(3):
            reply = await in_thread(exchange, ingress, b"GET /web/victim/third%d HTTP/1.1\r\nHost: h\r\n\r\n" % i, 1)
            assert [(s, b) for s, _, b in reply] == [(200, b"backend saw GET /victim/third%d\n" % i)]
        # Every request the backend saw was routed by the proxy, once; the
        # upgrade request had a connection of its own, never reused.
        seen = lines(backend)
        assert sorted(seen) == sorted(
            f"GET {p} HTTP/1.1 {ROUTED}" for p in
            ["/victim/first", "/victim/second", "/slow-smuggled", "/victim/third0", "/victim/third1", "/victim/third2"]
        ), backend.stats.lines
        assert [f"GET /victim/second HTTP/1.1 {ROUTED}"] in backend.stats.lines
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_blind_smuggling_after_a_refused_upgrade_is_impossible(backend: Backend) -> None:
    """
    Finding 2: after an upgrade the backend did not accept, a second request
    the proxy never parsed reached the backend: raw ``..``, the attacker's
    X-Real-IP, none of our headers.
    """
    router, ingress, own = await router_for(backend.address)
    try:
        attack = (
            b"GET /web/up HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\n"
            b"GET /web/../../_api/routes HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\n\r\n"
        )
        replies = await in_thread(exchange, ingress, attack, 2)
        # The second request is the proxy's to route: its dot segments are
        # resolved inside the project, and the forwarding headers are ours.
        assert [(s, b) for s, _, b in replies] == [
            (200, b"backend saw GET /up\n"), (200, b"backend saw GET /_api/routes\n"),
        ]
        assert sorted(lines(backend)) == [f"GET /_api/routes HTTP/1.1 {ROUTED}", f"GET /up HTTP/1.1 {ROUTED}"]
        # Same on a project's own port.
        replies = await in_thread(exchange, own, attack.replace(b"/web/", b"/"), 2)
        assert [s for s, _, _ in replies] == [200, 200]
        assert not [line for line in lines(backend) if "6.6.6.6" in line or ".." in line]
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_connect_is_refused_and_never_forwarded(backend: Backend) -> None:
    router, ingress, own = await router_for(backend.address)
    try:
        for port, target in ((ingress, b"/web/x"), (own, b"/x"), (own, b"127.0.0.1:22")):
            reply = await in_thread(raw_request, port, (
                b"CONNECT %s HTTP/1.1\r\nHost: h\r\n\r\nGET /web/smuggled HTTP/1.1\r\nHost: h\r\n\r\n" % target
            ))
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), reply
            assert b"\r\nAllow: " in head and b"CONNECT" not in head.split(b"\r\nAllow: ")[1].split(b"\r\n")[0]
            assert body == b"CONNECT is not supported: portrouter is a reverse proxy, not a forward proxy\n"
        assert backend.stats.lines == []
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_bytes_after_an_accepted_upgrade_are_tunnelled(backend: Backend) -> None:
    """Only a 101 makes the bytes after the upgrade request the new protocol's."""
    router, ingress, _ = await router_for(backend.address)
    try:
        early = b"GET /web/not-a-request HTTP/1.1\r\nHost: h\r\n\r\n"

        def run() -> tuple[list[Response], bytes]:
            with socket.create_connection((LOOPBACK, ingress), timeout=30) as sock:
                sock.sendall(b"GET /web/upgrade HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\n" + early)
                replies, echoed = read_responses(sock, 1)
                while len(echoed) < len(early):
                    data = sock.recv(65536)
                    assert data, "closed before the echo"
                    echoed += data
                return replies, echoed

        replies, echoed = await in_thread(run)
        assert [s for s, _, _ in replies] == [101]
        assert echoed == early
        assert lines(backend) == [f"GET /upgrade HTTP/1.1 {ROUTED}"]
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_upgrade_request_with_a_body_is_refused(backend: Backend) -> None:
    """The parser does not read an upgrade request's body: it would be read as the next request."""
    router, ingress, _ = await router_for(backend.address)
    try:
        reply = await in_thread(raw_request, ingress, (
            b"POST /web/upgrade HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"Content-Length: 38\r\n\r\n"
            b"GET /web/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        ))
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert reply.endswith(b"\r\n\r\nan upgrade request must not have a body\n")
        assert backend.stats.lines == []
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_chunked_request_with_trailers_completes(backend: Backend) -> None:
    """Finding 5: a trailer after the last chunk raised in on_header and cut the request."""
    router, ingress, _ = await router_for(backend.address)
    try:
        replies = await in_thread(exchange, ingress, (
            b"POST /web/sink HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n"
            b"GET /web/after HTTP/1.1\r\nHost: h\r\n\r\n"
        ), 2)
        digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
        assert [(s, b) for s, _, b in replies] == [
            (200, b'{"size": 3, "sha256": "%s"}' % digest.encode()), (200, b"backend saw GET /after\n"),
        ]
        # Trailers are dropped (RFC 9110 6.5.1 lets a recipient): the backend
        # got a well-framed body and nothing after it.
        assert lines(backend) == [f"POST /sink HTTP/1.1 {ROUTED}", f"GET /after HTTP/1.1 {ROUTED}"]
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_host_header_rules(backend: Backend) -> None:
    """Finding 8 (RFC 9112 3.2): one Host, required in HTTP/1.1, never stripped by Connection."""
    router, ingress, own = await router_for(backend.address)
    try:
        for port, path in ((ingress, b"/web/x"), (own, b"/x")):
            reply = await in_thread(raw_request, port, b"GET %s HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" % path)
            assert reply.startswith(b"HTTP/1.1 400 ") and reply.endswith(b"the request has 2 Host headers; one is allowed\n")
            reply = await in_thread(raw_request, port, b"GET %s HTTP/1.1\r\nX: y\r\n\r\n" % path)
            assert reply.startswith(b"HTTP/1.1 400 ") and reply.endswith(b"an HTTP/1.1 request needs a Host header\n")
        assert backend.stats.lines == []
        # HTTP/1.0 has no Host requirement.
        reply = await in_thread(raw_request, ingress, b"GET /web/x HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"backend saw GET /x\n")
        # A Connection option naming Host does not remove it.
        replies = await in_thread(exchange, ingress, b"GET /web/headers HTTP/1.1\r\nHost: kept.test\r\nConnection: host\r\n\r\n", 1)
        seen = {k.lower(): v for k, v in json.loads(replies[0][2])["headers"]}
        assert (seen["host"], seen["x-forwarded-host"]) == ("kept.test", "kept.test")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_malformed_chunk_framing_is_a_400(backend: Backend) -> None:
    """A broken request gets a 400, also when it follows others on the connection, which are answered first."""
    router, ingress, _ = await router_for(backend.address)
    try:
        bad = b"POST /web/sink HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
        replies = await in_thread(exchange, ingress, bad, 2)
        assert [s for s, _, _ in replies] == [400]
        assert replies[0][2] == b"malformed request: Invalid character in chunk size\n"
        replies = await in_thread(exchange, ingress, b"GET /web/first HTTP/1.1\r\nHost: h\r\n\r\n" + bad, 3)
        assert [(s, b) for s, _, b in replies] == [
            (200, b"backend saw GET /first\n"), (400, b"malformed request: Invalid character in chunk size\n"),
        ]
        replies = await in_thread(exchange, ingress, b"GET /web/first HTTP/1.1\r\nHost: h\r\n\r\nGET /x HTTP/1.1\r\nHost h\r\n\r\n", 3)
        assert [s for s, _, _ in replies] == [200, 400]
        assert [line.split()[1] for line in lines(backend) if line.startswith("GET")] == ["/first", "/first"]
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_a_clients_forwarded_header_is_dropped(backend: Backend) -> None:
    """RFC 7239 Forwarded from a client is as untrusted as its X-Forwarded-*; we set only the latter."""
    router, ingress, _ = await router_for(backend.address)
    try:
        replies = await in_thread(exchange, ingress, (
            b"GET /web/headers HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6;proto=https\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
        ), 1)
        seen = {k.lower(): v for k, v in json.loads(replies[0][2])["headers"]}
        assert "forwarded" not in seen
        assert (seen["x-forwarded-for"], seen["x-real-ip"], seen["x-forwarded-proto"]) == ("6.6.6.6, 127.0.0.1", "127.0.0.1", "http")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_api_without_its_slash_is_not_the_api(backend: Backend) -> None:
    """``/_api`` is no path of the API (``/_api/`` is its root), nor a project: 404, the API is not asked."""
    router, ingress, _ = await router_for(backend.address)
    try:
        for target in (b"/_api", b"/_api?x=1"):
            reply = await in_thread(raw_request, ingress, b"GET %s HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % target)
            assert reply.startswith(b"HTTP/1.1 404 ") and reply.endswith(b"\r\n\r\nportrouter: no such project\n"), reply
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_api_refuses_before_reading_the_body(tmp_path: Any) -> None:
    """
    A caller without credentials who announces 100 MB (and asks to be told
    before sending it) gets the 401 at once, no 100 Continue, and the
    connection closes: the body is never read.
    """
    auth = Auth(tokens=(Token(secret="admin-token-0123456789", admin=True, projects=("*",)),))
    router = await start_router(config=Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path), auth=auth))
    try:
        def refused() -> tuple[list[Response], bytes]:
            with socket.create_connection((LOOPBACK, router.port_of()), timeout=30) as sock:
                sock.sendall(b"PUT /_api/projects/p HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n")
                replies, rest = read_responses(sock, 2)
                while data := sock.recv(65536):
                    rest += data
                return replies, rest

        replies, rest = await in_thread(refused)
        assert [s for s, _, _ in replies] == [401]
        status, headers, body = replies[0]
        assert headers["connection"] == "close" and json.loads(body)["error"]["code"] == "unauthorized"
        assert rest == b""  # and then the close
        # An admin is told to go on (no 1 s wait in curl), and the body is read.
        def allowed() -> list[Response]:
            with socket.create_connection((LOOPBACK, router.port_of()), timeout=30) as sock:
                body = b'{"backend": "tcp:127.0.0.1:9"}'
                sock.sendall(b"PUT /_api/projects/p HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer admin-token-0123456789\r\n"
                             b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
                continued, _ = read_responses(sock, 1)
                sock.sendall(body)
                return continued + read_responses(sock, 1)[0]

        assert [s for s, _, _ in await in_thread(allowed)] == [100, 201]
        # Without a body, the refusal waits for the request's end and keeps the connection.
        replies = await in_thread(exchange, router.port_of(), b"GET /_api/routes HTTP/1.1\r\nHost: h\r\n\r\n" * 2, 2)
        assert [s for s, _, _ in replies] == [401, 401]
    finally:
        await router.stopService()


# -- in memory: exact bytes, a Clock -------------------------------------------------


def test_a_backend_answering_twice_is_not_pooled() -> None:
    """
    A connection goes back to the pool only when what was read on it is
    exactly the response: a second, unasked response in the same read would
    otherwise be the next request's answer, for whichever client.
    """
    reactor, channel, transport = make()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(  # type: ignore[attr-defined]
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    )
    assert transport.value() == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
    assert backend.disconnecting
    pool = channel.site.routes.pools["api"]  # type: ignore[attr-defined]
    assert pool.idle == []
    channel.dataReceived(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(reactor.tcpClients) == 2  # a new connection for the next request
    assert b"forged" not in transport.value()


def test_reading_resumes_after_a_body_that_waited_for_its_backend() -> None:
    """
    Found by the pipelining property: a body read whole while the backend
    connection was being made paused reading, and nothing resumed it, so the
    next request's head, cut in that read, waited for the header timeout.
    """
    reactor, channel, transport = make()
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nokGET /b HTT")
    assert transport.producerState == "paused"  # the body waits for somewhere to go
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")  # type: ignore[attr-defined]
    assert transport.value() == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
    assert transport.producerState == "producing"


def test_response_timeout_starts_when_the_request_is_sent() -> None:
    """
    Finding 6: the response timeout ran during the upload, so an upload
    longer than it got a 504 while still sending. It counts from the end of
    the request.
    """
    reactor, channel, transport = make(response_timeout=60)
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
    backend = connect_backend(reactor)
    for piece in (b"cd", b"ef", b"gh"):
        reactor.advance(59)  # 4 minutes of upload in all, a trickle
        channel.dataReceived(piece)
    reactor.advance(59)
    assert transport.value() == b""
    channel.dataReceived(b"ij")  # the request is complete now
    assert backend.value().endswith(b"\r\n\r\nabcdefghij")
    reactor.advance(59.9)
    assert transport.value() == b""
    reactor.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 504 ")
    assert transport.value().endswith(b"backend did not answer within 60 s\n")


def pooled(reactor: Any, channel: Any, transport: Any) -> Any:
    """A first request answered, so its backend connection waits in the pool; that connection."""
    channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]
    transport.clear()
    backend.clear()
    return backend


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"LOCK"])
def test_a_request_that_is_not_idempotent_is_never_sent_twice(method: bytes) -> None:
    """
    Finding 7: a POST on a pooled connection that the backend closed without
    answering was sent again on a new one: the backend saw it twice.
    """
    reactor, channel, transport = make()
    backend = pooled(reactor, channel, transport)
    channel.dataReceived(b"%s /order HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n" % method)
    assert backend.value().startswith(b"%s /order " % method)
    backend.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    assert len(reactor.tcpClients) == 1  # no second connection, no second try
    assert transport.value().startswith(b"HTTP/1.1 502 ")
    assert transport.value().endswith(b"backend closed the connection without answering\n")


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"])
def test_an_idempotent_request_is_sent_again_when_its_pooled_connection_was_closed(method: bytes) -> None:
    reactor, channel, transport = make()
    backend = pooled(reactor, channel, transport)
    channel.dataReceived(b"%s /again HTTP/1.1\r\nHost: h\r\n\r\n" % method)
    backend.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    assert len(reactor.tcpClients) == 2  # the usual keep-alive race: once more, on a new connection
    again = connect_backend(reactor)
    assert again.value().startswith(b"%s /again " % method)
    again.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 204 ")


def test_an_idempotent_request_whose_body_was_streamed_is_not_sent_again() -> None:
    """A PUT is idempotent, but its body went to the closed connection and is not kept to send twice."""
    reactor, channel, transport = make()
    backend = pooled(reactor, channel, transport)
    channel.dataReceived(b"PUT /file HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
    assert backend.value().startswith(b"PUT /file ") and backend.value().endswith(b"\r\n\r\nok")
    backend.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    assert len(reactor.tcpClients) == 1
    assert transport.value().startswith(b"HTTP/1.1 502 ")


def test_no_second_try_once_something_of_the_answer_came() -> None:
    reactor, channel, transport = make()
    backend = pooled(reactor, channel, transport)
    channel.dataReceived(b"GET /hint HTTP/1.1\r\nHost: h\r\n\r\n")
    backend.protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")  # type: ignore[attr-defined]
    backend.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    assert len(reactor.tcpClients) == 1
    assert transport.value().startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"HTTP/1.1 502 " in transport.value()


def test_bytes_held_after_an_upgrade_request_are_bounded() -> None:
    """
    Reading stops after an upgrade request until its answer; a transport that
    delivers more anyway (64 KiB past the request) closes the connection
    rather than hold an unbounded amount.
    """
    reactor, channel, transport = make()
    channel.dataReceived(b"GET /ws HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\nearly")
    assert transport.producerState == "paused"
    backend = connect_backend(reactor)
    assert backend.value().endswith(b"\r\n\r\n")  # the head alone: nothing held goes before a 101
    channel.dataReceived(b"x" * 60000)
    assert not transport.disconnecting
    channel.dataReceived(b"x" * 10000)
    assert transport.disconnecting and backend.disconnecting
    assert b"early" not in backend.value()


@pytest_twisted.ensureDeferred
async def test_a_service_port_upgrade_pipelined_behind_a_request_takes_its_turn(backend: Backend) -> None:
    """
    A /stream/ upgrade (switched by portrouter itself) pipelined behind a
    proxied request: the WebSocket bytes after it are its own, not written
    to the first request's backend.
    """
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    service = ThreadServer(echo)
    config = parse({
        "ingress": f"tcp:0:interface={LOOPBACK}",
        "projects": [
            {"name": "web", "backend": backend.address},
            {"name": "k1", "host": LOOPBACK, "services": [{"name": "echo", "protocol": "tcp", "port": service.port}]},
        ],
    })
    router = await start_router(config=config)
    try:
        mask = b"\x01\x02\x03\x04"
        frame = b"\x82\x85" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
        attack = (
            b"GET /web/first HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /stream/session/k1/tcpproxy?app=echo HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\n" + frame
        )

        def run() -> tuple[list[Response], bytes]:
            with socket.create_connection((LOOPBACK, router.port_of()), timeout=30) as sock:
                sock.sendall(attack)
                replies, rest = read_responses(sock, 2)
                while len(rest) < 7:
                    data = sock.recv(65536)
                    assert data, "closed before the echo"
                    rest += data
                return replies, rest

        replies, rest = await in_thread(run)
        assert [s for s, _, _ in replies] == [200, 101]
        assert rest == b"\x82\x05hello"
        assert lines(backend) == [f"GET /first HTTP/1.1 {ROUTED}"]
    finally:
        await router.stopService()
        service.close()


def test_transfer_codings_before_chunked_reach_the_backend() -> None:
    """
    The body is re-chunked for the backend; codings applied before chunked
    (gzip) are the body's and must be said, or the backend reads gzip as
    the body itself. Found probing: they were dropped.
    """
    reactor, channel, transport = make()
    channel.dataReceived(b"POST /z HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n"
                         b"3\r\nxyz\r\n0\r\n\r\n")
    backend = connect_backend(reactor)
    head, _, body = backend.value().partition(b"\r\n\r\n")
    assert [line for line in head.split(b"\r\n") if line.lower().startswith(b"transfer-encoding")] == [
        b"Transfer-Encoding: gzip, chunked"
    ]
    assert body == b"3\r\nxyz\r\n0\r\n\r\n"


def test_http10_with_transfer_encoding_closes_after_its_answer() -> None:
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing: answer, then close."""
    reactor, channel, transport = make()
    channel.dataReceived(b"POST /z HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]
    assert transport.value() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert transport.disconnecting


def test_requests_after_refused_upgrades_keep_their_order() -> None:
    """
    Found probing 1500 pipelined upgrade requests that each get a 404: after
    the held bytes were handed to a fresh parser, reading resumed while the
    next upgrade's held bytes still waited their turn, so later bytes were
    parsed first (then "Data after Connection: close" and a stall).
    """
    reactor, channel, transport = make()
    channel.site.handler = lambda ch, req: Fixed(lambda: ch.send(404, req.path))  # type: ignore[method-assign]
    up = b"GET /up%d HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\n"
    channel.dataReceived(up % 1 + up % 2 + b"GET /plain HTT")
    step(reactor)  # the bytes after /up1 are read: /up2 is answered, the rest is held again
    assert transport.producerState == "paused"
    channel.dataReceived(b"P/1.1\r\nHost: h\r\n\r\n")  # a transport that reads anyway: kept in order
    reactor.advance(0)
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in transport.value().split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"/up1", b"/up2", b"/plain"]
    assert transport.producerState == "producing"


def step(reactor: Any) -> None:
    """Run the one call due first, not those it schedules (as a reactor turn does)."""
    call = min(reactor.getDelayedCalls(), key=lambda c: c.getTime())
    reactor.calls.remove(call)
    call.func(*call.args, **call.kw)


def test_many_pipelined_requests_answered_at_once_do_not_recurse() -> None:
    """
    Found probing: 2000 pipelined requests queued behind a slow one, each
    answered as soon as dispatched (404s), were dispatched each from the
    previous one's finish: RecursionError, and the connection stalled.
    """
    reactor, channel, transport = make()
    slow = Fixed(lambda: channel.send(200, b"slow"))
    routes = {b"/slow": slow}
    channel.site.handler = lambda ch, req: routes.get(req.path) or Fixed(lambda: ch.send(404, b""))  # type: ignore[method-assign]
    slow.end = lambda: None  # type: ignore[method-assign]  # answered when the test says
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n" + b"GET /nope HTTP/1.1\r\nHost: h\r\n\r\n" * 2000)
    slow.answer()
    assert transport.value().count(b"HTTP/1.1 404 ") == 2000
    assert transport.producerState == "producing"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",  # a 204 has no body: the 5 bytes are not HTTP
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Le",  # half a second answer
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\x00",  # not even the start of one
])
def test_a_backend_saying_more_than_its_answer_is_never_pooled(answer: bytes) -> None:
    reactor, channel, transport = make()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(answer)  # type: ignore[attr-defined]
    assert transport.value().startswith(answer.split(b"\r\n")[0])
    assert backend.disconnecting
    assert channel.site.routes.pools["api"].idle == []  # type: ignore[attr-defined]


def test_a_101_to_a_request_that_did_not_ask_is_a_502() -> None:
    """The client's bytes after a plain request are further requests, maybe for other projects: never tunnelled."""
    reactor, channel, transport = make()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 502 ")
    assert transport.value().endswith(b"backend switched protocols without being asked to\n")
    assert backend.disconnecting


def test_held_requests_of_a_client_that_left_are_not_answered() -> None:
    """The bytes after a refused upgrade are read on the next turn: not if the client is gone by then."""
    reactor, channel, transport = make()
    refused = Fixed(lambda: channel.send(404, b""))
    channel.site.handler = lambda ch, req: refused if req.path == b"/up" else ch.site.routes.proxy(  # type: ignore[method-assign]
        ch, req, ch.site.project, req.path, None)
    channel.dataReceived(b"GET /up HTTP/1.1\r\nHost: h\r\n" + UPGRADE + b"\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    reactor.advance(0)
    assert reactor.tcpClients == []  # /after never went to the backend


def test_an_upload_that_stops_is_a_408() -> None:
    """
    With the response timeout counted from the request's end, a client that
    stops sending its body would hold its backend connection for ever:
    no progress within response_timeout (checked every response_timeout,
    so at most twice that) is a 408.
    """
    reactor, channel, transport = make(response_timeout=60)
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
    backend = connect_backend(reactor)
    reactor.advance(30)
    channel.dataReceived(b"cd")
    reactor.advance(30)  # progress since the last look: looked at again in 60 s
    reactor.advance(59)
    assert transport.value() == b""
    reactor.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.value().endswith(b"the request body stopped arriving (nothing within 60 s)\n")
    assert backend.disconnecting


def test_an_upload_the_backend_stops_reading_is_a_504() -> None:
    reactor, channel, transport = make(response_timeout=60)
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
    backend = connect_backend(reactor)
    backend._tempDataLen = 4  # type: ignore[attr-defined]  # as a TCP transport whose peer does not read
    reactor.advance(61)
    assert transport.value().startswith(b"HTTP/1.1 504 ")
    assert transport.value().endswith(b"backend did not read the request body within 60 s\n")
