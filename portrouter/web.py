"""
The server side of HTTP/1.1: one L{Channel} per client connection, parsing
with C{httptools} (the C parser uvicorn uses) and handing each request to a
L{Handler} chosen by the site (the ingress, a project's own port).

Why not C{twisted.web.server}: its C{Request} reads the whole request body
before a resource sees the request, so an upload cannot be streamed, and it
cannot hand the connection over after an C{Upgrade}. This channel streams the
body to the handler as it arrives, under backpressure, and lets a handler
take the connection over.

Responses are written through the channel, which owns framing (length,
chunked, or close-delimited for HTTP/1.0), keep-alive and the access log.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol as TypingProtocol

import httptools
from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IProtocolNegotiationFactory, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.certs import HTTP_PROTOCOLS, describe, tls_handle
from portrouter.interfaces import IConnection, IReactor
from portrouter.logs import emitter
from portrouter.proxyheader import looks_like_header
from portrouter.sessions import Sample

log = Logger(namespace="portrouter.http")
# One line per request: emitted without Logger.emit's per-call level check.
_access_line = emitter(log, LogLevel.info,
                       "{client} {method} {target} {status} {bytes} {duration:.4f}s {project}{aborted}{tls}")

_PLAIN = (tcp.Server, tcp.Client)  # transports whose socket we may write to directly

REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    204: b"No Content", 301: b"Moved Permanently", 304: b"Not Modified",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    413: b"Content Too Large", 426: b"Upgrade Required", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}
# Bytes read after an upgrade request, held until its answer says whose they
# are: past this, the client is not waiting for an answer and is dropped.
HELD_MAX = 64 * 1024


class _Deaf:
    """A parser's protocol with no callbacks."""


# What a closed connection's parser is replaced with. Its own parser holds
# the connection's callbacks, and the connection holds it: a cycle, which
# left every connection (and its requests) to Python's cyclic collector.
# Replaced, reference counting frees them at once. Never fed: a closed
# connection reads nothing more.
SPENT_REQUESTS = httptools.HttpRequestParser(_Deaf())
SPENT_RESPONSES = httptools.HttpResponseParser(_Deaf())
# What may be asked of a reverse proxy: CONNECT is for forward proxies.
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"


class Request:
    """A request head as parsed; the body arrives through L{Handler.body}."""

    __slots__ = (
        "method", "target", "path", "query", "version", "headers", "keep_alive",
        "upgrade", "client", "secure", "started", "has_body", "_index",
    )

    def __init__(self, client: str, secure: bool, started: float):
        self.method = b""
        self.target = b""
        self.path = b""
        self.query = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.upgrade = False
        self.client = client
        self.secure = secure
        self.started = started
        self.has_body = False
        self._index: dict[bytes, bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The last value of a header (lower-case name), or L{None}."""
        if self._index is None:
            self._index = {k.lower(): v for k, v in self.headers}
        return self._index.get(name)

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]

    def expects_continue(self) -> bool:
        """The client waits for a 100 Continue before it sends its body."""
        return (self.header(b"expect") or b"").lower() == b"100-continue"


class Handler(TypingProtocol):
    """What answers one request; told of its body, its end, and a lost client."""

    def body(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def lost(self) -> None: ...


class Site(TypingProtocol):
    """Chooses the handler for each request of a channel."""

    header_timeout: float
    max_header_size: int
    stats: Any  # portrouter.sessions.Stats

    def handler(self, channel: Channel, request: Request) -> Handler: ...


class Deadline:
    """
    A timeout that moves on every request and rarely fires: a request head's,
    then a backend's answer's, on one client connection. Setting or clearing
    it writes a time; the one reactor timer behind it, firing before the
    time, sleeps again until then. A keep-alive connection thus schedules a
    timer every C{header_timeout}, not two and two cancellations a request.
    C{owner} (the channel, an exchange) says whose it is: clearing another's
    does nothing.
    """

    __slots__ = ("reactor", "when", "action", "owner", "timer")

    def __init__(self, reactor: IReactor):
        self.reactor = reactor
        self.when: float | None = None
        self.action: Callable[[], None] | None = None
        self.owner: object = None
        self.timer: Any = None

    def set(self, delay: float, action: Callable[[], None], owner: object) -> None:
        when = self.reactor.seconds() + delay
        self.when, self.action, self.owner = when, action, owner
        timer = self.timer
        if timer is None:
            self.timer = self.reactor.callLater(delay, self._fired)
        elif timer.getTime() > when:
            timer.reset(delay)  # sooner than the timer would look: rare (a shorter timeout)

    def clear(self, owner: object) -> None:
        """No more timeout for C{owner}; the timer, if any, finds nothing when it fires."""
        if self.owner is owner:
            self.when = self.action = self.owner = None

    def stop(self) -> None:
        """The connection is gone: the timer too."""
        self.when = self.action = self.owner = None
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fired(self) -> None:
        self.timer = None
        when = self.when
        if when is None:
            return  # cleared: the next set() schedules anew
        now = self.reactor.seconds()
        if now < when:
            self.timer = self.reactor.callLater(when - now, self._fired)
            return
        action = self.action
        self.when = self.action = self.owner = None
        assert action is not None
        action()


def no_delay(transport: Any) -> None:
    """
    A proxy writes what it has when it has it; Nagle's algorithm would hold a
    small write back until the peer's delayed ACK (40 ms), as HAProxy avoids.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not TCP (UNIX socket)


def write_now(transport: Any, data: bytes) -> None:
    """
    Send at once when nothing is queued. Twisted's C{write()} queues and
    sends on the next reactor turn, registering for writability and then
    unregistering (two epoll_ctl calls per write), which costs more than the
    send itself for small answers. Only what the kernel will not take now is
    queued, through C{write()}, so flow control works as before.
    """
    if (type(transport) in _PLAIN and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer) and transport.connected
            and not transport.disconnecting):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # let Twisted's own write find and report the error
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _peer(address: IAddress) -> str:
    return str(getattr(address, "host", None) or "unix")


def reason_for(code: int) -> bytes:
    return REASONS.get(code, b"Unknown")


_TOKEN_PARAM = re.compile(rb"(^|&)(token=)[^&]*")


def redact_target(target: bytes) -> bytes:
    """The request target with any C{?token=} value hidden, for access logs."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return target
    return path + sep + _TOKEN_PARAM.sub(rb"\1\2***", query)


class LeadingHeader(TypingProtocol):
    """
    The PROXY header a channel of a listener that receives the protocol
    reads first from a trusted client (L{portrouter.proxyproto.HeaderFirst},
    made by the gate): fed the first bytes until it is whole or refused,
    timed out and refused at stop when the channel says.
    """

    timeout: float  # header_timeout
    buffer: bytes  # what came so far
    source: tuple[str, int] | None  # once whole: the client it names (the transport says so too); None: LOCAL
    rest: bytes  # once whole: what followed it

    waiting: bool  # not whole yet, nor refused
    whole: bool  # read: the connection now says it came from C{source}

    def dataReceived(self, data: bytes) -> None: ...

    def timed_out(self, timeout: float) -> None: ...

    def refuse(self, why: str, alert: bytes = b"", abort: bool = False) -> None: ...

    def connectionLost(self, reason: Failure) -> None: ...


@implementer(IHalfCloseableProtocol)
class Channel(Protocol):
    """One client connection: parse requests, run their handlers one at a time."""

    transport: IConnection  # set by makeConnection, before any other event
    tunnel: Any = None  # after an upgrade: bytes go to the relay
    tls: Any = None  # behind TLS: the OpenSSL connection, for the access log
    # " tls=... sni=..." once the first request is logged: a request means the
    # handshake is over, and what it settled does not change on the connection.
    tls_suffix: str | None = None

    def __init__(self, site: Site, reactor: IReactor, secure: bool = False):
        self.site = site
        self.reactor = reactor
        self.secure = secure
        self.parser = httptools.HttpRequestParser(self)
        self.request: Request | None = None  # being parsed
        self.handler: Handler | None = None  # answering; None between requests
        self.queue: list[tuple[Request, list[bytes]]] = []  # pipelined, waiting
        self.head_bytes = 0  # raw bytes while a head is incomplete
        self.head_size = 0  # the head as parsed
        self.deadline = Deadline(reactor)  # the head's timeout, then the handler's (an exchange's)
        self.closing = False
        self.taken_over = False
        self.kept: Any = None  # a backend connection only this client may reuse (send_proxy: its header)
        self.client = ""
        self.current: Request
        self.request_done = False
        # response state
        self.responding = False
        self.chunked = False
        self.close_after = False
        self.status = 0
        self.sent = 0
        self.project: str | None = None
        self.sample: Sample | None = None  # the project's access_log: is this request's line written?
        self.quiet = False  # the last request's line was left out (by the sample)
        self.out: list[bytes] = []  # written this turn, sent by flush()
        # After an upgrade request the parser stops; what follows is held
        # (and reading paused) until that request's answer: a 101 makes the
        # bytes the new protocol's, anything else the next requests.
        self.held: bytearray | None = None
        self.upgrading: Request | None = None  # the upgrade request they follow
        self.last: Request | None = None  # the last request whose head was parsed
        self.broken: str | None = None  # a request that could not be parsed, answered 400 in its turn
        self.dispatching = False  # in _next_queued's loop
        self.dispatch_again = False

    # -- connection --------------------------------------------------------------

    factory: Any = None
    gate: Any = None  # the ProxyGate that trusts this client: the connection starts with a PROXY header
    header: LeadingHeader | None = None  # reading that header

    @property
    def busy(self) -> bool:
        """A request is being answered (or waits its turn)."""
        return self.handler is not None or self.responding or bool(self.queue) or self.tunnel is not None

    def drain(self, why: str = "portrouter is stopping") -> None:
        """
        Stop taking requests: close now if idle, else after the current
        answer. A client still sending its PROXY header is closed as the
        gate closes its other readers, saying C{why}.
        """
        self.close_after = True
        header = self.header
        if header is not None:
            if header.waiting:
                header.refuse(why, abort=True)
            return
        if not self.busy:
            self.closing = True
            self.transport.loseConnection()

    def connectionMade(self) -> None:
        no_delay(self.transport)
        peer = self.transport.getPeer()
        self.client = _peer(peer)
        self.secure = self.secure or ISSLTransport.providedBy(self.transport)
        self.tls = tls_handle(self.transport)
        if self.gate is not None:
            # The PROXY header first, within the gate's header_timeout: on the
            # channel's own deadline (the request head's, once it is read).
            self.header = self.gate.header_first(self.transport, peer)
            self.deadline.set(self.header.timeout, self._header_timed_out, self)
            return
        self._wait_for_head()

    def _header_timed_out(self) -> None:
        if self.header is not None:
            self.header.timed_out(self.header.timeout)

    def _past_header(self, header: LeadingHeader, data: bytes) -> bytes:
        """Give C{data} to the PROXY header's reader: what followed the header once it is whole, else nothing."""
        header.dataReceived(data)
        if header.waiting:
            return b""
        self.header = None
        if not header.whole:
            self.closing = True  # refused: closed, with a line in the log
            self.deadline.clear(self)
            return b""
        if header.source is not None:
            self.client = header.source[0]  # the transport's peer now, as _peer names it
        self._wait_for_head()
        return header.rest

    def _wait_for_head(self) -> None:
        self.deadline.set(self.site.header_timeout, self._head_timed_out, self)

    def _stop_timer(self) -> None:
        self.deadline.clear(self)

    def _head_timed_out(self) -> None:
        if self.request is not None and not self.responding:
            log.info("{client}: no complete request head within {timeout:g} s; closing",
                     client=self.client, timeout=self.site.header_timeout)
            self.error(408, "the request head did not arrive in time")
        else:
            self.transport.loseConnection()  # idle keep-alive connection

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.dataReceived(data)
            return
        if self.taken_over or self.closing or self.broken is not None:
            return
        header = self.header
        if header is not None:
            data = self._past_header(header, data)
            if not data:
                return
        if self.held is not None:
            self._hold(data)
            return
        if self.request is not None or self.handler is None:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            self.flush()
        except httptools.HttpParserUpgrade as e:
            self.flush()
            self._upgrade_parsed(data[e.args[0]:])
        except httptools.HttpParserCallbackError:
            raise
        except httptools.HttpParserError as e:
            self.flush()
            if looks_like_header(data):
                # Refused, never believed: only proxy_protocol.trusted addresses may send one.
                self._malformed("a PROXY protocol header from an address not trusted to send one")
            else:
                self._malformed(f"malformed request: {e}")
        else:
            if self.request is not None and self.head_bytes > self.site.max_header_size:
                self.error(431, "the request head is too large")

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            half_close = getattr(self.tunnel, "readConnectionLost", None)
            if half_close is not None:
                half_close()
            else:
                self.transport.loseConnection()  # WebSocket has no half-close
        elif self.responding or self.handler is not None:
            self.close_after = True  # answer what was asked, then close
            self.closing = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.tunnel is not None and hasattr(self.tunnel, "writeConnectionLost"):
            self.tunnel.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        header, self.header = self.header, None
        if header is not None:
            header.connectionLost(reason)  # before its header was whole: a line in the log says so
        if self.factory is not None:
            self.factory.channels.discard(self)
        kept, self.kept = self.kept, None
        if kept is not None:
            kept.transport.loseConnection()
        if self.tunnel is not None:
            self.tunnel.connectionLost(reason)
            return
        self.closing = True  # nothing held or queued is answered now
        self.held = None
        self.deadline.stop()
        handler, self.handler = self.handler, None
        if handler is not None and not self.taken_over:
            handler.lost()
        self.queue = []
        self.parser = SPENT_REQUESTS

    # -- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = Request(self.client, self.secure, self.reactor.seconds())
        self.head_size = 0
        if self.handler is None and not self.queue:
            self._wait_for_head()

    def on_url(self, url: bytes) -> None:
        self.request.target += url  # type: ignore[union-attr]
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.request is None:
            # A trailer of a chunked body: dropped, as a recipient may (RFC
            # 9110 6.5.1), but counted, so trailers cannot grow without end.
            if self.head_size > self.site.max_header_size and not self.closing:
                self._malformed("the request trailers are too large")
            return
        self.request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        if request is None or self.closing or self.broken is not None:
            self.request = None
            return  # the connection is closing: nothing more is answered
        self.last = request
        if self.head_size > self.site.max_header_size:
            self.request = None
            self.error(431, "the request head is too large")
            return
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        target = request.target
        q = target.find(b"?")
        if q >= 0:
            request.path, request.query = target[:q], target[q + 1:]
        else:
            request.path = target
        cl = request.header(b"content-length")
        request.has_body = bool(cl and cl.strip() != b"0") or request.header(b"transfer-encoding") is not None
        self.request = None
        self.head_bytes = 0
        if self.handler is not None or self.queue:
            # Pipelined behind a request still being answered: hold it (and
            # stop reading) until its turn.
            self.queue.append((request, []))
            self.transport.pauseProducing()
            return
        self._stop_timer()
        self._dispatch(request)

    def on_body(self, data: bytes) -> None:
        if self.queue:
            self.queue[-1][1].append(data)
        elif self.handler is not None:
            self.handler.body(data)

    def on_message_complete(self) -> None:
        self.head_size = 0  # trailers are counted from here
        if self.queue:
            self.queue[-1][1].append(b"")  # end marker
        elif self.handler is not None:
            self.request_done = True
            self.handler.end()

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.current = request
        self.request_done = False
        self.responding = False
        # An HTTP/1.0 message with Transfer-Encoding has faulty framing
        # (RFC 9112 6.1): answered, then the connection closes.
        self.close_after = not request.keep_alive or (
            request.version == "1.0" and request.header(b"transfer-encoding") is not None)
        self.sent = 0
        self.status = 0
        self.project = None
        self.sample = None
        # The common request has one Host and no repeated header (the index
        # is built once for the handler anyway): nothing to look at closer.
        suspect = (request.header(b"host") is None or len(request._index) < len(request.headers)  # type: ignore[arg-type]
                   or request.upgrade or request.method == b"CONNECT")
        refusal = _refusal(request) if suspect else None
        handler: Handler
        if refusal is not None:
            status, text, headers = refusal
            # At once (below): whatever follows is not read.
            handler = self.handler = Fixed(lambda: self.error(status, text, headers), early=True)
        else:
            handler = self.handler = self.site.handler(self, request)
        if getattr(handler, "continues", False) and request.has_body and request.expects_continue():
            # Accepted this far: the client may send its body (else curl,
            # say, waits a second before it does).
            self.interim(100, [])
            self.flush()
        elif getattr(handler, "early", False):
            # A refusal that needs nothing of the body: the body is not
            # read, so the connection cannot serve another request.
            self.close_after = True
            handler.end()

    # -- upgrades --------------------------------------------------------------------

    def _upgrade_parsed(self, leftover: bytes) -> None:
        """
        The parser is past a complete upgrade request: hold what follows,
        and read no more, until that request's answer says whose it is.
        """
        if self.closing or self.broken is not None:
            return
        self.held = bytearray()
        self.upgrading = self.last
        self.transport.pauseProducing()
        self._hold(leftover)
        if self.held is None or self.queue:
            return  # dropped, or the upgrade request waits its turn (_next_queued)
        self._upgrade_due()

    def _upgrade_due(self) -> None:
        """The upgrade request's turn has come: it was answered already, or is being answered."""
        if self.handler is None and not self.responding:
            self._reparse()  # answered without a switch (a refusal): the bytes are requests
        else:
            self._upgrade_turn()

    def _hold(self, data: bytes) -> None:
        assert self.held is not None
        self.held += data
        if len(self.held) > HELD_MAX:
            # Reading is paused: only a transport that ignores it gets here.
            log.info("{client}: more than {limit} bytes after an upgrade request before its answer; closing",
                     client=self.client, limit=HELD_MAX)
            self.held = self.upgrading = None
            self.closing = True
            handler, self.handler = self.handler, None
            if handler is not None:
                handler.lost()
            self.transport.loseConnection()

    def _upgrade_turn(self) -> None:
        """The upgrade request is being answered: a handler that switches at once takes the bytes."""
        take = getattr(self.handler, "take_over", None)
        if take is not None:
            take(self.switch_protocols())

    def switch_protocols(self) -> bytes:
        """
        The upgrade is accepted (a backend's 101): the connection is no
        longer HTTP; the bytes held since the request are the new protocol's.
        """
        held = bytes(self.held or b"")
        self.held = self.upgrading = None
        self.taken_over = True
        self._stop_timer()
        return held

    def _reparse(self) -> None:
        """
        The upgrade request was answered without a switch: the held bytes are
        the next requests. httptools stays past the upgrade for good, so a
        fresh parser reads them, on the next turn (a run of upgrade requests
        answered at once must not recurse).
        """
        self.upgrading = None
        self.parser = httptools.HttpRequestParser(self)

        def feed() -> None:
            # Until now the bytes stay held (reading paused, anything read
            # anyway appended), so nothing is parsed before them.
            held, self.held = bytes(self.held or b""), None
            if self.transport is None or self.closing:
                return
            if held:
                self.dataReceived(held)
            self.resume_reading()

        self.reactor.callLater(0, feed)

    def _malformed(self, text: str) -> None:
        """
        The parser stopped on bytes that are not HTTP. Requests before them
        are answered; the broken one gets a 400 in its turn (a cut response
        if its answer had begun), then the connection closes.
        """
        self.request = None
        self.transport.pauseProducing()
        if self.queue and self.queue[-1][1][-1:] != [b""]:
            self.queue.pop()  # its body broke off: never dispatched
        elif not self.queue and self.handler is not None and not self.request_done:
            # The body of the request being answered broke off: the handler
            # (its backend) must not take it for a whole request.
            handler = self.handler
            handler.lost()
            if self.responding:
                self.abort()
            else:
                self.error(400, text)
            return
        self.broken = text
        if not self.busy:
            self.error(400, text)

    # -- responses -------------------------------------------------------------------

    def respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        *,
        length: int | None,
        reason: bytes | None = None,
    ) -> None:
        """
        Start the response. C{length} is the body's size when known (also for
        HEAD); L{None} means it streams: chunked for HTTP/1.1, else ended by
        closing the connection.
        """
        request = self.current
        self.responding = True
        self.status = status
        no_body = request.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_for(status))]
        self.chunked = False
        if length is not None:
            if status not in (204, 304):
                lines.append(b"Content-Length: %d\r\n" % length)
        elif not no_body:
            if request.version == "1.1":
                self.chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.close_after = True
        if self.closing:
            self.close_after = True
        for name, value in headers:
            lines.append(b"%s: %s\r\n" % (name, value))
        if self.close_after:
            lines.append(b"Connection: close\r\n")
        elif request.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.out.append(b"".join(lines))

    def interim(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes | None = None) -> None:
        """A 1xx response (103 Early Hints) ahead of the final one."""
        if self.current.version != "1.1":
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_for(status))]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in headers]
        lines.append(b"\r\n")
        self.out.append(b"".join(lines))

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.sent += len(data)
        if self.chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def flush(self) -> None:
        """Send what the current turn produced, in one piece (see L{write_now})."""
        if self.out and self.transport is not None:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out = []
            write_now(self.transport, data)

    def finish(self) -> None:
        """The response is complete; log it and go on to the next request."""
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self._log()
        self.handler = None
        self.responding = False
        if self.close_after or not self.request_done:
            # A body we did not read to its end would be taken for the next
            # request; closing is the only safe way out.
            self.closing = True
            self.transport.loseConnection()
            return
        self._wait_for_head()
        if self.queue:
            self._next_queued()
        elif self.held is not None and self.upgrading is self.current:
            self._reparse()  # answered without a switch
        elif self.broken is not None:
            self.error(400, self.broken)

    def _next_queued(self) -> None:
        """
        Answer the waiting requests in order. One answered at once finishes
        inside this call: its finish() asks for the next, which this loop
        takes, rather than recursing once per pipelined request.
        """
        if self.dispatching:
            self.dispatch_again = True
            return
        self.dispatching = True
        try:
            again = True
            while again and self.queue and not self.closing:
                self.dispatch_again = False
                self._dispatch_queued()
                again = self.dispatch_again
        finally:
            self.dispatching = False

    def _dispatch_queued(self) -> None:
        request, body = self.queue.pop(0)
        self._stop_timer()
        self._dispatch(request)
        for chunk in body:
            if self.handler is None:
                break
            if chunk:
                self.handler.body(chunk)
            else:
                self.request_done = True
                self.handler.end()
        if request is self.upgrading and self.held is not None:
            self._upgrade_due()
        else:
            self.resume_reading()

    def abort(self) -> None:
        """The response cannot be completed (the backend broke off): close."""
        self.flush()
        self._log(aborted=True)
        self.handler = None
        self.closing = True
        self.transport.loseConnection()

    def error(self, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
        """A short plain-text response, then close (the request may be broken)."""
        if self.responding:
            self.abort()  # too late for a status: the client sees a cut response
            return
        if self.handler is None:
            # No request is being answered (a broken or slow head): answer
            # as if for a GET of nothing.
            self.current = Request(self.client, self.secure, self.reactor.seconds())
            self.current.method = b"-"
            self.current.version = "1.1"
        self.request_done = True
        self.close_after = True
        self.closing = True
        body = text.encode("utf-8") + b"\n"
        self.respond(status, [(b"Content-Type", b"text/plain; charset=utf-8"), *headers], length=len(body))
        if self.current.method != b"HEAD":
            self.write(body)
        self.flush()
        self._log()
        self.handler = None
        self.transport.loseConnection()

    def resume_reading(self) -> None:
        """A handler's flow control is done with the client: read again, unless waiting."""
        if (not self.queue and not self.closing and self.held is None and self.broken is None
                and not self.taken_over and self.transport is not None):
            self.transport.resumeProducing()

    def send(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    ) -> None:
        """A whole response at once (API answers, redirects, 404s)."""
        self.respond(status, [(b"Content-Type", content_type), *headers], length=len(body))
        if self.current.method != b"HEAD":
            self.write(body)
        self.finish()

    def _log(self, aborted: bool = False) -> None:
        request = self.current
        if self.tls_suffix is None:
            self.tls_suffix = describe(self.tls)
        self.site.stats.http_request(self.project, self.status, self.sent)
        self.quiet = self.sample is not None and not self.sample.due()
        if self.quiet:
            return
        _access_line(
            client=request.client,
            method=request.method.decode("latin-1"),
            target=redact_target(request.target).decode("latin-1"),
            status=self.status,
            bytes=self.sent,
            duration=self.reactor.seconds() - request.started,
            project=self.project or "-",
            aborted=" (aborted)" if aborted else "",
            tls=self.tls_suffix,
        )


def _refusal(request: Request) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """
    What no handler may see, whatever the route (RFC 9112): a CONNECT, an
    ambiguous or missing Host, an upgrade request with a body (the parser
    does not read it: it would be taken for the next request).
    """
    if request.method == b"CONNECT":
        return 405, "CONNECT is not supported: portrouter is a reverse proxy, not a forward proxy", [(b"Allow", ALLOW)]
    hosts = len(request.header_values(b"host"))
    if hosts > 1:
        return 400, f"the request has {hosts} Host headers; one is allowed", []
    if not hosts and request.version == "1.1":
        return 400, "an HTTP/1.1 request needs a Host header", []
    if request.upgrade and request.has_body:
        return 400, "an upgrade request must not have a body", []
    return None


@implementer(IProtocolNegotiationFactory)
class ChannelFactory(Factory):
    """Builds a L{Channel} per connection for a site."""

    noisy = False

    def acceptableProtocols(self) -> list[bytes]:
        """What ALPN may choose behind TLS (L{portrouter.certs})."""
        return list(HTTP_PROTOCOLS)

    def __init__(self, site: Site, reactor: IReactor, secure: bool = False):
        self.site = site
        self.reactor = reactor
        self.secure = secure
        self.channels: set[Channel] = set()  # for draining

    # A listening port always passes the peer's address.
    def buildProtocol(self, addr: IAddress) -> Channel:  # type: ignore[override]
        channel = Channel(self.site, self.reactor, self.secure)
        channel.factory = self
        self.channels.add(channel)
        return channel

    def reads_header(self, gate: Any, addr: IAddress) -> Channel:
        """A channel for a client C{gate} (a ProxyGate) trusts: it reads the PROXY header first, itself."""
        channel = self.buildProtocol(addr)
        channel.gate = gate
        return channel


class Buffered:
    """
    A handler for small bodies (API calls): collects up to C{limit} bytes,
    then calls C{respond(body)}; a larger body is a 413.
    """

    continues = True  # it reads the body: a client that expects 100-continue is told to go on

    def __init__(self, channel: Channel, respond: Callable[[bytes], None], limit: int = 1 << 20):
        self.channel = channel
        self.respond = respond
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.gone = False

    def body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.gone:
                self.gone = True
                self.channel.error(413, f"the request body is larger than {self.limit} bytes")
            return
        self.parts.append(data)

    def end(self) -> None:
        if not self.gone:
            self.respond(b"".join(self.parts))

    def lost(self) -> None:
        self.gone = True


class Fixed:
    """
    A handler that answers whatever the body: when the request is complete,
    or, if C{early}, as soon as it is dispatched, without reading the body
    (a refusal must not wait for 100 MB it will not use; the connection then
    closes, since the body was not read).
    """

    def __init__(self, answer: Callable[[], None], early: bool = False):
        self.answer = answer
        self.early = early
        self.done = False

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.answer()

    def lost(self) -> None:
        self.done = True
