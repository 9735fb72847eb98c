"""
Starting backends on demand (SPEC section 5).

A project or service with a ``command`` is spawned by the first connection
that needs it; every connection that arrives while it starts waits for the
same start. portrouter polls the port until it accepts (a UDP service: until
a socket is bound to its port, as ``/proc/net/udp`` shows, since nothing
answers a probe datagram reliably), then lets the waiting connections through (their early bytes are held by the connections
themselves, paused). A command that exits first, or a port that does not open
within ``start_timeout``, fails every waiting connection with the reason; one
service failing never blocks another. Output goes to the log line by line;
``idle_stop`` stops a service after its last connection; every child is
stopped (SIGTERM, then SIGKILL) when portrouter stops, and a removed
project's once its open connections have drained (L{Supervisor.retire}).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, cast

from twisted.internet import defer, error
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from portrouter.model import Command
from portrouter.interfaces import IConnection, IReactor

log = Logger(namespace="portrouter.services")

POLL = 0.1  # seconds between attempts to connect to a starting service
# A started service dies with the router that started it: a router killed
# outright (SIGKILL, the OOM killer) cannot stop it, and it would keep its
# port. util-linux's setpriv sets Linux's parent-death signal, then execs the
# command in the same process. Without setpriv, services outlive such a death.
SETPRIV = shutil.which("setpriv")
GRACE = 5.0  # SIGTERM, then this long, then SIGKILL
MAX_LINE = 8192


class StartFailed(Exception):
    """A service could not be started; the message says why, for the client too."""


class _Output(ProcessProtocol):
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.partial = {1: b"", 2: b""}
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self.partial.get(fd, b"") + data).split(b"\n")
        self.partial[fd] = lines.pop()
        if len(self.partial[fd]) > MAX_LINE:
            lines.append(self.partial[fd])
            self.partial[fd] = b""
        for line in lines:
            self.supervisor.output(fd, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self.partial.items():
            if rest:
                self.supervisor.output(fd, rest)
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.ended.callback(code if signal is None else -signal)


class _Probe(Protocol):
    transport: IConnection  # set by makeConnection, before any other event

    def connectionMade(self) -> None:
        # A plain close: an abort (RST) makes some servers log a traceback.
        self.transport.loseConnection()


class _ProbeFactory(Factory):
    noisy = False
    protocol = _Probe


def udp_bound(port: int) -> bool:
    """Whether a UDP socket on this host is bound to C{port} (IPv4 or IPv6, any address)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            local = line.split()[1]  # ADDRESS:PORT, both in hex
            if int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


class Supervisor:
    """One command: started once on demand, shared by every connection."""

    def __init__(self, reactor: IReactor, name: str, command: Command, backend: str,
                 start_timeout: float, clock: IReactorTime | None = None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.name = name
        self.command = command
        # "udp:HOST:PORT" (Model.service_endpoint): readiness is a bound socket, not an accept.
        self.udp_port = int(backend.rsplit(":", 1)[1]) if backend.startswith("udp:") else None
        self.endpoint = clientFromString(reactor, backend) if self.udp_port is None else None
        self.backend = backend
        self.start_timeout = start_timeout
        self.process: Any = None
        self.output_protocol: _Output | None = None
        self.starting: defer.Deferred[None] | None = None
        self.waiters: list[defer.Deferred[None]] = []
        self.ready = False
        self.active = 0  # connections using it, for idle_stop
        self.idle_timer: Any = None
        self.starts = 0
        self.stop_requested = False
        # Its project was removed (retire): it starts nothing any more, and
        # is stopped when its last connection ends or this timer (the drain
        # timeout's) fires; None once stopped, or never retired.
        self.retired = False
        self.retiring: Any = None
        # The run of the command this one replaces (its project deployed
        # again, or its command changed), until it is gone: it may hold the
        # port, and the first start's probe would take it for this one's.
        self.predecessor: defer.Deferred[None] | None = None
        # What the dashboard shows: when the last start began, how long it
        # took to open the port, and why the last start failed (None once one succeeds).
        self.start_began: float | None = None
        self.start_took: float | None = None
        self.last_failure: str | None = None

    @property
    def waits_for(self) -> str:
        """What the start waits to accept: C{port 8888}, C{port 53/udp}, or a UNIX socket's path."""
        if self.udp_port is not None:
            return f"port {self.udp_port}/udp"
        port = getattr(self.endpoint, "_port", None)
        if isinstance(port, int):
            return f"port {port}"
        path = getattr(self.endpoint, "_path", None)
        return path if isinstance(path, str) else repr(self.backend)

    @property
    def pid(self) -> int | None:
        return getattr(self.process, "pid", None) if self.process is not None else None

    def output(self, fd: int, line: bytes) -> None:
        log.info("{service} {stream}: {line}", service=self.name,
                 stream="stdout" if fd == 1 else "stderr", line=line.decode("utf-8", "replace"))

    def ensure(self) -> defer.Deferred[None]:
        """Fire when the service accepts connections, starting it if needed."""
        if self.ready and self.process is not None:
            return defer.succeed(None)
        if self.retired:
            # A client that was still on its way when the project went (a
            # WebSocket handshake): no process is started that nobody stops.
            return defer.fail(StartFailed(f"{self.name}: its project was removed"))
        # Each waiter has its own Deferred: one giving up (its client left)
        # does not cancel the start the others wait for.
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiters.append(waiter)
        if self.starting is None:
            self.starting = defer.Deferred.fromCoroutine(self._start())
            self.starting.addBoth(self._started)
        return waiter

    def _started(self, result: Any) -> None:
        self.starting = None
        waiters, self.waiters = self.waiters, []
        if isinstance(result, Failure) and not result.check(StartFailed):
            log.failure("starting {service}", result, service=self.name)
            result = Failure(StartFailed(f"{self.name} could not be started"))
        if isinstance(result, Failure):
            self.last_failure = str(result.value)
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _start(self) -> None:
        predecessor, self.predecessor = self.predecessor, None
        if predecessor is not None:
            await predecessor
        if self.output_protocol is not None and not self.output_protocol.ended.called:
            # The last run is still being stopped (idle_stop, a start that
            # timed out): it may hold the port, and the probe would find it.
            # Start once it is gone, unless it is being stopped for good.
            gone = self.stop()
            self.stop_requested = False
            await gone
            if self.stop_requested:
                raise StartFailed(f"{self.name} was stopped")
        argv = list(self.command.argv)
        found = shutil.which(argv[0])
        executable, args = found or argv[0], argv
        if found is not None and SETPRIV is not None:
            # One that is not found is spawned as it is: Twisted says so at once.
            executable, args = SETPRIV, [SETPRIV, "--pdeathsig", "KILL", "--", found, *argv[1:]]
        env = dict(os.environ)
        env.update(self.command.env or {})
        protocol = _Output(self)
        self.start_began, self.start_took = self.clock.seconds(), None
        log.info("starting {service}: {argv}", service=self.name, argv=" ".join(argv))
        try:
            self.process = self.reactor.spawnProcess(
                protocol, executable, args, env=env, path=self.command.cwd,
            )
        except OSError as e:
            raise StartFailed(f"cannot run {argv[0]!r}: {e.strerror}") from None
        self.output_protocol = protocol
        self.starts += 1
        ended = protocol.ended
        ended.addCallback(self._exited, protocol)
        deadline = self.clock.seconds() + self.start_timeout
        while True:
            if ended.called:
                # Twisted types .result as object; ended only ever fires with _exited's exit code.
                code = cast("int | None", ended.result)
                raise StartFailed(f"{self.name} exited with {_describe(code)} before it opened its port")
            try:
                await self._probe()
                break
            except (error.ConnectError, error.ConnectionRefusedError, error.ConnectingCancelledError,
                    defer.TimeoutError, defer.CancelledError, OSError):
                pass
            if self.clock.seconds() >= deadline:
                # Name the limit, so that whoever reads it (the client's 503
                # or 1011 close, the log) knows which setting to raise.
                why = f"{self.name} did not open {self.waits_for} within start_timeout {self.start_timeout:g} s"
                log.warn("{why}; stopping it", why=why)
                self.stop()
                raise StartFailed(why)
            await _sleep(self.clock, POLL)
        self.ready = True
        self.start_took, self.last_failure = self.clock.seconds() - self.start_began, None
        log.info("{service} is ready (pid {pid})", service=self.name, pid=self.pid)

    async def _probe(self) -> None:
        if self.udp_port is not None:
            if not udp_bound(self.udp_port):
                raise OSError(f"nothing is bound to port {self.udp_port}/udp yet")
            return
        assert self.endpoint is not None
        await self.endpoint.connect(_ProbeFactory()).addTimeout(1.0, self.reactor)

    def _exited(self, code: int | None, protocol: _Output) -> int | None:
        if protocol is not self.output_protocol:
            return code
        log.info("{service} exited with {how}", service=self.name, how=_describe(code))
        self.process = None
        self.output_protocol = None
        self.ready = False
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        return code

    # -- use counting, for idle_stop -----------------------------------------------

    def acquire(self) -> None:
        self.active += 1
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None

    def release(self) -> None:
        self.active = max(0, self.active - 1)
        if self.active == 0 and self.retiring is not None:
            self.stop()  # retired, and its last connection ended before the drain timeout: stop() cancels it
            return
        idle_stop = self.command.idle_stop
        if self.active == 0 and idle_stop is not None and self.process is not None:
            self.idle_timer = self.clock.callLater(idle_stop, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if self.active == 0 and self.process is not None:
            log.info("{service}: no connection for {seconds:g} s; stopping it",
                     service=self.name, seconds=self.command.idle_stop)
            self.stop()

    def retire(self, drain_timeout: float) -> None:
        """
        Its project was removed: stopped once the connections using it have
        ended, as the project's open connections drain, or when they are
        closed after C{drain_timeout}; at once if none is open.
        """
        self.retired = True
        if self.active == 0:
            self.stop()
            return
        if self.retiring is None:
            self.retiring = self.clock.callLater(drain_timeout, self.stop)

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM, then SIGKILL after a grace period; fires once it is gone."""
        self.stop_requested = True  # a start waiting for the last run to go is not made
        for timer in (self.retiring, self.idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.retiring = self.idle_timer = None
        process, protocol = self.process, self.output_protocol
        self.ready = False
        if process is None or protocol is None:
            return defer.succeed(None)
        try:
            process.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return defer.succeed(None)
        killer = self.reactor.callLater(GRACE, _kill, process)
        done: defer.Deferred[None] = defer.Deferred()

        def gone(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            if not done.called:
                done.callback(None)
            return result

        protocol.ended.addBoth(gone)
        return done


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


def _describe(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        return f"signal {-code}"
    return f"exit code {code}"


def _sleep(clock: IReactorTime, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


class Services:
    """Every supervised command of the router, by project and service name."""

    def __init__(self, reactor: IReactor, clock: IReactorTime | None = None):
        self.reactor = reactor
        self.clock = clock
        self.supervisors: dict[tuple[str, str | None], Supervisor] = {}
        # Those of removed projects, by the key they had, stopped once their
        # connections drain (Supervisor.retire); a router that stops stops
        # them with the rest.
        self.retired: list[tuple[tuple[str, str | None], Supervisor]] = []

    def get(self, project: Any, service: Any = None) -> Supervisor | None:
        owner = service if service is not None else project
        command = owner.command
        if command is None:
            return None
        key = (project.name, service.name if service is not None else None)
        backend = project.service_endpoint(service) if service is not None else project.backend
        supervisor = self.supervisors.get(key)
        ending = self._replaced(key) if supervisor is None else None
        if supervisor is None or supervisor.command != command or supervisor.backend != backend:
            if supervisor is not None:
                ending = supervisor.stop()
            name = project.name if service is None else f"{project.name}/{service.name}"
            supervisor = Supervisor(self.reactor, name, command, backend,
                                    owner.limits.start_timeout, self.clock)
            supervisor.predecessor = ending
            self.supervisors[key] = supervisor
        return supervisor

    def forget(self, project: str, drain_timeout: float) -> None:
        """
        Stop the commands of a project that is gone, each once the
        connections using it have drained (L{Supervisor.retire}).
        """
        self.retired = [(k, s) for k, s in self.retired if s.retiring is not None or s.process is not None]
        for key in [k for k in self.supervisors if k[0] == project]:
            supervisor = self.supervisors.pop(key)
            supervisor.retire(drain_timeout)
            self.retired.append((key, supervisor))  # until gone: the router's stop waits for it

    def _replaced(self, key: tuple[str, str | None]) -> defer.Deferred[None] | None:
        """
        A removed project's command still draining, when the project is
        back: stopped now, as a changed command is; what fires once it is
        gone, which the new one's first start waits for (the old process
        holds the port, and the probe would take it for the new one's).
        Kept among the retired until it is gone.
        """
        ending = None
        for retired_key, supervisor in self.retired:
            if retired_key == key and supervisor.retiring is not None:
                ending = supervisor.stop()
        return ending

    def _all(self) -> list[Supervisor]:
        return [*self.supervisors.values(), *(s for _, s in self.retired)]

    def stop_starting(self) -> None:
        """Shutting down: starts still under way fail now (their clients are told)."""
        for supervisor in self._all():
            if supervisor.starting is not None:
                supervisor.stop()

    def kill_all(self) -> None:
        for supervisor in self._all():
            if supervisor.process is not None:
                _kill(supervisor.process)

    def stop_all(self) -> defer.Deferred[Any]:
        return defer.gatherResults([s.stop() for s in self._all()])
