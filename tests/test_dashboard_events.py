"""
``GET /_api/events`` in-process, over real loopback sockets: the ticker runs
only while a stream is open; a tick sends only what changed; a reader that
stops reading holds a bounded queue and is told what it missed; streams end
when the router stops, so draining does not wait for them; the log ring is
bounded, formats lazily and hides secrets; a non-loopback client is refused.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import LogLevel, LogPublisher

from portrouter.auth import Credentials
from portrouter.config import parse, parse_project
from portrouter.events import QUEUE_BYTES, TICK, LogRing, format_line, sse
from portrouter.model import Auth, Config, Limits, Token
from portrouter.router import RouterService
from portrouter.front import Front
from tests.support import (
    LOOPBACK, ClockedReactor, UDPEcho, free_port, in_thread, start_router, stop_clocked, wait_for,
)
from tests.test_api import Answer, api_request

ADMIN = "admin-token-0123456789"


class Events:
    """A blocking reader of /_api/events over HTTP/1.0 (the stream ends by closing: no chunks to undo)."""

    def __init__(self, port: int, receive_buffer: int | None = None, headers: str = ""):
        self.sock = socket.socket()
        if receive_buffer is not None:  # before connecting: it sets the window offered
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(30)
        self.sock.connect((LOOPBACK, port))
        self.sock.sendall(f"GET /_api/events HTTP/1.0\r\nHost: x\r\n{headers}\r\n".encode())
        self.buffer = b""

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buffer:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(f"closed; unread: {self.buffer[:200]!r}")
            self.buffer += data
        part, _, self.buffer = self.buffer.partition(mark)
        return part

    def head(self) -> str:
        return self._until(b"\r\n\r\n").decode("latin-1")

    def event(self) -> tuple[str, Any]:
        """The next event (comments and the retry field skipped)."""
        while True:
            kind, data = None, None
            for line in self._until(b"\n\n").decode().split("\n"):
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
            if kind is not None:
                return kind, data

    def close(self) -> None:
        self.sock.close()


def ticks(clock: Clock, hub: Any) -> list[Any]:
    return [call for call in clock.getDelayedCalls() if call.func == hub._tick]


class Recorder:
    """A stand-in stream: what the hub sent it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.channel = Answer()
        self.channel.closing = False  # type: ignore[attr-defined]

    def send(self, event: bytes) -> None:
        head, _, data = event.decode().partition("\ndata: ")
        self.sent.append((head[len("event: "):], json.loads(data)))


@pytest_twisted.ensureDeferred
async def test_the_ticker_runs_only_while_a_stream_is_open(tmp_path: Path) -> None:
    clock = Clock()
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"))
    router = await start_router(config=config, using=ClockedReactor(clock))
    hub = router.front.hub
    try:
        assert ticks(clock, hub) == [] and hub.timer is None
        port = router.port_of()
        first, second = Events(port), Events(port)
        assert (await in_thread(first.head)).startswith("HTTP/1.1 200 OK")
        kind, state = await in_thread(first.event)
        assert kind == "state" and state["routes"][0]["backend"] == "path-based routing"
        await in_thread(second.head)
        await wait_for(lambda: len(hub.streams) == 2, what="both streams")
        assert len(ticks(clock, hub)) == 1  # one ticker, whatever the number of streams
        clock.advance(TICK)
        assert len(ticks(clock, hub)) == 1
        first.close()

        def left(n: int) -> bool:
            clock.advance(TICK)  # a tick notices a reader that closed its side
            return len(hub.streams) == n

        await wait_for(lambda: left(1), what="the first stream to end")
        assert len(ticks(clock, hub)) == 1
        second.close()
        await wait_for(lambda: left(0), what="the last stream to end")
        assert ticks(clock, hub) == [] and hub.timer is None
    finally:
        await stop_clocked(router, clock)


@pytest_twisted.ensureDeferred
async def test_a_tick_sends_only_what_changed(tmp_path: Path) -> None:
    clock = Clock()
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"))
    router = await start_router(("tcp", f"tcp:0:interface={LOOPBACK} -> tcp:{LOOPBACK}:9"),
                                ("tcp", f"tcp:0:interface={LOOPBACK} -> tcp:{LOOPBACK}:9"),
                                config=config, using=ClockedReactor(clock))
    hub = router.front.hub
    recorder = Recorder()
    try:
        hub.subscribe(recorder)  # type: ignore[arg-type]
        (kind, state), = recorder.sent
        assert kind == "state" and set(state["traffic"]) == {"tcp-0", "tcp-0-2"}
        assert state["traffic"]["tcp-0"]["bytes_in"] == 0
        recorder.sent.clear()
        clock.advance(TICK)
        assert recorder.sent == []  # nothing moved, nothing logged
        router.sessions.stats.bytes_in[("tcp", "tcp-0-2")] += 1000
        clock.advance(TICK)
        (kind, traffic), = recorder.sent
        assert kind == "traffic" and list(traffic["routes"]) == ["tcp-0-2"]
        assert traffic["routes"]["tcp-0-2"]["bytes_in"] == 1000
        assert traffic["routes"]["tcp-0-2"]["rate_in"] == 500  # 1000 bytes over the 2 s seen so far
        # Backend refusals (any reason) and refusals at max_connections, by route.
        stats = router.sessions.stats
        stats.connect_failures[("tcp-0", "refused")] += 2
        stats.connect_failures[("tcp-0", "timeout")] += 1
        stats.refused_at_limit[("tcp", "tcp-0")] += 4
        recorder.sent.clear()
        clock.advance(TICK)
        (kind, traffic), = recorder.sent
        assert traffic["routes"]["tcp-0"]["errors"] == {"502": 0, "504": 0, "refused": 3, "limit": 4}
        # The sparkline's minute: bytes moved in each second since the first stream.
        assert hub.snapshot()["history"]["tcp-0-2"] == [0, 1000, 0]
    finally:
        hub.unsubscribe(recorder)  # type: ignore[arg-type]
        await stop_clocked(router, clock)


@pytest_twisted.ensureDeferred
async def test_udp_sessions_count_both_ways(tmp_path: Path) -> None:
    echo = UDPEcho()
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"),
                    defaults=Limits(udp_timeout=0.5))
    router = await start_router(("udp", f"udp:0:interface={LOOPBACK} -> {echo.address}"), config=config)
    hub = router.front.hub
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(30)
    try:
        client.sendto(b"x" * 100, (LOOPBACK, router.port_of("udp-0")))
        assert (await in_thread(client.recv, 1000)) == b"x" * 100
        row = hub._traffic_rows()["udp-0"]
        assert (row["udp_sessions"], row["bytes_in"], row["bytes_out"]) == (1, 100, 100)
        # The session ends (udp_timeout): its bytes still count, from its log line.
        await wait_for(lambda: hub._traffic_rows()["udp-0"]["udp_sessions"] == 0, what="the session to end")
        row = hub._traffic_rows()["udp-0"]
        assert (row["bytes_in"], row["bytes_out"]) == (100, 100)
    finally:
        client.close()
        await router.stopService()
        echo.close()


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_reading_holds_a_bounded_queue_then_hears_what_it_missed(tmp_path: Path) -> None:
    router = await start_router(config=Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state")))
    hub = router.front.hub
    reader = Events(router.port_of(), receive_buffer=4096)
    try:
        await in_thread(reader.head)
        assert (await in_thread(reader.event))[0] == "state"
        await wait_for(lambda: hub.streams, what="the stream")
        stream = next(iter(hub.streams))
        # The reader reads nothing now: events pile up in the kernel, then in
        # Twisted's buffer, until the transport pauses the stream.
        big = sse("log", {"lines": [{"text": "x" * 8000}]})
        published = 0
        while not stream.dropped:
            hub.publish(big)
            published += 1
            assert stream.queued <= QUEUE_BYTES
            assert published < 100_000, "the stream was never paused"
        assert stream.paused and len(stream.queue) * len(big) <= QUEUE_BYTES
        missed = stream.dropped + len(stream.queue)

        def read_to_the_notice() -> tuple[int, list[str]]:
            logs = 0
            while True:
                kind, data = reader.event()
                if kind == "log" and data["lines"][0]["text"] == "x" * 8000:
                    logs += 1
                elif kind == "dropped":
                    return data["dropped"], [kind, reader.event()[0]]

        dropped, then = await in_thread(read_to_the_notice)
        # At least what was dropped here (a tick may have dropped more meanwhile), and then the whole picture.
        assert dropped >= missed > 0
        assert then == ["dropped", "state"]
        assert not stream.dropped and not stream.queue
    finally:
        reader.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_open_streams_end_when_the_router_stops(tmp_path: Path) -> None:
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"), drain_timeout=600)
    router = await start_router(config=config)
    reader = Events(router.port_of())
    try:
        await in_thread(reader.head)
        await wait_for(lambda: router.front.hub.streams, what="the stream")
        stopped = router.stopService()
        # Well before the 600 s drain timeout: the stream is not a request to wait for.
        await wait_for(lambda: stopped.called, what="the router to stop")

        def closed() -> bool:
            try:
                while reader.sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # the router aborts whatever is left once it stopped: closed all the same
            return True

        assert await in_thread(closed)
    finally:
        reader.close()


def test_the_log_ring_is_bounded_lazy_and_hides_secrets() -> None:
    publisher = LogPublisher()
    ring = LogRing()
    publisher.addObserver(ring)
    for n in range(150):
        publisher({"log_format": "line {n}", "n": n, "log_level": LogLevel.info, "log_namespace": "t", "log_time": 0})
    publisher({"log_format": "noise", "log_level": LogLevel.debug})
    assert len(ring.events) == 100 and ring.seq == 150
    seq, event = ring.events[0]
    assert seq == 51 and event["n"] == 50 and "log_text" not in event  # kept as emitted
    assert [n for n, _ in ring.since(148)] == [149, 150]
    line = format_line({"log_format": "{client} GET /x?token={t}&a=1 said Bearer {t} and {t}",
                        "client": "127.0.0.1", "t": ADMIN, "log_level": LogLevel.warn,
                        "log_namespace": "portrouter.http", "log_time": 5.0}, [])
    assert line == {"time": 5.0, "level": "warn", "namespace": "portrouter.http",
                    "text": "127.0.0.1 GET /x?token=***&a=1 said Bearer *** and " + ADMIN}
    # A configured secret is hidden wherever it stands.
    assert format_line({"log_format": "key {k}", "k": f"<{ADMIN}>"}, [ADMIN])["text"] == "key <***>"


@pytest_twisted.ensureDeferred
async def test_counts_come_from_the_router_not_its_log_lines(tmp_path: Path) -> None:
    """
    A project with access_log: false writes no request or session line, and
    the dashboard still counts its answers' bytes, its 502s and 504s, and its
    finished UDP sessions' bytes: they are the router's counters.
    """
    clock = Clock()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "web", "backend": f"tcp:{LOOPBACK}:9", "access_log": False},
                     {"name": "dns", "backend": f"{LOOPBACK}:9", "access_log": False,
                      "listen": {"port": free_port(socket.SOCK_DGRAM), "protocol": "udp", "interface": LOOPBACK}}]}),
        using=ClockedReactor(clock))
    hub = router.front.hub
    try:
        for status in (200, 502, 504, 502):
            router.sessions.stats.http_request("web", status, 10)
        udp = router.listeners["dns"].factory
        udp.ended_in, udp.ended_out = 40, 90  # as _close leaves them
        row = hub._traffic_rows()
        assert row["web"]["bytes_out"] == 40 and row["web"]["requests"] == 4
        assert (row["web"]["errors"]["502"], row["web"]["errors"]["504"]) == (2, 1)
        assert (row["dns"]["bytes_in"], row["dns"]["bytes_out"]) == (40, 90)
    finally:
        await stop_clocked(router, clock)


@pytest.mark.parametrize("client", ["192.0.2.1", "2001:db8::1"])
def test_a_non_loopback_client_is_refused_without_auth(tmp_path: Path, client: str) -> None:
    """Every 127/8 address is loopback: the request is handed over in-process, from a documentation address."""
    router = RouterService(Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state")), None, Front)  # type: ignore[arg-type]
    front = router.front
    for target, answer in [(b"/_dashboard/", lambda c, r: front.dashboard.handler(c, r, b"")),
                           (b"/_dashboard/?token=x", lambda c, r: front.dashboard.handler(c, r, b"")),
                           (b"/_api/events", lambda c, r: front.api.handler(c, r, b"events"))]:
        channel = Answer()
        answer(channel, api_request(b"GET", target, client)).end()
        (status, body, _, headers), = channel.sent
        assert status == 403 and json.loads(body)["error"]["message"] == (
            "without an auth section only loopback clients are answered"), target
    assert not front.hub.streams


def test_a_forged_or_stale_cookie_opens_nothing(tmp_path: Path) -> None:
    auth = Auth(tokens=(Token(secret=ADMIN, admin=True, projects=("*",)),))
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"), auth=auth)
    router = RouterService(config, None, Front)  # type: ignore[arg-type]
    dashboard = router.front.dashboard
    good = dashboard.cookie_for(ADMIN)
    assert dashboard.admits(api_request(b"GET", b"/_api/events", "127.0.0.1",
                                        [(b"Cookie", f"a=b; portrouter_dashboard={good}".encode())]))
    for cookie in (f"portrouter_dashboard={ADMIN}", "portrouter_dashboard=", f"other={good}"):
        assert not dashboard.admits(api_request(b"GET", b"/_api/events", "127.0.0.1", [(b"Cookie", cookie.encode())]))
    # A token taken out of the config (a reload) takes its cookie with it.
    router.credentials = Credentials(Auth(tokens=(Token(secret="another-admin-token", admin=True, projects=("*",)),)))
    assert not dashboard.admits(api_request(b"GET", b"/_api/events", "127.0.0.1",
                                            [(b"Cookie", f"portrouter_dashboard={good}".encode())]))
    # Another run of portrouter (another key) does not take it.
    again = RouterService(config, None, Front)  # type: ignore[arg-type]
    assert not again.front.dashboard.admits(api_request(b"GET", b"/_api/events", "127.0.0.1",
                                                        [(b"Cookie", f"portrouter_dashboard={good}".encode())]))


@pytest_twisted.ensureDeferred
async def test_a_deployed_project_reaches_open_streams_within_one_tick(tmp_path: Path) -> None:
    """
    The dashboard's promise (a deploy on the page within 2 s, without a
    reload), on the reactor's clock: the table goes out at the next tick,
    at most TICK (1 s) after the change. The browser test waits for the row
    with a deadline, not this promise's time, so a loaded machine cannot
    fail it.
    """
    clock = Clock()
    router = await start_router(config=Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state")),
                                using=ClockedReactor(clock))
    hub = router.front.hub
    recorder = Recorder()
    try:
        hub.subscribe(recorder)  # type: ignore[arg-type]
        recorder.sent.clear()
        project = parse_project({"name": "web", "backend": f"tcp:{LOOPBACK}:9"}, static=False)
        await router.serialised(lambda: router.change(router.table.with_project(project), persist=False))
        assert [kind for kind, _ in recorder.sent] == []
        clock.advance(TICK)
        routes = [data for kind, data in recorder.sent if kind == "routes"]
        assert len(routes) == 1 and any(row["project"] == "web" for row in routes[0]["routes"])
    finally:
        hub.unsubscribe(recorder)  # type: ignore[arg-type]
        await stop_clocked(router, clock)
