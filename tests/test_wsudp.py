"""
UDP service ports, the server side (SPEC section 11, issue 16): one
WebSocket on ``/stream/.../udpproxy?app=`` is one UDP session, each BINARY
message one datagram each way. Driven by a client that writes RFC 6455 by
hand (L{RawWebSocket}), so every frame and close code is seen as sent, to
real UDP services on loopback. The tunnel client and the real-client tests
(dig, dnsmasq, iperf3) are in C{tests/test_udp_tunnel.py}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from portrouter.config import parse
from portrouter.metrics import registry_for, render
from portrouter.relay import queued
from portrouter.services import udp_bound
from tests.support import (
    LOOPBACK, ClockedReactor, RawWebSocket, UDPEcho, free_port, in_thread, start_router, stop_clocked, wait_for,
)
from tests.test_service_ports import ADMIN_TOKEN, OTHER_TOKEN, service_config
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


@pytest.fixture
def udp_echo() -> Iterator[UDPEcho]:
    server = UDPEcho()
    yield server
    server.close()


def udp_config(tmp_path: Path, services: list[dict[str, Any]], **limits: Any) -> Any:
    return parse({
        "ingress": f"tcp:0:interface={LOOPBACK}",
        "state": str(tmp_path / "state"),
        "projects": [{"name": "k1", "host": LOOPBACK, "services": services, **limits}],
    })


def udpproxy(app: str, project: str = "k1") -> str:
    return f"/stream/session/{project}/udpproxy?app={app}"


def opened(port: int, app: str = "dns", headers: dict[str, str] | None = None) -> RawWebSocket:
    ws = RawWebSocket(port, udpproxy(app), headers)
    assert ws.status == 101, ws.status
    return ws


@pytest_twisted.ensureDeferred
async def test_each_message_is_one_datagram_each_way(tmp_path: Path, udp_echo: UDPEcho, logged: list[str]) -> None:
    router = await start_router(config=udp_config(tmp_path, [{"name": "dns", "protocol": "udp", "port": udp_echo.port}]))
    try:
        def exchange() -> list[bytes]:
            ws = opened(router.port_of())
            sizes = [0, 1, 1000, 65507, 3]
            for size in sizes:  # sent back to back: boundaries must survive
                ws.send(os.urandom(size) if size != 3 else b"end")
            got = []
            for _ in sizes:
                opcode, payload = ws.frame()
                assert opcode == BINARY
                got.append(payload)
            ws.send(b"\x03\xe8", opcode=CLOSE)
            assert ws.frame()[0] == CLOSE
            ws.close()
            return got

        got = await in_thread(exchange)
        assert [len(g) for g in got] == [0, 1, 1000, 65507, 3]
        assert got[-1] == b"end"
        line = await log_line(logged, r"udp k1/dns 127\.0\.0\.1:\d+: client closed \(1000\); 66511 bytes in, "
                                      r"66511 bytes out")
        assert line
        assert router.sessions.stats.connections[("udp", "k1/dns")] == 1
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_each_websocket_has_its_own_socket(tmp_path: Path, udp_echo: UDPEcho) -> None:
    router = await start_router(config=udp_config(tmp_path, [{"name": "dns", "protocol": "udp", "port": udp_echo.port}]))
    try:
        def two() -> None:
            first, second = opened(router.port_of()), opened(router.port_of())
            assert first.echo(b"one") == b"one"
            assert second.echo(b"two") == b"two"
            first.close()
            second.close()

        await in_thread(two)
        assert len(udp_echo.peers) == 2
    finally:
        await router.stopService()


@pytest.mark.parametrize("opcode, payload, code", [
    (TEXT, b"hello", 1003),
    (BINARY, bytes(65508), 1009),
])
@pytest_twisted.ensureDeferred
async def test_text_and_oversized_messages_close(tmp_path: Path, udp_echo: UDPEcho, opcode: int, payload: bytes,
                                                 code: int) -> None:
    router = await start_router(config=udp_config(tmp_path, [{"name": "dns", "protocol": "udp", "port": udp_echo.port}]))
    try:
        def refused() -> tuple[int, str]:
            ws = opened(router.port_of())
            ws.send(payload, opcode=opcode)
            return ws.closed()

        got_code, reason = await in_thread(refused)
        assert got_code == code, reason
        assert udp_echo.received == 0
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_apps_protocols_and_credentials(tmp_path: Path, udp_echo: UDPEcho) -> None:
    """``apps`` lists UDP services; the wrong proxy for a service is a 400; credentials come first."""
    config = service_config(tmp_path, {"echo": 1}, projects=[
        {"name": "game", "services": [{"name": "dns", "protocol": "udp", "port": udp_echo.port},
                                      {"name": "web", "protocol": "tcp", "port": 1}]},
    ])
    router = await start_router(config=config)
    port = router.port_of()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        def ask(target: str, headers: dict[str, str] | None, upgrade: bool = True) -> tuple[int, Any]:
            ws = RawWebSocket(port)
            status, _, body = ws.request(target, headers, upgrade=upgrade)
            ws.close()
            return status, json.loads(body) if body else None

        status, apps = await in_thread(ask, "/stream/session/game/apps", admin, False)
        assert status == 200
        assert {"name": "dns", "protocol": "udp", "ports": [udp_echo.port]} in apps
        status, problem = await in_thread(ask, udpproxy("web", "game"), admin)
        assert (status, problem["title"]) == (400, "'web' is a TCP service: udpproxy is for UDP services.")
        status, problem = await in_thread(ask, "/stream/session/game/tcpproxy?app=dns", admin)
        assert (status, problem["title"]) == (400, "'dns' is a UDP service: use udpproxy.")
        status, problem = await in_thread(ask, udpproxy("nope", "game"), admin)
        assert (status, problem["title"]) == (404, "No such app service.")
        assert (await in_thread(ask, udpproxy("dns", "game"), None))[0] == 401
        assert (await in_thread(ask, udpproxy("dns", "game"), {"Authorization": f"Bearer {OTHER_TOKEN}"}))[0] == 403
        game = await in_thread(RawWebSocket, port, udpproxy("dns", "game"), admin)
        assert game.status == 101
        assert await in_thread(game.echo, b"ok") == b"ok"
        game.close()
        assert udp_echo.received == 1
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_udp_timeout_counts_from_the_last_datagram_either_way(tmp_path: Path) -> None:
    """A datagram from the client, then one from the service alone: each postpones the end."""
    clock = Clock()
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.bind((LOOPBACK, 0))
    service.settimeout(30)
    config = udp_config(tmp_path, [{"name": "dns", "protocol": "udp", "port": service.getsockname()[1],
                                    "udp_timeout": 10}])
    router = await start_router(config=config, using=ClockedReactor(clock))
    try:
        ws = await in_thread(opened, router.port_of())
        await wait_for(lambda: router.sessions.live, 15, "the session")
        clock.advance(9)
        ws.send(b"ping")  # from the client: 10 s from now
        _, session_socket = await in_thread(service.recvfrom, 100)
        clock.advance(9)
        service.sendto(b"unasked", session_socket)  # from the service alone: 10 s from now
        assert await in_thread(ws.frame) == (BINARY, b"unasked")
        clock.advance(9)
        assert router.sessions.live
        clock.advance(1.5)
        assert await in_thread(ws.closed) == (1000, "idle for 10 s")
        ws.close()
    finally:
        service.close()
        await stop_clocked(router, clock)


UDP_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"started:" + data, peer)
"""


@pytest_twisted.ensureDeferred
async def test_a_udp_service_starts_on_demand_and_gets_the_early_datagrams(tmp_path: Path,
                                                                           logged: list[str]) -> None:
    """Readiness is the port bound, as /proc/net/udp shows it; what came meanwhile is held, then sent."""
    port = free_port(socket.SOCK_DGRAM)
    script = tmp_path / "echo.py"
    script.write_text(UDP_ECHO_SERVER)
    router = await start_router(config=udp_config(tmp_path, [
        {"name": "dns", "protocol": "udp", "port": port, "command": [sys.executable, str(script), str(port)]},
    ]))
    try:
        assert not udp_bound(port)
        ws = await in_thread(opened, router.port_of())
        ws.send(b"early")  # before the service is up: held
        assert await in_thread(ws.frame) == (BINARY, b"started:early")
        await log_line(logged, rf"k1/dns is ready")
        assert udp_bound(port)
        ws.close()
    finally:
        await router.stopService()


GATED_UDP_ECHO_SERVER = """
import os, socket, sys, time
while not os.path.exists(sys.argv[2]):  # the test says when to bind: until then, it is starting
    time.sleep(0.01)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data[:8], peer)
"""


def the_bridge(router: Any) -> Any:
    """The one open udpproxy WebSocket's bridge on the router's ingress, or None."""
    return next((c.tunnel for c in router.ingress.factory.channels if getattr(c, "tunnel", None) is not None), None)


@pytest_twisted.ensureDeferred
async def test_datagrams_while_the_service_starts_are_held_up_to_64_kib(tmp_path: Path, logged: list[str]) -> None:
    """
    What comes while an on-demand service starts is held, up to 64 KiB, and
    sent once it is up; past that it is dropped, counted, and said when the
    session ends.
    """
    port = free_port(socket.SOCK_DGRAM)
    script, gate = tmp_path / "echo.py", tmp_path / "gate"
    script.write_text(GATED_UDP_ECHO_SERVER)
    router = await start_router(config=udp_config(tmp_path, [
        {"name": "dns", "protocol": "udp", "port": port,
         "command": [sys.executable, str(script), str(port), str(gate)]},
    ]))
    try:
        ws = await in_thread(opened, router.port_of())
        for i in range(9):  # 8 x 8000 bytes fit in 64 KiB, the ninth does not
            ws.send(b"%08d" % i + bytes(7992))
        await wait_for(lambda: (bridge := the_bridge(router)) is not None and bridge.dropped == 1, 30,
                       "the ninth datagram to be dropped")
        gate.touch()
        assert [await in_thread(ws.frame) for _ in range(8)] == [(BINARY, b"%08d" % i) for i in range(8)]
        ws.close()
        await log_line(logged, r"^udp k1/dns 127\.0\.0\.1:\d+: 1 datagrams dropped, 0 refused by the service")
        assert router.sessions.stats.datagrams_dropped["k1/dns"] == 1
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_max_connections_and_a_client_that_does_not_read(tmp_path: Path, logged: list[str]) -> None:
    """
    A service that floods a client that does not read: datagrams are dropped
    and counted once the client's buffer is full, never queued without bound;
    the session's line says how many, and so does /_api/metrics.
    """
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind((LOOPBACK, 0))
    stop = threading.Event()

    def serve() -> None:
        flood.settimeout(10)
        _, peer = flood.recvfrom(100)
        flood.settimeout(None)
        chunk = bytes(8000)
        while not stop.is_set():
            try:
                flood.sendto(chunk, peer)
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    router = await start_router(config=udp_config(
        tmp_path, [{"name": "flood", "protocol": "udp", "port": flood.getsockname()[1], "max_connections": 1}]))
    try:
        ws = await in_thread(RawWebSocket, router.port_of(), udpproxy("flood"), rcvbuf=4096)
        assert ws.status == 101
        second = await in_thread(opened, router.port_of(), "flood")
        assert await in_thread(second.closed) == (1013, "too many connections (max_connections)")
        ws.send(b"go")
        bridge: Any = None

        def dropping() -> bool:
            nonlocal bridge
            bridge = the_bridge(router)
            return bridge is not None and bridge.dropped > 1000

        await wait_for(dropping, 30, "the router to drop datagrams for the client that does not read")
        assert queued(bridge.transport) < 65536 + 8014  # its buffer, and at most one more frame
        ws.close()
        await wait_for(lambda: not router.sessions.live, 15, "the session to end")
        dropped = router.sessions.stats.datagrams_dropped["k1/flood"]
        assert dropped > 1000
        await log_line(logged, rf"^udp k1/flood 127\.0\.0\.1:\d+: {dropped} datagrams dropped, 0 refused")
        assert f'portrouter_service_datagrams_dropped_total{{project="k1/flood"}} {dropped}.0' in render(
            registry_for(router)).decode()
    finally:
        stop.set()
        flood.close()
        await router.stopService()


def test_udp_bound_reads_proc_net_udp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        assert udp_bound(s.getsockname()[1])
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
        s6.bind(("::1", 0))
        assert udp_bound(s6.getsockname()[1])

