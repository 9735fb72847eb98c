"""
The cluster section (issue 18): how fast a change made through one router
is served by all of them, and what several routers on one port
(C{reuse_port: true}) serve against one.

``converge``
    three ``twistd -n portrouter`` with a C{cluster} section on one
    redis-server, all three on the proxy core; 200 deploys of a TCP project
    on a new port, through each router in turn. The latency of one deploy
    is from the ``PUT``'s answer until the port listens in every one of the
    three processes (the kernel's listening sockets, asked through
    sock_diag every millisecond until there are three; whose they are is
    checked after); reported as p50, p99 and the worst. Target: p99 <= 250 ms
    (Traefik's default KV throttle is 2 s). The table grows from 0 to 200
    projects during the run.
``one``
    one router, its own HTTP port in front of the HTTP section's nginx
    (100-byte file), ``wrk -t1 -c50`` as in that section.
``two-one-core``, ``two-two-cores``
    two routers with ``reuse_port: true`` on that same port, both on the
    proxy core, then one on each core (the second shares core 0 with wrk and
    nginx: this machine has two). The kernel splits connections between
    them; the split is read from the routers' own metrics (requests each
    answered) and from ``/proc`` (connections each held) mid-run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, ClassVar

import http_bench
from harness import (
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    BenchError,
    Proc,
    Procs,
    assert_loopback_only,
    attempt,
    blame,
    check,
    fmt,
    free_port,
    wait_listening,
)
from section import busy_cells, cell, print_ratios, print_tables

TARGETS = ("converge", "one", "two-one-core", "two-two-cores")
DESCRIPTION = {
    "converge": "three routers of one cluster (redis-server on the load core), all on the proxy core: "
                "deploy-to-served latency on all three, over 200 deploys through each router in turn",
    "one": "one router, its own HTTP port (reuse_port: true), wrk -t1 -c50, 100 B from nginx",
    "two-one-core": "two routers with reuse_port: true on that one port, both on the proxy core",
    "two-two-cores": "the same, one router on each core (the second with wrk and nginx on core 0)",
}
DEPLOYS = 200
POLL = 0.001  # seconds between two looks at /proc while waiting for a port
CONNECTIONS = http_bench.CONNECTIONS


@dataclass
class Row:
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p99, max (converge)
    req_per_s: float | None = None
    split: list[float] = field(default_factory=list)  # share of requests each router answered, %
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _inodes(pid: int) -> set[int]:
    """The inodes of process C{pid}'s sockets."""
    found = set()
    for entry in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if (link := os.readlink(entry.path)).startswith("socket:["):
                found.add(int(link[8:-1]))
    return found


# The kernel's sock_diag netlink interface: the sockets of one TCP state,
# without reading /proc/net/tcp, which lists every socket on the machine
# (tens of thousands in TIME_WAIT after other benchmarks: 0.5 s a read).
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3
ESTABLISHED, LISTEN = 1, 10


def _sockets(port: int, state: int) -> list[int]:
    """The inodes of the IPv4 TCP sockets in C{state} whose local port is C{port}."""
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << state) + bytes(48)
    message = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    found: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as diag:
        diag.sendto(message + request, (0, 0))
        while True:
            data, offset = diag.recv(1 << 16), 0
            while offset < len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    raise BenchError("the kernel refused a sock_diag request")
                # inet_diag_msg after the 16-byte header: the local port at 4, the inode at 68.
                if struct.unpack_from("!H", data, offset + 20)[0] == port:
                    found.append(struct.unpack_from("=I", data, offset + 84)[0])
                offset += (length + 3) & ~3


def _put(ingress: int, name: str, manifest: dict[str, Any]) -> int:
    request = urllib.request.Request(f"http://{LOOPBACK}:{ingress}/_api/projects/{name}", method="PUT",
                                     data=json.dumps(manifest).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return int(response.status)


def _requests_answered(ingress: int) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{LOOPBACK}:{ingress}/_api/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('portrouter_http_requests_total{') and 'project="web"' in line)


class Bench(http_bench.Base[Row]):
    """One run: the HTTP section's backend and wrk, the routers as the rows."""

    NAME = "cluster"
    TARGETS = TARGETS
    SECONDS_HELP = "length of each wrk run (default 5)"
    OPTIONS = {"deploys": {"type": int, "default": DEPLOYS, "help": f"deploys timed in converge (default {DEPLOYS})"}}
    PORTROUTER = frozenset(TARGETS)
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "wrk", "nginx", "twistd", "redis-server")
    TARGET_TOOLS: ClassVar[dict[str, tuple[str, ...]]] = {}
    VERSIONS = {"wrk": "-v", "nginx": "-v", "redis-server": "--version"}

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.deploys = max(1, args.cluster_deploys)

    def parameters(self) -> dict[str, Any]:
        return {"deploys": self.deploys, "connections": CONNECTIONS, "wrk_threads": 1,
                "warmup_s": http_bench.WARMUP}

    # -- processes -----------------------------------------------------------------

    def redis(self) -> tuple[Proc, int]:
        port = free_port()
        proc = self.procs.start("redis", [self.tools["redis-server"], "--port", str(port), "--bind", LOOPBACK,
                                          "--save", "", "--appendonly", "no"], LOAD_CORE)
        wait_listening(proc, port)
        return proc, port

    def router(self, name: str, core: int, lines: list[str]) -> tuple[Proc, int]:
        """A router on C{core} with a config of C{lines} (plus its ingress and reuse_port): process, ingress."""
        ingress = free_port()
        config = self.work / f"{name}.yaml"
        config.write_text("\n".join([f"ingress: tcp:{ingress}:interface={LOOPBACK}", f"state: {self.work / name}",
                                     "reuse_port: true", *lines]) + "\n")
        proc = self.procs.start(name, [self.tools["twistd"], "-n", "--pidfile=", "portrouter", "--config",
                                       str(config)], core, env=self.portrouter_env)
        wait_listening(proc, ingress, timeout=20)
        return proc, ingress

    # -- measurements ----------------------------------------------------------------

    def measure(self, target: str) -> Row:
        row = Row()
        print(f"[cluster] {target} ...", flush=True)
        if target == "converge":
            result = attempt("cluster", target, row.errors, "converge", self.converge)
            if result is not None:
                row.latency_ms = {k: result[k] for k in ("p50", "p99", "max")}
                row.detail["converge"] = result
            return row
        result = attempt("cluster", target, row.errors, "100b", lambda: self.serve(target))
        if result is not None:
            row.req_per_s = result["req_per_s"]
            row.split = result["split"]
            row.detail["100b"] = result
        return row

    def converge(self) -> dict[str, Any]:
        redis, redis_port = self.redis()
        cluster = f"cluster: {{redis: 'tcp:{LOOPBACK}:{redis_port}', node: NODE}}"
        routers = [self.router(f"node-{i}", PROXY_CORE, [cluster.replace("NODE", f"node-{i}")]) for i in range(3)]
        procs = [proc for proc, _ in routers]
        assert_loopback_only(procs)
        latencies: list[float] = []
        puts: list[float] = []
        try:
            with blame(procs[0]):
                for i in range(self.deploys):
                    port = free_port()
                    manifest = {"backend": f"tcp:{LOOPBACK}:9",
                                "listen": {"port": port, "protocol": "tcp", "interface": LOOPBACK}}
                    sent = time.monotonic()
                    status = _put(routers[i % 3][1], f"p{i}", manifest)
                    answered = time.monotonic()
                    if status != 201:
                        raise BenchError(f"deploy {i}: status {status}")
                    # Nothing else binds the port: three listening sockets are the
                    # three routers' (checked below, after the clock has stopped).
                    deadline = answered + 10
                    while len(_sockets(port, LISTEN)) < len(procs):
                        if time.monotonic() > deadline:
                            raise BenchError(f"deploy {i}: port {port} not listening in every router after 10 s")
                        time.sleep(POLL)  # a benchmark's poll, not a test: nothing to wait on but /proc
                    latencies.append((time.monotonic() - answered) * 1000)
                    listening = set(_sockets(port, LISTEN))
                    if not all(listening & _inodes(proc.pid) for proc in procs):
                        raise BenchError(f"deploy {i}: port {port} listened in by another process")
                    puts.append((answered - sent) * 1000)
        finally:
            for proc in procs:
                self.procs.stop(proc)
            self.procs.stop(redis)
        ordered = sorted(latencies)
        return {
            "p50": round(statistics.median(ordered), 2),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
            "max": round(ordered[-1], 2),
            "put_p50_ms": round(statistics.median(puts), 2),
            "deploys": len(ordered),
            "latencies_ms": [round(x, 2) for x in latencies],
        }

    def serve(self, target: str) -> dict[str, Any]:
        backend, backend_port = self.backend(target)
        port = free_port()
        project = [f"projects: [{{name: web, backend: 'tcp:{LOOPBACK}:{backend_port}', "
                   f"listen: {{port: {port}, interface: {LOOPBACK}}}}}]"]
        cores = {"one": [PROXY_CORE], "two-one-core": [PROXY_CORE, PROXY_CORE],
                 "two-two-cores": [PROXY_CORE, LOAD_CORE]}[target]
        routers = [self.router(f"{target}-{i}", core, project) for i, core in enumerate(cores)]
        procs = [proc for proc, _ in routers]
        try:
            for proc in procs:
                wait_listening(proc, port, timeout=20)
            assert_loopback_only(procs)
            url = f"http://{LOOPBACK}:{port}/100b.bin"
            with blame(procs[0]):
                self.fetch_check(url, "100b")
                self.wrk(url, http_bench.WARMUP)
                before = [_requests_answered(ingress) for _, ingress in routers]
                held: list[int] = []
                # Halfway through the run: which router holds which of wrk's connections.
                timer = threading.Timer(self.seconds / 2, lambda: held.extend(self.connections(procs, port)))
                timer.start()
                result = self.retry.quietly(target, lambda: self.wrk(url, self.seconds))
                timer.join()
                after = [_requests_answered(ingress) for _, ingress in routers]
        finally:
            for proc in procs:
                self.procs.stop(proc)
            self.procs.stop(backend)
        answered = [a - b for a, b in zip(after, before)]
        total = sum(answered) or 1
        result["split"] = [round(100 * n / total, 1) for n in answered]
        result["connections_held"] = held
        return result

    @staticmethod
    def connections(procs: list[Proc], port: int) -> list[int]:
        """How many of the established connections to C{port} each process holds."""
        established = set(_sockets(port, ESTABLISHED))
        return [len(established & _inodes(proc.pid)) for proc in procs]

    # -- the report ----------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        converge = rows.get("converge")
        p99 = converge.latency_ms.get("p99") if converge is not None else None
        return [check("deploy-to-served on all three, p99", p99, "<=", 250.0, unit=" ms")]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        def over_one(target: str) -> float | None:
            one, other = rows.get("one"), rows.get(target)
            if one is None or other is None or not one.req_per_s or other.req_per_s is None:
                return None
            return round(other.req_per_s / one.req_per_s, 2)

        return [("req/s: two routers, one core / one router", over_one("two-one-core")),
                ("req/s: two routers, two cores / one router", over_one("two-two-cores"))]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        converge = rows.get("converge")
        if converge is not None:
            print()
            print(f"deploy-to-served on all three routers, {self.deploys} deploys: "
                  + ", ".join(f"{k} {fmt(v, 1)} ms" for k, v in converge.latency_ms.items())
                  + f" (the PUT itself: p50 {fmt(converge.detail.get('converge', {}).get('put_p50_ms'), 1)} ms)")
        serving = {name: r for name, r in rows.items() if name != "converge"}
        if serving:
            print_tables(
                serving, "HTTP 100 B (wrk -t1 -c50) through one port",
                [("req/s", 10), ("requests split %", 18), ("connections held", 18)],
                lambda r: [cell(r, r.req_per_s, "100b", 0), " / ".join(f"{s:g}" for s in r.split) or "-",
                           " / ".join(str(n) for n in r.detail.get("100b", {}).get("connections_held", []))
                           or "-"],
                [("100 B", 16)], lambda r: busy_cells(r, ("100b",)),
            )
        print_ratios(checks, references, width=46)

    def profile(self, py_spy: str) -> dict[str, Any]:
        return {"error": "the cluster section has no profile; the http section profiles one router"}

    def print_profile(self, profile: dict[str, Any]) -> None:
        print(f"[cluster] {profile['error']}")

