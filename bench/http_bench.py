"""
The HTTP section (issue 3): portrouter's reverse proxy against stock
Twisted (C{ReverseProxyResource}), HAProxy and nginx as proxies, and no
proxy, under C{wrk -t1 -c50} keep-alive load on a 100-byte and a 1 MiB
static file served by nginx. One run, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from harness import (
    BENCH_DIR,
    LOAD_CORE,
    LOOPBACK,
    NGINX_HTTP_TEMP,
    NOISY,
    PROFILE_PARTS,
    PROXY_CORE,
    BenchError,
    CpuWatch,
    Proc,
    Procs,
    Retry,
    assert_loopback_only,
    attempt,
    blame,
    busy_cell,
    check,
    fmt,
    free_port,
    host_info,
    nginx_argv,
    portrouter_argv,
    portrouter_under_test,
    print_checks,
    print_errors,
    print_frames,
    print_table,
    py_spy_record,
    quiet_check,
    ratio,
    require,
    require_portrouter,
    run_tool,
    summarize_profile,
    wait_listening,
    wait_quiet,
    warn_if_busy,
    write_results,
)

TARGETS = ("direct", "portrouter", "portrouter-ingress", "stock", "haproxy", "nginx")
# What each row is, for the table's legend and the JSON.
DESCRIPTION = {
    "direct": "no proxy: wrk to the nginx backend",
    "portrouter": "portrouter, a project's own HTTP port (--http)",
    "portrouter-ingress": "portrouter, the ingress path route /web/ (prefix stripped)",
    "stock": "twisted.web.proxy.ReverseProxyResource on a Site (bench/stock_http_proxy.py)",
    "haproxy": "HAProxy, mode http, nbthread 1, keep-alive to the server",
    "nginx": "nginx proxy_pass, 1 worker, upstream keepalive 64, HTTP/1.1",
}
SIZES = {"100b": 100, "1m": 1 << 20}  # the two static files, by name
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("http")
    group.add_argument("--http-seconds", type=float, default=5.0, help="length of each wrk run (default 5)")
    group.add_argument(
        "--http-targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}"
    )


def _targets(args: argparse.Namespace) -> list[str]:
    targets = [t.strip() for t in args.http_targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise BenchError(f"unknown HTTP targets: {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})")
    return targets


def _tool_names(args: argparse.Namespace) -> list[str]:
    targets = set(_targets(args))
    names = ["taskset", "wrk", "nginx"]
    if targets & {"portrouter", "portrouter-ingress", "stock"} or args.profile:
        names.append("twistd")
    if "haproxy" in targets:
        names.append("haproxy")
    if args.profile:
        names.append("py-spy")
    return names


def preflight(args: argparse.Namespace) -> None:
    """Every missing tool named before any section starts."""
    require(*_tool_names(args))


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    req_per_s: dict[str, float | None] = field(default_factory=dict)  # by size name
    mb_per_s: dict[str, float | None] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # measurements that failed, and why


class Bench:
    """One HTTP run: the static files written once, then every target measured in turn."""

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        self.procs = procs
        self.tools = tools
        self.seconds: float = args.http_seconds
        self.work = procs.workdir
        self.portrouter_env = portrouter_env
        self.retry = Retry("http")
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
        if target == "portrouter":
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
        proc = self.procs.start(target, argv, PROXY_CORE, env=env)
        wait_listening(proc, port, timeout=20)
        assert_loopback_only([proc])
        return proc, port, prefix

    # -- measurements ----------------------------------------------------------------

    def fetch_check(self, url: str, name: str) -> None:
        """One plain GET before the load: a proxy that answers fast with errors must not look fast."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy from the environment
        try:
            with opener.open(url, timeout=10) as response:
                status, body = response.status, response.read()
        except OSError as e:
            raise BenchError(f"GET {url} failed: {e}") from None
        if status != 200 or body != self.files[name]:
            raise BenchError(f"GET {url}: status {status}, {len(body)} bytes, not the {len(self.files[name])} served")

    def wrk(self, url: str, seconds: float) -> dict[str, Any]:
        """C{wrk -t1 -c50} on the load core; its summary plus how busy each core was."""
        argv = [
            "taskset", "-c", str(LOAD_CORE), self.tools["wrk"], "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s",
            "--timeout", "10s", "-s", str(self.report), url,
        ]
        watch = CpuWatch(self.procs)
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
        if summary["requests"] == 0:
            raise BenchError(f"wrk completed no request on {url}")
        if summary["status"] > 0.01 * summary["requests"]:
            raise BenchError(f"{summary['status']} of {summary['requests']} answers from {url} were not 2xx/3xx")
        return result

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
                        return self.retry.quietly(f"{target} {name}", lambda: self.wrk(url, self.seconds),
                                                  retry=target != "direct")

                result = attempt("http", target, row.errors, name, one)
                if result is not None:
                    row.req_per_s[name] = result["req_per_s"]
                    row.mb_per_s[name] = result["mb_per_s"]
                    row.detail[name] = result
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(backend)
        return row

    # -- profiling (optional) ----------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where portrouter's time goes under the 100 B load (py-spy, 500 Hz, 4 s)."""
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


def ratios(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """The comparisons issue 3 asks for, with their targets."""

    def req(target: str, size: str) -> float | None:
        row = rows.get(target)
        return None if row is None else row.req_per_s.get(size)

    def mb(target: str, size: str) -> float | None:
        row = rows.get(target)
        return None if row is None else row.mb_per_s.get(size)

    return [
        check("100 B req/s: portrouter / stock", ratio(req("portrouter", "100b"), req("stock", "100b")), ">=", 3.0),
        check("1 MiB MB/s: portrouter / haproxy", ratio(mb("portrouter", "1m"), mb("haproxy", "1m")), ">=", 1.0),
    ]


def references(rows: dict[str, Row]) -> list[tuple[str, float | None]]:
    """Same-run comparisons with no target, to see how far off the best the numbers are."""

    def req(target: str, size: str) -> float | None:
        row = rows.get(target)
        return None if row is None else row.req_per_s.get(size)

    return [
        ("100 B req/s: portrouter / haproxy", ratio(req("portrouter", "100b"), req("haproxy", "100b"))),
        ("100 B req/s: portrouter / nginx", ratio(req("portrouter", "100b"), req("nginx", "100b"))),
        ("1 MiB req/s: portrouter / nginx", ratio(req("portrouter", "1m"), req("nginx", "1m"))),
        ("100 B req/s: ingress /web/ / own port",
         ratio(req("portrouter-ingress", "100b"), req("portrouter", "100b"))),
    ]


def print_report(rows: dict[str, Row], checks: list[dict[str, Any]]) -> None:
    def cell(r: Row, value: float | None, key: str, digits: int) -> str:
        if key in r.errors:
            return "FAILED "
        noisy = r.detail.get(key, {}).get("foreign_cpu", 0) > NOISY
        return fmt(value, digits) + ("*" if noisy else " ")

    print()
    print_table(
        "HTTP (wrk -t1 -c50)",
        [("100 B req/s", 13), ("1 MiB req/s", 13), ("1 MiB MB/s", 12)],
        {
            name: [
                cell(r, r.req_per_s.get("100b"), "100b", 0), cell(r, r.req_per_s.get("1m"), "1m", 0),
                cell(r, r.mb_per_s.get("1m"), "1m", 0),
            ]
            for name, r in rows.items()
        },
    )
    if any(d.get("foreign_cpu", 0) > NOISY for r in rows.values() for d in r.detail.values()):
        print(f"* other programs used more than {NOISY:g}% of a core meanwhile: rerun on a quiet machine")
    print()
    print_table(
        "core busy %: load / proxy (others)",
        [("100 B", 16), ("1 MiB", 16), ("wrk errors", 12), ("p99 ms 100 B", 14)],
        {
            name: [
                busy_cell(r.detail.get("100b")), busy_cell(r.detail.get("1m")),
                "/".join(str(r.detail.get(k, {}).get("errors", "-")) for k in SIZES),
                fmt(r.detail["100b"]["latency_p99_us"] / 1000 if "100b" in r.detail else None, 1) + " ",
            ]
            for name, r in rows.items()
        },
    )
    print_errors(rows)
    print()
    print_checks(checks)
    for what, value in references(rows):
        shown = "-" if value is None else f"{value:.2f}x"
        print(f"{what:<40} {shown:>7}   (reference)")


def print_profile(profile: dict[str, Any]) -> None:
    print()
    print(f"portrouter under 100 B wrk load, py-spy -r 500, {profile['samples']} samples "
          f"({profile['req_per_s_under_profiler']:,} req/s while sampled)")
    print_frames(profile, PROFILE_PARTS)


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    """Measure every requested target; print the table and write the JSON."""
    targets = _targets(args)
    tools = require(*_tool_names(args))
    py_spy = tools.get("py-spy")
    env, source = portrouter_under_test(procs.workdir, args.portrouter_rev)
    if {"portrouter", "portrouter-ingress"} & set(targets) or py_spy:
        require_portrouter(tools["twistd"], env)
    bench = Bench(procs, tools, args, env)

    quiet_before = wait_quiet(args.wait_quiet)
    warn_if_busy(quiet_before)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"[http] portrouter from {source}", flush=True)
    t0 = time.monotonic()
    bench.prepare()
    rows: dict[str, Row] = {}
    for target in targets:
        rows[target] = bench.measure(target)
    quiet_after = quiet_check()
    warn_if_busy(quiet_after)

    checks = ratios(rows)
    print_report(rows, checks)
    versions = {"wrk": [tools["wrk"], "-v"], "nginx": [tools["nginx"], "-v"]}
    if "haproxy" in tools:
        versions["haproxy"] = [tools["haproxy"], "-v"]
    data: dict[str, Any] = {
        "section": "http",
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "host": host_info(source, **versions),
        "parameters": {
            "seconds": bench.seconds, "connections": CONNECTIONS, "wrk_threads": 1, "sizes": SIZES,
            "warmup_s": WARMUP, "load_core": LOAD_CORE, "proxy_core": PROXY_CORE,
        },
        "targets": {t: DESCRIPTION[t] for t in targets},
        "other_load_busy_percent": {"before": quiet_before, "after": quiet_after},
        "rows": {name: asdict(r) for name, r in rows.items()},
        "ratios": checks,
        "references": dict(references(rows)),
        "profile": None,
    }
    path = write_results("http", data)
    print(f"\nresults: {path}")
    if py_spy:
        # After the results are safe; a failed profile is reported like a failed measurement.
        errors: dict[str, str] = {}
        profile = attempt("http", "portrouter", errors, "profile", lambda: bench.profile(py_spy))
        data["profile"] = profile if profile is not None else {"error": errors["profile"]}
        if profile is not None:
            print_profile(profile)
        path.write_text(json.dumps(data, indent=2) + "\n")
    return data
