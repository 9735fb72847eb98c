"""HTTP proxy behaviour that needs a Clock or exact bytes: in memory, fast."""

from __future__ import annotations


from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from portrouter.config import parse_project
from portrouter.http import HTTPRoutes, ProjectSite, normalize
from portrouter.sessions import Sessions
from portrouter.web import Channel
from tests.support import closes_when_idle


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
