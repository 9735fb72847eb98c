"""
A property of the router's run-time changes (SPEC 3): whatever sequence of
deploys, replaces and deletes arrives through the API (and of changes that
deploy two projects at once, as a reload does, through C{router.change}), no
two routes share a port in one namespace, and what is bound (by the router and as the OS sees
it) is exactly what the table says; a refused change leaves listeners, table
and state file as they were and holds no extra socket.

The ports come from a small pool so that conflicts happen, plus one port held
by another socket (TCP and UDP) so that the OS refuses some binds.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet import tcp as twisted_tcp
from twisted.internet import udp as twisted_udp

from portrouter.front import Front
from portrouter.api import APIError
from portrouter.config import parse_project
from portrouter.model import Config
from portrouter.http import HTTPRoute
from portrouter.router import ChangeRefused, RouterService
from portrouter.tcp import TCPRoute
from portrouter.table import PortConflict
from portrouter.udp import UDPRoute
from portrouter.web import Request
from portrouter.ws import WSRoute
from tests.support import LOOPBACK, free_port, our_sockets, wait_for

NAMES = ["a", "b", "c"]
PROTOCOLS = ["http", "tcp", "udp", "ws"]
FACTORIES = {"http": HTTPRoute, "tcp": TCPRoute, "udp": UDPRoute, "ws": WSRoute}
HELD = 3  # the pool slot another program holds
BACKEND_PORTS = [9, 10]  # nothing is sent: which one a route has is what is checked


def namespace(protocol: str) -> str:
    return "udp" if protocol == "udp" else "tcp"


def bound(ns: str, port: int) -> bool:
    """Whether some socket holds 127.0.0.1:C{port} in C{ns} (a listening one, for TCP)."""
    kind = socket.SOCK_DGRAM if ns == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if ns == "tcp":
            # Only a listening socket stops a SO_REUSEADDR bind.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return True
        return False


@pytest.fixture
def pool() -> Iterator[list[int]]:
    """Three ports free in both namespaces, and a fourth held in both by sockets of our own."""
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        if port not in ports and not bound("tcp", port) and not bound("udp", port):
            ports.append(port)
    while True:
        tcp_holder = socket.socket()
        tcp_holder.bind((LOOPBACK, 0))
        held = tcp_holder.getsockname()[1]
        udp_holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp_holder.bind((LOOPBACK, held))
        except OSError:
            tcp_holder.close()
            udp_holder.close()
            continue
        tcp_holder.listen(1)
        break
    try:
        yield [*ports, held]
    finally:
        tcp_holder.close()
        udp_holder.close()


@pytest.fixture
def ingress(pool: list[int]) -> int:
    """The ingress's own port, outside the pool: on port 0 the OS could hand it one of the pool's."""
    while (port := free_port()) in pool:
        pass
    return port


class Answer:
    """A stand-in for the channel the API handler answers on."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.status = 0

    def send(self, status: int, body: bytes, content_type: bytes = b"", headers: Any = ()) -> None:
        self.sent.append((status, body))

    def respond(self, status: int, headers: Any, *, length: int | None) -> None:
        self.status = status

    def finish(self) -> None:
        self.sent.append((self.status, b""))


async def call(router: RouterService, method: bytes, name: str, body: Any = None) -> tuple[int, Any]:
    """One API request, handed to the router's API handler in-process (from loopback)."""
    request = Request(LOOPBACK, False, 0.0)
    request.method = method
    request.target = request.path = f"/_api/projects/{name}".encode()
    channel = Answer()
    handler = router.front.api.handler(channel, request, f"projects/{name}".encode())  # type: ignore[arg-type]
    if body is not None:
        handler.body(json.dumps(body).encode())
    handler.end()
    await wait_for(lambda: channel.sent, 10, "the API's answer")
    status, raw = channel.sent[0]
    return status, (json.loads(raw) if raw else None)


def ours_bound(ports: list[int]) -> set[tuple[str, int]]:
    """Which of C{ports} this process holds (see L{our_sockets})."""
    return set(our_sockets(ports))


async def os_agrees(model: Model, pool: list[int]) -> None:
    """
    The pool's ports bound by the router, as the OS sees them, are exactly the
    model's. Released ports close on one of the reactor's next turns: let it
    turn until they have; a socket that stays open fails at the deadline.
    """
    held_by_router = {(namespace(protocol), port) for protocol, port, _ in model.values()}
    want = {(ns, port): (ns, port) in held_by_router for port in pool[:HELD] for ns in ("tcp", "udp")}
    deadline = time.monotonic() + 10
    while True:
        ours = ours_bound(pool[:HELD])
        seen = {key: key in ours for key in want}
        if seen == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the OS sees {seen}, the model wants {want}")
        await task.deferLater(reactor, 0, lambda: None)


Model = dict[str, tuple[str, int, int]]  # name -> (protocol, port, backend port)


def served_project(factory: Any) -> Any:
    """The project a listener's factory answers for (an HTTP route keeps it in its site)."""
    return factory.site.project if isinstance(factory, HTTPRoute) else factory.project


def conflicts(model: Model, name: str, protocol: str, port: int) -> bool:
    return any(other != name and namespace(other_protocol) == namespace(protocol) and other_port == port
               for other, (other_protocol, other_port, _) in model.items())


def expected(model: Model, op: tuple[Any, ...], pool: list[int]) -> tuple[int, str | None]:
    """What the API must answer to C{op}, given the projects deployed (C{model})."""
    if op[0] == "delete":
        return (204, None) if op[1] in model else (404, "not_found")
    if op[0] == "pair":
        _, first, second, _ = op
        after_first = {**model, first[0]: (first[1], pool[first[2]], 0)}
        if conflicts(model, first[0], first[1], pool[first[2]]) or \
                conflicts(after_first, second[0], second[1], pool[second[2]]):
            return 409, "port_conflict"
        if HELD in (first[2], second[2]):
            return 409, "port_unavailable"
        # A port one project gives up and another takes in the same change
        # is handed over, not bound again.
        return 200, None
    _, name, protocol, slot, _ = op
    if conflicts(model, name, protocol, pool[slot]):
        return 409, "port_conflict"
    if slot == HELD:
        return 409, "port_unavailable"
    return (200 if name in model else 201), None


def manifest(name: str, protocol: str, port: int, backend_port: int) -> dict[str, Any]:
    backend = f"{LOOPBACK}:{backend_port}"
    if protocol != "udp":
        backend = f"tcp:{backend}"
    return {"name": name, "backend": backend, "listen": {"port": port, "protocol": protocol, "interface": LOOPBACK}}


async def change_two(router: RouterService, first: dict[str, Any], second: dict[str, Any]) -> tuple[int, Any]:
    """Two projects in one change, as a reload makes it: bound all or nothing."""
    try:
        table = router.table.with_project(parse_project(first, static=False)) \
            .with_project(parse_project(second, static=False))
    except PortConflict:
        return 409, {"error": {"code": "port_conflict"}}
    try:
        await router.serialised(lambda: router.change(table, persist=True))
    except ChangeRefused as e:
        error = APIError.refused(e)
        return error.status, json.loads(error.body())
    return 200, None


def check(router: RouterService, model: Model, pool: list[int], state_file: Path) -> None:
    table = router.table
    # No two routes share a port in one namespace.
    claims = [(r.namespace, r.port) for r in table.routes if r.project is not None and r.path is None]
    assert len(claims) == len(set(claims)), table.routes
    # The listeners are exactly the table's, on the table's ports, answering as the table says.
    wanted = table.listeners()
    assert set(router.listeners) == set(wanted) == set(model)
    for name, listener in router.listeners.items():
        protocol, port, backend = model[name]
        assert listener.route == wanted[name]
        assert (listener.route.protocol, listener.route.port) == (protocol, port)
        assert listener.port.getHost().port == port
        assert type(listener.factory) is FACTORIES[protocol]
        assert served_project(listener.factory) == table.projects[name]
        assert listener.route.backend.endswith(f":{backend}")
        if protocol == "udp":
            assert isinstance(listener.port, twisted_udp.Port) and listener.port.protocol is listener.factory
        else:
            assert isinstance(listener.port, twisted_tcp.Port) and listener.port.factory is listener.factory
    assert sorted(s.name for s in router) == sorted(["_ingress", "_events", *model])  # _events: the dashboard's
    # The state file lists the same projects.
    if state_file.exists():
        saved = json.loads(state_file.read_text())["projects"]
        assert {p["name"]: (p["listen"]["protocol"], p["listen"]["port"], int(p["backend"].rsplit(":", 1)[1]))
                for p in saved} == model
    else:
        assert model == {}


def listen_of() -> Any:
    return st.tuples(st.sampled_from(PROTOCOLS), st.integers(0, HELD))


operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(NAMES), st.sampled_from(PROTOCOLS), st.integers(0, HELD),
                  st.sampled_from(BACKEND_PORTS)),
        st.tuples(st.just("delete"), st.sampled_from(NAMES)),
        st.builds(
            lambda names, first, second, backend: ("pair", (names[0], *first), (names[1], *second), backend),
            st.permutations(NAMES), listen_of(), listen_of(), st.sampled_from(BACKEND_PORTS),
        ),
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
# A port handed over in a change that then fails on a port the OS refuses,
# whichever of the two is prepared first: the giver keeps it, untouched.
@example(ops=[("put", "a", "tcp", 0, 9), ("pair", ("a", "tcp", HELD), ("b", "http", 0), 10)])
@example(ops=[("put", "a", "udp", 0, 9), ("pair", ("b", "udp", 0), ("a", "udp", HELD), 10)])
# Handed over, then handed on again.
@example(ops=[("put", "a", "udp", 0, 9), ("pair", ("a", "udp", 1), ("b", "udp", 0), 10),
              ("pair", ("b", "udp", 2), ("c", "udp", 0), 9), ("delete", "c")])
@example(ops=[("put", "a", "ws", 0, 9), ("pair", ("a", "tcp", 1), ("b", "http", 0), 10),
              ("pair", ("b", "tcp", 2), ("c", "tcp", 0), 9), ("put", "c", "ws", 0, 10)])
@pytest_twisted.ensureDeferred
async def test_any_sequence_of_changes_keeps_the_listeners_equal_to_the_table(
    pool: list[int], ingress: int, tmp_path: Path, ops: list[tuple[Any, ...]]
) -> None:
    state = Path(tempfile.mkdtemp(dir=tmp_path))
    state_file = state / "projects.json"
    router = RouterService(Config(ingress=f"tcp:{ingress}:interface={LOOPBACK}", state=str(state), drain_timeout=1), reactor, Front)
    router.privilegedStartService()
    router.startService()
    model: Model = {}
    try:
        for op in ops:
            listeners, table = dict(router.listeners), router.table
            saved = state_file.read_bytes() if state_file.exists() else None
            want_status, want_code = expected(model, op, pool)
            if op[0] == "put":
                _, name, protocol, slot, backend_port = op
                status, body = await call(router, b"PUT", name, manifest(name, protocol, pool[slot], backend_port))
            elif op[0] == "pair":
                _, (first, first_protocol, first_slot), (second, second_protocol, second_slot), backend_port = op
                status, body = await change_two(
                    router,
                    manifest(first, first_protocol, pool[first_slot], backend_port),
                    manifest(second, second_protocol, pool[second_slot], backend_port),
                )
            else:
                status, body = await call(router, b"DELETE", op[1])
            assert status == want_status, (op, model, body)
            if want_code is not None:
                assert body["error"]["code"] == want_code, (op, body)
                # Refused: nothing changed, not even for a moment.
                assert router.listeners == listeners and router.table is table
                assert (state_file.read_bytes() if state_file.exists() else None) == saved
            elif op[0] == "put":
                model[op[1]] = (op[2], pool[op[3]], op[4])
            elif op[0] == "pair":
                for name, protocol, slot in op[1:3]:
                    model[name] = (protocol, pool[slot], op[3])
            else:
                del model[op[1]]
            await os_agrees(model, pool)
            check(router, model, pool, state_file)
    finally:
        await router.stopService()
    # Stopped: nothing of the pool stays bound.
    assert ours_bound(pool[:HELD]) == set()
