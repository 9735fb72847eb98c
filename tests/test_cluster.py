"""
Several routers, one table (SPEC 13): a real redis-server on a loopback port
of its own, routers in this process and real ``twistd -n portrouter``
processes sharing it; SO_REUSEPORT (``reuse_port: true``).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from portrouter.cluster import HEARTBEAT, ClusterStore, cluster_store
from portrouter.config import ConfigError, parse, with_cli
from portrouter.front import Front
from portrouter.model import Cluster, Config
from portrouter.router import RouterService
from portrouter.tap import Options
from tests.httpbackend import Backend
from tests.pki import CA
from tests.support import (
    LOOPBACK, ClockedReactor, ThreadServer, Twistd, free_port, in_thread, start_router, stop_clocked, wait_for,
)
from tests.test_api import api, call, connect, distinct_ports, echo, http_get, listen, refuses, say, until_refused

# -- a redis-server of the test's own ------------------------------------------------------------


class Redis:
    """
    redis-server on a free loopback port, writing nothing to disk unless a
    test asks it to SAVE: a restart then comes back with what was saved, as
    a Redis with persistence does.
    """

    def __init__(self, directory: Path, port: int | None = None, tls: CA | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.tls = tls  # TLS only, with a certificate for localhost from this CA
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.tls is not None:
            return f"tls:localhost:{self.port}:trustRoots={self.tls.roots}"
        return f"tcp:{LOOPBACK}:{self.port}"

    async def start(self) -> Redis:
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key = self.tls.issue_pair("localhost")
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", self.tls.path, "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--dbfilename", "dump.rdb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            try:
                return bool(self.command("PING") == "PONG")
            except OSError:
                return False

        await wait_for(answers, what=f"redis-server on port {self.port} to answer PING")
        return self

    def kill(self) -> None:
        """SIGKILL: Redis gone at once, as a crash takes it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def command(self, *args: str) -> Any:
        """One command over a socket of the test's own (RESP), its reply decoded."""
        with socket.create_connection((LOOPBACK, self.port), timeout=10) as plain:
            sock = plain
            if self.tls is not None:
                sock = ssl.create_default_context(cafile=self.tls.path).wrap_socket(plain, server_hostname="localhost")
            sock.sendall(b"".join([f"*{len(args)}\r\n".encode(), *(
                f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)]))
            return _reply(sock.makefile("rb"))


def _reply(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise AssertionError(f"redis error: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else reader.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_reply(reader) for _ in range(int(rest))]
    raise AssertionError(f"unexpected reply {line!r}")


@pytest.fixture
def redis_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "redis"
    directory.mkdir()
    yield directory


@pytest_twisted.async_yield_fixture
async def redis(redis_dir: Path) -> Any:
    """A started redis-server, killed after the test."""
    server = await Redis(redis_dir).start()
    yield server
    server.kill()


@pytest.fixture
def backend() -> Iterator[ThreadServer]:
    """A TCP echo server."""
    server = ThreadServer(echo)
    yield server
    server.close()


def cluster_config(redis: Redis, node: str, prefix: str = "portrouter", **config: Any) -> Config:
    config.setdefault("ingress", f"tcp:0:interface={LOOPBACK}")
    config.setdefault("drain_timeout", 5.0)
    config.setdefault("reuse_port", True)
    return Config(cluster=Cluster(redis.endpoint, prefix, node), **config)


def start_member(config: Config, routes: tuple[tuple[str, str], ...] = ()) -> RouterService:
    """A started router of the cluster in this process, on the real reactor."""
    assert config.cluster is not None
    router = RouterService(with_cli(config, routes=routes), reactor, Front, store=cluster_store(config.cluster))
    router.privilegedStartService()
    router.startService()
    return router


async def synced(redis: Redis, *nodes: str) -> list[RouterService]:
    """Started routers of the cluster, once each has read the table."""
    routers = [start_member(cluster_config(redis, node)) for node in nodes]
    await wait_for(lambda: all(store_of(r).synced for r in routers), what="every router to read the table")
    return routers


@pytest_twisted.async_yield_fixture
async def pair(redis: Redis) -> Any:
    """Routers a and b of one cluster, synced; stopped after the test."""
    routers = await synced(redis, "a", "b")
    yield routers
    for router in routers:
        await router.stopService()


def store_of(router: RouterService) -> ClusterStore:
    assert isinstance(router.store, ClusterStore)
    return router.store


def tcp_manifest(port: int, backend: int) -> dict[str, Any]:
    return {"backend": f"tcp:{LOOPBACK}:{backend}", "listen": listen(port, "tcp")}


def echoes(port: int, message: bytes) -> bool:
    with connect(port) as sock:
        return say(sock, message) == message


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values


async def metric(ingress: int, name: str, **labels: str) -> float:
    status, text = await in_thread(http_get, ingress, "/_api/metrics")
    assert status == 200
    return metric_values(text.decode()).get((name, frozenset(labels.items())), 0.0)


async def eventually(condition: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    """L{wait_for} for a condition that has to ask over the network: every 20 ms until true, or fail."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)
    return value


def listening(port: int, pid: int | None = None) -> int:
    """How many listening TCP sockets on 127.0.0.1:C{port} (those of process C{pid} only, if given)."""
    inodes = None
    if pid is not None:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        ip, hexport = fields[1].split(":")
        if ip == "0100007F" and int(hexport, 16) == port and fields[3] == "0A":
            if inodes is None or fields[9] in inodes:
                count += 1
    return count


# -- config ------------------------------------------------------------------------------------


def test_node_on_the_command_line_names_the_router(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text("cluster: {redis: 'tcp:127.0.0.1:6379', node: from-file}\n")
    options = Options()
    options.parseOptions(["--config", str(config), "--node", "edge-2"])
    assert options["parsed"].cluster.node == "edge-2"
    bare = Options()
    with pytest.raises(ConfigError, match="^--node: 'edge-2' names a router of a cluster, and the config has no "
                                          "cluster section$"):
        bare["node"] = "edge-2"
        bare.read_config()


def test_the_cluster_section_is_parsed_with_defaults() -> None:
    config = parse({"cluster": {"redis": "tcp:127.0.0.1:6379"}, "reuse_port": True})
    assert config.cluster == Cluster("tcp:127.0.0.1:6379", "portrouter", socket.gethostname())
    assert config.reuse_port is True
    tls = parse({"cluster": {"redis": "tls:redis.example:6380", "prefix": "edge:eu", "node": "edge-1"}})
    assert tls.cluster == Cluster("tls:redis.example:6380", "edge:eu", "edge-1")
    assert parse({}).cluster is None and parse({}).reuse_port is False


@pytest.mark.parametrize("data, message", [
    ({"cluster": {}}, "cluster.redis: is required (a client endpoint, e.g. tcp:127.0.0.1:6379)"),
    ({"cluster": {"redis": "redis://h:6379"}}, "cluster.redis: 'redis://h:6379' is not a client endpoint: "
                                               "Unknown endpoint type: 'redis'"),
    ({"cluster": {"redis": "tcp:h:1", "prefix": "my prefix"}},
     "cluster.prefix: 'my prefix' is not a key prefix (1 to 64 letters, digits, '_', '.', ':' or '-')"),
    ({"cluster": {"redis": "tcp:h:1", "node": 7}}, "cluster.node: expected a string, got 7"),
    ({"cluster": {"redis": "tcp:h:1", "nodes": "a"}}, "cluster.nodes: unknown key (did you mean 'node'?)"),
    ({"cluster": "tcp:h:1"}, "cluster: expected a mapping"),
    ({"reuse_port": "yes"}, "reuse_port: expected true or false, got 'yes'"),
])
def test_a_bad_cluster_section_is_refused_quoting_the_value(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert str(info.value).startswith(message)


# -- routers in this process ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_a_cluster_nodes_is_404_no_cluster(tmp_path: Path) -> None:
    router = await start_router(config=Config(ingress=f"tcp:0:interface={LOOPBACK}", state=str(tmp_path)))
    try:
        status, body = await api(router.port_of(), "GET", "/_api/nodes")
        assert status == 404 and body["error"]["code"] == "no_cluster"
    finally:
        await router.stopService()


def change_from_elsewhere(redis: Redis, name: str, manifest: dict[str, Any]) -> int:
    """A deploy as a router on another host makes it: the project, a new version, published."""
    script = ("redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]); local v = redis.call('INCR', KEYS[2]); "
              "redis.call('PUBLISH', KEYS[3], v); return v")
    return int(redis.command("EVAL", script, "3", "portrouter:projects", "portrouter:version", "portrouter:changes",
                             name, json.dumps({"name": name, **manifest})))


@pytest_twisted.ensureDeferred
async def test_a_change_this_router_cannot_bind_is_reported_and_the_rest_served(
        tmp_path: Path, redis: Redis, backend: ThreadServer) -> None:
    taken, mine, other = distinct_ports(3)
    # Another program on this host holds `taken`.
    holder = socket.socket()
    holder.bind((LOOPBACK, taken))
    holder.listen()
    a = start_member(cluster_config(redis, "a"))
    # b's own config file has a project on `mine` (on 127.0.0.2: the OS lets
    # a bind 127.0.0.1, the table does not let b serve both).
    b = start_member(cluster_config(redis, "b"),
                     routes=(("tcp", f"tcp:{mine}:interface=127.0.0.2 -> tcp:{LOOPBACK}:{backend.port}"),))
    try:
        await wait_for(lambda: store_of(a).synced and store_of(b).synced, what="both to read the table")
        # Through this host's router a, `taken` is refused at once: a binds before it answers.
        status, body = await api(a.port_of(), "PUT", "/_api/projects/blocked", tcp_manifest(taken, backend.port))
        assert (status, body["error"]["code"]) == (409, "port_unavailable")
        # A router on another host deploys it there.
        assert change_from_elsewhere(redis, "blocked", tcp_manifest(taken, backend.port)) == 1
        for name, port in (("clash", mine), ("fine", other)):
            status, body = await api(a.port_of(), "PUT", f"/_api/projects/{name}", tcp_manifest(port, backend.port))
            assert status == 201, body
        await wait_for(lambda: "fine" in b.listeners and "fine" in a.listeners, what="both to serve 'fine'")
        assert set(b.listeners) == {"fine", f"tcp-{mine}"} and set(a.listeners) == {"clash", "fine"}
        assert b.table.projects[f"tcp-{mine}"].static
        assert await in_thread(echoes, other, b"still served")

        async def reported() -> Any:
            status, body = await api(b.port_of(), "GET", "/_api/nodes")
            assert status == 200
            nodes = {n["node"]: n for n in body["nodes"]}
            settled = set(nodes) == {"a", "b"} and all(n["table_version"] == 3 for n in nodes.values())
            return nodes if settled else None

        nodes = await eventually(reported, "both nodes to report table version 3")
        assert nodes["a"]["failed"] == [
            {"project": "blocked", "reason": f"cannot bind port {taken}/tcp for project 'blocked': "
                                             "Address already in use"}]
        assert nodes["b"]["failed"] == [
            {"project": "blocked", "reason": f"cannot bind port {taken}/tcp for project 'blocked': "
                                             "Address already in use"},
            {"project": "clash", "reason": f"port {mine}/tcp is already bound by project 'tcp-{mine}'; "
                                           "project 'clash' cannot bind it"},
        ]
        for node in nodes.values():
            assert node["version"] == "0.1.0" and 0 <= node["last_seen"] <= 10
        assert await metric(b.port_of(), "portrouter_cluster_failed_changes", node="b") == 2
        assert await metric(b.port_of(), "portrouter_cluster_table_version", node="a") == 3
        # The program goes away: the next change of the table tries again.
        holder.close()
        assert (await api(a.port_of(), "DELETE", "/_api/projects/fine"))[0] == 204
        # Each binds during its apply and notes what failed when the apply
        # ends (a removed port drains first): the version it has applied says so.
        await wait_for(lambda: store_of(b).version == 4 and store_of(a).version == 4, what="both to apply version 4")
        assert "blocked" in b.listeners and "fine" not in b.listeners and "blocked" in a.listeners
        assert set(store_of(b).failed) == {"clash"} and store_of(a).failed == {}
    finally:
        holder.close()
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_over_tls(tmp_path: Path, redis_dir: Path, backend: ThreadServer) -> None:
    redis = await Redis(redis_dir, tls=CA(tmp_path / "ca")).start()
    a, b = await synced(redis, "a", "b")
    try:
        assert redis.endpoint.startswith("tls:localhost:")
        port = free_port()
        assert (await api(a.port_of(), "PUT", "/_api/projects/x", tcp_manifest(port, backend.port)))[0] == 201
        await wait_for(lambda: "x" in b.listeners, what="b to apply the change")
        assert await in_thread(echoes, port, b"over tls")
    finally:
        await a.stopService()
        await b.stopService()
        redis.kill()


@pytest_twisted.ensureDeferred
async def test_a_node_not_heard_of_for_10_s_is_not_listed(redis: Redis) -> None:
    router = start_member(cluster_config(redis, "alive"))
    try:
        await wait_for(lambda: store_of(router).synced, what="the router to read the table")
        # Redis's own clock, to the microsecond (its seconds alone are up to
        # a second behind, which put "quiet" past 10 s once), and ages far
        # from the 10 s line on both sides: no race with the request's time.
        seconds, micros = redis.command("TIME")
        now = int(seconds) + int(micros) / 1e6
        for node, ago in (("quiet", 5), ("gone", 15)):
            beat = {"node": node, "version": "0.1.0", "table_version": 0, "failed": []}
            redis.command("HSET", "portrouter:nodes", node, json.dumps(beat))
            redis.command("HSET", "portrouter:seen", node, str(now - ago))
        status, body = await api(router.port_of(), "GET", "/_api/nodes")
        assert status == 200
        assert [n["node"] for n in body["nodes"]] == ["alive", "quiet"]
        quiet = body["nodes"][1]
        assert 5 <= quiet["last_seen"] < 10 and quiet["failed"] == [] and quiet["table_version"] == 0
        assert await metric(router.port_of(), "portrouter_cluster_last_seen_seconds", node="quiet") >= 5
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_a_lost_message_is_caught_by_the_version_check(pair: list[RouterService],
                                                             backend: ThreadServer) -> None:
    a, b = pair
    # b's subscription delivers nothing from now on, as if every message were lost.
    dropped: list[Any] = []
    store_of(b).published = dropped.append  # type: ignore[method-assign]
    port = free_port()
    assert (await api(a.port_of(), "PUT", "/_api/projects/cluster", tcp_manifest(port, backend.port)))[0] == 201
    await wait_for(lambda: "cluster" in b.listeners, what="b's heartbeat to notice the new version")
    assert dropped == ["1"]  # the message came, and was not what b acted on
    assert store_of(b).version == 1


@pytest_twisted.ensureDeferred
async def test_a_router_started_while_redis_is_down_serves_its_own_and_joins_later(
        redis_dir: Path, backend: ThreadServer) -> None:
    redis = Redis(redis_dir)  # not started
    own, remote = distinct_ports(2)
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "portrouter.cluster" and "log_format" in event:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    router = start_member(cluster_config(redis, "lone"),
                          routes=(("tcp", f"tcp:{own}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{backend.port}"),))
    try:
        await wait_for(lambda: any("unreachable" in line for line in lines), what="the router to say so")
        assert [line for line in lines if "unreachable" in line] == [
            f"cluster: redis at {redis.endpoint} is unreachable; serving the 1 projects of this router's own "
            "config until it is back"]
        assert await in_thread(echoes, own, b"own")
        status, body = await api(router.port_of(), "PUT", "/_api/projects/x", tcp_manifest(remote, backend.port))
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        assert body["error"]["message"] == (f"the cluster's store (redis at {redis.endpoint}) is unavailable "
                                            "(not connected); nothing was changed")
        status, body = await api(router.port_of(), "GET", "/_api/nodes")
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        await redis.start()
        # Another router deployed x meanwhile.
        change_from_elsewhere(redis, "x", tcp_manifest(remote, backend.port))
        await wait_for(lambda: "x" in router.listeners, what="the router to read the table once redis is up")
        assert router.table.projects["x"].static is False
    finally:
        globalLogPublisher.removeObserver(observe)
        await router.stopService()
        redis.kill()


@pytest_twisted.ensureDeferred
async def test_a_redis_restarted_empty_is_followed(redis: Redis, pair: list[RouterService],
                                                   backend: ThreadServer) -> None:
    # Redis is the table: one restarted without persistence comes back
    # empty, and the routers re-read it whole on reconnection.
    a, b = pair
    port = free_port()
    assert (await api(a.port_of(), "PUT", "/_api/projects/x", tcp_manifest(port, backend.port)))[0] == 201
    await wait_for(lambda: "x" in b.listeners, what="b to serve x")
    redis.kill()
    await redis.start()  # nothing saved: empty
    # A router's version is the table it has applied: set once its apply
    # is over, a turn or more after the listeners left (ports released).
    await wait_for(lambda: store_of(a).version == store_of(b).version == 0, what="both to follow the empty table")
    assert not a.listeners and not b.listeners
    await until_refused(port)


@pytest_twisted.ensureDeferred
async def test_a_reload_keeps_the_cluster_section_and_says_so(redis: Redis) -> None:
    config = cluster_config(redis, "a")
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    router = RouterService(config, reactor, Front, lambda: replace(config, reuse_port=False,
                                                                   cluster=Cluster(redis.endpoint, "other", "b")),
                           store=cluster_store(config.cluster))  # type: ignore[arg-type]
    router.privilegedStartService()
    router.startService()
    globalLogPublisher.addObserver(observe)
    try:
        await router.reload()
        assert "reload: the cluster section and reuse_port stay as they are until a restart" in lines
        assert store_of(router).cluster.node == "a" and router.config.reuse_port is True
    finally:
        globalLogPublisher.removeObserver(observe)
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_two_routers_with_reuse_port_share_a_udp_port(redis: Redis) -> None:
    port = free_port(socket.SOCK_DGRAM)
    route = (("udp", f"udp:{port}:interface={LOOPBACK} -> {LOOPBACK}:9"),)
    a = start_member(cluster_config(redis, "a"), routes=route)
    b = start_member(cluster_config(redis, "b"), routes=route)
    try:
        assert a.listeners[f"udp-{port}"].port.getHost().port == b.listeners[f"udp-{port}"].port.getHost().port == port
        # Without reuse_port the same second bind is refused: the option is what shares it.
        with pytest.raises(Exception, match="Address already in use"):
            start_member(cluster_config(redis, "c", reuse_port=False), routes=route)
    finally:
        await a.stopService()
        await b.stopService()


# -- three real twistd processes -----------------------------------------------------------------


class Member:
    """A real ``twistd -n portrouter`` of the cluster, with its ingress port."""

    def __init__(self, daemon: Twistd, node: str):
        self.daemon = daemon
        self.node = node
        self.ingress = 0

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid


async def start_members(tmp_path: Path, redis: Redis, nodes: list[str], *, ingress: int = 0,
                        lines: tuple[str, ...] = (), shared: bool = False) -> list[Member]:
    """
    Routers of one cluster, a config file each; with C{shared}, one file for
    all, each told its node name by C{--node} (as the README's systemd
    template unit runs them).
    """
    members = []
    for node in nodes:
        config = tmp_path / ("shared.yaml" if shared else f"{node}.yaml")
        text = [f"ingress: tcp:{ingress}:interface={LOOPBACK}", f"state: {tmp_path / node}",
                "drain_timeout: 30", "reuse_port: true",
                f"cluster: {{redis: 'tcp:{LOOPBACK}:{redis.port}'{'' if shared else f', node: {node}'}}}", *lines]
        config.write_text("\n".join(text) + "\n")
        members.append(Member(Twistd("--config", str(config), *(["--node", node] if shared else [])), node))
    for member in members:
        member.ingress = await member.daemon.ingress_port()
        await member.daemon.wait_line(r"cluster: table version \d+ applied")
    return members


def stop_members(members: list[Member]) -> None:
    for member in members:
        member.daemon.stop()


async def projects_of(member: Member) -> dict[str, Any]:
    status, body = await api(member.ingress, "GET", "/_api/projects")
    assert status == 200
    return {p["name"]: p for p in body["projects"] if p["source"] == "api"}


async def tables_equal(members: list[Member]) -> Any:
    tables = [await projects_of(m) for m in members]
    return tables[0] if all(t == tables[0] for t in tables) else None


@pytest_twisted.ensureDeferred
async def test_three_routers_one_table_through_changes_outages_and_lost_messages(
        tmp_path: Path, redis: Redis, backend: ThreadServer) -> None:
    web = Backend()
    web_port, echo_port, late_port, later_port = distinct_ports(4)
    members = await start_members(tmp_path, redis, ["a", "b", "c"])
    a, b, c = members
    held: list[socket.socket] = []
    try:
        # Deployed on a ...
        for name, manifest in (("web", {"backend": web.address, "listen": listen(web_port, "http")}),
                               ("app", {"backend": web.address}),
                               ("echo", tcp_manifest(echo_port, backend.port))):
            status, body = await api(a.ingress, "PUT", f"/_api/projects/{name}", manifest)
            assert status == 201, body
        # ... served by b and c by path, on their own ingress ports,
        for member in (b, c):
            await wait_for(lambda m=member: listening(web_port, m.pid) == 1 and listening(echo_port, m.pid) == 1,
                           what=f"{member.node} to bind the projects' ports")
        for member in (b, c):
            status, text = await in_thread(http_get, member.ingress, "/app/x")
            assert status == 200 and text.startswith(b"backend saw GET /"), text
        # ... and by port: all three share it, and each answers some of the requests.
        assert listening(web_port) == 3

        async def each_served_web() -> bool:
            for _ in range(10):
                assert (await in_thread(http_get, web_port, "/"))[0] == 200
            return all([await metric(m.ingress, "portrouter_http_requests_total", project="web", code="2xx") > 0
                        for m in members])

        await eventually(each_served_web, "every router to answer on the shared port")

        # Connections on echo's port, until each router holds some.
        async def each_holds_one() -> bool:
            for _ in range(6):
                sock = await in_thread(connect, echo_port)
                held.append(sock)
                assert await in_thread(say, sock, b"hi") == b"hi"
            return all([await metric(m.ingress, "portrouter_connections_active", project="echo", protocol="tcp") > 0
                        for m in members])

        await eventually(each_holds_one, "every router to hold a connection on echo's port")

        # Deleted on c: released on all three, the open connections drain (they go on).
        assert (await api(c.ingress, "DELETE", "/_api/projects/echo"))[0] == 204
        assert (await api(c.ingress, "DELETE", "/_api/projects/app"))[0] == 204
        await wait_for(lambda: listening(echo_port) == 0, what="every router to release echo's port")
        assert await in_thread(refuses, echo_port)
        for sock in held:
            assert await in_thread(say, sock, b"still here") == b"still here"
        for member in members:
            assert (await in_thread(http_get, member.ingress, "/app/x"))[0] == 404
        assert set(await eventually(lambda: tables_equal(members), "the tables to agree")) == {"web"}

        # Redis dies: everyone keeps serving, changes are refused with 503.
        assert redis.command("SAVE") == "OK"
        redis.kill()
        for member in members:
            status, body = await api(member.ingress, "PUT", "/_api/projects/late", tcp_manifest(late_port, backend.port))
            assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
            assert (await in_thread(http_get, web_port, "/"))[0] == 200
        # Back (with what it had saved): the routers reconnect, changes go through and reach all.
        await redis.start()

        async def deployed() -> bool:
            status, _ = await api(b.ingress, "PUT", "/_api/projects/late", tcp_manifest(late_port, backend.port))
            assert status in (201, 503)
            return status == 201

        await eventually(deployed, "b to accept changes again")
        await wait_for(lambda: listening(late_port) == 3, what="every router to bind late's port")
        assert set(await eventually(lambda: tables_equal(members), "the tables to agree")) == {"web", "late"}

        # Every subscription killed: the next change still reaches every router.
        assert redis.command("CLIENT", "KILL", "TYPE", "pubsub") == 3
        status, _ = await api(a.ingress, "PUT", "/_api/projects/later", tcp_manifest(later_port, backend.port))
        assert status == 201
        await wait_for(lambda: listening(later_port) == 3, what="every router to bind later's port")
        assert set(await eventually(lambda: tables_equal(members), "the tables to agree")) == {"web", "late", "later"}
        # ... and each router subscribes again.
        await wait_for(lambda: redis.command("PUBSUB", "NUMSUB", "portrouter:changes") == ["portrouter:changes", 3],
                       what="the three subscriptions to come back")
    finally:
        for sock in held:
            sock.close()
        stop_members(members)
        web.close()


ROUNDS = 50


@pytest_twisted.ensureDeferred
async def test_two_conflicting_deploys_at_once_exactly_one_wins_every_round(
        tmp_path: Path, redis: Redis, backend: ThreadServer) -> None:
    members = await start_members(tmp_path, redis, ["a", "b", "c"])
    a, b, _ = members
    ports = distinct_ports(ROUNDS)
    try:
        for round, port in enumerate(ports):
            start = threading.Barrier(2)

            def deploy(member: Member, name: str) -> tuple[int, Any]:
                start.wait(10)  # both requests leave at the same instant
                status, _, raw = call(member.ingress, "PUT", f"/_api/projects/{name}",
                                      tcp_manifest(port, backend.port))
                return status, json.loads(raw)

            results = await defer.gatherResults([in_thread(deploy, a, f"r{round}-a"),
                                                 in_thread(deploy, b, f"r{round}-b")])
            statuses = sorted(status for status, _ in results)
            assert statuses == [201, 409], (round, results)
            winner = next(body["name"] for status, body in results if status == 201)
            loser = next(body for status, body in results if status == 409)
            assert loser["error"] == {
                "code": "port_conflict", "field": "listen.port",
                "message": f"port {port}/tcp is already bound by project {winner!r}"}, (round, results)
        tables = await eventually(lambda: tables_equal(members), "the three tables to agree")
        assert len(tables) == ROUNDS
        assert sorted(p["listen"]["port"] for p in tables.values()) == sorted(ports)
    finally:
        stop_members(members)


@pytest_twisted.ensureDeferred
async def test_two_routers_with_reuse_port_on_one_port_both_accept(
        tmp_path: Path, redis: Redis, backend: ThreadServer) -> None:
    shared, own = distinct_ports(2)
    # The same ingress port for both, and a project of their own config on another.
    project = (f"projects: [{{name: echo, backend: 'tcp:{LOOPBACK}:{backend.port}', "
               f"listen: {{port: {own}, protocol: tcp, interface: {LOOPBACK}}}}}]",)
    members = await start_members(tmp_path, redis, ["host-1", "host-2"], ingress=shared, lines=project, shared=True)
    try:
        assert [m.ingress for m in members] == [shared, shared]
        for port in (shared, own):
            assert [listening(port, m.pid) for m in members] == [1, 1]

        # Each logs the connections it accepted: new connections, until both have.
        async def both_accepted() -> bool:
            for _ in range(10):
                assert await in_thread(echoes, own, b"x")
                assert (await in_thread(http_get, shared, "/_api/projects"))[0] == 200
            return all(m.daemon.find(r"tcp echo 127\.0\.0\.1:\d+: client closed")
                       and m.daemon.find(r"GET /_api/projects 200") for m in members)

        await eventually(both_accepted, "both routers to accept connections on both ports")

        # One config file, two nodes: --node names each.
        async def both_listed() -> bool:
            status, body = await api(shared, "GET", "/_api/nodes")
            return status == 200 and [n["node"] for n in body["nodes"]] == ["host-1", "host-2"]

        await eventually(both_listed, "both nodes to be listed")
    finally:
        stop_members(members)


@pytest_twisted.ensureDeferred
async def test_a_lost_message_is_noticed_at_the_next_heartbeat(redis: Redis, backend: ThreadServer) -> None:
    """
    README: "a lost message is noticed within a second". On b's own clock:
    with its messages lost, a change made through a is not b's until one
    heartbeat (HEARTBEAT, 1 s) has passed, and is b's after it.
    """
    clock = Clock()
    a = start_member(cluster_config(redis, "a"))
    config = cluster_config(redis, "b")
    b = RouterService(config, ClockedReactor(clock), Front, store=cluster_store(config.cluster))  # type: ignore[arg-type]
    b.privilegedStartService()
    b.startService()
    try:
        await wait_for(lambda: store_of(a).synced and store_of(b).synced, what="both routers to read the table")
        store_of(b).published = lambda message: None  # type: ignore[method-assign]  # every message lost
        port = free_port()
        assert (await api(a.port_of(), "PUT", "/_api/projects/late", tcp_manifest(port, backend.port)))[0] == 201
        assert "late" not in b.listeners and store_of(b).version == 0
        clock.advance(HEARTBEAT)
        await wait_for(lambda: "late" in b.listeners, what="b's heartbeat to apply the change")
        assert store_of(b).version == 1
    finally:
        await a.stopService()
        await stop_clocked(b, clock)
