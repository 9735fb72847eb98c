"""
The UDP tunnel section (issue 16): datagrams through ``portrouter-tunnel
--listen udp:`` and a UDP service port (``/stream/.../udpproxy``) against the
same through a plain UDP route, in one run: 64-byte round trips with one
datagram in flight, and ``iperf3 -u``. Nothing else carries UDP over a
WebSocket to compare with, so both paths are reported, and what the tunnel
costs per datagram.

    udprate / iperf3 -c --UDP--> portrouter-tunnel --WS--> portrouter --UDP--> echo / iperf3 -s
    `--- load core (0) ---'      `--------- proxy core (1), both ---------'   load core (0)

The tunnel and the router share the proxy core, so that core's busy time per
datagram is the whole path's cost, comparable with the plain route's one
process there. The round trips take turns as in the UDP section (the same
code): every path started at once, rounds in rotating order.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import udp_bench
from harness import (
    LOOPBACK,
    PROXY_CORE,
    Proc,
    Procs,
    assert_loopback_only,
    attempt_profile,
    blame,
    fmt,
    free_port,
    print_sampled,
    py_spy_record,
    ratio,
    require,
    summarize_profile,
    wait_listening,
)
from section import Section, busy_cells, cell, figure, print_tables
from udp_bench import WARMUP, Row, paired

TARGETS = ("direct", "udp-route", "udp-route-nopoll", "tunnel")
DESCRIPTION = {
    "direct": "no proxy: the client talks to the backend",
    "udp-route": "portrouter --udp (and --tcp on the same port for iperf3's control connection), defaults",
    "udp-route-nopoll": "the same with udp_busy_poll: 0 (the reactor sleeps as soon as it is idle)",
    "tunnel": "portrouter-tunnel --listen udp:P to /stream/kernel/k1/udpproxy?app=svc of a portrouter whose "
              "service svc is the backend; for iperf3's control connection, a second portrouter-tunnel "
              "--listen tcp:P to a tcpproxy service on the same backend port; all on the proxy core",
}
TUNNEL_TARGETS = frozenset({"tunnel"})


class Bench(udp_bench.Bench):
    """One run: the UDP section's measurements, with the tunnel and the plain route as the rows."""

    NAME = "udptunnel"
    TARGETS = TARGETS
    SECONDS_HELP = "round trips measured per path, in all, and the length of each iperf3 run (default 5)"
    OPTIONS = {"rounds": {"type": int, "default": 5, "help": "turns the paths take at the round trips (default 5)"}}
    PORTROUTER = frozenset({"udp-route", "udp-route-nopoll", "tunnel"})
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "gcc", "iperf3")
    TARGET_TOOLS = {target: ("twistd",) for target in PORTROUTER}
    VERSIONS = {"iperf3": "--version"}

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        Section.__init__(self, procs, tools, args, portrouter_env)
        self.rounds = max(1, args.udptunnel_rounds)
        self.udprate = ""

    @classmethod
    def require(cls, args: argparse.Namespace) -> dict[str, str]:
        return require(*cls.tool_names(set(cls.targets(args)), args.profile))

    # -- the paths ---------------------------------------------------------------------

    def proxy(self, target: str, backend: int, tag: str, control: bool) -> tuple[list[Proc], int]:
        """
        Start C{target}'s relays on the proxy core towards C{backend}; with
        C{control}, TCP too on the same port number (iperf3's control
        connection). The processes (the first takes the client's datagrams)
        and the port the client sends to.
        """
        if target in ("udp-route", "udp-route-nopoll"):
            return super().proxy(target.replace("udp-route", "portrouter"), backend, tag, control)
        if target not in TUNNEL_TARGETS:
            raise ValueError(target)
        name = f"{target}-{tag}"
        twistd = self.tools["twistd"]
        services = [{"name": "svc", "protocol": "udp", "port": backend}]
        if control:
            services.append({"name": "ctl", "protocol": "tcp", "port": backend})
        config = self.work / f"{name}.yaml"
        config.write_text(json.dumps({"projects": [{"name": "k1", "host": LOOPBACK, "services": services}]}))
        ingress = free_port()
        # No auth section: portrouter answers loopback clients only, which these are.
        router = self.procs.start(f"{name}-router", [
            twistd, "-n", "--pidfile=", "portrouter", "--ingress", f"tcp:{ingress}:interface={LOOPBACK}",
            "--config", str(config)], PROXY_CORE, env=self.portrouter_env)
        procs = [router]
        wait_listening(router, ingress, timeout=20)
        port = free_port(udp=True)
        stream = f"ws://{LOOPBACK}:{ingress}/stream/kernel/k1"
        tunnel = self.procs.start(name, [
            twistd, "-n", "--pidfile=", "portrouter-tunnel", "--listen", f"udp:{port}:interface={LOOPBACK}",
            "--url", f"{stream}/udpproxy?app=svc"], PROXY_CORE, env=self.portrouter_env)
        procs.insert(0, tunnel)
        wait_listening(tunnel, port, timeout=20, udp=True)
        if control:
            ctl = self.procs.start(f"{name}-ctl", [
                twistd, "-n", "--pidfile=", "portrouter-tunnel", "--listen", f"tcp:{port}:interface={LOOPBACK}",
                "--url", f"{stream}/tcpproxy?app=ctl"], PROXY_CORE, env=self.portrouter_env)
            procs.append(ctl)
            wait_listening(ctl, port, timeout=20)
        assert_loopback_only(procs)
        return procs, port

    # -- profiling (optional) ------------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where the tunnel's time goes relaying one datagram at a time (py-spy, 500 Hz, 4 s)."""

        def record() -> dict[str, Any]:
            echo, echo_port = self.echo_backend("profile")
            procs, port = self.proxy("tunnel", echo_port, "profile", control=False)
            raw = self.work / "portrouter-tunnel-udp-profile.txt"
            try:
                self.round_trips(port, WARMUP)
                with blame(procs[0]):
                    load = py_spy_record(py_spy, procs[0].pid, raw, 4, lambda: self.round_trips(port, 5))
            finally:
                for proc in procs:
                    self.procs.stop(proc)
                self.procs.stop(echo)
            return {"round_trips_under_profiler": round(load["rate"]), **summarize_profile(raw)}

        return attempt_profile("udptunnel", "profile", record)

    def print_profile(self, profile: dict[str, Any]) -> None:
        if "error" not in profile:  # else it was reported as it failed
            print_sampled("portrouter-tunnel relaying one 64-byte datagram at a time", profile,
                          f"{profile['round_trips_under_profiler']:,} round trips/s")

    # -- the report ----------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """No targets: there is no peer to compare with (issue 16)."""
        return []

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        """The tunnel against the plain route, same run; and its cost per datagram."""
        tunnel_us = datagram_cpu_us(rows.get("tunnel"))
        route_us = datagram_cpu_us(rows.get("udp-route-nopoll"))
        return [
            ("round trips/s: tunnel / udp-route", paired(rows, "tunnel", ("udp-route",))[0]),
            ("round trips/s: tunnel / udp-route-nopoll", paired(rows, "tunnel", ("udp-route-nopoll",))[0]),
            ("proxy CPU per datagram: tunnel / udp-route-nopoll", ratio(tunnel_us, route_us)),
            ("iperf3 received: tunnel / udp-route",
             ratio(figure(rows, "tunnel", "iperf_gbps"), figure(rows, "udp-route", "iperf_gbps"))),
            ("proxy CPU per datagram under iperf3: tunnel / udp-route",
             ratio(iperf_cpu_us(rows.get("tunnel"), self.seconds), iperf_cpu_us(rows.get("udp-route"), self.seconds))),
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        direct = rows.get("direct")  # no proxy: the proxy core's time is nobody's
        print_tables(
            rows, "UDP through the tunnel and through a route",
            [("round trips/s", 15), ("p50 us", 8), ("CPU us/dgram", 14), ("iperf3 recv Gbit/s", 20),
             ("sent Gbit/s", 13), ("loss %", 9), ("CPU us/dgram", 14)],
            lambda r: [
                cell(r, r.round_trips_per_s, "round_trips", 0), fmt(r.rtt_p50_us, 0) + " ",
                fmt(datagram_cpu_us(r), 1) + " ",
                cell(r, r.iperf_gbps, "iperf", 2), fmt(r.iperf_sent_gbps, 2) + " ",
                fmt(r.iperf_loss_percent, 1) + " ",
                fmt(None if r is direct else iperf_cpu_us(r, self.seconds), 1) + " ",
            ],
            [("round trips", 16), ("iperf3", 16), ("rt lost/errors", 16)],
            lambda r: [
                *busy_cells(r, ("round_trips", "iperf")),
                "/".join(str(r.detail.get("round_trips", {}).get(k, "-")) for k in ("lost", "errors")),
            ],
        )
        print("CPU us/dgram: the proxy core's busy time per datagram relayed (a round trip is two; under")
        print("iperf3, per datagram the server received). The tunnel's column is the tunnel and the router together.")
        print()
        print("round trips/s in each round:")
        for name, r in rows.items():
            rates = r.detail.get("round_trips", {}).get("rates")
            if rates:
                print(f"  {name:<20} " + " ".join(f"{v:>7,}" for v in rates))
        print()
        for what, value in references or ():
            shown = "-" if value is None else f"{value:.2f}x"
            print(f"{what:<56} {shown:>7}   (reference; no target)")
        added = [datagram_cpu_us(rows.get(t)) for t in ("tunnel", "udp-route-nopoll")]
        if None not in added:
            print(f"{'the tunnel adds, per datagram, on the proxy core':<56} "
                  f"{added[0] - added[1]:>6.1f} us")  # type: ignore[operator]


def datagram_cpu_us(row: Row | None) -> float | None:
    """The proxy core's busy time per datagram of the round trips: two datagrams each."""
    if row is None or row.proxy_cpu_us is None:
        return None
    return round(row.proxy_cpu_us / 2, 1)


def iperf_cpu_us(row: Row | None, seconds: float) -> float | None:
    """
    The proxy core's busy time per datagram the iperf3 server received, in
    a C{seconds} run. The core's busy share is taken over iperf3's whole
    run, its start and end included, so this is a little low, alike for
    every row.
    """
    iperf = row.detail.get("iperf") if row is not None else None
    if not iperf or not iperf.get("packets"):
        return None
    received: int = iperf["packets"] - (iperf.get("lost_packets") or 0)
    if not received:
        return None
    busy: float = iperf["busy_proxy_core"]  # percent of the run
    return round(busy / 100 * seconds / received * 1e6, 2)
