"""
The WebSocket section (issue 5): portrouter's C{ws} route (a WebSocket-to-TCP
bridge) against websockify and websocat's own server, with iperf3 carried
through a C{websocat} client-side tunnel in both directions. One run,
same-run ratios.

    iperf3 -c --> websocat tcp-l:L ws://BRIDGE/ --> bridge (core 1) --> iperf3 -s
    `------------------ load core (0) ----------'                       load core
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    Proc,
    assert_loopback_only,
    attempt,
    attempt_profile,
    blame,
    check,
    free_port,
    iperf3,
    iperf3_server,
    portrouter_argv,
    print_sampled,
    py_spy_record,
    summarize_profile,
    wait_listening,
)
from section import Section, busy_cells, cell, compare, print_ratios, print_tables

TARGETS = ("direct", "portrouter", "websockify", "websocat")
DESCRIPTION = {
    "direct": "no tunnel, no bridge: iperf3 client to server (the ceiling)",
    "portrouter": "portrouter --ws 'tcp:P -> tcp:127.0.0.1:IPERF'",
    "websockify": "websockify 127.0.0.1:P 127.0.0.1:IPERF (numpy unmasking, a process per connection)",
    "websocat": "websocat --binary ws-l:127.0.0.1:P tcp:127.0.0.1:IPERF",
}

NVX_CHECK = "import autobahn, autobahn.websocket.xormasker as x; print(x.USES_NVX, autobahn.__version__)"


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    up_gbps: float | None = None  # client to service: the bridge unmasks
    down_gbps: float | None = None  # service to client: the bridge frames
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # measurements that failed, and why


class Bench(Section[Row]):
    """One WS run: every target measured in turn, each with a fresh bridge, tunnel and server."""

    NAME = "ws"
    TARGETS = TARGETS
    SECONDS_HELP = "length of each iperf3 run (default 5)"
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "iperf3")
    # Every bridge needs websocat's client-side tunnel.
    TARGET_TOOLS = {
        "portrouter": ("websocat", "twistd"), "websockify": ("websocat", "websockify"), "websocat": ("websocat",),
    }
    VERSIONS = {"iperf3": "--version", "websocat": "--version"}

    nvx: dict[str, Any]  # Autobahn's masking, as probe() found it

    def probe(self) -> dict[str, Any]:
        """Whether Autobahn's native masking is in use in portrouter's Python, as issue 5 asks."""
        out = subprocess.run([sys.executable, "-c", NVX_CHECK], capture_output=True, text=True, timeout=60,
                             env=self.portrouter_env)
        if out.returncode != 0:
            self.nvx = {"uses_nvx": None, "error": out.stderr.strip()[-300:], "python": sys.executable}
        else:
            nvx, version = out.stdout.split()
            self.nvx = {"uses_nvx": nvx == "True", "autobahn": version, "python": sys.executable}
        return {"autobahn_nvx": self.nvx}

    def versions(self) -> dict[str, list[str]]:
        versions = super().versions()
        if "websockify" in self.tools:
            # websockify has no --version; its package metadata says.
            versions["websockify"] = [
                _beside(self.tools["websockify"], "python"), "-c",
                "from importlib.metadata import version; print('websockify', version('websockify'))",
            ]
        return versions

    def bridge(self, target: str, backend: int, tag: str) -> tuple[Proc, int]:
        """Start C{target} on the proxy core bridging WebSocket to TCP C{backend}."""
        port = free_port()
        name = f"{target}-{tag}"
        env = None
        if target == "portrouter":
            argv = portrouter_argv(
                self.tools["twistd"], [("ws", f"tcp:{port}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{backend}")]
            )
            env = self.portrouter_env
        elif target == "websockify":
            argv = [self.tools["websockify"], f"{LOOPBACK}:{port}", f"{LOOPBACK}:{backend}"]
        elif target == "websocat":
            argv = [self.tools["websocat"], "--binary", f"ws-l:{LOOPBACK}:{port}", f"tcp:{LOOPBACK}:{backend}"]
        else:
            raise ValueError(target)
        proc = self.procs.start(name, argv, PROXY_CORE, env=env)
        wait_listening(proc, port, timeout=20)
        assert_loopback_only([proc])
        return proc, port

    def tunnel(self, bridge: int, tag: str) -> tuple[Proc, int]:
        """The client side, on the load core: each TCP connection to it is a WebSocket to the bridge."""
        port = free_port()
        argv = [self.tools["websocat"], "--binary", f"tcp-l:{LOOPBACK}:{port}", f"ws://{LOOPBACK}:{bridge}/"]
        proc = self.procs.start(f"tunnel-{tag}", argv, LOAD_CORE)
        wait_listening(proc, port)
        return proc, port

    def setup(self, target: str, tag: str) -> tuple[list[Proc], Proc | None, int]:
        """Server, bridge and tunnel for C{target}: every process, the bridge, the port iperf3 uses."""
        started: list[Proc] = []
        try:
            server, iperf_port = iperf3_server(self.tools["iperf3"], self.procs, tag)
            started.append(server)
            if target == "direct":
                return started, None, iperf_port
            bridge, bridge_port = self.bridge(target, iperf_port, tag)
            started.append(bridge)
            tunnel, port = self.tunnel(bridge_port, tag)
            started.append(tunnel)
            return started, bridge, port
        except BaseException:
            for proc in reversed(started):
                self.procs.stop(proc)
            raise

    def measure(self, target: str) -> Row:
        row = Row()
        print(f"[ws] {target} ...", flush=True)
        started, bridge, port = self.setup(target, target)
        try:
            for key, reverse in (("up", False), ("down", True)):
                def one() -> dict[str, Any]:
                    with blame(bridge):
                        return self.retry.quietly(
                            f"{target} {key}",
                            lambda: iperf3(self.tools["iperf3"], port, self.seconds, self.procs, reverse=reverse),
                            retry=target != "direct",
                        )

                result = attempt("ws", target, row.errors, key, one)
                if result is not None:
                    setattr(row, f"{key}_gbps", result["gbps"])
                    row.detail[key] = result
        finally:
            for proc in reversed(started):
                self.procs.stop(proc)
        return row

    # -- profiling (optional) ------------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """
        Where portrouter's time goes in each direction (py-spy, 500 Hz, 4 s
        each); a direction that fails is reported and the other still profiled.
        """
        out: dict[str, Any] = {}
        for key, reverse in (("up", False), ("down", True)):
            def one() -> dict[str, Any]:
                started, bridge, port = self.setup("portrouter", f"profile-{key}")
                assert bridge is not None
                raw = self.work / f"portrouter-ws-{key}-profile.txt"
                try:
                    with blame(bridge):
                        load = py_spy_record(
                            py_spy, bridge.pid, raw, 4,
                            lambda: iperf3(self.tools["iperf3"], port, 5, self.procs, reverse=reverse),
                        )
                finally:
                    for proc in reversed(started):
                        self.procs.stop(proc)
                return {"gbps_under_profiler": load["gbps"], **summarize_profile(raw)}

            out[key] = attempt_profile("ws", f"profile {key}", one)
        return out

    # -- the report ----------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """The comparisons issue 5 asks for, with their targets."""
        return [
            check("client->service: portrouter / websocat", compare(rows, "portrouter", "websocat", "up_gbps"),
                  ">=", 1.0),
            check("service->client: portrouter / websocat", compare(rows, "portrouter", "websocat", "down_gbps"),
                  ">=", 1.0),
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        return [
            ("client->service: portrouter / websockify", compare(rows, "portrouter", "websockify", "up_gbps")),
            ("service->client: portrouter / websockify", compare(rows, "portrouter", "websockify", "down_gbps")),
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, "WS (iperf3 through websocat tunnel)",
            [("client->service Gbit/s", 24), ("service->client Gbit/s", 24)],
            lambda r: [cell(r, r.up_gbps, "up", 2), cell(r, r.down_gbps, "down", 2)],
            [("client->service", 18), ("service->client", 18)],
            lambda r: busy_cells(r, ("up", "down")),
        )
        print_ratios(checks, references)
        if self.nvx.get("uses_nvx") is None:
            print(f"Autobahn NVX masking: unknown ({self.nvx.get('error')})")
        else:
            print(f"Autobahn {self.nvx['autobahn']} NVX (native) masking in portrouter's Python: "
                  f"{'yes' if self.nvx['uses_nvx'] else 'NO: masking runs in Python'}")

    def print_profile(self, profile: dict[str, Any]) -> None:
        for key, title in (("up", "client->service"), ("down", "service->client")):
            p = profile[key]
            if "error" in p:
                print()
                print(f"portrouter bridging {title}: no profile: {p['error'].splitlines()[0]}")
                continue
            print_sampled(f"portrouter bridging {title}", p, f"{p['gbps_under_profiler']:.2f} Gbit/s")


def _beside(script: str, name: str) -> str:
    """The interpreter a console script runs with (its shebang), for asking its package's version."""
    with open(script, "rb") as f:
        first = f.readline().decode(errors="replace").strip()
    if first.startswith("#!") and Path(first[2:].split()[0]).exists():
        return first[2:].split()[0]
    return str(Path(script).parent / name)
