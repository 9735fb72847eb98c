"""
An HTTP/1.1 backend for the proxy tests, on the standard library only, so
that what it sees does not depend on the code under test.

Endpoints: ``/blob?size=N&seed=S`` (deterministic bytes; ``chunked=1`` for
chunked framing), ``/sink`` (reads the body, content-length or chunked,
answers its size and SHA-256), ``/headers`` (the request as JSON), ``/cookies``
(two Set-Cookie), ``/sse?n=N`` (events, one per ``/sse-next`` call),
``/status?code=N``, ``/slow`` (never answers), ``/upgrade`` (101 if asked
to upgrade, then echoes every byte), anything else: a short text. Every
request line is logged per connection (C{stats.lines}), so a test sees
exactly what reached the backend and on which connection.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support import pattern


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.blob_sent = 0
        self.blob_cut = 0  # /blob responses whose connection closed before the last byte
        self.sse_release = threading.Semaphore(0)
        self.seen: list[dict[str, Any]] = []
        self.lines: list[list[str]] = []  # per connection, in order: "GET /x HTTP/1.1 real-ip=... prefix=..."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Backend

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # As real servers do; without it each response waits 40 ms on Nagle.
        if self.connection.family != socket.AF_UNIX:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.stats.connections += 1
        self.lines: list[str] = []
        self.server.stats.lines.append(self.lines)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if self.requestline:
            # With the headers that say who routed it: a request smuggled past
            # the proxy lacks ours or carries the client's.
            headers = getattr(self, "headers", None) or {}
            self.lines.append(f"{self.requestline} real-ip={headers.get('X-Real-IP')} "
                              f"prefix={headers.get('X-Forwarded-Prefix')}")
        return ok

    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _send(self, code: int, body: bytes, ctype: str = "text/plain", extra: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        if code not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and code not in (204, 304):
            self.wfile.write(body)

    def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    digest.update(data)
                    left -= len(data)
                total += size
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                total += len(data)
                left -= len(data)
        return total, digest.hexdigest()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        q = self._query()
        self.server.stats.seen.append({"method": self.command, "path": self.path, "headers": self.headers.items()})
        if path.endswith("/blob"):
            size, seed = int(q.get("size", "0")), int(q.get("seed", "1"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            chunked = q.get("chunked") == "1"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command == "HEAD":
                return
            try:
                for block in pattern(seed, size):
                    if chunked:
                        self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                    else:
                        self.wfile.write(block)
                    self.server.stats.blob_sent += len(block)
            except OSError:  # the proxy closed this connection: a fact a test can wait on
                self.server.stats.blob_cut += 1
                self.close_connection = True
                return
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        elif path.endswith("/headers"):
            body = json.dumps({
                "method": self.command, "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
            }).encode()
            self._send(200, body, "application/json")
        elif path.endswith("/cookies"):
            self._send(200, b"two cookies", extra=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")])
        elif path.endswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", "3"))):
                # The next event only when the test says so: arrival one by
                # one is then a fact, not a timing.
                self.server.stats.sse_release.acquire(timeout=30)
                event = f"data: event {i}\n\n".encode()
                self.wfile.write(b"%x\r\n" % len(event) + event + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif path.endswith("/status"):
            self._send(int(q.get("code", "200")), b"status body\n")
        elif path.endswith("/upgrade") and self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            while data := self.rfile.read1(65536):
                self.wfile.write(data)
                self.wfile.flush()
        elif path.endswith("/slow"):
            self.rfile.read(1)  # until the proxy gives up and closes
        else:
            self._send(200, f"backend saw {self.command} {self.path}\n".encode())

    do_HEAD = do_GET
    do_DELETE = do_GET

    def do_POST(self) -> None:
        total, digest = self._read_body()
        self.server.stats.seen.append({"method": self.command, "path": self.path, "headers": self.headers.items()})
        self._send(200, json.dumps({"size": total, "sha256": digest}).encode(), "application/json")

    do_PUT = do_POST


class Backend(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int] | str = ("127.0.0.1", 0)) -> None:
        # Another address ("::1", a UNIX path) comes with a subclass's address_family.
        super().__init__(address, Handler)  # type: ignore[arg-type]
        self.stats = Stats()
        self.port = self.server_address[1] if isinstance(self.server_address, tuple) else 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:  # HTTPServer's wants a host and port
            self.socket.bind(self.server_address)
            self.server_name, self.server_port = "localhost", 0
        else:
            super().server_bind()

    @property
    def address(self) -> str:
        """The client endpoint string portrouter connects to."""
        if self.address_family == socket.AF_UNIX:
            return f"unix:{self.server_address}"
        return f"tcp:{self.server_address[0].replace(':', chr(92) + ':')}:{self.port}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def raw_request(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send bytes as they are, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
