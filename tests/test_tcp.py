"""
TCP routes end to end over real loopback sockets, for both relays: the
spliced one (plain sockets) and the producer/consumer one (used for TLS).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import pytest_twisted

import portrouter.tcp
from tests.support import (
    LOOPBACK,
    MiB,
    ThreadServer,
    descriptors_left,
    free_port,
    in_thread,
    one_route_daemon,
    recv_all_and_hash,
    refuse_pipes,
    send_all_and_hash,
    start_router,
    wait_for,
)


@pytest.fixture(params=["splice", "stream", "no pipe"])
def relay_mode(request: Any, monkeypatch: Any) -> str:
    if request.param == "stream":
        # Neither the direct path nor splicing: Twisted transports both ways.
        monkeypatch.setattr(portrouter.tcp, "splicable", lambda transport: False)
        monkeypatch.setattr(portrouter.tcp, "direct_address", lambda endpoint: None)
    elif request.param == "no pipe":
        # The direct path, out of descriptors for the pipes it splices
        # through: a bulk direction stays on recv and send.
        request.node.pipe_refusals = refuse_pipes(monkeypatch)
    return str(request.param)


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=60)


async def route_to(backend: ThreadServer | str) -> Any:
    address = backend.address if isinstance(backend, ThreadServer) else backend
    router = await start_router(("tcp", f"tcp:0:interface={LOOPBACK} -> {address}"))
    return router, router.port_of("tcp-0")


@pytest_twisted.ensureDeferred
async def test_64_mib_each_way_arrives_intact(relay_mode: str, request: Any) -> None:
    size = 64 * MiB

    def backend(conn: socket.socket) -> tuple[int, str, str]:
        # Read and write at once, as a real peer would, until both are done.
        received: list[Any] = []
        reader = threading.Thread(target=lambda: received.append(recv_all_and_hash(conn)))
        reader.start()
        sent = send_all_and_hash(conn, 2, size)
        conn.shutdown(socket.SHUT_WR)
        reader.join(60)
        return received[0][0], received[0][1], sent

    server = ThreadServer(backend)
    router, port = await route_to(server)
    try:
        def client() -> tuple[str, tuple[int, str]]:
            with connect(port) as sock:
                received: list[Any] = []
                reader = threading.Thread(target=lambda: received.append(recv_all_and_hash(sock)))
                reader.start()
                sent = send_all_and_hash(sock, 1, size)
                sock.shutdown(socket.SHUT_WR)
                reader.join(60)
                return sent, received[0]

        client_sent, (client_got, client_hash) = await in_thread(client)
        await wait_for(lambda: server.results or server.errors, what="backend to finish")
        assert not server.errors
        backend_got, backend_hash, backend_sent = server.results[0]
        assert (backend_got, backend_hash) == (size, client_sent)
        assert (client_got, client_hash) == (size, backend_sent)
        await wait_for(lambda: not router.sessions.live, what="session to end")
        if relay_mode == "no pipe":
            assert request.node.pipe_refusals, "no pipe was asked for: the bulk path was never tried"
    finally:
        server.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_half_close_reply_still_flows(relay_mode: str) -> None:
    def backend(conn: socket.socket) -> None:
        total, _ = recv_all_and_hash(conn)  # until the client's EOF
        reply = f"got {total} bytes".encode() * 1000
        conn.sendall(reply)

    server = ThreadServer(backend)
    router, port = await route_to(server)
    try:
        def client() -> bytes:
            with connect(port) as sock:
                sock.sendall(b"x" * 100_000)
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
                return b"".join(chunks)

        reply = await in_thread(client)
        assert reply == b"got 100000 bytes" * 1000
    finally:
        server.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_slow_reader_keeps_buffering_bounded(relay_mode: str) -> None:
    """The backend can only get ahead of a client that does not read by kernel buffers."""
    size = 256 * MiB
    progress = {"sent": 0, "done": False}

    def backend(conn: socket.socket) -> None:
        block = b"\xab" * MiB
        for _ in range(size // MiB):
            conn.sendall(block)
            progress["sent"] += MiB
        progress["done"] = True

    server = ThreadServer(backend)
    router, port = await route_to(server)
    sock = connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        # Wait until nothing moves any more: every buffer on the way is full.
        history: list[int] = []

        def stalled() -> bool:
            history.append(progress["sent"])
            return progress["done"] or (len(history) > 25 and len(set(history[-25:])) == 1)

        await wait_for(stalled, 60, "the backend to stall or finish")
        assert not progress["done"], "the whole 256 MiB was taken while the client read nothing"
        assert progress["sent"] < 32 * MiB
        for session in router.sessions.live:
            assert session.bytes_out < 32 * MiB
        # Nothing was lost: once the client reads, all of it arrives.
        total, _ = await in_thread(recv_all_and_hash, sock)
        assert total == size
    finally:
        sock.close()
        server.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_backend_refused_closes_client_at_once(relay_mode: str) -> None:
    router, port = await route_to(f"tcp:{LOOPBACK}:{free_port()}")
    try:
        def client() -> bytes:
            with connect(port) as sock:
                sock.sendall(b"hello")
                return sock.recv(100)

        assert await in_thread(client) == b""
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_bytes_sent_before_backend_connects_are_delivered(relay_mode: str) -> None:
    """The client speaks first (as SSH and Redis clients do) and fast."""
    def backend(conn: socket.socket) -> None:
        data = b""
        while len(data) < 10:
            data += conn.recv(100)
        conn.sendall(data.upper())

    server = ThreadServer(backend)
    router, port = await route_to(server)
    try:
        def client() -> bytes:
            with connect(port) as sock:
                sock.sendall(b"helloworld")
                return sock.recv(100)

        assert await in_thread(client) == b"HELLOWORLD"
    finally:
        server.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_many_concurrent_connections(relay_mode: str) -> None:
    def backend(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    server = ThreadServer(backend)
    router, port = await route_to(server)
    try:
        def one(i: int) -> bool:
            with connect(port) as sock:
                msg = f"message {i} ".encode() * 100
                sock.sendall(msg)
                sock.shutdown(socket.SHUT_WR)
                got = b""
                while data := sock.recv(65536):
                    got += data
                return got == msg

        results = await _gather([in_thread(one, i) for i in range(50)])
        assert all(results)
        await wait_for(lambda: not router.sessions.live, what="all sessions to end")
    finally:
        server.close()
        await router.stopService()


async def _gather(ds: list[Any]) -> list[Any]:
    return [await d for d in ds]


@pytest_twisted.ensureDeferred
async def test_relayed_connections_are_accepted_with_nodelay() -> None:
    """
    TCP_NODELAY is set once, on the listening socket of a direct route, for
    every accepted socket to inherit (Linux does): a relayed small write is
    sent at once, not held for the client's delayed ACK.
    """
    server = ThreadServer(lambda conn: conn.recv(1))
    router = await start_router(("tcp", f"tcp:0:interface={LOOPBACK} -> {server.address}"))
    try:
        (listener,) = router.listeners.values()
        assert listener.factory.direct is not None
        assert listener.port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # type: ignore[attr-defined]
        # And the accepted socket the relay holds has it, by inheritance.
        with socket.create_connection((LOOPBACK, router.port_of(listener.route.project)), timeout=30):
            await wait_for(lambda: router.sessions.live, 15, "the relay to hold the connection")
            (session,) = router.sessions.live
            relay = session._closer.__self__  # type: ignore[union-attr]  # SpliceRelay.close, bound
            assert relay.client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        await router.stopService()
        server.close()


@pytest.mark.parametrize("left", [0, 1], ids=["none to accept with", "none for the backend"])
@pytest_twisted.ensureDeferred
async def test_a_router_out_of_descriptors_keeps_its_listener_and_accepts_again_once_some_are_free(
        left: int, tmp_path: Any) -> None:
    """
    Out of descriptors (a real twistd's limit lowered under it), a direct
    route stops accepting for a moment at a time, says so once, and starts
    again when it can: its clients wait in the listen queue. With one
    descriptor left, the client accepted with it (none left for its
    backend) is closed. Neither loses the listener, which Twisted's
    reactor closes when its doRead raises.
    """
    def backend(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    def echoed(sock: socket.socket) -> bytes:
        sock.sendall(b"ping")
        return sock.recv(100)

    server = ThreadServer(backend)
    port = free_port()
    daemon = one_route_daemon(tmp_path, "fd", server.address, port, "tcp")
    try:
        await daemon.port_of("fd")
        with connect(port) as first:
            assert await in_thread(echoed, first) == b"ping"
        # Its sockets closed: they would be descriptors freed under the limit.
        await daemon.wait_line(r"tcp fd 127\.0\.0\.1:\d+: client closed; 4 bytes in, 4 bytes out")
        with descriptors_left(daemon.proc.pid, left):  # the router is idle: it can make `left` more, then none
            waiting = connect(port)
            await daemon.wait_line(r"tcp route fd: out of descriptors \(Too many open files\): not accepting, "
                                   r"tried again every 0\.1 s; clients wait in the listen queue meanwhile")
            if left:
                assert await in_thread(waiting.recv, 100) == b""  # accepted, and closed: none for its backend
                waiting.close()
        if left:
            # (Connected before, it would have the descriptor the closed one gave back, and none for its backend.)
            waiting = connect(port)
        assert await in_thread(echoed, waiting) == b"ping"
        waiting.close()
        await daemon.wait_line(rf"tcp route fd: accepting again, after \d+\.\d s out of descriptors; "
                               rf"clients accepted meanwhile and closed, with none for their backend: {left}$")
        # Once (each failed accept wrote a line before: 17,000 in 0.3 s).
        said = [line for line in daemon.output if "out of descriptors (" in line]
        assert len(said) == 1, said
        assert not daemon.find("Unhandled Error|Traceback"), "\n".join(daemon.output)
        daemon.terminate()
        assert daemon.proc.returncode == 0
    finally:
        daemon.stop()
        server.close()
