"""
Every endpoint kind README.rst names, end to end with real clients: ``unix:``
listening and backends, ``tcp6:`` on ``::1`` and IPv6 backends, ``tls:``
backends verified against ``trustRoots`` (and refused when they do not
verify), and systemd socket activation of the real ``twistd -n portrouter``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from portrouter.config import ConfigError, parse_project, with_cli
from portrouter.model import Config
from portrouter.api import route_rows
from tests.pki import CA
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)
from tests.httpbackend import Backend
from tests.support import (
    LOOPBACK, MiB, RawWebSocket, ThreadServer, Twistd, in_thread, pattern, recv_all_and_hash,
    send_all_and_hash, start_router, wait_for,
)


def curl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], input=input, capture_output=True, timeout=60)


def upper_echo(conn: socket.socket) -> int:
    """A TCP backend: every byte back in upper case until EOF; then it closes."""
    total = 0
    while data := conn.recv(65536):
        total += len(data)
        conn.sendall(data.upper())
    return total


def talk(connect: Any, payload: bytes) -> bytes:
    """Send C{payload}, half-close, read until the other side closes."""
    with connect() as sock:
        sock.settimeout(30)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read()


def ask(connect: Any, payload: bytes, size: int) -> bytes:
    """Send C{payload} (no half-close); read until C{size} bytes or the other side closes."""
    with connect() as sock:
        sock.settimeout(30)
        sock.sendall(payload)
        got = b""
        while len(got) < size and (chunk := sock.recv(size - len(got))):
            got += chunk
        return got


def unix_client(path: str) -> Any:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        return sock
    return connect


# -- unix: ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tcp_route_listening_on_a_unix_socket(tmp_path: Path, logged: list[str]) -> None:
    backend = ThreadServer(upper_echo)
    path = str(tmp_path / "tcp.sock")
    router = await start_router(("tcp", f"unix:{path} -> {backend.address}"))
    try:
        assert await in_thread(talk, unix_client(path), b"hello unix\n") == b"HELLO UNIX\n"
        await log_line(logged, r"^tcp tcp-unix-.*: client closed; 11 bytes in, 11 bytes out")
    finally:
        await router.stopService()
        backend.close()



class UnixBackend(Backend):
    """The test HTTP backend on a UNIX socket."""

    address_family = socket.AF_UNIX


class V6Backend(Backend):
    """The test HTTP backend on ::1."""

    address_family = socket.AF_INET6


class TLSBackend(Backend):
    """The test HTTP backend behind TLS (the handshake runs in the accepting thread)."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        super().__init__()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # A failed handshake raises OSError here, which the server shrugs off.
        return self.context.wrap_socket(sock, server_side=True), address


def unix_listening(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    return sock


def v6_listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET6)
    sock.bind(("::1", 0))
    return sock


def v4_client(port: int) -> Any:
    return lambda: socket.create_connection((LOOPBACK, port))


def bulk(connect: Any, seed: int, size: int) -> tuple[str, int, str]:
    """C{size} bytes up, half-close, everything back: (sent hash, received size, received hash)."""
    with connect() as sock:
        sock.settimeout(60)
        got: list[tuple[int, str]] = []
        reader = threading.Thread(target=lambda: got.append(recv_all_and_hash(sock)))
        reader.start()
        sent = send_all_and_hash(sock, seed, size)
        sock.shutdown(socket.SHUT_WR)
        reader.join(120)
        return sent, *got[0]


def echo(conn: socket.socket) -> int:
    """A TCP backend that echoes everything until EOF, then closes."""
    total = 0
    while data := conn.recv(MiB):
        total += len(data)
        conn.sendall(data)
    return total


async def echoes_through_tcp_and_ws_routes(router: Any) -> None:
    """Routes tcp-0 and ws-0 lead to an echo backend: bytes come back whole."""
    # Big enough that the TCP relay goes bulk (splice, whatever the backend's socket family).
    sent, size, received = await in_thread(bulk, v4_client(router.port_of("tcp-0")), 5, 16 * MiB)
    assert (size, received) == (16 * MiB, sent)
    ws = await in_thread(RawWebSocket, router.port_of("ws-0"), "/")
    assert await in_thread(ws.echo, b"through a ws route") == b"through a ws route"
    ws.close()


def headers_of(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


@pytest_twisted.ensureDeferred
async def test_ingress_and_http_route_listening_on_unix_sockets(tmp_path: Path, logged: list[str]) -> None:
    backend = Backend()
    ingress, http = str(tmp_path / "ingress.sock"), str(tmp_path / "http.sock")
    project = parse_project({"name": "web", "backend": backend.address})
    router = await start_router(("http", f"unix:{http} -> {backend.address}"),
                                config=Config(ingress=f"unix:{ingress}", state=str(tmp_path / "state"),
                                              projects=(project,)))
    try:
        got = await in_thread(curl, "--unix-socket", ingress, "http://localhost/web/headers")
        assert got.returncode == 0, got.stderr
        seen = headers_of(got.stdout)
        assert seen["x-forwarded-prefix"] == "/web" and seen["host"] == "localhost"
        got = await in_thread(curl, "--unix-socket", http, "-H", "Host: example.org", "http://localhost/headers")
        assert got.returncode == 0, got.stderr
        assert headers_of(got.stdout)["x-forwarded-host"] == "example.org"
        await log_line(logged, r"ingress listening on .*ingress\.sock")
        # The table shows no port for what listens on a UNIX socket (it raised before).
        rows = route_rows(router)
        assert [r["port"] for r in rows] == [None, None, None] and rows[1]["project"] == "web"
    finally:
        await router.stopService()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_unix_backends_for_http_tcp_and_ws_routes_and_path_routes(tmp_path: Path) -> None:
    http_backend = UnixBackend(str(tmp_path / "http-backend.sock"))
    tcp_backend = ThreadServer(echo, unix_listening(str(tmp_path / "tcp-backend.sock")))
    project = parse_project({"name": "web", "backend": http_backend.address})
    router = await start_router(
        ("http", f"tcp:0:interface={LOOPBACK} -> {http_backend.address}"),
        ("tcp", f"tcp:0:interface={LOOPBACK} -> {tcp_backend.address}"),
        ("ws", f"tcp:0:interface={LOOPBACK} -> {tcp_backend.address}"),
        config=Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"), projects=(project,)),
    )
    try:
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{router.port_of()}/web/blob?size=100000&seed=3")
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"".join(pattern(3, 100000))
        got = await in_thread(curl, "--fail", "-T", "-", f"http://{LOOPBACK}:{router.port_of('http-0')}/sink",
                              input=b"x" * 300000)
        assert json.loads(got.stdout)["size"] == 300000
        await echoes_through_tcp_and_ws_routes(router)
    finally:
        await router.stopService()
        http_backend.close()
        tcp_backend.close()


# -- tcp6: and IPv6 backends ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tcp6_listening_on_v6_loopback_logs_the_client_in_brackets(tmp_path: Path, logged: list[str]) -> None:
    tcp_backend = ThreadServer(upper_echo)
    http_backend = Backend()
    router = await start_router(
        ("tcp", rf"tcp6:0:interface=\:\:1 -> {tcp_backend.address}"),
        ("http", rf"tcp6:0:interface=\:\:1 -> {http_backend.address}"),
        config=Config(ingress=rf"tcp6:0:interface=\:\:1", state=str(tmp_path / "state"),
                      projects=(parse_project({"name": "web", "backend": http_backend.address}),)),
    )
    try:
        probe = socket.create_connection(("::1", router.port_of("tcp-0")))
        client = f"[::1]:{probe.getsockname()[1]}"
        assert await in_thread(talk, lambda: probe, b"hello six\n") == b"HELLO SIX\n"
        await log_line(logged, rf"^tcp tcp-0 {re.escape(client)}: client closed")
        for port, target in ((router.port_of("http-0"), "/headers"), (router.port_of(), "/web/headers")):
            got = await in_thread(curl, "--fail", f"http://[::1]:{port}{target}")
            assert got.returncode == 0, got.stderr
            seen = headers_of(got.stdout)
            assert seen["x-forwarded-for"] == "::1" and seen["x-real-ip"] == "::1"
            assert seen["host"] == f"[::1]:{port}"
        # Bound to ::1 only (a refused IPv4 connect would prove nothing: another
        # program may hold the same port number on 127.0.0.1).
        await log_line(logged, rf"^tcp route tcp-0 listening on ::1:{router.port_of('tcp-0')}$")
    finally:
        await router.stopService()
        tcp_backend.close()
        http_backend.close()


@pytest_twisted.ensureDeferred
async def test_ipv6_backends_for_tcp_http_and_ws_routes(tmp_path: Path) -> None:
    tcp_backend = ThreadServer(echo, v6_listening())
    http_backend = V6Backend(("::1", 0))
    assert tcp_backend.address.startswith(r"tcp:\:\:1:")
    router = await start_router(
        ("tcp", f"tcp:0:interface={LOOPBACK} -> {tcp_backend.address}"),
        ("http", f"tcp:0:interface={LOOPBACK} -> {http_backend.address}"),
        ("ws", f"tcp:0:interface={LOOPBACK} -> {tcp_backend.address}"),
        config=Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path / "state"),
                      projects=(parse_project({"name": "web", "backend": http_backend.address,
                                               "preserve_host": False}),)),
    )
    try:
        await echoes_through_tcp_and_ws_routes(router)
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{router.port_of()}/web/headers")
        assert got.returncode == 0, got.stderr
        assert headers_of(got.stdout)["host"] == f"[::1]:{http_backend.port}"  # preserve_host: false
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{router.port_of('http-0')}/blob?size=200000")
        assert got.stdout == b"".join(pattern(1, 200000))
    finally:
        await router.stopService()
        tcp_backend.close()
        http_backend.close()


# -- tls: backends ------------------------------------------------------------------


def tls_echo(context: ssl.SSLContext) -> Any:
    """A TCP backend handler: TLS with C{context}, then upper-case echo."""
    def handle(conn: socket.socket) -> int:
        with context.wrap_socket(conn, server_side=True) as tls:
            return upper_echo(tls)
    return handle


def tls_answer_once(context: ssl.SSLContext) -> Any:
    """A TCP backend handler: TLS with C{context}, one read answered in upper case, then close."""
    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(65536).upper())
    return handle


BAD_CERTIFICATES = [
    # (what is wrong, the backend's context, what the log says after "backend TLS ")
    ("wrong name", lambda ca, stranger: ca.server_context("other.example"),
     "certificate is not valid for localhost"),
    ("unknown CA", lambda ca, stranger: stranger.server_context("localhost"),
     "certificate verify failed: unable to get local issuer certificate"),
    ("expired", lambda ca, stranger: ca.server_context("localhost", expired=True),
     "certificate verify failed: certificate has expired"),
]


@pytest.fixture
def authorities(tmp_path: Path) -> tuple[CA, CA]:
    return CA(tmp_path / "ca"), CA(tmp_path / "stranger", "someone else's CA")


def tls_backend(port: int, ca: CA) -> str:
    return f"tls:localhost:{port}:trustRoots={ca.roots}"


@pytest_twisted.ensureDeferred
async def test_tls_backends_with_trust_roots_for_http_and_tcp_routes(authorities: Any, logged: list[str]) -> None:
    ca, _ = authorities
    http_backend = TLSBackend(ca.server_context("localhost"))
    tcp_backend = ThreadServer(tls_answer_once(ca.server_context("localhost")))
    router = await start_router(
        ("http", f"tcp:0:interface={LOOPBACK} -> {tls_backend(http_backend.port, ca)}"),
        ("tcp", f"tcp:0:interface={LOOPBACK} -> {tls_backend(tcp_backend.port, ca)}"),
    )
    try:
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{router.port_of('http-0')}/blob?size=300000&seed=4")
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"".join(pattern(4, 300000))
        # The backend closes first: a client's close or half-close reaching a
        # TLS backend is the tls branch's fix (its relay lets the producer go).
        probe = socket.create_connection((LOOPBACK, router.port_of("tcp-0")))
        client = f"{LOOPBACK}:{probe.getsockname()[1]}"
        assert await in_thread(ask, lambda: probe, b"over tls\n", 100) == b"OVER TLS\n"
        await log_line(logged, rf"^tcp tcp-0 {client}: backend closed; 9 bytes in, 9 bytes out")
    finally:
        await router.stopService()
        http_backend.close()
        tcp_backend.close()


@pytest.mark.parametrize("trusted", [True, False], ids=["our CA in the system store", "not in it"])
@pytest_twisted.ensureDeferred
async def test_a_tls_backend_without_trust_roots_is_verified_against_the_system_store(
        authorities: Any, logged: list[str], monkeypatch: pytest.MonkeyPatch, trusted: bool) -> None:
    """
    Without trustRoots, the system store: OpenSSL's default paths, which
    SSL_CERT_FILE names for this process. Our CA there, the backend is
    reached; not there, a 502 saying why.
    """
    ca, stranger = authorities
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.path if trusted else stranger.path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    http_backend = TLSBackend(ca.server_context("localhost"))
    router = await start_router(("http", f"tcp:0:interface={LOOPBACK} -> tls:localhost:{http_backend.port}"))
    try:
        got = await in_thread(curl, "-i", f"http://{LOOPBACK}:{router.port_of('http-0')}/headers")
        if trusted:
            assert got.stdout.startswith(b"HTTP/1.1 200"), got.stdout
        else:
            assert got.stdout.startswith(b"HTTP/1.1 502"), got.stdout
            await log_line(logged, r"^http-0: GET /headers: 502 backend TLS certificate verify failed: "
                                   r"unable to get local issuer certificate$")
    finally:
        await router.stopService()
        http_backend.close()


@pytest.mark.parametrize("what, make, says", BAD_CERTIFICATES, ids=[b[0] for b in BAD_CERTIFICATES])
@pytest_twisted.ensureDeferred
async def test_tls_backend_that_does_not_verify_is_a_502_or_a_close_with_the_reason(
        what: str, make: Any, says: str, authorities: Any, logged: list[str]) -> None:
    ca, stranger = authorities
    http_backend = TLSBackend(make(ca, stranger))
    tcp_backend = ThreadServer(tls_echo(make(ca, stranger)))
    router = await start_router(
        ("http", f"tcp:0:interface={LOOPBACK} -> {tls_backend(http_backend.port, ca)}"),
        ("tcp", f"tcp:0:interface={LOOPBACK} -> {tls_backend(tcp_backend.port, ca)}"),
    )
    try:
        got = await in_thread(curl, "-i", f"http://{LOOPBACK}:{router.port_of('http-0')}/headers")
        assert got.stdout.startswith(b"HTTP/1.1 502"), got.stdout
        assert not http_backend.stats.seen  # no request reached it
        await log_line(logged, rf"^http-0: GET /headers: 502 backend TLS {says}$")
        # The TCP client is closed without a byte back.
        probe = socket.create_connection((LOOPBACK, router.port_of("tcp-0")))
        client = f"{LOOPBACK}:{probe.getsockname()[1]}"
        assert await in_thread(ask, lambda: probe, b"secret\n", 100) == b""
        await log_line(logged, rf"^tcp tcp-0 {client}: backend TLS {says}; ")
        assert not tcp_backend.results  # nothing was echoed
    finally:
        await router.stopService()
        http_backend.close()
        tcp_backend.close()


# -- systemd socket activation ----------------------------------------------------------


def activated(sockets: dict[str, socket.socket], *args: str) -> Twistd:
    """
    ``twistd -n portrouter`` started as systemd starts a socket-activated
    service: the listening sockets inherited as descriptors 3, 4, ...,
    ``LISTEN_FDS`` their count, ``LISTEN_FDNAMES`` their names (systemd 227+
    always sets it, and Twisted ignores descriptors without it) and
    ``LISTEN_PID`` the service's own pid (the shell sets it to its pid, which
    exec hands on to twistd).
    """
    for sock in sockets.values():
        sock.listen(64)
    fds = [sock.fileno() for sock in sockets.values()]

    def move() -> None:  # in the child: first out of the way, then to 3, 4, ...
        high = [os.dup(fd) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)

    return Twistd(*args, wrapper=("sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"'),
                  env={"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(sockets)}, pass_fds=range(3, 3 + len(fds)), preexec_fn=move)


@pytest_twisted.ensureDeferred
async def test_socket_activation_for_the_ingress_and_a_route(tmp_path: Path) -> None:
    backend = ThreadServer(upper_echo)
    http_backend = Backend()
    ingress, route = socket.socket(), socket.socket()
    ingress.bind((LOOPBACK, 0))
    route.bind((LOOPBACK, 0))
    ports = ingress.getsockname()[1], route.getsockname()[1]
    config = tmp_path / "routes.yaml"
    config.write_text(f"projects:\n  - name: web\n    backend: '{http_backend.address}'\n")
    daemon = activated({"web": ingress, "shout": route}, "--config", str(config),
                       "--state", str(tmp_path / "state"), "--ingress", "systemd:domain=INET:index=0",
                       "--tcp", f"systemd:domain=INET:name=shout -> {backend.address}")
    # Only portrouter holds the sockets now: what answers is portrouter.
    ingress.close()
    route.close()
    try:
        await daemon.wait_line(rf"ingress listening on {LOOPBACK}:{ports[0]}")
        await daemon.wait_line(rf"tcp route \S+ listening on {LOOPBACK}:{ports[1]}")
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{ports[0]}/web/headers")
        assert got.returncode == 0, got.stderr
        assert headers_of(got.stdout)["x-forwarded-prefix"] == "/web"
        assert await in_thread(talk, v4_client(ports[1]), b"activated\n") == b"ACTIVATED\n"
        await daemon.wait_line(r"tcp tcp-\S+ 127\.0\.0\.1:\d+: client closed; 10 bytes in, 10 bytes out")
        # The table shows the ports the inherited sockets are bound to.
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{ports[0]}/_api/routes")
        rows = {row["project"]: row["port"] for row in json.loads(got.stdout)["routes"]}
        assert rows == {None: ports[0], "web": ports[0], "tcp-systemd-domain-inet-name-shout": ports[1]}
        # A reload keeps them: the inherited sockets cannot be bound again.
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_line(r"reloaded .*routes\.yaml")
        assert await in_thread(talk, v4_client(ports[1]), b"still\n") == b"STILL\n"
        got = await in_thread(curl, "--fail", f"http://{LOOPBACK}:{ports[0]}/web/headers")
        assert got.returncode == 0, got.stderr
        # A project deployed on an activated port is refused with the OS's reason.
        got = await in_thread(curl, "-X", "PUT", "-d", json.dumps(
            {"backend": backend.address, "listen": {"port": ports[1], "protocol": "tcp"}}),
            f"http://{LOOPBACK}:{ports[0]}/_api/projects/late")
        error = json.loads(got.stdout)["error"]
        assert (error["code"], error["message"]) == (
            "port_unavailable", f"cannot bind port {ports[1]}/tcp for project 'late': Address already in use")
        assert await in_thread(talk, v4_client(ports[1]), b"unchanged\n") == b"UNCHANGED\n"
    finally:
        daemon.stop()
        backend.close()
        http_backend.close()


def test_systemd_strport_without_an_inherited_socket_says_so() -> None:
    # This process inherited nothing from systemd.
    for desc, field_name in (("systemd:domain=INET:index=0", "--ingress"), ("systemd:domain=INET:name=web", "--tcp")):
        with pytest.raises(ConfigError) as raised:
            if field_name == "--ingress":
                with_cli(Config(), ingress=desc)
            else:
                with_cli(Config(), routes=[("tcp", f"{desc} -> tcp:127.0.0.1:1")])
        assert str(raised.value) == (
            f"{field_name}: {desc!r} is not a listening endpoint: no such socket was inherited from systemd "
            "(LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID describe those it passes down)")
