"""HTTP proxy behaviour that needs a Clock or exact bytes: in memory, fast."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError


from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from portrouter.config import parse_project
from portrouter.http import HTTPRoute, HTTPRoutes, Pool, ProjectSite, Upstream, normalize
from portrouter.model import ProxyProtocol
from portrouter.proxyheader import header
from portrouter.proxyproto import HeaderReader, ProxyGate
from portrouter.sessions import Sessions
from portrouter.web import Channel, Deadline, Fixed
from tests.support import LOOPBACK, ThreadServer, closes_when_idle, free_port, left_to_the_collector


def make(connect_timeout: float = 10, response_timeout: float = 60,
         idle_timeout: float | None = None) -> tuple[MemoryReactorClock, Channel, StringTransport]:
    reactor = MemoryReactorClock()
    project = parse_project({
        "name": "api", "backend": "tcp:127.0.0.1:3001", "listen": {"port": 3000},
        "connect_timeout": connect_timeout, "response_timeout": response_timeout, "idle_timeout": idle_timeout,
    })
    site = ProjectSite(HTTPRoutes(reactor, Sessions(reactor)), project)
    channel = Channel(site, reactor)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    channel.makeConnection(transport)
    return reactor, channel, transport


def test_connect_timeout_is_504_naming_the_project() -> None:
    reactor, channel, transport = make(connect_timeout=10)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(reactor.tcpClients) == 1
    reactor.advance(9.9)
    assert transport.value() == b""
    reactor.advance(0.2)
    head, body = transport.value().split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 504 Gateway Timeout")
    assert body == b"portrouter: project 'api': backend did not answer within 10 s\n"


def connect_backend(reactor: MemoryReactorClock) -> StringTransport:
    """Complete the pending backend connection; the transport knows its protocol."""
    factory = reactor.tcpClients[-1][2]
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3001))
    backend = StringTransport()
    backend.protocol = protocol  # type: ignore[attr-defined]
    protocol.makeConnection(backend)
    return backend


def test_response_timeout_is_504() -> None:
    reactor, channel, transport = make(response_timeout=60)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    backend = connect_backend(reactor)
    assert backend.value().startswith(b"GET /x HTTP/1.1\r\n")
    reactor.advance(59.9)
    assert transport.value() == b""
    reactor.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 504")
    assert transport.value().endswith(b"backend did not answer within 60 s\n")
    assert backend.disconnecting  # the request is abandoned at the backend too


def test_request_head_sent_to_backend() -> None:
    reactor, channel, transport = make()
    channel.dataReceived(
        b"POST /p?q=1 HTTP/1.1\r\nHost: h:1\r\nConnection: close, X-A\r\nX-A: 1\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nContent-Length: 3\r\n\r\nabc"
    )
    backend = connect_backend(reactor)
    head, body = backend.value().split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n") == [
        b"POST /p?q=1 HTTP/1.1",
        b"Host: h:1",
        b"X-Forwarded-For: 1.2.3.4, 127.0.0.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: h:1",
        b"X-Real-IP: 127.0.0.1",
        b"Content-Length: 3",
    ]
    assert body == b"abc"
    # The backend's answer goes back; the client asked to close.
    channel_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok"
    backend.protocol.dataReceived(channel_bytes)  # type: ignore[attr-defined]
    assert transport.value() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    assert transport.disconnecting


def test_chunked_response_to_http10_client_is_close_delimited() -> None:
    reactor, channel, transport = make()
    channel.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc"
    assert transport.disconnecting


def test_normalize() -> None:
    assert normalize(b"/a/b") == b"/a/b"
    assert normalize(b"/a/../../b") == b"/b"
    assert normalize(b"/%2e%2E/x/%2e") == b"/x/"
    assert normalize(b"/a%2F..%2Fb") == b"/a%2F..%2Fb"  # one segment, not a dot segment
    assert normalize(b"/..") == b"/"


def test_an_upgraded_tunnel_is_closed_when_idle_by_the_reactors_clock() -> None:
    """
    After a 101 the tunnel is a session like a TCP one: idle_timeout counts on
    the injected reactor's clock (a Clock here, no wall time), and bytes
    either way are activity.
    """
    reactor, channel, transport = make(idle_timeout=10)
    sessions = channel.site.routes.sessions  # type: ignore[attr-defined]
    channel.dataReceived(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    backend = connect_backend(reactor)
    backend.protocol.dataReceived(  # type: ignore[attr-defined]
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    (session,) = sessions.live
    transport.clear()
    backend.clear()
    closes_when_idle(reactor, channel.dataReceived, backend.protocol.dataReceived,  # type: ignore[attr-defined]
                     transport, backend, session)


# -- Deadline: one timer a connection, moved by writing a time --------------------------------------


def test_a_deadline_moved_later_schedules_no_new_timer_and_fires_at_the_last_time() -> None:
    clock = MemoryReactorClock()
    deadline = Deadline(clock)  # type: ignore[arg-type]
    fired: list[str] = []
    deadline.set(5, lambda: fired.append("first"), "channel")
    clock.advance(1)
    deadline.set(5, lambda: fired.append("second"), "channel")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4)  # the timer's time, not the deadline's: it sleeps again
    assert fired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0.999)
    assert fired == []
    clock.advance(0.001)
    assert fired == ["second"] and not clock.getDelayedCalls()


def test_a_sooner_deadline_moves_the_timer() -> None:
    clock = MemoryReactorClock()
    deadline = Deadline(clock)  # type: ignore[arg-type]
    fired: list[str] = []
    deadline.set(10, lambda: fired.append("head"), "channel")
    deadline.set(2, lambda: fired.append("answer"), "exchange")
    clock.advance(2)
    assert fired == ["answer"]


def test_only_the_owner_clears_and_stop_cancels() -> None:
    clock = MemoryReactorClock()
    deadline = Deadline(clock)  # type: ignore[arg-type]
    fired: list[str] = []
    deadline.set(3, lambda: fired.append("head"), "channel")
    deadline.clear("exchange")
    assert deadline.when is not None
    deadline.clear("channel")
    clock.advance(3)
    assert fired == [] and not clock.getDelayedCalls()  # found nothing, and did not re-arm
    deadline.set(3, lambda: fired.append("again"), "channel")
    deadline.stop()
    assert not clock.getDelayedCalls() and deadline.when is None
    clock.advance(10)
    assert fired == []


def test_keep_alive_requests_schedule_no_timer_each() -> None:
    """A hundred requests on one connection: one timer scheduled in all (the connection's), none cancelled."""
    clock = MemoryReactorClock()
    scheduled: list[float] = []
    call_later = clock.callLater

    def counted(delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        scheduled.append(delay)
        return call_later(delay, f, *args, **kwargs)

    clock.callLater = counted  # type: ignore[method-assign]
    channel = Channel(_NoBackend(Sessions(clock).stats), clock)  # type: ignore[arg-type]
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    for _ in range(100):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 204 ") == 100
    assert scheduled == [10.0]


class _NoBackend:
    """A site answering every request itself, at once: only the channel's own timers are left to count."""

    header_timeout = 10.0
    max_header_size = 65536

    def __init__(self, stats: object):
        self.stats = stats

    def handler(self, channel: Channel, request: object) -> Fixed:
        return Fixed(lambda: (channel.respond(204, [], length=0), channel.finish()))


def test_a_closed_connection_and_its_backend_connection_are_freed_by_reference_counting() -> None:
    # A parser holds its connection's callbacks: left in place after the
    # close, each connection and its requests waited for the cyclic collector.
    with left_to_the_collector(Channel, Upstream) as left:
        reactor, channel, transport = make()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = connect_backend(reactor)
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]
        assert transport.value().endswith(b"\r\n\r\nok")
        backend.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        del backend.protocol  # type: ignore[attr-defined]  # as Twisted's transports let go of theirs
        channel.connectionLost()
        del reactor, channel, transport, backend
    assert left == []


def gated_channel(header_timeout: float = 30) -> tuple[MemoryReactorClock, Any, StringTransport, Any]:
    """A trusted client of a project's HTTP port that receives the PROXY protocol (PROXY header_timeout 5 s)."""
    reactor = MemoryReactorClock()
    project = parse_project({"name": "api", "backend": "tcp:127.0.0.1:3001", "listen": {"port": 3000},
                             "header_timeout": header_timeout})
    route = HTTPRoute(reactor, HTTPRoutes(reactor, Sessions(reactor)), project)
    gate = ProxyGate(route, ProxyProtocol((ipaddress.ip_network("127.0.0.1/32"),), 5.0), reactor)
    channel = gate.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    channel.makeConnection(transport)
    return reactor, gate, transport, channel


def test_a_channel_reads_a_header_in_single_bytes_then_waits_for_the_head_by_its_own_timeout() -> None:
    reactor, gate, transport, channel = gated_channel(header_timeout=30)
    for byte in header("v2", ("203.0.113.7", 40001), ("127.0.0.1", 3000)):
        assert channel.header is not None and channel.header.waiting
        channel.dataReceived(bytes([byte]))
    assert channel.header is None and channel.client == "203.0.113.7"
    assert transport.client == ("203.0.113.7", 40001)  # the transport names the header's source now
    reactor.advance(5.1)  # the PROXY header's timeout: over, it was read
    assert not transport.disconnecting
    reactor.advance(24.8)
    assert not transport.disconnecting
    reactor.advance(0.2)  # the request head's, counted from the header: 30 s
    assert transport.disconnecting and not gate.refused


def test_a_channels_header_reader_has_what_every_reader_of_first_bytes_has() -> None:
    """
    HeaderFirst sets what FirstBytes and the gate's readers set in one
    __init__ of its own: should they gain a field, it has it too.
    """
    _, gate, transport, channel = gated_channel()
    reader = HeaderReader(gate, IPv4Address("TCP", "127.0.0.1", 50001))
    assert set(vars(reader)) <= set(vars(channel.header)), set(vars(reader)) - set(vars(channel.header))
    assert channel.header.waiting and not channel.header.whole
    channel.dataReceived(b"PROXY TCP4 nonsense\r\n")
    assert channel.header is None and transport.disconnecting and gate.refused == 1


def test_a_channel_whose_header_does_not_come_is_refused_at_the_proxy_header_timeout() -> None:
    reactor, gate, transport, channel = gated_channel(header_timeout=30)
    channel.dataReceived(b"PROXY TCP4 203.0")
    reactor.advance(4.9)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting and gate.refused == 1
    channel.drain()  # a drain after the refusal refuses nothing more
    assert gate.refused == 1


class Writes(StringTransport):
    """A backend transport that counts its writes."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def test_a_header_sent_to_the_backend_goes_with_the_request_head_in_one_write() -> None:
    reactor = MemoryReactorClock()
    project = parse_project({"name": "api", "backend": "tcp:127.0.0.1:3001", "listen": {"port": 3000},
                             "send_proxy": "v1"})
    channel = Channel(ProjectSite(HTTPRoutes(reactor, Sessions(reactor)), project), reactor)
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.7", 40001),
                                           hostAddress=IPv4Address("TCP", "127.0.0.1", 3000)))
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    protocol = reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 3001))
    backend = Writes()
    protocol.makeConnection(backend)
    assert backend.writes == 1
    assert backend.value().startswith(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 3000\r\nGET /x HTTP/1.1\r\n")


# -- backend connections made as the direct TCP path makes them (Pool._connect_directly) ----------------


def pool_to(backend: str) -> Pool:
    project = parse_project({"name": "api", "backend": backend, "listen": {"port": 3000}})
    return Pool(cast(Any, reactor), project)


@pytest_twisted.ensureDeferred
async def test_a_backend_on_this_host_is_connected_directly_and_one_refusing_says_so() -> None:
    server = ThreadServer(lambda conn: conn.recv(100))
    pool = pool_to(server.address)
    try:
        upstream = await pool.connect(10)
        assert isinstance(upstream.transport, tcp.Server)  # no client endpoint, connector or timeout
        assert upstream.transport.getPeer().port == server.sock.getsockname()[1]
        assert pool.opened == 1 and pool.direct is not None
        upstream.transport.loseConnection()
    finally:
        server.close()
    refused = pool_to(f"tcp:{LOOPBACK}:{free_port()}")
    with pytest.raises(ConnectionRefusedError):
        await refused.connect(10)
    assert refused.direct is not None  # a backend down for a while is still connected directly after


@pytest_twisted.ensureDeferred
async def test_a_connect_still_in_progress_goes_through_the_endpoint_from_then_on() -> None:
    # A listener whose accept queue is full drops further SYNs: a connect to
    # it stays in progress, as one to another host does.
    full = socket.socket()
    full.bind((LOOPBACK, 0))
    full.listen(0)
    fillers = [socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) for _ in range(3)]
    for filler in fillers:
        filler.connect_ex(full.getsockname())
    pool = pool_to(f"tcp:{LOOPBACK}:{full.getsockname()[1]}")
    try:
        attempt = pool.connect(0.2)
        assert pool.direct is None  # given up at once, never tried again
        with pytest.raises(ConnectingCancelledError):
            await attempt  # the endpoint's attempt, called off at its connect timeout
    finally:
        for sock in (full, *fillers):
            sock.close()
