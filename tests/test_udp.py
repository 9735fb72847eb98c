"""
UDP routes end to end over real loopback sockets: a real DNS server
(dnsmasq) asked by real C{dig} processes and by 200 clients at once, an echo
backend for datagrams of every size, a backend that is down, the session
bound and the log line each session leaves.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import socket
import struct
import subprocess
import time
from typing import Any, Iterator
from urllib.request import urlopen

import pytest
import pytest_twisted
from twisted.internet import defer, utils
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from portrouter.model import Config, Limits
from portrouter.udp import UDPRoute
from tests.support import (
    LOOPBACK,
    ClockedReactor,
    UDPEcho,
    descriptors_left,
    free_port,
    in_thread,
    kernel_sockets,
    one_route_daemon,
    start_router,
    stop_clocked,
    wait_for,
)

# The largest UDP payload over IPv4: 65,535 - 20 (IP) - 8 (UDP).
MAX_PAYLOAD = 65507
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


# --- helpers ---------------------------------------------------------------------


async def route_to(backend_port: int, using: Any = None, **limits: Any) -> tuple[Any, UDPRoute, tuple[str, int]]:
    """A router with one UDP route to 127.0.0.1:C{backend_port}: (router, route, its address)."""
    config = Config(ingress=f"tcp:0:interface={LOOPBACK}", defaults=Limits(**limits))
    router = await start_router(("udp", f"udp:0:interface={LOOPBACK} -> {LOOPBACK}:{backend_port}"), config=config,
                                using=using)
    listener = router.listeners["udp-0"]
    return router, listener.factory, (LOOPBACK, listener.port.getHost().port)


def client_socket(timeout: float = 20.0) -> socket.socket:
    """A blocking client with its own port, able to take the largest datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(timeout)
    return sock


def exchange(sock: socket.socket, route: tuple[str, int], data: bytes) -> bytes:
    """Send one datagram through the route and return the reply, which must come from the route's port."""
    sock.sendto(data, route)
    reply, source = sock.recvfrom(65535)
    assert source == route, f"reply came from {source}, not from the route's {route}"
    return reply


def session_ends(events: list[dict[str, Any]], client: tuple[str, int]) -> list[dict[str, Any]]:
    name = f"{client[0]}:{client[1]}"
    return [e for e in events if e.get("log_namespace") == "portrouter.udp" and e.get("client") == name]


# --- DNS -------------------------------------------------------------------------

DOMAIN = "portrouter.test"
CATCH_ALL = "127.0.0.42"
HOSTS = 200


def host_name(i: int) -> str:
    return f"client-{i}.{DOMAIN}"


def host_address(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def dns_query(name: str, qid: int, qtype: int = 1) -> bytes:
    """A recursive query for C{name} (type A unless told), class IN."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", qtype, 1)


def _read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """The (possibly compressed) name at C{pos}, and where the field after it starts."""
    labels: list[str] = []
    end = None
    while True:
        n = msg[pos]
        if n == 0:
            return ".".join(labels), end if end is not None else pos + 1
        if n & 0xC0 == 0xC0:
            if end is None:
                end = pos + 2
            pos = struct.unpack_from("!H", msg, pos)[0] & 0x3FFF
            continue
        labels.append(msg[pos + 1:pos + 1 + n].decode())
        pos += 1 + n


def dns_answer(reply: bytes) -> tuple[int, int, str, list[str]]:
    """(id, rcode, question name, A records) of a DNS response."""
    qid, flags, qdcount, ancount, _, _ = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0x8000, "not a response"
    pos = 12
    question = ""
    for _ in range(qdcount):
        question, pos = _read_name(reply, pos)
        pos += 4
    addresses = []
    for _ in range(ancount):
        _, pos = _read_name(reply, pos)
        rtype, _, _, rdlength = struct.unpack_from("!HHIH", reply, pos)
        pos += 10
        if rtype == 1:
            addresses.append(socket.inet_ntoa(reply[pos:pos + rdlength]))
        pos += rdlength
    return qid, flags & 0xF, question, addresses


def tool(name: str, package: str) -> str:
    found = shutil.which(name, path=SBIN_PATH)
    assert found, f"{name} is not installed: the UDP tests need Debian's {package} (apt-get install {package})"
    return found


def _tcp_and_udp_free_port() -> int:
    """dnsmasq binds TCP and UDP on its port: both must be free."""
    while True:
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        return port


def _ask_directly(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        try:
            s.sendto(dns_query(host_name(0), 1), (LOOPBACK, port))
            return dns_answer(s.recv(4096))[3] == [host_address(0)]
        except OSError:
            return False


@pytest.fixture
def dnsmasq() -> Iterator[int]:
    """A dnsmasq on 127.0.0.1 serving client-N.portrouter.test (and TXT records); yields its port."""
    binary = tool("dnsmasq", "dnsmasq")
    records = [f"--host-record={host_name(i)},{host_address(i)}" for i in range(HOSTS)]
    records += [f"--txt-record=txt-{i}.{DOMAIN},answer {i}" for i in range(5)]
    for _attempt in range(5):
        port = _tcp_and_udp_free_port()
        proc = subprocess.Popen(
            [
                binary, "--no-daemon", "--conf-file=/dev/null", "--pid-file=", f"--port={port}",
                f"--listen-address={LOOPBACK}", "--bind-dynamic", "--no-resolv", "--no-hosts",
                f"--address=/{DOMAIN}/{CATCH_ALL}", *records,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline and not _ask_directly(port):
            pass  # each try waits up to 0.1 s for an answer
        if proc.poll() is None and _ask_directly(port):
            break
        proc.kill()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
        if "Address already in use" not in output:  # only a port taken meanwhile is worth another try
            raise AssertionError(f"dnsmasq did not start:\n{output}")
    else:
        raise AssertionError("dnsmasq found no free port in 5 tries")
    try:
        yield port
    finally:
        proc.kill()
        proc.communicate(timeout=10)


async def dig(route: tuple[str, int], *query: str) -> str:
    """C{dig +short} through the route: one try, so that a lost reply fails rather than being retried."""
    out, err, code = await utils.getProcessOutputAndValue(
        tool("dig", "dnsutils"),
        [f"@{route[0]}", "-p", str(route[1]), "+short", "+tries=1", "+time=20", *query],
        env=os.environ,
    )
    assert code == 0, (query, out, err)
    return out.decode().strip()


def ask_all_at_once(route: tuple[str, int], count: int) -> list[tuple[int, int, Any]]:
    """
    C{count} clients, each on its own port, each asking its own name: every
    query is sent before any answer is read, so all are in flight at once.
    Returns (client's port, query id, (reply, source) or None) per client.
    """
    rng = random.Random(7)
    sel = selectors.DefaultSelector()
    clients = []
    try:
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((LOOPBACK, 0))
            sock.setblocking(False)
            clients.append([sock, rng.randrange(1 << 16), None])
            sel.register(sock, selectors.EVENT_READ, i)
        for i, (sock, qid, _) in enumerate(clients):
            sock.sendto(dns_query(host_name(i), qid), route)
        deadline = time.monotonic() + 30
        pending = count
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                clients[key.data][2] = sock.recvfrom(4096)  # type: ignore[union-attr]
                sel.unregister(sock)
                pending -= 1
        return [(c[0].getsockname()[1], c[1], c[2]) for c in clients]
    finally:
        sel.close()
        for c in clients:
            c[0].close()


@pytest_twisted.ensureDeferred
async def test_dns_200_clients_at_once_each_get_their_own_answer(dnsmasq: int) -> None:
    """200 clients, each on its own port, ask 200 different names at once; each gets its own answer."""
    router, route, address = await route_to(dnsmasq)
    try:
        results = await in_thread(ask_all_at_once, address, HOSTS)
        unanswered = [i for i, (_, _, got) in enumerate(results) if got is None]
        assert not unanswered, f"{len(unanswered)} of {HOSTS} clients got no answer: {unanswered[:10]}"
        for i, (_, qid, (reply, source)) in enumerate(results):
            assert source == address, f"client {i}: reply from {source}, not from the route's {address}"
            assert dns_answer(reply) == (qid, 0, host_name(i), [host_address(i)]), f"client {i}"
        # One session per client port, each with one query and one answer.
        ports = {port for port, _, _ in results}
        assert len(ports) == HOSTS
        mine = [s for client, s in route.sessions.items() if client[1] in ports]
        assert len(mine) == HOSTS
        assert all((s.datagrams_in, s.datagrams_out) == (1, 1) for s in mine)
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_dig_through_the_route(dnsmasq: int) -> None:
    """20 real dig processes at once, different names and record types, different answers."""
    router, route, address = await route_to(dnsmasq)
    try:
        picks = list(range(0, HOSTS, 12))[:16]
        queries = [dig(address, host_name(i), "A") for i in picks]
        queries += [dig(address, f"txt-{i}.{DOMAIN}", "TXT") for i in range(3)]
        queries.append(dig(address, f"anything-else.{DOMAIN}", "A"))
        answers = await defer.gatherResults([defer.ensureDeferred(q) for q in queries])
        expected = [host_address(i) for i in picks] + [f'"answer {i}"' for i in range(3)] + [CATCH_ALL]
        assert answers == expected
        assert len(route.sessions) == len(queries)  # each dig asks from its own port
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_garbage_and_empty_datagrams_do_not_hurt_the_route(dnsmasq: int) -> None:
    router, route, address = await route_to(dnsmasq)
    try:
        def client() -> tuple[int, str, list[str]]:
            with client_socket() as sock:
                sock.sendto(b"", address)  # opens the session with nothing
                sock.sendto(b"\xff" * 7, address)  # not DNS: dnsmasq ignores it
                qid, rcode, question, addresses = dns_answer(exchange(sock, address, dns_query(host_name(3), 99)))
                return qid, question, addresses

        assert await in_thread(client) == (99, host_name(3), [host_address(3)])
        [session] = route.sessions.values()
        assert (session.datagrams_in, session.datagrams_out) == (3, 1)
        assert await dig(address, host_name(4)) == host_address(4)  # and others still get through
    finally:
        await router.stopService()


# --- echo ------------------------------------------------------------------------

# 1,000 sizes spread over 1..65,507, both ends included.
SIZES = [1 + (MAX_PAYLOAD - 1) * i // 999 for i in range(1000)]
ECHO_CLIENTS = 4


def datagram(client: int, n: int, size: int) -> bytes:
    return random.Random(client * 100_000 + n).randbytes(size)


def echo_client(address: tuple[str, int], k: int) -> tuple[int, int, list[int]]:
    """Client C{k} sends its share of SIZES one at a time; returns its port, bytes and the indexes that came back wrong."""
    wrong = []
    with client_socket() as sock:
        mine = SIZES[k::ECHO_CLIENTS]
        for n, size in enumerate(mine):
            data = datagram(k, n, size)
            if exchange(sock, address, data) != data:
                wrong.append(n)
        return sock.getsockname()[1], sum(mine), wrong


@pytest_twisted.ensureDeferred
async def test_echo_1000_datagrams_of_every_size_intact_and_in_order() -> None:
    assert (SIZES[0], SIZES[-1], len(set(SIZES))) == (1, MAX_PAYLOAD, 1000)
    backend = UDPEcho()
    router, route, address = await route_to(backend.port)
    try:
        # Every client's largest datagrams queue on the one listening socket:
        # a default-sized buffer holds three of them, fewer than the clients.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
            default = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        listening = router.listeners["udp-0"].port.socket
        assert listening.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > default
        results = await defer.gatherResults([in_thread(echo_client, address, k) for k in range(ECHO_CLIENTS)])
        for k, (_, _, wrong) in enumerate(results):
            assert not wrong, f"client {k}: datagrams {wrong[:10]} came back changed or out of order"
        for port, total, _ in results:
            session = route.sessions[(LOOPBACK, port)]
            count = len(SIZES) // ECHO_CLIENTS
            assert (session.datagrams_in, session.bytes_in) == (count, total)
            assert (session.datagrams_out, session.bytes_out) == (count, total)
        assert backend.received == len(SIZES)
        assert len(backend.peers) == ECHO_CLIENTS  # a socket of its own per session
        assert route.send_errors == 0
    finally:
        await router.stopService()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_empty_datagram_is_relayed_both_ways() -> None:
    backend = UDPEcho()
    router, route, address = await route_to(backend.port)
    try:
        def client() -> tuple[bytes, bytes, int]:
            with client_socket() as sock:
                return exchange(sock, address, b""), exchange(sock, address, b"x"), sock.getsockname()[1]

        empty, x, port = await in_thread(client)
        assert (empty, x) == (b"", b"x")
        session = route.sessions[(LOOPBACK, port)]
        assert (session.datagrams_in, session.bytes_in, session.datagrams_out, session.bytes_out) == (2, 1, 2, 1)
    finally:
        await router.stopService()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_backend_down_then_up_old_and_new_clients_get_replies() -> None:
    backend_port = free_port(socket.SOCK_DGRAM)
    router, route, address = await route_to(backend_port)
    old = client_socket()
    new = client_socket()
    backend = None
    try:
        old.sendto(b"anyone there?", address)
        # Nothing listens: the kernel answers with ICMP port unreachable.
        await wait_for(lambda: route.refused >= 1, what="the backend's refusal to be counted")
        old_session = route.sessions[old.getsockname()]
        assert router.listeners["udp-0"].port.connected  # the listener is still up
        backend = UDPEcho(backend_port)
        assert await in_thread(exchange, new, address, b"first") == b"first"
        assert await in_thread(exchange, old, address, b"again") == b"again"
        # The refusal cost one datagram, not the session.
        assert route.sessions[old.getsockname()] is old_session
        assert (old_session.datagrams_in, old_session.datagrams_out) == (2, 1)
        assert backend.received == 2
    finally:
        old.close()
        new.close()
        await router.stopService()
        if backend is not None:
            backend.close()


@pytest_twisted.ensureDeferred
async def test_session_bound_drops_new_clients_and_keeps_the_old() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    backend = UDPEcho()
    router, route, address = await route_to(backend.port, udp_max_sessions=2)
    a, b, c = client_socket(), client_socket(), client_socket()
    try:
        assert await in_thread(exchange, a, address, b"a1") == b"a1"
        assert await in_thread(exchange, b, address, b"b1") == b"b1"
        c.sendto(b"c1", address)
        c.sendto(b"c2", address)
        await wait_for(lambda: route.dropped == 2, what="two datagrams from a third client to be dropped")
        assert await in_thread(exchange, a, address, b"a2") == b"a2"
        assert await in_thread(exchange, b, address, b"b2") == b"b2"
        assert set(route.sessions) == {a.getsockname(), b.getsockname()}
        assert backend.received == 4
        c.setblocking(False)
        with pytest.raises(BlockingIOError):
            c.recv(100)  # nothing came back to the dropped client
        [report] = [e for e in events if e.get("log_namespace") == "portrouter.udp" and "limit" in e]
        assert (report["limit"], report["count"], report["project"]) == (2, 1, "udp-0")
    finally:
        globalLogPublisher.removeObserver(events.append)
        for s in (a, b, c):
            s.close()
        await router.stopService()
        backend.close()


# --- session ends ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_session_ends_with_one_log_line() -> None:
    """
    A session ends udp_timeout after its last datagram, not after its first,
    with one log line. Time is a Clock: the test says when it passes (the
    sweeps come every udp_timeout / 4 of it).
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    backend = UDPEcho()
    clock = Clock()
    router, route, address = await route_to(backend.port, using=ClockedReactor(clock), udp_timeout=1.0)
    sock = client_socket()
    try:
        # At 0, 0.5 and 1.0 s; each reply is in before the clock moves on.
        for i, data in enumerate((b"a" * 10, b"b" * 20, b"c" * 30)):
            if i:
                clock.advance(0.5)
            assert await in_thread(exchange, sock, address, data) == data
        me = sock.getsockname()
        clock.advance(0.75)  # 1.75 s: idle for 0.75 s only
        assert me in route.sessions and not session_ends(events, me)
        clock.advance(0.25)  # 2 s: idle for 1 s
        assert me not in route.sessions
        [end] = session_ends(events, me)
        assert end["project"] == "udp-0"
        assert end["reason"] == "idle for 1 s"
        assert (end["datagrams_in"], end["bytes_in"], end["datagrams_out"], end["bytes_out"]) == (3, 60, 3, 60)
        assert end["duration"] == 2.0
        text = formatEvent(end)
        assert text.startswith(f"udp udp-0 {me[0]}:{me[1]}: idle for 1 s; 3 datagrams (60 bytes) in, "
                               f"3 datagrams (60 bytes) out, 2.000 s")
        # A new datagram from the same client starts a new session.
        assert await in_thread(exchange, sock, address, b"later") == b"later"
        assert route.sessions[me].datagrams_in == 1
    finally:
        globalLogPublisher.removeObserver(events.append)
        sock.close()
        await stop_clocked(router, clock)
        backend.close()


@pytest_twisted.ensureDeferred
async def test_stopping_the_route_ends_each_session_with_a_log_line() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    backend = UDPEcho()
    router, route, address = await route_to(backend.port)
    socks = [client_socket() for _ in range(3)]
    try:
        for i, sock in enumerate(socks):
            assert await in_thread(exchange, sock, address, b"x" * i) == b"x" * i
        await router.stopService()
        assert not route.sessions
        for i, sock in enumerate(socks):
            [end] = session_ends(events, sock.getsockname())
            assert end["reason"] == "listener stopped"
            assert (end["datagrams_in"], end["bytes_in"], end["datagrams_out"], end["bytes_out"]) == (1, i, 1, i)
    finally:
        globalLogPublisher.removeObserver(events.append)
        for sock in socks:
            sock.close()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_a_new_clients_datagrams_are_dropped_and_said_once(tmp_path: Any) -> None:
    """
    A real twistd with no descriptor left: a new client's datagram finds no
    socket to the backend, is dropped, and the router says so once for
    them all (not once a datagram). With descriptors free again the same
    client is served.
    """
    echo = UDPEcho(tag=b"echo:")
    port = free_port(socket.SOCK_DGRAM)
    daemon = one_route_daemon(tmp_path, "game", echo.address, port, "udp")
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    warm, clients = clients[0], clients[1:]
    try:
        await daemon.port_of("game")
        ingress = await daemon.ingress_port()
        # Once it has answered, the reactor runs (its start opens a pipe for
        # SIGCHLD, after the ports are bound); that client's session, and its
        # socket, stay open throughout.
        warm.settimeout(30)
        warm.sendto(b"warm", (LOOPBACK, port))
        assert await in_thread(warm.recv, 100) == b"echo:warm"
        with descriptors_left(daemon.proc.pid, 0):
            for client in clients:
                client.settimeout(30)
                client.sendto(b"hello", (LOOPBACK, port))
            await daemon.wait_line(r"udp game: cannot open a socket to the backend: \[Errno 24\] Too many open files; "
                                   r"dropped 1 datagrams from new clients")
            # All three read (none left in the router's socket): the first
            # was said, the other two wait to be counted in the next line.
            await wait_for(lambda: not any(s.rx_queue for s in kernel_sockets("udp") if s.port == port),
                           what="the router to read the three datagrams")
        clients[0].sendto(b"again", (LOOPBACK, port))
        assert await in_thread(clients[0].recv, 100) == b"echo:again"
        assert len([line for line in daemon.output if "cannot open a socket" in line]) == 1
        assert echo.received == 2  # the first client's, then the one after the limit
        metrics = await in_thread(lambda: urlopen(f"http://{LOOPBACK}:{ingress}/_api/metrics", timeout=30).read())
        assert b'portrouter_udp_dropped_total{project="game"} 3.0' in metrics  # the three, counted all the same
        assert not daemon.find("Unhandled Error|Traceback"), "\n".join(daemon.output)
        daemon.terminate()
        assert daemon.proc.returncode == 0
    finally:
        daemon.stop()
        for client in (warm, *clients):
            client.close()
        echo.close()
