"""
``twistd portrouter-tunnel``: the client side of service ports. Each local
TCP connection accepted on ``--listen`` becomes one WebSocket to ``--url``,
with the relay rules of the server side: BINARY frames, backpressure both
ways, the local connection paused until the WebSocket is open (so nothing it
sends early is lost), and a clear log line when the server refuses.

With ``--listen udp:PORT[:interface=ADDR]`` and a ``udpproxy`` URL (SPEC
section 11), each local client address becomes one WebSocket, a UDP session:
each datagram one BINARY message each way, and each message from the server
sent from the tunnel's own UDP socket to that client. A datagram relay never
blocks, so where TCP would wait, it drops and counts (L{UDPTunnel}).
"""

from __future__ import annotations

import enum
import random
import socket
import struct
import sys
from collections import Counter, OrderedDict
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol, IUDPTransport
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.auth import sign_request
from portrouter.config import ConfigError, _udp_listen, check_server_strport
from portrouter.interfaces import IConnection, IReactor
from portrouter.model import Listen
from portrouter.relay import Backlog, close_soon, couple
from portrouter.sessions import peer_of, show_address
from portrouter.udp import DROP_REPORT, LISTEN_BUFFER, SWEEP
from portrouter.web import write_now

log = Logger(namespace="portrouter.tunnel")


class Options(usage.Options):
    synopsis = ("--listen STRPORT --url ws[s]://HOST/stream/.../tcpproxy?app=SERVICE [--token T | --access-key A --secret-key S]\n"
                "       --listen udp:PORT[:interface=ADDR] --url ws[s]://HOST/stream/.../udpproxy?app=SERVICE [...]")
    optParameters = [
        ["listen", "l", None, "Where local clients connect (strports, e.g. tcp:8022:interface=127.0.0.1), "
                              "or where they send datagrams (udp:5353:interface=127.0.0.1)."],
        ["url", "u", None, "The service port's WebSocket URL."],
        ["token", "t", None, "A bearer token."],
        ["token-file", None, None, "A file holding the bearer token (preferred over --token)."],
        ["access-key", None, None, "A Backend.AI access key (signs the request)."],
        ["secret-key", None, None, "The Backend.AI secret key for --access-key."],
        ["connect-timeout", None, 10.0, "Seconds to wait for the WebSocket to open.", float],
        ["udp-timeout", None, 60.0, "UDP: a client's session ends after this many seconds without a datagram "
                                    "either way (as the server's udp_timeout).", float],
        ["udp-max-sessions", None, 10000, "UDP: client addresses served at once; datagrams from new ones "
                                          "past it are dropped.", int],
    ]

    def postOptions(self) -> None:
        try:
            if not self["listen"]:
                raise ConfigError("--listen", "is required")
            # Twisted has no UDP strports: config parses ``udp:PORT[:interface=ADDR]`` for --udp routes.
            self["udp"] = _udp_listen(self["listen"], "--listen") if self["listen"].startswith("udp:") else None
            if self["udp"] is None:
                check_server_strport(self["listen"], "--listen", allow_zero=True)
            if not self["url"]:
                raise ConfigError("--url", "is required")
            url = urlsplit(self["url"])
            if url.scheme not in ("ws", "wss") or not url.hostname:
                raise ConfigError("--url", f"{self['url']!r} is not a ws:// or wss:// URL")
            if self["udp"] is not None:
                if not url.path.endswith("/udpproxy"):
                    raise ConfigError("--url", f"{self['url']!r} is not a udpproxy URL, which a udp: --listen needs "
                                               "(/stream/{kernel,session}/NAME/udpproxy?app=SERVICE)")
                if not self["udp-timeout"] > 0:
                    raise ConfigError("--udp-timeout", f"{self['udp-timeout']!r} is not a number of seconds above 0")
                if self["udp-max-sessions"] < 1:
                    raise ConfigError("--udp-max-sessions", f"{self['udp-max-sessions']!r} is not 1 or more")
            if self["token-file"]:
                try:
                    with open(self["token-file"], encoding="utf-8") as f:
                        self["token"] = f.read().strip()
                except OSError as e:
                    raise ConfigError("--token-file", f"cannot read {self['token-file']!r}: {e.strerror}") from None
            if bool(self["access-key"]) != bool(self["secret-key"]):
                raise ConfigError("--access-key", "needs --secret-key, and the other way round")
        except ConfigError as e:
            sys.stderr.write(f"{e}\n")
            raise SystemExit(1) from None


def headers_for(options: Any, url: str, now: Any = None) -> dict[str, str]:
    """The credentials for one WebSocket request."""
    if options.get("access-key"):
        return sign_request(
            "GET", url, options["access-key"], options["secret-key"],
            content_type="application/octet-stream", now=now,
        )
    if options.get("token"):
        return {"Authorization": f"Bearer {options['token']}"}
    return {}


# No writeConnectionLost: _Local never half-closes its own side, so Twisted never calls it.
@implementer(IHalfCloseableProtocol)
class _Local(Protocol):  # type: ignore[misc]
    """An accepted local connection, bridged to one WebSocket."""

    transport: IConnection  # set by makeConnection, before any other event

    ws: _Remote | None = None
    bytes_in = bytes_out = 0

    def __init__(self, tunnel: TunnelFactory, addr: Any):
        self.tunnel = tunnel
        self.peer = peer_of(addr)

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # until the WebSocket is open
        self.started = self.tunnel.reactor.seconds()
        d = defer.Deferred.fromCoroutine(self.tunnel.open(self))
        d.addErrback(self._refused)

    def _refused(self, reason: Failure) -> None:
        log.error("tunnel {peer}: cannot reach {url}: {why}", peer=self.peer,
                  url=self.tunnel.url, why=reason.getErrorMessage())
        self.transport.loseConnection()

    def opened(self, ws: _Remote) -> None:
        self.ws = ws
        couple(ws.transport, self.transport)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.ws is not None:
            self.bytes_out += len(data)
            self.ws.sendMessage(data, isBinary=True)  # type: ignore[no-untyped-call]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # WebSocket has no half-close

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.local = None
            if ws.state == WebSocketClientProtocol.STATE_OPEN:
                ws.transport.unregisterProducer()
                ws.sendClose(1000)
            log.info("tunnel {peer}: closed; {sent} bytes sent, {received} bytes received, {duration:.3f} s",
                     peer=self.peer, sent=self.bytes_out, received=self.bytes_in,
                     duration=self.tunnel.reactor.seconds() - self.started)


class _Remote(WebSocketClientProtocol):
    transport: IConnection  # set by makeConnection, before any other event
    local: _Local | None = None
    opened: defer.Deferred[_Remote]

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if not isBinary:
            self.sendCloseFrame(1003, b"only binary messages are carried", isReply=False)

    def onMessageFrameData(self, payload: bytes) -> None:
        local = self.local
        if local is not None:
            local.bytes_in += len(payload)
            local.transport.write(payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        pass

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(RuntimeError(reason or "the server closed the connection"))
            return
        local, self.local = self.local, None
        if local is not None:
            if code not in (1000, None):
                log.info("tunnel {peer}: the server closed with {code}: {reason}",
                         peer=local.peer, code=code, reason=reason)
            # Bounded: a local client that does not read must not keep it open for good.
            close_soon(local.transport, self.factory.reactor)


W = TypeVar("W", bound=WebSocketClientProtocol)


class ServicePort:
    """
    The service port of ``--url``: each call to L{connect} opens one
    WebSocket to it, with fresh credentials (a keypair signature carries its
    date).
    """

    def __init__(self, options: Any, reactor: IReactor):
        self.options = options
        self.reactor = reactor
        self.url: str = options["url"]
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname or "localhost"
        escaped = host.replace(":", "\\:")
        kind = "tls" if secure else "tcp"
        self.endpoint = clientFromString(reactor, f"{kind}:{escaped}:{port}")

    async def connect(self, protocol: type[W], **settings: Any) -> W:
        """A connected C{protocol}, its opening handshake under way; C{settings} are Autobahn's protocol options."""
        timeout = self.options["connect-timeout"]
        factory = WebSocketClientFactory(self.url, headers=headers_for(self.options, self.url), reactor=self.reactor)
        factory.protocol = protocol
        factory.noisy = False
        factory.setProtocolOptions(utf8validateIncoming=False, openHandshakeTimeout=timeout, **settings)
        d = self.endpoint.connect(factory)
        ws: W = await d.addTimeout(timeout, self.reactor)
        return ws


class TunnelFactory(Factory):
    noisy = False

    def __init__(self, options: Any, reactor: IReactor):
        self.options = options
        self.reactor = reactor
        self.service_port = ServicePort(options, reactor)
        self.url = self.service_port.url

    def buildProtocol(self, addr: Any) -> _Local:
        return _Local(self, addr)

    async def open(self, local: _Local) -> None:
        ws = await self.service_port.connect(_Remote)
        ws.opened = defer.Deferred()
        ws.local = local
        await ws.opened
        if local.transport is None or getattr(local.transport, "disconnected", False):
            ws.sendClose(1000)
            return
        local.opened(ws)


# -- UDP: one WebSocket per client address ----------------------------------------------------

# The most one BINARY message may carry to a udpproxy (the largest IPv4 UDP
# payload; SPEC 11): the server closes with 1009 past it, so a larger
# datagram (IPv6 carries them) is dropped here instead, and the session lives.
MAX_DATAGRAM = 65507
# Datagrams held for a session while its WebSocket opens: at most this many,
# and this many bytes; past either, dropped.
EARLY_DATAGRAMS = 64
EARLY_BYTES = 256 * 1024
# Up to this size a frame is masked in Python; past it, by Autobahn's native masker.
SMALL_FRAME = 1024
# Seconds a closing handshake may take. Autobahn's timers (txaio's batched
# timer) round the moment due down to a whole second, so its default of 1 s
# fires anywhere from at once to 1 s later: a server slow by a few
# milliseconds then sees its client abort, and logs 1006 instead of 1000.
CLOSE_TIMEOUT = 5.0


def client_frame(payload: bytes) -> bytes:
    """
    One final, masked BINARY frame (RFC 6455 5.2): a datagram, client to
    server, in one piece. The mask comes from C{random}, as Autobahn's own
    does: it protects intermediaries from a script choosing its bytes, and a
    tunnel's datagrams are not chosen by a script in a browser.
    """
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x82, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x82, 0xFF, n)
    mask = struct.pack("!I", random.getrandbits(32))
    if n > SMALL_FRAME:
        masked: bytes = create_xor_masker(mask, n).process(payload)
        return head + mask + masked
    # Small ones as one big integer: Autobahn's native masker costs 3 us to make, whatever the size.
    masks = (mask * (n // 4 + 1))[:n]
    return head + mask + (int.from_bytes(payload, "big") ^ int.from_bytes(masks, "big")).to_bytes(n, "big")


class Phase(enum.Enum):
    """Where a UDP session is in its life."""

    CONNECTING = "connecting"  # its WebSocket is opening: datagrams are held
    OPEN = "open"  # datagrams go as messages, both ways
    ENDED = "ended"  # out of the table, its line logged; a new datagram opens a new session


_NEXT = {Phase.CONNECTING: {Phase.OPEN, Phase.ENDED}, Phase.OPEN: {Phase.ENDED}, Phase.ENDED: set()}


class UDPSession:
    """One local client address, its WebSocket, and what went through it."""

    __slots__ = (
        "tunnel", "client", "started", "last", "phase", "ws", "backlog", "early", "early_size",
        "sent", "bytes_sent", "received", "bytes_received", "dropped",
    )

    def __init__(self, tunnel: UDPTunnel, client: tuple[str, int], now: float):
        self.tunnel = tunnel
        self.client = client
        self.started = self.last = now
        self.phase = Phase.CONNECTING
        self.ws: _Datagrams | None = None
        self.backlog = Backlog()
        self.early: list[bytes] = []
        self.early_size = 0
        self.sent = self.bytes_sent = 0  # towards the service
        self.received = self.bytes_received = 0  # from the service
        self.dropped = 0

    @property
    def peer(self) -> str:
        return show_address(self.client)

    def transition(self, to: Phase) -> None:
        assert to in _NEXT[self.phase], f"a UDP session cannot go from {self.phase.value} to {to.value}"
        self.phase = to

    def to_server(self, data: bytes) -> None:
        """A datagram from the client: sent, held while the WebSocket opens, or dropped."""
        if self.phase is Phase.OPEN:
            ws = self.ws
            assert ws is not None
            if self.backlog.full:
                self.tunnel.drop("while a WebSocket's send buffer was full", self)
            elif ws.state != WebSocketClientProtocol.STATE_OPEN:
                self.tunnel.drop("for a WebSocket that was closing", self)
            else:
                self.sent += 1
                self.bytes_sent += len(data)
                # Whole frames, each at once when nothing waits: never inside one of Autobahn's.
                write_now(ws.transport, client_frame(data))
        elif len(self.early) < EARLY_DATAGRAMS and self.early_size + len(data) <= EARLY_BYTES:
            self.early.append(data)
            self.early_size += len(data)
        else:
            self.tunnel.drop(f"while a WebSocket opened, past {EARLY_DATAGRAMS} datagrams or "
                             f"{EARLY_BYTES // 1024} KiB held", self)

    def opened(self, ws: _Datagrams) -> None:
        """The WebSocket is open: what was held goes first."""
        self.transition(Phase.OPEN)
        ws.transport.registerProducer(self.backlog, True)
        early, self.early, self.early_size = self.early, [], 0
        for data in early:
            self.to_server(data)

    def from_server(self, data: bytes) -> None:
        """A message from the server: one datagram to the client, from the tunnel's socket."""
        self.received += 1
        self.bytes_received += len(data)
        self.tunnel.touch(self)
        self.tunnel.reply(data, self)

    def end(self, why: str, trouble: bool = False) -> None:
        """Out of the table, the WebSocket closed (1000) if it is still open, and the session's line."""
        if self.phase is Phase.ENDED:
            return
        self.transition(Phase.ENDED)
        tunnel = self.tunnel
        tunnel.forget(self)
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.session = None
            if ws.state == WebSocketClientProtocol.STATE_OPEN:
                ws.sendClose(1000)
            elif ws.state == WebSocketClientProtocol.STATE_CONNECTING:
                ws.dropConnection(abort=True)
        early, self.early = self.early, []
        for _ in early:
            tunnel.drop("held for a WebSocket that never opened", self)
        (log.warn if trouble else log.info)(
            "udp tunnel {peer}: {why}; {sent} datagrams ({bytes_sent} bytes) sent, {received} datagrams "
            "({bytes_received} bytes) received, {dropped} dropped, {duration:.3f} s",
            peer=self.peer, why=why, sent=self.sent, bytes_sent=self.bytes_sent, received=self.received,
            bytes_received=self.bytes_received, dropped=self.dropped,
            duration=tunnel.reactor.seconds() - self.started,
        )


class _Datagrams(WebSocketClientProtocol):
    """The WebSocket of one UDP session."""

    transport: IConnection  # set by makeConnection, before any other event
    session: UDPSession | None = None
    partial = b""  # the start of a frame the fast path has not all of yet

    def dataReceived(self, data: bytes) -> None:
        """
        Whole, final, unmasked BINARY frames of up to L{MAX_DATAGRAM} bytes,
        in the open state, are parsed here and each payload goes to the
        client at once. Autobahn keeps everything else, from the frame on
        where it begins: the handshake, control frames, TEXT, fragments,
        larger frames (its limit closes with 1009), and every frame while its
        own parser is not between frames. So control passes at frame
        boundaries only, and its parser always starts on a frame.
        """
        session = self.session
        if self.partial:
            data, self.partial = self.partial + data, b""
        if (session is None or self.state != WebSocketClientProtocol.STATE_OPEN or self.data
                or self.current_frame is not None or self.inside_message):
            super().dataReceived(data)  # (what was partial began a frame: Autobahn starts on one)
            return
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < 2:
                self.partial = data[pos:]
                return
            first, length = data[pos], data[pos + 1]
            if first != 0x82 or length > 126:  # masked, or a 64-bit length: past MAX_DATAGRAM anyway
                break
            start = pos + 2
            if length == 126:
                if end - pos < 4:
                    self.partial = data[pos:]
                    return
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
                if length < 126 or length > MAX_DATAGRAM:  # not its shortest form, or too large
                    break
            if end - start < length:
                self.partial = data[pos:]
                return
            pos = start + length
            assert session is not None
            session.from_server(data[start:pos])
        if pos < end:
            super().dataReceived(data[pos:] if pos else data)

    def onOpen(self) -> None:
        session = self.session
        if session is not None:
            session.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        if not isBinary:
            self.sendCloseFrame(1003, b"only binary messages are carried", isReply=False)
            session.end("the server sent a TEXT message; closed with 1003", trouble=True)
            return
        session.from_server(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self.session = self.session, None
        if session is None:
            return  # the session ended first (expiry, the tunnel stopping) and said why
        if not self.wasClean:
            # Refused before the upgrade, unreachable, or cut: Autobahn's words say which.
            why = self.wasNotCleanReason or "the connection was lost"
            if session.phase is Phase.CONNECTING:
                why = f"cannot open {self.factory.url}: {why}"
            session.end(why, trouble=True)
        elif self.closedByMe:
            # Autobahn failed the connection (a message over MAX_DATAGRAM: 1009).
            said = (self.localCloseReason or b"").decode("utf-8", "replace")
            session.end(f"closed with {self.localCloseCode}" + (f": {said}" if said else ""), trouble=True)
        else:
            why = f"closed by the server with {code}" + (f": {reason}" if reason else "")
            session.end(why, trouble=code != 1000)


class UDPTunnel(DatagramProtocol):
    """
    The tunnel's UDP socket: one L{UDPSession} per client address, in an
    OrderedDict in last-activity order, so expiry (C{--udp-timeout} after
    the last datagram either way) looks only at the front, once a
    second, and a datagram costs only moving its session to the end; there
    is no timer per datagram or per session.

    Nothing here waits, so memory is bounded: a session holds at most
    L{EARLY_DATAGRAMS} or L{EARLY_BYTES} while its WebSocket opens, and
    Twisted holds at most its buffer size (64 KiB) plus one datagram for a
    WebSocket behind a full kernel buffer. Past those, past
    C{--udp-max-sessions}, over L{MAX_DATAGRAM}, or when the kernel will not
    send a reply, datagrams are dropped, counted in the session's line, and
    logged at most every L{DROP_REPORT} seconds.
    """

    noisy = False
    transport: IUDPTransport  # set by makeConnection, before any datagram

    def __init__(self, options: Any, reactor: IReactor, service_port: ServicePort | None = None):
        self.reactor = reactor
        self.service_port = service_port or ServicePort(options, reactor)
        self.timeout: float = options["udp-timeout"]
        self.limit: int = options["udp-max-sessions"]
        self.sessions: OrderedDict[tuple[str, int], UDPSession] = OrderedDict()
        self.drops: Counter[str] = Counter()  # since the last report, by why
        self.dropped = 0  # since start-up
        self._last_report = float("-inf")
        self._sweeper: Any = None
        self._sock: socket.socket | None = None

    def startProtocol(self) -> None:
        sock = self._sock = getattr(self.transport, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_BUFFER)
        self._sweeper = self.reactor.callLater(self._sweep_interval(), self._sweep)

    def stopProtocol(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self.close_all("the tunnel stopped")
        self._report(self.reactor.seconds(), force=True)

    def _sweep_interval(self) -> float:
        return min(SWEEP, self.timeout / 4)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        client: tuple[str, int] = addr
        session = self.sessions.get(client)
        if len(data) > MAX_DATAGRAM:
            self.drop(f"over {MAX_DATAGRAM:,} bytes", session)
            return
        now = self.reactor.seconds()
        if session is None:
            if len(self.sessions) >= self.limit:
                self.drop(f"from new clients while {self.limit} sessions were open (--udp-max-sessions)")
                return
            session = self.sessions[client] = UDPSession(self, client, now)
            d = defer.Deferred.fromCoroutine(self._open(session))
            d.addErrback(self._failed, session)
        else:
            session.last = now
            self.sessions.move_to_end(client)
        session.to_server(data)

    async def _open(self, session: UDPSession) -> None:
        try:
            ws = await self.service_port.connect(_Datagrams, maxMessagePayloadSize=MAX_DATAGRAM, failByDrop=False,
                                                 closeHandshakeTimeout=CLOSE_TIMEOUT,
                                                 serverConnectionDropTimeout=CLOSE_TIMEOUT)
        except Exception as e:
            session.end(f"cannot reach {self.service_port.url}: {e or type(e).__name__}", trouble=True)
            return
        if session.phase is Phase.ENDED:
            ws.dropConnection(abort=True)  # expired or stopped while connecting
            return
        ws.session = session
        session.ws = ws

    def _failed(self, reason: Failure, session: UDPSession) -> None:
        log.failure("udp tunnel {peer}", reason, peer=session.peer)
        session.end("internal error", trouble=True)

    def touch(self, session: UDPSession) -> None:
        """A datagram from the server: the session's idle time starts again."""
        session.last = self.reactor.seconds()
        if self.sessions.get(session.client) is session:
            self.sessions.move_to_end(session.client)

    def reply(self, data: bytes, session: UDPSession) -> None:
        try:
            if self._sock is not None:
                self._sock.sendto(data, session.client)  # skips Twisted's per-datagram address checks
            else:
                self.transport.write(data, session.client)
        except OSError:
            self.drop("to clients: the kernel would not send them", session)

    def drop(self, why: str, session: UDPSession | None = None) -> None:
        """One datagram dropped: counted, and reported at most every DROP_REPORT seconds."""
        self.dropped += 1
        self.drops[why] += 1
        if session is not None:
            session.dropped += 1
        self._report(self.reactor.seconds())

    def _report(self, now: float, force: bool = False) -> None:
        if not self.drops or not (force or now - self._last_report >= DROP_REPORT):
            return
        log.warn("udp tunnel: dropped {what}", what="; ".join(
            f"{count} datagram{'s' if count > 1 else ''} {why}" for why, count in self.drops.items()))
        self.drops.clear()
        self._last_report = now

    def forget(self, session: UDPSession) -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        while self.sessions:
            session = next(iter(self.sessions.values()))
            if now - session.last < self.timeout:
                break
            session.end(f"idle for {self.timeout:g} s")
        self._report(now)
        self._sweeper = self.reactor.callLater(self._sweep_interval(), self._sweep)

    def close_all(self, why: str) -> None:
        for session in list(self.sessions.values()):
            session.end(why)


def _cannot_listen(listen: str, e: Exception) -> SystemExit:
    # One line, on the real stderr (twistd has redirected sys.stderr).
    if sys.__stderr__ is not None:  # None only without any stderr at all
        sys.__stderr__.write(f"portrouter-tunnel: cannot listen on {listen!r}: {e}\n")
    return SystemExit(1)


class _TunnelService(StreamServerEndpointService):
    listen: str  # the strport, for the error message

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except Exception as e:
            raise _cannot_listen(self.listen, e) from None


class _UDPTunnelService(Service):
    """Binds the tunnel's UDP socket at start-up (a bind error stops twistd) and closes it, sessions first."""

    def __init__(self, listen: Listen, tunnel: UDPTunnel, reactor: IReactor):
        self.listen = listen
        self.tunnel = tunnel
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        try:
            # One byte more than MAX_DATAGRAM: a larger datagram is seen as such, and dropped.
            self.port = self.reactor.listenUDP(self.listen.port or 0, self.tunnel,
                                               interface=self.listen.interface or "",
                                               maxPacketSize=MAX_DATAGRAM + 1)
        except Exception as e:
            raise _cannot_listen(self.listen.endpoint, e) from None
        host = self.port.getHost()
        log.info("udp tunnel listening on {address}, to {url}",
                 address=show_address((host.host, host.port)), url=self.tunnel.service_port.url)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = cast(IReactor, default_reactor)  # the installed reactor has every facet
    udp: Listen | None = options.get("udp")
    if udp is not None:
        return _UDPTunnelService(udp, UDPTunnel(options, reactor), reactor)
    endpoint = serverFromString(reactor, options["listen"])
    service = _TunnelService(endpoint, TunnelFactory(options, reactor))  # type: ignore[no-untyped-call]
    service.listen = options["listen"]
    service._raiseSynchronously = True
    return service
