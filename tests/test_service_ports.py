"""
Service ports end to end (SPEC 4): real tunnels into ``/stream/.../tcpproxy``
(websocat, ``twistd portrouter-tunnel``, the Backend.AI client's ``app``
command), ``ws`` routes, OpenSSH through a tunnel, every refusal before the
upgrade, close codes after it, and bounded memory in a real ``twistd``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

import pytest
import pytest_twisted
from twisted.internet import task

from portrouter.auth import sign_request
from portrouter.config import parse
from portrouter.model import Config, Listen
from tests.support import (
    LOOPBACK,
    MiB,
    RawWebSocket,
    ThreadServer,
    Twistd,
    backendai_python,
    free_port,
    in_thread,
    kernel_sockets,
    pattern,
    recv_all_and_hash,
    rss_kib,
    send_all_and_hash,
    start_router,
    twistd_path,
    wait_for,
)

ADMIN_TOKEN = "admin-token-0123456789"
OTHER_TOKEN = "other-token-9876543210"
ACCESS_KEY = "AKIAEXAMPLE"
SECRET_KEY = "secret-key-for-akiaexample"
PROBS = "https://api.backend.ai/probs"


# -- tools and processes ---------------------------------------------------------------


def tool(name: str) -> str:
    """A program the tests drive; missing it is a failure, not a skip."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.path.exists(beside) else shutil.which(name)
    assert found, f"{name} is not installed (.ci/run installs it)"
    return found


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:C{port}: it accepts, without a probe connection."""
    return any(s.ip == "0100007F" and s.port == port and s.state == "0A" for s in kernel_sockets())


class Process:
    """A real program, its output collected in a file, killed by L{stop}."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.argv = argv
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"), cwd=cwd,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def listening_on(self, port: int, timeout: float = 30.0) -> None:
        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{os.path.basename(self.argv[0])} exited ({self.proc.returncode}):\n{self.output()}"
                )
            return listening(port)

        await wait_for(check, timeout, f"{os.path.basename(self.argv[0])} to accept on port {port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()


def websocat_tunnel(url: str, port: int, tmp_path: Path, headers: Iterable[str] = ()) -> Process:
    """websocat as a local TCP-to-WebSocket tunnel: each connection one WebSocket."""
    argv = [tool("websocat"), "--binary", f"tcp-l:{LOOPBACK}:{port}", url]
    for header in headers:  # last, so that -H eats nothing else
        argv += ["-H", header]
    return Process(argv, tmp_path / f"websocat-{port}.log")


def portrouter_tunnel(url: str, port: int, tmp_path: Path, *credentials: str) -> Process:
    """A real ``twistd -n portrouter-tunnel`` listening on 127.0.0.1:C{port}."""
    argv = [twistd_path(), "-n", "--pidfile=", "portrouter-tunnel",
            "--listen", f"tcp:{port}:interface={LOOPBACK}", "--url", url, *credentials]
    return Process(argv, tmp_path / f"tunnel-{port}.log", cwd=tmp_path)


class Sshd:
    """A real OpenSSH server on 127.0.0.1 (a port of its own), with a user key that may log in."""

    def __init__(self, tmp_path: Path):
        sshd_path = "/usr/sbin/sshd"
        assert os.path.exists(sshd_path), "OpenSSH sshd is not installed (.ci/run installs openssh-server)"
        for key in ("host_key", "user_key"):
            subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)],
                           check=True, timeout=30)
        shutil.copy(tmp_path / "user_key.pub", tmp_path / "authorized_keys")
        self.user_key = tmp_path / "user_key"
        self.port = free_port()
        (tmp_path / "sshd_config").write_text(
            f"ListenAddress {LOOPBACK}\n"
            f"Port {self.port}\n"
            f"HostKey {tmp_path / 'host_key'}\n"
            f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            f"PidFile {tmp_path / 'sshd.pid'}\n"
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.process = Process([sshd_path, "-D", "-e", "-f", str(tmp_path / "sshd_config")], tmp_path / "sshd.log")

    @property
    def address(self) -> str:
        return f"tcp:{LOOPBACK}:{self.port}"



# -- configuration ------------------------------------------------------------------------


def service_config(tmp_path: Path, services: dict[str, int], **extra: Any) -> Config:
    """The config of the brief: two tokens and a keypair; project k1 with sshd and C{services}."""
    secrets = {"admin": ADMIN_TOKEN, "other": OTHER_TOKEN, "secret": SECRET_KEY}
    for name, value in secrets.items():
        (tmp_path / name).write_text(value + "\n")
    data = {
        "ingress": f"tcp:0:interface={LOOPBACK}",
        "auth": {
            "tokens": [
                {"token_file": str(tmp_path / "admin"), "admin": True, "projects": ["*"]},
                {"token_file": str(tmp_path / "other"), "projects": ["other"]},
            ],
            "keypairs": [
                {"access_key": ACCESS_KEY, "secret_key_file": str(tmp_path / "secret"), "projects": ["k1"]},
            ],
        },
        "projects": [
            {
                "name": "k1",
                "host": LOOPBACK,
                "services": [{"name": n, "protocol": "tcp", "port": p}
                             for n, p in {"sshd": 2200, **services}.items()],
            },
            {"name": "other", "services": [{"name": "echo", "protocol": "tcp", "port": services.get("echo", 1)}]},
            *extra.get("projects", []),
        ],
    }
    return parse(data)


def stream_url(port: int, app: str, project: str = "k1", scheme: str = "ws") -> str:
    return f"{scheme}://{LOOPBACK}:{port}/stream/session/{project}/tcpproxy?app={app}"


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def upgrade(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; a WebSocket that opened is closed properly."""
    raw = RawWebSocket(port)
    try:
        status, got, body = raw.request(target, headers)
        if status == 101:
            raw.send(struct.pack("!H", 1000), opcode=0x8)
            code, _, _ = raw.read_until_close()
            assert code == 1000
        return status, got, body
    finally:
        raw.close()


# -- 64 MiB each way -----------------------------------------------------------------------

SIZE = 64 * MiB


def recv_exactly_and_hash(sock: socket.socket, size: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while total < size:
        data = sock.recv(min(MiB, size - total))
        if not data:
            break
        total += len(data)
        digest.update(data)
    return total, digest.hexdigest()


def both_ways_service(conn: socket.socket) -> tuple[tuple[int, str], str]:
    """
    Receive 64 MiB and send 64 MiB at once, then close: a WebSocket has no
    half-close, so the service ends the conversation once both are done.
    """
    received: list[Any] = []
    reader = threading.Thread(target=lambda: received.append(recv_exactly_and_hash(conn, SIZE)))
    reader.start()
    sent = send_all_and_hash(conn, 2, SIZE)
    reader.join(120)
    return received[0], sent


def both_ways_client(port: int) -> tuple[str, tuple[int, str]]:
    """
    Send 64 MiB while reading; once the service's 64 MiB are in, end the
    sending side and read on until the tunnel closes.

    Ending it is for websocat: websocat 1.x may hold the last bytes its TCP
    client sent for good. When its flush towards the WebSocket would block,
    the wake-up for the socket turning writable polls its reader first, which
    has nothing and returns, and nothing flushes again until the client sends
    more or ends (its copy loop, src/my_copy.rs; vi/websocat#129, #250). Seen
    here as a 64 MiB tunnel stuck on the rest of one frame inside websocat,
    every socket queue empty and the router reading, once in about 40 runs
    under load.
    """
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        received: list[Any] = []
        got_all = threading.Event()

        def read() -> None:
            digest = hashlib.sha256()
            total = 0
            while data := sock.recv(MiB):
                total += len(data)
                digest.update(data)
                if total >= SIZE:
                    got_all.set()
            received.append((total, digest.hexdigest()))
            got_all.set()

        reader = threading.Thread(target=read)
        reader.start()
        sent = send_all_and_hash(sock, 1, SIZE)
        got_all.wait(120)
        sock.shutdown(socket.SHUT_WR)
        reader.join(120)
        assert received, "the client's reader did not finish"
        return sent, received[0]


async def exchange_64_mib(port: int, service: ThreadServer) -> None:
    client_sent, client_got = await in_thread(both_ways_client, port)
    await wait_for(lambda: service.results or service.errors, 60, "the service to finish")
    assert not service.errors, service.errors
    service_got, service_sent = service.results[0]
    assert service_got == (SIZE, client_sent), "the service did not get what the client sent"
    assert client_got == (SIZE, service_sent), "the client did not get what the service sent"


async def tunnel_64_mib(router: Any, service: ThreadServer, tunnel: Any, local: int) -> None:
    """64 MiB each way through C{tunnel}, listening on C{local}; then everything is stopped."""
    try:
        await tunnel.listening_on(local)
        await exchange_64_mib(local, service)
        await wait_for(lambda: not router.sessions.live, what="the bridge to end")
    finally:
        tunnel.stop()
        service.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_websocat_tunnel_64_mib_each_way(tmp_path: Path) -> None:
    service = ThreadServer(both_ways_service)
    router = await start_router(config=service_config(tmp_path, {"echo": service.port}))
    local = free_port()
    websocat = websocat_tunnel(stream_url(router.port_of(), "echo"), local, tmp_path,
                               [f"Authorization: Bearer {ADMIN_TOKEN}"])
    await tunnel_64_mib(router, service, websocat, local)


@pytest_twisted.ensureDeferred
async def test_portrouter_tunnel_64_mib_each_way(tmp_path: Path) -> None:
    service = ThreadServer(both_ways_service)
    router = await start_router(config=service_config(tmp_path, {"echo": service.port}))
    local = free_port()
    tunnel = portrouter_tunnel(stream_url(router.port_of(), "echo"), local, tmp_path, "--token", ADMIN_TOKEN)
    await tunnel_64_mib(router, service, tunnel, local)


@pytest.mark.parametrize("secret, answered", [(SECRET_KEY, True), ("not-the-secret", False)])
@pytest_twisted.ensureDeferred
async def test_portrouter_tunnel_signs_with_a_keypair(tmp_path: Path, secret: str, answered: bool) -> None:
    """
    ``--access-key A --secret-key S``: each WebSocket signed as Backend.AI's
    client signs; a wrong secret is refused (403) and the local connection
    closed with nothing relayed.
    """
    service = ThreadServer(echo)
    router = await start_router(config=service_config(tmp_path, {"echo": service.port}))
    local = free_port()
    tunnel = portrouter_tunnel(stream_url(router.port_of(), "echo"), local, tmp_path,
                               "--access-key", ACCESS_KEY, "--secret-key", secret)

    def say_hello() -> bytes:
        with socket.create_connection((LOOPBACK, local), timeout=30) as sock:
            sock.sendall(b"hello\n")
            got = b""
            while len(got) < 6 and (chunk := sock.recv(100)):
                got += chunk
            return got

    try:
        await tunnel.listening_on(local)
        assert await in_thread(say_hello) == (b"hello\n" if answered else b"")
        if not answered:
            await wait_for(lambda: "cannot reach" in tunnel.output() and "403" in tunnel.output(), 30,
                           "the tunnel to say it was refused")
            assert not service.accepted
    finally:
        tunnel.stop()
        service.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_ws_route_64_mib_each_way(tmp_path: Path) -> None:
    service = ThreadServer(both_ways_service)
    config = parse({
        "ingress": f"tcp:0:interface={LOOPBACK}",
        "projects": [{"name": "vnc", "backend": service.address, "listen": {"port": 1, "protocol": "ws"}}],
    })
    # Port 0 (the OS picks) is for tests only; the file format wants 1-65535.
    vnc = replace(config.projects[0], listen=Listen("ws", 0, LOOPBACK, f"tcp:0:interface={LOOPBACK}"))
    router = await start_router(config=replace(config, projects=(vnc,)))
    local = free_port()
    # Any path, no credentials.
    websocat = websocat_tunnel(f"ws://{LOOPBACK}:{router.port_of('vnc')}/websockify", local, tmp_path)
    await tunnel_64_mib(router, service, websocat, local)


# -- real clients and servers ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ssh_session_through_portrouter_tunnel(tmp_path: Path) -> None:
    ssh = tool("ssh")
    server = Sshd(tmp_path)
    sshd, sshd_port = server.process, server.port
    router = tunnel = None
    try:
        await sshd.listening_on(sshd_port)
        router = await start_router(config=service_config(tmp_path, {"sshd": sshd_port}))
        local = free_port()
        tunnel = portrouter_tunnel(stream_url(router.port_of(), "sshd"), local, tmp_path, "--token", ADMIN_TOKEN)
        await tunnel.listening_on(local)
        result = await in_thread(subprocess.run, [
            ssh, "-F", "/dev/null", "-p", str(local), "-i", str(tmp_path / "user_key"),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
            f"{getpass.getuser()}@{LOOPBACK}", "echo hello-through-portrouter; uname -s",
        ], capture_output=True, timeout=60)
        assert result.returncode == 0, (result.stderr.decode(errors="replace"), sshd.output(), tunnel.output())
        assert result.stdout.decode() == f"hello-through-portrouter\n{platform.system()}\n"
        await wait_for(lambda: not router.sessions.live, what="the bridge to end")
    finally:
        if tunnel is not None:
            tunnel.stop()
        sshd.stop()
        if router is not None:
            await router.stopService()


@pytest_twisted.ensureDeferred
async def test_backendai_app_relays_a_tcp_service(tmp_path: Path) -> None:
    service = ThreadServer(echo)
    router = await start_router(config=service_config(tmp_path, {"echo": service.port}))
    local = free_port()
    bai = os.path.join(os.path.dirname(backendai_python()), "backend.ai")
    assert os.path.exists(bai), f"{bai} is missing: run .ci/run (it installs backend.ai-client)"
    env = dict(
        os.environ,
        BACKEND_ENDPOINT=f"http://{LOOPBACK}:{router.port_of()}",
        BACKEND_ACCESS_KEY=ACCESS_KEY,
        BACKEND_SECRET_KEY=SECRET_KEY,
    )
    app = Process([bai, "app", "k1", "echo", "-b", f"{LOOPBACK}:{local}"], tmp_path / "backend.ai.log",
                  env=env, cwd=tmp_path)
    try:
        await app.listening_on(local, timeout=40)

        def talk() -> bool:
            message = b"hello through the Backend.AI client " * 1000
            with socket.create_connection((LOOPBACK, local), timeout=30) as sock:
                sock.sendall(message)
                got = b""
                while len(got) < len(message):
                    data = sock.recv(65536)
                    assert data, f"closed after {len(got)} bytes"
                    got += data
                return got == message

        assert await in_thread(talk), app.output()
        assert service.accepted == 1
        app.proc.terminate()
        await wait_for(lambda: app.proc.poll() is not None, 20, "backend.ai app to exit")
        await wait_for(lambda: not router.sessions.live, what="the bridge to end")
    finally:
        app.stop()
        service.close()
        await router.stopService()


# -- refusals before the upgrade, close codes after it -------------------------------------

BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WRONG = {"Authorization": "Bearer not-a-token"}
TCPPROXY = "/stream/session/k1/tcpproxy?app=echo"


def refused(status: int, detail: str) -> dict[str, Any]:
    if status == 401:
        return {"type": f"{PROBS}/auth-failed", "title": "Unauthorized access", "status": 401,
                "detail": detail, "msg": detail}
    return {"type": f"{PROBS}/generic-forbidden", "title": "Forbidden", "status": 403,
            "detail": detail, "msg": detail}


def signed(port: int, target: str, now: datetime | None = None) -> dict[str, str]:
    return sign_request("GET", f"http://{LOOPBACK}:{port}{target}", ACCESS_KEY, SECRET_KEY, now=now)


def tampered(headers: dict[str, str]) -> dict[str, str]:
    scheme, _, sig = headers["Authorization"].rpartition(":")
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    return dict(headers, Authorization=f"{scheme}:{flipped}")


@pytest_twisted.ensureDeferred
async def test_every_refusal_comes_before_the_upgrade(tmp_path: Path) -> None:
    service = ThreadServer(echo)
    router = await start_router(config=service_config(tmp_path, {"echo": service.port}))
    port = router.port_of()
    stale = datetime.now(timezone.utc) - timedelta(minutes=16)
    cases: list[tuple[str, str, dict[str, str], bool, int, dict[str, Any]]] = [
        ("unknown project", "/stream/session/nope/tcpproxy?app=echo", BEARER, True, 404,
         {"type": f"{PROBS}/session-not-found", "title": "No such session."}),
        ("unknown service", "/stream/session/k1/tcpproxy?app=nope", BEARER, True, 404,
         {"type": f"{PROBS}/app-not-found", "title": "No such app service."}),
        ("not a WebSocket request", TCPPROXY, BEARER, False, 400,
         {"type": f"{PROBS}/invalid-api-params", "title": "Not a WebSocket request."}),
        ("missing credentials", TCPPROXY, {}, True, 401,
         refused(401, "credentials required: Authorization: Bearer <token>, "
                      "?token=<token> or a Backend.AI keypair signature")),
        ("wrong token", TCPPROXY, WRONG, True, 403, refused(403, "invalid token")),
        # Credentials come first: an anonymous caller learns nothing of projects.
        ("wrong token, unknown project", "/stream/session/nope/tcpproxy?app=echo", WRONG, True, 403,
         refused(403, "invalid token")),
        ("missing credentials, unknown project", "/stream/session/nope/tcpproxy?app=echo", {}, True, 401,
         refused(401, "credentials required: Authorization: Bearer <token>, "
                      "?token=<token> or a Backend.AI keypair signature")),
        ("token for another project", TCPPROXY, {"Authorization": f"Bearer {OTHER_TOKEN}"}, True, 403,
         refused(403, "token #2 does not open this project")),
        ("wrong query token", TCPPROXY + "&token=not-a-token", {}, True, 403, refused(403, "invalid token")),
        ("wrong HMAC signature", TCPPROXY, tampered(signed(port, TCPPROXY)), True, 403,
         refused(403, "signature mismatch")),
        ("signature for another target", TCPPROXY,
         signed(port, "/stream/session/k1/tcpproxy?app=sshd"), True, 403, refused(403, "signature mismatch")),
    ]
    stale_headers = signed(port, TCPPROXY, now=stale)
    cases.append(("stale date", TCPPROXY, stale_headers, True, 403,
                  refused(403, f"date {stale_headers['Date']!r} is more than 15 minutes from the server's clock")))
    other = "/stream/session/other/tcpproxy?app=echo"
    cases.append(("keypair for another project", other, signed(port, other), True, 403,
                  refused(403, f"keypair {ACCESS_KEY} does not open this project")))
    try:
        for what, target, headers, is_upgrade, status, body in cases:
            raw = RawWebSocket(port)
            try:
                got_status, got_headers, got_body = await in_thread(raw.request, target, headers, is_upgrade)
            finally:
                raw.close()
            assert got_status == status, (what, got_status, got_body)
            assert got_status != 101 and "upgrade" not in got_headers, what
            assert got_headers["content-type"] == "application/problem+json", what
            assert json.loads(got_body) == body, what
            if status == 401:
                assert got_headers["www-authenticate"] == 'Bearer realm="portrouter"', what
        assert service.accepted == 0, "a refused request reached the service"

        # What was tampered with above opens when it is right.
        for what, target, headers in [
            ("admin token", TCPPROXY, BEARER),
            ("query token", f"{TCPPROXY}&token={ADMIN_TOKEN}", {}),
            ("keypair", TCPPROXY, signed(port, TCPPROXY)),
            ("token for its project", other, {"Authorization": f"Bearer {OTHER_TOKEN}"}),
        ]:
            got_status, _, got_body = await in_thread(upgrade, port, target, headers)
            assert got_status == 101, (what, got_status, got_body)
        await wait_for(lambda: not router.sessions.live, what="the bridges to end")
    finally:
        service.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_apps_listing(tmp_path: Path) -> None:
    router = await start_router(config=service_config(tmp_path, {"echo": 7007}))
    try:
        for headers in (BEARER, signed(router.port_of(), "/stream/session/k1/apps")):
            raw = RawWebSocket(router.port_of())
            try:
                status, got, body = await in_thread(raw.request, "/stream/session/k1/apps", headers, False)
            finally:
                raw.close()
            assert status == 200, body
            assert got["content-type"] == "application/json"
            assert json.loads(body) == [
                {"name": "sshd", "protocol": "tcp", "ports": [2200]},
                {"name": "echo", "protocol": "tcp", "ports": [7007]},
            ]
        status, _, body = await in_thread(upgrade, router.port_of(), "/stream/session/k1/apps", {})
        assert status == 401, body
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_text_frame_closes_with_1003(tmp_path: Path) -> None:
    service = ThreadServer(echo)
    router = await start_router(config=service_config(tmp_path, {"echo": service.port}))
    try:
        def text_then_close() -> tuple[int, bytes, int, str, int]:
            raw = RawWebSocket(router.port_of())
            try:
                status, _, _ = raw.request(TCPPROXY, BEARER)
                # Binary first, echoed back: the bridge works...
                raw.send(b"binary is carried")
                echoed = b""
                while len(echoed) < len(b"binary is carried"):
                    opcode, payload = raw.frame()
                    assert opcode in (0x0, 0x2)
                    echoed += payload
                # ...then a TEXT message ends it.
                raw.send(b"text is not", opcode=0x1)
                return (status, echoed, *raw.read_until_close())
            finally:
                raw.close()

        status, echoed, code, _, after = await in_thread(text_then_close)
        assert status == 101
        assert echoed == b"binary is carried"
        assert code == 1003
        assert after == 0, "the text message was carried"
        await wait_for(lambda: not router.sessions.live, what="the bridge to end")
    finally:
        service.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_service_refusing_closes_with_1013(tmp_path: Path) -> None:
    router = await start_router(config=service_config(tmp_path, {"echo": free_port()}))
    try:
        def refused_service() -> tuple[int, int]:
            raw = RawWebSocket(router.port_of())
            try:
                status, _, _ = raw.request(TCPPROXY, BEARER)
                code, _, _ = raw.read_until_close()
                return status, code
            finally:
                raw.close()

        assert await in_thread(refused_service) == (101, 1013)
        await wait_for(lambda: not router.sessions.live, what="the bridge to end")
    finally:
        await router.stopService()


# -- a client that stops reading, against the real daemon ------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_keeps_memory_bounded(tmp_path: Path) -> None:
    size = 256 * MiB
    progress = {"sent": 0, "done": False, "hash": ""}

    def service(conn: socket.socket) -> None:
        if progress.get("warmed") is None:
            progress["warmed"] = True
            conn.sendall(b"w" * MiB)  # the warm-up connection
            return
        digest = hashlib.sha256()
        for block in pattern(31, size):
            conn.sendall(block)
            digest.update(block)
            progress["sent"] += len(block)
        progress["hash"] = digest.hexdigest()
        progress["done"] = True

    server = ThreadServer(service)
    config = tmp_path / "portrouter.yaml"
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\n"
        f"state: {tmp_path / 'state'}\n"
        "projects:\n"
        "  - name: k1\n"
        f"    host: {LOOPBACK}\n"
        "    services:\n"
        f"      - {{name: flood, protocol: tcp, port: {server.port}}}\n"
    )
    daemon = Twistd("--config", str(config), cwd=str(tmp_path))
    target = "/stream/session/k1/tcpproxy?app=flood"
    sampler = None
    slow: RawWebSocket | None = None
    try:
        port = await daemon.ingress_port()

        def whole(rcvbuf: int | None = None) -> tuple[int, str, int]:
            raw = RawWebSocket(port, rcvbuf=rcvbuf)
            try:
                status, _, body = raw.request(target)
                assert status == 101, body
                return raw.read_until_close()
            finally:
                raw.close()

        # Warm up (imports, first bridge), then take the baseline.
        assert (await in_thread(whole))[0::2] == (1000, MiB)
        baseline = rss_kib(daemon.proc.pid)
        peak = {"rss": baseline}

        def sample() -> None:
            peak["rss"] = max(peak["rss"], rss_kib(daemon.proc.pid))

        sampler = task.LoopingCall(sample)
        sampler.start(0.05)

        slow = RawWebSocket(port, rcvbuf=64 * 1024)
        status, _, body = await in_thread(slow.request, target)
        assert status == 101, body
        # The client reads nothing more: wait until nothing moves any more.
        history: list[int] = []

        def stalled() -> bool:
            history.append(progress["sent"])
            return bool(progress["done"]) or (len(history) > 25 and len(set(history[-25:])) == 1)

        await wait_for(stalled, 60, "the service to stall or finish")
        assert not progress["done"], "all 256 MiB were taken while the client read nothing"
        assert progress["sent"] < 32 * MiB, f"{progress['sent'] / MiB:.1f} MiB taken from the service"
        sample()
        grown_mib = (peak["rss"] - baseline) / 1024
        assert grown_mib < 32, f"portrouter grew by {grown_mib:.1f} MiB for one stalled connection"

        # Nothing was lost: once the client reads, all of it arrives, then 1000.
        code, digest, total = await in_thread(slow.read_until_close)
        assert progress["done"]
        assert (code, total, digest) == (1000, size, progress["hash"])
        assert not server.errors, server.errors
    finally:
        if sampler is not None and sampler.running:
            sampler.stop()
        if slow is not None:
            slow.close()
        daemon.stop()
        server.close()
