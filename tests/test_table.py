"""
The routing table: who may bind which port, the order routes are shown in,
and that a change never alters the table it was made from (SPEC section 2,
"Ports"; section 3).
"""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from portrouter.config import listen_from
from portrouter.model import Limits, Manhole, Project, Service
from portrouter.table import PortConflict, Route, RoutingTable

INGRESS = "tcp:8080:interface=127.0.0.1"
MANHOLE = Manhole("tcp:2222:interface=127.0.0.1", "authorized_keys")
TCP_NAMESPACE = ("http", "tcp", "ws")


def project(name: str, protocol: str | None = None, port: int = 0, *, interface: str | None = None) -> Project:
    """A project with its own port (C{protocol}), or path-routed (C{None})."""
    listen = listen_from(protocol, port, interface) if protocol else None
    backend = "127.0.0.1:53" if protocol == "udp" else f"tcp:127.0.0.1:{4000 + len(name)}"
    return Project(name, backend, listen, None, (), None, Limits())


def services_only(name: str) -> Project:
    service = Service("sshd", "tcp", 22, None, Limits())
    return Project(name, None, None, "127.0.0.1", (service,), None, Limits())


def build(*projects: Project, ingress: str = INGRESS, manhole: Manhole | None = None) -> RoutingTable:
    return RoutingTable.build(ingress, manhole, projects)


def claims(table: RoutingTable) -> list[tuple[str, int | None, str | None]]:
    """(namespace, port, project) of the routes with a port of their own."""
    return [(r.namespace, r.port, r.project) for r in table.routes if r.path is None and r.project]


# --- namespaces ------------------------------------------------------------------


@pytest.mark.parametrize("first", TCP_NAMESPACE)
@pytest.mark.parametrize("second", TCP_NAMESPACE)
def test_tcp_namespace_is_shared(first: str, second: str) -> None:
    with pytest.raises(PortConflict) as info:
        build(project("a", first, 3000), project("b", second, 3000))
    assert (info.value.port, info.value.namespace) == (3000, "tcp")
    assert (info.value.holder, info.value.claimant) == ("a", "b")


@pytest.mark.parametrize("other", TCP_NAMESPACE)
def test_udp_is_a_namespace_of_its_own(other: str) -> None:
    table = build(project("dns", "udp", 5353), project("dns-tcp", other, 5353))
    assert sorted(claims(table)) == [("tcp", 5353, "dns-tcp"), ("udp", 5353, "dns")]


def test_udp_conflicts_with_udp() -> None:
    with pytest.raises(PortConflict) as info:
        build(project("dns", "udp", 5353), project("mdns", "udp", 5353))
    assert str(info.value) == "port 5353/udp is already bound by project 'dns'; project 'mdns' cannot bind it"


def test_different_interfaces_still_conflict() -> None:
    """A port is claimed whole: two interfaces of one port would depend on bind order."""
    with pytest.raises(PortConflict):
        build(project("a", "tcp", 3000, interface="127.0.0.1"), project("b", "tcp", 3000, interface="127.0.0.2"))


@pytest.mark.parametrize("protocol", TCP_NAMESPACE)
def test_ingress_port_is_reserved(protocol: str) -> None:
    with pytest.raises(PortConflict) as info:
        build(project("web", "http", 3000), project("api", protocol, 8080))
    assert str(info.value) == "port 8080/tcp is reserved for the ingress; project 'api' cannot bind it"
    assert info.value.holder == "the ingress"
    assert info.value.bound_by == "the ingress"


@pytest.mark.parametrize("protocol", TCP_NAMESPACE)
def test_manhole_port_is_reserved(protocol: str) -> None:
    with pytest.raises(PortConflict) as info:
        build(project("ssh", protocol, 2222), manhole=MANHOLE)
    assert str(info.value) == "port 2222/tcp is reserved for the manhole; project 'ssh' cannot bind it"
    build(project("ssh", protocol, 2222))  # without a manhole the port is free


def test_reserved_ports_are_tcp_only() -> None:
    table = build(project("a", "udp", 8080), project("b", "udp", 2222), manhole=MANHOLE)
    assert sorted(claims(table)) == [("udp", 2222, "b"), ("udp", 8080, "a")]


def test_port_zero_never_conflicts() -> None:
    """Port 0 asks the OS for a fresh port: for the ingress, the manhole and routes alike."""
    table = build(
        project("a", "tcp", 0), project("b", "http", 0), project("c", "ws", 0),
        project("d", "udp", 0), project("e", "udp", 0),
        ingress="tcp:0", manhole=Manhole("tcp:0", "keys"),
    )
    assert len(claims(table)) == 5


def test_unix_socket_ingress() -> None:
    table = build(project("web"), project("api", "tcp", 8080), ingress="unix:/tmp/portrouter.sock")
    assert table.routes[0] == Route(None, "http", None, "path-based routing", "unix:/tmp/portrouter.sock")
    assert table.routes[1].port is None and table.routes[1].path == "/web/"


def test_conflict_message_names_both_projects() -> None:
    with pytest.raises(PortConflict) as info:
        build(project("my-api", "http", 3000), project("web"), project("my-socket", "tcp", 3000))
    error = info.value
    assert str(error) == (
        "port 3000/tcp is already bound by project 'my-api'; project 'my-socket' cannot bind it"
    )
    assert error.bound_by == "project 'my-api'"
    assert (error.port, error.namespace, error.holder, error.claimant) == (3000, "tcp", "my-api", "my-socket")


# --- what the table shows ------------------------------------------------------------


def test_routes_sorted() -> None:
    table = build(
        project("zeta", "tcp", 9000),
        project("web"),
        project("dns", "udp", 5353),
        services_only("k1"),  # no backend: no route, still a project
        project("api", "http", 3000),
        project("dns-tcp", "tcp", 5353),
        project("docs"),
        project("vnc", "ws", 7000),
    )
    assert table.routes == (
        Route(8080, "http", None, "path-based routing", INGRESS, interface="127.0.0.1"),
        Route(8080, "http", "docs", "tcp:127.0.0.1:4004", INGRESS, path="/docs/"),
        Route(8080, "http", "web", "tcp:127.0.0.1:4003", INGRESS, path="/web/"),
        Route(3000, "http", "api", "tcp:127.0.0.1:4003", "tcp:3000"),
        Route(5353, "tcp", "dns-tcp", "tcp:127.0.0.1:4007", "tcp:5353"),
        Route(5353, "udp", "dns", "127.0.0.1:53", "udp:5353"),
        Route(7000, "ws", "vnc", "tcp:127.0.0.1:4003", "tcp:7000"),
        Route(9000, "tcp", "zeta", "tcp:127.0.0.1:4004", "tcp:9000"),
    )
    assert list(table.projects) == ["zeta", "web", "dns", "k1", "api", "dns-tcp", "docs", "vnc"]
    assert set(table.listeners()) == {"api", "dns-tcp", "dns", "vnc", "zeta"}
    assert table.listeners()["vnc"] == table.routes[6]


def test_routes_independent_of_order() -> None:
    projects = [project("web"), project("api", "http", 3000), project("dns", "udp", 53), project("b")]
    assert build(*projects).routes == build(*reversed(projects)).routes


# --- changes -----------------------------------------------------------------------


def snapshot(table: RoutingTable) -> tuple[object, ...]:
    return (table.ingress, table.manhole, dict(table.projects), table.routes)


def test_with_project_adds_and_leaves_the_original() -> None:
    table = build(project("web"), project("api", "http", 3000))
    before = snapshot(table)
    added = table.with_project(project("dns", "udp", 5353))
    assert snapshot(table) == before
    assert list(added.projects) == ["web", "api", "dns"]
    assert ("udp", 5353, "dns") in claims(added)


def test_with_project_replaces_in_place() -> None:
    table = build(project("api", "http", 3000), project("web"), project("sock", "tcp", 5000))
    before = snapshot(table)
    moved = table.with_project(project("api", "tcp", 3001))
    assert snapshot(table) == before
    assert list(moved.projects) == ["api", "web", "sock"]
    assert sorted(claims(moved)) == [("tcp", 3001, "api"), ("tcp", 5000, "sock")]


def test_replace_onto_a_port_that_it_already_holds() -> None:
    table = build(project("api", "http", 3000))
    assert claims(table.with_project(project("api", "ws", 3000))) == [("tcp", 3000, "api")]


def test_refused_change_names_the_newcomer() -> None:
    """Moving an earlier project onto a later one's port: the later one holds it."""
    table = build(project("a", "tcp", 3000), project("b", "tcp", 3001))
    before = snapshot(table)
    with pytest.raises(PortConflict) as info:
        table.with_project(project("a", "http", 3001))
    assert str(info.value) == "port 3001/tcp is already bound by project 'b'; project 'a' cannot bind it"
    assert snapshot(table) == before


def test_refused_change_on_a_reserved_port() -> None:
    table = build(project("a", "tcp", 3000), manhole=MANHOLE)
    before = snapshot(table)
    for port, holder in ((8080, "the ingress"), (2222, "the manhole")):
        with pytest.raises(PortConflict) as info:
            table.with_project(project("b", "tcp", port))
        assert (info.value.holder, info.value.claimant) == (holder, "b")
    assert snapshot(table) == before


def test_without_leaves_the_original_and_frees_the_port() -> None:
    table = build(project("web"), project("api", "http", 3000))
    before = snapshot(table)
    smaller = table.without("api")
    assert snapshot(table) == before
    assert list(smaller.projects) == ["web"]
    assert claims(smaller) == []
    assert claims(smaller.with_project(project("sock", "tcp", 3000))) == [("tcp", 3000, "sock")]
    assert [r.project for r in table.without("web").routes] == [None, "api"]


# --- a property: any sequence of deploys and deletes ----------------------------------

NAMES = ("a", "b", "c", "d", "e")
PORTS = range(3000, 3006)
PROTOCOLS = ("http", "tcp", "udp", "ws", None)  # None: path-routed
RESERVED = {3004: "the manhole", 3005: "the ingress"}


def namespace(protocol: str) -> str:
    return "udp" if protocol == "udp" else "tcp"


class TableMachine(RuleBasedStateMachine):
    """
    Deploys, replaces and deletes on a few ports, so that conflicts are common;
    the table must always match a plain dict of what was accepted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.table = RoutingTable.build("tcp:3005", Manhole("tcp:3004", "keys"), ())
        self.model: dict[str, tuple[Optional[str], int]] = {}

    def holder(self, name: str, protocol: Optional[str], port: int) -> Optional[str]:
        """Who the model says already holds the port C{name} asks for."""
        if protocol is None:
            return None
        if namespace(protocol) == "tcp" and port in RESERVED:
            return RESERVED[port]
        for other, (p, q) in self.model.items():
            if other != name and p is not None and namespace(p) == namespace(protocol) and q == port:
                return other
        return None

    @rule(name=st.sampled_from(NAMES), protocol=st.sampled_from(PROTOCOLS), port=st.sampled_from(PORTS))
    def deploy(self, name: str, protocol: Optional[str], port: int) -> None:
        before = snapshot(self.table)
        holder = self.holder(name, protocol, port)
        try:
            table = self.table.with_project(project(name, protocol, port))
        except PortConflict as e:
            assert holder is not None, f"refused: {e}"
            assert (e.holder, e.claimant, e.port) == (holder, name, port)
            assert e.namespace == namespace(protocol or "http")
            assert snapshot(self.table) == before  # refused: nothing changed
        else:
            assert holder is None, f"accepted although {holder} holds {port}"
            assert snapshot(self.table) == before  # the old table is untouched
            self.model[name] = (protocol, port)
            self.table = table

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if not self.model:
            return
        name = data.draw(st.sampled_from(sorted(self.model)))
        before = snapshot(self.table)
        table = self.table.without(name)
        assert snapshot(self.table) == before
        del self.model[name]
        self.table = table

    @invariant()
    def one_route_per_port(self) -> None:
        taken = [(ns, port) for ns, port, _ in claims(self.table)]
        assert len(taken) == len(set(taken))
        assert not any(key in taken for key in (("tcp", 3004), ("tcp", 3005)))

    @invariant()
    def table_matches_model(self) -> None:
        assert {
            name: (p.listen.protocol if p.listen else None, p.listen.port if p.listen else 3005)
            for name, p in self.table.projects.items()
        } == {name: (protocol, port if protocol else 3005) for name, (protocol, port) in self.model.items()}
        expected = sorted(
            (namespace(protocol), port, name) for name, (protocol, port) in self.model.items() if protocol
        )
        assert sorted(claims(self.table)) == expected
        paths = [r.project for r in self.table.routes if r.path is not None]
        assert paths == sorted(name for name, (protocol, _) in self.model.items() if protocol is None)
        assert self.table.routes[0].project is None


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_table_property = TableMachine.TestCase
