"""
TCP routes: each accepted connection becomes one connection to the project's
backend (any Twisted client endpoint), bytes both ways, half-close carried.

The accepted side is paused until the backend answers, so nothing it sends
early is read, let alone lost; it is delivered once the backend is connected.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections import Counter
from typing import Any

from OpenSSL.SSL import Error
from service_identity import VerificationError
from twisted.internet import defer, error, tcp
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from portrouter.certs import describe, tls_handle
from portrouter.model import Project
from portrouter.interfaces import IReactor
from portrouter.metrics import Stats
from portrouter.relay import Session, SpliceRelay, StreamSide, detach, pair_streams, splicable
from portrouter.services import Services

log = Logger(namespace="portrouter.tcp")

LIMIT_REPORT = 10.0  # seconds between "refused at max_connections" log lines per project
_ACCEPTS = 64  # accepts per readiness event, so a flood cannot starve the rest
_SPLICE_OK = hasattr(os, "splice")


def peer_of(address: IAddress) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or "unix"
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"  # type: ignore[attr-defined]


def timed_out(reason: Failure) -> bool:
    """
    A connect given up by C{Deferred.addTimeout} or the endpoint's own
    timeout. Endpoints answer a cancel with C{ConnectingCancelledError},
    which C{addTimeout} passes through as it is; callers drop the cancels of
    clients that left before they get here, so any cancel seen is a timeout.
    """
    return reason.check(defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError,
                        defer.CancelledError) is not None


def connect_failure(reason: Failure, timeout: float) -> str:
    """Why a backend connection attempt failed, in words."""
    if timed_out(reason):
        return f"backend did not answer within {timeout:g} s"
    if reason.check(error.ConnectionRefusedError):
        return "backend refused the connection"
    return f"backend connection failed: {reason.getErrorMessage()}"


def tls_problem(reason: Failure, transport: Any) -> str | None:
    """
    Why a backend's TLS handshake failed, in words (the certificate is for
    another name, has expired, comes from an unknown CA...); L{None} when
    C{reason} is no TLS failure. C{transport} is Twisted's TLS transport,
    whose connection still holds OpenSSL's verify result while it closes:
    OpenSSL's own error says only "certificate verify failed".
    """
    value = reason.value
    if isinstance(value, VerificationError):
        names = [getattr(e.mismatched_id, "hostname", None) or getattr(e.mismatched_id, "ip", "?")
                 for e in value.errors]
        shown = ", ".join(n.decode("ascii", "replace") if isinstance(n, bytes) else str(n) for n in names)
        return f"backend TLS certificate is not valid for {shown}"
    if not isinstance(value, Error):
        return None
    connection = getattr(transport, "_tlsConnection", None)
    if connection is not None:
        from OpenSSL._util import ffi, lib  # pyOpenSSL has no public verify result

        code = lib.SSL_get_verify_result(connection._ssl)
        if code:  # X509_V_OK is 0
            text = ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
            return f"backend TLS certificate verify failed: {text}"
    # pyOpenSSL's Error holds a list of (library, function, reason) triples.
    queue = value.args[0] if value.args and isinstance(value.args[0], list) else []
    said = "; ".join(str(e[-1]) for e in queue if isinstance(e, tuple)) or reason.getErrorMessage()
    return f"backend TLS handshake failed: {said}"


class Sessions:
    """
    The live sessions of the router: what the manhole lists, what draining
    waits for, and where the one log line per finished session is written.
    """

    def __init__(self, reactor: IReactorTime):
        self.reactor = reactor
        self.live: set[Session] = set()
        self.stats = Stats()
        self.active: Counter[str] = Counter()  # open sessions by project, for max_connections
        self._limit_reported: dict[str, float] = {}

    def open(self, protocol: str, project: str, peer: str, idle_timeout: float | None = None,
             transport: Any = None) -> Session:
        session = Session(protocol, project, peer, self.reactor.seconds(), self._ended)
        session.tls = tls_handle(transport)
        self.live.add(session)
        self.active[project] += 1
        self.stats.connections[(protocol, project)] += 1
        if idle_timeout is not None:
            session.idle_timer = self.reactor.callLater(idle_timeout, self._idle, session, idle_timeout)
        return session

    def full(self, protocol: str, project: str, limit: int | None, peer: str) -> bool:
        """
        C{project} has C{limit} sessions open: count the refusal and say so in
        the log (at most once per 10 s per project, so a flood stays readable).
        """
        if limit is None or self.active[project] < limit:
            return False
        self.stats.refused_at_limit[(protocol, project)] += 1
        now = self.reactor.seconds()
        if now - self._limit_reported.get(project, -LIMIT_REPORT) >= LIMIT_REPORT:
            self._limit_reported[project] = now
            log.warn("{protocol} {project} {peer}: refused, {limit} connections open (max_connections)",
                     protocol=protocol, project=project, peer=peer, limit=limit)
        return True

    def _idle(self, session: Session, timeout: float) -> None:
        # One timer per session, moved only when it fires: activity itself
        # just writes a timestamp.
        idle = self.reactor.seconds() - session.last
        if idle < timeout:
            session.idle_timer = self.reactor.callLater(timeout - idle, self._idle, session, timeout)
            return
        session.idle_timer = None
        session.reason = f"idle for {timeout:g} s"
        session.close()

    def _ended(self, session: Session) -> None:
        self.live.discard(session)
        self.active[session.project] -= 1
        if not self.active[session.project]:
            del self.active[session.project]
        if session.idle_timer is not None and session.idle_timer.active():
            session.idle_timer.cancel()
        key = (session.protocol, session.project)
        self.stats.bytes_in[key] += session.bytes_in
        self.stats.bytes_out[key] += session.bytes_out
        if session.supervisor is not None:
            session.supervisor.release()
        log.info(
            "{protocol} {project} {peer}: {reason}; {bytes_in} bytes in, "
            "{bytes_out} bytes out, {duration:.3f} s{tls}",
            protocol=session.protocol,
            project=session.project,
            peer=session.peer,
            reason=session.reason,
            bytes_in=session.bytes_in,
            bytes_out=session.bytes_out,
            duration=self.reactor.seconds() - session.started,
            tls=describe(session.tls),
        )


class _Backend(StreamSide):
    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        # A TLS backend fails after the connect succeeded: say why in the session's line.
        problem = tls_problem(reason, self.transport)
        if problem is not None and self.peer is not None and self.session is not None:
            self.session.reason = problem
        super().connectionLost(reason)


class _BackendFactory(Factory):
    noisy = False
    protocol = _Backend


class _Inbound(StreamSide):
    """An accepted client connection, waiting for its backend, then relayed."""

    def __init__(self, route: TCPRoute, addr: IAddress):
        self.route = route
        self.addr = addr
        self.pending: defer.Deferred[Any] | None = None

    def connectionMade(self) -> None:
        route = self.route
        limits = route.project.limits
        peer = peer_of(self.addr)
        if route.sessions.full("tcp", route.project.name, limits.max_connections, peer):
            self.transport.loseConnection()  # accepted and closed at once: clients never hang
            return
        self.transport.pauseProducing()
        self.session = route.sessions.open("tcp", route.project.name, peer, limits.idle_timeout, self.transport)
        supervisor = route.supervisor
        if supervisor is None:
            self._connect()
            return
        # Started on demand: the client stays paused (its first bytes wait
        # in the kernel) until the service accepts.
        supervisor.acquire()
        self.session.supervisor = supervisor
        d = self.pending = supervisor.ensure()
        d.addCallbacks(lambda _: self._connect(), self._not_started)

    def _not_started(self, reason: Failure) -> None:
        self.pending = None
        if reason.check(defer.CancelledError):
            return
        session = self.session
        if session is not None and session.reason is None:
            self.transport.loseConnection()
            session.ended(reason.getErrorMessage())

    def _connect(self) -> None:
        route = self.route
        connect_timeout = route.project.limits.connect_timeout
        d = self.pending = route.endpoint.connect(_BackendFactory())
        d.addTimeout(connect_timeout, route.reactor)
        d.addBoth(self._answered, connect_timeout)

    def _answered(self, result: Any, timeout: float) -> None:
        self.pending = None
        session = self.session
        assert session is not None
        if isinstance(result, Failure):
            if self.transport is not None and session.reason is None:
                why = connect_failure(result, timeout)
                self.route.sessions.stats.connect_failed(session.project, why)
                self.transport.loseConnection()
                session.ended(why)
            return
        backend: _Backend = result
        if splicable(self.transport) and splicable(backend.transport):
            relay = SpliceRelay(
                self.route.reactor, session, detach(self.transport), detach(backend.transport)
            )
            # The Twisted transports are let go of: from here on the relay
            # owns both sockets.
            self.transport = backend.transport = None  # type: ignore[assignment]  # no event comes after
            relay.start()
        else:
            pair_streams(session, self, backend, self.route.reactor.seconds)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if self.pending is not None:
            # The client left before the backend answered.
            self.session.reason = "client closed before the backend answered"  # type: ignore[union-attr]
            self.pending.cancel()
            self.session.ended(self.session.reason)  # type: ignore[union-attr]
            return
        super().connectionLost(reason)


def direct_address(endpoint: Any) -> tuple[int, tuple[str, int]] | None:
    """
    (family, address) when C{endpoint} is a plain TCP endpoint to an IP
    literal, which the relay can connect itself; else L{None}.
    """
    if _SPLICE_OK and type(endpoint).__name__ in ("TCP4ClientEndpoint", "TCP6ClientEndpoint"):
        host = getattr(endpoint, "_host", None)
        port = getattr(endpoint, "_port", None)
        if getattr(endpoint, "_bindAddress", None) is None and isinstance(port, int) and isinstance(host, str):
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return None  # a name: Twisted resolves it without blocking
            return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)
    return None


def accept_directly(port: tcp.Port) -> None:
    """
    Give a listening TCP port a C{doRead} that hands accepted sockets
    straight to its route's relay when the route can take them
    (L{TCPRoute.direct}), and otherwise does what Twisted's port does.
    """
    twisted_read = port.doRead

    def doRead() -> None:
        factory = port.factory
        # Not a TCPRoute (a TLS port has TLSFactory here): Twisted accepts.
        if not isinstance(factory, TCPRoute) or factory.direct is None:
            twisted_read()  # type: ignore[no-untyped-call]
            return
        for _ in range(_ACCEPTS):
            try:
                sock, address = port.socket.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client gave up; go on with the next
                # Out of descriptors or memory: try again at the next event
                # rather than spin; the kernel keeps the queue.
                log.warn("tcp {project}: cannot accept: {why}", project=factory.project.name, why=e.strerror)
                return
            factory.accept_socket(sock, address)

    port.doRead = doRead  # type: ignore[method-assign]


class TCPRoute(Factory):
    """The listening side of one project's TCP route."""

    noisy = False

    def __init__(self, reactor: IReactor, project: Project, sessions: Sessions, services: Services | None = None):
        self.reactor = reactor
        self.sessions = sessions
        self.services = services
        self.update(project)

    def update(self, project: Project) -> None:
        """Take a changed manifest; new connections use it, open ones go on."""
        assert project.backend is not None
        self.project = project
        self.endpoint: IStreamClientEndpoint = clientFromString(self.reactor, project.backend)
        self.supervisor = self.services.get(project) if self.services is not None else None
        self.direct = None if self.supervisor is not None else direct_address(self.endpoint)

    def accept_socket(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """
        The direct path (L{accept_directly}): a plain TCP client to a plain TCP
        backend given by IP address. No Twisted transport is made for
        either side; the relay connects the backend and splices.
        """
        project = self.project
        limits = project.limits
        host, port = address[0], address[1]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.sessions.full("tcp", project.name, limits.max_connections, peer):
            sock.close()  # accepted and closed at once: clients never hang
            return
        family, target = self.direct  # type: ignore[misc]
        backend = socket.socket(family, socket.SOCK_STREAM)
        backend.setblocking(False)
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = self.sessions.open("tcp", project.name, peer, limits.idle_timeout)
        relay = SpliceRelay(self.reactor, session, sock, backend)
        stats = self.sessions.stats
        relay.on_connect_failure = lambda why: stats.connect_failed(project.name, why)
        relay.connect(target, limits.connect_timeout)

    # A listening port always passes the peer's address.
    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        return _Inbound(self, addr)
