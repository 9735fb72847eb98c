"""
The dashboard section (issue 19): what open dashboards cost the traffic.
HTTP 100 B req/s (C{wrk -t1 -c50}, the HTTP section's load) through one
portrouter's own HTTP port, with no ``/_api/events`` stream open and with
ten (what ten open dashboards cost: each page holds one stream), taking
turns in one run against the same process, so the ratio compares like with
like. The streams are read on the load core, as browsers elsewhere would.

    wrk --HTTP--> portrouter --HTTP--> nginx      (+ 0 or 10 readers of /_api/events)
    load core     proxy core           load core
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import socket
import threading
from statistics import mean, median
from typing import Any, ClassVar

import http_bench
from harness import (
    LOOPBACK,
    BenchError,
    Proc,
    Procs,
    attempt_profile,
    blame,
    check,
    fmt,
    py_spy_record,
    ratio,
    wait_until,
)
from section import busy_cells, cell, compare, print_ratios, print_tables

TARGETS = ("none", "ten")
DESCRIPTION = {
    "none": "portrouter --http, no /_api/events stream open",
    "ten": "the same process with ten /_api/events streams open and read (ten dashboards)",
}
STREAMS = {"none": 0, "ten": 10}


class Readers:
    """C{n} open /_api/events streams, read and thrown away by one thread until closed."""

    def __init__(self, port: int, n: int):
        self.socks = []
        self.bytes = 0
        self.events = 0
        self._stop = threading.Event()
        for _ in range(n):
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            sock.sendall(b"GET /_api/events HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = b""
            while b"event: state" not in head:  # subscribed: the whole state came
                data = sock.recv(65536)
                if not data:
                    raise BenchError(f"/_api/events closed at once: {head[:200]!r}")
                head += data
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"/_api/events answered {head.splitlines()[0]!r}")
            sock.setblocking(False)
            self.socks.append(sock)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self.socks:
                sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    try:
                        data = key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    self.bytes += len(data)
                    self.events += data.count(b"\n\n")

    def close(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()
        return {"streams": len(self.socks), "stream_bytes": self.bytes, "stream_events": self.events}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process C{pid} (portrouter: taskset execs it)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench(http_bench.Bench):
    """One run: one portrouter, the two conditions in turns, rotating which goes first."""

    NAME = "dashboard"
    TARGETS = TARGETS
    SECONDS_HELP = "length of each wrk run (default 5)"
    OPTIONS = {"rounds": {"type": int, "default": 3, "help": "turns each condition takes (default 3)"}}
    PORTROUTER = frozenset(TARGETS)
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "wrk", "nginx", "twistd")
    TARGET_TOOLS: ClassVar[dict[str, tuple[str, ...]]] = {}
    VERSIONS = {"wrk": "-v", "nginx": "-v"}

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.rounds = max(1, args.dashboard_rounds)
        self.log_from = 0

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "sizes": {"100b": 100}, "rounds": self.rounds, "streams": STREAMS}

    def measure_all(self, targets: list[str]) -> dict[str, http_bench.Row]:
        self.prepare()
        rows = {target: http_bench.Row() for target in targets}
        runs: dict[str, list[dict[str, Any]]] = {target: [] for target in targets}
        backend, backend_port = self.backend("dashboard")
        proxy: Proc | None = None
        try:
            proxy, port, _ = self.proxy("portrouter", backend_port)
            # The streams come from the ingress (/_api/), the load from the project's own port.
            ingress = self._ingress_port(proxy)
            url = f"http://{LOOPBACK}:{port}/100b.bin"
            with blame(proxy):
                self.fetch_check(url, "100b")
                self.wrk(url, http_bench.WARMUP)
                for turn in range(self.rounds):
                    order = targets if turn % 2 == 0 else list(reversed(targets))
                    for target in order:
                        print(f"[dashboard] round {turn + 1}/{self.rounds}: {target} ...", flush=True)
                        readers = Readers(ingress, STREAMS[target])
                        pid = proxy.pid

                        def measured() -> dict[str, Any]:
                            cpu0 = _cpu_seconds(pid)
                            result = self.wrk(url, self.seconds)
                            cpu = _cpu_seconds(pid) - cpu0
                            result["proxy_cpu_us_per_request"] = round(cpu / max(result["requests"], 1) * 1e6, 1)
                            return result

                        try:
                            # Measured again (within the section's budget) if other programs were busy meanwhile.
                            result = self.retry.quietly(f"{target} round {turn + 1}", measured)
                        finally:
                            result_streams = readers.close()
                        if STREAMS[target] and not result_streams["stream_events"]:
                            raise BenchError("the event streams sent nothing while the load ran")
                        runs[target].append({**result, **result_streams})
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(backend)
        for target, results in runs.items():
            rows[target].req_per_s["100b"] = round(mean(r["req_per_s"] for r in results))
            rows[target].mb_per_s["cpu_us"] = median(r["proxy_cpu_us_per_request"] for r in results)
            detail = dict(results[-1])
            detail["rounds"] = results
            detail["req_per_s_each"] = [r["req_per_s"] for r in results]
            rows[target].detail["100b"] = detail
        return rows

    def proxy(self, target: str, backend: int) -> tuple[Proc, int, str]:
        # The HTTP section's portrouter, its ingress on a port of its own (no auth: loopback may read events).
        # Its log is appended to from one start to the next: this start's lines begin here.
        log = self.work / "portrouter.log"
        self.log_from = log.stat().st_size if log.exists() else 0
        return super().proxy("portrouter", backend)

    def _ingress_port(self, proxy: Proc) -> int:
        """The ingress portrouter bound (tcp:0), from its log."""
        found: list[int] = []

        def said() -> bool:
            daemon_log = proxy.daemon_log
            if daemon_log is not None:
                # A daemon (-l FILE, as the HTTP section runs it since issue
                # 20) writes a file of its own, one per start: all of it.
                text = daemon_log.read_bytes().decode(errors="replace") if daemon_log.exists() else ""
            elif proxy.log is not None:
                text = proxy.log.read_bytes()[self.log_from:].decode(errors="replace")
            else:
                text = ""
            m = re.search(r"ingress listening on [\d.]+:(\d+)", text)
            if m:
                found.append(int(m.group(1)))
            return bool(m)

        wait_until(said, 20, "portrouter to say where its ingress listens")
        return found[0]

    def ratios(self, rows: dict[str, http_bench.Row]) -> list[dict[str, Any]]:
        """
        The turns are paired (each round measures both, back to back): the
        median of the rounds' ratios, which a burst of other load in one
        turn moves least.
        """
        return [check("100 B req/s: ten dashboards / none (median of rounds)", self._paired(rows), ">=", 0.95)]

    @staticmethod
    def _paired(rows: dict[str, http_bench.Row]) -> float | None:
        each = {t: rows[t].detail.get("100b", {}).get("req_per_s_each", []) for t in rows}
        pairs = [ratio(t, n) for t, n in zip(each.get("ten", []), each.get("none", []))]
        values = [p for p in pairs if p is not None]
        return round(median(values), 3) if values else None

    def references(self, rows: dict[str, http_bench.Row]) -> list[tuple[str, float | None]]:
        return [
            ("100 B req/s: ten / none, means", compare(rows, "ten", "none", "req_per_s", "100b")),
            ("portrouter CPU per request: ten / none", compare(rows, "ten", "none", "mb_per_s", "cpu_us")),
        ]

    def print_report(self, rows: dict[str, http_bench.Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, f"HTTP 100 B through portrouter, mean of {self.rounds} turns (wrk -t1 -c50)",
            [("req/s", 10), ("CPU us/req", 11), ("each turn", 36), ("events read", 12)],
            lambda r: [
                cell(r, r.req_per_s.get("100b"), "100b", 0),
                fmt(r.mb_per_s.get("cpu_us"), 1) + " ",
                " ".join(fmt(v, 0) for v in r.detail.get("100b", {}).get("req_per_s_each", [])) + " ",
                str(sum(x.get("stream_events", 0) for x in r.detail.get("100b", {}).get("rounds", []))) + " ",
            ],
            [("100 B", 16)],
            lambda r: busy_cells(r, ("100b",)),
        )
        print_ratios(checks, references)

    def profile(self, py_spy: str) -> dict[str, Any]:
        """
        The cost read off the samples instead of the rates, which other
        programs on the machine move: under the 100 B load with ten streams
        open, the share of portrouter's samples in the dashboard's code (the
        ticker and the streams, and the log observer that runs for every
        request whether or not a dashboard is open).
        """

        def record() -> dict[str, Any]:
            backend, backend_port = self.backend("profile")
            proxy, port, _ = self.proxy("portrouter", backend_port)
            raw = self.work / "portrouter-dashboard-profile.txt"
            try:
                url = f"http://{LOOPBACK}:{port}/100b.bin"
                readers = Readers(self._ingress_port(proxy), STREAMS["ten"])
                try:
                    self.wrk(url, http_bench.WARMUP)
                    with blame(proxy):
                        load = py_spy_record(py_spy, proxy.pid, raw, 4, lambda: self.wrk(url, 5))
                finally:
                    readers.close()
            finally:
                self.procs.stop(proxy)
                self.procs.stop(backend)
            total = observer = hub = 0
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                n = int(count)
                total += n
                if "portrouter/events.py" in stack:
                    if "(portrouter/events.py" in stack and "Hub." not in stack and "EventStream." not in stack:
                        observer += n
                    else:
                        hub += n
            return {"req_per_s_under_profiler": load["req_per_s"], "samples": total,
                    "hub_and_streams_percent": round(100 * hub / max(total, 1), 2),
                    "log_observer_percent": round(100 * observer / max(total, 1), 2)}

        return attempt_profile("dashboard", "profile", record)

    def print_profile(self, profile: dict[str, Any]) -> None:
        if "error" in profile:
            return  # reported as it failed
        print()
        print(f"portrouter under 100 B wrk load with ten streams open, py-spy -r 500, {profile['samples']} samples "
              f"({profile['req_per_s_under_profiler']:,} req/s while sampled)")
        print(f"  the ticker and the streams (what ten dashboards add): {profile['hub_and_streams_percent']:.2f}%")
        print(f"  the log observer (always on, every request):          {profile['log_observer_percent']:.2f}%")
