"""
The WebSocket section (issue 5): portrouter's C{ws} route (a WebSocket-to-TCP
bridge) against websockify and websocat's own server, with iperf3 carried
through a C{websocat} client-side tunnel in both directions. One run,
same-run ratios.

    iperf3 -c --> websocat tcp-l:L ws://BRIDGE/ --> bridge (core 1) --> iperf3 -s
    `------------------ load core (0) ----------'                       load core
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    LOAD_CORE,
    LOOPBACK,
    NOISY,
    PROFILE_PARTS,
    PROXY_CORE,
    BenchError,
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
    iperf3,
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
    summarize_profile,
    wait_listening,
    wait_quiet,
    warn_if_busy,
    write_results,
)

TARGETS = ("direct", "portrouter", "websockify", "websocat")
DESCRIPTION = {
    "direct": "no tunnel, no bridge: iperf3 client to server (the ceiling)",
    "portrouter": "portrouter --ws 'tcp:P -> tcp:127.0.0.1:IPERF'",
    "websockify": "websockify 127.0.0.1:P 127.0.0.1:IPERF (numpy unmasking, a process per connection)",
    "websocat": "websocat --binary ws-l:127.0.0.1:P tcp:127.0.0.1:IPERF",
}

NVX_CHECK = "import autobahn, autobahn.websocket.xormasker as x; print(x.USES_NVX, autobahn.__version__)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ws")
    group.add_argument("--ws-seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    group.add_argument(
        "--ws-targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}"
    )


def _targets(args: argparse.Namespace) -> list[str]:
    targets = [t.strip() for t in args.ws_targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise BenchError(f"unknown WS targets: {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})")
    return targets


def _tool_names(args: argparse.Namespace) -> list[str]:
    targets = set(_targets(args))
    names = ["taskset", "iperf3"]
    if targets - {"direct"}:
        names.append("websocat")  # the client-side tunnel, whichever bridge
    if "portrouter" in targets or args.profile:
        names.append("twistd")
    if "websockify" in targets:
        names.append("websockify")
    if args.profile:
        names.append("py-spy")
    return names


def preflight(args: argparse.Namespace) -> None:
    """Every missing tool named before any section starts."""
    require(*_tool_names(args))


@dataclass
class Row:
    """One target's numbers, plus what is needed to judge them."""

    up_gbps: float | None = None  # client to service: the bridge unmasks
    down_gbps: float | None = None  # service to client: the bridge frames
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # measurements that failed, and why


class Bench:
    """One WS run: every target measured in turn, each with a fresh bridge, tunnel and server."""

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        self.procs = procs
        self.tools = tools
        self.seconds: float = args.ws_seconds
        self.work = procs.workdir
        self.portrouter_env = portrouter_env
        self.retry = Retry("ws")

    def nvx(self) -> dict[str, Any]:
        """Whether Autobahn's native masking is in use in portrouter's Python, as issue 5 asks."""
        out = subprocess.run([sys.executable, "-c", NVX_CHECK], capture_output=True, text=True, timeout=60,
                             env=self.portrouter_env)
        if out.returncode != 0:
            return {"uses_nvx": None, "error": out.stderr.strip()[-300:], "python": sys.executable}
        nvx, version = out.stdout.split()
        return {"uses_nvx": nvx == "True", "autobahn": version, "python": sys.executable}

    def iperf_backend(self, tag: str) -> tuple[Proc, int]:
        port = free_port()
        proc = self.procs.start(
            f"{tag}-iperf3-server", [self.tools["iperf3"], "-s", "-B", LOOPBACK, "-p", str(port)], LOAD_CORE
        )
        wait_listening(proc, port)
        return proc, port

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
            server, iperf_port = self.iperf_backend(tag)
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
        errors: dict[str, str] = {}
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

            result = attempt("ws", "portrouter", errors, f"profile {key}", one)
            out[key] = result if result is not None else {"error": errors[f"profile {key}"]}
        return out


def ratios(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """The comparisons issue 5 asks for, with their targets."""

    def get(target: str, attr: str) -> float | None:
        row = rows.get(target)
        return None if row is None else getattr(row, attr)

    return [
        check("client->service: portrouter / websocat", ratio(get("portrouter", "up_gbps"), get("websocat", "up_gbps")),
              ">=", 1.0),
        check("service->client: portrouter / websocat",
              ratio(get("portrouter", "down_gbps"), get("websocat", "down_gbps")), ">=", 1.0),
    ]


def references(rows: dict[str, Row]) -> list[tuple[str, float | None]]:
    def get(target: str, attr: str) -> float | None:
        row = rows.get(target)
        return None if row is None else getattr(row, attr)

    return [
        ("client->service: portrouter / websockify", ratio(get("portrouter", "up_gbps"), get("websockify", "up_gbps"))),
        ("service->client: portrouter / websockify",
         ratio(get("portrouter", "down_gbps"), get("websockify", "down_gbps"))),
    ]


def print_report(rows: dict[str, Row], checks: list[dict[str, Any]], nvx: dict[str, Any]) -> None:
    def cell(r: Row, value: float | None, key: str, digits: int) -> str:
        if key in r.errors:
            return "FAILED "
        noisy = r.detail.get(key, {}).get("foreign_cpu", 0) > NOISY
        return fmt(value, digits) + ("*" if noisy else " ")

    print()
    print_table(
        "WS (iperf3 through websocat tunnel)",
        [("client->service Gbit/s", 24), ("service->client Gbit/s", 24)],
        {name: [cell(r, r.up_gbps, "up", 2), cell(r, r.down_gbps, "down", 2)] for name, r in rows.items()},
    )
    if any(d.get("foreign_cpu", 0) > NOISY for r in rows.values() for d in r.detail.values()):
        print(f"* other programs used more than {NOISY:g}% of a core meanwhile: rerun on a quiet machine")
    print()
    print_table(
        "core busy %: load / proxy (others)",
        [("client->service", 18), ("service->client", 18)],
        {name: [busy_cell(r.detail.get("up")), busy_cell(r.detail.get("down"))] for name, r in rows.items()},
    )
    print_errors(rows)
    print()
    print_checks(checks)
    for what, value in references(rows):
        shown = "-" if value is None else f"{value:.2f}x"
        print(f"{what:<40} {shown:>7}   (reference)")
    if nvx.get("uses_nvx") is None:
        print(f"Autobahn NVX masking: unknown ({nvx.get('error')})")
    else:
        print(f"Autobahn {nvx['autobahn']} NVX (native) masking in portrouter's Python: "
              f"{'yes' if nvx['uses_nvx'] else 'NO: masking runs in Python'}")


def print_profile(profile: dict[str, Any]) -> None:
    for key, title in (("up", "client->service"), ("down", "service->client")):
        p = profile[key]
        print()
        if "error" in p:
            print(f"portrouter bridging {title}: no profile: {p['error'].splitlines()[0]}")
            continue
        print(f"portrouter bridging {title}, py-spy -r 500, {p['samples']} samples "
              f"({p['gbps_under_profiler']:.2f} Gbit/s while sampled)")
        print_frames(p, PROFILE_PARTS)


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    """Measure every requested target; print the table and write the JSON."""
    targets = _targets(args)
    tools = require(*_tool_names(args))
    py_spy = tools.get("py-spy")
    env, source = portrouter_under_test(procs.workdir, args.portrouter_rev)
    if "portrouter" in targets or py_spy:
        require_portrouter(tools["twistd"], env)
    bench = Bench(procs, tools, args, env)
    nvx = bench.nvx()

    quiet_before = wait_quiet(args.wait_quiet)
    warn_if_busy(quiet_before)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"[ws] portrouter from {source}", flush=True)
    t0 = time.monotonic()
    rows: dict[str, Row] = {}
    for target in targets:
        rows[target] = bench.measure(target)
    quiet_after = quiet_check()
    warn_if_busy(quiet_after)

    checks = ratios(rows)
    print_report(rows, checks, nvx)
    versions = {"iperf3": [tools["iperf3"], "--version"]}
    if "websocat" in tools:
        versions["websocat"] = [tools["websocat"], "--version"]
    if "websockify" in tools:
        # websockify has no --version; its package metadata says.
        versions["websockify"] = [
            _beside(tools["websockify"], "python"), "-c",
            "from importlib.metadata import version; print('websockify', version('websockify'))",
        ]
    data: dict[str, Any] = {
        "section": "ws",
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "host": host_info(source, **versions),
        "parameters": {"seconds": bench.seconds, "load_core": LOAD_CORE, "proxy_core": PROXY_CORE},
        "targets": {t: DESCRIPTION[t] for t in targets},
        "autobahn_nvx": nvx,
        "other_load_busy_percent": {"before": quiet_before, "after": quiet_after},
        "rows": {name: asdict(r) for name, r in rows.items()},
        "ratios": checks,
        "references": dict(references(rows)),
        "profile": None,
    }
    path = write_results("ws", data)
    print(f"\nresults: {path}")
    if py_spy:
        data["profile"] = bench.profile(py_spy)
        print_profile(data["profile"])
        path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _beside(script: str, name: str) -> str:
    """The interpreter a console script runs with (its shebang), for asking its package's version."""
    with open(script, "rb") as f:
        first = f.readline().decode(errors="replace").strip()
    if first.startswith("#!") and Path(first[2:].split()[0]).exists():
        return first[2:].split()[0]
    return str(Path(script).parent / name)
