"""
Operating portrouter: the SSH manhole, graceful shutdown (SIGTERM drains, a
second signal stops at once), max_connections for every route kind,
idle_timeout, slow request heads, and the logs (JSON lines and twistd's own).

The daemon-level behaviour is checked on a real ``twistd -n portrouter`` with
real clients (OpenSSH's ``ssh``, blocking sockets in threads); the timer logic
of idle_timeout also with a Clock.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from portrouter.config import parse_project
from portrouter.model import Config, Limits
from portrouter.manhole import HOST_KEY
from portrouter.relay import StreamSide, pair_streams
from portrouter.sessions import Sessions
from tests.httpbackend import Backend, raw_request
from tests.support import (
    LOOPBACK,
    ClockedReactor,
    MiB,
    RawWebSocket,
    ThreadServer,
    Twistd,
    closes_when_idle,
    free_port,
    in_thread,
    pattern,
    start_router,
    stop_clocked,
    twistd_path,
    wait_for,
)


# -- helpers ------------------------------------------------------------------------------


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=timeout)


def roundtrip(sock: socket.socket, message: bytes) -> bytes:
    """Send C{message} on an open connection to an echo backend; read it back."""
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:C{port} is refused (nothing listens)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def refused_at_limit(ingress: int) -> dict[tuple[str, str], float]:
    """``portrouter_connections_refused_at_limit`` by (project, protocol), from /_api/metrics."""
    status, _, body = get(ingress, "/_api/metrics")
    assert status == 200
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "portrouter_connections_refused_at_limit_total":
                found[(sample.labels["project"], sample.labels["protocol"])] = sample.value
    return found


class LogEvents:
    """The router's structured log events while a test runs (in-process routers)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> LogEvents:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def ended(self, protocol: str, project: str) -> list[dict[str, Any]]:
        """The finished-session lines of one route."""
        return [e for e in list(self.events)
                if e.get("protocol") == protocol and e.get("project") == project and "bytes_in" in e]


def base_config(tmp_path: Path, **extra: Any) -> Config:
    """In-process routers: loopback ingress on port 0, state in tmp_path, short drain."""
    return Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"),
                  drain_timeout=5, **extra)


def route(backend: str) -> str:
    return f"tcp:0:interface={LOOPBACK} -> {backend}"


class Daemon(Twistd):
    """L{Twistd} with twistd's own options (``--logger``, ``--logfile``) and environment."""

    def __init__(self, twistd_args: list[str], args: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.proc = subprocess.Popen(
            [twistd_path(), *twistd_args, "-n", "--pidfile=", "portrouter", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        )
        self.output: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.output), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True),
        ]
        for t in self._readers:
            t.start()


def everything(daemon: Twistd) -> str:
    return "\n".join(daemon.output + daemon.errors)


# -- the manhole ------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[A-Za-z]")


def ssh_argv(port: int, known_hosts: Path, *options: str, key: Path | None = None, tty: bool = False,
             command: tuple[str, ...] = (), user: str = "operator") -> list[str]:
    """OpenSSH's client, told nothing by the user's own config or agent."""
    argv = ["ssh", "-F", "/dev/null", "-p", str(port),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "HostKeyAlias=portrouter-manhole",
            "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    for option in options:
        argv += ["-o", option]
    if key is not None:
        argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    if tty:
        argv.append("-tt")  # a PTY although stdin is a pipe
    return [*argv, f"{user}@{LOOPBACK}", *command]


class Shell:
    """An interactive ``ssh -tt`` session: lines typed on stdin, output collected."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.raw = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while data := os.read(fd, 65536):
            self.raw += data

    def text(self) -> str:
        return ANSI.sub("", bytes(self.raw).decode("utf-8", "replace"))

    def type(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\r")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    async def expect(self, regex: str, timeout: float = 30) -> re.Match[str]:
        def check() -> Any:
            m = re.search(regex, self.text())
            if m is None and self.proc.poll() is not None:
                raise AssertionError(f"ssh exited ({self.proc.returncode}):\n{self.text()}")
            return m

        return await wait_for(check, timeout, f"{regex!r} from the manhole")

    async def evaluate(self, expression: str, marker: str) -> str:
        """
        Print C{expression} at the prompt after C{marker}, which is typed
        split in two, so that only the output (not the echo of the typed
        line) contains it whole.
        """
        half = len(marker) // 2
        self.type(f"print({marker[:half]!r} + {marker[half:]!r}, {expression})")
        m = await self.expect(rf"{marker} (.*?)\r?\n")
        return m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def manhole_files(tmp_path: Path) -> tuple[Path, Path]:
    """A user key made by ssh-keygen, and the config that authorizes it."""
    key = tmp_path / "operator_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator", "-f", str(key)],
                   check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "operator_key.pub").read_text())
    config = tmp_path / "routes.yaml"
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\n"
        f"state: {tmp_path / 'state'}\n"
        "manhole:\n"
        f"  listen: tcp:{free_port()}:interface={LOOPBACK}\n"
        f"  authorized_keys: {tmp_path / 'authorized_keys'}\n"
    )
    return key, config


@pytest_twisted.ensureDeferred
async def test_manhole_shell_over_openssh(tmp_path: Path) -> None:
    key, config = manhole_files(tmp_path)
    known_hosts = tmp_path / "known_hosts"
    backend = ThreadServer(echo)
    daemon = Twistd("--config", str(config), "--tcp", route(backend.address))
    shell: Shell | None = None
    try:
        port = int((await daemon.wait_line(r"manhole listening on [\d.]+:(\d+)")).group(1))
        tcp_port = await daemon.port_of("tcp-0")
        ingress = await daemon.ingress_port()
        await daemon.wait_line(r"manhole: generated host key")

        # The host key is made in the state directory, private to its owner.
        host_key = tmp_path / "state" / HOST_KEY
        assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
        key_bytes = host_key.read_bytes()

        # A connection open through the route while the operator looks.
        client = await in_thread(connect, tcp_port)
        assert await in_thread(roundtrip, client, b"hello") == b"hello"

        shell = Shell(ssh_argv(port, known_hosts, "StrictHostKeyChecking=accept-new", key=key, tty=True))
        await shell.expect(r">>> ")
        routes = json.loads((await in_thread(get, ingress, "/_api/routes"))[2])["routes"]
        assert int(await shell.evaluate("len(table.routes)", "ROUTES")) == len(routes) == 2
        live = ast.literal_eval(await shell.evaluate("connections()", "CONNECTIONS"))
        peer = "%s:%d" % client.getsockname()
        assert [(c["protocol"], c["project"], c["peer"]) for c in live] == [("tcp", "tcp-0", peer)]
        assert (live[0]["bytes_in"], live[0]["bytes_out"]) == (5, 5)
        assert await shell.evaluate("type(router).__name__", "ROUTER") == "_Daemon"
        assert await shell.evaluate("reactor.running", "REACTOR") == "True"
        shell.stop()
        client.close()

        # No password login.
        password = await in_thread(
            subprocess.run,
            ssh_argv(port, known_hosts, "PubkeyAuthentication=no", "PasswordAuthentication=yes",
                     "KbdInteractiveAuthentication=yes", "StrictHostKeyChecking=yes", command=("true",)),
            capture_output=True, timeout=60,
        )
        assert password.returncode != 0
        # The methods the server would take are listed: public keys only.
        assert b"Permission denied (publickey)." in password.stderr, password.stderr
        # Nor a key that is not in authorized_keys.
        stranger = tmp_path / "stranger_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
        other = await in_thread(
            subprocess.run,
            ssh_argv(port, known_hosts, "StrictHostKeyChecking=yes", key=stranger, command=("true",)),
            capture_output=True, timeout=60,
        )
        assert other.returncode != 0
        assert b"Permission denied" in other.stderr, other.stderr

        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)

        # After a restart the same host key is served: the pinned key still matches.
        daemon = Twistd("--config", str(config))
        await daemon.wait_line(r"manhole listening on")
        assert host_key.read_bytes() == key_bytes
        assert not daemon.find(r"generated host key")
        # Any user name will do: the key is what is checked (README).
        shell = Shell(ssh_argv(port, known_hosts, "StrictHostKeyChecking=yes", key=key, tty=True, user="nobody"))
        await shell.expect(r">>> ")
        assert int(await shell.evaluate("len(table.routes)", "AGAIN")) == 1  # the ingress alone
        shell.stop()
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)
    finally:
        if shell is not None:
            shell.stop()
        daemon.stop()
        backend.close()


# -- graceful shutdown ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_transfer_in_flight_finish(tmp_path: Path) -> None:
    size = 64 * MiB
    received = {"bytes": 0}

    def sink(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := conn.recv(MiB):
            digest.update(data)
            received["bytes"] += len(data)
        conn.sendall(f"{received['bytes']} {digest.hexdigest()}".encode())

    backend = ThreadServer(sink)
    config = tmp_path / "routes.yaml"
    config.write_text(f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\ndrain_timeout: 20\n")
    daemon = Twistd("--config", str(config), "--tcp", route(backend.address))
    first_part, rest = threading.Event(), threading.Event()

    def client(port: int) -> tuple[str, bytes]:
        # Throttled by the test: 8 MiB, then a pause while SIGTERM arrives, then the rest.
        with connect(port, timeout=60) as sock:
            digest = hashlib.sha256()
            for i, block in enumerate(pattern(5, size)):
                if i == 8:
                    first_part.set()
                    assert rest.wait(60), "the test never said to go on"
                sock.sendall(block)
                digest.update(block)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while data := sock.recv(65536):
                reply += data
            return digest.hexdigest(), reply

    try:
        port = await daemon.port_of("tcp-0")
        ingress = await daemon.ingress_port()
        transfer = in_thread(client, port)
        await wait_for(lambda: first_part.is_set() and received["bytes"] >= 8 * MiB, 30,
                       "the first 8 MiB to reach the backend")

        daemon.proc.send_signal(signal.SIGTERM)
        await daemon.wait_line(r"draining 1 open connections \(at most 20 s\)")
        # Not accepting any more, on any port, while the transfer is not done.
        assert await in_thread(refused, port)
        assert await in_thread(refused, ingress)
        assert daemon.proc.poll() is None

        rest.set()
        sent_hash, reply = await transfer
        assert reply == f"{size} {sent_hash}".encode()
        # Exits by itself once the connection is done, before the drain timeout.
        assert await daemon.wait_exit(timeout=20) == 0, everything(daemon)
        assert daemon.find(rf"tcp tcp-0 127\.0\.0\.1:\d+: client closed; {size} bytes in")
        assert not daemon.find(r"drain timeout")
    finally:
        rest.set()
        daemon.stop()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_sigint_lets_a_request_finish_and_closes_the_rest_at_the_drain_timeout(tmp_path: Path) -> None:
    """
    SIGINT as the first signal drains as SIGTERM does: an HTTP request in
    flight is answered; a connection still open at drain_timeout is closed,
    its line saying so; twistd exits 0.
    """
    asked, answer = threading.Event(), threading.Event()

    def held_http(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        asked.set()
        if answer.wait(60):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nanswered")

    web, held = ThreadServer(held_http), ThreadServer(echo)
    config = tmp_path / "routes.yaml"
    config.write_text(f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\ndrain_timeout: 3\n"
                      f"projects:\n  - {{name: web, backend: '{web.address}'}}\n")
    daemon = Twistd("--config", str(config), "--tcp", route(held.address))
    sock: socket.socket | None = None

    def request(port: int) -> bytes:
        with connect(port, timeout=60) as client:
            client.sendall(b"GET /web/ HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while data := client.recv(65536):
                reply += data
            return reply

    try:
        port, ingress = await daemon.port_of("tcp-0"), await daemon.ingress_port()
        sock = await in_thread(connect, port)
        assert await in_thread(roundtrip, sock, b"open") == b"open"
        reply = in_thread(request, ingress)
        await wait_for(asked.is_set, 30, "the request to reach the backend")

        daemon.proc.send_signal(signal.SIGINT)
        await daemon.wait_line(r"draining 2 open connections \(at most 3 s\)")
        assert await in_thread(refused, ingress)
        answer.set()
        got = await reply
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"answered"), got
        assert await daemon.wait_exit(timeout=30) == 0, everything(daemon)
        assert daemon.find(r"tcp tcp-0 127\.0\.0\.1:\d+: portrouter stopped; closed after the drain timeout "
                           r"\(3 s\)"), everything(daemon)
        sock.settimeout(10)
        try:
            assert await in_thread(sock.recv, 100) == b""
        except ConnectionResetError:
            pass
    finally:
        answer.set()
        if sock is not None:
            sock.close()
        daemon.stop()
        web.close()
        held.close()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest_twisted.ensureDeferred
async def test_second_signal_stops_at_once(tmp_path: Path, second: signal.Signals) -> None:
    backend = ThreadServer(echo)
    config = tmp_path / "routes.yaml"
    config.write_text(f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\ndrain_timeout: 60\n")
    daemon = Twistd("--config", str(config), "--tcp", route(backend.address))
    sock: socket.socket | None = None
    try:
        port = await daemon.port_of("tcp-0")
        sock = await in_thread(connect, port)
        assert await in_thread(roundtrip, sock, b"before") == b"before"

        daemon.proc.send_signal(signal.SIGTERM)
        await daemon.wait_line(r"draining 1 open connections \(at most 60 s\)")
        # Draining: still running, and the open connection still works.
        assert await in_thread(roundtrip, sock, b"during") == b"during"
        assert daemon.proc.poll() is None

        daemon.proc.send_signal(second)
        await daemon.wait_line(rf"Received {second.name} again, stopping at once")
        assert await daemon.wait_exit(timeout=15) == 0, everything(daemon)
        # The connection was closed by the router, not left to time out.
        sock.settimeout(10)
        try:
            assert await in_thread(sock.recv, 100) == b""
        except ConnectionResetError:
            pass
        assert daemon.find(r"tcp tcp-0 127\.0\.0\.1:\d+: portrouter stopped at once"), everything(daemon)
    finally:
        if sock is not None:
            sock.close()
        daemon.stop()
        backend.close()


# -- max_connections --------------------------------------------------------------------------


@pytest.fixture
def echo_backend() -> Any:
    server = ThreadServer(echo)
    yield server
    server.close()


@pytest_twisted.ensureDeferred
async def test_max_connections_tcp_closes_the_extra_connection_at_once(
        tmp_path: Path, echo_backend: ThreadServer) -> None:
    router = await start_router(("tcp", route(echo_backend.address)),
                                config=base_config(tmp_path, defaults=Limits(max_connections=2)))
    port, ingress = router.port_of("tcp-0"), router.port_of()
    socks: list[socket.socket] = []
    try:
        for i in range(2):
            socks.append(await in_thread(connect, port, 10))
            assert await in_thread(roundtrip, socks[-1], b"hello %d" % i) == b"hello %d" % i
        extra = await in_thread(connect, port, 10)
        socks.append(extra)
        assert await in_thread(extra.recv, 100) == b""  # closed at once, not left hanging
        for i in range(2):
            assert await in_thread(roundtrip, socks[i], b"still %d" % i) == b"still %d" % i
        assert (await in_thread(refused_at_limit, ingress)).get(("tcp-0", "tcp")) == 1

        # A slot that frees is usable again.
        socks[0].close()
        await wait_for(lambda: router.sessions.active["tcp-0"] == 1, what="the first session to end")
        socks.append(await in_thread(connect, port, 10))
        assert await in_thread(roundtrip, socks[-1], b"again") == b"again"
    finally:
        for sock in socks:
            sock.close()
        await wait_for(lambda: not router.sessions.live, what="sessions to end")
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_max_connections_http_answers_503_while_requests_are_in_progress(tmp_path: Path) -> None:
    backend = Backend()
    router = await start_router(("http", route(backend.address)),
                                config=base_config(tmp_path, defaults=Limits(max_connections=2)))
    port, ingress = router.port_of("http-0"), router.port_of()
    try:
        # Two requests the backend holds until the test releases them.
        held = [in_thread(get, port, f"/sse?n=1&i={i}") for i in range(2)]
        await wait_for(lambda: len([s for s in backend.stats.seen if "/sse" in s["path"]]) == 2,
                       what="both held requests to reach the backend")
        status, headers, body = await in_thread(get, port, "/other")
        assert status == 503
        assert headers.get("retry-after")
        assert b"max_connections" in body
        assert len([s for s in backend.stats.seen if s["path"] == "/other"]) == 0

        for _ in held:
            backend.stats.sse_release.release()
        for d in held:
            status, _, body = await d
            assert (status, body) == (200, b"data: event 0\n\n")
        assert (await in_thread(get, port, "/after"))[0] == 200
        assert (await in_thread(refused_at_limit, ingress)).get(("http-0", "http")) == 1
    finally:
        for _ in range(2):
            backend.stats.sse_release.release()
        await router.stopService()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_max_connections_websocket_closes_with_1013(tmp_path: Path, echo_backend: ThreadServer) -> None:
    router = await start_router(("ws", route(echo_backend.address)),
                                config=base_config(tmp_path, defaults=Limits(max_connections=2)))
    port, ingress = router.port_of("ws-0"), router.port_of()
    clients: list[RawWebSocket] = []
    try:
        for i in range(2):
            clients.append(await in_thread(RawWebSocket, port, f"/vnc/{i}"))
            assert clients[-1].status == 101
            assert await in_thread(clients[-1].echo, b"hello %d" % i) == b"hello %d" % i
        extra = await in_thread(RawWebSocket, port, "/")
        clients.append(extra)
        assert extra.status == 101
        assert (await in_thread(extra.closed))[0] == 1013
        for i in range(2):
            assert await in_thread(clients[i].echo, b"still %d" % i) == b"still %d" % i
        assert (await in_thread(refused_at_limit, ingress)).get(("ws-0", "ws")) == 1
    finally:
        for client in clients:
            client.close()
        await wait_for(lambda: not router.sessions.live, what="sessions to end")
        await router.stopService()


# -- idle_timeout ------------------------------------------------------------------------------


def active_calls(reactor: MemoryReactorClock) -> list[Any]:
    return [c for c in reactor.getDelayedCalls() if c.active()]


def test_idle_timeout_counts_from_the_last_activity() -> None:
    reactor = MemoryReactorClock()
    sessions = Sessions(reactor)
    session = sessions.open("tcp", "p", "127.0.0.1:40000", idle_timeout=30)
    closed: list[str | None] = []

    def closer() -> None:
        closed.append(session.reason)
        session.ended(session.reason or "?")

    session._closer = closer
    reactor.advance(29)
    assert not closed
    session.last = reactor.seconds()  # a byte went through at t=29
    reactor.advance(1)
    assert not closed  # the timer fired, saw activity 1 s ago, and waits again
    assert len(active_calls(reactor)) == 1  # one timer per session, never one per byte
    reactor.advance(28.9)
    assert not closed
    reactor.advance(0.2)  # 30 s after the last activity
    assert closed == ["idle for 30 s"]
    assert not sessions.live
    assert not active_calls(reactor)


def test_idle_timer_goes_with_the_session_and_is_optional() -> None:
    reactor = MemoryReactorClock()
    sessions = Sessions(reactor)
    untimed = sessions.open("tcp", "p", "peer")
    assert not active_calls(reactor)
    timed = sessions.open("tcp", "p", "peer", idle_timeout=30)
    assert len(active_calls(reactor)) == 1
    timed.ended("client closed")
    assert not active_calls(reactor)
    untimed.ended("client closed")
    assert not sessions.live


def test_idle_timeout_sees_bytes_relayed_either_way() -> None:
    """Through the relay itself: each direction's bytes are activity; silence closes both sides."""
    reactor = MemoryReactorClock()
    sessions = Sessions(reactor)
    session = sessions.open("tcp", "p", "peer", idle_timeout=10)
    client, backend = StreamSide(), StreamSide()
    client_transport, backend_transport = StringTransport(), StringTransport()
    client.makeConnection(client_transport)
    backend.makeConnection(backend_transport)
    pair_streams(session, client, backend, reactor.seconds)
    closes_when_idle(reactor, client.dataReceived, backend.dataReceived, client_transport, backend_transport, session)


@pytest.mark.parametrize("kind", ["tcp", "ws"])
@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_a_busy_one_stays(
        tmp_path: Path, echo_backend: ThreadServer, kind: str) -> None:
    """
    idle_timeout counts from the last byte either way: of two connections
    opened together, the silent one is closed at the timeout, the one that
    talks every quarter of it stays, until it too goes quiet. Time is a
    Clock: the test says when it passes.
    """
    clock = Clock()
    router = await start_router((kind, route(echo_backend.address)), using=ClockedReactor(clock),
                                config=base_config(tmp_path, defaults=Limits(idle_timeout=1.0)))
    port = router.port_of(f"{kind}-0")

    def open_one() -> Any:
        if kind == "tcp":
            sock = connect(port, 10)
            assert roundtrip(sock, b"hi") == b"hi"
            return sock
        client = RawWebSocket(port, "/", timeout=10)
        assert client.status == 101 and client.echo(b"hi") == b"hi"
        return client

    def ping(conn: Any) -> None:
        # The echo is back, so the router has seen this byte at the clock's time.
        if kind == "tcp":
            assert roundtrip(conn, b".") == b"."
        else:
            assert conn.echo(b".") == b"."

    def wait_closed(conn: Any) -> Any:
        if kind == "tcp":
            return conn.recv(100)
        return conn.closed()[0]

    with LogEvents() as log:
        idle = await in_thread(open_one)
        busy = await in_thread(open_one)
        try:
            assert len(router.sessions.live) == 2
            for _ in range(3):  # 0.75 s: both still open
                clock.advance(0.25)
                await in_thread(ping, busy)
            assert len(router.sessions.live) == 2
            clock.advance(0.25)  # 1 s: the silent one is closed, EOF for TCP, a close frame for WebSocket
            assert await in_thread(wait_closed, idle) == (b"" if kind == "tcp" else 1000)
            for _ in range(8):  # the one that talks outlives the timeout twice over
                await in_thread(ping, busy)
                clock.advance(0.25)
            await wait_for(lambda: len(router.sessions.live) == 1, what="the idle session to end")
            await in_thread(ping, busy)
            clock.advance(1.0)  # quiet for the timeout: closed too
            assert await in_thread(wait_closed, busy) == (b"" if kind == "tcp" else 1000)
            await wait_for(lambda: not router.sessions.live, what="sessions to end")
        finally:
            idle.close()
            busy.close()
            await stop_clocked(router, clock)
    reasons = [e["reason"] for e in log.ended(kind, f"{kind}-0")]
    assert reasons == ["idle for 1 s"] * 2, reasons


# -- slow and large request heads ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["ingress", "route"])
@pytest_twisted.ensureDeferred
async def test_slowloris_is_cut_at_the_header_timeout_others_are_served(tmp_path: Path, where: str) -> None:
    """
    A head trickling in a byte at a time is cut when header_timeout has
    passed since the head began (the bytes after do not restart it), not
    before; meanwhile other clients are served. Time is a Clock: the test
    says when it passes.
    """
    backend = Backend()
    clock = Clock()
    defaults = Limits(header_timeout=1.5)
    web = parse_project({"name": "web", "backend": backend.address}, defaults)
    router = await start_router(("http", route(backend.address)), using=ClockedReactor(clock),
                                config=base_config(tmp_path, defaults=defaults, projects=(web,)))
    port, prefix = (router.port_of(), "/web") if where == "ingress" else (router.port_of("http-0"), "")
    slow = connect(port, 10)

    def served() -> None:
        # A full request on a new connection; it also means the router has
        # read what the slow client sent before it, and answered what was due.
        status, _, body = get(port, f"{prefix}/hello")
        assert (status, body) == (200, b"backend saw GET /hello\n")

    def reply() -> bytes:
        data = b""
        while chunk := slow.recv(65536):
            data += chunk
        return data

    try:
        slow.sendall(f"GET {prefix}/slow HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        await in_thread(served)  # connected after the slow one, so accepted after it: its timer runs
        for _ in range(5):  # a byte every 0.25 s, up to 1.25 s
            slow.sendall(b"a")
            await in_thread(served)
            clock.advance(0.25)
        clock.advance(0.125)  # 1.375 s: not yet
        await in_thread(served)
        assert select.select([slow], [], [], 0) == ([], [], [])
        clock.advance(0.125)  # 1.5 s since the head began
        answer = await in_thread(reply)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"Connection: close" in answer
        assert backend.stats.seen and all(s["path"] == "/hello" for s in backend.stats.seen)
    finally:
        slow.close()
        await stop_clocked(router, clock)
        backend.close()


@pytest_twisted.ensureDeferred
async def test_request_head_larger_than_max_header_size_is_431(tmp_path: Path) -> None:
    backend = Backend()
    web = parse_project({"name": "web", "backend": backend.address})
    router = await start_router(config=base_config(tmp_path, defaults=Limits(max_header_size=1024),
                                                   projects=(web,)))
    port = router.port_of()
    try:
        big = b"GET /web/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2048 + b"\r\n\r\n"
        reply = await in_thread(raw_request, port, big)
        assert reply.startswith(b"HTTP/1.1 431 "), reply
        # A head that never ends is cut as soon as it is too large, not at the timeout.
        endless = b"GET /web/x HTTP/1.1\r\nHost: x\r\n" + b"X-Endless: yes\r\n" * 200
        reply = await in_thread(raw_request, port, endless, 10)
        assert reply.startswith(b"HTTP/1.1 431 "), reply
        assert (await in_thread(get, port, "/web/x"))[0] == 200
        assert not [s for s in backend.stats.seen if "X-Big" in dict(s["headers"])]
    finally:
        await router.stopService()
        backend.close()


# -- logs ---------------------------------------------------------------------------------------


def json_records(lines: list[str]) -> list[dict[str, Any]]:
    """Every line is one JSON object (a line that does not parse fails the test)."""
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("destination", ["file", "stdout"])
@pytest_twisted.ensureDeferred
async def test_json_log_lines_carry_the_documented_fields(tmp_path: Path, destination: str) -> None:
    tcp_backend, http_backend = ThreadServer(echo), Backend()
    config = tmp_path / "routes.yaml"
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\n"
        f"projects:\n  - {{name: web, backend: '{http_backend.address}'}}\n"
    )
    log_file = tmp_path / "portrouter.jsonl"
    env = {"PORTROUTER_JSON_LOG": str(log_file)} if destination == "file" else {}
    started = datetime.now(timezone.utc)  # every record's time falls between this and when it is read
    daemon = Daemon(["--logger", "portrouter.logs.json"],
                    ["--config", str(config), "--tcp", route(tcp_backend.address)], env=env)

    def lines() -> list[str]:
        """The whole lines written so far (not one being written)."""
        if destination == "file":
            return log_file.read_text().split("\n")[:-1] if log_file.exists() else []
        return list(daemon.output)

    async def record(match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        def find() -> Any:
            if daemon.proc.poll() is not None:
                raise AssertionError(f"twistd exited:\n{everything(daemon)}")
            for line in lines():
                if match(rec := json.loads(line)):
                    return rec
            return None

        return await wait_for(find, 30, what)

    try:
        listening = await record(lambda r: r.get("what") == "ingress", "the ingress line")
        ingress = int(listening["address"].rsplit(":", 1)[1])
        tcp_line = await record(lambda r: r.get("project") == "tcp-0" and "address" in r, "the route line")
        tcp_port = int(tcp_line["address"].rsplit(":", 1)[1])

        def one_connection() -> str:
            with connect(tcp_port) as sock:
                assert roundtrip(sock, b"hello") == b"hello"
                return "%s:%d" % sock.getsockname()

        peer = await in_thread(one_connection)
        status, _, body = await in_thread(get, ingress, "/web/hello?x=1")
        assert status == 200

        session = await record(lambda r: r.get("protocol") == "tcp" and "bytes_in" in r, "the session line")
        assert session["namespace"] == "portrouter.tcp"
        assert (session["project"], session["peer"]) == ("tcp-0", peer)
        assert (session["bytes_in"], session["bytes_out"], session["reason"]) == (5, 5, "client closed")
        assert isinstance(session["duration"], float) and session["duration"] >= 0
        assert session["message"].startswith(f"tcp tcp-0 {peer}: client closed; 5 bytes in, 5 bytes out")

        access = await record(lambda r: r.get("method") == "GET" and r.get("project") == "web", "the access line")
        assert access["namespace"] == "portrouter.http"
        assert (access["client"], access["target"], access["status"], access["bytes"]) == (
            LOOPBACK, "/web/hello?x=1", 200, len(body))
        assert isinstance(access["duration"], float) and access["duration"] >= 0
        assert access["message"].startswith(f"{LOOPBACK} GET /web/hello?x=1 200 {len(body)} ")

        read = datetime.now(timezone.utc)
        for rec in (listening, session, access):
            assert rec["level"] == "info"
            when = datetime.fromisoformat(rec["time"])
            assert when.utcoffset() == timedelta(0)
            assert started <= when <= read, (started, rec["time"], read)

        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)
        records = json_records(lines())
        for rec in records:
            assert {"time", "level", "namespace", "message"} <= set(rec), rec
        assert any(r["message"] == "Received SIGTERM, shutting down" for r in records)
        if destination == "file":
            assert not daemon.output  # all of it went to the file
    finally:
        daemon.stop()
        tcp_backend.close()
        http_backend.close()


@pytest_twisted.ensureDeferred
async def test_twistd_logfile_still_gets_the_text_log(tmp_path: Path) -> None:
    backend = ThreadServer(echo)
    logfile = tmp_path / "twistd.log"
    daemon = Daemon(["--logfile", str(logfile)],
                    ["--ingress", f"tcp:0:interface={LOOPBACK}", "--state", str(tmp_path / "state"),
                     "--tcp", route(backend.address)])

    async def line(regex: str) -> re.Match[str]:
        def find() -> Any:
            if daemon.proc.poll() is not None:
                raise AssertionError(f"twistd exited:\n{everything(daemon)}")
            return re.search(regex, logfile.read_text()) if logfile.exists() else None

        return await wait_for(find, 30, f"{regex!r} in {logfile}")

    try:
        port = int((await line(r"\[portrouter#info\] tcp route tcp-0 listening on [\d.]+:(\d+)")).group(1))

        def one_connection() -> None:
            with connect(port) as sock:
                assert roundtrip(sock, b"hello") == b"hello"

        await in_thread(one_connection)
        await line(r"\[portrouter\.tcp#info\] tcp tcp-0 127\.0\.0\.1:\d+: client closed; 5 bytes in, 5 bytes out")
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)
        assert "Received SIGTERM, shutting down" in logfile.read_text()
        assert not daemon.output  # nothing on stdout: the file has it
    finally:
        daemon.stop()
        backend.close()


# -- every log destination: every line, in order, through a SIGTERM drain (issue 20) ---------------


@pytest.mark.parametrize("destination", ["stdout", "file", "json"])
@pytest_twisted.ensureDeferred
async def test_every_log_destination_gets_every_line_in_order_through_a_drain(
        tmp_path: Path, destination: str) -> None:
    """
    Each destination is written once per reactor turn; the lines of a
    SIGTERM drain, and those twistd writes after the reactor stopped, all
    arrive, in the order they were logged.
    """
    backend = Backend()
    config = tmp_path / "routes.yaml"
    config.write_text(f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\ndrain_timeout: 2\n"
                      f"projects:\n  - {{name: web, backend: '{backend.address}'}}\n")
    log_file = tmp_path / ("portrouter.jsonl" if destination == "json" else "twistd.log")
    twistd_args = {"stdout": [], "file": ["--logfile", str(log_file)],
                   "json": ["--logger", "portrouter.logs.json"]}[destination]
    env = {"PORTROUTER_JSON_LOG": str(log_file)} if destination == "json" else {}
    daemon = Daemon(twistd_args, ["--config", str(config)], env=env)

    def messages() -> list[str]:
        lines = list(daemon.output) if destination == "stdout" else (
            log_file.read_text().split("\n")[:-1] if log_file.exists() else [])
        if destination == "json":
            return [json.loads(line)["message"] for line in lines]
        return lines

    async def seen(regex: str) -> re.Match[str]:
        def find() -> Any:
            if daemon.proc.poll() is not None and not any(re.search(regex, m) for m in messages()):
                raise AssertionError(f"twistd exited:\n{everything(daemon)}")
            return next((m for line in messages() if (m := re.search(regex, line))), None)

        return await wait_for(find, 30, f"{regex!r} in the {destination} log")

    slow: socket.socket | None = None
    try:
        ingress = int((await seen(r"ingress listening on [\d.]+:(\d+)")).group(1))
        for i in range(50):
            status, _, _ = await in_thread(get, ingress, f"/web/n{i}")
            assert status == 200
        slow = await in_thread(connect, ingress)
        slow.sendall(b"GET /web/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: any("/slow" in line for conn in backend.stats.lines for line in conn), 30,
                       "the slow request to reach the backend")
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)
        order = [r"GET /web/n0 200", r"GET /web/n49 200", r"Received SIGTERM, shutting down",
                 r"draining 1 open connections", r"Main loop terminated", r"Server Shut Down"]
        lines = messages()
        found = [next((i for i, line in enumerate(lines) if re.search(regex, line)), None) for regex in order]
        assert None not in found and found == sorted(found), (found, lines)
        assert sum(bool(re.search(r"GET /web/n\d+ 200", line)) for line in lines) == 50
    finally:
        if slow is not None:
            slow.close()
        daemon.stop()
        backend.close()


def running(pid: int) -> bool:
    """Whether C{pid} runs: a daemon's parent is init, which may be slow to reap it (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest_twisted.ensureDeferred
async def test_a_daemon_started_without_n_logs_to_twistd_log(tmp_path: Path) -> None:
    """Without ``-n``, twistd forks a daemon, and portrouter writes twistd's lines to the daemon's twistd.log."""
    config = tmp_path / "routes.yaml"
    config.write_text(f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\n")
    pidfile, log_file = tmp_path / "portrouter.pid", tmp_path / "twistd.log"
    started = await in_thread(subprocess.run, [twistd_path(), "--pidfile", str(pidfile), "portrouter",
                                               "--config", str(config)],
                              cwd=tmp_path, capture_output=True, timeout=60)
    assert started.returncode == 0, started.stderr
    pid = int(await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "the pid file"))
    try:
        def logged(regex: str) -> re.Match[str] | None:
            return re.search(regex, log_file.read_text()) if log_file.exists() else None

        listening = await wait_for(lambda: logged(r"ingress listening on [\d.]+:(\d+)"), 30,
                                   "the ingress line in twistd.log")
        status, _, _ = await in_thread(get, int(listening.group(1)), "/_api/routes")
        assert status == 200
        os.kill(pid, signal.SIGTERM)
        await wait_for(lambda: not running(pid), 30, "the daemon to exit")
        assert logged(r"Server Shut Down"), log_file.read_text()
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_the_log_file_rotates_on_sigusr1_as_twistds_does(tmp_path: Path) -> None:
    backend = ThreadServer(echo)
    logfile = tmp_path / "twistd.log"
    daemon = Daemon(["--logfile", str(logfile)],
                    ["--ingress", f"tcp:0:interface={LOOPBACK}", "--state", str(tmp_path / "state"),
                     "--tcp", route(backend.address)])
    rotated = tmp_path / "twistd.log.1"
    try:
        def in_file(path: Path, regex: str) -> re.Match[str] | None:
            return re.search(regex, path.read_text()) if path.exists() else None

        match = await wait_for(lambda: in_file(logfile, r"tcp route tcp-0 listening on [\d.]+:(\d+)"), 30,
                               "the route's line")
        port = int(match.group(1))
        daemon.proc.send_signal(signal.SIGUSR1)
        await wait_for(rotated.exists, 30, "twistd.log.1")

        def one_connection() -> None:
            with connect(port) as sock:
                assert roundtrip(sock, b"hello") == b"hello"

        await in_thread(one_connection)
        await wait_for(lambda: in_file(logfile, r"tcp tcp-0 127\.0\.0\.1:\d+: client closed"), 30,
                       "the session line in the new file")
        assert in_file(rotated, r"listening on") and not in_file(rotated, r"client closed")
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)
    finally:
        daemon.stop()
        backend.close()
