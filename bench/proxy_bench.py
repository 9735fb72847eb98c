"""
The PROXY protocol section (issue 17): what PROXY headers cost portrouter
in new connections per second, with them on against off, in one run.

One portrouter serves eight routes side by side, a TCP route and an HTTP
route for each row: no header (``plain``), a header received from a
trusted client (``receive``), ``send_proxy: v2`` to the backend
(``send``), and both. The rows take turns over several rounds, idle but for
the one measured, and a ratio is the median of the ratios within each round:
the cost asked about (under 10%) is smaller than this machine's drift from
minute to minute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
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
    portrouter_argv,
    print_sampled,
    py_spy_record,
    run_tool,
    summarize_profile,
    wait_listening,
    wait_until,
)
from section import Section, busy_cells, cell, compare, print_ratios, print_tables
from tcp_bench import backend_open

TARGETS = ("plain", "receive", "send", "both")
DESCRIPTION = {
    "plain": "no PROXY header either way",
    "receive": "the route trusts 127.0.0.1: each client connection starts with a PROXY header "
               "(connrate sends it with its first bytes, as HAProxy's send-proxy does), read with Twisted's parser",
    "send": "send_proxy on the route: each backend connection starts with a header naming the client "
            "(on HTTP a backend connection then serves one client connection, never the shared pool)",
    "both": "a header received, and one sent on",
}
KINDS = {"tcp": "conn/s", "http": "req/s"}
CONCURRENCY = 16
MESSAGE = 64  # bytes echoed per TCP connection
WARMUP = 0.5
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
}
"""


@dataclass
class Row:
    """One row's figures (the medians of its rounds), plus what is needed to judge them."""

    tcp_conn_per_s: float | None = None
    tcp_cpu_us: float | None = None  # portrouter's own CPU time (user and system) per connection
    http_req_per_s: float | None = None
    http_cpu_us: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Setup:
    """What one run's rows share: portrouter, its backends, and each route's port."""

    procs: list[Proc]
    portrouter: Proc
    status: dict[str, Path]  # each echo backend's status file: "plain" and "told"
    ports: dict[tuple[str, str], int]  # (kind, row): the route's port


class Bench(Section[Row]):
    """One run: the C tool built once, one portrouter with every route, the rows taking turns."""

    NAME = "proxy"
    TARGETS = TARGETS
    SECONDS_HELP = "measured per row and kind (TCP, HTTP), in all, split into the rounds (default 5)"
    OPTIONS = {
        "rounds": {"type": int, "default": 5, "help": "turns the rows take (default 5)"},
        "version": {"choices": ("v1", "v2"), "default": "v2",
                    "help": "the PROXY header version received and sent (default v2)"},
    }
    PORTROUTER = frozenset(TARGETS)
    DESCRIPTION = DESCRIPTION
    TOOLS = ("gcc", "taskset", "twistd", "nginx")
    VERSIONS = {"nginx": "-v"}

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.rounds: int = max(1, args.proxy_rounds)
        self.version: str = args.proxy_version
        self.connrate = ""

    def parameters(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "version": self.version, "concurrency": CONCURRENCY,
                "message_bytes": MESSAGE, "http_body_bytes": len(BODY), "warmup_s": WARMUP}

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

    def start(self, targets: list[str]) -> Setup:
        """Both echo backends and nginx on the load core, then portrouter with every row's two routes."""
        started: list[Proc] = []
        try:
            plain, plain_port, plain_status = self.echo_backend("plain", proxy=False)
            started.append(plain)
            told, told_port, told_status = self.echo_backend("told", proxy=True)
            started.append(told)
            web_plain, web_told = free_port(), free_port()
            body = (BACKEND_NGINX.replace("{plain}", str(web_plain)).replace("{told}", str(web_told))
                    .replace("{body}", BODY))
            web = self.procs.start("proxy-nginx", nginx_argv(self.tools["nginx"], self.work, "proxy-nginx", body),
                                   LOAD_CORE)
            started.append(web)
            for port in (web_plain, web_told):
                wait_listening(web, port)

            ports: dict[tuple[str, str], int] = {}
            projects = []
            for target in targets:
                sends, receives = target in ("send", "both"), target in ("receive", "both")
                for kind, backend in (("tcp", told_port if sends else plain_port),
                                      ("http", web_told if sends else web_plain)):
                    ports[(kind, target)] = free_port()
                    listen: dict[str, Any] = {"port": ports[(kind, target)], "protocol": kind, "interface": LOOPBACK}
                    if receives:
                        listen["proxy_protocol"] = {"trusted": [LOOPBACK]}
                    project: dict[str, Any] = {"name": f"{kind}-{target}", "backend": f"tcp:{LOOPBACK}:{backend}",
                                               "listen": listen}
                    if sends:
                        project["send_proxy"] = self.version
                    projects.append(project)
            config = self.work / "proxy-portrouter.yaml"
            config.write_text(json.dumps({"state": str(self.work / "proxy-state"), "projects": projects}, indent=1))
            portrouter = self.procs.start("proxy-portrouter", portrouter_argv(self.tools["twistd"], [], config=config),
                                          PROXY_CORE, env=self.portrouter_env)
            started.append(portrouter)
            for port in ports.values():
                wait_listening(portrouter, port, timeout=20)
            assert_loopback_only(started)
        except BaseException:
            for proc in started:
                self.procs.stop(proc)
            raise
        return Setup(started, portrouter, {"plain": plain_status, "told": told_status}, ports)

    def stop(self, setup: Setup) -> None:
        for proc in reversed(setup.procs):
            self.procs.stop(proc)

    def told(self, port: int, target: str) -> None:
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
            raise BenchError(f"{target}: GET /who through the HTTP route answered {reply[:300]!r}; "
                             f"expected 200 and {expected!r}")

    # -- measurements ----------------------------------------------------------------------

    def load(self, setup: Setup, kind: str, target: str, seconds: float) -> dict[str, Any]:
        """C{connrate load} (tcp) or C{connrate http} for C{seconds}; its JSON plus how busy each core was."""
        header = [self.version] if target in ("receive", "both") else []
        what = str(MESSAGE) if kind == "tcp" else "/"
        argv = ["taskset", "-c", str(LOAD_CORE), self.connrate, "load" if kind == "tcp" else "http",
                str(setup.ports[(kind, target)]), f"{seconds:g}", str(CONCURRENCY), what, *header]
        watch, drops, own = CpuWatch(self.procs), listen_drops(), cpu_seconds(setup.portrouter.pid)
        out = run_tool(argv, seconds + 20, f"connrate {argv[4]}")
        cpu = watch.stop()
        cpu["portrouter_cpu_s"] = round(cpu_seconds(setup.portrouter.pid) - own, 3)
        if out.returncode != 0:
            raise BenchError(f"connrate {argv[4]} failed: {out.stderr.strip()}")
        result: dict[str, Any] = json.loads(out.stdout)
        result.update(cpu)
        result["listen_drops"] = listen_drops() - drops
        if result["completed"] == 0:
            raise BenchError(f"no {kind} connection completed: {result['first_error']}")
        if result["errors"] > 0.01 * result["completed"]:
            raise BenchError(f"{result['errors']} {kind} connections failed ({result['first_error']}), "
                             f"{result['completed']} completed")
        if kind == "tcp":
            # Every relayed connection must end once the load stops: one that
            # leaks fails here rather than looking fast.
            status = setup.status["told" if target in ("send", "both") else "plain"]
            wait_until(lambda: backend_open(status) == 0, 15, f"the {target} TCP connections to close")
        return result

    def measure_all(self, targets: list[str]) -> dict[str, Row]:
        """Every row's TCP and HTTP routes in one portrouter, taking turns in rotating order."""
        self.prepare()
        rows = {target: Row() for target in targets}
        each = self.seconds / self.rounds
        print(f"[proxy] {len(targets)} rows, TCP and HTTP, {self.rounds} rounds of {each:g} s each "
              f"(PROXY {self.version})", flush=True)
        setup = self.start(targets)
        try:
            with blame(setup.portrouter):
                for target in targets:
                    attempt("proxy", target, rows[target].errors, "http",
                            lambda: self.told(setup.ports[("http", target)], target))
                    for kind in KINDS:
                        attempt("proxy", target, rows[target].errors, kind,
                                lambda: self.load(setup, kind, target, WARMUP))
                per_round: dict[tuple[str, str], list[dict[str, Any]]] = {}
                for r in range(self.rounds):
                    order = targets[r % len(targets):] + targets[:r % len(targets)]
                    for kind in KINDS:
                        for target in order:
                            if kind in rows[target].errors:
                                continue
                            result = attempt(
                                "proxy", target, rows[target].errors, kind,
                                lambda: self.retry.quietly(f"{target} {kind}",
                                                           lambda: self.load(setup, kind, target, each)),
                            )
                            if result is not None:
                                per_round.setdefault((kind, target), []).append({**result, "round": r})
        finally:
            self.stop(setup)
        for (kind, target), results in per_round.items():
            row = rows[target]
            if kind in row.errors:
                continue
            completed = sum(r["completed"] for r in results)
            busy_s = sum(r["portrouter_cpu_s"] for r in results)
            setattr(row, f"{kind}_{'conn' if kind == 'tcp' else 'req'}_per_s",
                    round(statistics.median(r["rate"] for r in results)))
            setattr(row, f"{kind}_cpu_us", round(busy_s / completed * 1e6, 1) if completed else None)
            row.detail[kind] = {
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
                self.load(setup, "tcp", "both", WARMUP)
                load = py_spy_record(py_spy, setup.portrouter.pid, raw, 4,
                                     lambda: self.load(setup, "tcp", "both", 5))
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
        """Each row against ``plain`` of the same round, the median over the rounds: at most 10% fewer."""
        return [
            check(f"{kind.upper()} {unit}: {target} / plain", paired(rows, kind, target)[0], ">=", 0.9)
            for kind, unit in KINDS.items() for target in TARGETS[1:] if target in rows
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        """portrouter's own CPU time per connection against plain's: the cost, however busy the machine."""
        return [
            (f"{kind.upper()} CPU per {unit[:-2]}: {target} / plain",
             compare(rows, target, "plain", f"{kind}_cpu_us"))
            for kind, unit in KINDS.items() for target in TARGETS[1:] if target in rows
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, f"PROXY {self.version}",
            [("TCP conn/s", 12), ("CPU us/conn", 13), ("HTTP req/s", 12), ("CPU us/req", 12)],
            lambda r: [cell(r, r.tcp_conn_per_s, "tcp", 0), fmt(r.tcp_cpu_us, 1) + " ",
                       cell(r, r.http_req_per_s, "http", 0), fmt(r.http_cpu_us, 1) + " "],
            [("TCP", 16), ("HTTP", 16), ("errors tcp/http", 17)],
            lambda r: [*busy_cells(r, tuple(KINDS)),
                       "/".join(str(r.detail.get(kind, {}).get("errors", "-")) for kind in KINDS)],
        )
        print()
        print("each round, and its ratio to plain in the same round:")
        for kind, unit in KINDS.items():
            for name, r in rows.items():
                rates = r.detail.get(kind, {}).get("rates")
                if rates:
                    ratios = paired(rows, kind, name)[1] if name != "plain" else []
                    shown = " ".join(f"{v:>7,}" for v in rates)
                    print(f"  {kind.upper()} {unit} {name:<8} {shown}"
                          + ("   " + " ".join(f"{v:.2f}" for v in ratios) if ratios else ""))
        print_ratios(checks, references, width=48)


def cpu_seconds(pid: int) -> float:
    """
    The CPU time (user and system) process C{pid} has used: what a
    connection costs portrouter, whatever else the shared machine runs.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _round_rates(row: Row | None, kind: str) -> dict[int, float]:
    if row is None or kind not in row.detail or kind in row.errors:
        return {}
    return {r["round"]: r["rate"] for r in row.detail[kind]["rounds"]}


def paired(rows: dict[str, Row], kind: str, target: str) -> tuple[float | None, list[float]]:
    """C{target}'s rate over plain's within each round, and the median of those ratios."""
    mine, plain = _round_rates(rows.get(target), kind), _round_rates(rows.get("plain"), kind)
    each = [round(rate / plain[r], 3) for r, rate in sorted(mine.items()) if plain.get(r)]
    return (statistics.median(each) if each else None), each


def v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection over IPv4 (HAProxy's proxy-protocol.txt, 2.2)."""
    addresses = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x21, 0x11)) + struct.pack("!H", 12) + addresses
            + struct.pack("!HH", source[1], destination[1]))
