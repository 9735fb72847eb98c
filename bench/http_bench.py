"""
The HTTP section (issue 3): portrouter's reverse proxy against stock
Twisted (C{ReverseProxyResource}), HAProxy and nginx as proxies, and no
proxy, under C{wrk -t1 -c50} keep-alive load on a 100-byte and a 1 MiB
static file served by nginx. One run, so the ratios compare like with like.

portrouter logs every request, so where it logs to is part of what is
measured (issue 20): the ``portrouter`` row logs to a file as a daemon does,
``portrouter-stdout`` and ``portrouter-json`` are the same route logging to
stdout and as JSON lines. Those rows and HAProxy take turns at the 100 B load
in rounds, all running at once, so their ratios are free of the machine's
drift from minute to minute.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness import (
    BENCH_DIR,
    LOAD_CORE,
    LOOPBACK,
    NGINX_HTTP_TEMP,
    PROXY_CORE,
    BenchError,
    CpuWatch,
    Proc,
    Procs,
    assert_loopback_only,
    attempt,
    attempt_profile,
    blame,
    check,
    fmt,
    free_port,
    nginx_argv,
    per_op_us,
    portrouter_argv,
    print_sampled,
    py_spy_record,
    run_tool,
    summarize_profile,
    wait_listening,
)
from section import R, Section, busy_cells, cell, compare, paired, print_ratios, print_tables

TARGETS = ("direct", "portrouter", "portrouter-stdout", "portrouter-json", "portrouter-ingress", "stock", "haproxy",
           "nginx")
# What each row is, for the table's legend and the JSON.
DESCRIPTION = {
    "direct": "no proxy: wrk to the nginx backend",
    "portrouter": "portrouter, a project's own HTTP port (--http), logging to a file (-l FILE) as a daemon does",
    "portrouter-stdout": "the same, logging to stdout (twistd -n with no log option)",
    "portrouter-json": "the same, logging JSON lines to a file (--logger portrouter.logs.json, PORTROUTER_JSON_LOG)",
    "portrouter-ingress": "portrouter, the ingress path route /web/ (prefix stripped)",
    "stock": "twisted.web.proxy.ReverseProxyResource on a Site (bench/stock_http_proxy.py)",
    "haproxy": "HAProxy, mode http, nbthread 1, keep-alive to the server",
    "nginx": "nginx proxy_pass, 1 worker, upstream keepalive 64, HTTP/1.1",
}
SIZES = {"100b": 100, "1m": 1 << 20}  # the two static files, by name
# The rows that take turns at the 100 B load, running at once: portrouter by
# log destination (Procs.start's log_to), and HAProxy, its target's peer.
ROUNDS = {"portrouter": "file", "portrouter-stdout": "stdout", "portrouter-json": "json", "haproxy": None}
# Of those, the rows measured at 1 MiB too (where the log is no part of the cost).
ROUNDS_1M = ("portrouter", "haproxy")
CONNECTIONS = 50
WARMUP = 1.0  # seconds of the same load before each measurement (pools, allocations)

BACKEND_NGINX = """\
http {
    access_log off;
""" + NGINX_HTTP_TEMP + """\
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:{port};
        root {root};
        location / { }
    }
}
"""

PROXY_NGINX = """\
http {
    access_log off;
""" + NGINX_HTTP_TEMP + """\
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    upstream backend {
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:{port};
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
"""

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s

frontend bench
    bind {listen}:{port}
    default_backend bench

backend bench
    server backend {listen}:{backend}
"""

INGRESS_CONFIG = """\
projects:
  - name: web
    backend: tcp:127.0.0.1:{backend}
"""

# wrk's summary as one JSON line; a script with only done() does not slow the load.
WRK_REPORT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "bytes": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "latency_p50_us": %d, "latency_p99_us": %d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    req_per_s: dict[str, float | None] = field(default_factory=dict)  # by size name
    mb_per_s: dict[str, float | None] = field(default_factory=dict)
    cpu_us: dict[str, float | None] = field(default_factory=dict)  # the proxy's CPU time per request
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # measurements that failed, and why


class Base(Section[R]):
    """
    What the HTTP section shares with the sections built on it, whatever
    their rows (C{R}): the nginx backend and its static files, the proxies,
    wrk and the first-GET check. L{Bench} is the HTTP section itself.
    """

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.root = self.work / "www"
        self.report = self.work / "wrk-report.lua"
        self.files: dict[str, bytes] = {}

    def prepare(self) -> None:
        self.root.mkdir(exist_ok=True)
        for name, size in SIZES.items():
            pattern = bytes(range(33, 127))  # printable, so a mangled body is easy to see in a log
            body = (pattern * (size // len(pattern) + 1))[:size]
            (self.root / f"{name}.bin").write_bytes(body)
            self.files[name] = body
        self.report.write_text(WRK_REPORT)

    # -- backend and proxies -------------------------------------------------------

    def backend(self, tag: str) -> tuple[Proc, int]:
        """nginx serving the static files, one worker, on the load core."""
        port = free_port()
        name = f"backend-{tag}"
        body = BACKEND_NGINX.replace("{port}", str(port)).replace("{root}", str(self.root))
        proc = self.procs.start(name, nginx_argv(self.tools["nginx"], self.work, name, body), LOAD_CORE)
        wait_listening(proc, port)
        return proc, port

    def proxy(self, target: str, backend: int) -> tuple[Proc, int, str]:
        """Start C{target} on the proxy core in front of C{backend}: process, port, URL prefix."""
        port = free_port()
        prefix = ""
        env = None
        if target in ("portrouter", "portrouter-stdout", "portrouter-json"):
            argv = portrouter_argv(
                self.tools["twistd"], [("http", f"tcp:{port}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{backend}")]
            )
            env = self.portrouter_env
        elif target == "portrouter-ingress":
            cfg = self.work / f"{target}.yaml"
            cfg.write_text(INGRESS_CONFIG.format(backend=backend))
            argv = portrouter_argv(self.tools["twistd"], [], ingress=f"tcp:{port}:interface={LOOPBACK}", config=cfg)
            env = self.portrouter_env
            prefix = "/web"
        elif target == "stock":
            argv = [sys.executable, str(BENCH_DIR / "stock_http_proxy.py"), str(port), str(backend)]
        elif target == "haproxy":
            cfg = self.work / f"{target}.cfg"
            cfg.write_text(HAPROXY_CFG.format(listen=LOOPBACK, port=port, backend=backend))
            argv = [self.tools["haproxy"], "-db", "-f", str(cfg)]
        elif target == "nginx":
            body = PROXY_NGINX.replace("{port}", str(port)).replace("{backend}", str(backend))
            argv = nginx_argv(self.tools["nginx"], self.work, f"proxy-{target}", body)
        else:
            raise ValueError(target)
        proc = self.procs.start(target, argv, PROXY_CORE, env=env, log_to=ROUNDS.get(target) or "file")
        wait_listening(proc, port, timeout=20)
        assert_loopback_only([proc])
        return proc, port, prefix

    # -- measurements ----------------------------------------------------------------

    def fetch_check(self, url: str, name: str) -> None:
        """One plain GET before the load: a proxy that answers fast with errors must not look fast."""
        # Never an http_proxy from the environment; an https: URL (the tls
        # section) is served with a throw-away certificate, not verified.
        unverified = urllib.request.HTTPSHandler(context=ssl._create_unverified_context())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), unverified)
        try:
            with opener.open(url, timeout=10) as response:
                status, body = response.status, response.read()
        except OSError as e:
            raise BenchError(f"GET {url} failed: {e}") from None
        if status != 200 or body != self.files[name]:
            raise BenchError(f"GET {url}: status {status}, {len(body)} bytes, not the {len(self.files[name])} served")

    def wrk(self, url: str, seconds: float, proxy: Proc | None = None) -> dict[str, Any]:
        """
        C{wrk -t1 -c50} on the load core; its summary plus how busy each core
        was and, with C{proxy}, the CPU time that proxy used.
        """
        argv = [
            "taskset", "-c", str(LOAD_CORE), self.tools["wrk"], "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s",
            "--timeout", "10s", "-s", str(self.report), url,
        ]
        watch = CpuWatch(self.procs, proxy)
        out = run_tool(argv, seconds + 30, "wrk")
        cpu = watch.stop()
        line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
        if out.returncode != 0 or line is None:
            raise BenchError(f"wrk failed: {(out.stderr or out.stdout).strip()[-500:]}")
        summary: dict[str, Any] = json.loads(line)
        seconds_run = max(summary["duration_us"] / 1e6, 1e-3)
        errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
        result = {
            "req_per_s": round(summary["requests"] / seconds_run),
            "mb_per_s": round(summary["bytes"] / seconds_run / 1e6, 1),
            "errors": errors,
            **summary,
            **cpu,
        }
        if "proxy_cpu_s" in cpu:
            result["cpu_us_per_req"] = per_op_us(cpu["proxy_cpu_s"], summary["requests"])
        if summary["requests"] == 0:
            raise BenchError(f"wrk completed no request on {url}")
        if summary["status"] > 0.01 * summary["requests"]:
            raise BenchError(f"{summary['status']} of {summary['requests']} answers from {url} were not 2xx/3xx")
        return result


class Bench(Base[Row]):
    """One HTTP run: the static files written once, then every target measured in turn."""

    NAME = "http"
    # tuple[str, ...]: a section built on this one has targets and tools of its own.
    TARGETS: ClassVar[tuple[str, ...]] = TARGETS
    SECONDS_HELP = "length of each wrk run; at 100 B in the rounds, of all rounds together (default 5)"
    OPTIONS = {"rounds": {"type": int, "default": 5,
                          "help": "turns the rows of different log destinations and haproxy take at 100 B (default 5)"}}
    PORTROUTER = frozenset({"portrouter", "portrouter-stdout", "portrouter-json", "portrouter-ingress"})
    DESCRIPTION = DESCRIPTION
    TURNS: ClassVar[frozenset[str]] = frozenset(ROUNDS)  # the rows measure_all has take turns

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        # --http-rounds: the sections built on Base (tls, hostnames, cluster)
        # take no turns, and have no --NAME-rounds to ask for any.
        self.rounds: int = max(1, args.http_rounds)

    def parameters(self) -> dict[str, Any]:
        return {"connections": CONNECTIONS, "wrk_threads": 1, "sizes": SIZES, "warmup_s": WARMUP,
                "rounds": self.rounds, "rounds_rows": list(ROUNDS)}
    TOOLS: ClassVar[tuple[str, ...]] = ("taskset", "wrk", "nginx")
    TARGET_TOOLS = {
        "portrouter": ("twistd",), "portrouter-stdout": ("twistd",), "portrouter-json": ("twistd",),
        "portrouter-ingress": ("twistd",), "stock": ("twistd",), "haproxy": ("haproxy",),
    }
    VERSIONS = {"wrk": "-v", "nginx": "-v", "haproxy": "-v"}

    def measure(self, target: str) -> Row:
        row = Row()
        print(f"[http] {target} ...", flush=True)
        backend, backend_port = self.backend(target)
        proxy: Proc | None = None
        try:
            if target == "direct":
                port, prefix = backend_port, ""
            else:
                proxy, port, prefix = self.proxy(target, backend_port)
            for name in SIZES:
                url = f"http://{LOOPBACK}:{port}{prefix}/{name}.bin"

                def one() -> dict[str, Any]:
                    with blame(proxy):
                        self.fetch_check(url, name)
                        self.wrk(url, WARMUP)
                        return self.retry.quietly(f"{target} {name}", lambda: self.wrk(url, self.seconds, proxy),
                                                  retry=target != "direct")

                result = attempt("http", target, row.errors, name, one)
                if result is not None:
                    row.req_per_s[name] = result["req_per_s"]
                    row.mb_per_s[name] = result["mb_per_s"]
                    row.cpu_us[name] = result.get("cpu_us_per_req")
                    row.detail[name] = result
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(backend)
        return row

    def measure_all(self, targets: list[str]) -> dict[str, Row]:
        """Every target in turn, but the rows of L{TURNS} together, taking turns, where the first of them comes."""
        self.prepare()
        together = [t for t in targets if t in self.TURNS]
        rows: dict[str, Row] = {}
        for target in targets:
            if target not in together:
                rows[target] = self.measure(target)
            elif target == together[0]:
                rows.update(self.measure_rounds(together))
        return {target: rows[target] for target in targets}

    def measure_rounds(self, targets: list[str]) -> dict[str, Row]:
        """
        C{targets} all started at once in front of one backend, idle but for
        the one measured: the 100 B load in rounds, the order rotating (a
        row's figure is the median of its rounds, its CPU per request that of
        all its rounds), then 1 MiB for those in L{ROUNDS_1M}.
        """
        rows = {target: Row() for target in targets}
        each = max(1, round(self.seconds / self.rounds))  # wrk takes whole seconds
        print(f"[http] {', '.join(targets)}: 100 B in {self.rounds} rounds of {each:g} s each, taking turns",
              flush=True)
        backend, backend_port = self.backend("rounds")
        proxies: dict[str, Proc] = {}
        urls: dict[str, str] = {}
        try:
            for target in targets:
                proxies[target], port, prefix = self.proxy(target, backend_port)
                urls[target] = f"http://{LOOPBACK}:{port}{prefix}"
            for target in targets:
                def warm(target: str = target) -> None:
                    with blame(proxies[target]):
                        for name in SIZES:
                            self.fetch_check(f"{urls[target]}/{name}.bin", name)
                        self.wrk(f"{urls[target]}/100b.bin", WARMUP)

                attempt("http", target, rows[target].errors, "100b", warm)
            results: dict[str, list[dict[str, Any]]] = {}
            for r in range(self.rounds):
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                for target in order:
                    if "100b" in rows[target].errors:
                        continue
                    url, proxy = f"{urls[target]}/100b.bin", proxies[target]

                    def one(url: str = url, proxy: Proc = proxy) -> dict[str, Any]:
                        with blame(proxy):
                            return self.wrk(url, each, proxy)

                    result = attempt("http", target, rows[target].errors, "100b",
                                     lambda: self.retry.quietly(f"{target} 100b round {r + 1}", one))
                    if result is not None:
                        results.setdefault(target, []).append({**result, "round": r})
            for target, done in results.items():
                row = rows[target]
                if "100b" in row.errors:
                    continue
                row.req_per_s["100b"] = round(statistics.median(d["req_per_s"] for d in done))
                row.mb_per_s["100b"] = round(statistics.median(d["mb_per_s"] for d in done), 1)
                row.cpu_us["100b"] = per_op_us(sum(d["proxy_cpu_s"] for d in done), sum(d["requests"] for d in done))
                row.detail["100b"] = {
                    "rounds": done,
                    "rates": [d["req_per_s"] for d in done],
                    "busy_load_core": round(statistics.mean(d["busy_load_core"] for d in done), 1),
                    "busy_proxy_core": round(statistics.mean(d["busy_proxy_core"] for d in done), 1),
                    "foreign_cpu": max(d["foreign_cpu"] for d in done),
                    "errors": sum(d["errors"] for d in done),
                    "latency_p99_us": round(statistics.median(d["latency_p99_us"] for d in done)),
                }
            for target in targets:
                if target not in ROUNDS_1M:
                    continue
                url, proxy = f"{urls[target]}/1m.bin", proxies[target]

                def big(url: str = url, proxy: Proc = proxy, target: str = target) -> dict[str, Any]:
                    with blame(proxy):
                        self.wrk(url, WARMUP)
                        return self.retry.quietly(f"{target} 1m", lambda: self.wrk(url, self.seconds, proxy))

                result = attempt("http", target, rows[target].errors, "1m", big)
                if result is not None:
                    rows[target].req_per_s["1m"] = result["req_per_s"]
                    rows[target].mb_per_s["1m"] = result["mb_per_s"]
                    rows[target].cpu_us["1m"] = result.get("cpu_us_per_req")
                    rows[target].detail["1m"] = result
        finally:
            for proc in proxies.values():
                self.procs.stop(proc)
            self.procs.stop(backend)
        return rows

    # -- profiling (optional) ----------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where portrouter's time goes under the 100 B load (py-spy, 500 Hz, 4 s)."""

        def record() -> dict[str, Any]:
            backend, backend_port = self.backend("profile")
            proxy, port, _ = self.proxy("portrouter", backend_port)
            raw = self.work / "portrouter-http-profile.txt"
            try:
                url = f"http://{LOOPBACK}:{port}/100b.bin"
                self.wrk(url, WARMUP)
                with blame(proxy):
                    load = py_spy_record(py_spy, proxy.pid, raw, 4, lambda: self.wrk(url, 5))
            finally:
                self.procs.stop(proxy)
                self.procs.stop(backend)
            return {"req_per_s_under_profiler": load["req_per_s"], **summarize_profile(raw)}

        return attempt_profile("http", "profile", record)

    # -- the report ----------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """The comparisons issues 3 and 20 ask for, with their targets."""
        vs_haproxy = same_round(rows, "portrouter", "haproxy")
        return [
            check("100 B req/s: portrouter / stock", compare(rows, "portrouter", "stock", "req_per_s", "100b"),
                  ">=", 3.0),
            check("1 MiB MB/s: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "mb_per_s", "1m"),
                  ">=", 1.0),
            check("100 B req/s: portrouter / haproxy", vs_haproxy, ">=", 0.4),
            check("100 B req/s: portrouter / haproxy (stretch)", vs_haproxy, ">=", 0.5),
            check("100 B req/s: portrouter-stdout / portrouter", same_round(rows, "portrouter-stdout", "portrouter"),
                  "within", 0.1),
            check("100 B req/s: portrouter-json / portrouter", same_round(rows, "portrouter-json", "portrouter"),
                  "within", 0.1),
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        """Same-run comparisons with no target, to see how far off the best the numbers are."""
        return [
            ("100 B CPU per request: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "cpu_us", "100b")),
            # The log destination's cost in CPU time, which other programs do not change.
            ("100 B CPU per request: portrouter-stdout / portrouter",
             compare(rows, "portrouter-stdout", "portrouter", "cpu_us", "100b")),
            ("100 B CPU per request: portrouter-json / portrouter",
             compare(rows, "portrouter-json", "portrouter", "cpu_us", "100b")),
            ("100 B req/s: portrouter / nginx", compare(rows, "portrouter", "nginx", "req_per_s", "100b")),
            ("1 MiB req/s: portrouter / nginx", compare(rows, "portrouter", "nginx", "req_per_s", "1m")),
            ("100 B req/s: ingress /web/ / own port",
             compare(rows, "portrouter-ingress", "portrouter", "req_per_s", "100b")),
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, "HTTP (wrk -t1 -c50)",
            [("100 B req/s", 13), ("CPU us/req", 12), ("1 MiB req/s", 13), ("1 MiB MB/s", 12)],
            lambda r: [
                cell(r, r.req_per_s.get("100b"), "100b", 0), fmt(r.cpu_us.get("100b"), 1) + " ",
                cell(r, r.req_per_s.get("1m"), "1m", 0), cell(r, r.mb_per_s.get("1m"), "1m", 0),
            ],
            [("100 B", 16), ("1 MiB", 16), ("wrk errors", 12), ("p99 ms 100 B", 14)],
            lambda r: [
                *busy_cells(r, ("100b", "1m")),
                "/".join(str(r.detail.get(k, {}).get("errors", "-")) for k in SIZES),
                fmt(r.detail["100b"]["latency_p99_us"] / 1000 if "100b" in r.detail else None, 1) + " ",
            ],
        )
        turns = [name for name in rows if round_rates(rows, name)]
        if turns:
            print()
            print("100 B req/s in each round (taking turns), and the ratio to portrouter (-l FILE) in the same round:")
            for name in turns:
                rates = round_rates(rows, name)
                ratios = paired(rates, round_rates(rows, "portrouter"))[1] if name != "portrouter" else []
                print(f"  {name:<18} " + " ".join(f"{v:>7,}" for v in rates.values())
                      + ("   " + " ".join(f"{v:.2f}" for v in ratios) if ratios else ""))
        print_ratios(checks, references)

    def print_profile(self, profile: dict[str, Any]) -> None:
        if "error" not in profile:  # else it was reported as it failed
            print_sampled("portrouter under 100 B wrk load", profile,
                          f"{profile['req_per_s_under_profiler']:,} req/s")



def round_rates(rows: dict[str, Row], target: str) -> dict[int, float]:
    """C{target}'s 100 B req/s by round, if it took turns in L{Bench.measure_rounds}."""
    row = rows.get(target)
    if row is None or "100b" in row.errors:
        return {}
    return {d["round"]: d["req_per_s"] for d in row.detail.get("100b", {}).get("rounds", [])}


def same_round(rows: dict[str, Row], a: str, b: str) -> float | None:
    """
    C{a}'s 100 B req/s over C{b}'s: the median of the ratios within each
    round if both took turns, else of their figures.
    """
    mine, other = round_rates(rows, a), round_rates(rows, b)
    if mine and other:
        return paired(mine, other)[0]
    return compare(rows, a, b, "req_per_s", "100b")
