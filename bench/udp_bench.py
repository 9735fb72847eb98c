"""
The UDP section (issue 4): portrouter's datagram relay against socat, nginx
C{stream} and no proxy, on request/response round trips with one datagram
in flight (latency through the relay) and on an unlimited-rate iperf3 UDP
stream (what gets through, and what is lost). One run, same-run ratios.

Round trips on this VM swing by 2-3x within a minute as the host's
scheduling changes, so every contender runs at once (idle but for the one
measured) and they take turns, a second each, over several rounds; a ratio
is the median of the ratios within each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness import (
    LOAD_CORE,
    LOOPBACK,
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
    iperf3,
    iperf3_server,
    nginx_argv,
    portrouter_argv,
    print_sampled,
    py_spy_record,
    ratio,
    require,
    run_tool,
    summarize_profile,
    wait_listening,
)
from section import Section, busy_cells, cell, compare, figure, print_ratios, print_tables

TARGETS = ("direct", "portrouter", "portrouter-nopoll", "socat", "nginx", "nginx-keep")
DESCRIPTION = {
    "direct": "no proxy: the client talks to the backend",
    "portrouter": "portrouter --udp (and --tcp on the same port for iperf3's control connection), defaults",
    "portrouter-nopoll": "the same with udp_busy_poll: 0 (the reactor sleeps as soon as it is idle)",
    "socat": "socat UDP4-LISTEN:P,fork,reuseaddr UDP4:127.0.0.1:B (and a TCP socat for iperf3's control)",
    "nginx": "nginx stream, 1 worker: listen P udp (proxy_responses 1 for round trips, as for DNS; "
             "listen P and P udp, no proxy_responses, for iperf3)",
    "nginx-keep": "nginx stream, 1 worker, listen P udp, no proxy_responses: a session kept per client "
                  "as portrouter keeps one (round trips only)",
}
NGINX = ("nginx", "nginx-keep")
NO_IPERF = ("nginx-keep",)  # its iperf3 config would be nginx's
MESSAGE = 64  # bytes per round trip
DATAGRAM = 1400  # iperf3 -l
WARMUP = 0.5

NGINX_ROUND_TRIP = """\
stream {
    server {
        listen 127.0.0.1:{port} udp;
        proxy_pass 127.0.0.1:{backend};
        {responses}proxy_timeout 60s;
    }
}
"""
NOPOLL_CONFIG = "defaults:\n  udp_busy_poll: 0\nprojects: []\n"

# iperf3's UDP test has a TCP control connection on the same port number.
NGINX_IPERF = """\
stream {
    server {
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{port} udp;
        proxy_pass 127.0.0.1:{backend};
        proxy_timeout 60s;
    }
}
"""


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    round_trips_per_s: float | None = None  # the median of the rounds
    rtt_p50_us: float | None = None  # the median of the rounds' medians
    proxy_cpu_us: float | None = None  # the proxy core's busy time per round trip
    iperf_gbps: float | None = None  # as the receiver counted
    iperf_sent_gbps: float | None = None
    iperf_loss_percent: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # measurements that failed, and why


class Bench(Section[Row]):
    """One UDP run: the C tool built once, then every target measured in turn."""

    NAME = "udp"
    # tuple[str, ...]: the tunnel section, built on this one, has targets of its own.
    TARGETS: ClassVar[tuple[str, ...]] = TARGETS
    SECONDS_HELP = "round trips measured per contender, in all, and the length of each iperf3 run (default 5)"
    OPTIONS = {
        "rounds": {"type": int, "default": 5, "help": "turns the contenders take at the round trips (default 5)"},
    }
    PORTROUTER = frozenset({"portrouter", "portrouter-nopoll"})
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "gcc", "iperf3")
    TARGET_TOOLS = {
        "portrouter": ("twistd",), "portrouter-nopoll": ("twistd",), "socat": ("socat",),
        "nginx": ("nginx",), "nginx-keep": ("nginx",),
    }
    VERSIONS = {"iperf3": "--version", "socat": "-V", "nginx": "-v"}

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.rounds: int = max(1, args.udp_rounds)
        self.udprate = ""

    @classmethod
    def require(cls, args: argparse.Namespace) -> dict[str, str]:
        """The tools, and nginx's stream module when an nginx row is chosen."""
        targets = set(cls.targets(args))
        return require(*cls.tool_names(targets, args.profile), nginx_stream=bool(targets & set(NGINX)))

    def parameters(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "message_bytes": MESSAGE, "iperf_datagram_bytes": DATAGRAM, "warmup_s": WARMUP}

    def prepare(self) -> None:
        self.udprate = build_c(self.tools["gcc"], "udprate.c", self.work)

    def measure_all(self, targets: list[str]) -> dict[str, Row]:
        """The round trips of every target, taking turns, then iperf3 through each in turn."""
        self.prepare()
        rows = {target: Row() for target in targets}
        self.round_trip_rounds(targets, rows)
        for target in targets:
            if target not in NO_IPERF:
                self.stream(target, rows[target])
        return rows

    # -- backends and proxies ----------------------------------------------------------

    def echo_backend(self, tag: str) -> tuple[Proc, int]:
        proc = self.procs.start(f"{tag}-echo", [self.udprate, "serve"], LOAD_CORE, pipe=True)
        line = proc.read_line(10)
        if not line.startswith("port "):
            raise BenchError(f"UDP echo server said {line!r}")
        return proc, int(line.split()[1])

    def proxy(self, target: str, backend: int, tag: str, control: bool) -> tuple[list[Proc], int]:
        """
        Start C{target} on the proxy core relaying UDP to C{backend}; with
        C{control}, TCP too on the same port number (iperf3's control
        connection). The processes (the first is the UDP relay) and the port.
        """
        port = free_port(udp=True)
        name = f"{target}-{tag}"
        procs: list[Proc] = []
        if target in ("portrouter", "portrouter-nopoll"):
            routes = [("udp", f"udp:{port}:interface={LOOPBACK} -> {LOOPBACK}:{backend}")]
            if control:
                routes.append(("tcp", f"tcp:{port}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{backend}"))
            config = None
            if target == "portrouter-nopoll":
                config = self.work / "udp-nopoll.yaml"
                config.write_text(NOPOLL_CONFIG)
            argv = portrouter_argv(self.tools["twistd"], routes, config=config)
            procs.append(self.procs.start(name, argv, PROXY_CORE, env=self.portrouter_env))
        elif target == "socat":
            socat = self.tools["socat"]
            procs.append(self.procs.start(name, [
                socat, f"UDP4-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr", f"UDP4:{LOOPBACK}:{backend}",
            ], PROXY_CORE))
            if control:
                procs.append(self.procs.start(f"{name}-tcp", [
                    socat, f"TCP4-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr", f"TCP4:{LOOPBACK}:{backend}",
                ], PROXY_CORE))
        elif target in NGINX:
            if control:
                body = NGINX_IPERF
            else:
                body = NGINX_ROUND_TRIP.replace("{responses}", "proxy_responses 1;\n        " if target == "nginx" else "")
            body = body.replace("{port}", str(port)).replace("{backend}", str(backend))
            argv = nginx_argv(self.tools["nginx"], self.work, name, body, stream_module=True)
            procs.append(self.procs.start(name, argv, PROXY_CORE))
        else:
            raise ValueError(target)
        wait_listening(procs[0], port, timeout=20, udp=True)
        if control:
            wait_listening(procs[-1], port, timeout=20)
        assert_loopback_only(procs)
        return procs, port

    # -- measurements ------------------------------------------------------------------

    def round_trips(self, port: int, seconds: float) -> dict[str, Any]:
        """C{udprate load} on the load core; its JSON plus how busy each core was."""
        watch = CpuWatch(self.procs)
        out = run_tool(
            ["taskset", "-c", str(LOAD_CORE), self.udprate, "load", str(port), f"{seconds:g}", str(MESSAGE)],
            seconds + 20, "udprate load",
        )
        cpu = watch.stop()
        if out.returncode != 0:
            raise BenchError(f"udprate load failed: {out.stderr.strip()}")
        result: dict[str, Any] = json.loads(out.stdout)
        if result["round_trips"] == 0:
            raise BenchError(f"no UDP round trip completed: {result['first_error'] or 'every datagram lost'}")
        if result["bad"]:
            raise BenchError(f"{result['bad']} answers were not the datagram sent")
        result.update(cpu)
        return result

    def round_trip_rounds(self, targets: list[str], rows: dict[str, Row]) -> None:
        """
        Every target's relay started at once on the proxy core; then rounds in
        which each takes its turn at C{udprate load}, in an order that
        rotates. Fills the round-trip columns of C{rows}.
        """
        print(f"[udp] round trips: {len(targets)} contenders, {self.rounds} rounds of "
              f"{self.seconds / self.rounds:g} s each", flush=True)
        echo, echo_port = self.echo_backend("rt")
        ports: dict[str, int] = {}
        proxies: dict[str, Proc | None] = {}
        started: list[Proc] = []
        try:
            for target in targets:
                if target == "direct":
                    ports[target], proxies[target] = echo_port, None
                    continue
                procs = attempt("udp", target, rows[target].errors, "round_trips",
                                lambda: self.proxy(target, echo_port, "echo", control=False))
                if procs is not None:
                    started += procs[0]
                    proxies[target], ports[target] = procs[0][0], procs[1]
            live = [t for t in targets if t in ports]
            for target in live:
                with blame(proxies[target]):
                    attempt("udp", target, rows[target].errors, "round_trips",
                            lambda: self.round_trips(ports[target], WARMUP))
            per_round: dict[str, list[dict[str, Any]]] = {t: [] for t in live}
            for r in range(self.rounds):
                order = live[r % len(live):] + live[:r % len(live)] if live else []
                for target in order:
                    if target in rows[target].errors:
                        continue
                    with blame(proxies[target]):
                        result = attempt(
                            "udp", target, rows[target].errors, "round_trips",
                            lambda: self.retry.quietly(
                                f"{target} round trips", lambda: self.round_trips(ports[target], self.seconds / self.rounds),
                                retry=target != "direct",
                            ),
                        )
                    if result is not None:
                        per_round[target].append({**result, "round": r})
            for target, results in per_round.items():
                row = rows[target]
                if target in row.errors or not results:
                    continue
                row.round_trips_per_s = round(statistics.median(r["rate"] for r in results))
                row.rtt_p50_us = statistics.median(r["p50_us"] for r in results)
                rts = sum(r["round_trips"] for r in results)
                busy_s = sum(r["busy_proxy_core"] / 100 * r["seconds"] for r in results)
                row.proxy_cpu_us = round(busy_s / rts * 1e6, 1) if rts and target != "direct" else None
                row.detail["round_trips"] = {
                    "rounds": results,
                    "rates": [round(r["rate"]) for r in results],
                    "busy_load_core": round(statistics.mean(r["busy_load_core"] for r in results), 1),
                    "busy_proxy_core": round(statistics.mean(r["busy_proxy_core"] for r in results), 1),
                    "foreign_cpu": max(r["foreign_cpu"] for r in results),
                    "lost": sum(r["lost"] for r in results),
                    "errors": sum(r["errors"] for r in results),
                }
        finally:
            for proc in started:
                self.procs.stop(proc)
            self.procs.stop(echo)

    def stream(self, target: str, row: Row) -> None:
        """iperf3 -u through C{target}, on a fresh relay; fills the iperf3 columns of C{row}."""
        print(f"[udp] {target}: iperf3 -u ...", flush=True)
        server, iperf_port = iperf3_server(self.tools["iperf3"], self.procs, target, udp=True)
        proxies: list[Proc] = []
        try:
            if target == "direct":
                port = iperf_port
            else:
                proxies, port = self.proxy(target, iperf_port, "iperf", control=True)

            def stream() -> dict[str, Any]:
                with blame(proxies[0] if proxies else None):
                    return self.retry.quietly(
                        f"{target} iperf3 -u",
                        lambda: iperf3(self.tools["iperf3"], port, self.seconds, self.procs, udp_length=DATAGRAM),
                        retry=target != "direct",
                    )

            up = attempt("udp", target, row.errors, "iperf", stream)
            if up is not None:
                row.iperf_gbps, row.iperf_sent_gbps = up["gbps"], up["sent_gbps"]
                row.iperf_loss_percent = up["loss_percent"]
                row.detail["iperf"] = up
        finally:
            for proc in proxies:
                self.procs.stop(proc)
            self.procs.stop(server)

    # -- profiling (optional) ------------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where portrouter's time goes relaying one datagram at a time (py-spy, 500 Hz, 4 s)."""

        def record() -> dict[str, Any]:
            echo, echo_port = self.echo_backend("profile")
            procs, port = self.proxy("portrouter", echo_port, "profile", control=False)
            raw = self.work / "portrouter-udp-profile.txt"
            try:
                self.round_trips(port, WARMUP)
                with blame(procs[0]):
                    load = py_spy_record(py_spy, procs[0].pid, raw, 4, lambda: self.round_trips(port, 5))
            finally:
                self.procs.stop(procs[0])
                self.procs.stop(echo)
            return {"round_trips_under_profiler": round(load["rate"]), **summarize_profile(raw)}

        return attempt_profile("udp", "profile", record)

    # -- the report ----------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """The comparisons issue 4 asks for, with their targets."""
        loss_pr = figure(rows, "portrouter", "iperf_loss_percent")
        loss_nginx = figure(rows, "nginx", "iperf_loss_percent")
        if loss_pr is not None and loss_nginx == 0:
            loss = 1.0 if loss_pr == 0 else None  # no loss either side: as good; else no ratio to give
        else:
            loss = ratio(loss_pr, loss_nginx)
        return [
            check("round trips/s: portrouter / best nginx", paired(rows, "portrouter", NGINX)[0], ">=", 1.0),
            check("iperf3 loss %: portrouter / nginx", loss, "<=", 1.0),
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        """Same-run comparisons with no target."""
        cpu = [figure(rows, n, "proxy_cpu_us") for n in NGINX]
        return [
            ("round trips/s: portrouter / socat", paired(rows, "portrouter", ("socat",))[0]),
            ("round trips/s: portrouter-nopoll / best nginx", paired(rows, "portrouter-nopoll", NGINX)[0]),
            ("proxy CPU per round trip: portrouter / best nginx",
             ratio(figure(rows, "portrouter", "proxy_cpu_us"), min((v for v in cpu if v is not None), default=None))),
            ("iperf3 received: portrouter / nginx", compare(rows, "portrouter", "nginx", "iperf_gbps")),
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, "UDP",
            [("round trips/s", 15), ("p50 us", 8), ("proxy CPU us/rt", 17), ("iperf3 recv Gbit/s", 20),
             ("sent Gbit/s", 13), ("loss %", 9)],
            lambda r: [
                cell(r, r.round_trips_per_s, "round_trips", 0), fmt(r.rtt_p50_us, 0) + " ",
                fmt(r.proxy_cpu_us, 1) + " ",
                cell(r, r.iperf_gbps, "iperf", 2), fmt(r.iperf_sent_gbps, 2) + " ",
                fmt(r.iperf_loss_percent, 1) + " ",
            ],
            [("round trips", 16), ("iperf3", 16), ("rt lost/errors", 16)],
            lambda r: [
                *busy_cells(r, ("round_trips", "iperf")),
                "/".join(str(r.detail.get("round_trips", {}).get(k, "-")) for k in ("lost", "errors")),
            ],
        )
        print()
        print("round trips/s in each round:")
        for name, r in rows.items():
            rates = r.detail.get("round_trips", {}).get("rates")
            if rates:
                print(f"  {name:<20} " + " ".join(f"{v:>7,}" for v in rates))
        each = paired(rows, "portrouter", NGINX)[1]
        if each:
            print(f"  {'portrouter / nginx':<20} " + " ".join(f"{v:>7.2f}" for v in each) + "   (best nginx that round)")
        print_ratios(checks, references, width=48)

    def print_profile(self, profile: dict[str, Any]) -> None:
        if "error" not in profile:  # else it was reported as it failed
            print_sampled("portrouter relaying one 64-byte datagram at a time", profile,
                          f"{profile['round_trips_under_profiler']:,} round trips/s")


def _round_rates(row: Row | None) -> dict[int, float]:
    if row is None or "round_trips" not in row.detail or "round_trips" in row.errors:
        return {}
    return {r["round"]: r["rate"] for r in row.detail["round_trips"]["rounds"]}


def paired(rows: dict[str, Row], target: str, peers: tuple[str, ...]) -> tuple[float | None, list[float]]:
    """
    C{target}'s round trips/s over the best of C{peers} within each round,
    and the median of those ratios: host-wide swings between rounds cancel.
    """
    mine = _round_rates(rows.get(target))
    theirs = [_round_rates(rows.get(peer)) for peer in peers]
    each = []
    for r, rate in sorted(mine.items()):
        best = max((t[r] for t in theirs if r in t), default=None)
        if best:
            each.append(round(rate / best, 3))
    return (statistics.median(each) if each else None), each

