"""
Moving bytes between two connections: the one place where backpressure and
half-close are done, for every route kind that carries a byte stream.

Two ways, chosen per connection pair:

  - L{SpliceRelay}: both sides are plain kernel sockets (TCP or UNIX). Bytes
    go socket -> pipe -> socket with C{splice(2)} and never enter Python, which
    is what lets one core keep up with HAProxy (see shared/NOTES.md). The pipe
    holds at most one chunk per direction and a side is read only while its
    pipe is empty, so a slow reader costs a bounded amount of kernel memory and
    none in Python.
  - L{pair_streams}: anything else (TLS, WebSocket bridges): Twisted's
    producer/consumer contract both ways, as C{portforward} does, plus
    half-close.

Both report to a L{Session}, which is what logs, metrics, the manhole and
draining see of a connection. L{SplicedBody} moves a known number of bytes
(a large HTTP response body) the way L{SpliceRelay} does, between two
Twisted transports it borrows for the while. Relays with framing in between
(the WebSocket bridges, the tunnel client) wire their backpressure from the
same pieces: L{couple}, L{Holds} and L{HoldWhileFull}.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import ipaddress
import os
import _socket
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any, Callable, Generic, Hashable, Iterator, Literal, TypeGuard, TypeVar

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IPushProducer,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.eventloop import at_round_end, forget, unwatch_reading, watch_reading
from portrouter.interfaces import IConnection, IReactor
from portrouter.sessions import Session, peer_of

log = Logger(namespace="portrouter")

if TYPE_CHECKING:  # as on Linux: whatever calls it has checked splicable() or _SPLICE first
    _SPLICE = os.splice
else:
    _SPLICE = getattr(os, "splice", None)
# Whether splice(2) is there at all (Linux); without it, everything goes through Python.
SPLICE_OK = _SPLICE is not None
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# One chunk per direction; also the most a slow reader can make us hold.
CHUNK = 256 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Reads smaller than this go through Python; a full one makes the direction bulk.
SMALL = 16 * 1024
# Reads per readiness event before going back to the reactor, so one busy
# connection cannot starve the others.
_BURST = 8


def direct_address(endpoint: Any) -> tuple[int, tuple[str, int]] | None:
    """
    (family, address) when C{endpoint} is a plain TCP endpoint to an IP
    literal, which the relay (or an HTTP pool) can connect itself; else L{None}.
    """
    if SPLICE_OK and type(endpoint).__name__ in ("TCP4ClientEndpoint", "TCP6ClientEndpoint"):
        host = getattr(endpoint, "_host", None)
        port = getattr(endpoint, "_port", None)
        if getattr(endpoint, "_bindAddress", None) is None and isinstance(port, int) and isinstance(host, str):
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return None  # a name: Twisted resolves it without blocking
            return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)
    return None


def connect_now(sock: Any, address: Any) -> int:
    """
    Start a non-blocking socket's connect: 0 when it is done by the time
    connect() returns, EINPROGRESS while it goes on, else why it failed. To
    a backend on this host (loopback, a container's veth) the kernel has
    done the handshake, or had it refused, within connect(): a connected
    socket has a peer, a refused one says so in SO_ERROR, and either is
    known now rather than after a reactor turn waiting for it to be writable.
    """
    err: int = sock.connect_ex(address)
    if err not in (errno.EINPROGRESS, errno.EAGAIN):
        return err
    try:
        sock.getpeername()
    except OSError:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) or errno.EINPROGRESS
    return 0


def open_pipe() -> tuple[int, int]:
    """A non-blocking pipe that holds one CHUNK, for splicing through."""
    rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(wpipe, _F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass  # over the per-user pipe quota: the default size still works
    return rpipe, wpipe


def splicable(transport: object) -> TypeGuard[tcp.Connection]:
    """A plain kernel stream socket, no TLS in between, and splice(2) exists."""
    return _SPLICE is not None and isinstance(transport, tcp.Connection)


def detach(transport: tcp.Connection) -> socket.socket:
    """
    Take the socket away from a Twisted transport that has not read or written
    anything yet; the transport is left to the garbage collector unclosed.
    """
    transport.stopReading()
    transport.stopWriting()
    sock = transport.socket
    if sock.family != socket.AF_UNIX:
        # Interactive protocols (SSH, Redis) must not wait on Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """One socket of a spliced pair, as the reactor sees it."""

    __slots__ = ("relay", "sock", "fd", "inbound", "outbound")

    def __init__(self, relay: SpliceRelay, sock: _socket.socket):
        self.relay: SpliceRelay | _Gone = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.inbound: _Direction | _Gone
        self.outbound: _Direction | _Gone

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            self.inbound.pump()
        except OSError as e:
            self.relay.fail(e, self)

    def doWrite(self) -> None:
        if self.relay.connecting is not None:
            self.relay.connected()
            return
        try:
            self.outbound.drain()
        except OSError as e:
            self.relay.fail(e, self)

    def connectionLost(self, reason: Failure) -> None:
        if self.relay.connecting is not None:
            self.relay.connected()  # a failed connect: SO_ERROR says why
            return
        self.relay.fail(reason.value, self)

    def logPrefix(self) -> str:
        return "portrouter"


class _Gone:
    """What a closed relay's ends point at instead of it: whatever still comes is ignored."""

    __slots__ = ()

    connecting = None

    def connected(self) -> None:
        pass

    def fail(self, error: BaseException | None, end: _End) -> None:
        pass

    def pump(self) -> None:
        pass

    def drain(self) -> None:
        pass


_GONE = _Gone()


class _Direction:
    """
    Bytes from C{src} to C{dst}. Small reads go through Python (recv, send)
    and cost no pipe; once a read fills the buffer the direction is bulk and
    switches to splice through a pipe of its own, for good.
    """

    __slots__ = ("relay", "src", "dst", "rpipe", "wpipe", "pending", "held", "eof", "done", "inbound", "other")

    def __init__(self, relay: SpliceRelay, src: _End, dst: _End, inbound: bool):
        self.relay = relay
        self.src = src
        self.dst = dst
        self.rpipe = -1
        self.wpipe = -1
        self.pending = 0  # bytes in the pipe
        self.held = b""  # bytes read but not yet written (small-read path)
        self.eof = False
        self.done = False
        self.inbound = inbound  # client -> backend
        self.other: _Direction  # the relay's direction the other way: set once both are made

    def pump(self) -> None:
        """
        C{src} is readable; only called while nothing is held or piped. A
        small read is relayed here, its bytes counted in place (called
        three times per short connection, each call is a few percent of
        what Python spends on one); a bulk direction splices.
        """
        if self.wpipe >= 0:
            self._pump_splice()
            return
        try:
            data = self.src.sock.recv(SMALL)
        except BlockingIOError:
            return
        if not data:
            self._eof()
            return
        relay = self.relay
        session = relay.session
        if self.inbound:
            session.bytes_in += len(data)
        else:
            session.bytes_out += len(data)
        session.last = relay.reactor.seconds()
        try:
            sent = self.dst.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.held = data[sent:]
            self._blocked()
        elif len(data) == SMALL:
            self._open_pipe()  # a full read: this is a bulk transfer

    def _open_pipe(self) -> None:
        try:
            self.rpipe, self.wpipe = open_pipe()
        except OSError:
            # No pipe to be had (out of descriptors, say): recv and send
            # still move it all, slower. Asked again at the next full read,
            # so a direction splices again once descriptors are free.
            pass

    def _pump_splice(self) -> None:
        for _ in range(_BURST):
            try:
                n = _SPLICE(self.src.fd, self.wpipe, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                return  # the pipe is empty, so the socket is
            if n == 0:
                self._eof()
                return
            self.pending += n
            self.relay.count(self, n)
            if not self._flush():
                self._blocked()
                return

    def _eof(self) -> None:
        self.note_eof()
        if self.pending or self.held or not self.other.done:
            unwatch_reading(self.relay.reactor, self.src, self.src.fd)
        # else the relay is closed now (_finish), and its sockets forgotten with it
        self._finish()

    def note_eof(self) -> None:
        """C{src} said all it has; the first side to do so is why the session ends."""
        self.eof = True
        session = self.relay.session
        if session.reason is None and not self.other.eof:
            session.reason = "client closed" if self.inbound else "backend closed"

    def _blocked(self) -> None:
        """C{dst} is full: stop reading C{src} until it takes what we hold."""
        self.relay.reactor.removeReader(self.src)
        self.relay.reactor.addWriter(self.dst)

    def _flush(self) -> bool:
        """Write what is held, then the pipe, into C{dst}; C{True} once both are empty."""
        if self.held:
            try:
                sent = self.dst.sock.send(self.held)
            except BlockingIOError:
                return False
            self.held = self.held[sent:]
            if self.held:
                return False
        while self.pending:
            try:
                n = _SPLICE(self.rpipe, self.dst.fd, self.pending, flags=_FLAGS)
            except BlockingIOError:
                return False
            self.pending -= n
        return True

    def drain(self) -> None:
        """C{dst} is writable again."""
        if not self._flush():
            return
        self.relay.reactor.removeWriter(self.dst)
        if self.eof:
            self._finish()
        else:
            self.relay.reactor.addReader(self.src)

    def _finish(self) -> None:
        # Half-close: EOF from one side becomes a FIN to the other once all
        # that came before it was written; the other direction goes on.
        if self.pending or self.held:
            return
        if not self.other.done:
            # The last direction needs no shutdown: closing sends the FIN.
            try:
                self.dst.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.done = True
        if self.rpipe >= 0:
            self.close_pipe()
        if self.other.done:
            relay = self.relay
            relay._close(relay.session.reason or "closed")

    def close_pipe(self) -> None:
        """Close the pipe, which its callers know there is."""
        os.close(self.rpipe)
        os.close(self.wpipe)
        self.rpipe = self.wpipe = -1


Waiter = TypeVar("Waiter", bound=Hashable)


class Deadlines(Generic[Waiter]):
    """
    What waits until a deadline (a relay's backend connecting, a connection's
    first bytes): one timer for all of it, moved only when it fires (as idle
    timers are), rather than a DelayedCall made and cancelled for every new
    connection, which cost an HTTP connection 8 us. Each waiter is told
    (C{expire(waiter, timeout)}) at its own deadline, to the tick. Waiters
    wait per timeout value, so each group is in deadline order and the first
    of each is the next due; one that is done waiting just leaves its group.
    Iterating and C{len} see every waiter.
    """

    def __init__(self, reactor: IReactor, expire: Callable[[Waiter, float], None]):
        self.reactor = reactor
        self.expire = expire
        self.waiting: dict[float, dict[Waiter, float]] = {}  # timeout -> {waiter: deadline}, oldest first
        self.timer: Any = None

    def add(self, waiter: Waiter, timeout: float) -> None:
        deadline = self.reactor.seconds() + timeout
        group = self.waiting.get(timeout)
        if group is None:
            group = self.waiting[timeout] = {}
        group[waiter] = deadline
        if self.timer is None:
            self.timer = self.reactor.callLater(timeout, self._due)
        elif self.timer.getTime() > deadline:  # a shorter timeout than any waiting
            self.timer.reset(timeout)

    def remove(self, waiter: Waiter, timeout: float) -> None:
        """C{waiter} (added with C{timeout}) waits no more; nothing if it was not waiting."""
        group = self.waiting.get(timeout)
        if group is not None:
            group.pop(waiter, None)

    def __len__(self) -> int:
        return sum(len(group) for group in self.waiting.values())

    def __iter__(self) -> Iterator[Waiter]:
        return (waiter for group in list(self.waiting.values()) for waiter in list(group))

    def _due(self) -> None:
        self.timer = None
        now = self.reactor.seconds()
        late: list[tuple[Waiter, float]] = []
        following: float | None = None
        for timeout, group in list(self.waiting.items()):
            for waiter, deadline in list(group.items()):
                if deadline > now:
                    following = deadline if following is None else min(following, deadline)
                    break
                del group[waiter]
                late.append((waiter, timeout))
            if not group:
                del self.waiting[timeout]
        if following is not None:
            self.timer = self.reactor.callLater(following - now, self._due)
        for waiter, timeout in late:
            self.expire(waiter, timeout)


class ConnectDeadlines(Deadlines["SpliceRelay"]):
    """The connect timeouts of the relays whose backend is connecting (L{SpliceRelay.connect})."""

    def __init__(self, reactor: IReactor):
        super().__init__(reactor, lambda relay, timeout: relay.connect_timed_out(timeout))


class FirstBytesDeadlines(Deadlines[Any]):
    """A listener's connections reading their first bytes (L{FirstBytes}), each told C{timed_out} at its deadline."""

    def __init__(self, reactor: IReactor):
        super().__init__(reactor, lambda reader, timeout: reader.timed_out(timeout))


class SpliceRelay:
    """Relay two connected stream sockets until both directions reach EOF."""

    __slots__ = ("reactor", "session", "client", "backend", "up", "down", "closed", "connecting",
                 "connect_timeout", "on_connect_failure", "early", "heard")

    def __init__(
        self,
        reactor: IReactor,
        session: Session,
        client: _socket.socket,
        backend: _socket.socket,
    ):
        self.reactor = reactor
        self.session = session
        self.connecting: ConnectDeadlines | None = None  # where it waits, while the backend connects
        self.connect_timeout = 0.0
        self.on_connect_failure: Callable[[str], None] | None = None
        self.early = b""  # for the backend before anything of the client's (a PROXY header), once connected
        self.heard = False  # the client's first bytes were read already (they are in early): none to look for
        self.client = _End(self, client)
        self.backend = _End(self, backend)
        self.up = _Direction(self, self.client, self.backend, True)
        self.down = _Direction(self, self.backend, self.client, False)
        self.client.inbound = self.backend.outbound = self.up
        self.backend.inbound = self.client.outbound = self.down
        self.up.other, self.down.other = self.down, self.up
        self.closed = False
        session._closer = self.close

    def start(self, early: bytes = b"", counted: int | None = None) -> None:
        """
        Relay from now on; C{early} goes to the backend first: bytes of the
        client's read before the backend was chosen (a ClientHello), after a
        PROXY header of ours. C{counted} of them are the client's (all of them
        unless said).
        """
        watch_reading(self.reactor, self.backend, self.backend.fd)
        if early:
            self.count(self.up, len(early) if counted is None else counted)
        # The client has usually spoken while the backend connected: its
        # first bytes are read now, not a reactor turn later, and go out with
        # what came before them (a PROXY header) in one send, one wake-up of
        # the backend.
        first = None
        if not self.heard:
            try:
                first = self.client.sock.recv(SMALL)
            except BlockingIOError:
                pass
            except OSError as e:
                self.fail(e, self.client)
                return
        if first:
            self.count(self.up, len(first))
            early += first
        if early:
            # A socket just connected takes a few bytes at once: no turn spent waiting for writable.
            try:
                sent = self.backend.sock.send(early)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self.fail(e, self.backend)
                return
            if sent < len(early):
                self.up.held = early[sent:]
                if first == b"":
                    self.up.note_eof()  # a FIN once what is held is written (drain)
                self.up._blocked()  # the client is read once the backend has taken them
                return
        if first == b"":
            self.up._eof()  # the client said all it had to say (nothing) before the backend answered
            return
        watch_reading(self.reactor, self.client, self.client.fd)

    def connect(self, address: Any, timeout: float, deadlines: ConnectDeadlines) -> None:
        """
        Connect the (non-blocking) backend socket, then relay; give up after
        C{timeout} seconds (C{deadlines} keeps it). The client is not read
        until then, so what it sends early waits in the kernel.
        """
        try:
            err = connect_now(self.backend.sock, address)  # connected at once: no wait for writable
            if err == 0:
                # Relayed once the round of events is handled: a listener's
                # accepts of one round connect their backends one after the
                # other, then all send, so their first bytes reach the
                # backend's process together rather than each waking it
                # again. Waking a halted core costs the waker microseconds
                # in a VM (bench/README; 8% more connections/s here).
                # Outside the lean poll's round, at once.
                at_round_end(self.reactor, self._start_connected)
            elif err in (errno.EINPROGRESS, errno.EAGAIN):
                self.connecting = deadlines
                self.connect_timeout = timeout
                deadlines.add(self, timeout)
                self.reactor.addWriter(self.backend)
            else:
                self._connect_failed(err)
        except Exception as e:
            # Half made (epoll out of room, say): nothing of it is left
            # behind, registered or waiting, for the caller to trip on.
            self._close(f"portrouter could not relay it: {e}")
            raise

    def _start_connected(self) -> None:
        """
        The backend connected within L{connect}: relay, unless closed
        meanwhile (drained, stopped). Should the start fail (the epoll set
        full, say), nothing of it is left behind, and it is said here:
        called at the round's end, no caller is left to say it.
        """
        if self.closed:
            return
        try:
            self.start(self.early, 0)
        except Exception as e:
            self._close(f"portrouter could not relay it: {e}")
            session = self.session
            log.failure("{protocol} {project} {peer}: could not be relayed; closed",
                        protocol=session.protocol, project=session.project, peer=session.peer)

    def _stop_waiting(self) -> None:
        deadlines, self.connecting = self.connecting, None
        if deadlines is not None:
            deadlines.remove(self, self.connect_timeout)

    def connected(self) -> None:
        """The backend socket is writable (or failed): did the connect succeed?"""
        self._stop_waiting()
        self.reactor.removeWriter(self.backend)
        err = self.backend.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(err)
        else:
            self.start(self.early, 0)

    def connect_timed_out(self, timeout: float) -> None:
        """Called by L{ConnectDeadlines}: the backend did not answer in time."""
        self.connecting = None
        self.reactor.removeWriter(self.backend)
        self._connect_problem(f"backend did not answer within {timeout:g} s")

    def _connect_failed(self, err: int) -> None:
        if err == errno.ECONNREFUSED:
            self._connect_problem("backend refused the connection")
        else:
            self._connect_problem(f"backend connection failed: {os.strerror(err)}")

    def _connect_problem(self, reason: str) -> None:
        if self.on_connect_failure is not None:
            self.on_connect_failure(reason)
        # What the client sent can never be delivered now. Closing a socket
        # with unread bytes makes the kernel answer RST, and the client would
        # see "connection reset" instead of a plain close: read them away.
        sock = self.client.sock
        try:
            for _ in range(16):
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._close(reason)

    def count(self, direction: _Direction, n: int) -> None:
        # _Direction.pump counts its small reads in place, as here: change both.
        session = self.session
        if direction.inbound:
            session.bytes_in += n
        else:
            session.bytes_out += n
        session.last = self.reactor.seconds()

    def fail(self, error: BaseException | None, end: _End) -> None:
        who = "client" if end is self.client else "backend"
        if isinstance(error, OSError) and error.errno in (errno.ECONNRESET, errno.EPIPE):
            reason = f"{who} reset the connection"
        else:
            reason = f"{who} error: {error}"
        self._close(reason)

    def close(self) -> None:
        # Whoever closes may have said why (idle, drain timeout, shutdown).
        self._close(self.session.reason or "closed by portrouter")

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.connecting is not None:
            self._stop_waiting()
        for end in (self.client, self.backend):
            forget(self.reactor, end, end.fd)  # closed next: out of the epoll set with it
            end.sock.close()
        for direction in (self.up, self.down):
            if direction.rpipe >= 0:
                direction.close_pipe()
        self.session.ended(reason)
        # The relay, its ends and its directions point at one another. Cut
        # the ways back to the relay, so that reference counting frees them
        # all now: left as cycles, Python's cyclic collector found them
        # later, at 5 us of a 100 us connection. The callers of _close only
        # return from here. A reactor stopping still tells every descriptor
        # it had (both ends) that its connection is lost: that is _GONE's to
        # ignore. Only the ends call on a direction, and they no longer do.
        for end in (self.client, self.backend):
            end.relay = end.inbound = end.outbound = _GONE
        for direction in (self.up, self.down):
            del direction.relay, direction.other


# How a L{SplicedBody} ended: all moved, or which side broke, or called off.
SpliceEnd = Literal["done", "source broken", "destination broken", "cancelled"]


class SplicedBody:
    """
    A known number of bytes (the rest of an HTTP body) moved from one plain
    TCP transport's socket to another's with splice(2) through a pipe, never
    entering Python, like L{SpliceRelay}. For the while it lends itself the
    two transports' C{doRead}/C{doWrite} (as Twisted's own
    C{abortConnection} replaces them): the source is read only while the
    pipe is empty, so a slow destination holds back the source. Then all is
    handed back and C{ended(how, moved)} is told, once; after a broken
    source it closes the source, after a broken destination it aborts it.
    """

    def __init__(self, src: tcp.Connection, dst: tcp.Connection, left: int,
                 ended: Callable[[SpliceEnd, int], None]):
        self.src = src
        self.dst = dst
        self.left = left
        self.ended = ended
        self.pending = 0  # in the pipe
        self.moved = 0  # written to the destination
        self.rpipe, self.wpipe = open_pipe()
        self.over = False

    def start(self) -> None:
        self.dst.unregisterProducer()  # flow control is ours until the end
        self.src.doRead = self.readable  # type: ignore[method-assign]
        self.dst.doWrite = self.writable  # type: ignore[method-assign]
        if queued(self.dst):
            # Twisted still holds what was written before (an HTTP head): it goes first.
            self.src.stopReading()
            self.dst.startWriting()
        else:
            self.src.startReading()

    def readable(self) -> Any:
        if self.pending and not self._flush():
            self._wait_for_destination()
            return None
        try:
            n = _SPLICE(self.src.socket.fileno(), self.wpipe, min(self.left, CHUNK), flags=_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            self._source_broken()
            return None
        if n == 0:
            self._source_broken()
            return None
        self.left -= n
        self.pending += n
        if not self._flush():
            self._wait_for_destination()
        elif not self.left:
            self._finish()
        return None

    def _wait_for_destination(self) -> None:
        self.src.stopReading()
        self.dst.startWriting()

    def _flush(self) -> bool:
        while self.pending:
            try:
                n = _SPLICE(self.rpipe, self.dst.socket.fileno(), self.pending, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError:
                self._destination_broken()
                return False
            self.pending -= n
            self.moved += n
        return True

    def writable(self) -> Any:
        if queued(self.dst) or self.dst.disconnecting:
            # Twisted's own buffer first, and a loseConnection() is Twisted's to finish.
            result = type(self.dst).doWrite(self.dst)
            if result is not None or queued(self.dst):
                return result
        if self.over or not self._flush():
            return None
        self.dst.stopWriting()
        if self.left:
            self.src.startReading()
        else:
            self._finish()
        return None

    def _restore(self) -> bool:
        """Hand the transports back; False if that was done already."""
        if self.over:
            return False
        self.over = True
        for transport, name in ((self.src, "doRead"), (self.dst, "doWrite")):
            transport.__dict__.pop(name, None)
        os.close(self.rpipe)
        os.close(self.wpipe)
        return True

    def _finish(self) -> None:
        if self._restore():
            self.dst.stopWriting()
            self.ended("done", self.moved)

    def _source_broken(self) -> None:
        if self._restore():
            self.src.stopReading()
            self.ended("source broken", self.moved)
            self.src.loseConnection()

    def _destination_broken(self) -> None:
        if self._restore():
            self.ended("destination broken", self.moved)
            self.dst.abortConnection()

    def cancel(self) -> None:
        """The transfer ended another way: hand everything back."""
        if self._restore():
            self.ended("cancelled", self.moved)


# How long a connection whose peer is gone may go without taking any of
# what is still queued for it, before it is aborted.
FLUSH_TIMEOUT = 5.0


def _connection_of(transport: Any) -> tcp.Connection | None:
    """The kernel connection under a transport: itself, or the one under TLS; L{None} if neither."""
    if isinstance(transport, tcp.Connection):
        return transport
    inner = getattr(transport, "transport", None)
    return inner if isinstance(inner, tcp.Connection) else None


def queued(connection: tcp.Connection) -> int:
    """Bytes Twisted holds to write on a connection."""
    return int(connection._tempDataLen + len(connection.dataBuffer) - connection.offset)


def unsent(transport: Any) -> int | None:
    """
    Bytes written to C{transport} that its peer has not taken yet: what
    Twisted holds and what the kernel has not had acknowledged (TIOCOUTQ);
    L{None} when there is no kernel connection under it, or it is gone.
    """
    connection = _connection_of(transport)
    if connection is None or connection.disconnected:
        return None
    try:
        kernel = struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        kernel = 0
    return queued(connection) + int(kernel)


def close_soon(transport: Any, reactor: IReactor | None = None) -> None:
    """
    Close C{transport} once what is queued for it is written, as
    C{loseConnection()} does, but abort it once L{FLUSH_TIMEOUT} passes with no
    progress: its peer across the relay is gone, and a connection that does
    not read (an echo blocked writing to us, whom we no longer read) would
    otherwise stay ESTABLISHED for good. A slow reader still gets it all.
    """
    if getattr(transport, "producer", True) is not None:  # (a memory transport refuses to unregister none)
        transport.unregisterProducer()
    transport.loseConnection()
    connection = _connection_of(transport)
    if connection is None:
        left = None
    elif connection.disconnected or (connection is transport and not queued(connection)):
        return  # gone, or nothing queued: it closes on the next reactor turn
    else:
        left = queued(connection)
    if reactor is None:
        # Twisted's transports carry the reactor they run on (a TLS one, inside).
        reactor = getattr(transport, "reactor", None) or getattr(connection, "reactor", None)
        if reactor is None:
            return  # a memory transport: nothing to wait for
    reactor.callLater(FLUSH_TIMEOUT, _flushed_or_abort, transport, connection, reactor, left)


def _flushed_or_abort(transport: Any, connection: tcp.Connection | None, reactor: IReactor,
                      before: int | None) -> None:
    if connection is not None:
        if connection.disconnected:
            return
        left = queued(connection)
        if before is not None and left < before:  # progress: it is slow, not stuck
            reactor.callLater(FLUSH_TIMEOUT, _flushed_or_abort, transport, connection, reactor, left)
            return
    transport.abortConnection()


def half_close(transport: Any) -> None:
    # Twisted's TLS has no loseWriteConnection: loseConnection sends
    # close_notify, and closes once the peer answers with its own.
    if isinstance(transport, tcp.Connection):
        # The producer is the side that just reached EOF. Left registered
        # and paused by a full buffer, the drained buffer resumes it
        # *instead of* sending the FIN (Twisted's FileDescriptor.doWrite),
        # and the FIN never goes: a TLS close_notify read in the same batch
        # as the data that filled the buffer did exactly that.
        transport.unregisterProducer()
        transport.loseWriteConnection()
    else:
        # Twisted's TLS transport sends its close_notify (and closes) only
        # once no producer is registered, and the peer registered as its
        # producer never unregisters: let it go first.
        transport.unregisterProducer()
        transport.loseConnection()


def claim_peer(transport: Any, peer: tuple[str, int], destination: tuple[str, int] | None,
               received: bytes | None = None) -> None:
    """
    Make an accepted connection say it came from C{peer} (a PROXY header's
    source), to C{destination} (its destination: the balancer's address,
    which headers sent on name, as HAProxy's and Traefik's do;
    L{portrouter.proxyheader.header_for}). C{received} is the header itself
    when a v2 header sent on is the same bytes (it began with
    L{portrouter.proxyheader.V2_TCP4}).
    """
    # Twisted's tcp.Server answers getPeer() from .client, in its address type.
    transport.client = peer
    transport._addressType = IPv6Address if ":" in peer[0] else IPv4Address
    # getHost() stays the listener's: what the connection came in on here.
    transport.proxied_to = destination
    transport.proxied_header = received


def hand_over(transport: Any, protocol: Any, data: bytes = b"", peer: tuple[str, int] | None = None,
              destination: tuple[str, int] | None = None, received: bytes | None = None) -> None:
    """
    Give an accepted connection to C{protocol}, as if it had been built for
    it; C{data}, read before the choice was made, is delivered first. With
    C{peer} (a PROXY header's source), the connection says it came from
    there, to C{destination}, in C{received} (L{claim_peer}).
    """
    if peer is not None:
        claim_peer(transport, peer, destination, received)
    # Twisted's tcp.Connection delivers every event to its .protocol.
    transport.protocol = protocol
    protocol.makeConnection(transport)
    if data and transport.connected:
        protocol.dataReceived(data)


class Phase(enum.Enum):
    READING = "reading its first bytes"
    HANDED = "handed over"
    CLOSED = "closed"


class FirstBytes(Protocol):
    """
    An accepted connection read until its first bytes say where it goes (a
    ClientHello, a PROXY header), then handed over (L{hand_over}); closed,
    with a line in the log, when they are refused or are not whole within
    C{timeout}. Subclasses say what they wait for (C{what}) and L{examine}.
    """

    transport: IConnection  # set by makeConnection, before any other event
    what = "first bytes"  # "ClientHello", "PROXY header": for the log
    where = "portrouter"  # the log line's first word(s): "tls front", "proxy protocol"

    def __init__(self, reading: FirstBytesDeadlines, timeout: float, addr: IAddress):
        self.reading = reading  # the listener's: timed out there, and closed at shutdown
        self.timeout = timeout
        self.addr = addr
        self.phase = Phase.READING
        self.buffer = b""

    @property
    def peer(self) -> str:
        """The address as the log names it: only needed when a line is written."""
        return peer_of(self.addr)

    def connectionMade(self) -> None:
        self.reading.add(self, self.timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.READING:
            self.buffer += data
            self.examine(data)

    def examine(self, data: bytes) -> None:
        """C{data} came (C{buffer} holds all so far): hand over (L{handed}), L{refuse}, or wait."""
        raise NotImplementedError

    def handed(self) -> None:
        """The first bytes decided: from here on the connection is someone else's."""
        self._done(Phase.HANDED)

    def _done(self, phase: Phase) -> None:
        self.phase = phase
        self.reading.remove(self, self.timeout)

    def timed_out(self, timeout: float) -> None:
        """Told by the listener's L{FirstBytesDeadlines}: C{timeout} seconds passed."""
        self.refuse(f"no whole {self.what} within {timeout:g} s ({len(self.buffer)} bytes came)", abort=True)

    def refused(self) -> None:
        """Count a refusal, where the subclass counts them."""

    def refuse(self, why: str, alert: bytes = b"", abort: bool = False) -> None:
        """Close without handing over, after C{alert} if any: a line in the log says why."""
        self._done(Phase.CLOSED)
        self.refused()
        log.info("{where} {peer}: {why}; closed", where=self.where, peer=self.peer, why=why)
        if alert:
            self.transport.write(alert)
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if self.phase is Phase.READING:
            self._done(Phase.CLOSED)
            log.info("{where} {peer}: closed by the client before its {what} was whole ({count} bytes came)",
                     where=self.where, peer=self.peer, what=self.what, count=len(self.buffer))


def couple(one: IConnection, other: IConnection) -> None:
    """
    Each transport the other's streaming producer, as C{portforward} does it:
    a full write buffer on one stops reading on the other until it drains.
    """
    one.registerProducer(other, True)
    other.registerProducer(one, True)


class Holds:
    """
    Why one transport is not being read: a set of reasons (bits, the
    caller's own). It is paused when the first reason comes and resumed
    when the last goes, so one reason ending never lifts another's pause.
    """

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: IConnection):
        self.transport = transport
        self.reasons = 0

    def hold(self, why: int) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons |= why

    def release(self, why: int) -> None:
        if self.reasons & why:
            self.reasons &= ~why
            if not self.reasons:
                self.transport.resumeProducing()


@implementer(IPushProducer)
class HoldWhileFull:
    """
    The producer of a transport whose data comes from another one that
    L{Holds} governs: while its write buffer is full, C{why} holds the other.
    """

    __slots__ = ("holds", "why")

    def __init__(self, holds: Holds, why: int):
        self.holds = holds
        self.why = why

    def pauseProducing(self) -> None:
        self.holds.hold(self.why)

    def resumeProducing(self) -> None:
        self.holds.release(self.why)

    def stopProducing(self) -> None:
        pass  # the transport is gone: its protocol tells whoever needs to know


@implementer(IPushProducer)
class Backlog:
    """
    A transport's producer that only notes whether Twisted paused it (more
    than its buffer, 64 KiB, waits behind a full kernel buffer), for relays
    that cannot wait and drop instead: datagrams.
    """

    __slots__ = ("full",)

    def __init__(self) -> None:
        self.full = False

    def pauseProducing(self) -> None:
        self.full = True

    def resumeProducing(self) -> None:
        self.full = False

    def stopProducing(self) -> None:
        pass  # the connection is gone: its protocol ends what it carried


@implementer(IHalfCloseableProtocol)
class StreamSide(Protocol):
    """
    One side of a relayed pair of Twisted transports: what it reads is written
    to its peer; each side's transport is the other's producer, so a full
    write buffer on one side stops reading on the other.
    """

    transport: IConnection  # set by makeConnection, before any other event
    peer: StreamSide | None = None
    session: Session | None = None
    clock: Callable[[], float]  # the reactor's seconds, as the session's idle timer: set by pair_streams
    inbound = False  # True for the client side
    read_eof = False
    write_eof = False

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        session = self.session
        if self.inbound:
            session.bytes_in += len(data)  # type: ignore[union-attr]
        else:
            session.bytes_out += len(data)  # type: ignore[union-attr]
        session.last = self.clock()  # type: ignore[union-attr]
        peer.transport.write(data)

    def readConnectionLost(self) -> None:
        self.read_eof = True
        if self.session is not None and self.session.reason is None and not (self.peer and self.peer.read_eof):
            self.session.reason = "client closed" if self.inbound else "backend closed"
        if self.peer is not None and self.peer.transport is not None:
            half_close(self.peer.transport)
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self.write_eof = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.read_eof and self.write_eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if peer.transport is not None:
                close_soon(peer.transport)
            if self.session is not None:
                if self.session.reason is None:
                    who = "client" if self.inbound else "backend"
                    self.session.reason = f"{who} closed"
                self.session.ended(self.session.reason)


def pair_streams(session: Session, client: StreamSide, backend: StreamSide,
                 clock: Callable[[], float]) -> None:
    """
    Wire two connected L{StreamSide}s together; the client side must be
    paused. C{clock} stamps activity: the injected reactor's C{seconds}, the
    clock L{Sessions} measures idleness with.
    """
    client.clock = backend.clock = clock
    client.peer, backend.peer = backend, client
    client.session = backend.session = session
    client.inbound = True
    couple(client.transport, backend.transport)

    def close() -> None:
        if session.reason is None:  # else whoever closes has said why
            session.reason = "closed by portrouter"
        close_soon(client.transport)
        close_soon(backend.transport)

    session._closer = close
    client.transport.resumeProducing()
