"""
The routing table: the single source of truth for who is bound where.

A table is immutable; a change builds a new one (L{RoutingTable.build}), so a
change that is refused leaves the old table exactly as it was. Listeners are
reconciled from it by the router, never edited behind its back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from twisted.internet.endpoints import serverFromString

from portrouter.model import Hostnames, Manhole, Project, ProxyProtocol


class PortConflict(Exception):
    """
    A second claim on a port in one namespace.

    @ivar holder: the project holding the port, or ``"the ingress"`` /
        ``"the manhole"`` for the reserved ports.
    @ivar claimant: the project that asked for it.
    """

    def __init__(self, port: int | str, namespace: str, holder: str, claimant: str):
        self.port = port
        self.namespace = namespace
        self.holder = holder
        self.claimant = claimant
        super().__init__(str(self))

    @property
    def bound_by(self) -> str:
        """The holder as a phrase: ``project 'my-api'`` or ``the ingress``."""
        return self.holder if self.holder.startswith("the ") else f"project {self.holder!r}"

    def __str__(self) -> str:
        what = "reserved for" if self.holder.startswith("the ") else "already bound by"
        who = self.claimant if self.claimant.startswith("the ") else f"project {self.claimant!r}"
        return f"port {self.port}/{self.namespace} is {what} {self.bound_by}; {who} cannot bind it"


@dataclass(frozen=True)
class Route:
    """One row of the table: what an operator sees in ``GET /_api/routes``."""

    port: int | None
    protocol: str
    project: str | None
    backend: str
    listen: str
    path: str | None = None
    interface: str | None = None
    tls: bool = False  # terminated with the certificate store
    proxy: ProxyProtocol | None = None  # receives the PROXY protocol

    @property
    def namespace(self) -> str:
        return "udp" if self.protocol == "udp" else "tcp"


def _port_of(strport: str) -> tuple[int | str | None, str | None]:
    """The port (or UNIX path) a strport binds, for conflict checks."""
    from twisted.internet import reactor

    endpoint = serverFromString(reactor, strport)
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int):
        return port, getattr(endpoint, "_interface", None) or None
    path = getattr(endpoint, "_address", None)
    return (path if isinstance(path, str) else None), None


def _key(namespace: str, port: int | str | None) -> tuple[str, int | str] | None:
    # Port 0 asks the OS for a fresh port, so it can never collide.
    if port is None or port == 0:
        return None
    return (namespace, port)


class RoutingTable:
    """
    The projects and the routes they make, checked for conflicts: TCP-namespace
    routes (http, tcp, ws) and UDP routes are separate namespaces; the ingress
    and manhole ports are reserved.
    """

    def __init__(
        self,
        ingress: str,
        manhole: Manhole | None,
        projects: Mapping[str, Project],
        routes: tuple[Route, ...],
        hostnames: Hostnames | None = None,
    ):
        self.ingress = ingress
        self.manhole = manhole
        self.projects = projects
        self.routes = routes
        self.hostnames = hostnames

    @classmethod
    def build(
        cls, ingress: str, manhole: Manhole | None, projects: Iterable[Project],
        hostnames: Hostnames | None = None,
    ) -> RoutingTable:
        """Check C{projects} against each other; raise L{PortConflict} on a clash."""
        claims: dict[tuple[str, int | str], str] = {}
        ingress_port, ingress_interface = _port_of(ingress)
        reserved = ((ingress, "the ingress"), (manhole.listen if manhole else None, "the manhole"),
                    (hostnames.listen if hostnames else None, "the TLS front"))
        for strport, holder in reserved:
            if strport is not None:
                key = _key("tcp", _port_of(strport)[0])
                if key is not None:
                    if key in claims:
                        raise PortConflict(key[1], key[0], claims[key], holder)
                    claims[key] = holder

        by_name: dict[str, Project] = {}
        own: list[Route] = []
        paths: list[Route] = []
        for project in projects:
            by_name[project.name] = project
            listen = project.listen
            if listen is None:
                if project.backend is not None:
                    paths.append(Route(
                        ingress_port if isinstance(ingress_port, int) else None, "http",
                        project.name, project.backend, ingress, path=f"/{project.name}/",
                    ))
                continue
            key = _key(listen.namespace, listen.port)
            if key is not None:
                owner = claims.get(key)
                if owner is not None:
                    raise PortConflict(key[1], key[0], owner, project.name)
                claims[key] = project.name
            assert project.backend is not None
            own.append(Route(
                listen.port, listen.protocol, project.name, project.backend,
                listen.endpoint, interface=listen.interface, tls=listen.tls, proxy=listen.proxy_protocol,
            ))

        ingress_route = Route(
            ingress_port if isinstance(ingress_port, int) else None, "http", None,
            "path-based routing", ingress, interface=ingress_interface,
        )
        own.sort(key=lambda r: (r.port if r.port is not None else 1 << 17, r.protocol, r.project or ""))
        paths.sort(key=lambda r: r.project or "")
        return cls(ingress, manhole, by_name, (ingress_route, *paths, *own), hostnames)

    def listeners(self) -> dict[str, Route]:
        """The routes bound on a port of their own, by project name."""
        return {r.project: r for r in self.routes if r.project is not None and r.path is None}

    def with_project(self, project: Project) -> RoutingTable:
        """
        A table with C{project} added or replaced; this one is unchanged. On a
        clash, C{project} is the claimant and the project already bound the
        holder, even when a replace moves an earlier project onto a later
        one's port.
        """
        others = [p for name, p in self.projects.items() if name != project.name]
        self.build(self.ingress, self.manhole, [*others, project], self.hostnames)
        projects = dict(self.projects)
        projects[project.name] = project  # a replace keeps its place
        return self.build(self.ingress, self.manhole, projects.values(), self.hostnames)

    def without(self, name: str) -> RoutingTable:
        projects = dict(self.projects)
        del projects[name]
        return self.build(self.ingress, self.manhole, projects.values(), self.hostnames)
