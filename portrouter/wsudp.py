"""
UDP service ports (SPEC section 11): ``/stream/.../udpproxy?app=<service>``.

One WebSocket is one UDP session to the service, through a connected UDP
socket of its own, so a reply can only have come from the service. Each
BINARY message is one datagram and each datagram one BINARY message:
boundaries kept, nothing coalesced or split. A message over 65,507 bytes
(the most an IPv4 datagram carries) closes with 1009, a TEXT message with
1003, and ``udp_timeout`` without a datagram either way ends the session
with 1000 (one timer, moved only when it fires).

A datagram relay cannot block, so it drops, as a UDP link does, and
counts: datagrams from the service while more than the client transport's
buffer (64 KiB) waits for a client that does not read; datagrams to the
service the kernel will not take; and, while the service starts, past
L{EARLY_BYTES} held. So a session holds at most about 200 KiB however
either side behaves.
"""

from __future__ import annotations

import errno
import ipaddress
from socket import SO_ERROR, SOL_SOCKET
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet import defer, udp
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from portrouter.interfaces import IReactor
from portrouter.proxyheader import header_for
from portrouter.relay import Backlog
from portrouter.sessions import Sessions, peer_of
from portrouter.web import write_now
from portrouter.ws import NORMAL, TRY_AGAIN, Bridge, BridgeFactory, Target, frame_header

log = Logger(namespace="portrouter.ws")

MAX_PAYLOAD = 65507
EARLY_BYTES = 65536  # held for the service while it starts; past that, datagrams are dropped


class _ServiceSocket(DatagramProtocol):
    """The session's connected UDP socket towards the service."""

    def __init__(self, bridge: DatagramBridge):
        self.bridge: DatagramBridge | None = bridge

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        bridge = self.bridge
        if bridge is not None:
            bridge.from_service(datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable: nothing listens there now. UDP promises
        # nothing, so the session goes on; the log line tells why it was quiet.
        bridge = self.bridge
        if bridge is not None:
            bridge.refusals += 1


class _ServicePort(udp.Port):
    """
    The session's connected UDP socket. The epoll reactor reports an ICMP
    error (port unreachable: the service closed its socket, as iperf3 does
    between tests) as a lost connection, and Twisted's port would stop for
    good; on a UDP link it is one lost datagram, so the error is cleared
    (and counted) and reading goes on. A stop asked for (no reason) stops.
    """

    def connectionLost(self, reason: Any = None) -> None:
        protocol = self.protocol
        if reason is not None and isinstance(protocol, _ServiceSocket) and protocol.bridge is not None:
            try:
                # Not required to be non-zero: a send in the same turn may have taken the error.
                error = self.socket.getsockopt(SOL_SOCKET, SO_ERROR)
            except OSError:
                pass
            else:
                if error == errno.ECONNREFUSED:
                    protocol.connectionRefused()
                self.startReading()  # type: ignore[no-untyped-call]
                return
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class DatagramBridge(Bridge):
    """One WebSocket bridged to one UDP session; Autobahn assembles each message."""

    socket: _ServiceSocket | None = None
    port: Any = None  # the listening side of the connected socket, closed with the session
    early_datagrams: list[bytes] | None = None
    dropped = 0
    refusals = 0
    prefix = b""
    to_client: Backlog

    # Whole messages, as Autobahn assembles them (the TCP bridge streams frame data instead).
    onMessageFrameData = WebSocketServerProtocol.onMessageFrameData
    onMessageFrameEnd = WebSocketServerProtocol.onMessageFrameEnd
    onMessageEnd = WebSocketServerProtocol.onMessageEnd

    def onOpen(self) -> None:
        target = self.target
        name = f"{target.project}/{target.service}"
        peer = peer_of(self.transport.getPeer())
        if self.sessions.full("udp", name, target.limits.max_connections, peer):
            self.ended = True
            self.sendCloseFrame(TRY_AGAIN, b"too many connections (max_connections)", isReply=False)
            return
        # udp_timeout is the session's idle timer: one per session, moved when it fires.
        self.session = self.sessions.open("udp", name, peer, target.limits.udp_timeout, self.transport)
        self.session._closer = lambda: self._close(NORMAL, self.session.reason or "closed by portrouter")
        self.to_client = Backlog()
        self.transport.registerProducer(self.to_client, True)
        self.early_datagrams = []
        d = defer.Deferred.fromCoroutine(self._open_socket())
        d.addErrback(self._failed)

    async def _open_socket(self) -> None:
        target = self.target
        assert target.address is not None
        if not await self._started():
            return
        host, port = target.address
        reactor: IReactor = self.factory.reactor
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(await reactor.resolve(host))  # IPv4: Twisted's resolver
        if self.ended:
            return
        socket = _ServiceSocket(self)
        try:
            self.port = _ServicePort(0, socket, interface="::" if ip.version == 6 else "",
                                     maxPacketSize=MAX_PAYLOAD + 1, reactor=reactor)  # type: ignore[no-untyped-call]
            self.port.startListening()
            self.port.connect(str(ip), port)
        except Exception as e:
            self._close(TRY_AGAIN, f"cannot open a UDP socket to the service: {e}")
            return
        self.socket = socket
        if target.send_proxy is not None:
            self.prefix = header_for("v2", self.transport, "udp")
        for datagram in self.early_datagrams or ():
            self._to_service(datagram)
        self.early_datagrams = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.dropping or self.failedByMe:
            return
        session = self.session
        session.bytes_in += len(payload)
        session.last = self.factory.reactor.seconds()
        if self.socket is not None:
            self._to_service(payload)
        elif self.early_datagrams is not None and self.early_size + len(payload) <= EARLY_BYTES:
            self.early_datagrams.append(payload)
            self.early_size += len(payload)
        else:
            self.dropped += 1

    def _to_service(self, datagram: bytes) -> None:
        try:
            # Connected: to the service. With send_proxy, each datagram after its v2 header.
            self.port.write(self.prefix + datagram if self.prefix else datagram, None)
        except (OSError, MessageLengthError):
            self.dropped += 1  # the kernel's buffer is full (EAGAIN, ENOBUFS): a link would drop it too

    def from_service(self, datagram: bytes) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self.to_client.full:
            self.dropped += 1
            return
        session = self.session
        session.bytes_out += len(datagram)
        session.last = self.factory.reactor.seconds()
        # One whole frame per write, as the TCP bridge writes them.
        write_now(self.transport, frame_header(len(datagram)) + datagram)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        socket, self.socket = self.socket, None
        if socket is not None:
            socket.bridge = None
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()
        self.early_datagrams = None
        session = getattr(self, "session", None)
        if session is not None and (self.dropped or self.refusals):
            log.info("udp {project} {peer}: {dropped} datagrams dropped, {refusals} refused by the service "
                     "(nothing listening)", project=session.project, peer=session.peer,
                     dropped=self.dropped, refusals=self.refusals)
        if session is not None:
            self.sessions.stats.datagrams_dropped[session.project] += self.dropped
        super().onClose(wasClean, code, reason)


class DatagramBridgeFactory(BridgeFactory):
    """Builds L{DatagramBridge}s: one for all UDP service ports."""

    protocol = DatagramBridge

    def __init__(self, reactor: IReactor, sessions: Sessions, target: Target | None = None):
        super().__init__(reactor, sessions, target)
        # Autobahn closes with 1009 for a message past this, before reading it all.
        self.setProtocolOptions(maxMessagePayloadSize=MAX_PAYLOAD)  # type: ignore[no-untyped-call]
