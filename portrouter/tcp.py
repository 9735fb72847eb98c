"""
TCP routes: each accepted connection becomes one connection to the project's
backend (any Twisted client endpoint), bytes both ways, half-close carried.

The accepted side is paused until the backend answers, so nothing it sends
early is read, let alone lost; it is delivered once the backend is connected.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from portrouter.model import Limits, Project, Service
from portrouter.interfaces import IReactor
from portrouter.proxyheader import header, header_for, looks_like_header, might_be_header
from portrouter.relay import SPLICE_OK, SpliceRelay, StreamSide, detach, pair_streams, splicable
from portrouter.services import Services, Supervisor
from portrouter.sessions import Sessions, connect_failure, peer_of, tls_problem

log = Logger(namespace="portrouter.tcp")

_ACCEPTS = 64  # accepts per readiness event, so a flood cannot starve the rest


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

    def __init__(self, route: TCPRoute, addr: IAddress, early: bytes = b""):
        self.route = route
        self.addr = addr
        self.early = early  # read before the route was chosen (a ClientHello): the backend's first bytes
        self.pending: defer.Deferred[Any] | None = None

    def connectionMade(self) -> None:
        route = self.route
        limits = route.limits
        peer = peer_of(self.addr)
        if route.sessions.full("tcp", route.name, limits.max_connections, peer):
            self.transport.loseConnection()  # accepted and closed at once: clients never hang
            return
        self.transport.pauseProducing()
        self.session = route.sessions.open("tcp", route.name, peer, limits.idle_timeout, self.transport)
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
        connect_timeout = route.limits.connect_timeout
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
        early, self.early = self.early, b""
        send_proxy = self.route.send_proxy
        prefix = header_for(send_proxy, self.transport) if send_proxy is not None else b""
        if self.splice and splicable(self.transport) and splicable(backend.transport):
            relay = SpliceRelay(
                self.route.reactor, session, detach(self.transport), detach(backend.transport)
            )
            # The Twisted transports are let go of: from here on the relay
            # owns both sockets.
            self.transport = backend.transport = None  # type: ignore[assignment]  # no event comes after
            relay.start(prefix + early, len(early))
        else:
            if prefix or early:
                session.bytes_in += len(early)
                backend.transport.write(prefix + early)
            pair_streams(session, self, backend, self.route.reactor.seconds)

    splice = True  # the relay may splice the two sockets (no one needs to see the bytes)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if self.pending is not None:
            # The client left before the backend answered.
            self.session.reason = "client closed before the backend answered"  # type: ignore[union-attr]
            self.pending.cancel()
            self.session.ended(self.session.reason)  # type: ignore[union-attr]
            return
        super().connectionLost(reason)


class _Guarded(_Inbound):
    """
    A client of a route that receives the PROXY protocol, from an address it
    does not trust: served, but a PROXY header in its first bytes is a
    forgery and closes the connection. Not spliced: its bytes are looked at.
    """

    splice = False
    head: bytes | None = b""  # the first bytes while they may still begin a header; None once decided

    def dataReceived(self, data: bytes) -> None:
        if self.head is not None:
            head = self.head + data
            if might_be_header(head):
                self.head = head  # "PRO", say: held until the next bytes decide (at most 12)
                return
            self.head = None
            if looks_like_header(head):
                log.info("tcp {project} {peer}: a PROXY header from an untrusted address; closed",
                         project=self.route.name, peer=peer_of(self.addr))
                if self.session is not None:
                    self.session.reason = "a PROXY header from an untrusted address"
                self.transport.loseConnection()
                return
            data = head
        super().dataReceived(data)


def direct_address(endpoint: Any) -> tuple[int, tuple[str, int]] | None:
    """
    (family, address) when C{endpoint} is a plain TCP endpoint to an IP
    literal, which the relay can connect itself; else L{None}.
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
                log.warn("tcp {project}: cannot accept: {why}", project=factory.name, why=e.strerror)
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
        self._aim(project, project.name, project.backend, project.limits,
                  self.services.get(project) if self.services is not None else None, project.send_proxy)

    @classmethod
    def to_service(cls, reactor: IReactor, project: Project, service: Service, sessions: Sessions,
                   services: Services) -> TCPRoute:
        """
        Connections relayed to a service port of C{project} (reached by
        hostname), started on demand as its tunnels start it.
        """
        route = cls.__new__(cls)
        route.reactor, route.sessions, route.services = reactor, sessions, services
        route._aim(project, f"{project.name}/{service.name}", project.service_endpoint(service), service.limits,
                   services.get(project, service), service.send_proxy)
        return route

    def _aim(self, project: Project, name: str, backend: str, limits: Limits, supervisor: Supervisor | None,
             send_proxy: str | None) -> None:
        self.project = project
        self.send_proxy = send_proxy  # "v1", "v2": a PROXY header starts each backend connection
        self.name = name  # as sessions, logs and metrics name it
        self.limits = limits
        self.endpoint: IStreamClientEndpoint = clientFromString(self.reactor, backend)
        self.supervisor = supervisor
        self.direct = None if supervisor is not None else direct_address(self.endpoint)

    def accept_socket(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """
        The direct path (L{accept_directly}): a plain TCP client to a plain TCP
        backend given by IP address. No Twisted transport is made for
        either side; the relay connects the backend and splices.
        """
        name = self.name
        limits = self.limits
        host, port = address[0], address[1]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.sessions.full("tcp", name, limits.max_connections, peer):
            sock.close()  # accepted and closed at once: clients never hang
            return
        family, target = self.direct  # type: ignore[misc]
        backend = socket.socket(family, socket.SOCK_STREAM)
        backend.setblocking(False)
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = self.sessions.open("tcp", name, peer, limits.idle_timeout)
        relay = SpliceRelay(self.reactor, session, sock, backend)
        stats = self.sessions.stats
        relay.on_connect_failure = lambda why: stats.connect_failed(name, why)
        if self.send_proxy is not None:
            relay.early = header(self.send_proxy, (host, port), sock.getsockname()[:2])
        relay.connect(target, limits.connect_timeout)

    # A listening port always passes the peer's address.
    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        return _Inbound(self, addr)

    def inbound(self, addr: IAddress, early: bytes) -> Protocol:
        """A connection whose first bytes (C{early}) were read to choose this route."""
        return _Inbound(self, addr, early)

    def guarded(self, addr: IAddress) -> Protocol:
        """An untrusted client of a listener that receives the PROXY protocol (L{_Guarded})."""
        return _Guarded(self, addr)
