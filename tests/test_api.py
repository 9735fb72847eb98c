"""
The run-time API (SPEC 3 and 8) over real loopback sockets: deploy, replace
and delete HTTP, TCP and UDP projects and use them; every refusal of the
conflict matrix changes nothing; a replace that moves a port and a delete with
an open connection leave that connection alone (until the drain timeout);
projects deployed through the API come back after a restart of a real
``twistd``; a truncated state file stops start-up; a state file that cannot be
written refuses the change; SIGHUP and ``POST /_api/reload`` apply only the
difference; ``curl`` reads the text table; auth; Prometheus metrics.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

import portrouter.state
import portrouter.tcp
from portrouter.front import Front
from portrouter.api import API
from portrouter.config import load, parse_project
from portrouter.model import Auth, Config, Limits, Manhole, Token
from portrouter.router import RouterService
from portrouter.state import State, StateError
from portrouter.tap import _Daemon
from portrouter.web import Request
from tests.httpbackend import Backend
from tests.support import (
    LOOPBACK,
    ClockedReactor,
    ThreadServer,
    Twistd,
    UDPEcho,
    free_port,
    in_thread,
    our_sockets,
    start_router,
    stop_clocked,
    wait_for,
)

ADMIN = "admin-token-0123456789"
USER = "user-token-abcdefghij"


# -- peers -------------------------------------------------------------------------------


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def tagged_echo(tag: bytes) -> Callable[[socket.socket], None]:
    """An echo that says which backend answered."""
    def serve(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(tag + data)

    return serve


def distinct_ports(n: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(kind)
        if port not in ports:
            ports.append(port)
    return ports


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=30)


def say(sock: socket.socket, message: bytes) -> bytes:
    """Send C{message} on an open connection; the echo of exactly that many bytes (plus a tag)."""
    sock.sendall(message)
    got = b""
    while not got.endswith(message):
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"closed after {got!r}")
        got += data
    return got


def roundtrip(port: int, message: bytes) -> bytes:
    """One connection: send, half-close, everything the other side says."""
    with connect(port) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def refuses(port: int) -> bool:
    """Nothing listens on 127.0.0.1:C{port}: a connection is refused."""
    try:
        with connect(port):
            return False
    except ConnectionRefusedError:
        return True


async def until_refused(port: int, timeout: float = 10) -> None:
    """For a port that another process closes on its next turn: try again, until a deadline."""
    deadline = time.monotonic() + timeout
    while not await in_thread(refuses, port):
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still accepts connections")


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(30)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def udp_exchange(port: int, message: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.settimeout(20)
        sock.sendto(message, (LOOPBACK, port))
        reply, source = sock.recvfrom(65535)
        assert source == (LOOPBACK, port)
        return reply


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- the API ---------------------------------------------------------------------------


def call(port: int, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def api(port: int, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One API call: the status and the body (parsed when JSON)."""
    status, response_headers, raw = await in_thread(call, port, method, path, body, headers)
    if response_headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(raw)
    return status, raw


def listen(port: int, protocol: str) -> dict[str, Any]:
    return {"port": port, "protocol": protocol, "interface": LOOPBACK}


async def api_router(tmp_path: Path, **config: Any) -> RouterService:
    config.setdefault("ingress", f"tcp:0:interface={LOOPBACK}")
    config.setdefault("drain_timeout", 5.0)
    return await start_router(config=Config(state=str(tmp_path / "state"), **config))


class Snapshot:
    """What "nothing changed" compares: the API's view, the state file, the bound listeners."""

    def __init__(self, port: int, state_file: Path, router: RouterService | None = None,
                 headers: dict[str, str] | None = None):
        self.port = port
        self.state_file = state_file
        self.router = router
        self.headers = headers

    async def take(self) -> tuple[Any, ...]:
        _, routes = await api(self.port, "GET", "/_api/routes", headers=self.headers)
        _, text = await api(self.port, "GET", "/_api/routes?format=text", headers=self.headers)
        _, projects = await api(self.port, "GET", "/_api/projects", headers=self.headers)
        state = self.state_file.read_bytes() if self.state_file.exists() else None
        listeners = dict(self.router.listeners) if self.router is not None else None
        return routes, text, projects, state, listeners


# -- deploy, use, replace, delete ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deploy_http_tcp_and_udp_projects_and_use_them_at_once(tmp_path: Path) -> None:
    web, tcp_backend, udp_backend = Backend(), ThreadServer(echo), UDPEcho(tag=b"udp:")
    http_port, tcp_port = distinct_ports(2)
    udp_port = free_port(socket.SOCK_DGRAM)
    router = await api_router(tmp_path)
    ingress = router.port_of()
    manifests = {
        "site": {"backend": web.address, "listen": listen(http_port, "http"), "runtime": "deno", "entry": "server.ts"},
        "sock": {"backend": tcp_backend.address, "listen": listen(tcp_port, "tcp")},
        "dns": {"backend": udp_backend.address, "listen": listen(udp_port, "udp")},
    }
    try:
        for name, manifest in manifests.items():
            status, body = await api(ingress, "PUT", f"/_api/projects/{name}", manifest)
            assert (status, body) == (201, {"name": name, **manifest, "source": "api"})

        async def use_http() -> tuple[int, bytes]:
            return await in_thread(http_get, http_port, "/hello?x=1")

        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(use_http()),
            in_thread(roundtrip, tcp_port, b"over tcp"),
            in_thread(udp_exchange, udp_port, b"over udp"),
        ])
        assert results == [(200, b"backend saw GET /hello?x=1\n"), b"over tcp", b"udp:over udp"]

        status, body = await api(ingress, "GET", "/_api/projects")
        assert status == 200
        assert body == {"projects": [{"name": n, **m, "source": "api"} for n, m in manifests.items()]}
        assert await api(ingress, "GET", "/_api/projects/sock") == (
            200, {"name": "sock", **manifests["sock"], "source": "api"})
        status, body = await api(ingress, "GET", "/_api/routes")
        assert status == 200
        assert body["routes"][1:] == sorted([
            {"port": http_port, "protocol": "http", "project": "site", "backend": web.address, "interface": LOOPBACK},
            {"port": tcp_port, "protocol": "tcp", "project": "sock", "backend": tcp_backend.address,
             "interface": LOOPBACK},
            {"port": udp_port, "protocol": "udp", "project": "dns", "backend": udp_backend.address,
             "interface": LOOPBACK},
        ], key=lambda row: row["port"])
        saved = json.loads((tmp_path / "state" / "projects.json").read_text())
        assert saved == {"version": 1, "projects": [{"name": n, **m} for n, m in manifests.items()]}

        # Deploying the same name again replaces: 200.
        status, body = await api(ingress, "PUT", "/_api/projects/sock", manifests["sock"])
        assert (status, body["source"]) == (200, "api")
        assert await in_thread(roundtrip, tcp_port, b"still") == b"still"

        for name in manifests:
            assert await api(ingress, "DELETE", f"/_api/projects/{name}") == (204, b"")
            status, body = await api(ingress, "GET", f"/_api/projects/{name}")
            assert (status, body["error"]["code"]) == (404, "not_found")
        assert await in_thread(refuses, http_port) and await in_thread(refuses, tcp_port)
        assert json.loads((tmp_path / "state" / "projects.json").read_text()) == {"version": 1, "projects": []}
        assert list(router.listeners) == []
    finally:
        await router.stopService()
        web.close()
        tcp_backend.close()
        udp_backend.close()


@pytest_twisted.ensureDeferred
async def test_invalid_requests_are_refused_naming_the_field_and_change_nothing(tmp_path: Path) -> None:
    static = parse_project({"name": "static", "backend": f"tcp:{LOOPBACK}:1"})
    router = await api_router(tmp_path, projects=(static,))
    ingress = router.port_of()
    snapshot = Snapshot(ingress, tmp_path / "state" / "projects.json", router)
    try:
        before = await snapshot.take()
        port = free_port()
        cases = [
            ("PUT", "/_api/projects/x", {"backend": f"tcp:{LOOPBACK}:1", "listen": {"port": 70000}},
             400, "invalid", "listen.port", "70000 is not a port (1-65535)"),
            ("PUT", "/_api/projects/x", {"backend": "nonsense", "listen": {"port": port}},
             400, "invalid", "backend", None),
            ("PUT", "/_api/projects/x", {"backend": f"tcp:{LOOPBACK}:1", "listen": {"port": port, "protocol": "sctp"}},
             400, "invalid", "listen.protocol", None),
            ("PUT", "/_api/projects/x", {"name": "y", "backend": f"tcp:{LOOPBACK}:1"},
             400, "invalid", "name", "the body names project 'y', the URL 'x'"),
            ("PUT", "/_api/projects/Bad_Name", {"backend": f"tcp:{LOOPBACK}:1"},
             400, "invalid", "name", None),
            ("PUT", "/_api/projects/x", b"{not json",
             400, "invalid", None, None),
            ("PUT", "/_api/projects/static", {"backend": f"tcp:{LOOPBACK}:2"},
             409, "static_project", None,
             "project 'static' is defined in the config file; edit the file and reload"),
            ("DELETE", "/_api/projects/static", None,
             409, "static_project", None,
             "project 'static' is defined in the config file; edit the file and reload"),
            ("DELETE", "/_api/projects/nosuch", None, 404, "not_found", None, "no project named 'nosuch'"),
            ("GET", "/_api/nosuch", None, 404, "not_found", None, None),
        ]
        for method, path, body, status, code, field, message in cases:
            got_status, got = await api(ingress, method, path, body)
            assert (got_status, got["error"]["code"]) == (status, code), (method, path, got)
            assert got["error"].get("field") == field, (path, got)
            if message is not None:
                assert got["error"]["message"] == message
            assert await snapshot.take() == before
        assert await in_thread(refuses, port)
        # The static project is shown as such.
        assert await api(ingress, "GET", "/_api/projects/static") == (
            200, {"name": "static", "backend": f"tcp:{LOOPBACK}:1", "source": "config"})
    finally:
        await router.stopService()


# -- the conflict matrix -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_conflict_matrix_each_refusal_changes_nothing(tmp_path: Path) -> None:
    web, tcp_backend = Backend(), ThreadServer(echo)
    ingress, manhole, http_port, tcp_port = distinct_ports(4)
    keys = tmp_path / "authorized_keys"
    keys.write_text("")
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen(1)
    held = holder.getsockname()[1]
    router = await api_router(
        tmp_path, ingress=f"tcp:{ingress}:interface={LOOPBACK}",
        manhole=Manhole(f"tcp:{manhole}:interface={LOOPBACK}", str(keys)),
    )
    snapshot = Snapshot(ingress, tmp_path / "state" / "projects.json", router)
    try:
        assert (await api(ingress, "PUT", "/_api/projects/site",
                          {"backend": web.address, "listen": listen(http_port, "http")}))[0] == 201
        assert (await api(ingress, "PUT", "/_api/projects/sock",
                          {"backend": tcp_backend.address, "listen": listen(tcp_port, "tcp")}))[0] == 201

        async def still_served() -> None:
            assert await in_thread(http_get, http_port, "/x") == (200, b"backend saw GET /x\n")
            assert await in_thread(roundtrip, tcp_port, b"ping") == b"ping"

        refusals = [
            # Another project's port in the TCP namespace, whatever the protocol.
            ("new", listen(http_port, "tcp"), "port_conflict",
             f"port {http_port}/tcp is already bound by project 'site'"),
            ("new", listen(tcp_port, "http"), "port_conflict",
             f"port {tcp_port}/tcp is already bound by project 'sock'"),
            ("new", listen(tcp_port, "ws"), "port_conflict",
             f"port {tcp_port}/tcp is already bound by project 'sock'"),
            # A replace that moves a project onto another's port.
            ("site", listen(tcp_port, "http"), "port_conflict",
             f"port {tcp_port}/tcp is already bound by project 'sock'"),
            # The reserved ports.
            ("new", listen(ingress, "tcp"), "port_conflict", f"port {ingress}/tcp is reserved for the ingress"),
            ("new", listen(manhole, "http"), "port_conflict", f"port {manhole}/tcp is reserved for the manhole"),
            # A port another program holds: the OS's reason.
            ("new", listen(held, "tcp"), "port_unavailable",
             f"cannot bind port {held}/tcp for project 'new': Address already in use"),
            ("sock", listen(held, "tcp"), "port_unavailable",
             f"cannot bind port {held}/tcp for project 'sock': Address already in use"),
        ]
        for name, where, code, message in refusals:
            before = await snapshot.take()
            status, body = await api(ingress, "PUT", f"/_api/projects/{name}",
                                     {"backend": tcp_backend.address, "listen": where})
            assert status == 409, (name, where, body)
            assert body == {"error": {"code": code, "message": message, "field": "listen.port"}}
            assert await snapshot.take() == before, (name, where)
            await still_served()

        # The same number in the UDP namespace is another port.
        status, _ = await api(ingress, "PUT", "/_api/projects/dns",
                              {"backend": f"{LOOPBACK}:53", "listen": listen(tcp_port, "udp")})
        assert status == 201
        assert router.listeners["dns"].port.getHost().port == tcp_port
        await still_served()
    finally:
        await router.stopService()
        holder.close()
        web.close()
        tcp_backend.close()


# -- a replace that moves a port ----------------------------------------------------------------


@pytest.fixture(params=["splice", "stream"])
def relay_mode(request: Any, monkeypatch: Any) -> str:
    if request.param == "stream":
        monkeypatch.setattr(portrouter.tcp, "splicable", lambda transport: False)
    return str(request.param)


@pytest_twisted.ensureDeferred
async def test_replace_moving_a_port_keeps_the_open_connection_flowing(tmp_path: Path, relay_mode: str) -> None:
    old_backend, new_backend = ThreadServer(tagged_echo(b"old:")), ThreadServer(tagged_echo(b"new:"))
    old_port, new_port = distinct_ports(2)
    router = await api_router(tmp_path)
    ingress = router.port_of()
    sock = None
    try:
        status, _ = await api(ingress, "PUT", "/_api/projects/mover",
                              {"backend": old_backend.address, "listen": listen(old_port, "tcp")})
        assert status == 201
        sock = await in_thread(connect, old_port)
        assert await in_thread(say, sock, b"before") == b"old:before"

        status, body = await api(ingress, "PUT", "/_api/projects/mover",
                                 {"backend": new_backend.address, "listen": listen(new_port, "tcp")})
        assert (status, body["listen"]["port"]) == (200, new_port)
        # The open connection goes on, to the backend it started with.
        assert await in_thread(say, sock, b"during") == b"old:during"
        assert await in_thread(roundtrip, new_port, b"fresh") == b"new:fresh"
        assert await in_thread(refuses, old_port)
        assert await in_thread(say, sock, b"after") == b"old:after"
        assert router.port_of("mover") == new_port
        sock.close()
        await wait_for(lambda: not router.sessions.live, what="the old connection to end")
    finally:
        if sock is not None:
            sock.close()
        await router.stopService()
        old_backend.close()
        new_backend.close()


# -- delete with an open connection: drain ---------------------------------------------------


def clocked_router(tmp_path: Path) -> tuple[RouterService, Clock]:
    """A started router on a clock of the test's, with a drain_timeout of 5 s."""
    clock = Clock()
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"), drain_timeout=5.0)
    router = RouterService(config, ClockedReactor(clock), Front)
    router.privilegedStartService()
    router.startService()
    return router, clock


@pytest_twisted.ensureDeferred
async def test_delete_stops_accepting_at_once_and_closes_open_connections_after_drain_timeout(
    tmp_path: Path, relay_mode: str
) -> None:
    backend = ThreadServer(echo)
    port = free_port()
    router, clock = clocked_router(tmp_path)
    ingress = router.port_of()
    sock = None
    ended: list[dict[str, Any]] = []  # the log events of finished sessions
    globalLogPublisher.addObserver(ended.append)
    try:
        status, _ = await api(ingress, "PUT", "/_api/projects/goner",
                              {"backend": backend.address, "listen": listen(port, "tcp")})
        assert status == 201
        sock = await in_thread(connect, port)
        assert await in_thread(say, sock, b"hello") == b"hello"
        assert len(router.sessions.live) == 1

        assert await api(ingress, "DELETE", "/_api/projects/goner") == (204, b"")
        assert await in_thread(refuses, port), "the listener still accepts after the 204"
        assert "goner" not in router.listeners
        assert json.loads((tmp_path / "state" / "projects.json").read_text())["projects"] == []
        # The open connection keeps working until the drain timeout...
        assert await in_thread(say, sock, b"still here") == b"still here"
        clock.advance(4.9)
        assert await in_thread(say, sock, b"nearly") == b"nearly"
        assert len(router.sessions.live) == 1
        # ...and is closed then, saying why in its log line.
        clock.advance(0.1)
        assert await in_thread(closed_by_peer, sock)
        assert not router.sessions.live
        assert backend.accepted == 1
        assert [e["reason"] for e in ended if e.get("project") == "goner" and "reason" in e] == [
            "project removed; closed after the drain timeout (5 s)"]
    finally:
        globalLogPublisher.removeObserver(ended.append)
        if sock is not None:
            sock.close()
        await stop_clocked(router, clock)
        backend.close()


@pytest_twisted.ensureDeferred
async def test_a_project_deployed_again_keeps_its_new_connections_past_the_old_drain(tmp_path: Path) -> None:
    """
    The drain of a removed project closes the connections it had, not those
    of the project deployed again under its name meanwhile.
    """
    backend = ThreadServer(echo)
    port = free_port()
    router, clock = clocked_router(tmp_path)
    ingress = router.port_of()
    manifest = {"backend": backend.address, "listen": listen(port, "tcp")}
    old = new = None
    try:
        assert (await api(ingress, "PUT", "/_api/projects/again", manifest))[0] == 201
        old = await in_thread(connect, port)
        assert await in_thread(say, old, b"old") == b"old"
        assert await api(ingress, "DELETE", "/_api/projects/again") == (204, b"")
        assert (await api(ingress, "PUT", "/_api/projects/again", manifest))[0] == 201
        new = await in_thread(connect, port)
        assert await in_thread(say, new, b"new") == b"new"
        clock.advance(5.0)
        assert await in_thread(closed_by_peer, old)
        assert await in_thread(say, new, b"still here") == b"still here"
        assert len(router.sessions.live) == 1
    finally:
        for sock in (old, new):
            if sock is not None:
                sock.close()
        await stop_clocked(router, clock)
        backend.close()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"closed before {marker!r}: {got!r}")
        got += data
    return got


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_delete_drains_kept_alive_http_clients(tmp_path: Path) -> None:
    """
    On a removed project's own HTTP port, an idle kept-alive connection is
    closed at once, a busy one after its answer, and one whose answer never
    ends at the drain timeout; none of them sends another request there.
    """
    web = Backend()
    port = free_port()
    router, clock = clocked_router(tmp_path)
    ingress = router.port_of()
    idle = streaming = stuck = None
    try:
        assert (await api(ingress, "PUT", "/_api/projects/site",
                          {"backend": web.address, "listen": listen(port, "http")}))[0] == 201
        listener = router.listeners["site"]
        idle, streaming, stuck = [await in_thread(connect, port) for _ in range(3)]
        head = b"Host: h\r\n\r\n"
        idle.sendall(b"GET /one HTTP/1.1\r\n" + head)
        assert (await in_thread(read_until, idle, b"backend saw GET /one\n")).startswith(b"HTTP/1.1 200")
        streaming.sendall(b"GET /sse?n=2 HTTP/1.1\r\n" + head)
        web.stats.sse_release.release()
        await in_thread(read_until, streaming, b"data: event 0")
        stuck.sendall(b"GET /slow HTTP/1.1\r\n" + head)
        await wait_for(lambda: sum(c.busy for c in listener.factory.channels) == 2, what="both requests")

        assert await api(ingress, "DELETE", "/_api/projects/site") == (204, b"")
        assert await in_thread(refuses, port)
        assert await in_thread(closed_by_peer, idle)
        # The streaming answer goes on to its end, and then the connection closes.
        web.stats.sse_release.release()
        rest = await in_thread(read_to_end, streaming)
        assert b"data: event 1" in rest and rest.endswith(b"0\r\n\r\n")
        # The answer that never ends is cut at the drain timeout, not before.
        clock.advance(4.9)
        assert [c.busy for c in listener.factory.channels] == [True]
        clock.advance(0.1)
        assert await in_thread(closed_by_peer, stuck)
        await wait_for(lambda: not listener.factory.channels, what="the channels to go")
    finally:
        for sock in (idle, streaming, stuck):
            if sock is not None:
                sock.close()
        await stop_clocked(router, clock)
        web.close()


@pytest_twisted.ensureDeferred
async def test_delete_drain_in_real_time(tmp_path: Path) -> None:
    """
    The same on the real reactor: the drain timer is the one that closes the
    connection (its log line says so). When, to the tenth, is the Clock
    test's to say above, not a wall clock's.
    """
    backend = ThreadServer(echo)
    port = free_port()
    router = await api_router(tmp_path, drain_timeout=0.5)
    ingress = router.port_of()
    sock = None
    ended: list[dict[str, Any]] = []  # the log events of finished sessions
    globalLogPublisher.addObserver(ended.append)
    try:
        assert (await api(ingress, "PUT", "/_api/projects/goner",
                          {"backend": backend.address, "listen": listen(port, "tcp")}))[0] == 201
        sock = await in_thread(connect, port)
        assert await in_thread(say, sock, b"hello") == b"hello"
        assert await api(ingress, "DELETE", "/_api/projects/goner") == (204, b"")
        assert await in_thread(refuses, port)
        assert await in_thread(say, sock, b"still") == b"still"
        await wait_for(lambda: not router.sessions.live, 10, "the drain timeout to close the connection")
        assert await in_thread(closed_by_peer, sock)
        assert [e["reason"] for e in ended if e.get("project") == "goner" and "reason" in e] == [
            "project removed; closed after the drain timeout (0.5 s)"]
    finally:
        globalLogPublisher.removeObserver(ended.append)
        if sock is not None:
            sock.close()
        await router.stopService()
        backend.close()


# -- the state file -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_state_file_that_cannot_be_written_refuses_the_change(tmp_path: Path, monkeypatch: Any) -> None:
    backend = ThreadServer(echo)
    first, second = distinct_ports(2)
    router = await api_router(tmp_path)
    ingress = router.port_of()
    state_file = tmp_path / "state" / "projects.json"
    snapshot = Snapshot(ingress, state_file, router)
    try:
        assert (await api(ingress, "PUT", "/_api/projects/kept",
                          {"backend": backend.address, "listen": listen(first, "tcp")}))[0] == 201
        before = await snapshot.take()
        real_replace = os.replace

        def failing_replace(src: Any, dst: Any) -> None:
            if str(dst) == str(state_file):
                raise OSError(28, "No space left on device")
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_replace)
        attempts = [
            ("PUT", "/_api/projects/new", {"backend": backend.address, "listen": listen(second, "tcp")}),
            ("PUT", "/_api/projects/kept", {"backend": backend.address, "listen": listen(second, "tcp")}),
            ("DELETE", "/_api/projects/kept", None),
        ]
        for method, path, body in attempts:
            status, answer = await api(ingress, method, path, body)
            assert (status, answer) == (500, {"error": {
                "code": "state_unwritable",
                "message": f"cannot write {state_file}: No space left on device; nothing was changed",
            }}), (method, path)
            assert await snapshot.take() == before
            # The port bound for the refused change is released again; the old one serves.
            assert await in_thread(refuses, second)
            assert await in_thread(roundtrip, first, b"kept") == b"kept"
            assert sorted(os.listdir(state_file.parent)) == ["projects.json"], "a temporary file was left"

        monkeypatch.setattr(os, "replace", real_replace)
        assert (await api(ingress, "PUT", "/_api/projects/new",
                          {"backend": backend.address, "listen": listen(second, "tcp")}))[0] == 201
        assert await in_thread(roundtrip, second, b"new") == b"new"
    finally:
        await router.stopService()
        backend.close()


def saved_state(directory: Path, *names: str) -> State:
    state = State(str(directory))
    state.save(parse_project({"name": n, "backend": f"tcp:{LOOPBACK}:1"}, static=False) for n in names)
    return state


def test_state_load_refuses_a_truncated_file(tmp_path: Path) -> None:
    state = saved_state(tmp_path, "one", "two")
    assert [p.name for p in state.load(Limits())] == ["one", "two"]
    whole = Path(state.path).read_bytes()
    Path(state.path).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StateError) as info:
        state.load(Limits())
    message = str(info.value)
    assert message.startswith(f"{state.path}: not valid JSON (line ")
    assert "it may be truncated or corrupt" in message and "\n" not in message


@pytest.mark.parametrize("content, problem", [
    (b"", "not valid JSON"),
    (b"[]\n", "not a portrouter state file (version 1)"),
    (b'{"version": 2, "projects": []}\n', "not a portrouter state file (version 1)"),
    (b'{"version": 1, "projects": [{"name": "x", "backend": "tcp:127.0.0.1:1", "listen": {"port": 0}}]}\n',
     "projects[0].listen.port: 0 is not a port (1-65535)"),
])
def test_state_load_refuses_what_is_not_a_state_file(tmp_path: Path, content: bytes, problem: str) -> None:
    state = State(str(tmp_path))
    Path(state.path).write_bytes(content)
    with pytest.raises(StateError) as info:
        state.load(Limits())
    assert str(info.value).startswith(f"{state.path}: {problem}")


def test_state_load_without_a_file_is_empty(tmp_path: Path) -> None:
    assert State(str(tmp_path / "nothing-yet")).load(Limits()) == []


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_state_save_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: Any, failing: str
) -> None:
    state = saved_state(tmp_path, "old")
    old = Path(state.path).read_bytes()

    def fail(*args: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(portrouter.state.os, failing, fail)
    with pytest.raises(OSError):
        state.save([parse_project({"name": "new", "backend": f"tcp:{LOOPBACK}:1"}, static=False)])
    monkeypatch.undo()
    assert Path(state.path).read_bytes() == old
    assert os.listdir(tmp_path) == ["projects.json"]
    assert [p.name for p in state.load(Limits())] == ["old"]


def test_state_save_committed_by_the_rename_even_if_the_directory_sync_fails(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The rename is the commit point: after it, save() must not say that nothing changed."""
    state = saved_state(tmp_path, "old")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(portrouter.state.os, "fsync", fsync)
    state.save([parse_project({"name": "new", "backend": f"tcp:{LOOPBACK}:1"}, static=False)])
    monkeypatch.undo()
    assert [p.name for p in state.load(Limits())] == ["new"]
    assert os.listdir(tmp_path) == ["projects.json"]


# -- a real twistd: restart, a truncated state file, SIGHUP ------------------------------------


def write_config(path: Path, state: Path, *projects: str) -> None:
    lines = [f"ingress: tcp:0:interface={LOOPBACK}", f"state: {state}", "drain_timeout: 5", "projects:"]
    path.write_text("\n".join(lines + [f"  - {p}" for p in projects]) + "\n")


def tcp_project(name: str, port: int, backend: str) -> str:
    return f"{{name: {name}, backend: '{backend}', listen: {{port: {port}, protocol: tcp, interface: {LOOPBACK}}}}}"


async def stop_twistd(daemon: Twistd) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    code = await daemon.wait_exit()
    assert code == 0, "\n".join(daemon.output + daemon.errors)


@pytest_twisted.ensureDeferred
async def test_projects_deployed_through_the_api_come_back_after_a_restart(tmp_path: Path) -> None:
    backend = ThreadServer(echo)
    port = free_port()
    config, state = tmp_path / "routes.yaml", tmp_path / "state"
    write_config(config, tmp_path / "not-this-one")
    manifest = {"backend": backend.address, "listen": listen(port, "tcp")}
    first = Twistd("--config", str(config), "--state", str(state))
    second = None
    try:
        ingress = await first.ingress_port()
        assert await api(ingress, "PUT", "/_api/projects/kept", manifest) == (
            201, {"name": "kept", **manifest, "source": "api"})
        assert await in_thread(roundtrip, port, b"first life") == b"first life"
        await stop_twistd(first)
        assert json.loads((state / "projects.json").read_text())["projects"] == [{"name": "kept", **manifest}]
        assert not (tmp_path / "not-this-one").exists(), "--state did not win over the file"

        second = Twistd("--config", str(config), "--state", str(state))
        assert await second.port_of("kept") == port
        ingress = await second.ingress_port()
        assert await in_thread(roundtrip, port, b"second life") == b"second life"
        assert await api(ingress, "GET", "/_api/projects/kept") == (
            200, {"name": "kept", **manifest, "source": "api"})
        # Still the API's: it can be deleted, and stays deleted.
        assert await api(ingress, "DELETE", "/_api/projects/kept") == (204, b"")
        await stop_twistd(second)
        assert json.loads((state / "projects.json").read_text())["projects"] == []
    finally:
        first.stop()
        if second is not None:
            second.stop()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_truncated_state_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config, state = tmp_path / "routes.yaml", tmp_path / "state"
    write_config(config, state)
    saved = saved_state(state, "one", "two")
    whole = Path(saved.path).read_bytes()
    Path(saved.path).write_bytes(whole[: len(whole) // 2])  # a crash in the middle of a plain write
    daemon = Twistd("--config", str(config))
    try:
        assert await daemon.wait_exit() != 0
        assert len(daemon.errors) == 1, daemon.errors
        assert daemon.errors[0].startswith(f"{saved.path}: not valid JSON (line ")
        assert "truncated" in daemon.errors[0]
        assert not daemon.find("listening on"), "something was bound"
        assert Path(saved.path).read_bytes() == whole[: len(whole) // 2], "the file was touched"
    finally:
        daemon.stop()


def udp_project(name: str, port: int, backend: int) -> str:
    return (f"{{name: {name}, backend: '{LOOPBACK}:{backend}', "
            f"listen: {{port: {port}, protocol: udp, interface: {LOOPBACK}}}}}")


def udp_ask(port: int, message: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(message, (LOOPBACK, port))
        return sock.recv(65535)


@pytest_twisted.ensureDeferred
async def test_a_reload_hands_ports_over_between_projects(tmp_path: Path) -> None:
    """
    Renaming a project, two projects swapping ports and a UDP route renamed,
    in one reload: each port is handed over on its bound socket (new ports are
    bound before old ones close, so binding again would find them in use).
    """
    one, two = ThreadServer(tagged_echo(b"1:")), ThreadServer(tagged_echo(b"2:"))
    udp_one, udp_two = UDPEcho(), UDPEcho()
    renamed, p, q = distinct_ports(3)
    (dns,) = distinct_ports(1, socket.SOCK_DGRAM)
    config, state = tmp_path / "routes.yaml", tmp_path / "state"
    write_config(
        config, state,
        tcp_project("old", renamed, one.address),
        tcp_project("x", p, one.address), tcp_project("y", q, two.address),
        udp_project("dns", dns, udp_one.port),
    )
    daemon = Twistd("--config", str(config))
    sock = None
    try:
        await daemon.ingress_port()
        for name in ("old", "x", "y", "dns"):
            await daemon.port_of(name)
        sock = await in_thread(connect, renamed)
        assert await in_thread(say, sock, b"before") == b"1:before"
        assert await in_thread(udp_ask, dns, b"q1") == b"q1"
        assert udp_one.received == 1

        write_config(
            config, state,
            tcp_project("new", renamed, two.address),
            tcp_project("x", q, one.address), tcp_project("y", p, two.address),
            udp_project("dns2", dns, udp_two.port),
        )
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_line(rf"reloaded {re.escape(str(config))}: 2 added, 2 removed, 2 changed")
        for line in (f"tcp route new takes over 127.0.0.1:{renamed} from project old",
                     f"tcp route x takes over 127.0.0.1:{q} from project y",
                     f"tcp route y takes over 127.0.0.1:{p} from project x",
                     f"udp route dns2 takes over 127.0.0.1:{dns} from project dns"):
            assert daemon.find(re.escape(line)), line
        assert await in_thread(say, sock, b"during") == b"1:during"  # the old name's connection goes on
        assert await in_thread(roundtrip, renamed, b"a") == b"2:a"
        assert await in_thread(roundtrip, p, b"b") == b"2:b"
        assert await in_thread(roundtrip, q, b"c") == b"1:c"
        assert await in_thread(udp_ask, dns, b"q2") == b"q2"
        assert (udp_one.received, udp_two.received) == (1, 1)
        for port in (renamed, p, q, dns):  # bound once, at start-up
            assert len([l for l in daemon.output if l.endswith(f"listening on 127.0.0.1:{port}")]) == 1, port
        status, body = await api(await daemon.ingress_port(), "GET", "/_api/routes")
        assert {(r["project"], r["port"]) for r in body["routes"] if r["project"]} == {
            ("new", renamed), ("x", q), ("y", p), ("dns2", dns)}
        sock.close()
        await stop_twistd(daemon)
    finally:
        if sock is not None:
            sock.close()
        daemon.stop()
        for server in (one, two):
            server.close()
        udp_one.close()
        udp_two.close()


@pytest_twisted.ensureDeferred
async def test_sighup_and_api_changes_wait_for_a_hand_over_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A reload that hands a port over (project "old" renamed "new") is held
    between binding and switching tables; meanwhile a real SIGHUP (through the
    daemon's own handler), an API deploy and ``POST /_api/reload`` arrive. Each
    waits for the change before it (one lock, in the router), all apply in
    order, every port ends bound once by this process, and the table is the
    last one.
    """
    renamed, added, deployed = distinct_ports(3)
    backend = f"tcp:{LOOPBACK}:9"  # nothing connects
    config, state = tmp_path / "routes.yaml", tmp_path / "state"
    write_config(config, state, tcp_project("old", renamed, backend))
    reads: list[str] = []

    def read() -> Config:
        reads.append(config.read_text())
        return load(str(config))

    router = _Daemon(load(str(config)), reactor, Front, reload_config=read)
    signals = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        router.privilegedStartService()
        router.startService()  # installs the daemon's signal handlers (the reactor runs)
        assert signal.getsignal(signal.SIGHUP) is not signals[signal.SIGHUP]
        gate: defer.Deferred[None] = defer.Deferred()
        commits: list[list[str]] = []
        commit = router._commit

        def held(table: Any, bound: Any, *, first: bool = False) -> Any:
            commits.append(sorted(table.projects))
            if len(commits) == 1:  # the first change: bound, not switched yet
                return gate.addCallback(lambda _: commit(table, bound, first=first))
            return commit(table, bound, first=first)

        monkeypatch.setattr(router, "_commit", held)
        hups: list[int] = []
        on_hup = router._reload
        monkeypatch.setattr(router, "_reload", lambda: (hups.append(1), on_hup()))

        write_config(config, state, tcp_project("new", renamed, backend))
        first = defer.Deferred.fromCoroutine(router.reload())
        await wait_for(lambda: commits, what="the first reload to bind")
        assert not first.called

        write_config(config, state, tcp_project("new", renamed, backend), tcp_project("extra", added, backend))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: hups, what="the SIGHUP handler")
        put, post = Answer(), Answer()
        handler = router.front.api.handler(put, api_request(b"PUT", b"/_api/projects/api1", LOOPBACK),  # type: ignore[arg-type]
                                     b"projects/api1")
        handler.body(json.dumps({"backend": backend, "listen": listen(deployed, "tcp")}).encode())
        handler.end()
        router.front.api.handler(post, api_request(b"POST", b"/_api/reload", LOOPBACK), b"reload").end()  # type: ignore[arg-type]
        # All three wait: the second file is not even read, nothing answered.
        assert (len(reads), commits, put.sent, post.sent) == (1, [["new"]], [], [])

        gate.callback(None)
        await first
        await wait_for(lambda: post.sent, what="the API's reload to be answered")
        assert commits == [["new"], ["extra", "new"], ["api1", "extra", "new"], ["api1", "extra", "new"]]
        assert len(reads) == 3
        assert put.sent[0][0] == 201, put.sent
        assert (post.sent[0][0], json.loads(post.sent[0][1])) == (
            200, {"reloaded": True, "changed": {"added": [], "removed": [], "changed": []}})
        assert sorted(router.table.projects) == ["api1", "extra", "new"]
        assert {name: router.port_of(name) for name in router.listeners} == {
            "new": renamed, "extra": added, "api1": deployed}
        want = {("tcp", port): 1 for port in (renamed, added, deployed)}
        await wait_for(lambda: our_sockets([renamed, added, deployed]) == want,
                       what=f"each port bound once by this process: {want}")
        assert await in_thread(lambda: connect(renamed).close()) is None
    finally:
        for signum, handler_before in signals.items():
            signal.signal(signum, handler_before)
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_sighup_applies_the_difference_and_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    one, two, three = ThreadServer(tagged_echo(b"1:")), ThreadServer(tagged_echo(b"2:")), ThreadServer(echo)
    keep_port, gone_port, new_port, alt_port, dyn_port = distinct_ports(5)
    config, state = tmp_path / "routes.yaml", tmp_path / "state"
    write_config(
        config, state,
        tcp_project("keep", keep_port, one.address),
        tcp_project("gone", gone_port, one.address),
        tcp_project("alt", alt_port, one.address),
    )
    daemon = Twistd("--config", str(config))
    sock = None
    try:
        ingress = await daemon.ingress_port()
        for name in ("keep", "gone", "alt"):
            await daemon.port_of(name)
        assert (await api(ingress, "PUT", "/_api/projects/dyn",
                          {"backend": three.address, "listen": listen(dyn_port, "tcp")}))[0] == 201
        sock = await in_thread(connect, keep_port)
        assert await in_thread(say, sock, b"before") == b"1:before"

        write_config(
            config, state,
            tcp_project("keep", keep_port, one.address),  # unchanged
            tcp_project("alt", alt_port, two.address),  # another backend, same port
            tcp_project("new", new_port, two.address),  # added; "gone" removed
        )
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_line(rf"reloaded {re.escape(str(config))}: 1 added, 1 removed, 1 changed")
        assert await in_thread(say, sock, b"during") == b"1:during"
        assert await in_thread(roundtrip, new_port, b"x") == b"2:x"
        assert await in_thread(roundtrip, alt_port, b"y") == b"2:y"
        # The log line is written just before the released port closes (on
        # the daemon's next turn).
        await until_refused(gone_port)
        assert await in_thread(roundtrip, dyn_port, b"z") == b"z"
        assert await in_thread(roundtrip, keep_port, b"k") == b"1:k"
        # The unchanged listener and the changed-in-place one were never rebound.
        for name in ("keep", "alt"):
            assert len([l for l in daemon.output if f"tcp route {name} listening on" in l]) == 1, name
        status, body = await api(ingress, "GET", "/_api/projects")
        assert status == 200
        assert {p["name"]: p["source"] for p in body["projects"]} == {
            "keep": "config", "alt": "config", "new": "config", "dyn": "api"}

        # An invalid file: 400 with the file's own message; nothing changes.
        _, routes_before = await api(ingress, "GET", "/_api/routes")
        write_config(
            config, state,
            tcp_project("keep", keep_port, one.address),
            f"{{name: big, backend: '{one.address}', listen: {{port: 70000, protocol: tcp}}}}",
        )
        status, body = await api(ingress, "POST", "/_api/reload")
        assert (status, body) == (400, {"error": {
            "code": "invalid", "field": "projects[1].listen.port",
            "message": f"{config}: projects[1].listen.port: 70000 is not a port (1-65535)",
        }})
        # The same by SIGHUP: logged, refused.
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_line(r"reload refused: .*70000 is not a port")
        assert await api(ingress, "GET", "/_api/routes") == (200, routes_before)
        assert await in_thread(say, sock, b"after") == b"1:after"
        for port, reply in ((new_port, b"2:n"), (alt_port, b"2:n"), (dyn_port, b"n")):
            assert await in_thread(roundtrip, port, b"n") == reply
        assert daemon.proc.poll() is None

        # A valid file again, by POST: the answer says what changed.
        write_config(config, state, tcp_project("keep", keep_port, one.address))
        assert await api(ingress, "POST", "/_api/reload") == (200, {
            "reloaded": True, "changed": {"added": [], "removed": ["alt", "new"], "changed": []}})
        assert await in_thread(say, sock, b"last") == b"1:last"
        sock.close()
        await stop_twistd(daemon)
    finally:
        if sock is not None:
            sock.close()
        daemon.stop()
        for server in (one, two, three):
            server.close()


# -- the routes table as text, for curl ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_curl_reads_the_routes_as_an_aligned_table(tmp_path: Path) -> None:
    ingress, http_port, tcp_port = sorted(distinct_ports(3))
    udp_port = free_port(socket.SOCK_DGRAM)
    router = await api_router(
        tmp_path, ingress=f"tcp:{ingress}:interface={LOOPBACK}",
        projects=(parse_project({"name": "web", "backend": "tcp:127.0.0.1:4000"}),),
    )
    deployed = {
        "my-api": {"backend": "tcp:127.0.0.1:3001", "listen": listen(http_port, "http")},
        "my-socket": {"backend": "tcp:127.0.0.1:5001", "listen": listen(tcp_port, "tcp")},
        "dns": {"backend": "127.0.0.1:53", "listen": listen(udp_port, "udp")},
    }
    try:
        for name, manifest in deployed.items():
            assert (await api(ingress, "PUT", f"/_api/projects/{name}", manifest))[0] == 201
        #        Host port  Protocol  Project    Backend
        rows = sorted([
            ((ingress, 0), f"{ingress:<9}  http      web        tcp:127.0.0.1:4000 (path /web/)"),
            ((http_port, 1), f"{http_port:<9}  http      my-api     tcp:127.0.0.1:3001"),
            ((tcp_port, 1), f"{tcp_port:<9}  tcp       my-socket  tcp:127.0.0.1:5001"),
            ((udp_port, 1), f"{udp_port:<9}  udp       dns        127.0.0.1:53"),
        ])
        expected = "\n".join([
            "Host port  Protocol  Project    Backend",
            f"{ingress:<9}  http      -          path-based routing",
            *(line for _, line in rows),
        ]) + "\n"

        def curl(*args: str) -> bytes:
            return subprocess.run(["curl", "-s", "--max-time", "30", *args],
                                  check=True, capture_output=True).stdout

        base = f"http://{LOOPBACK}:{ingress}/_api/routes"
        assert (await in_thread(curl, f"{base}?format=text")).decode() == expected
        assert (await in_thread(curl, "-H", "Accept: text/plain", base)).decode() == expected
        status, headers, _ = await in_thread(call, ingress, "GET", "/_api/routes?format=text")
        assert (status, headers["content-type"]) == (200, "text/plain; charset=utf-8")

        # The JSON form holds the same rows.
        status, body = await api(ingress, "GET", "/_api/routes")
        assert status == 200
        assert body["routes"][0] == {"port": ingress, "protocol": "http", "project": None,
                                     "backend": "path-based routing", "interface": LOOPBACK}
        assert {"port": ingress, "protocol": "http", "project": "web", "backend": "tcp:127.0.0.1:4000",
                "path": "/web/"} in body["routes"]
        assert [(r["port"], r["project"]) for r in body["routes"]] == [(ingress, None)] + [
            (port, line.split()[2]) for (port, _), line in rows]
        assert json.loads(await in_thread(curl, base)) == body
    finally:
        await router.stopService()


# -- who may call the API ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_section_needs_an_admin_token_except_for_health(tmp_path: Path) -> None:
    backend = ThreadServer(echo)
    port = free_port()
    auth = Auth(tokens=(
        Token(secret=ADMIN, admin=True, projects=("*",)),
        Token(secret=USER, admin=False, projects=("*",)),
    ))
    router = await api_router(tmp_path, auth=auth)
    ingress = router.port_of()
    as_admin = {"Authorization": f"Bearer {ADMIN}"}
    snapshot = Snapshot(ingress, tmp_path / "state" / "projects.json", router, as_admin)
    as_user = {"Authorization": f"Bearer {USER}"}
    manifest = {"backend": backend.address, "listen": listen(port, "tcp")}
    try:
        assert await api(ingress, "GET", "/_api/health") == (200, {"status": "ok"})
        before = await snapshot.take()
        for method, path, body in [
            ("GET", "/_api/routes", None), ("GET", "/_api/projects", None), ("GET", "/_api/metrics", None),
            ("PUT", "/_api/projects/p", manifest), ("DELETE", "/_api/projects/p", None),
            ("POST", "/_api/reload", None), ("GET", "/_api/nodes", None), ("GET", "/_api/nosuch", None),
        ]:
            status, headers, raw = await in_thread(call, ingress, method, path, body)
            assert (status, json.loads(raw)["error"]["code"]) == (401, "unauthorized"), (method, path)
            assert headers["www-authenticate"] == 'Bearer realm="portrouter"'
            for who, code in ((as_user, "not an admin credential"), ({"Authorization": "Bearer wrong"},
                                                                     "invalid token")):
                status, answer = await api(ingress, method, path, body, who)
                assert (status, answer["error"]["code"]) == (403, "forbidden"), (method, path, who)
                assert code in answer["error"]["message"]
        assert await snapshot.take() == before
        assert await in_thread(refuses, port)

        status, answer = await api(ingress, "PUT", "/_api/projects/p", manifest, as_admin)
        assert status == 201
        assert await in_thread(roundtrip, port, b"admin") == b"admin"
        # The token may also come as ?token= (browsers).
        status, answer = await api(ingress, "GET", f"/_api/projects/p?token={ADMIN}")
        assert (status, answer["name"]) == (200, "p")
        before = await snapshot.take()
        status, answer = await api(ingress, "DELETE", "/_api/projects/p", None, as_user)
        assert status == 403
        assert await snapshot.take() == before
        assert await in_thread(roundtrip, port, b"still") == b"still"
        assert await api(ingress, "DELETE", "/_api/projects/p", None, as_admin) == (204, b"")
    finally:
        await router.stopService()
        backend.close()


class Answer:
    """A stand-in for the channel an API handler answers on."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]] = []

    def send(self, status: int, body: bytes, content_type: bytes = b"", headers: Any = ()) -> None:
        self.sent.append((status, body, content_type, list(headers)))

    def respond(self, status: int, headers: Any, *, length: int | None) -> None:
        self.sent.append((status, b"", b"", list(headers)))

    def finish(self) -> None:
        pass


def api_request(method: bytes, target: bytes, client: str, headers: list[tuple[bytes, bytes]] = ()) -> Request:
    request = Request(client, False, 0.0)
    request.method = method
    request.target = target
    request.path, _, request.query = target.partition(b"?")
    request.headers = list(headers)
    return request


def answer_of(api: API, method: bytes, path: bytes, client: str, body: bytes = b"") -> tuple[int, Any]:
    """Hand one request to the API handler in-process; its answer."""
    channel = Answer()
    rest = path[len(b"/_api/"):]
    handler = api.handler(channel, api_request(method, path, client), rest)  # type: ignore[arg-type]
    if body:
        handler.body(body)
    handler.end()
    assert len(channel.sent) == 1
    status, raw, _, _ = channel.sent[0]
    return status, (json.loads(raw) if raw else None)


@pytest.mark.parametrize("client", ["192.0.2.1", "10.0.0.1", "::ffff:192.0.2.1", "2001:db8::1", "unix"])
def test_without_auth_section_only_loopback_clients_are_answered(tmp_path: Path, client: str) -> None:
    """
    Every 127/8 address is loopback to the kernel and to portrouter, so a
    refused client cannot come over a real socket here: the request is handed
    to the handler in-process, from a documentation address.
    """
    router = RouterService(Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state")), reactor, Front)
    body = json.dumps({"backend": f"tcp:{LOOPBACK}:1"}).encode()
    for method, path in [(b"GET", b"/_api/routes"), (b"GET", b"/_api/projects"), (b"GET", b"/_api/metrics"),
                         (b"PUT", b"/_api/projects/p"), (b"DELETE", b"/_api/projects/p"),
                         (b"POST", b"/_api/reload")]:
        status, answer = answer_of(router.front.api, method, path, client, body if method == b"PUT" else b"")
        assert status == 403, (method, path)
        assert answer == {"error": {"code": "forbidden",
                                    "message": "without an auth section only loopback clients are answered"}}
    assert "p" not in router.table.projects
    assert not (tmp_path / "state" / "projects.json").exists()
    # The same handler answers a loopback client.
    for client in ("127.0.0.1", "127.0.0.2", "::1"):
        status, answer = answer_of(router.front.api, b"GET", b"/_api/projects", client)
        assert (status, answer) == (200, {"projects": []})


# -- metrics ------------------------------------------------------------------------------------

ECHO_SERVICE = """
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(16)

def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


def samples(text: str) -> tuple[set[str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The family names and every sample, keyed by name and labels."""
    names: set[str] = set()
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return names, values


def sample(values: dict[Any, float], name: str, **labels: str) -> float | None:
    return values.get((name, frozenset(labels.items())))


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_count_the_traffic(tmp_path: Path) -> None:
    web, tcp_backend, udp_backend = Backend(), ThreadServer(echo), UDPEcho(tag=b"udp:")
    http_port, tcp_port, down_port, started_port, service_port, nobody = distinct_ports(6)
    udp_port = free_port(socket.SOCK_DGRAM)
    router = await api_router(tmp_path)
    ingress = router.port_of()
    deployed = {
        "site": {"backend": web.address, "listen": listen(http_port, "http")},
        "sock": {"backend": tcp_backend.address, "listen": listen(tcp_port, "tcp")},
        "down": {"backend": f"tcp:{LOOPBACK}:{nobody}", "listen": listen(down_port, "tcp")},
        "dns": {"backend": udp_backend.address, "listen": listen(udp_port, "udp")},
        "ondemand": {"backend": f"tcp:{LOOPBACK}:{service_port}", "listen": listen(started_port, "tcp"),
                     "command": [sys.executable, "-c", ECHO_SERVICE, str(service_port)]},
    }
    held = None
    try:
        for name, manifest in deployed.items():
            assert (await api(ingress, "PUT", f"/_api/projects/{name}", manifest))[0] == 201
        for path in ("/a", "/b", "/c", "/status?code=404"):
            await in_thread(http_get, http_port, path)
        assert await in_thread(roundtrip, tcp_port, b"x" * 100) == b"x" * 100
        await wait_for(lambda: not router.sessions.live, what="the TCP session to end")
        held = await in_thread(connect, tcp_port)
        assert await in_thread(say, held, b"y" * 10) == b"y" * 10

        def refused_backend_closes() -> bool:
            with connect(down_port) as sock:
                return closed_by_peer(sock)

        assert await in_thread(refused_backend_closes)
        assert await in_thread(udp_exchange, udp_port, b"q") == b"udp:q"
        assert await in_thread(roundtrip, started_port, b"started") == b"started"

        status, headers, raw = await in_thread(call, ingress, "GET", "/_api/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        names, values = samples(raw.decode())
        assert {
            "portrouter_connections_active", "portrouter_connections", "portrouter_bytes",
            "portrouter_http_requests", "portrouter_backend_connect_failures", "portrouter_udp_sessions",
            "portrouter_service_starts",
        } <= names
        assert sample(values, "portrouter_connections_active", project="sock", protocol="tcp") == 1
        assert sample(values, "portrouter_connections_total", project="sock", protocol="tcp") == 2
        assert sample(values, "portrouter_connections_total", project="down", protocol="tcp") == 1
        assert sample(values, "portrouter_connections_total", project="ondemand", protocol="tcp") == 1
        # Bytes are counted when a connection ends: the held one is not in yet.
        assert sample(values, "portrouter_bytes_total", project="sock", protocol="tcp", direction="in") == 100
        assert sample(values, "portrouter_bytes_total", project="sock", protocol="tcp", direction="out") == 100
        assert sample(values, "portrouter_http_requests_total", project="site", code="2xx") == 3
        assert sample(values, "portrouter_http_requests_total", project="site", code="4xx") == 1
        assert sample(values, "portrouter_backend_connect_failures_total", project="down", reason="refused") == 1
        assert sample(values, "portrouter_backend_connect_failures_total", project="sock", reason="refused") is None
        assert sample(values, "portrouter_udp_sessions", project="dns") == 1
        assert sample(values, "portrouter_service_starts_total", project="ondemand", service="") == 1

        held.close()
        await wait_for(lambda: not router.sessions.live, what="the held session to end")
        _, values = samples((await in_thread(call, ingress, "GET", "/_api/metrics"))[2].decode())
        assert sample(values, "portrouter_connections_active", project="sock", protocol="tcp") is None
        assert sample(values, "portrouter_bytes_total", project="sock", protocol="tcp", direction="in") == 110
    finally:
        if held is not None:
            held.close()
        await router.stopService()
        web.close()
        tcp_backend.close()
        udp_backend.close()


@pytest_twisted.ensureDeferred
async def test_projects_may_take_the_names_of_the_routers_own_ports(tmp_path: Path) -> None:
    """
    "ingress", "manhole", "tls-front" are project names like any other: the
    router's own listeners are named so that no project can be (failed
    before the fix: a 500, two services of one name).
    """
    backend = ThreadServer(echo)
    router = await api_router(tmp_path)
    ingress = router.port_of()
    try:
        for name in ("ingress", "manhole", "tls-front", "events"):
            port = free_port()
            status, body = await api(ingress, "PUT", f"/_api/projects/{name}",
                                     {"backend": backend.address, "listen": listen(port, "tcp")})
            assert status == 201, body
            assert await in_thread(roundtrip, port, b"hello") == b"hello"
        status, _ = await api(ingress, "GET", "/_api/routes")
        assert status == 200  # the ingress itself still answers
        for name in ("ingress", "manhole", "tls-front", "events"):
            assert (await api(ingress, "DELETE", f"/_api/projects/{name}"))[0] == 204
    finally:
        await router.stopService()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_head_answers_what_get_would_without_the_body(tmp_path: Path) -> None:
    """
    Every reading endpoint takes HEAD, as every HTTP server must (RFC 9110):
    GET's head, no body; a method not taken is a 405 with Allow.
    """
    router = await api_router(tmp_path, projects=(parse_project({"name": "web", "backend": "tcp:127.0.0.1:4000"}),))
    port = router.port_of()
    try:
        for path in ("/_api/routes", "/_api/routes?format=text", "/_api/projects", "/_api/projects/web",
                     "/_api/metrics", "/_api/projects/nope"):
            get_status, get_headers, body = await in_thread(call, port, "GET", path)
            head_status, head_headers, nothing = await in_thread(call, port, "HEAD", path)
            assert (head_status, nothing) == (get_status, b""), path
            assert head_headers["content-type"] == get_headers["content-type"], path
            if path != "/_api/metrics":  # its counters may move between the two calls
                assert int(head_headers["content-length"]) == len(body), path
        # A method a project does not take: 405, saying which it takes.
        status, headers, body = await in_thread(call, port, "PATCH", "/_api/projects/web")
        assert (status, headers["allow"]) == (405, "GET, HEAD, PUT, DELETE")
        assert json.loads(body)["error"] == {"code": "method_not_allowed", "message": "PATCH is not allowed here"}
    finally:
        await router.stopService()
