"""
The PROXY protocol section (issue 17): what PROXY headers cost portrouter
in new connections per second, with them on against off, in one run.

One portrouter serves eight routes side by side, a TCP route and an HTTP
route for each row: no header (``plain``), a header received from a
trusted client (``receive``), ``send_proxy: v2`` to the backend
(``send``), and both. HAProxy, the peer, serves the same eight with
``accept-proxy`` and ``send-proxy-v2``, so the report says what the headers
cost it on the same machine. The rows take turns over several rounds, idle
but for the one measured, and a ratio is the median of the ratios within
each round: the cost asked about (under 10%) is smaller than this machine's
drift from minute to minute.

A header sent names one client connection, so on HTTP a sending route's
backend connection serves that client only, never the shared pool: each
client connection of the load pays a backend connection too. The
``unpooled`` row (HTTP only) pays the same with no header at all, its
backend closing every connection after one response; sending is judged
against it, so the figure is what the header costs, and against ``plain``
as a reference: what losing the pool costs, portrouter and HAProxy alike.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
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
    build_c,
    check,
    fmt,
    free_port,
    listen_drops,
    nginx_argv,
    per_op_us,
    portrouter_argv,
    print_sampled,
    py_spy_record,
    require,
    run_tool,
    summarize_profile,
    wait_listening,
    wait_until,
)
from section import Section, busy_cells, cell, compare, paired, print_ratios, print_tables
from tcp_bench import backend_open

TARGETS = ("plain", "receive", "send", "both", "unpooled")
DESCRIPTION = {
    "plain": "no PROXY header either way",
    "receive": "the route trusts 127.0.0.1: each client connection starts with a PROXY header "
               "(connrate sends it with its first bytes, as HAProxy's send-proxy does), read with Twisted's parser",
    "send": "send_proxy on the route: each backend connection starts with a header naming the client "
            "(on HTTP a backend connection then serves one client connection, never the shared pool)",
    "both": "a header received, and one sent on",
    "unpooled": "HTTP only, no header: the backend closes each connection after one response, so each "
                "client connection pays a backend connection, as a sending route's does",
}
# What each row is judged against, by kind: a sending HTTP route against a
# route that pays the same backend connection per client (see above).
BASE = {("tcp", "receive"): "plain", ("tcp", "send"): "plain", ("tcp", "both"): "plain",
        ("http", "receive"): "plain", ("http", "send"): "unpooled", ("http", "both"): "unpooled"}
KINDS = {"tcp": "conn/s", "http": "req/s"}
PEERS = ("haproxy",)  # measured beside portrouter unless --proxy-peers none
CONCURRENCY = 16
MESSAGE = 64  # bytes echoed per TCP connection
WARMUP = 0.5
STALLED = 10  # % of a core: a load that keeps neither core busier than this is waiting on something
BODY = "x" * 100  # each HTTP response's body

# The backend of the HTTP routes: the same server with and without proxy_protocol.
BACKEND_NGINX = """\
http {
    access_log off;
""" + NGINX_HTTP_TEMP + """\
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:{plain};
        listen 127.0.0.1:{told} proxy_protocol;
        location = /who { return 200 "$proxy_protocol_addr:$proxy_protocol_port"; }
        location / { return 200 "{body}"; }
    }
    server {
        listen 127.0.0.1:{once};
        keepalive_requests 1;
        location = /who { return 200 ":"; }
        location / { return 200 "{body}"; }
    }
}
"""


def kinds_of(target: str) -> tuple[str, ...]:
    """The kinds a row is measured on: unpooled is about HTTP's pool only."""
    return ("http",) if target == "unpooled" else tuple(KINDS)

# HAProxy with the same eight routes: one frontend and backend per row and
# kind (HAPROXY_ROUTE), headers received with accept-proxy and sent with
# send-proxy(-v2). HTTP keeps server connections for any client ("http-reuse
# always", as portrouter's shared pool does); a connection that sent a PROXY
# header is reused only for a request with the same header, so a sending
# row pays a backend connection per client connection, as portrouter's does.
HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 8000

defaults
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
"""
HAPROXY_ROUTE = """
frontend {name}
    mode {mode}
    bind {listen}:{port}{accept}
    default_backend {name}

backend {name}
    mode {mode}{reuse}
    server backend {listen}:{backend}{send}
"""


@dataclass
class Row:
    """One row's figures (the medians of its rounds), plus what is needed to judge them."""

    tcp_conn_per_s: float | None = None
    tcp_cpu_us: float | None = None  # portrouter's own CPU time (user and system) per connection
    http_req_per_s: float | None = None
    http_cpu_us: float | None = None
    # The same for HAProxy (its own CPU time), measured in the same rounds.
    haproxy_tcp_conn_per_s: float | None = None
    haproxy_tcp_cpu_us: float | None = None
    haproxy_http_req_per_s: float | None = None
    haproxy_http_cpu_us: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # by measurement: "tcp", "http", "haproxy-tcp", ...
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Setup:
    """What one run's rows share: portrouter, its backends, and each route's port."""

    procs: list[Proc]
    proxies: dict[str, Proc]  # "portrouter", and each peer measured
    status: dict[str, Path]  # each echo backend's status file: "plain" and "told"
    ports: dict[tuple[str, str, str], int]  # (proxy, kind, row): the route's port


class Bench(Section[Row]):
    """One run: the C tool built once, one portrouter with every route, the rows taking turns."""

    NAME = "proxy"
    TARGETS = TARGETS
    SECONDS_HELP = "measured per row and kind (TCP, HTTP), in all, split into the rounds (default 20)"
    # Rounds of 1 s (5 in 5 s) put single-round ratios anywhere from 0.80 to
    # 1.17, portrouter's and HAProxy's alike, and a median of five of them
    # moved by 5% from run to run: more than half the cost asked about.
    # Ten of 2 s took each row's rounds to within 0.89-1.06, but for the
    # odd one the whole machine had a slow moment in.
    SECONDS = 20.0
    OPTIONS = {
        "rounds": {"type": int, "default": 10, "help": "turns the rows take (default 10)"},
        "version": {"choices": ("v1", "v2"), "default": "v2",
                    "help": "the PROXY header version received and sent (default v2)"},
        "peers": {"choices": ("haproxy", "none"), "default": "haproxy",
                  "help": "measure HAProxy's same rows too, in the same rounds (default), or none"},
    }
    PORTROUTER = frozenset(TARGETS)
    DESCRIPTION = DESCRIPTION
    TOOLS = ("gcc", "taskset", "twistd", "nginx")
    VERSIONS = {"nginx": "-v", "haproxy": "-v"}

    @classmethod
    def require(cls, args: argparse.Namespace) -> dict[str, str]:
        """The tools of the chosen rows, and HAProxy unless --proxy-peers none."""
        names = cls.tool_names(set(cls.targets(args)), args.profile)
        return require(*names, *([] if args.proxy_peers == "none" else PEERS))

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.rounds: int = max(1, args.proxy_rounds)
        self.version: str = args.proxy_version
        self.peers: tuple[str, ...] = () if args.proxy_peers == "none" else PEERS
        self.connrate = ""

    def parameters(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "version": self.version, "concurrency": CONCURRENCY,
                "message_bytes": MESSAGE, "http_body_bytes": len(BODY), "warmup_s": WARMUP,
                "proxies": ["portrouter", *self.peers]}

    def prepare(self) -> None:
        self.connrate = build_c(self.tools["gcc"], "connrate.c", self.work)

    # -- portrouter and its backends -------------------------------------------------------

    def echo_backend(self, tag: str, proxy: bool) -> tuple[Proc, int, Path]:
        """C{connrate serve} on the load core (stripping a PROXY header first, with C{proxy})."""
        status = self.work / f"proxy-{tag}-echo.status"
        argv = [self.connrate, "serve", str(status)] + (["proxy"] if proxy else [])
        proc = self.procs.start(f"proxy-{tag}-echo", argv, LOAD_CORE, pipe=True)
        line = proc.read_line(10)
        if not line.startswith("port "):
            raise BenchError(f"echo server said {line!r}")
        return proc, int(line.split()[1]), status

    def start(self, targets: list[str], peers: tuple[str, ...] = ()) -> Setup:
        """
        Both echo backends and nginx on the load core, then portrouter with
        every row's two routes, and each of C{peers} with the same routes.
        """
        started: list[Proc] = []
        try:
            plain, plain_port, plain_status = self.echo_backend("plain", proxy=False)
            started.append(plain)
            told, told_port, told_status = self.echo_backend("told", proxy=True)
            started.append(told)
            web_plain, web_told, web_once = free_port(), free_port(), free_port()
            body = (BACKEND_NGINX.replace("{plain}", str(web_plain)).replace("{told}", str(web_told))
                    .replace("{once}", str(web_once)).replace("{body}", BODY))
            web = self.procs.start("proxy-nginx", nginx_argv(self.tools["nginx"], self.work, "proxy-nginx", body),
                                   LOAD_CORE)
            started.append(web)
            for port in (web_plain, web_told, web_once):
                wait_listening(web, port)

            # (kind, row): the backend port, whether it is sent a header, whether one is received
            routes: dict[tuple[str, str], tuple[int, bool, bool]] = {}
            for target in targets:
                sends, receives = target in ("send", "both"), target in ("receive", "both")
                if "tcp" in kinds_of(target):
                    routes[("tcp", target)] = (told_port if sends else plain_port, sends, receives)
                web_backend = web_told if sends else web_once if target == "unpooled" else web_plain
                routes[("http", target)] = (web_backend, sends, receives)
            ports = {(who, kind, target): free_port() for who in ("portrouter", *peers) for kind, target in routes}
            proxies = {"portrouter": self.start_portrouter(routes, ports)}
            started.append(proxies["portrouter"])
            for peer in peers:
                proxies[peer] = self.start_haproxy(routes, ports)
                started.append(proxies[peer])
            for (who, _kind, _target), port in ports.items():
                wait_listening(proxies[who], port, timeout=20)
            assert_loopback_only(started)
        except BaseException:
            for proc in started:
                self.procs.stop(proc)
            raise
        return Setup(started, proxies, {"plain": plain_status, "told": told_status}, ports)

    def start_portrouter(self, routes: dict[tuple[str, str], tuple[int, bool, bool]],
                         ports: dict[tuple[str, str, str], int]) -> Proc:
        """portrouter on the proxy core, a project with its own listen port for each route."""
        projects = []
        for (kind, target), (backend, sends, receives) in routes.items():
            listen: dict[str, Any] = {"port": ports[("portrouter", kind, target)], "protocol": kind,
                                      "interface": LOOPBACK}
            if receives:
                listen["proxy_protocol"] = {"trusted": [LOOPBACK]}
            project: dict[str, Any] = {"name": f"{kind}-{target}", "backend": f"tcp:{LOOPBACK}:{backend}",
                                       "listen": listen}
            if sends:
                project["send_proxy"] = self.version
            projects.append(project)
        config = self.work / "proxy-portrouter.yaml"
        config.write_text(json.dumps({"state": str(self.work / "proxy-state"), "projects": projects}, indent=1))
        return self.procs.start("proxy-portrouter", portrouter_argv(self.tools["twistd"], [], config=config),
                                PROXY_CORE, env=self.portrouter_env)

    def start_haproxy(self, routes: dict[tuple[str, str], tuple[int, bool, bool]],
                      ports: dict[tuple[str, str, str], int]) -> Proc:
        """HAProxy on the proxy core with the same routes (L{HAPROXY_ROUTE})."""
        send = " send-proxy-v2" if self.version == "v2" else " send-proxy"
        cfg = HAPROXY_GLOBAL + "".join(
            HAPROXY_ROUTE.format(
                name=f"{kind}-{target}", mode=kind, listen=LOOPBACK, port=ports[("haproxy", kind, target)],
                backend=backend, accept=" accept-proxy" if receives else "", send=send if sends else "",
                reuse="\n    http-reuse always" if kind == "http" else "",
            )
            for (kind, target), (backend, sends, receives) in routes.items()
        )
        path = self.work / "proxy-haproxy.cfg"
        path.write_text(cfg)
        return self.procs.start("proxy-haproxy", [self.tools["haproxy"], "-db", "-f", str(path)], PROXY_CORE)

    def stop(self, setup: Setup) -> None:
        for proc in reversed(setup.procs):
            self.procs.stop(proc)

    def told(self, port: int, target: str, who: str) -> None:
        """
        One GET of /who through C{target}'s HTTP route, with a header first
        where the route expects one: nginx behind a sending route must name
        this very connection, so the headers measured are the right ones.
        """
        with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
            me = sock.getsockname()
            if target in ("receive", "both"):
                sock.sendall(v2_header(me, (LOOPBACK, port)))
            sock.sendall(b"GET /who HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        expected = f"{me[0]}:{me[1]}" if target in ("send", "both") else ":"
        if not head.startswith(b"HTTP/1.1 200 ") or body.decode(errors="replace") != expected:
            raise BenchError(f"{who} {target}: GET /who through the HTTP route answered {reply[:300]!r}; "
                             f"expected 200 and {expected!r}")

    # -- measurements ----------------------------------------------------------------------

    def load(self, setup: Setup, who: str, kind: str, target: str, seconds: float) -> dict[str, Any]:
        """
        C{connrate load} (tcp) or C{connrate http} for C{seconds} through
        C{who}'s route; its JSON plus how busy each core was and the CPU time
        C{who} used.
        """
        header = [self.version] if target in ("receive", "both") else []
        what = str(MESSAGE) if kind == "tcp" else "/"
        argv = ["taskset", "-c", str(LOAD_CORE), self.connrate, "load" if kind == "tcp" else "http",
                str(setup.ports[(who, kind, target)]), f"{seconds:g}", str(CONCURRENCY), what, *header]
        watch, drops = CpuWatch(self.procs, setup.proxies[who]), listen_drops()
        out = run_tool(argv, seconds + 20, f"connrate {argv[4]}")
        cpu = watch.stop()
        if out.returncode != 0:
            raise BenchError(f"connrate {argv[4]} failed: {out.stderr.strip()}")
        result: dict[str, Any] = json.loads(out.stdout)
        result.update(cpu)
        result["listen_drops"] = listen_drops() - drops
        if result["completed"] == 0:
            raise BenchError(f"no {kind} connection completed through {who}: {result['first_error']}")
        if result["errors"] > 0.01 * result["completed"]:
            raise BenchError(f"{result['errors']} {kind} connections through {who} failed ({result['first_error']}), "
                             f"{result['completed']} completed")
        if max(result["busy_load_core"], result["busy_proxy_core"]) < STALLED:
            # Once (HAProxy's plain routes, 2026-12-05): 5-10 connections a
            # second for a whole run, with no error and both cores idle; its
            # ratios came out at 2576x. Something waited, and that is no
            # measurement of either proxy: an error, not a figure.
            raise BenchError(f"{who} {kind} {target}: {result['completed']} connections in {seconds:g} s with both "
                             f"cores idle (load {result['busy_load_core']:.0f}%, proxy {result['busy_proxy_core']:.0f}%)"
                             ": the route stalled")
        if kind == "tcp":
            # Every relayed connection must end once the load stops: one that
            # leaks fails here rather than looking fast.
            status = setup.status["told" if target in ("send", "both") else "plain"]
            wait_until(lambda: backend_open(status) == 0, 15, f"the {who} {target} TCP connections to close")
        return result

    def measure_all(self, targets: list[str]) -> dict[str, Row]:
        """Every row's TCP and HTTP routes in one portrouter (and HAProxy), taking turns in rotating order."""
        self.prepare()
        rows = {target: Row() for target in targets}
        each = self.seconds / self.rounds
        proxies = ("portrouter", *self.peers)
        print(f"[proxy] {len(targets)} rows, TCP and HTTP, through {' and '.join(proxies)}, {self.rounds} rounds "
              f"of {each:g} s each (PROXY {self.version})", flush=True)
        setup = self.start(targets, self.peers)
        per_round: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        try:
            with ExitStack() as watching:
                for proc in setup.proxies.values():  # a proxy that dies is named, not its refusals
                    watching.enter_context(blame(proc))
                for target in targets:
                    for who in proxies:
                        errors = rows[target].errors
                        attempt("proxy", target, errors, measurement(who, "http"),
                                lambda: self.told(setup.ports[(who, "http", target)], target, who))
                        for kind in kinds_of(target):
                            attempt("proxy", target, errors, measurement(who, kind),
                                    lambda: self.load(setup, who, kind, target, WARMUP))
                for r in range(self.rounds):
                    order = targets[r % len(targets):] + targets[:r % len(targets)]
                    for kind in KINDS:
                        for target in (t for t in order if kind in kinds_of(t)):
                            for who in proxies:
                                key = measurement(who, kind)
                                if key in rows[target].errors:
                                    continue
                                result = attempt(
                                    "proxy", target, rows[target].errors, key,
                                    lambda: self.retry.quietly(f"{target} {key}",
                                                               lambda: self.load(setup, who, kind, target, each)),
                                )
                                if result is not None:
                                    per_round.setdefault((who, kind, target), []).append({**result, "round": r})
        finally:
            self.stop(setup)
        for (who, kind, target), results in per_round.items():
            row, key = rows[target], measurement(who, kind)
            if key in row.errors:
                continue
            prefix = "" if who == "portrouter" else f"{who}_"
            setattr(row, f"{prefix}{kind}_{'conn' if kind == 'tcp' else 'req'}_per_s",
                    round(statistics.median(r["rate"] for r in results)))
            setattr(row, f"{prefix}{kind}_cpu_us",
                    per_op_us(sum(r["proxy_cpu_s"] for r in results), sum(r["completed"] for r in results)))
            row.detail[key] = {
                "rounds": results,
                "rates": [round(r["rate"]) for r in results],
                "busy_load_core": round(statistics.mean(r["busy_load_core"] for r in results), 1),
                "busy_proxy_core": round(statistics.mean(r["busy_proxy_core"] for r in results), 1),
                "foreign_cpu": max(r["foreign_cpu"] for r in results),
                "errors": sum(r["errors"] for r in results),
                "listen_drops": sum(r["listen_drops"] for r in results),
            }
        return rows

    # -- profiling (optional) --------------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where portrouter's time goes on the TCP route of ``both``: headers read and sent."""
        def record() -> dict[str, Any]:
            setup = self.start(["both"])
            raw = self.work / "proxy-portrouter-profile.txt"
            try:
                self.load(setup, "portrouter", "tcp", "both", WARMUP)
                load = py_spy_record(py_spy, setup.proxies["portrouter"].pid, raw, 4,
                                     lambda: self.load(setup, "portrouter", "tcp", "both", 5))
            finally:
                self.stop(setup)
            return {"conn_per_s_under_profiler": round(load["rate"]), **summarize_profile(raw)}

        return attempt_profile("proxy", "profile", record)

    def print_profile(self, profile: dict[str, Any]) -> None:
        if "error" not in profile:
            print_sampled("portrouter on a TCP route receiving and sending PROXY headers", profile,
                          f"{profile['conn_per_s_under_profiler']:,} conn/s")

    # -- the report ------------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """
        Each row against its L{BASE} in the same round, the median over the
        rounds: at most 10% fewer.
        """
        return [  # a base not measured leaves its rows' checks with no figure: not met
            check(f"{kind.upper()} {KINDS[kind]}: {target} / {base}",
                  to_base(rows, "portrouter", kind, target, base)[0], ">=", 0.9)
            for (kind, target), base in BASE.items() if target in rows
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        """
        portrouter's own CPU time per connection against plain's (the cost,
        however busy the machine), then HAProxy's rate and CPU ratios to its
        own plain: what the same headers cost the peer.
        """
        # HTTP sending rows and unpooled against plain: what the pool's loss costs.
        pooled = [(target, "plain") for target in ("send", "both", "unpooled") if target in rows]
        refs = [(f"HTTP req/s: {target} / {base}", to_base(rows, "portrouter", "http", target, base)[0])
                for target, base in pooled]
        judged = [(kind, target, base) for (kind, target), base in BASE.items() if target in rows and base in rows]
        refs += [
            (f"{kind.upper()} CPU per {KINDS[kind][:-2]}: {target} / {base}",
             compare(rows, target, base, f"{kind}_cpu_us"))
            for kind, target, base in judged
        ]
        for peer in self.peers:
            refs += [
                (f"{peer} {kind.upper()} {KINDS[kind]}: {target} / {base}", to_base(rows, peer, kind, target, base)[0])
                for kind, target, base in judged + [("http", target, base) for target, base in pooled]
            ]
            refs += [
                (f"{peer} {kind.upper()} CPU per {KINDS[kind][:-2]}: {target} / {base}",
                 compare(rows, target, base, f"{peer}_{kind}_cpu_us"))
                for kind, target, base in judged
            ]
        return refs

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        proxies = ("portrouter", *self.peers)
        columns, busy = [], []
        for who in proxies:
            mark = "" if who == "portrouter" else f"{who} "
            columns += [(f"{mark}TCP conn/s", 12 + len(mark)), ("CPU us/conn", 13),
                        (f"{mark}HTTP req/s", 12 + len(mark)), ("CPU us/req", 12)]
            busy += [(f"{mark}TCP", 16), (f"{mark}HTTP", 16)]

        def cells(r: Row) -> list[str]:
            out = []
            for who in proxies:
                prefix = "" if who == "portrouter" else f"{who}_"
                out += [cell(r, getattr(r, f"{prefix}tcp_conn_per_s"), measurement(who, "tcp"), 0),
                        fmt(getattr(r, f"{prefix}tcp_cpu_us"), 1) + " ",
                        cell(r, getattr(r, f"{prefix}http_req_per_s"), measurement(who, "http"), 0),
                        fmt(getattr(r, f"{prefix}http_cpu_us"), 1) + " "]
            return out

        print_tables(
            rows, f"PROXY {self.version}", columns, cells,
            [*busy, ("errors tcp/http", 17)],
            lambda r: [*busy_cells(r, tuple(measurement(who, kind) for who in proxies for kind in KINDS)),
                       " ".join("/".join(str(r.detail.get(measurement(who, kind), {}).get("errors", "-"))
                                         for kind in KINDS) for who in proxies)],
        )
        print()
        print("each round, and its ratio to its base in the same round (plain; HTTP send and both: unpooled):")
        for who in proxies:
            for kind, unit in KINDS.items():
                for name in rows:
                    rates = round_rates(rows, who, kind, name)
                    if rates:
                        base = BASE.get((kind, name), "plain")
                        ratios = to_base(rows, who, kind, name, base)[1] if name != base else []
                        shown = " ".join(f"{v:>7,.0f}" for v in rates.values())
                        print(f"  {who:<10} {kind.upper()} {unit} {name:<8} {shown}"
                              + ("   " + " ".join(f"{v:.2f}" for v in ratios) if ratios else ""))
        if self.peers:
            print()
            print("ratio to plain (HTTP send and both: to unpooled too), median of the rounds: " + " / ".join(proxies))
            for kind, unit in KINDS.items():
                for name in TARGETS[1:]:
                    if name in rows and kind in kinds_of(name):
                        for base in sorted({"plain", BASE.get((kind, name), "plain")}):
                            shown = "  ".join(fmt(to_base(rows, who, kind, name, base)[0], 2) for who in proxies)
                            print(f"  {kind.upper()} {unit} {name:<8} / {base:<8} {shown}")
        print_ratios(checks, references, width=48)


def measurement(who: str, kind: str) -> str:
    """The key of a row's detail and errors for C{kind} through C{who}: "tcp", "http", "haproxy-tcp", ..."""
    return kind if who == "portrouter" else f"{who}-{kind}"


def round_rates(rows: dict[str, Row], who: str, kind: str, target: str) -> dict[int, float]:
    """C{target}'s rates through C{who} by round."""
    row, key = rows.get(target), measurement(who, kind)
    if row is None or key not in row.detail or key in row.errors:
        return {}
    return {r["round"]: r["rate"] for r in row.detail[key]["rounds"]}


def to_base(rows: dict[str, Row], who: str, kind: str, target: str,
            base: str = "plain") -> tuple[float | None, list[float]]:
    """C{target}'s rate through C{who} over C{base}'s within each round, and the median of those ratios."""
    return paired(round_rates(rows, who, kind, target), round_rates(rows, who, kind, base))


def v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection over IPv4 (HAProxy's proxy-protocol.txt, 2.2)."""
    addresses = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x21, 0x11)) + struct.pack("!H", 12) + addresses
            + struct.pack("!HH", source[1], destination[1]))
