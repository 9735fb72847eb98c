"""
``GET /_api/events``: what the dashboard shows, as a server-sent event stream.

One L{Hub} per router. A new stream first gets the whole picture (a
C{state} event), then only what changed: C{routes} when the table changes,
C{traffic} once a second for the routes whose counters or rates moved,
C{services} when an on-demand service changes state, C{log} with new log
lines. Counters are totals, never deltas, so that a reader that missed
events is right again with the next one.

Nothing runs while nobody is connected: the one-second ticker starts with the
first stream and stops with the last. What is kept always is cheap: the last
100 log events as they were emitted (formatted only when a stream needs
them). The counters are the router's own (L{portrouter.sessions.Stats}, a
UDP route's totals), never read off log lines, which a project's
C{access_log} may sample or turn off.

A reader that stops reading costs a bounded queue: past L{QUEUE_BYTES} the
events are dropped, and when it reads again it is told how many (a
C{dropped} event) and given the whole picture again.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IPushProducer
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from portrouter.api import route_rows
from portrouter.logs import fast_message
from portrouter.router import RouterService
from portrouter.services import Supervisor
from portrouter.web import Channel, Request

TICK = 1.0  # seconds between traffic updates
RATE_WINDOW = 10  # seconds the rates are measured over
HISTORY = 60  # seconds of traffic each route's sparkline shows
LOG_LINES = 100
QUEUE_BYTES = 256 * 1024  # events held for a reader that does not read, past which they are dropped
HEARTBEAT = 15  # ticks between comments that keep idle proxies and browsers from timing out
RETRY_MS = 2000  # how soon a browser reconnects after the stream breaks

_SECRET_QUERY = re.compile(r"((?:^|[?&\s])(?:token|secret|password)=)[^&\s]+", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


def sse(kind: str, data: Any) -> bytes:
    """One event in the text/event-stream format (one C{data:} line: JSON has no raw newline)."""
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(data, separators=(",", ":")).encode())


@implementer(ILogObserver)
class LogRing:
    """
    The last L{LOG_LINES} log events, kept as emitted: storing one is a
    deque append; they are formatted only when a stream sends them.
    """

    def __init__(self, size: int = LOG_LINES):
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=size)
        self.seq = 0

    def __call__(self, event: dict[str, Any]) -> None:
        # Called for every log event, every HTTP request's included
        # (LogLevel's ordering is Python code; identity is not).
        if event.get("log_level") is LogLevel.debug:
            return
        self.seq += 1
        self.events.append((self.seq, event))

    def since(self, seq: int) -> list[tuple[int, dict[str, Any]]]:
        """The events kept that came after C{seq}."""
        return [(n, e) for n, e in self.events if n > seq]


def format_line(event: dict[str, Any], secrets: Iterable[str]) -> dict[str, Any]:
    """A log event as the dashboard shows it, with every secret it could carry hidden."""
    text = fast_message(event)
    if text is None:
        text = formatEvent(event)  # which never raises: it says what went wrong instead
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()}"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", _SECRET_QUERY.sub(r"\1***", text))
    level = event.get("log_level")
    return {
        "time": event.get("log_time", 0), "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"), "text": text,
    }


def service_state(supervisor: Supervisor | None) -> str:
    """stopped, starting, running or failed."""
    if supervisor is None:
        return "stopped"
    if supervisor.starting is not None:
        return "starting"
    if supervisor.ready and supervisor.process is not None:
        return "running"
    return "failed" if supervisor.last_failure is not None else "stopped"


@implementer(IPushProducer)
class EventStream:
    """
    One reader of C{/_api/events}: a streamed response (chunked, or ended by
    closing for HTTP/1.0), the producer of its own connection, so that the
    transport says when the reader stops taking bytes.
    """

    def __init__(self, hub: Hub, channel: Channel):
        self.hub = hub
        self.channel = channel
        self.paused = False
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.dropped = 0
        self.open = False

    # -- the request's handler (web.Handler) ----------------------------------

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        channel = self.channel
        channel.respond(200, [
            (b"Content-Type", b"text/event-stream; charset=utf-8"),
            (b"Cache-Control", b"no-store"),
            (b"X-Accel-Buffering", b"no"),  # for an nginx in front: do not buffer the stream
        ], length=None)
        channel.transport.registerProducer(self, True)
        self.open = True
        channel.write(b"retry: %d\n\n" % RETRY_MS)
        self.hub.subscribe(self)

    def lost(self) -> None:
        self._closed()

    # -- events -----------------------------------------------------------------

    def send(self, event: bytes) -> None:
        if not self.open:
            return
        if not self.paused:
            self.channel.write(event)
            self.channel.flush()
            return
        if self.dropped or self.queued + len(event) > QUEUE_BYTES:
            # Once one is dropped the reader will get the whole picture again:
            # nothing queued after it would be of use.
            self.dropped += 1
            return
        self.queue.append(event)
        self.queued += len(event)

    def finish(self) -> None:
        """The router stops: end the response, so that draining does not wait for it."""
        if not self.open:
            return
        self._closed()
        self.channel.transport.unregisterProducer()
        self.channel.finish()

    def _closed(self) -> None:
        if self.open:
            self.open = False
            self.queue.clear()
            self.hub.unsubscribe(self)

    # -- IPushProducer: the connection's write buffer --------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.open:
            return
        queue, self.queue, self.queued = self.queue, deque(), 0
        if self.dropped:
            dropped = self.dropped + len(queue)
            self.dropped = 0
            self.send(sse("dropped", {"dropped": dropped}))
            self.send(sse("state", self.hub.snapshot()))
            return
        while queue and not self.paused:
            self.send(queue.popleft())
        if queue:  # paused again by one of them: keep the rest, in order
            queue.extend(self.queue)
            self.queue = queue
            self.queued = sum(len(e) for e in queue)

    def stopProducing(self) -> None:
        self._closed()


class Hub(Service):
    """The events of one router, for every open stream; a child service of the router."""

    def __init__(self, router: RouterService, ring: LogRing | None = None, publisher: Any = None):
        self.router = router
        self.reactor = router.reactor
        self.ring = ring or LogRing()
        self.publisher = publisher if publisher is not None else globalLogPublisher
        self.streams: set[EventStream] = set()
        self.timer: Any = None
        self.ticks = 0
        self._table: Any = None
        self._traffic: dict[str, dict[str, Any]] = {}
        self._services: dict[str, dict[str, Any]] = {}
        self._log_seq = 0
        # Per route, the totals (bytes in + out) of the last HISTORY + 1 ticks.
        self._totals: dict[str, deque[tuple[float, int, int]]] = {}

    def privilegedStartService(self) -> None:
        # Before the ports are bound: the ring holds the start-up lines too.
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self.publisher.addObserver(self.ring)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.publisher.removeObserver(self.ring)
        for stream in list(self.streams):
            stream.finish()

    # -- streams ------------------------------------------------------------------

    def handler(self, channel: Channel, request: Request) -> EventStream:
        return EventStream(self, channel)

    def subscribe(self, stream: EventStream) -> None:
        if not self.streams:
            self._track()
        self.streams.add(stream)
        stream.send(sse("state", self.snapshot()))

    def unsubscribe(self, stream: EventStream) -> None:
        self.streams.discard(stream)
        if not self.streams and self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def publish(self, event: bytes) -> None:
        for stream in list(self.streams):
            stream.send(event)

    # -- the ticker -----------------------------------------------------------------

    def _track(self) -> None:
        """The first stream: start from now, with the history that begins now."""
        self._totals.clear()
        self._table = self.router.table
        self._traffic = self._traffic_rows()
        self._services = self._service_rows()
        self._log_seq = self.ring.seq
        self.timer = self.reactor.callLater(TICK, self._tick)

    def _tick(self) -> None:
        self.timer = self.reactor.callLater(TICK, self._tick)
        self.ticks += 1
        for stream in list(self.streams):
            if stream.channel.closing:
                # The reader closed its side (an EventSource never half-closes):
                # it is gone, and its channel closes once the response ends.
                stream.finish()
        if not self.streams:
            return
        if self.router.table is not self._table:
            self._table = self.router.table
            self.publish(sse("routes", {"routes": self.routes()}))
        traffic = self._traffic_rows()
        changed = {k: v for k, v in traffic.items() if self._traffic.get(k) != v}
        gone = [k for k in self._traffic if k not in traffic]
        self._traffic = traffic
        if changed or gone:
            self.publish(sse("traffic", {"time": self.reactor.seconds(), "routes": changed, "gone": gone}))
        services = self._service_rows()
        changed = {k: v for k, v in services.items() if self._services.get(k) != v}
        gone = [k for k in self._services if k not in services]
        self._services = services
        if changed or gone:
            self.publish(sse("services", {"services": changed, "gone": gone}))
        lines = self.ring.since(self._log_seq)
        if lines:
            self._log_seq = lines[-1][0]
            self.publish(sse("log", {"lines": self._lines(lines)}))
        elif self.ticks % HEARTBEAT == 0:
            self.publish(b": still here\n\n")

    # -- what is shown ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole picture, for a new stream (or one that missed events)."""
        return {
            "time": self.reactor.seconds(),
            "routes": self.routes(),
            "traffic": self._traffic,
            "history": {k: self._history(k) for k in self._totals},
            "services": self._services,
            "log": self._lines(list(self.ring.events)),
            # Another engineer's cluster section; the page asks /_api/nodes when it is set.
            "cluster": getattr(self.router.config, "cluster", None) is not None,
        }

    def routes(self) -> list[dict[str, Any]]:
        """The API's rows, each with its TLS setting and the key its traffic is counted under."""
        rows = route_rows(self.router)
        tls = {r.project: r.tls for r in self.router.table.routes if r.project is not None and r.path is None}
        ingress = self.router.config.ingress
        for row in rows:
            project = row["project"]
            row["key"] = f"{project}/{row['service']}" if "service" in row else project
            if row["protocol"] == "sni":
                row["tls"] = True
            elif project is None or "path" in row:
                row["tls"] = ingress.startswith(("ssl:", "tls:"))
            else:
                row["tls"] = bool(tls.get(project, False))
        return rows

    def _lines(self, events: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        auth = self.router.config.auth
        secrets = [t.secret for t in auth.tokens] + [k.secret_key for k in auth.keypairs] if auth else []
        return [format_line(e, secrets) for _, e in events]

    def _traffic_rows(self) -> dict[str, dict[str, Any]]:
        """Per route key: open connections, UDP sessions, totals, rates over RATE_WINDOW s, errors."""
        router = self.router
        stats = router.sessions.stats
        keys: set[str] = set()
        for project in router.table.projects.values():
            keys.add(project.name)
            keys.update(f"{project.name}/{s.name}" for s in project.services)
        moved_in: Counter[str] = Counter()
        moved_out: Counter[str] = Counter()
        for (_, key), n in stats.bytes_in.items():
            moved_in[key] += n
        for (_, key), n in stats.bytes_out.items():
            moved_out[key] += n
        open_: Counter[str] = Counter(router.sessions.active)
        for session in router.sessions.live:
            moved_in[session.project] += session.bytes_in
            moved_out[session.project] += session.bytes_out
        udp: dict[str, int] = {}
        for name, listener in router.listeners.items():
            factory = listener.factory
            channels = getattr(factory, "channels", None)
            if channels is not None:  # a project's own HTTP port
                open_[name] += len(channels)
            sessions = getattr(factory, "sessions", None)
            if sessions is not None and hasattr(factory, "dropped"):  # a UDP route
                udp[name] = len(sessions)
                moved_in[name] += factory.ended_in
                moved_out[name] += factory.ended_out
                for s in sessions.values():
                    moved_in[name] += s.bytes_in
                    moved_out[name] += s.bytes_out
        requests: Counter[str] = Counter()
        for (key, _), n in stats.http.items():
            requests[key] += n
        refused: Counter[str] = Counter()
        for (key, reason), n in stats.connect_failures.items():
            refused[key] += n
        limit: Counter[str] = Counter()
        for (_, key), n in stats.refused_at_limit.items():
            limit[key] += n
        for name, listener in router.listeners.items():
            dropped = getattr(listener.factory, "dropped", None)
            if isinstance(dropped, int):
                limit[name] += dropped
        now = self.reactor.seconds()
        rows = {}
        for key in sorted(keys):
            total_in = moved_in[key]
            total_out = moved_out[key] + stats.http_out[key]
            history = self._totals.setdefault(key, deque(maxlen=HISTORY + 1))
            if not history or history[-1][0] != now:
                history.append((now, total_in, total_out))
            # The oldest sample at most RATE_WINDOW s old: a rate over what was seen.
            then = next((h for h in history if now - h[0] <= RATE_WINDOW + 1e-6), history[-1])
            span = now - then[0]
            rows[key] = {
                "open": open_[key], "requests": requests[key],
                "bytes_in": total_in, "bytes_out": total_out,
                "rate_in": round((total_in - then[1]) / span) if span > 0 else 0,
                "rate_out": round((total_out - then[2]) / span) if span > 0 else 0,
                "errors": {"502": stats.http_errors[(key, 502)], "504": stats.http_errors[(key, 504)],
                           "refused": refused[key], "limit": limit[key]},
            }
            if key in udp:
                rows[key]["udp_sessions"] = udp[key]
        for key in [k for k in self._totals if k not in keys]:
            del self._totals[key]
        return rows

    def _history(self, key: str) -> list[int]:
        """Bytes moved (both ways) in each of the last HISTORY ticks, oldest first."""
        totals = [i + o for _, i, o in self._totals.get(key, ())]
        return [b - a for a, b in zip(totals, totals[1:])]

    def _service_rows(self) -> dict[str, dict[str, Any]]:
        supervisors = self.router.commands.supervisors
        rows = {}
        for project in self.router.table.projects.values():
            owners = [(project.name, None, project.command)] + [
                (f"{project.name}/{s.name}", s.name, s.command) for s in project.services]
            for name, service, command in owners:
                if command is None:
                    continue
                supervisor = supervisors.get((project.name, service))
                rows[name] = {
                    "state": service_state(supervisor),
                    "reason": supervisor.last_failure if supervisor is not None else None,
                    "start_took": (round(supervisor.start_took, 3)
                                   if supervisor is not None and supervisor.start_took is not None else None),
                    "starts": supervisor.starts if supervisor is not None else 0,
                    "pid": supervisor.pid if supervisor is not None else None,
                    "command": " ".join(command.argv),
                }
        return rows
