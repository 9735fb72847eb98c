"""HTTP routes end to end over loopback: the ingress's path routing and a project's own port."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import pytest_twisted

from dataclasses import replace

from portrouter import http as http_module
from portrouter.config import parse_project
from portrouter.model import Config, Listen
from portrouter.http import SPLICE_BODY
from tests.httpbackend import Backend, raw_request
from tests.support import (
    LOOPBACK,
    MiB,
    ThreadServer,
    Twistd,
    descriptors_left,
    free_port,
    in_thread,
    one_route_daemon,
    refuse_pipes,
    pattern,
    start_router,
    stops_reading,
    wait_for,
)


@pytest.fixture
def backend() -> Any:
    server = Backend()
    yield server
    server.close()


async def router_for(backend_address: str, **extra: Any) -> Any:
    web = parse_project({"name": "web", "backend": backend_address, **extra})
    own = parse_project({"name": "own", "backend": backend_address, "listen": {"port": 1}, **extra})
    # Port 1 stands for "its own port"; the test binds it to 0 instead.
    own = replace(own, listen=Listen("http", 0, LOOPBACK, f"tcp:0:interface={LOOPBACK}"))
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", projects=(web, own))
    router = await start_router(config=config)
    return router, router.port_of(), router.port_of("own")


def get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, list[str]], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        merged: dict[str, list[str]] = {}
        for k, v in response.getheaders():
            merged.setdefault(k.lower(), []).append(v)
        return response.status, merged, body
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_path_routing_table(backend: Backend) -> None:
    router, ingress, _ = await router_for(backend.address)
    try:
        status, _, body = await in_thread(get, ingress, "/web/a/b?x=1")
        assert (status, body) == (200, b"backend saw GET /a/b?x=1\n")
        status, headers, _ = await in_thread(get, ingress, "/web?x=1")
        assert (status, headers["location"]) == (301, ["/web/?x=1"])
        assert (await in_thread(get, ingress, "/nope/x"))[0] == 404
        # A project with its own port is not path-routed.
        assert (await in_thread(get, ingress, "/own/x"))[0] == 404
        cases = {
            # raw request target -> what the backend of 'web' sees
            b"/web/a/../b": b"/b",
            b"/web/../../etc/passwd": b"/etc/passwd",
            b"/web/%2e%2e/%2E%2E/x": b"/x",
            b"/web/a/.%2E/own/x": b"/own/x",
            b"/web/a%2Fb": b"/a%2Fb",
            b"/web/./x/.": b"/x/",
        }
        for target, seen in cases.items():
            reply = await in_thread(raw_request, ingress, b"GET %s HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % target)
            assert reply.endswith(b"backend saw GET %s\n" % seen), (target, reply)
        # An encoded slash never changes which project a request goes to.
        reply = await in_thread(raw_request, ingress, b"GET /web%2Fx/y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404")
        reply = await in_thread(raw_request, ingress, b"GET /%2e%2e/web/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_headers_forwarded_and_hop_by_hop_removed(backend: Backend) -> None:
    router, ingress, own = await router_for(backend.address)
    try:
        sent = {
            "Host": "example.test:8080",
            "X-Forwarded-For": "1.2.3.4",
            "Connection": "keep-alive, X-Private",
            "X-Private": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eHg=",
            "X-Real-IP": "6.6.6.6",
            "X-Custom": "kept",
        }
        status, _, body = await in_thread(get, ingress, "/web/headers", sent)
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["host"] == "example.test:8080"
        assert seen["x-forwarded-host"] == "example.test:8080"
        assert seen["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-prefix"] == "/web"
        assert seen["x-real-ip"] == "127.0.0.1"
        assert seen["x-custom"] == "kept"
        for hop in ("x-private", "keep-alive", "te", "proxy-authorization", "transfer-encoding", "upgrade"):
            assert hop not in seen, hop
        assert seen.get("connection", "keep-alive").lower() == "keep-alive"
        # On a project's own port there is no prefix.
        _, _, body = await in_thread(get, own, "/headers")
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert "x-forwarded-prefix" not in seen and seen["x-forwarded-for"] == "127.0.0.1"
        # Repeated response headers survive, in order.
        status, headers, _ = await in_thread(get, ingress, "/web/cookies")
        assert headers["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_keep_alive_to_the_backend(backend: Backend) -> None:
    router, ingress, _ = await router_for(backend.address)
    try:
        def hundred() -> list[int]:
            return [get(ingress, f"/web/n/{i}")[0] for i in range(100)]

        assert await in_thread(hundred) == [200] * 100
        assert backend.stats.connections < 5
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_head_204_304_keep_the_connection_usable(backend: Backend) -> None:
    router, ingress, _ = await router_for(backend.address)
    try:
        def sequence() -> list[tuple[int, str | None, bytes]]:
            conn = http.client.HTTPConnection(LOOPBACK, ingress, timeout=30)
            out = []
            for method, path in [("HEAD", "/web/blob?size=1000"), ("GET", "/web/status?code=204"),
                                 ("GET", "/web/status?code=304"), ("GET", "/web/x")]:
                conn.request(method, path)
                r = conn.getresponse()
                out.append((r.status, r.getheader("content-length"), r.read()))
            conn.close()
            return out

        result = await in_thread(sequence)
        assert result[0] == (200, "1000", b"")
        assert [r[0] for r in result[1:]] == [204, 304, 200]
        assert result[3][2] == b"backend saw GET /x\n"
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_server_sent_events_arrive_one_by_one(backend: Backend) -> None:
    router, ingress, _ = await router_for(backend.address)
    sock = socket.create_connection((LOOPBACK, ingress), timeout=30)
    try:
        sock.sendall(b"GET /web/sse?n=3 HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\r\n")
        received = bytearray()

        def read_until(marker: bytes) -> None:
            while marker not in received:
                data = sock.recv(65536)
                assert data, "connection closed early"
                received.extend(data)

        for i in range(3):
            # Event i is released only now; it must arrive before the next is.
            backend.stats.sse_release.release()
            await in_thread(read_until, f"data: event {i}".encode())
            assert f"event {i + 1}".encode() not in received
    finally:
        sock.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_backend_refused_is_502_naming_the_project() -> None:
    router, ingress, own = await router_for(f"tcp:{LOOPBACK}:{free_port()}")
    try:
        status, _, body = await in_thread(get, ingress, "/web/x")
        assert status == 502
        assert body == b"portrouter: project 'web': backend refused the connection\n"
        status, _, body = await in_thread(get, own, "/x")
        assert (status, body) == (502, b"portrouter: project 'own': backend refused the connection\n")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_upload_and_download_stream_intact(backend: Backend) -> None:
    """Content-length and chunked, both directions, through the ingress."""
    router, ingress, _ = await router_for(backend.address)
    try:
        def transfer() -> list[Any]:
            import hashlib
            from tests.support import pattern

            out = []
            for chunked in ("0", "1"):
                conn = http.client.HTTPConnection(LOOPBACK, ingress, timeout=60)
                conn.request("GET", f"/web/blob?size={8 * MiB + 7}&seed=5&chunked={chunked}")
                r = conn.getresponse()
                digest = hashlib.sha256()
                while data := r.read(MiB):
                    digest.update(data)
                want = hashlib.sha256(b"".join(pattern(5, 8 * MiB + 7))).hexdigest()
                out.append(digest.hexdigest() == want)
            body = b"".join(pattern(9, 8 * MiB + 3))
            for encode_chunked in (False, True):
                conn = http.client.HTTPConnection(LOOPBACK, ingress, timeout=60)
                if encode_chunked:
                    conn.request("PUT", "/web/sink", body=iter([body[:MiB], body[MiB:]]), encode_chunked=True)
                else:
                    conn.request("POST", "/web/sink", body=body)
                reply = json.loads(conn.getresponse().read())
                out.append(reply == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()})
            return out

        assert await in_thread(transfer) == [True, True, True, True]
    finally:
        await router.stopService()


async def until_stalled(count: Callable[[], int], size: int, what: str) -> int:
    """
    Poll a byte counter until it reaches C{size} or stops moving (the same
    value 25 polls in a row); answer it. A pause of the machine can look like
    a stall, so the caller also asserts that the router has stopped reading
    the side that pushes (L{stops_reading}): only then is the stall its doing.
    """
    history: list[int] = []

    def stalled() -> bool:
        history.append(count())
        return history[-1] >= size or (len(history) > 25 and len(set(history[-25:])) == 1)

    await wait_for(stalled, 60, what)
    return history[-1]


def force_python_bodies(monkeypatch: pytest.MonkeyPatch, path: str) -> list[int]:
    """
    For C{path} "python", turn off splice(2) for response bodies, so they go
    through the Python producer path that a machine with splice never takes;
    answer the list of spliced bodies' lengths, to check which path ran.
    """
    spliced: list[int] = []

    class Counted(http_module.BodySplice):
        def start(self) -> None:
            spliced.append(self.pump.left)
            super().start()

    monkeypatch.setattr(http_module, "BodySplice", Counted)
    if path == "python":
        monkeypatch.setattr(http_module, "SPLICE_OK", False)
    return spliced


def read_head(sock: socket.socket) -> tuple[bytes, int, bytes]:
    """An HTTP head from a blocking socket: (head, its Content-Length, the body bytes read with it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, buf
        buf += data
    head, _, first = buf.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length, head
    return head, int(length.group(1)), first


def read_body(sock: socket.socket, length: int, first: bytes) -> tuple[int, str]:
    """The rest of a body of C{length} bytes that began with C{first}: (bytes, SHA-256)."""
    digest = hashlib.sha256(first)
    total = len(first)
    while total < length:
        data = sock.recv(min(MiB, length - total))
        assert data, f"closed after {total} of {length} body bytes"
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


def read_response(sock: socket.socket) -> tuple[bytes, int, str]:
    """One content-length response: (head, body length, body SHA-256)."""
    head, length, first = read_head(sock)
    return (head, *read_body(sock, length, first))


def hash_of(blocks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("path", ["spliced", "python"])
@pytest_twisted.ensureDeferred
async def test_slow_reader_pauses_the_backend(backend: Backend, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """A large download to a client that does not read: the backend is held back, then all arrives intact."""
    spliced = force_python_bodies(monkeypatch, path)
    router, ingress, _ = await router_for(backend.address)
    size = 256 * MiB
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(60)
    sock.connect((LOOPBACK, ingress))
    try:
        sock.sendall(b"GET /web/blob?size=%d&seed=3 HTTP/1.1\r\nHost: h\r\n\r\n" % size)
        sent = await until_stalled(lambda: backend.stats.blob_sent, size, "the backend to stall")
        assert sent < 32 * MiB
        await stops_reading("portrouter to stop reading the stalled backend", peer=backend.port)
        head, total, digest = await in_thread(read_response, sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert (total, digest) == (size, hash_of(pattern(3, size)))
        assert len(spliced) == (0 if path == "python" else 1)
    finally:
        sock.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_slow_backend_reader_pauses_a_large_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A large upload to a backend that does not read yet: the client is held
    back, then the backend gets every byte; the answer (its SHA-256) is a
    large body too, on the Python path.
    """
    spliced = force_python_bodies(monkeypatch, "python")
    size = 256 * MiB
    release = threading.Event()

    def sink(conn: socket.socket) -> None:
        _, length, first = read_head(conn)
        assert release.wait(60), "the test never let the backend read"
        _, digest = read_body(conn, length, first)
        # The answer repeats the digest to a large body, which would be spliced.
        answer = digest.encode() * (SPLICE_BODY // 64 + 1)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)

    server = ThreadServer(sink)
    router, ingress, _ = await router_for(server.address)
    progress = {"sent": 0}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.settimeout(60)
    sock.connect((LOOPBACK, ingress))

    def upload() -> tuple[bytes, int, str]:
        sock.sendall(b"POST /web/sink HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
        for block in pattern(4, size):
            for i in range(0, len(block), 65536):
                sock.sendall(block[i:i + 65536])
                progress["sent"] += len(block[i:i + 65536])
        return read_response(sock)

    try:
        done = in_thread(upload)
        sent = await until_stalled(lambda: progress["sent"], size, "the client to stall")
        assert sent < 32 * MiB
        await stops_reading("portrouter to stop reading the stalled client", peer=sock.getsockname()[1])
        release.set()
        head, total, digest = await done
        assert head.startswith(b"HTTP/1.1 200 ")
        want = hash_of(pattern(4, size)).encode() * (SPLICE_BODY // 64 + 1)
        assert (total, digest) == (len(want), hashlib.sha256(want).hexdigest())
        assert total >= SPLICE_BODY and spliced == []
        assert not server.errors
    finally:
        release.set()
        sock.close()
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_response_cancels_quietly(backend: Backend) -> None:
    router, ingress, _ = await router_for(backend.address)
    try:
        def leave() -> None:
            with socket.create_connection((LOOPBACK, ingress), timeout=30) as sock:
                sock.sendall(b"GET /web/blob?size=%d HTTP/1.1\r\nHost: h\r\n\r\n" % (64 * MiB))
                sock.recv(65536)

        await in_thread(leave)
        # The backend connection is closed too, so its sender stops early: it
        # is cut (a write fails), not finished, and not stalled forever.
        await wait_for(lambda: backend.stats.blob_cut, 60, "the backend's send to be cut")
        assert backend.stats.blob_cut == 1
        assert backend.stats.blob_sent < 64 * MiB
        assert not router.http.pools["web"].idle  # the cut connection is not pooled
        status, _, _ = await in_thread(get, ingress, "/web/x")
        assert status == 200
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_malformed_request_gets_400_and_reaches_no_backend(backend: Backend) -> None:
    router, ingress, _ = await router_for(backend.address)
    try:
        reply = await in_thread(raw_request, ingress, b"GET /web/x HTTP/1.1\r\nHost h\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")
        reply = await in_thread(raw_request, ingress, b"GET /web/x HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 431")
        assert backend.stats.seen == []
    finally:
        await router.stopService()


@asynccontextmanager
async def web_daemon(tmp_path: Any, backend: Backend) -> AsyncIterator[tuple[Twistd, int]]:
    """
    A real twistd with one HTTP route, web, to C{backend}, and its port, once
    the router has answered on its ingress: then its reactor runs (starting,
    it opens a pipe for SIGCHLD, after the ports are bound). The connection
    it answered on stays open until the end: a descriptor of the router's
    closing while a test counts them would be one more left. At the end the
    router is stopped with SIGTERM and must exit 0.
    """
    port = free_port()
    daemon = one_route_daemon(tmp_path, "web", f"tcp:{LOOPBACK}:{backend.port}", port, "http")
    connection = None
    try:
        await daemon.port_of("web")
        connection = http.client.HTTPConnection(LOOPBACK, await daemon.ingress_port(), timeout=30)
        await in_thread(connection.request, "GET", "/_api/health")
        assert (await in_thread(connection.getresponse)).status == 200
        yield daemon, port
        daemon.terminate()
        assert daemon.proc.returncode == 0
    finally:
        if connection is not None:
            connection.close()
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_for_a_backend_connection_a_request_gets_its_502_and_the_next_is_served(
        backend: Backend, tmp_path: Any) -> None:
    """
    A real twistd with one descriptor left under its limit: the client takes
    it, its backend connection finds none, and the answer is a 502 saying
    why, as for any backend connection that failed. Once descriptors are
    free again, the next request is served.
    """
    async with web_daemon(tmp_path, backend) as (daemon, port):
        with descriptors_left(daemon.proc.pid, 1):
            status, _, body = await in_thread(get, port, "/a", {"Connection": "close"})
        assert status == 502
        assert b"portrouter: project 'web': backend connection failed: " in body
        assert b"Too many open files" in body
        await daemon.wait_line(r"web: GET /a: 502 backend connection failed: .*Too many open files")
        status, _, body = await in_thread(get, port, "/b")
        assert status == 200
        assert not daemon.find("Unhandled Error|Traceback"), "\n".join(daemon.output)


@pytest_twisted.ensureDeferred
async def test_a_large_body_with_no_pipe_to_be_had_goes_through_python_whole(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    spliced = force_python_bodies(monkeypatch, "spliced")
    refusals = refuse_pipes(monkeypatch)
    router, ingress, _ = await router_for(backend.address)
    size = 4 * SPLICE_BODY
    sock = socket.create_connection((LOOPBACK, ingress), timeout=60)
    try:
        sock.sendall(b"GET /web/blob?size=%d&seed=5 HTTP/1.1\r\nHost: h\r\n\r\n" % size)
        head, total, digest = await in_thread(read_response, sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert (total, digest) == (size, hash_of(pattern(5, size)))
        assert spliced == [] and refusals  # one was asked for, and none could be made
    finally:
        sock.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_an_http_listener_pauses_and_its_waiting_client_is_served(
        backend: Backend, tmp_path: Any) -> None:
    """
    With no descriptor left, an HTTP route's port and the ingress stop
    accepting for a moment at a time and say so once, their clients waiting
    in the listen queue (Twisted's own port would accept them with a
    descriptor held in reserve and close them); with descriptors free,
    those clients are served.
    """
    async with web_daemon(tmp_path, backend) as (daemon, port):
        with descriptors_left(daemon.proc.pid, 0):
            answer = in_thread(get, port, "/waited")
            health = in_thread(get, await daemon.ingress_port(), "/_api/health")
            for listener in ("http route web", "ingress"):
                await daemon.wait_line(rf"{listener}: out of descriptors \(Too many open files\): not accepting, "
                                       r"tried again every 0\.1 s; clients wait in the listen queue meanwhile")
        assert (await answer)[0] == (await health)[0] == 200
        for listener in ("http route web", "ingress"):
            await daemon.wait_line(rf"{listener}: accepting again, after \d+\.\d s out of descriptors; "
                                   r"clients accepted meanwhile and closed, with none for their backend: 0$")
        assert len([line for line in daemon.output if "out of descriptors (" in line]) == 2  # once each
        assert not daemon.find("Unhandled Error|Traceback|EMFILE"), "\n".join(daemon.output)
