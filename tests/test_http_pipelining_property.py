"""
A property of the HTTP proxy (SPEC 2, issue 12): whatever two clients
pipeline at once through one project (and so one backend pool) — plain
requests, upgrade requests the backend refuses or accepts, bodies framed by
length or in chunks (with trailers), forged forwarding headers, all cut at
arbitrary byte boundaries — the backend receives exactly the requests the
proxy logged, each once, in each client's order, each with our forwarding
headers; and every client receives exactly the answers to its own requests.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from tests.httpbackend import Backend, Stats
from tests.support import LOOPBACK, in_thread
from tests.test_http import router_for
from tests.test_http_hostile import UPGRADE, backend, read_responses

__all__ = ["backend"]  # the fixture, shared
# One request: (kind, body or tunnel bytes, chunk size, forged headers?)
KINDS = ["get", "get-upgrade-refused", "post-length", "post-chunked", "head"]
requests = st.tuples(
    st.sampled_from(KINDS),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=64),
    st.booleans(),
)
# What comes after a switch: the new protocol's bytes, HTTP-looking or not.
tunnels = st.one_of(
    st.none(),
    st.binary(min_size=1, max_size=200),
    st.just(b"GET /web/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"),
)
clients = st.tuples(
    st.lists(requests, min_size=1, max_size=5),
    tunnels,
    st.lists(st.integers(min_value=1, max_value=2000), max_size=6),  # where the bytes are cut
)

FORGED = b"X-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Prefix: /evil\r\n"


def encode(client: str, i: int, request: tuple[str, bytes, int, bool]) -> tuple[bytes, str, bytes]:
    """The request's bytes, the path the backend must see, and the answer the client must get."""
    kind, body, chunk, forged = request
    extra = FORGED if forged else b""
    if kind in ("get", "get-upgrade-refused", "head"):
        path = f"/r/{client}/{i}"
        method = b"HEAD" if kind == "head" else b"GET"
        upgrade = UPGRADE if kind == "get-upgrade-refused" else b""
        data = b"%s /web%s HTTP/1.1\r\nHost: h\r\n%s%s\r\n" % (method, path.encode(), upgrade, extra)
        answer = b"" if kind == "head" else f"backend saw GET {path}\n".encode()
        return data, f"{method.decode()} {path}", answer
    path = f"/sink/{client}/{i}"
    answer = json.dumps({"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
    if kind == "post-length":
        head = b"POST /web%s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), len(body), extra)
        return head + body, f"POST {path}", answer
    pieces = [body[j:j + chunk] for j in range(0, len(body), chunk)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-Trailer: t\r\n\r\n"
    head = b"POST /web%s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n%s\r\n" % (path.encode(), extra)
    return head + framed, f"POST {path}", answer


def run_client(port: int, data: bytes, cuts: list[int], count: int, heads: frozenset[int],
               tunnel: bytes | None, start: threading.Barrier) -> tuple[list[Any], bytes]:
    """Send C{data} in pieces cut at C{cuts}, read C{count} answers (and the echo of C{tunnel})."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start.wait(30)
        edges = sorted({c % len(data) for c in cuts} | {0, len(data)})
        for a, b in zip(edges, edges[1:]):
            sock.sendall(data[a:b])
        replies, rest = read_responses(sock, count, heads)
        if tunnel is not None:
            while len(rest) < len(tunnel):
                more = sock.recv(65536)
                if not more:
                    break
                rest += more
        return replies, rest


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=st.lists(clients, min_size=2, max_size=2))
@example(plans=[
    ([("post-chunked", b"\xfaT", 34, True)], None, [89]),
    ([("post-chunked", b"\xbc\xba", 1, False), ("get-upgrade-refused", b"", 36, True), ("get", b"G", 59, False),
      ("head", b"?4e", 57, False), ("get-upgrade-refused", b"", 28, True)], None, [242, 508, 1503, 88]),
])
@pytest_twisted.ensureDeferred
async def test_pipelined_requests_reach_the_backend_exactly_as_routed(backend: Backend, plans: list[Any]) -> None:
    # One backend for all examples (stopping one takes half a second), a
    # fresh log per example; a fresh router, so no pooled connection of the
    # last example logs into the old one.
    backend.stats = Stats()
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        # The access log: one event per request the proxy answered.
        if event.get("log_namespace") == "portrouter.http" and "status" in event and "target" in event:
            logged.append(f"{event['method']} {event['target']} {event['status']}")

    globalLogPublisher.addObserver(observe)
    router, ingress, _ = await router_for(backend.address)
    try:
        start = threading.Barrier(2)
        runs = []
        expected: dict[str, list[tuple[str, bytes]]] = {}
        for name, (plan, tunnel, cuts) in zip("AB", plans):
            encoded = [encode(name, i, r) for i, r in enumerate(plan)]
            data = b"".join(e[0] for e in encoded)
            expected[name] = [(e[1], e[2]) for e in encoded]
            count = len(plan)
            if tunnel is not None:
                # Last, a switch: what follows is the new protocol's, echoed.
                path = f"/{name}/upgrade"
                data += b"GET /web%s HTTP/1.1\r\nHost: h\r\n%s\r\n%s" % (path.encode(), UPGRADE, tunnel)
                expected[name].append((f"GET {path}", b""))
                count += 1
            heads = frozenset(i for i, r in enumerate(plan) if r[0] == "head")
            runs.append(in_thread(run_client, ingress, data, cuts, count, heads, tunnel, start))
        results = await defer.gatherResults(runs)
        for (name, (plan, tunnel, _)), (replies, rest) in zip(zip("AB", plans), results):
            want = expected[name]
            got = [(status, body) for status, _, body in replies]
            assert got == [(101 if p.endswith("/upgrade") else 200, answer) for p, answer in want], name
            assert rest == (tunnel or b""), name
        # What the backend saw: exactly what the proxy routed, each once.
        seen = [line for conn in backend.stats.lines for line in conn]
        assert all(line.endswith(" HTTP/1.1 real-ip=127.0.0.1 prefix=/web") for line in seen), seen
        routed = sorted(" ".join(line.split()[:2]) for line in seen)
        assert routed == sorted(p for want in expected.values() for p, _ in want)
        assert sorted(line.rsplit(" ", 1)[0] for line in logged) == sorted(
            f"{p.split()[0]} /web{p.split()[1]}" for want in expected.values() for p, _ in want
        )
        # In each client's order, with our forwarding headers.
        for name, want in expected.items():
            order = [entry for entry in backend.stats.seen if f"/{name}/" in entry["path"]]
            assert [f"{e['method']} {e['path']}" for e in order] == [p for p, _ in want]
            for entry in order:
                headers = {k.lower(): v for k, v in entry["headers"]}
                assert headers["x-real-ip"] == "127.0.0.1"
                assert headers["x-forwarded-for"] in ("127.0.0.1", "6.6.6.6, 127.0.0.1")
                assert headers["x-forwarded-prefix"] == "/web"
                assert "forwarded" not in headers
    finally:
        globalLogPublisher.removeObserver(observe)
        await router.stopService()
