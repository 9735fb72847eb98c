"""TCP route behaviour that needs a Clock: fast, in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from portrouter.config import parse_cli_route
from portrouter.model import Limits
from portrouter.sessions import Sessions
from portrouter.tcp import TCPRoute


def make_route(connect_timeout: float = 10.0) -> tuple[MemoryReactorClock, TCPRoute]:
    reactor = MemoryReactorClock()
    project = parse_cli_route(
        "tcp", "tcp:5000 -> tcp:127.0.0.1:6000", Limits(connect_timeout=connect_timeout)
    )
    return reactor, TCPRoute(reactor, project, Sessions(reactor))


def accept(route: TCPRoute) -> tuple[Any, StringTransport]:
    proto = route.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_silent_backend_closes_client_at_connect_timeout() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor, route = make_route(connect_timeout=10)
        _, transport = accept(route)
        assert transport.producerState == "paused"  # nothing is read early
        assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 6000)]
        reactor.advance(9.9)
        assert not transport.disconnecting
        reactor.advance(0.2)
        assert transport.disconnecting
        assert not route.sessions.live
    finally:
        globalLogPublisher.removeObserver(events.append)
    ended = [e for e in events if e.get("reason")]
    assert ended[-1]["reason"] == "backend did not answer within 10 s"
    assert ended[-1]["project"] == "tcp-5000"
    assert ended[-1]["peer"] == "127.0.0.1:40000"


def test_per_project_connect_timeout_is_used() -> None:
    reactor, route = make_route(connect_timeout=2.5)
    _, transport = accept(route)
    reactor.advance(2.4)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting


def test_client_leaving_before_backend_answers_cancels_the_attempt() -> None:
    reactor, route = make_route()
    proto, transport = accept(route)
    proto.connectionLost()
    assert not route.sessions.live
    # The timer was the attempt's; nothing is left scheduled to fire.
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


def test_update_swaps_backend_for_new_connections() -> None:
    reactor, route = make_route()
    other = parse_cli_route("tcp", "tcp:5000 -> tcp:127.0.0.1:7000")
    route.update(other)
    accept(route)
    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 7000)
