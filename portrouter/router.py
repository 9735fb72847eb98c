"""
The router: a C{MultiService} with one child per bound port, reconciled from
the routing table.

Binding is all-or-nothing: when one port cannot be bound, the ones bound by
the same change are released again and the old state stays in place.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any, Callable, Coroutine, Literal, Protocol, TypeVar

from twisted.application.service import MultiService, Service
from twisted.internet import defer, tcp, udp
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from portrouter.certs import CertificateError, StoreTLS, TLSFactory, strport_tls
from portrouter.config import ConfigError, needs_tls
from portrouter.model import Config, Project, ProxyProtocol
from portrouter.proxyproto import ProxyGate
from portrouter.state import State, StateError
from portrouter.table import PortConflict, Route, RoutingTable
from portrouter.http import HTTPRoute, HTTPRoutes
from portrouter.interfaces import IReactor
from portrouter.services import Services
from portrouter.sessions import Sessions
from portrouter.tcp import TCPRoute, accept_directly, name_listener
from portrouter.udp import MAX_DATAGRAM, UDPRoute
from portrouter.auth import Credentials
from portrouter.ws import WSRoute

log = Logger(namespace="portrouter")
T = TypeVar("T")

# What the router's own ports are called in its log lines and errors, by route protocol.
_OWN = {"http": "the ingress", "ssh": "the manhole", "sni": "the TLS front"}
DRAIN_POLL = 0.05  # how often shutdown looks whether everything has finished
BACKLOG = 1024  # listen queue for every port, unless the strport says otherwise
STALE_RETRIES = 20  # an API change recomputed at most this often when other routers keep changing the table


def _what(route: Route) -> str:
    """A listener as its lines name it: "tcp route ssh", "ingress"."""
    return f"{route.protocol} route {route.project}" if route.project else _OWN[route.protocol][4:]


class ChangeRefused(Exception):
    """
    A change the router did not make: nothing changed. C{kind} says whose
    the fault is (the request's, a clash with what is there, or the
    router's own); C{code} and C{field} name it for the API's answer.
    """

    def __init__(self, kind: Literal["invalid", "conflict", "failed", "unavailable"], code: str, message: str,
                 field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message
        self.field = field


class Front(Protocol):
    """
    What answers on the router's own ports. The composition root builds it
    (L{portrouter.front}); the router binds its factories and knows no more.
    """

    def ingress(self) -> Factory:
        """The factory for the ingress port."""

    def manhole(self) -> Factory | None:
        """The factory for the manhole's port, if one is configured."""

    def tls_front(self) -> Any:
        """The factory for the TLS front (``hostnames.listen``), if one is configured."""


class Store(Protocol):
    """
    Where API-deployed projects are kept: the state file (L{FileStore}), or
    a cluster's Redis (L{portrouter.cluster}). The router and the API call
    only these; each raises L{ChangeRefused} for what it cannot do.
    """

    def load(self, config: Config) -> list[Project]:
        """The deployed projects to start with."""

    async def sync(self) -> None:
        """Bring the router's table up to date with the store (under the lock)."""

    def check(self, project: Project) -> None:
        """Raise L{PortConflict} if C{project} clashes with a project kept elsewhere (other routers')."""

    async def save(self, projects: list[Project]) -> None:
        """
        Keep C{projects} (the table's deployed ones); raise L{StaleTable}
        if the store changed since L{sync}: the caller syncs and tries again.
        """

    async def nodes(self) -> list[dict[str, Any]] | None:
        """The cluster's live routers, read now; L{None} without a cluster."""

    def seen_nodes(self) -> list[dict[str, Any]] | None:
        """The same as last read (for metrics, which cannot wait); L{None} without a cluster."""


class StaleTable(Exception):
    """Another router changed the store between this one's sync and save: nothing was changed."""


class FileStore:
    """The state file: the store of a router on its own."""

    def __init__(self, state: State):
        self.state = state

    def load(self, config: Config) -> list[Project]:
        return self.state.load(config.defaults)

    async def sync(self) -> None:
        return None

    def check(self, project: Project) -> None:
        return None

    async def save(self, projects: list[Project]) -> None:
        try:
            self.state.save(projects)
        except OSError as e:
            raise ChangeRefused("failed", "state_unwritable",
                                f"cannot write {self.state.path}: {e.strerror}; nothing was changed") from None

    async def nodes(self) -> list[dict[str, Any]] | None:
        return None

    def seen_nodes(self) -> list[dict[str, Any]] | None:
        return None


class BindError(Exception):
    """A port the OS refused to bind; the message names the project and port."""

    def __init__(self, route: Route, reason: str):
        self.route = route
        self.reason = reason
        where = f"port {route.port}/{route.namespace}" if route.port else route.listen
        who = f"project {route.project!r}" if route.project else _OWN[route.protocol]
        super().__init__(f"cannot bind {where} for {who}: {reason}")


def _os_reason(failure: Any) -> str:
    """The OS's own words (``Address already in use``) from a listen failure."""
    exc = failure.value if hasattr(failure, "value") else failure
    sockerr = getattr(exc, "socketError", None)
    if sockerr is not None and getattr(sockerr, "strerror", None):
        return str(sockerr.strerror)
    if getattr(exc, "strerror", None):
        return str(exc.strerror)
    return str(exc)


def gated(factory: Any, proxy: ProxyProtocol | None, reactor: IReactor) -> Any:
    """C{factory} behind a L{ProxyGate} when the listener receives the PROXY protocol."""
    return factory if proxy is None else ProxyGate(factory, proxy, reactor)


class Listener(Service):
    """
    One bound port and what answers on it.

    @ivar taken_from: for a port handed over in a change, the listener of the
        project that gave it up; until the change commits, the port is still
        that one's.
    @ivar given_away: the port now answers for another project: stopping
        this listener must not close it.
    """

    def __init__(self, route: Route, factory: Any, port: IListeningPort, taken_from: Listener | None = None):
        self.route = route
        self.factory = factory
        self.port = port
        self.taken_from = taken_from
        # An ssl: strport's TLS stays with its port whatever route answers there.
        outer = getattr(port, "factory", None)
        creator = getattr(outer.inner if isinstance(outer, ProxyGate) else outer, "creator", None)
        self.strport_tls = None if isinstance(creator, StoreTLS) else creator
        self.given_away = False
        # The router's own ports are named as no project can be (names are slugs):
        # a project called "ingress" is a project like any other.
        self.setName(route.project or "_ingress")  # type: ignore[no-untyped-call]

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.given_away:
            return None
        # Twisted's maybeDeferred overloads take no callable returning "a Deferred or None".
        return defer.maybeDeferred(self.port.stopListening)  # type: ignore[call-overload,no-any-return]

    def answer_with(self, factory: Any, store_tls: StoreTLS, reactor: IReactor) -> None:
        """
        New connections or datagrams on this port go to C{factory}, over TLS
        if the port's strport or the route (C{tls: true}, with C{store_tls})
        says so, behind a PROXY header if the route receives them; open ones
        go on.
        """
        if self.route.namespace == "udp":
            # The old route's sessions end here: their clients' next datagrams
            # reach the new route, which opens sessions of its own.
            self.port.protocol.doStop()  # type: ignore[attr-defined]
            self.port.protocol = factory  # type: ignore[attr-defined]
            factory.makeConnection(self.port)
        else:
            current = self.port.factory  # type: ignore[attr-defined]
            if isinstance(current, ProxyGate):
                current = current.inner
            inner: Any = factory
            if (tls := store_tls if self.route.tls else self.strport_tls) is not None:
                if isinstance(current, TLSFactory) and current.creator is tls:
                    current.wrappedFactory = factory
                    inner = current
                else:
                    inner = TLSFactory(tls, False, factory)
            self.port.factory = gated(inner, self.route.proxy, reactor)  # type: ignore[attr-defined]
            name_listener(self.port, _what(self.route))
        self.factory = factory


class RouterService(MultiService):
    """
    Everything portrouter serves, built from a L{Config}. C{table} is the
    current routing table; C{listeners} what is bound for it.
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactor,
        front: Callable[[RouterService], Front],
        reload_config: Callable[[], Config] | None = None,
        store: Callable[[RouterService], Store] | None = None,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.sessions = Sessions(reactor)
        self.commands = Services(reactor)
        self.http = HTTPRoutes(reactor, self.sessions, self.commands)
        self.credentials = Credentials(config.auth)
        # One creator for every tls: true port; a reload gives it a new store.
        self.store_tls = StoreTLS()
        self.store_tls.store = config.tls.store if config.tls is not None else None
        self.state = State(config.state)
        self.reload_config = reload_config
        # Every change of the table (start-up, API, SIGHUP, reload) runs under
        # this lock, from reading the current table to closing what it released:
        # two changes interleaved would hand one port over twice.
        self.lock = defer.DeferredLock()
        self.store: Store = FileStore(self.state) if store is None else store(self)
        deployed = self.store.load(config)
        clash = {p.name for p in deployed} & {p.name for p in config.projects}
        if clash:
            raise StateError(f"{self.state.path}: project {sorted(clash)[0]!r} is also in the config file; "
                             "remove it from one of them")
        for project in deployed:
            try:
                needs_tls(project, config.tls, project.name)
            except ConfigError as e:
                raise StateError(f"{self.state.path}: {e}") from None
        try:
            self.table = RoutingTable.build(config.ingress, config.manhole, [*config.projects, *deployed],
                                            config.hostnames)
        except PortConflict as e:
            raise StateError(f"{self.state.path}: {e}") from None
        self.listeners: dict[str, Listener] = {}
        self.ingress: Listener | None = None
        self.manhole: Listener | None = None
        self.tls_front: Listener | None = None
        self.stopping = False
        self.forced = False
        self.front = front(self)

    # -- start-up -------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Bind every port before privileges are dropped. Any failure releases
        what was bound and raises L{BindError}: nothing stays bound.
        """
        # The lock is free at start-up: this runs (and fails) synchronously.
        d = self.serialised(self._bind_all)
        failures: list[Any] = []
        d.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        if not d.called:
            # An endpoint that binds asynchronously (not TCP/UNIX): a late
            # failure still must not leave a half-started router running.
            def late(failure: Any) -> None:
                log.failure("start-up failed", failure)
                self.reactor.stop()

            d.addErrback(late)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    async def _bind_all(self) -> None:
        ingress_route = replace(self.table.routes[0], proxy=self.config.proxy_protocol)
        factory = self.front.ingress()
        port = await self._listen(ingress_route, factory)
        self.ingress = Listener(ingress_route, factory, port)
        try:
            manhole, shell = self.config.manhole, self.front.manhole()
            if manhole is not None and shell is not None:
                route = Route(None, "ssh", None, "manhole", manhole.listen)
                self.manhole = Listener(route, shell, await self._listen(route, shell))
                self.manhole.setName("_manhole")  # type: ignore[no-untyped-call]
            hostnames, front = self.config.hostnames, self.front.tls_front()
            if hostnames is not None and hostnames.listen is not None and front is not None:
                route = Route(None, "sni", None, "hostname routing", hostnames.listen,
                              proxy=self.config.proxy_protocol)
                self.tls_front = Listener(route, front, await self._listen(route, front))
                self.tls_front.setName("_tls-front")  # type: ignore[no-untyped-call]
            await self.apply(self.table, first=True)
        except BaseException:
            for own in (self.ingress, self.manhole, self.tls_front):
                if own is not None:
                    _release(own.port)
            self.ingress = self.manhole = self.tls_front = None
            raise
        for own in (self.ingress, self.manhole, self.tls_front):
            if own is not None:
                own.setServiceParent(self)  # type: ignore[no-untyped-call]

    # -- reconciling ------------------------------------------------------------

    def _factory_for(self, project: Project) -> Any:
        assert project.listen is not None
        protocol = project.listen.protocol
        if protocol == "http":
            return HTTPRoute(self.reactor, self.http, project)
        if protocol == "tcp":
            return TCPRoute(self.reactor, project, self.sessions, self.commands)
        if protocol == "udp":
            return UDPRoute(self.reactor, project)
        if protocol == "ws":
            return WSRoute(self.reactor, project, self.sessions, self.commands)
        raise NotImplementedError(f"{protocol} routes are not served yet")


    async def _listen(self, route: Route, factory: Any) -> IListeningPort:
        port: IListeningPort | None  # every branch below binds one or raises
        try:
            if route.protocol == "udp":
                # Twisted has no UDP strports: bind directly.
                if self.config.reuse_port:
                    reused = _ReusePortUDP(route.port, factory, route.interface or "",  # type: ignore[no-untyped-call]
                                           MAX_DATAGRAM, self.reactor)
                    reused.startListening()  # type: ignore[no-untyped-call]
                    port = reused
                else:
                    port = self.reactor.listenUDP(
                        route.port, factory,  # type: ignore[arg-type]  # a UDP route always has its port
                        interface=route.interface or "", maxPacketSize=MAX_DATAGRAM
                    )
            else:
                endpoint = serverFromString(self.reactor, route.listen)
                tls = self._tls_for(route, endpoint)
                port = self._listen_tcp(endpoint, factory, tls, route.proxy, name=_what(route))
                if port is None:
                    port = await endpoint.listen(gated(factory, route.proxy, self.reactor))
        except CertificateError as e:
            raise BindError(route, str(e)) from None
        except Exception as e:
            raise BindError(route, _os_reason(e)) from None
        log.info(
            "{what} listening on {address}",
            what=_what(route),
            address=_address(port),
            project=route.project,
        )
        return port

    def _tls_for(self, route: Route, endpoint: Any) -> Any:
        """The TLS connection creator for a route's port, or L{None} for plain TCP."""
        if route.tls:
            return self.store_tls
        return strport_tls(endpoint)

    def _listen_tcp(self, endpoint: Any, factory: Any, tls: Any = None,
                    proxy: ProxyProtocol | None = None, *, name: str) -> IListeningPort | None:
        """
        Bind a plain TCP or ``ssl:`` strport ourselves: TCP routes accept
        directly (plain TCP only), TLS uses our own contexts (L{certs}), and
        every port a backlog fit for a proxy (Twisted's default of 50 drops
        SYNs under a burst). Other strports go through their endpoint.
        """
        if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
            return None
        backlog = endpoint._backlog if endpoint._backlog != 50 else BACKLOG
        outer = gated(factory if tls is None else TLSFactory(tls, False, factory), proxy, self.reactor)
        # Twisted's annotation asks a ServerFactory; the port takes any IProtocolFactory.
        port: IListeningPort
        if self.config.reuse_port:
            reused = _ReusePortTCP(endpoint._port, outer, backlog, endpoint._interface, self.reactor)
            reused.startListening()
            port = reused
        else:
            port = self.reactor.listenTCP(endpoint._port, outer, backlog, endpoint._interface)
        if isinstance(port, tcp.Port):
            # Our accept: a plain TCP route's clients go to its relay (TLS is
            # Twisted's to do, in user space; behind a gate, trusted clients
            # come direct once their header is read), the others get
            # Twisted's transports; out of descriptors, it pauses.
            accept_directly(port, self.reactor, name)
        return port

    async def apply(self, table: RoutingTable, *, first: bool = False) -> None:
        """
        Make the listeners match C{table}: bind the new ports first, and only
        when all of them are bound, switch tables, update changed routes in
        place and release the ports no longer wanted.
        """
        bound = await self._prepare(table, first=first)
        await self._commit(table, bound, first=first)

    async def _prepare(self, table: RoutingTable, *, first: bool = False) -> dict[str, Listener]:
        """
        Bind what C{table} needs and is not bound yet; all or nothing. A port
        that one project gives up in this change and another asks for, on
        the same listening description, is handed over rather than bound
        again (binding first would find it still in use).
        """
        if not self.lock.locked:
            raise RuntimeError("a change of the routing table outside RouterService.serialised(): "
                               "two changes would interleave")
        current = {} if first else self.listeners
        wanted = table.listeners()
        given_up = {
            (l.route.namespace, l.route.listen): l for name, l in current.items()
            if name not in wanted or wanted[name].listen != l.route.listen
        }
        bound: dict[str, Listener] = {}
        try:
            for name, route in wanted.items():
                old = current.get(name)
                if old is not None and old.route.listen == route.listen:
                    continue
                factory = self._factory_for(table.projects[name])
                giver = given_up.pop((route.namespace, route.listen), None)
                if giver is not None:
                    bound[name] = Listener(route, factory, giver.port, taken_from=giver)
                    continue
                bound[name] = Listener(route, factory, await self._listen(route, factory))
        except BaseException:
            # Release without waiting, so the error surfaces synchronously
            # (twistd's start-up and the API both need it at once).
            self._abandon(bound)
            raise
        return bound

    @staticmethod
    def _abandon(bound: dict[str, Listener]) -> None:
        for listener in bound.values():
            if listener.taken_from is None:  # a handed-over port stays its giver's
                _release(listener.port)

    def _commit(self, table: RoutingTable, bound: dict[str, Listener], *, first: bool = False) -> defer.Deferred[Any]:
        """
        Switch to C{table}: nothing here can fail for want of a port. The
        result fires once the released ports are closed (Twisted closes a
        listening socket on the next reactor turn), so whoever answers for the
        change answers when it is true.
        """
        wanted = table.listeners()
        current = {} if first else self.listeners
        released = [l for name, l in current.items() if name not in wanted or name in bound]
        removed = set(self.table.projects) - set(table.projects)
        self.table = table
        kept: dict[str, Listener] = {}
        for name, route in wanted.items():
            if name in bound:
                continue
            listener = kept[name] = current[name]
            project = table.projects[name]
            old = listener.route
            if (old.protocol, old.tls, old.proxy) == (route.protocol, route.tls, route.proxy):
                listener.factory.update(project)  # open connections go on untouched
                listener.route = route
            else:
                # Same port, another kind of route (or TLS, or the PROXY
                # protocol, on or off): new connections get the new kind;
                # the socket stays bound throughout.
                listener.route = route
                listener.answer_with(self._factory_for(project), self.store_tls, self.reactor)
        kept.update(bound)
        self.listeners = kept
        for listener in bound.values():
            giver = listener.taken_from
            if giver is not None:
                giver.given_away = True
                listener.answer_with(listener.factory, self.store_tls, self.reactor)  # the port still answers with the giver's
                listener.taken_from = None
                log.info("{protocol} route {project} takes over {address} from project {giver}",
                         protocol=listener.route.protocol, project=listener.route.project,
                         address=_address(listener.port), giver=giver.name)
        closing = []
        for listener in released:
            # Stop accepting at once; what is open may finish (below). Before
            # the new listeners join: a moved port's new listener has the
            # same service name as the old one.
            d = defer.maybeDeferred(listener.disownServiceParent)
            d.addErrback(lambda f: log.failure("stopping a listener", f))
            closing.append(d)
            # Its kept-alive HTTP clients take no new requests there: idle
            # ones are closed now, busy ones after the current answer.
            for channel in list(getattr(listener.factory, "channels", ())):
                channel.drain("its listener was released")
        for listener in bound.values():
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        for name in {key.split("/")[0] for key in self.http.pools} - set(table.projects):
            self.http.forget(name)
        for name in {key[0] for key in self.commands.supervisors} - set(table.projects):
            self.commands.forget(name, self.config.drain_timeout)  # once its connections drained
        if removed and not first:
            self._drain(removed, [l for l in released if l.route.project in removed])
        return defer.gatherResults(closing)

    def _drain(self, projects: set[str], released: list[Listener]) -> None:
        """Open connections of removed projects may finish until drain_timeout."""
        timeout = self.config.drain_timeout
        # Theirs now: a project deployed again meanwhile has new sessions
        # of the same name, which are not closed with these.
        sessions = [s for s in self.sessions.live if s.project.split("/")[0] in projects]

        def channels() -> list[Any]:
            # The removed projects' own ports, and requests for them on the
            # shared ports (path and hostname routes): looked at again when
            # the timer fires, so a kept-alive client that moved on to
            # another project is left alone, as are the requests of a
            # project deployed again meanwhile (old and new alike: a request
            # names a project, not which deployment of it).
            gone = projects - set(self.table.projects)
            shared = [l for l in (self.ingress, self.tls_front) if l is not None]
            return [c for l in released for c in getattr(l.factory, "channels", ())] + [
                c for l in shared for c in l.factory.channels
                if c.busy and (c.project or "").split("/")[0] in gone]

        def close() -> None:
            left = [s for s in sessions if s in self.sessions.live]
            for session in left:
                session.reason = f"project removed; closed after the drain timeout ({timeout:g} s)"
                session.close()
            for channel in channels():
                if channel.transport is not None:
                    channel.transport.abortConnection()

        if sessions or channels():
            self.reactor.callLater(timeout, close)

    def serialised(self, work: Callable[[], Coroutine[Any, Any, T]]) -> defer.Deferred[T]:
        """
        Run C{work} under the router's lock, after every change already
        waiting: whatever reads the table to compute a new one and then
        calls L{change} must run here.
        """
        return self.lock.run(lambda: defer.Deferred.fromCoroutine(work()))

    async def change(self, table: RoutingTable, *, persist: bool) -> None:
        """
        A run-time change (API deploy or delete, reload): bind, write the
        state file, then switch. A failure at any step leaves listeners,
        table and state file as they were. Only under the lock (L{serialised}).
        """
        try:
            bound = await self._prepare(table)
        except BindError as e:
            raise ChangeRefused("conflict", "port_unavailable", str(e), "listen.port") from None
        if persist:
            try:
                await self.store.save([p for p in table.projects.values() if not p.static])
            except BaseException:
                self._abandon(bound)
                raise
        await self._commit(table, bound)

    async def change_from(self, compute: Callable[[RoutingTable], RoutingTable]) -> RoutingTable:
        """
        An API change: C{compute} the new table from the current one, brought
        up to date with the store first, and L{change} to it; computed again
        if another router changed the store meanwhile. Only under the lock.
        """
        for _ in range(STALE_RETRIES):
            await self.store.sync()
            table = compute(self.table)
            try:
                await self.change(table, persist=True)
            except StaleTable:
                continue
            return table
        raise ChangeRefused("unavailable", "store_busy",
                            f"the table changed under this change {STALE_RETRIES} times; nothing was changed, try again")

    async def reload(self) -> dict[str, list[str]]:
        """
        Re-read the config file and apply only the difference; projects
        deployed through the API stay. An invalid file changes nothing. Waits
        for the changes already under way (SIGHUP and the API both come here).
        """
        return await self.serialised(self._reload_now)

    async def _reload_now(self) -> dict[str, list[str]]:
        if self.reload_config is None:
            raise ChangeRefused("conflict", "no_config_file", "portrouter was started without --config")
        try:
            config = self.reload_config()
        except ConfigError as e:
            log.error("reload refused: {error}", error=str(e))
            raise ChangeRefused("invalid", "invalid", str(e), e.field or None) from None
        dynamic = [p for p in self.table.projects.values() if not p.static]
        for project in dynamic:
            try:
                needs_tls(project, config.tls, project.name)
            except ConfigError as e:
                log.error("reload refused: {error}", error=f"{config.source}: {e} (deployed through the API)")
                raise ChangeRefused("invalid", "invalid", f"{e} (deployed through the API)", "tls") from None
        clash = {p.name for p in config.projects} & {p.name for p in dynamic}
        if clash:
            name = sorted(clash)[0]
            raise ChangeRefused("conflict", "invalid", f"project {name!r} is in the file and was deployed through the API")
        try:
            table = RoutingTable.build(self.table.ingress, self.table.manhole, [*config.projects, *dynamic],
                                       self.table.hostnames)
        except PortConflict as e:
            log.error("reload refused: {error}", error=str(e))
            raise ChangeRefused("conflict", "port_conflict", str(e), "listen.port") from None
        if (config.ingress, config.manhole, config.hostnames) != (self.config.ingress, self.config.manhole,
                                                                   self.config.hostnames):
            log.warn("reload: the ingress, the manhole and the hostnames section stay as they are until a restart")
        if (config.cluster, config.reuse_port) != (self.config.cluster, self.config.reuse_port):
            log.warn("reload: the cluster section and reuse_port stay as they are until a restart")
        old = self.table.projects
        changed = {
            "added": sorted(n for n in table.projects if n not in old),
            "removed": sorted(n for n in old if n not in table.projects),
            "changed": sorted(n for n, p in table.projects.items() if n in old and old[n] != p),
        }
        # New TLS ports of this change answer with the new certificates;
        # connections already open keep the session they have.
        old_store = self.store_tls.store
        if config.tls is not None:
            self.store_tls.store = config.tls.store
        try:
            await self.change(table, persist=False)
        except BaseException:
            self.store_tls.store = old_store
            raise
        if config.tls is None:
            self.store_tls.store = None
        else:
            log.info("tls: {count} certificates from {directory}", count=len(config.tls.store.certificates),
                     directory=config.tls.certificates)
        if config.proxy_protocol != self.config.proxy_protocol:
            # Who may send PROXY headers to the ingress and the TLS front: new
            # connections follow the file at once (a revoked address is not
            # believed one connection longer); open ones go on.
            for own in (self.ingress, self.tls_front):
                if own is not None:
                    own.route = replace(own.route, proxy=config.proxy_protocol)
                    own.answer_with(own.factory, self.store_tls, self.reactor)
        self.config = replace(self.config, auth=config.auth, defaults=config.defaults,
                              drain_timeout=config.drain_timeout, projects=config.projects, tls=config.tls,
                              proxy_protocol=config.proxy_protocol)
        self.credentials = Credentials(config.auth)
        log.info("reloaded {source}: {added} added, {removed} removed, {changed} changed",
                 source=config.source, **{k: len(v) for k, v in changed.items()})
        return changed

    def stopService(self) -> defer.Deferred[Any]:
        """
        Stop accepting at once; let open connections and requests finish until
        drain_timeout, then close them; then stop the child processes.
        """
        return defer.Deferred.fromCoroutine(self._stop())

    def _channels(self) -> list[Any]:
        listeners = [self.ingress, self.tls_front, *self.listeners.values()]
        return [c for l in listeners if l is not None for c in getattr(l.factory, "channels", ())]

    def _busy(self) -> bool:
        return bool(self.sessions.live) or any(c.busy for c in self._channels())

    async def _stop(self) -> None:
        self.stopping = True
        await defer.maybeDeferred(super().stopService)
        self.commands.stop_starting()
        if self.tls_front is not None:
            self.tls_front.factory.close_reading()
        for listener in [self.ingress, self.tls_front, *self.listeners.values()]:
            gate = getattr(getattr(listener, "port", None), "factory", None)
            if isinstance(gate, ProxyGate):
                gate.close_reading()
        for channel in self._channels():
            channel.drain()
        timeout = self.config.drain_timeout
        deadline = self.reactor.seconds() + timeout
        if self._busy() and not self.forced:
            log.info("draining {count} open connections (at most {timeout:g} s)",
                     count=len(self.sessions.live) + sum(c.busy for c in self._channels()), timeout=timeout)
        while self._busy() and not self.forced and self.reactor.seconds() < deadline:
            d: defer.Deferred[None] = defer.Deferred()
            self.reactor.callLater(DRAIN_POLL, d.callback, None)
            await d
        self._close_everything(f"portrouter stopped; closed after the drain timeout ({timeout:g} s)"
                               if not self.forced else "portrouter stopped at once")
        for pool in self.http.pools.values():
            pool.close()
        await self.commands.stop_all()

    def _close_everything(self, reason: str) -> None:
        for session in list(self.sessions.live):
            if session.reason is None:
                session.reason = reason
            session.close()
        for channel in self._channels():
            if channel.transport is not None:
                channel.transport.abortConnection()

    def force_stop(self) -> None:
        """A second signal: stop now, without waiting for anyone."""
        self.forced = True
        self._close_everything("portrouter stopped at once")
        self.commands.kill_all()

    def port_of(self, project: str | None = None) -> int:
        """The port actually bound for a project (or the ingress): for port 0."""
        listener = self.ingress if project is None else self.listeners[project]
        assert listener is not None
        return int(listener.port.getHost().port)  # type: ignore[attr-defined]


class _ReusePortTCP(tcp.Port):
    """
    A TCP port with SO_REUSEPORT (C{reuse_port: true}): several routers on one
    host each bind it, and the kernel spreads new connections between them.
    Twisted's listenTCP has no such option; the socket is made here, before bind.
    """

    def createInternetSocket(self) -> socket.socket:
        s: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


class _ReusePortUDP(udp.Port):
    """The same for UDP: the kernel spreads datagrams by their source between the routers."""

    def createInternetSocket(self) -> socket.socket:
        s: socket.socket = super().createInternetSocket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


def _release(port: IListeningPort) -> None:
    d = defer.maybeDeferred(port.stopListening)
    d.addErrback(lambda f: log.failure("releasing {port}", f, port=port))


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"  # type: ignore[attr-defined]
    return str(getattr(host, "name", host))
