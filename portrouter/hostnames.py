"""
Hostnames (SPEC section 10): which route a name under a base domain reaches.

The grammar is dstack's, on the first label only:
``<project>[-<port>][s|g].<domain>``. ``<project>`` alone is the project's
own route; ``-<port>`` its route bound on that port, else its service port
of that number; the suffix asks for TLS passthrough (``s``) or h2c behind
terminated TLS (``g``). Project names hold ``-`` and may end in digits or in
``s``/``g``, so a label is read every way the grammar allows and the one way
that names an existing project is taken (L{resolve}): a label never names
two things, and a project's hostnames can be listed (L{labels}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

from portrouter.model import Hostnames, Project, Service

Mode = Literal["", "s", "g"]
MODES: tuple[Mode, ...] = ("", "s", "g")
# A port as a label writes it: no sign, no leading zero, at most 65535 (checked below).
_PORT = re.compile(r"-([1-9][0-9]{0,4})\Z")


@dataclass(frozen=True)
class Target:
    """
    What a hostname reaches: a project's own route (C{service} is L{None}) or
    one of its service ports, and how the TLS front serves it.

    @ivar port: the port the label named, L{None} for the bare project name.
    """

    project: Project
    service: Service | None
    port: int | None
    mode: Mode

    @property
    def http(self) -> bool:
        """Served as HTTP (proxied request by request) rather than relayed as bytes."""
        if self.mode:
            return False
        if self.service is not None:
            return self.service.protocol == "http"
        listen = self.project.listen
        return listen is None or listen.protocol == "http"


def _route_ports(project: Project) -> Iterator[tuple[int, Service | None]]:
    """The ports a label may name, the project's own route first (it wins a tie)."""
    listen = project.listen
    if listen is not None and listen.port and listen.protocol != "udp":
        yield listen.port, None
    for service in project.services:
        if service.protocol != "udp":  # no Host, no SNI: a datagram names nothing
            yield service.port, service


def has_route(project: Project) -> bool:
    """A project named alone reaches its own route: path-routed or bound, not UDP."""
    if project.backend is None:
        return False
    return project.listen is None or project.listen.protocol != "udp"


def labels(project: Project) -> Iterator[tuple[str, Target]]:
    """
    Every first label that names something of C{project} by the grammar, and
    what it names; another project's name may take one of them first
    (L{resolve} says which reach it).
    """
    if has_route(project):
        for mode in MODES:
            yield project.name + mode, Target(project, None, None, mode)
    seen: set[int] = set()
    for port, service in _route_ports(project):
        if port in seen:
            continue
        seen.add(port)
        for mode in MODES:
            yield f"{project.name}-{port}{mode}", Target(project, service, port, mode)


def reaching(project: Project, projects: Mapping[str, Project]) -> Iterator[tuple[str, Target]]:
    """
    The labels that reach C{project}'s route and service ports in
    C{projects}, without the ``s``/``g`` variants (the table lists these).
    """
    for label, target in labels(project):
        if not target.mode and resolve(label, projects) == target:
            yield label, target


def resolve(label: str, projects: Mapping[str, Project]) -> Target | None:
    """
    What C{label} (a first label, lower-case) reaches in C{projects}, if
    anything. The label is read in this order, and the first reading whose
    project exists decides, even when that project has no such route or port
    (L{None}: a 404 naming the host), so that a label never names two
    things:

      1. the whole label is a project's name;
      2. a project's name followed by ``s`` or ``g``;
      3. a project's name, ``-<port>``, then ``s``, ``g`` or nothing.
    """
    project = projects.get(label)
    if project is not None:
        return Target(project, None, None, "") if has_route(project) else None
    mode: Mode = ""
    rest = label
    if label.endswith(("s", "g")):
        mode = "s" if label[-1] == "s" else "g"
        rest = label[:-1]
        project = projects.get(rest)
        if project is not None:
            return Target(project, None, None, mode) if has_route(project) else None
    match = _PORT.search(rest)
    if match is None:
        return None
    project = projects.get(rest[:match.start()])
    port = int(match.group(1))
    if project is None or port > 65535:
        return None
    for candidate, service in _route_ports(project):
        if candidate == port:
            return Target(project, service, port, mode)
    return None


class Names:
    """
    The base domains, and what a host (a ``Host`` header, an SNI name) is
    under them: its first label, or L{None} for a host outside every one.
    """

    def __init__(self, config: Hostnames):
        self.config = config
        # The longest domain first, so that a domain inside another is found.
        self.suffixes = tuple(sorted(("." + d for d in config.domains), key=len, reverse=True))

    def label(self, host: str) -> str | None:
        """
        C{host} lower-cased, without a port or a final dot: the part before
        its base domain, when it ends in one. The domain itself is under
        none: it keeps path routing.
        """
        host = host.lower()
        if host.endswith("]") or host.count(":") > 1:
            return None  # an IPv6 literal is under no domain
        host = host.partition(":")[0].rstrip(".")
        if host in self.config.domains:
            return None  # a base domain itself, even inside another
        for suffix in self.suffixes:
            if host.endswith(suffix):
                return host[:-len(suffix)]
        return None

    def hostnames(self, label: str) -> list[str]:
        names = (f"{label}{suffix}" for suffix in self.suffixes)
        return [name for name in names if name not in self.config.domains]
