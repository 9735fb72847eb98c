"""
UDP route behaviour that needs a Clock: session expiry, the session bound
and its reports, the log line per session. The backend is a real socket on
127.0.0.1 (each session connects one to it); time and the listening side
are in memory.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

import portrouter.udp
from portrouter.config import parse_cli_route
from portrouter.model import Limits
from portrouter.udp import DROP_REPORT, UDPRoute
LOOPBACK = "127.0.0.1"


class DatagramTransport:
    """The listening port, in memory: what was written to whom."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((data, addr))


class Backend:
    """A real UDP socket the sessions send to; C{take} reads what arrived."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]

    def take(self) -> tuple[bytes, tuple[str, int]]:
        data, peer = self.sock.recvfrom(65535)
        return data, peer

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65535)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(10)
        return False


class Harness:
    def __init__(self, backend: Backend, **limits: Any):
        self.backend = backend
        self.reactor = MemoryReactorClock()
        project = parse_cli_route("udp", f"udp:5353 -> {LOOPBACK}:{backend.port}", Limits(**limits))
        self.route = UDPRoute(self.reactor, project)
        self.transport = DatagramTransport()
        self.route.makeConnection(self.transport)  # starts the protocol: the sweeper

    def send(self, client: tuple[str, int], data: bytes = b"q") -> None:
        """A datagram from C{client} to the listener."""
        self.route.datagramReceived(data, client)

    def reply(self, client: tuple[str, int], data: bytes = b"r") -> None:
        """A datagram from the backend to C{client}'s session."""
        self.route.sessions[client].received(data)

    def advance_to(self, when: float) -> None:
        """Move the clock to C{when}, stopping at each timer on the way so that each fires on time."""
        while True:
            now = self.reactor.seconds()
            due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.active() and c.getTime() <= when]
            if not due:
                self.reactor.advance(max(0.0, when - now))
                return
            self.reactor.advance(max(0.0, min(due) - now))

    def alive(self, client: tuple[str, int]) -> bool:
        return client in self.route.sessions


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.sock.close()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    """Harnesses made by a test; their sessions' sockets are closed afterwards."""
    made: list[Harness] = []
    yield made
    for h in made:
        h.route.close_all("test over")


@pytest.fixture
def make(backend: Backend, harnesses: list[Harness]) -> Any:
    def make(**limits: Any) -> Harness:
        h = Harness(backend, **limits)
        harnesses.append(h)
        return h

    return make


def ends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == "portrouter.udp" and "reason" in e]


A = (LOOPBACK, 40001)
B = (LOOPBACK, 40002)
C = (LOOPBACK, 40003)


def test_datagrams_go_to_the_backend_and_replies_to_their_client(make: Any, backend: Backend) -> None:
    h = make()
    h.send(A, b"from a")
    h.send(B, b"from b")
    got_a, peer_a = backend.take()
    got_b, peer_b = backend.take()
    assert (got_a, got_b) == (b"from a", b"from b")
    assert peer_a != peer_b  # a socket of its own per client
    h.reply(B, b"to b")
    h.reply(A, b"to a")
    assert h.transport.written == [(b"to b", B), (b"to a", A)]


def test_session_expires_counted_from_the_last_client_datagram(make: Any, events: list[dict[str, Any]]) -> None:
    h = make(udp_timeout=60)
    h.send(A)
    h.advance_to(30)
    h.send(A)
    h.advance_to(89.9)  # 60 s after the first datagram it is still there
    assert h.alive(A)
    h.advance_to(91.0)  # expiry is checked at least every second
    assert not h.alive(A)
    [end] = ends(events)
    assert end["reason"] == "idle for 60 s"
    assert 90 <= end["duration"] <= 91


def test_replies_alone_keep_a_session(make: Any, events: list[dict[str, Any]]) -> None:
    h = make(udp_timeout=60)
    h.send(A, b"subscribe")
    for when in (50, 100, 150):
        h.advance_to(when)
        assert h.alive(A)
        h.reply(A, b"update")
    h.advance_to(209.9)
    assert h.alive(A)
    h.advance_to(211)
    assert not h.alive(A)
    assert h.transport.written == [(b"update", A)] * 3
    [end] = ends(events)
    assert (end["datagrams_in"], end["bytes_in"], end["datagrams_out"], end["bytes_out"]) == (1, 9, 3, 18)


def test_only_idle_sessions_expire(make: Any) -> None:
    h = make(udp_timeout=10)
    h.send(A)
    h.send(B)
    h.send(C)
    h.advance_to(5)
    h.send(B)
    h.reply(C)
    h.advance_to(11)
    assert (h.alive(A), h.alive(B), h.alive(C)) == (False, True, True)
    h.advance_to(14.9)
    assert h.alive(B) and h.alive(C)
    h.advance_to(16)
    assert not h.route.sessions


def test_short_timeout_is_honoured_closely(make: Any) -> None:
    """Expiry is checked at least every timeout/4, so a 2 s timeout is not stretched to 3."""
    h = make(udp_timeout=2)
    h.send(A)
    h.advance_to(1.95)
    assert h.alive(A)
    h.advance_to(2.55)
    assert not h.alive(A)


def test_a_client_back_after_expiry_gets_a_new_session(make: Any, backend: Backend) -> None:
    h = make(udp_timeout=10)
    h.send(A, b"one")
    first = h.route.sessions[A]
    assert backend.take()[0] == b"one"
    h.advance_to(12)
    assert not h.alive(A)
    assert first.sock.fileno() == -1  # its socket was closed
    h.send(A, b"two")
    assert h.route.sessions[A] is not first
    assert backend.take()[0] == b"two"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), st.sampled_from(["client", "reply"]), st.sampled_from([A, B, C])),
                max_size=30))
def test_expiry_follows_the_last_datagram_either_way(steps: list[tuple[int, str, tuple[str, int]]]) -> None:
    """
    Whatever the traffic from several clients, each session is alive while
    its own last datagram (either way) is less than the timeout old, and gone
    one sweep after that.
    """
    timeout, sweep, step = 10.0, 1.0, 0.1
    b = Backend()
    h = Harness(b, udp_timeout=timeout)
    last: dict[tuple[str, int], float] = {}
    try:
        for tenths, kind, client in steps:
            target = h.reactor.seconds() + tenths * step
            while h.reactor.seconds() < target - 1e-9:
                h.reactor.advance(step)
                for who, when in last.items():
                    idle = h.reactor.seconds() - when
                    if idle < timeout - 1e-6:
                        assert h.alive(who), f"{who} ended after {idle:.1f} s idle"
                    elif idle > timeout + sweep + step + 1e-6:
                        assert not h.alive(who), f"{who} still there after {idle:.1f} s idle"
            if kind == "client":
                h.send(client)
            elif h.alive(client):
                h.reply(client)
            else:
                continue  # no session, no backend socket to reply from
            last[client] = h.reactor.seconds()
    finally:
        h.route.close_all("test over")
        b.sock.close()


@pytest.mark.parametrize("refresh", ["client", "reply"])
def test_traffic_on_the_oldest_session_does_not_shield_the_idle_ones(make: Any, refresh: str) -> None:
    h = make(udp_timeout=10)
    h.send(A)
    h.advance_to(1)
    h.send(B)
    h.advance_to(5)
    h.send(A) if refresh == "client" else h.reply(A)
    h.advance_to(12)
    assert (h.alive(A), h.alive(B)) == (True, False)
    h.advance_to(16)
    assert not h.route.sessions


def test_one_log_line_per_ended_session_with_its_numbers(make: Any, events: list[dict[str, Any]]) -> None:
    h = make(udp_timeout=60)
    h.advance_to(3)
    h.send(A, b"x" * 100)
    h.send(A, b"")
    h.advance_to(4)
    h.reply(A, b"y" * 7)
    h.advance_to(40)
    h.send(B, b"b")
    h.advance_to(70)
    assert not h.alive(A) and h.alive(B)
    [end] = ends(events)
    assert end["log_level"].name == "info"
    assert end["project"] == "udp-5353"
    assert end["client"] == f"{LOOPBACK}:40001"
    assert (end["datagrams_in"], end["bytes_in"]) == (2, 100)
    assert (end["datagrams_out"], end["bytes_out"]) == (1, 7)
    assert end["reason"] == "idle for 60 s"
    assert end["duration"] == 61  # from 3 to the sweep at 64, 60 s after the last datagram
    assert formatEvent(end) == (
        f"udp udp-5353 {LOOPBACK}:40001: idle for 60 s; 2 datagrams (100 bytes) in, "
        f"1 datagrams (7 bytes) out, {end['duration']:.3f} s"
    )
    h.route.doStop()  # the listener stops: B's session ends too, once
    [_, last] = ends(events)
    assert (last["client"], last["reason"]) == (f"{LOOPBACK}:40002", "listener stopped")
    assert (last["datagrams_in"], last["bytes_in"], last["datagrams_out"], last["bytes_out"]) == (1, 1, 0, 0)
    assert not h.route.sessions
    assert not [c for c in h.reactor.getDelayedCalls() if c.active()]  # no sweeper left
    assert not h.reactor.readers
    h.route.close_all("again")
    assert len(ends(events)) == 2


def test_past_the_bound_new_clients_are_dropped_and_counted(make: Any, backend: Backend) -> None:
    h = make(udp_max_sessions=2)
    h.send(A, b"a1")
    h.send(B, b"b1")
    h.send(C, b"c1")
    h.send(C, b"c2")
    assert h.route.dropped == 2
    assert set(h.route.sessions) == {A, B}
    # The existing sessions keep working both ways.
    h.send(A, b"a2")
    h.send(B, b"b2")
    assert sorted(backend.take()[0] for _ in range(4)) == [b"a1", b"a2", b"b1", b"b2"]
    assert backend.nothing_waiting()  # nothing of C's reached the backend
    h.reply(A, b"ra")
    assert h.transport.written == [(b"ra", A)]
    assert h.route.sessions[A].datagrams_in == 2


def test_a_slot_freed_by_expiry_lets_a_new_client_in(make: Any) -> None:
    h = make(udp_max_sessions=2, udp_timeout=10)
    h.send(A)
    h.advance_to(5)
    h.send(B)
    h.send(C)
    assert h.route.dropped == 1
    h.advance_to(11)  # A expires, B does not
    h.send(C)
    assert set(h.route.sessions) == {B, C}
    assert h.route.dropped == 1


def said_again_past_the_interval(h: Any, reports: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
    """
    After a first drop line: a new client dropped just within DROP_REPORT is
    counted, not said; one just past it is said. That second line.
    """
    h.advance_to(DROP_REPORT - 0.5)
    h.send((LOOPBACK, 60000))
    assert len(reports()) == 1  # within the interval: counted, not said
    h.advance_to(DROP_REPORT + 0.5)
    h.send((LOOPBACK, 60001))
    [_, second] = reports()
    return second


def test_drop_reports_are_rate_limited(make: Any, events: list[dict[str, Any]]) -> None:
    h = make(udp_max_sessions=1, udp_timeout=1000)
    h.send(A)

    def reports() -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_namespace") == "portrouter.udp" and "limit" in e]

    for i in range(500):  # a flood from new clients
        h.send((LOOPBACK, 50000 + i))
    assert h.route.dropped == 500
    [first] = reports()
    assert (first["limit"], first["count"], first["log_level"].name) == (1, 1, "warn")
    assert formatEvent(first) == "udp udp-5353: 1 sessions open; dropped 1 datagrams from new clients"
    second = said_again_past_the_interval(h, reports)
    assert second["count"] == 501  # every drop since the last report
    assert h.route.dropped == 502
    for i in range(1000):
        h.send((LOOPBACK, 61000 + i))
    assert len(reports()) == 2
    assert set(h.route.sessions) == {A}


def test_drops_for_want_of_a_backend_socket_are_said_at_most_once_per_interval_with_their_count(
        make: Any, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """README ("Out of file descriptors"): a UDP route out of sockets says so at most every 10 s, with the count."""
    h = make(udp_timeout=1000)

    def no_socket(*args: Any) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(portrouter.udp.socket, "socket", no_socket)

    def reports() -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_namespace") == "portrouter.udp" and "why" in e]

    for i in range(3):
        h.send((LOOPBACK, 50000 + i))
    [first] = reports()
    assert formatEvent(first) == ("udp udp-5353: cannot open a socket to the backend: [Errno 24] Too many open "
                                  "files; dropped 1 datagrams from new clients")
    second = said_again_past_the_interval(h, reports)
    assert second["count"] == 4  # every drop since it was last said
    assert h.route.dropped == 5 and not h.route.sessions


def test_empty_datagram_opens_a_session_and_is_forwarded(make: Any, backend: Backend) -> None:
    h = make()
    h.send(A, b"")
    assert backend.take() == (b"", h.route.sessions[A].sock.getsockname())
    session = h.route.sessions[A]
    assert (session.datagrams_in, session.bytes_in) == (1, 0)
    h.reply(A, b"")
    assert h.transport.written == [(b"", A)]


# -- polling instead of sleeping after a datagram (udp_busy_poll) -------------------------


def polling(h: Harness) -> bool:
    """Whether a call is due at once: the reactor would poll rather than sleep."""
    now = h.reactor.seconds()
    return any(c.active() and c.getTime() <= now for c in h.reactor.getDelayedCalls())


def turn(h: Harness, dt: float) -> None:
    """
    One turn of a real reactor, C{dt} after the last: the calls due run once,
    and calls they make wait for the next turn (a Clock would run those in
    the same turn).
    """
    h.reactor.rightNow += dt
    due = [c for c in h.reactor.getDelayedCalls() if c.active() and c.getTime() <= h.reactor.rightNow]
    for call in due:
        h.reactor.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def test_close_datagrams_keep_the_reactor_polling_for_the_window(make: Any) -> None:
    h = make(udp_busy_poll=0.0001)
    h.send(A)
    assert not polling(h)  # one datagram says nothing about the next
    h.advance_to(0.00005)
    h.reply(A)  # 50 us later: it would have been caught awake
    assert polling(h)
    assert h.route._window == pytest.approx(0.0001 / 8)
    for i in range(1, 5):
        h.advance_to(0.00005 + i * 0.00001)
        h.send(A) if i % 2 else h.reply(A)
    assert h.route._window == pytest.approx(0.0001)  # doubled per close datagram, up to the limit
    turns = 0
    while polling(h):
        turn(h, 0.00001)  # each turn of the reactor asks for the next
        turns += 1
    assert turns == 10  # until 100 us after the last datagram: then the reactor may sleep again
    assert h.reactor.seconds() == pytest.approx(0.00009 + 0.0001)


def test_sparse_datagrams_never_poll(make: Any) -> None:
    h = make(udp_busy_poll=0.0001)
    for i in range(20):
        h.advance_to(i * 0.001)  # one datagram a millisecond, each way
        h.send(A) if i % 2 else h.reply(A) if i else h.send(A)
        assert not polling(h)
    assert h.route._window == 0


def test_a_window_that_stops_paying_off_shrinks_to_nothing(make: Any) -> None:
    h = make(udp_busy_poll=0.0001)
    h.send(A)
    for i in range(1, 10):
        h.advance_to(i * 0.00001)
        h.send(A)
    assert h.route._window == pytest.approx(0.0001)
    windows = []
    for i in range(1, 10):
        h.advance_to(0.0001 + i * 0.01)  # now far apart
        h.send(A)
        windows.append(h.route._window)
    assert windows[:6] == pytest.approx([0.0001 / 2 ** k for k in range(1, 7)])
    assert windows[6:] == [0, 0, 0]
    assert not polling(h)


def test_busy_poll_zero_turns_polling_off(make: Any) -> None:
    h = make(udp_busy_poll=0)
    h.send(A)
    h.reply(A)
    h.send(A)  # no time between them at all
    assert not polling(h)


@pytest.fixture
def polling_route(make: Any) -> Harness:
    """A route whose last two datagrams came together: the reactor is polling."""
    h: Harness = make(udp_busy_poll=0.0001)
    h.send(A)
    h.send(A)
    assert polling(h)
    return h


def test_a_clock_that_does_not_move_ends_the_polling(polling_route: Harness) -> None:
    polling_route.reactor.advance(0)  # would never return if each turn asked for another
    assert not polling(polling_route)


def test_stopping_the_route_cancels_the_polling(polling_route: Harness) -> None:
    polling_route.route.doStop()
    assert polling_route.reactor.getDelayedCalls() == []


def test_busy_routes_share_one_call_and_the_last_to_stop_ends_it(polling_route: Harness) -> None:
    h = polling_route
    other = UDPRoute(h.reactor, parse_cli_route("udp", f"udp:5354 -> {LOOPBACK}:{h.backend.port}",
                                                Limits(udp_busy_poll=0.0001)))
    other.makeConnection(DatagramTransport())
    try:
        other.datagramReceived(b"q", B)
        other.datagramReceived(b"q", B)
        due = [c for c in h.reactor.getDelayedCalls() if c.getTime() <= h.reactor.seconds()]
        assert len(due) == 1  # one reactor, one poll
        h.route.doStop()
        assert polling(h)  # the other route still wants it
        other.doStop()
        assert not polling(h)
    finally:
        other.close_all("test over")


def test_a_reload_that_turns_polling_off_stops_it_at_once(polling_route: Harness) -> None:
    h = polling_route
    project = parse_cli_route("udp", f"udp:5353 -> {LOOPBACK}:{h.backend.port}", Limits(udp_busy_poll=0))
    h.route.update(project)
    assert h.route._window == 0
    turn(h, 0.00001)  # the turn already asked for finds no window open
    assert not polling(h)
    h.send(A)
    h.send(A)
    assert not polling(h)
