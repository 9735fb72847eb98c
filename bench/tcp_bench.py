"""
The TCP section: portrouter against no proxy, stock C{twistd portforward} and
HAProxy, on bulk throughput, connection rate and memory per idle connection,
all in one run so that the ratios compare like with like (absolute numbers
drift 10-15% between runs on this machine; see shared/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness import (
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    BenchError,
    CpuWatch,
    Proc,
    Procs,
    assert_loopback_only,
    blame,
    build_c,
    check,
    collapse,
    fmt,
    free_port,
    iperf3,
    iperf3_server,
    listen_drops,
    per_op_us,
    portrouter_argv,
    print_frames,
    run_tool,
    settled_rss_kib,
    top_frames,
    wait_listening,
    wait_until,
)
from section import Section, busy_cells, cell, compare, paired, print_ratios, print_tables

TARGETS = ("direct", "portrouter", "portforward", "haproxy")
MESSAGE = 64  # bytes each way per connection in the conn/s test
CONCURRENCY = 16
WARMUP = 0.5  # seconds of conn/s load before any measurement
ROUNDS = 5  # turns portrouter and HAProxy take at conn/s (Bench.conn_rounds)
ROUND_SECONDS = 1.0

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend bench
    bind {listen}:{port}
    default_backend bench

backend bench
    server backend {listen}:{backend}
"""


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    up_gbps: float | None = None
    down_gbps: float | None = None
    conn_per_s: float | None = None
    cpu_us_per_conn: float | None = None  # the proxy's own CPU time (user and system) per connection
    kib_per_idle_conn: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Bench(Section[Row]):
    """One TCP run: the C tool built once, then every target measured in turn."""

    NAME = "tcp"
    TARGETS = TARGETS
    SECONDS_HELP = "length of each iperf3 and conn/s run (default 5)"
    OPTIONS = {"idle": {"type": int, "default": 2000, "help": "idle connections for the memory test (default 2000)"}}
    TOOLS = ("gcc", "taskset", "iperf3")
    TARGET_TOOLS = {"portrouter": ("twistd",), "portforward": ("twistd",), "haproxy": ("haproxy",)}
    VERSIONS = {"iperf3": "--version", "haproxy": "-v"}

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.idle: int = args.tcp_idle
        self.connrate = str(self.work / "connrate")

    def prepare(self) -> None:
        self.connrate = build_c(self.tools["gcc"], "connrate.c", self.work)

    def parameters(self) -> dict[str, Any]:
        return {"idle_connections": self.idle, "message_bytes": MESSAGE, "concurrency": CONCURRENCY}

    # -- backends and proxies ----------------------------------------------------

    def echo_backend(self, name: str) -> tuple[Proc, int, Path]:
        """The C echo server on the load core; returns it, its port and its status file."""
        status = self.work / f"{name}-echo.status"
        proc = self.procs.start(f"{name}-echo", [self.connrate, "serve", str(status)], LOAD_CORE, pipe=True)
        line = proc.read_line(10)
        if not line.startswith("port "):
            raise BenchError(f"echo server said {line!r}")
        return proc, int(line.split()[1]), status

    def proxy(self, target: str, backend: int, tag: str) -> tuple[Proc, int]:
        """Start C{target} on the proxy core in front of C{backend}; the process and its port."""
        port = free_port()
        name = f"{target}-{tag}"
        if target == "portrouter":
            argv = portrouter_argv(
                self.tools["twistd"], [("tcp", f"tcp:{port}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{backend}")]
            )
        elif target == "portforward":
            argv = [
                self.tools["twistd"], "-n", "--pidfile=", "portforward",
                "-p", f"tcp:{port}:interface={LOOPBACK}", "-h", LOOPBACK, "-d", str(backend),
            ]
        elif target == "haproxy":
            cfg = self.work / f"{name}.cfg"
            cfg.write_text(HAPROXY_CFG.format(listen=LOOPBACK, port=port, backend=backend))
            argv = [self.tools["haproxy"], "-db", "-f", str(cfg)]
        else:
            raise ValueError(target)
        env = self.portrouter_env if target == "portrouter" else None
        proc = self.procs.start(name, argv, PROXY_CORE, env=env)
        wait_listening(proc, port, timeout=20)
        assert_loopback_only([proc])
        return proc, port

    # -- measurements ------------------------------------------------------------

    def conn_load(self, port: int, seconds: float, proxy: Proc | None = None) -> dict[str, Any]:
        """
        C{connrate load} for C{seconds}; its JSON plus how busy each core was
        and, with C{proxy}, the CPU time that proxy used.
        """
        watch, drops = CpuWatch(self.procs, proxy), listen_drops()
        out = run_tool(
            ["taskset", "-c", str(LOAD_CORE), self.connrate, "load", str(port), str(seconds), str(CONCURRENCY), str(MESSAGE)],
            seconds + 20, "connrate load",
        )
        cpu = watch.stop()
        if out.returncode != 0:
            raise BenchError(f"connrate load failed: {out.stderr.strip()}")
        result: dict[str, Any] = json.loads(out.stdout)
        result.update(cpu)
        result["listen_drops"] = listen_drops() - drops
        if "proxy_cpu_s" in cpu:
            result["cpu_us_per_conn"] = per_op_us(cpu["proxy_cpu_s"], result["completed"])
        return result

    def hold(self, port: int, status: Path, count: int, while_held: Callable[[], None] | None = None) -> float:
        """
        Open C{count} idle connections through C{port}, wait until the backend
        holds them all, run C{while_held}, close them and wait until the
        backend saw them close. Returns how long the backend took to have them.
        """
        holder = self.procs.start(
            "hold", [self.connrate, "hold", str(port), str(count), "90", str(status)], LOAD_CORE, pipe=True, stdin=True
        )
        try:
            line = holder.read_line(30)
            if line != f"connected {count}":
                raise BenchError(f"idle holder said {line!r}")
            try:
                took = wait_until(lambda: backend_open(status) >= count, 30, f"the backend to hold {count} connections")
            except BenchError as e:
                raise BenchError(f"{e}; it holds {backend_open(status)}") from None
            if while_held is not None:
                while_held()
        finally:
            assert holder.popen.stdin is not None
            holder.popen.stdin.close()  # the holder closes everything and reports
            try:
                summary = json.loads(holder.read_line(15))
            except (BenchError, ValueError):
                summary = {}
            self.procs.stop(holder)
        if summary.get("lost"):
            raise BenchError(f"{summary['lost']} idle connections were closed by the proxy")
        wait_until(lambda: backend_open(status) == 0, 30, "the idle connections to close")
        return took

    def idle_memory(self, proxy: Proc, port: int, status: Path) -> dict[str, Any]:
        """
        KiB of proxy RSS per idle relayed connection, read only once the
        backend holds every connection so the proxy's backend side is counted.

        The proxy is fresh and warmed up with only a few connections: memory
        freed by a big warm-up would be reused and hide the real cost.
        """
        self.hold(port, status, 32)
        before = settled_rss_kib(proxy)
        drops = listen_drops()
        after = 0

        def read_rss() -> None:
            nonlocal after
            after = settled_rss_kib(proxy)

        took = self.hold(port, status, self.idle, read_rss)
        return {
            "rss_before_kib": before,
            "rss_after_kib": after,
            "connections": self.idle,
            "backend_ready_s": round(took, 2),
            "listen_drops": listen_drops() - drops,
            "kib_per_conn": round((after - before) / self.idle, 2),
        }

    def iperf(self, port: int, reverse: bool) -> dict[str, Any]:
        """One iperf3 run; Gbit/s as the receiving side counted it."""
        return iperf3(self.tools["iperf3"], port, self.seconds, self.procs, reverse=reverse)

    # -- conn/s, taking turns --------------------------------------------------------

    def measure_all(self, targets: list[str]) -> dict[str, Row]:
        rows = super().measure_all(targets)
        together: list[str] = [t for t in ("portrouter", "haproxy") if t in rows]
        if len(together) == 2:
            self.conn_rounds(rows, together)
        return rows

    def conn_rounds(self, rows: dict[str, Row], targets: list[str]) -> None:
        """
        conn/s of C{targets} again, all running, in rounds, each idle but for
        the one measured and the order alternating, as the HTTP section's
        rows are: the ratio judged is the median of the ratios within each
        round, which the machine's drift from minute to minute (the rows
        above were measured minutes apart) does not move.
        """
        print(f"[tcp] {', '.join(targets)}: conn/s in {ROUNDS} rounds of {ROUND_SECONDS:g} s each, taking turns",
              flush=True)
        started: list[Proc] = []
        setups: dict[str, tuple[Proc, int, Path]] = {}
        try:
            for target in targets:
                echo, echo_port, status = self.echo_backend(f"{target}-rounds")
                started.append(echo)
                proxy, port = self.proxy(target, echo_port, "rounds")
                started.append(proxy)
                setups[target] = (proxy, port, status)
            for proxy, port, _ in setups.values():
                self.conn_load(port, WARMUP)
            for r in range(ROUNDS):
                for target in (targets if r % 2 == 0 else targets[::-1]):
                    proxy, port, status = setups[target]
                    with blame(proxy):
                        rate = self.conn_load(port, ROUND_SECONDS, proxy)
                        if rate["completed"] == 0:
                            raise BenchError(f"no connection completed: {rate['first_error']}")
                        wait_until(lambda: backend_open(status) == 0, 15, "the conn/s connections to close")
                    rows[target].detail.setdefault("conn_rounds", {"rounds": []})["rounds"].append(
                        {"round": r, "conn_per_s": rate["rate"], "cpu_us_per_conn": rate.get("cpu_us_per_conn")})
        finally:
            for proc in reversed(started):
                self.procs.stop(proc)

    # -- one target ----------------------------------------------------------------

    def measure(self, target: str) -> Row:
        row = Row()
        print(f"[tcp] {target}: connections ...", flush=True)
        echo, echo_port, status = self.echo_backend(target)
        proxy: Proc | None = None
        try:
            if target == "direct":
                port = echo_port
            else:
                proxy, port = self.proxy(target, echo_port, "echo")

            def conn_rate() -> dict[str, Any]:
                rate = self.conn_load(port, self.seconds, proxy)
                if rate["completed"] == 0:
                    raise BenchError(f"no connection completed: {rate['first_error']}")
                # Every relayed connection must end once the load stops: a
                # proxy that leaks them fails here rather than looking fast.
                wait_until(lambda: backend_open(status) == 0, 15, "the conn/s connections to close")
                return rate

            with blame(proxy):
                if proxy is not None:
                    mem = self.idle_memory(proxy, port, status)
                    row.kib_per_idle_conn = mem["kib_per_conn"]
                    row.detail["idle"] = mem
                self.conn_load(port, WARMUP)  # code paths, allocations, the kernel's port tables
                rate = self.retry.quietly(f"{target} conn/s", conn_rate, retry=target != "direct")
            row.conn_per_s = round(rate["rate"])
            row.cpu_us_per_conn = rate.get("cpu_us_per_conn")
            row.detail["conn"] = rate
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(echo)

        print(f"[tcp] {target}: bulk ...", flush=True)
        server, iperf_port = iperf3_server(self.tools["iperf3"], self.procs, target)
        proxy = None
        try:
            if target == "direct":
                port = iperf_port
            else:
                proxy, port = self.proxy(target, iperf_port, "iperf")
            with blame(proxy):
                retry = target != "direct"  # in no ratio: the retry budget goes to the rows that are
                up = self.retry.quietly(f"{target} bulk up", lambda: self.iperf(port, reverse=False), retry)
                down = self.retry.quietly(f"{target} bulk down", lambda: self.iperf(port, reverse=True), retry)
            row.up_gbps, row.down_gbps = up["gbps"], down["gbps"]
            row.detail["up"], row.detail["down"] = up, down
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(server)
        return row

    # -- profiling (optional) ------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """
        Where portrouter's time goes under the conn/s load: py-spy samples
        without pausing it, and self time is summed per function.
        """
        echo, echo_port, _ = self.echo_backend("profile")
        proxy, port = self.proxy("portrouter", echo_port, "profile")
        raw = self.work / "portrouter-profile.txt"
        try:
            self.conn_load(port, WARMUP)
            duration = 5
            spy = subprocess.Popen(
                [py_spy, "record", "--nonblocking", "-r", "250", "-d", str(duration),
                 "-f", "raw", "-o", str(raw), "-p", str(proxy.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            try:
                rate = self.conn_load(port, duration + 1)
                _, err = spy.communicate(timeout=30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if spy.returncode != 0 or not raw.exists():
                raise BenchError(f"py-spy failed: {err.strip()[-500:]}")
        finally:
            self.procs.stop(proxy)
            self.procs.stop(echo)
        self_time, inclusive, total = collapse(raw.read_text())
        # The reactor loop and its dispatch wrappers are in nearly every stack.
        below_loop = {f: n for f, n in inclusive.items() if n < 0.6 * total}
        return {
            "conn_per_s_under_profiler": round(rate["rate"]),
            "samples": total,
            "top_self": top_frames(self_time, total, 15),
            "top_inclusive": top_frames(below_loop, total, 15),
            "raw_file": str(raw),
        }

    # -- the report --------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """The comparisons portrouter's design is judged by, with their targets."""
        return [
            check("bulk up: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "up_gbps"), ">=", 1.0),
            check("bulk down: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "down_gbps"), ">=", 1.0),
            check("conn/s: portrouter / portforward",
                  compare(rows, "portrouter", "portforward", "conn_per_s"), ">=", 1.5),
            check("conn/s: portrouter / haproxy (rounds)", same_round(rows, "portrouter", "haproxy"), ">=", 0.75),
            check("KiB/idle conn: portrouter / haproxy",
                  compare(rows, "portrouter", "haproxy", "kib_per_idle_conn"), "<=", 1.0),
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        """What a connection costs each proxy in CPU time, which the machine's other load does not change."""
        return [
            ("conn/s: portrouter / haproxy (each measured once)",
             compare(rows, "portrouter", "haproxy", "conn_per_s")),
            ("CPU per connection: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "cpu_us_per_conn")),
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, "TCP",
            [("up Gbit/s", 11), ("down Gbit/s", 13), ("conn/s", 10), ("CPU us/conn", 13), ("KiB/idle conn", 15)],
            lambda r: [
                cell(r, r.up_gbps, "up", 2), cell(r, r.down_gbps, "down", 2),
                cell(r, r.conn_per_s, "conn", 0), fmt(r.cpu_us_per_conn, 1) + " ", fmt(r.kib_per_idle_conn, 2) + " ",
            ],
            [("up", 16), ("down", 16), ("conn/s", 16), ("conn errors", 13)],
            lambda r: [*busy_cells(r, ("up", "down", "conn")), str(r.detail.get("conn", {}).get("errors", "-"))],
        )
        turns = {name: r.detail["conn_rounds"]["rounds"] for name, r in rows.items() if r.detail.get("conn_rounds")}
        if turns:
            print("\nconn/s in each round (taking turns), and portrouter's ratio to haproxy in the same round:")
            for name, done in turns.items():
                print(f"  {name:<11} " + " ".join(f"{d['conn_per_s']:>7,.0f}" for d in done)
                      + (f"   {' '.join(f'{x:.2f}' for x in paired(by_round(rows, name), by_round(rows, 'haproxy'))[1])}"
                         if name == "portrouter" else ""))
        print_ratios(checks, references)

    def print_profile(self, profile: dict[str, Any]) -> None:
        print()
        print(f"portrouter under conn/s load, py-spy, {profile['samples']} samples while busy "
              f"({profile['conn_per_s_under_profiler']:,} conn/s while sampled)")
        print_frames(profile, (("self time (syscalls count as self time of their caller)", "top_self"),
                               ("inclusive, below the reactor loop", "top_inclusive")))


def backend_open(status: Path) -> int:
    """Connections the echo backend holds right now (from its status file)."""
    for _ in range(5):
        try:
            _accepted, open_ = status.read_text().split()
            return int(open_)
        except (OSError, ValueError):
            time.sleep(0.005)  # a torn read of a file being rewritten: read again
    raise BenchError(f"cannot read backend status {status}")


def by_round(rows: dict[str, Row], target: str) -> dict[int, float]:
    """C{target}'s conn/s by round, if it took turns in L{Bench.conn_rounds}."""
    row = rows.get(target)
    if row is None:
        return {}
    return {d["round"]: d["conn_per_s"] for d in row.detail.get("conn_rounds", {}).get("rounds", [])}


def same_round(rows: dict[str, Row], a: str, b: str) -> float | None:
    """The median of C{a}'s conn/s over C{b}'s within each round."""
    return paired(by_round(rows, a), by_round(rows, b))[0]
