"""
Helpers for end-to-end tests: real loopback sockets, real processes.

Blocking peers run in threads (C{deferToThread}) so that they are independent
of the reactor that runs the router, the way an outside client is. Waiting is
done on Deferreds or by polling a condition with a deadline, never by sleeping.
"""

from __future__ import annotations

import errno

import base64
import contextlib
import gc
import hashlib
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from twisted.internet import defer, reactor, task, threads
from twisted.internet.task import Clock

import portrouter.relay
from portrouter.front import Front
from portrouter.config import with_cli
from portrouter.model import Config
from portrouter.router import RouterService

LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago, for configs that need a number."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll C{condition} every 20 ms until it is true; fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


async def start_router(*routes: tuple[str, str], config: Config | None = None,
                       using: Any = None) -> RouterService:
    """A started router on C{using} (a L{ClockedReactor}, say), the real reactor by default."""
    config = with_cli(config or Config(ingress=f"tcp:0:interface={LOOPBACK}"), routes=routes)
    router = RouterService(config, using or reactor, Front)
    router.privilegedStartService()
    router.startService()
    return router


class Socket(NamedTuple):
    """One line of /proc/net/tcp or /proc/net/udp."""

    ip: str  # the local address, hex as the kernel writes it (0100007F: 127.0.0.1)
    port: int
    remote_port: int
    state: str  # hex: 01 ESTABLISHED, 08 CLOSE_WAIT, 0A LISTEN
    inode: str
    rx_queue: int = 0  # bytes received that its owner has not read yet


def kernel_sockets(ns: str = "tcp") -> Iterator[Socket]:
    """The IPv4 sockets of C{ns} (tcp or udp) on the machine, as the kernel lists them."""
    for line in Path(f"/proc/net/{ns}").read_text().splitlines()[1:]:
        fields = line.split()
        (ip, port), remote = fields[1].split(":"), fields[2].split(":")[1]
        yield Socket(ip, int(port, 16), int(remote, 16), fields[3], fields[9], int(fields[4].split(":")[1], 16))


def our_sockets(ports: list[int]) -> Counter[tuple[str, int]]:
    """
    How many sockets this process holds on each of C{ports}, as the kernel
    lists them: listening TCP sockets and bound UDP ones on 127.0.0.1, by
    (namespace, port). Only this process's sockets count: a client elsewhere
    on the machine may take one of these numbers as its ephemeral port at any
    moment.
    """
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    held: Counter[tuple[str, int]] = Counter()
    for ns in ("tcp", "udp"):
        for sock in kernel_sockets(ns):
            if (sock.inode in inodes and sock.ip == "0100007F" and sock.port in ports
                    and (ns == "udp" or sock.state == "0A")):
                held[(ns, sock.port)] += 1
    return held


def closes_when_idle(clock: Any, up: Callable[[bytes], None], down: Callable[[bytes], None],
                     client: Any, backend: Any, session: Any) -> None:
    """
    A relayed pair whose idle_timeout is 10 s, on C{clock} (a Clock): bytes
    either way (C{up} from the client, C{down} from the backend) are
    activity; 10 s of silence closes both sides (C{client}, C{backend}: their
    StringTransports, cleared).
    """
    clock.advance(9)
    up(b"up")
    clock.advance(9)
    down(b"down")
    clock.advance(9)
    assert not client.disconnecting and not backend.disconnecting
    assert (backend.value(), client.value()) == (b"up", b"down")
    clock.advance(1.5)  # 10 s after "down"
    assert client.disconnecting and backend.disconnecting
    assert session.reason == "idle for 10 s"


class ClockedReactor:
    """The real reactor for I/O, a L{Clock} for timed calls: the test says when time passes."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


async def stop_clocked(router: RouterService, clock: Clock) -> None:
    """Stop the router, letting the clock run (a second per poll) for whatever shutdown waits on."""
    d = router.stopService()

    def stopped() -> bool:
        clock.advance(1)
        return bool(d.called)

    await wait_for(stopped, 30, "the router to stop")
    await d


def pattern(seed: int, size: int) -> Iterator[bytes]:
    """Deterministic, incompressible-enough data in 1 MiB blocks."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    for i in range(0, size, MiB):
        n = min(MiB, size - i)
        yield block[:n] if i % (3 * MiB) else bytes(reversed(block[:n]))


class ThreadServer:
    """
    A blocking TCP server on 127.0.0.1 that runs C{handler(conn)} in a thread
    per connection; C{results} collects what handlers return.
    """

    def __init__(self, handler: Callable[[socket.socket], Any], sock: socket.socket | None = None):
        self.handler = handler
        if sock is None:  # else a bound socket of another family (UNIX, IPv6)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, 0))
        self.sock = sock
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1] if sock.family != socket.AF_UNIX else 0
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """The client endpoint string portrouter connects to."""
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{self.sock.getsockname()}"
        host = self.sock.getsockname()[0].replace(":", "\\:")
        return f"tcp:{host}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.results.append(self.handler(conn))
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def send_all_and_hash(sock: socket.socket, seed: int, size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(seed, size):
        sock.sendall(block)
        digest.update(block)
    return digest.hexdigest()


def read_until(conn: socket.socket, marker: bytes, data: bytes = b"") -> tuple[bytes, bytes] | None:
    """
    What C{conn} sends (after C{data}, already read) up to C{marker}, and
    what came after it; L{None} if it closes first. A test server's way to
    read a line or a request head.
    """
    while marker not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(marker)
    return head, rest


def recv_all_and_hash(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(MiB)
        if not data:
            return total, digest.hexdigest()
        total += len(data)
        digest.update(data)


def reads_from(*, peer: int | None = None, local: int | None = None) -> bool:
    """
    Whether this process's reactor is reading a connected TCP socket whose
    peer (or own) port is the one given: how a test tells that the router it
    runs has stopped reading a side, so a stall it saw is the router's doing
    and not the machine pausing.
    """
    for reader in reactor.getReaders():  # type: ignore[attr-defined]
        sock = getattr(reader, "socket", None) or getattr(reader, "sock", None)
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            continue
        try:
            there, here = sock.getpeername(), sock.getsockname()
        except OSError:
            continue  # a listening socket, or one closing
        if (peer is None or there[1] == peer) and (local is None or here[1] == local):
            return True
    return False


async def stops_reading(what: str, *, peer: int | None = None, local: int | None = None) -> None:
    """
    Wait until the router stops reading that socket (L{reads_from}), up to
    30 s: a stall seen while it still reads was the machine pausing, and the
    router must still get to not reading.
    """
    await wait_for(lambda: not reads_from(peer=peer, local=local), 30, what)


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(fn, *args, **kwargs)


def one_route_daemon(tmp_path: Path, name: str, backend: str, port: int, protocol: str) -> Twistd:
    """A real twistd serving project C{name} on C{port} (C{protocol}), to C{backend}."""
    config = tmp_path / "routes.yaml"
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\n"
        f"state: {tmp_path / 'state'}\n"
        "projects:\n"
        f"  - {{name: {name}, backend: '{backend}', "
        f"listen: {{port: {port}, protocol: {protocol}, interface: {LOOPBACK}}}}}\n"
    )
    return Twistd("--config", str(config))


@contextlib.contextmanager
def descriptors_left(pid: int, left: int) -> Iterator[None]:
    """
    Process C{pid} can make C{left} more descriptors while in the block; its
    limit is as it was after. It must be idle, opening and closing none of
    its own meanwhile: the kernel gives the lowest free number, and the
    limit is one past the numbers left.
    """
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(taken) + 1)) - taken)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free + left, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def backendai_python() -> str:
    """
    The Python of the venv that holds the real Backend.AI client (installed by
    .ci/run: it pins an aiohttp/yarl that must not mix with ours). Missing it
    is a failure, not a skip.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = os.environ.get("BACKENDAI_SDK_PYTHON", os.path.join(root, ".venv-backendai", "bin", "python"))
    assert os.path.exists(python), f"{python} is missing: run .ci/run (it installs backend.ai-client)"
    return python


def twistd_path() -> str:
    """The twistd of the Python running the tests, not whatever is on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    found = beside if os.path.exists(beside) else shutil.which("twistd")
    assert found, "twistd is not installed"
    return found


class Twistd:
    """
    A real ``twistd -n portrouter`` process; its output is collected so tests
    can wait for log lines (the ports bound, a session's end).
    """

    def __init__(self, *args: str, cwd: str | None = None, wrapper: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, **popen: Any):
        # wrapper: a command that execs twistd (given as its last arguments);
        # popen: pass_fds and the like, for descriptors it inherits.
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [*wrapper, twistd_path(), "-n", "--pidfile=", "portrouter", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env, **popen,
        )
        self.output: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.output), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in iter(stream.readline, b""):
            into.append(line.decode("utf-8", "replace").rstrip("\n"))

    def find(self, regex: str) -> re.Match[str] | None:
        for line in list(self.output):
            m = re.search(regex, line)
            if m:
                return m
        return None

    def _seen(self, regex: str) -> re.Match[str] | None:
        """The line, if it came; an AssertionError once twistd has exited without it."""
        if self.proc.poll() is not None and not self.find(regex):
            raise AssertionError(
                f"twistd exited ({self.proc.returncode}):\n" + "\n".join(self.output + self.errors)
            )
        return self.find(regex)

    async def wait_line(self, regex: str, timeout: float = 30.0) -> re.Match[str]:
        return await wait_for(lambda: self._seen(regex), timeout, f"log line {regex!r}")

    def wait_line_blocking(self, regex: str, timeout: float = 30.0) -> re.Match[str]:
        """L{wait_line} for a test that runs outside the reactor (Playwright's sync API): polled, with a deadline."""
        deadline = time.monotonic() + timeout
        while (found := self._seen(regex)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line {regex!r} within {timeout:g} s:\n"
                                     + "\n".join(self.output + self.errors))
            threading.Event().wait(0.02)  # polling the collected output, with the deadline above
        return found

    async def ingress_port(self) -> int:
        m = await self.wait_line(r"ingress listening on [\d.]+:(\d+)")
        return int(m.group(1))

    async def port_of(self, project: str) -> int:
        m = await self.wait_line(rf"route {re.escape(project)} listening on [\d.]+:(\d+)")
        return int(m.group(1))

    async def wait_exit(self, timeout: float = 30.0) -> int:
        await wait_for(lambda: self.proc.poll() is not None, timeout, "twistd to exit")
        for t in self._readers:
            t.join(5)
        return int(self.proc.returncode)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> None:
        """
        Stop as an operator does (SIGTERM: the drain, services stopped), for
        a test that started services: killed, twistd would leave them running.
        """
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"twistd did not stop within {timeout:g} s of SIGTERM") from None


class UDPEcho:
    """
    A UDP echo server on 127.0.0.1 in its own thread, replies prefixed with
    C{tag}; C{received} counts datagrams and C{peers} is every address heard.
    """

    def __init__(self, port: int = 0, tag: bytes = b""):
        self.tag = tag
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((LOOPBACK, port))
        self.sock.settimeout(0.2)  # only so that close() is noticed
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.peers: set[tuple[str, int]] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _serve(self) -> None:
        while not self._stopped:
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received += 1
            self.peers.add(peer)
            self.sock.sendto(self.tag + data, peer)

    def close(self) -> None:
        self._stopped = True
        self._thread.join(5)
        self.sock.close()


class RawWebSocket:
    """
    A blocking client that speaks HTTP/1.1 and RFC 6455 by hand, to see
    exactly what comes back: statuses, headers and bodies, every frame, close
    codes. Given a C{target}, it asks for the upgrade at once.
    """

    def __init__(self, port: int, target: str | None = None, headers: dict[str, str] | None = None, *,
                 rcvbuf: int | None = None, timeout: float = 60):
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((LOOPBACK, port))
        self.port = port
        self.buf = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.close_reason = ""
        if target is not None:
            self.status, self.headers, _ = self.request(target, headers)

    def _more(self, at_least: int = 1) -> None:
        data = self.sock.recv(max(at_least, 256 * 1024))
        if not data:
            raise EOFError("the connection closed")
        self.buf += data

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more(n - len(self.buf))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def request(self, target: str, headers: dict[str, str] | None = None, upgrade: bool = True
                ) -> tuple[int, dict[str, str], bytes]:
        """Send a GET; answer (status, headers with lower-case names, body)."""
        all_headers = {"Host": f"{LOOPBACK}:{self.port}"}
        key = base64.b64encode(os.urandom(16)).decode()
        if upgrade:
            all_headers.update({
                "Connection": "Upgrade", "Upgrade": "websocket",
                "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
            })
        all_headers.update(headers or {})
        head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
        self.sock.sendall(head.encode("latin-1") + b"\r\n")
        while b"\r\n\r\n" not in self.buf:
            self._more()
        end = self.buf.index(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        status = int(lines[0].split()[1])
        got = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            got[name.strip().lower()] = value.strip()
        if status == 101:
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
            assert got.get("sec-websocket-accept") == accept.decode(), got
            return status, got, b""
        return status, got, self.exact(int(got.get("content-length", "0")))

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        """One final frame, masked as a client must."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def frame(self) -> tuple[int, bytes]:
        """The next frame's opcode and payload."""
        first, second = self.exact(2)
        assert not second & 0x80, "a server must not mask its frames"
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self.exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self.exact(8))
        return first & 0x0F, self.exact(n)

    def receive(self, size: int) -> bytes:
        """Binary frame data until C{size} bytes; a close frame (or TEXT) instead is an error."""
        got = b""
        while len(got) < size:
            opcode, payload = self.frame()
            assert opcode in (0x0, 0x2), (opcode, payload)
            got += payload
        return got

    def echo(self, payload: bytes) -> bytes:
        """Send one binary message to an echo service; collect as many bytes back."""
        self.send(payload)
        return self.receive(len(payload))

    def read_until_close(self) -> tuple[int, str, int]:
        """
        Data frames until the close frame, which is answered as a client
        answers it: (close code, SHA-256 of the data, data bytes); the close
        reason is kept as C{close_reason}.
        """
        digest = hashlib.sha256()
        total = 0
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                try:
                    self.send(payload[:2], opcode=0x8)
                except OSError:
                    pass  # the server may have closed first
                self.close_reason = payload[2:].decode("utf-8")
                return int(struct.unpack("!H", payload[:2])[0]), digest.hexdigest(), total
            assert opcode in (0x0, 0x2), f"unexpected opcode {opcode}"
            digest.update(payload)
            total += len(payload)

    def closed(self) -> tuple[int, str]:
        """Skip data frames until the close frame; answer it; (code, reason)."""
        code, _, _ = self.read_until_close()
        return code, self.close_reason

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def left_to_the_collector(*types: type) -> Iterator[list[str]]:
    """
    Run the block with Python's cyclic collector off; then collect, keeping
    what it found (DEBUG_SAVEALL): the list given is filled with the names
    of the objects of C{types} that only the collector could free (cycles),
    not reference counting. The block must drop its own references first.
    """
    gc.collect()
    flags, enabled = gc.get_debug(), gc.isenabled()
    gc.disable()
    left: list[str] = []
    try:
        yield left
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left.extend(sorted({type(o).__name__ for o in gc.garbage if isinstance(o, types)}))
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def refuse_pipes(monkeypatch: Any) -> list[int]:
    """
    Every pipe the relay asks for is refused, as when the router is out of
    descriptors; the list grows by one at each refusal, for the test to see
    that one was asked for.
    """
    refusals: list[int] = []

    def refused() -> tuple[int, int]:
        refusals.append(errno.EMFILE)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(portrouter.relay, "open_pipe", refused)
    return refusals
