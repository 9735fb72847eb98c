"""
UDP routes: a datagram relay with one session per client address.

Each session has its own connected socket towards the backend, so a reply
can only have come from the backend and goes back to the client that caused
it, from the listening socket the client sent to. A session ends
C{udp_timeout} seconds after its last datagram in either direction; sessions
are kept in last-activity order, so expiry pops from the front and costs
nothing per datagram beyond moving one entry to the end.

A datagram also decides whether the reactor sleeps afterwards: while
datagrams have been following each other within C{udp_busy_poll} (a reply
from a backend, the client's next request), the reactor keeps polling for a
window that grows while that pays off and halves when it does not, so a
one-in-flight exchange does not pay for waking a sleeping CPU at every hop
(tens of microseconds on a virtual machine) and sparse traffic costs nothing.

Binding the listener to the wildcard address on a host with several
addresses lets the kernel choose a reply's source address, which may not be
the one the client sent to; bind to the configured C{interface} for that.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import weakref
from collections import OrderedDict
from typing import Any, NamedTuple

from twisted.internet.interfaces import IReadDescriptor, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from portrouter.config import split_hostport
from portrouter.proxyheader import V2_SIGNATURE, header
from portrouter.proxyproto import datagram_header
from portrouter.model import Project, ProxyProtocol
from portrouter.interfaces import IReactor
from portrouter.sessions import Sample

log = Logger(namespace="portrouter.udp")

MAX_DATAGRAM = 65535
# How often expiry looks at the oldest sessions, at most.
SWEEP = 1.0
# Datagrams read per readiness event, so one busy session cannot starve others.
_BURST = 64
# Dropped datagrams are reported at most this often.
DROP_REPORT = 10.0
# Receive buffer asked for the listening socket, which every client shares
# (the kernel caps it at net.core.rmem_max); the usual default holds only
# three of the largest datagrams.
LISTEN_BUFFER = 4 * 1024 * 1024


class Awake:
    """
    Keeps one reactor polling rather than sleeping while any of its UDP
    routes has a window open: a single call due at once, re-made each turn,
    however many routes are busy. A route's datagram costs nothing here
    while its route is already counted in (the flood case); each turn reads
    how far the routes' windows reach.
    """

    def __init__(self, reactor: IReactor):
        self.reactor = reactor
        self.asked: set[UDPRoute] = set()
        self._call: Any = None

    def keep(self, route: UDPRoute, now: float) -> None:
        """Poll until C{route}'s window, counted from its last datagram, is over."""
        self.asked.add(route)
        route.polled = True
        if self._call is None:
            self._call = self.reactor.callLater(0, self._turn, now)

    def forget(self, route: UDPRoute) -> None:
        """C{route} is stopping; the polling ends with the last route that asked for it."""
        self.asked.discard(route)
        route.polled = False
        if not self.asked and self._call is not None:
            self._call.cancel()
            self._call = None

    def _turn(self, then: float) -> None:
        # A call due at once makes the reactor poll without blocking; this
        # one asks again until the windows are over. A clock that has not
        # moved (a test's) ends it too, rather than spinning for ever.
        now = self.reactor.seconds()
        if then < now < max(route.open_until() for route in self.asked):
            self._call = self.reactor.callLater(0, self._turn, now)
            return
        self._call = None
        for route in self.asked:
            route.polled = False
        self.asked.clear()


_awake: weakref.WeakKeyDictionary[Any, Awake] = weakref.WeakKeyDictionary()


def awake(reactor: IReactor) -> Awake:
    """The one L{Awake} of C{reactor}."""
    keeper = _awake.get(reactor)
    if keeper is None:
        keeper = _awake[reactor] = Awake(reactor)
    return keeper


class Proxied(NamedTuple):
    """
    A session's key behind a balancer's PROXY headers: the client it named,
    the balancer that sent its datagrams, and the address the client sent
    to (named in headers sent on). A client reaching two of a balancer's
    addresses is two flows, two sessions. A direct client's key is its
    (host, port), as Twisted gives it.
    """

    host: str  # host and port first: logs write a key as a client
    port: int
    sender: tuple[str, int]
    to: tuple[str, int]


@implementer(IReadDescriptor)
class _Session:
    """One client's traffic: a connected socket to the backend, read by the reactor."""

    __slots__ = (
        "route", "client", "started", "last", "datagrams_in", "datagrams_out",
        "bytes_in", "bytes_out", "sock", "fd", "prefix", "reply_to",
    )

    def __init__(self, route: UDPRoute, client: tuple[Any, ...], started: float, sock: socket.socket,
                 reply_to: tuple[str, int]):
        self.route = route
        self.client = client  # the session's key: (host, port), or Proxied
        self.reply_to = reply_to  # where replies go: the client, or the proxy that sent its datagrams
        self.started = started
        self.last = started
        self.datagrams_in = self.datagrams_out = 0
        self.bytes_in = self.bytes_out = 0
        self.sock = sock
        self.fd = sock.fileno()
        self.prefix = b""  # send_proxy: the v2 header each datagram to the backend starts with

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "portrouter.udp"

    def doRead(self) -> None:
        for _ in range(_BURST):
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # ICMP port unreachable from the backend: that datagram is
                # lost, as it would be without us; the session goes on.
                self.route.refused += 1
                continue
            except OSError:
                return
            self.received(data)

    def received(self, data: bytes) -> None:
        route = self.route
        self.datagrams_out += 1
        self.bytes_out += len(data)
        self.last = now = route.reactor.seconds()
        if route.sessions.get(self.client) is self:
            route.sessions.move_to_end(self.client)
        route.reply(data, self.reply_to)
        route.keep_polling(now)

    def connectionLost(self, reason: Any) -> None:
        # Poll-like reactors report a pending socket error (ICMP port
        # unreachable from a backend that is down) as a lost connection and
        # stop reading; as in doRead, that is one lost datagram: clear the
        # error and go on reading.
        try:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            self.route._close(self, "socket error")
            return
        # Not required to be non-zero: a send in the same turn may have taken the error.
        if self.route.sessions.get(self.client) is self:
            if error == errno.ECONNREFUSED:
                self.route.refused += 1
            self.route.reactor.addReader(self)
            return
        self.route._close(self, "socket error")

    def send(self, data: bytes) -> None:
        self.datagrams_in += 1
        self.bytes_in += len(data)
        try:
            self.sock.send(self.prefix + data if self.prefix else data)
        except OSError:
            # A full buffer or an ICMP error reported late: UDP may drop.
            self.route.send_errors += 1


class _Said:
    """
    Datagrams dropped for one reason, as the log says them: at most once
    per L{DROP_REPORT} seconds, however fast they come.
    """

    __slots__ = ("unsaid", "when")

    def __init__(self) -> None:
        self.unsaid = 0  # dropped since it was last said
        self.when = -DROP_REPORT

    def dropped(self, now: float) -> int | None:
        """One more dropped at C{now}: how many to say now (it and those unsaid), or L{None}: said too recently."""
        self.unsaid += 1
        if now - self.when < DROP_REPORT:
            return None
        said, self.unsaid, self.when = self.unsaid, 0, now
        return said


class UDPRoute(DatagramProtocol):
    """The listening side of one project's UDP route."""

    noisy = False
    transport: IUDPTransport  # set by makeConnection, before any datagram

    def __init__(self, reactor: IReactor, project: Project):
        self.reactor = reactor
        self.sessions: OrderedDict[tuple[Any, ...], _Session] = OrderedDict()  # by key: (host, port), or Proxied
        self.dropped = 0  # datagrams of new clients dropped: a full session table, or no backend socket
        self.refused = 0
        self.send_errors = 0
        self.ended_in = self.ended_out = 0  # bytes of the sessions that ended, each way
        self._full_said = _Said()  # a full session table
        self._unopened_said = _Said()  # no backend socket to be had
        self._sweeper: Any = None
        self.backend: tuple[str, int] | None = None
        self._waiting: list[tuple[bytes, tuple[Any, ...], tuple[str, int]]] = []
        self.proxy_refused = 0  # datagrams refused for their PROXY header (or its absence)
        self._refused_said = _Said()
        self._trusted: dict[str, bool] = {}  # by sender address, with proxy_protocol
        self._seen: dict[tuple[tuple[str, int], bytes], tuple[Any, ...]] = {}  # (sender, header): session key
        self._last_datagram = float("-inf")
        self._window = 0.0
        self._awake = awake(reactor)
        self.polled = False  # counted in by Awake
        self.update(project)

    def update(self, project: Project) -> None:
        self.project = project
        self.sample = Sample(project.access_log)  # which sessions get a line in the log
        self._proxy = project.listen.proxy_protocol if project.listen is not None else None
        self._trusted, self._seen = {}, {}
        self._poll_limit = project.limits.udp_busy_poll
        self._window = min(self._window, self._poll_limit)
        assert project.backend is not None
        host, port = split_hostport(project.backend, "backend")
        self.backend = None
        try:
            ipaddress.ip_address(host)
            self.backend = (host, port)
        except ValueError:
            self._resolve(host, port)

    def _resolve(self, host: str, port: int) -> None:
        # Names are resolved off the reactor thread, once per change.
        d = self.reactor.resolve(host)

        def resolved(address: str) -> None:
            self.backend = (address, port)
            waiting, self._waiting = self._waiting, []
            for data, client, reply_to in waiting:
                self.datagramReceived(data, client, reply_to)

        def failed(reason: Any) -> None:
            log.warn("udp {project}: cannot resolve {host}: {why}", project=self.project.name,
                     host=host, why=reason.getErrorMessage())
            self._waiting = []

        d.addCallbacks(resolved, failed)

    _sock: socket.socket | None = None  # the listening socket, for replies

    def startProtocol(self) -> None:
        sock = self._sock = getattr(self.transport, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_BUFFER)
        self._sweeper = self.reactor.callLater(self._sweep_interval(), self._sweep)

    def stopProtocol(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._awake.forget(self)
        self.close_all("listener stopped")

    def _sweep_interval(self) -> float:
        return min(SWEEP, self.project.limits.udp_timeout / 4)

    def datagramReceived(self, data: bytes, addr: Any, reply_to: tuple[str, int] | None = None) -> None:
        if reply_to is None:
            if self._proxy is not None:
                self._unwrap(data, addr, self._proxy)
                return
            reply_to = addr
        client = addr  # (host, port): Twisted gives IPv4 and trimmed IPv6 addresses alike
        session = self.sessions.get(client)
        if session is None:
            if self.backend is None:
                if len(self._waiting) < 1000:
                    self._waiting.append((data, client, reply_to))
                return
            session = self._open(client, reply_to)
            if session is None:
                return
            now = session.started
        else:
            session.last = now = self.reactor.seconds()
            self.sessions.move_to_end(client)
        session.send(data)
        self.keep_polling(now)

    def _unwrap(self, data: bytes, addr: tuple[str, int], proxy: ProxyProtocol) -> None:
        """
        A route that receives the PROXY protocol: a trusted sender's datagram
        starts with a v2 header (HAProxy's per-datagram form), whose source is
        the session's client, replies going back to the sender; any other
        sender is a client of its own, and a header from it is refused. A
        sender's trust and a header already seen are remembered, so a session's
        datagrams after its first cost a dictionary lookup each.
        """
        trusted = self._trusted.get(addr[0])
        if trusted is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            trusted = self._trusted[addr[0]] = proxy.trusts(addr[0])
        if not trusted:
            if data.startswith(V2_SIGNATURE):
                self._refuse_header(addr, "a PROXY header from an untrusted address")
                return
            self.datagramReceived(data, addr, addr)
            return
        size = 16 + int.from_bytes(data[14:16], "big") if data.startswith(V2_SIGNATURE) and len(data) >= 16 else 0
        key = (addr, data[:size])
        known = self._seen.get(key) if size else None
        if known is None:
            found = datagram_header(data)
            if found is None:
                self._refuse_header(addr, "a datagram without a valid PROXY v2 header from a trusted address")
                return
            size = found.size
            # LOCAL: the proxy speaks for itself.
            known = Proxied(*found.source, addr, found.destination) if found.source and found.destination else addr
            if len(self._seen) >= self.project.limits.udp_max_sessions:
                self._seen.clear()
            self._seen[key] = known
        self.datagramReceived(data[size:], known, addr)

    def _refuse_header(self, addr: tuple[str, int], why: str) -> None:
        self.proxy_refused += 1
        now = self.reactor.seconds()
        if self._refused_said.dropped(now) is not None:
            log.info("udp {project} {client}: {why}; dropped ({count} so far)", project=self.project.name,
                     client=f"{addr[0]}:{addr[1]}", why=why, count=self.proxy_refused)

    def keep_polling(self, now: float) -> None:
        """
        After a datagram at C{now}: if the previous one came within
        C{udp_busy_poll}, polling would have caught it awake, so the window
        grows (to that limit); otherwise it halves, down to none. While a
        window is open the reactor does not sleep (L{Awake}).
        """
        limit = self._poll_limit
        gap = now - self._last_datagram
        self._last_datagram = now
        if gap <= limit:
            if self._window < limit:
                self._window = min(limit, max(2 * self._window, limit / 8))
        elif self._window > limit / 64:
            self._window /= 2
        else:
            self._window = 0.0
        if self._window and not self.polled:
            self._awake.keep(self, now)

    def open_until(self) -> float:
        """When this route's polling window closes."""
        return self._last_datagram + self._window

    def _open(self, client: tuple[Any, ...], reply_to: tuple[str, int]) -> _Session | None:
        limit = self.project.limits.udp_max_sessions
        now = self.reactor.seconds()
        if len(self.sessions) >= limit:
            self.dropped += 1
            count = self._full_said.dropped(now)
            if count is not None:
                log.warn("udp {project}: {limit} sessions open; dropped {count} datagrams from new clients",
                         project=self.project.name, limit=limit, count=count)
            return None
        assert self.backend is not None
        family = socket.AF_INET6 if ":" in self.backend[0] else socket.AF_INET
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(self.backend)  # replies can only come from the backend
        except OSError as e:
            if sock is not None:
                sock.close()
            # Dropped. Out of descriptors this is every new client's
            # datagram: said as a full session table is.
            self.dropped += 1
            count = self._unopened_said.dropped(now)
            if count is not None:
                log.warn("udp {project}: cannot open a socket to the backend: {why}; "
                         "dropped {count} datagrams from new clients", project=self.project.name, why=e, count=count)
            return None
        session = _Session(self, client, now, sock, reply_to)
        if self.project.send_proxy is not None:
            host = self.transport.getHost()
            to = client.to if isinstance(client, Proxied) else (host.host, host.port)
            session.prefix = header("v2", client[:2], to, "udp")
        self.sessions[client] = session
        self.reactor.addReader(session)
        return session

    def reply(self, data: bytes, client: tuple[str, int]) -> None:
        try:
            if self._sock is not None:
                self._sock.sendto(data, client)  # skips Twisted's per-datagram address checks
            else:
                self.transport.write(data, client)
        except OSError:
            self.send_errors += 1

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        timeout = self.project.limits.udp_timeout
        while self.sessions:
            client, session = next(iter(self.sessions.items()))
            if now - session.last < timeout:
                break
            self._close(session, f"idle for {timeout:g} s")
        self._sweeper = self.reactor.callLater(self._sweep_interval(), self._sweep)

    def _close(self, session: _Session, reason: str) -> None:
        if self.sessions.get(session.client) is not session:
            return
        del self.sessions[session.client]
        self.reactor.removeReader(session)
        session.sock.close()
        self.ended_in += session.bytes_in
        self.ended_out += session.bytes_out
        if not self.sample.due():
            return
        log.info(
            "udp {project} {client}: {reason}; {datagrams_in} datagrams ({bytes_in} bytes) in, "
            "{datagrams_out} datagrams ({bytes_out} bytes) out, {duration:.3f} s",
            project=self.project.name, client=f"{session.client[0]}:{session.client[1]}",
            reason=reason, datagrams_in=session.datagrams_in, bytes_in=session.bytes_in,
            datagrams_out=session.datagrams_out, bytes_out=session.bytes_out,
            duration=self.reactor.seconds() - session.started,
        )

    def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            self._close(session, reason)
