"""
HTTP routes: the reverse proxy behind the ingress's path routing and behind
a project's own HTTP port.

What C{twisted.web.proxy.ReverseProxyResource} does not, this does: HTTP/1.1
to the backend over pooled keep-alive connections parsed by C{httptools};
request and response bodies streamed with backpressure both ways; hop-by-hop
headers removed and forwarding headers set; repeated headers kept; C{Upgrade}
requests tunnelled byte for byte after the backend's C{101}.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from collections import Counter
from dataclasses import replace
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import httptools
from twisted.internet import defer, error, tcp
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portrouter.model import Project, Service
from portrouter.interfaces import IConnection, IReactor
from portrouter.proxyheader import header_for
from portrouter.relay import SPLICE_OK, SplicedBody, SpliceEnd, StreamSide, connect_now, direct_address, pair_streams
from portrouter.services import Services, Supervisor
from portrouter.sessions import Sample, Sessions, connect_failure, show_address, timed_out, tls_problem
from portrouter.web import _PLAIN, SPENT_RESPONSES, Channel, ChannelFactory, Fixed, Request, no_delay, write_now

log = Logger(namespace="portrouter.http")

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
))
# Set by us from what we know of the client; a client's own values are not
# trusted. RFC 7239 Forwarded is dropped rather than rewritten: we speak
# X-Forwarded-*, and a client's Forwarded beside them would contradict ours.
_OURS = frozenset((
    b"x-real-ip", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix",
    b"content-length", b"expect", b"x-forwarded-for", b"forwarded",
))
NAME = re.compile(rb"[a-z0-9][a-z0-9-]{0,62}\Z")
# How long an idle pooled connection is trusted: below the keep-alive timeout
# of common backends (Node and uvicorn close after 5 s), so a request is
# rarely sent on a connection the backend is closing.
POOL_IDLE = 4.0
POOL_MAX_IDLE = 64
# RFC 9110 9.2.2: sending these twice has the effect of sending them once, so
# one may be sent again when a pooled connection closed under it unanswered.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
# A response body at least this large (its length known, plain sockets both
# sides) is spliced, not copied through Python.
SPLICE_BODY = 64 * 1024


def authority(backend: str) -> str:
    """``host:port`` of a client endpoint string, for a rewritten C{Host}."""
    parts = re.split(r"(?<!\\):", backend)
    positional = [p for p in parts[1:] if "=" not in p]
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    host = named.get("host", positional[0] if positional else "localhost").replace("\\:", ":")
    port = named.get("port", positional[1] if len(positional) > 1 else "")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def normalize(path: bytes) -> bytes:
    """
    Resolve ``.`` and ``..`` segments, raw or percent-encoded, never above
    ``/``: no ``..`` reaches a backend. Everything else stays as sent,
    ``%2F`` included.
    """
    if b"%" not in path and b"/." not in path:
        return path  # the common case: nothing to resolve
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        decoded = unquote_to_bytes(segment) if b"%" in segment else segment
        last = i == len(segments) - 1
        if decoded == b".":
            if last:
                out.append(b"")
        elif decoded == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


def _clean_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers, in order, repeated ones kept."""
    named: set[bytes] = set()
    for value in request.header_values(b"connection"):
        named.update(t.strip().lower() for t in value.split(b","))
    named.discard(b"host")  # Host is end to end (RFC 9112 3.2): an option cannot remove it
    kept = []
    for name, value in request.headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in _OURS or low.startswith(b"proxy-"):
            continue
        kept.append((name, value))
    return kept


def _response_headers(
    headers: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], int | None, bool]:
    """The end-to-end headers, the Content-Length, and whether the body is chunked."""
    named: set[bytes] = set()
    length = None
    chunked = False
    for name, value in headers:
        low = name.lower()
        if low == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    kept = []
    for name, value in headers:
        low = name.lower()
        if low == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
            continue
        if low == b"transfer-encoding":
            chunked = True
            continue
        if low in HOP_BY_HOP or low in named or low.startswith(b"proxy-"):
            continue
        kept.append((name, value))
    return kept, length, chunked


@implementer(IHalfCloseableProtocol)
class Upstream(Protocol):
    """One connection to a backend, carrying one exchange at a time."""

    transport: IConnection  # set by makeConnection, before any other event
    tunnel: StreamSide | None = None  # after a 101: bytes go to the relay
    owner: Channel | None = None  # with send_proxy: the client connection whose header it carries

    def __init__(self, pool: Pool):
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: ProxyExchange | None = None
        self.idle_since = 0.0
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.interim = False
        self.complete = False
        self.reset_parser = False
        self.until_close = False
        self.keep_alive = True
        self.splice_left: int | None = None  # body bytes to splice once this read is done
        self.feeding = False  # in the parser: a finished connection is pooled after this read
        self.release_after = False
        self.unasked = False  # the backend sent more than the response

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.dataReceived(data)
            return
        exchange = self.exchange
        if exchange is None:
            self.transport.loseConnection()  # a backend must not speak unasked
            return
        try:
            self.feeding = True
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.unasked = True  # whatever follows, this connection is done
                raise
            finally:
                self.feeding = False
                if self.release_after:
                    self.release_after = False
                    self.release()
            exchange.channel.flush()  # what this read produced, in one send
            left, self.splice_left = self.splice_left, None
            if left and self.exchange is exchange and not exchange.done:
                try:
                    splice = BodySplice(self, exchange, left)
                except OSError:
                    return  # no pipe to be had (out of descriptors, say): the body goes on through the parser
                splice.start()
                return
        except httptools.HttpParserUpgrade as e:
            if self.exchange is not None:
                self.exchange.switched(self, data[e.args[0]:])
            return
        except httptools.HttpParserError as e:
            if self.exchange is not None:
                self.exchange.upstream_failed(self, f"invalid response from the backend: {e}")
            self.transport.loseConnection()
            return
        if self.reset_parser:
            # A response to HEAD: complete at its head whatever its
            # Content-Length says, so the parser starts afresh.
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def release(self) -> None:
        """
        The exchange is over and the connection may serve another: pool it,
        once this read is parsed, and only if it held exactly the response.
        """
        if self.feeding:
            self.release_after = True
            return
        transport = self.transport
        if self.unasked or self.exchange is not None or transport is None or not transport.connected \
                or transport.disconnecting:
            # More arrived than the response: whoever used this connection
            # next would get it as the answer to their request.
            if transport is not None:
                transport.loseConnection()
            return
        self.pool.release(self)

    def on_message_begin(self) -> None:
        if self.exchange is None:
            self.unasked = True
        self.headers = []
        self.reason = b""
        self.complete = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        code = self.parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            self.interim = True
            if exchange is not None:
                exchange.interim(code, self.reason, self.headers)
            return
        self.interim = False
        self.keep_alive = self.parser.should_keep_alive()
        if exchange is None:
            return
        head_only = exchange.request.method == b"HEAD"
        headers, length, chunked = _response_headers(self.headers)
        self.until_close = (
            length is None and not chunked and not head_only and code not in (101, 204, 304)
        )
        if self.until_close:
            self.keep_alive = False
        exchange.response_head(code, self.reason, headers, length)
        if head_only and self.exchange is exchange:
            self.reset_parser = True
            self._complete()
        elif (length is not None and length >= SPLICE_BODY and not chunked and code not in (204, 304)
              and SPLICE_OK and type(self.transport) in _PLAIN
              and type(exchange.channel.transport) in _PLAIN):
            self.splice_left = length  # less what arrives with this read (on_body)

    def on_body(self, data: bytes) -> None:
        if self.splice_left is not None:
            self.splice_left -= len(data)
        if self.exchange is not None:
            self.exchange.response_body(data)
        else:
            self.unasked = True  # a body after the response's end (a HEAD's, by its length)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.parser.get_status_code() == 101:
            return  # the parser raises HttpParserUpgrade next: switched() takes it
        if not self.complete:
            self._complete()

    def _complete(self) -> None:
        self.complete = True
        self.splice_left = None
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.response_done(self)

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.readConnectionLost()
        else:
            self.transport.loseConnection()  # HTTP has no half-close

    def writeConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if self.tunnel is not None:
            self.tunnel.connectionLost(reason)
            return
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            if self.until_close and exchange.responding:
                exchange.response_done(self)  # the close is the end of the body
            else:
                self.exchange = exchange
                exchange.upstream_lost(self, tls_problem(reason, self.transport))
                self.exchange = None
        self.parser = SPENT_RESPONSES  # a cycle through its callbacks, like a channel's


class BodySplice:
    """
    The rest of a large response body (its length known), spliced from the
    backend's socket to the client's by the relay (L{SplicedBody}), never
    entering Python; then the exchange completes as usual.
    """

    def __init__(self, upstream: Upstream, exchange: ProxyExchange, left: int):
        self.upstream = upstream
        self.exchange = exchange
        # Only made for plain TCP transports (Upstream checks _PLAIN).
        self.pump = SplicedBody(cast(tcp.Connection, upstream.transport),
                                cast(tcp.Connection, exchange.channel.transport), left, self._ended)

    def start(self) -> None:
        self.exchange.body_splice = self
        self.pump.start()

    def _ended(self, how: SpliceEnd, moved: int) -> None:
        exchange, upstream = self.exchange, self.upstream
        exchange.body_splice = None
        exchange.channel.sent += moved
        if how == "done":
            # The parser still waits for the bytes that went around it.
            upstream.parser = httptools.HttpResponseParser(upstream)
            upstream._complete()
        elif how == "source broken":
            exchange.upstream_lost(upstream)

    def cancel(self) -> None:
        """The exchange ended another way (the client left): hand everything back."""
        self.pump.cancel()


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, pool: Pool):
        self.pool = pool

    def buildProtocol(self, addr: Any) -> Upstream:
        return Upstream(self.pool)


class Pool:
    """Kept-alive connections to one backend, most recently used first."""

    def __init__(self, reactor: IReactor, project: Project):
        assert project.backend is not None
        self.reactor = reactor
        self.backend = project.backend
        self.endpoint = clientFromString(reactor, project.backend)
        # Connected as the direct TCP path connects (connect), on a reactor of
        # real descriptors: a test's memory reactor makes no connection.
        self.direct = direct_address(self.endpoint) if isinstance(reactor, PosixReactorBase) else None
        self.factory = _UpstreamFactory(self)
        self.idle: list[Upstream] = []
        self.opened = 0  # connections made, for tests and metrics
        self.supervisor: Supervisor | None = None  # starts the backend on demand, if it has a command

    def take(self) -> Upstream | None:
        now = self.reactor.seconds()
        while self.idle:
            upstream = self.idle.pop()
            if now - upstream.idle_since < POOL_IDLE and upstream.transport is not None \
                    and upstream.transport.connected and not upstream.transport.disconnecting:
                return upstream
            upstream.transport.loseConnection()
        return None

    def connect(self, timeout: float) -> defer.Deferred[Upstream]:
        if self.direct is not None:
            connected = self._connect_directly(*self.direct)
            if connected is not None:
                return connected
        d: defer.Deferred[Upstream] = self.endpoint.connect(self.factory)
        d.addTimeout(timeout, self.reactor)

        def opened(upstream: Upstream) -> Upstream:
            self.opened += 1
            return upstream

        return d.addCallback(opened)

    def _connect_directly(self, family: int, address: tuple[str, int]) -> defer.Deferred[Upstream] | None:
        """
        A backend connection made as the direct TCP path makes one: to a
        backend on this host the kernel has connected the socket when
        connect() returns, and Twisted's transport is put round it, without
        the client endpoint's connector, factory wrapper, Deferreds and
        timeout, which cost a new backend connection 150 us. L{None} when the
        connect is still in progress (a backend on another host): this pool
        then connects through its endpoint from now on.
        """
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            # Out of descriptors, say: as the endpoint fails, so the request gets its 502 saying why.
            return defer.fail(error.getConnectError(e))
        err = connect_now(sock, address)
        if err == errno.EINPROGRESS:
            sock.close()
            self.direct = None
            return None
        if err:
            sock.close()
            return defer.fail(error.getConnectError((err, os.strerror(err))))
        peer = sock.getpeername()
        upstream = Upstream(self)
        # What Twisted's port makes of an accepted socket is a transport for any connected one.
        transport = tcp.Server(sock, upstream, peer, None, 0, self.reactor)  # type: ignore[arg-type]
        transport.repstr = f"<Upstream to {show_address(peer)}>"
        upstream.makeConnection(transport)  # type: ignore[no-untyped-call]
        self.opened += 1
        return defer.succeed(upstream)

    def release(self, upstream: Upstream) -> None:
        owner = upstream.owner
        if owner is not None:
            # Its client's own (send_proxy): kept for that client's next request, if it is still there.
            if owner.closing or owner.kept is not None:
                upstream.transport.loseConnection()
            else:
                owner.kept = upstream
            return
        if len(self.idle) >= POOL_MAX_IDLE:
            upstream.transport.loseConnection()
            return
        upstream.idle_since = self.reactor.seconds()
        self.idle.append(upstream)

    def forget(self, upstream: Upstream) -> None:
        try:
            self.idle.remove(upstream)
        except ValueError:
            pass

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for upstream in idle:
            upstream.transport.loseConnection()


class ProxyExchange:
    """
    One request through the proxy: to a backend connection (pooled, or new
    for an upgrade) and its response back, both bodies streamed.
    """

    early = continues = False  # the channel's handler options: it sends its own 100 Continue

    def __init__(
        self, channel: Channel, request: Request, project: Project, pool: Pool,
        path: bytes, prefix: bytes | None, sessions: Sessions, routes: HTTPRoutes,
    ):
        self.channel = channel
        self.request = request
        self.project = project
        self.pool = pool
        self.sessions = sessions
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []  # body bytes before the backend is there
        self.body_sent = 0
        self.request_ended = False
        self.responding = False
        self.done = False
        self.reused = False
        self.answered = False  # something of the response (an interim one) came
        self.upload_mark = 0  # body_sent when the upload's progress was last looked at
        self.connecting: defer.Deferred[Any] | None = None
        self.body_splice: BodySplice | None = None
        self.chunked = request.header(b"transfer-encoding") is not None
        channel.project = project.name
        channel.sample = routes.sample(project)
        self.head = self._head(path, prefix)
        self.wants_continue = request.expects_continue()
        self.routes = routes
        self.counted = True
        routes.inflight[project.name] += 1
        self.supervisor = pool.supervisor
        if self.supervisor is not None:
            self.supervisor.acquire()
        # With send_proxy, a backend connection starts with one client's
        # header, so it is only ever reused by that same client connection:
        # kept on its channel between requests, never in the shared pool.
        self.owner = channel if project.send_proxy is not None else None
        if request.upgrade:
            upstream = None
        elif self.owner is not None:
            upstream, channel.kept = channel.kept, None
            if upstream is not None and (upstream.pool is not pool or upstream.transport is None
                                         or not upstream.transport.connected or upstream.transport.disconnecting):
                # Another project's backend (the client moved on), or gone: never reused.
                if upstream.transport is not None:
                    upstream.transport.loseConnection()
                upstream = None
        else:
            upstream = pool.take()
        if upstream is not None:
            self.reused = True
            self._send(upstream)
        else:
            self._connect()

    # -- the request -----------------------------------------------------------

    def _head(self, path: bytes, prefix: bytes | None) -> bytes:
        request = self.request
        headers = _clean_headers(request)
        host = request.header(b"host")
        lines = [b"%s %s HTTP/1.1\r\n" % (request.method, path + (b"?" + request.query if request.query else b""))]
        if not self.project.preserve_host or host is None:
            lines.append(b"Host: %s\r\n" % authority(self.project.backend).encode())  # type: ignore[arg-type]
        for name, value in headers:
            if name.lower() == b"host" and not self.project.preserve_host:
                continue
            lines.append(b"%s: %s\r\n" % (name, value))
        client = request.client.encode()
        # Appended to, as nginx's $proxy_add_x_forwarded_for does.
        lines.append(b"X-Forwarded-For: %s\r\n" % b", ".join([*request.header_values(b"x-forwarded-for"), client]))
        lines.append(b"X-Forwarded-Proto: %s\r\n" % (b"https" if request.secure else b"http"))
        if host is not None:
            lines.append(b"X-Forwarded-Host: %s\r\n" % host)
        lines.append(b"X-Real-IP: %s\r\n" % client)
        if prefix is not None:
            lines.append(b"X-Forwarded-Prefix: %s\r\n" % prefix)
        if request.upgrade:
            lines.append(b"Connection: Upgrade\r\n")
            lines.append(b"Upgrade: %s\r\n" % (request.header(b"upgrade") or b""))
        if self.chunked:
            # Re-chunked here; codings applied before chunked (the parser
            # allows chunked only last, once) are the body's and go on.
            codings = [t.strip() for v in request.header_values(b"transfer-encoding") for t in v.split(b",")]
            codings = [t for t in codings if t.lower() != b"chunked"] + [b"chunked"]
            lines.append(b"Transfer-Encoding: %s\r\n" % b", ".join(codings))
        else:
            length = request.header(b"content-length")
            if length is not None:
                lines.append(b"Content-Length: %s\r\n" % length.strip())
        lines.append(b"\r\n")
        return b"".join(lines)

    def _connect(self) -> None:
        if self.request.has_body:
            self.channel.transport.pauseProducing()  # hold the body until there is somewhere to send it
        supervisor = self.supervisor
        if supervisor is not None and not supervisor.ready:
            d = self.connecting = supervisor.ensure()

            def not_started(reason: Failure) -> None:
                self.connecting = None
                if not reason.check(defer.CancelledError):
                    self._fail(503, reason.getErrorMessage())

            d.addCallbacks(lambda _: self._connect_now(), not_started)
            return
        self._connect_now()

    def _connect_now(self) -> None:
        limits = self.project.limits
        d = self.connecting = self.pool.connect(limits.connect_timeout)

        def connected(upstream: Upstream) -> None:
            self.connecting = None
            if self.done:
                upstream.transport.loseConnection()
                return
            self._send(upstream)

        def failed(reason: Failure) -> None:
            self.connecting = None
            if self.done:
                return
            why = connect_failure(reason, limits.connect_timeout)
            self.sessions.stats.connect_failed(self.project.name, why)
            self._fail(504 if timed_out(reason) else 502, why)

        d.addCallbacks(connected, failed)

    def _send(self, upstream: Upstream) -> None:
        self.upstream = upstream
        upstream.exchange = self
        transport = upstream.transport
        header = b""
        if self.owner is not None and not self.reused:
            upstream.owner = self.owner
            # Sent with the request head: one send, one wake-up of the backend.
            header = header_for(self.project.send_proxy, self.channel.transport)  # type: ignore[arg-type]
        if self.wants_continue:
            self.channel.interim(100, [])
            self.channel.flush()
        if self.pending and not self.chunked:
            head = b"".join([header, self.head, *self.pending])
            self.body_sent += len(head) - len(self.head) - len(header)
            self.pending = []
            write_now(transport, head)
        else:
            write_now(transport, header + self.head)
        if self.pending:
            for chunk in self.pending:
                self._write_body(chunk)
            self.pending = []
        if self.request_ended:
            self._end_body()
            self._start_timer()
            if self.request.has_body:
                # Read whole while the connection was made (reading paused
                # for it in _connect): the next request may come.
                self.channel.resume_reading()
        elif self.request.has_body:
            transport.registerProducer(self.channel.transport, True)
            self.channel.resume_reading()
            self._watch_upload()

    def _watch_upload(self) -> None:
        """
        While the body streams, each response_timeout must see progress
        (counted, not timed per chunk): else the client stopped sending
        (408), or the backend stopped reading (504).
        """
        self.upload_mark = self.body_sent
        self.channel.deadline.set(self.project.limits.response_timeout, self._upload_check, self)

    def _upload_check(self) -> None:
        if self.done or self.request_ended:
            return
        if self.body_sent != self.upload_mark:
            self._watch_upload()
            return
        timeout = self.project.limits.response_timeout
        backend = self.upstream.transport if self.upstream is not None else None
        if backend is not None and (getattr(backend, "_tempDataLen", 0)  # type: ignore[arg-type]
                                    or getattr(backend, "offset", 0) < len(getattr(backend, "dataBuffer", b""))):
            self._fail(504, f"backend did not read the request body within {timeout:g} s", close=True)
        else:
            self._fail(408, f"the request body stopped arriving (nothing within {timeout:g} s)", close=True)

    def _start_timer(self) -> None:
        """
        The request is sent: the backend has response_timeout to answer. Not
        before: an upload takes as long as it takes (a 1 GiB body at the
        client's pace), with backpressure against a backend that stops reading.
        """
        self.channel.deadline.set(self.project.limits.response_timeout, self._timed_out, self)

    def _write_body(self, data: bytes) -> None:
        self.body_sent += len(data)
        if self.chunked:
            self.upstream.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))  # type: ignore[union-attr]
        else:
            write_now(self.upstream.transport, data)  # type: ignore[union-attr]

    def _end_body(self) -> None:
        if self.chunked:
            self.upstream.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    def body(self, data: bytes) -> None:
        if self.done:
            return
        if self.upstream is None:
            self.pending.append(data)
        else:
            self._write_body(data)

    def end(self) -> None:
        self.request_ended = True
        if self.upstream is not None and not self.done:
            self._end_body()
            if self.request.has_body:
                self.upstream.transport.unregisterProducer()
                self.channel.resume_reading()
            if not self.responding:
                self._stop_timer()  # the upload's watch
                self._start_timer()

    def _release_service(self) -> None:
        """The exchange is over: it no longer counts against limits or keeps a service up."""
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.release()
        if self.counted:
            self.counted = False
            self.routes.inflight[self.project.name] -= 1

    def lost(self) -> None:
        """The client went away: cancel the backend request, quietly."""
        if self.done:
            return
        self.done = True
        self._release_service()
        self._stop_timer()
        if self.body_splice is not None:
            self.body_splice.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.exchange = None
            upstream.transport.loseConnection()

    # -- the response ------------------------------------------------------------

    def _stop_timer(self) -> None:
        self.channel.deadline.clear(self)

    def _timed_out(self) -> None:
        timeout = self.project.limits.response_timeout
        self._fail(504, f"backend did not answer within {timeout:g} s", close=True)

    def interim(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.answered = True
        if code == 100 and self.wants_continue:
            return  # already told the client
        kept, _, _ = _response_headers(headers)
        self.channel.interim(code, kept, reason)

    def response_head(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self._stop_timer()
        if self.done:
            return
        if code == 101:
            return  # switched() takes it from here
        self.responding = True
        self.channel.status = code
        self.channel.respond(code, headers, length=length, reason=reason)
        self.channel.transport.registerProducer(self.upstream.transport, True)  # type: ignore[union-attr]

    def response_body(self, data: bytes) -> None:
        if not self.done:
            self.channel.write(data)

    def response_done(self, upstream: Upstream) -> None:
        if self.done:
            return
        self.done = True
        self._release_service()
        self.upstream = None
        upstream.exchange = None
        channel = self.channel
        channel.transport.unregisterProducer()
        transport = upstream.transport
        if upstream.keep_alive and self.request_ended and transport is not None and transport.connected \
                and not self.request.upgrade:
            transport.resumeProducing()
            upstream.release()
        elif transport is not None:
            if not self.request_ended and self.request.has_body:
                transport.unregisterProducer()
            transport.loseConnection()
        channel.finish()

    def upstream_lost(self, upstream: Upstream, why: str | None = None) -> None:
        """The backend closed before the response was complete (C{why}: a failed TLS handshake)."""
        if self.done:
            return
        self._stop_timer()
        if self.responding:
            self.done = True
            self._release_service()
            self.channel.transport.unregisterProducer()
            self.channel.abort()
            return
        if (self.reused and not self.answered and self.body_sent == 0 and not self.request.has_body
                and self.request.method in IDEMPOTENT):
            # The usual keep-alive race: the backend closed an idle connection
            # as we sent on it. Safe to send again on a new one only if the
            # whole request is still here and sending it twice does no harm:
            # the backend may have acted on it before closing.
            self.upstream = None
            self.reused = False
            self._connect()
            return
        self._fail(502, why or "backend closed the connection without answering")

    def upstream_failed(self, upstream: Upstream, why: str) -> None:
        if self.responding:
            self.upstream_lost(upstream)
        else:
            self._fail(502, why, close=True)

    def _fail(self, code: int, why: str, close: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._release_service()
        self._stop_timer()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.exchange = None
            if upstream.transport is not None:
                if self.request.has_body and not self.request_ended:
                    upstream.transport.unregisterProducer()
                upstream.transport.loseConnection()
        log.info("{project}: {method} {target}: {code} {why}", project=self.project.name,
                 method=self.request.method.decode("latin-1"),
                 target=self.request.target.decode("latin-1"), code=code, why=why)
        headers = [(b"Retry-After", b"5")] if code == 503 else []
        self.channel.error(code, f"portrouter: project '{self.project.name}': {why}", headers)

    # -- upgrades ------------------------------------------------------------------

    def switched(self, upstream: Upstream, leftover: bytes) -> None:
        """
        The backend answered 101: splice the two connections byte for byte.
        What the client sent after its request (held by the channel until
        now) is the new protocol's, and goes to the backend only now.
        """
        self._stop_timer()
        if self.done:
            return
        if not self.request.upgrade or not self.request_ended:
            # The client's bytes after a plain request are further requests,
            # possibly for other projects: never the backend's to take.
            self._fail(502, "backend switched protocols without being asked to", close=True)
            return
        self.done = True
        channel = self.channel
        held = channel.switch_protocols()
        self.channel.status = 101
        headers = [(n, v) for n, v in upstream.headers if n.lower() not in (b"content-length",)]
        lines = [b"HTTP/1.1 101 %s\r\n" % (upstream.reason or b"Switching Protocols")]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in headers]
        lines.append(b"\r\n")
        channel.flush()
        channel.transport.write(b"".join(lines))
        if leftover:
            channel.transport.write(leftover)
        channel._log()
        session = self.sessions.open("upgrade", self.project.name, self.request.client,
                                     self.project.limits.idle_timeout, channel.transport)
        session.quiet = channel.quiet  # the tunnel's line goes with its request's
        session.supervisor, self.supervisor = self.supervisor, None  # in use until the tunnel ends
        client = StreamSide()
        client.makeConnection(channel.transport)  # type: ignore[no-untyped-call]
        channel.tunnel = client
        backend = StreamSide()
        backend.makeConnection(upstream.transport)  # type: ignore[no-untyped-call]
        upstream.tunnel = backend
        upstream.exchange = None
        if held:
            upstream.transport.write(held)
        pair_streams(session, client, backend, self.sessions.reactor.seconds)  # the idle timer's clock


class HTTPRoutes:
    """Pools per project, shared by the ingress and the projects' own ports."""

    def __init__(self, reactor: IReactor, sessions: Sessions, services: Services | None = None):
        self.reactor = reactor
        self.sessions = sessions
        self.services = services
        self.pools: dict[str, Pool] = {}
        self.inflight: Counter[str] = Counter()  # requests in progress per project, for max_connections
        self.views: dict[str, tuple[Project, Project]] = {}  # service_view's, by name: (project, view)
        self.samples: dict[str, Sample] = {}  # by project: which requests get a line in the log

    def sample(self, project: Project) -> Sample:
        """C{project}'s access log sample, kept across its requests (and anew when its share changes)."""
        sample = self.samples.get(project.name)
        if sample is None or sample.share != project.access_log:
            sample = self.samples[project.name] = Sample(project.access_log)
        return sample

    def pool(self, project: Project, service: Service | None = None) -> Pool:
        """The pool of C{project}'s backend, or of its service port C{service} (then C{project} is its view)."""
        pool = self.pools.get(project.name)
        if pool is None or pool.backend != project.backend:
            if pool is not None:
                pool.close()
            pool = self.pools[project.name] = Pool(self.reactor, project)
        if self.services is None:
            pool.supervisor = None
        elif service is None:
            pool.supervisor = self.services.get(project)
        else:
            # The tunnels' supervisor: one copy of the service, however it is reached.
            owner = self.views[project.name][0]
            pool.supervisor = self.services.get(owner, service)
        return pool

    def service_view(self, project: Project, service: Service) -> Project:
        """
        An HTTP service port (reached by hostname) as a project of its own
        for the proxy: ``project/service``, its port, its limits.
        """
        name = f"{project.name}/{service.name}"
        cached = self.views.get(name)
        if cached is not None and cached[0] is project:
            return cached[1]
        view = replace(project, name=name, backend=project.service_endpoint(service), listen=None,
                       services=(), command=service.command, limits=service.limits, send_proxy=service.send_proxy)
        self.views[name] = (project, view)
        return view

    def proxy(self, channel: Channel, request: Request, project: Project,
              path: bytes, prefix: bytes | None, service: Service | None = None) -> Any:
        if service is not None:
            project = self.service_view(project, service)
        limit = project.limits.max_connections
        if limit is not None and self.inflight[project.name] >= limit:
            self.sessions.stats.refused_at_limit[("http", project.name)] += 1
            channel.project = project.name
            why = f"portrouter: project '{project.name}': {limit} requests in progress (max_connections)\n"
            return Fixed(lambda: channel.send(503, why.encode(), headers=[(b"Retry-After", b"1")]))
        return ProxyExchange(channel, request, project, self.pool(project, service), normalize(path), prefix,
                             self.sessions, self)

    def forget(self, name: str) -> None:
        """A project is gone: its pools (and its service ports') close."""
        for key in [k for k in self.pools if k == name or k.startswith(name + "/")]:
            self.pools.pop(key).close()
        for key in [k for k in self.views if k.startswith(name + "/")]:
            del self.views[key]
        for key in [k for k in self.samples if k == name or k.startswith(name + "/")]:
            del self.samples[key]


class ProjectSite:
    """A project's own HTTP port: everything goes to the project."""

    def __init__(self, routes: HTTPRoutes, project: Project):
        self.routes = routes
        self.stats = routes.sessions.stats
        self.update(project)

    def update(self, project: Project) -> None:
        self.project = project
        self.header_timeout = project.limits.header_timeout
        self.max_header_size = project.limits.max_header_size

    def handler(self, channel: Channel, request: Request) -> Any:
        if not request.path.startswith(b"/"):
            return Fixed(lambda: channel.error(400, "the request target must be a path"))
        return self.routes.proxy(channel, request, self.project, request.path, None)


class HTTPRoute(ChannelFactory):
    """The listening side of a project's own HTTP port."""

    def __init__(self, reactor: IReactor, routes: HTTPRoutes, project: Project):
        super().__init__(ProjectSite(routes, project), reactor)

    def update(self, project: Project) -> None:
        self.site.update(project)  # type: ignore[attr-defined]
