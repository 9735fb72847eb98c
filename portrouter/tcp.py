"""
TCP routes: each accepted connection becomes one connection to the project's
backend (any Twisted client endpoint), bytes both ways, half-close carried.

The accepted side is paused until the backend answers, so nothing it sends
early is read, let alone lost; it is delivered once the backend is connected.
"""

from __future__ import annotations

import errno
import ipaddress
import _socket
import socket
import struct
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IReadDescriptor, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.eventloop import after_round
from portrouter.model import Limits, Project, Service
from portrouter.interfaces import IReactor
from portrouter.proxyheader import header, header_for, looks_like_header, might_be_header
from portrouter.proxyproto import Found, HeaderRefused, ProxyGate, header_so_far, read_header
from portrouter.relay import ConnectDeadlines, SpliceRelay, StreamSide, detach, direct_address, pair_streams, splicable
from portrouter.services import Services, Supervisor
from portrouter.sessions import Sample, Sessions, connect_failure, peer_of, show_address, tls_problem

log = Logger(namespace="portrouter.tcp")

_ACCEPTS = 64  # accepts per readiness event, so a flood cannot starve the rest
READ_AHEAD = 65536  # one read of a PROXY header's connection (a v2 header is at most 65,551 bytes)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, as abortConnection does


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
        self.session = route.sessions.open("tcp", route.name, peer, limits.idle_timeout, self.transport, route.sample)
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
            relay.heard = bool(early)  # a ClientHello read already: its client now waits for an answer
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


def accept_directly(port: tcp.Port, reactor: IReactor, name: str) -> None:
    """
    Give a listening TCP port (C{name} in the log: "the ingress", "http
    route web") a C{doRead} of ours. It hands accepted sockets straight to
    their route's relay when the route can take them (L{TCPRoute.direct}):
    a route behind a L{ProxyGate} takes its trusted clients the same way,
    once their header is read (L{TCPRoute.look_later}). Every other client gets
    Twisted's transport, as Twisted's port would make it. Out of
    descriptors, it stops accepting for a while (L{OUT_OF_DESCRIPTORS_PAUSE}).
    """
    # Accepted sockets inherit TCP_NODELAY from the listening one (Linux):
    # set once here, not once per connection. Every client of the router's
    # has it, as HAProxy sets it: the relay writes what it has when it has
    # it, an HTTP channel sets it anyway, an SSH shell's keystrokes want it.
    port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port.doRead = _DirectAccept(port, reactor, name)  # type: ignore[method-assign]


def name_listener(port: Any, name: str) -> None:
    """What a port's accept loop (L{accept_directly}) calls it in the log, once its route changed."""
    accept = getattr(port, "doRead", None)
    if isinstance(accept, _DirectAccept):
        accept.name = name


# Why accept() or socket() fails when the process or the system has run out
# of descriptors (or of kernel memory for one).
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# What accept() says of the connection it was taking, which is gone, or of
# the network under it: accept(2) says to try again, with the next client.
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                          errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                          errno.ENETUNREACH})

# How long (seconds) a listener stops accepting when out of descriptors. Its
# clients wait in the kernel's listen queue meanwhile; without the pause the
# router would spin, the queue readable at every turn and every accept
# failing, and write a line each time. nginx also stops accepting for a
# while (HAProxy until a connection closes). Twisted's own port instead
# accepts every waiting client with a descriptor it keeps in reserve and
# closes it at once, with three lines in the log.
OUT_OF_DESCRIPTORS_PAUSE = 0.1


class _DirectAccept:
    """A listening port's C{doRead}, as L{accept_directly} gives it."""

    def __init__(self, port: tcp.Port, reactor: IReactor, name: str):
        self.port = port
        self.reactor = reactor
        self.name = name
        self.local = bound_address(port.socket)
        # Out of descriptors since when (accepting paused, then tried again);
        # None: not out. And the clients accepted meanwhile that had to be
        # closed, with none left for their backend connection.
        self.out_since: float | None = None
        self.closed_while_out = 0
        # The errno of the listening socket's own accept failure last said
        # (with its traceback), until a client is taken again: the same one
        # every 0.1 s is not said again.
        self.failing: int | None = None

    def __call__(self) -> None:
        port = self.port
        factory = port.factory
        assert factory is not None  # a listening port's, set when it was made
        gate = factory if isinstance(factory, ProxyGate) else None
        route = factory if gate is None else gate.inner
        # A TLS port has TLSFactory here, an HTTP one its site: Twisted's transports.
        direct = route if isinstance(route, TCPRoute) and route.direct is not None else None
        listening = port.socket
        family = listening.family  # an enum made per call: asked once
        for _ in range(_ACCEPTS):
            try:
                # A client's socket is the C socket object: no Python wrapper
                # made and closed per connection (the relay uses no more than
                # it has). Twisted's transport gets the wrapper.
                fd, address = listening._accept()  # type: ignore[union-attr]  # socket.accept without its wrapper
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _CLIENT_GONE:
                    continue
                if e.errno in _EXHAUSTED:
                    self._pause(e)
                else:
                    # The listening socket's own trouble: said once, and
                    # tried again after the same pause (not spun on at
                    # every turn, nor said at every try).
                    if e.errno != self.failing:
                        self.failing = e.errno
                        log.failure("{listener}: accept failed", listener=self.name)
                    self._wait()
                return
            # Whatever fails is this client's alone: raised out of doRead, it
            # would make the reactor close the listening port.
            try:
                self._take(factory, direct, gate, family, fd, address)
            except OSError as e:
                if e.errno not in _EXHAUSTED:
                    log.failure("{listener} {peer}: could not be served; closed",
                                listener=self.name, peer=show_address(address))
                    continue
                self.ran_out(e)  # accepted with the last descriptor, none left for its backend
                return
            except Exception:
                log.failure("{listener} {peer}: could not be served; closed",
                            listener=self.name, peer=show_address(address))
                continue
            if self.out_since is not None:
                self._accepting_again()
            self.failing = None

    def _take(self, factory: Factory, direct: TCPRoute | None, gate: ProxyGate | None, family: int, fd: int,
              address: tuple[Any, ...]) -> None:
        """One accepted client, to its relay, its header's wait or Twisted's transport; closed if that fails."""
        if direct is None or (gate is not None and not gate.trusts(address[0])):
            _twisted_accept(self.port, factory, socket.socket(family, socket.SOCK_STREAM, 0, fd), address)
            return
        client = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
        try:
            client.setblocking(False)
            if gate is not None:
                direct.look_later(gate, client, address, self)
            else:
                direct.accept_socket(client, address, local=self.local)
        except BaseException:
            client.close()  # a relay that was made closed it already: closing twice does nothing
            raise

    def ran_out(self, error: OSError) -> None:
        """A client accepted here was closed with no descriptor for its backend (a trusted one, after its header)."""
        self.closed_while_out += 1
        self._pause(error)

    def _pause(self, error: OSError) -> None:
        """Out of descriptors: stop accepting for a moment, and say so once until it is over."""
        self._wait()
        if self.out_since is None:
            self.out_since = self.reactor.seconds()
            log.warn("{listener}: out of descriptors ({why}): not accepting, tried again every {pause:g} s; "
                     "clients wait in the listen queue meanwhile", listener=self.name, why=error.strerror,
                     pause=OUT_OF_DESCRIPTORS_PAUSE)

    def _wait(self) -> None:
        """Stop accepting for L{OUT_OF_DESCRIPTORS_PAUSE} seconds."""
        self.port.stopReading()
        self.reactor.callLater(OUT_OF_DESCRIPTORS_PAUSE, self._resume)

    def _resume(self) -> None:
        port = self.port
        if port.connected and not port.disconnecting:  # not stopped meanwhile (a project removed)
            port.startReading()

    def _accepting_again(self) -> None:
        assert self.out_since is not None
        log.info("{listener}: accepting again, after {seconds:.1f} s out of descriptors; clients accepted "
                 "meanwhile and closed, with none for their backend: {closed}", listener=self.name,
                 seconds=self.reactor.seconds() - self.out_since, closed=self.closed_while_out)
        self.out_since = None
        self.closed_while_out = 0


def bound_address(listening: socket.socket) -> tuple[str, int] | None:
    """
    The address every connection a listening socket accepts is made to,
    when it is bound to one (L{None} for a wildcard, or not IP): what a
    PROXY header sent on names as the destination, without a getsockname
    per connection.
    """
    try:
        host, port = listening.getsockname()[:2]
    except (OSError, ValueError):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:0.0.0.0 is a wildcard too
    wildcard = ip.is_unspecified or (mapped is not None and mapped.is_unspecified)
    return None if wildcard else (host, port)


def _twisted_accept(port: tcp.Port, factory: Factory, sock: socket.socket, address: tuple[Any, ...]) -> None:
    """What Twisted's port does with an accepted socket: a transport for C{factory}'s protocol."""
    if len(address) == 4 and address[3]:
        # A link-local IPv6 peer: its host names its interface ("fe80::1%eth0"), as Twisted's port writes it.
        host = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        address = (host, *address[1:])
    try:
        protocol = factory.buildProtocol(port._buildAddr(address))
    except BaseException:
        sock.close()  # nobody else holds it yet: not left to the collector
        raise
    if protocol is None:
        sock.close()
        return
    session, port.sessionno = port.sessionno, port.sessionno + 1
    transport = port.transport(sock, protocol, address, port, session, port.reactor)
    try:
        protocol.makeConnection(transport)
    except BaseException:
        # The transport is watched already (it reads from its start): closed,
        # not left open with a protocol that never began (Twisted leaves it).
        transport.abortConnection()
        raise


# A trusted client accepted in a round, until looked at (TCPRoute.look_later):
# its listener's gate, socket, peer address, and the port's accept loop.
_Arrived = tuple[ProxyGate, _socket.socket, tuple[Any, ...], "_DirectAccept | None"]


@implementer(IReadDescriptor)
class _HeaderWait:
    """
    A trusted client of a direct TCP route until its PROXY header is whole:
    L{portrouter.proxyproto.HeaderReader} without a Twisted transport, so the
    connection goes on to the relay as a plain client's does. The header
    usually comes with the connection: it is looked for first after the
    reactor's turn (L{TCPRoute._look}), and one of these is made only for a
    client whose header is not whole by then, or that is to be closed
    (a refused header, a failed read, its EOF, the router stopping).
    """

    __slots__ = ("route", "gate", "sock", "fd", "address", "local", "accepter", "buffer", "timeout", "registered")

    def __init__(self, route: TCPRoute, gate: ProxyGate, sock: _socket.socket, address: tuple[Any, ...],
                 local: tuple[str, int] | None = None, accepter: _DirectAccept | None = None):
        self.route = route
        self.accepter = accepter  # its port's accept loop: paused should there be no descriptor for its backend
        self.gate = gate
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.local = local  # the listener's bound address (accept_socket)
        self.buffer = b""
        self.registered = False  # waiting: a reader of the reactor's, and in the gate's deadlines
        self.timeout = gate.setting.header_timeout

    def start(self, first: bytes | None) -> None:
        """
        Take over from the first look (L{TCPRoute._look}), which read
        C{first} (L{None}: nothing yet, or nothing asked as the router
        stops) and found no whole header in it: closed if the router stops,
        the client is gone or the header is refused, else waited for.
        header_timeout counts from here (a round later than the accept),
        and the gate's deadlines close it at stop.
        """
        if self.gate.closed:
            self.refuse("portrouter is stopping", abort=True)  # accepted in the round its listener stopped
            return
        if first is not None:
            self.came(first)
        if self.fd >= 0:
            self.registered = True
            self.gate.reading.add(self, self.timeout)
            self.route.reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "portrouter"

    def doRead(self) -> None:
        try:
            data = self.sock.recv(READ_AHEAD)
        except BlockingIOError:
            return
        except OSError as e:
            self.failed(e)
            return
        self.came(data)

    def failed(self, error: OSError) -> None:
        """Reading the client failed (a reset, say)."""
        self._closed(f"{error.strerror} before its PROXY header was whole ({len(self.buffer)} bytes came)")

    def came(self, data: bytes) -> None:
        """Read from the client: C{data}, or its EOF (empty)."""
        if not data:
            self._closed(f"closed by the client before its PROXY header was whole ({len(self.buffer)} bytes came)")
            return
        found = header_so_far(self, data)
        if found is not None:
            self._done()
            self.route.accept_socket(self.sock, self.address, self.local, found, self.buffer[found.size:])

    def connectionLost(self, reason: Failure) -> None:
        self._closed(f"closed before its PROXY header was whole ({len(self.buffer)} bytes came)")

    def timed_out(self, timeout: float) -> None:
        """Told by the gate's deadlines: C{timeout} seconds passed since the accept."""
        self.refuse(f"no whole PROXY header within {timeout:g} s ({len(self.buffer)} bytes came)", abort=True)

    def refuse(self, why: str, abort: bool = False) -> None:
        """As L{FirstBytes.refuse}: one line in the log, and closed (C{abort}: with a reset)."""
        self.gate.refused += 1
        if abort:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self._closed(why)

    def abandon(self) -> None:
        """Closed after an error of ours (logged by the caller), wherever it was."""
        self._done()
        self.sock.close()

    def _closed(self, why: str) -> None:
        log.info("proxy protocol {peer}: {why}; closed", peer=show_address(self.address), why=why)
        self._done()
        self.sock.close()

    def _done(self) -> None:
        if self.registered:
            self.registered = False
            self.gate.reading.remove(self, self.timeout)
            self.route.reactor.removeReader(self)
        self.fd = -1


class TCPRoute(Factory):
    """The listening side of one project's TCP route."""

    noisy = False

    def __init__(self, reactor: IReactor, project: Project, sessions: Sessions, services: Services | None = None):
        self.reactor = reactor
        self.sessions = sessions
        self.services = services
        self.deadlines = ConnectDeadlines(reactor)  # the direct path's connect timeouts
        self.arrived: list[_Arrived] = []  # trusted clients accepted this turn (look_later)
        self.update(project)

    def look_later(self, gate: ProxyGate, sock: _socket.socket, address: tuple[Any, ...],
                   accepter: _DirectAccept | None = None) -> None:
        """
        Look for the PROXY header of a trusted client (C{sock}, from
        C{address}, through C{gate}; C{accepter}: its port's accept loop)
        once the reactor has done the rest of its turn. A balancer sends the
        header when its connect completes, about when the connection is
        accepted here: looked for at once, it was missing every other time,
        and each miss cost a failed read and a reader added and removed;
        after the turn it is missing about one time in four.
        """
        if not self.arrived:
            after_round(self.reactor, self._look)
        self.arrived.append((gate, sock, address, accepter))

    def _look(self) -> None:
        """
        The first look at the trusted clients accepted in the round. Most
        sent their whole header and their first bytes by now: read here, in
        one call, and relayed. Every call a connection makes on the way is
        about 0.2% of it, and this path is what receiving the PROXY protocol
        costs (bench/README). Only the others wait, each with a
        L{_HeaderWait}: a header not whole yet, refused, or a client gone.
        """
        arrived, self.arrived = self.arrived, []
        for gate, sock, address, accepter in arrived:
            local = None if accepter is None else accepter.local
            wait = None
            try:
                data = None
                if not gate.closed:
                    try:
                        data = sock.recv(READ_AHEAD)
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        wait = _HeaderWait(self, gate, sock, address, local, accepter)
                        wait.failed(e)
                        continue
                found = None
                if data:
                    try:
                        found = read_header(data)
                    except HeaderRefused:
                        pass  # the wait refuses it, and says why
                if found is None or data is None:
                    wait = _HeaderWait(self, gate, sock, address, local, accepter)
                    wait.start(data)
                    continue
                self.accept_socket(sock, address, local, found, data[found.size:])
            except Exception as e:
                # This client is closed, and the others of the round still go on.
                if wait is not None:
                    wait.abandon()
                else:
                    sock.close()  # a relay that was made closed it already: closing twice does nothing
                if not (isinstance(e, OSError) and e.errno in _EXHAUSTED):
                    log.failure("tcp {project}: a trusted client's first look failed", project=self.name)
                elif accepter is not None:
                    accepter.ran_out(e)  # counted, and its port paused, as for a direct client
                else:
                    log.warn("tcp {project} {peer}: closed, no descriptor for its backend connection",
                             project=self.name, peer=show_address(address))

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
        route.deadlines = ConnectDeadlines(reactor)
        route.arrived = []
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
        self.sample = Sample(project.access_log)  # which connections get a line in the log

    def accept_socket(self, sock: _socket.socket, address: tuple[Any, ...], local: tuple[str, int] | None = None,
                      found: Found | None = None, early: bytes = b"") -> None:
        """
        The direct path (L{accept_directly}): a plain TCP client to a plain TCP
        backend given by IP address. No Twisted transport is made for
        either side; the relay connects the backend and splices. C{local} is
        the listener's bound address, when it is one (L{bound_address}),
        which a header sent on names as the client's destination (else the
        socket is asked). Behind a PROXY header (L{look_later}), C{found} is
        that header, whose source is the client (L{None}: the proxy's own)
        and whose destination a header sent on names instead (or whose
        bytes it is: L{Found.as_sent}); C{early} is what the client sent
        after it.
        """
        name = self.name
        limits = self.limits
        source = found.source if found is not None else None
        host, port = source or (address[0], address[1])
        peer = show_address((host, port))
        if limits.max_connections is not None and self.sessions.full("tcp", name, limits.max_connections, peer):
            sock.close()  # accepted and closed at once: clients never hang
            return
        family, target = self.direct  # type: ignore[misc]
        backend = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # no ioctl to make it so
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = self.sessions.open("tcp", name, peer, limits.idle_timeout, sample=self.sample)
        relay = SpliceRelay(self.reactor, session, sock, backend)
        relay.on_connect_failure = self.connect_failed
        session.bytes_in += len(early)  # the client's, after its header
        relay.heard = bool(early)
        send_proxy = self.send_proxy
        if send_proxy is not None:
            sent = found.as_sent if found is not None and send_proxy == "v2" else None
            if sent is None:
                to = found.destination if found is not None else None
                sent = header(send_proxy, (host, port), to or local or sock.getsockname()[:2])
            early = sent + early
        relay.early = early
        relay.connect(target, limits.connect_timeout, self.deadlines)

    def connect_failed(self, why: str) -> None:
        """A direct relay's backend could not be reached: counted for the metrics."""
        self.sessions.stats.connect_failed(self.name, why)

    # A listening port always passes the peer's address.
    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        return _Inbound(self, addr)

    def inbound(self, addr: IAddress, early: bytes) -> Protocol:
        """A connection whose first bytes (C{early}) were read to choose this route."""
        return _Inbound(self, addr, early)

    def guarded(self, addr: IAddress) -> Protocol:
        """An untrusted client of a listener that receives the PROXY protocol (L{_Guarded})."""
        return _Guarded(self, addr)
