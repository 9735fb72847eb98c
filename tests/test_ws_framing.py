"""
WebSocket framing on a ``ws`` route, end to end over loopback sockets
(portrouter/ws.py): the L{Bridge} fast path that parses unfragmented masked
BINARY frames itself and hands every other frame to Autobahn at a frame
boundary, and the service-to-client frames, between which Autobahn's own
writes (pongs, a close) must fit.

The client is written by hand: the HTTP upgrade, every client frame (masked
with random masks from a seeded generator) and a strict parser for every
server frame (FIN, no RSV bits, unmasked, BINARY/PONG/CLOSE only, shortest
length encoding, control frames of at most 125 bytes), so a pong written in
the middle of a data frame shows as a broken header or as wrong
data. The backend records every byte of every connection and, in the
``echo`` variant, sends it back: each test checks the exact bytes the
backend got and the exact bytes that came back.

A probe wrapped around C{Bridge.dataReceived} counts what the server side
has been handed, so sends can go in lockstep: the next piece is sent only
once the previous one reached the bridge, which makes the bridge see the
split at exactly that offset (one byte per send() really is one byte per
C{dataReceived}).
"""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import struct
import threading
from typing import Any, Callable, Iterable

import pytest
import pytest_twisted

from portrouter.ws import Bridge
from tests.support import LOOPBACK, MiB, ThreadServer, in_thread, pattern, start_router, wait_for

SEED = 6455  # RFC 6455

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def rng_for(name: str) -> random.Random:
    """A generator of its own for each test, from the fixed seed: one test's draws do not move another's."""
    return random.Random(f"{SEED}:{name}")


# -- frames, by hand --------------------------------------------------------------------


def masked(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame(rng: random.Random, opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0,
          mask: bytes | None = None, masking: bool = True) -> bytes:
    """
    A client frame (RFC 6455 5.2), the shortest length encoding, masked with
    C{mask} or a random one (or, with C{masking=False}, unmasked: not allowed).
    """
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if masking else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masking:
        return head + payload
    if mask is None:
        mask = rng.randbytes(4)
    return head + mask + masked(payload, mask)


def frame_on_wire(rng: random.Random, opcode: int, wire: bytes, mask: bytes | None = None) -> tuple[bytes, bytes]:
    """A frame whose payload I{as sent} (masked) is C{wire}: (the frame, its unmasked payload)."""
    mask = rng.randbytes(4) if mask is None else mask
    payload = masked(wire, mask)  # masking is its own inverse
    return frame(rng, opcode, payload, mask=mask), payload


def head_size(n: int) -> int:
    """The size of a client frame's header (with its mask) for a payload of C{n} bytes."""
    return 6 if n < 126 else (8 if n < 65536 else 14)


def close_payload(code: int) -> bytes:
    return struct.pack("!H", code)


class BadFrame(AssertionError):
    """A server frame that breaks RFC 6455 or what portrouter sends."""


def take_server_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """
    Parse one server frame off the front of C{buf}, strictly; C{None} while
    it is incomplete. Server frames are never fragmented and never masked,
    use no RSV bits, and are BINARY, PONG or CLOSE.
    """
    if len(buf) < 2:
        return None
    first, second = buf[0], buf[1]
    opcode = first & 0x0F
    if not first & 0x80:
        raise BadFrame(f"a fragment (FIN clear) from the server: first byte {first:#04x}")
    if first & 0x70:
        raise BadFrame(f"RSV bits from the server: first byte {first:#04x}")
    if opcode not in (BINARY, CLOSE, PONG):
        raise BadFrame(f"opcode {opcode:#x} from the server")
    if second & 0x80:
        raise BadFrame("a masked frame from the server")
    n, at = second & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        (n,) = struct.unpack_from("!H", buf, 2)
        at = 4
        if n < 126:
            raise BadFrame(f"16-bit length {n}: not the shortest encoding")
    elif n == 127:
        if len(buf) < 10:
            return None
        (n,) = struct.unpack_from("!Q", buf, 2)
        at = 10
        if n < 65536 or n >= 1 << 63:
            raise BadFrame(f"64-bit length {n}: not the shortest encoding, or too long")
    if opcode != BINARY and n > 125:
        raise BadFrame(f"control frame {opcode:#x} with {n} bytes")
    if opcode == CLOSE and n == 1:
        raise BadFrame("close frame with a 1-byte payload")
    if len(buf) < at + n:
        return None
    payload = bytes(buf[at:at + n])
    del buf[:at + n]
    return opcode, payload


# -- the server side, observed ----------------------------------------------------------------


class Probe:
    """
    Wraps C{Bridge.dataReceived} and C{Bridge._fast} (behaviour unchanged) to
    count, per client port, the bytes the bridge was handed and the bytes its
    fast path parsed; a client thread waits on it to send in lockstep.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.cond = threading.Condition()
        self.handed: dict[int, int] = {}
        self.fast: dict[int, int] = {}
        self.bridges: dict[int, Bridge] = {}
        probe = self
        received, fast = Bridge.dataReceived, Bridge._fast

        def dataReceived(bridge: Bridge, data: bytes) -> None:
            port = bridge.transport.getPeer().port
            with probe.cond:
                probe.bridges[port] = bridge
                probe.handed[port] = probe.handed.get(port, 0) + len(data)
                probe.cond.notify_all()
            received(bridge, data)

        def _fast(bridge: Bridge, data: bytes) -> None:
            port = bridge.transport.getPeer().port
            probe.fast[port] = probe.fast.get(port, 0) + len(data)
            fast(bridge, data)

        monkeypatch.setattr(Bridge, "dataReceived", dataReceived)
        monkeypatch.setattr(Bridge, "_fast", _fast)

    def wait_handed(self, port: int, total: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.handed.get(port, 0) >= total, 30):
                raise AssertionError(f"the bridge got {self.handed.get(port, 0)} of {total} bytes")

    def bridge(self, port: int) -> Bridge | None:
        with self.cond:
            return self.bridges.get(port)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    return Probe(monkeypatch)


class Backend:
    """
    The TCP service behind the route: records everything each connection
    sends it (in accept order); if C{echo}, sends it straight back; if
    C{flood}, sends that many bytes of L{pattern} on its own from the start.
    """

    def __init__(self, echo: bool = False, flood: int = 0, rcvbuf: int | None = None):
        self.echo = echo
        self.flood = flood
        self.lock = threading.Lock()
        self.received: list[bytearray] = []
        self.finished: list[bool] = []
        listening = None
        if rcvbuf is not None:  # a small window: what portrouter sends waits in its own kernel's queue
            listening = socket.socket()
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # accepted sockets inherit it
            listening.bind((LOOPBACK, 0))
        self.server = ThreadServer(self._handle, listening)

    def _handle(self, conn: socket.socket) -> None:
        got = bytearray()
        with self.lock:
            index = len(self.received)
            self.received.append(got)
            self.finished.append(False)
        if self.flood:
            threading.Thread(target=self._flood, args=(conn,), daemon=True).start()
        echo = self.echo
        try:
            while True:
                try:
                    data = conn.recv(MiB)
                except ConnectionResetError:
                    break
                if not data:
                    break
                with self.lock:
                    got += data
                if echo:
                    try:
                        conn.sendall(data)
                    except OSError:
                        echo = False  # the bridge is gone: keep recording what is left to read
        finally:
            with self.lock:
                self.finished[index] = True

    def _flood(self, conn: socket.socket) -> None:
        try:
            for block in pattern(SEED, self.flood):
                conn.sendall(block)
        except OSError:
            pass  # the bridge closed the connection

    def connections(self) -> int:
        with self.lock:
            return len(self.received)

    def size(self, index: int) -> int:
        with self.lock:
            return len(self.received[index])

    def got(self, index: int) -> bytes:
        with self.lock:
            return bytes(self.received[index])

    def ended(self, index: int) -> bool:
        with self.lock:
            return self.finished[index]

    def close(self) -> None:
        self.server.close()


# -- the client, by hand ---------------------------------------------------------------------


class Client:
    """
    A raw WebSocket client on a blocking socket with C{TCP_NODELAY} (so one
    send() is one segment): the upgrade by hand, frames by hand, and a reader
    thread that parses every server frame strictly. BINARY payloads are
    joined in C{data}, PONG payloads listed in C{pongs}; the first CLOSE is
    kept in C{close}; nothing may follow it but the end of the connection.
    With C{reading=False} the reader reads nothing until L{resume}.
    """

    def __init__(self, port: int, rng: random.Random, probe: Probe | None = None, rcvbuf: int | None = None,
                 reading: bool = True):
        self.rng = rng
        self.probe = probe
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(60)
        self.sock.connect((LOOPBACK, port))
        self.port = self.sock.getsockname()[1]  # the peer port the bridge sees
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.data = bytearray()
        self.pongs: list[bytes] = []
        self.close: bytes | None = None
        self.frames = 0
        self.error: BaseException | None = None
        self.reset = False
        self.ended = False
        self.sent = 0
        self.reading = threading.Event()
        if reading:
            self.reading.set()
        self._upgrade(port)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _upgrade(self, port: int) -> None:
        key = base64.b64encode(self.rng.randbytes(16)).decode()
        request = (
            f"GET /websockify HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n"
        ).encode("latin-1")
        self.sock.sendall(request)
        self.sent += len(request)
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "the connection closed during the upgrade"
            self.buf += data
        end = self.buf.index(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        assert lines[0].split()[1] == "101", lines
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, headers
        assert headers.get("sec-websocket-protocol") == "binary", headers

    def _read(self) -> None:
        try:
            while True:
                while (got := take_server_frame(self.buf)) is not None:
                    opcode, payload = got
                    with self.lock:
                        if self.close is not None:
                            raise BadFrame(f"a frame ({opcode:#x}) after the close frame")
                        self.frames += 1
                        if opcode == BINARY:
                            self.data += payload
                        elif opcode == PONG:
                            self.pongs.append(payload)
                        else:
                            self.close = payload
                self.reading.wait()
                data = self.sock.recv(MiB)
                if not data:
                    if self.buf:
                        raise BadFrame(f"the connection ended inside a frame: {bytes(self.buf[:16])!r}")
                    return
                self.buf += data
        except ConnectionResetError:
            self.reset = True
        except BaseException as e:  # reported by check(), not lost in a thread
            self.error = e
        finally:
            self.ended = True

    def resume(self) -> None:
        self.reading.set()

    # sending: everything counts toward C{sent}, which the probe compares with what the bridge got

    def send(self, data: bytes) -> None:
        """All of C{data} in one sendall()."""
        self.sock.sendall(data)
        self.sent += len(data)

    def settle(self) -> None:
        """Wait until the bridge was handed everything sent so far."""
        assert self.probe is not None
        self.probe.wait_handed(self.port, self.sent)

    def send_pieces(self, pieces: Iterable[bytes], lockstep: bool = True) -> None:
        """Each piece in a send() of its own; with C{lockstep}, each reaches the bridge before the next goes."""
        for piece in pieces:
            self.send(piece)
            if lockstep:
                self.settle()

    def send_bytewise(self, data: bytes, lockstep: Callable[[int], bool] = lambda i: True) -> None:
        """One byte per send(); in lockstep for the offsets C{i} where C{lockstep(i)}."""
        for i in range(len(data)):
            self.send(data[i:i + 1])
            if lockstep(i):
                self.settle()

    def send_close(self, code: int = 1000) -> None:
        self.send(frame(self.rng, CLOSE, close_payload(code)))

    def abort(self) -> None:
        """Go away at once: a reset, not a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    # what came back

    def echoed(self) -> int:
        with self.lock:
            return len(self.data)

    def received(self) -> bytes:
        with self.lock:
            return bytes(self.data)

    def pong_count(self) -> int:
        with self.lock:
            return len(self.pongs)

    def close_code(self) -> int | None:
        with self.lock:
            if self.close is None or len(self.close) < 2:
                return None
            return int(struct.unpack("!H", self.close[:2])[0])

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the client's reader failed: {self.error!r}") from self.error

    def shut(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reading.set()
        self._reader.join(30)


# -- a route per test ------------------------------------------------------------------------


class Route:
    """A ``ws`` route started in-process, in front of a L{Backend}."""

    def __init__(self, backend: Backend, router: Any):
        self.backend = backend
        self.router = router
        self.port = router.port_of("ws-0")
        self.clients: list[Client] = []

    @classmethod
    async def start(cls, echo: bool = False, flood: int = 0, rcvbuf: int | None = None) -> Route:
        backend = Backend(echo, flood, rcvbuf)
        router = await start_router(("ws", f"tcp:0:interface={LOOPBACK} -> {backend.server.address}"))
        return cls(backend, router)

    async def connect(self, rng: random.Random, probe: Probe | None = None, rcvbuf: int | None = None,
                      reading: bool = True) -> tuple[Client, int]:
        """A client whose bridge has its service connection (so frames meet the fast path); its backend index."""
        index = self.backend.connections()
        client: Client = await in_thread(Client, self.port, rng, probe, rcvbuf, reading)
        self.clients.append(client)
        await wait_for(lambda: self.backend.connections() > index, what="the backend connection")
        if probe is not None:
            await wait_for(lambda: (b := probe.bridge(client.port)) is not None and b.service is not None,
                           what="the bridge's service connection")
        return client, index

    async def stop(self) -> None:
        try:
            for client in self.clients:
                await in_thread(client.shut)
            await wait_for(lambda: not self.router.sessions.live, what="the bridges to end")
        finally:
            self.backend.close()
            await self.router.stopService()


async def finish(route: Route, client: Client, index: int, expected: bytes, pings: list[bytes],
                 back: bytes | None = None) -> None:
    """
    Wait for everything to arrive, end with the closing handshake, then
    check: the backend got exactly C{expected}; what came back is exactly
    C{back} (by default the echo of C{expected}, or nothing without one); a
    pong came back for each ping, same payload, in order.
    """
    backend = route.backend
    if back is None:
        back = expected if backend.echo else b""
    await wait_for(lambda: backend.size(index) >= len(expected) or backend.ended(index), 60,
                   "the backend to receive everything")
    await wait_for(lambda: client.echoed() >= len(back) or client.ended, 60, "the data back")
    await wait_for(lambda: client.pong_count() >= len(pings) or client.ended, 60, "the pongs")
    client.check()
    assert not client.ended, "the server closed the connection"
    await in_thread(client.send_close, 1000)
    await wait_for(lambda: client.ended, 30, "the server to close the connection")
    await wait_for(lambda: backend.ended(index), 30, "the backend connection to end")
    client.check()
    got = backend.got(index)
    assert len(got) == len(expected) and got == expected, "the backend did not get exactly what was sent"
    came = client.received()
    assert len(came) == len(back) and came == back, "what came back is not exactly what the backend sent"
    assert client.pongs == pings
    assert client.close_code() == 1000
    assert not client.reset


ECHO = pytest.mark.parametrize("echo", [True, False], ids=["echo", "sink"])


# -- 1. one byte per send() ------------------------------------------------------------------

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]
EDGE = 64  # payload bytes at each end of a long frame that go in lockstep


@ECHO
@pytest_twisted.ensureDeferred
async def test_one_byte_per_send(echo: bool, probe: Probe) -> None:
    """
    Frames of every length encoding (and empty ones), each byte in a send()
    of its own. Headers, short payloads and the first and last bytes of long
    ones go in lockstep, so the bridge is handed exactly one byte at a time
    there: the header is split at every offset, and so is the boundary
    between a payload and the next header. Then each frame cut in two at
    every header offset and near both payload ends, the second piece
    carrying the start of the next frame too.
    """
    rng = rng_for(f"bytewise-{echo}")
    route = await Route.start(echo)
    try:
        client, index = await route.connect(rng, probe)
        expected, wire = [], 0
        for payload in [rng.randbytes(n) for n in SIZES + [0, 3, 0]]:
            data = frame(rng, BINARY, payload)
            head, n = head_size(len(payload)), len(payload)
            await in_thread(client.send_bytewise, data,
                            lambda i, head=head, n=n: i < head + EDGE or i >= head + n - EDGE)
            expected.append(payload)
            wire += len(data)

        for size in SIZES:
            payload = rng.randbytes(size)
            head = head_size(size)
            cuts = set(range(1, head + min(size, 5))) | set(range(max(1, head + size - 4), head + size))
            for cut in sorted(cuts):
                this, following = frame(rng, BINARY, payload), rng.randbytes(rng.randrange(0, 4))
                data = this + frame(rng, BINARY, following)
                await in_thread(client.send_pieces, [data[:cut], data[cut:]])
                expected += [payload, following]
                wire += len(data)

        await finish(route, client, index, b"".join(expected), [])
        # Every one of those frames went through the fast path's own parser.
        assert probe.fast[client.port] >= wire
    finally:
        await route.stop()


# -- 2. many frames in one send() ------------------------------------------------------------


@ECHO
@pytest_twisted.ensureDeferred
async def test_coalesced_frames(echo: bool, probe: Probe) -> None:
    """Many frames of mixed sizes in a single sendall(), then thousands of tiny ones in another."""
    rng = rng_for(f"coalesced-{echo}")
    route = await Route.start(echo)
    try:
        client, index = await route.connect(rng, probe)
        sizes = SIZES * 2 + [rng.choice([rng.randrange(0, 126), rng.randrange(126, 65536),
                                         rng.randrange(65536, 200_000)]) for _ in range(40)]
        rng.shuffle(sizes)
        mixed = [rng.randbytes(n) for n in sizes]
        tiny = [rng.randbytes(rng.randrange(0, 8)) for _ in range(2000)]
        first = b"".join(frame(rng, BINARY, p) for p in mixed)
        second = b"".join(frame(rng, BINARY, p) for p in tiny)
        await in_thread(client.send, first)
        await in_thread(client.send, second)
        await finish(route, client, index, b"".join(mixed + tiny), [])
        assert probe.fast[client.port] >= len(first) + len(second)
    finally:
        await route.stop()


# -- 3. pings between data frames ------------------------------------------------------------


def ping_cases(rng: random.Random) -> list[tuple[str, list[bytes], list[bytes], list[bytes]]]:
    """
    (what, pieces to send each in a send() of its own, the binary payloads
    in order, the ping payloads in order).
    """
    cases = []
    for a_size, b_size in [(5, 7), (126, 300), (70000, 65536), (0, 1)]:
        a, b = rng.randbytes(a_size), rng.randbytes(b_size)
        p = rng.randbytes(rng.randrange(1, 126))
        fa, fp, fb = frame(rng, BINARY, a), frame(rng, PING, p), frame(rng, BINARY, b)
        cases.append((f"{a_size}/{b_size}: separate sends", [fa, fp, fb], [a, b], [p]))
        cases.append((f"{a_size}/{b_size}: one send", [fa + fp + fb], [a, b], [p]))
        ha, hb = head_size(a_size), head_size(b_size)
        # The tail of A, the whole ping and the head of B in the same send.
        for k in sorted({1, 2, ha - 1, ha, ha + 1, len(fa) - 1}):
            if not 0 < k < len(fa):
                continue
            for j in sorted({0, 1, 2, hb - 1, hb, len(fb) - 1, len(fb)}):
                if not 0 <= j <= len(fb):
                    continue
                fa, fp, fb = frame(rng, BINARY, a), frame(rng, PING, p), frame(rng, BINARY, b)
                pieces = [fa[:k], fa[k:] + fp + fb[:j], fb[j:]]
                cases.append((f"{a_size}/{b_size}: A split at {k}, B at {j}", [x for x in pieces if x],
                              [a, b], [p]))
        # The ping itself split across sends, its pieces with A's tail and B's head.
        for i in (1, 2, 4, 6, len(fp) - 1):
            if not 0 < i < len(fp):
                continue
            fa, fp, fb = frame(rng, BINARY, a), frame(rng, PING, p), frame(rng, BINARY, b)
            cases.append((f"{a_size}/{b_size}: ping split at {i}", [fa + fp[:i], fp[i:] + fb], [a, b], [p]))
    # Pings back to back (the longest a control frame may be, and an empty one), between tiny frames.
    a, b = rng.randbytes(2), rng.randbytes(3)
    p1, p2, p3 = rng.randbytes(125), b"", rng.randbytes(1)
    cases.append(("three pings in a row", [frame(rng, BINARY, a) + frame(rng, PING, p1) + frame(rng, PING, p2)
                                          + frame(rng, PING, p3) + frame(rng, BINARY, b)], [a, b], [p1, p2, p3]))
    return cases


def decoy_cases(rng: random.Random) -> list[tuple[str, list[bytes], list[bytes], list[bytes]]]:
    """
    Splits after which the next piece starts with bytes that look like a
    masked BINARY frame, while Autobahn is inside a frame: a parser that
    took over there would carry the decoy and lose its place.
    """
    cases = []
    a, b = rng.randbytes(9), rng.randbytes(11)
    decoy = frame(rng, BINARY, b"decoy")
    # Autobahn holds a partial ping header: the ping's mask reads 0x82 0x85, a BINARY frame of 5 bytes.
    p = rng.randbytes(40)
    fp = frame(rng, PING, p, mask=b"\x82\x85" + rng.randbytes(2))
    cases.append(("a ping cut before its mask, the mask a BINARY header",
                  [frame(rng, BINARY, a) + fp[:2], fp[2:] + frame(rng, BINARY, b)], [a, b], [p]))
    # Autobahn has the ping's header and waits for its payload, which on the wire is a BINARY frame.
    for cut in (6, 7, 8):
        fp, p = frame_on_wire(rng, PING, rng.randbytes(cut - 6) + decoy + rng.randbytes(20))
        cases.append((f"a ping cut at {cut}, its payload a BINARY frame",
                      [frame(rng, BINARY, a) + fp[:cut], fp[cut:] + frame(rng, BINARY, b)], [a, b], [p]))
    # The same inside a fragmented message: a fragment's payload, and a 16-bit length reading 0x82 0x86.
    first, part1 = frame_on_wire(rng, BINARY, decoy + rng.randbytes(30))
    first = bytes([first[0] & 0x7F]) + first[1:]  # not FIN
    part2 = rng.randbytes(0x8286)
    last = frame(rng, CONT, part2)
    assert last[1:4] == b"\xfe\x82\x86"
    cases.append(("fragments whose payload and length look like BINARY frames",
                  [first[:6], first[6:] + last[:2], last[2:]], [part1, part2], []))
    return cases


@ECHO
@pytest_twisted.ensureDeferred
async def test_ping_between_binary_frames(echo: bool, probe: Probe) -> None:
    """
    A ping between two binary frames, sent every way it can be cut: each
    frame alone, all in one send, and the ping sharing a send with the end
    of the frame before it and the start of the one after it (at header and
    payload offsets), and cut so that what follows looks like a BINARY
    frame. Each send reaches the bridge before the next goes.
    """
    rng = rng_for(f"ping-{echo}")
    route = await Route.start(echo)
    try:
        client, index = await route.connect(rng, probe)
        expected: list[bytes] = []
        pings: list[bytes] = []
        for what, pieces, payloads, case_pings in ping_cases(rng) + decoy_cases(rng):
            await in_thread(client.send_pieces, pieces)
            expected += payloads
            pings += case_pings
        # And a ping sent one byte per send() between two frames sent the same way.
        a, p, b = rng.randbytes(130), rng.randbytes(125), rng.randbytes(9)
        await in_thread(client.send_bytewise, frame(rng, BINARY, a) + frame(rng, PING, p) + frame(rng, BINARY, b))
        expected += [a, b]
        pings.append(p)
        await finish(route, client, index, b"".join(expected), pings)
    finally:
        await route.stop()


@pytest_twisted.ensureDeferred
async def test_pongs_never_inside_spliced_frames(probe: Probe) -> None:
    """
    Pings while the echo of megabytes comes back to a client with a small
    receive buffer, pings after every frame or two: the strict parser and
    the exact echo would both see a pong written inside a frame.
    """
    rng = rng_for("pong-under-load")
    route = await Route.start(echo=True)
    try:
        client, index = await route.connect(rng, probe, rcvbuf=32 * 1024)
        payloads, pings, wire = [], [], []
        total = 0
        while total < 6 * MiB:
            payload = rng.randbytes(rng.randrange(1, 200 * 1024))
            payloads.append(payload)
            wire.append(frame(rng, BINARY, payload))
            total += len(payload)
            for _ in range(rng.randrange(0, 3)):
                ping = rng.randbytes(rng.randrange(0, 126))
                pings.append(ping)
                wire.append(frame(rng, PING, ping))
        stream = b"".join(wire)
        pieces, at = [], 0
        while at < len(stream):
            n = rng.randrange(1, 96 * 1024)
            pieces.append(stream[at:at + n])
            at += n
        await in_thread(client.send_pieces, pieces, False)
        await finish(route, client, index, b"".join(payloads), pings)
    finally:
        await route.stop()


def fragmented(rng: random.Random, parts: list[bytes], pings: dict[int, bytes]) -> bytes:
    """BINARY (not FIN), CONTINUATIONs, the last one FIN; C{pings[i]} goes before fragment C{i}."""
    out = []
    for i, part in enumerate(parts):
        if i in pings:
            out.append(frame(rng, PING, pings[i]))
        out.append(frame(rng, BINARY if i == 0 else CONT, part, fin=i == len(parts) - 1))
    return b"".join(out)


@ECHO
@pytest_twisted.ensureDeferred
async def test_fragmented_message(echo: bool, probe: Probe) -> None:
    """
    A fragmented binary message, pings between its fragments, and plain
    frames right before and after it: one byte per send() in lockstep, all
    in one send, and cut at random. The bytes reach the backend in order.
    """
    rng = rng_for(f"fragmented-{echo}")
    route = await Route.start(echo)
    try:
        client, index = await route.connect(rng, probe)
        expected: list[bytes] = []
        pings: list[bytes] = []

        def message(sizes: list[int], ping_before: Iterable[int]) -> tuple[bytes, list[bytes], list[bytes]]:
            parts = [rng.randbytes(n) for n in sizes]
            these = {i: rng.randbytes(rng.randrange(1, 126)) for i in ping_before if 0 < i < len(parts)}
            return fragmented(rng, parts, these), parts, [these[i] for i in sorted(these)]

        # Three fragments, no ping, then with a ping between each: byte by byte.
        for ping_before in ((), (1, 2)):
            before, after = rng.randbytes(4), rng.randbytes(5)
            wire, parts, these = message([3, 130, 2], ping_before)
            await in_thread(client.send_bytewise, frame(rng, BINARY, before) + wire + frame(rng, BINARY, after))
            expected += [before, *parts, after]
            pings += these

        # Every length encoding and empty fragments, pings between, all in one send.
        before, after = rng.randbytes(70000), rng.randbytes(126)
        wire, parts, these = message([0, 125, 126, 65536, 0, 1, 70000], (1, 3, 4, 6))
        await in_thread(client.send, frame(rng, BINARY, before) + wire + frame(rng, BINARY, after))
        expected += [before, *parts, after]
        pings += these

        # Several messages back to back with plain frames between, cut at random offsets.
        stream = []
        for _ in range(20):
            plain = rng.randbytes(rng.randrange(0, 3000))
            wire, parts, these = message([rng.randrange(0, 5000) for _ in range(rng.randrange(1, 6))],
                                         [i for i in range(1, 6) if rng.random() < 0.4])
            stream += [frame(rng, BINARY, plain), wire]
            expected += [plain, *parts]
            pings += these
        data = b"".join(stream)
        cuts = sorted(rng.sample(range(1, len(data)), 200))
        await in_thread(client.send_pieces, [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])])

        await finish(route, client, index, b"".join(expected), pings)
    finally:
        await route.stop()


# -- 5. TEXT ends the WebSocket with 1003 ---------------------------------------------------------


async def refused_frame(route: Route, client: Client, index: int, before: bytes) -> None:
    """After a frame the bridge refuses: the backend got exactly C{before}, then its connection ended."""
    await wait_for(lambda: client.ended, 30, "the server to close the connection")
    await wait_for(lambda: route.backend.ended(index), 30, "the backend connection to end")
    client.check()
    got = route.backend.got(index)
    assert len(got) == len(before) and got == before, "the backend did not get exactly the data before it"


@pytest_twisted.ensureDeferred
async def test_text_frame_closes_with_1003(probe: Probe) -> None:
    """
    A TEXT frame after binary data: alone after the echo came back, in the
    same send as the binary frames before it (and a binary frame after it,
    which must not be carried), and one byte per send(). The server closes
    with 1003; everything before the TEXT frame reached the backend, nothing
    of it or after it did.
    """
    rng = rng_for("text")
    route = await Route.start(echo=True)
    try:
        for how in ("alone", "coalesced", "bytewise"):
            client, index = await route.connect(rng, probe)
            payloads = [rng.randbytes(n) for n in (10, 126, 70000)]
            before = b"".join(payloads)
            binary = b"".join(frame(rng, BINARY, p) for p in payloads)
            text = frame(rng, TEXT, b"text is not carried " * 5)
            if how == "alone":
                await in_thread(client.send, binary)
                await wait_for(lambda: client.echoed() >= len(before), 30, "the echo")
                assert client.received() == before
                await in_thread(client.send, text)
            elif how == "coalesced":
                await in_thread(client.send, binary + text + frame(rng, BINARY, b"after the text frame"))
            else:
                await in_thread(client.send, binary)
                await wait_for(lambda: client.echoed() >= len(before), 30, "the echo")
                await in_thread(client.send_bytewise, text)
            await wait_for(lambda: client.close is not None or client.ended, 30, "the close frame")
            assert client.close_code() == 1003, (how, client.close)
            # The closing handshake, as a client answers. (Autobahn, the server,
            # then aborts the TCP connection: the client may see a reset.)
            await in_thread(client.send_close, 1003)
            await refused_frame(route, client, index, before)
            echoed = client.received()
            assert before.startswith(echoed), how
            if how != "coalesced":
                assert echoed == before, how
    finally:
        await route.stop()


# -- 6. RSV bits (and other protocol errors) fail the connection ----------------------------------


@pytest_twisted.ensureDeferred
async def test_protocol_errors_fail_the_connection(probe: Probe) -> None:
    """
    A BINARY frame with an RSV bit set (no extension is negotiated), an
    unmasked one, and a BINARY frame inside a fragmented message: the
    connection is failed, and nothing of that frame reaches the backend.
    Autobahn fails a connection with a 1002 close frame or, with its default
    C{failByDrop} (what portrouter runs with), by dropping the TCP
    connection at once: either way no data frame follows, and the backend
    gets exactly what came before.
    """
    rng = rng_for("rsv")
    route = await Route.start(echo=True)
    outcomes = []
    # (what, a maker of (what of it is carried, the frames, how many bytes of them decide)).
    fragment = frame(rng, BINARY, b"fragment", fin=False)
    bad_frames: list[tuple[str, Callable[[], tuple[bytes, bytes, int]]]] = [
        ("RSV1", lambda: (b"", frame(rng, BINARY, b"not carried" * 10, rsv=4), 2)),
        ("RSV2", lambda: (b"", frame(rng, BINARY, b"not carried" * 10, rsv=2), 2)),
        ("RSV3", lambda: (b"", frame(rng, BINARY, b"not carried" * 10, rsv=1), 2)),
        ("RSV1 on a ping", lambda: (b"", frame(rng, PING, b"no pong", rsv=4), 2)),
        ("unmasked", lambda: (b"", frame(rng, BINARY, b"not carried" * 10, masking=False), 2)),
        # The first fragment is carried as it comes; the BINARY frame inside the message is not.
        ("BINARY inside a fragmented message",
         lambda: (b"fragment", fragment + frame(rng, BINARY, b"not carried"), len(fragment) + 2)),
    ]
    try:
        for what, make in bad_frames:
            for how in ("alone", "coalesced", "bytewise"):
                client, index = await route.connect(rng, probe)
                payloads = [rng.randbytes(n) for n in (7, 300, 65536)]
                binary = b"".join(frame(rng, BINARY, p) for p in payloads)
                carried, bad, decisive = make()
                before = b"".join(payloads)
                if how == "coalesced":
                    await in_thread(client.send, binary + bad)
                else:
                    await in_thread(client.send, binary)
                    await wait_for(lambda: client.echoed() >= len(before), 30, "the echo")
                    assert client.received() == before
                    if how == "alone":
                        await in_thread(client.send, bad)
                    else:
                        # Up to the byte that decides: after it, the connection is gone.
                        await in_thread(client.send_bytewise, bad[:decisive])
                await refused_frame(route, client, index, before + carried)
                assert (before + carried).startswith(client.received()), (what, how)
                assert client.pongs == [], (what, how)
                if client.close is not None:
                    assert client.close_code() == 1002, (what, how, client.close)
                    outcomes.append("closed with 1002")
                else:
                    outcomes.append("dropped")
        # One way for all: Autobahn's choice does not depend on the error or on how the frame came.
        assert len(set(outcomes)) == 1, outcomes
    finally:
        await route.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_connection_still_delivers_what_came_before_to_a_service_that_talks(probe: Probe) -> None:
    """
    When the bridge fails the client's connection, the service may still be
    sending (here a flood of its own) and not yet have taken all that came
    before the bad frame (here it reads through a small window): it still gets every byte of that, then its FIN.
    (A socket closed with bytes unread makes the kernel answer RST, which
    throws away what is still queued for the service: what the service sends
    is read and dropped until it closes.)
    """
    rng = rng_for("talking service")
    route = await Route.start(flood=256 * MiB, rcvbuf=4096)
    try:
        for _ in range(3):
            client, index = await route.connect(rng, probe)
            before = rng.randbytes(8 * MiB)
            await in_thread(client.send, frame(rng, BINARY, before) + frame(rng, BINARY, b"not carried", rsv=4))
            await refused_frame(route, client, index, before)
    finally:
        await route.stop()


# -- 7. megabytes both ways ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_large_transfer_both_ways(probe: Probe) -> None:
    """
    8 MiB in BINARY frames of random sizes up to 200 KiB, cut at random
    across sends, echoed back: SHA-256 equal on the backend and back at the
    client, and every frame from the server a well-formed, unmasked, final
    BINARY frame (no pings were sent, so nothing else may come).
    """
    rng = rng_for("large")
    route = await Route.start(echo=True)
    try:
        client, index = await route.connect(rng, probe)
        size = 8 * MiB
        sent = hashlib.sha256()
        wire, total = [], 0
        while total < size:
            payload = rng.randbytes(min(rng.randrange(0, 200 * 1024 + 1), size - total))
            sent.update(payload)
            wire.append(frame(rng, BINARY, payload))
            total += len(payload)
        stream = b"".join(wire)
        del wire
        pieces, at = [], 0
        while at < len(stream):
            n = rng.choice([rng.randrange(1, 16), rng.randrange(16, 4096), rng.randrange(4096, 300 * 1024)])
            pieces.append(stream[at:at + n])
            at += n
        await in_thread(client.send_pieces, pieces, False)
        await wait_for(lambda: route.backend.size(index) >= size, 120, "the backend to receive 8 MiB")
        await wait_for(lambda: client.echoed() >= size or client.ended, 120, "the echo of 8 MiB")
        client.check()
        got, echoed = route.backend.got(index), client.received()
        assert (len(got), hashlib.sha256(got).hexdigest()) == (size, sent.hexdigest())
        assert (len(echoed), hashlib.sha256(echoed).hexdigest()) == (size, sent.hexdigest())
        assert client.pongs == [] and client.close is None and client.frames > 0
        await in_thread(client.send_close, 1000)
        await wait_for(lambda: client.ended, 30, "the server to close the connection")
        client.check()
        assert client.close_code() == 1000
        await wait_for(lambda: route.backend.ended(index), 30, "the backend connection to end")
        assert route.backend.size(index) == size
    finally:
        await route.stop()
