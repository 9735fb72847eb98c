"""
The TCP section: portrouter against no proxy, stock C{twistd portforward} and
HAProxy, on bulk throughput, connection rate and memory per idle connection,
all in one run so that the ratios compare like with like (absolute numbers
drift 10-15% between runs on this machine; see shared/NOTES.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from harness import (
    BENCH_DIR,
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    BenchError,
    CpuWatch,
    Proc,
    Procs,
    assert_loopback_only,
    fmt,
    free_port,
    listen_drops,
    print_table,
    quiet_check,
    require,
    settled_rss_kib,
    tool_version,
    wait_listening,
    wait_quiet,
    wait_until,
    write_results,
)

TARGETS = ("direct", "portrouter", "portforward", "haproxy")
MESSAGE = 64  # bytes each way per connection in the conn/s test
CONCURRENCY = 16
WARMUP = 0.5  # seconds of conn/s load before any measurement
NOISY = 10.0  # percent of a core used by other programs that makes a number suspect
RETRY_BUDGET = 60.0  # seconds a run may spend measuring again because of other programs

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tcp")
    group.add_argument("--tcp-seconds", type=float, default=5.0, help="length of each iperf3 and conn/s run (default 5)")
    group.add_argument("--tcp-idle", type=int, default=2000, help="idle connections for the memory test (default 2000)")
    group.add_argument(
        "--tcp-targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}"
    )
    group.add_argument(
        "--portrouter-rev", metavar="REV",
        help="measure this commit of the repository (extracted with git archive) instead of the installed portrouter",
    )
    group.add_argument(
        "--profile", action="store_true",
        help="after the table, profile portrouter under conn/s load with py-spy (not counted in the results)",
    )


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    up_gbps: float | None = None
    down_gbps: float | None = None
    conn_per_s: float | None = None
    kib_per_idle_conn: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Bench:
    """One TCP run: the C tool built once, then every target measured in turn."""

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace):
        self.procs = procs
        self.tools = tools
        self.seconds: float = args.tcp_seconds
        self.idle: int = args.tcp_idle
        self.work = procs.workdir
        self.connrate = str(self.work / "connrate")
        self.portrouter_env: dict[str, str] | None = None  # set by use_revision
        self.retry_budget = RETRY_BUDGET

    def build(self) -> None:
        """Compile connrate.c into the work directory, never into the source tree."""
        cmd = [self.tools["gcc"], "-O2", "-Wall", "-o", self.connrate, str(BENCH_DIR / "connrate.c")]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise BenchError(f"building connrate failed:\n{out.stderr}")

    def use_revision(self, rev: str) -> str:
        """
        Run portrouter from a snapshot of commit C{rev} rather than the
        installed tree, which may be an editable install in mid-edit. The
        snapshot goes first on PYTHONPATH, ahead of the install's .pth entry.
        """
        repo = BENCH_DIR.parent
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", f"{rev}^{{commit}}"],
            capture_output=True, text=True, timeout=10,
        )
        if commit.returncode != 0:
            raise BenchError(f"no such revision {rev!r} in {repo}: {commit.stderr.strip()}")
        snap = self.work / f"portrouter-{commit.stdout.strip()}"
        snap.mkdir()
        archive = subprocess.Popen(
            ["git", "-C", str(repo), "archive", commit.stdout.strip(), "portrouter", "twisted"],
            stdout=subprocess.PIPE,
        )
        untar = subprocess.run(["tar", "-x", "-C", str(snap)], stdin=archive.stdout, timeout=60)
        if archive.wait(timeout=60) != 0 or untar.returncode != 0:
            raise BenchError(f"could not extract {rev} from {repo}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snap), env.get("PYTHONPATH")]))
        self.portrouter_env = env
        return f"{repo} at {commit.stdout.strip()} (snapshot of {rev})"

    # -- backends and proxies ----------------------------------------------------

    def echo_backend(self, name: str) -> tuple[Proc, int, Path]:
        """The C echo server on the load core; returns it, its port and its status file."""
        status = self.work / f"{name}-echo.status"
        proc = self.procs.start(f"{name}-echo", [self.connrate, "serve", str(status)], LOAD_CORE, pipe=True)
        line = proc.read_line(10)
        if not line.startswith("port "):
            raise BenchError(f"echo server said {line!r}")
        return proc, int(line.split()[1]), status

    def iperf_backend(self, name: str) -> tuple[Proc, int]:
        port = free_port()
        proc = self.procs.start(
            f"{name}-iperf3-server", [self.tools["iperf3"], "-s", "-B", LOOPBACK, "-p", str(port)], LOAD_CORE
        )
        wait_listening(proc, port)
        return proc, port

    def proxy(self, target: str, backend: int, tag: str) -> tuple[Proc, int]:
        """Start C{target} on the proxy core in front of C{backend}; the process and its port."""
        port = free_port()
        name = f"{target}-{tag}"
        if target == "portrouter":
            argv = [
                self.tools["twistd"], "-n", "--pidfile=", "portrouter",
                "--ingress", f"tcp:0:interface={LOOPBACK}",
                "--tcp", f"tcp:{port}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{backend}",
            ]
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

    def quietly(self, what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """
        Take C{measure} again (up to twice, within the run's retry budget)
        when other programs took CPU meanwhile; keep the least disturbed.
        """
        result = measure()
        attempts = 1
        while result["foreign_cpu"] > NOISY and attempts < 3 and self.retry_budget > 0:
            started = time.monotonic()
            print(f"[tcp]   {what}: other programs took {result['foreign_cpu']:.0f}% of a core; "
                  "waiting for quiet and measuring again", flush=True)
            wait_quiet(10)
            again = measure()
            attempts += 1
            self.retry_budget -= time.monotonic() - started
            if again["foreign_cpu"] < result["foreign_cpu"]:
                result = again
        result["attempts"] = attempts
        return result

    def conn_load(self, port: int, seconds: float) -> dict[str, Any]:
        """C{connrate load} for C{seconds}; its JSON plus how busy each core was."""
        watch, drops = CpuWatch(self.procs), listen_drops()
        out = subprocess.run(
            ["taskset", "-c", str(LOAD_CORE), self.connrate, "load", str(port), str(seconds), str(CONCURRENCY), str(MESSAGE)],
            capture_output=True, text=True, timeout=seconds + 20,
        )
        cpu = watch.stop()
        if out.returncode != 0:
            raise BenchError(f"connrate load failed: {out.stderr.strip()}")
        result: dict[str, Any] = json.loads(out.stdout)
        result.update(cpu)
        result["listen_drops"] = listen_drops() - drops
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
        argv = [
            "taskset", "-c", str(LOAD_CORE), self.tools["iperf3"], "-c", LOOPBACK, "-p", str(port),
            "-t", f"{self.seconds:g}", "-J", "--connect-timeout", "5000",
        ]
        if reverse:
            argv.append("-R")
        watch = CpuWatch(self.procs)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=self.seconds + 30)
        cpu = watch.stop()
        try:
            data = json.loads(out.stdout)
        except ValueError:
            raise BenchError(f"iperf3 gave no JSON: {out.stderr.strip() or out.stdout[:300]}") from None
        if "error" in data:
            raise BenchError(f"iperf3: {data['error']}")
        end = data["end"]
        return {
            "gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 2),
            "retransmits": end["sum_sent"].get("retransmits"),
            **cpu,
        }

    # -- one target ----------------------------------------------------------------

    @contextmanager
    def blame(self, proxy: Proc | None) -> Iterator[None]:
        """Report a proxy that died during a test, rather than the refusals it caused."""

        def dead() -> BenchError | None:
            if proxy is None or proxy.alive():
                return None
            return BenchError(
                f"{proxy.name} exited (status {proxy.popen.returncode}) during the test; "
                f"its log ends:\n{proxy.log_tail()}"
            )

        try:
            yield
        except BenchError:
            error = dead()
            if error is not None:
                raise error from None
            raise
        error = dead()
        if error is not None:
            raise error

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
                rate = self.conn_load(port, self.seconds)
                if rate["completed"] == 0:
                    raise BenchError(f"no connection completed: {rate['first_error']}")
                # Every relayed connection must end once the load stops: a
                # proxy that leaks them fails here rather than looking fast.
                wait_until(lambda: backend_open(status) == 0, 15, "the conn/s connections to close")
                return rate

            with self.blame(proxy):
                if proxy is not None:
                    mem = self.idle_memory(proxy, port, status)
                    row.kib_per_idle_conn = mem["kib_per_conn"]
                    row.detail["idle"] = mem
                self.conn_load(port, WARMUP)  # code paths, allocations, the kernel's port tables
                rate = self.quietly(f"{target} conn/s", conn_rate)
            row.conn_per_s = round(rate["rate"])
            row.detail["conn"] = rate
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(echo)

        print(f"[tcp] {target}: bulk ...", flush=True)
        server, iperf_port = self.iperf_backend(target)
        proxy = None
        try:
            if target == "direct":
                port = iperf_port
            else:
                proxy, port = self.proxy(target, iperf_port, "iperf")
            with self.blame(proxy):
                up = self.quietly(f"{target} bulk up", lambda: self.iperf(port, reverse=False))
                down = self.quietly(f"{target} bulk down", lambda: self.iperf(port, reverse=True))
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

        def top(counts: dict[str, int], n: int) -> list[dict[str, Any]]:
            ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
            return [{"function": f, "percent": round(100 * c / total, 1)} for f, c in ranked]

        # The reactor loop and its dispatch wrappers are in nearly every stack.
        below_loop = {f: n for f, n in inclusive.items() if n < 0.6 * total}
        return {
            "conn_per_s_under_profiler": round(rate["rate"]),
            "samples": total,
            "top_self": top(self_time, 15),
            "top_inclusive": top(below_loop, 15),
            "raw_file": str(raw),
        }


def collapse(raw: str) -> tuple[dict[str, int], dict[str, int], int]:
    """
    Self and inclusive samples per function (line numbers dropped) from
    py-spy's raw collapsed stacks, and the sample total.
    """
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        total += n
    return self_time, inclusive, max(total, 1)


_LINE = re.compile(r":\d+\)$")


def backend_open(status: Path) -> int:
    """Connections the echo backend holds right now (from its status file)."""
    for _ in range(5):
        try:
            _accepted, open_ = status.read_text().split()
            return int(open_)
        except (OSError, ValueError):
            time.sleep(0.005)  # a torn read of a file being rewritten: read again
    raise BenchError(f"cannot read backend status {status}")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def ratios(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """The comparisons portrouter's design is judged by, with their targets."""

    def get(target: str, attr: str) -> float | None:
        row = rows.get(target)
        return None if row is None else getattr(row, attr)

    spec: list[tuple[str, str, str, str, float, Callable[[float, float], bool]]] = [
        ("bulk up: portrouter / haproxy", "portrouter", "haproxy", "up_gbps", 1.0, lambda r, t: r >= t),
        ("bulk down: portrouter / haproxy", "portrouter", "haproxy", "down_gbps", 1.0, lambda r, t: r >= t),
        ("conn/s: portrouter / portforward", "portrouter", "portforward", "conn_per_s", 1.5, lambda r, t: r >= t),
        ("KiB/idle conn: portrouter / haproxy", "portrouter", "haproxy", "kib_per_idle_conn", 1.0, lambda r, t: r <= t),
    ]
    out = []
    for label, a, b, attr, target, ok in spec:
        r = _ratio(get(a, attr), get(b, attr))
        sign = ">=" if label.startswith(("bulk", "conn")) else "<="
        out.append({
            "what": label,
            "ratio": r,
            "target": f"{sign} {target:g}",
            "met": None if r is None else ok(r, target),
        })
    return out


def print_report(rows: dict[str, Row], checks: list[dict[str, Any]]) -> None:
    def cell(r: Row, value: float | None, key: str, digits: int) -> str:
        noisy = r.detail.get(key, {}).get("foreign_cpu", 0) > NOISY
        return fmt(value, digits) + ("*" if noisy else " ")

    print()
    print_table(
        "TCP",
        [("up Gbit/s", 11), ("down Gbit/s", 13), ("conn/s", 10), ("KiB/idle conn", 15)],
        {
            name: [
                cell(r, r.up_gbps, "up", 2), cell(r, r.down_gbps, "down", 2),
                cell(r, r.conn_per_s, "conn", 0), fmt(r.kib_per_idle_conn, 2) + " ",
            ]
            for name, r in rows.items()
        },
    )
    if any(d.get("foreign_cpu", 0) > NOISY for r in rows.values() for d in r.detail.values()):
        print(f"* other programs used more than {NOISY:g}% of a core meanwhile: rerun on a quiet machine")
    print()
    print_table(
        "core busy %: load / proxy (others)",
        [("up", 16), ("down", 16), ("conn/s", 16), ("conn errors", 13)],
        {
            name: [
                _busy(r.detail.get("up")), _busy(r.detail.get("down")), _busy(r.detail.get("conn")),
                str(r.detail.get("conn", {}).get("errors", "-")),
            ]
            for name, r in rows.items()
        },
    )
    print()
    for c in checks:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        print(f"{c['what']:<40} {ratio:>7}   target {c['target']:<7} {verdict}")


def print_profile(profile: dict[str, Any]) -> None:
    print()
    print(f"portrouter under conn/s load, py-spy, {profile['samples']} samples while busy "
          f"({profile['conn_per_s_under_profiler']:,} conn/s while sampled)")
    for title, key in (("self time (syscalls count as self time of their caller)", "top_self"),
                       ("inclusive, below the reactor loop", "top_inclusive")):
        print(f"  {title}:")
        for item in profile[key]:
            print(f"    {item['percent']:5.1f}%  {item['function']}")


def _busy(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['busy_load_core']:.0f} / {d['busy_proxy_core']:.0f} ({d['foreign_cpu']:.0f})"


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    """Measure every requested target; print the table and write the JSON."""
    targets = [t.strip() for t in args.tcp_targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise BenchError(f"unknown TCP targets: {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})")
    names = ["gcc", "taskset", "iperf3"]
    if {"portrouter", "portforward"} & set(targets) or args.profile:
        names.append("twistd")
    if "haproxy" in targets:
        names.append("haproxy")
    if args.profile:
        names.append("py-spy")
    tools = require(*names)
    py_spy = tools.get("py-spy")
    bench = Bench(procs, tools, args)
    source = _portrouter_source()
    if args.portrouter_rev:
        source = bench.use_revision(args.portrouter_rev)
    if "portrouter" in targets or py_spy:
        _require_portrouter(tools["twistd"], bench.portrouter_env)

    quiet_before = wait_quiet(args.wait_quiet)
    _warn_if_busy(quiet_before)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if "portrouter" in targets:
        print(f"[tcp] portrouter from {source}", flush=True)
    t0 = time.monotonic()
    bench.build()
    rows: dict[str, Row] = {}
    for target in targets:
        rows[target] = bench.measure(target)
    quiet_after = quiet_check()
    _warn_if_busy(quiet_after)

    checks = ratios(rows)
    print_report(rows, checks)
    data: dict[str, Any] = {
        "section": "tcp",
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "host": {"portrouter_source": source, **_host(tools)},
        "parameters": {
            "seconds": bench.seconds, "idle_connections": bench.idle, "message_bytes": MESSAGE,
            "concurrency": CONCURRENCY, "load_core": LOAD_CORE, "proxy_core": PROXY_CORE,
        },
        "other_load_busy_percent": {"before": quiet_before, "after": quiet_after},
        "rows": {name: asdict(r) for name, r in rows.items()},
        "ratios": checks,
        "profile": None,
    }
    path = write_results("tcp", data)
    print(f"\nresults: {path}")
    if py_spy:
        # After the results are safe: a profiling failure must not lose them.
        data["profile"] = bench.profile(py_spy)
        print_profile(data["profile"])
        path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _portrouter_source() -> str:
    """Which portrouter was measured: the tree may be an editable install that moves on."""
    spec = importlib.util.find_spec("portrouter")
    if spec is None or spec.origin is None:
        return "not installed"
    where = Path(spec.origin).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = "", ""
    if not commit:
        return str(where)
    return f"{where} at {commit}{' with uncommitted changes' if dirty else ''}"


def _require_portrouter(twistd: str, env: dict[str, str] | None) -> None:
    """Fail in a second, not a minute in, when portrouter is missing or does not load."""
    try:
        metadata.version("portrouter")
    except metadata.PackageNotFoundError:
        raise BenchError(
            f"portrouter is not installed for {sys.executable}: pip install /work/main"
        ) from None
    out = subprocess.run([twistd, "portrouter", "--help"], capture_output=True, text=True, timeout=60, env=env)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        raise BenchError(f"'twistd portrouter' does not load:\n{tail}")


def _warn_if_busy(busy: dict[int, float]) -> None:
    hot = {c: b for c, b in busy.items() if c in (LOAD_CORE, PROXY_CORE) and b > 15}
    if hot:
        print(f"WARNING: cores already busy before/after the run: {hot} (%); numbers will be low and noisy",
              flush=True)


def _host(tools: dict[str, str]) -> dict[str, str]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "portrouter": version("portrouter"),
        "iperf3": tool_version([tools["iperf3"], "--version"]),
    }
    if "haproxy" in tools:
        info["haproxy"] = tool_version([tools["haproxy"], "-v"])
    return info
