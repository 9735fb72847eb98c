"""
``twistd portrouter-tunnel``: the client side of service ports. Each local
TCP connection accepted on ``--listen`` becomes one WebSocket to ``--url``,
with the relay rules of the server side: BINARY frames, backpressure both
ways, the local connection paused until the WebSocket is open (so nothing it
sends early is lost), and a clear log line when the server refuses.
"""

from __future__ import annotations

import sys
from typing import Any, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.auth import sign_request
from portrouter.config import ConfigError, check_server_strport
from portrouter.interfaces import IConnection, IReactor
from portrouter.relay import close_soon, couple
from portrouter.sessions import peer_of

log = Logger(namespace="portrouter.tunnel")


class Options(usage.Options):
    synopsis = "--listen STRPORT --url ws[s]://HOST/stream/.../tcpproxy?app=SERVICE [--token T | --access-key A --secret-key S]"
    optParameters = [
        ["listen", "l", None, "Where local clients connect (strports, e.g. tcp:8022:interface=127.0.0.1)."],
        ["url", "u", None, "The service port's WebSocket URL."],
        ["token", "t", None, "A bearer token."],
        ["token-file", None, None, "A file holding the bearer token (preferred over --token)."],
        ["access-key", None, None, "A Backend.AI access key (signs the request)."],
        ["secret-key", None, None, "The Backend.AI secret key for --access-key."],
        ["connect-timeout", None, 10.0, "Seconds to wait for the WebSocket to open.", float],
    ]

    def postOptions(self) -> None:
        try:
            if not self["listen"]:
                raise ConfigError("--listen", "is required")
            check_server_strport(self["listen"], "--listen", allow_zero=True)
            if not self["url"]:
                raise ConfigError("--url", "is required")
            url = urlsplit(self["url"])
            if url.scheme not in ("ws", "wss") or not url.hostname:
                raise ConfigError("--url", f"{self['url']!r} is not a ws:// or wss:// URL")
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


class TunnelFactory(Factory):
    noisy = False

    def __init__(self, options: Any, reactor: IReactor):
        self.options = options
        self.reactor = reactor
        self.url = options["url"]
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname or "localhost"
        escaped = host.replace(":", "\\:")
        kind = "tls" if secure else "tcp"
        self.endpoint = clientFromString(reactor, f"{kind}:{escaped}:{port}")

    def buildProtocol(self, addr: Any) -> _Local:
        return _Local(self, addr)

    async def open(self, local: _Local) -> None:
        factory = WebSocketClientFactory(
            self.url, headers=headers_for(self.options, self.url), reactor=self.reactor
        )
        factory.protocol = _Remote
        factory.noisy = False
        factory.setProtocolOptions(utf8validateIncoming=False, openHandshakeTimeout=self.options["connect-timeout"])
        d = self.endpoint.connect(factory)
        ws: _Remote = await d.addTimeout(self.options["connect-timeout"], self.reactor)
        ws.opened = defer.Deferred()
        ws.local = local
        await ws.opened
        if local.transport is None or getattr(local.transport, "disconnected", False):
            ws.sendClose(1000)
            return
        local.opened(ws)


class _TunnelService(StreamServerEndpointService):
    listen: str  # the strport, for the error message

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except Exception as e:
            # One line, on the real stderr (twistd has redirected sys.stderr).
            if sys.__stderr__ is not None:  # None only without any stderr at all
                sys.__stderr__.write(f"portrouter-tunnel: cannot listen on {self.listen!r}: {e}\n")
            raise SystemExit(1) from None


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = cast(IReactor, default_reactor)  # the installed reactor has every facet
    endpoint = serverFromString(reactor, options["listen"])
    service = _TunnelService(endpoint, TunnelFactory(options, reactor))  # type: ignore[no-untyped-call]
    service.listen = options["listen"]
    service._raiseSynchronously = True
    return service
