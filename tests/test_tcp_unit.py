"""TCP route behaviour that needs a Clock: fast, in memory."""

from __future__ import annotations

import _socket
import errno
import ipaddress
import re
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from twisted.internet.address import IPv4Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from portrouter.config import parse_cli_route
from portrouter.eventloop import lean_dispatch
from portrouter.model import Limits
from portrouter.relay import ConnectDeadlines, SpliceRelay, _Direction, _End
from portrouter.sessions import Sessions
from portrouter import tcp
from portrouter.model import ProxyProtocol
from portrouter.proxyheader import header
from portrouter.proxyproto import ProxyGate
from portrouter.tcp import TCPRoute, bound_address
from tests.support import in_thread, left_to_the_collector, wait_for


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


# -- the relay's start: the client's first bytes read at once, sent with what precedes them -------


def relay_pair() -> tuple[SpliceRelay, socket.socket, socket.socket, Sessions]:
    """A relay between two socket pairs (our ends non-blocking, as the direct path makes them)."""
    client_ours, client = socket.socketpair()
    backend_ours, backend = socket.socketpair()
    for sock in (client_ours, backend_ours):
        sock.setblocking(False)
    for sock in (client, backend):
        sock.settimeout(30)
    sessions = Sessions(reactor)  # type: ignore[arg-type]
    session = sessions.open("tcp", "unit", "client")
    return SpliceRelay(reactor, session, client_ours, backend_ours), client, backend, sessions  # type: ignore[arg-type]


def read_all(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


@pytest_twisted.ensureDeferred
async def test_bytes_that_came_while_connecting_go_with_the_header_in_one_send() -> None:
    relay, client, backend, sessions = relay_pair()
    client.sendall(b"hello")
    client.shutdown(socket.SHUT_WR)
    relay.start(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n", 0)
    assert backend.recv(65536) == b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello"  # one send, one read
    assert await in_thread(read_all, backend) == b""  # the client's FIN came on
    backend.sendall(b"reply")
    backend.close()
    assert await in_thread(read_all, client) == b"reply"
    await wait_for(lambda: not sessions.live, 15, "the session to end")
    ended = relay.session
    assert (ended.bytes_in, ended.bytes_out, ended.reason) == (5, 5, "client closed")
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_client_gone_before_the_backend_answered_is_a_fin_to_it() -> None:
    relay, client, backend, sessions = relay_pair()
    client.shutdown(socket.SHUT_WR)
    relay.start()
    assert await in_thread(read_all, backend) == b""
    backend.sendall(b"bye")
    backend.close()
    assert await in_thread(read_all, client) == b"bye"
    await wait_for(lambda: not sessions.live, 15, "the session to end")
    assert relay.session.reason == "client closed"
    client.close()


@pytest_twisted.ensureDeferred
async def test_an_ended_relay_is_freed_by_reference_counting_not_left_to_the_cyclic_collector() -> None:
    # The relay, its ends and directions point at one another; left as
    # cycles, each connection cost the collector 5 us. Collected garbage is
    # kept (DEBUG_SAVEALL) to see whether any of them needed the collector.
    with left_to_the_collector(SpliceRelay, _End, _Direction) as left:
        relay, client, backend, sessions = relay_pair()
        relay.start()
        client.sendall(b"ping")
        assert await in_thread(backend.recv, 4) == b"ping"
        client.close()
        backend.close()
        await wait_for(lambda: not sessions.live, 15, "the session to end")
        assert relay.closed
        del relay
    assert left == []


@pytest_twisted.ensureDeferred
async def test_a_stopping_reactor_may_still_tell_an_ended_relays_ends_their_connection_is_lost() -> None:
    # Twisted's disconnectAll takes all its descriptors first, then tells
    # each: the first end's news closes the relay, the second's must not fail.
    relay, client, backend, sessions = relay_pair()
    relay.start()
    ends = (relay.client, relay.backend)
    ends[0].connectionLost(Failure(ConnectionDone()))
    assert relay.closed and not sessions.live
    for end in ends:
        end.connectionLost(Failure(ConnectionDone()))
        end.doRead()
        end.doWrite()
    assert relay.session.reason == "client error: Connection was closed cleanly."
    client.close()
    backend.close()


class Waiting:
    """A relay as ConnectDeadlines sees it: told when its connect timed out."""

    def __init__(self, clock: Clock, name: str, said: list[tuple[str, float, float]]):
        self.clock, self.name, self.said = clock, name, said

    def connect_timed_out(self, timeout: float) -> None:
        self.said.append((self.name, timeout, self.clock.seconds()))


def test_connect_deadlines_time_each_relay_out_at_its_own_deadline_with_one_timer() -> None:
    clock = Clock()
    deadlines = ConnectDeadlines(clock)  # type: ignore[arg-type]
    said: list[tuple[str, float, float]] = []
    one, two, three, four = (Waiting(clock, n, said) for n in ("one", "two", "three", "four"))
    deadlines.add(one, 10.0)  # type: ignore[arg-type]
    clock.advance(1)
    deadlines.add(two, 10.0)  # type: ignore[arg-type]
    clock.advance(0.5)
    deadlines.add(three, 2.0)  # type: ignore[arg-type]  # due before any other: the timer moves up
    deadlines.add(four, 10.0)  # type: ignore[arg-type]
    assert len(clock.getDelayedCalls()) == 1
    for step in range(21):  # to t=12, half a second at a time
        if step == 7:  # t=5: two's backend answers
            deadlines.remove(two, 10.0)  # type: ignore[arg-type]
        clock.advance(0.5)
        assert len(clock.getDelayedCalls()) <= 1
    assert said == [("three", 2.0, 3.5), ("one", 10.0, 10.0), ("four", 10.0, 11.5)]
    assert clock.getDelayedCalls() == [] and deadlines.waiting == {}  # nothing left waiting: no timer


def test_a_direct_relay_whose_backend_never_answers_closes_the_client_at_connect_timeout() -> None:
    clock = MemoryReactorClock()
    sessions = Sessions(clock)
    deadlines = ConnectDeadlines(clock)
    # A listener whose accept queue is full drops further SYNs: a connect to
    # it stays in progress (and the memory reactor never says it is writable).
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) for _ in range(3)]
    for filler in fillers:
        filler.connect_ex(full.getsockname())
    client, client_ours = socket.socketpair()
    client.settimeout(30)
    client_ours.setblocking(False)
    backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    session = sessions.open("tcp", "slow", "127.0.0.1:1")
    relay = SpliceRelay(clock, session, client_ours, backend)  # type: ignore[arg-type]
    try:
        relay.connect(full.getsockname(), 3.0, deadlines)
        assert relay.connecting is deadlines and session.reason is None
        clock.advance(2.9)
        assert not relay.closed
        clock.advance(0.1)
        assert relay.closed and session.reason == "backend did not answer within 3 s"
        assert client.recv(10) == b""  # the client sees a plain close
        assert deadlines.waiting == {} and clock.getDelayedCalls() == []
    finally:
        for s in (full, client, *fillers):
            s.close()


class Connecting:
    """
    A backend socket (one end of a socket pair) whose non-blocking connect
    says EINPROGRESS, and whose handshake is done by then (C{done}) or not:
    what the kernel does to a loopback backend is not left to its timing.
    """

    def __init__(self, sock: socket.socket, done: bool):
        self.sock = sock
        self.done = done

    def connect_ex(self, address: Any) -> int:
        return errno.EINPROGRESS

    def getpeername(self) -> Any:
        if not self.done:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return ("127.0.0.1", 1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


@pytest.mark.parametrize("done", [True, False])
def test_a_direct_relay_starts_at_once_when_the_backend_is_connected_as_connect_returns(done: bool) -> None:
    """
    To a backend on this host the handshake is done when connect returns
    EINPROGRESS (getpeername tells): the relay starts at once, client and
    backend read, with no wait for writable and no connect deadline, and the
    client's bytes go out. Otherwise it waits for the backend to be writable
    within its deadline, as before.
    """
    clock = MemoryReactorClock()
    sessions = Sessions(clock)
    deadlines = ConnectDeadlines(clock)
    client, client_ours = socket.socketpair()
    backend_ours, backend = socket.socketpair()
    for sock in (client, backend):
        sock.settimeout(30)
    for sock in (client_ours, backend_ours):
        sock.setblocking(False)
    client.sendall(b"first")
    relay = SpliceRelay(clock, sessions.open("tcp", "quick", "127.0.0.1:1"), client_ours,  # type: ignore[arg-type]
                        Connecting(backend_ours, done))  # type: ignore[arg-type]
    try:
        relay.connect(("127.0.0.1", 1), 3.0, deadlines)
        if done:
            assert relay.connecting is None and len(deadlines) == 0 and clock.getDelayedCalls() == []
            assert {relay.client, relay.backend} <= clock.readers and not clock.writers
            assert backend.recv(10) == b"first"
        else:
            assert relay.connecting is deadlines and len(deadlines) == 1
            assert clock.writers == {relay.backend} and not clock.readers
    finally:
        relay.close()
        for sock in (client, backend):
            sock.close()


@pytest.mark.parametrize("family, address, bound", [
    (socket.AF_INET, "127.0.0.1", True),
    (socket.AF_INET, "0.0.0.0", False),
    (socket.AF_INET6, "::1", True),
    (socket.AF_INET6, "::", False),
    (socket.AF_INET6, "::ffff:0.0.0.0", False),
])
def test_the_bound_address_of_a_listener_names_every_connections_destination(
        family: socket.AddressFamily, address: str, bound: bool) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as listening:
        listening.bind((address, 0))
        listening.listen()
        expected = (address, listening.getsockname()[1]) if bound else None
        assert bound_address(listening) == expected
        if bound:
            with socket.create_connection(listening.getsockname()[:2]) as client:
                accepted, _ = listening.accept()
                assert accepted.getsockname()[:2] == expected  # what a getsockname per connection said
                accepted.close()
                client.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert bound_address(unix) is None


@pytest.mark.parametrize("error", [OSError(errno.EMFILE, "Too many open files"), RuntimeError("a bug")],
                         ids=["out of descriptors", "a bug"])
def test_a_trusted_client_whose_first_look_fails_is_closed_and_the_others_go_on(
        error: Exception, no_tracebacks: list[dict[str, Any]]) -> None:
    reactor, route = make_route()
    gate = ProxyGate(route, ProxyProtocol((ipaddress.ip_network("127.0.0.1/32"),), 5.0), reactor)
    pairs = [socket.socketpair() for _ in range(2)]
    taken: list[tuple[Any, ...]] = []
    lines: list[dict[str, Any]] = []

    def accept_socket(sock: Any, address: tuple[Any, ...], *rest: Any) -> None:
        if not taken and address[1] == 40001:
            taken.append(("failed",))
            raise error
        taken.append(address)

    route.accept_socket = accept_socket  # type: ignore[method-assign]
    for port, (ours, theirs) in enumerate(pairs, 40001):
        theirs.settimeout(30)
        theirs.sendall(header("v2", ("203.0.113.7", port), ("127.0.0.1", 5000)) + b"hi")
        route.look_later(gate, _socket.socket(fileno=ours.detach()), ("127.0.0.1", port))
    globalLogPublisher.addObserver(lines.append)
    try:
        reactor.advance(0)  # the round's end (a turn, on a memory reactor): both are looked at
    finally:
        globalLogPublisher.removeObserver(lines.append)
    assert taken == [("failed",), ("127.0.0.1", 40002)]
    assert pairs[0][1].recv(10) == b""  # closed
    if isinstance(error, OSError):
        # Said as the direct path says it, with no traceback.
        assert [formatEvent(e) for e in lines if e.get("log_namespace") == "portrouter.tcp"] == [
            "tcp tcp-5000 127.0.0.1:40001: closed, no descriptor for its backend connection"]
    else:
        [failed] = [e for e in no_tracebacks if "first look failed" in e.get("log_format", "")]
        assert failed["log_failure"].getErrorMessage() == "a bug"
        no_tracebacks.clear()
    for _, theirs in pairs:
        theirs.close()


class Listening:
    """A listening socket as the direct accept loop uses it, whose accepts give what the test lists."""

    family = socket.AF_INET

    def __init__(self, results: list[Any]):
        self.results = results

    def _accept(self) -> tuple[int, tuple[str, int]]:
        result = self.results.pop(0) if self.results else BlockingIOError()
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    def setsockopt(self, *args: Any) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 5000)


class ListeningPort:
    """What the direct accept loop needs of Twisted's port: its factory, socket, and reading on and off."""

    def __init__(self, factory: Any, results: list[Any]):
        self.factory = factory
        self.socket = Listening(results)
        self.reading = True
        self.connected = True
        self.disconnecting = False

    def doRead(self) -> None:
        raise AssertionError("the direct route's clients are not Twisted's to accept")

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_out_of_descriptors_a_listener_pauses_says_so_once_and_not_after_it_stopped() -> None:
    reactor, route = make_route()
    emfile = OSError(errno.EMFILE, "Too many open files")
    port = ListeningPort(route, [emfile, emfile])
    taken: list[tuple[Any, ...]] = []
    route.accept_socket = lambda sock, address, **kw: taken.append(address)  # type: ignore[method-assign]
    tcp.accept_directly(port, reactor, "tcp route tcp-5000")  # type: ignore[arg-type]
    lines: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        port.doRead()
        assert not port.reading and reactor.getDelayedCalls()[0].getTime() == tcp.OUT_OF_DESCRIPTORS_PAUSE
        reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
        assert port.reading
        port.doRead()  # still out: paused again, nothing said again
        assert not port.reading
        reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
        pair = socket.socketpair()
        port.socket.results.append((pair[0].detach(), ("127.0.0.1", 40001)))
        port.doRead()
        assert taken == [("127.0.0.1", 40001)] and port.reading
        port.socket.results.append(emfile)
        port.doRead()
        port.disconnecting = True  # the route's port stopped while paused: it stays stopped
        reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
        assert not port.reading
    finally:
        globalLogPublisher.removeObserver(lines.append)
    said = [formatEvent(e) for e in lines if e.get("log_namespace") == "portrouter.tcp"]
    out = ("tcp route tcp-5000: out of descriptors (Too many open files): not accepting, tried again every 0.1 s; "
           "clients wait in the listen queue meanwhile")
    assert said == [
        out,
        "tcp route tcp-5000: accepting again, after 0.2 s out of descriptors; "
        "clients accepted meanwhile and closed, with none for their backend: 0",
        out,
    ]
    pair[1].close()


def direct_listener(loop: Any, backend: socket.socket,
                    clients: int) -> tuple[Sessions, ListeningPort, list[socket.socket]]:
    """
    A direct TCP route to C{backend} (listening), its accept loop on a port
    where C{clients} wait: its sessions, the port, and the clients' ends.
    """
    backend.bind(("127.0.0.1", 0))
    backend.listen()
    backend.settimeout(30)
    project = parse_cli_route("tcp", f"tcp:5000 -> tcp:127.0.0.1:{backend.getsockname()[1]}", Limits())
    sessions = Sessions(loop)
    pairs = [socket.socketpair() for _ in range(clients)]
    for _, theirs in pairs:
        theirs.settimeout(30)
    port = ListeningPort(TCPRoute(loop, project, sessions),
                         [(ours.detach(), ("127.0.0.1", 40001 + i)) for i, (ours, _) in enumerate(pairs)])
    tcp.accept_directly(port, loop, "tcp route tcp-5000")  # type: ignore[arg-type]
    return sessions, port, [theirs for _, theirs in pairs]


def close_loop(loop: EPollReactor) -> None:
    """A reactor made for one test, never run: its epoll and waker descriptors closed."""
    loop.removeAll()
    loop._poller.close()
    if loop.waker is not None:
        loop.waker.connectionLost(None)


class Trigger:
    """A reader that, read in a round of the lean poll, calls C{work} (a listener's accept, say)."""

    def __init__(self, work: Any):
        self.mine, self.theirs = socket.socketpair()
        self.work = work

    def fileno(self) -> int:
        return self.mine.fileno()

    def doRead(self) -> None:
        self.mine.recv(10)
        self.work()

    def logPrefix(self) -> str:
        return "trigger"

    def close(self) -> None:
        self.mine.close()
        self.theirs.close()


def test_in_the_daemons_loop_a_round_of_accepts_connects_every_backend_before_any_relay_starts() -> None:
    """
    Under the daemon's lean poll, one round of a listener's accepts connects
    every client's backend; the relays start (their first bytes sent) once
    the round is handled, so that the backend's process is woken once for
    them all. A relay closed in between (drained, the router stopping) is
    not started. (Elsewhere a relay starts as it connects: the memory
    reactor's tests above and below.) A loopback connect is done when
    connect() returns, as the direct path expects.
    """
    loop = EPollReactor()  # not installed: driven by hand, one round at a time
    assert lean_dispatch(loop)
    with socket.socket() as backend:
        sessions, port, clients = direct_listener(loop, backend, 3)
        for i, client in enumerate(clients):
            if i != 1:  # the one closed early says nothing: unread bytes would make its close a reset
                client.sendall(b"hello %d" % i)
        seen: dict[str, int] = {}

        def accept() -> None:
            port.doRead()
            seen["live"], seen["watched"] = len(sessions.live), len(loop._reads) - watched
            next(s for s in sessions.live if s.peer == "127.0.0.1:40002").close()

        trigger = Trigger(accept)
        loop.addReader(trigger)
        watched = len(loop._reads)  # the trigger and the reactor's waker
        try:
            trigger.theirs.send(b"x")
            loop.doIteration(0)
            assert seen == {"live": 3, "watched": 0}  # all connected, none started
            assert len(sessions.live) == 2 and len(loop._reads) == watched + 4
            conns = [backend.accept()[0] for _ in clients]
            for conn in conns:
                conn.settimeout(30)
            assert sorted(conn.recv(100) for conn in conns) == [b"", b"hello 0", b"hello 2"]
            assert clients[1].recv(10) == b""  # closed before it started: a FIN, and nothing for its backend
            for session in list(sessions.live):
                session.close()
            for conn in conns:
                conn.close()
        finally:
            loop.removeReader(trigger)
            trigger.close()
            for client in clients:
                client.close()
            close_loop(loop)


def test_a_relay_that_fails_as_it_starts_after_the_round_is_closed_whole(
        monkeypatch: pytest.MonkeyPatch, no_tracebacks: list[dict[str, Any]]) -> None:
    """
    A relay started at the end of a round of the lean poll that fails (the
    epoll set full, say) leaves nothing behind, its session saying why, and
    the other relays of the round start.
    """
    loop = EPollReactor()
    lean_dispatch(loop)
    starts = 0
    start = SpliceRelay.start

    def first_fails(relay: SpliceRelay, *args: Any) -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        start(relay, *args)

    monkeypatch.setattr(SpliceRelay, "start", first_fails)
    with socket.socket() as backend:
        sessions, port, clients = direct_listener(loop, backend, 2)
        trigger = Trigger(port.doRead)
        loop.addReader(trigger)
        watched = len(loop._reads)
        lines: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(lines.append)
        try:
            trigger.theirs.send(b"x")
            loop.doIteration(0)
            assert [s.peer for s in sessions.live] == ["127.0.0.1:40002"] and len(loop._reads) == watched + 2
            assert clients[0].recv(10) == b""  # closed
            # The real reactor's clock: the session's duration is whatever the round took.
            said = [re.sub(r"\d+\.\d{3} s$", "N s", formatEvent(e)) for e in lines]
            assert said == ["tcp tcp-5000 127.0.0.1:40001: portrouter could not relay it: [Errno 28] No space "
                            "left on device; 0 bytes in, 0 bytes out, N s",
                            "tcp tcp-5000 127.0.0.1:40001: could not be relayed; closed"], said
            failed = [e["log_failure"].getErrorMessage() for e in no_tracebacks if "log_failure" in e]
            assert failed == ["[Errno 28] No space left on device"]  # with its traceback, once
            no_tracebacks.clear()
            for session in list(sessions.live):
                session.close()
        finally:
            globalLogPublisher.removeObserver(lines.append)
            loop.removeReader(trigger)
            trigger.close()
            for client in clients:
                client.close()
            close_loop(loop)


class NoRoomReactor(MemoryReactorClock):
    """A reactor whose epoll set has no room for another reader (max_user_watches reached, say)."""

    def addReader(self, reader: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_relay_that_cannot_be_watched_is_closed_whole_and_the_next_client_is_taken(
        no_tracebacks: list[dict[str, Any]]) -> None:
    """
    A relay half made (its backend connected, the reactor refusing to watch
    it) leaves nothing behind: both sockets closed, its session ended with
    the reason, nothing registered; the accept loop goes on with the next
    client, and the listener is not lost.
    """
    reactor = NoRoomReactor()
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        project = parse_cli_route("tcp", f"tcp:5000 -> tcp:127.0.0.1:{backend.getsockname()[1]}", Limits())
        sessions = Sessions(reactor)
        route = TCPRoute(reactor, project, sessions)
        pairs = [socket.socketpair() for _ in range(2)]
        port = ListeningPort(route, [(ours.detach(), ("127.0.0.1", 40001 + i)) for i, (ours, _) in enumerate(pairs)])
        tcp.accept_directly(port, reactor, "tcp route tcp-5000")  # type: ignore[arg-type]
        lines: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(lines.append)
        try:
            port.doRead()
        finally:
            globalLogPublisher.removeObserver(lines.append)
        assert port.reading and not sessions.live and not reactor.readers and not reactor.writers
        for _, theirs in pairs:
            theirs.settimeout(30)
            assert theirs.recv(10) == b""  # closed
            theirs.close()
        for _ in pairs:
            conn, _ = backend.accept()  # connected, then closed with its relay
            conn.settimeout(30)
            assert conn.recv(10) == b""
            conn.close()
        said = [formatEvent(e) for e in lines]
        assert said == [line for i in range(2) for line in (
            f"tcp tcp-5000 127.0.0.1:{40001 + i}: portrouter could not relay it: [Errno 28] No space left on "
            "device; 0 bytes in, 0 bytes out, 0.000 s",
            f"tcp tcp-5000 127.0.0.1:{40001 + i}: could not be relayed; closed",
        )], said
        failed = [e for e in no_tracebacks if "could not be relayed" in e.get("log_format", "")]
        assert [e["log_failure"].getErrorMessage() for e in failed] == ["[Errno 28] No space left on device"] * 2
        no_tracebacks.clear()


@pytest_twisted.ensureDeferred
async def test_a_protocol_that_fails_to_start_is_aborted_and_the_port_goes_on(
        no_tracebacks: list[dict[str, Any]]) -> None:
    """
    Twisted's transport for a non-direct client is watched as soon as it is
    made: a protocol whose start raises leaves it aborted (Twisted's own
    port would leave it open and read), and the next client is taken.
    """
    from twisted.internet.protocol import Factory, Protocol

    class Broken(Protocol):
        def connectionMade(self) -> None:
            raise RuntimeError("a protocol bug")

    port = reactor.listenTCP(0, Factory.forProtocol(Broken), interface="127.0.0.1")
    tcp.accept_directly(port, reactor, "http route broken")
    try:
        def two_clients() -> list[bytes]:
            got = []
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as client:
                    try:
                        got.append(client.recv(10))
                    except ConnectionResetError:
                        got.append(b"reset")
            return got

        assert await in_thread(two_clients) == [b"reset", b"reset"]
        failed = [e for e in no_tracebacks if "could not be served" in e.get("log_format", "")]
        assert [e["log_failure"].getErrorMessage() for e in failed] == ["a protocol bug"] * 2
        assert not [r for r in reactor.getReaders() if isinstance(getattr(r, "protocol", None), Broken)]
        no_tracebacks.clear()
    finally:
        await port.stopListening()


def test_accept_errors_of_a_client_gone_are_skipped_and_others_logged_and_waited_out(
        no_tracebacks: list[dict[str, Any]]) -> None:
    """
    What accept(2) says of a client already gone, or of the network under it,
    is skipped for the next client; anything else of the listening socket's
    is logged and tried again after the pause, not spun on at every turn.
    """
    reactor, route = make_route()
    taken: list[tuple[Any, ...]] = []
    route.accept_socket = lambda sock, address, **kw: taken.append(address)  # type: ignore[method-assign]
    pair = socket.socketpair()
    port = ListeningPort(route, [OSError(errno.ENETDOWN, "Network is down"),
                                 OSError(errno.ECONNABORTED, "Software caused connection abort"),
                                 (pair[0].detach(), ("127.0.0.1", 40001)),
                                 OSError(errno.EINVAL, "Invalid argument")])
    tcp.accept_directly(port, reactor, "tcp route tcp-5000")  # type: ignore[arg-type]
    port.doRead()
    assert taken == [("127.0.0.1", 40001)]
    assert not port.reading  # the EINVAL: waited out
    [failed] = [e for e in no_tracebacks if e.get("log_format") == "{listener}: accept failed"]
    assert failed["log_failure"].getErrorMessage() == "[Errno 22] Invalid argument"
    no_tracebacks.clear()
    reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
    assert port.reading
    assert port.doRead.out_since is None  # not out of descriptors: nothing to say when it accepts again
    # The same failure again, 0.1 s later: waited out, not said again; once
    # a client was taken, a failure is said anew.
    other = socket.socketpair()
    port.socket.results.extend([OSError(errno.EINVAL, "Invalid argument")])
    port.doRead()
    assert not port.reading and not [e for e in no_tracebacks if "log_failure" in e]
    reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
    port.socket.results.extend([(other[0].detach(), ("127.0.0.1", 40002)), OSError(errno.EINVAL, "Invalid argument")])
    port.doRead()
    assert taken[-1] == ("127.0.0.1", 40002)
    assert len([e for e in no_tracebacks if e.get("log_format") == "{listener}: accept failed"]) == 1
    no_tracebacks.clear()
    reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
    pair[1].close()
    other[1].close()


def test_a_trusted_client_with_no_descriptor_for_its_backend_pauses_its_port_as_a_direct_one_does() -> None:
    reactor, route = make_route()
    gate = ProxyGate(route, ProxyProtocol((ipaddress.ip_network("127.0.0.1/32"),), 5.0), reactor)
    emfile = OSError(errno.EMFILE, "Too many open files")
    taken: list[tuple[Any, ...]] = []

    def accept_socket(sock: Any, address: tuple[Any, ...], *rest: Any) -> None:
        if not taken:
            taken.append(("failed",))
            raise emfile
        taken.append(address)

    route.accept_socket = accept_socket  # type: ignore[method-assign]
    pairs = [socket.socketpair() for _ in range(2)]
    for port_number, (_, theirs) in enumerate(pairs, 40001):
        theirs.sendall(header("v2", ("203.0.113.7", port_number), ("127.0.0.1", 5000)) + b"hi")
    port = ListeningPort(gate, [(pairs[0][0].detach(), ("127.0.0.1", 40001))])
    tcp.accept_directly(port, reactor, "tcp route tcp-5000")  # type: ignore[arg-type]
    lines: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        port.doRead()
        reactor.advance(0)  # the round's end: its header is looked at, and its backend finds no descriptor
        assert taken == [("failed",)] and not port.reading
        reactor.advance(tcp.OUT_OF_DESCRIPTORS_PAUSE)
        assert port.reading
        port.socket.results.append((pairs[1][0].detach(), ("127.0.0.1", 40002)))
        port.doRead()
        reactor.advance(0)
    finally:
        globalLogPublisher.removeObserver(lines.append)
    assert taken == [("failed",), ("127.0.0.1", 40002)]
    assert [formatEvent(e) for e in lines if e.get("log_namespace") == "portrouter.tcp"] == [
        "tcp route tcp-5000: out of descriptors (Too many open files): not accepting, tried again every 0.1 s; "
        "clients wait in the listen queue meanwhile",
        "tcp route tcp-5000: accepting again, after 0.1 s out of descriptors; "
        "clients accepted meanwhile and closed, with none for their backend: 1",
    ]
    pairs[0][1].settimeout(30)
    assert pairs[0][1].recv(10) == b""  # closed
    for _, theirs in pairs:
        theirs.close()
