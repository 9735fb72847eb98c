"""
WebSocket-to-TCP bridges: for service ports (``/stream/.../tcpproxy?app=...``
on the ingress, authenticated: L{portrouter.stream}) and ``ws`` routes (a port
of their own, any path, no credentials: a websockify replacement).

One WebSocket is one TCP connection. BINARY messages carry the bytes, frame
data is passed on as it arrives (a message is never assembled in memory), and
each side's transport is the other's producer, so a slow reader on either
side stops reading on the other; a client that does not read what its own
frames make portrouter answer (pongs) is not read either. The service
closing ends the WebSocket with 1000 after everything before it was sent;
the client closing closes the TCP connection after what is pending was
written, or aborts it when the service takes none of it for 5 s. A frame
that breaks RFC 6455 gets a 1002 close frame, then a FIN.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.xormasker import create_xor_masker
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolNegotiationFactory, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.certs import HTTP_PROTOCOLS, openssl_reasons
from portrouter.model import Limits, Project
from portrouter.interfaces import IConnection, IReactor
from portrouter.proxyheader import header_for
from portrouter.relay import FLUSH_TIMEOUT, HoldWhileFull, Holds, close_soon, half_close, unsent
from portrouter.services import Services, Supervisor
from portrouter.sessions import Sample, Session, Sessions, connect_failure, peer_of
from portrouter.web import reason_for, write_now

log = Logger(namespace="portrouter.ws")

# Close codes (RFC 6455 section 7.4.1, and the IANA registry).
NORMAL = 1000
UNSUPPORTED = 1003
INTERNAL = 1011
TRY_AGAIN = 1013
# Client-to-service bytes held while the service connection is being made;
# past this the WebSocket is not read until the service is there.
EARLY_LIMIT = 1 << 20


@implementer(IHalfCloseableProtocol)
class _Service(Protocol):
    """The TCP side of a bridge."""

    transport: IConnection  # set by makeConnection, before any other event

    bridge: Bridge | None = None
    closing: Any = None  # the timer of end(), until the service closes

    def dataReceived(self, data: bytes) -> None:
        bridge = self.bridge
        if bridge is not None and bridge.state == WebSocketServerProtocol.STATE_OPEN:
            session = bridge.session
            session.bytes_out += len(data)
            session.last = bridge.factory.reactor.seconds()
            # One whole frame per write, past Autobahn's per-message work: it
            # goes to the socket now or, whole, into Twisted's buffer, ahead
            # of anything Autobahn writes later, so frames never interleave.
            write_now(bridge.transport, frame_header(len(data)) + data)

    def readConnectionLost(self) -> None:
        # WebSocket has no half-close: the service is done talking, so the
        # WebSocket ends (after the frames already queued).
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if self.closing is not None and self.closing.active():
            self.closing.cancel()
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            bridge.service_closed()

    def end(self, reactor: IReactor) -> None:
        """
        The bridge is done with the service: what it was sent goes out, then
        a FIN, and what it still sends is read and dropped until it closes.
        Closing a socket with bytes unread makes the kernel answer RST, which
        throws away what is still queued for the service (the end of what the
        client sent). One that has not closed after FLUSH_TIMEOUT is closed then.
        """
        self.bridge = None
        half_close(self.transport)
        self.closing = reactor.callLater(FLUSH_TIMEOUT, close_soon, self.transport, reactor)

# Why the client is not being read (L{Bridge.holds}: bits of a relay.Holds).
HELD_SERVICE = 1  # the service is not taking what the client sent
HELD_EARLY = 2  # EARLY_LIMIT bytes wait for the service connection
HELD_OUTPUT = 4  # the client does not read what its frames made portrouter answer (pongs)


@implementer(IPushProducer)
class _ToClient:
    """
    The client transport's producer: Twisted pauses it when more than its
    buffer size (64 KiB) is queued for the client and resumes it once that
    is written. Paused, it stops reading the service; and Autobahn's own
    answers (pongs) written meanwhile stop reading the client
    (L{Bridge.sendData}), so a client that pings and never reads makes
    portrouter hold at most one read's worth of pongs more.
    """

    __slots__ = ("bridge", "full")

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.full = False

    def pauseProducing(self) -> None:
        self.full = True
        service = self.bridge.service
        if service is not None:
            service.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.full = False
        bridge = self.bridge
        service = bridge.service
        if service is not None:
            service.transport.resumeProducing()
        bridge.holds.release(HELD_OUTPUT)

    def stopProducing(self) -> None:
        pass  # the client is gone: Bridge.onClose ends the service connection


def frame_header(length: int) -> bytes:
    """A final, unmasked BINARY frame's header (RFC 6455 5.2): server to client."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


class _ServiceFactory(Factory):
    noisy = False
    protocol = _Service


class Target:
    """
    Where a bridge goes: the service's endpoint (a UDP service: its
    C{address}), for whom, with which limits.
    """

    __slots__ = ("project", "service", "endpoint", "limits", "supervisor", "address", "send_proxy", "sample")

    def __init__(
        self, project: str, service: str | None, endpoint: IStreamClientEndpoint | None, limits: Limits,
        supervisor: Supervisor | None = None, address: tuple[str, int] | None = None,
        send_proxy: str | None = None, sample: Sample | None = None,
    ):
        self.project = project
        self.service = service
        self.endpoint = endpoint
        self.limits = limits
        self.supervisor = supervisor  # starts the service on demand, if it has a command
        self.address = address
        self.send_proxy = send_proxy  # "v1", "v2": a PROXY header to the service first
        self.sample = sample  # which bridges get a line in the log (the route's access_log)


class Bridge(WebSocketServerProtocol):
    """One WebSocket bridged to one TCP connection."""

    transport: IConnection  # set by makeConnection, before any other event

    target: Target
    sessions: Sessions
    session: Session
    service: _Service | None = None
    early: list[bytes] | None = None
    early_size = 0
    dropping = False
    ended = False
    output: _ToClient | None = None
    close_left: int | None = None  # unsent bytes when the close handshake's timer last looked
    failed = False  # failed for a protocol error: what the client sends is dropped
    holds: Holds  # why the client is not read (HELD_*): made with the connection

    def connectionMade(self) -> None:
        self.holds = Holds(self.transport)
        super().connectionMade()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if isinstance(reason.value, SSL.Error):
            # A failed handshake is said once already, as OpenSSL put it, by
            # the TLS transport (certs); later, the session's line says the
            # client went (1006), as a tcp route's says it closed. Autobahn
            # would log it again, at error level, as "SSL error: http
            # request (in )" for every client that spoke no TLS.
            reason = Failure(ConnectionLost(f"TLS: {openssl_reasons(reason.value)}"))
        super().connectionLost(reason)

    def onConnect(self, request: Any) -> str | None:
        # noVNC and websockify speak the "binary" subprotocol.
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:
        target = self.target
        name = target.project if target.service is None else f"{target.project}/{target.service}"
        peer = peer_of(self.transport.getPeer())
        if self.sessions.full("ws", name, target.limits.max_connections, peer):
            self.ended = True
            self.sendCloseFrame(TRY_AGAIN, b"too many connections (max_connections)", isReply=False)
            return
        self.session = self.sessions.open("ws", name, peer, target.limits.idle_timeout, self.transport, target.sample)
        self.session._closer = lambda: self._close(NORMAL, "closed by portrouter")
        self.output = _ToClient(self)
        self.transport.registerProducer(self.output, True)
        self.early = []
        d = defer.Deferred.fromCoroutine(self._connect())
        d.addErrback(self._failed)

    async def _started(self) -> bool:
        """The service started on demand, if it has a command; else closed with 1011 and why."""
        supervisor = self.target.supervisor
        if supervisor is not None:
            supervisor.acquire()
            self.session.supervisor = supervisor
            try:
                await supervisor.ensure()
            except Exception as e:
                self._close(INTERNAL, str(e))
                return False
        return True

    async def _connect(self) -> None:
        target = self.target
        if not await self._started():
            return
        timeout = target.limits.connect_timeout
        assert target.endpoint is not None  # a stream service's target has one
        d = target.endpoint.connect(_ServiceFactory())
        try:
            service = cast(_Service, await d.addTimeout(timeout, self.factory.reactor))  # _ServiceFactory's
        except Exception as e:
            why = connect_failure(Failure(e), timeout)
            self.sessions.stats.connect_failed(target.project, why)
            self._close(TRY_AGAIN, why)
            return
        if self.ended:
            service.transport.loseConnection()
            return
        self.service = service
        service.bridge = self
        if target.send_proxy is not None:
            service.transport.write(header_for(target.send_proxy, self.transport))
        for data in self.early or ():
            service.transport.write(data)
        self.early = None
        if self.output is not None and self.output.full:
            service.transport.pauseProducing()
        # A full buffer towards the service stops reading the client.
        service.transport.registerProducer(HoldWhileFull(self.holds, HELD_SERVICE), True)
        self.holds.release(HELD_EARLY)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own frames (pongs, closes) and handshake answers, never
        # the service's data: past the client's buffer, the client is not
        # read until it reads, or a ping flood would queue pongs for good.
        super().sendData(data, sync, chopsize)
        output = self.output
        if output is not None and output.full:
            self.holds.hold(HELD_OUTPUT)

    def _failed(self, reason: Failure) -> None:
        log.failure("bridge {project}", reason, project=self.target.project)
        self._close(INTERNAL, "internal error")

    def _close(self, code: int, reason: str) -> None:
        if self.session.reason is None:
            self.session.reason = reason
        if code != NORMAL:
            log.info("ws {project} {peer}: closing with {code}: {reason}", project=self.session.project,
                     peer=self.session.peer, code=code, reason=reason)
        # sendClose() lets applications use only 1000 and 3000-4999; a proxy
        # speaks for the protocol (1003, 1011, 1013), so send the frame itself.
        # A close reason must fit a control frame (125 bytes, 2 for the code).
        self.sendCloseFrame(code, reason.encode("utf-8")[:123], isReply=False)

    # -- client to service, frame data as it arrives ------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if not isBinary and not self.failedByMe:
            self.dropping = True
            self._close(UNSUPPORTED, "only binary messages are carried")

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)  # enforces the size limits, if set

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.dropping or self.failedByMe:
            return
        session = self.session
        session.bytes_in += len(payload)
        session.last = self.factory.reactor.seconds()
        service = self.service
        if service is not None:
            # At once, as the fast path does: a frame Autobahn fails next
            # (and drops the connection for) must not overtake these bytes.
            write_now(service.transport, payload)
        elif self.early is not None:
            self.early.append(payload)
            self.early_size += len(payload)
            if self.early_size > EARLY_LIMIT:
                self.holds.hold(HELD_EARLY)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        pass

    # -- the fast path for data frames ----------------------------------------------------

    fast_head = b""  # a data frame's header, as far as it has arrived
    fast_left = 0  # payload still to come of the data frame being passed on
    fast_masker: Any = None

    def dataReceived(self, data: bytes) -> None:
        """
        Unfragmented, masked BINARY frames in the open state are parsed here
        and their payload, unmasked with Autobahn's own (NVX) masker, goes
        straight to the service. Autobahn keeps everything else: the
        handshake, control frames, TEXT, fragments, and any frame at all while
        its own parser is not between frames. Control passes at frame
        boundaries only, so its parser always starts on a frame.
        """
        if (self.fast_left or self.fast_head) or (
            self.state == WebSocketServerProtocol.STATE_OPEN and self.current_frame is None
            and not self.data and not self.inside_message and not self.dropping
            and self.service is not None
        ):
            self._fast(data)
        elif not self.failed:
            super().dataReceived(data)
            if self.state == WebSocketServerProtocol.STATE_CONNECTING:
                # Autobahn keeps a handshake until its blank line, however long.
                limit = self.target.limits.max_header_size
                if len(self.data) > limit:
                    self.failHandshake(f"request head over {limit} bytes", 431)

    def _fast(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.fast_left:
                take = min(self.fast_left, end - pos)
                chunk = data[pos:pos + take] if (pos or take < end) else data
                pos += take
                self.fast_left -= take
                self._deliver(self.fast_masker.process(chunk))
                continue
            head = self.fast_head + data[pos:pos + 14]
            if len(head) < 2:
                self.fast_head = head
                return
            first, second = head[0], head[1]
            if first != 0x82 or not second & 0x80:
                # Not a final, masked BINARY frame with no RSV bits: Autobahn's.
                rest = self.fast_head + data[pos:]
                self.fast_head = b""
                super().dataReceived(rest)
                return
            length = second & 0x7F
            size = 6 if length < 126 else (8 if length == 126 else 14)
            if len(head) < size:
                self.fast_head = head
                return
            if length == 126:
                length = struct.unpack_from("!H", head, 2)[0]
                valid = length >= 126
            elif length == 127:
                length = struct.unpack_from("!Q", head, 2)[0]
                valid = 65536 <= length < 1 << 63
            else:
                valid = True
            if not valid:
                # A length not in its shortest form, or too large: Autobahn
                # fails the connection for it, as for any other frame.
                rest = self.fast_head + data[pos:]
                self.fast_head = b""
                super().dataReceived(rest)
                return
            pos += size - len(self.fast_head)
            self.fast_head = b""
            self.fast_left = length
            self.fast_masker = create_xor_masker(head[size - 4:size], length) if length else None

    def _deliver(self, payload: bytes) -> None:
        session = self.session
        session.bytes_in += len(payload)
        session.last = self.factory.reactor.seconds()
        service = self.service
        if service is not None:
            write_now(service.transport, payload)

    # -- refusals and endings ----------------------------------------------------------

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        """A failed handshake: a short plain-text answer (Autobahn's has its reason as status text, no body)."""
        if code == 426:
            body = "This port takes WebSocket connections only (Upgrade: websocket).\n"
            responseHeaders = [("Upgrade", "websocket"), *(responseHeaders or ())]
        else:
            body = f"Bad WebSocket handshake: {reason}\n"
        encoded = body.encode("utf-8")
        status = reason_for(code).decode()
        head = [f"HTTP/1.1 {code} {status}",
                "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(encoded)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in responseHeaders or ()]
        self.sendData("\r\n".join(head).encode("latin-1", "replace") + b"\r\n\r\n" + encoded)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        # RFC 6455 7.1.7: after failing the connection, process nothing more
        # from the client. The close frame (1002, 1007...) goes out, then a
        # FIN; what the client sends until it closes is read and dropped, so
        # that closing does not reset the connection (unread bytes would).
        # Autobahn's close handshake timeout ends a client that never closes.
        opened = self.state == WebSocketServerProtocol.STATE_OPEN
        super()._fail_connection(code, reason)
        if opened and self.state == WebSocketServerProtocol.STATE_CLOSING:
            self.failed = True
            self.holds.release(HELD_SERVICE | HELD_EARLY | HELD_OUTPUT)
            half_close(self.transport)
            service, self.service = self.service, None
            if service is not None:  # it gets nothing more: what it had is flushed, then it ends
                service.end(self.factory.reactor)

    def onCloseHandshakeTimeout(self) -> None:
        # Autobahn counts from the moment it queues its close frame, but the
        # frame leaves behind whatever data is still queued for the client:
        # a client still taking that data is slow, not gone, and the abort
        # that ends the wait throws away what it has not read (the end of
        # what the service sent). So the timer starts again while the queue
        # shrinks, and once more, whole, when it is empty; a client that
        # takes nothing for a whole timeout is dropped as before.
        left, last = unsent(self.transport), self.close_left
        if left is not None and ((left and (last is None or left < last)) or (not left and last)):
            self.close_left = left
            self.closeHandshakeTimeoutCall = self.factory.reactor.callLater(
                self.factory.closeHandshakeTimeout, self.onCloseHandshakeTimeout)
            return
        super().onCloseHandshakeTimeout()

    def _closeConnection(self, abort: bool = False) -> None:
        # Autobahn aborts (a TCP reset) even after a clean closing handshake,
        # which a client then sees as an error: close with a FIN then, and
        # abort only what timed out or broke.
        if abort and not self.wasClean:
            self.transport.abortConnection()
        else:
            close_soon(self.transport, self.factory.reactor)

    def service_closed(self) -> None:
        """The service closed: end the WebSocket once the queued frames are out."""
        self.service = None
        if self.session.reason is None:
            self.session.reason = "service closed"
        # The client is read again (for its close reply); what it sends now is dropped.
        self.holds.release(HELD_SERVICE | HELD_EARLY)
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendClose(NORMAL)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.ended = True
        service, self.service = self.service, None
        if service is not None:
            # What the client sent is written before the connection closes,
            # unless the service does not take it in time.
            service.end(self.factory.reactor)
        session = getattr(self, "session", None)
        if session is not None:
            if session.reason is None:
                session.reason = f"client closed ({code})" if code else "client went away"
            session.ended(session.reason)


@implementer(IProtocolNegotiationFactory)
class BridgeFactory(WebSocketServerFactory):
    """Builds L{Bridge}s; one per ``ws`` route, one for all service ports."""

    protocol = Bridge
    noisy = False

    def acceptableProtocols(self) -> list[bytes]:
        """The opening handshake is HTTP/1.1: what ALPN may choose behind TLS."""
        return list(HTTP_PROTOCOLS)

    def __init__(self, reactor: IReactor, sessions: Sessions, target: Target | None = None):
        # No Server header: Autobahn's names itself and its version.
        super().__init__(server=None, reactor=reactor)  # type: ignore[no-untyped-call]
        self.sessions = sessions
        self.target = target
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            utf8validateIncoming=False,  # binary only; a TEXT message is refused anyway
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            # A protocol error gets a 1002 close frame, not a TCP reset.
            failByDrop=False,
            # A plain GET gets a 426, not Autobahn's HTML page (nor its ?redirect=).
            webStatus=False,
        )

    def bridge(self, target: Target, addr: Any) -> Bridge:
        proto: Bridge = self.buildProtocol(addr)
        proto.target = target
        proto.sessions = self.sessions
        return proto

    def buildProtocol(self, addr: Any) -> Bridge:
        proto = cast(Bridge, super().buildProtocol(addr))  # self.protocol is Bridge
        proto.sessions = self.sessions
        if self.target is not None:
            proto.target = self.target
        return proto


class WSRoute(BridgeFactory):
    """The listening side of a project's ``ws`` route: any path, no credentials."""

    def __init__(self, reactor: IReactor, project: Project, sessions: Sessions, services: Services | None = None):
        super().__init__(reactor, sessions)
        self.services = services
        self.update(project)

    def update(self, project: Project) -> None:
        assert project.backend is not None
        self.project = project
        self.target = Target(
            project.name, None, clientFromString(self.reactor, project.backend), project.limits,
            self.services.get(project) if self.services is not None else None, send_proxy=project.send_proxy,
            sample=Sample(project.access_log),
        )
