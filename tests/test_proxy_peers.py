"""
The PROXY protocol (SPEC section 12, issue 17) with real peers on either
side, each started by the test in the foreground on free loopback ports:
HAProxy (Debian's) in front, sending ``send-proxy``/``send-proxy-v2`` to
portrouter, in ``mode http`` and ``mode tcp``; HAProxy (``accept-proxy``)
and nginx (``listen ... proxy_protocol``) behind it, saying which client
they were told of; HAProxy's headers refused from an address portrouter
does not trust, and missing from one it does; the real ``twistd -n
portrouter`` behind HAProxy, closing a slow header on its own clock, and
putting a v2 header on each datagram of a UDP route, read here by hand from
HAProxy's specification, not with the parser portrouter uses.

The clients connect from 127.0.0.2 while every proxy connects from
127.0.0.1, and report their own ports: an address or port that reaches the
far end can only have come from the header. The in-process cases (v1/v2
edge cases, Clock-driven timeouts, the table) are in
C{tests/test_proxy_protocol.py}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted

from portrouter.config import parse
from tests.httpbackend import Backend
from tests.support import LOOPBACK, ThreadServer, Twistd, free_port, in_thread, kernel_sockets, start_router, wait_for
from tests.test_hostnames import read_to_the_end
from tests.test_proxy_protocol import first_bytes
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)

CLIENT = "127.0.0.2"  # where clients connect from; every proxy connects from 127.0.0.1
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def tool(name: str) -> str:
    """A program the tests drive; missing it is a failure, not a skip."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert found, f"{name} is not installed (.ci/run installs Debian's {name})"
    return found


class Peer:
    """HAProxy or nginx in the foreground, its output kept for the failure message."""

    def __init__(self, name: str, argv: list[str], port: int):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.output.append(line.decode("utf-8", "replace").rstrip("\n"))

    async def listening(self) -> None:
        """Wait until it listens, seen in the kernel's table: no probe connection that it would log."""
        def up() -> bool:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n" + "\n".join(self.output))
            return any(s.ip == "0100007F" and s.port == self.port and s.state == "0A" for s in kernel_sockets())

        await wait_for(up, 30, f"{self.name} to listen on {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Every peer a test starts, stopped at its end whatever happened."""
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.stop()


HAPROXY_COMMON = """\
global
    nbthread 1
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


async def haproxy(peers: list[Peer], tmp_path: Path, port: int, proxies: str) -> int:
    """HAProxy on C{port} with the C{proxies} sections after the common ones; C{port} once it listens."""
    cfg = tmp_path / f"haproxy-{port}.cfg"
    cfg.write_text(HAPROXY_COMMON + proxies)
    peer = Peer("haproxy", [tool("haproxy"), "-db", "-f", str(cfg)], port)
    peers.append(peer)
    await peer.listening()
    return port


async def haproxy_in_front(peers: list[Peer], tmp_path: Path, mode: str, target: int, send: str) -> int:
    """HAProxy in C{mode} (http, tcp) in front of 127.0.0.1:C{target}, its server line ending in C{send}; its port."""
    port = free_port()
    return await haproxy(peers, tmp_path, port, f"""\
frontend front
    mode {mode}
    bind {LOOPBACK}:{port}
    default_backend router
backend router
    mode {mode}
    server router {LOOPBACK}:{target} {send}
""")


async def haproxy_behind(peers: list[Peer], tmp_path: Path) -> int:
    """HAProxy accepting PROXY headers, answering every request with the source it was told of; its port."""
    port = free_port()
    return await haproxy(peers, tmp_path, port, f"""\
frontend told
    mode http
    bind {LOOPBACK}:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port]"
""")


async def nginx_behind(peers: list[Peer], tmp_path: Path) -> int:
    """nginx with ``listen ... proxy_protocol``, answering with the source it was told of; its port."""
    port = free_port()
    prefix = tmp_path / f"nginx-{port}"
    prefix.mkdir()
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    cfg = prefix / "nginx.conf"
    cfg.write_text(f"""\
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
    server {{
        listen {LOOPBACK}:{port} proxy_protocol;
        default_type text/plain;
        return 200 "$proxy_protocol_addr:$proxy_protocol_port";
    }}
}}
""")
    peer = Peer("nginx", [tool("nginx"), "-g", "daemon off;", "-p", str(prefix), "-e", "stderr", "-c", str(cfg)],
                port)
    peers.append(peer)
    await peer.listening()
    return port


def curl(url: str) -> tuple[str, int]:
    """GET C{url} from 127.0.0.2 with curl: the body, and the local port curl used."""
    out = subprocess.run([tool("curl"), "-sS", "--max-time", "30", "--interface", CLIENT,
                          "-w", "\n%{http_code} %{local_port}", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body, _, status_port = out.stdout.rpartition("\n")
    status, port = status_port.split()
    assert status == "200", out.stdout
    return body, int(port)


def curl_status(url: str) -> int:
    """The status curl gets for C{url} (from 127.0.0.2)."""
    out = subprocess.run([tool("curl"), "-s", "--max-time", "30", "--interface", CLIENT, "-o", "/dev/null",
                          "-w", "%{http_code}", url], capture_output=True, text=True, timeout=60)
    return int(out.stdout)


def exchange_from_client(port: int, data: bytes) -> tuple[int, bytes]:
    """
    From 127.0.0.2: send C{data}, half-close, read until the far side
    closes; the local port and what came back.
    """
    with socket.socket() as sock:
        sock.settimeout(30)
        sock.bind((CLIENT, 0))
        sock.connect((LOOPBACK, port))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return sock.getsockname()[1], read_to_the_end(sock)


def parse_v2(data: bytes) -> tuple[int, int, tuple[str, int], tuple[str, int], bytes]:
    """
    A v2 header read by hand from HAProxy's proxy-protocol.txt (2.2), not
    with Twisted's parser: (version and command, family and transport,
    source, destination, what followed).
    """
    assert data.startswith(V2_SIGNATURE), data[:32]
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    body, rest = data[16:16 + length], data[16 + length:]
    assert len(body) == length, data
    af, size = {1: (socket.AF_INET, 4), 2: (socket.AF_INET6, 16)}[family >> 4]
    src, dst = socket.inet_ntop(af, body[:size]), socket.inet_ntop(af, body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return version_command, family, (src, sport), (dst, dport), rest


def seen_headers(body: str) -> dict[str, str]:
    """The request headers the HTTP echo backend (C{/headers}) reports."""
    return dict(json.loads(body)["headers"])


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


# -- HAProxy in front ------------------------------------------------------------------------------


@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy"])
@pytest_twisted.ensureDeferred
async def test_haproxy_http_in_front_names_the_client(tmp_path: Path, peers: list[Peer], backend: Backend,
                                                      logged: list[str], send: str) -> None:
    """X-Forwarded-For, X-Real-IP and the access log say 127.0.0.2, though HAProxy connects from 127.0.0.1."""
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"]},
        "projects": [{"name": "k1", "backend": backend.address}],
    }))
    try:
        front = await haproxy_in_front(peers, tmp_path, "http", router.port_of(), send)
        body, _ = await in_thread(curl, f"http://{LOOPBACK}:{front}/k1/headers")
        seen = seen_headers(body)
        assert (seen["X-Forwarded-For"], seen["X-Real-IP"]) == (CLIENT, CLIENT), seen
        await log_line(logged, r"^127\.0\.0\.2 GET /k1/headers 200 ")
    finally:
        await router.stopService()


@pytest.mark.parametrize("send, send_proxy", [("send-proxy-v2", "v1"), ("send-proxy", "v2")])
@pytest_twisted.ensureDeferred
async def test_haproxy_tcp_in_front_names_the_client_and_its_port(
        tmp_path: Path, peers: list[Peer], logged: list[str], send: str, send_proxy: str) -> None:
    """
    A TCP route told of the client by HAProxy tells its backend: the
    client's own address and port, which HAProxy's connection does not have,
    and the address the client connected to, HAProxy's (as HAProxy itself
    sends on what it was told, with accept-proxy and send-proxy).
    """
    server = ThreadServer(first_bytes)
    route = free_port()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "ssh", "backend": server.address, "send_proxy": send_proxy,
                      "listen": {"port": route, "protocol": "tcp", "interface": LOOPBACK,
                                 "proxy_protocol": {"trusted": ["127.0.0.1"]}}}],
    }))
    try:
        front = await haproxy_in_front(peers, tmp_path, "tcp", route, send)
        client_port, reply = await in_thread(exchange_from_client, front, b"hello")
        got = reply.removeprefix(b"got:")
        if send_proxy == "v1":
            line, _, rest = got.partition(b"\r\n")
            fields = line.split(b" ")
            assert fields[:3] == [b"PROXY", b"TCP4", CLIENT.encode()] and int(fields[4]) == client_port, got
            assert fields[3] == LOOPBACK.encode() and int(fields[5]) == front, got
        else:
            version_command, family, source, destination, rest = parse_v2(got)
            assert (version_command, family, source) == (0x21, 0x11, (CLIENT, client_port)), got
            assert destination == (LOOPBACK, front), got
        assert rest == b"hello"
        await log_line(logged, rf"tcp ssh 127\.0\.0\.2:{client_port}: client closed; 5 bytes in, \d+ bytes out")
    finally:
        await router.stopService()
        server.close()


# -- HAProxy and nginx behind ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("peer", ["haproxy", "nginx"])
@pytest_twisted.ensureDeferred
async def test_the_peer_behind_is_told_the_client(tmp_path: Path, peers: list[Peer], peer: str,
                                                  version: str) -> None:
    """An HTTP route and a TCP route with ``send_proxy``: the peer answers with curl's address and port."""
    target = await (haproxy_behind if peer == "haproxy" else nginx_behind)(peers, tmp_path)
    route = free_port()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [
            {"name": "web", "backend": f"tcp:{LOOPBACK}:{target}", "send_proxy": version},
            {"name": "raw", "backend": f"tcp:{LOOPBACK}:{target}", "send_proxy": version,
             "listen": {"port": route, "protocol": "tcp", "interface": LOOPBACK}},
        ],
    }))
    try:
        for url in (f"http://{LOOPBACK}:{router.port_of()}/web/", f"http://{LOOPBACK}:{route}/"):
            told, client_port = await in_thread(curl, url)
            assert told == f"{CLIENT}:{client_port}", url
    finally:
        await router.stopService()


# -- refused ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_haproxy_is_refused_where_it_is_not_trusted(tmp_path: Path, peers: list[Peer], backend: Backend,
                                                         logged: list[str]) -> None:
    """
    Listeners that trust only 10.0.0.0/8 refuse HAProxy's headers from
    127.0.0.1, never believing them: the ingress answers 400 (HAProxy
    passes it on), a TCP route closes; no byte of it reaches a backend.
    """
    server = ThreadServer(first_bytes)
    route = free_port()
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["10.0.0.0/8"]},
        "projects": [
            {"name": "k1", "backend": backend.address},
            {"name": "ssh", "backend": server.address,
             "listen": {"port": route, "protocol": "tcp", "interface": LOOPBACK,
                        "proxy_protocol": {"trusted": ["10.0.0.0/8"]}}},
        ],
    }))
    try:
        http_front = await haproxy_in_front(peers, tmp_path, "http", router.port_of(), "send-proxy-v2")
        tcp_front = await haproxy_in_front(peers, tmp_path, "tcp", route, "send-proxy")
        assert await in_thread(curl_status, f"http://{LOOPBACK}:{http_front}/k1/headers") == 400
        _, reply = await in_thread(exchange_from_client, tcp_front, b"hello")
        assert reply == b""
        await log_line(logged, r"tcp ssh 127\.0\.0\.1:\d+: a PROXY header from an untrusted address; closed")
        assert not backend.stats.seen
        assert not any(b"hello" in got or b"PROXY" in got for got in server.results), server.results
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_haproxy_without_send_proxy_is_closed_where_it_is_trusted(
        tmp_path: Path, peers: list[Peer], backend: Backend, logged: list[str]) -> None:
    """A balancer that forgot ``send-proxy``: its request is no header, the connection closes, HAProxy says 502."""
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"]},
        "projects": [{"name": "k1", "backend": backend.address}],
    }))
    try:
        front = await haproxy_in_front(peers, tmp_path, "http", router.port_of(), "")
        assert await in_thread(curl_status, f"http://{LOOPBACK}:{front}/k1/headers") == 502
        await log_line(logged, r"proxy protocol 127\.0\.0\.1:\d+: no PROXY header from a trusted address: "
                               r"the connection began with b'GET /k1/headers HTTP/1\.1")
        assert not backend.stats.seen
    finally:
        await router.stopService()


# -- the real twistd -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_real_twistd_behind_haproxy(tmp_path: Path, peers: list[Peer], backend: Backend) -> None:
    """
    ``twistd -n portrouter --config`` with proxy_protocol on its ingress:
    behind HAProxy's send-proxy-v2 the backend and the access log name
    curl; a header that does not come whole within its header_timeout (1 s,
    from the file, on the daemon's own clock) is closed.
    """
    config = tmp_path / "portrouter.yaml"
    config.write_text(json.dumps({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "proxy_protocol": {"trusted": ["127.0.0.1"], "header_timeout": 1},
        "projects": [{"name": "k1", "backend": backend.address}],
    }))
    daemon = Twistd("--config", str(config))
    try:
        ingress = await daemon.ingress_port()
        front = await haproxy_in_front(peers, tmp_path, "http", ingress, "send-proxy-v2")
        body, _ = await in_thread(curl, f"http://{LOOPBACK}:{front}/k1/headers")
        assert seen_headers(body)["X-Forwarded-For"] == CLIENT
        await daemon.wait_line(r" 127\.0\.0\.2 GET /k1/headers 200 ")

        def slow_header() -> bytes:
            with socket.create_connection((LOOPBACK, ingress), timeout=30) as sock:
                sock.sendall(b"PROXY TCP4 127.0")
                return read_to_the_end(sock)

        assert await in_thread(slow_header) == b""
        await daemon.wait_line(r"proxy protocol 127\.0\.0\.1:\d+: no whole PROXY header within 1 s "
                               r"\(16 bytes came\); closed")
        daemon.proc.terminate()
        assert await daemon.wait_exit() == 0, "\n".join(daemon.output + daemon.errors)
    finally:
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_the_real_twistd_sends_a_v2_header_with_each_datagram(tmp_path: Path) -> None:
    """
    A UDP route with send_proxy v2: each datagram reaches the backend behind
    a header that says UDP over IPv4 (0x12), from the client's own address
    and port to the route's, read by hand; the reply goes back without one.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(30)
    seen: list[tuple[int, int, tuple[str, int], tuple[str, int], bytes]] = []

    def serve() -> None:
        try:
            while True:
                data, peer = sock.recvfrom(65535)
                seen.append(parse_v2(data))
                sock.sendto(b"re:" + seen[-1][4], peer)
        except OSError:
            return  # closed at the end of the test

    threading.Thread(target=serve, daemon=True).start()
    route = free_port(socket.SOCK_DGRAM)
    config = tmp_path / "portrouter.yaml"
    config.write_text(json.dumps({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "dns", "backend": f"{LOOPBACK}:{sock.getsockname()[1]}", "send_proxy": "v2",
                      "listen": {"port": route, "protocol": "udp", "interface": LOOPBACK}}],
    }))
    daemon = Twistd("--config", str(config))
    try:
        assert await daemon.port_of("dns") == route

        def client() -> tuple[int, list[bytes]]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(30)
                c.bind((CLIENT, 0))
                replies = []
                for payload in (b"one", b"two" * 500):
                    c.sendto(payload, (LOOPBACK, route))
                    replies.append(c.recvfrom(65535)[0])
                return c.getsockname()[1], replies

        client_port, replies = await in_thread(client)
        assert replies == [b"re:one", b"re:" + b"two" * 500]
        told = (0x21, 0x12, (CLIENT, client_port), (LOOPBACK, route))
        assert seen == [(*told, b"one"), (*told, b"two" * 500)]
        daemon.proc.terminate()
        assert await daemon.wait_exit() == 0, "\n".join(daemon.output + daemon.errors)
    finally:
        daemon.stop()
        sock.close()
