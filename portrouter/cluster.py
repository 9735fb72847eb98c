"""
Several routers, one table (SPEC section 13): the API-deployed projects of
a cluster kept in Redis, through txredisapi.

Keys, under the configured prefix::

    PREFIX:projects   hash, project name -> its manifest (JSON)
    PREFIX:version    the table's version, raised by every change
    PREFIX:changes    channel: the new version, published by every change
    PREFIX:nodes      hash, node -> its last heartbeat (JSON)
    PREFIX:seen       hash, node -> when it was sent (Redis's clock)

A change is one Lua script: it applies only if the version is still the one
the router computed the change from (compare and set), so of two
conflicting changes on two routers exactly one applies; the other router
reads the table again, finds the conflict and answers 409. Every router
applies a published version at once, and compares versions on every
heartbeat as well: a message lost on the way is noticed within a
heartbeat, and a reconnection re-reads the whole table. Changes are applied
through the router's own reconciliation (two-phase bind, hand-over, drain);
a project this router cannot serve (its port taken on this host, a clash
with a project of this router's own config file) is left out, reported in
the heartbeat, and the rest is served.
"""

from __future__ import annotations

import json
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

import portrouter
from portrouter.config import ConfigError, needs_tls, parse_project, read_json
from portrouter.model import Cluster, Config, Project
from portrouter.router import BindError, ChangeRefused, RouterService, StaleTable
from portrouter.table import PortConflict, RoutingTable

log = Logger(namespace="portrouter.cluster")

HEARTBEAT = 1.0  # seconds between heartbeats, each also a version check
DEAD_AFTER = 10.0  # a node not heard of for this long is no longer listed
FORGET_AFTER = 3600.0  # its heartbeat is deleted from Redis after this long
REPLY_TIMEOUT = 3.0  # a Redis that accepts but does not answer counts as down
RECONNECT_MAX = 1.0  # the longest wait between two attempts to reach Redis
RETRY_FAILED = 10.0  # projects this router could not serve are tried again this often

# Compare and set: KEYS projects, version, changes; ARGV the version the
# change was computed from, how many names to delete, those names, then
# name/manifest pairs to set. Answers the new version, or -1 if stale.
_SAVE = """
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[1]) then return -1 end
local n = tonumber(ARGV[2])
for i = 3, 2 + n do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = 3 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], v)
return v
"""

# The table and its version, read in one step.
_READ = """
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
"""

# KEYS nodes, seen, version; ARGV node, heartbeat (or '' to only read).
# Answers the table's version, Redis's clock, and every node's heartbeat
# and time; nodes silent for FORGET_AFTER are deleted.
_NODES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], tostring(now))
end
local seen = redis.call('HGETALL', KEYS[2])
for i = 1, #seen, 2 do
  if now - tonumber(seen[i + 1]) > tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], seen[i])
    redis.call('HDEL', KEYS[2], seen[i])
  end
end
return {redis.call('GET', KEYS[3]) or '0', tostring(now), redis.call('HGETALL', KEYS[1]),
        redis.call('HGETALL', KEYS[2])}
"""


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """One connection that tells the store when it is up and when it is lost."""

    initialDelay = 0.05
    factor = 2.0
    maxDelay = RECONNECT_MAX
    reconnect = True

    def __init__(self, store: ClusterStore, protocol: type[Any]):
        self.protocol = protocol
        super().__init__(None, None, 1, isLazy=True, replyTimeout=REPLY_TIMEOUT, convertNumbers=False)
        self.store = store

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.store.connected(self, conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.store.lost(self)


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.store.published(message)


class ClusterStore(Service):
    """
    The router's L{portrouter.router.Store} in a cluster: a child service
    of the router, connected while it runs.

    @ivar version: the table version this router has applied.
    @ivar projects: the cluster's projects at that version, by name, served
        here or not.
    @ivar failed: the projects this router could not serve, with why.
    """

    def __init__(self, router: RouterService, cluster: Cluster):
        self.router = router
        self.cluster = cluster
        self.reactor = router.reactor
        prefix = cluster.prefix
        self.keys = {k: f"{prefix}:{k}" for k in ("projects", "version", "changes", "nodes", "seen")}
        self.version = 0
        self.projects: dict[str, Project] = {}
        self.failed: dict[str, str] = {}
        self.synced = False  # the table has been read since start-up
        self.down_since: float | None = None
        self._force = False
        self._said_down = False
        self._pending = False
        self._last_retry = 0.0
        self._seen: list[dict[str, Any]] = []
        self.commands = _Factory(self, txredisapi.RedisProtocol)
        self.subscriber = _Factory(self, _Subscriber)
        self.heartbeat = task.LoopingCall(self._tick)
        self.heartbeat.clock = self.reactor
        # Listeners are named after their projects: '_' is in no project's name.
        self.setName("_cluster")  # type: ignore[no-untyped-call]
        self.setServiceParent(router)  # type: ignore[no-untyped-call]

    # -- the Store the router and the API call ------------------------------

    def load(self, config: Config) -> list[Project]:
        # Nothing can be read before the reactor runs: the router binds its
        # own projects, and the cluster's once connected.
        return []

    async def sync(self) -> None:
        await self._sync()

    def check(self, project: Project) -> None:
        """A clash with any project of the cluster, served here or not."""
        others = [p for name, p in self.projects.items() if name != project.name]
        RoutingTable.build("tcp:0", None, others).with_project(project)

    async def save(self, projects: list[Project]) -> None:
        old = {name: p for name, p in self.router.table.projects.items() if not p.static}
        new = {p.name: p for p in projects}
        removed = [name for name in old if name not in new]
        changed = [p for name, p in new.items() if name not in old or _manifest(old[name]) != _manifest(p)]
        args: list[Any] = [self.version, len(removed), *removed]
        for p in changed:
            args += [p.name, _manifest(p)]
        keys = [self.keys["projects"], self.keys["version"], self.keys["changes"]]
        version = int(await self._call("eval", _SAVE, keys, args))
        if version < 0:
            raise StaleTable()
        self.version = version
        for name in removed:
            self.projects.pop(name, None)
            self.failed.pop(name, None)
        for p in changed:
            self.projects[p.name] = p
            self.failed.pop(p.name, None)
        if self.failed:
            # What this router could not serve is tried again with every
            # change of the table, its own changes too (once this one is done).
            self._force = True
            self._queue_sync()

    async def nodes(self) -> list[dict[str, Any]] | None:
        return await self._nodes("")

    def seen_nodes(self) -> list[dict[str, Any]] | None:
        return self._seen

    # -- the service ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        endpoint = clientFromString(self.reactor, self.cluster.redis)
        log.info("cluster: node {node}, table in redis at {redis} under {prefix}:",
                 node=self.cluster.node, redis=self.cluster.redis, prefix=self.cluster.prefix)
        self.down_since = self.reactor.seconds()
        self.commands.startConnecting(endpoint)
        self.subscriber.startConnecting(endpoint)
        self.heartbeat.start(HEARTBEAT, now=False)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.heartbeat.running:
            self.heartbeat.stop()
        return defer.gatherResults([self.commands.disconnect(), self.subscriber.disconnect()],
                                   consumeErrors=True)

    @property
    def up(self) -> bool:
        return bool(self.commands.size and self.subscriber.size)

    def connected(self, factory: _Factory, conn: Any) -> None:
        if factory is self.subscriber:
            d = conn.subscribe(self.keys["changes"])
            d.addErrback(lambda f: log.failure("cluster: subscribing", f))
        if self.up:
            if self.down_since is not None:
                log.info("cluster: redis at {redis} reached; reading the whole table", redis=self.cluster.redis)
            self.down_since = None
            # Whatever happened while away, nothing of it is trusted: read it all.
            self._force = True
            self._queue_sync()
            self._tick()  # listed in /_api/nodes at once, not a heartbeat later

    def lost(self, factory: _Factory) -> None:
        self._seen = []  # no longer known: metrics show no nodes rather than old ones
        if self.down_since is None and self.running:
            self.down_since = self.reactor.seconds()
            log.warn("cluster: lost redis at {redis}; serving the last table (version {version}) until it is back",
                     redis=self.cluster.redis, version=self.version)

    def published(self, message: Any) -> None:
        try:
            version = int(message)
        except (TypeError, ValueError):
            return
        if version != self.version:
            self._queue_sync()

    # -- reading and applying -----------------------------------------------

    async def _call(self, method: str, *args: Any) -> Any:
        if not self.commands.size:
            raise self._unavailable()
        try:
            return await getattr(self.commands.handler, method)(*args)
        except (txredisapi.RedisError, ConnectionError) as e:
            # Gone, silent past REPLY_TIMEOUT, or refusing (a read-only
            # replica, out of memory): in every case nothing was changed.
            raise self._unavailable(str(e) or type(e).__name__) from None

    def _unavailable(self, why: str = "not connected") -> ChangeRefused:
        return ChangeRefused("unavailable", "store_unavailable",
                             f"the cluster's store (redis at {self.cluster.redis}) is unavailable ({why}); "
                             "nothing was changed")

    def _queue_sync(self) -> None:
        """Sync under the router's lock, once for however many reasons queued meanwhile."""
        if self._pending or not self.running:
            return
        self._pending = True
        d = self.router.serialised(self._queued)
        d.addErrback(lambda f: None if f.check(ChangeRefused) else log.failure("cluster: applying the table", f))

    async def _queued(self) -> None:
        self._pending = False
        if not self.router.stopping:
            await self._sync()

    async def _sync(self) -> None:
        """Read the table; if it is not the one applied, apply it. Only under the lock."""
        version_text, flat = await self._call("eval", _READ, [self.keys["projects"], self.keys["version"]], [])
        version = int(version_text)
        retry = bool(self.failed) and self.reactor.seconds() - self._last_retry >= RETRY_FAILED
        if version == self.version and self.synced and not self._force and not retry:
            return
        self._force = False
        await self._apply(version, _pairs(flat))

    async def _apply(self, version: int, manifests: dict[str, str]) -> None:
        router = self.router
        self._last_retry = self.reactor.seconds()
        failed: dict[str, str] = {}
        projects: dict[str, Project] = {}
        static = {p.name: p for p in router.table.projects.values() if p.static}
        for name, text in sorted(manifests.items()):
            known = self.projects.get(name)
            if known is not None and _manifest(known) == text:
                project = known  # unchanged: not parsed again (a change costs its own manifests only)
            else:
                try:
                    project = parse_project(read_json(text.encode("utf-8")), router.config.defaults, "",
                                            static=False)
                except (ConfigError, ValueError) as e:
                    failed[name] = f"its manifest in redis is not valid: {e}"
                    continue
            projects[name] = project
            try:
                needs_tls(project, router.config.tls, "")
            except ConfigError as e:
                failed[name] = e.problem
                continue
            if name in static:
                failed[name] = f"project {name!r} is in this router's config file"
        served = {n: p for n, p in projects.items() if n not in failed}
        while True:
            try:
                table = RoutingTable.build(router.table.ingress, router.table.manhole,
                                           [*static.values(), *served.values()], router.table.hostnames)
                await router.apply(table)
                break
            except PortConflict as e:
                # Cluster projects never clash with each other (the store
                # refuses that): one of the pair is this router's own.
                name = e.claimant if e.claimant in served else e.holder
                if name not in served:
                    raise
                failed[name] = str(e)
            except BindError as e:
                name = e.route.project or ""
                if name not in served:
                    raise
                failed[name] = str(e)
            del served[name]
        self.projects = projects
        newly = {n: why for n, why in failed.items() if self.failed.get(n) != why}
        for name, why in sorted(newly.items()):
            log.error("cluster: project {project} (table version {version}) not served here: {reason}",
                      project=name, version=version, reason=why)
        self.failed = failed
        if version != self.version or not self.synced:
            log.info("cluster: table version {version} applied: {count} projects from the cluster{failed}",
                     version=version, count=len(served),
                     failed=f", {len(failed)} not served here" if failed else "")
        self.version = version
        self.synced = True

    # -- heartbeats -----------------------------------------------------------

    def _tick(self) -> None:
        if not self.up:
            if not self.synced and self.down_since is not None and not self._said_down:
                self._said_down = True
                log.warn("cluster: redis at {redis} is unreachable; serving the {count} projects of this "
                         "router's own config until it is back", redis=self.cluster.redis,
                         count=sum(p.static for p in self.router.table.projects.values()))
            return
        beat = json.dumps({
            "node": self.cluster.node, "version": portrouter.__version__, "table_version": self.version,
            "failed": [{"project": n, "reason": why} for n, why in sorted(self.failed.items())],
        })
        d = defer.Deferred.fromCoroutine(self._nodes(beat))
        d.addErrback(lambda f: None if f.check(ChangeRefused) else log.failure("cluster: heartbeat", f))

    async def _nodes(self, beat: str) -> list[dict[str, Any]]:
        keys = [self.keys["nodes"], self.keys["seen"], self.keys["version"]]
        version, now, beats, seen = await self._call("eval", _NODES, keys,
                                                     [self.cluster.node, beat, FORGET_AFTER])
        nodes = []
        times = _pairs(seen)
        for node, text in sorted(_pairs(beats).items()):
            ago = float(now) - float(times.get(node, 0))
            if ago > DEAD_AFTER:
                continue
            try:
                data = json.loads(text)
            except ValueError:
                continue
            nodes.append({"node": node, "version": data.get("version"), "table_version": data.get("table_version"),
                          "last_seen": round(max(ago, 0.0), 3), "failed": data.get("failed", [])})
        self._seen = nodes
        if self.failed and self.reactor.seconds() - self._last_retry >= RETRY_FAILED:
            self._queue_sync()
        if int(version) != self.version:
            # A published change that never arrived: read it now.
            self._queue_sync()
        return nodes


def _manifest(project: Project) -> str:
    return json.dumps(dict(project.manifest), sort_keys=True, allow_nan=False)


def cluster_store(cluster: Cluster) -> Any:
    """The C{store} argument of L{RouterService} for C{cluster}."""
    return lambda router: ClusterStore(router, cluster)

