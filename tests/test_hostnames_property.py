"""
A property of hostname routing (SPEC section 10, issue 15): for any table of
projects, any host a client may send (a ``Host`` header, an SNI name) reaches
what a brute-force reading of the grammar says, and the names the table lists
for a project are exactly the ones that reach it.

The reference below is written from SPEC 10 and from the precedence that
L{resolve}'s docstring promises, not from L{labels} or L{resolve}: it lists
every first label the grammar ``<project>[-<port>][s|g]`` gives every
project, ranks each by the reading that yields it (1. the whole label is a
project's name; 2. a name and ``s``/``g``; 3. a name, ``-<port>``, then
``s``/``g``/nothing), and lets the best-ranked reading decide, even when its
project has no such route or port.

Project names are built from a few characters (``a b 0 1 2 s g -``) and
grammar-like tails (``s``, ``-12``, ``-1g``) so that one project's name is
often another's hostname (``a-1`` and project ``a``'s port 1, ``as`` and
``a`` with passthrough); ports come from a small pool so that a route and a
service port, or two services (UDP ones too, which have no name), share one.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from portrouter.config import PROTOCOLS, SERVICE_PROTOCOLS, parse
from portrouter.hostnames import Names, Target, reaching, resolve
from portrouter.model import Project, Service

DOMAIN = "apps.test"
INNER = "eu.apps.test"  # a base domain inside another: a host is under the longest
# As the config is written: the parser lower-cases a domain.
CONFIG_DOMAINS = ["Apps.Test", INNER]
TCP_BACKEND = "tcp:127.0.0.1:9"
UDP_BACKEND = "127.0.0.1:9"
FIRST = "ab012sg"
REST = FIRST + "-"
PORT_POOL = [1, 2, 12, 21, 80, 8888, 65535]
MODES = ("", "s", "g")

# What a host reaches, as the reference and the code are compared:
# (project, service or None, port or None, mode, served as HTTP), or None.
Pick = Optional[tuple[str, Optional[str], Optional[int], str, bool]]

ports = st.one_of(st.sampled_from(PORT_POOL), st.integers(1, 65535))


@st.composite
def names(draw: st.DrawFn, bases: list[str]) -> str:
    """A project name: one of C{bases}, often with a tail the grammar also reads."""
    base = draw(st.sampled_from(bases))
    tail = draw(st.sampled_from(["", "", "s", "g", "-{}", "-{}s", "-{}g", "-", "-0{}"]))
    return (base + tail.format(draw(ports)))[:63]


@st.composite
def bases(draw: st.DrawFn) -> str:
    return draw(st.sampled_from(FIRST)) + draw(st.text(REST, max_size=3))


@st.composite
def manifests(draw: st.DrawFn) -> list[dict[str, Any]]:
    """
    A projects list the config accepts: path-routed, bound (http, tcp, ws,
    udp), with service ports only, or both; no two listen ports clash in one
    namespace (the table would refuse it), service ports may share anything.
    """
    pool = draw(st.lists(bases(), min_size=1, max_size=3))
    claimed: set[tuple[str, int]] = set()
    seen: set[str] = set()
    projects: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 7))):
        name = draw(names(pool))
        if name in seen:
            continue
        seen.add(name)
        shape = draw(st.sampled_from(["path", "listen", "services", "listen+services", "path+services"]))
        manifest: dict[str, Any] = {"name": name}
        if shape != "services":
            manifest["backend"] = TCP_BACKEND
        if shape.startswith("listen"):
            protocol = draw(st.sampled_from(PROTOCOLS))
            port = draw(ports)
            namespace = "udp" if protocol == "udp" else "tcp"
            if (namespace, port) not in claimed:
                claimed.add((namespace, port))
                manifest["listen"] = {"port": port, "protocol": protocol}
                if protocol == "udp":
                    manifest["backend"] = UDP_BACKEND
        if shape.endswith("services"):
            services = draw(st.lists(st.tuples(st.sampled_from(SERVICE_PROTOCOLS), ports), min_size=1, max_size=3))
            manifest["services"] = [{"name": f"svc{i}", "protocol": protocol, "port": port}
                                    for i, (protocol, port) in enumerate(services)]
        projects.append(manifest)
    return projects


def table(projects: list[dict[str, Any]]) -> tuple[dict[str, Project], Names]:
    """The projects as the config file's parser makes them, and the hostnames section."""
    config = parse({"ingress": "tcp:0", "hostnames": {"domains": CONFIG_DOMAINS}, "projects": projects})
    assert config.hostnames is not None
    return {project.name: project for project in config.projects}, Names(config.hostnames)


# -- the reference ----------------------------------------------------------------------------


def pick(project: Project, service: Service | None, port: int | None, mode: str) -> Pick:
    """
    What SPEC 10 says such a name is: the service port, or the project's own
    route; served as HTTP only without a suffix, when what it names is HTTP
    (a path-routed project, an ``http`` listen or service).
    """
    if service is not None:
        http = service.protocol == "http"
    else:
        http = project.listen is None or project.listen.protocol == "http"
    return (project.name, service.name if service is not None else None, port, mode, http and mode == "")


def grammar_names(project: Project) -> Iterator[tuple[str, int, Pick]]:
    """
    Every first label the grammar gives C{project}, with the rank of the
    reading that yields it and what it names there (L{None}: the project is
    named but has nothing by that name).
    """
    listen = project.listen
    # Its own route: a backend, reached by path or on a bound port; the front carries no UDP.
    own = project.backend is not None and (listen is None or listen.protocol != "udp")
    yield project.name, 1, pick(project, None, None, "") if own else None
    for mode in ("s", "g"):
        yield project.name + mode, 2, pick(project, None, None, mode) if own else None
    # "the project's route whose listen.port is <port>, or its service port <port>":
    # the route first, then the services as the manifest lists them; UDP ones
    # (SPEC 11) have no name: neither Host nor SNI comes with a datagram.
    numbered: list[tuple[int, Service | None]] = []
    if own and listen is not None and listen.port:  # a CLI route may have no number
        numbered.append((listen.port, None))
    numbered.extend((service.port, service) for service in project.services if service.protocol != "udp")
    for port, service in numbered:
        for mode in MODES:
            yield f"{project.name}-{port}{mode}", 3, pick(project, service, port, mode)


def reference(projects: Mapping[str, Project]) -> dict[str, Pick]:
    """
    Every label some reading gives a project, and what the best-ranked
    reading decides. A label missing here reaches nothing: at most its
    ``-<port>`` reading (the last rank) names a project, without that port.
    """
    best: dict[str, tuple[int, Pick]] = {}
    for project in projects.values():
        for label, rank, what in grammar_names(project):
            # Strictly better only: of one project's two uses of a port, the first listed wins.
            if label not in best or rank < best[label][0]:
                best[label] = (rank, what)
    return {label: what for label, (_, what) in best.items()}


def reference_label(host: str) -> str | None:
    """
    The first label(s) of C{host} under the longest base domain it ends in;
    L{None} for a host under none, an IPv6 literal, and a base domain itself
    (which keeps path routing). Case, a port and a final dot do not matter.
    """
    host = host.lower()
    if host.startswith("["):
        return None
    host = host.split(":")[0]
    if host.endswith("."):
        host = host[:-1]
    domains = [d.lower() for d in CONFIG_DOMAINS]
    if host in domains:
        return None
    under = [d for d in domains if host.endswith("." + d)]
    if not under:
        return None
    return host[:-len(max(under, key=len)) - 1]


def of(target: Target | None) -> Pick:
    if target is None:
        return None
    service = target.service
    return (target.project.name, service.name if service is not None else None, target.port, target.mode,
            target.http)


# -- hosts a client may send ------------------------------------------------------------------


@st.composite
def hosts(draw: st.DrawFn, known: list[str]) -> str:
    """
    A host: a label the grammar gives some project, or one made up (other
    ports, ``0``-led and out-of-range ports, a second label); under a base
    domain or another one, in any case, with a final dot and a port or not.
    """
    label = draw(st.one_of(
        st.sampled_from(known),
        st.text(REST + ".", max_size=6),
        st.tuples(st.sampled_from(known), st.sampled_from(["-", "-0", "--"]),
                  st.integers(0, 99999), st.sampled_from(MODES)).map(lambda t: f"{t[0]}{t[1]}{t[2]}{t[3]}"),
    ))
    domain = draw(st.sampled_from([DOMAIN, INNER, DOMAIN, "apps.test.evil", "xapps.test", "example.com", "test"]))
    host = draw(st.sampled_from([f"{label}.{domain}", f"{label}.{domain}", label, DOMAIN]))
    if draw(st.booleans()):
        host = "".join(c.upper() if draw(st.booleans()) else c for c in host)
    if draw(st.booleans()):
        host += "."
    if draw(st.booleans()):
        host += f":{draw(st.integers(1, 65535))}"
    return draw(st.one_of(st.just(host), st.sampled_from([host, host, host, "[::1]", "[::1]:8443", "[fe80::a]"])))


# -- the properties ---------------------------------------------------------------------------


def agrees(projects: Mapping[str, Project], names_: Names, hosts_: list[str]) -> None:
    """For each host, Names.label then resolve() pick what the reference picks."""
    want = reference(projects)
    for host in hosts_:
        label = names_.label(host)
        assert label == reference_label(host), host
        got = of(resolve(label, projects)) if label is not None else None
        assert got == (want.get(label) if label is not None else None), host


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_a_host_reaches_what_the_grammar_reading_says(data: st.DataObject) -> None:
    """
    Names.label then resolve() pick, for every host, what the brute-force
    reading picks: the project, the service, the port, the mode, whether it
    is served as HTTP; or nothing.
    """
    projects, names_ = table(data.draw(manifests(), label="projects"))
    known = sorted(reference(projects))
    agrees(projects, names_, data.draw(st.lists(hosts(known), min_size=1, max_size=20), label="hosts"))


def test_names_that_are_other_names_readings() -> None:
    """
    One table where every precedence rule decides: ``a-1`` is a project (with
    no route of its own) and project ``a``'s port 1; ``as`` is a UDP-only
    project and ``a`` with passthrough; ``a-12s`` a project and ``a``'s port
    12 with passthrough; ``a``'s route and first service share port 1, a
    UDP service (no name) and a TCP one port 12.
    """
    projects, names_ = table([
        {"name": "a", "backend": TCP_BACKEND, "listen": {"port": 1, "protocol": "tcp"},
         "services": [{"name": "svc0", "protocol": "http", "port": 1},
                      {"name": "dns", "protocol": "udp", "port": 12},
                      {"name": "svc1", "protocol": "tcp", "port": 12},
                      {"name": "syslog", "protocol": "udp", "port": 514}]},
        {"name": "a-1", "services": [{"name": "svc0", "port": 2}]},
        {"name": "as", "backend": UDP_BACKEND, "listen": {"port": 53, "protocol": "udp"}},
        {"name": "a-12s", "backend": TCP_BACKEND},
    ])
    want = reference(projects)
    assert want["a"] == ("a", None, None, "", False)
    assert want["a-1"] is None and want["a-1s"] is None and want["as"] is None
    assert want["a-1-2"] == ("a-1", "svc0", 2, "", False)
    assert want["a-12"] == ("a", "svc1", 12, "", False)
    assert want["a-12s"] == ("a-12s", None, None, "", True)
    assert want["a-12g"] == ("a", "svc1", 12, "g", False)
    assert want["a-1g"] is None  # a-1 has no route to pass through, and it is named first
    assert "a-514" not in want
    hosts_ = [f"{label}.{domain}" for label in want for domain in (DOMAIN, INNER)]
    hosts_ += ["A-1S.APPS.TEST.:443", "a-01.apps.test", "ass.apps.test", "a-2.apps.test", "a-514.apps.test", "a-70000.apps.test",
               "a-1-2s.eu.apps.test", "a.b.apps.test", "apps.test", "apps.test.", "[::1]", "[::1]:443",
               "a.apps.test.evil", "a.xapps.test"]
    agrees(projects, names_, hosts_)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(manifests())
def test_the_listed_names_are_exactly_those_that_reach_a_project(manifests_: list[dict[str, Any]]) -> None:
    """
    reaching() lists, for each project, exactly the labels (no ``s``/``g``)
    the reference says reach that project's route or service ports; each
    listed hostname, under every base domain, reaches its own target, and no
    two listed names reach the same one.
    """
    projects, names_ = table(manifests_)
    want = reference(projects)
    every: list[Pick] = []
    for project in projects.values():
        listed = list(reaching(project, projects))
        got = {label: of(target) for label, target in listed}
        assert len(got) == len(listed), listed
        assert got == {label: what for label, what in want.items()
                       if what is not None and what[0] == project.name and what[3] == ""}
        for label, target in listed:
            for host in names_.hostnames(label):
                assert of(resolve(names_.label(host) or "", projects)) == of(target), host
        every.extend(got.values())
    assert len(every) == len(set(every))


def test_a_base_domain_inside_another_keeps_path_routing() -> None:
    """
    ``eu.apps.test`` is a base domain of its own: as ``apps.test`` itself,
    it is under none (Names.label: "The domain itself is under none: it
    keeps path routing"), not the label ``eu`` under ``apps.test``; so the
    table does not list it as a hostname of a project named ``eu``.
    """
    _, names_ = table([{"name": "eu", "backend": TCP_BACKEND}])
    assert names_.label("apps.test") is None
    assert names_.label("x.eu.apps.test") == "x"
    assert names_.label("eu.apps.test") is None
    assert names_.label("EU.apps.test.:8443") is None
    assert names_.hostnames("eu") == ["eu.eu.apps.test"]
