"""
A property of the cluster (SPEC 13), as a Hypothesis state machine: any
sequence of deploys, replaces and deletes, each through any of three
routers sharing one Redis, answers as one table would (a conflict anywhere
in the cluster is a 409), and once the routers settle, every one of them
binds exactly that table: its listeners, and the sockets the kernel lists.

The routers run in this process, on the reactor; the machine runs in a
thread of its own, as an outside client does, and waits on the reactor
with C{blockingCallFromThread}.
"""

from __future__ import annotations

import itertools
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Coroutine

import pytest_twisted
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.internet import defer, reactor, threads

from portrouter.router import RouterService
from tests.support import LOOPBACK, free_port, our_sockets, wait_for
from tests.test_api import api
from tests.test_cluster import Redis, cluster_config, start_member, store_of

NAMES = ["a", "b", "c"]
PROTOCOLS = ["http", "tcp", "udp"]
ROUTERS = 3
prefixes = itertools.count()


def block(work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """From the machine's thread: run C{work()} on the reactor, and wait for its result."""
    return threads.blockingCallFromThread(reactor, lambda: defer.Deferred.fromCoroutine(work()))


def free_in_both() -> int:
    while True:
        port = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((LOOPBACK, port))
            return port
        except OSError:
            continue


@pytest_twisted.ensureDeferred
async def test_every_router_binds_the_one_table_after_any_changes(tmp_path: Path) -> None:
    redis = await Redis(tmp_path).start()
    try:
        await threads.deferToThread(run, redis)
    finally:
        redis.kill()


def run(redis: Redis) -> None:
    pool: list[int] = []
    while len(pool) < 3:
        if (port := free_in_both()) not in pool:
            pool.append(port)

    class Cluster(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            # Each example a table of its own: a fresh prefix in the one Redis.
            prefix = f"example{next(prefixes)}"
            # Each ingress on a port outside the pool: on port 0 the OS could
            # hand a router one of the pool's (free between examples), and
            # that listener would count as the table's (it did, once in CI).
            ingresses: list[int] = []
            while len(ingresses) < ROUTERS:
                if (port := free_port()) not in pool and port not in ingresses:
                    ingresses.append(port)
            self.routers: list[RouterService] = threads.blockingCallFromThread(reactor, lambda: [
                start_member(cluster_config(redis, f"n{i}", prefix=prefix, drain_timeout=1.0,
                                            ingress=f"tcp:{ingresses[i]}:interface={LOOPBACK}"))
                for i in range(ROUTERS)])
            self.model: dict[str, tuple[str, int]] = {}  # name -> (protocol, port)
            block(lambda: wait_for(lambda: all(store_of(r).synced for r in self.routers), what="every router to sync"))

        def teardown(self) -> None:
            for router in self.routers:
                threads.blockingCallFromThread(reactor, router.stopService)
            # Stopped: nothing of the pool stays bound.
            block(lambda: wait_for(lambda: not our_sockets(pool), what="the pool to be released"))

        def conflict(self, name: str, protocol: str, port: int) -> str | None:
            ns = "udp" if protocol == "udp" else "tcp"
            for other, (p, n) in self.model.items():
                if other != name and n == port and ("udp" if p == "udp" else "tcp") == ns:
                    return other
            return None

        @rule(through=st.integers(0, ROUTERS - 1), name=st.sampled_from(NAMES),
              protocol=st.sampled_from(PROTOCOLS), slot=st.integers(0, len(pool) - 1))
        def deploy(self, through: int, name: str, protocol: str, slot: int) -> None:
            port = pool[slot]
            backend = f"{LOOPBACK}:9" if protocol == "udp" else f"tcp:{LOOPBACK}:9"
            manifest = {"backend": backend, "listen": {"port": port, "protocol": protocol, "interface": LOOPBACK}}
            status, body = block(lambda: api(self.routers[through].port_of(), "PUT", f"/_api/projects/{name}", manifest))
            holder = self.conflict(name, protocol, port)
            if holder is not None:
                assert status == 409 and body["error"] == {
                    "code": "port_conflict", "field": "listen.port",
                    "message": f"port {port}/{'udp' if protocol == 'udp' else 'tcp'} is already bound by "
                               f"project {holder!r}"}, body
                return
            assert status == (200 if name in self.model else 201), body
            self.model[name] = (protocol, port)

        @rule(through=st.integers(0, ROUTERS - 1), name=st.sampled_from(NAMES))
        def delete(self, through: int, name: str) -> None:
            status, body = block(lambda: api(self.routers[through].port_of(), "DELETE", f"/_api/projects/{name}"))
            if name in self.model:
                assert status == 204, body
                del self.model[name]
            else:
                assert status == 404 and body["error"]["code"] == "not_found", body

        @invariant()
        def every_router_binds_the_table(self) -> None:
            wanted = {name: (protocol, port) for name, (protocol, port) in self.model.items()}
            sockets = Counter({("udp" if p == "udp" else "tcp", port): ROUTERS for p, port in wanted.values()})

            def settled() -> bool:
                for router in self.routers:
                    bound = {name: (l.route.protocol, l.port.getHost().port)  # type: ignore[attr-defined]
                             for name, l in router.listeners.items()}
                    if bound != wanted or store_of(router).failed:
                        return False
                # One version of the table everywhere, and the kernel agrees.
                return len({store_of(r).version for r in self.routers}) == 1 and our_sockets(pool) == sockets

            block(lambda: wait_for(settled, what=f"every router to bind {wanted}"))

    run_state_machine_as_test(Cluster, settings=settings(
        max_examples=15, stateful_step_count=8, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))
