"""
Sessions: the relayed connections as an operator sees them, and the words
for why a backend connection failed.

Every route kind (tcp, ws, HTTP upgrades, tunnels) opens its sessions here,
so what the manhole lists, what draining waits for, the per-session log line
and the metrics counters are written once. It imports nothing from portrouter
above L{portrouter.certs} (a leaf), so any route or relay module may use it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from OpenSSL.SSL import Error
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from portrouter.certs import describe, openssl_reasons, tls_handle
from portrouter.logs import emitter

# The session lines keep the namespace they were logged under when Sessions
# lived in tcp.py: JSON log lines carry it (README, "Logs") for filtering.
log = Logger(namespace="portrouter.tcp")

# One line per connection: emitted without Logger.emit's per-call level check.
_session_line = emitter(log, LogLevel.info, "{protocol} {project} {peer}: {reason}; {bytes_in} bytes in, "
                        "{bytes_out} bytes out, {duration:.3f} s{tls}")

LIMIT_REPORT = 10.0  # seconds between "refused at max_connections" log lines per project


class Stats:
    """Totals since start-up, by project and protocol."""

    def __init__(self) -> None:
        self.connections: Counter[tuple[str, str]] = Counter()  # (protocol, project)
        self.bytes_in: Counter[tuple[str, str]] = Counter()
        self.bytes_out: Counter[tuple[str, str]] = Counter()
        self.http: Counter[tuple[str, str]] = Counter()  # (project, "2xx")
        self.http_out: Counter[str] = Counter()  # response bytes, by project
        self.http_errors: Counter[tuple[str, int]] = Counter()  # (project, 502 or 504): the backend's failures
        self.connect_failures: Counter[tuple[str, str]] = Counter()  # (project, reason)
        self.refused_at_limit: Counter[tuple[str, str]] = Counter()  # (protocol, project)
        # Requests by Host, connections by SNI: "host", "tls", "passthrough",
        # "h2c", "unknown" (under a base domain, naming nothing), "refused".
        self.hostnames: Counter[str] = Counter()
        self.datagrams_dropped: Counter[str] = Counter()  # by UDP service port ("project/service")

    def http_request(self, project: str | None, status: int, sent: int = 0) -> None:
        name = project or "-"
        self.http[(name, f"{status // 100}xx")] += 1
        self.http_out[name] += sent
        if status == 502 or status == 504:
            self.http_errors[(name, status)] += 1

    def connect_failed(self, project: str, why: str) -> None:
        if "did not answer" in why:
            reason = "timeout"
        elif "refused" in why:
            reason = "refused"
        else:
            reason = "error"
        self.connect_failures[(project, reason)] += 1


class Sample:
    """
    Which lines of a route's access log are written: all (share 1), none
    (0), or an even share: 0.1 writes exactly every tenth, not a tenth at
    random, so what an operator counts in the log is what they asked for.
    """

    __slots__ = ("share", "owed")

    def __init__(self, share: float = 1.0):
        self.share = share
        self.owed = 0.0

    def due(self) -> bool:
        share = self.share
        if share >= 1.0:
            return True
        owed = self.owed + share
        if owed >= 1.0 - 1e-9:  # ten tenths make a whole, whatever the float sum says
            self.owed = owed - 1.0
            return True
        self.owed = owed
        return False


class Session:
    """
    One relayed connection as an operator sees it: who, where, how much, how
    long, and why it ended. Relays fill the counters; the route module logs it.
    """

    __slots__ = (
        "protocol", "project", "peer", "started", "bytes_in", "bytes_out",
        "reason", "_closer", "_on_end", "supervisor", "last", "idle_timer", "tls", "quiet",
    )

    def __init__(
        self, protocol: str, project: str, peer: str, started: float,
        on_end: Callable[[Session], None],
    ):
        self.protocol = protocol
        self.project = project
        self.peer = peer
        self.started = started
        self.bytes_in = 0  # from the client towards the backend
        self.bytes_out = 0  # from the backend towards the client
        self.reason: str | None = None
        self._closer: Callable[[], None] | None = None
        self._on_end: Callable[[Session], None] | None = on_end
        self.supervisor: Any = None  # a started-on-demand service it keeps in use
        self.last = started  # last byte either way, for idle_timeout
        self.idle_timer: Any = None
        self.tls: Any = None  # the client's OpenSSL connection, behind TLS (for the log)
        self.quiet = False  # its line is not written (the route's access_log sample left it out)

    def close(self) -> None:
        """Close both sides now (drain timeout, idle timeout, shutdown)."""
        if self._closer is not None:
            self._closer()

    def ended(self, reason: str) -> None:
        if self._on_end is None:
            return
        self.reason = reason
        on_end, self._on_end = self._on_end, None
        self._closer = None
        on_end(self)


def show_address(address: tuple[Any, ...]) -> str:
    """(host, port, ...) as logs write a peer: ``1.2.3.4:5``, ``[2001:db8::1]:5``."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_of(address: IAddress) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or "unix"
    return show_address((host, address.port))  # type: ignore[attr-defined]


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
    return f"backend TLS handshake failed: {openssl_reasons(value) or reason.getErrorMessage()}"


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
             transport: Any = None, sample: Sample | None = None) -> Session:
        session = Session(protocol, project, peer, self.reactor.seconds(), self._ended)
        if transport is not None:  # the direct path has none, and no TLS
            session.tls = tls_handle(transport)
        if sample is not None and sample.share < 1.0 and not sample.due():  # every line: no call
            session.quiet = True
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
        if session.quiet:
            return
        _session_line(
            protocol=session.protocol,
            project=session.project,
            peer=session.peer,
            reason=session.reason,
            bytes_in=session.bytes_in,
            bytes_out=session.bytes_out,
            duration=self.reactor.seconds() - session.started,
            tls="" if session.tls is None else describe(session.tls),
        )
